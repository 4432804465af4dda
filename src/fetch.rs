//! fetch: the [`Fetcher`] every chunk read goes through.
//!
//! `read_chunk` resolves a chunk in this order: a fill already in flight on this host (join it),
//! the local disk cache, else a new fill from the origin. One fill per chunk per host
//! (singleflight): concurrent readers of a cold chunk cause one origin GET.
//!
//! A [`Fill`] is a buffer that readers consume while it grows: a reader waits only until the
//! bytes it asked for have arrived, not for the whole chunk. The fill runs in its own task, so it
//! completes and is committed to the disk cache after the readers are served, even when the
//! reader that started it has gone. A fill that fails or comes up short is never committed; every
//! waiting reader gets the error and the next read starts a new fill.
//!
//! Origin policy ([`FetchPolicy`]): a failed GET (5xx, SlowDown, timeout, reset, a body that
//! stalls or breaks) is retried with exponential backoff inside a budget of attempts and total
//! time; once bytes have been received, the retry is a new ranged GET from the current offset
//! (still pinned to the ETag), so readers never see a short chunk. 404, 403 and 412 (ETag
//! changed) are final. A semaphore caps concurrent origin GETs per host (with a queue timeout).
//!
//! Memory: every fill holds permits for its length from one budget (`memory_limit`) until it is
//! committed and dropped. A reader's fill waits for room; readahead takes at most three
//! quarters of the budget and is skipped beyond that. A sequential reader's readahead window
//! starts small and doubles each time the reader enters a chunk still being filled
//! (`readahead_chunks` up to `readahead_max_chunks`): a remote origin gives each connection a
//! share of its bandwidth, so long reads from it need many GETs in flight, while a fast origin
//! keeps ahead with a few.
//! So fill memory is bounded by configuration, not by object sizes or the number of readers.
//! A fill that completes before its reader has read it to the end is kept, with its memory, for
//! that reader ([`ahead`]; at most a quarter of the budget, and only while fills take at most
//! three quarters of it), and given up when a reader's fill wants the room. A fill holds its
//! bytes in page-aligned segments ([`SEGMENT`]), so the kernel's reads and the commit's O_DIRECT
//! writes take them without another copy.
//!
//! Must not know about inodes or FUSE.

mod ahead;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::cachestore::{collect, BlockCrcs, CacheStore, ChunkStream, LocalFile, StoreError};
use crate::chunk::{self, chunk_count, ChunkId, ChunkKey, ObjectVersion};
use crate::metrics::Metrics;
use crate::origin::{Origin, OriginError};
use crate::pagebuf;
use crate::peer::{PeerAddr, PeerError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("chunk fill stopped before completion")]
    Abandoned,
    #[error("no origin connection slot free within {0:?}")]
    QueueTimeout(Duration),
}

impl FetchError {
    pub fn is_etag_changed(&self) -> bool {
        matches!(self, FetchError::Origin(OriginError::EtagChanged { .. }))
    }

    /// The version read is no longer the object at the origin: replaced or deleted.
    pub fn is_version_gone(&self) -> bool {
        self.is_etag_changed() || matches!(self, FetchError::Origin(OriginError::NotFound(_)))
    }
}

/// How fills talk to the origin and how much they may hold.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    pub chunk_size: u64,
    /// Attempts per fill, first included.
    pub max_attempts: u32,
    /// Total time a fill may spend before giving up.
    pub retry_time: Duration,
    /// A body that delivers nothing for this long is broken.
    pub stall_timeout: Duration,
    /// How long a fill waits for an origin connection slot.
    pub queue_timeout: Duration,
    pub max_origin_requests: usize,
    /// A sequential reader's readahead window when it starts, in chunks (0: no readahead).
    pub readahead_chunks: u64,
    /// The most its window grows to (it doubles each time the reader catches up with it).
    pub readahead_max_chunks: u64,
    pub memory_limit: u64,
}

/// Other hosts of the cluster that may fill a chunk for us (see `cluster`).
#[async_trait::async_trait]
pub trait Peers: Send + Sync + 'static {
    /// The peer that coordinates this chunk, or None when this host does.
    fn coordinator_for(&self, key: &ChunkKey) -> Option<PeerAddr>;
    /// The chunk's bytes as the peer fills them; Err when the peer fill could not start.
    async fn fetch(&self, peer: &PeerAddr, key: &ChunkKey) -> Result<ChunkStream, PeerError>;
}

/// Whether a fill may be delegated to the chunk's coordinator peer. Fills started for a peer's
/// request are `LocalOnly`: internal requests are never forwarded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    ViaCoordinator,
    LocalOnly,
}

/// How a read relates to the handle's earlier ones (told by `fs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Continues (or starts) a sequential pattern: whole chunks, readahead.
    Sequential,
    /// Lands away from the previous read: only the blocks around it are fetched.
    Random,
}

/// The unit a random read fetches and the local cache keeps: aligned with the disk's blocks.
pub const RANDOM_BLOCK: u64 = 64 << 10;

/// Where a chunk read is served from.
enum Source {
    Fill(Arc<Fill>),
    Stored(ChunkStream),
}

/// Memory permits are counted in KiB so that large budgets fit a semaphore.
const PERMIT_BYTES: u64 = 1024;

/// How long a fill kept for its reader holds its room against new readahead.
const STALE_AHEAD: Duration = Duration::from_secs(2);

pub struct Fetcher {
    origin: Arc<dyn Origin>,
    store: Arc<dyn CacheStore>,
    policy: FetchPolicy,
    inflight: Mutex<HashMap<ChunkId, Arc<Fill>>>,
    /// Block fills of random reads in flight, by chunk and first byte (singleflight too).
    blocks_inflight: Mutex<HashMap<(ChunkId, u64), Arc<Fill>>>,
    origin_slots: Semaphore,
    memory: Arc<Semaphore>,
    memory_permits: u32,
    /// Complete fills kept for the reader that has not read them yet.
    ahead: ahead::Ahead,
    peers: OnceLock<Arc<dyn Peers>>,
    metrics: Arc<Metrics>,
}

impl Fetcher {
    pub fn new(
        origin: Arc<dyn Origin>,
        store: Arc<dyn CacheStore>,
        policy: FetchPolicy,
        metrics: Arc<Metrics>,
    ) -> Arc<Fetcher> {
        let memory_permits = (policy.memory_limit / PERMIT_BYTES).clamp(1, u32::MAX as u64) as u32;
        Arc::new(Fetcher {
            origin,
            store,
            origin_slots: Semaphore::new(policy.max_origin_requests),
            memory: Arc::new(Semaphore::new(memory_permits as usize)),
            memory_permits,
            ahead: ahead::Ahead::new(policy.memory_limit / 4),
            policy,
            inflight: Mutex::new(HashMap::new()),
            blocks_inflight: Mutex::new(HashMap::new()),
            peers: OnceLock::new(),
            metrics,
        })
    }

    /// Joins the cluster: from now on a chunk coordinated by a peer is streamed from it.
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    pub fn chunk_size(&self) -> u64 {
        self.policy.chunk_size
    }

    /// Chunk fills running on this host.
    pub fn fills_in_flight(&self) -> usize {
        self.inflight().len()
    }

    /// Bytes of the memory budget held by fills right now.
    pub fn memory_in_use(&self) -> u64 {
        (self.memory_permits as u64 - self.memory.available_permits() as u64) * PERMIT_BYTES
    }

    fn permits_for(&self, len: u64) -> u32 {
        (len.div_ceil(PERMIT_BYTES) as u32).clamp(1, self.memory_permits)
    }

    /// The permits that readahead and kept fills leave free for readers' own fills: a quarter
    /// of the budget, so one reader's window of 16 chunks fits the default budget (a remote
    /// origin needs that many GETs in flight: bench row 1e).
    fn readers_reserve(&self) -> u32 {
        self.memory_permits / 4
    }

    fn inflight(&self) -> MutexGuard<'_, HashMap<ChunkId, Arc<Fill>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes `[offset, offset+len)` of an object version, clipped to its size.
    pub async fn read_object(
        self: &Arc<Self>,
        object: &Arc<ObjectVersion>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, FetchError> {
        self.read_object_as(object, offset, len, Access::Sequential)
            .await
    }

    /// [`Self::read_object`], for a read of the given access pattern: a random read of a chunk
    /// that is neither cached nor filling fetches only the blocks around it.
    pub async fn read_object_as(
        self: &Arc<Self>,
        object: &Arc<ObjectVersion>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<Bytes, FetchError> {
        let cs = self.policy.chunk_size;
        let spans: Vec<_> = chunk::spans(offset, len, object.size, cs).collect();
        match spans.as_slice() {
            [] => Ok(Bytes::new()),
            [one] if access == Access::Random && cs % RANDOM_BLOCK == 0 => {
                let key = ChunkKey::new(object.clone(), cs, one.index);
                self.read_blocks(&key, one.offset, one.len).await
            }
            [one] => {
                let key = ChunkKey::new(object.clone(), cs, one.index);
                self.read_chunk(&key, one.offset, one.len, Route::ViaCoordinator)
                    .await
            }
            many => {
                // A read across a chunk boundary: resolve the chunks concurrently.
                let tasks: Vec<_> = many
                    .iter()
                    .map(|s| {
                        let this = self.clone();
                        let key = ChunkKey::new(object.clone(), cs, s.index);
                        let (off, n) = (s.offset, s.len);
                        tokio::spawn(async move {
                            this.read_chunk(&key, off, n, Route::ViaCoordinator).await
                        })
                    })
                    .collect();
                let mut out = pagebuf::with_capacity(len as usize);
                for t in tasks {
                    let part = t.await.map_err(|_| FetchError::Abandoned)??;
                    out.extend_from_slice(&part);
                }
                Ok(pagebuf::freeze(out))
            }
        }
    }

    /// `len` bytes at `offset` inside one chunk.
    pub async fn read_chunk(
        self: &Arc<Self>,
        key: &ChunkKey,
        offset: u64,
        len: u64,
        route: Route,
    ) -> Result<Bytes, FetchError> {
        let mut use_store = true;
        loop {
            match self.resolve(key, offset, len, route, use_store).await? {
                Source::Fill(fill) => return fill.read(offset, len).await,
                Source::Stored(stream) => match collect(stream).await {
                    Ok(bytes) => return Ok(bytes),
                    Err(e) => {
                        // A broken cache never fails a read the origin can serve.
                        tracing::warn!(?key, error = %e, "cache read failed; fetching from origin");
                        use_store = false;
                    }
                },
            }
        }
    }

    /// Where a chunk's bytes come from: a fill in flight (joined), the cache store, or a new
    /// fill. The new fill is decided under the in-flight lock, after re-checking that nobody
    /// started or committed it while we looked in the store: that recheck is what keeps it one
    /// fill per chunk. When the store says without I/O that the chunk is not here (the local
    /// disk's index), the store's slower tiers (the shared store) are asked by the fill itself,
    /// so concurrent readers of such a chunk cost one shared-store read, not one each.
    async fn resolve(
        self: &Arc<Self>,
        key: &ChunkKey,
        offset: u64,
        len: u64,
        route: Route,
        use_store: bool,
    ) -> Result<Source, FetchError> {
        let id = key.id();
        let mut rechecked = false;
        loop {
            if let Some(fill) = self.join(&id) {
                return Ok(Source::Fill(fill));
            }
            let here = self.store.contains_range_hint(key, offset, len);
            let local_miss = here.or_else(|| self.store.contains_hint(key)) == Some(false);
            if use_store && !local_miss {
                match self.store.get_chunk(key, offset, len).await {
                    Ok(Some(stream)) => return Ok(Source::Stored(stream)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(?key, error = %e, "cache store failed; treating as a miss")
                    }
                }
            }
            // Room in the memory budget first: waiting here is the back pressure.
            let permit = self.memory_permit(key.len()).await?;
            let mut map = self.inflight();
            if let Some(fill) = map.get(&id) {
                Metrics::inc(&self.metrics.fill_joins);
                return Ok(Source::Fill(fill.clone()));
            }
            // Committed meanwhile: read it from the store (once; a hint that keeps disagreeing
            // with the store must not loop us forever).
            if use_store && !rechecked && self.is_stored(key) {
                rechecked = true;
                continue;
            }
            let store_checked = !(use_store && local_miss);
            return Ok(Source::Fill(self.start_fill(
                &mut map,
                key.clone(),
                id,
                permit,
                route,
                store_checked,
            )));
        }
    }

    /// `len` bytes at `offset` inside a chunk, for a random read: a fill of the chunk in
    /// flight, the store (whole chunk or just these blocks), else a fill of only the aligned
    /// blocks around the bytes, straight from the origin (one per host: concurrent readers of
    /// the same blocks share it), kept in the local cache after it served.
    async fn read_blocks(
        self: &Arc<Self>,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, FetchError> {
        if let Some(fill) = self.join(&key.id()) {
            return fill.read(offset, len).await;
        }
        match self.store.get_chunk(key, offset, len).await {
            Ok(Some(stream)) => match collect(stream).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) => {
                    tracing::warn!(?key, error = %e, "cache read failed; fetching from origin")
                }
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(?key, error = %e, "cache store failed; treating as a miss"),
        }
        let first = offset / RANDOM_BLOCK * RANDOM_BLOCK;
        let end = (offset + len).div_ceil(RANDOM_BLOCK) * RANDOM_BLOCK;
        let end = end.min(key.len());
        let fill = self.block_fill(key, first, end - first).await?;
        fill.read(offset - first, len).await
    }

    /// The fill of blocks `[start, start+len)` of a chunk: joined if in flight, else started.
    async fn block_fill(
        self: &Arc<Self>,
        key: &ChunkKey,
        start: u64,
        len: u64,
    ) -> Result<Arc<Fill>, FetchError> {
        let slot = (key.id(), start);
        if let Some(fill) = self.blocks().get(&slot).filter(|f| f.len == len).cloned() {
            Metrics::inc(&self.metrics.fill_joins);
            return Ok(fill);
        }
        let permit = self.memory_permit(len).await?;
        let mut map = self.blocks();
        if let Some(fill) = map.get(&slot).filter(|f| f.len == len).cloned() {
            Metrics::inc(&self.metrics.fill_joins);
            return Ok(fill);
        }
        let fill = Arc::new(Fill::new(len, Some(permit)));
        map.insert(slot, fill.clone());
        drop(map);
        Metrics::inc(&self.metrics.block_fills);
        let span = tracing::debug_span!("block fill", bucket = %key.object.bucket, key = %key.object.key, chunk = key.index, start, len);
        let (this, f, key) = (self.clone(), fill.clone(), key.clone());
        tokio::spawn(
            async move {
                let result = this
                    .fill_range_from_origin(&key.object, key.start() + start, len, &f)
                    .await;
                f.finish(result.clone());
                match result {
                    // Kept after serving, as a chunk fill is committed.
                    Ok(()) => {
                        if let Err(e) = this.store.put_blocks(&key, start, f.pieces()).await {
                            tracing::warn!(error = %e, "could not keep the blocks");
                        }
                    }
                    Err(e) => {
                        Metrics::inc(&this.metrics.fills_failed);
                        tracing::warn!(error = %e, "block fill failed");
                    }
                }
                this.blocks().remove(&slot);
            }
            .instrument(span),
        );
        Ok(fill)
    }

    fn blocks(&self) -> MutexGuard<'_, HashMap<(ChunkId, u64), Arc<Fill>>> {
        self.blocks_inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn join(&self, id: &ChunkId) -> Option<Arc<Fill>> {
        let fill = self.inflight().get(id).cloned();
        if fill.is_some() {
            Metrics::inc(&self.metrics.fill_joins);
        }
        fill
    }

    async fn memory_permit(&self, len: u64) -> Result<OwnedSemaphorePermit, FetchError> {
        let n = self.permits_for(len);
        loop {
            if let Ok(p) = self.memory.clone().try_acquire_many_owned(n) {
                return Ok(p);
            }
            // A reader's fill comes before fills kept for readers that have not come yet.
            if !self.ahead.release_older_than(Duration::ZERO) {
                break;
            }
        }
        tracing::debug!(len, "memory budget in use: waiting for room");
        self.memory
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| FetchError::Abandoned)
    }

    /// Prefetches the chunks after `index` for a sequential reader, as far as memory allows.
    pub fn readahead(self: &Arc<Self>, object: &Arc<ObjectVersion>, index: u64, window: u64) {
        let cs = self.policy.chunk_size;
        let count = chunk::chunk_count(object.size, cs);
        let last = (index + window).min(count.saturating_sub(1));
        // A chunk read from the cache: let the store read ahead of the reader within it too.
        self.will_read(&ChunkKey::new(object.clone(), cs, index));
        for i in index + 1..=last {
            if !self.prefetch(ChunkKey::new(object.clone(), cs, i)) {
                break;
            }
        }
    }

    /// The window a sequential reader's readahead has after it caught up with it (entered a
    /// chunk still being filled): double the last, within the policy's bounds. A remote origin
    /// gives each connection a share of its bandwidth, so a long read from it needs many chunk
    /// GETs in flight; a read that readahead keeps ahead of, or a short one, should not hold
    /// their memory.
    pub fn next_window(&self, window: u64) -> u64 {
        window.saturating_mul(2).clamp(
            self.policy.readahead_chunks,
            self.policy.readahead_max_chunks,
        )
    }

    /// True while chunk `index` of the object is being filled on this host.
    pub fn is_filling(&self, object: &Arc<ObjectVersion>, index: u64) -> bool {
        let key = ChunkKey::new(object.clone(), self.policy.chunk_size, index);
        self.inflight().contains_key(&key.id())
    }

    /// The window a sequential reader starts with.
    pub fn first_window(&self) -> u64 {
        self.policy.readahead_chunks
    }

    /// Starts filling `key` in the background unless it is cached or already filling.
    /// Never waits; returns false when the memory budget has no room (readahead stops).
    pub fn prefetch(self: &Arc<Self>, key: ChunkKey) -> bool {
        if key.is_empty() {
            return true;
        }
        let id = key.id();
        if self.is_stored(&key) {
            self.will_read(&key);
            return true;
        }
        if self.inflight().contains_key(&id) {
            return true;
        }
        // Readahead leaves readers' reserve (none when the budget holds a single chunk) to
        // their own fills: many readers' windows together never make a read wait long for room.
        let need = self.permits_for(key.len());
        let reserve = self.readers_reserve().min(self.memory_permits - need);
        while (self.memory.available_permits() as u64) < u64::from(reserve) + u64::from(need) {
            // Fills kept this long have lost their reader (or it reads slowly and will find
            // them in the cache file): their room goes to readahead.
            if !self.ahead.release_older_than(STALE_AHEAD) {
                return false;
            }
        }
        let Ok(permit) = self.memory.clone().try_acquire_many_owned(need) else {
            return false;
        };
        let mut map = self.inflight();
        if !map.contains_key(&id) && !self.is_stored(&key) {
            self.start_fill(&mut map, key, id, permit, Route::ViaCoordinator, false);
        }
        true
    }

    /// Tells the store a reader is coming for a stored chunk, unless its fill is kept in
    /// memory for that reader: then the store reading it back (its data went past the page
    /// cache) would be wasted work and memory.
    fn will_read(&self, key: &ChunkKey) {
        if !self.ahead.holds(&key.id()) {
            self.store.will_read(key);
        }
    }

    fn is_stored(&self, key: &ChunkKey) -> bool {
        self.store.contains_hint(key) == Some(true)
    }

    /// Bytes `[offset, offset+len)` straight from the local cache when it holds all of them
    /// (a pread and CRC checks, on the caller's thread); None otherwise (then use
    /// [`Self::read_object_as`]).
    pub fn read_cached_now(
        &self,
        object: &Arc<ObjectVersion>,
        offset: u64,
        len: u64,
    ) -> Option<Bytes> {
        let cs = self.policy.chunk_size;
        let mut parts = Vec::new();
        for s in chunk::spans(offset, len, object.size, cs) {
            let key = ChunkKey::new(object.clone(), cs, s.index);
            if let Some(kept) = self.ahead.read(&key.id(), s.offset, s.len) {
                Metrics::inc(&self.metrics.ahead_hits);
                parts.push(kept);
                continue;
            }
            // None unless the store holds the range (its index says so first, without I/O).
            parts.push(self.store.read_now(&key, s.offset, s.len)?);
        }
        match parts.len() {
            0 => None,
            1 => parts.pop(),
            _ => {
                let mut out = pagebuf::with_capacity(len as usize);
                parts.iter().for_each(|p| out.extend_from_slice(p));
                Some(pagebuf::freeze(out))
            }
        }
    }

    /// True when the local store says, without I/O, that it holds every chunk of the object.
    pub fn is_whole_locally(&self, object: &Arc<ObjectVersion>) -> bool {
        let cs = self.policy.chunk_size;
        (0..chunk_count(object.size, cs).max(1))
            .all(|i| self.is_stored(&ChunkKey::new(object.clone(), cs, i)))
    }

    /// The object as one checked local file (for passthrough), when the store holds all of it.
    pub async fn whole_object(&self, object: &ObjectVersion) -> Option<LocalFile> {
        match self
            .store
            .whole_object(object, self.policy.chunk_size)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(bucket = %object.bucket, key = %object.key, error = %e, "cannot hand out a cached object whole");
                None
            }
        }
    }

    fn start_fill(
        self: &Arc<Self>,
        map: &mut HashMap<ChunkId, Arc<Fill>>,
        key: ChunkKey,
        id: ChunkId,
        memory: OwnedSemaphorePermit,
        route: Route,
        store_checked: bool,
    ) -> Arc<Fill> {
        let crcs = BlockCrcs::for_chunk(&key);
        let fill = Arc::new(Fill::new(key.len(), Some(memory)).with_crcs(crcs));
        map.insert(id, fill.clone());
        Metrics::inc(&self.metrics.fills_started);
        let span = tracing::debug_span!("fill", bucket = %key.object.bucket, key = %key.object.key, chunk = key.index);
        let this = self.clone();
        let f = fill.clone();
        tokio::spawn(
            async move { this.run_fill(key, id, f, route, store_checked).await }.instrument(span),
        );
        fill
    }

    async fn run_fill(
        self: Arc<Self>,
        key: ChunkKey,
        id: ChunkId,
        fill: Arc<Fill>,
        route: Route,
        store_checked: bool,
    ) {
        // Readahead starts fills without a store lookup (it must not wait); the shared store
        // may still have the chunk, and then no GET is needed.
        if !store_checked && self.fill_from_store(&key, &fill).await {
            fill.finish(Ok(()));
            self.inflight().remove(&id);
            return;
        }
        let result = match self.coordinator_peer(&key, route) {
            Some((peers, peer)) => match self.fill_from_peer(&*peers, &peer, &key, &fill).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // A peer that is gone, refuses (409) or breaks: fill here, from where the
                    // peer's bytes stopped.
                    Metrics::inc(&self.metrics.peer_fallbacks);
                    tracing::info!(%peer, error = %e, resume_at = fill.filled(), "peer fill failed; filling locally");
                    self.fill_from_origin(&key, &fill).await
                }
            },
            None => self.fill_from_origin(&key, &fill).await,
        };
        if result.is_err() {
            // Out of the map before it reports: a reader that comes after the failure starts
            // a new fill instead of joining this one only to get its error.
            self.inflight().remove(&id);
        }
        fill.finish(result.clone());
        match result {
            Ok(()) => {
                // Commit after serve: readers already have their bytes.
                let (pieces, len) = (fill.pieces(), key.len());
                let committed = match fill.take_crcs() {
                    Some(crcs) => self.store.put_chunk_summed(&key, len, pieces, crcs).await,
                    None => self.store.put_chunk(&key, len, pieces).await,
                };
                match committed {
                    Ok(c) => {
                        tracing::debug!(outcome = ?c, "chunk committed");
                        // Kept only while fills leave readers' reserve free (as readahead
                        // does): many readers must not grow the process beyond what their
                        // fills alone would take. (With a larger reserve than readahead's, a
                        // reader's full window kept nothing: 40% of its reads went to disk.)
                        let calm = self.memory.available_permits() as u64
                            >= u64::from(self.readers_reserve());
                        if calm && !fill.read_to_end.load(Ordering::Relaxed) {
                            self.ahead.keep(id, fill.clone());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not commit chunk"),
                }
                self.inflight().remove(&id);
            }
            Err(e) => {
                Metrics::inc(&self.metrics.fills_failed);
                tracing::warn!(error = %e, "chunk fill failed");
            }
        }
    }

    /// Streams the chunk from the cache store into the fill; true when it is complete.
    async fn fill_from_store(&self, key: &ChunkKey, fill: &Fill) -> bool {
        let Ok(Some(mut stream)) = self.store.get_chunk(key, 0, key.len()).await else {
            return false;
        };
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(p) if fill.filled() + p.len() as u64 <= key.len() => fill.push(p),
                // Whatever arrived is verified; the origin continues from there.
                _ => return false,
            }
        }
        fill.filled() == key.len()
    }

    fn coordinator_peer(&self, key: &ChunkKey, route: Route) -> Option<(Arc<dyn Peers>, PeerAddr)> {
        if route == Route::LocalOnly {
            return None;
        }
        let peers = self.peers.get()?.clone();
        let peer = peers.coordinator_for(key)?;
        Some((peers, peer))
    }

    /// Streams the chunk from the peer that coordinates it into the fill.
    async fn fill_from_peer(
        &self,
        peers: &dyn Peers,
        peer: &PeerAddr,
        key: &ChunkKey,
        fill: &Fill,
    ) -> Result<(), PeerError> {
        let mut stream = peers.fetch(peer, key).await?;
        let len = key.len();
        // A peer streams the chunk from its first byte; the fill may already hold some (what a
        // shared store sent before it broke off): those are skipped, never appended again.
        let mut skip = fill.filled();
        loop {
            let next = tokio::time::timeout(self.policy.stall_timeout, stream.next())
                .await
                .map_err(|_| PeerError::Timeout(self.policy.stall_timeout))?;
            let Some(piece) = next else { break };
            let mut piece = piece.map_err(|e| PeerError::Body(e.to_string()))?;
            if skip > 0 {
                let n = skip.min(piece.len() as u64);
                skip -= n;
                piece = piece.slice(n as usize..);
                if piece.is_empty() {
                    continue;
                }
            }
            if fill.filled() + piece.len() as u64 > len {
                return Err(PeerError::Body("more bytes than the chunk holds".into()));
            }
            fill.push(piece);
        }
        if fill.filled() < len {
            return Err(PeerError::Body(format!(
                "ended after {} of {len} bytes",
                fill.filled()
            )));
        }
        Metrics::inc(&self.metrics.peer_fills_received);
        Ok(())
    }

    /// The whole chunk as this host has or fills it, never asking a peer: what the cluster
    /// server streams to a peer. Pieces are yielded as they arrive.
    pub fn stream_local(self: &Arc<Self>, key: ChunkKey) -> ChunkStream {
        enum State {
            Start(Arc<Fetcher>, ChunkKey),
            /// The fill, and the offset of the next byte to stream.
            Fill(Arc<Fill>, u64),
            Store(ChunkStream),
        }
        let stream =
            futures::stream::unfold(Some(State::Start(self.clone(), key)), |state| async move {
                let mut state = state?;
                loop {
                    state = match state {
                        State::Start(this, key) => match this
                            .resolve(&key, 0, key.len(), Route::LocalOnly, true)
                            .await
                        {
                            Ok(Source::Fill(fill)) => State::Fill(fill, 0),
                            Ok(Source::Stored(stream)) => State::Store(stream),
                            Err(e) => {
                                return Some((Err(StoreError::Transient(e.to_string())), None))
                            }
                        },
                        State::Fill(fill, at) => {
                            return match fill.next(at).await {
                                Some(Ok(b)) => {
                                    let at = at + b.len() as u64;
                                    Some((Ok(b), Some(State::Fill(fill, at))))
                                }
                                Some(Err(e)) => {
                                    Some((Err(StoreError::Transient(e.to_string())), None))
                                }
                                None => None,
                            }
                        }
                        State::Store(mut s) => {
                            return s.next().await.map(|item| (item, Some(State::Store(s))));
                        }
                    };
                }
            });
        Box::pin(stream)
    }

    /// GETs the chunk into the fill, retrying and resuming from where it stopped.
    async fn fill_from_origin(&self, key: &ChunkKey, fill: &Fill) -> Result<(), FetchError> {
        self.fill_range_from_origin(&key.object, key.start(), key.len(), fill)
            .await
    }

    /// GETs bytes `[start, start+len)` of the object into the fill, retrying and resuming from
    /// where it stopped.
    async fn fill_range_from_origin(
        &self,
        o: &ObjectVersion,
        start: u64,
        len: u64,
        fill: &Fill,
    ) -> Result<(), FetchError> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let result = self.fetch_rest(o, start, len, fill).await;
            let e = match result {
                Ok(()) => return Ok(()),
                Err(FetchError::Origin(e)) if e.is_retryable() => e,
                Err(e) => return Err(e),
            };
            let pause = backoff(attempt);
            if attempt >= self.policy.max_attempts
                || started.elapsed() + pause > self.policy.retry_time
            {
                tracing::warn!(error = %e, attempt, "origin retry budget spent");
                return Err(e.into());
            }
            Metrics::inc(&self.metrics.origin_get_retries);
            tracing::info!(error = %e, attempt, resume_at = fill.filled(), "retrying chunk GET");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// One GET of the bytes the fill does not have yet (of `[start, start+len)`), holding an
    /// origin slot throughout.
    async fn fetch_rest(
        &self,
        o: &ObjectVersion,
        start: u64,
        len: u64,
        fill: &Fill,
    ) -> Result<(), FetchError> {
        // Only this fill's own attempts push into it, one at a time: `got` holds while we wait.
        let got = fill.filled();
        if got >= len {
            // The last body broke or stalled after its last byte: nothing is missing (and an
            // empty range is no request), so no origin slot either.
            return Ok(());
        }
        let _slot = tokio::time::timeout(self.policy.queue_timeout, self.origin_slots.acquire())
            .await
            .map_err(|_| FetchError::QueueTimeout(self.policy.queue_timeout))?
            .map_err(|_| FetchError::Abandoned)?;
        let mut body = self
            .origin
            .get_range(&o.key, &o.etag, start + got, len - got)
            .await?;
        let mut have = got;
        loop {
            let piece = tokio::time::timeout(self.policy.stall_timeout, body.next())
                .await
                .map_err(|_| {
                    OriginError::Transient(format!(
                        "body stalled for {:?} after {have} of {len} bytes",
                        self.policy.stall_timeout
                    ))
                })?;
            let Some(piece) = piece else { break };
            let piece = piece?;
            if have + piece.len() as u64 > len {
                return Err(OriginError::Other("origin sent more bytes than asked".into()).into());
            }
            have += piece.len() as u64;
            fill.push(piece);
        }
        if have < len {
            return Err(
                OriginError::Transient(format!("body ended after {have} of {len} bytes")).into(),
            );
        }
        Ok(())
    }
}

/// Exponential backoff with jitter: ~100 ms, 200 ms, 400 ms … capped at 5 s.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64 << attempt.min(6);
    Duration::from_millis((base + fastrand::u64(..=base / 2)).min(5_000))
}

/// How a fill keeps its bytes: page-aligned segments of this size (the last may be shorter),
/// each copied together from the pieces the network delivered. One copy, and then a kernel-sized
/// read inside a segment is a slice of it (the FUSE reply, a page-aligned buffer, costs no second
/// copy), and a commit hands whole aligned blocks to O_DIRECT as they are (no staging copy). The
/// pieces themselves (slices of the HTTP client's read buffers, of any size and alignment) are
/// let go at once instead of pinning those buffers for as long as the fill lives. It is the size
/// `pagebuf` recycles, so segments come from its free list.
const SEGMENT: u64 = pagebuf::RECYCLED as u64;

/// A chunk being fetched: its bytes in order, readable while more arrive.
pub struct Fill {
    len: u64,
    bytes: Mutex<Segments>,
    progress: watch::Sender<Progress>,
    /// Some read took the fill's last bytes: nobody needs it kept after it is committed.
    read_to_end: AtomicBool,
    /// This fill's share of the memory budget, returned when the fill is dropped.
    _memory: Option<OwnedSemaphorePermit>,
}

struct Segments {
    /// Full segments: `done[i]` holds bytes `[i*SEGMENT, (i+1)*SEGMENT)` (or to the end).
    done: Vec<Bytes>,
    /// The segment being filled, after the last of `done`.
    open: pagebuf::PageVec,
    filled: u64,
    /// The blocks' CRCs for the disk cache, summed as the bytes come (a chunk fill's).
    crcs: Option<BlockCrcs>,
}

#[derive(Clone, Default)]
struct Progress {
    filled: u64,
    outcome: Option<Result<(), FetchError>>,
}

impl Fill {
    fn new(len: u64, memory: Option<OwnedSemaphorePermit>) -> Fill {
        Fill {
            len,
            bytes: Mutex::new(Segments {
                done: Vec::new(),
                open: pagebuf::with_capacity(0),
                filled: 0,
                crcs: None,
            }),
            progress: watch::Sender::new(Progress::default()),
            read_to_end: AtomicBool::new(false),
            _memory: memory,
        }
    }

    /// The fill sums its blocks' CRCs as its bytes come, for the commit to hand the store.
    fn with_crcs(mut self, crcs: BlockCrcs) -> Fill {
        self.bytes.get_mut().unwrap_or_else(|p| p.into_inner()).crcs = Some(crcs);
        self
    }

    /// The CRCs summed so far (all of them once the fill is complete); None after the first call.
    fn take_crcs(&self) -> Option<BlockCrcs> {
        self.lock().crcs.take()
    }

    fn lock(&self) -> MutexGuard<'_, Segments> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn filled(&self) -> u64 {
        self.lock().filled
    }

    /// Appends the next bytes. Callers never push past `len`.
    fn push(&self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        let filled = {
            let mut s = self.lock();
            // Callers stop a source that sends more than the fill holds; never grow past it.
            let room = self.len.saturating_sub(s.filled) as usize;
            let mut rest = &piece[..piece.len().min(room)];
            while !rest.is_empty() {
                let seg_start = s.filled / SEGMENT * SEGMENT;
                let seg_len = (self.len - seg_start).min(SEGMENT);
                if s.open.capacity() == 0 {
                    s.open = pagebuf::with_capacity(seg_len as usize);
                }
                let take = rest.len().min((seg_start + seg_len - s.filled) as usize);
                s.open.extend_from_slice(&rest[..take]);
                // While these bytes are still in the CPU's cache.
                if let Some(crcs) = s.crcs.as_mut() {
                    crcs.add(&rest[..take]);
                }
                s.filled += take as u64;
                rest = &rest[take..];
                if s.filled == seg_start + seg_len {
                    let full = std::mem::replace(&mut s.open, pagebuf::with_capacity(0));
                    s.done.push(pagebuf::freeze(full));
                }
            }
            s.filled
        };
        self.progress.send_modify(|pr| pr.filled = filled);
    }

    fn finish(&self, outcome: Result<(), FetchError>) {
        self.progress.send_modify(|pr| pr.outcome = Some(outcome));
    }

    /// Everything that has arrived, in order: the full segments and a copy of the open one.
    fn pieces(&self) -> Vec<Bytes> {
        let s = self.lock();
        let mut all = s.done.clone();
        if !s.open.is_empty() {
            all.push(Bytes::copy_from_slice(&s.open));
        }
        all
    }

    /// The bytes from `offset` that have arrived, up to the end of the segment they start in,
    /// once at least one has; None at the end of a complete fill.
    async fn next(&self, offset: u64) -> Option<Result<Bytes, FetchError>> {
        if offset >= self.len {
            return None;
        }
        let mut rx = self.progress.subscribe();
        let outcome = {
            let p = rx
                .wait_for(|p| p.filled > offset || p.outcome.is_some())
                .await;
            match p {
                Err(_) => return Some(Err(FetchError::Abandoned)),
                Ok(p) if p.filled > offset => None,
                Ok(p) => p.outcome.clone(),
            }
        };
        match outcome {
            None => {
                let s = self.lock();
                let end = ((offset / SEGMENT + 1) * SEGMENT).min(s.filled);
                Some(Ok(s.range(offset, end)))
            }
            // A fill reports success only when it has every byte.
            Some(Ok(())) => None,
            Some(Err(e)) => Some(Err(e)),
        }
    }

    /// Waits until `[offset, offset+len)` has arrived (or the fill failed) and returns it.
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, FetchError> {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return Ok(Bytes::new());
        }
        if end == self.len {
            self.read_to_end.store(true, Ordering::Relaxed);
        }
        let mut rx = self.progress.subscribe();
        let outcome = {
            let p = rx
                .wait_for(|p| p.filled >= end || p.outcome.is_some())
                .await
                .map_err(|_| FetchError::Abandoned)?;
            if p.filled >= end {
                None
            } else {
                p.outcome.clone()
            }
        };
        match outcome {
            None | Some(Ok(())) => Ok(self.range(offset, end)),
            Some(Err(e)) => Err(e),
        }
    }

    /// The bytes `[start, end)`, all of which have arrived.
    fn range(&self, start: u64, end: u64) -> Bytes {
        self.lock().range(start, end)
    }
}

impl Segments {
    /// The bytes `[start, end)`, all of which have arrived. Zero-copy inside one full segment;
    /// otherwise copied into a page-aligned buffer, as it goes to the kernel as a FUSE reply.
    fn range(&self, start: u64, end: u64) -> Bytes {
        let first = (start / SEGMENT) as usize;
        let at = first as u64 * SEGMENT;
        if let Some(seg) = self.done.get(first) {
            if end <= at + seg.len() as u64 {
                return seg.slice((start - at) as usize..(end - at) as usize);
            }
        }
        let mut out = pagebuf::with_capacity((end - start) as usize);
        let open = (!self.open.is_empty()).then_some(&self.open[..]);
        let segments = self.done.iter().map(|b| &b[..]).chain(open);
        for (i, seg) in segments.enumerate().skip(first) {
            let at = i as u64 * SEGMENT;
            if at >= end {
                break;
            }
            let from = start.saturating_sub(at) as usize;
            let to = ((end - at) as usize).min(seg.len());
            out.extend_from_slice(&seg[from..to]);
        }
        pagebuf::freeze(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_come_whole_page_aligned_and_inside_a_segment_without_a_copy() {
        let len = 2 * SEGMENT + 10_000;
        let fill = Arc::new(Fill::new(len, None));
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(777) {
            fill.push(Bytes::copy_from_slice(piece));
        }
        fill.finish(Ok(()));
        // It goes to the kernel as a FUSE reply: a buffer starting mid-page costs two page
        // copies for every page of the reply.
        let s = SEGMENT as usize;
        for (at, n) in [
            (4096, 8192),
            (s - 4096, 8192),
            (2 * s, 10_000),
            (0, 2 * s + 10_000),
        ] {
            let got = fill.read(at as u64, n as u64).await.unwrap();
            assert_eq!(&got[..], &data[at..at + n], "{n} bytes at {at}");
            assert_eq!(got.as_ptr() as usize % 4096, 0, "{n} bytes at {at}");
        }
        // Inside one segment: slices of it, no copy.
        let a = fill.read(SEGMENT, 4096).await.unwrap();
        let b = fill.read(SEGMENT + 4096, 4096).await.unwrap();
        assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + 4096);
        // What a commit writes: whole aligned segments, then the short last one.
        let pieces = fill.pieces();
        let lens: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(lens, [s, s, 10_000]);
        assert!(pieces.iter().all(|p| p.as_ptr() as usize % 4096 == 0));
        assert_eq!(pieces.concat(), data);
    }

    #[test]
    fn a_chunk_fill_sums_the_crcs_of_what_it_holds() {
        let k = crate::cachestore::layout::test_key("e", 3 * SEGMENT + 5000, 4 << 20, 0);
        let data: Vec<u8> = (0..k.len()).map(|i| (i * 31 + i / 4099) as u8).collect();
        let fill = Fill::new(k.len(), None).with_crcs(BlockCrcs::for_chunk(&k));
        // Pieces of odd sizes, across blocks and segments, and more than the fill holds.
        for piece in data.chunks(70_001) {
            fill.push(Bytes::copy_from_slice(piece));
        }
        fill.push(Bytes::from_static(b"beyond the end"));
        let block = crate::cachestore::layout::block_size_for(k.chunk_size);
        let want = crate::cachestore::layout::block_crcs(&fill.pieces(), block);
        assert_eq!(want.len() as u64, k.len().div_ceil(block));
        assert_eq!(fill.take_crcs().unwrap().finish(), want);
        assert!(fill.take_crcs().is_none(), "taken once");
        assert!(
            Fill::new(3, None).take_crcs().is_none(),
            "a block fill sums none"
        );
    }

    #[tokio::test]
    async fn a_source_that_sends_too_much_never_grows_the_fill() {
        let fill = Fill::new(6, None);
        fill.push(Bytes::from_static(b"0123"));
        fill.push(Bytes::from_static(b"456789"));
        assert_eq!(fill.filled(), 6);
        assert_eq!(fill.pieces().concat(), b"012345");
    }

    #[tokio::test]
    async fn readers_get_bytes_as_they_arrive_and_errors_when_it_fails() {
        let fill = Arc::new(Fill::new(10, None));
        fill.push(Bytes::from_static(b"0123"));
        // The first bytes are readable before the rest exists.
        assert_eq!(&fill.read(0, 3).await.unwrap()[..], b"012");
        let f = fill.clone();
        let late = tokio::spawn(async move { f.read(2, 6).await });
        tokio::task::yield_now().await;
        fill.push(Bytes::from_static(b"45"));
        fill.push(Bytes::from_static(b"6789"));
        assert_eq!(&late.await.unwrap().unwrap()[..], b"234567");
        fill.finish(Ok(()));
        assert_eq!(&fill.read(0, 100).await.unwrap()[..], b"0123456789");
        // As the cluster server streams it: whatever has arrived from an offset.
        assert_eq!(&fill.next(4).await.unwrap().unwrap()[..], b"456789");
        assert!(
            fill.next(10).await.is_none(),
            "nothing after the end of a complete fill"
        );

        let broken = Arc::new(Fill::new(10, None));
        broken.push(Bytes::from_static(b"01"));
        let b = broken.clone();
        let waiting = tokio::spawn(async move { b.read(0, 10).await });
        broken.finish(Err(FetchError::Origin(OriginError::Transient(
            "cut".into(),
        ))));
        assert!(waiting.await.unwrap().is_err());
        assert_eq!(&broken.read(0, 2).await.unwrap()[..], b"01");
    }
}
