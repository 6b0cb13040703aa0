//! Authenticated gossip: chitchat's UDP datagrams, each sealed so that only members send them.
//!
//! Two seals, one per way a cluster is secured:
//!
//! - With `cluster.secret_file` (the cluster key), a datagram on the wire is `SCG1 | sent_ms
//!   (u64) | nonce (16 bytes) | chitchat message | tag (32 bytes)`, the tag a keyed BLAKE3 hash
//!   of everything before it under a key derived from the secret ([`Sealer`]).
//! - With `[cluster.tls]` and no secret file, the member signs each datagram with its TLS
//!   private key and carries its certificate chain: `SCT1 | sent_ms | nonce | scheme (u16) |
//!   chain length (u16) | chain | chitchat message | signature | signature length (u16)`
//!   ([`CertSealer`]). The receiver checks the chain against the cluster's CA exactly as the
//!   Peer service checks a client certificate (a chain it checked is trusted for
//!   [`CHAIN_TRUST`]), then the signature over everything before it. Nothing secret is shared:
//!   the CA certificate is public, so no key could be derived from it; what a stranger lacks is
//!   a private key whose certificate the CA signed.
//!
//! A datagram is dropped (and counted in `shadowcache_gossip_rejected_total{reason}`) when its
//! tag or signature is wrong, when its certificate is not the CA's, when it was sent more than
//! [`REPLAY_WINDOW`] away from now, or when its nonce was seen within the window (a replay).
//! Members' clocks must therefore agree within that window (NTP does).
//!
//! chitchat reads its messages only through its own UDP socket type, so a datagram that passes
//! is handed to a chitchat socket on a private loopback port and read back from there, with the
//! sender's real address put back.
//!
//! Architecture invariant: nothing reaches chitchat that did not pass the tag or signature, the
//! window and the replay check.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chitchat::ChitchatMessage;
use chitchat::Serializable;
use chitchat::transport::{Socket, Transport};
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
    /// The tag or signature does not match: no key, or another key.
    BadTag,
    /// Signed under a certificate the cluster's CA did not sign.
    Untrusted,
    /// A chain not checked yet, past the number of chains checked a second.
    Throttled,
    /// Sent too long before (or after) now.
    Stale,
    /// Seen already.
    Replay,
    /// Signed under a certificate of the cluster's CA whose role is not `member` (a client's
    /// or an operator's).
    WrongRole,
}

impl Rejected {
    fn as_str(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::BadTag => "bad_tag",
            Rejected::Untrusted => "untrusted_certificate",
            Rejected::Throttled => "throttled",
            Rejected::Stale => "stale",
            Rejected::Replay => "replay",
            Rejected::WrongRole => "wrong_role",
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

/// How a member proves its gossip is a member's.
#[derive(Debug, Clone)]
pub enum GossipAuth {
    /// A MAC under the cluster key (`cluster.secret_file`).
    Key(ClusterKey),
    /// A signature under the member's TLS key, checked against the cluster's CA
    /// (`[cluster.tls]` without a secret file).
    Tls(Arc<TlsIdentity>),
}

/// Schemes a gossip signature may use: those of TLS 1.3 (the same key signs its handshakes).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
];

/// How long a certificate chain, once checked against the CA, is trusted without a new check
/// (so that one that expires stops being accepted within this time).
pub const CHAIN_TRUST: Duration = Duration::from_secs(60);
/// Most certificates a datagram's chain may carry (the member's and its intermediates): path
/// building costs signature checks, so a stranger's chain of many look-alike intermediates is
/// refused before any is checked.
pub const MAX_CHAIN_CERTS: usize = 4;
/// Most bytes of a carried chain.
pub const MAX_CHAIN_BYTES: usize = 16 << 10;
/// Chains not seen before checked a second, at most (members' chains are checked once a
/// minute each; a stranger sending new chains cannot take the gossip task's time).
pub const NEW_CHAINS_PER_SECOND: u32 = 32;

/// This member's TLS identity, as gossip uses it: its key to sign, its chain to show, and the
/// cluster's CA to check others' chains.
pub struct TlsIdentity {
    signing: Arc<dyn rustls::sign::SigningKey>,
    /// The chain as carried: `(length u16, DER)` per certificate, this member's first.
    chain: Vec<u8>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    /// `cluster.tls.require_roles`: a chain whose certificate names no role is not a member's.
    require_roles: bool,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(..)")
    }
}

impl TlsIdentity {
    /// Reads the PEM files of `[cluster.tls]`; this member's own chain must pass the CA, and
    /// be a member's.
    pub fn load(cfg: &super::TlsConfig) -> Result<TlsIdentity, String> {
        let id = TlsIdentity::read(cfg)?;
        match id.check_chain(&id.chain) {
            Ok(_) => Ok(id),
            Err(Rejected::WrongRole) => Err(format!(
                "cluster.tls.cert: {} is not a member's certificate (its role is {}): issue one with `shadowcache certs issue --role member`",
                cfg.cert.display(),
                id.first_der().map_or("unknown", |d| {
                    crate::certs::roles_of(d)
                        .under(cfg.require_roles)
                        .describe()
                })
            )),
            Err(_) => Err(format!(
                "cluster.tls.cert: {} is not signed by the cluster's CA ({})",
                cfg.cert.display(),
                cfg.ca.display()
            )),
        }
    }

    /// This member's own certificate, as carried first in its chain.
    fn first_der(&self) -> Option<&[u8]> {
        let (len, der) = self.chain.split_at_checked(2)?;
        der.get(..usize::from(u16::from_be_bytes([len[0], len[1]])))
    }

    /// The PEM files of `[cluster.tls]`, unchecked.
    fn read(cfg: &super::TlsConfig) -> Result<TlsIdentity, String> {
        use rustls_pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("cluster.tls.cert: {}: {e}", cfg.cert.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "cluster.tls.cert: {} holds no certificate",
                cfg.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&cfg.key)
            .map_err(|e| format!("cluster.tls.key: {}: {e}", cfg.key.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.ca)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("cluster.tls.ca: {}: {e}", cfg.ca.display()))?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| format!("cluster.tls.ca: {}: {e}", cfg.ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("cluster.tls.ca: {}: {e}", cfg.ca.display()))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("cluster.tls.key: {}: {e}", cfg.key.display()))?;
        if signing.choose_scheme(SCHEMES).is_none() {
            return Err(format!(
                "cluster.tls.key: {}: a {:?} key cannot sign with a TLS 1.3 scheme",
                cfg.key.display(),
                signing.algorithm()
            ));
        }
        let mut chain = Vec::new();
        for c in &certs {
            let len = u16::try_from(c.len()).map_err(|_| {
                format!(
                    "cluster.tls.cert: {}: a certificate of {} bytes",
                    cfg.cert.display(),
                    c.len()
                )
            })?;
            chain.extend_from_slice(&len.to_be_bytes());
            chain.extend_from_slice(c);
        }
        Ok(TlsIdentity {
            signing,
            chain,
            verifier,
            algorithms,
            require_roles: cfg.require_roles,
        })
    }

    /// The end-entity certificate of a carried `chain` if the CA signed it.
    fn check_chain<'a>(&self, chain: &'a [u8]) -> Result<CertificateDer<'a>, Rejected> {
        if chain.len() > MAX_CHAIN_BYTES {
            return Err(Rejected::Malformed);
        }
        let mut certs = Vec::new();
        let mut rest = chain;
        while !rest.is_empty() {
            if certs.len() == MAX_CHAIN_CERTS {
                return Err(Rejected::Malformed);
            }
            let (len, tail) = rest.split_at_checked(2).ok_or(Rejected::Malformed)?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let (der, tail) = tail.split_at_checked(len).ok_or(Rejected::Malformed)?;
            certs.push(CertificateDer::from(der));
            rest = tail;
        }
        let (end, intermediates) = certs.split_first().ok_or(Rejected::Malformed)?;
        self.verifier
            .verify_client_cert(end, intermediates, rustls_pki_types::UnixTime::now())
            .map_err(|_| Rejected::Untrusted)?;
        // Gossip is members' only: a client's or an operator's certificate may not join.
        if !crate::certs::roles_of(end)
            .under(self.require_roles)
            .may_peer()
        {
            return Err(Rejected::WrongRole);
        }
        Ok(end.clone())
    }
}

/// Seals and opens datagrams with this member's TLS key and certificate, remembering the
/// chains it checked and the nonces of the window.
#[derive(Debug)]
pub struct CertSealer {
    id: Arc<TlsIdentity>,
    signer: Box<dyn rustls::sign::Signer>,
    trusted: moka::sync::Cache<[u8; 32], ()>,
    seen: moka::sync::Cache<[u8; 16], ()>,
    /// The second of the last new chain checked and how many were checked in it.
    new_chains: parking_lot::Mutex<(u64, u32)>,
}

const CERT_MAGIC: &[u8; 4] = b"SCT1";

impl CertSealer {
    /// A sealer with `id`.
    pub fn new(id: Arc<TlsIdentity>) -> Result<CertSealer, String> {
        let signer = id
            .signing
            .choose_scheme(SCHEMES)
            .ok_or("the TLS key cannot sign with a TLS 1.3 scheme")?;
        Ok(CertSealer {
            id,
            signer,
            trusted: moka::sync::Cache::builder()
                .max_capacity(4096)
                .time_to_live(CHAIN_TRUST)
                .build(),
            seen: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_live(REPLAY_WINDOW * 2)
                .build(),
            new_chains: parking_lot::Mutex::new((0, 0)),
        })
    }

    /// Whether one more chain not seen before may be checked in the second of `now_ms`.
    fn may_check_new_chain(&self, now_ms: u64) -> bool {
        let mut n = self.new_chains.lock();
        let second = now_ms / 1000;
        if n.0 != second {
            *n = (second, 0);
        }
        n.1 += 1;
        n.1 <= NEW_CHAINS_PER_SECOND
    }

    /// `payload` signed, sent at `sent_ms` with `nonce`.
    pub fn seal(&self, payload: &[u8], sent_ms: u64, nonce: [u8; 16]) -> Result<Vec<u8>, String> {
        let chain = &self.id.chain;
        let chain_len = u16::try_from(chain.len()).map_err(|_| "certificate chain too long")?;
        let mut out = Vec::with_capacity(HEADER + 4 + chain.len() + payload.len() + 600);
        out.extend_from_slice(CERT_MAGIC);
        out.extend_from_slice(&sent_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&u16::from(self.signer.scheme()).to_be_bytes());
        out.extend_from_slice(&chain_len.to_be_bytes());
        out.extend_from_slice(chain);
        out.extend_from_slice(payload);
        let sig = self.signer.sign(&out).map_err(|e| e.to_string())?;
        let sig_len = u16::try_from(sig.len()).map_err(|_| "signature too long")?;
        out.extend_from_slice(&sig);
        out.extend_from_slice(&sig_len.to_be_bytes());
        Ok(out)
    }

    /// The payload of `datagram` if a member signed it, fresh at `now_ms` and not seen before.
    pub fn open<'a>(&self, datagram: &'a [u8], now_ms: u64) -> Result<&'a [u8], Rejected> {
        let head = HEADER + 4;
        if datagram.len() < head + 2 || &datagram[..4] != CERT_MAGIC {
            return Err(Rejected::Malformed);
        }
        let (rest, sig_len) = datagram.split_at(datagram.len() - 2);
        let sig_len = usize::from(u16::from_be_bytes([sig_len[0], sig_len[1]]));
        let body_len = rest.len().checked_sub(sig_len).ok_or(Rejected::Malformed)?;
        let (body, sig) = rest.split_at(body_len);
        if body.len() < head {
            return Err(Rejected::Malformed);
        }
        let sent = u64::from_be_bytes(body[4..12].try_into().map_err(|_| Rejected::Malformed)?);
        if sent.abs_diff(now_ms) > REPLAY_WINDOW.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        let scheme = SignatureScheme::from(u16::from_be_bytes([body[HEADER], body[HEADER + 1]]));
        let chain_len = usize::from(u16::from_be_bytes([body[HEADER + 2], body[HEADER + 3]]));
        if chain_len > MAX_CHAIN_BYTES {
            return Err(Rejected::Malformed);
        }
        let chain = body
            .get(head..head + chain_len)
            .ok_or(Rejected::Malformed)?;
        let chain_hash = *blake3::hash(chain).as_bytes();
        let end = if self.trusted.contains_key(&chain_hash) {
            let (len, der) = chain.split_at_checked(2).ok_or(Rejected::Malformed)?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            CertificateDer::from(der.get(..len).ok_or(Rejected::Malformed)?)
        } else {
            if !self.may_check_new_chain(now_ms) {
                return Err(Rejected::Throttled);
            }
            let end = self.id.check_chain(chain)?;
            self.trusted.insert(chain_hash, ());
            end
        };
        if !SCHEMES.contains(&scheme) {
            return Err(Rejected::BadTag);
        }
        let alg = self
            .id
            .algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .and_then(|(_, algs)| algs.first())
            .ok_or(Rejected::BadTag)?;
        webpki::EndEntityCert::try_from(&end)
            .map_err(|_| Rejected::Untrusted)?
            .verify_signature(*alg, body, sig)
            .map_err(|_| Rejected::BadTag)?;
        let nonce: [u8; 16] = body[12..HEADER]
            .try_into()
            .map_err(|_| Rejected::Malformed)?;
        if !self.seen.entry(nonce).or_insert(()).is_fresh() {
            return Err(Rejected::Replay);
        }
        Ok(&body[head + chain_len..])
    }
}

/// One of the two seals.
#[derive(Debug)]
enum Seal {
    Key(Sealer),
    Cert(CertSealer),
}

impl Seal {
    fn seal(&self, payload: &[u8], sent_ms: u64, nonce: [u8; 16]) -> Result<Vec<u8>, String> {
        match self {
            Seal::Key(s) => Ok(s.seal(payload, sent_ms, nonce)),
            Seal::Cert(s) => s.seal(payload, sent_ms, nonce),
        }
    }

    fn open<'a>(&self, datagram: &'a [u8], now_ms: u64) -> Result<&'a [u8], Rejected> {
        match self {
            Seal::Key(s) => s.open(datagram, now_ms),
            Seal::Cert(s) => s.open(datagram, now_ms),
        }
    }
}

/// chitchat's transport with every datagram sealed.
#[derive(Debug, Clone)]
pub struct AuthTransport {
    auth: GossipAuth,
}

impl AuthTransport {
    /// A transport sealing with `auth`.
    pub fn new(auth: GossipAuth) -> AuthTransport {
        AuthTransport { auth }
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
            sealer: match &self.auth {
                GossipAuth::Key(key) => Seal::Key(Sealer::new(key.clone())),
                GossipAuth::Tls(id) => {
                    Seal::Cert(CertSealer::new(id.clone()).map_err(|e| {
                        anyhow::anyhow!("cluster.tls: gossip cannot be signed: {e}")
                    })?)
                }
            },
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
    sealer: Seal,
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
        let sealed = match self.sealer.seal(&self.send_buf, now_ms(), nonce) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %to, "gossip message could not be sealed; dropped");
                return Ok(());
            }
        };
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

    /// A certificate of the cluster's CA issued for a client or an operator neither loads as
    /// a member's identity nor gets its datagrams opened.
    #[test]
    fn only_members_certificates_seal_gossip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = shadowcache_testkit::TestPki::new(&dir.path().join("pki"));
        let b = CertSealer::new(identity(&pki, "b")).expect("b");
        let now = 1_000_000_000;
        for (n, role) in ["client", "admin"].into_iter().enumerate() {
            let (cert, key) = pki.member_with_role(role, "shadowcache", role);
            let cfg = tls_config(&pki, (cert, key), false);
            let err = TlsIdentity::load(&cfg).expect_err("a client's certificate as a member's");
            assert!(err.contains("not a member's certificate"), "{err}");
            let unchecked =
                CertSealer::new(Arc::new(TlsIdentity::read(&cfg).expect("read"))).expect("sealer");
            let d = unchecked
                .seal(b"let me in", now, [20 + n as u8; 16])
                .expect("seal");
            assert_eq!(b.open(&d, now), Err(Rejected::WrongRole), "{role}");
        }
        // A sealer with a member's certificate, under `require_roles`.
        let member = |name: &str, require_roles: bool| {
            let files = pki.member_with_role(name, "shadowcache", "member");
            CertSealer::new(Arc::new(
                TlsIdentity::load(&tls_config(&pki, files, require_roles))
                    .expect("a member's certificate"),
            ))
            .expect("sealer")
        };
        let m = member("m", false);
        let d = m.seal(b"hello", now, [30; 16]).expect("seal");
        assert_eq!(b.open(&d, now).expect("a member's datagram"), b"hello");

        // A certificate that names no role (issued before roles): a member's, unless the
        // receiver requires roles (`cluster.tls.require_roles`).
        let legacy = CertSealer::new(identity(&pki, "legacy")).expect("legacy");
        let d = legacy.seal(b"old", now, [40; 16]).expect("seal");
        assert_eq!(b.open(&d, now).expect("a legacy member's datagram"), b"old");
        let strict = member("strict", true);
        let d = legacy.seal(b"old", now, [41; 16]).expect("seal");
        assert_eq!(strict.open(&d, now), Err(Rejected::WrongRole));
        let d = m.seal(b"hello", now, [42; 16]).expect("seal");
        assert_eq!(strict.open(&d, now).expect("a member's datagram"), b"hello");
        // Nor may a node whose own certificate names no role require roles of others.
        let (cert, key) = pki.member("legacy-self", "shadowcache");
        let err = TlsIdentity::load(&tls_config(&pki, (cert, key), true))
            .expect_err("an unmarked certificate under require_roles");
        assert!(err.contains("require_roles"), "{err}");
    }

    /// `[cluster.tls]` for the certificate and key given, under `pki`'s CA.
    fn tls_config(
        pki: &shadowcache_testkit::TestPki,
        (cert, key): (std::path::PathBuf, std::path::PathBuf),
        require_roles: bool,
    ) -> crate::cluster::TlsConfig {
        crate::cluster::TlsConfig {
            ca: pki.ca.clone(),
            cert,
            key,
            server_name: "shadowcache".into(),
            require_roles,
        }
    }

    /// The identity of member `name` of `pki`, checked against `pki`'s CA.
    fn identity(pki: &shadowcache_testkit::TestPki, name: &str) -> Arc<TlsIdentity> {
        let (cert, key) = pki.member(name, "shadowcache");
        let cfg = tls_config(pki, (cert, key), false);
        Arc::new(TlsIdentity::load(&cfg).expect("identity"))
    }

    #[test]
    fn only_datagrams_signed_under_the_clusters_ca_open_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = shadowcache_testkit::TestPki::new(&dir.path().join("pki"));
        let rogue = shadowcache_testkit::TestPki::new(&dir.path().join("rogue"));
        let a = CertSealer::new(identity(&pki, "a")).expect("a");
        let b = CertSealer::new(identity(&pki, "b")).expect("b");
        let now = 1_000_000_000;
        let d = a.seal(b"hello", now, [7; 16]).expect("seal");
        assert_eq!(b.open(&d, now + 5).expect("opens"), b"hello");
        assert_eq!(b.open(&d, now + 6), Err(Rejected::Replay), "a replay");
        // The chain is trusted now: a second datagram takes the cached path and still checks
        // its signature.
        let mut flipped = a.seal(b"hello", now, [9; 16]).expect("seal");
        let payload_at = flipped.len()
            - 2
            - usize::from(u16::from_be_bytes([
                flipped[flipped.len() - 2],
                flipped[flipped.len() - 1],
            ]))
            - 5;
        flipped[payload_at] ^= 1;
        assert_eq!(
            b.open(&flipped, now),
            Err(Rejected::BadTag),
            "a changed byte"
        );
        let window = REPLAY_WINDOW.as_millis() as u64;
        assert_eq!(
            b.open(
                &a.seal(b"old", now - window - 1, [10; 16]).expect("seal"),
                now
            ),
            Err(Rejected::Stale)
        );
        // A member of another CA (with its own CA's files it loads fine) is not trusted.
        let stranger = CertSealer::new(identity(&rogue, "m")).expect("m");
        assert_eq!(
            b.open(
                &stranger.seal(b"let me in", now, [11; 16]).expect("seal"),
                now
            ),
            Err(Rejected::Untrusted)
        );
        // A stranger's signature with a member's chain pasted in fails the signature.
        let ours = a.seal(b"x", now, [12; 16]).expect("seal");
        let theirs = stranger.seal(b"x", now, [12; 16]).expect("seal");
        let chain_of = |d: &[u8]| {
            let len = usize::from(u16::from_be_bytes([d[HEADER + 2], d[HEADER + 3]]));
            (HEADER + 4, HEADER + 4 + len)
        };
        let (s0, s1) = chain_of(&ours);
        let (t0, t1) = chain_of(&theirs);
        let mut forged = theirs[..HEADER + 2].to_vec();
        forged.extend_from_slice(&u16::try_from(s1 - s0).expect("len").to_be_bytes());
        forged.extend_from_slice(&ours[s0..s1]);
        forged.extend_from_slice(&theirs[t1..]);
        assert_ne!(t0, 0);
        assert_eq!(b.open(&forged, now), Err(Rejected::BadTag));
        // A key datagram is not a certificate datagram, and garbage is malformed.
        assert_eq!(
            b.open(
                &sealer(b"a secret of thirty-two bytes....").seal(b"x", now, [13; 16]),
                now
            ),
            Err(Rejected::Malformed)
        );
        assert_eq!(
            b.open(b"SCT1 and then nothing", now),
            Err(Rejected::Malformed)
        );
        // A chain of more certificates than a member has is refused unchecked, and new chains
        // are checked at most so many a second.
        let mut long = ours[..HEADER + 2].to_vec();
        let chain: Vec<u8> = ours[s0..s1].repeat(MAX_CHAIN_CERTS + 1);
        long.extend_from_slice(&u16::try_from(chain.len()).expect("len").to_be_bytes());
        long.extend_from_slice(&chain);
        long.extend_from_slice(&ours[s1..]);
        assert_eq!(b.open(&long, now), Err(Rejected::Malformed));
        let fresh = CertSealer::new(identity(&pki, "c")).expect("c");
        let later = now + 5_000;
        for _ in 0..NEW_CHAINS_PER_SECOND {
            assert!(fresh.may_check_new_chain(later));
        }
        assert_eq!(
            fresh.open(&a.seal(b"x", later, [14; 16]).expect("seal"), later),
            Err(Rejected::Throttled)
        );
        assert_eq!(
            fresh
                .open(
                    &a.seal(b"x", later + 1000, [15; 16]).expect("seal"),
                    later + 1000
                )
                .expect("the next second"),
            b"x"
        );
        // A certificate the CA did not sign does not load as this member's identity.
        let (cert, key) = rogue.member("z", "shadowcache");
        let err = TlsIdentity::load(&tls_config(&pki, (cert, key), false))
            .expect_err("a certificate of another CA");
        assert!(err.contains("not signed by the cluster's CA"), "{err}");
    }
}
