//! End-to-end against Garage, a second, independent S3 implementation: a single-node Garage on
//! 127.0.0.1, the real `orcafs` binary mounted through the kernel, and real programs reading it.
//! Garage stores any key (s3s-fs cannot hold `a//b`, `x/./y` or 255-byte names), so the
//! name-mapping edge cases are tested here. Skipped with a note when no garage binary is found,
//! except under CI, where a missing binary is an error.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use common::*;
use orcafs_devorigin::Garage;

const BUCKET: &str = "orcafs-garage";

/// A started Garage with [`BUCKET`], or None (after a note on stderr) when no binary is found.
fn garage_or_skip(dir: &Path) -> Option<Garage> {
    if Garage::binary().is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("garage binary required in CI; .ci/run installs it");
        }
        eprintln!("SKIPPED: no garage binary (set ORCAFS_GARAGE_BIN or put `garage` on PATH)");
        return None;
    }
    let t0 = std::time::Instant::now();
    let g = Garage::start(dir).unwrap_or_else(|e| panic!("start garage: {e}"));
    eprintln!("garage started in {:?} at {}", t0.elapsed(), g.endpoint());
    g.create_bucket(BUCKET);
    Some(g)
}

fn target(g: &Garage) -> Target {
    Target {
        endpoint: g.endpoint(),
        access_key: g.access_key().into(),
        secret_key: g.secret_key().into(),
    }
}

fn mounted(s: &Scratch, g: &Garage, extra: &[&str]) -> Mount {
    Mount::start(&target(g), BUCKET, &s.path("mnt"), &s.path("cache"), extra)
}

/// Every key in the bucket, straight from Garage (ListObjectsV2 without a delimiter).
fn all_keys(g: &Garage) -> BTreeSet<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pages = rt.block_on(
        g.client()
            .list_objects_v2()
            .bucket(BUCKET)
            .into_paginator()
            .send()
            .collect::<Vec<_>>(),
    );
    pages
        .into_iter()
        .flat_map(|p| p.expect("list objects").contents.unwrap_or_default())
        .filter_map(|o| o.key)
        .collect()
}

/// The names `std::fs::read_dir` returns, sorted, duplicates kept. It skips `.` and `..`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            e.file_name().into_string().expect("utf-8 name")
        })
        .collect();
    names.sort();
    names
}

/// What the real `ls -a` prints, sorted, duplicates kept: shows a bogus `.`/`..` entry that
/// read_dir would hide.
fn ls_a(dir: &Path) -> Vec<String> {
    let out = run("ls", &["-a1", dir.to_str().expect("utf-8 path")]);
    let mut names: Vec<String> = String::from_utf8(out)
        .expect("utf-8 ls output")
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

fn sorted<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut v: Vec<String> = names.into_iter().map(|n| n.as_ref().to_string()).collect();
    v.sort();
    v
}

fn assert_enoent(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) => panic!(
            "{} should not exist, but is a {:?}",
            p.display(),
            m.file_type()
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOENT),
            "stat {}: want ENOENT, got {e}",
            p.display()
        ),
    }
}

#[test]
fn keys_that_cannot_be_paths_are_hidden() {
    let s = Scratch::new();
    let Some(g) = garage_or_skip(&s.path("garage")) else {
        return;
    };
    let n255 = "n".repeat(255);
    let m256 = "m".repeat(256);
    let long_ok = format!("ok/{n255}");
    let long_bad = format!("ok/{m256}");
    let objects: Vec<(&str, &[u8])> = vec![
        ("ok/plain.txt", b"plain bytes\n"),
        ("ok/a//b", b"a-slash-slash-b"),
        ("ok//c", b"slash-slash-c"),
        ("ok/x/./y", b"x-dot-y"),
        ("ok/x/../z", b"x-dotdot-z"),
        ("ok/./dot", b"dot"),
        ("ok/../dotdot", b"dotdot"),
        ("ok/trail/", b"not a file"),
        (&long_ok, b"255-byte name\n"),
        (&long_bad, b"256-byte name\n"),
        ("ok/both", b"object shadowed by the directory"),
        ("ok/both/inner.txt", b"inner\n"),
    ];
    for (key, body) in &objects {
        g.put_object(BUCKET, key, body.to_vec());
    }
    // Garage stored every key verbatim (no dot-segment or slash normalization on the way in),
    // so what the mount hides below is hidden by orcafs, not lost on upload.
    let stored = all_keys(&g);
    let put: BTreeSet<String> = objects.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(stored, put, "keys stored by Garage");

    let m = mounted(&s, &g, &[]);
    let ok = m.path("ok");

    // ListObjectsV2 prefix `ok/`, delimiter `/`, and what each key turns into:
    // - `ok/plain.txt`      object `plain.txt`                           -> file, shown
    // - `ok/a//b`           common prefix `ok/a/`, name `a`              -> directory, shown;
    //                       inside it the prefix `ok/a//` has an empty name -> hidden
    // - `ok//c`             common prefix `ok//`, empty name             -> hidden
    // - `ok/x/./y`          common prefix `ok/x/`, name `x`              -> directory, shown;
    //                       inside it the prefix `ok/x/./` is named `.`  -> hidden
    // - `ok/x/../z`         the same prefix `ok/x/`; inside, `ok/x/../` is named `..` -> hidden
    // - `ok/./dot`          common prefix `ok/./`, name `.`              -> hidden
    // - `ok/../dotdot`      common prefix `ok/../`, name `..`            -> hidden
    // - `ok/trail/`         common prefix `ok/trail/`, name `trail`      -> directory, shown;
    //                       inside it the object itself has an empty name -> hidden
    // - `ok/nnn…` (255 B)   object, name of exactly NAME_MAX bytes       -> file, shown
    // - `ok/mmm…` (256 B)   object, name over NAME_MAX                   -> hidden
    // - `ok/both` + `ok/both/inner.txt`: object `both` and prefix `ok/both/` -> the directory
    //                       wins (a name cannot be both), containing `inner.txt`
    let expected = sorted(["plain.txt", "a", "x", "trail", "both", &n255]);
    assert_eq!(names_in(&ok), expected, "read_dir ok/");
    let with_dots = sorted(expected.iter().map(String::as_str).chain([".", ".."]));
    assert_eq!(ls_a(&ok), with_dots, "ls -a ok/");

    for dir in ["a", "x", "trail", "both"] {
        let md = std::fs::metadata(ok.join(dir)).unwrap();
        assert!(md.is_dir(), "ok/{dir} is a directory");
    }
    for file in ["plain.txt", n255.as_str()] {
        let md = std::fs::metadata(ok.join(file)).unwrap();
        assert!(md.is_file(), "ok/{file} is a file");
    }
    let dots = sorted([".", ".."]);
    assert_eq!(
        names_in(&ok.join("a")),
        sorted::<&str>([]),
        "ok/a: no empty name"
    );
    assert_eq!(ls_a(&ok.join("a")), dots, "ls -a ok/a");
    assert_eq!(ls_a(&ok.join("x")), dots, "ls -a ok/x: no second . or ..");
    assert_eq!(
        ls_a(&ok.join("trail")),
        dots,
        "ls -a ok/trail: marker hidden"
    );
    assert_eq!(names_in(&ok.join("both")), sorted(["inner.txt"]), "ok/both");

    assert_eq!(read_all(&ok.join("plain.txt")), b"plain bytes\n");
    assert_eq!(read_all(&ok.join(&n255)), b"255-byte name\n");
    assert_eq!(read_all(&ok.join("both/inner.txt")), b"inner\n");

    // Hidden names, and the paths a normalizing client would wrongly map them to.
    for hidden in [
        m256.as_str(),
        "c",
        "dot",
        "dotdot",
        "z",
        "y",
        "a/b",
        "x/y",
        "x/z",
    ] {
        assert_enoent(&ok.join(hidden));
    }

    let found = String::from_utf8(run("find", &[ok.to_str().unwrap()])).unwrap();
    let mnt = m.mnt.to_str().unwrap();
    let found = sorted(found.lines().map(|l| l.strip_prefix(mnt).unwrap_or(l)));
    let long_path = format!("/ok/{n255}");
    let want = sorted([
        "/ok",
        "/ok/plain.txt",
        "/ok/a",
        "/ok/x",
        "/ok/trail",
        "/ok/both",
        "/ok/both/inner.txt",
        &long_path,
    ]);
    assert_eq!(found, want, "find ok");
    assert_eq!(m.unmount(), 0);
}

#[test]
fn garage_end_to_end_read_is_byte_exact() {
    let s = Scratch::new();
    let Some(g) = garage_or_skip(&s.path("garage")) else {
        return;
    };
    let big = pattern(5 * CHUNK + 77, 21);
    g.put_object(BUCKET, "data/big.bin", big.clone());
    g.put_object(BUCKET, "data/empty", Vec::new());
    let m = mounted(&s, &g, &[]);

    let p = m.path("data/big.bin");
    let ps = p.to_str().unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), big.len() as u64);
    assert_eq!(sha256sum(&p), sha256_hex(&big), "sha256sum big.bin");
    let of = s.path("out").join("big.dd");
    run(
        "dd",
        &[
            &format!("if={ps}"),
            &format!("of={}", of.display()),
            "bs=1M",
            "status=none",
        ],
    );
    assert_eq!(read_all(&of), big, "dd bs=1M");
    assert_eq!(
        run("tail", &["-c", "1000", ps]),
        big[big.len() - 1000..],
        "tail -c 1000"
    );

    let e = m.path("data/empty");
    assert_eq!(std::fs::metadata(&e).unwrap().len(), 0);
    assert_eq!(sha256sum(&e), sha256_hex(b""), "sha256sum empty");
    assert_eq!(read_all(&e), b"");
    assert_eq!(m.unmount(), 0);
}

#[test]
fn garage_object_replaced_while_open() {
    let s = Scratch::new();
    let Some(g) = garage_or_skip(&s.path("garage")) else {
        return;
    };
    let old = pattern(4 * CHUNK, 30);
    let new = pattern(4 * CHUNK, 31);
    g.put_object(BUCKET, "v.bin", old.clone());
    let m = mounted(&s, &g, &["--metadata-ttl", "1s", "--readahead-chunks", "0"]);
    let mut f = std::fs::File::open(m.path("v.bin")).unwrap();
    let mut first = vec![0u8; CHUNK];
    f.read_exact(&mut first).unwrap();
    assert_eq!(first, old[..CHUNK]);

    g.put_object(BUCKET, "v.bin", new.clone());
    // Readahead is off, so chunk 2 of the old version was never fetched: orcafs now asks Garage
    // for it pinned to the old ETag, Garage answers the If-Match with 412, and the read must fail
    // (or give the old bytes), never return the new ones.
    f.seek(SeekFrom::Start(2 * CHUNK as u64)).unwrap();
    let mut rest = vec![0u8; CHUNK];
    match f.read_exact(&mut rest) {
        Ok(()) => assert!(
            rest == old[2 * CHUNK..3 * CHUNK],
            "read after the replacement gave other than the old bytes (the new ones: {})",
            rest == new[2 * CHUNK..3 * CHUNK]
        ),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::EIO)),
            "ESTALE or EIO, got {e}"
        ),
    }
    drop(f);

    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        sha256sum(&m.path("v.bin")),
        sha256_hex(&new),
        "a new open after the TTL sees the new object"
    );
    assert_eq!(m.unmount(), 0);
}

/// The churn test of tests/versions.rs against Garage, which (unlike s3s-fs) honours If-Match
/// and changes objects atomically: opens never fail, reads are one whole version.
#[test]
fn open_never_fails_with_estale_while_the_object_keeps_changing() {
    let s = Scratch::new();
    let Some(g) = garage_or_skip(&s.path("garage")) else {
        return;
    };
    let g = std::sync::Arc::new(g);
    let versions = churn_versions();
    g.put_object(BUCKET, "churn.bin", versions[0].clone());
    let m = mounted(&s, &g, &["--metadata-ttl", "200ms"]);
    let writer = g.clone();
    let put = move |v: &[u8]| writer.put_object(BUCKET, "churn.bin", v.to_vec());
    open_and_read_while_replaced(&m.path("churn.bin"), &versions, put);
}
