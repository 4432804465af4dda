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
    let m = mounted(&s, &o, &["--metadata-ttl", "1s", "--readahead-chunks", "0"]);
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

/// A read on an old handle that needs the origin after the object was replaced gets ESTALE
/// (not EIO, not B's bytes); the name is B for the next `stat` and `open` at once, without
/// waiting for the metadata TTL (300 s here).
#[test]
fn after_a_stale_read_the_name_is_the_new_version_at_once() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let a = pattern(2 * CHUNK, 40);
    let b = pattern(CHUNK + 4096 * 3 + 777, 41);
    o.put_object(BUCKET, "r.bin", a.clone());
    let m = mounted(
        &s,
        &o,
        &["--metadata-ttl", "300s", "--readahead-chunks", "0"],
    );
    let path = m.path("r.bin");
    let p1 = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    p1.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == a[..4096], "A's first bytes");
    assert_eq!(std::fs::metadata(&path).unwrap().size(), a.len() as u64);

    o.put_object(BUCKET, "r.bin", b.clone());
    // Chunk 1 is not cached: the origin has only B, and the handle must not get B's bytes.
    let err = p1
        .read_exact_at(&mut buf, CHUNK as u64 + 4096)
        .expect_err("A's chunk 1 is gone from the origin");
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    assert_eq!(
        p1.metadata().unwrap().size(),
        a.len() as u64,
        "fstat: A's size"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().size(),
        b.len() as u64,
        "stat of the name sees B at once"
    );
    assert_eq!(
        sha256sum(&path),
        sha256_hex(&b),
        "a new open reads B at once"
    );
    // The old handle still reads what is cached of A.
    p1.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == a[..4096], "A's cached bytes");
}

/// A handle on an object deleted at the origin reads what is cached and ENOENT for the rest;
/// the read that found it gone makes the name disappear at once (TTL 300 s here).
#[test]
fn a_deleted_object_reads_what_is_cached_then_enoent_and_its_name_goes_at_once() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let a = pattern(2 * CHUNK, 42);
    o.put_object(BUCKET, "d.bin", a.clone());
    o.put_object(BUCKET, "stays.txt", b"here".to_vec());
    let m = mounted(
        &s,
        &o,
        &["--metadata-ttl", "300s", "--readahead-chunks", "0"],
    );
    let path = m.path("d.bin");
    assert_eq!(names_in(&m.mnt), ["d.bin", "stays.txt"]);
    let p1 = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    p1.read_exact_at(&mut buf, 0).unwrap();
    o.delete_object(BUCKET, "d.bin");
    let err = p1
        .read_exact_at(&mut buf, CHUNK as u64 + 4096)
        .expect_err("chunk 1 is gone from the origin");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    p1.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == a[..4096], "A's cached bytes");
    let gone = std::fs::metadata(&path).expect_err("deleted");
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT), "{gone}");
    assert_eq!(names_in(&m.mnt), ["stays.txt"]);
    drop(p1);
}

/// The kernel takes a directory's lock to drop a name, and a lookup in that directory holds it
/// while orcafs waits on a slow origin. A read that met a replaced object still gets its ESTALE
/// promptly (it waits for the kernel at most 100 ms), not when the slow lookup ends.
#[test]
fn a_stale_read_is_answered_while_a_lookup_in_its_directory_waits_on_the_origin() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "s.bin", pattern(2 * CHUNK, 43));
    let m = mounted(&s, &o, &["--metadata-ttl", "1s", "--readahead-chunks", "0"]);
    let p1 = std::fs::File::open(m.path("s.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    p1.read_exact_at(&mut buf, 0).unwrap();
    o.put_object(BUCKET, "s.bin", pattern(2 * CHUNK, 44));
    // Past the TTL, so a lookup of a new name asks the origin, which now takes 5 s to answer.
    std::thread::sleep(Duration::from_millis(1100));
    o.faults().set_meta_delay(Duration::from_secs(5));
    let lookup = {
        let path = m.path("elsewhere.txt");
        std::thread::spawn(move || std::fs::metadata(path).is_err())
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = p1
        .read_exact_at(&mut buf, CHUNK as u64 + 4096)
        .expect_err("A's chunk 1 is gone from the origin");
    let took = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    assert!(
        took < Duration::from_millis(2500),
        "the stale read waited {took:?} for the slow lookup"
    );
    assert!(lookup.join().unwrap(), "there is no elsewhere.txt");
    o.faults().clear();
}

/// The staleness table: with no read to notice them, a new object, a name found missing and a
/// deleted object all show within the TTLs (1 s each here).
#[test]
fn changes_at_the_origin_show_within_the_ttls() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "old.txt", b"old".to_vec());
    o.put_object(BUCKET, "d/x.txt", b"x".to_vec());
    let m = mounted(&s, &o, &["--metadata-ttl", "1s", "--negative-ttl", "1s"]);
    assert_eq!(names_in(&m.mnt), ["d", "old.txt"]);
    let missing = std::fs::metadata(m.path("new.txt")).expect_err("not there yet");
    assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(std::fs::read(m.path("old.txt")).unwrap(), b"old");
    o.put_object(BUCKET, "new.txt", b"new".to_vec());
    o.put_object(BUCKET, "d/y.txt", b"y".to_vec());
    o.delete_object(BUCKET, "old.txt");
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(std::fs::read(m.path("new.txt")).unwrap(), b"new");
    assert_eq!(std::fs::read(m.path("d/y.txt")).unwrap(), b"y");
    let gone = std::fs::metadata(m.path("old.txt")).expect_err("deleted");
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT), "{gone}");
    assert_eq!(names_in(&m.mnt), ["d", "new.txt"]);
    assert_eq!(names_in(&m.path("d")), ["x.txt", "y.txt"]);
}

fn mounted(s: &Scratch, o: &DevOrigin, extra: &[&str]) -> Mount {
    mount_in(s, o, BUCKET, extra)
}

/// `open` never hands ESTALE to a program, however often the object is replaced (here every
/// 150 ms for 3 s, TTL 200 ms), and every read is one whole version: see
/// [`open_and_read_while_replaced`] (the same against Garage in tests/garage.rs).
#[test]
fn open_never_fails_with_estale_while_the_object_keeps_changing() {
    let s = Scratch::new();
    let o = std::sync::Arc::new(origin(&s, BUCKET));
    let versions = churn_versions();
    o.put_object(BUCKET, "churn.bin", versions[0].clone());
    let m = mounted(&s, &o, &["--metadata-ttl", "200ms"]);
    let put = move |v: &[u8]| o.put_object(BUCKET, "churn.bin", v.to_vec());
    open_and_read_while_replaced(&m.path("churn.bin"), &versions, put);
}
