//! The fetch path without a kernel or a server: a `Fetcher` over the fault-injecting in-memory
//! origin and the memory store. Each test pins one promise of `fetch` by counting requests and
//! bytes at the origin and comparing bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use orcafs::cachestore::memory::MemoryStore;
use orcafs::cachestore::CacheStore;
use orcafs::chunk::{ChunkKey, ObjectVersion};
use orcafs::fetch::{FetchPolicy, Fetcher};
use orcafs::metrics::Metrics;
use orcafs::origin::fault::{Fault, FaultOrigin};
use orcafs::origin::OriginError;

const CHUNK: u64 = 256 << 10;

fn policy() -> FetchPolicy {
    FetchPolicy {
        chunk_size: CHUNK,
        max_attempts: 4,
        retry_time: Duration::from_secs(60),
        stall_timeout: Duration::from_secs(2),
        queue_timeout: Duration::from_secs(10),
        max_origin_requests: 16,
        readahead_chunks: 0,
        readahead_max_chunks: 0,
        memory_limit: 64 * CHUNK,
    }
}

struct Rig {
    origin: Arc<FaultOrigin>,
    store: Arc<MemoryStore>,
    fetch: Arc<Fetcher>,
    object: Arc<ObjectVersion>,
    data: Bytes,
}

/// One object of `size` pseudo-random bytes behind a fresh fetcher.
fn rig(size: u64, policy: FetchPolicy) -> Rig {
    let origin = Arc::new(FaultOrigin::new("bkt"));
    let data: Bytes = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let etag = origin.put("obj", data.clone());
    let store = Arc::new(MemoryStore::new(1 << 30));
    let fetch = Fetcher::new(
        origin.clone(),
        store.clone(),
        policy,
        Arc::new(Metrics::default()),
    );
    let object = Arc::new(ObjectVersion {
        origin_id: "fault".into(),
        bucket: "bkt".into(),
        key: "obj".into(),
        etag: etag.into(),
        size,
    });
    Rig {
        origin,
        store,
        fetch,
        object,
        data,
    }
}

impl Rig {
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, orcafs::fetch::FetchError> {
        self.fetch.read_object(&self.object, offset, len).await
    }

    fn expect(&self, offset: u64, len: u64) -> Bytes {
        let end = (offset + len).min(self.data.len() as u64);
        self.data.slice(offset as usize..end as usize)
    }

    fn stored(&self, index: u64) -> bool {
        let key = ChunkKey::new(self.object.clone(), CHUNK, index);
        self.store.contains_hint(&key) == Some(true)
    }

    /// Waits until no fill runs (commits happen after readers are served).
    async fn settle(&self) {
        for _ in 0..1000 {
            if self.fetch.fills_in_flight() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("fills still in flight");
    }
}

#[tokio::test]
async fn concurrent_readers_of_a_cold_chunk_cause_one_get() {
    let r = Arc::new(rig(CHUNK, policy()));
    // A slow first byte, so every reader arrives while the fill is in flight.
    r.origin.inject(Fault::Delay(Duration::from_millis(100)));
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move { r.read(i * 1000, 5000).await })
        })
        .collect();
    for (i, t) in readers.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), r.expect(i as u64 * 1000, 5000));
    }
    assert_eq!(r.origin.gets(), 1, "one GET for eight readers");
    assert_eq!(r.origin.get_bytes(), CHUNK);
    r.settle().await;
    assert!(r.stored(0), "committed after serving");
    // Cached now: no further request.
    assert_eq!(r.read(0, CHUNK).await.unwrap(), r.data);
    assert_eq!(r.origin.gets(), 1);
}

#[tokio::test]
async fn a_cut_body_resumes_where_it_stopped() {
    let r = rig(CHUNK, policy());
    r.origin.inject(Fault::CutAfter(100_000));
    assert_eq!(r.read(0, CHUNK).await.unwrap(), r.data);
    assert_eq!(r.origin.gets(), 2, "one GET, one resume");
    assert_eq!(
        r.origin.get_bytes(),
        CHUNK,
        "the resume asks only for what is missing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_body_is_abandoned_and_resumed() {
    let r = rig(CHUNK, policy());
    r.origin.inject(Fault::StallAfter(70_000));
    assert_eq!(r.read(0, CHUNK).await.unwrap(), r.data);
    assert_eq!(r.origin.gets(), 2);
    assert_eq!(r.origin.get_bytes(), CHUNK);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stalls_after_its_last_byte_needs_no_second_get() {
    // Every byte arrived, then the connection hung instead of ending the body: the fill is
    // complete and is committed; there is nothing left to ask for (an empty range is invalid).
    let r = rig(CHUNK, policy());
    r.origin.inject(Fault::StallAfter(CHUNK));
    assert_eq!(r.read(0, CHUNK).await.unwrap(), r.data);
    assert_eq!(r.origin.gets(), 1);
    // Past the stall timeout: the fill has ended one way or the other.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(r.read(0, CHUNK).await.unwrap(), r.data);
    assert_eq!(r.origin.gets(), 1, "the chunk was committed");
}

#[tokio::test(start_paused = true)]
async fn retries_stay_within_the_attempt_budget() {
    // Three 503s and a success: within a budget of four attempts.
    let r = rig(CHUNK, policy());
    for _ in 0..3 {
        r.origin.inject(Fault::Unavailable);
    }
    assert_eq!(r.read(0, 10).await.unwrap(), r.expect(0, 10));
    assert_eq!(r.origin.gets(), 4);

    // Four 503s: the budget is spent, the read fails, nothing is committed, and the next read
    // starts a new fill.
    let r = rig(CHUNK, policy());
    for _ in 0..4 {
        r.origin.inject(Fault::Unavailable);
    }
    let e = r.read(0, 10).await.unwrap_err();
    assert!(
        matches!(e, orcafs::fetch::FetchError::Origin(ref o) if o.is_retryable()),
        "{e}"
    );
    assert_eq!(r.origin.gets(), 4);
    r.settle().await;
    assert!(!r.stored(0));
    assert_eq!(r.read(0, CHUNK).await.unwrap(), r.data);
    assert_eq!(r.origin.gets(), 5);
}

#[tokio::test]
async fn a_refusal_is_final() {
    let r = rig(CHUNK, policy());
    r.origin.inject(Fault::Denied);
    let e = r.read(0, 10).await.unwrap_err();
    assert!(matches!(
        e,
        orcafs::fetch::FetchError::Origin(OriginError::AccessDenied(_))
    ));
    assert_eq!(r.origin.gets(), 1, "403 is not retried");
}

#[tokio::test]
async fn a_replaced_object_is_etag_changed_and_never_committed() {
    let r = rig(2 * CHUNK, policy());
    r.origin.inject(Fault::ReplaceWith(Bytes::from(vec![
        7u8;
        2 * CHUNK as usize
    ])));
    let e = r.read(0, 10).await.unwrap_err();
    assert!(e.is_etag_changed(), "{e}");
    assert_eq!(r.origin.gets(), 1, "412 is not retried");
    r.settle().await;
    assert!(!r.stored(0));
    // The old version stays unreadable: never bytes of the new one.
    let e = r.read(CHUNK, 10).await.unwrap_err();
    assert!(e.is_etag_changed(), "{e}");
}

#[tokio::test]
async fn fills_wait_for_room_in_the_memory_budget() {
    let mut p = policy();
    p.memory_limit = 2 * CHUNK;
    let r = Arc::new(rig(6 * CHUNK, p));
    for _ in 0..6 {
        r.origin.inject(Fault::Delay(Duration::from_millis(30)));
    }
    let readers: Vec<_> = (0..6u64)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move { r.read(i * CHUNK, CHUNK).await })
        })
        .collect();
    let watch = {
        let r = r.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..200 {
                peak = peak.max(r.fetch.memory_in_use());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            peak
        })
    };
    for (i, t) in readers.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), r.expect(i as u64 * CHUNK, CHUNK));
    }
    let peak = watch.await.unwrap();
    assert!(peak > 0 && peak <= 2 * CHUNK, "peak fill memory {peak}");
    assert_eq!(r.origin.get_bytes(), 6 * CHUNK);
}

#[tokio::test]
async fn readahead_takes_at_most_three_quarters_of_the_budget() {
    let mut p = policy();
    p.memory_limit = 8 * CHUNK;
    p.readahead_chunks = 8;
    p.readahead_max_chunks = 8;
    let r = rig(10 * CHUNK, p);
    for _ in 0..10 {
        r.origin.inject(Fault::Delay(Duration::from_millis(200)));
    }
    r.fetch.readahead(&r.object, 0, 8);
    assert_eq!(
        r.fetch.fills_in_flight(),
        6,
        "readahead leaves a quarter of the budget to readers' own fills"
    );
    assert!(r.fetch.memory_in_use() <= 6 * CHUNK);
    // A reader's own fill still finds room at once.
    let t0 = std::time::Instant::now();
    assert_eq!(
        r.read(9 * CHUNK, 10).await.unwrap(),
        r.expect(9 * CHUNK, 10)
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    r.settle().await;
    assert_eq!(r.origin.gets(), 7);
    for i in 1..=6 {
        assert!(r.stored(i), "chunk {i} prefetched");
    }
    assert!(!r.stored(7));
}

#[tokio::test]
async fn a_budget_of_one_chunk_still_reads_ahead() {
    let mut p = policy();
    p.memory_limit = CHUNK;
    p.readahead_chunks = 4;
    p.readahead_max_chunks = 4;
    let r = rig(4 * CHUNK, p);
    r.fetch.readahead(&r.object, 0, 4);
    assert_eq!(r.fetch.fills_in_flight(), 1);
    r.settle().await;
    assert!(r.stored(1));
}

#[test]
fn the_readahead_window_doubles_within_its_bounds() {
    let mut p = policy();
    p.readahead_chunks = 3;
    p.readahead_max_chunks = 20;
    let f = rig(CHUNK, p).fetch;
    let mut w = f.first_window();
    let mut seen = vec![w];
    for _ in 0..5 {
        w = f.next_window(w);
        seen.push(w);
    }
    assert_eq!(seen, [3, 6, 12, 20, 20, 20]);
}

#[tokio::test]
async fn reads_across_chunk_boundaries_and_the_tail() {
    let r = rig(3 * CHUNK + 123, policy());
    assert_eq!(
        r.read(CHUNK - 10, 20).await.unwrap(),
        r.expect(CHUNK - 10, 20)
    );
    assert_eq!(
        r.read(3 * CHUNK, 1 << 20).await.unwrap(),
        r.expect(3 * CHUNK, 123)
    );
    assert!(r.read(4 * CHUNK, 10).await.unwrap().is_empty());
    assert_eq!(r.origin.get_bytes(), 2 * CHUNK + 123);
}

/// A coordinator peer that streams the chunk from its first byte, in uneven pieces, and breaks
/// after `cut` bytes when given one.
struct TestPeer {
    data: Bytes,
    cut: Option<usize>,
}

#[async_trait::async_trait]
impl orcafs::fetch::Peers for TestPeer {
    fn coordinator_for(&self, _key: &ChunkKey) -> Option<orcafs::peer::PeerAddr> {
        Some(orcafs::peer::PeerAddr::new("127.0.0.1:9"))
    }

    async fn fetch(
        &self,
        _peer: &orcafs::peer::PeerAddr,
        key: &ChunkKey,
    ) -> Result<orcafs::cachestore::ChunkStream, orcafs::peer::PeerError> {
        let chunk = self
            .data
            .slice(key.start() as usize..(key.start() + key.len()) as usize);
        let pieces: Vec<Result<Bytes, orcafs::cachestore::StoreError>> = match self.cut {
            Some(cut) => vec![
                Ok(chunk.slice(..cut)),
                Err(orcafs::cachestore::StoreError::Transient(
                    "peer died".into(),
                )),
            ],
            None => [0, 30_000, 100_000]
                .iter()
                .zip([30_000, 100_000, chunk.len()])
                .map(|(&a, b)| Ok(chunk.slice(a..b)))
                .collect(),
        };
        Ok(Box::pin(futures::stream::iter(pieces)))
    }
}

#[tokio::test]
async fn a_peer_that_breaks_mid_chunk_is_completed_from_the_origin_at_its_offset() {
    let r = rig(CHUNK, policy());
    r.fetch.set_peers(Arc::new(TestPeer {
        data: r.data.clone(),
        cut: Some(100_000),
    }));
    assert_eq!(r.read(0, CHUNK).await.unwrap(), r.data);
    assert_eq!(r.origin.gets(), 1);
    assert_eq!(
        r.origin.get_bytes(),
        CHUNK - 100_000,
        "the origin sends only what the peer did not"
    );
}

#[tokio::test]
async fn a_random_read_fetches_its_blocks_once_and_a_sequential_one_whole_chunks() {
    use orcafs::fetch::{Access, RANDOM_BLOCK};
    let r = rig(8 * CHUNK, policy());
    // Eight concurrent random readers of one spot: one GET of the one 64 KiB block under it.
    let at = 3 * CHUNK + RANDOM_BLOCK + 100;
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let (f, o) = (r.fetch.clone(), r.object.clone());
            tokio::spawn(async move { f.read_object_as(&o, at, 4096, Access::Random).await })
        })
        .collect();
    for t in reads {
        assert_eq!(t.await.unwrap().unwrap(), r.expect(at, 4096));
    }
    assert_eq!((r.origin.gets(), r.origin.get_bytes()), (1, RANDOM_BLOCK));
    // A read across a block boundary takes both blocks.
    let across = 5 * CHUNK + 2 * RANDOM_BLOCK - 10;
    let got = r
        .fetch
        .read_object_as(&r.object, across, 20, Access::Random)
        .await;
    assert_eq!(got.unwrap(), r.expect(across, 20));
    assert_eq!(
        (r.origin.gets(), r.origin.get_bytes()),
        (2, 3 * RANDOM_BLOCK)
    );
    // Sequential: the whole chunk, once, whatever blocks were fetched before.
    assert_eq!(
        r.read(3 * CHUNK, 10).await.unwrap(),
        r.expect(3 * CHUNK, 10)
    );
    assert_eq!(
        (r.origin.gets(), r.origin.get_bytes()),
        (3, 3 * RANDOM_BLOCK + CHUNK)
    );
    // A random read of a chunk that is already held (or filling) costs nothing more.
    let inside = 3 * CHUNK + 7 * 4096;
    let got = r
        .fetch
        .read_object_as(&r.object, inside, 4096, Access::Random)
        .await;
    assert_eq!(got.unwrap(), r.expect(inside, 4096));
    assert_eq!(r.origin.gets(), 3);
}

/// A shared store that, asked for a chunk the first time, sends its first `cut` bytes and then
/// breaks off; after that it is an ordinary store of what was committed.
struct CutStore {
    inner: MemoryStore,
    data: Bytes,
    cut: usize,
    broke: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl CacheStore for CutStore {
    fn name(&self) -> &str {
        "cut"
    }

    async fn get_chunk(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<orcafs::cachestore::ChunkStream>, orcafs::cachestore::StoreError> {
        if self.broke.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return self.inner.get_chunk(key, offset, len).await;
        }
        let start = key.start() as usize;
        let pieces: Vec<Result<Bytes, orcafs::cachestore::StoreError>> = vec![
            Ok(self.data.slice(start..start + self.cut)),
            Err(orcafs::cachestore::StoreError::Transient(
                "store broke off".into(),
            )),
        ];
        Ok(Some(Box::pin(futures::stream::iter(pieces))))
    }

    async fn put_chunk(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
    ) -> Result<orcafs::cachestore::Committed, orcafs::cachestore::StoreError> {
        self.inner.put_chunk(key, size, data).await
    }

    async fn stat(
        &self,
        key: &ChunkKey,
    ) -> Result<Option<orcafs::cachestore::Info>, orcafs::cachestore::StoreError> {
        self.inner.stat(key).await
    }

    async fn delete(&self, key: &ChunkKey) -> Result<(), orcafs::cachestore::StoreError> {
        self.inner.delete(key).await
    }

    async fn self_test(&self) -> Result<(), orcafs::cachestore::StoreError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_shared_store_that_breaks_off_is_completed_by_the_peer_from_the_same_offset() {
    let r = rig(CHUNK, policy());
    let cut = 70_000;
    let store = Arc::new(CutStore {
        inner: MemoryStore::new(1 << 30),
        data: r.data.clone(),
        cut,
        broke: Default::default(),
    });
    let fetch = Fetcher::new(
        r.origin.clone(),
        store.clone(),
        policy(),
        Arc::new(Metrics::default()),
    );
    fetch.set_peers(Arc::new(TestPeer {
        data: r.data.clone(),
        cut: None,
    }));
    // Readahead asks the store first (it starts fills without looking): the store sends 70,000
    // bytes and breaks off, and the chunk's coordinator peer streams the whole chunk.
    let key = ChunkKey::new(r.object.clone(), CHUNK, 0);
    assert!(fetch.prefetch(key.clone()));
    for _ in 0..1000 {
        if fetch.fills_in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(fetch.fills_in_flight(), 0);
    let committed = store.inner.get_chunk(&key, 0, CHUNK).await.unwrap();
    let committed = orcafs::cachestore::collect(committed.expect("committed"))
        .await
        .unwrap();
    assert!(
        committed == r.data,
        "the peer's bytes continue at the store's offset, not from its start again"
    );
    assert_eq!(r.origin.gets(), 0, "the peer had every missing byte");
    assert_eq!(
        fetch.read_object(&r.object, 0, CHUNK).await.unwrap(),
        r.data
    );
}
