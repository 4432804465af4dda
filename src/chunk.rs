//! chunk: what a chunk is. An object version ([`ObjectVersion`]) is cut into fixed-size chunks;
//! a [`ChunkKey`] names one of them by content (origin id, bucket, key, ETag, chunk size, index)
//! and hashes to its storage path, so bytes of one ETag can never be served for another.
//!
//! Pure arithmetic and hashing: no I/O, no knowledge of where chunks are stored.

use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, OnceLock};

use sha2::{Digest as _, Sha256};

/// One version of one object, pinned when a file is opened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    pub origin_id: Arc<str>,
    pub bucket: Arc<str>,
    pub key: Arc<str>,
    pub etag: Arc<str>,
    pub size: u64,
}

/// The content address of one chunk of one object version. Built with [`ChunkKey::new`], which
/// hashes the version once; the chunk's own id (what peers and the shared store know it by) is
/// hashed when first asked for: a read served from the local cache never needs it. The fields
/// are read-only by convention.
#[derive(Clone)]
pub struct ChunkKey {
    pub object: Arc<ObjectVersion>,
    pub chunk_size: u64,
    pub index: u64,
    id: OnceLock<ChunkId>,
    version: VersionId,
}

/// The same version (fields and chunk size) and index: the same chunk, as equal ids say.
impl PartialEq for ChunkKey {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version && self.index == other.index
    }
}

impl Eq for ChunkKey {}

impl std::hash::Hash for ChunkKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.version.hash(state);
        self.index.hash(state);
    }
}

/// SHA-256 over an object version's fields and the chunk size: names the local cache's files of
/// that version (all its chunks of that size live in one file, at their offsets).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId(pub [u8; 32]);

impl VersionId {
    pub fn of(o: &ObjectVersion, chunk_size: u64) -> VersionId {
        let mut h = Sha256::new();
        hash_version(&mut h, o);
        h.update(chunk_size.to_le_bytes());
        VersionId(h.finalize().into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<VersionId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(VersionId(out))
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// Each field is length-prefixed so that no two distinct versions hash the same input.
fn hash_version(h: &mut Sha256, o: &ObjectVersion) {
    for field in [&*o.origin_id, &*o.bucket, &*o.key, &*o.etag] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
}

/// SHA-256 over the key fields; names the chunk in every store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<ChunkId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(ChunkId(out))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

thread_local! {
    /// The last version hashed on this thread: a reader's every request names the same open
    /// object, so its keys cost one SHA-256 per object and thread, not one per read. The `Arc`
    /// held here keeps its allocation alive, so a pointer match is never a new object at an
    /// old address.
    static LAST_VERSION: RefCell<Option<(Arc<ObjectVersion>, u64, VersionId)>> =
        const { RefCell::new(None) };
}

/// [`VersionId::of`], remembered for the last object hashed on this thread.
fn version_of(object: &Arc<ObjectVersion>, chunk_size: u64) -> VersionId {
    LAST_VERSION.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((o, cs, v)) = last.as_ref() {
            if Arc::ptr_eq(o, object) && *cs == chunk_size {
                return *v;
            }
        }
        let v = VersionId::of(object, chunk_size);
        *last = Some((object.clone(), chunk_size, v));
        v
    })
}

impl ChunkKey {
    pub fn new(object: Arc<ObjectVersion>, chunk_size: u64, index: u64) -> ChunkKey {
        let version = version_of(&object, chunk_size);
        ChunkKey {
            object,
            chunk_size,
            index,
            id: OnceLock::new(),
            version,
        }
    }

    pub fn id(&self) -> ChunkId {
        *self
            .id
            .get_or_init(|| Self::hash(&self.object, self.chunk_size, self.index))
    }

    /// The object version (at this chunk size) the chunk belongs to.
    pub fn version(&self) -> VersionId {
        self.version
    }

    fn hash(o: &ObjectVersion, chunk_size: u64, index: u64) -> ChunkId {
        let mut h = Sha256::new();
        hash_version(&mut h, o);
        h.update(chunk_size.to_le_bytes());
        h.update(index.to_le_bytes());
        ChunkId(h.finalize().into())
    }

    /// Offset of the chunk's first byte in the object.
    pub fn start(&self) -> u64 {
        self.index * self.chunk_size
    }

    /// Length of this chunk: `chunk_size`, less for the tail chunk.
    pub fn len(&self) -> u64 {
        self.object
            .size
            .saturating_sub(self.start())
            .min(self.chunk_size)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}@{}#{}",
            self.object.bucket, self.object.key, self.object.etag, self.index
        )
    }
}

/// The part of one chunk that a byte range covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    pub index: u64,
    /// Offset inside the chunk.
    pub offset: u64,
    pub len: u64,
}

/// Chunks covered by `[offset, offset+len)` of an object of `size` bytes, clipped to the object.
pub fn spans(offset: u64, len: u64, size: u64, chunk_size: u64) -> impl Iterator<Item = ChunkSpan> {
    let end = offset.saturating_add(len).min(size);
    let mut pos = offset.min(end);
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / chunk_size;
        let in_chunk = pos % chunk_size;
        let n = (chunk_size - in_chunk).min(end - pos);
        pos += n;
        Some(ChunkSpan {
            index,
            offset: in_chunk,
            len: n,
        })
    })
}

/// Number of chunks of an object of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(etag: &str, size: u64) -> Arc<ObjectVersion> {
        Arc::new(ObjectVersion {
            origin_id: "o".into(),
            bucket: "b".into(),
            key: "k".into(),
            etag: etag.into(),
            size,
        })
    }

    #[test]
    fn id_depends_on_every_field() {
        let base = ChunkKey::new(obj("e1", 100), 10, 3);
        let ids = [
            ChunkKey::new(obj("e2", 100), 10, 3).id(),
            ChunkKey::new(obj("e1", 100), 20, 3).id(),
            ChunkKey::new(obj("e1", 100), 10, 4).id(),
            ChunkKey::new(
                Arc::new(ObjectVersion {
                    key: "k2".into(),
                    ..(*obj("e1", 100)).clone()
                }),
                10,
                3,
            )
            .id(),
        ];
        for id in ids {
            assert_ne!(id, base.id());
        }
        assert_eq!(base.id(), ChunkKey::new(obj("e1", 100), 10, 3).id());
        assert_eq!(ChunkId::from_hex(&base.id().to_hex()), Some(base.id()));
    }

    #[test]
    fn remembered_versions_are_the_versions_of_the_object_asked() {
        let (a, b) = (obj("e1", 100), obj("e2", 100));
        for (o, cs) in [(&a, 10), (&a, 10), (&a, 20), (&b, 20), (&a, 20), (&b, 10)] {
            let key = ChunkKey::new(o.clone(), cs, 1);
            assert_eq!(key.version(), VersionId::of(o, cs));
        }
        // The same fields in another allocation: the same version, hashed again.
        let a2 = obj("e1", 100);
        assert_eq!(
            ChunkKey::new(a2, 10, 0).version(),
            ChunkKey::new(a, 10, 0).version()
        );
    }

    #[test]
    fn tail_chunk_length() {
        let o = obj("e", 25);
        assert_eq!(ChunkKey::new(o.clone(), 10, 0).len(), 10);
        assert_eq!(ChunkKey::new(o.clone(), 10, 2).len(), 5);
        assert_eq!(ChunkKey::new(o, 10, 3).len(), 0);
        assert_eq!(chunk_count(25, 10), 3);
        assert_eq!(chunk_count(0, 10), 0);
        assert_eq!(chunk_count(30, 10), 3);
    }

    #[test]
    fn spans_cover_range_exactly() {
        let v: Vec<_> = spans(5, 20, 25, 10).collect();
        assert_eq!(
            v,
            vec![
                ChunkSpan {
                    index: 0,
                    offset: 5,
                    len: 5
                },
                ChunkSpan {
                    index: 1,
                    offset: 0,
                    len: 10
                },
                ChunkSpan {
                    index: 2,
                    offset: 0,
                    len: 5
                },
            ]
        );
        assert_eq!(spans(30, 10, 25, 10).count(), 0);
        assert_eq!(spans(0, 10, 0, 10).count(), 0);
        let total: u64 = spans(3, 1000, 995, 7).map(|s| s.len).sum();
        assert_eq!(total, 992);
    }
}
