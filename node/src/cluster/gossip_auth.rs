//! Authenticated gossip: chitchat's UDP datagrams, each sealed with a MAC under the cluster key.
//!
//! A datagram on the wire is `SCG1 | sent_ms (u64) | nonce (16 bytes) | chitchat message |
//! tag (32 bytes)`, the tag a keyed BLAKE3 hash of everything before it under a key derived from
//! `cluster.secret_file`. A datagram is dropped (and counted in
//! `shadowcache_gossip_rejected_total{reason}`) when its tag is wrong, when it was sent more than
//! [`REPLAY_WINDOW`] away from now, or when its nonce was seen within the window (a replay).
//! Members' clocks must therefore agree within that window (NTP does).
//!
//! chitchat reads its messages only through its own UDP socket type, so a datagram that passes
//! is handed to a chitchat socket on a private loopback port and read back from there, with the
//! sender's real address put back.
//!
//! Architecture invariant: nothing reaches chitchat that did not pass the tag, the window and the
//! replay check.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use chitchat::ChitchatMessage;
use chitchat::Serializable;
use chitchat::transport::{Socket, Transport};

const MAGIC: &[u8; 4] = b"SCG1";
const HEADER: usize = 4 + 8 + 16;
const TAG: usize = 32;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// How far a datagram's send time may be from the receiver's clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);

/// The cluster key, derived from the secret file's bytes.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// The key of a secret (at least 16 bytes: a file of random bytes or a long passphrase).
    pub fn from_secret(secret: &[u8]) -> Result<ClusterKey, String> {
        let trimmed = secret.trim_ascii();
        if trimmed.len() < 16 {
            return Err(format!(
                "the cluster secret has {} bytes; at least 16 are needed (e.g. head -c 32 /dev/urandom | base64)",
                trimmed.len()
            ));
        }
        Ok(ClusterKey(blake3::derive_key(
            "shadowcache 2026 cluster key",
            trimmed,
        )))
    }

    /// The key in the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<ClusterKey, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_secret(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A key for one use (`context`), derived from the cluster key: gossip datagrams and Peer
    /// calls are sealed under different keys.
    pub fn sub_key(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }
}

/// Milliseconds since the Unix epoch, as sealed datagrams carry them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Too short, or not ours.
    Malformed,
    /// The tag does not match: no key, or another key.
    BadTag,
    /// Sent too long before (or after) now.
    Stale,
    /// Seen already.
    Replay,
}

impl Rejected {
    fn as_str(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::BadTag => "bad_tag",
            Rejected::Stale => "stale",
            Rejected::Replay => "replay",
        }
    }
}

/// Seals and opens datagrams under one key, remembering the nonces of the window.
#[derive(Debug)]
pub struct Sealer {
    key: [u8; 32],
    seen: moka::sync::Cache<[u8; 16], ()>,
}

impl Sealer {
    /// A sealer of gossip datagrams under `key`.
    pub fn new(key: ClusterKey) -> Sealer {
        Self::with_context(&key, "shadowcache 2026 gossip datagram key")
    }

    /// A sealer under `key`'s sub key for `context`.
    pub fn with_context(key: &ClusterKey, context: &str) -> Sealer {
        Sealer {
            key: key.sub_key(context),
            seen: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_live(REPLAY_WINDOW * 2)
                .build(),
        }
    }

    /// `payload` sealed, sent at `sent_ms` with `nonce`.
    pub fn seal(&self, payload: &[u8], sent_ms: u64, nonce: [u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + payload.len() + TAG);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&sent_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(payload);
        let tag = *blake3::keyed_hash(&self.key, &out).as_bytes();
        out.extend_from_slice(&tag);
        out
    }

    /// The payload of `datagram` if it is sealed under this key, fresh at `now_ms` and not
    /// seen before.
    pub fn open<'a>(&self, datagram: &'a [u8], now_ms: u64) -> Result<&'a [u8], Rejected> {
        if datagram.len() < HEADER + TAG || &datagram[..4] != MAGIC {
            return Err(Rejected::Malformed);
        }
        let (body, tag) = datagram.split_at(datagram.len() - TAG);
        if blake3::keyed_hash(&self.key, body).as_bytes() != tag {
            return Err(Rejected::BadTag);
        }
        let sent = u64::from_be_bytes(body[4..12].try_into().map_err(|_| Rejected::Malformed)?);
        if sent.abs_diff(now_ms) > REPLAY_WINDOW.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        let nonce: [u8; 16] = body[12..HEADER]
            .try_into()
            .map_err(|_| Rejected::Malformed)?;
        if !self.seen.entry(nonce).or_insert(()).is_fresh() {
            return Err(Rejected::Replay);
        }
        Ok(&body[HEADER..])
    }
}

/// chitchat's transport with every datagram sealed under the cluster key.
#[derive(Debug, Clone)]
pub struct AuthTransport {
    key: ClusterKey,
}

impl AuthTransport {
    /// A transport under `key`.
    pub fn new(key: ClusterKey) -> AuthTransport {
        AuthTransport { key }
    }
}

#[tonic::async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let inner = chitchat::transport::UdpSocket::open(loopback).await?;
        // chitchat's socket does not say where it is bound: it is found by a probe below.
        let relay = tokio::net::UdpSocket::bind(loopback)
            .await
            .context("gossip relay socket")?;
        let mut s = AuthSocket {
            sealer: Sealer::new(self.key.clone()),
            public,
            inner,
            inner_addr: None,
            relay_addr: relay.local_addr().ok(),
            relay,
            buf: vec![0u8; MAX_DATAGRAM],
            send_buf: Vec::with_capacity(MAX_DATAGRAM),
        };
        s.find_inner().await?;
        Ok(Box::new(s))
    }
}

struct AuthSocket {
    sealer: Sealer,
    public: tokio::net::UdpSocket,
    inner: chitchat::transport::UdpSocket,
    inner_addr: Option<SocketAddr>,
    relay: tokio::net::UdpSocket,
    relay_addr: Option<SocketAddr>,
    buf: Vec<u8>,
    send_buf: Vec<u8>,
}

impl AuthSocket {
    /// Learns the inner socket's address (chitchat's socket does not tell it): the inner socket
    /// sends the relay a message, whose source address is the inner one.
    async fn find_inner(&mut self) -> anyhow::Result<()> {
        let relay_addr = self.relay.local_addr()?;
        let probe = ChitchatMessage::BadCluster;
        self.inner.send(relay_addr, probe).await?;
        let mut b = [0u8; 64];
        let (_, from) = tokio::time::timeout(Duration::from_secs(5), self.relay.recv_from(&mut b))
            .await
            .context("gossip relay probe timed out")??;
        self.inner_addr = Some(from);
        Ok(())
    }

    fn reject(why: Rejected, from: SocketAddr) {
        metrics::counter!(crate::telemetry::GOSSIP_REJECTED, "reason" => why.as_str()).increment(1);
        tracing::debug!(%from, reason = why.as_str(), "gossip datagram dropped");
    }
}

#[tonic::async_trait]
impl Socket for AuthSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        self.send_buf.clear();
        msg.serialize(&mut self.send_buf);
        let nonce: [u8; 16] = rand::random();
        let sealed = self.sealer.seal(&self.send_buf, now_ms(), nonce);
        if sealed.len() > MAX_DATAGRAM {
            tracing::warn!(bytes = sealed.len(), %to, "gossip message too large to seal; dropped");
            return Ok(());
        }
        self.public
            .send_to(&sealed, to)
            .await
            .context("failed to send a gossip message")?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        let inner_addr = self.inner_addr.context("gossip relay not set up")?;
        loop {
            let (len, from) = self
                .public
                .recv_from(&mut self.buf)
                .await
                .context("error while receiving a gossip datagram")?;
            let payload = match self.sealer.open(&self.buf[..len], now_ms()) {
                Ok(p) => p,
                Err(why) => {
                    Self::reject(why, from);
                    continue;
                }
            };
            self.relay.send_to(payload, inner_addr).await?;
            // Loopback delivers at once; a payload chitchat cannot parse is dropped there, so
            // the wait is bounded.
            match tokio::time::timeout(Duration::from_millis(200), self.inner.recv()).await {
                Ok(Ok((relayed_from, msg))) if Some(relayed_from) == self.relay_addr => {
                    return Ok((from, msg));
                }
                Ok(Ok((other, _))) => {
                    // Someone on this host wrote to the private port: not a member's datagram.
                    Self::reject(Rejected::Malformed, other);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => Self::reject(Rejected::Malformed, from),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(secret: &[u8]) -> Sealer {
        Sealer::new(ClusterKey::from_secret(secret).expect("key"))
    }

    #[test]
    fn only_fresh_datagrams_sealed_under_the_key_open_once() {
        let a = sealer(b"a secret of thirty-two bytes....");
        let b = sealer(b"a secret of thirty-two bytes....");
        let other = sealer(b"another secret, also long enough");
        let now = 1_000_000_000;
        let d = a.seal(b"hello", now, [7; 16]);
        assert_eq!(b.open(&d, now + 5).expect("opens"), b"hello");
        assert_eq!(b.open(&d, now + 6), Err(Rejected::Replay), "a replay");
        assert_eq!(
            other.open(&a.seal(b"x", now, [8; 16]), now),
            Err(Rejected::BadTag)
        );
        let mut flipped = a.seal(b"hello", now, [9; 16]);
        flipped[HEADER] ^= 1;
        assert_eq!(
            b.open(&flipped, now),
            Err(Rejected::BadTag),
            "a changed byte"
        );
        let window = REPLAY_WINDOW.as_millis() as u64;
        assert_eq!(
            b.open(&a.seal(b"old", now - window - 1, [10; 16]), now),
            Err(Rejected::Stale)
        );
        assert_eq!(b.open(b"short", now), Err(Rejected::Malformed));
        assert!(ClusterKey::from_secret(b"short").is_err());
    }
}
