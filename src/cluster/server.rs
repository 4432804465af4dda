//! server: the HTTP listener of `/internal/fill`, `/healthz`, `/readyz` and `/metrics`.
//!
//! Owns the serving end of the RPC: checks the signature, the key and that this host coordinates
//! the chunk, then streams a local fill. Must not touch the peer set (it asks
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
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::stats::Stats;
use super::wire::{parse_fill_query, FILL_PATH};
use super::{auth, Cluster, ClusterError, LocalFills, Observe};
use crate::cachestore::ChunkStream;
use crate::chunk::ChunkKey;

/// The error that ends a response body early (hyper then cuts the connection).
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
        },
    )
    .await
}

pub(crate) struct App {
    pub cluster: Option<(Arc<Cluster>, Arc<dyn LocalFills>)>,
    pub observe: Arc<dyn Observe>,
}

pub(crate) async fn bind(addr: &str, app: App) -> Result<ServerHandle, ClusterError> {
    let bind_err = |source| ClusterError::Bind {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let (stop, mut stopped) = watch::channel(false);
    let app = Arc::new(app);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        let _ = tcp.set_nodelay(true);
                        conns.spawn(serve_connection(app.clone(), tcp, remote));
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

async fn serve_connection(app: Arc<App>, tcp: tokio::net::TcpStream, remote: SocketAddr) {
    let service = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req, remote)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tcp), service);
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

/// Last time an auth failure was logged (unix seconds): one line per 10 s at most.
static LAST_AUTH_LOG: AtomicU64 = AtomicU64::new(0);

impl App {
    fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> Response<ResponseBody> {
        let path = req.uri().path();
        let known = matches!(path, "/healthz" | "/readyz" | "/metrics" | FILL_PATH);
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

/// `GET /internal/fill`: check the signature, the key and that we coordinate it, then stream.
fn fill(
    cluster: &Arc<Cluster>,
    fills: &Arc<dyn LocalFills>,
    req: &Request<Incoming>,
    remote: SocketAddr,
) -> Response<ResponseBody> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("");
    let header = req.headers().get(auth::HEADER).map(|v| v.as_bytes());
    if let Err(why) = auth::verify(
        cluster.secret().bytes(),
        req.method().as_str(),
        path_and_query,
        header,
        auth::now_unix(),
    ) {
        cluster.stats().auth_failures.inc();
        let now = auth::now_unix();
        let last = LAST_AUTH_LOG.load(Ordering::Relaxed);
        if now >= last + 10
            && LAST_AUTH_LOG
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%remote, reason = %why, "refused an internal request: bad credentials");
        }
        return empty(StatusCode::UNAUTHORIZED);
    }
    let Some(key) = parse_fill_query(req.uri().query().unwrap_or("")) else {
        return text(StatusCode::BAD_REQUEST, "bad chunk key\n");
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
    if req.method() == Method::HEAD {
        let mut r = empty(StatusCode::OK);
        r.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(len));
        return r;
    }
    let body = FillBody::new(
        fills.stream_local(key.clone()),
        key,
        cluster.stats().clone(),
    );
    let mut r = Response::new(body.boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
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
