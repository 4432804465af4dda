//! A directory far bigger than memory should allow for its names: the listing streams through a
//! bounded window, so the mount's memory does not grow with the directory. The origin makes the
//! keys up page by page (a synthetic prefix), so no key is stored anywhere.

mod common;

use std::time::Instant;

use common::*;

const BUCKET: &str = "bkt";

/// Lists a synthetic directory of `count` keys with `os.scandir` (names only, as `find` and
/// `ls -f` read them) and returns (entries seen, peak RSS of the mount).
fn list_synthetic(count: u64) -> (u64, u64) {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "small.txt", b"x".to_vec());
    o.synthesize_prefix(BUCKET, "huge/", count);
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &[],
    );
    let t0 = Instant::now();
    let out = run(
        "python3",
        &[
            "-c",
            "import os,sys\nn=0\nfor e in os.scandir(sys.argv[1]): n+=1\nprint(n)",
            m.path("huge").to_str().unwrap(),
        ],
    );
    let seen: u64 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    let peak = peak_rss(m.pid());
    eprintln!(
        "{count} names listed in {:?}, peak RSS {} MiB, {} LIST requests",
        t0.elapsed(),
        peak >> 20,
        o.stats().list_requests
    );
    drop(m);
    (seen, peak)
}

#[test]
fn a_directory_of_120k_names_lists_in_bounded_memory() {
    // Over the 100k entries a listing may keep for caching: it streams through its window.
    let (seen, peak) = list_synthetic(120_000);
    assert_eq!(seen, 120_000);
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
}

/// The size; minutes in a debug build, so run on demand (`--ignored`) and by the bench.
#[test]
#[ignore]
fn a_directory_of_10m_names_lists_in_bounded_memory() {
    let (seen, peak) = list_synthetic(10_000_000);
    assert_eq!(seen, 10_000_000);
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
}
