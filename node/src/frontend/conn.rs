//! gRPC connections under limits: how many a listener serves, how many answer bytes they may
//! hold, and how long a client may take to take them (the NBD listeners' rules, for gRPC).
//!
//! tonic frees a request's place (`concurrency_limit_per_connection`) when its handler
//! returns, before its answer is sent; a client that never opened its HTTP/2 window, or never
//! read its socket, held every answer it had asked for: 256 answers of 16 MiB a connection,
//! and connections were not counted (found in an outside review of the gRPC frontends). Now:
//! - a handler that makes a large answer first takes its bytes from the connection's budget
//!   and then the listener's ([`hold`]); the bytes go back when hyper has taken the whole
//!   answer (the body is dropped), or when the connection ends;
//! - an answer holding budget must be taken within [`transfer_time`] of its length (30 s +
//!   1 s a MiB, as NBD), and a connection whose socket takes no byte for [`STALLED_WRITE`]
//!   while the node has bytes for it is closed; either way everything it held is freed;
//! - a listener accepts at most [`connection_cap`] connections at once (the rest wait in the
//!   kernel's backlog);
//! - answers go to hyper in pieces of [`PIECE_BYTES`], so what hyper's HTTP/2 layer buffers for
//!   a stream beyond the client's window is a piece, not the answer.
//!
//! Architecture invariant: no request is refused here, and no byte of an answer is changed or
//! reordered; a connection is only ever closed, and only for a client that stopped taking its
//! answers.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Answer bytes one connection may hold at once.
pub const CONNECTION_BUDGET: u64 = 64 << 20;
/// Answer bytes all connections of one listener kind (clients; members) may hold at once.
pub const LISTENER_BUDGET: u64 = 256 << 20;
/// A connection whose socket takes no byte for this long, while the node has bytes to send
/// on it, is closed.
pub const STALLED_WRITE: Duration = crate::nbd::STALLED_REPLY_TIMEOUT;
/// Connections one listener kind serves at once, at most (fewer under a low descriptor limit).
pub const MAX_CONNECTIONS: usize = 1024;
/// How often a connection that sends nothing is pinged, and how long its answer may take: a
/// peer that went away without closing (a host that lost power) frees its place within 50 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// A TLS handshake must end within this (as an NBD negotiation).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = crate::nbd::NEGOTIATION_TIMEOUT;
/// Bytes of an answer handed to hyper at a time.
pub const PIECE_BYTES: usize = 64 << 10;

/// How long a client may take to take an answer of `bytes`: as NBD's.
pub fn transfer_time(bytes: u64) -> Duration {
    STALLED_WRITE + Duration::from_secs(bytes / crate::nbd::MIN_CLIENT_BYTES_PER_SEC)
}

/// Connections one listener kind takes at once: [`MAX_CONNECTIONS`], or a third of what the
/// descriptor limit leaves beside the node's reserve (NBD's clients and the other gRPC kind
/// take the other thirds). A member opens four connections to each other member, so the Peer
/// listener's 1,024 serve clusters of up to 256 nodes.
pub fn connection_cap() -> usize {
    MAX_CONNECTIONS
        .min(crate::nbd::descriptor_room() / 3)
        .max(16)
}

/// The limits of one listener kind, shared by its listeners (the Unix socket and TCP).
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Shared>,
}

struct Shared {
    /// For metrics and logs: `client` or `peer`.
    kind: &'static str,
    budget: Arc<Semaphore>,
    budget_bytes: u64,
    connection_budget: u64,
    connections: Arc<Semaphore>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("kind", &self.inner.kind)
            .field("budget_left", &self.budget_left())
            .finish()
    }
}

impl Limits {
    /// Limits of `budget` answer bytes (`connection_budget` a connection) and `connections`.
    pub fn new(
        kind: &'static str,
        budget: u64,
        connection_budget: u64,
        connections: usize,
    ) -> Limits {
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS as u64);
        Limits {
            inner: Arc::new(Shared {
                kind,
                budget: Arc::new(Semaphore::new(budget as usize)),
                budget_bytes: budget,
                connection_budget: connection_budget.clamp(1, budget),
                connections: Arc::new(Semaphore::new(connections.max(1))),
            }),
        }
    }

    /// The limits of the client listeners (the Unix socket and `listen_tcp`) of this process.
    pub fn clients() -> Limits {
        static L: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
        L.get_or_init(|| {
            Limits::new(
                "client",
                LISTENER_BUDGET,
                CONNECTION_BUDGET,
                connection_cap(),
            )
        })
        .clone()
    }

    /// The limits of the Peer listener of this process.
    pub fn peers() -> Limits {
        static L: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
        L.get_or_init(|| Limits::new("peer", LISTENER_BUDGET, CONNECTION_BUDGET, connection_cap()))
            .clone()
    }

    /// Answer bytes not held now.
    pub fn budget_left(&self) -> u64 {
        self.inner.budget.available_permits() as u64
    }

    /// Connections that could be accepted now.
    pub fn connections_left(&self) -> usize {
        self.inner.connections.available_permits()
    }

    /// Waits for a connection's place, then wraps `io` in it.
    pub async fn admit<T>(&self, io: T) -> Io<T> {
        let place = match self.inner.connections.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => unreachable!("the connection semaphore is never closed"),
        };
        Io::new(io, self.clone(), place)
    }

    /// Accepted connections of `listener`, each wrapped once it has a place (accepting waits
    /// while the listener's kind serves its cap). An accept error (out of descriptors) is
    /// logged and retried after a pause, never the end of the listener.
    pub fn incoming<L: Accept>(
        &self,
        listener: L,
    ) -> impl futures::Stream<Item = io::Result<Io<L::Io>>> + Send + 'static {
        let limits = self.clone();
        futures::stream::unfold((listener, limits), |(listener, limits)| async move {
            loop {
                // The place first: a connection past the cap waits in the backlog, not here.
                let place = match limits.inner.connections.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => unreachable!("the connection semaphore is never closed"),
                };
                match listener.accept_io().await {
                    Ok(io) => {
                        let io = Io::new(io, limits.clone(), place);
                        return Some((Ok(io), (listener, limits)));
                    }
                    Err(e) => {
                        tracing::warn!(kind = limits.inner.kind, error = %e, "gRPC accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    }
}

/// A listener whose connections [`Limits::incoming`] takes.
pub trait Accept: Send + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn accept_io(&self) -> impl std::future::Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> io::Result<tokio::net::TcpStream> {
        let (s, _) = self.accept().await?;
        // Small answers are not held back for more.
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> io::Result<tokio::net::UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// One connection's state, shared by its socket ([`Io`]), its answers ([`Answer`]) and its
/// watchdog.
pub struct Conn {
    limits: Limits,
    budget: Arc<Semaphore>,
    state: Mutex<State>,
    changed: Notify,
    /// What the client's certificate says (TLS only), read at its first request.
    identity: std::sync::OnceLock<Option<Arc<crate::certs::CertIdentity>>>,
}

#[derive(Default)]
struct State {
    /// When each answer that holds budget must have been taken, by (deadline, id).
    deadlines: BTreeMap<(Instant, u64), ()>,
    next_id: u64,
    /// Since when the socket has taken none of what the node writes.
    blocked_since: Option<Instant>,
    /// Why the node closed this connection, once it has.
    closed_by_node: Option<&'static str>,
    /// The socket is gone.
    dropped: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl Conn {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the node closed this connection, if it did.
    pub fn closed_by_node(&self) -> Option<&'static str> {
        self.lock().closed_by_node
    }

    fn close(&self, why: &'static str) {
        let (r, w) = {
            let mut s = self.lock();
            if s.closed_by_node.is_some() {
                return;
            }
            s.closed_by_node = Some(why);
            (s.read_waker.take(), s.write_waker.take())
        };
        metrics::counter!(
            crate::telemetry::GRPC_CLOSED,
            "kind" => self.limits.inner.kind,
            "reason" => why
        )
        .increment(1);
        tracing::warn!(
            kind = self.limits.inner.kind,
            reason = why,
            "closed a gRPC connection whose client stopped taking its answers"
        );
        for w in [r, w].into_iter().flatten() {
            w.wake();
        }
    }
}

/// What the node's gRPC handlers find in a request's extensions: the connection it came on.
#[derive(Clone)]
pub struct ConnInfo(pub Arc<Conn>);

/// The roles of the certificate the client of `request`'s connection showed over TLS (read
/// once a connection); `None` without TLS.
pub fn roles<T>(request: &tonic::Request<T>) -> Option<crate::certs::Roles> {
    identity(request).map(|i| i.roles)
}

/// What the certificate the client of `request`'s connection showed over TLS says (read once
/// a connection); `None` without TLS.
pub fn identity<T>(request: &tonic::Request<T>) -> Option<Arc<crate::certs::CertIdentity>> {
    let tls = request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<ConnInfo>>()?;
    let read = || {
        // A TLS listener of the node requires a certificate; were none there, no rights.
        let id = tls
            .peer_certs()
            .and_then(|chain| chain.first().map(|c| crate::certs::identity_of(c)))
            .unwrap_or_default();
        Some(Arc::new(id))
    };
    tls.get_ref().0.identity.get_or_init(read).clone()
}

/// A socket under [`Limits`]: closed with an error once its [`Conn`] is closed by the node.
pub struct Io<T> {
    inner: T,
    conn: Arc<Conn>,
    _place: OwnedSemaphorePermit,
}

impl<T> Io<T> {
    fn new(inner: T, limits: Limits, place: OwnedSemaphorePermit) -> Io<T> {
        let budget = Arc::new(Semaphore::new(limits.inner.connection_budget as usize));
        let conn = Arc::new(Conn {
            limits,
            budget,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            identity: std::sync::OnceLock::new(),
        });
        tokio::spawn(watch(conn.clone()));
        Io {
            inner,
            conn,
            _place: place,
        }
    }

    /// The connection's shared state.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    fn closed(&self) -> Option<io::Error> {
        self.conn.closed_by_node().map(|why| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the node closed this connection: {why}"),
            )
        })
    }

    /// Notes what a write did: no progress starts (or continues) a stall; any byte ends it.
    fn wrote<R>(&self, r: &Poll<io::Result<R>>, progress: bool, cx: &Context<'_>) {
        let mut s = self.conn.lock();
        match r {
            Poll::Pending => {
                s.write_waker = Some(cx.waker().clone());
                if s.blocked_since.is_none() {
                    s.blocked_since = Some(Instant::now());
                    drop(s);
                    self.conn.changed.notify_one();
                }
            }
            Poll::Ready(Ok(_)) if progress => s.blocked_since = None,
            Poll::Ready(_) => {}
        }
    }
}

impl<T> Drop for Io<T> {
    fn drop(&mut self) {
        self.conn.lock().dropped = true;
        self.conn.changed.notify_one();
    }
}

impl<T: Send + Sync + 'static> tonic::transport::server::Connected for Io<T> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        ConnInfo(self.conn.clone())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(e) = me.closed() {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        if r.is_pending() {
            // hyper always has a read pending: the watchdog wakes it to end the connection.
            me.conn.lock().read_waker = Some(cx.waker().clone());
            if let Some(e) = me.closed() {
                return Poll::Ready(Err(e));
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = me.closed() {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        me.wrote(&r, matches!(r, Poll::Ready(Ok(n)) if n > 0), cx);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = me.closed() {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        me.wrote(&r, matches!(r, Poll::Ready(Ok(n)) if n > 0), cx);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(e) = me.closed() {
            return Poll::Ready(Err(e));
        }
        // Only writes tell a stall: a flush of a socket is done at once, and a flush that
        // succeeds says nothing of bytes a write could not place.
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Closes `conn` once an answer outlives its deadline or its socket stays blocked for
/// [`STALLED_WRITE`]; ends with the socket.
async fn watch(conn: Arc<Conn>) {
    loop {
        let changed = conn.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let next = {
            let s = conn.lock();
            if s.dropped || s.closed_by_node.is_some() {
                return;
            }
            let answer = s
                .deadlines
                .keys()
                .next()
                .map(|&(t, _)| (t, "answer_not_taken"));
            let socket = s
                .blocked_since
                .map(|t| (t + STALLED_WRITE, "stalled_socket"));
            match (answer, socket) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            }
        };
        match next {
            Some((at, why)) if at <= Instant::now() => {
                conn.close(why);
                return;
            }
            Some((at, _)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut changed => {}
                }
            }
            None => changed.await,
        }
    }
}

/// Budget one answer holds, from [`hold`] until hyper has taken the whole answer.
pub struct Held {
    _connection: OwnedSemaphorePermit,
    _listener: OwnedSemaphorePermit,
    bytes: u64,
    conn: Arc<Conn>,
}

/// A [`Held`] in a response's extensions (which must be `Clone`), taken out by [`Answers`].
#[derive(Clone)]
pub struct HeldSlot(Arc<Mutex<Option<Held>>>);

impl HeldSlot {
    fn take(&self) -> Option<Held> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Takes `bytes` (at most the connection's budget) from the budget of the connection
/// `request` came on, then from its listener's, waiting while others hold them. `None` for a
/// request that came another way (called in-process). Put the result in the response with
/// [`attach`].
pub async fn hold<T>(request: &tonic::Request<T>, bytes: u64) -> Option<HeldSlot> {
    let conn = request.extensions().get::<ConnInfo>()?.0.clone();
    let shared = &conn.limits.inner;
    let cost = bytes.clamp(1, shared.connection_budget) as u32;
    let connection = conn.budget.clone().acquire_many_owned(cost).await.ok()?;
    let listener = shared.budget.clone().acquire_many_owned(cost).await.ok()?;
    debug_assert!(u64::from(cost) <= shared.budget_bytes);
    Some(HeldSlot(Arc::new(Mutex::new(Some(Held {
        _connection: connection,
        _listener: listener,
        bytes,
        conn,
    })))))
}

/// Puts `held` into `response`, so that the budget is held until the answer is taken.
pub fn attach<T>(mut response: tonic::Response<T>, held: Option<HeldSlot>) -> tonic::Response<T> {
    if let Some(h) = held {
        response.extensions_mut().insert(h);
    }
    response
}

/// The tower layer that gives each answer its budget's lifetime and deadline.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnswersLayer;

impl<S> tower::Layer<S> for AnswersLayer {
    type Service = Answers<S>;
    fn layer(&self, inner: S) -> Answers<S> {
        Answers { inner }
    }
}

/// See [`AnswersLayer`].
#[derive(Clone, Debug)]
pub struct Answers<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Answers<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Answer>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(request);
        Box::pin(async move {
            let response = fut.await?;
            let (mut parts, body) = response.into_parts();
            let held = parts.extensions.remove::<HeldSlot>().and_then(|h| h.take());
            Ok(http::Response::from_parts(parts, Answer::new(body, held)))
        })
    }
}

/// An answer's body: handed to hyper in pieces, holding its budget (and its deadline) until
/// hyper has taken all of it or the stream ends.
pub struct Answer {
    inner: tonic::body::Body,
    rest: Bytes,
    /// The budget and the deadline's key in the connection's table.
    held: Option<(Held, (Instant, u64))>,
}

impl Answer {
    fn new(inner: tonic::body::Body, held: Option<Held>) -> Answer {
        let held = held.map(|h| {
            let at = Instant::now() + transfer_time(h.bytes);
            let id = {
                let mut s = h.conn.lock();
                let id = s.next_id;
                s.next_id += 1;
                s.deadlines.insert((at, id), ());
                id
            };
            h.conn.changed.notify_one();
            (h, (at, id))
        });
        Answer {
            inner,
            rest: Bytes::new(),
            held,
        }
    }

    fn piece(&mut self) -> Bytes {
        let n = self.rest.len().min(PIECE_BYTES);
        self.rest.split_to(n)
    }

    /// The whole answer is hyper's (or the stream is gone): its budget and deadline go.
    fn release(&mut self) {
        if let Some((h, key)) = self.held.take() {
            h.conn.lock().deadlines.remove(&key);
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.release();
    }
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let me = self.get_mut();
        if !me.rest.is_empty() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(me.piece()))));
        }
        match Pin::new(&mut me.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    me.rest = data;
                    Poll::Ready(Some(Ok(http_body::Frame::data(me.piece()))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(None) => {
                me.release();
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut h = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        h.set_lower(h.lower() + rest);
        if let Some(u) = h.upper() {
            h.set_upper(u + rest);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    //! Clients that do not take their answers, over in-memory sockets in paused time; the
    //! connection cap over a real Unix socket.

    use super::*;
    use prost::Message;
    use shadowcache_proto as pb;

    /// A node with one mutable disk `d` of 4 MiB (byte `i / 4096`), and its directory.
    async fn node() -> (Arc<crate::Node>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("d.raw");
        let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096) as u8).collect();
        std::fs::write(&img, bytes).expect("image");
        let flags =
            crate::nbd::testing::flags(dir.path(), "conn", vec![format!("d={}", img.display())]);
        let config = crate::Config::from_flags(&flags).expect("config");
        (crate::Node::open(config).await.expect("node"), dir)
    }

    /// Serves the client services of `node` on the sockets sent to the returned sender.
    fn serve(node: Arc<crate::Node>) -> tokio::sync::mpsc::Sender<Io<tokio::io::DuplexStream>> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let incoming = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|io| (Ok::<_, io::Error>(io), rx))
        });
        tokio::spawn(
            crate::frontend::grpc::router(node, true)
                .serve_with_incoming_shutdown(incoming, std::future::pending()),
        );
        tx
    }

    /// A Block.Read of `len` bytes at `offset` of `d`, sent on `send`.
    fn read(
        send: &mut h2::client::SendRequest<Bytes>,
        offset: u64,
        len: u64,
    ) -> h2::client::ResponseFuture {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://node/shadowcache.v1.Block/Read")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let (response, mut body) = send.send_request(request, false).expect("send");
        let msg = pb::ReadRequest {
            disk: "d".into(),
            offset,
            length: len,
        }
        .encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(&msg);
        body.send_data(framed.into(), true).expect("body");
        response
    }

    /// The bytes of a whole Read answer, taken as they come.
    async fn answer(response: h2::client::ResponseFuture) -> Result<Vec<u8>, h2::Error> {
        let mut body = response.await?.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert!(got.len() >= 5, "no gRPC message in the answer");
        let msg = pb::ReadResponse::decode(&got[5..]).expect("ReadResponse");
        Ok(msg.data.to_vec())
    }

    fn expected(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(|i| (i / 4096) as u8).collect()
    }

    /// Waits (in paused time) until `cond` holds, at most `within`.
    async fn until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    /// A socket whose reads stop once `frozen` is set.
    struct Deaf {
        inner: tokio::io::DuplexStream,
        frozen: Arc<std::sync::atomic::AtomicBool>,
    }
    impl AsyncRead for Deaf {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
                return Poll::Pending;
            }
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for Deaf {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// Before: a client that opened no HTTP/2 window held its answers' bytes for ever, and
    /// with them the budget of every other client. Now an answer must be taken within its
    /// transfer time, or its connection ends and gives the budget back.
    #[tokio::test(start_paused = true)]
    async fn answers_a_client_never_takes_are_dropped_with_its_connection_after_their_transfer_time()
     {
        let (node, _dir) = node().await;
        let limits = Limits::new("test", 2 << 20, 2 << 20, 8);
        let tx = serve(node);

        let (hostile, server) = tokio::io::duplex(1 << 20);
        let io = limits.admit(server).await;
        let conn = io.conn().clone();
        tx.send(io).await.expect("served");
        let (mut send, driver) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(hostile)
            .await
            .expect("handshake");
        let driver = tokio::spawn(driver);
        let start = Instant::now();
        let taken = [
            read(&mut send, 0, 1 << 20),
            read(&mut send, 1 << 20, 1 << 20),
        ];
        assert!(
            until(Duration::from_secs(5), || limits.budget_left() == 0).await,
            "the two answers do not hold the budget: {} left",
            limits.budget_left()
        );

        // An honest client waits for budget while the answers are held...
        let (honest, server) = tokio::io::duplex(1 << 20);
        tx.send(limits.admit(server).await).await.expect("served");
        let (mut send2, driver2) = h2::client::handshake(honest).await.expect("handshake");
        tokio::spawn(driver2);
        let got = tokio::spawn(answer(read(&mut send2, 8192, 4096)));
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!got.is_finished(), "served past a budget that was all held");
        assert_eq!(conn.closed_by_node(), None);

        // ...until the hostile connection is closed, at the answers' transfer time.
        let got = tokio::time::timeout(Duration::from_secs(20), got)
            .await
            .expect("the honest read was never served")
            .expect("task")
            .expect("answer");
        assert_eq!(got, expected(8192, 4096));
        let waited = start.elapsed();
        assert!(
            waited >= transfer_time(1 << 20)
                && waited < transfer_time(1 << 20) + Duration::from_secs(5),
            "served after {waited:?}"
        );
        assert_eq!(conn.closed_by_node(), Some("answer_not_taken"));
        for t in taken {
            assert!(answer(t).await.is_err(), "a dropped answer arrived");
        }
        assert!(until(Duration::from_secs(1), || driver.is_finished()).await);
        assert!(until(Duration::from_secs(1), || limits.budget_left() == 2 << 20).await);
    }

    /// A client that opens its window wide and then reads nothing off its socket: the node's
    /// writes block, and the connection ends after [`STALLED_WRITE`] with all it held.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_off_its_socket_is_closed_after_the_stall_time() {
        let (node, _dir) = node().await;
        let limits = Limits::new("test", 64 << 20, 64 << 20, 8);
        let tx = serve(node);
        let (client, server) = tokio::io::duplex(64 << 10);
        let io = limits.admit(server).await;
        let conn = io.conn().clone();
        tx.send(io).await.expect("served");
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut send, driver) = h2::client::Builder::new()
            .initial_window_size(1 << 30)
            .initial_connection_window_size(1 << 30)
            .handshake::<_, Bytes>(Deaf {
                inner: client,
                frozen: frozen.clone(),
            })
            .await
            .expect("handshake");
        let driver = tokio::spawn(driver);
        // One answer read whole: the connection works.
        let got = answer(read(&mut send, 0, 8192)).await.expect("answer");
        assert_eq!(got, expected(0, 8192));
        frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        let start = Instant::now();
        let _pending = [
            read(&mut send, 0, 2 << 20),
            read(&mut send, 2 << 20, 2 << 20),
        ];
        assert!(
            until(Duration::from_secs(5), || limits.budget_left() < 64 << 20).await,
            "the answers hold no budget"
        );
        tokio::time::sleep(STALLED_WRITE - Duration::from_secs(5)).await;
        assert_eq!(conn.closed_by_node(), None, "closed before the stall time");
        assert!(
            until(Duration::from_secs(10), || conn.closed_by_node().is_some()).await,
            "a client that took nothing for {:?} is still served",
            start.elapsed()
        );
        assert_eq!(conn.closed_by_node(), Some("stalled_socket"));
        assert!(
            until(Duration::from_secs(1), || limits.budget_left() == 64 << 20).await,
            "the closed connection's budget was not given back: {} left",
            limits.budget_left()
        );
        drop(driver);
    }

    /// At most `cap` connections of a listener kind are served at once; the next is served
    /// when one ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listener_serves_at_most_its_cap_of_connections() {
        let (node, dir) = node().await;
        let limits = Limits::new("test", 64 << 20, 64 << 20, 2);
        let path = dir.path().join("cap.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(
            crate::frontend::grpc::router(node, true)
                .serve_with_incoming_shutdown(limits.incoming(listener), std::future::pending()),
        );
        async fn client(
            path: &std::path::Path,
        ) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .expect("connect");
            let (send, driver) = h2::client::handshake(s).await.expect("handshake");
            (
                send,
                tokio::spawn(async move {
                    let _ = driver.await;
                }),
            )
        }
        let mut first = client(&path).await;
        let mut second = client(&path).await;
        for c in [&mut first, &mut second] {
            let got = answer(read(&mut c.0, 0, 4096)).await.expect("answer");
            assert_eq!(got, expected(0, 4096));
        }
        assert_eq!(limits.connections_left(), 0);
        let mut third = client(&path).await;
        let waiting = tokio::spawn(answer(read(&mut third.0, 4096, 4096)));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !waiting.is_finished(),
            "a connection past the cap was served"
        );
        // The first client goes: the third is accepted and served.
        first.1.abort();
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the third connection was never served")
            .expect("task")
            .expect("answer");
        assert_eq!(got, expected(4096, 4096));
    }

    /// A client that went silent (a host that lost power: no FIN, no answer to pings) frees
    /// its connection's place within the keepalive's interval and timeout: under a cap, such
    /// connections would otherwise add up until no one is served.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_frees_its_place() {
        let (node, _dir) = node().await;
        let limits = Limits::new("test", 64 << 20, 64 << 20, 8);
        let tx = serve(node);
        let (client, server) = tokio::io::duplex(64 << 10);
        tx.send(limits.admit(server).await).await.expect("served");
        assert_eq!(limits.connections_left(), 7);
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut send, driver) = h2::client::handshake(Deaf {
            inner: client,
            frozen: frozen.clone(),
        })
        .await
        .expect("handshake");
        let _driver = tokio::spawn(driver);
        let got = answer(read(&mut send, 0, 4096)).await.expect("answer");
        assert_eq!(got, expected(0, 4096));
        frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        assert_eq!(
            limits.connections_left(),
            7,
            "closed before the ping was due"
        );
        assert!(
            until(KEEPALIVE_TIMEOUT + Duration::from_secs(10), || limits
                .connections_left()
                == 8)
            .await,
            "a client that answers no ping still holds its place"
        );
    }
}
