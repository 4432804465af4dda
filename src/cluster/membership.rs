//! membership: who is in the cluster and who is alive, as this host sees it.
//!
//! Owns the [`PeerSet`] inside [`Cluster`]: this host's own name, the members and their health,
//! the DNS re-resolution, and the background rounds that keep them current. Answers which peer
//! coordinates a chunk ([`Cluster::coordinator_for`]) by rendezvous hashing over the members
//! alive. Must not touch the fill RPC, the secret or the wire format; it uses `client` for health
//! checks only.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use sha2::Sha256;
use tokio::time::Instant;

use super::rendezvous::{peer_hasher, weigh};
use super::wire::{BYE_PATH, HELLO_PATH};
use super::{client, config_err, Cluster, ClusterError};
use crate::chunk::ChunkId;
use crate::config::cluster::ClusterConfig;
use crate::peer::PeerAddr;

/// How long a failed DNS resolution keeps the last good peer set before falling back to self.
pub const DNS_GRACE: Duration = Duration::from_secs(60);

/// Consecutive failed health checks before a peer is considered dead. (A refused connection
/// during a fill marks it dead at once.)
const DEAD_AFTER_FAILURES: u32 = 2;

/// Resolves a `name:port` to socket addresses (replaceable in tests).
pub(crate) type Resolver =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

pub(super) fn system_resolver() -> Resolver {
    Arc::new(|name: String| {
        async move { Ok(tokio::net::lookup_host(name).await?.collect()) }.boxed()
    })
}

/// Where the peer set comes from.
#[derive(Debug, Clone)]
pub(super) enum Source {
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

/// This host's view of the peer set.
pub(super) struct PeerSet {
    me: PeerAddr,
    /// What the advertise address resolves to (any of them is this host).
    my_addrs: Vec<SocketAddr>,
    source: Source,
    resolver: Resolver,
    state: RwLock<PeerState>,
    /// Asks for a health round now: a peer disagreed about who coordinates a chunk.
    recheck: Arc<tokio::sync::Notify>,
}

/// Shortest time between two health rounds asked for by disagreements.
const MIN_RECHECK_GAP: Duration = Duration::from_millis(250);

impl PeerSet {
    /// The checks between `[cluster]` keys (each value's form is checked by `config`): where the
    /// peer set comes from, and an `advertise` the peers can reach.
    pub(super) fn source(cfg: &ClusterConfig) -> Result<Source, ClusterError> {
        let advertise = cfg.advertise.as_ref().unwrap_or(&cfg.listen).as_str();
        if let Ok(sa) = advertise.parse::<SocketAddr>() {
            if sa.ip().is_unspecified() {
                return Err(config_err(
                    "advertise",
                    advertise,
                    "peers cannot reach an unspecified address; set `advertise` to this host's address",
                ));
            }
        }
        match (&cfg.dns, cfg.peers.is_empty()) {
            (Some(_), false) => Err(config_err(
                "peers",
                cfg.peers
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                "give either `peers` or `dns`, not both",
            )),
            (None, true) => Err(config_err(
                "peers",
                "",
                "give the peer set as `peers = [\"HOST:PORT\", …]` or `dns = \"NAME:PORT\"`",
            )),
            (Some(name), true) => Ok(Source::Dns(name.as_str().to_string())),
            (None, false) => Ok(Source::Static),
        }
    }

    /// Names this host and, for a static set, lists the members (peers dead until checked).
    pub(super) async fn new(
        cfg: &ClusterConfig,
        source: Source,
        resolver: Resolver,
    ) -> Result<PeerSet, ClusterError> {
        let advertise = cfg.advertise.as_ref().unwrap_or(&cfg.listen).as_str();
        // Who am I: the advertise address, and whatever it resolves to.
        let my_addrs = addrs_of(advertise, &resolver).await;
        let mut me = PeerAddr::new(advertise);
        let mut members = Vec::new();
        let mut known = false;
        if let Source::Static = source {
            for p in &cfg.peers {
                let addr = PeerAddr::new(p.as_str());
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
        Ok(PeerSet {
            me,
            my_addrs,
            source,
            resolver,
            state: RwLock::new(PeerState {
                members,
                known,
                last_dns_ok: Instant::now(),
                dns_failing: false,
            }),
            recheck: Arc::default(),
        })
    }

    /// This host's name in the peer set.
    pub(super) fn me(&self) -> &PeerAddr {
        &self.me
    }

    fn read(&self) -> RwLockReadGuard<'_, PeerState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, PeerState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Cluster {
    /// Resolves a DNS peer set once, checks every peer once, then keeps doing both in the
    /// background while the cluster lives.
    pub(super) async fn start_rounds(self: &Arc<Self>) {
        if let Source::Dns(_) = self.peer_set.source {
            self.resolve_once().await;
            tokio::spawn(every(Arc::downgrade(self), Round::Dns));
        }
        self.check_health_once().await;
        tokio::spawn(every(Arc::downgrade(self), Round::Health));
    }

    /// This host's name in the peer set.
    pub fn advertise(&self) -> &PeerAddr {
        &self.peer_set.me
    }

    /// The peer that coordinates this chunk, or None when it is this host (or the cluster has
    /// only self alive).
    pub fn coordinator_for(&self, id: &ChunkId) -> Option<PeerAddr> {
        let state = self.peer_set.read();
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
        self.peer_set
            .read()
            .members
            .iter()
            .map(|m| (m.addr.clone(), m.alive))
            .collect()
    }

    /// Whether the peer set is known (static, resolved, or decided to be self only).
    pub fn peer_set_known(&self) -> bool {
        self.peer_set.read().known
    }

    /// An authenticated request or answer from `peer`: it is alive, whatever the last health
    /// check said. So views converge as soon as members talk, not a health round later.
    pub(super) fn note_contact(&self, peer: &PeerAddr) {
        let was_dead = self
            .peer_set
            .read()
            .members
            .iter()
            .any(|m| &m.addr == peer && !m.is_self && !m.alive);
        if was_dead {
            tracing::info!(%peer, "peer is alive (it contacted us)");
            self.set_alive(peer, true);
        }
    }

    /// Every member but this host.
    fn others(&self) -> Vec<PeerAddr> {
        self.peer_set
            .read()
            .members
            .iter()
            .filter(|m| !m.is_self)
            .map(|m| m.addr.clone())
            .collect()
    }

    /// A peer answered that it does not coordinate a chunk we thought it did: our views differ.
    /// The next health round runs now (at most every 250 ms), so the disagreement, and the
    /// duplicate fills it causes, last one round trip, not a health interval.
    pub(super) fn recheck_soon(&self) {
        self.peer_set.recheck.notify_one();
    }

    /// `peer` announced that it stops: out of the coordinator choice at once.
    pub(super) fn note_leaving(&self, peer: &PeerAddr) {
        tracing::info!(%peer, "peer is leaving");
        self.set_alive(peer, false);
    }

    /// Tells every other member that this host has started (`hello`) or stops, concurrently,
    /// each within the health timeout. A member that answers is alive; one that does not is
    /// left to the health checks (it may not be serving yet: it announces itself when it is).
    pub async fn announce(&self, hello: bool) {
        let path = if hello { HELLO_PATH } else { BYE_PATH };
        let targets = self.others();
        let calls = targets.iter().map(|p| async move {
            let answered = client::announce(self, p, path).await;
            (p, answered)
        });
        for (peer, answered) in futures::future::join_all(calls).await {
            if hello && answered {
                self.note_contact(peer);
            }
        }
        self.publish_gauges();
    }

    pub(super) fn set_alive(&self, peer: &PeerAddr, alive: bool) {
        let changed = {
            let mut state = self.peer_set.write();
            match state
                .members
                .iter_mut()
                .find(|m| &m.addr == peer && !m.is_self)
            {
                Some(m) => {
                    if alive {
                        m.failures = 0;
                    }
                    std::mem::replace(&mut m.alive, alive) != alive
                }
                None => false,
            }
        };
        if changed {
            self.publish_gauges();
        }
    }

    fn publish_gauges(&self) {
        let state = self.peer_set.read();
        let alive = state.members.iter().filter(|m| m.alive).count();
        self.stats.peers.set(state.members.len() as i64);
        self.stats.peers_alive.set(alive as i64);
    }

    /// Counts a failed health check; true while the peer still gets the benefit of the doubt.
    fn tolerate_failure(&self, peer: &PeerAddr) -> bool {
        let mut state = self.peer_set.write();
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
        let targets = self.others();
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
                .peer_set
                .read()
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
        let Source::Dns(name) = &self.peer_set.source else {
            return;
        };
        let result = tokio::time::timeout(
            self.tuning.dns_interval.max(Duration::from_secs(1)),
            (self.peer_set.resolver)(name.clone()),
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
                let mut state = self.peer_set.write();
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
            let set = &self.peer_set;
            let mut state = set.write();
            if state.dns_failing {
                tracing::info!("cluster peer set resolves again");
            }
            state.dns_failing = false;
            state.known = true;
            state.last_dns_ok = Instant::now();
            let old = std::mem::take(&mut state.members);
            let mut members = Vec::with_capacity(wanted.len() + 1);
            for addr in wanted {
                let is_self = addr == set.me
                    || addr
                        .as_str()
                        .parse::<SocketAddr>()
                        .is_ok_and(|sa| set.my_addrs.contains(&sa));
                let alive = old.iter().any(|m| m.addr == addr && m.alive);
                members.push(Member::new(addr, is_self, alive));
            }
            if !members.iter().any(|m| m.is_self) {
                members.push(Member::new(set.me.clone(), true, true));
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
}

/// Whether `peer` (a host name or address) resolves to one of this host's advertise addresses.
async fn is_same_host(peer: &PeerAddr, mine: &[SocketAddr], resolver: &Resolver) -> bool {
    if mine.is_empty() {
        return false;
    }
    let theirs = addrs_of(peer.as_str(), resolver).await;
    theirs.iter().any(|t| mine.contains(t))
}

/// The addresses of a `host:port`: itself when it is an IP literal, else what it resolves to
/// (none when it does not).
async fn addrs_of(host_port: &str, resolver: &Resolver) -> Vec<SocketAddr> {
    match host_port.parse::<SocketAddr>() {
        Ok(sa) => vec![sa],
        Err(_) => (resolver)(host_port.to_string()).await.unwrap_or_default(),
    }
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
        let asked = match (round, cluster.upgrade()) {
            (_, None) => return,
            (Round::Health, Some(c)) => {
                // Not holding the cluster while waiting: the loop ends once it is dropped.
                let recheck = c.peer_set.recheck.clone();
                drop(c);
                tokio::select! {
                    _ = tick.tick() => false,
                    _ = recheck.notified() => true,
                }
            }
            (Round::Dns, Some(_)) => {
                tick.tick().await;
                false
            }
        };
        let Some(c) = cluster.upgrade() else { return };
        match round {
            Round::Health => c.check_health_once().await,
            Round::Dns => c.resolve_once().await,
        }
        drop(c);
        if asked {
            tokio::time::sleep(MIN_RECHECK_GAP).await;
        }
    }
}
