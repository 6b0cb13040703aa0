//! A raw image file or a block device as an origin, read and written with pread/pwrite on
//! tokio's blocking pool.
//!
//! Architecture invariant: no file I/O on a runtime thread; a short read is an error, never a
//! short buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::{Origin, OriginError, OriginFuture};

/// A raw image file or block device.
#[derive(Debug)]
pub struct FileOrigin {
    file: Arc<File>,
    describe: String,
    size: u64,
    writable: bool,
}

impl FileOrigin {
    /// Opens `path`, read-write when `writable` (mutable disks), read-only otherwise.
    pub fn open(path: &Path, writable: bool) -> Result<Self, OriginError> {
        let describe = path.display().to_string();
        let open_err = |e: io::Error| OriginError::Open {
            origin: describe.clone(),
            cause: e.to_string(),
        };
        // Check the type before opening: open(2) on a FIFO would block a thread for ever.
        let ft = std::fs::metadata(path).map_err(open_err)?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(OriginError::Open {
                origin: describe,
                cause: "not a regular file or block device".into(),
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let size = if ft.is_block_device() {
            file.seek(io::SeekFrom::End(0)).map_err(open_err)?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(OriginError::Open {
                origin: describe,
                cause: "not a regular file or block device".into(),
            });
        };
        Ok(FileOrigin {
            file: Arc::new(file),
            describe,
            size,
            writable,
        })
    }

    /// (device, inode) of the open file: two paths to one file have the same id.
    pub fn file_id(&self) -> Option<(u64, u64)> {
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    fn io_error(&self, op: &'static str, offset: u64, e: io::Error) -> OriginError {
        OriginError::Io {
            origin: self.describe.clone(),
            op,
            offset,
            cause: e.to_string(),
        }
    }
}

fn join_error(origin: &str, e: tokio::task::JoinError) -> OriginError {
    OriginError::Io {
        origin: origin.to_string(),
        op: "blocking task",
        offset: 0,
        cause: e.to_string(),
    }
}

/// `len` bytes of `file` at `offset`, read into memory that is not zeroed first (the read
/// fills it); `UnexpectedEof` if the file ends before.
fn read_exact_at(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The spare capacity may exceed `len`: what was read past it is not asked for.
    buf.truncate(len);
    Ok(buf)
}

impl Origin for FileOrigin {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        let file = self.file.clone();
        Box::pin(async move {
            let res = crate::blocking::run(move || read_exact_at(&file, offset, len))
                .await
                .map_err(|e| join_error(&self.describe, e))?;
            match res {
                Ok(buf) => Ok(Bytes::from(buf)),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(OriginError::Short {
                    origin: self.describe.clone(),
                    offset,
                    len: len as u64,
                }),
                Err(e) => Err(self.io_error("read", offset, e)),
            }
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> OriginFuture<'_, ()> {
        let file = self.file.clone();
        Box::pin(async move {
            if !self.writable {
                return Err(self.io_error(
                    "write",
                    offset,
                    io::Error::new(io::ErrorKind::PermissionDenied, "origin opened read-only"),
                ));
            }
            crate::blocking::run(move || file.write_all_at(&data, offset))
                .await
                .map_err(|e| join_error(&self.describe, e))?
                .map_err(|e| self.io_error("write", offset, e))
        })
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        let file = self.file.clone();
        Box::pin(async move {
            if !self.writable {
                return Ok(());
            }
            crate::blocking::run(move || file.sync_data())
                .await
                .map_err(|e| join_error(&self.describe, e))?
                .map_err(|e| self.io_error("flush", 0, e))
        })
    }

    fn identity(&self) -> Option<String> {
        // The file we have open, not whatever the path names now (an image renamed over it).
        let m = self.file.metadata().ok()?;
        if m.file_type().is_block_device() {
            // A device's metadata does not change when its blocks do: no identity, so no
            // saved map is ever trusted for it.
            return None;
        }
        Some(format!(
            "dev={} ino={} size={} mtime={}.{}",
            m.dev(),
            m.ino(),
            self.size,
            m.mtime(),
            m.mtime_nsec()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_return_exactly_the_bytes_asked_for_and_short_ones_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let o = FileOrigin::open(&path, false).expect("open");
        for (offset, len) in [
            (0u64, 0usize),
            (0, 1),
            (7, 4096),
            (1000, 200_000),
            (299_999, 1),
        ] {
            let got = o.read_at(offset, len).await.expect("read");
            assert_eq!(&got[..], &data[offset as usize..offset as usize + len]);
        }
        // Past the end: a short read is an error naming the range, not fewer bytes.
        match o.read_at(299_000, 4096).await {
            Err(OriginError::Short { offset, len, .. }) => {
                assert_eq!((offset, len), (299_000, 4096))
            }
            other => panic!("expected a short read, got {other:?}"),
        }
    }
}
