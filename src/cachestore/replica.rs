//! replica: one store made of several. Writes go to every store of the synchronous set (all must
//! succeed) and are queued for every store of the asynchronous set: one bounded queue of
//! `queue_len` chunk *keys* per store, drained by one writer task that reads each chunk back from
//! the synchronous set when it uploads it. So the queue holds no chunk bytes (a fill's memory is
//! released as soon as the chunk is on local disk), `put_chunk` never waits for a slow store, and
//! a full queue drops the write (counted) instead of blocking. An asynchronous write that fails
//! puts the replica in an error state, reported by [`Replica::errors`] and the metrics, and is not
//! retried.
//!
//! Reads ask the synchronous stores and take the first success. When they all miss, the
//! asynchronous stores are read through (the default tiering: local disk sync + shared s3 async)
//! and a hit is copied back to the synchronous stores. A tier read has two deadlines. Past the
//! *patience* deadline ([`FIRST_BYTE_FACTOR`] times the store's usual time to answer, a moving
//! average seeded at mount by [`Replica::sample_first_byte`]; at least `floor`, at most
//! `first_byte`) the read stops waiting and is a miss, filled from the origin, while the store's
//! answer is still awaited in the background until `first_byte`: a store that answers by then is
//! slow, not down (its average grows, nothing is skipped); one that does not, or fails, is
//! skipped for a while (10 s, doubling while it keeps failing, up to 5 min). While a read is
//! overdue, other reads skip the store at once. So a hung or dead shared store costs one patience
//! deadline (not the ceiling) per skip period, a busy one costs the chunks it answers late, and
//! neither ever fails a read. A tier read that has started answering must finish within `whole`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    collect, once, BlockCrcs, CacheStore, ChunkStream, Committed, Info, LocalFile, StoreError,
};
use crate::chunk::{ChunkKey, ObjectVersion};
use crate::metrics::Metrics;

/// How long a failing asynchronous store is first skipped by reads before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// The longest it is skipped while it keeps failing.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// A tier read's patience deadline, in times the tier's usual time to answer.
pub const FIRST_BYTE_FACTOR: u32 = 8;

/// A store read that has not answered yet: boxed so that it can outlive the reader that gave up.
type Opening = Pin<Box<dyn Future<Output = Result<Option<ChunkStream>, StoreError>> + Send>>;

/// How long a read of an asynchronous tier may take.
#[derive(Debug, Clone, Copy)]
pub struct TierTimeouts {
    /// Until the store answers (the stream of the chunk is open), or it is skipped for a while:
    /// also the ceiling of the patience deadline.
    pub first_byte: Duration,
    /// The shortest patience deadline, whatever the usual time (scheduling noise on a busy host).
    pub floor: Duration,
    /// Until the whole chunk has arrived.
    pub whole: Duration,
}

struct AsyncTier {
    store: Arc<dyn CacheStore>,
    queue: mpsc::Sender<ChunkKey>,
    depth: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    down: Mutex<Down>,
    /// Reads past their patience deadline whose answer is still awaited: while any is, the
    /// store is skipped.
    overdue: AtomicU64,
    metrics: Arc<Metrics>,
    /// Moving average of the store's time to answer a read, in µs (0: none seen yet).
    usual_us: AtomicU64,
}

impl AsyncTier {
    /// How long a read waits for the store's answer before it fills from elsewhere.
    fn first_byte_deadline(&self, t: &TierTimeouts) -> Duration {
        match self.usual_us.load(Ordering::Relaxed) {
            0 => t.first_byte,
            us => (Duration::from_micros(us) * FIRST_BYTE_FACTOR)
                .max(t.floor)
                .min(t.first_byte),
        }
    }

    /// Counts one answer's time into the average (weight 1/8).
    fn answered_in(&self, took: Duration) {
        let us = (took.as_micros() as u64).max(1);
        let old = self.usual_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.usual_us.store(new.max(1), Ordering::Relaxed);
    }

    fn down(&self) -> std::sync::MutexGuard<'_, Down> {
        self.down.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Skipped: failed lately, or a read of it is overdue.
    fn skipped(&self) -> bool {
        self.overdue.load(Ordering::Relaxed) > 0
            || self
                .down()
                .until
                .is_some_and(|until| Instant::now() < until)
    }

    fn mark_down(&self, why: &str) {
        let pause = {
            let mut d = self.down();
            let pause = d.next_pause.max(RETRY_AFTER);
            d.until = Some(Instant::now() + pause);
            d.next_pause = (pause * 2).min(RETRY_AFTER_MAX);
            pause
        };
        tracing::warn!(
            store = self.store.name(),
            error = why,
            ?pause,
            "shared store degraded; reads skip it for a while"
        );
        Metrics::inc(&self.metrics.shared_errors);
    }

    fn mark_up(&self) {
        let mut d = self.down();
        if d.next_pause > Duration::ZERO {
            *d = Down::default();
        }
    }

    /// Awaits the answer of a read that was given up on, until `left` passes: a late answer
    /// only slows the patience deadline, none (or a failure) skips the store for a while.
    fn await_overdue(self: &Arc<Self>, opening: Opening, started: Instant, left: Duration) {
        self.overdue.fetch_add(1, Ordering::Relaxed);
        let t = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(left, opening).await {
                Ok(Ok(_)) | Ok(Err(StoreError::Corrupt(_))) => t.answered_in(started.elapsed()),
                Ok(Err(e)) => t.mark_down(&e.to_string()),
                Err(_) => t.mark_down(&format!("no answer within {:?}", started.elapsed())),
            }
            t.overdue.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// When a failing tier is read again, and how long the next failure skips it.
#[derive(Default)]
struct Down {
    until: Option<Instant>,
    next_pause: Duration,
}

pub struct Replica {
    sync: Vec<Arc<dyn CacheStore>>,
    tiers: Vec<Arc<AsyncTier>>,
    timeouts: TierTimeouts,
    metrics: Arc<Metrics>,
}

impl Replica {
    /// Stores the chunk in every synchronous store (with its blocks' CRCs where known) and
    /// queues it for the asynchronous ones.
    async fn put(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
        crcs: Option<BlockCrcs>,
    ) -> Result<Committed, StoreError> {
        let mut lost = !self.sync.is_empty();
        for store in &self.sync {
            let put = match &crcs {
                Some(c) => store.put_chunk_summed(key, size, data.clone(), c.clone()),
                None => store.put_chunk(key, size, data.clone()),
            };
            if put.await? == Committed::Stored {
                lost = false;
            }
        }
        if lost {
            // Already stored here, so it was queued for the other tiers when first stored.
            Metrics::inc(&self.metrics.commit_lost);
            return Ok(Committed::AlreadyThere);
        }
        for t in &self.tiers {
            t.depth.fetch_add(1, Ordering::Relaxed);
            match t.queue.try_send(key.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The store is slower than the reads: this write-behind is lost, the chunk
                    // is still committed here.
                    t.depth.fetch_sub(1, Ordering::Relaxed);
                    Metrics::inc(&self.metrics.shared_writes_dropped);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    t.depth.fetch_sub(1, Ordering::Relaxed);
                    return Err(StoreError::Other(format!(
                        "{} writer stopped",
                        t.store.name()
                    )));
                }
            }
        }
        Ok(Committed::Stored)
    }

    /// Starts one writer task per asynchronous store; call inside a tokio runtime.
    pub fn new(
        sync: Vec<Arc<dyn CacheStore>>,
        asynchronous: Vec<Arc<dyn CacheStore>>,
        queue_len: usize,
        timeouts: TierTimeouts,
        metrics: Arc<Metrics>,
    ) -> Replica {
        let tiers = asynchronous
            .into_iter()
            .map(|store| start_tier(store, sync.clone(), queue_len.max(1), metrics.clone()))
            .collect();
        Replica {
            sync,
            tiers,
            timeouts,
            metrics,
        }
    }

    /// Times one read of a chunk that is not there in every asynchronous store, to seed its
    /// usual time to answer before the first real read (a store that hangs from then on is
    /// given up on at once). A store that does not answer within `first_byte` keeps none. Asks
    /// nothing when the deadline is fixed (`floor` at the ceiling): the sample would not move it.
    pub async fn sample_first_byte(&self) {
        if self.timeouts.floor >= self.timeouts.first_byte {
            return;
        }
        for t in &self.tiers {
            let (probe, _) = super::probe_key(t.store.name());
            let started = Instant::now();
            let asked = t.store.get_chunk(&probe, 0, probe.len());
            if let Ok(Ok(_)) = tokio::time::timeout(self.timeouts.first_byte, asked).await {
                t.answered_in(started.elapsed());
            }
        }
    }

    /// The first-byte deadline of each asynchronous store now.
    pub fn first_byte_deadlines(&self) -> Vec<(String, Duration)> {
        self.tiers
            .iter()
            .map(|t| {
                let d = t.first_byte_deadline(&self.timeouts);
                (t.store.name().to_string(), d)
            })
            .collect()
    }

    /// `(store, last error)` for every asynchronous store in the error state.
    pub fn errors(&self) -> Vec<(String, String)> {
        self.tiers
            .iter()
            .filter_map(|t| {
                let e = t.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                e.map(|e| (t.store.name().to_string(), e))
            })
            .collect()
    }

    /// Chunks waiting in each asynchronous queue.
    pub fn queue_depths(&self) -> Vec<(String, u64)> {
        self.tiers
            .iter()
            .map(|t| (t.store.name().to_string(), t.depth.load(Ordering::Relaxed)))
            .collect()
    }

    /// Waits until every write-behind queue is empty, or `limit` passes; true when drained.
    /// Called at unmount so that chunks read just before stopping still reach the shared store.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .tiers
                .iter()
                .all(|t| t.depth.load(Ordering::Relaxed) == 0)
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads the whole chunk from an asynchronous tier, within the tier timeouts.
    async fn read_tier(&self, t: &Arc<AsyncTier>, key: &ChunkKey) -> Option<Bytes> {
        if t.skipped() {
            return None;
        }
        let patience = t.first_byte_deadline(&self.timeouts);
        let started = Instant::now();
        let (store, k) = (t.store.clone(), key.clone());
        let mut opening: Opening = Box::pin(async move { store.get_chunk(&k, 0, k.len()).await });
        let opened = match tokio::time::timeout(patience, &mut opening).await {
            Ok(opened) => opened,
            Err(_) => {
                // A miss for this reader, which fills from elsewhere now; whether the store is
                // down is decided by its answer, awaited in the background up to the ceiling.
                match self.timeouts.first_byte.checked_sub(patience) {
                    Some(left) if !left.is_zero() => t.await_overdue(opening, started, left),
                    _ => t.mark_down(&format!("no answer within {patience:?}")),
                }
                return None;
            }
        };
        // A corrupt object is an answer too (as in `await_overdue`): the store is up and this is
        // how long it took.
        if matches!(opened, Ok(_) | Err(StoreError::Corrupt(_))) {
            t.answered_in(started.elapsed());
        }
        let whole = self.timeouts.whole.saturating_sub(started.elapsed());
        let read = async {
            match opened? {
                Some(stream) => collect(stream).await.map(Some),
                None => Ok(None),
            }
        };
        let result = tokio::time::timeout(whole, read).await.unwrap_or_else(|_| {
            Err(StoreError::Transient(format!(
                "read took over {:?}",
                self.timeouts.whole
            )))
        });
        match result {
            Ok(Some(bytes)) if bytes.len() as u64 == key.len() => {
                t.mark_up();
                Some(bytes)
            }
            Ok(Some(_)) => {
                t.mark_down("short chunk");
                None
            }
            Ok(None) => {
                t.mark_up();
                None
            }
            // A corrupt object is one bad chunk (the driver deletes it), not a broken store.
            Err(StoreError::Corrupt(_)) => None,
            Err(e) => {
                t.mark_down(&e.to_string());
                None
            }
        }
    }

    /// Copies a chunk found in a slower tier into the synchronous stores before it is served,
    /// so that a reader arriving after this one finds it locally instead of reading the slower
    /// tier again.
    async fn copy_back(&self, key: &ChunkKey, bytes: &Bytes) {
        for store in &self.sync {
            let size = bytes.len() as u64;
            if let Err(e) = store.put_chunk(key, size, vec![bytes.clone()]).await {
                tracing::warn!(store = store.name(), error = %e, "copy-back failed");
            }
        }
    }
}

/// The chunk as the synchronous set holds it now (None when it was evicted meanwhile).
async fn read_back(sync: &[Arc<dyn CacheStore>], key: &ChunkKey) -> Option<Bytes> {
    for store in sync {
        if let Ok(Some(stream)) = store.get_chunk(key, 0, key.len()).await {
            if let Ok(bytes) = collect(stream).await {
                return Some(bytes);
            }
        }
    }
    None
}

fn start_tier(
    store: Arc<dyn CacheStore>,
    sync: Vec<Arc<dyn CacheStore>>,
    queue_len: usize,
    metrics: Arc<Metrics>,
) -> Arc<AsyncTier> {
    let (tx, mut rx) = mpsc::channel::<ChunkKey>(queue_len);
    let depth = Arc::new(AtomicU64::new(0));
    let error = Arc::new(Mutex::new(None));
    let tier_metrics = metrics.clone();
    let (s, d, e) = (store.clone(), depth.clone(), error.clone());
    tokio::spawn(async move {
        while let Some(key) = rx.recv().await {
            let result = match read_back(&sync, &key).await {
                Some(bytes) => s.put_chunk(&key, key.len(), vec![bytes]).await,
                None => {
                    Metrics::inc(&metrics.shared_writes_dropped);
                    d.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
            d.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(Committed::Stored) => Metrics::inc(&metrics.shared_commits),
                Ok(Committed::AlreadyThere) => Metrics::inc(&metrics.commit_lost),
                Err(err) => {
                    tracing::warn!(store = s.name(), ?key, error = %err, "write-behind failed");
                    Metrics::inc(&metrics.shared_errors);
                    *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.to_string());
                }
            }
        }
    });
    Arc::new(AsyncTier {
        store,
        queue: tx,
        depth,
        error,
        down: Mutex::new(Down::default()),
        overdue: AtomicU64::new(0),
        metrics: tier_metrics,
        usual_us: AtomicU64::new(0),
    })
}

#[async_trait::async_trait]
impl CacheStore for Replica {
    fn name(&self) -> &str {
        "replica"
    }

    async fn get_chunk(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<ChunkStream>, StoreError> {
        for store in &self.sync {
            match store.get_chunk(key, offset, len).await {
                Ok(Some(stream)) => return Ok(Some(stream)),
                Ok(None) => {}
                Err(e) => tracing::warn!(store = store.name(), error = %e, "store read failed"),
            }
        }
        for t in &self.tiers {
            if let Some(bytes) = self.read_tier(t, key).await {
                Metrics::inc(&self.metrics.shared_hits);
                Metrics::add(&self.metrics.shared_bytes_read, bytes.len() as u64);
                self.copy_back(key, &bytes).await;
                let end = offset.saturating_add(len).min(bytes.len() as u64);
                return Ok(Some(once(
                    bytes.slice(offset.min(end) as usize..end as usize),
                )));
            }
            Metrics::inc(&self.metrics.shared_misses);
        }
        Ok(None)
    }

    async fn put_chunk(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
    ) -> Result<Committed, StoreError> {
        self.put(key, size, data, None).await
    }

    async fn put_chunk_summed(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
        crcs: BlockCrcs,
    ) -> Result<Committed, StoreError> {
        self.put(key, size, data, Some(crcs)).await
    }

    async fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, StoreError> {
        for store in self.sync.iter().chain(self.tiers.iter().map(|t| &t.store)) {
            match store.stat(key).await {
                Ok(Some(info)) => return Ok(Some(info)),
                Ok(None) => {}
                Err(e) => tracing::debug!(store = store.name(), error = %e, "stat failed"),
            }
        }
        Ok(None)
    }

    async fn delete(&self, key: &ChunkKey) -> Result<(), StoreError> {
        for store in self.sync.iter().chain(self.tiers.iter().map(|t| &t.store)) {
            store.delete(key).await?;
        }
        Ok(())
    }

    async fn self_test(&self) -> Result<(), StoreError> {
        for store in self.sync.iter().chain(self.tiers.iter().map(|t| &t.store)) {
            store
                .self_test()
                .await
                .map_err(|e| StoreError::Other(format!("{}: {e}", store.name())))?;
        }
        Ok(())
    }

    fn contains_hint(&self, key: &ChunkKey) -> Option<bool> {
        self.sync.first().and_then(|s| s.contains_hint(key))
    }

    fn will_read(&self, key: &ChunkKey) {
        if let Some(s) = self.sync.first() {
            s.will_read(key)
        }
    }

    fn read_now(&self, key: &ChunkKey, offset: u64, len: u64) -> Option<Bytes> {
        self.sync.first().and_then(|s| s.read_now(key, offset, len))
    }

    fn contains_range_hint(&self, key: &ChunkKey, offset: u64, len: u64) -> Option<bool> {
        self.sync
            .first()
            .and_then(|s| s.contains_range_hint(key, offset, len))
    }

    /// Blocks stay local: the shared store keeps whole chunks only.
    async fn put_blocks(
        &self,
        key: &ChunkKey,
        offset: u64,
        data: Vec<Bytes>,
    ) -> Result<(), StoreError> {
        match self.sync.first() {
            Some(s) => s.put_blocks(key, offset, data).await,
            None => Ok(()),
        }
    }

    async fn whole_object(
        &self,
        object: &ObjectVersion,
        chunk_size: u64,
    ) -> Result<Option<LocalFile>, StoreError> {
        match self.sync.first() {
            Some(s) => s.whole_object(object, chunk_size).await,
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::cachestore::memory::MemoryStore;
    use crate::cachestore::probe_key;

    /// A memory store that can be made to hang (its reads then never answer), to answer late, or
    /// to answer that every chunk is corrupt.
    struct Hanging {
        inner: MemoryStore,
        hung: AtomicBool,
        late_ms: AtomicU64,
        corrupt: AtomicBool,
    }

    impl Hanging {
        fn new() -> Arc<Hanging> {
            Arc::new(Hanging {
                inner: MemoryStore::new(1 << 30),
                hung: AtomicBool::new(false),
                late_ms: AtomicU64::new(0),
                corrupt: AtomicBool::new(false),
            })
        }
    }

    #[async_trait::async_trait]
    impl CacheStore for Hanging {
        fn name(&self) -> &str {
            "hanging"
        }
        async fn get_chunk(
            &self,
            key: &ChunkKey,
            offset: u64,
            len: u64,
        ) -> Result<Option<ChunkStream>, StoreError> {
            if self.hung.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            let late = self.late_ms.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(late)).await;
            if self.corrupt.load(Ordering::Relaxed) {
                return Err(StoreError::Corrupt("fails its check".into()));
            }
            self.inner.get_chunk(key, offset, len).await
        }
        async fn put_chunk(
            &self,
            key: &ChunkKey,
            size: u64,
            data: Vec<Bytes>,
        ) -> Result<Committed, StoreError> {
            self.inner.put_chunk(key, size, data).await
        }
        async fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, StoreError> {
            self.inner.stat(key).await
        }
        async fn delete(&self, key: &ChunkKey) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        async fn self_test(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    const CEILING: Duration = Duration::from_millis(600);

    fn replica(shared: Arc<Hanging>, floor: Duration) -> Replica {
        Replica::new(
            vec![Arc::new(MemoryStore::new(1 << 30))],
            vec![shared],
            4,
            TierTimeouts {
                first_byte: CEILING,
                floor,
                whole: Duration::from_secs(5),
            },
            Arc::default(),
        )
    }

    /// How long a read of a chunk in no store takes, with the shared store hung.
    async fn miss_time(r: &Replica) -> Duration {
        let (key, _) = probe_key("miss");
        let started = Instant::now();
        assert!(r.get_chunk(&key, 0, key.len()).await.unwrap().is_none());
        started.elapsed()
    }

    #[tokio::test]
    async fn a_store_that_answered_fast_then_hangs_is_given_up_on_long_before_the_ceiling() {
        let shared = Hanging::new();
        let r = replica(shared.clone(), Duration::from_millis(20));
        r.sample_first_byte().await;
        let deadline = r.first_byte_deadlines()[0].1;
        assert!(deadline < Duration::from_millis(100), "{deadline:?}");
        shared.hung.store(true, Ordering::Relaxed);
        let took = miss_time(&r).await;
        assert!(
            took < CEILING / 2,
            "gave up after {took:?}, not at the ceiling"
        );
        // Skipped meanwhile: the next read does not wait at all, neither while the answer is
        // still awaited nor once the ceiling has passed without one.
        assert!(miss_time(&r).await < Duration::from_millis(50));
        tokio::time::sleep(CEILING).await;
        assert_eq!(r.metrics.shared_errors.get(), 1, "down once");
        assert!(miss_time(&r).await < Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_store_that_answers_late_but_within_the_ceiling_is_slow_not_down() {
        let shared = Hanging::new();
        let r = replica(shared.clone(), Duration::from_millis(20));
        r.sample_first_byte().await;
        let (key, bytes) = probe_key("late");
        shared
            .put_chunk(&key, key.len(), vec![bytes.clone()])
            .await
            .unwrap();
        shared.late_ms.store(150, Ordering::Relaxed);
        // This reader does not wait for the late answer: a miss, filled elsewhere.
        let started = Instant::now();
        assert!(r.get_chunk(&key, 0, key.len()).await.unwrap().is_none());
        assert!(started.elapsed() < Duration::from_millis(140));
        let before = r.first_byte_deadlines()[0].1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The answer came within the ceiling: counted into the usual time, the store not skipped.
        assert!(r.first_byte_deadlines()[0].1 > before);
        assert_eq!(r.metrics.shared_errors.get(), 0);
        shared.late_ms.store(0, Ordering::Relaxed);
        let got = r
            .get_chunk(&key, 0, key.len())
            .await
            .unwrap()
            .expect("a hit");
        assert_eq!(collect(got).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn a_corrupt_answer_is_an_answer_whether_early_or_late() {
        // Unsampled, the patience is the ceiling and 40 ms is within it; sampled fast (floor
        // 20 ms), 150 ms is past it and awaited in the background.
        for (sample, late_ms) in [(false, 40), (true, 150)] {
            let shared = Hanging::new();
            let r = replica(shared.clone(), Duration::from_millis(20));
            if sample {
                r.sample_first_byte().await;
            }
            let usual = || r.tiers[0].usual_us.load(Ordering::Relaxed);
            let before = usual();
            shared.corrupt.store(true, Ordering::Relaxed);
            shared.late_ms.store(late_ms, Ordering::Relaxed);
            let (key, _) = probe_key("corrupt");
            assert!(r.get_chunk(&key, 0, key.len()).await.unwrap().is_none());
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Counted into the usual time; not a failure, so the store is not skipped.
            assert!(usual() > before, "{late_ms} ms: {before} -> {} µs", usual());
            assert_eq!(r.metrics.shared_errors.get(), 0, "{late_ms} ms");
            shared.corrupt.store(false, Ordering::Relaxed);
            shared.late_ms.store(0, Ordering::Relaxed);
            assert!(
                miss_time(&r).await < Duration::from_millis(50),
                "{late_ms} ms"
            );
        }
    }

    #[tokio::test]
    async fn without_an_answer_seen_or_with_a_fixed_deadline_the_ceiling_holds() {
        for (sample, floor) in [(false, Duration::from_millis(20)), (true, CEILING)] {
            let shared = Hanging::new();
            let r = replica(shared.clone(), floor);
            if sample {
                r.sample_first_byte().await;
            }
            assert_eq!(r.first_byte_deadlines()[0].1, CEILING);
            shared.hung.store(true, Ordering::Relaxed);
            let took = miss_time(&r).await;
            assert!(took >= CEILING, "{took:?}");
        }
    }
}
