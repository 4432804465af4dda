//! memory: a bounded in-memory store (least recently used chunks go first). For tests and as a
//! stand-in tier; holds no more than `max_bytes` of chunk data.

use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use lru::LruCache;

use super::{
    check_put, once, read_after_write, CacheStore, ChunkStream, Committed, Info, StoreError,
};
use crate::chunk::{ChunkId, ChunkKey};

pub struct MemoryStore {
    max_bytes: u64,
    state: Mutex<State>,
}

struct State {
    chunks: LruCache<ChunkId, (Bytes, SystemTime)>,
    bytes: u64,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> MemoryStore {
        MemoryStore {
            max_bytes,
            state: Mutex::new(State {
                chunks: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[async_trait::async_trait]
impl CacheStore for MemoryStore {
    fn name(&self) -> &str {
        "memory"
    }

    async fn get_chunk(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<ChunkStream>, StoreError> {
        let mut st = self.lock();
        let Some((data, _)) = st.chunks.get(&key.id()) else {
            return Ok(None);
        };
        let end = offset.saturating_add(len).min(data.len() as u64);
        let start = offset.min(end);
        Ok(Some(once(data.slice(start as usize..end as usize))))
    }

    async fn put_chunk(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
    ) -> Result<Committed, StoreError> {
        check_put(key, size, &data)?;
        if size > self.max_bytes {
            return Err(StoreError::Other(format!(
                "chunk of {size} bytes exceeds the store's {} bytes",
                self.max_bytes
            )));
        }
        let id = key.id();
        if self.lock().chunks.contains(&id) {
            return Ok(Committed::AlreadyThere);
        }
        let mut buf = BytesMut::with_capacity(size as usize);
        for piece in &data {
            buf.extend_from_slice(piece);
        }
        let mut st = self.lock();
        if st.chunks.contains(&id) {
            return Ok(Committed::AlreadyThere);
        }
        st.chunks.put(id, (buf.freeze(), SystemTime::now()));
        st.bytes += size;
        while st.bytes > self.max_bytes {
            match st.chunks.pop_lru() {
                Some((_, (old, _))) => st.bytes -= old.len() as u64,
                None => break,
            }
        }
        Ok(Committed::Stored)
    }

    async fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, StoreError> {
        let st = self.lock();
        Ok(st.chunks.peek(&key.id()).map(|(data, committed)| Info {
            size: data.len() as u64,
            committed: *committed,
        }))
    }

    async fn delete(&self, key: &ChunkKey) -> Result<(), StoreError> {
        let mut st = self.lock();
        if let Some((data, _)) = st.chunks.pop(&key.id()) {
            st.bytes -= data.len() as u64;
        }
        Ok(())
    }

    async fn self_test(&self) -> Result<(), StoreError> {
        read_after_write(self).await
    }

    fn contains_hint(&self, key: &ChunkKey) -> Option<bool> {
        Some(self.lock().chunks.contains(&key.id()))
    }
}
