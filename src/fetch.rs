//! fetch: the coordinator every chunk read goes through.
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
//! Origin policy: the SDK retries a request before its first byte; once bytes have been handed
//! out, a broken body is resumed with a new ranged GET from the current offset (still pinned to
//! the ETag), up to `origin_max_attempts` times.
//!
//! Must not know about inodes or FUSE.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tracing::Instrument;

use crate::cachestore::DiskStore;
use crate::chunk::{self, ChunkId, ChunkKey, ObjectVersion};
use crate::metrics::Metrics;
use crate::origin::{OriginError, S3Origin};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("chunk fill stopped before completion")]
    Abandoned,
}

impl FetchError {
    pub fn is_etag_changed(&self) -> bool {
        matches!(self, FetchError::Origin(OriginError::EtagChanged { .. }))
    }
}

/// Fills allowed in flight before readahead stops starting new ones.
const MAX_PREFETCH_INFLIGHT: usize = 16;

pub struct Coordinator {
    origin: Arc<S3Origin>,
    disk: Arc<DiskStore>,
    chunk_size: u64,
    max_attempts: u32,
    inflight: Mutex<HashMap<ChunkId, Arc<Fill>>>,
    metrics: Arc<Metrics>,
}

impl Coordinator {
    pub fn new(
        origin: Arc<S3Origin>,
        disk: Arc<DiskStore>,
        chunk_size: u64,
        max_attempts: u32,
        metrics: Arc<Metrics>,
    ) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            origin,
            disk,
            chunk_size,
            max_attempts,
            inflight: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
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
        let spans: Vec<_> = chunk::spans(offset, len, object.size, self.chunk_size).collect();
        match spans.as_slice() {
            [] => Ok(Bytes::new()),
            [one] => {
                let key = ChunkKey::new(object.clone(), self.chunk_size, one.index);
                self.read_chunk(&key, one.offset, one.len).await
            }
            many => {
                // A read across a chunk boundary: resolve the chunks concurrently.
                let tasks: Vec<_> = many
                    .iter()
                    .map(|s| {
                        let this = self.clone();
                        let key = ChunkKey::new(object.clone(), self.chunk_size, s.index);
                        let (off, n) = (s.offset, s.len);
                        tokio::spawn(async move { this.read_chunk(&key, off, n).await })
                    })
                    .collect();
                let mut out = BytesMut::with_capacity(len as usize);
                for t in tasks {
                    let part = t.await.map_err(|_| FetchError::Abandoned)??;
                    out.extend_from_slice(&part);
                }
                Ok(out.freeze())
            }
        }
    }

    /// `len` bytes at `offset` inside one chunk.
    pub async fn read_chunk(
        self: &Arc<Self>,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, FetchError> {
        let id = key.id();
        for _ in 0..2 {
            let in_flight = self.inflight().get(&id).cloned();
            if let Some(fill) = in_flight {
                Metrics::inc(&self.metrics.fill_joins);
                return fill.read(offset, len).await;
            }
            if let Some(bytes) = self.read_disk(key, offset, len).await {
                return Ok(bytes);
            }
            let fill = {
                let mut map = self.inflight();
                if let Some(fill) = map.get(&id) {
                    Metrics::inc(&self.metrics.fill_joins);
                    Some(fill.clone())
                } else if self.disk.contains(&id) {
                    // Committed between our disk miss and now: read it from disk.
                    None
                } else {
                    Some(self.start_fill(&mut map, key.clone(), id))
                }
            };
            if let Some(fill) = fill {
                return fill.read(offset, len).await;
            }
        }
        // The chunk keeps vanishing from disk under us (eviction races): fill it anyway.
        let fill = {
            let mut map = self.inflight();
            match map.get(&id) {
                Some(f) => f.clone(),
                None => self.start_fill(&mut map, key.clone(), id),
            }
        };
        fill.read(offset, len).await
    }

    /// Starts filling `key` in the background unless it is cached or already filling.
    /// Readahead: never waits, and skips when too many fills are in flight.
    pub fn prefetch(self: &Arc<Self>, key: ChunkKey) {
        if key.is_empty() {
            return;
        }
        let id = key.id();
        if self.disk.contains(&id) {
            return;
        }
        let mut map = self.inflight();
        if map.len() < MAX_PREFETCH_INFLIGHT && !map.contains_key(&id) {
            self.start_fill(&mut map, key, id);
        }
    }

    async fn read_disk(&self, key: &ChunkKey, offset: u64, len: u64) -> Option<Bytes> {
        let disk = self.disk.clone();
        let k = key.clone();
        match tokio::task::spawn_blocking(move || disk.read(&k, offset, len)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                // A broken cache never fails a read the origin can serve.
                tracing::warn!(?key, error = %e, "disk cache read failed; fetching from origin");
                None
            }
            Err(_) => None,
        }
    }

    fn start_fill(
        self: &Arc<Self>,
        map: &mut HashMap<ChunkId, Arc<Fill>>,
        key: ChunkKey,
        id: ChunkId,
    ) -> Arc<Fill> {
        let fill = Arc::new(Fill::new(key.len()));
        map.insert(id, fill.clone());
        Metrics::inc(&self.metrics.fills_started);
        let span = tracing::debug_span!("fill", bucket = %key.object.bucket, key = %key.object.key, chunk = key.index);
        let this = self.clone();
        let f = fill.clone();
        tokio::spawn(async move { this.run_fill(key, id, f).await }.instrument(span));
        fill
    }

    async fn run_fill(self: Arc<Self>, key: ChunkKey, id: ChunkId, fill: Arc<Fill>) {
        let result = self.fill_from_origin(&key, &fill).await;
        fill.finish(result.clone());
        match result {
            Ok(()) => {
                // Commit after serve: readers already have their bytes.
                let pieces = fill.pieces();
                let disk = self.disk.clone();
                let k = key.clone();
                match tokio::task::spawn_blocking(move || disk.write(&k, &pieces)).await {
                    Ok(Ok(())) => tracing::debug!("chunk committed to disk cache"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not commit chunk to disk cache")
                    }
                    Err(e) => tracing::warn!(error = %e, "disk commit task failed"),
                }
            }
            Err(e) => {
                Metrics::inc(&self.metrics.fills_failed);
                tracing::warn!(error = %e, "chunk fill failed");
            }
        }
        self.inflight().remove(&id);
    }

    /// GETs the chunk into the fill, resuming after a broken body from where it stopped.
    async fn fill_from_origin(&self, key: &ChunkKey, fill: &Fill) -> Result<(), FetchError> {
        let o = &key.object;
        let len = key.len();
        let mut attempt = 1;
        loop {
            let got = fill.filled();
            let result = async {
                let mut body = self
                    .origin
                    .get_range(&o.key, &o.etag, key.start() + got, len - got)
                    .await?;
                let mut have = got;
                while let Some(piece) = body.next().await {
                    let piece = piece?;
                    if have + piece.len() as u64 > len {
                        return Err(OriginError::Other(
                            "origin sent more bytes than asked".into(),
                        ));
                    }
                    have += piece.len() as u64;
                    fill.push(piece);
                }
                if have < len {
                    return Err(OriginError::Transient(format!(
                        "body ended after {have} of {len} bytes"
                    )));
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < self.max_attempts => {
                    Metrics::inc(&self.metrics.origin_get_retries);
                    tracing::info!(error = %e, attempt, resume_at = fill.filled(), "retrying chunk GET");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Exponential backoff with jitter: ~100 ms, 200 ms, 400 ms … capped at 5 s.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64 << attempt.min(6);
    Duration::from_millis((base + fastrand::u64(..=base / 2)).min(5_000))
}

/// A chunk being fetched: pieces in order, readable while more arrive.
pub struct Fill {
    len: u64,
    pieces: Mutex<Pieces>,
    progress: watch::Sender<Progress>,
}

#[derive(Default)]
struct Pieces {
    /// `(offset in chunk, bytes)`, contiguous and in order.
    list: Vec<(u64, Bytes)>,
    filled: u64,
}

#[derive(Clone, Default)]
struct Progress {
    filled: u64,
    outcome: Option<Result<(), FetchError>>,
}

impl Fill {
    fn new(len: u64) -> Fill {
        Fill {
            len,
            pieces: Mutex::new(Pieces::default()),
            progress: watch::Sender::new(Progress::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pieces> {
        self.pieces.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn filled(&self) -> u64 {
        self.lock().filled
    }

    fn push(&self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        let filled = {
            let mut p = self.lock();
            let at = p.filled;
            p.filled += piece.len() as u64;
            p.list.push((at, piece));
            p.filled
        };
        self.progress.send_modify(|pr| pr.filled = filled);
    }

    fn finish(&self, outcome: Result<(), FetchError>) {
        self.progress.send_modify(|pr| pr.outcome = Some(outcome));
    }

    fn pieces(&self) -> Vec<Bytes> {
        self.lock().list.iter().map(|(_, b)| b.clone()).collect()
    }

    /// Waits until `[offset, offset+len)` has arrived (or the fill failed) and returns it.
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, FetchError> {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return Ok(Bytes::new());
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
            None | Some(Ok(())) => Ok(self.copy_range(offset, end)),
            Some(Err(e)) => Err(e),
        }
    }

    /// The bytes `[start, end)`, all of which have arrived. Zero-copy when inside one piece.
    fn copy_range(&self, start: u64, end: u64) -> Bytes {
        let p = self.lock();
        let first = p
            .list
            .partition_point(|(at, b)| at + b.len() as u64 <= start);
        let (at, piece) = &p.list[first];
        if end <= at + piece.len() as u64 {
            return piece.slice((start - at) as usize..(end - at) as usize);
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for (at, piece) in &p.list[first..] {
            if *at >= end {
                break;
            }
            let from = start.saturating_sub(*at) as usize;
            let to = ((end - at) as usize).min(piece.len());
            out.extend_from_slice(&piece[from..to]);
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_get_bytes_as_they_arrive_and_errors_when_it_fails() {
        let fill = Arc::new(Fill::new(10));
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

        let broken = Arc::new(Fill::new(10));
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
