//! The NBD origin's client side (`shadowcache_node::origin::NbdOrigin`: the negotiation's
//! option replies, then the transmission phase's simple replies) against a server that sends
//! whatever the input says and then hangs up. Never a panic or a hang; a read that succeeds
//! returns exactly the bytes asked for; reads outside the export are refused.
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shadowcache_node::origin::{NbdOrigin, Origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Place {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

fn place() -> &'static Place {
    static P: OnceLock<Place> = OnceLock::new();
    P.get_or_init(|| Place {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
        dir: tempfile::tempdir().expect("tempdir"),
    })
}

fuzz_target!(|data: &[u8]| {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = place();
    let sock = p
        .dir
        .path()
        .join(format!("s{}.sock", N.fetch_add(1, Ordering::Relaxed)));
    let script = data.to_vec();
    p.rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let server = tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            // One connection only: a reconnect is refused at once.
            drop(listener);
            let (mut rd, mut wr) = s.split();
            let talk = async {
                let _ = wr.write_all(&script).await;
                let _ = wr.shutdown().await;
            };
            let drain = async {
                let mut sink = [0u8; 4096];
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            tokio::join!(talk, drain);
        });
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let opened =
            tokio::time::timeout(Duration::from_secs(20), NbdOrigin::open(&uri, false)).await;
        let Ok(opened) = opened else {
            panic!("open hung");
        };
        if let Ok(o) = opened {
            let size = o.size();
            for (off, len) in [(0u64, 4096usize), (4096, 512), (0, 1)] {
                if off + len as u64 > size {
                    assert!(o.read_at(off, len).await.is_err(), "a read past the end");
                    continue;
                }
                let r = tokio::time::timeout(Duration::from_secs(20), o.read_at(off, len)).await;
                let Ok(r) = r else {
                    panic!("read hung");
                };
                if let Ok(b) = r {
                    assert_eq!(b.len(), len, "a read returned another length");
                }
            }
            assert!(o.read_at(size, 1).await.is_err(), "a read at the end");
            assert!(o.read_at(u64::MAX, 2).await.is_err(), "a read past u64");
        }
        let _ = server.await;
    });
    let _ = std::fs::remove_file(&sock);
});
