//! cluster: hosts that mount the same origin fill chunks for each other, so the fleet reads each
//! chunk from the origin once.
//!
//! For every chunk one host, its *coordinator*, does the fill; the others stream the chunk from
//! it. The coordinator is chosen by rendezvous (highest random weight) hashing of the chunk id
//! over the peers currently alive ([`rendezvous()`]), so every host that sees the same peer set
//! picks the same coordinator, and losing a peer moves only that peer's chunks.
//!
//! * Peer set ([`Cluster`]): a static list or a DNS name re-resolved every `dns_interval`
//!   (a failed resolution keeps the last good set for [`DNS_GRACE`], then falls back to self
//!   only). Every peer but self is health-checked (`GET /healthz`) every `health_interval`; a dead
//!   peer is skipped until it answers again. This host is always alive in its own view.
//! * Internal fill RPC ([`Cluster::fetch_from_peer`], [`Cluster::serve`]):
//!   `GET /internal/fill?<chunk key fields>` streams the chunk as it fills, with the chunk's
//!   `Content-Length`; 409 when the receiver is not the coordinator in its own view. Requests are
//!   signed with HMAC-SHA256 over a shared secret ([`auth`]); unsigned, stale, forged or replayed
//!   ones get 401 and no bytes; a key of another chunk size or an absurd object size gets 400
//!   before any work. Internal requests are served from [`LocalFills`] only, never forwarded.
//! * Trust: the listener speaks TLS 1.3 only (`tls`). The client accepts only a server holding
//!   the secret's derived key (or the operator CA's certificate), and a 200 must carry the
//!   secret's proof; a peer that fails either gets no byte of its answer read, and the fill falls
//!   back to the origin. The listener holds at most `max_connections` connections.
//! * `/healthz`, `/readyz`, `/metrics` on the same TLS listener ([`serve_metrics_only`], plain
//!   HTTP, for `--metrics-addr`).
//!
//! Layout: this file is the [`Cluster`] facade and its errors; `rendezvous` (weights),
//! `membership` (peer set, health, DNS), [`wire`] (the fill request's path and query), [`auth`]
//! (secret, signature, replays, response proof), `tls` (identities, rustls configs, connector),
//! `client` and `server` (the two ends of the RPC), `stats` (counters).
//!
//! Knows nothing of FUSE or of how chunks are filled: `fetch` decides when to ask a peer, and
//! supplies the local fills the server streams. The two meet through traits wired in `mount`,
//! speaking [`crate::peer`]; neither imports the other. The section's values come typed and
//! checked from [`crate::config::cluster`].

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::cachestore::ChunkStream;
use crate::chunk::{ChunkId, ChunkKey};
use crate::config::cluster::ClusterConfig;
use crate::peer::{PeerAddr, PeerError};
use auth::{ReplayGuard, Secret};
use futures::future::BoxFuture;
use membership::{PeerSet, Resolver};
use tls::{Tls, TlsConnector};

pub mod auth;
mod client;
mod membership;
mod rendezvous;
mod server;
mod stats;
mod tls;
pub mod wire;

pub use membership::DNS_GRACE;
pub use rendezvous::{rendezvous, weight};
pub use server::{serve_metrics_only, ServerHandle, MAX_OBJECT_SIZE};
pub use tls::DERIVED_SERVER_NAME;

/// What the metadata server needs from the origin side: the name whose coordinator answers a
/// query, and this host's own answer to it (never forwarded to a peer). Queries and answers are
/// opaque text and bytes here.
pub trait LocalMeta: Send + Sync + 'static {
    /// None: not a query this host understands.
    fn name_of(&self, query: &str) -> Option<String>;
    fn answer(&self, query: String) -> BoxFuture<'static, Result<Bytes, String>>;
}

/// What the fill server needs from `fetch`: a local-only fill stream (never forwarded to a peer
/// again).
pub trait LocalFills: Send + Sync + 'static {
    /// Streams the whole chunk as it fills on this host (joining a fill in flight, or reading
    /// the local cache, or filling from the origin).
    fn stream_local(&self, key: ChunkKey) -> ChunkStream;
    /// This host's chunk size: a request for chunks of another size is refused (the chunk
    /// would be filled, cached and counted under a key this host never reads).
    fn chunk_size(&self) -> u64;
}

/// What `/readyz` and `/metrics` need from the rest of the process.
pub trait Observe: Send + Sync + 'static {
    /// Mounted and stores self-tested.
    fn ready(&self) -> bool;
    /// The process's metrics in Prometheus text format, without `# EOF` (`/metrics` appends the
    /// cluster's own, encoded the same way).
    fn metrics_text(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid [cluster] {what} {value:?}: {reason}")]
    Config {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read the cluster secret file {path}: {source}")]
    SecretRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cluster secret file {path} is empty")]
    SecretEmpty { path: PathBuf },
    #[error(
        "the cluster secret in {path} is {len} bytes; use at least {min} random bytes \
         (e.g. `head -c 32 /dev/urandom | base64`)",
        min = auth::MIN_SECRET_LEN
    )]
    SecretShort { path: PathBuf, len: usize },
    #[error("cannot use [cluster] {what} {path}: {reason}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot set up the cluster's TLS ({what}): {reason}")]
    Tls { what: &'static str, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

fn config_err(
    what: &'static str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> ClusterError {
    ClusterError::Config {
        what,
        value: value.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Tuning {
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub peer_timeout: Duration,
    pub connect_timeout: Duration,
    pub dns_interval: Duration,
    pub dns_grace: Duration,
}

impl Tuning {
    fn from_config(cfg: &ClusterConfig) -> Tuning {
        let (health_interval, peer_timeout) = (cfg.health_interval(), cfg.peer_timeout());
        let one_second = Duration::from_secs(1);
        Tuning {
            health_interval,
            health_timeout: peer_timeout.min(health_interval).min(one_second),
            peer_timeout,
            connect_timeout: peer_timeout.min(one_second),
            dns_interval: cfg.dns_interval(),
            dns_grace: DNS_GRACE,
        }
    }
}

/// One host's view of the cluster: peer set, health, the signed TLS client, counters.
pub struct Cluster {
    listen: String,
    secret: Secret,
    tuning: Tuning,
    /// Who is in the cluster and alive; only `membership` reads or changes it.
    peer_set: PeerSet,
    tls: Tls,
    client: Client<TlsConnector, Empty<Bytes>>,
    /// Signatures already accepted by this host's server.
    replays: ReplayGuard,
    max_connections: usize,
    stats: Arc<stats::Stats>,
    /// Answers metadata queries this host coordinates (set by `mount`).
    meta: OnceLock<Arc<dyn LocalMeta>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("me", self.advertise())
            .field("listen", &self.listen)
            .field("peers", &self.peers())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Reads the secret, resolves the peer set, runs a first health check of every peer and
    /// starts the periodic ones. Does not bind: see [`Cluster::serve`].
    pub async fn start(cfg: &ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        Cluster::start_with(cfg, Tuning::from_config(cfg), membership::system_resolver()).await
    }

    pub(crate) async fn start_with(
        cfg: &ClusterConfig,
        tuning: Tuning,
        resolver: Resolver,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let source = PeerSet::source(cfg)?;
        let secret = Secret::read(&cfg.secret_file)?;
        if secret.bytes().len() < auth::MIN_SECRET_LEN {
            return Err(ClusterError::SecretShort {
                path: cfg.secret_file.clone(),
                len: secret.bytes().len(),
            });
        }
        let peer_set = PeerSet::new(cfg, source, resolver).await?;
        let tls = Tls::from_config(cfg, &secret, peer_set.me())?;

        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(tuning.connect_timeout));
        tcp.enforce_http(false);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(tls.connector(tcp));

        let cluster = Arc::new(Cluster {
            listen: cfg.listen.as_str().to_string(),
            secret,
            tuning,
            peer_set,
            tls,
            client,
            replays: ReplayGuard::default(),
            max_connections: cfg.max_connections(),
            stats: Arc::new(stats::Stats::new()),
            meta: OnceLock::new(),
        });
        cluster.start_rounds().await;
        tracing::info!(
            me = %cluster.advertise(),
            listen = %cluster.listen,
            peers = ?cluster.peers(),
            tls_identity = %cluster.tls.fingerprint,
            "cluster started"
        );
        Ok(cluster)
    }

    /// The address [`Cluster::serve`] binds.
    pub fn listen_addr(&self) -> &str {
        &self.listen
    }

    /// The cluster's own counters in Prometheus text format (no `# EOF`).
    pub fn metrics_text(&self) -> String {
        self.stats.render()
    }

    /// GETs `/internal/fill` from `peer` over TLS. Ok once the peer proved its identity (TLS)
    /// and its knowledge of the secret (the response proof), and the headers say 200 with the
    /// chunk's Content-Length; the stream then errs if the body ends short, runs long or stalls
    /// past `peer_timeout`. Err on a failed handshake ([`PeerError::Tls`]), a missing proof
    /// ([`PeerError::Unauthenticated`]), 409 ([`PeerError::NotCoordinator`]), 401, 4xx/5xx,
    /// connect errors and timeouts. Every Err, and every error of the stream, is a fallback the caller fills
    /// locally from where the peer's bytes stopped.
    pub fn set_local_meta(&self, meta: Arc<dyn LocalMeta>) {
        let _ = self.meta.set(meta);
    }

    pub(crate) fn local_meta(&self) -> Option<&Arc<dyn LocalMeta>> {
        self.meta.get()
    }

    /// The peer that coordinates a name (a prefix's listing, a key's HEAD), or None when this
    /// host does: rendezvous hashing of the name, as for chunks.
    pub fn coordinator_for_name(&self, name: &str) -> Option<PeerAddr> {
        use sha2::Digest as _;
        self.coordinator_for(&ChunkId(sha2::Sha256::digest(name.as_bytes()).into()))
    }

    /// The coordinator's answer to a metadata query: Err on any failure (the caller asks the
    /// origin itself).
    pub async fn ask_meta(&self, peer: &PeerAddr, query: &str) -> Result<Bytes, PeerError> {
        let result = client::request_meta(self, peer, query).await;
        if let Err(e) = &result {
            self.stats.fallback(e.reason());
            if matches!(e, PeerError::NotCoordinator) {
                self.stats.not_coordinator_received.inc();
                self.recheck_soon();
            }
        }
        result
    }

    pub async fn fetch_from_peer(
        &self,
        peer: &PeerAddr,
        key: &ChunkKey,
    ) -> Result<ChunkStream, PeerError> {
        let started = Instant::now();
        let result = client::request_fill(self, peer, key).await;
        self.stats
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(body) => Ok(client::body_stream(
                body,
                key.len(),
                self.tuning.peer_timeout,
                peer.clone(),
                self.stats.clone(),
            )),
            Err(e) => {
                self.stats.fallback(e.reason());
                match &e {
                    PeerError::NotCoordinator => {
                        self.stats.not_coordinator_received.inc();
                        self.recheck_soon();
                        tracing::debug!(%peer, ?key, "peer is not the coordinator; filling locally");
                    }
                    PeerError::Connect(_) => {
                        self.set_alive(peer, false);
                        tracing::warn!(%peer, error = %e, "peer unreachable; marked dead");
                    }
                    PeerError::Tls(_) | PeerError::Unauthenticated => {
                        // Its health checks (over the same TLS) decide whether it is dead: a
                        // full listener also ends handshakes.
                        tracing::warn!(%peer, ?key, error = %e, "peer not authenticated; filling locally");
                    }
                    _ => tracing::warn!(%peer, ?key, error = %e, "peer fill failed"),
                }
                Err(e)
            }
        }
    }

    /// Binds `listen` and serves `/internal/fill`, `/healthz`, `/readyz` and `/metrics` over
    /// TLS. Returns once bound. Dropping the handle stops the server.
    pub async fn serve(
        self: &Arc<Self>,
        fills: Arc<dyn LocalFills>,
        observe: Arc<dyn Observe>,
    ) -> Result<ServerHandle, ClusterError> {
        let app = server::App {
            cluster: Some((self.clone(), fills)),
            observe,
            tls: Some(self.tls.acceptor()),
            max_connections: self.max_connections,
        };
        server::bind(&self.listen, app).await
    }

    /// SHA-256 of the public key this host's listener presents (`sha256:<hex>`; not a secret).
    /// With a secret-derived identity it is the same on every host sharing the secret.
    pub fn tls_fingerprint(&self) -> &str {
        &self.tls.fingerprint
    }

    pub(crate) fn secret(&self) -> &Secret {
        &self.secret
    }

    pub(crate) fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    pub(crate) fn http(&self) -> &Client<TlsConnector, Empty<Bytes>> {
        &self.client
    }

    pub(crate) fn replays(&self) -> &ReplayGuard {
        &self.replays
    }

    pub(crate) fn stats(&self) -> &Arc<stats::Stats> {
        &self.stats
    }
}

/// The TLS configs of a member whose identity is derived from `secret`: what its listener
/// presents, and a client that accepts only that identity (ask for [`DERIVED_SERVER_NAME`]).
/// For tools and tests that stand in for a member or scrape one; members use [`Cluster`].
pub fn derived_tls(
    secret: &[u8],
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), ClusterError> {
    let tls = Tls::derived(&Secret::from_bytes(secret))?;
    Ok((tls.server, tls.client))
}

#[cfg(test)]
mod tests;
