//! metrics: every counter orcafs keeps, defined once by name, so no name is spelled twice.
//!
//! Plain atomics, cheap to bump from any thread. This module only counts; who reads the counters
//! (the exit log line, `orcafs stats`, a future Prometheus endpoint) is not its business.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// The process-wide counters.
        #[derive(Debug, Default)]
        pub struct Metrics { $(#[doc = $help] pub $name: AtomicU64,)* }

        impl Metrics {
            /// `(name, help, value)` for every counter, in definition order.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    origin_get_requests: "ranged GETs sent to the origin",
    origin_get_bytes: "body bytes received from origin GETs",
    origin_get_retries: "origin GETs retried or resumed after a retryable failure",
    origin_head_requests: "HEAD requests sent to the origin",
    origin_list_requests: "ListObjectsV2 pages requested from the origin",
    origin_errors: "origin requests that failed for good",
    fills_started: "chunk fills started on this host",
    fill_joins: "reads that joined a fill already in flight (singleflight)",
    fills_failed: "chunk fills that failed and were not committed",
    disk_hits: "chunk reads served from the local disk cache",
    disk_misses: "chunk reads the local disk cache could not serve",
    disk_bytes_read: "bytes served from the local disk cache",
    disk_commits: "chunks written to the local disk cache",
    disk_bytes_written: "bytes written to the local disk cache",
    disk_evictions: "chunks evicted from the local disk cache",
    disk_corrupt: "cache files found corrupt, truncated or foreign (dropped, refetched)",
    shared_hits: "chunk reads served by the shared cache store (copied back to disk)",
    shared_misses: "chunk reads the shared cache store could not serve",
    shared_bytes_read: "bytes read from the shared cache store",
    shared_commits: "chunks written behind to the shared cache store",
    shared_errors: "shared cache store failures (reads skipped, writes dropped)",
    commit_lost: "puts that found the chunk already committed by another writer",
    peer_fills_received: "chunks streamed completely from their coordinator peer",
    peer_fallbacks: "peer fills that failed (gone, 409, error, short) and were filled locally",
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One `name=value` line for logs.
    pub fn summary(&self) -> String {
        self.snapshot()
            .iter()
            .map(|(n, _, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Latency of FUSE operations, by operation, as a Prometheus histogram family.
pub struct OpLatency {
    family: prometheus_client::metrics::family::Family<
        Vec<(&'static str, &'static str)>,
        prometheus_client::metrics::histogram::Histogram,
    >,
    registry: prometheus_client::registry::Registry,
}

impl Default for OpLatency {
    fn default() -> Self {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        // 50 µs … ~1.6 s: page-cache misses served from disk up to slow origin fetches.
        let family =
            Family::<Vec<(&'static str, &'static str)>, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
            });
        let mut registry = prometheus_client::registry::Registry::with_prefix("orcafs");
        registry.register(
            "fuse_op_seconds",
            "Time from a FUSE request to its reply, by operation",
            family.clone(),
        );
        OpLatency { family, registry }
    }
}

impl OpLatency {
    pub fn observe(&self, op: &'static str, started: std::time::Instant) {
        self.family
            .get_or_create(&vec![("op", op)])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Prometheus text format (without the `# EOF` line, so it can be concatenated).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            return String::new();
        }
        out
    }
}
