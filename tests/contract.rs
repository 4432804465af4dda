//! The cachestore contract: one suite, written once ([`cases`]), run against every driver by one
//! line of [`contract_suite!`] each. A driver line names a fixture: the store under test, plus
//! what the suite cannot know about it (how to damage what it stored, how to wait for its
//! write-behind, whether a second put must say exactly `AlreadyThere`).
//!
//! Drivers: memory, disk, s3 on the in-process s3s-fs server (DevOrigin), s3 on Garage (skipped
//! with a note when no `garage` binary is found, required under CI), replica(disk sync + memory
//! async) and replica(memory sync + s3 async). After the suite come the s3 driver's own tests
//! (layout, eviction, versioning refusal, bounded timeouts, credentials) and the replica's
//! tiering over s3.

use std::any::Any;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use orcafs::cachestore::disk::DiskDriver;
use orcafs::cachestore::memory::MemoryStore;
use orcafs::cachestore::replica::{Replica, TierTimeouts};
use orcafs::cachestore::s3::{S3Store, StoreKey};
use orcafs::cachestore::{collect, CacheStore, Committed, DiskStore, StoreError};
use orcafs::chunk::{ChunkKey, ObjectVersion};
use orcafs::config::SharedCacheConfig;
use orcafs::metrics::Metrics;
use orcafs::s3::Credentials;
use orcafs::secret::Secret;
use orcafs_devorigin::{DevOrigin, Garage, ACCESS_KEY, SECRET_KEY};

/// Chunk size in the keys of the suite.
const CHUNK: u64 = 256 << 10;
/// Bucket the s3 fixtures use.
const BUCKET: &str = "orcafs-shared";
/// The secret the s3 fixtures' members share.
const FLEET_SECRET: &[u8] = b"contract suite fleet secret";

/// An s3 store of a member holding `secret`, and the metrics it counts rejections in.
async fn member(cfg: &SharedCacheConfig, secret: &[u8]) -> (Arc<S3Store>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let key = StoreKey::from_secret(&Secret::from_bytes(secret));
    let store = Arc::new(S3Store::new(cfg, key, metrics.clone()).await);
    (store, metrics)
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a corruptor damages a stored chunk.
#[derive(Clone, Debug)]
enum Damage {
    /// Every data byte replaced by garbage; the header / metadata left as they were.
    Garbage,
    /// The stored data one byte short; the header / metadata left as they were.
    Truncated,
    /// The right bytes, but without the header / metadata.
    Bare,
    /// One data byte flipped at this offset of the chunk.
    FlipByte(u64),
    /// The stored form of another chunk of the same length copied over this one.
    CopyOf(ChunkKey),
}

/// Damages the stored form of `key` (whose bytes are `data`) behind the store's back.
type Corruptor = Arc<dyn Fn(ChunkKey, Bytes, Damage) -> BoxFut<()> + Send + Sync>;
/// Waits until the store's background writes are done.
type Settle = Arc<dyn Fn() -> BoxFut<()> + Send + Sync>;

struct Fixture {
    store: Arc<dyn CacheStore>,
    corrupt: Option<Corruptor>,
    settle: Option<Settle>,
    /// The issue requires exactly `AlreadyThere` on a second put from s3, memory and disk.
    exact_commit_lost: bool,
    /// s3s-fs writes an object's data and its metadata in two steps, so a get racing a put or a
    /// delete can see one without the other: detected (`Corrupt`) or a 500 (`Transient`), never
    /// wrong bytes. False for servers where an object is atomic.
    atomic_objects: bool,
    /// Servers, tempdirs: dropped with the fixture, in this order.
    _guards: Vec<Box<dyn Any + Send>>,
}

impl Fixture {
    fn plain(store: Arc<dyn CacheStore>) -> Fixture {
        Fixture {
            store,
            corrupt: None,
            settle: None,
            exact_commit_lost: true,
            atomic_objects: true,
            _guards: Vec::new(),
        }
    }

    async fn settle(&self) {
        if let Some(s) = &self.settle {
            s().await;
        }
    }
}

/// One suite per driver: `contract_suite!(module_name, fixture_fn);`.
macro_rules! contract_suite {
    ($name:ident, $fixture:expr) => {
        contract_suite!(@cases $name, $fixture, [
            round_trips, ranges, large_chunk, stat, delete_then_not_found, never_written,
            commit_lost, concurrent_puts, concurrent_mix, corruption_detected, self_test
        ]);
    };
    (@cases $name:ident, $fixture:expr, [$($case:ident),*]) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(f) = ($fixture)().await else { return };
                    super::cases::$case(&f).await;
                }
            )*
        }
    };
}

contract_suite!(memory, fixtures::memory);
contract_suite!(disk, fixtures::disk);
contract_suite!(s3_devorigin, fixtures::s3_devorigin);
contract_suite!(s3_garage, fixtures::s3_garage);
contract_suite!(replica_disk_memory, fixtures::replica_disk_memory);
contract_suite!(replica_memory_s3, fixtures::replica_memory_s3);

/// Deterministic bytes that differ per seed.
fn pattern(len: u64, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len as usize + 8);
    while (out.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len as usize);
    Bytes::from(out)
}

/// A fresh object version of `size` bytes (unique key, so tests never share chunks).
fn object(size: u64) -> Arc<ObjectVersion> {
    Arc::new(ObjectVersion {
        origin_id: "http://127.0.0.1:1 us-east-1".into(),
        bucket: "origin-bucket".into(),
        key: format!("dir/obj-{:016x}", fastrand::u64(..)).into(),
        etag: "\"0123456789abcdef\"".into(),
        size,
    })
}

/// Chunk `index` of a fresh object, with chunk size `CHUNK`, and its bytes.
fn chunk_of(size: u64, index: u64) -> (ChunkKey, Bytes) {
    let key = ChunkKey::new(object(size), CHUNK, index);
    let data = pattern(key.len(), fastrand::u64(..));
    (key, data)
}

/// The data cut in uneven pieces (one of them empty), as fills hand them over.
fn pieces(data: &Bytes) -> Vec<Bytes> {
    let n = data.len();
    let cuts = [0, 7.min(n), 7.min(n), 70_001.min(n), n];
    cuts.windows(2).map(|w| data.slice(w[0]..w[1])).collect()
}

async fn put(
    store: &dyn CacheStore,
    key: &ChunkKey,
    data: &Bytes,
) -> Result<Committed, StoreError> {
    store.put_chunk(key, data.len() as u64, pieces(data)).await
}

async fn get(
    store: &dyn CacheStore,
    key: &ChunkKey,
    offset: u64,
    len: u64,
) -> Result<Option<Bytes>, StoreError> {
    match store.get_chunk(key, offset, len).await? {
        Some(stream) => collect(stream).await.map(Some),
        None => Ok(None),
    }
}

/// The bytes a read of `[offset, offset+len)` must give.
fn expect(data: &Bytes, offset: u64, len: u64) -> Bytes {
    let end = offset.saturating_add(len).min(data.len() as u64);
    data.slice(offset.min(end) as usize..end as usize)
}

fn is_miss_or_corrupt<T: std::fmt::Debug>(r: &Result<Option<T>, StoreError>) -> bool {
    matches!(r, Ok(None) | Err(StoreError::Corrupt(_)))
}

mod cases {
    use super::*;

    pub async fn round_trips(f: &Fixture) {
        let s = &*f.store;
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1] {
            let obj = object(size);
            let count = size.div_ceil(CHUNK).max(1);
            for index in 0..count {
                let key = ChunkKey::new(obj.clone(), CHUNK, index);
                let data = pattern(key.len(), size * 31 + index);
                put(s, &key, &data)
                    .await
                    .unwrap_or_else(|e| panic!("{}: put size {size} #{index}: {e}", s.name()));
                assert!(matches!(s.contains_hint(&key), None | Some(true)));
                let back = get(s, &key, 0, key.len())
                    .await
                    .unwrap_or_else(|e| panic!("{}: get size {size} #{index}: {e}", s.name()))
                    .expect("hit");
                assert!(
                    back == data,
                    "{}: object size {size} chunk {index}: {} bytes back, {} put",
                    s.name(),
                    back.len(),
                    data.len()
                );
                let info = s.stat(&key).await.unwrap().expect("stored");
                assert_eq!(info.size, key.len(), "{}: stat size", s.name());
            }
        }
    }

    /// Reads of sub-ranges: start, middle across 64 KiB block boundaries, tail, past the end
    /// (clipped), zero-length, on a full chunk and on a 1-byte and an empty one.
    pub async fn ranges(f: &Fixture) {
        let s = &*f.store;
        let (key, data) = chunk_of(CHUNK, 0);
        put(s, &key, &data).await.unwrap();
        let b = 64 << 10;
        let cases: &[(u64, u64)] = &[
            (0, 1),
            (0, 100),
            (b - 1, 2),
            (b, b),
            (100_000, 100_000),
            (b - 5, 2 * b + 10),
            (CHUNK - 10, 10),
            (CHUNK - 1, 1),
            (CHUNK - 10, 1000),
            (CHUNK, 10),
            (CHUNK + 5, 10),
            (500, 0),
            (0, 0),
            (0, u64::MAX),
            (0, CHUNK),
        ];
        for &(off, len) in cases {
            let got = get(s, &key, off, len)
                .await
                .unwrap_or_else(|e| panic!("{}: range ({off}, {len}): {e}", s.name()))
                .expect("hit");
            assert!(
                got == expect(&data, off, len),
                "{}: range ({off}, {len}): {} bytes, wrong content or length",
                s.name(),
                got.len()
            );
        }
        let (one, one_data) = chunk_of(CHUNK + 1, 1);
        assert_eq!(one.len(), 1);
        put(s, &one, &one_data).await.unwrap();
        for (off, len) in [(0, 1), (0, 10), (1, 1), (0, 0)] {
            assert_eq!(
                get(s, &one, off, len).await.unwrap().expect("hit"),
                expect(&one_data, off, len)
            );
        }
        let (empty, _) = chunk_of(0, 0);
        put(s, &empty, &Bytes::new()).await.unwrap();
        for (off, len) in [(0, 0), (0, 10), (3, 1)] {
            assert_eq!(
                get(s, &empty, off, len).await.unwrap().expect("hit"),
                Bytes::new()
            );
        }
    }

    /// A chunk of 9 MiB and a bit: more than 128 blocks of 64 KiB, so the s3 driver's blocks
    /// are 128 KiB; reads across and inside those blocks.
    pub async fn large_chunk(f: &Fixture) {
        let s = &*f.store;
        let size = (9 << 20) + 12_345;
        let key = ChunkKey::new(object(size), 16 << 20, 0);
        let data = pattern(size, 99);
        put(s, &key, &data).await.unwrap();
        let b = 128 << 10;
        for (off, len) in [
            (0, size),
            (b - 1, 2),
            (5 * b + 17, 3 * b),
            (size - 20, 100),
            (size / 2, 1),
        ] {
            let got = get(s, &key, off, len).await.unwrap().expect("hit");
            assert!(got == expect(&data, off, len), "({off}, {len})");
        }
    }

    pub async fn stat(f: &Fixture) {
        let s = &*f.store;
        let (key, data) = chunk_of(CHUNK - 1, 0);
        put(s, &key, &data).await.unwrap();
        let info = s.stat(&key).await.unwrap().expect("stored");
        assert_eq!(info.size, CHUNK - 1);
        let now = SystemTime::now();
        let skew = match now.duration_since(info.committed) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(
            skew < Duration::from_secs(30),
            "{}: committed {:?} is {skew:?} from now",
            s.name(),
            info.committed
        );
    }

    pub async fn delete_then_not_found(f: &Fixture) {
        let s = &*f.store;
        let (key, data) = chunk_of(CHUNK, 0);
        put(s, &key, &data).await.unwrap();
        f.settle().await;
        s.delete(&key).await.unwrap();
        assert_eq!(get(s, &key, 0, CHUNK).await, Ok(None));
        assert_eq!(get(s, &key, 0, 0).await, Ok(None));
        assert_eq!(s.stat(&key).await, Ok(None));
        s.delete(&key)
            .await
            .expect("deleting an absent chunk succeeds");
        put(s, &key, &data)
            .await
            .expect("stored again after delete");
        assert_eq!(get(s, &key, 0, CHUNK).await.unwrap().expect("hit"), data);
    }

    pub async fn never_written(f: &Fixture) {
        let s = &*f.store;
        for size in [0, 1, CHUNK] {
            let (key, _) = chunk_of(size, 0);
            assert_eq!(get(s, &key, 0, key.len()).await, Ok(None));
            assert_eq!(get(s, &key, 0, 0).await, Ok(None));
            assert_eq!(s.stat(&key).await, Ok(None));
            s.delete(&key).await.unwrap();
        }
        let (key, _) = chunk_of(10, 0);
        assert!(matches!(s.contains_hint(&key), None | Some(false)));
    }

    pub async fn commit_lost(f: &Fixture) {
        let s = &*f.store;
        let (key, data) = chunk_of(CHUNK, 0);
        put(s, &key, &data).await.unwrap();
        f.settle().await;
        let again = put(s, &key, &data).await;
        if f.exact_commit_lost {
            assert_eq!(again, Ok(Committed::AlreadyThere), "{}", s.name());
        } else {
            assert!(again.is_ok(), "{}: {again:?}", s.name());
        }
        assert_eq!(get(s, &key, 0, CHUNK).await.unwrap().expect("hit"), data);
        // A put of the wrong size is refused, whatever is stored.
        let short = data.slice(1..);
        assert!(matches!(
            s.put_chunk(&key, short.len() as u64, vec![short]).await,
            Err(StoreError::Other(_))
        ));
    }

    /// Eight tasks put one chunk at once: each is stored or loses the commit, never an error,
    /// and the stored bytes are exact.
    pub async fn concurrent_puts(f: &Fixture) {
        let (key, data) = chunk_of(CHUNK, 0);
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (s, key, data, barrier) =
                    (f.store.clone(), key.clone(), data.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    put(&*s, &key, &data).await
                })
            })
            .collect();
        let mut stored = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(Committed::Stored) => stored += 1,
                Ok(Committed::AlreadyThere) => {}
                Err(e) => panic!("{}: concurrent put: {e:?}", f.store.name()),
            }
        }
        assert!(stored >= 1, "nobody stored the chunk");
        f.settle().await;
        assert_eq!(
            get(&*f.store, &key, 0, CHUNK).await.unwrap().expect("hit"),
            data
        );
    }

    /// Many tasks mixing get, put and delete of one key: every get gives the exact bytes or a
    /// miss, never other bytes; no put or delete fails.
    pub async fn concurrent_mix(f: &Fixture) {
        let (key, data) = chunk_of(CHUNK, 0);
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let (s, key, data) = (f.store.clone(), key.clone(), data.clone());
                let atomic = f.atomic_objects;
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(t);
                    let (mut hits, mut misses, mut torn) = (0, 0, 0);
                    for _ in 0..25 {
                        match rng.u8(0..10) {
                            0..=4 => {
                                let off = rng.u64(0..=CHUNK);
                                let len = rng.u64(0..=CHUNK);
                                match get(&*s, &key, off, len).await {
                                    Ok(Some(b)) => {
                                        assert!(
                                            b == expect(&data, off, len),
                                            "{}: get ({off}, {len}) gave {} wrong bytes",
                                            s.name(),
                                            b.len()
                                        );
                                        hits += 1;
                                    }
                                    Ok(None) => misses += 1,
                                    Err(StoreError::Corrupt(_) | StoreError::Transient(_))
                                        if !atomic =>
                                    {
                                        torn += 1
                                    }
                                    Err(e) => panic!("{}: get: {e:?}", s.name()),
                                }
                            }
                            5..=7 => {
                                if let Err(e) = put(&*s, &key, &data).await {
                                    panic!("{}: put: {e:?}", s.name())
                                }
                            }
                            _ => {
                                if let Err(e) = s.delete(&key).await {
                                    panic!("{}: delete: {e:?}", s.name())
                                }
                            }
                        }
                    }
                    (hits, misses, torn)
                })
            })
            .collect();
        let (mut hits, mut misses, mut torn) = (0, 0, 0);
        for t in tasks {
            let (h, m, n) = t.await.unwrap();
            hits += h;
            misses += m;
            torn += n;
        }
        eprintln!(
            "{}: mixed gets: {hits} hits, {misses} misses, {torn} torn reads",
            f.store.name()
        );
        f.settle().await;
        // Once the dust settles, a put leaves the chunk readable: `AlreadyThere` promises it is
        // stored.
        let last = put(&*f.store, &key, &data).await;
        assert!(last.is_ok(), "{}: {last:?}", f.store.name());
        f.settle().await;
        let back = get(&*f.store, &key, 0, CHUNK).await;
        assert!(
            back.as_ref() == Ok(&Some(data.clone())),
            "{}: after the mix, put said {last:?} but get says {:?}",
            f.store.name(),
            back.as_ref().map(|b| b.as_ref().map(|b| b.len()))
        );
    }

    /// Garbage, truncated, bare, bit-flipped and foreign data are detected: a read errs (or
    /// misses), never yields those bytes, and the next put stores the chunk afresh.
    pub async fn corruption_detected(f: &Fixture) {
        let Some(corrupt) = &f.corrupt else {
            eprintln!("{}: no corruptor, nothing to damage", f.store.name());
            return;
        };
        let s = &*f.store;
        let flip_at = 3 * (64 << 10) + 5;
        let other = chunk_of(CHUNK, 0);
        put(s, &other.0, &other.1).await.unwrap();
        for damage in [
            Damage::Garbage,
            Damage::Truncated,
            Damage::Bare,
            Damage::FlipByte(flip_at),
            Damage::CopyOf(other.0.clone()),
        ] {
            let (key, data) = chunk_of(CHUNK, 0);
            put(s, &key, &data).await.unwrap();
            f.settle().await;
            corrupt(key.clone(), data.clone(), damage.clone()).await;
            if let Damage::FlipByte(_) = damage {
                // Only the blocks a read touches are checked: the first one is intact.
                assert_eq!(
                    get(s, &key, 0, 1000).await.unwrap().expect("hit"),
                    data.slice(0..1000),
                    "{}: untouched block",
                    s.name()
                );
            }
            let r = get(s, &key, 0, CHUNK).await;
            assert!(
                is_miss_or_corrupt(&r),
                "{}: {damage:?} not detected: {:?}",
                s.name(),
                r.as_ref().map(|b| b.as_ref().map(|b| b.len()))
            );
            let r = get(s, &key, flip_at, 10).await;
            assert!(
                is_miss_or_corrupt(&r),
                "{}: {damage:?} (second read) not detected: {:?}",
                s.name(),
                r.as_ref().map(|b| b.as_ref().map(|b| b.len()))
            );
            // The bad copy does not poison the store: the next fill stores it again.
            if let Err(e) = put(s, &key, &data).await {
                panic!("{}: put after {damage:?}: {e:?}", s.name())
            }
            assert_eq!(
                get(s, &key, 0, CHUNK).await.unwrap().expect("hit"),
                data,
                "{}: after {damage:?} and a new put",
                s.name()
            );
        }
    }

    pub async fn self_test(f: &Fixture) {
        f.store
            .self_test()
            .await
            .unwrap_or_else(|e| panic!("{}: self test: {e}", f.store.name()));
    }
}

/// A connection to a real S3 server, for s3 fixtures and the s3 driver's own tests.
struct S3Target {
    endpoint: String,
    access_key: String,
    secret_key: String,
    client: aws_sdk_s3::Client,
    atomic_objects: bool,
    guards: Vec<Box<dyn Any + Send>>,
}

impl S3Target {
    fn config(&self) -> SharedCacheConfig {
        SharedCacheConfig {
            endpoint_url: Some(self.endpoint.clone()),
            bucket: BUCKET.into(),
            // Every store its own prefix, so tests sharing a server never see each other.
            prefix: format!("test-{:016x}/", fastrand::u64(..)),
            region: None,
            force_path_style: true,
            credentials: Credentials::Static {
                id: self.access_key.clone(),
                secret: self.secret_key.clone(),
            },
            required: true,
            max_age: None,
            timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(5),
            first_byte_floor: Duration::from_secs(5),
            secret_file: None,
        }
    }

    async fn store(&self) -> Arc<S3Store> {
        member(&self.config(), FLEET_SECRET).await.0
    }
}

mod targets {
    use super::*;

    /// s3s-fs on 127.0.0.1 over a tempdir, with [`BUCKET`].
    pub async fn devorigin() -> Option<S3Target> {
        let dir = tempfile::tempdir().unwrap();
        let o = DevOrigin::start(dir.path()).expect("start devorigin");
        o.create_bucket(BUCKET);
        Some(S3Target {
            endpoint: o.endpoint(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            client: o.client(),
            atomic_objects: false,
            guards: vec![Box::new(o), Box::new(dir)],
        })
    }

    /// A single-node Garage over a tempdir, with [`BUCKET`]; None (after a note) when there is
    /// no garage binary, except under CI, where that is an error.
    pub async fn garage() -> Option<S3Target> {
        if Garage::binary().is_none() {
            if std::env::var_os("CI").is_some() {
                panic!("garage binary required in CI; .ci/run installs it");
            }
            eprintln!("SKIPPED: no garage binary (set ORCAFS_GARAGE_BIN or put `garage` on PATH)");
            return None;
        }
        let (g, dir) = tokio::task::spawn_blocking(|| {
            let dir = tempfile::tempdir().unwrap();
            let g = Garage::start(dir.path()).unwrap_or_else(|e| panic!("start garage: {e}"));
            g.create_bucket(BUCKET);
            (g, dir)
        })
        .await
        .unwrap();
        Some(S3Target {
            endpoint: g.endpoint(),
            access_key: g.access_key().into(),
            secret_key: g.secret_key().into(),
            client: g.client(),
            atomic_objects: true,
            guards: vec![Box::new(g), Box::new(dir)],
        })
    }
}

mod fixtures {
    use super::*;

    pub async fn memory() -> Option<Fixture> {
        Some(Fixture::plain(Arc::new(MemoryStore::new(64 << 20))))
    }

    fn disk_store() -> (DiskDriver, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = DiskStore::open(dir.path(), 1 << 30, Arc::default()).unwrap();
        (DiskDriver(Arc::new(store)), dir)
    }

    pub async fn disk() -> Option<Fixture> {
        let (driver, dir) = disk_store();
        let root = dir.path().to_owned();
        let store = driver.0.clone();
        let mut f = Fixture::plain(Arc::new(driver));
        f.corrupt = Some(disk_corruptor(root));
        // A whole object is checked in the background: damage done while it runs may be found
        // by that check instead of the read a case makes (a race tested in the store's own
        // unit tests); cases damage a settled store.
        f.settle = Some(Arc::new(move || {
            let s = store.clone();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || s.finish_sealing(Duration::from_secs(10)))
                    .await
                    .unwrap();
            })
        }));
        f._guards.push(Box::new(dir));
        Some(f)
    }

    /// Where `DiskStore` keeps a chunk: in its object version's data file, at the chunk's own
    /// offsets, with the blocks' CRCs in the block map beside it.
    fn disk_paths(root: &std::path::Path, key: &ChunkKey) -> (PathBuf, PathBuf) {
        let v = key.version();
        (
            orcafs::cachestore::layout::data_path(root, &v),
            orcafs::cachestore::layout::map_path(root, &v),
        )
    }

    fn disk_corruptor(root: PathBuf) -> Corruptor {
        Arc::new(move |key, data, damage| {
            let (path, map) = disk_paths(&root, &key);
            let other = match &damage {
                Damage::CopyOf(k) => Some(disk_paths(&root, k)),
                _ => None,
            };
            Box::pin(async move {
                let start = key.start();
                let open = || {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .read(true)
                        .open(&path)
                        .unwrap()
                };
                match damage {
                    Damage::Garbage => open()
                        .write_all_at(&pattern(data.len() as u64, 7), start)
                        .unwrap(),
                    Damage::Truncated => open().set_len(start + data.len() as u64 - 1).unwrap(),
                    // The data without its block map.
                    Damage::Bare => std::fs::remove_file(&map).unwrap(),
                    Damage::FlipByte(at) => open()
                        .write_all_at(&[!data[at as usize]], start + at)
                        .unwrap(),
                    Damage::CopyOf(_) => {
                        let (other_data, other_map) = other.unwrap();
                        std::fs::copy(other_data, &path).unwrap();
                        std::fs::copy(other_map, &map).unwrap();
                    }
                }
            })
        })
    }

    /// Damages the object behind the store's back with a client of the server's own.
    fn s3_corruptor(client: aws_sdk_s3::Client, store: Arc<S3Store>) -> Corruptor {
        Arc::new(move |key, data, damage| {
            let (client, store) = (client.clone(), store.clone());
            Box::pin(async move {
                let object = store.object_key(&key);
                let head = client
                    .head_object()
                    .bucket(BUCKET)
                    .key(&object)
                    .send()
                    .await
                    .expect("head the object to damage");
                let meta = head.metadata().cloned();
                let (body, meta) = match damage {
                    Damage::Garbage => (pattern(data.len() as u64, 7), meta),
                    Damage::Truncated => (data.slice(..data.len() - 1), meta),
                    Damage::Bare => (data.clone(), None),
                    Damage::FlipByte(at) => {
                        let mut v = data.to_vec();
                        v[at as usize] ^= 0xff;
                        (Bytes::from(v), meta)
                    }
                    Damage::CopyOf(other) => {
                        let src = client
                            .get_object()
                            .bucket(BUCKET)
                            .key(store.object_key(&other))
                            .send()
                            .await
                            .unwrap();
                        let meta = src.metadata().cloned();
                        (src.body.collect().await.unwrap().into_bytes(), meta)
                    }
                };
                client
                    .put_object()
                    .bucket(BUCKET)
                    .key(&object)
                    .set_metadata(meta)
                    .body(body.into())
                    .send()
                    .await
                    .expect("put the damaged object");
            })
        })
    }

    async fn s3_on(target: Option<S3Target>) -> Option<Fixture> {
        let mut t = target?;
        let store = t.store().await;
        Some(Fixture {
            store: store.clone(),
            corrupt: Some(s3_corruptor(t.client.clone(), store)),
            settle: None,
            exact_commit_lost: true,
            atomic_objects: t.atomic_objects,
            _guards: std::mem::take(&mut t.guards),
        })
    }

    pub async fn s3_devorigin() -> Option<Fixture> {
        s3_on(targets::devorigin().await).await
    }

    pub async fn s3_garage() -> Option<Fixture> {
        s3_on(targets::garage().await).await
    }

    /// Waits until every write-behind queue of the replica is drained and written.
    fn replica_settle(r: &Arc<Replica>) -> Settle {
        let r = r.clone();
        Arc::new(move || {
            let r = r.clone();
            Box::pin(async move {
                assert!(
                    r.drain(Duration::from_secs(20)).await,
                    "write-behind never drained"
                );
                assert_eq!(r.errors(), Vec::<(String, String)>::new());
            })
        })
    }

    fn replica(sync: Arc<dyn CacheStore>, asynchronous: Arc<dyn CacheStore>) -> Arc<Replica> {
        Arc::new(Replica::new(
            vec![sync],
            vec![asynchronous],
            4,
            TierTimeouts {
                first_byte: Duration::from_secs(5),
                floor: Duration::from_secs(5),
                whole: Duration::from_secs(5),
            },
            Arc::default(),
        ))
    }

    pub async fn replica_disk_memory() -> Option<Fixture> {
        let (driver, dir) = disk_store();
        let r = replica(Arc::new(driver), Arc::new(MemoryStore::new(64 << 20)));
        let mut f = Fixture::plain(r.clone());
        f.settle = Some(replica_settle(&r));
        f.exact_commit_lost = false;
        f._guards.push(Box::new(dir));
        Some(f)
    }

    pub async fn replica_memory_s3() -> Option<Fixture> {
        let mut t = targets::devorigin().await?;
        let s3 = t.store().await;
        let r = replica(Arc::new(MemoryStore::new(64 << 20)), s3);
        let mut f = Fixture::plain(r.clone());
        f.settle = Some(replica_settle(&r));
        f.exact_commit_lost = false;
        f._guards = std::mem::take(&mut t.guards);
        Some(f)
    }
}

/// The s3 driver's own tests on a real server: `s3_suite!(module, target_fn);`.
macro_rules! s3_suite {
    ($name:ident, $target:expr) => {
        s3_suite!(@cases $name, $target, [
            layout_and_metadata, evict_older_than, spawned_eviction, wrong_credentials_are_auth,
            missing_bucket_is_clear, non_member_objects_are_never_served,
            another_secrets_objects_are_rejected, swapped_objects_and_blocks_are_caught,
            members_with_one_secret_read_each_other
        ]);
    };
    (@cases $name:ident, $target:expr, [$($case:ident),*]) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(t) = ($target)().await else { return };
                    super::s3_cases::$case(&t).await;
                }
            )*
        }
    };
}

s3_suite!(s3_own_devorigin, targets::devorigin);
s3_suite!(s3_own_garage, targets::garage);

/// `orcafs-tags` (raw) and `orcafs-mac` of a chunk, as docs/cachestore.md describes them:
/// K = HMAC-SHA256(secret, "orcafs shared cache objects v1"); per block the first 8 bytes of
/// HMAC(K, "orcafs-block\0" ‖ id ‖ index u64 LE ‖ bytes); HMAC(K, "orcafs-meta\0" ‖ id ‖
/// len u64 LE ‖ block u64 LE ‖ tags) over the metadata.
fn documented_auth(secret: &[u8], key: &ChunkKey, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use hmac::{Hmac, Mac};
    let hmac = |k: &[u8], parts: &[&[u8]]| {
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(k).unwrap();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    };
    let k = hmac(secret, &[b"orcafs shared cache objects v1"]);
    let id = key.id().0;
    let block = 64u64 << 10;
    assert!(data.len() as u64 <= 128 * block, "one block size here");
    let mut tags = Vec::new();
    for (i, b) in data.chunks(block as usize).enumerate() {
        let idx = (i as u64).to_le_bytes();
        tags.extend_from_slice(&hmac(&k, &[b"orcafs-block\0", &id, &idx, b])[..8]);
    }
    let (len, blk) = ((data.len() as u64).to_le_bytes(), block.to_le_bytes());
    let mac = hmac(&k, &[b"orcafs-meta\0", &id, &len, &blk, &tags]);
    (tags, mac)
}

/// Writes `body` with user metadata `meta` at `object`, as anyone with write access to the
/// bucket can: the plain S3 client, no secret.
async fn plain_put(
    client: &aws_sdk_s3::Client,
    object: &str,
    body: Bytes,
    meta: std::collections::HashMap<String, String>,
) {
    client
        .put_object()
        .bucket(BUCKET)
        .key(object)
        .set_metadata(Some(meta))
        .body(body.into())
        .send()
        .await
        .expect("plain put");
}

/// The body and user metadata of a stored object.
async fn plain_get(
    client: &aws_sdk_s3::Client,
    object: &str,
) -> (Bytes, std::collections::HashMap<String, String>) {
    let got = client
        .get_object()
        .bucket(BUCKET)
        .key(object)
        .send()
        .await
        .expect("plain get");
    let meta = got.metadata().cloned().unwrap_or_default();
    (got.body.collect().await.unwrap().into_bytes(), meta)
}

/// Whether an object is still in the bucket.
async fn exists(client: &aws_sdk_s3::Client, object: &str) -> bool {
    match client.head_object().bucket(BUCKET).key(object).send().await {
        Ok(_) => true,
        Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => false,
        Err(e) => panic!("head {object}: {e:?}"),
    }
}

/// Metadata of the format before objects were authenticated, with CRCs that match `body`.
fn crc_era_metadata(key: &ChunkKey, body: &[u8]) -> std::collections::HashMap<String, String> {
    let block = 64usize << 10;
    let crcs: String = body
        .chunks(block)
        .map(|b| format!("{:08x}", crc32c::crc32c(b)))
        .collect();
    [
        ("orcafs-id", key.id().to_hex()),
        ("orcafs-len", key.len().to_string()),
        ("orcafs-block", block.to_string()),
        ("orcafs-crcs", crcs),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

mod s3_cases {
    use super::*;

    /// Objects sit at `<prefix>/<origin id>/<hash>/<index>` with the raw bytes as body and the
    /// authentication metadata beside them, recomputed here from the documented format.
    pub async fn layout_and_metadata(t: &S3Target) {
        let store = t.store().await;
        let (key, data) = chunk_of(CHUNK + 1, 0);
        put(&*store, &key, &data).await.unwrap();
        let object = store.object_key(&key);
        let parts: Vec<&str> = object.split('/').collect();
        assert_eq!(parts.len(), 4, "{object}");
        assert_eq!(format!("{}/", parts[0]), store.prefix());
        assert_eq!(parts[1], "http___127.0.0.1_1_us-east-1");
        assert!(parts[2].len() == 64 && parts[2].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(parts[3], "0");
        let got = t
            .client
            .get_object()
            .bucket(BUCKET)
            .key(&object)
            .send()
            .await
            .unwrap();
        let meta = got.metadata().cloned().unwrap_or_default();
        assert_eq!(meta["orcafs-id"], key.id().to_hex());
        assert_eq!(meta["orcafs-len"], CHUNK.to_string());
        assert_eq!(meta["orcafs-block"], (64u64 << 10).to_string());
        let (tags, mac) = documented_auth(FLEET_SECRET, &key, &data);
        assert_eq!(meta["orcafs-tags"], aws_smithy_types::base64::encode(&tags));
        assert_eq!(meta["orcafs-mac"], hex::encode(mac));
        assert!(!meta.contains_key("orcafs-crcs"), "{meta:?}");
        assert_eq!(got.body.collect().await.unwrap().into_bytes(), data);
    }

    /// An eviction pass deletes exactly the chunks older than the age, and nothing that is not
    /// a chunk object of this store.
    pub async fn evict_older_than(t: &S3Target) {
        let store = t.store().await;
        let neighbour = t.store().await;
        let a = chunk_of(CHUNK, 0);
        let b = chunk_of(100, 0);
        let n = chunk_of(100, 0);
        put(&*store, &a.0, &a.1).await.unwrap();
        put(&*store, &b.0, &b.1).await.unwrap();
        put(&*neighbour, &n.0, &n.1).await.unwrap();
        let stray = format!("{}notes/readme.txt", store.prefix());
        t.client
            .put_object()
            .bucket(BUCKET)
            .key(&stray)
            .body(Bytes::from_static(b"not a chunk").into())
            .send()
            .await
            .unwrap();

        let big = Duration::from_secs(3600);
        assert_eq!(store.evict_older_than(big).await.unwrap(), 0);
        assert_eq!(store.stat(&a.0).await.unwrap().expect("stored").size, CHUNK);
        assert_eq!(store.stat(&b.0).await.unwrap().expect("stored").size, 100);

        assert_eq!(store.evict_older_than(Duration::ZERO).await.unwrap(), 2);
        assert_eq!(store.stat(&a.0).await, Ok(None));
        assert_eq!(store.stat(&b.0).await, Ok(None));
        assert_eq!(store.evict_older_than(Duration::ZERO).await.unwrap(), 0);
        // Another prefix and a stray object under ours are left alone.
        assert_eq!(
            neighbour.stat(&n.0).await.unwrap().expect("stored").size,
            100
        );
        t.client
            .head_object()
            .bucket(BUCKET)
            .key(&stray)
            .send()
            .await
            .expect("the stray object survives eviction");
    }

    pub async fn spawned_eviction(t: &S3Target) {
        let store = t.store().await;
        let a = chunk_of(1000, 0);
        put(&*store, &a.0, &a.1).await.unwrap();
        let task = store.spawn_eviction(Duration::ZERO, Duration::from_millis(100));
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.stat(&a.0).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the eviction loop never evicted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        // Stopped: a new chunk stays.
        put(&*store, &a.0, &a.1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(store.stat(&a.0).await.unwrap().is_some());

        // The loop also ends by itself once the store is gone.
        let task = store.spawn_eviction(Duration::from_secs(3600), Duration::from_millis(100));
        drop(store);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends when the store is dropped")
            .unwrap();
    }

    pub async fn wrong_credentials_are_auth(t: &S3Target) {
        let mut cfg = t.config();
        cfg.credentials = Credentials::Static {
            id: t.access_key.clone(),
            secret: "not-the-secret".into(),
        };
        let (store, _) = member(&cfg, FLEET_SECRET).await;
        let (key, data) = chunk_of(10, 0);
        assert!(matches!(store.stat(&key).await, Err(StoreError::Auth(_))));
        assert!(matches!(
            put(&*store, &key, &data).await,
            Err(StoreError::Auth(_))
        ));
        assert!(matches!(
            get(&*store, &key, 0, 10).await,
            Err(StoreError::Auth(_))
        ));
        assert!(matches!(store.self_test().await, Err(StoreError::Auth(_))));
    }

    pub async fn missing_bucket_is_clear(t: &S3Target) {
        let mut cfg = t.config();
        cfg.bucket = "no-such-bucket".into();
        let (store, _) = member(&cfg, FLEET_SECRET).await;
        match store.self_test().await {
            Err(StoreError::Other(m))
                if m.contains("no-such-bucket") && m.contains("does not exist") => {}
            other => panic!("self test on a missing bucket: {other:?}"),
        }
    }

    /// How the store under test reads a chunk; the four ways a reader meets an object.
    #[derive(Clone, Copy, Debug)]
    enum Entry {
        Whole,
        Range,
        Empty,
        Stat,
    }

    /// A miss for the reader, whatever the entry (a block that fails mid-stream is an error).
    async fn read_as(
        store: &S3Store,
        key: &ChunkKey,
        entry: Entry,
    ) -> Result<Option<Bytes>, StoreError> {
        match entry {
            Entry::Whole => get(store, key, 0, key.len()).await,
            Entry::Range => get(store, key, (64 << 10) + 3, 100_000).await,
            Entry::Empty => get(store, key, 0, 0).await,
            Entry::Stat => store.stat(key).await.map(|i| i.map(|_| Bytes::new())),
        }
    }

    /// Objects written with the plain S3 client by someone without the secret, each with
    /// plausible metadata, are never served: a miss, deleted, counted.
    pub async fn non_member_objects_are_never_served(t: &S3Target) {
        let (store, metrics) = member(&t.config(), FLEET_SECRET).await;
        let (_, other_data) = chunk_of(CHUNK, 0);
        let random = |n: usize| -> String {
            let v: Vec<u8> = (0..n).map(|_| fastrand::u8(..)).collect();
            aws_smithy_types::base64::encode(v)
        };
        type Forgery = fn(
            &ChunkKey,
            &Bytes,
            &Bytes,
            &dyn Fn(usize) -> String,
        ) -> (Bytes, std::collections::HashMap<String, String>);
        let forgeries: [(&str, Forgery, Entry); 4] = [
            (
                "garbage with matching CRCs",
                |key, _, _, _| {
                    let body = pattern(key.len(), 7);
                    let meta = crc_era_metadata(key, &body);
                    (body, meta)
                },
                Entry::Whole,
            ),
            (
                "the right bytes in the format before authentication",
                |key, data, _, _| (data.clone(), crc_era_metadata(key, data)),
                Entry::Stat,
            ),
            (
                "another chunk's bytes under made-up tags and MAC",
                |key, _, other, random| {
                    let mut meta = crc_era_metadata(key, other);
                    meta.remove("orcafs-crcs");
                    meta.insert("orcafs-tags".into(), random(4 * 8));
                    meta.insert("orcafs-mac".into(), hex::encode(random(32)));
                    (other.clone(), meta)
                },
                Entry::Empty,
            ),
            (
                "another chunk's bytes with CRCs and a made-up MAC",
                |key, _, other, random| {
                    let mut meta = crc_era_metadata(key, other);
                    meta.insert("orcafs-tags".into(), random(4 * 8));
                    meta.insert("orcafs-mac".into(), "00".repeat(32));
                    (other.clone(), meta)
                },
                Entry::Range,
            ),
        ];
        for (what, forge, entry) in forgeries {
            let (key, data) = chunk_of(CHUNK, 0);
            let object = store.object_key(&key);
            let (body, meta) = forge(&key, &data, &other_data, &random);
            plain_put(&t.client, &object, body, meta).await;
            let before = metrics.shared_rejected.get();
            let r = read_as(&store, &key, entry).await;
            assert_eq!(r, Ok(None), "{what} via {entry:?}");
            assert_eq!(
                metrics.shared_rejected.get(),
                before + 1,
                "{what}: counted once"
            );
            assert!(!exists(&t.client, &object).await, "{what}: deleted");
            // A member's fill stores the real chunk in its place.
            assert_eq!(
                put(&*store, &key, &data).await,
                Ok(Committed::Stored),
                "{what}"
            );
            assert_eq!(
                get(&*store, &key, 0, CHUNK).await.unwrap().expect("hit"),
                data
            );
        }
        assert_eq!(metrics.shared_rejected.get(), 4);
    }

    /// A member of another fleet (same bucket and prefix, another secret) is a non-member here:
    /// its objects are rejected like any forgery, and ours by it.
    pub async fn another_secrets_objects_are_rejected(t: &S3Target) {
        let cfg = t.config();
        let (ours, our_metrics) = member(&cfg, FLEET_SECRET).await;
        let (theirs, their_metrics) = member(&cfg, b"the secret of another fleet").await;
        let (key, data) = chunk_of(CHUNK, 0);
        assert_eq!(put(&*theirs, &key, &data).await, Ok(Committed::Stored));
        let object = ours.object_key(&key);
        assert!(exists(&t.client, &object).await);
        assert_eq!(get(&*ours, &key, 0, CHUNK).await, Ok(None));
        assert_eq!(our_metrics.shared_rejected.get(), 1);
        assert!(!exists(&t.client, &object).await, "deleted");
        // A put sees no authentic copy, so it stores one (counting the one it replaces).
        let (key2, data2) = chunk_of(CHUNK, 0);
        put(&*theirs, &key2, &data2).await.unwrap();
        assert_eq!(put(&*ours, &key2, &data2).await, Ok(Committed::Stored));
        assert_eq!(our_metrics.shared_rejected.get(), 2);
        assert_eq!(
            get(&*ours, &key2, 0, CHUNK).await.unwrap().expect("hit"),
            data2
        );
        assert_eq!(get(&*theirs, &key2, 0, 10).await, Ok(None));
        assert_eq!(their_metrics.shared_rejected.get(), 1);
    }

    /// Two authentic objects swapped, and two blocks of one object swapped, are caught.
    pub async fn swapped_objects_and_blocks_are_caught(t: &S3Target) {
        let (store, metrics) = member(&t.config(), FLEET_SECRET).await;
        let (x, x_data) = chunk_of(CHUNK, 0);
        let (y, y_data) = chunk_of(CHUNK, 0);
        put(&*store, &x.clone(), &x_data).await.unwrap();
        put(&*store, &y, &y_data).await.unwrap();
        let (ox, oy) = (store.object_key(&x), store.object_key(&y));
        let (xb, xm) = plain_get(&t.client, &ox).await;
        let (yb, ym) = plain_get(&t.client, &oy).await;
        plain_put(&t.client, &ox, yb, ym).await;
        plain_put(&t.client, &oy, xb, xm).await;
        assert_eq!(get(&*store, &x, 0, CHUNK).await, Ok(None));
        assert_eq!(store.stat(&y).await, Ok(None));
        assert_eq!(metrics.shared_rejected.get(), 2);
        assert!(!exists(&t.client, &ox).await && !exists(&t.client, &oy).await);

        // Blocks 0 and 1 of one object swapped, its metadata intact: the first block read fails
        // before a byte of it is yielded.
        let (z, z_data) = chunk_of(CHUNK, 0);
        put(&*store, &z, &z_data).await.unwrap();
        let oz = store.object_key(&z);
        let (zb, zm) = plain_get(&t.client, &oz).await;
        let b = 64 << 10;
        let swapped = [&zb[b..2 * b], &zb[..b], &zb[2 * b..]].concat();
        plain_put(&t.client, &oz, Bytes::from(swapped), zm).await;
        let r = get(&*store, &z, 10, 20).await;
        assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
        assert_eq!(metrics.shared_rejected.get(), 3);
        assert!(!exists(&t.client, &oz).await);
        // Healed by the next fill.
        put(&*store, &z, &z_data).await.unwrap();
        assert_eq!(
            get(&*store, &z, 0, CHUNK).await.unwrap().expect("hit"),
            z_data
        );
    }

    /// Two members holding the same secret (two hosts): what one writes, the other reads.
    pub async fn members_with_one_secret_read_each_other(t: &S3Target) {
        let cfg = t.config();
        let (a, a_metrics) = member(&cfg, FLEET_SECRET).await;
        let (b, b_metrics) = member(&cfg, FLEET_SECRET).await;
        let (key, data) = chunk_of(CHUNK - 1, 0);
        assert_eq!(put(&*a, &key, &data).await, Ok(Committed::Stored));
        assert_eq!(get(&*b, &key, 0, CHUNK).await.unwrap().expect("hit"), data);
        assert_eq!(
            get(&*b, &key, 100_000, 70_000).await.unwrap().expect("hit"),
            data.slice(100_000..170_000)
        );
        assert_eq!(b.stat(&key).await.unwrap().expect("stored").size, CHUNK - 1);
        assert_eq!(put(&*b, &key, &data).await, Ok(Committed::AlreadyThere));
        assert_eq!(
            a_metrics.shared_rejected.get() + b_metrics.shared_rejected.get(),
            0
        );
    }
}

/// A stand-in S3 server on 127.0.0.1 that answers every request with one canned response, or
/// (with `None`) accepts connections and never answers. Stops on Drop.
struct FakeS3 {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeS3 {
    fn start(response: Option<&'static str>) -> FakeS3 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let s = s.clone();
                        conns.push(std::thread::spawn(move || serve(sock, response, &s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        FakeS3 {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads requests (head and Content-Length body) and answers each with `response` as an XML
/// 200; with `None` reads and never answers. Returns when told to stop or the peer hangs up.
fn serve(mut sock: TcpStream, response: Option<&str>, stop: &AtomicBool) {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match sock.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => continue,
        }
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let body_len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() < head_end + 4 + body_len {
            continue;
        }
        buf.drain(..head_end + 4 + body_len);
        if let Some(body) = response {
            // HEAD answers carry no body.
            let body = if head.starts_with("head ") { "" } else { body };
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if sock.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }
}

fn fake_config(endpoint: String, timeout: Duration) -> SharedCacheConfig {
    SharedCacheConfig {
        endpoint_url: Some(endpoint),
        bucket: BUCKET.into(),
        prefix: String::new(),
        region: None,
        force_path_style: true,
        credentials: Credentials::Static {
            id: "AK".into(),
            secret: "SK".into(),
        },
        required: true,
        max_age: None,
        timeout,
        first_byte_timeout: timeout,
        first_byte_floor: timeout,
        secret_file: None,
    }
}

/// The s3 driver against stand-in servers: versioning refusal, dead and hung stores.
mod s3_unreal {
    use super::*;

    /// Neither local server can turn versioning on (s3s-fs does not implement it, Garage has
    /// no versioning), so a stand-in answers GetBucketVersioning.
    #[tokio::test]
    async fn versioned_bucket_is_refused() {
        for (status, words) in [
            ("Enabled", "versioning enabled"),
            ("Suspended", "versioning suspended"),
        ] {
            let body: &'static str = Box::leak(
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<VersioningConfiguration \
                     xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Status>{status}</Status>\
                     </VersioningConfiguration>"
                )
                .into_boxed_str(),
            );
            let fake = FakeS3::start(Some(body));
            let cfg = fake_config(fake.endpoint(), Duration::from_secs(5));
            let (store, _) = member(&cfg, FLEET_SECRET).await;
            match store.self_test().await {
                Err(StoreError::Other(m)) => {
                    assert!(m.contains(words) && m.contains("unversioned bucket"), "{m}");
                    assert!(m.contains(BUCKET), "{m}");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    /// Nothing listens: every call is Transient at once.
    #[tokio::test]
    async fn dead_store_is_transient_fast() {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = fake_config(format!("http://127.0.0.1:{port}"), Duration::from_secs(2));
        let (store, _) = member(&cfg, FLEET_SECRET).await;
        let (key, data) = chunk_of(100, 0);
        let t0 = Instant::now();
        assert!(matches!(
            store.stat(&key).await,
            Err(StoreError::Transient(_))
        ));
        assert!(matches!(
            get(&*store, &key, 0, 100).await,
            Err(StoreError::Transient(_))
        ));
        assert!(matches!(
            put(&*store, &key, &data).await,
            Err(StoreError::Transient(_))
        ));
        assert!(matches!(
            store.delete(&key).await,
            Err(StoreError::Transient(_))
        ));
        assert!(matches!(
            store.self_test().await,
            Err(StoreError::Transient(_))
        ));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    /// A server that accepts and never answers: each call ends Transient within its timeout.
    #[tokio::test]
    async fn hung_store_is_transient_within_the_timeout() {
        let fake = FakeS3::start(None);
        let cfg = fake_config(fake.endpoint(), Duration::from_secs(1));
        let (store, _) = member(&cfg, FLEET_SECRET).await;
        let (key, data) = chunk_of(100, 0);
        for op in ["stat", "get", "put"] {
            let t0 = Instant::now();
            let r = match op {
                "stat" => store.stat(&key).await.map(|_| ()),
                "get" => get(&*store, &key, 0, 100).await.map(|_| ()),
                _ => put(&*store, &key, &data).await.map(|_| ()),
            };
            let took = t0.elapsed();
            assert!(matches!(r, Err(StoreError::Transient(_))), "{op}: {r:?}");
            assert!(took < Duration::from_secs(3), "{op} took {took:?}");
        }
    }
}

/// The default tiering over a real shared store: write-behind lands in s3, a miss of the local
/// tier reads through s3 and is copied back.
mod replica_over_s3 {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_behind_and_read_through() {
        let t = targets::devorigin().await.unwrap();
        let s3 = t.store().await;
        let local = Arc::new(MemoryStore::new(64 << 20));
        let metrics = Arc::new(Metrics::default());
        let r = Arc::new(Replica::new(
            vec![local.clone()],
            vec![s3.clone()],
            4,
            TierTimeouts {
                first_byte: Duration::from_secs(5),
                floor: Duration::from_secs(5),
                whole: Duration::from_secs(5),
            },
            metrics.clone(),
        ));
        let (key, data) = chunk_of(CHUNK, 0);
        put(&*r, &key, &data).await.unwrap();
        // Looked at once the write-behind is done: s3s-fs writes an object's data before its
        // metadata, and the store deletes an object it finds without its metadata as damaged,
        // so a stat racing the upload could delete it.
        assert!(
            r.drain(Duration::from_secs(10)).await,
            "write-behind still queued: {:?}",
            r.queue_depths()
        );
        assert!(
            matches!(s3.stat(&key).await, Ok(Some(_))),
            "write-behind never reached s3: errors {:?}, {:?}",
            r.errors(),
            metrics.snapshot()
        );
        assert_eq!(get(&*s3, &key, 0, CHUNK).await.unwrap().expect("hit"), data);

        // Stored by another host: only in s3.
        let (other, other_data) = chunk_of(CHUNK, 0);
        put(&*s3, &other, &other_data).await.unwrap();
        assert_eq!(local.contains_hint(&other), Some(false));
        assert_eq!(
            get(&*r, &other, 10, 1000).await.unwrap().expect("hit"),
            other_data.slice(10..1010)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while local.contains_hint(&other) != Some(true) {
            assert!(Instant::now() < deadline, "never copied back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            get(&*local, &other, 0, CHUNK).await.unwrap().expect("hit"),
            other_data
        );
    }
}

/// The s3 driver under transport faults (DevOrigin's GetObject fault injection): cut and
/// stalled bodies and 5xx answers are `Transient`, bounded in time, and never taken for damage
/// (the object stays).
mod s3_faults {
    use super::*;

    async fn setup(
        timeout: Duration,
    ) -> (DevOrigin, tempfile::TempDir, Arc<S3Store>, ChunkKey, Bytes) {
        let dir = tempfile::tempdir().unwrap();
        let o = DevOrigin::start(dir.path()).expect("start devorigin");
        o.create_bucket(BUCKET);
        let t = S3Target {
            endpoint: o.endpoint(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            client: o.client(),
            atomic_objects: false,
            guards: Vec::new(),
        };
        let mut cfg = t.config();
        cfg.timeout = timeout;
        let (store, _) = member(&cfg, FLEET_SECRET).await;
        let (key, data) = chunk_of(CHUNK, 0);
        put(&*store, &key, &data).await.unwrap();
        (o, dir, store, key, data)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cut_body_is_transient_and_keeps_the_object() {
        let (o, _dir, store, key, data) = setup(Duration::from_secs(5)).await;
        o.faults().cut_next_bodies(1);
        let r = get(&*store, &key, 0, CHUNK).await;
        assert!(matches!(r, Err(StoreError::Transient(_))), "{r:?}");
        assert_eq!(store.stat(&key).await.unwrap().expect("stored").size, CHUNK);
        assert_eq!(
            get(&*store, &key, 0, CHUNK).await.unwrap().expect("hit"),
            data
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_body_is_transient_within_the_timeout() {
        let (o, _dir, store, key, data) = setup(Duration::from_secs(1)).await;
        o.faults()
            .stall_next_bodies(1, 70_000, Duration::from_secs(4));
        let t0 = Instant::now();
        let r = get(&*store, &key, 0, CHUNK).await;
        let took = t0.elapsed();
        assert!(matches!(r, Err(StoreError::Transient(_))), "{r:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert_eq!(
            get(&*store, &key, 0, CHUNK).await.unwrap().expect("hit"),
            data
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_errors_are_retried_once_then_transient() {
        let (o, _dir, store, key, data) = setup(Duration::from_secs(5)).await;
        o.faults().fail_next_gets(1, 503);
        assert_eq!(
            get(&*store, &key, 0, CHUNK).await.unwrap().expect("hit"),
            data,
            "one 503 is retried"
        );
        o.faults().fail_next_gets(2, 500);
        let r = get(&*store, &key, 0, CHUNK).await;
        assert!(matches!(r, Err(StoreError::Transient(_))), "{r:?}");
        o.faults().fail_next_gets(1, 403);
        let r = get(&*store, &key, 0, CHUNK).await;
        assert!(matches!(r, Err(StoreError::Auth(_))), "{r:?}");
        assert_eq!(
            get(&*store, &key, 0, CHUNK).await.unwrap().expect("hit"),
            data
        );
    }
}
