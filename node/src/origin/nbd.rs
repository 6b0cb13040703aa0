//! An NBD export as a disk's origin: `nbd://HOST[:PORT]/EXPORT` or
//! `nbd+unix:///EXPORT?socket=PATH`. Whatever qemu-nbd or nbdkit can serve (qcow2, vmdk, raw,
//! remote storage) can be the origin of a disk this node owns.
//!
//! The client side of the same protocol code as the frontend (`crate::nbd::proto`): fixed
//! newstyle, NBD_OPT_GO, simple replies. One connection, pipelined: requests go out under a
//! lock on the write half, one task reads replies and hands each to its waiter by cookie. A
//! connection that fails fails every request in flight (UNAVAILABLE, nothing cached) and is
//! opened again at the next request.
//!
//! Architecture invariant: a reply is matched to its request by cookie and must carry exactly
//! the bytes asked for; anything else ends the connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::{Origin, OriginError, OriginFuture};
use crate::nbd::proto::*;

/// Where the export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    /// TCP host and port.
    Tcp(String, u16),
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where.
    pub target: NbdTarget,
    /// The export name.
    pub export: String,
}

/// Whether `s` is an NBD URI (rather than a path).
pub fn is_nbd_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}

impl NbdUri {
    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(s: &str) -> Result<NbdUri, String> {
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| format!("{s:?}: expected nbd+unix:///EXPORT?socket=PATH"))?;
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| format!("{s:?}: no ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format!("{s:?}: no socket=PATH"))?;
            return Ok(NbdUri {
                target: NbdTarget::Unix(socket.into()),
                export: export.to_string(),
            });
        }
        let rest = s
            .strip_prefix("nbd://")
            .ok_or_else(|| format!("{s:?} is not an nbd:// or nbd+unix:// URI"))?;
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>()
                    .map_err(|_| format!("{s:?}: bad port {p:?}"))?,
            ),
            _ => (hostport, 10809),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(NbdUri {
            target: NbdTarget::Tcp(host.to_string(), port),
            export: export.to_string(),
        })
    }
}

/// Deadline to connect and negotiate (a server that takes one client at a time keeps the next
/// one waiting).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Deadline of one request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

type Waiters = Arc<parking_lot::Mutex<HashMap<u64, (u32, oneshot::Sender<Result<Bytes, String>>)>>>;

/// One connection in transmission.
struct Conn {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    waiters: Waiters,
    dead: Arc<std::sync::atomic::AtomicBool>,
    /// Writes acknowledged on this connection, and how many of them a flush has covered.
    acked: AtomicU64,
    flushed: AtomicU64,
}

/// A disk origin served by an NBD server.
pub struct NbdOrigin {
    uri: NbdUri,
    describe: String,
    size: u64,
    read_only: bool,
    /// The server takes NBD_CMD_FLUSH (it advertised SEND_FLUSH); without it the client must
    /// not send one, and the server's writes are as durable as they will get when acknowledged.
    send_flush: bool,
    max_request: u32,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    cookies: AtomicU64,
    /// A connection was lost with writes no flush had covered: the next flush must fail, since
    /// a flush on the new connection does not cover them.
    lost_unflushed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for NbdOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdOrigin")
            .field("uri", &self.describe)
            .field("size", &self.size)
            .finish()
    }
}

/// What negotiation learned of the export.
struct Negotiated {
    size: u64,
    flags: u16,
    max_request: u32,
}

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
) -> Result<Negotiated, String> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)
        .await
        .map_err(|e| format!("greeting: {e}"))?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().map_err(|_| "greeting")?);
    let opt = u64::from_be_bytes(hello[8..16].try_into().map_err(|_| "greeting")?);
    if magic != NBD_MAGIC || opt != IHAVEOPT {
        return Err("not a newstyle NBD server".into());
    }
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle".into());
    }
    let mut client = CLIENT_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= CLIENT_NO_ZEROES;
    }
    let mut req = BytesMut::new();
    req.put_u32(client);
    req.put_u64(IHAVEOPT);
    req.put_u32(OPT_GO);
    req.put_u32(4 + export.len() as u32 + 2 + 2);
    req.put_u32(export.len() as u32);
    req.put_slice(export.as_bytes());
    req.put_u16(1);
    req.put_u16(INFO_BLOCK_SIZE);
    s.write_all(&req).await.map_err(|e| e.to_string())?;
    let mut size = None;
    let mut tflags = 0;
    let mut max_request = MAX_REQUEST;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)
            .await
            .map_err(|e| format!("option reply: {e}"))?;
        let magic = u64::from_be_bytes(h[0..8].try_into().map_err(|_| "reply")?);
        let kind = u32::from_be_bytes(h[12..16].try_into().map_err(|_| "reply")?);
        let len = u32::from_be_bytes(h[16..20].try_into().map_err(|_| "reply")?);
        if magic != REPLY_MAGIC || len > MAX_OPTION {
            return Err("malformed option reply".into());
        }
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).await.map_err(|e| e.to_string())?;
        match kind {
            REP_ACK => break,
            REP_INFO if d.len() >= 2 => {
                let t = u16::from_be_bytes([d[0], d[1]]);
                if t == INFO_EXPORT && d.len() >= 12 {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().map_err(|_| "info")?));
                    tflags = u16::from_be_bytes([d[10], d[11]]);
                } else if t == INFO_BLOCK_SIZE && d.len() >= 14 {
                    let max = u32::from_be_bytes(d[10..14].try_into().map_err(|_| "info")?);
                    max_request = max.clamp(4096, MAX_REQUEST);
                }
            }
            k if k & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&d).to_string();
                return Err(format!("export {export:?} refused ({k:#x}): {msg}"));
            }
            _ => {}
        }
    }
    let size = size.ok_or("the server sent no export size")?;
    Ok(Negotiated {
        size,
        flags: tflags,
        max_request,
    })
}

/// Reads simple replies and hands each to its waiter, until the connection fails.
async fn read_replies(
    mut rd: Box<dyn AsyncRead + Send + Unpin>,
    waiters: Waiters,
    dead: Arc<std::sync::atomic::AtomicBool>,
) {
    let why = loop {
        let mut h = [0u8; 16];
        if let Err(e) = rd.read_exact(&mut h).await {
            break format!("connection lost: {e}");
        }
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
        if magic != SIMPLE_REPLY_MAGIC {
            break format!("bad reply magic {magic:#x}");
        }
        let Some((read_len, tx)) = waiters.lock().remove(&cookie) else {
            break format!("reply to an unknown cookie {cookie}");
        };
        if error != 0 {
            let _ = tx.send(Err(format!("server error {error} ({})", nbd_errno(error))));
            continue;
        }
        let mut data = BytesMut::zeroed(read_len as usize);
        if read_len > 0
            && let Err(e) = rd.read_exact(&mut data).await
        {
            let _ = tx.send(Err(format!("connection lost: {e}")));
            break format!("connection lost: {e}");
        }
        let _ = tx.send(Ok(data.freeze()));
    };
    dead.store(true, Ordering::SeqCst);
    for (_, (_, tx)) in waiters.lock().drain() {
        let _ = tx.send(Err(why.clone()));
    }
}

async fn connect(uri: &NbdUri) -> Result<(Arc<Conn>, Negotiated), String> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_now(uri))
        .await
        .map_err(|_| {
            format!(
                "no answer within {} s (does the server take only one client at a time?)",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
}

async fn connect_now(uri: &NbdUri) -> Result<(Arc<Conn>, Negotiated), String> {
    type Halves = (
        Box<dyn AsyncRead + Send + Unpin>,
        Box<dyn AsyncWrite + Send + Unpin>,
        Negotiated,
    );
    let (rd, wr, neg): Halves = match &uri.target {
        NbdTarget::Tcp(host, port) => {
            let mut s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = s.set_nodelay(true);
            let neg = negotiate(&mut s, &uri.export).await?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), neg)
        }
        NbdTarget::Unix(path) => {
            let mut s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("connect {}: {e}", path.display()))?;
            let neg = negotiate(&mut s, &uri.export).await?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), neg)
        }
    };
    let waiters: Waiters = Arc::default();
    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(read_replies(rd, waiters.clone(), dead.clone()));
    Ok((
        Arc::new(Conn {
            writer: tokio::sync::Mutex::new(wr),
            waiters,
            dead,
            acked: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }),
        neg,
    ))
}

impl NbdOrigin {
    /// Connects to the export `uri` names and learns its size.
    pub async fn open(uri: &str, writable: bool) -> Result<NbdOrigin, OriginError> {
        let open_err = |cause: String| OriginError::Open {
            origin: uri.to_string(),
            cause,
        };
        let parsed = NbdUri::parse(uri).map_err(open_err)?;
        let (conn, neg) = connect(&parsed).await.map_err(open_err)?;
        let read_only = neg.flags & TF_READ_ONLY != 0;
        if writable && read_only {
            return Err(open_err(
                "the export is read-only; register the disk sealed".into(),
            ));
        }
        Ok(NbdOrigin {
            uri: parsed,
            describe: uri.to_string(),
            size: neg.size,
            read_only,
            send_flush: neg.flags & TF_SEND_FLUSH != 0,
            max_request: neg.max_request,
            conn: tokio::sync::Mutex::new(Some(conn)),
            cookies: AtomicU64::new(1),
            lost_unflushed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    async fn conn(&self) -> Result<Arc<Conn>, String> {
        let mut c = self.conn.lock().await;
        if let Some(conn) = c.as_ref() {
            if !conn.dead.load(Ordering::SeqCst) {
                return Ok(conn.clone());
            }
            let acked = conn.acked.load(Ordering::SeqCst);
            if acked > conn.flushed.swap(acked, Ordering::SeqCst) {
                // Counted once: the next flush reports them.
                self.lost_unflushed.store(true, Ordering::SeqCst);
            }
        }
        let (conn, neg) = connect(&self.uri).await?;
        if neg.size != self.size {
            return Err(format!(
                "the export's size changed from {} to {}",
                self.size, neg.size
            ));
        }
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// Sends one request (and its payload) and waits for its reply.
    async fn call(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
    ) -> Result<Bytes, String> {
        let conn = self.conn().await?;
        // What a flush sent now covers: the writes acknowledged before it.
        let covers = conn.acked.load(Ordering::SeqCst);
        let cookie = self.cookies.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if cmd == CMD_READ { len } else { 0 };
        conn.waiters.lock().insert(cookie, (read_len, tx));
        let hdr = Request {
            flags,
            cmd,
            cookie,
            offset,
            len,
        }
        .encode();
        let sent = {
            let mut w = conn.writer.lock().await;
            let r = w.write_all(&hdr).await;
            let r = match (r, &payload) {
                (Ok(()), Some(p)) => w.write_all(p).await,
                (r, _) => r,
            };
            match r {
                Ok(()) => w.flush().await,
                e => e,
            }
        };
        if let Err(e) = sent {
            conn.waiters.lock().remove(&cookie);
            conn.dead.store(true, Ordering::SeqCst);
            return Err(format!("send: {e}"));
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(r) => {
                let got = r.map_err(|_| "connection lost".to_string())?;
                if got.is_ok() {
                    match cmd {
                        CMD_WRITE => {
                            conn.acked.fetch_add(1, Ordering::SeqCst);
                        }
                        CMD_FLUSH => {
                            conn.flushed.fetch_max(covers, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
                got
            }
            Err(_) => {
                // The reply may still come; it must not be matched to anything else. The
                // connection is given up.
                conn.waiters.lock().remove(&cookie);
                conn.dead.store(true, Ordering::SeqCst);
                Err(format!("no reply within {} s", REQUEST_TIMEOUT.as_secs()))
            }
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, cause: String) -> OriginError {
        OriginError::Io {
            origin: self.describe.clone(),
            op,
            offset,
            cause,
        }
    }
}

impl Origin for NbdOrigin {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        Box::pin(async move {
            if offset.checked_add(len as u64).is_none_or(|e| e > self.size) {
                return Err(OriginError::Short {
                    origin: self.describe.clone(),
                    offset,
                    len: len as u64,
                });
            }
            let max = self.max_request as usize;
            if len <= max {
                return self
                    .call(CMD_READ, 0, offset, len as u32, None)
                    .await
                    .map_err(|e| self.io_error("read", offset, e));
            }
            let parts = futures::future::try_join_all((0..len).step_by(max).map(|at| {
                let n = max.min(len - at);
                async move {
                    self.call(CMD_READ, 0, offset + at as u64, n as u32, None)
                        .await
                        .map_err(|e| self.io_error("read", offset + at as u64, e))
                }
            }))
            .await?;
            let mut out = BytesMut::with_capacity(len);
            for p in parts {
                out.extend_from_slice(&p);
            }
            Ok(out.freeze())
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> OriginFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(self.io_error("write", offset, "the export is read-only".into()));
            }
            let max = self.max_request as usize;
            let mut at = 0;
            while at < data.len() {
                let n = max.min(data.len() - at);
                self.call(
                    CMD_WRITE,
                    0,
                    offset + at as u64,
                    n as u32,
                    Some(data.slice(at..at + n)),
                )
                .await
                .map_err(|e| self.io_error("write", offset + at as u64, e))?;
                at += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Ok(());
            }
            // Make sure a lost connection is noticed (and its unflushed writes counted) before
            // this flush is answered.
            let _ = self.conn().await;
            if self.lost_unflushed.swap(false, Ordering::SeqCst) {
                return Err(self.io_error(
                    "flush",
                    0,
                    "the connection was lost with acknowledged writes no flush had covered; they may not be durable".into(),
                ));
            }
            if !self.send_flush {
                // The server does not take flushes (no SEND_FLUSH): sending one breaks the
                // protocol. Its writes are as durable as they get once acknowledged.
                return Ok(());
            }
            self.call(CMD_FLUSH, 0, 0, 0, None)
                .await
                .map(|_| ())
                .map_err(|e| self.io_error("flush", 0, e))
        })
    }

    fn identity(&self) -> Option<String> {
        // Nothing tells us whether the export changed while we were away: no saved map.
        None
    }
}

/// The name of an NBD error code (the protocol's values, which are Linux errno values).
fn nbd_errno(code: u32) -> &'static str {
    match code {
        1 => "EPERM: not permitted",
        5 => "EIO: input/output error",
        12 => "ENOMEM: out of memory",
        22 => "EINVAL: invalid argument",
        28 => "ENOSPC: no space left on device",
        75 => "EOVERFLOW: request too large",
        95 => "ENOTSUP: not supported",
        108 => "ESHUTDOWN: server is shutting down",
        _ => "an error code the NBD protocol does not define",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert_eq!(
            NbdUri::parse("nbd://10.0.0.5:10900/base").expect("tcp"),
            NbdUri {
                target: NbdTarget::Tcp("10.0.0.5".into(), 10900),
                export: "base".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd://host/").expect("default port").target,
            NbdTarget::Tcp("host".into(), 10809)
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///img?socket=/run/q.sock").expect("unix"),
            NbdUri {
                target: NbdTarget::Unix("/run/q.sock".into()),
                export: "img".into()
            }
        );
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://x?socket=/s",
            "nbd://:1/x",
            "nbd://h:99999/x",
            "http://x",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
