//! What an origin is, beneath the name it was registered with, so that one origin is never the
//! origin of two disks: a regular file by device and inode; a block device by its device number,
//! a partition also covering its whole disk, a loop device also being its backing file; an NBD
//! export by its canonical socket path or resolved address and its export name.
//!
//! Architecture invariant: reads metadata only (stat, sysfs, name resolution), never an origin's
//! bytes.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The identities of one origin: what it is, and what it overlaps without being it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// What it is (any one shared with another origin makes them the same).
    pub ids: Vec<String>,
    /// What it lies inside (a partition's whole disk).
    pub covers: Vec<String>,
}

impl Identity {
    /// Whether `self` and `other` name (part of) the same storage.
    pub fn overlaps(&self, other: &Identity) -> bool {
        let any = |a: &[String], b: &[String]| a.iter().any(|x| b.contains(x));
        any(&self.ids, &other.ids) || any(&self.ids, &other.covers) || any(&self.covers, &other.ids)
    }
}

fn major_minor(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// The identity of the file or block device at `path`.
pub fn of_path(path: &Path) -> std::io::Result<Identity> {
    let m = std::fs::metadata(path)?;
    let mut id = Identity::default();
    if m.file_type().is_block_device() {
        let (major, minor) = major_minor(m.rdev());
        id.ids.push(format!("blk:{major}:{minor}"));
        let sys = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
        if sys.join("partition").exists()
            && let Ok(dir) = sys.canonicalize()
            && let Some(parent) = dir.parent()
            && let Ok(dev) = std::fs::read_to_string(parent.join("dev"))
        {
            id.covers.push(format!("blk:{}", dev.trim()));
        }
        if let Ok(backing) = std::fs::read_to_string(sys.join("loop").join("backing_file"))
            && let Ok(b) = std::fs::metadata(backing.trim())
        {
            id.ids.push(format!("file:{}:{}", b.dev(), b.ino()));
        }
    } else {
        id.ids.push(format!("file:{}:{}", m.dev(), m.ino()));
    }
    Ok(id)
}

/// The identity of an NBD export: its socket's canonical path, or every address its host
/// resolves to, with the export name.
pub fn of_nbd(uri: &crate::origin::nbd::NbdUri) -> Identity {
    use crate::origin::nbd::NbdTarget;
    let mut id = Identity::default();
    match &uri.target {
        NbdTarget::Unix(p) => {
            let p = p.canonicalize().unwrap_or_else(|_| p.clone());
            id.ids
                .push(format!("nbd:unix:{}:{}", p.display(), uri.export));
        }
        NbdTarget::Tcp(host, port) => {
            use std::net::ToSocketAddrs;
            let addrs: Vec<std::net::SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map(|a| a.collect())
                .unwrap_or_default();
            if addrs.is_empty() {
                id.ids.push(format!("nbd:tcp:{host}:{port}:{}", uri.export));
            }
            for a in addrs {
                id.ids.push(format!("nbd:tcp:{a}:{}", uri.export));
            }
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ids: &[&str], covers: &[&str]) -> Identity {
        Identity {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            covers: covers.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn partitions_overlap_their_disk_not_each_other_and_loops_their_file() {
        let disk = id(&["blk:8:0"], &[]);
        let p1 = id(&["blk:8:1"], &["blk:8:0"]);
        let p2 = id(&["blk:8:2"], &["blk:8:0"]);
        assert!(disk.overlaps(&p1) && p1.overlaps(&disk));
        assert!(!p1.overlaps(&p2));
        let file = id(&["file:2049:77"], &[]);
        let lo = id(&["blk:7:0", "file:2049:77"], &[]);
        assert!(file.overlaps(&lo) && lo.overlaps(&file));
        assert_eq!(major_minor(0x801), (8, 1));
    }

    #[test]
    fn a_file_under_two_names_is_one_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.raw");
        std::fs::write(&f, b"x").expect("write");
        let link = dir.path().join("b.raw");
        std::fs::hard_link(&f, &link).expect("link");
        assert!(
            of_path(&f)
                .expect("id")
                .overlaps(&of_path(&link).expect("id"))
        );
    }
}
