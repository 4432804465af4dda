//! End-to-end: `orcafs warm` as a real process against a real mount of a real S3 server, with
//! the origin's request counts as the proof of what was fetched.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "bkt";

/// The tree warmed: nested directories, files of several chunks, a tail chunk, an empty file.
const TREE: &[(&str, usize)] = &[
    ("tree/a.bin", 3 * CHUNK + 5),
    ("tree/small.txt", 100),
    ("tree/sub/b.bin", 2 * CHUNK),
    ("tree/sub/deeper/c.bin", CHUNK - 1),
    ("tree/sub/deeper/empty", 0),
];

fn tree_bytes() -> u64 {
    TREE.iter().map(|(_, n)| *n as u64).sum()
}

fn tree_chunks() -> u64 {
    TREE.iter().map(|(_, n)| n.div_ceil(CHUNK) as u64).sum()
}

/// The origin with TREE and one file outside it.
fn origin_with_tree(s: &Scratch) -> DevOrigin {
    let o = origin(s, BUCKET);
    for (i, (key, size)) in TREE.iter().enumerate() {
        o.put_object(BUCKET, key, pattern(*size, i as u64));
    }
    o.put_object(BUCKET, "other/x.bin", pattern(CHUNK, 99));
    o
}

fn mounted(s: &Scratch, o: &DevOrigin) -> Mount {
    Mount::start(
        &Target::of(o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &[],
    )
}

fn warm(args: &[&str], paths: &[&Path]) -> Output {
    Command::new(orcafs_bin())
        .arg("warm")
        .args(args)
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .expect("run orcafs warm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns stdout.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "orcafs warm failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn read_tree(m: &Mount) {
    for (i, (key, size)) in TREE.iter().enumerate() {
        assert_eq!(read_all(&m.path(key)), pattern(*size, i as u64), "{key}");
    }
}

#[test]
fn warm_fetches_each_byte_once_then_reads_and_a_rerun_fetch_nothing() {
    let s = Scratch::new();
    let o = origin_with_tree(&s);
    let m = mounted(&s, &o);
    o.reset_stats();

    let out = ok(&warm(&[], &[&m.path("tree")]));
    let st = o.stats();
    assert_eq!(st.get_bytes, tree_bytes(), "each byte fetched once: {st:?}");
    assert_eq!(st.get_requests, tree_chunks(), "one GET per chunk: {st:?}");
    assert!(
        out.contains(&format!(
            "warm: done: fetched {} ({} bytes, {} chunks) of 4 objects",
            orcafs::control::human_bytes(tree_bytes()),
            tree_bytes(),
            tree_chunks()
        )),
        "{out}"
    );

    o.reset_stats();
    read_tree(&m);
    assert_eq!(
        o.stats().get_requests,
        0,
        "reads after the warm: {:?}",
        o.stats()
    );

    let again = ok(&warm(&[], &[&m.path("tree")]));
    assert_eq!(o.stats().get_requests, 0, "second run: {:?}", o.stats());
    assert!(
        again.contains(&format!(
            "warm: nothing to fetch: 5 objects, all cached: {} ({} bytes) already cached",
            orcafs::control::human_bytes(tree_bytes()),
            tree_bytes()
        )),
        "{again}"
    );
    // The file outside the warmed tree was not touched.
    let dry = ok(&warm(&["--dry-run"], &[&m.mnt]));
    assert!(
        dry.contains(&format!(
            "would fetch 256.0 KiB ({CHUNK} bytes, 1 chunks) of 1 of 6 objects"
        )),
        "{dry}"
    );
    assert_eq!(o.stats().get_requests, 0);
    assert_eq!(m.unmount(), 0);
}

#[test]
fn dry_run_on_a_cold_tree_counts_the_bytes_and_fetches_nothing() {
    let s = Scratch::new();
    let o = origin_with_tree(&s);
    let m = mounted(&s, &o);
    o.reset_stats();
    let out = ok(&warm(
        &["--dry-run", "-v"],
        &[&m.path("tree"), &m.path("tree/a.bin")],
    ));
    assert_eq!(o.stats().get_requests, 0, "dry run: {:?}", o.stats());
    assert!(
        out.contains(&format!(
            "warm: dry run: would fetch {} ({} bytes, {} chunks) of 4 of 5 objects; 0 B (0 bytes) already cached",
            orcafs::control::human_bytes(tree_bytes()),
            tree_bytes(),
            tree_chunks()
        )),
        "{out}"
    );
    let a = out
        .lines()
        .find(|l| l.ends_with("tree/a.bin"))
        .unwrap_or_default();
    assert!(
        a.starts_with("fetch") && a.contains("4 of 4 chunks"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.ends_with("tree/a.bin")).count(),
        1,
        "listed once"
    );

    // Warm one file, then the dry run counts it as cached.
    ok(&warm(&[], &[&m.path("tree/sub/b.bin")]));
    assert_eq!(o.stats().get_bytes, 2 * CHUNK as u64);
    let out = ok(&warm(&["--dry-run", "-v"], &[&m.path("tree")]));
    assert!(
        out.contains(&format!(
            "of 3 of 5 objects; 512.0 KiB ({} bytes) already cached",
            2 * CHUNK
        )),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("cached") && l.ends_with("sub/b.bin")),
        "{out}"
    );
    assert_eq!(m.unmount(), 0);
}

#[test]
fn a_missing_path_or_one_outside_a_mount_is_a_one_line_error() {
    let s = Scratch::new();
    let o = origin_with_tree(&s);
    let m = mounted(&s, &o);
    let outside = s.path("elsewhere");
    for (path, want) in [
        (m.path("tree/nope"), "tree/nope: no such file or directory"),
        (outside.clone(), "is not inside an orcafs mount"),
    ] {
        // A good path beside it changes nothing: nothing is warmed.
        let out = warm(&[], &[&m.path("tree"), &path]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("orcafs: error: ") && err.contains(want),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    assert_eq!(o.stats().get_requests, 0);
    assert_eq!(m.unmount(), 0);
}

#[test]
fn ctrl_c_stops_a_warm_cleanly_and_the_next_run_resumes() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let (files, chunks_each) = (8, 4);
    for i in 0..files {
        o.put_object(
            BUCKET,
            &format!("big/f{i}"),
            pattern(chunks_each * CHUNK, i as u64),
        );
    }
    let total = (files * chunks_each * CHUNK) as u64;
    let mut m = mounted(&s, &o);
    o.reset_stats();
    o.faults().set_get_delay(Duration::from_millis(400));
    let child = Command::new(orcafs_bin())
        .args(["warm", "-j", "2", "--progress-every", "200ms"])
        .arg(m.path("big"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn orcafs warm");
    // Some chunks done, most not: 32 chunks at 2 × 400 ms take over 6 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while o.stats().get_requests < 4 {
        assert!(Instant::now() < deadline, "the warm never started fetching");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let stopped = Instant::now();
    let out = child.wait_with_output().expect("wait for orcafs warm");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "stopped after the reads in flight"
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("warm: interrupted: fetched "),
        "{stdout}"
    );
    assert!(stdout.contains("run it again to resume"), "{stdout}");
    assert!(stderr.contains("ETA"), "periodic progress lines: {stderr}");
    let first = o.stats();
    assert!(first.get_bytes < total, "stopped early: {first:?}");
    assert_eq!(
        first.get_bytes % CHUNK as u64,
        0,
        "whole chunks only: {first:?}"
    );

    // The mount is healthy, and the next run fetches only the rest.
    o.faults().clear();
    assert!(m.alive());
    assert_eq!(std::fs::read_dir(m.path("big")).unwrap().count(), files);
    let out = ok(&warm(&[], &[&m.path("big")]));
    let rest = o.stats().get_bytes - first.get_bytes;
    assert_eq!(
        o.stats().get_bytes,
        total,
        "each byte once over both runs: {out}"
    );
    assert!(out.contains(&format!("({rest} bytes, ")), "{out}");
    assert!(
        out.contains(&format!("({} bytes) already cached", total - rest)),
        "{out}"
    );
    o.reset_stats();
    ok(&warm(&[], &[&m.path("big")]));
    assert_eq!(o.stats().get_requests, 0);
    assert_eq!(m.unmount(), 0);
}

fn getxattr(path: &Path, name: &str) -> Result<String, i32> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a buffer of buf.len() bytes.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(len as usize);
    Ok(String::from_utf8(buf).unwrap())
}

fn listxattr(path: &Path) -> Vec<String> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: a valid NUL-terminated path and a buffer of buf.len() bytes.
    let len = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(len >= 0, "listxattr {}", path.display());
    buf.truncate(len as usize);
    buf.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

#[test]
fn files_name_their_object_version_in_read_only_xattrs() {
    let s = Scratch::new();
    let o = origin_with_tree(&s);
    let m = mounted(&s, &o);
    let a = m.path("tree/a.bin");
    assert_eq!(listxattr(&a), ["user.orcafs.etag", "user.orcafs.key"]);
    assert_eq!(getxattr(&a, "user.orcafs.key").as_deref(), Ok("tree/a.bin"));
    let etag = getxattr(&a, "user.orcafs.etag").unwrap();
    assert!(etag.len() > 2, "{etag:?}");
    // The same through an open handle.
    let f = std::fs::File::open(&a).unwrap();
    assert_eq!(getxattr(&a, "user.orcafs.etag"), Ok(etag.clone()));
    drop(f);
    assert_eq!(getxattr(&a, "user.other"), Err(libc::ENODATA));
    // Namespaces the mount does not have are unsupported, not merely empty: `ls -l` remembers
    // that for the device and stops asking for every name.
    for name in ["security.selinux", "system.posix_acl_access", "trusted.x"] {
        assert_eq!(getxattr(&a, name), Err(libc::EOPNOTSUPP), "{name}");
    }
    assert!(
        listxattr(&m.path("tree")).is_empty(),
        "directories have none"
    );
    assert_eq!(
        getxattr(&m.path("tree"), "user.orcafs.etag"),
        Err(libc::ENODATA)
    );
    assert_eq!(o.stats().get_requests, 0, "xattrs fetch no data");
    assert_eq!(m.unmount(), 0);
}

#[test]
fn chunks_that_cannot_be_read_are_named_and_the_next_run_retries_them() {
    let s = Scratch::new();
    let o = origin_with_tree(&s);
    let mut m = mounted(&s, &o);
    o.reset_stats();
    // 403 is final: the mount does not retry it, the read fails with EACCES.
    o.faults().fail_fraction(100, 403);
    let out = warm(&[], &[&m.path("tree/sub")]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with(
            "warm: incomplete: fetched 0 B (0 bytes, 0 chunks) of 0 objects, 3 chunks"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("run it again to retry them"), "{stdout}");
    let named: Vec<_> = stderr.lines().filter(|l| l.contains(": chunk ")).collect();
    assert_eq!(named.len(), 2, "one line per failed file: {stderr}");
    assert!(
        named.iter().any(|l| l.contains("tree/sub/b.bin")),
        "{stderr}"
    );

    o.faults().clear();
    o.reset_stats();
    let out = ok(&warm(&[], &[&m.path("tree/sub")]));
    assert!(out.starts_with("warm: done: fetched"), "{out}");
    assert_eq!(
        o.stats().get_bytes,
        (3 * CHUNK - 1) as u64,
        "{:?}",
        o.stats()
    );
    assert!(m.alive());
    assert_eq!(m.unmount(), 0);
}

/// One host of a two-host cluster on 127.0.0.1 (the `[cluster]` of tests/cluster.rs, minimal).
fn cluster_host(s: &Scratch, o: &DevOrigin, name: &str, port: u16, ports: [u16; 2]) -> Mount {
    let dir = s.path(name);
    let secret = dir.join("secret");
    std::fs::write(&secret, "warm-test-secret").unwrap();
    let toml = format!(
        "[cluster]\nlisten = \"127.0.0.1:{port}\"\npeers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\nsecret_file = \"{}\"\nhealth_interval = \"500ms\"\n",
        ports[0],
        ports[1],
        secret.display()
    );
    let cfg = dir.join("orcafs.toml");
    std::fs::write(&cfg, toml).unwrap();
    Mount::start(
        &Target::of(o),
        BUCKET,
        &s.path(&format!("{name}/mnt")),
        &s.path(&format!("{name}/cache")),
        &["--config", cfg.to_str().unwrap()],
    )
}

/// Waits until the mount's status shows every peer up.
fn wait_peers_up(m: &Mount, n: usize) {
    let sock = orcafs::control::socket_path(&m.mnt);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = orcafs::control::query(&sock)
            .ok()
            .and_then(|doc| doc["peers"].as_array().cloned())
            .is_some_and(|p| p.len() == n && p.iter().all(|p| p["state"] == "up"));
        if up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "peers of {} never all up",
            m.mnt.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn warming_one_host_of_a_cluster_fetches_each_chunk_once_for_the_fleet() {
    let s = Scratch::new();
    let o = origin_with_tree(&s);
    let ports = [free_port(), free_port()];
    let a = cluster_host(&s, &o, "a", ports[0], ports);
    let b = cluster_host(&s, &o, "b", ports[1], ports);
    wait_peers_up(&a, 2);
    wait_peers_up(&b, 2);
    o.reset_stats();

    ok(&warm(&[], &[&a.path("tree")]));
    let st = o.stats();
    assert_eq!(st.get_bytes, tree_bytes(), "each byte once: {st:?}");
    assert_eq!(st.get_requests, tree_chunks(), "{st:?}");

    // The other host reads it all without the origin: its own chunks were filled into its cache
    // as their coordinator, the rest stream from the first host.
    read_tree(&b);
    // And warming it too costs the origin nothing.
    ok(&warm(&[], &[&b.path("tree")]));
    assert_eq!(o.stats().get_requests, tree_chunks(), "{:?}", o.stats());
    let again = ok(&warm(&[], &[&b.path("tree")]));
    assert!(
        again.starts_with("warm: nothing to fetch: 5 objects, all cached"),
        "{again}"
    );
}
