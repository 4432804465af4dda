//! `orcafs-devorigin`: a real S3 protocol server on 127.0.0.1 for orcafs's
//! integration tests, demo and benchmarks.
//!
//! This crate owns:
//! - [`DevOrigin`], an s3s-fs server (objects are files `<root>/<bucket>/<key>`,
//!   SigV4 auth with [`ACCESS_KEY`]/[`SECRET_KEY`], path-style URLs) running on
//!   its own tokio runtime, usable from plain `#[test]` functions;
//! - [`Stats`], counters of requests and GetObject body bytes actually sent;
//! - [`Faults`], runtime fault injection on GetObject (error statuses, cut or
//!   stalled bodies, added latency);
//! - a hand-built SDK client for the server and blocking helpers for tests;
//! - the deterministic demo data tree ([`sample_objects`]).
//!
//! It does not own anything of orcafs itself.

mod body;
mod classify;
mod faults;
pub mod garage;
mod listing;
mod samples;
mod server;
mod stats;
mod synthetic;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use bytes::Bytes;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

pub use faults::Faults;
pub use garage::Garage;
pub use samples::{pseudo_random_bytes, sample_objects, SAMPLE_SEED};
pub use stats::{Stats, StatsSnapshot};

/// Access key the server accepts.
pub const ACCESS_KEY: &str = "orcafs-test-access";
/// Secret key the server accepts.
pub const SECRET_KEY: &str = "orcafs-test-secret";
/// Region the server and its client use.
pub const REGION: &str = "us-east-1";

/// How long Drop waits for in-flight blocking work (file I/O) to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running S3 server over a directory. Stops (and closes every connection)
/// on Drop.
pub struct DevOrigin {
    addr: SocketAddr,
    root: PathBuf,
    stats: Arc<Stats>,
    faults: Arc<Faults>,
    synthetic: Arc<synthetic::Synthetic>,
    runtime: Handle,
    helper: aws_sdk_s3::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server_thread: Option<JoinHandle<()>>,
}

impl DevOrigin {
    /// Serves `root` on 127.0.0.1 with an ephemeral port.
    pub fn start(root: &Path) -> io::Result<DevOrigin> {
        Self::start_on(root, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// Serves `root` (created if missing) on `addr`, which must be a loopback address.
    pub fn start_on(root: &Path, addr: SocketAddr) -> io::Result<DevOrigin> {
        ensure_loopback(addr)?;
        std::fs::create_dir_all(root)?;
        let s3 = server::s3_service(root)?;
        let root = root.canonicalize()?;
        let runtime = build_runtime()?;
        let listener = bind(&runtime, addr)?;
        let addr = listener.local_addr()?;

        let stats = Arc::new(Stats::default());
        let faults = Arc::new(Faults::default());
        let synthetic = Arc::new(synthetic::Synthetic::default());
        let shared = Arc::new(server::Shared {
            s3,
            root: root.clone(),
            stats: Arc::clone(&stats),
            faults: Arc::clone(&faults),
            synthetic: Arc::clone(&synthetic),
            writes: tokio::sync::RwLock::new(()),
        });
        let (shutdown, shutdown_rx) = oneshot::channel();
        let handle = runtime.handle().clone();
        let server_thread = std::thread::Builder::new()
            .name("devorigin-accept".into())
            .spawn(move || {
                runtime.block_on(server::accept_loop(listener, shared, shutdown_rx));
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            })?;

        Ok(DevOrigin {
            addr,
            root,
            stats,
            faults,
            synthetic,
            runtime: handle,
            helper: client_for(&endpoint_of(addr), ACCESS_KEY, SECRET_KEY),
            shutdown: Some(shutdown),
            server_thread: Some(server_thread),
        })
    }

    /// Makes `prefix` (ending in `/`) of `bucket` list `count` made-up empty keys, page by page,
    /// without storing them: a directory of millions of names for tests and benchmarks.
    pub fn synthesize_prefix(&self, bucket: &str, prefix: &str, count: u64) {
        self.synthetic.add(bucket, prefix, count);
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        endpoint_of(self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The (canonicalized) directory served; buckets are its subdirectories.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        self.stats.reset();
    }

    /// Fault injection switches (GetObject only).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// A new SDK client for this server: static test credentials, us-east-1,
    /// path-style, checksums only when required, default retries, no IMDS or
    /// environment lookups.
    pub fn client(&self) -> aws_sdk_s3::Client {
        client_for(&self.endpoint(), ACCESS_KEY, SECRET_KEY)
    }

    /// Creates `bucket`. Panics on error (test helper).
    pub fn create_bucket(&self, bucket: &str) {
        let req = self.helper.create_bucket().bucket(bucket);
        self.block_on(req.send())
            .unwrap_or_else(|e| panic!("create_bucket {bucket}: {}", DisplayErrorContext(e)));
    }

    /// Puts an object through the S3 API (so s3s-fs records its ETag).
    /// Panics on error (test helper).
    pub fn put_object(&self, bucket: &str, key: &str, body: impl Into<Bytes>) {
        let body: Bytes = body.into();
        let req = self
            .helper
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into());
        self.block_on(req.send())
            .unwrap_or_else(|e| panic!("put_object {bucket}/{key}: {}", DisplayErrorContext(e)));
    }

    /// Deletes an object. Panics on error (test helper).
    pub fn delete_object(&self, bucket: &str, key: &str) {
        let req = self.helper.delete_object().bucket(bucket).key(key);
        self.block_on(req.send())
            .unwrap_or_else(|e| panic!("delete_object {bucket}/{key}: {}", DisplayErrorContext(e)));
    }

    /// The object's ETag exactly as HeadObject returns it (with its quotes).
    /// Panics on error (test helper).
    pub fn head_etag(&self, bucket: &str, key: &str) -> String {
        let req = self.helper.head_object().bucket(bucket).key(key);
        let out = self
            .block_on(req.send())
            .unwrap_or_else(|e| panic!("head_object {bucket}/{key}: {}", DisplayErrorContext(e)));
        out.e_tag
            .unwrap_or_else(|| panic!("head_object {bucket}/{key}: no ETag in the response"))
    }

    /// Creates `bucket` if missing and puts the [`sample_objects`] tree into
    /// it. Panics on error (test/demo helper).
    pub fn seed_samples(&self, bucket: &str) {
        if !self.root.join(bucket).is_dir() {
            self.create_bucket(bucket);
        }
        for (key, body) in sample_objects() {
            self.put_object(bucket, key, body);
        }
    }

    /// Runs `fut` on the server's runtime and waits for it. Works from plain
    /// threads and from inside another tokio runtime alike.
    fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .expect("orcafs-devorigin: helper task died (panicked or the runtime shut down)")
    }
}

impl Drop for DevOrigin {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.server_thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for DevOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevOrigin")
            .field("addr", &self.addr)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn ensure_loopback(addr: SocketAddr) -> io::Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("orcafs-devorigin only listens on loopback addresses, not {addr}"),
    ))
}

fn build_runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("devorigin-worker")
        .enable_all()
        .build()
}

fn bind(runtime: &Runtime, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let _guard = runtime.enter();
    tokio::net::TcpListener::from_std(listener)
}

fn endpoint_of(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// An SDK client for any local test server: static credentials, path style, no IMDS, checksums
/// only where S3 requires them.
pub(crate) fn client_for(endpoint: &str, access_key: &str, secret_key: &str) -> aws_sdk_s3::Client {
    let creds = Credentials::new(access_key, secret_key, None, None, "orcafs-devorigin");
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}
