//! cluster: hosts that mount the same origin fill chunks for each other, so the fleet reads each
//! chunk from the origin once.
//!
//! For every chunk one host, its *coordinator*, does the fill; the others stream the chunk from
//! it. The coordinator is chosen by rendezvous (highest random weight) hashing of the chunk id
//! over the peers currently alive ([`rendezvous`]), so every host that sees the same peer set
//! picks the same coordinator, and losing a peer moves only that peer's chunks.
//!
//! * Peer set ([`Cluster`]): a static list or a DNS name re-resolved every `dns_interval`
//!   (a failed resolution keeps the last good set for [`DNS_GRACE`], then falls back to self
//!   only). Every peer but self is health-checked (`GET /healthz`) every `health_interval`; a dead
//!   peer is skipped until it answers again. This host is always alive in its own view.
//! * Internal fill RPC ([`Cluster::fetch_from_peer`], [`Cluster::serve`]):
//!   `GET /internal/fill?<chunk key fields>` streams the chunk as it fills, with the chunk's
//!   `Content-Length`; 409 when the receiver is not the coordinator in its own view. Requests are
//!   signed with HMAC-SHA256 over a shared secret ([`auth`]); unsigned, stale or forged ones get
//!   401 and no bytes. Internal requests are served from [`LocalFills`] only, never forwarded.
//! * `/healthz`, `/readyz`, `/metrics` on the same listener ([`serve_metrics_only`] for a host
//!   without `[cluster]`).
//!
//! Knows nothing of FUSE or of how chunks are filled: `fetch` decides when to ask a peer, and
//! supplies the local fills the server streams.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt as _;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::cachestore::ChunkStream;
use crate::chunk::{ChunkId, ChunkKey, ObjectVersion};

pub mod auth;
mod client;
mod server;
mod stats;

pub use server::{serve_metrics_only, ServerHandle};

/// How long a failed DNS resolution keeps the last good peer set before falling back to self.
pub const DNS_GRACE: Duration = Duration::from_secs(60);
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(10);

/// The `[cluster]` section of the config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Address the internal RPC, `/healthz`, `/readyz` and `/metrics` listen on.
    pub listen: String,
    /// How peers reach this host; defaults to `listen`.
    pub advertise: Option<String>,
    /// Static peer set, `host:port` each (this host's own address may be listed).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Or: a `name:port` resolved to the peer set every `dns_interval`.
    pub dns: Option<String>,
    /// File holding the shared secret that signs internal requests.
    pub secret_file: PathBuf,
    /// How often peers are health-checked [default: 2s].
    pub health_interval: Option<String>,
    /// Connect, response and body-stall timeout of a peer fill [default: 5s].
    pub peer_timeout: Option<String>,
    /// How often `dns` is re-resolved [default: 10s].
    pub dns_interval: Option<String>,
}

/// What the server side needs from the coordinator: a local-only fill stream (never forwarded
/// to a peer again).
pub trait LocalFills: Send + Sync + 'static {
    /// Streams the whole chunk as it fills on this host (joining a fill in flight, or reading
    /// the local cache, or filling from the origin).
    fn stream_local(&self, key: ChunkKey) -> ChunkStream;
}

/// What `/readyz` and `/metrics` need from the rest of the process.
pub trait Observe: Send + Sync + 'static {
    /// Mounted and stores self-tested.
    fn ready(&self) -> bool;
    /// The process's metrics in Prometheus text format (the cluster's own are appended).
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

/// Why a peer fill was not started. The caller fills locally in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the peer is not the coordinator of this chunk in its own view (409)")]
    NotCoordinator,
    #[error("the peer refused our credentials (401); check secret_file on both hosts")]
    Unauthorized,
    #[error("the peer answered HTTP {0}")]
    Status(u16),
    #[error("cannot connect to the peer: {0}")]
    Connect(String),
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer announced {got:?} bytes for a chunk of {expected}")]
    BadLength { expected: u64, got: Option<u64> },
    #[error("peer request failed: {0}")]
    Request(String),
}

impl PeerError {
    /// Label of the fallback counter.
    fn reason(&self) -> &'static str {
        match self {
            PeerError::NotCoordinator => "not_coordinator",
            PeerError::Unauthorized => "unauthorized",
            PeerError::Status(_) => "status",
            PeerError::Connect(_) => "connect",
            PeerError::Timeout(_) => "timeout",
            PeerError::BadLength { .. } => "bad_length",
            PeerError::Request(_) => "request",
        }
    }
}

/// A peer as the cluster names it: `host:port`, canonical (IP literals normalised) so that every
/// host hashes the same bytes for it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(Arc<str>);

impl PeerAddr {
    pub fn new(text: &str) -> PeerAddr {
        let t = text.trim();
        match t.parse::<SocketAddr>() {
            Ok(sa) => PeerAddr(sa.to_string().into()),
            Err(_) => PeerAddr(t.to_ascii_lowercase().into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(sa: SocketAddr) -> PeerAddr {
        PeerAddr(sa.to_string().into())
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `host:port` whose port is a number and whose host is not empty.
fn valid_host_port(text: &str) -> bool {
    if text.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(['/', ' ', '[', ']'])
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

/// The rendezvous weight of `peer` for chunk `id`: the first 8 bytes of
/// SHA-256(len(peer) ‖ peer ‖ id).
pub fn weight(peer: &PeerAddr, id: &ChunkId) -> u64 {
    weigh(&peer_hasher(peer), id)
}

fn peer_hasher(peer: &PeerAddr) -> Sha256 {
    let mut h = Sha256::new();
    h.update((peer.as_str().len() as u64).to_le_bytes());
    h.update(peer.as_str().as_bytes());
    h
}

fn weigh(prefix: &Sha256, id: &ChunkId) -> u64 {
    let mut h = prefix.clone();
    h.update(id.0);
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The peer with the highest weight for `id` (ties broken by address); None for no peers.
pub fn rendezvous<'a, I>(peers: I, id: &ChunkId) -> Option<&'a PeerAddr>
where
    I: IntoIterator<Item = &'a PeerAddr>,
{
    peers
        .into_iter()
        .map(|p| (weight(p, id), p))
        .max()
        .map(|(_, p)| p)
}

/// The shared secret. Its Debug never shows it.
#[derive(Clone)]
pub(crate) struct Secret(Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Secret {
    fn read(path: &Path) -> Result<Secret, ClusterError> {
        let raw = std::fs::read(path).map_err(|source| ClusterError::SecretRead {
            path: path.to_owned(),
            source,
        })?;
        let trimmed = raw.trim_ascii();
        if trimmed.is_empty() {
            return Err(ClusterError::SecretEmpty {
                path: path.to_owned(),
            });
        }
        if trimmed.len() < 16 {
            tracing::warn!(path = %path.display(), "the cluster secret is shorter than 16 bytes");
        }
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o004 != 0 {
                    tracing::warn!(path = %path.display(), "the cluster secret file is readable by every user");
                }
            }
        }
        Ok(Secret(trimmed.into()))
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Resolves a `name:port` to socket addresses (replaceable in tests).
pub(crate) type Resolver =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

fn system_resolver() -> Resolver {
    Arc::new(|name: String| {
        async move { Ok(tokio::net::lookup_host(name).await?.collect()) }.boxed()
    })
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
    fn from_config(cfg: &ClusterConfig) -> Result<Tuning, ClusterError> {
        let pick = |what: &'static str, v: &Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(text) => {
                let d = crate::config::parse_duration(what, text)
                    .map_err(|e| config_err(what, text, e.to_string()))?;
                if d.is_zero() {
                    return Err(config_err(what, text, "must be positive"));
                }
                Ok(d)
            }
        };
        let health_interval = pick(
            "health_interval",
            &cfg.health_interval,
            DEFAULT_HEALTH_INTERVAL,
        )?;
        let peer_timeout = pick("peer_timeout", &cfg.peer_timeout, DEFAULT_PEER_TIMEOUT)?;
        let dns_interval = pick("dns_interval", &cfg.dns_interval, DEFAULT_DNS_INTERVAL)?;
        let one_second = Duration::from_secs(1);
        Ok(Tuning {
            health_interval,
            health_timeout: peer_timeout.min(health_interval).min(one_second),
            peer_timeout,
            connect_timeout: peer_timeout.min(one_second),
            dns_interval,
            dns_grace: DNS_GRACE,
        })
    }
}

/// Where the peer set comes from.
#[derive(Debug, Clone)]
enum Source {
    Static,
    Dns(String),
}

struct Member {
    addr: PeerAddr,
    /// SHA-256 state after the peer's bytes: weights cost one short hash per peer.
    hasher: Sha256,
    is_self: bool,
    alive: bool,
    /// Health checks failed in a row; one slow answer on a loaded host is not death.
    failures: u32,
}

/// Consecutive failed health checks before a peer is considered dead. (A refused connection
/// during a fill marks it dead at once.)
const DEAD_AFTER_FAILURES: u32 = 2;

impl Member {
    fn new(addr: PeerAddr, is_self: bool, alive: bool) -> Member {
        Member {
            hasher: peer_hasher(&addr),
            addr,
            is_self,
            alive: alive || is_self,
            failures: 0,
        }
    }
}

struct PeerState {
    members: Vec<Member>,
    /// Static list, a DNS answer seen, or the DNS grace run out (self only is then decided).
    known: bool,
    /// Last successful DNS resolution (or start, before the first one).
    last_dns_ok: Instant,
    /// The last DNS attempt failed (for logging transitions once).
    dns_failing: bool,
}

/// One host's view of the cluster: peer set, health, the signed client, counters.
pub struct Cluster {
    me: PeerAddr,
    /// What the advertise address resolves to (any of them is this host).
    my_addrs: Vec<SocketAddr>,
    listen: String,
    source: Source,
    secret: Secret,
    tuning: Tuning,
    state: RwLock<PeerState>,
    client: Client<HttpConnector, Empty<Bytes>>,
    stats: Arc<stats::Stats>,
    resolver: Resolver,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("listen", &self.listen)
            .field("source", &self.source)
            .field("peers", &self.peers())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Reads the secret, resolves the peer set, runs a first health check of every peer and
    /// starts the periodic ones. Does not bind: see [`Cluster::serve`].
    pub async fn start(cfg: &ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        let tuning = Tuning::from_config(cfg)?;
        Cluster::start_with(cfg, tuning, system_resolver()).await
    }

    pub(crate) async fn start_with(
        cfg: &ClusterConfig,
        tuning: Tuning,
        resolver: Resolver,
    ) -> Result<Arc<Cluster>, ClusterError> {
        if !valid_host_port(cfg.listen.trim()) {
            return Err(config_err("listen", &cfg.listen, "expected HOST:PORT"));
        }
        let advertise = cfg.advertise.as_deref().unwrap_or(&cfg.listen).trim();
        if !valid_host_port(advertise) {
            return Err(config_err("advertise", advertise, "expected HOST:PORT"));
        }
        if let Ok(sa) = advertise.parse::<SocketAddr>() {
            if sa.ip().is_unspecified() {
                return Err(config_err(
                    "advertise",
                    advertise,
                    "peers cannot reach an unspecified address; set `advertise` to this host's address",
                ));
            }
        }
        let source =
            match (&cfg.dns, cfg.peers.is_empty()) {
                (Some(_), false) => {
                    return Err(config_err(
                        "peers",
                        cfg.peers.join(","),
                        "give either `peers` or `dns`, not both",
                    ))
                }
                (None, true) => return Err(config_err(
                    "peers",
                    "",
                    "give the peer set as `peers = [\"HOST:PORT\", …]` or `dns = \"NAME:PORT\"`",
                )),
                (Some(name), true) => {
                    if !valid_host_port(name.trim()) {
                        return Err(config_err("dns", name, "expected NAME:PORT"));
                    }
                    Source::Dns(name.trim().to_string())
                }
                (None, false) => {
                    for p in &cfg.peers {
                        if !valid_host_port(p.trim()) {
                            return Err(config_err("peers", p, "expected HOST:PORT"));
                        }
                    }
                    Source::Static
                }
            };
        let secret = Secret::read(&cfg.secret_file)?;

        // Who am I: the advertise address, and whatever it resolves to.
        let my_addrs: Vec<SocketAddr> = match advertise.parse::<SocketAddr>() {
            Ok(sa) => vec![sa],
            Err(_) => (resolver)(advertise.to_string()).await.unwrap_or_default(),
        };
        let mut me = PeerAddr::new(advertise);
        let mut members = Vec::new();
        let mut known = false;
        if let Source::Static = source {
            for p in &cfg.peers {
                let addr = PeerAddr::new(p);
                if members.iter().any(|m: &Member| m.addr == addr) {
                    continue;
                }
                let is_self = addr == me || is_same_host(&addr, &my_addrs, &resolver).await;
                if is_self {
                    // Hash the name the others use for us.
                    me = addr.clone();
                }
                members.push(Member::new(addr, is_self, false));
            }
            if !members.iter().any(|m| m.is_self) {
                tracing::warn!(advertise = %me, "this host is not in [cluster] peers; adding it to its own view only");
                members.push(Member::new(me.clone(), true, true));
            }
            known = true;
        } else {
            // DNS answers are addresses: name ourselves by ours, as the others will.
            if advertise.parse::<SocketAddr>().is_err() {
                let Some(sa) = my_addrs.iter().find(|a| a.is_ipv4()).or(my_addrs.first()) else {
                    return Err(config_err(
                        "advertise",
                        advertise,
                        "does not resolve; with `dns`, set it to this host's IP:PORT",
                    ));
                };
                me = PeerAddr::from(*sa);
            }
            members.push(Member::new(me.clone(), true, true));
        }

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(tuning.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(connector);

        let cluster = Arc::new(Cluster {
            me,
            my_addrs,
            listen: cfg.listen.trim().to_string(),
            source,
            secret,
            tuning,
            state: RwLock::new(PeerState {
                members,
                known,
                last_dns_ok: Instant::now(),
                dns_failing: false,
            }),
            client,
            stats: Arc::new(stats::Stats::new()),
            resolver,
        });
        if let Source::Dns(_) = cluster.source {
            cluster.resolve_once().await;
            tokio::spawn(every(Arc::downgrade(&cluster), Round::Dns));
        }
        cluster.check_health_once().await;
        tokio::spawn(every(Arc::downgrade(&cluster), Round::Health));
        tracing::info!(me = %cluster.me, listen = %cluster.listen, peers = ?cluster.peers(), "cluster started");
        Ok(cluster)
    }

    /// This host's name in the peer set.
    pub fn advertise(&self) -> &PeerAddr {
        &self.me
    }

    /// The address [`Cluster::serve`] binds.
    pub fn listen_addr(&self) -> &str {
        &self.listen
    }

    fn read_state(&self) -> RwLockReadGuard<'_, PeerState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, PeerState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer that coordinates this chunk, or None when it is this host (or the cluster has
    /// only self alive).
    pub fn coordinator_for(&self, id: &ChunkId) -> Option<PeerAddr> {
        let state = self.read_state();
        let winner = state
            .members
            .iter()
            .filter(|m| m.alive)
            .map(|m| (weigh(&m.hasher, id), &m.addr, m.is_self))
            .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))?;
        match winner {
            (_, _, true) => None,
            (_, addr, false) => Some(addr.clone()),
        }
    }

    /// Every peer in the current set, with whether it is considered alive. Self is listed.
    pub fn peers(&self) -> Vec<(PeerAddr, bool)> {
        self.read_state()
            .members
            .iter()
            .map(|m| (m.addr.clone(), m.alive))
            .collect()
    }

    /// Whether the peer set is known (static, resolved, or decided to be self only).
    pub fn peer_set_known(&self) -> bool {
        self.read_state().known
    }

    /// The cluster's own counters in Prometheus text format (no `# EOF`).
    pub fn metrics_text(&self) -> String {
        self.stats.render()
    }

    /// GETs `/internal/fill` from `peer`. Ok once the response headers say 200 with the chunk's
    /// Content-Length; the stream then errs if the body ends short, runs long or stalls past
    /// `peer_timeout`. Err on 409 ([`PeerError::NotCoordinator`]), 401, 5xx, connect errors and
    /// timeouts. Every Err, and every error of the stream, is a fallback the caller fills
    /// locally from where the peer's bytes stopped.
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
                        tracing::debug!(%peer, ?key, "peer is not the coordinator; filling locally");
                    }
                    PeerError::Connect(_) => {
                        self.set_alive(peer, false);
                        tracing::warn!(%peer, error = %e, "peer unreachable; marked dead");
                    }
                    _ => tracing::warn!(%peer, ?key, error = %e, "peer fill failed"),
                }
                Err(e)
            }
        }
    }

    /// Binds `listen` and serves `/internal/fill`, `/healthz`, `/readyz` and `/metrics`.
    /// Returns once bound. Dropping the handle stops the server.
    pub async fn serve(
        self: &Arc<Self>,
        fills: Arc<dyn LocalFills>,
        observe: Arc<dyn Observe>,
    ) -> Result<ServerHandle, ClusterError> {
        let app = server::App {
            cluster: Some((self.clone(), fills)),
            observe,
        };
        server::bind(&self.listen, app).await
    }

    fn set_alive(&self, peer: &PeerAddr, alive: bool) {
        let changed = {
            let mut state = self.write_state();
            match state
                .members
                .iter_mut()
                .find(|m| &m.addr == peer && !m.is_self)
            {
                Some(m) if m.alive != alive => {
                    m.alive = alive;
                    if alive {
                        m.failures = 0;
                    }
                    true
                }
                Some(m) => {
                    if alive {
                        m.failures = 0;
                    }
                    false
                }
                _ => false,
            }
        };
        if changed {
            self.publish_gauges();
        }
    }

    fn publish_gauges(&self) {
        let state = self.read_state();
        let alive = state.members.iter().filter(|m| m.alive).count();
        self.stats.peers.set(state.members.len() as i64);
        self.stats.peers_alive.set(alive as i64);
    }

    /// Counts a failed health check; true while the peer still gets the benefit of the doubt.
    fn tolerate_failure(&self, peer: &PeerAddr) -> bool {
        let mut state = self.write_state();
        match state.members.iter_mut().find(|m| &m.addr == peer) {
            Some(m) => {
                m.failures += 1;
                m.alive && m.failures < DEAD_AFTER_FAILURES
            }
            None => false,
        }
    }

    /// Checks every peer but self once, concurrently, and records who answered.
    async fn check_health_once(&self) {
        let targets: Vec<PeerAddr> = self
            .read_state()
            .members
            .iter()
            .filter(|m| !m.is_self)
            .map(|m| m.addr.clone())
            .collect();
        let checks = targets.iter().map(|p| async move {
            let ok = client::healthz(self, p).await;
            (p, ok)
        });
        let results = futures::future::join_all(checks).await;
        for (peer, answered) in results {
            if !answered {
                self.stats.health_check_failures.inc();
            }
            let ok = answered || self.tolerate_failure(peer);
            let was = self
                .read_state()
                .members
                .iter()
                .find(|m| &m.addr == peer)
                .map(|m| m.alive);
            match (was, ok) {
                (Some(false), true) => tracing::info!(%peer, "peer is alive"),
                (Some(true), false) => {
                    tracing::warn!(%peer, "peer failed its health check; marked dead")
                }
                _ => {}
            }
            // A tolerated miss changes nothing (and keeps the failure count growing).
            if answered || !ok {
                self.set_alive(peer, ok);
            }
        }
        self.publish_gauges();
    }

    /// Resolves the DNS name once and updates the peer set (or keeps it, within the grace).
    async fn resolve_once(&self) {
        let Source::Dns(name) = &self.source else {
            return;
        };
        let result = tokio::time::timeout(
            self.tuning.dns_interval.max(Duration::from_secs(1)),
            (self.resolver)(name.clone()),
        )
        .await;
        let addrs = match result {
            Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
            Ok(Ok(_)) => Err("no addresses".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("resolution timed out".to_string()),
        };
        match addrs {
            Ok(addrs) => self.apply_dns(addrs),
            Err(e) => {
                self.stats.dns_failures.inc();
                let mut state = self.write_state();
                let expired = state.last_dns_ok.elapsed() >= self.tuning.dns_grace;
                if !state.dns_failing {
                    tracing::warn!(%name, error = %e, "cannot resolve the cluster peer set; keeping the last one for now");
                }
                state.dns_failing = true;
                if expired && state.members.iter().any(|m| !m.is_self) {
                    tracing::warn!(%name, "cluster peer set unresolved for too long; running as self only");
                    state.members.retain(|m| m.is_self);
                }
                if expired {
                    state.known = true;
                }
                drop(state);
                self.publish_gauges();
            }
        }
    }

    fn apply_dns(&self, addrs: Vec<SocketAddr>) {
        let mut wanted: Vec<PeerAddr> = addrs.into_iter().map(PeerAddr::from).collect();
        wanted.sort();
        wanted.dedup();
        {
            let mut state = self.write_state();
            if state.dns_failing {
                tracing::info!("cluster peer set resolves again");
            }
            state.dns_failing = false;
            state.known = true;
            state.last_dns_ok = Instant::now();
            let old = std::mem::take(&mut state.members);
            let mut members = Vec::with_capacity(wanted.len() + 1);
            for addr in wanted {
                let is_self = addr == self.me
                    || addr
                        .as_str()
                        .parse::<SocketAddr>()
                        .is_ok_and(|sa| self.my_addrs.contains(&sa));
                let alive = old.iter().any(|m| m.addr == addr && m.alive);
                members.push(Member::new(addr, is_self, alive));
            }
            if !members.iter().any(|m| m.is_self) {
                members.push(Member::new(self.me.clone(), true, true));
                members.sort_by(|a, b| a.addr.cmp(&b.addr));
            }
            let before: Vec<&PeerAddr> = old.iter().map(|m| &m.addr).collect();
            let after: Vec<&PeerAddr> = members.iter().map(|m| &m.addr).collect();
            if before != after {
                tracing::info!(peers = ?after, "cluster peer set changed");
            }
            state.members = members;
        }
        self.publish_gauges();
    }

    pub(crate) fn secret(&self) -> &Secret {
        &self.secret
    }

    pub(crate) fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    pub(crate) fn http(&self) -> &Client<HttpConnector, Empty<Bytes>> {
        &self.client
    }

    pub(crate) fn stats(&self) -> &Arc<stats::Stats> {
        &self.stats
    }
}

/// Whether `peer` (a host name or address) resolves to one of this host's advertise addresses.
async fn is_same_host(peer: &PeerAddr, mine: &[SocketAddr], resolver: &Resolver) -> bool {
    if mine.is_empty() {
        return false;
    }
    let theirs = match peer.as_str().parse::<SocketAddr>() {
        Ok(sa) => vec![sa],
        Err(_) => (resolver)(peer.as_str().to_string())
            .await
            .unwrap_or_default(),
    };
    theirs.iter().any(|t| mine.contains(t))
}

/// The background rounds a cluster runs until it is dropped.
#[derive(Clone, Copy)]
enum Round {
    Health,
    Dns,
}

/// Runs `round` at its interval (the first after one interval) while the cluster lives.
async fn every(cluster: Weak<Cluster>, round: Round) {
    let Some(interval) = cluster.upgrade().map(|c| match round {
        Round::Health => c.tuning.health_interval,
        Round::Dns => c.tuning.dns_interval,
    }) else {
        return;
    };
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(c) = cluster.upgrade() else { return };
        match round {
            Round::Health => c.check_health_once().await,
            Round::Dns => c.resolve_once().await,
        }
    }
}

/// The query string of a fill request: every chunk key field.
pub(crate) fn fill_query(key: &ChunkKey) -> String {
    let o = &key.object;
    form_urlencoded::Serializer::new(String::new())
        .append_pair("origin_id", &o.origin_id)
        .append_pair("bucket", &o.bucket)
        .append_pair("key", &o.key)
        .append_pair("etag", &o.etag)
        .append_pair("chunk_size", &key.chunk_size.to_string())
        .append_pair("index", &key.index.to_string())
        .append_pair("object_size", &o.size.to_string())
        .finish()
}

/// Rebuilds the chunk key from a fill request's query; None unless every field is there once
/// and the chunk is a non-empty part of the object.
pub(crate) fn parse_fill_query(query: &str) -> Option<ChunkKey> {
    let mut fields: [Option<String>; 7] = Default::default();
    const NAMES: [&str; 7] = [
        "origin_id",
        "bucket",
        "key",
        "etag",
        "chunk_size",
        "index",
        "object_size",
    ];
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let i = NAMES.iter().position(|n| *n == name)?;
        if fields[i].replace(value.into_owned()).is_some() {
            return None;
        }
    }
    let [origin_id, bucket, key, etag, chunk_size, index, object_size] = fields;
    let chunk_size: u64 = chunk_size?.parse().ok()?;
    let index: u64 = index?.parse().ok()?;
    let size: u64 = object_size?.parse().ok()?;
    if chunk_size == 0 || index.checked_mul(chunk_size)? >= size {
        return None;
    }
    let object = Arc::new(ObjectVersion {
        origin_id: origin_id?.into(),
        bucket: bucket?.into(),
        key: key?.into(),
        etag: etag?.into(),
        size,
    });
    Some(ChunkKey::new(object, chunk_size, index))
}

/// Renders `(name, help, value)` counters (e.g. `Metrics::snapshot()`) in Prometheus text
/// format as `<prefix>_<name>_total`, for an [`Observe::metrics_text`].
pub fn render_counters(prefix: &str, counters: &[(&str, &str, u64)]) -> String {
    let mut out = String::new();
    for (name, help, value) in counters {
        let full = format!("{prefix}_{name}_total");
        out.push_str(&format!(
            "# HELP {full} {}\n# TYPE {full} counter\n{full} {value}\n",
            escape_help(help)
        ));
    }
    out
}

/// Renders one gauge in Prometheus text format, for an [`Observe::metrics_text`].
pub fn render_gauge(name: &str, help: &str, value: f64) -> String {
    format!(
        "# HELP {name} {}\n# TYPE {name} gauge\n{name} {value}\n",
        escape_help(help)
    )
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A body-error type both sides use.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(test)]
mod tests;
