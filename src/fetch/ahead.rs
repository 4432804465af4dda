//! ahead: chunk fills that completed before their reader had read them, kept in memory (with
//! their share of the memory budget) until the reader has read them to their end, or their room
//! is wanted. A sequential reader then takes its bytes from memory instead of reading back, and
//! checking again, what the fill has just written to the cache file: on a cold read that pread
//! and its CRC checks were a seventh of orcafs's CPU.
//!
//! Owns only the list of kept fills; the fills and their memory belong to the fetch module, and
//! the cache file has every byte anyway (a fill is kept only after it was committed).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Fill;
use crate::chunk::ChunkId;

pub(super) struct Ahead {
    /// Most bytes kept at once.
    cap: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Oldest first.
    kept: VecDeque<Kept>,
    bytes: u64,
}

struct Kept {
    id: ChunkId,
    fill: Arc<Fill>,
    since: Instant,
}

impl Ahead {
    pub(super) fn new(cap: u64) -> Ahead {
        Ahead {
            cap,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a complete, committed fill for its reader; false (not kept) when that would pass
    /// the cap: the fills kept first are the ones nearest their reader.
    pub(super) fn keep(&self, id: ChunkId, fill: Arc<Fill>) -> bool {
        let mut inner = self.lock();
        if inner.bytes + fill.len > self.cap || inner.kept.iter().any(|k| k.id == id) {
            return false;
        }
        inner.bytes += fill.len;
        inner.kept.push_back(Kept {
            id,
            fill,
            since: Instant::now(),
        });
        true
    }

    /// `[offset, offset+len)` of a kept fill, or None. A read that reaches the fill's end lets it
    /// go: a sequential reader is done with it.
    pub(super) fn read(&self, id: &ChunkId, offset: u64, len: u64) -> Option<Bytes> {
        let fill = {
            let mut inner = self.lock();
            let at = inner.kept.iter().position(|k| k.id == *id)?;
            let fill = inner.kept[at].fill.clone();
            if offset.saturating_add(len) >= fill.len {
                inner.bytes -= fill.len;
                inner.kept.remove(at);
            }
            fill
        };
        let end = offset.saturating_add(len).min(fill.len);
        Some(fill.range(offset.min(end), end))
    }

    /// True when the chunk's fill is kept.
    pub(super) fn holds(&self, id: &ChunkId) -> bool {
        self.lock().kept.iter().any(|k| k.id == *id)
    }

    /// Lets go of the oldest kept fill kept longer than `age`; false when there is none.
    pub(super) fn release_older_than(&self, age: Duration) -> bool {
        let mut inner = self.lock();
        match inner.kept.front() {
            Some(k) if k.since.elapsed() >= age => {
                let len = k.fill.len;
                inner.kept.pop_front();
                inner.bytes -= len;
                true
            }
            _ => false,
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(len: usize, byte: u8) -> Arc<Fill> {
        let fill = Arc::new(Fill::new(len as u64, None));
        fill.push(Bytes::from(vec![byte; len / 2]));
        fill.push(Bytes::from(vec![byte.wrapping_add(1); len - len / 2]));
        fill.finish(Ok(()));
        fill
    }

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn a_kept_fill_serves_reads_until_one_reaches_its_end() {
        let ahead = Ahead::new(1 << 20);
        assert!(ahead.keep(id(1), complete(1000, 7)));
        assert_eq!(ahead.bytes(), 1000);
        assert!(ahead.holds(&id(1)) && !ahead.holds(&id(2)));
        let got = ahead.read(&id(1), 490, 20).unwrap();
        assert_eq!(&got[..], &[[7u8; 10], [8u8; 10]].concat()[..]);
        assert!(
            ahead.read(&id(2), 0, 10).is_none(),
            "another chunk is not kept"
        );
        assert_eq!(ahead.read(&id(1), 900, 200).unwrap().len(), 100);
        assert!(
            ahead.read(&id(1), 0, 10).is_none(),
            "gone after its end was read"
        );
        assert_eq!(ahead.bytes(), 0);
        assert!(!ahead.holds(&id(1)));
    }

    #[test]
    fn it_keeps_no_more_than_its_cap_and_lets_the_oldest_go_first() {
        let ahead = Ahead::new(2500);
        assert!(ahead.keep(id(1), complete(1000, 1)));
        assert!(!ahead.keep(id(1), complete(1000, 1)), "kept once");
        assert!(ahead.keep(id(2), complete(1000, 2)));
        assert!(!ahead.keep(id(3), complete(1000, 3)), "over the cap");
        assert!(!ahead.release_older_than(Duration::from_secs(60)));
        assert!(ahead.release_older_than(Duration::ZERO));
        assert!(ahead.read(&id(1), 0, 1).is_none());
        assert!(ahead.read(&id(2), 0, 1).is_some());
        assert!(ahead.release_older_than(Duration::ZERO));
        assert!(!ahead.release_older_than(Duration::ZERO));
        assert_eq!(ahead.bytes(), 0);
    }
}
