//! stats: the cluster's own counters, in a prometheus-client registry (prefix `orcafs_cluster`),
//! encoded by [`crate::metrics::encode`] like the process's.
//!
//! Owns their names and help texts. Must not touch what they count.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Reason = [(&'static str, &'static str); 1];

pub(crate) struct Stats {
    registry: Registry,
    pub fills_served: Counter,
    pub fill_bytes_served: Counter,
    pub fills_serving: Gauge,
    pub fills_received: Counter,
    pub fill_bytes_received: Counter,
    pub fallbacks: Family<Reason, Counter>,
    pub not_coordinator_sent: Counter,
    pub not_coordinator_received: Counter,
    pub auth_failures: Counter,
    pub replays_refused: Counter,
    pub fill_requests_refused: Family<Reason, Counter>,
    pub tls_failures: Counter,
    pub inbound_tls_failures: Counter,
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub request_seconds: Histogram,
    pub peers: Gauge,
    pub peers_alive: Gauge,
    pub health_check_failures: Counter,
    pub dns_failures: Counter,
}

impl Stats {
    pub fn new() -> Stats {
        let mut registry = Registry::with_prefix("orcafs_cluster");
        let s = Stats {
            fills_served: Counter::default(),
            fill_bytes_served: Counter::default(),
            fills_serving: Gauge::default(),
            fills_received: Counter::default(),
            fill_bytes_received: Counter::default(),
            fallbacks: Family::default(),
            not_coordinator_sent: Counter::default(),
            not_coordinator_received: Counter::default(),
            auth_failures: Counter::default(),
            replays_refused: Counter::default(),
            fill_requests_refused: Family::default(),
            tls_failures: Counter::default(),
            inbound_tls_failures: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            // 1 ms … ~16 s
            request_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            peers: Gauge::default(),
            peers_alive: Gauge::default(),
            health_check_failures: Counter::default(),
            dns_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "peer_fills_served",
            "Chunks streamed completely to a peer that asked this host as their coordinator",
            s.fills_served.clone(),
        );
        registry.register(
            "peer_fill_bytes_served",
            "Chunk bytes streamed to peers",
            s.fill_bytes_served.clone(),
        );
        registry.register(
            "peer_fills_serving",
            "Fill streams to peers in progress",
            s.fills_serving.clone(),
        );
        registry.register(
            "peer_fills_received",
            "Chunks streamed completely from their coordinator peer",
            s.fills_received.clone(),
        );
        registry.register(
            "peer_fill_bytes_received",
            "Chunk bytes received from coordinator peers",
            s.fill_bytes_received.clone(),
        );
        registry.register(
            "peer_fallbacks",
            "Peer fills that failed (before or during the body) and fall back to a local fill",
            s.fallbacks.clone(),
        );
        registry.register(
            "peer_not_coordinator_409_sent",
            "Fill requests this host refused with 409: not the coordinator in its view",
            s.not_coordinator_sent.clone(),
        );
        registry.register(
            "peer_not_coordinator_409_received",
            "Fill requests a peer refused with 409",
            s.not_coordinator_received.clone(),
        );
        registry.register(
            "peer_auth_failures",
            "Internal requests refused with 401 (missing, stale, wrong or replayed signature)",
            s.auth_failures.clone(),
        );
        registry.register(
            "peer_replays_refused",
            "Internal requests refused with 401 because their signature was already used",
            s.replays_refused.clone(),
        );
        registry.register(
            "fill_requests_refused",
            "Signed fill requests refused with 400 before any work (bad key, another chunk size, object too large)",
            s.fill_requests_refused.clone(),
        );
        registry.register(
            "peer_tls_failures",
            "Connections to peers whose TLS handshake or identity check failed (fills and health checks)",
            s.tls_failures.clone(),
        );
        registry.register(
            "inbound_tls_failures",
            "Connections to this listener whose TLS handshake failed or timed out",
            s.inbound_tls_failures.clone(),
        );
        registry.register(
            "connections",
            "Connections this listener holds open",
            s.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once because the listener held max_connections",
            s.connections_refused.clone(),
        );
        registry.register(
            "peer_request_seconds",
            "Time from sending a fill request to a peer until its response headers",
            s.request_seconds.clone(),
        );
        registry.register(
            "peers",
            "Hosts in the peer set, self included",
            s.peers.clone(),
        );
        registry.register(
            "peers_alive",
            "Hosts in the peer set considered alive, self included",
            s.peers_alive.clone(),
        );
        registry.register(
            "peer_health_check_failures",
            "Peer health checks that failed",
            s.health_check_failures.clone(),
        );
        registry.register(
            "dns_failures",
            "Failed resolutions of the cluster DNS name",
            s.dns_failures.clone(),
        );
        Stats { registry, ..s }
    }

    pub fn fallback(&self, reason: &'static str) {
        self.fallbacks.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.fill_requests_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Prometheus text, without the OpenMetrics `# EOF` line so that it can be concatenated.
    pub fn render(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}
