//! origin::fleet: listings and HEADs as a fleet resource. Each prefix (for LIST pages) and each
//! key (for HEAD) has a coordinator host, chosen by rendezvous hashing like a chunk's; the
//! coordinator asks the origin and keeps the answer for the metadata TTL, and the other hosts
//! ask the coordinator over the cluster's authenticated RPC. So a fleet listing one prefix sends
//! each LIST page to the origin once per TTL, not once per host. When the coordinator is gone or
//! fails, the host asks the origin itself: never an error the origin could have answered.
//!
//! [`FleetOrigin`] is an [`Origin`]: `namespace` holds it like any other and knows nothing of
//! peers. GETs of bytes pass straight through (chunks have their own coordinators in `fetch`).
//! The peers are reached through [`MetaPeers`] (implemented by `cluster`, wired in `mount`), to
//! which answers are opaque JSON bytes, so `cluster` never learns the origin's types.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;

use super::{ListPage, ObjectMeta, Origin, OriginError, RangeBody};
use crate::peer::{PeerAddr, PeerError};

/// What a metadata request asks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MetaQuery {
    List {
        prefix: String,
        token: Option<String>,
        max_keys: i32,
    },
    Head {
        key: String,
    },
}

impl MetaQuery {
    /// The name whose coordinator answers it: the prefix of a listing, the key of a HEAD.
    pub fn name(&self) -> String {
        match self {
            MetaQuery::List { prefix, .. } => format!("list:{prefix}"),
            MetaQuery::Head { key } => format!("head:{key}"),
        }
    }
}

/// The other hosts, as the fleet origin sees them (see `cluster`).
#[async_trait::async_trait]
pub trait MetaPeers: Send + Sync + 'static {
    /// The peer that coordinates `name`, or None when this host does.
    fn coordinator_for_name(&self, name: &str) -> Option<PeerAddr>;
    /// The coordinator's answer to `query` (JSON of `Result<ListPage | ObjectMeta, String>`).
    async fn ask(&self, peer: &PeerAddr, query: &MetaQuery) -> Result<Bytes, PeerError>;
}

/// An answer as it travels: the origin's result, its error as text (a peer's origin error is
/// reported, then asked again locally).
#[derive(serde::Serialize, serde::Deserialize)]
enum Answer {
    Page(ListPage),
    Meta(ObjectMeta),
    NotFound,
}

/// Most answers the coordinator keeps (a page is up to 1000 entries).
const CACHED_ANSWERS: usize = 256;

pub struct FleetOrigin {
    inner: Arc<dyn Origin>,
    peers: OnceLock<Arc<dyn MetaPeers>>,
    ttl: Duration,
    /// Answers this host coordinates, each for the TTL.
    answers: Arc<Mutex<Answers>>,
    /// Queries being asked of the origin right now: concurrent askers (this host's and peers')
    /// wait for the one request, which runs in a task of its own so that an asker who gives up
    /// (a lookup drops its HEAD once the LIST shows a directory) does not cancel it.
    inflight: Arc<Mutex<HashMap<MetaQuery, Arc<InFlight>>>>,
}

type Answers = LruCache<MetaQuery, (Instant, Arc<Answer>)>;

type InFlight = tokio::sync::OnceCell<Result<Arc<Answer>, OriginError>>;

impl FleetOrigin {
    pub fn new(inner: Arc<dyn Origin>, ttl: Duration) -> Arc<FleetOrigin> {
        Arc::new(FleetOrigin {
            inner,
            peers: OnceLock::new(),
            ttl,
            answers: Arc::new(Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHED_ANSWERS).unwrap_or(NonZeroUsize::MIN),
            ))),
            inflight: Arc::default(),
        })
    }

    /// Joins the cluster: from now on metadata another host coordinates is asked of it.
    pub fn set_peers(&self, peers: Arc<dyn MetaPeers>) {
        let _ = self.peers.set(peers);
    }

    fn answers(&self) -> MutexGuard<'_, Answers> {
        lock(&self.answers)
    }

    /// The answer as this host gives it, never asking a peer: from its cache within the TTL,
    /// else from the origin. What the cluster server answers a peer with, as JSON.
    pub async fn answer_local(&self, query: &MetaQuery) -> Result<Bytes, String> {
        let answer = self.local(query).await.map_err(|e| e.to_string())?;
        serde_json::to_vec(&*answer)
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }

    async fn local(&self, query: &MetaQuery) -> Result<Arc<Answer>, OriginError> {
        if let Some((at, a)) = self.answers().get(query) {
            if at.elapsed() < self.ttl {
                return Ok(a.clone());
            }
        }
        let cell = lock(&self.inflight)
            .entry(query.clone())
            .or_default()
            .clone();
        let (inner, answers, inflight) = (
            self.inner.clone(),
            self.answers.clone(),
            self.inflight.clone(),
        );
        let q = query.clone();
        let task = tokio::spawn(async move {
            let result = cell
                .get_or_init(|| async {
                    let r = ask_origin(&*inner, &q).await;
                    if let Ok(a) = &r {
                        lock(&answers).put(q.clone(), (Instant::now(), a.clone()));
                    }
                    lock(&inflight).remove(&q);
                    r
                })
                .await;
            result.clone()
        });
        task.await
            .unwrap_or_else(|_| Err(OriginError::Other("metadata request task failed".into())))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn ask_origin(inner: &dyn Origin, query: &MetaQuery) -> Result<Arc<Answer>, OriginError> {
    let answer = Arc::new(match query {
        MetaQuery::List {
            prefix,
            token,
            max_keys,
        } => Answer::Page(inner.list_page(prefix, token.clone(), *max_keys).await?),
        MetaQuery::Head { key } => match inner.head(key).await {
            Ok(m) => Answer::Meta(m),
            Err(OriginError::NotFound(_)) => Answer::NotFound,
            Err(e) => return Err(e),
        },
    });
    Ok(answer)
}

impl FleetOrigin {
    /// The answer from the coordinator of `query`, or from here when this host coordinates it
    /// or the coordinator cannot answer.
    async fn resolve(&self, query: MetaQuery) -> Result<Arc<Answer>, OriginError> {
        let Some(peers) = self.peers.get() else {
            // No fleet: ask the origin as the caller would, cancellable, nothing kept.
            return ask_origin(&*self.inner, &query).await;
        };
        let Some(peer) = peers.coordinator_for_name(&query.name()) else {
            return self.local(&query).await;
        };
        match peers.ask(&peer, &query).await {
            Ok(bytes) => match serde_json::from_slice::<Answer>(&bytes) {
                Ok(a) => return Ok(Arc::new(a)),
                Err(e) => tracing::warn!(%peer, error = %e, "peer sent an unreadable answer"),
            },
            Err(e) => {
                tracing::debug!(%peer, error = %e, "metadata coordinator failed; asking the origin")
            }
        }
        self.local(&query).await
    }
}

#[async_trait::async_trait]
impl Origin for FleetOrigin {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, OriginError> {
        let query = MetaQuery::Head {
            key: key.to_string(),
        };
        match &*self.resolve(query).await? {
            Answer::Meta(m) => Ok(m.clone()),
            Answer::NotFound => Err(OriginError::NotFound(key.to_string())),
            Answer::Page(_) => Err(OriginError::Other("a listing answered a HEAD".into())),
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: i32,
    ) -> Result<ListPage, OriginError> {
        let query = MetaQuery::List {
            prefix: prefix.to_string(),
            token,
            max_keys,
        };
        match &*self.resolve(query).await? {
            Answer::Page(p) => Ok(p.clone()),
            _ => Err(OriginError::Other("a HEAD answered a listing".into())),
        }
    }

    async fn get_range(
        &self,
        key: &str,
        etag: &str,
        start: u64,
        len: u64,
    ) -> Result<RangeBody, OriginError> {
        self.inner.get_range(key, etag, start, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::fault::FaultOrigin;

    /// Two "hosts" over one origin, where host B's coordinator for everything is host A.
    struct ViaA(Arc<FleetOrigin>);

    #[async_trait::async_trait]
    impl MetaPeers for ViaA {
        fn coordinator_for_name(&self, _: &str) -> Option<PeerAddr> {
            Some(PeerAddr::new("127.0.0.1:1"))
        }
        async fn ask(&self, _: &PeerAddr, q: &MetaQuery) -> Result<Bytes, PeerError> {
            self.0.answer_local(q).await.map_err(PeerError::Request)
        }
    }

    /// The host that coordinates every name.
    struct Me;

    #[async_trait::async_trait]
    impl MetaPeers for Me {
        fn coordinator_for_name(&self, _: &str) -> Option<PeerAddr> {
            None
        }
        async fn ask(&self, _: &PeerAddr, _: &MetaQuery) -> Result<Bytes, PeerError> {
            unreachable!("never asked: this host coordinates")
        }
    }

    struct Gone;

    #[async_trait::async_trait]
    impl MetaPeers for Gone {
        fn coordinator_for_name(&self, _: &str) -> Option<PeerAddr> {
            Some(PeerAddr::new("127.0.0.1:1"))
        }
        async fn ask(&self, _: &PeerAddr, _: &MetaQuery) -> Result<Bytes, PeerError> {
            Err(PeerError::Connect("refused".into()))
        }
    }

    #[tokio::test]
    async fn a_prefix_is_listed_once_per_ttl_for_the_fleet_and_a_gone_coordinator_falls_back() {
        let origin = Arc::new(FaultOrigin::new("b"));
        for i in 0..2500 {
            origin.put(&format!("d/f{i:05}"), Bytes::from_static(b"x"));
        }
        let a = FleetOrigin::new(origin.clone(), Duration::from_secs(60));
        let b = FleetOrigin::new(origin.clone(), Duration::from_secs(60));
        a.set_peers(Arc::new(Me));
        b.set_peers(Arc::new(ViaA(a.clone())));
        let mut pages = 0;
        for host in [&a, &b, &b] {
            let mut token = None;
            loop {
                let p = host.list_page("d/", token, 1000).await.unwrap();
                pages += 1;
                token = p.next_token;
                if token.is_none() {
                    break;
                }
            }
        }
        assert_eq!(pages, 9);
        assert_eq!(origin.lists(), 3, "each page from the origin once");
        assert_eq!(b.head("d/f00001").await.unwrap().size, 1);
        assert_eq!(b.head("d/f00001").await.unwrap().size, 1);
        assert_eq!(origin.heads(), 1);
        assert!(matches!(
            b.head("missing").await,
            Err(OriginError::NotFound(_))
        ));

        let c = FleetOrigin::new(origin.clone(), Duration::from_secs(60));
        c.set_peers(Arc::new(Gone));
        assert_eq!(
            c.list_page("d/", None, 1000).await.unwrap().objects.len(),
            1000
        );
        assert_eq!(
            origin.lists(),
            4,
            "a gone coordinator: one fallback to the origin"
        );
    }
}
