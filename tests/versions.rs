//! End-to-end: object versions and open handles. A handle reads the version it opened, or fails
//! (ESTALE/EIO), whatever other processes open and read meanwhile; its size never shrinks
//! without an error. Real s3s-fs origin, real mount, a second real process (`sha256sum`).

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use common::*;

const BUCKET: &str = "bkt";

/// Reads `len` bytes at `at` through `f`: the old version's bytes, or a stale-version error.
/// Never the new version's bytes.
fn old_bytes_or_stale(f: &std::fs::File, old: &[u8], at: usize, len: usize, what: &str) {
    let mut buf = vec![0u8; len];
    match f.read_exact_at(&mut buf, at as u64) {
        Ok(()) => assert!(
            buf == old[at..at + len],
            "{what}: the handle opened on version A read bytes that are not A's"
        ),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::EIO)),
            "{what}: expected A's bytes, ESTALE or EIO, got {e}"
        ),
    }
}

/// Process 1 holds a handle on version A (4 chunks) and has read chunk 0; the object is replaced
/// by a shorter B; after the TTL process 2 reads the whole file. `new_reader_first` decides
/// whether process 2 reads before process 1 reads on, or after.
fn handle_keeps_its_version(new_reader_first: bool) {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let a = pattern(4 * CHUNK, 30);
    let b = pattern(3 * CHUNK + 1000, 31);
    o.put_object(BUCKET, "v.bin", a.clone());
    // No readahead: the chunks after chunk 0 are not fetched for A, so a read of them on the
    // A-handle after the replacement really meets B at the origin.
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &["--metadata-ttl", "1s", "--readahead-chunks", "0"],
    );
    let path = m.path("v.bin");
    let p1 = std::fs::File::open(&path).unwrap();
    let mut first = vec![0u8; CHUNK];
    p1.read_exact_at(&mut first, 0).unwrap();
    assert!(first == a[..CHUNK], "chunk 0 of A");

    o.put_object(BUCKET, "v.bin", b.clone());
    std::thread::sleep(Duration::from_millis(1300));

    let new_reader = || {
        assert_eq!(
            sha256sum(&path),
            sha256_hex(&b),
            "a new open after the TTL reads B"
        );
    };
    if new_reader_first {
        new_reader();
        old_bytes_or_stale(&p1, &a, 2 * CHUNK, CHUNK, "chunk 2 after B was read");
        old_bytes_or_stale(&p1, &a, 3 * CHUNK + 500, 4096, "A's tail after B was read");
    } else {
        old_bytes_or_stale(&p1, &a, 2 * CHUNK, CHUNK, "chunk 2 before B is read");
        new_reader();
        old_bytes_or_stale(&p1, &a, 3 * CHUNK, CHUNK, "chunk 3 after B was read");
    }
    // Chunk 0 of A is still A's (page cache or disk cache of A), never B's.
    old_bytes_or_stale(&p1, &a, 0, CHUNK, "chunk 0 again");
    // The handle's size is A's: B's shorter size never shrinks it.
    assert_eq!(p1.metadata().unwrap().size(), a.len() as u64);
    // And the name now is B, for every new open.
    assert_eq!(
        std::fs::metadata(&path).unwrap().size(),
        b.len() as u64,
        "a new stat sees B's size"
    );
    new_reader();
    drop(p1);
    drop(m);
}

#[test]
fn a_handle_keeps_its_version_when_a_new_reader_came_first() {
    handle_keeps_its_version(true);
}

#[test]
fn a_handle_keeps_its_version_when_it_reads_on_first() {
    handle_keeps_its_version(false);
}
