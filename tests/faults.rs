//! The fetch coordinator under real faults, injected by the S3 server between orcafs and its
//! data: 503s, bodies cut in half (the connection is aborted mid-body), stalled bodies, objects
//! replaced during a fill. Reads return exact bytes or fail (EIO, or ESTALE when the object
//! changed) within the budget; never wrong bytes, never a hang, never a committed partial chunk.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "bkt";

fn mounted(s: &Scratch, o: &DevOrigin, extra: &[&str]) -> Mount {
    mount_in(s, o, BUCKET, extra)
}

fn chunk_files(cache: &Path) -> usize {
    cached_chunks(cache) as usize
}

/// Reads a whole file with O_DIRECT through `dd`: one FUSE read per block, no kernel
/// readahead or retry, so origin request counts are exact. Err carries dd's stderr.
fn direct_read(path: &Path) -> Result<Vec<u8>, String> {
    let out = run_output(
        "dd",
        &[
            &format!("if={}", path.display()),
            "iflag=direct",
            "bs=1M",
            "status=none",
        ],
    );
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn first_bytes_reach_the_reader_while_the_fill_runs_and_commit_follows() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(CHUNK, 1);
    o.put_object(BUCKET, "s.bin", data.clone());
    let m = mounted(&s, &o, &["--readahead-chunks", "0"]);
    o.reset_stats();
    // The body delivers 64 KiB, then stalls for 4 s.
    o.faults()
        .stall_next_bodies(1, 64 * 1024, Duration::from_secs(4));
    let head = run("head", &["-c", "4096", m.path("s.bin").to_str().unwrap()]);
    assert_eq!(head, data[..4096]);
    // head got its bytes while the chunk was still incomplete: nothing is committed yet.
    assert_eq!(chunk_files(&m.cache), 0, "served before the fill completed");
    // The reader is gone; the fill still completes and is committed.
    wait_until(
        "the chunk committed after serve",
        Duration::from_secs(20),
        || chunk_files(&m.cache) == 1,
    );
    assert_eq!(o.stats().get_requests, 1);
    o.reset_stats();
    assert_eq!(read_all(&m.path("s.bin")), data);
    assert_eq!(
        o.stats().get_requests,
        0,
        "the committed chunk serves the next read"
    );
}

#[test]
fn a_failed_fill_is_never_committed_and_the_next_read_refills() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(CHUNK, 2);
    o.put_object(BUCKET, "f.bin", data.clone());
    let m = mounted(
        &s,
        &o,
        &["--origin-max-attempts", "1", "--readahead-chunks", "0"],
    );
    o.faults().cut_next_bodies(1);
    let Err(err) = direct_read(&m.path("f.bin")) else {
        panic!("a cut body with no retry left fails");
    };
    assert!(err.contains("Input/output error"), "EIO, got {err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(chunk_files(&m.cache), 0, "the half chunk was not committed");
    assert_eq!(read_all(&m.path("f.bin")), data, "the next read refills");
}

#[test]
fn a_fraction_of_503s_is_absorbed_by_retries() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(16 * CHUNK + 3, 3);
    o.put_object(BUCKET, "r.bin", data.clone());
    let m = mounted(&s, &o, &["--origin-max-attempts", "12"]);
    o.faults().fail_fraction(30, 503);
    assert_eq!(sha256sum(&m.path("r.bin")), sha256_hex(&data));
    let st = o.stats();
    assert!(
        st.get_requests > 17,
        "some GETs failed and were retried: {st:?}"
    );
    assert_eq!(
        st.get_bytes,
        data.len() as u64,
        "failed GETs carried no body bytes"
    );
}

#[test]
fn a_stalled_body_is_abandoned_and_resumed_from_its_offset() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(CHUNK, 4);
    o.put_object(BUCKET, "st.bin", data.clone());
    let m = mounted(
        &s,
        &o,
        &["--origin-timeout", "1s", "--readahead-chunks", "0"],
    );
    o.reset_stats();
    o.faults()
        .stall_next_bodies(1, 100 * 1024, Duration::from_secs(60));
    assert_eq!(read_all(&m.path("st.bin")), data);
    let st = o.stats();
    assert_eq!(
        st.get_requests, 2,
        "one stalled GET, one resumed GET: {st:?}"
    );
    assert!(
        st.get_bytes < data.len() as u64 + 100 * 1024,
        "the resume asked only for the missing bytes: {st:?}"
    );
}

#[test]
fn cut_bodies_resume_and_reads_stay_exact() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(6 * CHUNK, 5);
    o.put_object(BUCKET, "c.bin", data.clone());
    let m = mounted(&s, &o, &[]);
    o.reset_stats();
    o.faults().cut_next_bodies(4);
    assert_eq!(sha256sum(&m.path("c.bin")), sha256_hex(&data));
    assert!(o.stats().get_requests >= 10, "{:?}", o.stats());
}

#[test]
fn an_object_replaced_during_a_fill_is_never_mixed() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let old = pattern(CHUNK, 6);
    let new = pattern(CHUNK, 7);
    o.put_object(BUCKET, "x.bin", old.clone());
    let m = mounted(
        &s,
        &o,
        &["--origin-timeout", "1s", "--readahead-chunks", "0"],
    );
    let f = std::fs::File::open(m.path("x.bin")).unwrap();
    // The fill gets 64 KiB, stalls, and resumes after the object was replaced.
    o.faults()
        .stall_next_bodies(1, 64 * 1024, Duration::from_secs(30));
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let r = f.read_at(&mut buf, 0).map(|n| buf[..n].to_vec());
        (r, f)
    });
    std::thread::sleep(Duration::from_millis(200));
    o.put_object(BUCKET, "x.bin", new.clone());
    let (r, f) = reader.join().unwrap();
    match r {
        Ok(bytes) => {
            assert!(old.starts_with(&bytes), "only old bytes, never new ones");
            // What followed the 64 KiB must not be served from the new object.
            let mut rest = vec![0u8; 1024];
            match f.read_at(&mut rest, 128 * 1024) {
                Ok(n) => assert_eq!(&rest[..n], &old[128 * 1024..128 * 1024 + n]),
                Err(e) => assert!(matches!(e.raw_os_error(), Some(libc::ESTALE | libc::EIO))),
            }
        }
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::ESTALE | libc::EIO)),
            "{e}"
        ),
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        chunk_files(&m.cache),
        0,
        "no partial or mixed chunk committed"
    );
}

#[test]
fn a_spent_retry_budget_fails_with_eio_instead_of_hanging() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "dead.bin", pattern(CHUNK, 8));
    let m = mounted(
        &s,
        &o,
        &["--origin-max-attempts", "3", "--readahead-chunks", "0"],
    );
    o.reset_stats();
    o.faults().fail_fraction(100, 503);
    let Err(err) = direct_read(&m.path("dead.bin")) else {
        panic!("every GET fails");
    };
    assert!(err.contains("Input/output error"), "EIO, got {err}");
    assert_eq!(o.stats().get_requests, 3, "exactly the attempt budget");
    o.faults().clear();
    assert_eq!(read_all(&m.path("dead.bin")), pattern(CHUNK, 8));
}

#[test]
fn an_origin_that_answers_another_range_is_never_served_or_cached() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(3 * CHUNK, 10);
    o.put_object(BUCKET, "moved.bin", data.clone());
    let m = mounted(&s, &o, &["--readahead-chunks", "0"]);
    // A gateway that answers bytes 4096 further on: same length, an honest Content-Range.
    o.faults().shift_next_ranges(100, 4096);
    let Err(err) = direct_read(&m.path("moved.bin")) else {
        panic!("the shifted bytes were taken for the ones asked for");
    };
    assert!(err.contains("Input/output error"), "EIO, got {err}");
    assert_eq!(chunk_files(&s.path("cache")), 0, "nothing committed");
    o.faults().clear();
    assert!(
        read_all(&m.path("moved.bin")) == data,
        "the object's own bytes"
    );
}

#[test]
fn forbidden_is_not_retried() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "no.bin", pattern(CHUNK, 9));
    let m = mounted(&s, &o, &["--readahead-chunks", "0"]);
    o.reset_stats();
    o.faults().fail_next_gets(1, 403);
    let err = direct_read(&m.path("no.bin")).expect_err("403");
    assert!(err.contains("Permission denied"), "EACCES, got {err}");
    assert_eq!(o.stats().get_requests, 1, "403 is final");
}

#[test]
fn sequential_readers_prefetch_and_random_readers_do_not() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "seq.bin", pattern(12 * CHUNK, 10));
    o.put_object(BUCKET, "rnd.bin", pattern(12 * CHUNK, 11));
    let m = mounted(&s, &o, &["--readahead-chunks", "3"]);

    o.reset_stats();
    let head = run(
        "head",
        &["-c", "65536", m.path("seq.bin").to_str().unwrap()],
    );
    assert_eq!(head, pattern(12 * CHUNK, 10)[..65536]);
    wait_until("chunk 0 plus 3 prefetched", Duration::from_secs(10), || {
        o.stats().get_requests == 4
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(o.stats().get_requests, 4, "readahead depth is 3");

    o.reset_stats();
    let f = std::fs::File::open(m.path("rnd.bin")).unwrap();
    // SAFETY: plain fadvise on an open fd; keeps the kernel's own readahead out of the count.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let want = pattern(12 * CHUNK, 11);
    for chunk in [7usize, 2, 10, 4] {
        let off = chunk * CHUNK + 1000;
        let mut buf = [0u8; 4096];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert_eq!(&buf[..], &want[off..off + 4096]);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        o.stats().get_requests,
        4,
        "random reads fetch only what they touch"
    );
}

#[test]
fn a_tiny_memory_budget_applies_back_pressure_without_deadlock() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let objects: Vec<Vec<u8>> = (0..6)
        .map(|i| pattern(10 * CHUNK + i, 20 + i as u64))
        .collect();
    for (i, d) in objects.iter().enumerate() {
        o.put_object(BUCKET, &format!("m{i}.bin"), d.clone());
    }
    // Room for two chunks at a time across all readers and readahead.
    let m = mounted(
        &s,
        &o,
        &["--memory-limit", "512KiB", "--readahead-chunks", "4"],
    );
    let readers: Vec<_> = (0..6)
        .map(|i| {
            let p = m.path(&format!("m{i}.bin"));
            std::thread::spawn(move || sha256sum(&p))
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(r.join().unwrap(), sha256_hex(&objects[i]));
    }
}

/// An origin that goes away under a running mount: a read that needs it fails with EIO within
/// the retry budget (no hang), and what is cached still reads.
#[test]
fn an_origin_gone_after_mount_fails_uncached_reads_with_eio_and_serves_cached_ones() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let (kept, lost) = (pattern(CHUNK, 10), pattern(CHUNK, 11));
    o.put_object(BUCKET, "kept.bin", kept.clone());
    o.put_object(BUCKET, "lost.bin", lost);
    let m = mounted(
        &s,
        &o,
        &["--origin-max-attempts", "2", "--readahead-chunks", "0"],
    );
    assert_eq!(read_all(&m.path("kept.bin")), kept);
    assert!(
        m.path("lost.bin").is_file(),
        "known while the origin was up"
    );
    drop(o);
    let started = Instant::now();
    let err = direct_read(&m.path("lost.bin")).expect_err("the origin is gone");
    assert!(err.contains("Input/output error"), "EIO, got {err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failed after {:?}",
        started.elapsed()
    );
    assert_eq!(direct_read(&m.path("kept.bin")).unwrap(), kept);
}
