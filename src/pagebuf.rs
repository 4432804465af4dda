//! Page-aligned buffers for bytes that go to the kernel as a FUSE reply. The kernel copies a
//! reply into the reader's pages one of its pages at a time, pinning the page of ours it copies
//! from; a buffer that starts mid-page (large `malloc` blocks start 16 bytes in) costs two pins
//! and two copies for each page instead of one. Owns only the buffer type and a small free list
//! of megabyte buffers; knows nothing of FUSE, fills or the cache.
//!
//! Why the free list: fills and cached reads take a megabyte buffer each, hundreds a second.
//! Handed back to glibc they fragment its heap (eight cold readers peaked at ~300 MiB RSS, 145
//! MiB when the same buffers were mmapped fresh each time), and mmapped fresh they cost a page
//! fault and a zeroed page for every 4 KiB (a quarter more CPU per GiB on a cold read).
//! Recycling them costs neither.

use std::sync::Mutex;

use aligned_vec::{AVec, ConstAlign};
use bytes::Bytes;

/// The kernel's page size on every platform orcafs runs on (x86-64, aarch64 with 4 KiB pages;
/// a larger page only makes some copies unaligned again, never wrong).
const PAGE: usize = 4096;

/// A growable byte buffer whose first byte starts a page.
pub type PageVec = AVec<u8, ConstAlign<PAGE>>;

/// The size of a recycled buffer: a fill segment, a kernel read of a cached megabyte.
pub const RECYCLED: usize = 1 << 20;

/// At most this many idle buffers are kept (64 MiB); the rest go back to the allocator. A buffer
/// is made only when none is idle, so the list never raises the peak: it holds what a burst of
/// releases (a kept fill lets go of eight at once) gave back. At 16, a cold GiB still made ~55,000
/// page faults more than the ~40,000 of the process's first touch of its working set.
const KEPT_IDLE: usize = 64;

static IDLE: Mutex<Vec<PageVec>> = Mutex::new(Vec::new());

/// An empty page-aligned buffer with room for at least `capacity` bytes (a recycled megabyte
/// when it is between half a megabyte and one).
pub fn with_capacity(capacity: usize) -> PageVec {
    if capacity > RECYCLED / 2 && capacity <= RECYCLED {
        let idle = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        return idle.unwrap_or_else(|| AVec::with_capacity(PAGE, RECYCLED));
    }
    AVec::with_capacity(PAGE, capacity)
}

/// The buffer as `Bytes`, without a copy (slices of it stay zero-copy). A megabyte buffer goes
/// back to the free list when the last `Bytes` of it is dropped.
pub fn freeze(buf: PageVec) -> Bytes {
    if buf.capacity() == RECYCLED {
        Bytes::from_owner(Recycled(buf))
    } else {
        Bytes::from_owner(buf)
    }
}

/// Hands a buffer back: a megabyte one joins the free list (while it has room), any other goes
/// back to the allocator. For buffers that were never frozen into `Bytes`.
pub fn recycle(mut buf: PageVec) {
    if buf.capacity() != RECYCLED {
        return;
    }
    buf.clear();
    let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
    if idle.len() < KEPT_IDLE {
        idle.push(buf);
    }
}

struct Recycled(PageVec);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        recycle(std::mem::replace(&mut self.0, AVec::new(PAGE)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_a_page_and_keep_their_bytes() {
        for n in [1, 4095, 4096, 1 << 20] {
            let mut v = with_capacity(n);
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            v.extend_from_slice(&data);
            assert_eq!(v.as_ptr() as usize % PAGE, 0);
            let b = freeze(v);
            assert_eq!(b.as_ptr() as usize % PAGE, 0);
            assert_eq!(&b[..], &data[..]);
        }
    }

    #[test]
    fn megabyte_buffers_come_back_empty_and_whole() {
        let mut v = with_capacity(RECYCLED);
        v.extend_from_slice(&vec![7u8; RECYCLED]);
        let b = freeze(v);
        let tail = b.slice(RECYCLED - 10..);
        drop(b);
        // A slice still holds the buffer: its bytes stay as they were while anything may read them.
        let mut again: Vec<PageVec> = (0..KEPT_IDLE).map(|_| with_capacity(RECYCLED)).collect();
        assert_eq!(&tail[..], &[7u8; 10]);
        drop(tail);
        // Once the last slice is gone it is reusable, and comes back empty with room for a megabyte.
        let reused = with_capacity(RECYCLED - 1);
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), RECYCLED);
        assert_eq!(reused.as_ptr() as usize % PAGE, 0);
        again.push(reused);
        // The free list never holds more than its bound, however many come back.
        for v in again {
            drop(freeze(v));
        }
        drop(freeze(with_capacity(RECYCLED)));
        assert!(IDLE.lock().unwrap().len() <= KEPT_IDLE);
    }
}
