//! The config loader on any text: a configuration or an error naming what is wrong, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadowcache_node::config::{Config, Flags};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, data).expect("write");
    let flags = Flags {
        config: Some(path),
        data_dir: Some(dir.path().join("data")),
        ..Flags::default()
    };
    if let Err(e) = Config::from_flags(&flags) {
        assert!(!e.to_string().is_empty());
    }
});
