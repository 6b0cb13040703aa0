//! Peer service requests as they come off the wire: the first byte picks the call, the rest is
//! decoded as its protobuf request (as tonic would) and handed to the node's Peer service
//! handlers (authentication is the layer in front, not fuzzed here). An error status or an
//! answer, never a panic or a hang; streams are read for a bounded number of messages.
#![no_main]

use std::time::Duration;

use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use pb::peer_server::Peer;
use prost::Message;
use shadowcache_fuzz::world;
use shadowcache_node::frontend::peer::PeerFrontend;
use shadowcache_proto as pb;
use tonic::Request;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let w = world();
    let peer = PeerFrontend::new(w.node.clone());
    w.rt.block_on(async {
        let call = async {
            match which % 11 {
                0 => drop(peer.owned_disks(req(body)?).await),
                1 => drop(peer.read(req(body)?).await),
                2 => drop(peer.write(req(body)?).await),
                3 => drop(peer.flush(req(body)?).await),
                4 => drop(peer.content_map(req(body)?).await),
                5 => {
                    if let Ok(r) = peer.fetch_blocks(req(body)?).await {
                        let mut s = r.into_inner();
                        let mut n = 0;
                        while let Some(_m) = s.next().await {
                            n += 1;
                            if n > 64 {
                                break;
                            }
                        }
                    }
                }
                6 => drop(peer.lease(req(body)?).await),
                7 => drop(peer.revoke(req(body)?).await),
                8 => {
                    if let Ok(r) = peer.subscribe_block_map(req(body)?).await {
                        let mut s = r.into_inner();
                        // The first update, or nothing for a moment: a stream stays open.
                        let _ = tokio::time::timeout(Duration::from_millis(50), s.next()).await;
                    }
                }
                9 => drop(peer.hello(req(body)?).await),
                _ => {}
            }
            Some(())
        };
        let done = tokio::time::timeout(Duration::from_secs(20), call).await;
        assert!(done.is_ok(), "a Peer call did not finish in 20 s");
    });
});

/// `body` decoded as request `M`, or `None` where tonic would have refused it.
fn req<M: Message + Default>(body: &[u8]) -> Option<Request<M>> {
    M::decode(body).ok().map(Request::new)
}
