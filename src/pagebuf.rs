//! Page-aligned buffers for bytes that go to the kernel as a FUSE reply. The kernel copies a
//! reply into the reader's pages one of its pages at a time, pinning the page of ours it copies
//! from; a buffer that starts mid-page (large `malloc` blocks start 16 bytes in) costs two pins
//! and two copies for each page instead of one. Owns only the buffer type; knows nothing of
//! FUSE, fills or the cache.

use aligned_vec::{AVec, ConstAlign};
use bytes::Bytes;

/// The kernel's page size on every platform orcafs runs on (x86-64, aarch64 with 4 KiB pages;
/// a larger page only makes some copies unaligned again, never wrong).
const PAGE: usize = 4096;

/// A growable byte buffer whose first byte starts a page.
pub type PageVec = AVec<u8, ConstAlign<PAGE>>;

/// An empty page-aligned buffer with room for `capacity` bytes.
pub fn with_capacity(capacity: usize) -> PageVec {
    AVec::with_capacity(PAGE, capacity)
}

/// The buffer as `Bytes`, without a copy (slices of it stay zero-copy).
pub fn freeze(buf: PageVec) -> Bytes {
    Bytes::from_owner(buf)
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
}
