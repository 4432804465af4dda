//! cachestore: where chunks are kept once fetched, behind one trait, [`CacheStore`].
//!
//! Drivers: [`disk`] (the local cache), [`memory`] (bounded, for tests), [`s3`] (the shared
//! in-datacenter store) and [`replica`] (a synchronous set plus write-behind asynchronous sets;
//! the default tiering is local disk + shared s3). Every driver passes the same contract suite
//! (`tests/contract.rs`), so they are interchangeable.
//!
//! Stores keep bytes by [`ChunkKey`]; since a key is content addressed, two writers of one key
//! write identical bytes, and losing a race to commit ([`Committed::AlreadyThere`]) is success.
//! A miss is `Ok(None)`, not an error: errors are for stores that fail.
//! Stores never talk to the origin and know nothing of FUSE.

use std::pin::Pin;
use std::time::SystemTime;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::chunk::{ChunkKey, ObjectVersion};

pub mod admin;
pub mod disk;
pub mod layout;
pub mod memory;
pub mod replica;
pub mod s3;

pub use disk::DiskStore;
pub use layout::BlockCrcs;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable, may succeed later: {0}")]
    Transient(String),
    #[error("store refused the credentials: {0}")]
    Auth(String),
    #[error("stored chunk is corrupt or foreign: {0}")]
    Corrupt(String),
    #[error("store error: {0}")]
    Other(String),
}

/// How a put ended; both are success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Stored,
    /// Another writer committed this chunk first; the stored bytes are the same.
    AlreadyThere,
}

/// What a store knows about a stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub size: u64,
    /// When the chunk was committed (for age-based eviction).
    pub committed: SystemTime,
}

/// The bytes of a stored chunk range, verified before they are yielded.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// One interface for every place chunks are kept.
#[async_trait::async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// Short name for logs and metrics (`disk`, `s3`, `memory`, `replica`).
    fn name(&self) -> &str;

    /// `len` bytes at `offset` inside the chunk (clipped to its length), `None` when absent;
    /// corrupt, truncated or foreign data is never yielded.
    async fn get_chunk(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<ChunkStream>, StoreError>;

    /// Stores a complete chunk of `size` bytes, given as pieces. Atomic: readers see all of it
    /// or nothing.
    async fn put_chunk(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
    ) -> Result<Committed, StoreError>;

    /// [`Self::put_chunk`] with the CRC32C of each of the data's blocks, computed as it came,
    /// for a store that keeps them (the disk) to take instead of reading the data again.
    async fn put_chunk_summed(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
        _crcs: BlockCrcs,
    ) -> Result<Committed, StoreError> {
        self.put_chunk(key, size, data).await
    }

    /// What the store knows of the chunk, `None` when absent.
    async fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, StoreError>;

    /// Removes the chunk; removing an absent chunk succeeds.
    async fn delete(&self, key: &ChunkKey) -> Result<(), StoreError>;

    /// Proves read-after-write on this store (put, stat, get, compare, delete a probe chunk).
    async fn self_test(&self) -> Result<(), StoreError>;

    /// A cheap answer, without I/O, to "is this chunk here?", where the store can give one.
    fn contains_hint(&self, _key: &ChunkKey) -> Option<bool> {
        None
    }

    /// A hint that this chunk will be read soon (a sequential reader is heading there), so a
    /// store can start fetching it into memory. Never waits; may do nothing.
    fn will_read(&self, _key: &ChunkKey) {}

    /// Where a store can tell without I/O: are the blocks under `[offset, offset+len)` of the
    /// chunk here, even if the rest of the chunk is not? (The disk keeps parts of chunks.)
    fn contains_range_hint(&self, _key: &ChunkKey, _offset: u64, _len: u64) -> Option<bool> {
        None
    }

    /// The bytes at once, from a local store that holds them (a read of local files, no
    /// network, no waiting on other work); None when it cannot (or this store is remote).
    fn read_now(&self, _key: &ChunkKey, _offset: u64, _len: u64) -> Option<Bytes> {
        None
    }

    /// Keeps blocks of a chunk (what a random read fetched), where the store keeps parts of
    /// chunks; `offset` is a block boundary inside the chunk. Others ignore it.
    async fn put_blocks(
        &self,
        _key: &ChunkKey,
        _offset: u64,
        _data: Vec<Bytes>,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// The whole object as one local file, checked, for the kernel to read itself (FUSE
    /// passthrough), where the store holds all of it locally; None otherwise.
    async fn whole_object(
        &self,
        _object: &ObjectVersion,
        _chunk_size: u64,
    ) -> Result<Option<LocalFile>, StoreError> {
        Ok(None)
    }
}

/// A whole object in a local file: the file, open for reading, and a guard that keeps the store
/// from evicting it while held.
pub struct LocalFile {
    pub file: std::fs::File,
    pub pin: Box<dyn Send + Sync>,
}

/// Collects a chunk stream into one buffer (zero-copy when it is one piece).
pub async fn collect(mut stream: ChunkStream) -> Result<Bytes, StoreError> {
    let Some(first) = stream.next().await.transpose()? else {
        return Ok(Bytes::new());
    };
    let Some(second) = stream.next().await.transpose()? else {
        return Ok(first);
    };
    // Page-aligned: reads go on to the kernel as FUSE replies.
    let mut out = crate::pagebuf::with_capacity(first.len() + second.len());
    out.extend_from_slice(&first);
    out.extend_from_slice(&second);
    while let Some(piece) = stream.next().await.transpose()? {
        out.extend_from_slice(&piece);
    }
    Ok(crate::pagebuf::freeze(out))
}

/// Checks a put's arguments against the key; every driver calls it first.
pub fn check_put(key: &ChunkKey, size: u64, data: &[Bytes]) -> Result<(), StoreError> {
    let got: u64 = data.iter().map(|b| b.len() as u64).sum();
    if got != size || size != key.len() {
        return Err(StoreError::Other(format!(
            "put of {got} bytes announced as {size}, chunk {key:?} has {}",
            key.len()
        )));
    }
    Ok(())
}

/// A stream of one piece.
pub fn once(bytes: Bytes) -> ChunkStream {
    Box::pin(futures::stream::once(async move { Ok(bytes) }))
}

/// The probe chunk every self test writes: unique per call, so concurrent tests don't collide.
/// The origin id of [`probe_key`]'s objects, which no mount reads.
pub const PROBE_ORIGIN: &str = "orcafs-self-test";

pub fn probe_key(store: &str) -> (ChunkKey, Bytes) {
    use std::sync::Arc;
    let data = Bytes::from(format!(
        "orcafs self test of {store} {:016x}",
        fastrand::u64(..)
    ));
    let object = Arc::new(crate::chunk::ObjectVersion {
        origin_id: PROBE_ORIGIN.into(),
        bucket: "self-test".into(),
        key: format!("probe-{:016x}", fastrand::u64(..)).into(),
        etag: "probe".into(),
        size: data.len() as u64,
    });
    (ChunkKey::new(object, 1 << 20, 0), data)
}

/// The self test all drivers share: put, stat, get, compare, delete.
pub async fn read_after_write(store: &dyn CacheStore) -> Result<(), StoreError> {
    let (key, data) = probe_key(store.name());
    store
        .put_chunk(&key, data.len() as u64, vec![data.clone()])
        .await?;
    let info = store
        .stat(&key)
        .await?
        .ok_or_else(|| StoreError::Other("self test: a chunk just put is not there".into()))?;
    if info.size != data.len() as u64 {
        return Err(StoreError::Other(format!(
            "self test: stat says {} bytes, wrote {}",
            info.size,
            data.len()
        )));
    }
    let stream = store
        .get_chunk(&key, 0, data.len() as u64)
        .await?
        .ok_or_else(|| StoreError::Other("self test: a chunk just put cannot be read".into()))?;
    let back = collect(stream).await?;
    if back != data {
        return Err(StoreError::Other(
            "self test: read back different bytes".into(),
        ));
    }
    store.delete(&key).await?;
    match store.stat(&key).await? {
        None => Ok(()),
        Some(_) => Err(StoreError::Other(
            "self test: chunk still there after delete".into(),
        )),
    }
}
