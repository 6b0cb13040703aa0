//! What the fuzz targets share: one real node, opened once per process, with a sealed and a
//! mutable disk of 256 KiB, on a current-thread runtime.

use std::sync::{Arc, OnceLock};

use shadowcache_node::config::{Config, DiskSpec};
use shadowcache_node::{DiskMode, Node};

/// The node and the runtime it runs on.
pub struct World {
    /// Runs every input.
    pub rt: tokio::runtime::Runtime,
    /// The node.
    pub node: Arc<Node>,
    _dir: tempfile::TempDir,
}

/// The process's node, opened on first use.
pub fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Config::for_data_dir(&dir.path().join("data"));
        c.block_bytes = 4096;
        c.ram_bytes = 4 << 20;
        c.ssd_bytes = 0;
        c.nbd_unix = None;
        for (id, mode) in [("sealed", DiskMode::Sealed), ("scratch", DiskMode::Mutable)] {
            let path = dir.path().join(format!("{id}.raw"));
            let bytes: Vec<u8> = (0..256u32 << 10)
                .map(|i| (i * 7 + i / 4096) as u8)
                .collect();
            std::fs::write(&path, bytes).expect("image");
            c.disks.push(DiskSpec {
                id: id.into(),
                origin: path,
                mode,
            });
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let node = rt.block_on(Node::open(c)).expect("node");
        World {
            rt,
            node,
            _dir: dir,
        }
    })
}
