//! The NBD frontend: qemu, the libnbd tools, fio's nbd engine and the kernel's nbd-client
//! attach to a node's disks over the Network Block Device protocol, one export per disk.
//!
//! Fixed newstyle negotiation with NO_ZEROES; options GO, INFO, LIST, ABORT, EXPORT_NAME,
//! STRUCTURED_REPLY, LIST_/SET_META_CONTEXT (`base:allocation`); every other option is answered
//! unsupported. In transmission, one task reads and checks requests and runs each in a task of
//! its own (at most [`MAX_IN_FLIGHT`] per connection); replies go out in the order they finish,
//! through one writer task that owns the socket's write half. Reads, writes and flushes are the
//! node's own ([`Node::read`], [`Node::write`], [`Node::flush`]): a disk another member owns is
//! read through this node's cache or its owner, and written at its owner.
//!
//! Architecture invariant: a malformed or hostile client can end its own connection, never the
//! node, and never gets a byte of a disk it did not name.

pub mod proto;

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use crate::error::Error;
use crate::{DiskMode, Node};
use proto::*;

/// Requests served at once on one connection (above every client's queue depth).
pub const MAX_IN_FLIGHT: usize = 128;
/// Bytes of requests (write payloads, read replies) one connection may hold at once: a client
/// that does not read its replies stops being served once it owes this much.
pub const CONNECTION_BUDGET: u32 = 64 << 20;
/// Bytes of requests all NBD connections of the node may hold at once.
pub const NODE_BUDGET: u32 = 512 << 20;
/// A client that takes none of its replies for this long is disconnected (its budget freed).
pub const STALLED_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The slowest a client may send a write's payload or take its replies, beyond
/// [`STALLED_REPLY_TIMEOUT`]: a client that trickles holds the budget of what it owes no
/// longer than that (a 32 MiB payload: 62 s). Clients are local (the hypervisor's shim).
pub const MIN_CLIENT_BYTES_PER_SEC: u64 = 1 << 20;
/// Extents in one block-status reply at most (the protocol lets a server describe less than
/// was asked); 8 bytes each.
pub const MAX_EXTENTS: usize = 1 << 13;

/// How long a client may take to move `bytes` (send a payload, or take replies).
fn transfer_time(bytes: u64) -> std::time::Duration {
    STALLED_REPLY_TIMEOUT + std::time::Duration::from_secs(bytes / MIN_CLIENT_BYTES_PER_SEC)
}
/// A client must finish negotiation within this time.
pub const NEGOTIATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections the NBD listeners serve at once, all together, at most (fewer when the
/// descriptor limit is low: [`FD_RESERVE`] descriptors stay for the node's own files and
/// sockets).
pub const MAX_CONNECTIONS: usize = 1024;
/// Descriptors kept out of reach of NBD clients.
pub const FD_RESERVE: usize = 256;

/// The bytes budget of all NBD connections of this process.
fn node_budget() -> &'static Arc<Semaphore> {
    static B: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();
    B.get_or_init(|| Arc::new(Semaphore::new(NODE_BUDGET as usize)))
}

/// Connections the NBD listeners take together: [`MAX_CONNECTIONS`], or fewer under a low descriptor limit.
pub fn connection_cap() -> usize {
    MAX_CONNECTIONS.min(descriptor_room()).max(1)
}

/// Descriptors the process may open beyond [`FD_RESERVE`]: its soft RLIMIT_NOFILE (read from
/// /proc, no unsafe call; unlimited when it cannot be read) less the reserve.
pub fn descriptor_room() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(usize::MAX);
    soft.saturating_sub(FD_RESERVE)
}
/// Largest read served in the reading task when it is the only request in flight.
const INLINE_READ: u32 = 128 << 10;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection is closed.
    #[error("protocol: {0}")]
    Protocol(String),
}

fn protocol(s: impl Into<String>) -> NbdError {
    NbdError::Protocol(s.into())
}

/// An export as negotiated.
#[derive(Debug, Clone)]
struct Export {
    name: String,
    size: u64,
    flags: u16,
}

/// Negotiation state of one connection.
#[derive(Debug, Default)]
struct Session {
    structured: bool,
    meta: bool,
    /// The greeting and the client's flags were exchanged (they are not again after STARTTLS).
    greeted: bool,
    no_zeroes: bool,
    /// Inside TLS now.
    tls: bool,
}

/// `[nbd_tls]`: X.509 for the NBD listeners (NBD_OPT_STARTTLS).
#[derive(Debug, Clone, PartialEq)]
pub struct NbdTlsConfig {
    /// The server's certificate chain (PEM).
    pub cert: std::path::PathBuf,
    /// Its private key (PEM).
    pub key: std::path::PathBuf,
    /// Only STARTTLS and ABORT before TLS (the spec's FORCEDTLS) on the TCP listener; the Unix
    /// socket offers TLS without requiring it. Default true.
    pub require: bool,
}

/// TLS on the NBD listeners: NBD_OPT_STARTTLS with the node's certificate.
#[derive(Clone)]
pub struct NbdTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Only STARTTLS and ABORT before TLS (FORCEDTLS).
    pub require: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("require", &self.require)
            .finish()
    }
}

impl NbdTls {
    /// Reads the certificate chain and key `cfg` names.
    pub fn load(cfg: &NbdTlsConfig) -> anyhow::Result<NbdTls> {
        use anyhow::Context;
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
            .with_context(|| format!("nbd_tls.cert: {}", cfg.cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("nbd_tls.cert: {}", cfg.cert.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "nbd_tls.cert: {} holds no certificate",
            cfg.cert.display()
        );
        let key = PrivateKeyDer::from_pem_file(&cfg.key)
            .with_context(|| format!("nbd_tls.key: {}", cfg.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("nbd_tls: protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("nbd_tls: the certificate and key do not make a server identity")?;
        Ok(NbdTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            require: cfg.require,
        })
    }

    /// The same certificate, offered but not required (the local Unix socket: its file mode
    /// says who may connect, and local hypervisors need no TLS).
    pub fn offered(&self) -> NbdTls {
        NbdTls {
            acceptor: self.acceptor.clone(),
            require: false,
        }
    }
}

/// How a negotiation phase ended.
enum Negotiated {
    /// The client moved to transmission on this export.
    Export(Export),
    /// The client ended it (ABORT).
    Abort,
    /// STARTTLS was acknowledged: go on inside TLS.
    StartTls,
}

fn export_flags(mode: DiskMode, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
    if mode == DiskMode::Sealed {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_SEND_TRIM;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

/// The export `name` names: a disk id, or "" for the node's only disk; or why there is none
/// (an unknown export, or a disk whose owner cannot be reached: the node's own words).
fn lookup(node: &Node, name: &str, structured: bool) -> Result<Export, String> {
    let info = if name.is_empty() {
        let mut disks = node.disks();
        if disks.len() != 1 {
            return Err("this node has several disks: name one as the export".into());
        }
        disks.remove(0)
    } else {
        match node.stat(name) {
            Ok(i) => i,
            Err(crate::Error::UnknownDisk(_)) => {
                return Err(format!(
                    "unknown export {:?}",
                    name.chars().take(128).collect::<String>()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "export {:?}: {e}",
                    name.chars().take(128).collect::<String>()
                ));
            }
        }
    };
    Ok(Export {
        flags: export_flags(info.mode, structured),
        name: info.id,
        size: info.size_bytes,
    })
}

fn negotiation_timed_out() -> NbdError {
    metrics::counter!(crate::telemetry::NBD_REFUSED, "reason" => "negotiation_timeout")
        .increment(1);
    protocol(format!(
        "negotiation not finished within {} s",
        NEGOTIATION_TIMEOUT.as_secs()
    ))
}

/// Serves one client until it disconnects or breaks the protocol; with `tls`, the client may
/// (or, if it is required, must) move into TLS with NBD_OPT_STARTTLS first.
pub async fn serve<S>(node: Arc<Node>, stream: S, tls: Option<NbdTls>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + NEGOTIATION_TIMEOUT;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut session = Session::default();
    let negotiated = tokio::time::timeout_at(
        deadline,
        negotiate(&node, &mut rd, &mut wr, &mut session, tls.as_ref()),
    )
    .await
    .map_err(|_| negotiation_timed_out())??;
    let export = match negotiated {
        Negotiated::Export(e) => e,
        Negotiated::Abort => return Ok(()),
        Negotiated::StartTls => {
            let Some(tls) = tls else {
                return Err(protocol("STARTTLS without TLS configured"));
            };
            let stream = rd.unsplit(wr);
            let secured = tokio::time::timeout_at(deadline, tls.acceptor.accept(stream))
                .await
                .map_err(|_| negotiation_timed_out())?
                .map_err(|e| protocol(format!("TLS handshake: {e}")))?;
            // The protocol: nothing negotiated before STARTTLS holds after it (a man in the
            // middle could have sent it in the clear). The greeting is not repeated.
            session.tls = true;
            session.structured = false;
            session.meta = false;
            let (mut rd, mut wr) = tokio::io::split(secured);
            let negotiated = tokio::time::timeout_at(
                deadline,
                negotiate(&node, &mut rd, &mut wr, &mut session, Some(&tls)),
            )
            .await
            .map_err(|_| negotiation_timed_out())??;
            return match negotiated {
                Negotiated::Export(export) => {
                    metrics::counter!(crate::telemetry::NBD_CONNECTIONS).increment(1);
                    transmission(node, rd, wr, export, session).await
                }
                Negotiated::Abort => Ok(()),
                Negotiated::StartTls => Err(protocol("STARTTLS inside TLS")),
            };
        }
    };
    metrics::counter!(crate::telemetry::NBD_CONNECTIONS).increment(1);
    transmission(node, rd, wr, export, session).await
}

async fn read_u32(r: &mut (impl AsyncRead + Unpin)) -> Result<u32, NbdError> {
    Ok(r.read_u32().await?)
}

async fn reply(
    w: &mut (impl AsyncWrite + Unpin),
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    w.write_all(&option_reply(option, kind, data)).await?;
    Ok(())
}

/// The handshake and options, until the client moves to transmission, aborts, or asks for TLS
/// (then it goes on inside TLS, without a second greeting).
async fn negotiate<R, W>(
    node: &Node,
    rd: &mut R,
    wr: &mut W,
    session: &mut Session,
    tls: Option<&NbdTls>,
) -> Result<Negotiated, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !session.greeted {
        let mut hello = BytesMut::with_capacity(18);
        hello.put_u64(NBD_MAGIC);
        hello.put_u64(IHAVEOPT);
        hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        wr.write_all(&hello).await?;
        let client = read_u32(rd).await?;
        if client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(protocol(format!("unknown client flags {client:#x}")));
        }
        session.no_zeroes = client & CLIENT_NO_ZEROES != 0;
        session.greeted = true;
    }
    let no_zeroes = session.no_zeroes;
    let tls_required = tls.is_some_and(|t| t.require) && !session.tls;
    loop {
        let magic = rd.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(protocol(format!("option magic {magic:#x}")));
        }
        let option = read_u32(rd).await?;
        let len = read_u32(rd).await?;
        if len > MAX_OPTION {
            // The payload cannot be skipped safely: say so and end.
            reply(wr, option, REP_ERR_TOO_BIG, b"option payload too large").await?;
            return Err(protocol(format!("option {option} with {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        if tls_required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                // No error reply exists for this option: the spec says to close.
                return Err(protocol(
                    "this server requires TLS (NBD_OPT_STARTTLS) first",
                ));
            }
            reply(
                wr,
                option,
                REP_ERR_TLS_REQD,
                b"this server requires TLS: send NBD_OPT_STARTTLS first",
            )
            .await?;
            continue;
        }
        match option {
            OPT_STARTTLS => {
                if !data.is_empty() {
                    reply(wr, option, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
                    continue;
                }
                if tls.is_none() {
                    reply(
                        wr,
                        option,
                        REP_ERR_UNSUP,
                        b"TLS is not configured on this node",
                    )
                    .await?;
                    continue;
                }
                if session.tls {
                    reply(wr, option, REP_ERR_INVALID, b"TLS is on already").await?;
                    continue;
                }
                reply(wr, option, REP_ACK, &[]).await?;
                wr.flush().await?;
                return Ok(Negotiated::StartTls);
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data).map_err(|_| protocol("export name"))?;
                let e = match lookup(node, &name, session.structured) {
                    Ok(e) => e,
                    // This option has no error reply: the spec says to close.
                    Err(why) => return Err(protocol(why)),
                };
                let mut b = BytesMut::with_capacity(134);
                b.put_u64(e.size);
                b.put_u16(e.flags);
                if !no_zeroes {
                    b.put_bytes(0, 124);
                }
                wr.write_all(&b).await?;
                return Ok(Negotiated::Export(e));
            }
            OPT_ABORT => {
                reply(wr, option, REP_ACK, &[]).await?;
                return Ok(Negotiated::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(wr, option, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for d in node.disks() {
                    let mut b = BytesMut::with_capacity(4 + d.id.len());
                    b.put_u32(d.id.len() as u32);
                    b.put_slice(d.id.as_bytes());
                    reply(wr, option, REP_SERVER, &b).await?;
                }
                reply(wr, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_go(&data) else {
                    reply(wr, option, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let e = match lookup(node, &name, session.structured) {
                    Ok(e) => e,
                    Err(why) => {
                        reply(wr, option, REP_ERR_UNKNOWN, why.as_bytes()).await?;
                        continue;
                    }
                };
                let mut b = BytesMut::with_capacity(12);
                b.put_u16(INFO_EXPORT);
                b.put_u64(e.size);
                b.put_u16(e.flags);
                reply(wr, option, REP_INFO, &b).await?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut b = BytesMut::with_capacity(14);
                    b.put_u16(INFO_BLOCK_SIZE);
                    b.put_u32(512);
                    b.put_u32(node.config().block_bytes);
                    b.put_u32(MAX_REQUEST);
                    reply(wr, option, REP_INFO, &b).await?;
                }
                reply(wr, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    return Ok(Negotiated::Export(e));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(wr, option, REP_ERR_INVALID, b"takes no data").await?;
                    continue;
                }
                session.structured = true;
                reply(wr, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                // A SET replaces the selection even when it fails (the protocol): nothing
                // selected until one succeeds.
                if set {
                    session.meta = false;
                }
                if set && !session.structured {
                    reply(
                        wr,
                        option,
                        REP_ERR_INVALID,
                        b"needs structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    reply(
                        wr,
                        option,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    )
                    .await?;
                    continue;
                };
                if set && let Err(why) = lookup(node, &name, true) {
                    reply(wr, option, REP_ERR_UNKNOWN, why.as_bytes()).await?;
                    continue;
                }
                let matches =
                    |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
                let wanted = if queries.is_empty() {
                    !set
                } else {
                    queries.iter().any(|q| matches(q))
                };
                if set {
                    session.meta = wanted;
                }
                if wanted {
                    let mut b = BytesMut::with_capacity(4 + BASE_ALLOCATION.len());
                    // A LIST names no context to use: its id SHOULD be 0.
                    b.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
                    b.put_slice(BASE_ALLOCATION.as_bytes());
                    reply(wr, option, REP_META_CONTEXT, &b).await?;
                }
                reply(wr, option, REP_ACK, &[]).await?;
            }
            other => {
                reply(wr, other, REP_ERR_UNSUP, b"unsupported option").await?;
            }
        }
    }
}

/// The errno a node error maps to, for a command.
/// By kind, so that an error a member answered (a forwarded write) maps as the member's own.
fn errno(e: &Error, cmd: u16) -> u32 {
    use crate::error::ErrorKind as K;
    match e.kind() {
        K::OutOfRange if cmd == CMD_WRITE || cmd == CMD_WRITE_ZEROES => ENOSPC,
        K::OutOfRange | K::Invalid | K::TooLarge => EINVAL,
        K::Sealed | K::Unseal => EPERM,
        _ => EIO,
    }
}

/// One reply: the pieces to write, in order.
type Reply = Vec<Bytes>;

fn error_reply(structured: bool, cookie: u64, err: u32, message: &str) -> Reply {
    if structured {
        vec![error_chunk(cookie, err, message)]
    } else {
        vec![simple_reply(cookie, err)]
    }
}

fn ok_reply(structured: bool, cookie: u64) -> Reply {
    if structured {
        vec![chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).freeze()]
    } else {
        vec![simple_reply(cookie, 0)]
    }
}

async fn transmission<R, W>(
    node: Arc<Node>,
    rd: R,
    wr: W,
    export: Export,
    session: Session,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<(Reply, Budget)>(MAX_IN_FLIGHT);
    let budget = Arc::new(Semaphore::new(CONNECTION_BUDGET as usize));
    let writer = tokio::spawn(write_replies(wr, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let export = Arc::new(export);
    let structured = session.structured;
    let zeros = Bytes::from(vec![0u8; 1 << 20]);
    // Buffered: at a queue depth above one, several request headers arrive in one read.
    let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
    let result = loop {
        let mut hdr = [0u8; REQUEST_BYTES];
        let read = tokio::select! {
            r = rd.read_exact(&mut hdr) => r,
            // The writer gave up on this client (it did not take its replies): the
            // connection ends, though the client sends nothing more.
            () = tx.closed() => break Ok(()),
        };
        if let Err(e) = read {
            // A client that goes away mid-request ends its connection only.
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e.into())
            };
        }
        let Some(req) = Request::decode(&hdr) else {
            break Err(protocol("bad request magic"));
        };
        if tx.is_closed() {
            // The writer gave up on this client (it took no replies): so does the reader.
            break Ok(());
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        // The bytes this request will hold (its payload, or its reply's data) are taken from
        // the connection's budget, then the node's, before anything is read or served: a
        // client that does not read its replies stops here, holding what it already has.
        let cost = match req.cmd {
            CMD_READ | CMD_WRITE => req.len.min(MAX_REQUEST),
            _ => 0,
        };
        let held = match take_budget(&budget, cost).await {
            Some(b) => b,
            None => break Ok(()),
        };
        // The payload of a write is part of the framing: read it before anything else.
        let payload = if req.cmd == CMD_WRITE {
            if req.len > MAX_REQUEST {
                let _ = tx
                    .send((
                        error_reply(structured, req.cookie, EINVAL, "write too large"),
                        held,
                    ))
                    .await;
                break Err(protocol(format!("write of {} bytes", req.len)));
            }
            let mut buf = BytesMut::zeroed(req.len as usize);
            // It holds its budget while it comes: a client that stops sending it must not
            // hold it for ever.
            let wait = transfer_time(u64::from(req.len));
            match tokio::time::timeout(wait, rd.read_exact(&mut buf)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break Err(e.into()),
                Err(_) => {
                    metrics::counter!(crate::telemetry::NBD_REFUSED, "reason" => "stalled_writer")
                        .increment(1);
                    break Err(protocol(format!(
                        "the {}-byte payload of a write did not arrive within {} s",
                        req.len,
                        wait.as_secs()
                    )));
                }
            }
            buf.freeze()
        } else {
            Bytes::new()
        };
        if req.cmd == CMD_DISC {
            break Ok(());
        }
        let meta = session.meta;
        // Alone (nothing else in flight or buffered) and small: served right here, without a
        // task of its own; the hop costs more than the work for a cache hit at queue depth 1.
        if req.cmd == CMD_READ
            && req.len <= INLINE_READ
            && rd.buffer().is_empty()
            && slots.available_permits() == MAX_IN_FLIGHT - 1
        {
            let r = handle(&node, &export, req, payload, structured, meta, &zeros).await;
            let _ = tx.send((r, held)).await;
            drop(permit);
            continue;
        }
        let node = node.clone();
        let export = export.clone();
        let tx = tx.clone();
        let zeros = zeros.clone();
        tokio::spawn(async move {
            let r = handle(&node, &export, req, payload, structured, meta, &zeros).await;
            let _ = tx.send((r, held)).await;
            drop(permit);
        });
    };
    // Finish what is in flight, then close.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    match (result, writer.await) {
        // Why the writer gave up is why the connection ended.
        (Ok(()), Ok(Err(e))) if e.kind() == std::io::ErrorKind::TimedOut => Err(e.into()),
        (result, _) => result,
    }
}

/// Budget held by one request until its reply is written: (connection's, node's).
type Budget = (
    Option<tokio::sync::OwnedSemaphorePermit>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

/// Takes `cost` bytes from the connection's `budget`, then from the node's; `None` when the
/// node is shutting down.
async fn take_budget(budget: &Arc<Semaphore>, cost: u32) -> Option<Budget> {
    if cost == 0 {
        return Some((None, None));
    }
    let mine = budget.clone().acquire_many_owned(cost).await.ok()?;
    let node = node_budget().clone().acquire_many_owned(cost).await.ok()?;
    Some((Some(mine), Some(node)))
}

/// Sends replies as they come: every piece of every reply that is ready goes out in vectored
/// writes straight from the cached blocks' buffers (no copy into a write buffer). A request's
/// budget is given back once its reply is written. A client that does not take a batch of
/// replies within [`transfer_time`] of its bytes is disconnected: one that takes nothing, and
/// one that takes a byte now and then (each write making some progress) alike. The flush is
/// within that time too: TLS takes bytes into its own buffer before the socket does.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<(Reply, Budget)>,
) -> std::io::Result<()> {
    use bytes::Buf;
    let mut pending: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    let mut held: Vec<Budget> = Vec::new();
    while let Some((reply, budget)) = rx.recv().await {
        pending.extend(reply);
        held.push(budget);
        while pending.len() < 512 {
            match rx.try_recv() {
                Ok((reply, budget)) => {
                    pending.extend(reply);
                    held.push(budget);
                }
                Err(_) => break,
            }
        }
        let bytes: u64 = pending.iter().map(|b| b.len() as u64).sum();
        let wait = transfer_time(bytes);
        let deadline = tokio::time::Instant::now() + wait;
        let stalled = || {
            metrics::counter!(crate::telemetry::NBD_REFUSED, "reason" => "stalled_reader")
                .increment(1);
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client did not take {bytes} bytes of replies within {} s",
                    wait.as_secs()
                ),
            )
        };
        while !pending.is_empty() {
            let io: Vec<std::io::IoSlice<'_>> = pending
                .iter()
                .take(64)
                .map(|b| std::io::IoSlice::new(b))
                .collect();
            let Ok(wrote) = tokio::time::timeout_at(deadline, w.write_vectored(&io)).await else {
                return Err(stalled());
            };
            let mut n = wrote?;
            drop(io);
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let Some(front) = pending.front_mut() else {
                    break;
                };
                if front.len() <= n {
                    n -= front.len();
                    pending.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        match tokio::time::timeout_at(deadline, w.flush()).await {
            Ok(r) => r?,
            Err(_) => return Err(stalled()),
        }
        held.clear();
    }
    tokio::time::timeout(STALLED_REPLY_TIMEOUT, w.shutdown())
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Per-command metric handles, made once (after the recorder is installed).
struct CmdMetrics {
    requests: metrics::Counter,
    errors: metrics::Counter,
    bytes: metrics::Counter,
    seconds: metrics::Histogram,
}

fn cmd_metrics(cmd: u16) -> &'static CmdMetrics {
    static M: std::sync::OnceLock<Vec<CmdMetrics>> = std::sync::OnceLock::new();
    const NAMES: [&str; 7] = [
        "read",
        "write",
        "flush",
        "write_zeroes",
        "block_status",
        "trim",
        "other",
    ];
    let all = M.get_or_init(|| {
        use crate::telemetry::*;
        NAMES
            .iter()
            .map(|&c| CmdMetrics {
                requests: metrics::counter!(NBD_REQUESTS, "cmd" => c),
                errors: metrics::counter!(NBD_ERRORS, "cmd" => c),
                bytes: metrics::counter!(NBD_BYTES, "cmd" => c),
                seconds: metrics::histogram!(NBD_SECONDS, "cmd" => c),
            })
            .collect()
    });
    let i = match cmd {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_FLUSH => 2,
        CMD_WRITE_ZEROES => 3,
        CMD_BLOCK_STATUS => 4,
        CMD_TRIM => 5,
        _ => 6,
    };
    &all[i]
}

/// Whether a reply reports an error (simple: a non-zero error; structured: an error chunk).
fn is_error(reply: &Reply) -> bool {
    reply.first().is_some_and(|h| {
        h.len() >= 8
            && match u32::from_be_bytes([h[0], h[1], h[2], h[3]]) {
                SIMPLE_REPLY_MAGIC => h[4..8] != [0, 0, 0, 0],
                _ => u16::from_be_bytes([h[6], h[7]]) == REPLY_TYPE_ERROR,
            }
    })
}

/// Serves one request and counts it: requests, errors, bytes and latency by command.
async fn handle(
    node: &Node,
    export: &Export,
    req: Request,
    payload: Bytes,
    structured: bool,
    meta: bool,
    zeros: &Bytes,
) -> Reply {
    let started = std::time::Instant::now();
    let r = serve_request(node, export, req, payload, structured, meta, zeros).await;
    let m = cmd_metrics(req.cmd);
    m.requests.increment(1);
    m.seconds.record(started.elapsed().as_secs_f64());
    if is_error(&r) {
        m.errors.increment(1);
    } else if matches!(req.cmd, CMD_READ | CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM) {
        m.bytes.increment(u64::from(req.len));
    }
    r
}

/// Serves one request; its reply.
async fn serve_request(
    node: &Node,
    export: &Export,
    req: Request,
    payload: Bytes,
    structured: bool,
    meta: bool,
    zeros: &Bytes,
) -> Reply {
    let cookie = req.cookie;
    let fail = |err: u32, msg: &str| error_reply(structured, cookie, err, msg);
    if req.flags & !CMDF_KNOWN != 0 {
        return fail(EINVAL, "unknown command flag");
    }
    let read_only = export.flags & TF_READ_ONLY != 0;
    let end = req.offset.checked_add(u64::from(req.len));
    let in_range = end.is_some_and(|e| e <= export.size);
    match req.cmd {
        CMD_READ => {
            // EOVERFLOW is for a read that cannot be sent unfragmented (DF); a read over the
            // maximum size is otherwise an invalid one, as for qemu-nbd.
            if req.len > MAX_REQUEST {
                let err = if req.flags & CMDF_DF != 0 {
                    EOVERFLOW
                } else {
                    EINVAL
                };
                return fail(err, "read too large");
            }
            if !in_range {
                return fail(EINVAL, "read past the end");
            }
            match read_all(node, &export.name, req.offset, u64::from(req.len)).await {
                Ok(pieces) if structured => {
                    let len: usize = pieces.iter().map(Bytes::len).sum();
                    if len == 0 {
                        return ok_reply(true, cookie);
                    }
                    let mut h = chunk_header(
                        cookie,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        8 + len as u32,
                    );
                    h.put_u64(req.offset);
                    let mut out = Vec::with_capacity(pieces.len() + 1);
                    out.push(h.freeze());
                    out.extend(pieces);
                    out
                }
                Ok(pieces) => {
                    let mut out = Vec::with_capacity(pieces.len() + 1);
                    out.push(simple_reply(cookie, 0));
                    out.extend(pieces);
                    out
                }
                Err(e) => fail(errno(&e, req.cmd), &e.to_string()),
            }
        }
        // TRIM is a hint the protocol lets a server ignore ("MAY discard"): acknowledged,
        // nothing written. Done as zero writes, a kernel client's 4 GiB discards (mkfs,
        // blkdiscard) filled a sparse origin and ran past the client's timeout.
        CMD_TRIM => {
            if read_only {
                return fail(EPERM, "read-only export");
            }
            if !in_range {
                return fail(EINVAL, "trim past the end");
            }
            ok_reply(structured, cookie)
        }
        CMD_WRITE | CMD_WRITE_ZEROES => {
            if read_only {
                return fail(EPERM, "read-only export");
            }
            if !in_range {
                return fail(ENOSPC, "write past the end");
            }
            let r = if req.cmd == CMD_WRITE {
                write_all(node, &export.name, req.offset, payload).await
            } else {
                write_zeroes(node, &export.name, req.offset, u64::from(req.len), zeros).await
            };
            let r = match r {
                Ok(()) if req.flags & CMDF_FUA != 0 => node.flush(&export.name).await,
                r => r,
            };
            match r {
                Ok(()) => ok_reply(structured, cookie),
                Err(e) => fail(errno(&e, req.cmd), &e.to_string()),
            }
        }
        CMD_FLUSH => match node.flush(&export.name).await {
            Ok(()) => ok_reply(structured, cookie),
            Err(e) => fail(errno(&e, req.cmd), &e.to_string()),
        },
        CMD_BLOCK_STATUS => {
            if !structured || !meta {
                return fail(EINVAL, "no metadata context negotiated");
            }
            if !in_range || req.len == 0 {
                return fail(EINVAL, "block status past the end");
            }
            let extents = node.allocation(
                &export.name,
                req.offset,
                u64::from(req.len),
                if req.flags & CMDF_REQ_ONE != 0 {
                    1
                } else {
                    MAX_EXTENTS
                },
            );
            let mut b = chunk_header(
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                4 + 8 * extents.len() as u32,
            );
            b.put_u32(BASE_ALLOCATION_ID);
            for (len, flags) in extents {
                b.put_u32(len);
                b.put_u32(flags);
            }
            vec![b.freeze()]
        }
        _ => fail(EINVAL, "unknown command"),
    }
}

/// Reads [offset, offset + len) as the node's reads allow ([`crate::read::MAX_IO_BYTES`] each):
/// the server serves every request up to the [`MAX_REQUEST`] it advertises.
async fn read_all(node: &Node, disk: &str, offset: u64, len: u64) -> crate::Result<Vec<Bytes>> {
    if len <= crate::read::MAX_IO_BYTES {
        return node.read_pieces(disk, offset, len).await;
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(crate::read::MAX_IO_BYTES);
        out.extend(node.read_pieces(disk, offset + at, n).await?);
        at += n;
    }
    Ok(out)
}

/// Writes `data` at `offset` as the node's writes allow ([`crate::read::MAX_IO_BYTES`] each).
async fn write_all(node: &Node, disk: &str, offset: u64, data: Bytes) -> crate::Result<()> {
    let max = crate::read::MAX_IO_BYTES as usize;
    if data.len() <= max {
        return node.write(disk, offset, data).await;
    }
    let mut at = 0;
    while at < data.len() {
        let n = (data.len() - at).min(max);
        node.write(disk, offset + at as u64, data.slice(at..at + n))
            .await?;
        at += n;
    }
    Ok(())
}

/// Writes `len` zero bytes at `offset`, a MiB at a time.
async fn write_zeroes(
    node: &Node,
    disk: &str,
    offset: u64,
    len: u64,
    zeros: &Bytes,
) -> crate::Result<()> {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64);
        node.write(disk, offset + at, zeros.slice(..n as usize))
            .await?;
        at += n;
    }
    Ok(())
}

/// Connections of the NBD listeners: at most [`connection_cap`] at once, all of them together.
#[derive(Debug, Clone)]
struct Slots {
    open: Arc<Semaphore>,
    cap: usize,
    last_warned: Arc<parking_lot::Mutex<Option<std::time::Instant>>>,
    tls: Option<NbdTls>,
}

impl Slots {
    /// The connection cap is the process's, shared by every NBD listener (the Unix socket
    /// and TCP): each with its own would leave the node short of descriptors.
    fn new(tls: Option<NbdTls>) -> Self {
        static OPEN: std::sync::OnceLock<(Arc<Semaphore>, usize)> = std::sync::OnceLock::new();
        let (open, cap) = OPEN.get_or_init(|| {
            let cap = connection_cap();
            (Arc::new(Semaphore::new(cap)), cap)
        });
        let cap = *cap;
        Slots {
            open: open.clone(),
            cap,
            last_warned: Arc::default(),
            tls,
        }
    }
}

/// Serves one accepted client in a task of its own, if the listener has room for it; else
/// closes it at once (with a warning at most every 10 s, and a metric).
fn spawn_client<S>(node: &Arc<Node>, slots: &Slots, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(slot) = slots.open.clone().try_acquire_owned() else {
        metrics::counter!(crate::telemetry::NBD_REFUSED, "reason" => "connection_cap").increment(1);
        let mut last = slots.last_warned.lock();
        if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(cap = slots.cap, %peer, "nbd connection refused: the node's NBD listeners serve {} connections already (the cap keeps {FD_RESERVE} descriptors for the node itself)", slots.cap);
        }
        return;
    };
    let node = node.clone();
    let tls = slots.tls.clone();
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = serve(node, stream, tls).await {
            tracing::debug!(error = %e, %peer, "nbd connection ended");
        }
    });
}

/// A failed accept (out of file descriptors, a connection reset before it was taken) ends
/// nothing but that one client: log it and pause briefly so that a full fd table is not spun on.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "nbd accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Accepts NBD clients on a Unix socket until `stopped`.
pub async fn serve_unix(
    node: Arc<Node>,
    listener: tokio::net::UnixListener,
    tls: Option<NbdTls>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let slots = Slots::new(tls);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => spawn_client(&node, &slots, s, "unix".into()),
                Err(e) => accept_failed(e).await,
            },
            _ = stopped.changed() => return Ok(()),
        }
    }
}

/// Accepts NBD clients on TCP until `stopped`.
pub async fn serve_tcp(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    tls: Option<NbdTls>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let slots = Slots::new(tls);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    spawn_client(&node, &slots, s, peer.to_string());
                }
                Err(e) => accept_failed(e).await,
            },
            _ = stopped.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the NBD unit tests share: a test node's flags, and a client's option requests.

    use super::*;

    /// Flags for a test node `id` keeping its data in `dir`, with `disks` (`ID=PATH[,MODE]`),
    /// no SSD tier and 8 MiB of RAM.
    pub fn flags(dir: &std::path::Path, id: &str, disks: Vec<String>) -> crate::Flags {
        crate::Flags {
            data_dir: Some(dir.join("data")),
            node_id: Some(id.into()),
            disks,
            ssd_cache: Some(crate::config::Size(0)),
            ram_cache: Some(crate::config::Size(8 << 20)),
            ..Default::default()
        }
    }

    /// One option request.
    pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    /// GO's data for export `name`, asking for no information.
    pub fn go_data(name: &str) -> Vec<u8> {
        [
            &(name.len() as u32).to_be_bytes()[..],
            name.as_bytes(),
            &0u16.to_be_bytes(),
        ]
        .concat()
    }

    /// The client's flags, STRUCTURED_REPLY and GO for `name`, sent without reading a reply.
    pub fn go(name: &str) -> Vec<u8> {
        [
            &3u32.to_be_bytes()[..],
            &option(OPT_STRUCTURED_REPLY, &[]),
            &option(OPT_GO, &go_data(name)),
        ]
        .concat()
    }
}

#[cfg(test)]
mod fuzz {
    //! Random bytes after a valid prefix (none, the greeting's answer, or a full GO), fed to
    //! the real server over an in-memory pipe: it must end the connection (no hang, no panic)
    //! once the client stops sending, whatever it was sent.

    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;
    use tokio::io::AsyncWriteExt;

    struct Fixture {
        rt: tokio::runtime::Runtime,
        node: Arc<Node>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let img = dir.path().join("d.raw");
            std::fs::write(&img, vec![7u8; 1 << 20]).expect("image");
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let flags =
                super::testing::flags(dir.path(), "fuzz", vec![format!("d={}", img.display())]);
            let config = crate::Config::from_flags(&flags).expect("config");
            let node = rt.block_on(Node::open(config)).expect("node");
            Fixture {
                rt,
                node,
                _dir: dir,
            }
        })
    }

    use super::testing::go;

    /// Valid request headers with random fields, so that the fuzzer reaches the commands.
    fn requests(raw: &[(u16, u16, u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        for &(flags, cmd, offset, len) in raw {
            let r = Request {
                flags,
                cmd: cmd % 10,
                cookie: offset ^ 0x5a5a,
                offset: offset % (2 << 20),
                len: len % (1 << 21),
            };
            b.extend_from_slice(&r.encode());
        }
        b
    }

    fn feed(prefix: Vec<u8>, tail: Vec<u8>) -> usize {
        let f = fixture();
        f.rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let node = f.node.clone();
            let served = tokio::spawn(async move { serve(node, server, None).await });
            let drain = tokio::spawn(async move {
                let mut bytes = Vec::new();
                let mut buf = [0u8; 1 << 16];
                let _ = client.write_all(&prefix).await;
                let _ = client.write_all(&tail).await;
                let _ = client.shutdown().await;
                // Read until the server closes.
                loop {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => bytes.extend_from_slice(&buf[..n]),
                    }
                }
                bytes
            });
            let done = tokio::time::timeout(std::time::Duration::from_secs(20), served)
                .await
                .expect("the server did not end the connection");
            assert!(done.is_ok(), "the connection task panicked");
            let out = tokio::time::timeout(std::time::Duration::from_secs(20), drain)
                .await
                .expect("the client side did not see the connection close")
                .expect("client task");
            assert!(out.len() >= 18 && &out[..8] == b"NBDMAGIC");
            out.len()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn random_bytes_in_negotiation_end_the_connection(
            greeting in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let prefix = if greeting { 3u32.to_be_bytes().to_vec() } else { Vec::new() };
            let _ = feed(prefix, tail);
        }

        #[test]
        fn random_requests_in_transmission_end_the_connection(
            raw in proptest::collection::vec((any::<u16>(), any::<u16>(), any::<u64>(), any::<u32>()), 0..12),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut tail = requests(&raw);
            tail.extend_from_slice(&junk);
            let out = feed(go("d"), tail);
            // Greeting, two option replies and the export info: 90 bytes. A first request
            // that is neither a write (whose payload is missing) nor DISC gets a reply.
            if let Some(&(_, cmd, _, _)) = raw.first()
                && cmd % 10 != CMD_WRITE
                && cmd % 10 != CMD_DISC
            {
                prop_assert!(out > 90, "no reply to the first request ({out} bytes)");
            }
        }
    }
}

#[cfg(test)]
mod limits {
    //! What a client that holds the node's budget by going slow or quiet gets (found in
    //! review), and what a STARTTLS leaves of the negotiation before it.

    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A node with one mutable disk `d` of 1 MiB (byte 7), and its directory.
    async fn node() -> (Arc<Node>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("d.raw");
        std::fs::write(&img, vec![7u8; 1 << 20]).expect("image");
        let flags = testing::flags(dir.path(), "limits", vec![format!("d={}", img.display())]);
        let config = crate::Config::from_flags(&flags).expect("config");
        (Node::open(config).await.expect("node"), dir)
    }

    fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_BYTES] {
        Request {
            flags: 0,
            cmd,
            cookie,
            offset,
            len,
        }
        .encode()
    }

    /// Waits (in paused time) until `cond` holds, at most `within`.
    async fn until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < end {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    /// A write header whose payload never comes held 32 MiB of the node's budget for ever: 16
    /// such clients left no budget for anyone. Now the payload must arrive within
    /// `transfer_time` of its length, or the connection ends and gives the budget back.
    #[tokio::test(start_paused = true)]
    async fn a_write_whose_payload_never_comes_ends_its_connection_and_frees_its_budget() {
        let (node, _dir) = node().await;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let before = node_budget().available_permits();
        let began = tokio::time::Instant::now();
        let served = tokio::spawn(serve(node, server, None));
        client.write_all(&testing::go("d")).await.expect("send");
        let len = MAX_REQUEST;
        client
            .write_all(&request(CMD_WRITE, 1, 0, len))
            .await
            .expect("send");
        assert!(
            until(Duration::from_secs(5), || node_budget().available_permits()
                <= before - len as usize / 2)
            .await,
            "the write's budget was taken"
        );
        let held = node_budget().available_permits();
        let end = tokio::time::timeout(Duration::from_secs(600), served)
            .await
            .expect("the connection ended")
            .expect("task");
        let e = end.expect_err("a stalled payload is an error");
        assert!(e.to_string().contains("did not arrive within 62 s"), "{e}");
        let took = began.elapsed();
        assert!(
            (Duration::from_secs(62)..Duration::from_secs(70)).contains(&took),
            "{took:?}"
        );
        assert!(
            node_budget().available_permits() >= held + len as usize / 2,
            "the budget came back"
        );
        drop(client);
    }

    /// A client that took one byte of its replies every 10 s kept its budget for ever (each
    /// write made progress, and the stall timeout was per write). Now a batch of replies must
    /// be taken within `transfer_time` of its bytes.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_trickles_its_replies_is_disconnected() {
        let (node, _dir) = node().await;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let began = tokio::time::Instant::now();
        let served = tokio::spawn(serve(node, server, None));
        client.write_all(&testing::go("d")).await.expect("send");
        for cookie in 0..64 {
            client
                .write_all(&request(CMD_READ, cookie, 0, 1 << 20))
                .await
                .expect("send");
        }
        let mut byte = [0u8; 1];
        let mut taken = 0u64;
        while !served.is_finished() && began.elapsed() < Duration::from_secs(1000) {
            match client.read(&mut byte).await {
                Ok(1) => taken += 1,
                _ => break,
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        let end = tokio::time::timeout(Duration::from_secs(60), served)
            .await
            .expect("the connection ended")
            .expect("task");
        let took = began.elapsed();
        // At most 64 replies of 1 MiB in one batch: 30 s + 64 s, and the 10 s steps.
        assert!(
            took < Duration::from_secs(120),
            "{took:?}, {taken} bytes taken"
        );
        let e = end.expect_err("a trickling reader is an error");
        assert!(e.to_string().contains("did not take"), "{e}");
    }

    async fn send_option<S: AsyncWriteExt + Unpin>(s: &mut S, opt: u32, data: &[u8]) {
        s.write_all(&testing::option(opt, data))
            .await
            .expect("send option");
    }

    /// One option reply: its type and data.
    async fn option_reply<S: AsyncReadExt + Unpin>(s: &mut S) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.expect("option data");
        (kind, data)
    }

    /// The spec: after a successful STARTTLS "the server MUST NOT preserve any negotiation
    /// state (such as ... NBD_OPT_STRUCTURED_REPLY, or metadata contexts)". Structured replies
    /// asked for in the clear (by the client, or by a man in the middle) did hold inside TLS:
    /// the export offered DF and a read's reply came structured to a client that had not
    /// asked for them inside TLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_starttls_forgets_what_was_negotiated_in_the_clear() {
        let (node, dir) = node().await;
        let (mut tls, flags, served) = over_tls(node, dir.path()).await;
        assert_eq!(
            flags & TF_SEND_DF,
            0,
            "DF offered without structured replies: {flags:#x}"
        );
        tls.write_all(&request(CMD_READ, 9, 0, 4096))
            .await
            .expect("read");
        let mut magic = [0u8; 4];
        tls.read_exact(&mut magic).await.expect("reply");
        assert_eq!(
            u32::from_be_bytes(magic),
            SIMPLE_REPLY_MAGIC,
            "a structured reply that was not asked for inside TLS"
        );
        drop(tls);
        let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
    }

    /// Over TLS the reply writer's flush waited for ever on a client that read nothing: TLS
    /// takes bytes into its own buffer before the socket does, so the writes looked taken.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_over_tls_is_disconnected() {
        let (node, dir) = node().await;
        let began = tokio::time::Instant::now();
        let (mut tls, _, served) = over_tls(node, dir.path()).await;
        for cookie in 0..40 {
            tls.write_all(&request(CMD_READ, cookie, 0, 512))
                .await
                .expect("send");
        }
        for cookie in 40..104 {
            tls.write_all(&request(CMD_READ, cookie, 0, 1 << 20))
                .await
                .expect("send");
        }
        let end = tokio::time::timeout(Duration::from_secs(600), served)
            .await
            .expect("the connection ended")
            .expect("task");
        assert!(
            began.elapsed() < Duration::from_secs(200),
            "{:?}",
            began.elapsed()
        );
        let e = end.expect_err("a client that takes nothing is an error");
        assert!(e.to_string().contains("did not take"), "{e}");
        drop(tls);
    }

    type Served = tokio::task::JoinHandle<Result<(), NbdError>>;

    /// A client that asks for structured replies in the clear, then STARTTLS, then GO for `d`
    /// inside TLS: the stream, the export's flags, and the server's task.
    async fn over_tls(
        node: Arc<Node>,
        dir: &std::path::Path,
    ) -> (tokio_rustls::client::TlsStream<DuplexStream>, u16, Served) {
        let pki = shadowcache_testkit::TestPki::new(&dir.join("pki"));
        let (cert, key) = pki.member("limits", "localhost");
        let tls = NbdTls::load(&NbdTlsConfig {
            cert,
            key,
            require: false,
        })
        .expect("tls");
        let (mut client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn(serve(node, server, Some(tls)));
        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).await.expect("greeting");
        client.write_all(&3u32.to_be_bytes()).await.expect("flags");
        send_option(&mut client, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(option_reply(&mut client).await.0, REP_ACK);
        send_option(&mut client, OPT_STARTTLS, &[]).await;
        assert_eq!(option_reply(&mut client).await.0, REP_ACK);
        let mut roots = rustls::RootCertStore::empty();
        {
            use rustls_pki_types::pem::PemObject;
            for c in rustls_pki_types::CertificateDer::pem_file_iter(&pki.ca).expect("ca") {
                roots.add(c.expect("ca cert")).expect("root");
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").expect("name"),
                client,
            )
            .await
            .expect("TLS handshake");
        send_option(&mut tls, OPT_GO, &testing::go_data("d")).await;
        let mut export_flags = None;
        loop {
            let (kind, data) = option_reply(&mut tls).await;
            if kind == REP_ACK {
                break;
            }
            if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                export_flags = Some(u16::from_be_bytes([data[10], data[11]]));
            }
        }
        (tls, export_flags.expect("the export's flags"), served)
    }

    /// The meta context options as the protocol has them (found in review): a LIST answers
    /// context id 0, and a SET that fails replaces the selection with none, so a BLOCK_STATUS
    /// after it is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_set_meta_context_selects_nothing_and_a_list_names_id_zero() {
        let (node, _dir) = node().await;
        let (mut c, server) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn(serve(node, server, None));
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.expect("greeting");
        c.write_all(&3u32.to_be_bytes()).await.expect("flags");
        send_option(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(option_reply(&mut c).await.0, REP_ACK);
        let meta = |export: &str| {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            d
        };
        send_option(&mut c, OPT_LIST_META_CONTEXT, &meta("d")).await;
        let (kind, data) = option_reply(&mut c).await;
        assert_eq!(kind, REP_META_CONTEXT);
        assert_eq!(&data[..4], &0u32.to_be_bytes(), "a LIST's context id");
        assert_eq!(option_reply(&mut c).await.0, REP_ACK);
        send_option(&mut c, OPT_SET_META_CONTEXT, &meta("d")).await;
        let (kind, data) = option_reply(&mut c).await;
        assert_eq!(kind, REP_META_CONTEXT);
        assert_eq!(&data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(option_reply(&mut c).await.0, REP_ACK);
        // A SET for an export that does not exist fails, and leaves nothing selected.
        send_option(&mut c, OPT_SET_META_CONTEXT, &meta("nope")).await;
        assert_eq!(option_reply(&mut c).await.0, REP_ERR_UNKNOWN);
        send_option(&mut c, OPT_GO, &testing::go_data("d")).await;
        while option_reply(&mut c).await.0 != REP_ACK {}
        c.write_all(&request(CMD_BLOCK_STATUS, 3, 0, 4096))
            .await
            .expect("block status");
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.expect("reply");
        assert_eq!(
            u16::from_be_bytes([h[6], h[7]]),
            REPLY_TYPE_ERROR,
            "block status served with no context selected"
        );
        drop(c);
        let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
    }

    /// BLOCK_STATUS described every change of state it was asked about in one reply: a
    /// request of 4 GiB over alternating holes and data made a reply of megabytes. The node's
    /// extents stop at the count asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_extents_stop_at_the_count_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("s.raw");
        let bs = 4096usize;
        let blocks = 64;
        let mut content = vec![0u8; bs * blocks];
        for b in (1..blocks).step_by(2) {
            content[b * bs..(b + 1) * bs].fill(5);
        }
        std::fs::write(&img, &content).expect("image");
        let flags = crate::Flags {
            block_size: Some(crate::config::Size(bs as u64)),
            ..testing::flags(
                dir.path(),
                "extents",
                vec![format!("s={},sealed", img.display())],
            )
        };
        let node = Node::open(crate::Config::from_flags(&flags).expect("config"))
            .await
            .expect("node");
        // Read once, so that the map knows every block.
        node.read("s", 0, content.len() as u64).await.expect("read");
        let size = content.len() as u64;
        let all = node.allocation("s", 0, size, MAX_EXTENTS);
        assert_eq!(all.len(), blocks, "one extent a block, alternating");
        assert_eq!(all.iter().map(|e| u64::from(e.0)).sum::<u64>(), size);
        let few = node.allocation("s", 0, size, 5);
        assert_eq!(few.len(), 5);
        assert_eq!(&few[..], &all[..5], "the first extents, whole");
        assert_eq!(node.allocation("s", 0, size, 1).len(), 1);
    }
}
