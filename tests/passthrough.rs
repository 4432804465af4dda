//! FUSE passthrough end to end: an object held whole in the local cache is read by the kernel
//! from the cache's file (orcafs is not asked), only after the cache checked it, and a damaged
//! file is never handed out that way.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

const BUCKET: &str = "bkt";

fn status_counter(m: &Mount, name: &str) -> u64 {
    let out = run_output(orcafs_bin(), &["status", "--json", m.mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["metrics"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {doc}"))
}

/// The kernel in use lets a root server hand it backing files (Linux 6.9+); says SKIPPED when not.
fn kernel_has_passthrough() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    // SAFETY: geteuid cannot fail.
    let able = (major, minor) >= (6, 9) && unsafe { libc::geteuid() } == 0;
    if !able {
        eprintln!("SKIPPED: needs root and Linux 6.9+ for FUSE passthrough");
    }
    able
}

/// Opens and reads `len` bytes at `at` in a thread; None when it has not returned within `wait`.
fn pread_within(path: &std::path::Path, at: u64, len: usize, wait: Duration) -> Option<Vec<u8>> {
    let path = path.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; len];
        let r = std::fs::File::open(&path).and_then(|f| f.read_exact_at(&mut buf, at));
        let _ = tx.send(r.map(|_| buf));
    });
    rx.recv_timeout(wait).ok().map(|r| r.unwrap())
}

#[test]
fn a_whole_cached_object_is_read_by_the_kernel_without_orcafs() {
    if !kernel_has_passthrough() {
        return;
    }
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(5 * CHUNK + 777, 61);
    o.put_object(BUCKET, "p.bin", data.clone());
    o.put_object(BUCKET, "partial.bin", pattern(3 * CHUNK, 62));
    let cache = s.path("cache");
    let m = mount_in(&s, &o, BUCKET, &[]);
    // Cold: read through orcafs, filled, committed.
    assert_eq!(sha256sum(&m.path("p.bin")), sha256_hex(&data));
    wait_until(
        "the object's 6 chunks committed",
        Duration::from_secs(10),
        || cached_chunks(&cache) >= 6,
    );
    assert_eq!(status_counter(&m, "passthrough_opens"), 0);
    // Only part of another object: its opens stay with orcafs.
    let part = std::fs::File::open(m.path("partial.bin")).unwrap();
    let mut b = [0u8; 10];
    part.read_exact_at(&mut b, 0).unwrap();
    drop(part);

    // Whole now: the next open is passthrough, and so are opens while it is open.
    let f = std::fs::File::open(m.path("p.bin")).unwrap();
    let g = std::fs::File::open(m.path("p.bin")).unwrap();
    assert_eq!(status_counter(&m, "passthrough_opens"), 2);
    let mut buf = vec![0u8; 100_000];
    for at in [
        0u64,
        1,
        CHUNK as u64 - 5,
        3 * CHUNK as u64 + 17,
        data.len() as u64 - 100_000,
    ] {
        g.read_exact_at(&mut buf, at).unwrap();
        assert_eq!(buf, data[at as usize..at as usize + buf.len()]);
    }
    let gets = o.stats().get_requests;

    // With orcafs stopped, the kernel still reads the open file (it never asks orcafs), while a
    // read of a file orcafs serves waits.
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGSTOP) };
    let status = format!("/proc/{}/status", m.pid());
    wait_until("orcafs stopped", Duration::from_secs(5), || {
        std::fs::read_to_string(&status).is_ok_and(|s| s.contains("State:\tT"))
    });
    let mut tail = vec![0u8; 777];
    f.read_exact_at(&mut tail, 5 * CHUNK as u64).unwrap();
    assert_eq!(tail, data[5 * CHUNK..]);
    let waiting = pread_within(
        &m.path("partial.bin"),
        2 * CHUNK as u64,
        10,
        Duration::from_secs(1),
    );
    // SAFETY: as above.
    unsafe { libc::kill(m.pid() as i32, libc::SIGCONT) };
    assert!(
        waiting.is_none(),
        "a read orcafs must answer waits while it is stopped"
    );
    assert_eq!(
        o.stats().get_requests,
        gets,
        "no origin request for cached bytes"
    );
    drop((f, g));
    assert_eq!(
        sha256sum(&m.path("p.bin")),
        sha256_hex(&data),
        "cat/sha256sum through passthrough"
    );
    assert_eq!(m.unmount(), 0);

    // Checked, flushed and stamped: the next process hands it to the kernel without reading it
    // through first.
    let m = mount_in(&s, &o, BUCKET, &[]);
    assert_eq!(sha256sum(&m.path("p.bin")), sha256_hex(&data));
    assert_eq!(status_counter(&m, "passthrough_opens"), 1);
    assert_eq!(
        status_counter(&m, "cache_checks"),
        0,
        "the stamp still matches the file"
    );
    assert_eq!(m.unmount(), 0);
}

#[test]
fn a_cache_file_damaged_while_unmounted_is_never_handed_to_the_kernel() {
    if !kernel_has_passthrough() {
        return;
    }
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(3 * CHUNK + 5, 63);
    o.put_object(BUCKET, "d.bin", data.clone());
    let cache = s.path("cache");
    let m = mount_in(&s, &o, BUCKET, &[]);
    assert_eq!(sha256sum(&m.path("d.bin")), sha256_hex(&data));
    wait_until("4 chunks committed", Duration::from_secs(10), || {
        cached_chunks(&cache) >= 4
    });
    assert_eq!(m.unmount(), 0);

    // One flipped byte in the second chunk, as a bad disk or a stray write would leave it.
    let files = cached_data_files(&cache);
    assert_eq!(files.len(), 1);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&files[0])
        .unwrap();
    let at = CHUNK as u64 + 1234;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
    drop(f);

    o.reset_stats();
    let m = mount_in(&s, &o, BUCKET, &[]);
    // The write moved the file's change time past its stamp, so the check before the first
    // passthrough open reads it through, finds the byte and drops the chunk; the open goes
    // through orcafs, which refetches it.
    assert_eq!(sha256sum(&m.path("d.bin")), sha256_hex(&data));
    assert_eq!(status_counter(&m, "passthrough_opens"), 0);
    assert!(status_counter(&m, "cache_checks") >= 1);
    assert_eq!(
        o.stats().get_requests,
        1,
        "only the damaged chunk refetched: {:?}",
        o.stats()
    );
    wait_until("the chunk committed again", Duration::from_secs(10), || {
        cached_chunks(&cache) >= 4
    });
    // Whole and checked again: now the kernel reads it.
    assert_eq!(sha256sum(&m.path("d.bin")), sha256_hex(&data));
    assert_eq!(status_counter(&m, "passthrough_opens"), 1);
    assert_eq!(m.unmount(), 0);
}

#[test]
fn no_passthrough_keeps_every_read_in_orcafs() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(2 * CHUNK, 64);
    o.put_object(BUCKET, "n.bin", data.clone());
    let cache = s.path("cache");
    let m = mount_in(&s, &o, BUCKET, &["--no-passthrough"]);
    assert_eq!(sha256sum(&m.path("n.bin")), sha256_hex(&data));
    wait_until("2 chunks committed", Duration::from_secs(10), || {
        cached_chunks(&cache) >= 2
    });
    assert_eq!(sha256sum(&m.path("n.bin")), sha256_hex(&data));
    assert_eq!(status_counter(&m, "passthrough_opens"), 0);
    assert_eq!(m.unmount(), 0);
}

/// Offsets of `n` isolated 4 KiB reads, each far from the one before (so none continues a
/// sequential pattern; the first more than 2 MiB from the start), inside one 64 KiB block each.
fn scattered(n: u64, size: u64) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let block = (i * 97 + 50) % (size / (64 << 10));
            block * (64 << 10) + (i * 4096 * 5) % (32 << 10)
        })
        .collect()
}

#[test]
fn random_reads_fetch_blocks_not_chunks_and_keep_them() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let size = 64 << 20;
    let data = pattern(size, 65);
    o.put_object(BUCKET, "r.bin", data.clone());
    let cache = s.path("cache");
    let m = mount_in(&s, &o, BUCKET, &["--chunk-size", "8MiB"]);
    let offsets = scattered(40, size as u64);
    o.reset_stats();
    let f = std::fs::File::open(m.path("r.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    for at in &offsets {
        f.read_exact_at(&mut buf, *at).unwrap();
        assert_eq!(buf, data[*at as usize..*at as usize + 4096], "at {at}");
    }
    drop(f);
    let st = o.stats();
    let blocks = offsets
        .iter()
        .map(|a| a / (64 << 10))
        .collect::<std::collections::BTreeSet<_>>();
    assert!(
        st.get_bytes <= blocks.len() as u64 * (64 << 10),
        "each read fetched its 64 KiB block, not its 8 MiB chunk: {st:?}"
    );
    assert!(st.get_requests <= blocks.len() as u64, "{st:?}");
    wait_until("the blocks kept", Duration::from_secs(10), || {
        cache_stats(&cache).bytes >= blocks.len() as u64 * (64 << 10)
    });
    assert_eq!(m.unmount(), 0);

    // A restart finds the blocks in the cache: the same reads cost nothing at the origin.
    o.reset_stats();
    let m = mount_in(&s, &o, BUCKET, &["--chunk-size", "8MiB"]);
    let f = std::fs::File::open(m.path("r.bin")).unwrap();
    for at in &offsets {
        f.read_exact_at(&mut buf, *at).unwrap();
        assert_eq!(buf, data[*at as usize..*at as usize + 4096], "at {at}");
    }
    drop(f);
    assert_eq!(o.stats().get_requests, 0, "{:?}", o.stats());
    // A sequential reader still gets whole chunks, each fetched once.
    assert_eq!(sha256sum(&m.path("r.bin")), sha256_hex(&data));
    let st = o.stats();
    assert_eq!(st.get_bytes, size as u64, "whole chunks, each once: {st:?}");
    assert_eq!(m.unmount(), 0);
}

/// The kernel asks for a sequential reader's bytes a MiB at a time: orcafs raises its mount's
/// `read_ahead_kb` (128 KiB unless raised, whatever the filesystem asks), so a `dd bs=1M` costs
/// one read request per MiB, not eight.
#[test]
fn a_sequential_reader_costs_one_read_request_per_mebibyte() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: raising a mount's read_ahead_kb needs root");
        return;
    }
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let mib = 1 << 20;
    let data = pattern(8 * mib, 65);
    o.put_object(BUCKET, "seq.bin", data.clone());
    let cache = s.path("cache");
    // One chunk: each request is one cache read, whatever its size.
    let m = mount_in(
        &s,
        &o,
        BUCKET,
        &["--no-passthrough", "--chunk-size", "8MiB"],
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = m.mnt.to_str().unwrap();
    let device = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&mnt))
        .map(|f| f[2].to_string())
        .expect("the mount is in mountinfo");
    assert_eq!(sha256sum(&m.path("seq.bin")), sha256_hex(&data));
    // Raised by the first request after FUSE_INIT.
    let kb = std::fs::read_to_string(format!("/sys/class/bdi/{device}/read_ahead_kb")).unwrap();
    assert_eq!(kb.trim(), "1024");
    wait_until("the object committed", Duration::from_secs(10), || {
        cached_chunks(&cache) >= 1
    });
    // Out of the page cache, so the next read asks orcafs again.
    let f = std::fs::File::open(m.path("seq.bin")).unwrap();
    // SAFETY: a valid fd; advice only.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0);
    drop(f);
    let before = status_counter(&m, "disk_hits") + status_counter(&m, "ahead_hits");
    let out = run_output(
        "dd",
        &[
            &format!("if={}", m.path("seq.bin").display()),
            "of=/dev/null",
            "bs=1M",
        ],
    );
    assert!(out.status.success(), "dd: {out:?}");
    let reads = status_counter(&m, "disk_hits") + status_counter(&m, "ahead_hits") - before;
    assert!(
        (8..=10).contains(&reads),
        "8 MiB in about 8 requests, not 64: {reads}"
    );
    assert_eq!(m.unmount(), 0);
}

/// A passthrough handle never gets ESTALE or ENOENT: all its bytes are local, whatever happens
/// to the object at the origin (replaced, then deleted), and page cache dropped or not.
#[test]
fn a_passthrough_handle_reads_its_version_after_replace_and_delete() {
    if !kernel_has_passthrough() {
        return;
    }
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let a = pattern(3 * CHUNK + 99, 63);
    let b = pattern(CHUNK, 64);
    o.put_object(BUCKET, "v.bin", a.clone());
    let cache = s.path("cache");
    let m = mount_in(&s, &o, BUCKET, &["--metadata-ttl", "1s"]);
    assert_eq!(sha256sum(&m.path("v.bin")), sha256_hex(&a));
    wait_until("A's 4 chunks committed", Duration::from_secs(10), || {
        cached_chunks(&cache) >= 4
    });
    // The kernel tells orcafs of sha256sum's close a moment after it returns; until then an
    // open joins that handle's mode.
    let mut f = None;
    wait_until("a passthrough open", Duration::from_secs(5), || {
        let opened = std::fs::File::open(m.path("v.bin")).unwrap();
        let through = status_counter(&m, "passthrough_opens") >= 1;
        f = through.then_some(opened);
        through
    });
    let f = f.unwrap();
    let read_whole = |f: &std::fs::File| {
        // Out of the page cache first, so the kernel reads the cache's file again.
        use std::os::unix::io::AsRawFd;
        // SAFETY: a plain advice call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut buf = vec![0u8; a.len()];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    };
    o.put_object(BUCKET, "v.bin", b.clone());
    std::thread::sleep(Duration::from_millis(1300));
    assert!(read_whole(&f) == a, "A's bytes after the replacement");
    assert_eq!(sha256sum(&m.path("v.bin")), sha256_hex(&b), "a new open: B");
    o.delete_object(BUCKET, "v.bin");
    std::thread::sleep(Duration::from_millis(1300));
    assert!(read_whole(&f) == a, "A's bytes after the deletion");
    let gone = std::fs::metadata(m.path("v.bin")).expect_err("deleted");
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT), "{gone}");
}

/// One mode per inode: an open joins the mode of the handles already open. A file that becomes
/// whole while a handle reads it through orcafs stays with orcafs for every open until all its
/// handles are closed; the next open then is passthrough.
#[test]
fn an_open_joins_the_mode_of_the_handles_already_open() {
    if !kernel_has_passthrough() {
        return;
    }
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(3 * CHUNK + 11, 65);
    o.put_object(BUCKET, "j.bin", data.clone());
    let cache = s.path("cache");
    let m = mount_in(&s, &o, BUCKET, &[]);
    let path = m.path("j.bin");
    // Cold: this handle is served by orcafs, and its reads make the file whole.
    let first = std::fs::File::open(&path).unwrap();
    let mut all = vec![0u8; data.len()];
    first.read_exact_at(&mut all, 0).unwrap();
    assert!(all == data);
    wait_until("4 chunks committed", Duration::from_secs(10), || {
        cached_chunks(&cache) >= 4
    });
    // Whole now, but `first` is open through orcafs: a second open joins it.
    let second = std::fs::File::open(&path).unwrap();
    assert_eq!(status_counter(&m, "passthrough_opens"), 0);
    let mut buf = vec![0u8; 5000];
    second.read_exact_at(&mut buf, 2 * CHUNK as u64).unwrap();
    assert!(buf == data[2 * CHUNK..2 * CHUNK + 5000]);
    drop((first, second));
    // All closed (the kernel tells orcafs a moment after `close` returns): opens are
    // passthrough again.
    wait_until("a passthrough open", Duration::from_secs(5), || {
        assert_eq!(sha256sum(&path), sha256_hex(&data));
        status_counter(&m, "passthrough_opens") >= 1
    });
}
