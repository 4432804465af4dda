//! client: the signed fill request to a peer, its body as a checked stream, health checks.
//!
//! Owns the requesting end of the RPC, over the TLS connector of `tls`: a peer that fails the
//! handshake, or answers 200 without the secret's proof, gets none of its body read. Must not
//! touch the peer set (the caller decides whom to ask and what a failure means for the peer's
//! health).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::StatusCode;

use super::tls::ConnectError;
use super::wire::{fill_query, from_query, meta_query, FILL_PATH, META_PATH};
use super::{auth, stats::Stats, Cluster};
use crate::cachestore::{ChunkStream, StoreError};
use crate::chunk::ChunkKey;
use crate::peer::{PeerAddr, PeerError};

/// Sends the fill request; Ok(body) once the headers say 200 with the chunk's length and the
/// secret's proof.
pub(crate) async fn request_fill(
    cluster: &Cluster,
    peer: &PeerAddr,
    key: &ChunkKey,
) -> Result<Incoming, PeerError> {
    let path_and_query = format!(
        "{FILL_PATH}?{}&{}",
        fill_query(key),
        from_query(cluster.advertise())
    );
    let uri = format!("https://{peer}{path_and_query}");
    // Signed afresh for each attempt: the server accepts each signature once.
    let request = || {
        let signature = auth::sign(
            cluster.secret().bytes(),
            "GET",
            &path_and_query,
            auth::now_unix(),
        );
        let request = hyper::Request::get(uri.as_str())
            .header(auth::HEADER, signature.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| PeerError::Request(e.to_string()))?;
        Ok::<_, PeerError>((request, signature))
    };
    let timeout = cluster.tuning().peer_timeout;
    let send = async {
        let (req, mut signature) = request()?;
        let response = match cluster.http().request(req).await {
            // A pooled connection the peer had closed (it restarted, or timed it out) as we
            // sent: the GET is idempotent, so try once more on a fresh connection.
            Err(e) if closed_before_response(&e) => {
                let (req, again) = request()?;
                signature = again;
                cluster.http().request(req).await
            }
            other => other,
        };
        response
            .map(|r| (r, signature))
            .map_err(|e| classify(cluster, &e))
    };
    let (response, signature) = tokio::time::timeout(timeout, send)
        .await
        .map_err(|_| PeerError::Timeout(timeout))??;
    // On Err, dropping the response closes the connection: no byte of its body is read.
    check_answer(cluster, &response, &signature)?;
    let expected = key.len();
    let got = response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if got != Some(expected) {
        return Err(PeerError::BadLength { expected, got });
    }
    Ok(response.into_body())
}

/// A 200 that carries the secret's proof for the request signed with `signature`, else the
/// reason it is not one.
fn check_answer(
    cluster: &Cluster,
    response: &hyper::Response<Incoming>,
    signature: &str,
) -> Result<(), PeerError> {
    match response.status() {
        StatusCode::OK => {}
        StatusCode::CONFLICT => return Err(PeerError::NotCoordinator),
        StatusCode::UNAUTHORIZED => return Err(PeerError::Unauthorized),
        s => return Err(PeerError::Status(s.as_u16())),
    }
    let proof = response
        .headers()
        .get(auth::PROOF_HEADER)
        .map(|v| v.as_bytes());
    if !auth::check_response_proof(cluster.secret().bytes(), signature, proof) {
        return Err(PeerError::Unauthenticated);
    }
    Ok(())
}

/// A failed request as a [`PeerError`]: a TLS handshake that failed is not a dead peer.
fn classify(cluster: &Cluster, e: &hyper_util::client::legacy::Error) -> PeerError {
    match connect_error(e) {
        Some(ConnectError::Handshake(_)) => {
            cluster.stats().tls_failures.inc();
            PeerError::Tls(error_chain(e))
        }
        Some(_) => PeerError::Connect(error_chain(e)),
        None if e.is_connect() => PeerError::Connect(error_chain(e)),
        None => PeerError::Request(error_chain(e)),
    }
}

/// The connector's own error inside hyper's, if the connection failed.
fn connect_error(e: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(ce) = c.downcast_ref::<ConnectError>() {
            return Some(ce);
        }
        cause = c.source();
    }
    None
}

/// The connection closed before any response: the request may be sent again. Over TLS a
/// pooled connection the peer dropped shows as an I/O error (EOF without close_notify, a
/// reset), not as hyper's incomplete message.
fn closed_before_response(e: &hyper_util::client::legacy::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted
            );
        }
        cause = c.source();
    }
    false
}

/// The error and its causes on one line (hyper's outer errors say little alone).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

struct BodyState {
    body: Incoming,
    got: u64,
    expected: u64,
    stall: Duration,
    peer: PeerAddr,
    stats: Arc<Stats>,
}

impl BodyState {
    fn fail(&self, msg: String) -> Option<(Result<Bytes, StoreError>, Option<BodyState>)> {
        self.stats.fallback("body");
        tracing::warn!(peer = %self.peer, got = self.got, expected = self.expected, error = %msg, "peer fill body failed");
        Some((Err(StoreError::Transient(msg)), None))
    }
}

/// The response body as a chunk stream that errs when it stalls, breaks, ends short or runs long.
pub(crate) fn body_stream(
    body: Incoming,
    expected: u64,
    stall: Duration,
    peer: PeerAddr,
    stats: Arc<Stats>,
) -> ChunkStream {
    let state = BodyState {
        body,
        got: 0,
        expected,
        stall,
        peer,
        stats,
    };
    Box::pin(futures::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        loop {
            let frame = match tokio::time::timeout(st.stall, st.body.frame()).await {
                Err(_) => {
                    let msg = format!(
                        "peer {} body stalled for {:?} after {} of {} bytes",
                        st.peer, st.stall, st.got, st.expected
                    );
                    return st.fail(msg);
                }
                Ok(None) if st.got == st.expected => {
                    st.stats.fills_received.inc();
                    return None;
                }
                Ok(None) => {
                    let msg = format!(
                        "peer {} body ended after {} of {} bytes",
                        st.peer, st.got, st.expected
                    );
                    return st.fail(msg);
                }
                Ok(Some(Err(e))) => {
                    let msg = format!(
                        "peer {} body broke after {} of {} bytes: {}",
                        st.peer,
                        st.got,
                        st.expected,
                        error_chain(&e)
                    );
                    return st.fail(msg);
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if data.is_empty() {
                continue;
            }
            st.got += data.len() as u64;
            if st.got > st.expected {
                let msg = format!(
                    "peer {} sent more than the {} bytes of the chunk",
                    st.peer, st.expected
                );
                return st.fail(msg);
            }
            st.stats.fill_bytes_received.inc_by(data.len() as u64);
            return Some((Ok(data), Some(st)));
        }
    }))
}

/// Largest metadata answer read from a peer (a LIST page of 1000 keys is a few hundred KiB).
const MAX_META_ANSWER: usize = 8 << 20;

/// Asks `peer` for its answer to a metadata query; Ok only for a 200 with the secret's proof
/// and a body within [`MAX_META_ANSWER`].
pub(crate) async fn request_meta(
    cluster: &Cluster,
    peer: &PeerAddr,
    query: &str,
) -> Result<Bytes, PeerError> {
    let path_and_query = format!("{META_PATH}?{}", meta_query(query, cluster.advertise()));
    let signature = auth::sign(
        cluster.secret().bytes(),
        "GET",
        &path_and_query,
        auth::now_unix(),
    );
    let request = hyper::Request::get(format!("https://{peer}{path_and_query}"))
        .header(auth::HEADER, signature.as_str())
        .body(Empty::new())
        .map_err(|e| PeerError::Request(e.to_string()))?;
    let timeout = cluster.tuning().peer_timeout;
    let ask = async {
        let response = cluster
            .http()
            .request(request)
            .await
            .map_err(|e| classify(cluster, &e))?;
        check_answer(cluster, &response, &signature)?;
        let body = http_body_util::Limited::new(response.into_body(), MAX_META_ANSWER)
            .collect()
            .await
            .map_err(|e| PeerError::Body(e.to_string()))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| PeerError::Timeout(timeout))?
}

/// Tells `peer` that this member has started (`HELLO_PATH`) or stops (`BYE_PATH`): a signed
/// request naming this host. True when the peer answered 200 with the secret's proof, which is
/// proof of life of the peer too.
pub(crate) async fn announce(cluster: &Cluster, peer: &PeerAddr, path: &str) -> bool {
    let path_and_query = format!("{path}?{}", from_query(cluster.advertise()));
    let signature = auth::sign(
        cluster.secret().bytes(),
        "GET",
        &path_and_query,
        auth::now_unix(),
    );
    let Ok(request) = hyper::Request::get(format!("https://{peer}{path_and_query}"))
        .header(auth::HEADER, signature.as_str())
        .body(Empty::new())
    else {
        return false;
    };
    let send = async {
        let response = cluster.http().request(request).await.ok()?;
        let ok = check_answer(cluster, &response, &signature).is_ok();
        response.into_body().collect().await.ok()?;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(cluster.tuning().health_timeout, send).await,
        Ok(Some(true))
    )
}

/// `GET /healthz` answered 200 within the health timeout, over an authenticated TLS connection.
pub(crate) async fn healthz(cluster: &Cluster, peer: &PeerAddr) -> bool {
    let Ok(request) = hyper::Request::get(format!("https://{peer}/healthz")).body(Empty::new())
    else {
        return false;
    };
    let check = async {
        let response = match cluster.http().request(request).await {
            Ok(r) => r,
            Err(e) => {
                if let PeerError::Tls(why) = classify(cluster, &e) {
                    tracing::debug!(%peer, error = %why, "peer health check: TLS failed");
                }
                return None;
            }
        };
        let ok = response.status() == StatusCode::OK;
        // Read the (tiny) body so that the connection goes back to the pool.
        response.into_body().collect().await.ok()?;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(cluster.tuning().health_timeout, check).await,
        Ok(Some(true))
    )
}
