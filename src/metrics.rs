//! metrics: everything the process measures but the cluster, in one prometheus-client registry
//! (prefix `orcafs`), each metric named once in `metrics!` (or here, for the histogram).
//!
//! Owns the process counters (`orcafs_<name>_total`, cheap to bump from any thread), the gauges
//! `mount` sets from their live sources when `/metrics` is scraped, the FUSE op latency histogram
//! (`orcafs_fuse_op_seconds`) and the one text encoding ([`encode`]) that the cluster's registry
//! shares. Must not touch what it measures (fetch, cachestore, cluster, mount import it, never
//! the other way), nor serve the text: `cluster` serves `/metrics`, `control` reads
//! [`Metrics::snapshot`]. The cluster's own metrics stay in `cluster::stats`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

macro_rules! metrics {
    (
        counters { $($name:ident: $help:literal,)* }
        gauges { $($gauge:ident: $kind:ty = $gauge_help:literal,)* }
    ) => {
        /// The process's metrics and the registry that encodes them.
        #[derive(Debug)]
        pub struct Metrics {
            $(#[doc = $help] pub $name: Counter,)*
            $(#[doc = $gauge_help] pub $gauge: $kind,)*
            /// Latency of FUSE operations; `fs` observes into a clone.
            pub fuse_op_latency: OpLatency,
            registry: Registry,
        }

        impl Default for Metrics {
            fn default() -> Self {
                let mut registry = Registry::with_prefix("orcafs");
                $(let $name = Counter::default();
                registry.register(stringify!($name), $help, $name.clone());)*
                $(let $gauge = <$kind>::default();
                registry.register(stringify!($gauge), $gauge_help, $gauge.clone());)*
                let fuse_op_latency = OpLatency::register(&mut registry);
                Metrics { $($name,)* $($gauge,)* fuse_op_latency, registry }
            }
        }

        impl Metrics {
            /// `(name, help, value)` for every counter, in definition order.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.get()),)*]
            }
        }
    };
}

metrics! {
    counters {
        origin_get_requests: "ranged GETs sent to the origin",
        origin_get_bytes: "body bytes received from origin GETs",
        origin_get_retries: "origin GETs retried or resumed after a retryable failure",
        origin_head_requests: "HEAD requests sent to the origin",
        origin_list_requests: "ListObjectsV2 pages requested from the origin",
        origin_errors: "origin requests that failed for good",
        fills_started: "chunk fills started on this host",
        fill_joins: "reads that joined a fill already in flight (singleflight)",
        ahead_hits: "reads served from a complete fill kept in memory for its reader",
        fills_failed: "chunk fills that failed and were not committed",
        block_fills: "random reads filled by fetching only the 64 KiB blocks around them",
        disk_hits: "chunk reads served from the local disk cache",
        disk_misses: "chunk reads the local disk cache could not serve",
        disk_bytes_read: "bytes served from the local disk cache",
        disk_commits: "chunks written to the local disk cache",
        disk_bytes_written: "bytes written to the local disk cache",
        disk_evictions: "chunks evicted from the local disk cache",
        disk_corrupt: "cache files found corrupt, truncated or foreign (dropped, refetched)",
        cache_checks: "whole cached objects read through to check every block (before passthrough, once per change)",
        passthrough_opens: "opens answered with FUSE passthrough (the kernel reads the cached file itself)",
        shared_hits: "chunk reads served by the shared cache store (copied back to disk)",
        shared_misses: "chunk reads the shared cache store could not serve",
        shared_bytes_read: "bytes read from the shared cache store",
        shared_commits: "chunks written behind to the shared cache store",
        shared_errors: "shared cache store failures (reads skipped, writes dropped)",
        shared_writes_dropped: "write-behinds to the shared store dropped (queue full, or the chunk evicted before upload)",
        shared_rejected: "shared cache objects that failed authentication or were damaged (deleted, read as a miss)",
        commit_lost: "puts that found the chunk already committed by another writer",
        peer_fills_received: "chunks streamed completely from their coordinator peer",
        peer_fallbacks: "peer fills that failed (gone, 409, error, short) and were filled locally",
    }
    gauges {
        fill_memory_in_use_bytes: Gauge = "bytes of the fill memory budget in use",
        fills_in_flight: Gauge = "chunk fills in flight on this host",
        shared_queue_depth: LateGauge =
            "chunks waiting in the write-behind queue to the shared store",
        shared_error_state: LateGauge =
            "1 when a write-behind to the shared store has failed (see the log)",
    }
}

impl Metrics {
    pub fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    pub fn inc(counter: &Counter) {
        counter.inc();
    }

    /// One `name=value` line for logs.
    pub fn summary(&self) -> String {
        self.snapshot()
            .iter()
            .map(|(n, _, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Every metric in Prometheus text format; see [`encode`].
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// A registry in Prometheus text format, without the OpenMetrics `# EOF` line: `/metrics`
/// concatenates the process's registry and the cluster's, as text format 0.0.4 (which has none).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    match encode_registry(&mut out, registry) {
        Ok(()) => out,
        Err(_) => String::new(),
    }
}

/// A gauge left out of the text until first set: the shared store's, absent on a host that
/// runs without one.
#[derive(Debug, Clone, Default)]
pub struct LateGauge {
    gauge: Gauge,
    set: Arc<AtomicBool>,
}

impl LateGauge {
    pub fn set(&self, value: i64) {
        self.gauge.set(value);
        self.set.store(true, Ordering::Relaxed);
    }
}

impl EncodeMetric for LateGauge {
    fn encode(&self, encoder: MetricEncoder) -> std::fmt::Result {
        self.gauge.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        !self.set.load(Ordering::Relaxed)
    }
}

type Op = [(&'static str, &'static str); 1];

/// Latency of FUSE operations, by operation, as a Prometheus histogram family. Clones observe
/// into the same histograms.
#[derive(Debug, Clone)]
pub struct OpLatency(Family<Op, Histogram>);

impl OpLatency {
    fn register(registry: &mut Registry) -> OpLatency {
        // 50 µs … ~1.6 s: page-cache misses served from disk up to slow origin fetches.
        let family = Family::<Op, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register(
            "fuse_op_seconds",
            "Time from a FUSE request to its reply, by operation",
            family.clone(),
        );
        OpLatency(family)
    }

    pub fn observe(&self, op: &'static str, started: Instant) {
        self.0
            .get_or_create(&[("op", op)])
            .observe(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_text_carries_every_counter_with_help_type_and_value() {
        let m = Metrics::default();
        Metrics::add(&m.origin_get_bytes, 42);
        Metrics::inc(&m.disk_hits);
        let text = m.encode();
        for (name, help, value) in m.snapshot() {
            let full = format!("orcafs_{name}");
            assert!(
                text.contains(&format!("# HELP {full} {help}.\n")),
                "{name}:\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {full} counter\n")),
                "{name}:\n{text}"
            );
            assert!(
                text.contains(&format!("\n{full}_total {value}\n")),
                "{name}:\n{text}"
            );
        }
        assert!(text.contains("\norcafs_origin_get_bytes_total 42\n"));
        assert!(text.contains("\norcafs_disk_hits_total 1\n"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn gauges_and_latency_share_the_registry_and_shared_gauges_wait_until_set() {
        let m = Metrics::default();
        m.fill_memory_in_use_bytes.set(4096);
        m.fuse_op_latency.clone().observe("readdir", Instant::now());
        let text = m.encode();
        assert!(text.contains("# TYPE orcafs_fill_memory_in_use_bytes gauge\n"));
        assert!(text.contains("\norcafs_fill_memory_in_use_bytes 4096\n"));
        assert!(text.contains("\norcafs_fills_in_flight 0\n"));
        assert!(text.contains("\norcafs_fuse_op_seconds_count{op=\"readdir\"} 1\n"));
        assert!(!text.contains("orcafs_shared_queue_depth"), "{text}");

        m.shared_queue_depth.set(3);
        m.shared_error_state.set(0);
        let text = m.encode();
        assert!(text.contains("# TYPE orcafs_shared_queue_depth gauge\n"));
        assert!(text.contains("\norcafs_shared_queue_depth 3\n"));
        assert!(text.contains("\norcafs_shared_error_state 0\n"));
    }
}
