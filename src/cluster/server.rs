//! server: the listener of `/internal/fill`, `/healthz`, `/readyz` and `/metrics`: TLS for a
//! cluster member, plain HTTP for `--metrics-addr`.
//!
//! Owns the serving end of the RPC: caps connections, completes the TLS handshake within
//! [`HANDSHAKE_TIMEOUT`], checks the signature (once only: replays are refused), the key (this
//! host's chunk size, an object size S3 can hold) and that this host coordinates the chunk, then
//! streams a local fill with the secret's proof. Must not touch the peer set (it asks
//! [`Cluster::coordinator_for`]) nor forward a request to another peer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::stats::Stats;
use super::wire::{
    parse_fill_query, parse_from, parse_meta_query, BYE_PATH, FILL_PATH, HELLO_PATH, META_PATH,
};
use super::{auth, Cluster, ClusterError, LocalFills, Observe};
use crate::cachestore::ChunkStream;
use crate::chunk::ChunkKey;

/// The error that ends a response body early (hyper then cuts the connection).
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The largest object S3 stores: a key for a larger one is no request of a real reader.
pub const MAX_OBJECT_SIZE: u64 = 5 << 40;
/// A connection that has not finished its TLS handshake by then is closed (it holds a slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the metrics-only listener holds at once.
const METRICS_ONLY_MAX_CONNECTIONS: usize = 64;

/// A running listener. Dropping it (or [`ServerHandle::shutdown`]) stops accepting and closes
/// the connections.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// The address actually bound (the port, when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and waits until its connections are closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A metrics-only endpoint (`--metrics-addr`) for a host without `[cluster]`: `/healthz`,
/// `/readyz` and `/metrics`, no `/internal`.
pub async fn serve_metrics_only(
    addr: &str,
    observe: Arc<dyn Observe>,
) -> Result<ServerHandle, ClusterError> {
    bind(
        addr,
        App {
            cluster: None,
            observe,
            tls: None,
            max_connections: METRICS_ONLY_MAX_CONNECTIONS,
        },
    )
    .await
}

pub(crate) struct App {
    pub cluster: Option<(Arc<Cluster>, Arc<dyn LocalFills>)>,
    pub observe: Arc<dyn Observe>,
    /// TLS for every connection (a cluster member); None serves plain HTTP (metrics only).
    pub tls: Option<TlsAcceptor>,
    pub max_connections: usize,
}

pub(crate) async fn bind(addr: &str, app: App) -> Result<ServerHandle, ClusterError> {
    let bind_err = |source| ClusterError::Bind {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let (stop, mut stopped) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(app.max_connections));
    let app = Arc::new(app);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            app.refuse_connection(remote);
                            continue; // dropping `tcp` closes it
                        };
                        let _ = tcp.set_nodelay(true);
                        conns.spawn(serve_connection(app.clone(), tcp, remote, slot));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: don't spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
    });
    tracing::info!(addr = %local, "cluster/metrics listener bound");
    Ok(ServerHandle {
        addr: local,
        stop,
        task,
    })
}

/// Last time a refused connection or failed handshake was logged (unix seconds).
static LAST_CONN_LOG: AtomicU64 = AtomicU64::new(0);

/// Whether a warning may be logged now: one line per 10 s at most per `last`, so that a flood
/// does not flood the log too.
fn may_log(last: &AtomicU64) -> bool {
    let now = auth::now_unix();
    let then = last.load(Ordering::Relaxed);
    now >= then + 10
        && last
            .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Counts a connection as open while it lives.
struct OpenConnection(Option<Gauge>);

impl OpenConnection {
    fn new(stats: Option<&Arc<Stats>>) -> OpenConnection {
        let gauge = stats.map(|s| s.connections.clone());
        if let Some(g) = &gauge {
            g.inc();
        }
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

impl App {
    fn stats(&self) -> Option<&Arc<Stats>> {
        self.cluster.as_ref().map(|(c, _)| c.stats())
    }

    fn refuse_connection(&self, remote: SocketAddr) {
        if let Some(stats) = self.stats() {
            stats.connections_refused.inc();
        }
        if may_log(&LAST_CONN_LOG) {
            tracing::warn!(%remote, max = self.max_connections, "connection refused: the listener holds max_connections");
        }
    }
}

async fn serve_connection(
    app: Arc<App>,
    tcp: TcpStream,
    remote: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    let _open = OpenConnection::new(app.stats());
    let Some(acceptor) = app.tls.clone() else {
        return serve_http(app, tcp, remote).await;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => serve_http(app, tls, remote).await,
        failed => {
            if let Some(stats) = app.stats() {
                stats.inbound_tls_failures.inc();
            }
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            };
            tracing::debug!(%remote, error = %why, "TLS handshake failed");
        }
    }
}

async fn serve_http<I>(app: Arc<App>, io: I, remote: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req, remote)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A refusal with no body bytes at all.
fn empty(status: StatusCode) -> Response<ResponseBody> {
    let mut r = Response::new(
        http_body_util::Empty::new()
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

/// Last time an auth failure was logged (unix seconds).
static LAST_AUTH_LOG: AtomicU64 = AtomicU64::new(0);
/// Last time a refused fill key was logged (unix seconds).
static LAST_REFUSAL_LOG: AtomicU64 = AtomicU64::new(0);

impl App {
    fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> Response<ResponseBody> {
        let path = req.uri().path();
        let known = matches!(
            path,
            "/healthz" | "/readyz" | "/metrics" | FILL_PATH | HELLO_PATH | BYE_PATH | META_PATH
        );
        if known && req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readyz(),
            "/metrics" => self.metrics(),
            FILL_PATH => match &self.cluster {
                Some((cluster, fills)) => fill(cluster, fills, &req, remote),
                None => text(StatusCode::NOT_FOUND, "not a cluster member\n"),
            },
            META_PATH => match &self.cluster {
                Some((cluster, _)) => meta(cluster, &req, remote),
                None => text(StatusCode::NOT_FOUND, "not a cluster member\n"),
            },
            HELLO_PATH | BYE_PATH => match &self.cluster {
                Some((cluster, _)) => announced(cluster, &req, remote, path == HELLO_PATH),
                None => text(StatusCode::NOT_FOUND, "not a cluster member\n"),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn readyz(&self) -> Response<ResponseBody> {
        if !self.observe.ready() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "not ready: not mounted\n");
        }
        if let Some((cluster, _)) = &self.cluster {
            if !cluster.peer_set_known() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: peer set not known yet\n",
                );
            }
        }
        text(StatusCode::OK, "ready\n")
    }

    fn metrics(&self) -> Response<ResponseBody> {
        let mut body = self.observe.metrics_text();
        if !body.is_empty() && !body.ends_with('\n') {
            body.push('\n');
        }
        if let Some((cluster, _)) = &self.cluster {
            body.push_str(&cluster.metrics_text());
        }
        let mut r = text(StatusCode::OK, body);
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
        r
    }
}

/// The signature of an internal request that verified (once), and the proof of life of the
/// member it names; None (answer 401) otherwise.
fn admit(cluster: &Cluster, req: &Request<Incoming>, remote: SocketAddr) -> Option<String> {
    match authenticate(cluster, req) {
        Ok(signature) => {
            if let Some(from) = parse_from(req.uri().query().unwrap_or("")) {
                cluster.note_contact(&from);
            }
            Some(signature)
        }
        Err(why) => {
            cluster.stats().auth_failures.inc();
            if why == auth::AuthFailure::Replayed {
                cluster.stats().replays_refused.inc();
            }
            if may_log(&LAST_AUTH_LOG) {
                tracing::warn!(%remote, reason = %why, "refused an internal request: bad credentials");
            }
            None
        }
    }
}

/// Adds the proof that this answer comes from a holder of the secret.
fn prove(cluster: &Cluster, signature: &str, r: &mut Response<ResponseBody>) {
    let proof = auth::response_proof(cluster.secret().bytes(), signature);
    if let Ok(v) = HeaderValue::from_str(&proof) {
        r.headers_mut().insert(auth::PROOF_HEADER, v);
    }
}

/// `GET /internal/hello` or `/internal/bye`: a member started, or stops cleanly.
fn announced(
    cluster: &Cluster,
    req: &Request<Incoming>,
    remote: SocketAddr,
    hello: bool,
) -> Response<ResponseBody> {
    let Some(signature) = admit(cluster, req, remote) else {
        return empty(StatusCode::UNAUTHORIZED);
    };
    if !hello {
        if let Some(from) = parse_from(req.uri().query().unwrap_or("")) {
            cluster.note_leaving(&from);
        }
    }
    let mut r = text(StatusCode::OK, "ok\n");
    prove(cluster, &signature, &mut r);
    r
}

/// `GET /internal/meta`: a LIST page or HEAD this host coordinates, answered from its cache or
/// its origin (never forwarded).
fn meta(
    cluster: &Arc<Cluster>,
    req: &Request<Incoming>,
    remote: SocketAddr,
) -> Response<ResponseBody> {
    let Some(signature) = admit(cluster, req, remote) else {
        return empty(StatusCode::UNAUTHORIZED);
    };
    let Some(local) = cluster.local_meta().cloned() else {
        return text(StatusCode::NOT_FOUND, "no metadata service\n");
    };
    let query = parse_meta_query(req.uri().query().unwrap_or(""));
    let Some((query, name)) = query.and_then(|q| local.name_of(&q).map(|n| (q, n))) else {
        return text(StatusCode::BAD_REQUEST, "bad metadata query\n");
    };
    if let Some(other) = cluster.coordinator_for_name(&name) {
        cluster.stats().not_coordinator_sent.inc();
        return text(
            StatusCode::CONFLICT,
            format!("not the coordinator; {other} is\n"),
        );
    }
    // The answer may need the origin: the body waits for it; a failure cuts the body, which
    // the asking host takes as a failed answer (and asks the origin itself).
    let answer = local.answer(query);
    let body = http_body_util::StreamBody::new(futures::stream::once(async move {
        answer.await.map(Frame::data).map_err(BoxError::from)
    }));
    let mut r = Response::new(body.boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    prove(cluster, &signature, &mut r);
    r
}

/// `GET /internal/fill`: check the signature (once), the key and that we coordinate it, then
/// stream.
fn fill(
    cluster: &Arc<Cluster>,
    fills: &Arc<dyn LocalFills>,
    req: &Request<Incoming>,
    remote: SocketAddr,
) -> Response<ResponseBody> {
    let Some(signature) = admit(cluster, req, remote) else {
        return empty(StatusCode::UNAUTHORIZED);
    };
    let key = match checked_key(req.uri().query().unwrap_or(""), fills.chunk_size()) {
        Ok(key) => key,
        Err((reason, why)) => {
            cluster.stats().refused(reason);
            if may_log(&LAST_REFUSAL_LOG) {
                tracing::warn!(%remote, reason, "refused a fill request before any work");
            }
            return text(StatusCode::BAD_REQUEST, why);
        }
    };
    if let Some(other) = cluster.coordinator_for(&key.id()) {
        cluster.stats().not_coordinator_sent.inc();
        tracing::debug!(%remote, ?key, coordinator = %other, "not the coordinator: 409");
        return text(
            StatusCode::CONFLICT,
            format!("not the coordinator; {other} is\n"),
        );
    }
    tracing::debug!(%remote, ?key, "serving a fill to a peer");
    let len = key.len();
    let mut r = if req.method() == Method::HEAD {
        empty(StatusCode::OK)
    } else {
        let body = FillBody::new(
            fills.stream_local(key.clone()),
            key,
            cluster.stats().clone(),
        );
        let mut r = Response::new(body.boxed_unsync());
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        r
    };
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    prove(cluster, &signature, &mut r);
    r
}

/// The request's signature header, once it verified and was not seen before.
fn authenticate(cluster: &Cluster, req: &Request<Incoming>) -> Result<String, auth::AuthFailure> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("");
    let header = req.headers().get(auth::HEADER);
    let now = auth::now_unix();
    let verified = auth::verify(
        cluster.secret().bytes(),
        req.method().as_str(),
        path_and_query,
        header.map(|v| v.as_bytes()),
        now,
    )?;
    cluster.replays().first_use(verified, now)?;
    // It verified, so it is ASCII.
    let header = header.and_then(|v| v.to_str().ok()).unwrap_or_default();
    Ok(header.to_string())
}

/// The chunk key of a fill request, if it is one this host would ever read: `Err((reason for
/// the counter, text for the peer))` otherwise.
fn checked_key(query: &str, chunk_size: u64) -> Result<ChunkKey, (&'static str, String)> {
    let key = parse_fill_query(query).ok_or(("bad_key", "bad chunk key\n".to_string()))?;
    if key.chunk_size != chunk_size {
        return Err((
            "chunk_size",
            format!(
                "chunk size {} is not this host's {chunk_size}; set the same chunk_size on every host\n",
                key.chunk_size
            ),
        ));
    }
    if key.object.size > MAX_OBJECT_SIZE {
        return Err((
            "object_size",
            format!(
                "object size {} is larger than any S3 object\n",
                key.object.size
            ),
        ));
    }
    Ok(key)
}

/// Decrements the gauge when the body is dropped, finished or not.
struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A local fill stream as a response body of exactly the chunk's length. A stream that fails,
/// ends short or runs long ends the body with an error: hyper then closes the connection, and
/// the peer sees a short body.
struct FillBody {
    stream: ChunkStream,
    key: ChunkKey,
    remaining: u64,
    /// Ended, with all bytes or an error: the stream is not polled again.
    done: bool,
    stats: Arc<Stats>,
    _in_flight: InFlight,
}

impl FillBody {
    fn new(stream: ChunkStream, key: ChunkKey, stats: Arc<Stats>) -> FillBody {
        stats.fills_serving.inc();
        FillBody {
            stream,
            remaining: key.len(),
            done: key.is_empty(),
            key,
            _in_flight: InFlight(stats.fills_serving.clone()),
            stats,
        }
    }
}

impl Body for FillBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            let next = futures::ready!(this.stream.poll_next_unpin(cx));
            if !matches!(next, Some(Ok(ref p)) if p.len() as u64 <= this.remaining) {
                this.done = true;
            }
            return match next {
                Some(Ok(piece)) if piece.is_empty() => continue,
                Some(Ok(piece)) => {
                    let n = piece.len() as u64;
                    if n > this.remaining {
                        tracing::warn!(key = ?this.key, "local fill yielded more bytes than the chunk holds");
                        return Poll::Ready(Some(Err("local fill ran past the chunk".into())));
                    }
                    this.remaining -= n;
                    this.stats.fill_bytes_served.inc_by(n);
                    if this.remaining == 0 {
                        this.done = true;
                        this.stats.fills_served.inc();
                    }
                    Poll::Ready(Some(Ok(Frame::data(piece))))
                }
                Some(Err(e)) => {
                    tracing::warn!(key = ?this.key, error = %e, "local fill for a peer failed");
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                None => {
                    tracing::warn!(key = ?this.key, missing = this.remaining, "local fill for a peer ended short");
                    Poll::Ready(Some(Err("local fill ended short".into())))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
