//! The HTTP side: accept loop, and the hyper service that counts requests,
//! injects GetObject faults and forwards to s3s.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::HttpError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::body::{BodyFaults, OriginBody};
use crate::classify::{classify, RequestKind};
use crate::faults::{Faults, GetPlan};
use crate::stats::Stats;
use crate::{ACCESS_KEY, SECRET_KEY};

/// Everything a request handler needs.
pub(crate) struct Shared {
    pub s3: S3Service,
    /// The s3s-fs root (for the ETags listings leave out).
    pub root: PathBuf,
    pub stats: Arc<Stats>,
    pub faults: Arc<Faults>,
    pub synthetic: Arc<crate::synthetic::Synthetic>,
    /// Held exclusively by each PUT and DELETE while s3s-fs handles it, shared by every other
    /// request until its answer's head: S3 changes an object atomically, s3s-fs does not.
    /// It checks that a file exists, then opens or removes it, so a request racing a DELETE of
    /// its key could answer 500 where S3 answers 200, 204 or 404; and a PUT renames the new
    /// data into place before it stores the new ETag, so a GET or HEAD racing it could answer
    /// the new bytes or size with the old ETag (a reader pinned to the old version would take
    /// them as its own).
    pub writes: tokio::sync::RwLock<()>,
}

/// The s3s-fs service over `root`, with SigV4 auth for the fixed test keys.
pub(crate) fn s3_service(root: &Path) -> io::Result<S3Service> {
    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| io::Error::other(format!("s3s-fs over {}: {e:?}", root.display())))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    Ok(builder.build())
}

/// Accepts connections until `shutdown` fires (or its sender is dropped).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _peer)) => {
                    tokio::spawn(serve_connection(socket, Arc::clone(&shared)));
                }
                Err(e) => {
                    // Typically EMFILE; back off instead of spinning.
                    eprintln!("orcafs-devorigin: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_connection(socket: TcpStream, shared: Arc<Shared>) {
    // Best effort: latency matters for benchmarks, correctness does not depend on it.
    let _ = socket.set_nodelay(true);
    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
    // Connection errors (client hang-ups, injected cuts) are expected here.
    let _ = ConnBuilder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(socket), service)
        .await;
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<OriginBody>, HttpError> {
    let kind = classify(req.method(), req.uri());
    shared.stats.count_request(kind);
    let req = req.map(s3s::Body::from);
    if kind == RequestKind::GetObject {
        return handle_get_object(&shared, req).await;
    }
    if matches!(kind, RequestKind::HeadObject | RequestKind::List) {
        pause(shared.faults.meta_delay()).await;
    }
    let (_writing, _reading);
    if req.method() == http::Method::DELETE || kind == RequestKind::Put {
        _writing = shared.writes.write().await;
    } else {
        _reading = shared.writes.read().await;
    }
    let bucket = bucket_of(req.uri().path());
    if kind == RequestKind::List {
        let query = req.uri().query().unwrap_or_default();
        if let Some(page) = shared.synthetic.page(&bucket, query) {
            return Ok(page);
        }
    }
    let resp = shared.s3.call(req).await?;
    if kind == RequestKind::List && resp.status().is_success() {
        return list_with_etags(&shared, &bucket, resp).await;
    }
    Ok(resp.map(OriginBody::passthrough))
}

/// The bucket of a path-style request.
fn bucket_of(path: &str) -> String {
    path.trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

async fn list_with_etags(
    shared: &Shared,
    bucket: &str,
    resp: Response<s3s::Body>,
) -> Result<Response<OriginBody>, HttpError> {
    let (mut parts, mut body) = resp.into_parts();
    let xml = match body.store_all_limited(64 << 20).await {
        Ok(b) => b,
        Err(e) => return Err(HttpError::new(e)),
    };
    let xml = crate::listing::with_etags(&shared.root, bucket, &String::from_utf8_lossy(&xml));
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(xml.len()));
    Ok(Response::from_parts(
        parts,
        OriginBody::fixed(Bytes::from(xml)),
    ))
}

/// Sleeps for an injected latency; not at all when there is none.
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

async fn handle_get_object(
    shared: &Shared,
    req: Request<s3s::Body>,
) -> Result<Response<OriginBody>, HttpError> {
    let _in_flight = shared.stats.get_in_flight();
    pause(shared.faults.get_delay()).await;
    let (cut, stall, shift) = match shared.faults.plan_get() {
        GetPlan::Fail(status) => return Ok(fault_response(status, req.uri().path())),
        GetPlan::Serve { cut, stall, shift } => (cut, stall, shift),
    };
    let path = req.uri().path().to_owned();
    // Only now: a delayed GET must not hold up writes while it sleeps.
    let reading = shared.writes.read().await;
    let resp = shared.s3.call(req).await?;
    drop(reading);
    if !resp.status().is_success() {
        return Ok(resp.map(OriginBody::passthrough));
    }
    if shift > 0 {
        if let Some(moved) = shifted(&shared.root, &path, resp.headers(), shift) {
            return Ok(moved);
        }
    }
    let faults = BodyFaults {
        cut_at: cut.then(|| content_length(&resp) / 2),
        stall,
    };
    let stats = Arc::clone(&shared.stats);
    Ok(resp.map(|body| OriginBody::metered(body, stats, faults)))
}

/// The answer of a gateway that serves another range than the one asked for: the response's
/// headers (its ETag) with the bytes `by` further on in the object's file, and a Content-Range
/// that says so. (The request itself cannot be changed: its Range header is signed.) None when
/// the response is not a range or the shifted one would pass the object's end.
fn shifted(
    root: &Path,
    path: &str,
    headers: &http::HeaderMap,
    by: u64,
) -> Option<Response<OriginBody>> {
    let range = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (span, total) = range.strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b, total) = (
        a.parse::<u64>().ok()? + by,
        b.parse::<u64>().ok()? + by,
        total.parse::<u64>().ok()?,
    );
    if b >= total {
        return None;
    }
    let file = std::fs::File::open(root.join(path.trim_start_matches('/'))).ok()?;
    let mut bytes = vec![0u8; (b - a + 1) as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, a).ok()?;
    let mut resp = Response::new(OriginBody::fixed(Bytes::from(bytes)));
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    *resp.headers_mut() = headers.clone();
    let moved = HeaderValue::from_str(&format!("bytes {a}-{b}/{total}")).ok()?;
    resp.headers_mut().insert(header::CONTENT_RANGE, moved);
    Some(resp)
}

fn content_length<B>(resp: &Response<B>) -> u64 {
    resp.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An S3-style XML error response for an injected failure.
pub(crate) fn fault_response(status: StatusCode, resource: &str) -> Response<OriginBody> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let request_id = format!(
        "devorigin-fault-{}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><Resource>{resource}</Resource>\
         <RequestId>{request_id}</RequestId></Error>",
        code = error_code(status),
        message = "Fault injected by orcafs-devorigin",
        resource = xml_escape(resource),
    );
    let mut resp = Response::new(OriginBody::fixed(Bytes::from(xml.clone())));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(xml.len()));
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        headers.insert("x-amz-request-id", id);
    }
    resp
}

/// The S3 error code S3 itself uses for a status, as close as it gets.
fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "InvalidRequest",
        403 => "AccessDenied",
        404 => "NoSuchKey",
        412 => "PreconditionFailed",
        416 => "InvalidRange",
        429 | 503 => "SlowDown",
        500 => "InternalError",
        501 => "NotImplemented",
        _ => "InjectedFault",
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}
