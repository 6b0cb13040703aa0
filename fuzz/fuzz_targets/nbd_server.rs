//! The NBD server, negotiation and transmission, on any bytes a client may send: a real node
//! with a sealed and a mutable disk serves each input over an in-memory stream. Never a panic,
//! never a hang: the server answers or closes, and the session ends once the client's bytes
//! run out.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shadowcache_fuzz::world;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn(shadowcache_node::nbd::serve(w.node.clone(), server, None));
        // Everything the client sends, then end of stream; whatever comes back is read.
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let send = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let mut back = Vec::new();
        let drain = rd.read_to_end(&mut back);
        let done = tokio::time::timeout(Duration::from_secs(20), async {
            let ((), _) = tokio::join!(send, drain);
        })
        .await;
        assert!(
            done.is_ok(),
            "the session did not end 20 s after the client's bytes ran out"
        );
        let ended = tokio::time::timeout(Duration::from_secs(20), serving).await;
        assert!(ended.is_ok(), "the server did not finish");
    });
});
