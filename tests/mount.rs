//! End-to-end: a real S3 server (s3s-fs) on 127.0.0.1, the real `orcafs` binary mounted through
//! the kernel, and real programs reading it. Every mount is unmounted by its guard.

mod common;

use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::*;

const BUCKET: &str = "bkt";

fn mounted(scratch: &Scratch, o: &DevOrigin, extra: &[&str]) -> Mount {
    mount_in(scratch, o, BUCKET, extra)
}

#[test]
fn edge_sized_objects_read_byte_exact_with_real_tools() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let sizes = [
        ("zero", 0),
        ("one", 1),
        ("chunk-minus-1", CHUNK - 1),
        ("chunk", CHUNK),
        ("chunk-plus-1", CHUNK + 1),
        ("multi", 3 * CHUNK + 12_345),
    ];
    for (i, (name, size)) in sizes.iter().enumerate() {
        o.put_object(BUCKET, &format!("sizes/{name}"), pattern(*size, i as u64));
    }
    let m = mounted(&s, &o, &[]);
    for (i, (name, size)) in sizes.iter().enumerate() {
        let want = pattern(*size, i as u64);
        let p = m.path(&format!("sizes/{name}"));
        let ps = p.to_str().unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            *size as u64,
            "{name} size"
        );
        assert_eq!(sha256sum(&p), sha256_hex(&want), "sha256sum {name}");
        assert_eq!(run("cat", &[ps]), want, "cat {name}");
        for bs in ["1", "4096", "65537", "1M"] {
            if bs == "1" && *size > 2 * CHUNK {
                continue; // byte-by-byte dd of a megabyte is slow and proves nothing more
            }
            let of = s.path("out").join(format!("{name}.{bs}"));
            run(
                "dd",
                &[
                    &format!("if={ps}"),
                    &format!("of={}", of.display()),
                    &format!("bs={bs}"),
                    "status=none",
                ],
            );
            assert_eq!(read_all(&of), want, "dd bs={bs} {name}");
        }
        let copy = s.path("out").join(format!("{name}.cp"));
        run("cp", &[ps, copy.to_str().unwrap()]);
        assert_eq!(read_all(&copy), want, "cp {name}");
        let n = 1000.min(*size);
        assert_eq!(
            run("tail", &["-c", "1000", ps]),
            want[size - n..],
            "tail -c {name}"
        );
        assert_eq!(
            run("head", &["-c", "1000", ps]),
            want[..n],
            "head -c {name}"
        );
        if *size > 0 {
            let py = format!(
                "import mmap,hashlib;f=open({ps:?},'rb');m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ);print(hashlib.sha256(m).hexdigest())"
            );
            let out = String::from_utf8(run("python3", &["-c", &py])).unwrap();
            assert_eq!(out.trim(), sha256_hex(&want), "mmap {name}");
        }
    }
    // Random preads across chunk boundaries.
    let want = pattern(3 * CHUNK + 12_345, 5);
    let f = std::fs::File::open(m.path("sizes/multi")).unwrap();
    for (off, len) in [
        (CHUNK - 10, 20),
        (0, 3 * CHUNK + 12_345),
        (2 * CHUNK + 7, CHUNK + 100),
        (3 * CHUNK + 12_000, 1000),
    ] {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off as u64).unwrap();
        let end = (off + len).min(want.len());
        assert_eq!(&buf[..n], &want[off..end], "pread {off}+{len}");
    }
    drop(f);
    assert_eq!(m.unmount(), 0);
}

#[test]
fn grep_finds_text_and_names_with_odd_characters_work() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let names = [
        "odd/with space.txt",
        "odd/ünïcödé-名前.txt",
        "odd/100%.txt",
        "odd/a+b=c.txt",
        "odd/semi;colon,comma",
    ];
    for (i, n) in names.iter().enumerate() {
        o.put_object(
            BUCKET,
            n,
            format!("line one\nneedle {i}\nline three\n").into_bytes(),
        );
    }
    // 150 bytes: s3s-fs keeps metadata in files named after the base64 of the key, so it cannot
    // hold 255-byte names; the 255/256-byte edge is tested against Garage.
    let long = format!("odd/{}", "L".repeat(150));
    o.put_object(BUCKET, &long, b"long name\n".to_vec());
    let m = mounted(&s, &o, &[]);
    let listed = String::from_utf8(run("ls", &[m.path("odd").to_str().unwrap()])).unwrap();
    for n in names.iter().chain([&long.as_str()]) {
        let base = n.strip_prefix("odd/").unwrap();
        assert!(
            listed.lines().any(|l| l == base),
            "{base:?} listed in {listed:?}"
        );
    }
    for (i, n) in names.iter().enumerate() {
        let out = String::from_utf8(run("grep", &["needle", m.path(n).to_str().unwrap()])).unwrap();
        assert_eq!(out, format!("needle {i}\n"));
    }
    let out = run("grep", &["-rl", "needle", m.path("odd").to_str().unwrap()]);
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), names.len());
    assert_eq!(read_all(&m.path(&long)), b"long name\n");
    assert!(!m.path("odd/nope").exists());
}

#[test]
fn tree_of_10000_objects_lists_and_relists_from_cache() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    // Written straight into the s3s-fs root: it serves any file there as an object.
    let root = o.root().join(BUCKET).join("tree");
    for d in 0..100 {
        let dir = root.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:02}")), format!("{d}-{f}")).unwrap();
        }
    }
    let m = mounted(&s, &o, &["--metadata-ttl", "300s"]);
    let tree = m.path("tree");
    let t = tree.to_str().unwrap();
    let found = String::from_utf8(run("find", &[t, "-type", "f"])).unwrap();
    assert_eq!(found.lines().count(), 10_000);
    let du = String::from_utf8(run("du", &["-s", "--apparent-size", "-b", t])).unwrap();
    let bytes: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
    let expected: u64 = (0..100)
        .flat_map(|d| (0..100).map(move |f| format!("{d}-{f}").len() as u64))
        .sum();
    assert!(
        bytes >= expected,
        "du counted {bytes}, objects hold {expected}"
    );
    let st = String::from_utf8(run(
        "stat",
        &["-c", "%s %F", m.path("tree/d42/f07").to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(st.trim(), "4 regular file"); // "42-7"

    let first = run("ls", &["-lR", t]);
    o.reset_stats();
    let second = run("ls", &["-lR", t]);
    assert_eq!(first, second);
    let stats = o.stats();
    assert_eq!(
        stats.requests, 0,
        "a second ls -lR within the TTL asks the origin nothing: {stats:?}"
    );

    // Listing pages of 1000: the directory of 100 subdirectories and 10,000 files in one prefix.
    let inode_a = std::fs::metadata(m.path("tree/d01/f01"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let inode_b = std::fs::metadata(m.path("tree/d01/f01"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    assert_eq!(inode_a, inode_b, "inode numbers are stable");
}

#[test]
fn big_flat_directory_paginates() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let root = o.root().join(BUCKET).join("flat");
    std::fs::create_dir_all(&root).unwrap();
    for f in 0..2500 {
        std::fs::write(root.join(format!("f{f:04}")), b"x").unwrap();
    }
    let m = mounted(&s, &o, &[]);
    o.reset_stats();
    let n = std::fs::read_dir(m.path("flat")).unwrap().count();
    assert_eq!(n, 2500);
    assert!(
        o.stats().list_requests >= 3,
        "2500 keys take 3 pages of 1000: {:?}",
        o.stats()
    );
}

#[test]
fn a_looked_up_directory_answers_its_childrens_lookups_without_requests() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "d/a.txt", b"alpha".to_vec());
    o.put_object(BUCKET, "d/b.txt", b"beta".to_vec());
    o.put_object(BUCKET, "d/sub/c.txt", b"c".to_vec());
    let big = o.root().join(BUCKET).join("big");
    std::fs::create_dir_all(&big).unwrap();
    for f in 0..1001 {
        std::fs::write(big.join(format!("f{f:04}")), b"x").unwrap();
    }
    let m = mounted(&s, &o, &[]);

    o.reset_stats();
    assert!(m.path("d").is_dir());
    assert_eq!(o.stats().list_requests, 1, "{:?}", o.stats());
    reset_stats_when_quiet(&o);
    assert_eq!(std::fs::metadata(m.path("d/a.txt")).unwrap().len(), 5);
    assert!(m.path("d/sub").is_dir());
    assert_eq!(read_all(&m.path("d/b.txt")), b"beta");
    let missing = std::fs::metadata(m.path("d/nope")).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    let names = std::fs::read_dir(m.path("d")).unwrap().count();
    assert_eq!(names, 3);
    let st = o.stats();
    assert_eq!(
        (st.list_requests, st.head_requests, st.get_requests),
        (0, 0, 1),
        "only the data GET: names, sizes and ETags came with the directory's listing: {st:?}"
    );

    // A directory bigger than one LIST page has no complete listing: its names are asked for.
    assert!(m.path("big").is_dir());
    o.reset_stats();
    assert_eq!(std::fs::metadata(m.path("big/f1000")).unwrap().len(), 1);
    assert!(o.stats().head_requests + o.stats().list_requests >= 1);
}

#[test]
fn object_and_prefix_of_same_name_shows_the_directory() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    // s3s-fs cannot hold both `both` and `both/x` as files, so make the object a 0-byte
    // directory marker `both/` plus a child; the "object and prefix" case proper runs on Garage.
    o.put_object(BUCKET, "both/child.txt", b"c".to_vec());
    let m = mounted(&s, &o, &[]);
    assert!(m.path("both").is_dir());
    assert_eq!(read_all(&m.path("both/child.txt")), b"c");
}

#[test]
fn writes_are_refused_with_erofs() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "f.txt", b"data".to_vec());
    let m = mounted(&s, &o, &[]);
    let rofs = |r: std::io::Result<()>| {
        let e = r.expect_err("must fail");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    };
    rofs(std::fs::write(m.path("new.txt"), b"x"));
    rofs(
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.path("f.txt"))
            .map(|_| ()),
    );
    rofs(std::fs::create_dir(m.path("dir")));
    rofs(std::fs::remove_file(m.path("f.txt")));
    rofs(std::fs::rename(m.path("f.txt"), m.path("g.txt")));
    rofs(std::fs::hard_link(m.path("f.txt"), m.path("h.txt")));
    rofs(std::os::unix::fs::symlink("f.txt", m.path("l.txt")));
    rofs(std::fs::set_permissions(
        m.path("f.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    ));
    o.put_object(BUCKET, "d/x.txt", b"x".to_vec());
    rofs(std::fs::remove_dir(m.path("d")));
    // The calls std has no wrapper for: truncate, O_TRUNC, chown, utimes, xattrs, mknod.
    let c = |name: &str| std::ffi::CString::new(m.path(name).to_str().unwrap()).unwrap();
    let f = c("f.txt");
    let sys = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls on a NUL-terminated path and constant arguments.
    unsafe {
        rofs(sys(libc::truncate(f.as_ptr(), 0)));
        rofs(sys(libc::open(f.as_ptr(), libc::O_RDONLY | libc::O_TRUNC)));
        rofs(sys(libc::chown(f.as_ptr(), 1, 1)));
        rofs(sys(libc::utimensat(
            libc::AT_FDCWD,
            f.as_ptr(),
            std::ptr::null(),
            0,
        )));
        let name = c"user.x";
        rofs(sys(libc::setxattr(
            f.as_ptr(),
            name.as_ptr(),
            b"v".as_ptr().cast(),
            1,
            0,
        )));
        rofs(sys(libc::removexattr(f.as_ptr(), name.as_ptr())));
        rofs(sys(libc::mknod(c("n").as_ptr(), libc::S_IFIFO | 0o644, 0)));
    }
    assert_eq!(read_all(&m.path("f.txt")), b"data");
    let df =
        String::from_utf8(run("stat", &["-f", "-c", "%T %l", m.mnt.to_str().unwrap()])).unwrap();
    assert!(df.contains("255"), "statfs answers: {df}");
}

#[test]
fn warm_remount_reads_with_zero_origin_gets() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(5 * CHUNK + 99, 7);
    o.put_object(BUCKET, "warm.bin", data.clone());
    let m = mounted(&s, &o, &[]);
    assert_eq!(sha256sum(&m.path("warm.bin")), sha256_hex(&data));
    assert_eq!(m.unmount(), 0);
    assert_eq!(
        o.stats().get_bytes,
        data.len() as u64,
        "cold read fetched each byte once"
    );
    let leftovers = std::fs::read_dir(s.path("cache").join("tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "no temp files after unmount");

    o.reset_stats();
    let m = mounted(&s, &o, &[]);
    assert_eq!(sha256sum(&m.path("warm.bin")), sha256_hex(&data));
    assert_eq!(
        o.stats().get_requests,
        0,
        "warm remount sends no GET: {:?}",
        o.stats()
    );
    assert_eq!(m.unmount(), 0);
}

#[test]
fn corrupt_cache_file_is_refetched_never_served() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(2 * CHUNK, 8);
    o.put_object(BUCKET, "c.bin", data.clone());
    let m = mounted(&s, &o, &[]);
    assert_eq!(read_all(&m.path("c.bin")), data);
    assert_eq!(m.unmount(), 0);

    // Flip one byte in the data of each cached chunk (one object file holds both).
    let files = cached_data_files(&s.path("cache"));
    assert_eq!(files.len(), 1, "{files:?}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&files[0])
        .unwrap();
    for at in [CHUNK as u64 - 100, 2 * CHUNK as u64 - 100] {
        let mut b = [0u8; 1];
        file.read_at(&mut b, at).unwrap();
        b[0] ^= 0xff;
        file.write_at(&b, at).unwrap();
    }
    o.reset_stats();
    let m = mounted(&s, &o, &[]);
    assert_eq!(sha256sum(&m.path("c.bin")), sha256_hex(&data));
    assert_eq!(
        o.stats().get_requests,
        2,
        "both corrupt chunks refetched: {:?}",
        o.stats()
    );
    assert_eq!(m.unmount(), 0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn cache_stays_under_its_max_size() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(16 * CHUNK, 9);
    o.put_object(BUCKET, "big.bin", data.clone());
    let max = 4 * CHUNK as u64 + 64 * 1024;
    let m = mounted(&s, &o, &["--cache-max-size", &max.to_string()]);
    assert_eq!(sha256sum(&m.path("big.bin")), sha256_hex(&data));
    assert_eq!(m.unmount(), 0);
    let used = cache_stats(&s.path("cache")).bytes;
    assert!(used <= max, "cache holds {used} bytes, bound is {max}");
    // The data file is sparse: what the disk holds follows what the maps say, not the size.
    let on_disk: u64 = cached_data_files(&s.path("cache"))
        .iter()
        .map(|p| std::os::unix::fs::MetadataExt::blocks(&p.metadata().unwrap()) * 512)
        .sum();
    assert!(
        on_disk <= max + CHUNK as u64,
        "evicted chunks punched out: {on_disk} on disk"
    );
    assert!(
        used >= 3 * CHUNK as u64,
        "cache still holds recent chunks: {used}"
    );

    // Restarts with the cache full: what it holds (the 3 chunks read last) reads without the
    // origin, and new reads keep evicting within the bound.
    let (small, other) = (pattern(3 * CHUNK, 13), pattern(16 * CHUNK, 12));
    o.put_object(BUCKET, "small.bin", small.clone());
    o.put_object(BUCKET, "other.bin", other.clone());
    let bounded = ["--cache-max-size", &max.to_string()];
    let m = mounted(&s, &o, &bounded);
    assert_eq!(sha256sum(&m.path("small.bin")), sha256_hex(&small));
    assert_eq!(m.unmount(), 0);
    let m = mounted(&s, &o, &bounded);
    o.reset_stats();
    assert_eq!(sha256sum(&m.path("small.bin")), sha256_hex(&small));
    assert_eq!(
        o.stats().get_requests,
        0,
        "the chunks read last need no GET"
    );
    assert_eq!(sha256sum(&m.path("other.bin")), sha256_hex(&other));
    assert_eq!(m.unmount(), 0);
    let used = cache_stats(&s.path("cache")).bytes;
    assert!(used <= max, "after the restart: {used} bytes, bound {max}");
}

#[test]
fn object_replaced_while_open_never_mixes_versions() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let old = pattern(4 * CHUNK, 10);
    let new = pattern(4 * CHUNK, 11);
    o.put_object(BUCKET, "v.bin", old.clone());
    let m = mounted(&s, &o, &["--metadata-ttl", "1s"]);
    let mut f = std::fs::File::open(m.path("v.bin")).unwrap();
    let mut first = vec![0u8; CHUNK];
    f.read_exact(&mut first).unwrap();
    assert_eq!(first, old[..CHUNK]);

    o.put_object(BUCKET, "v.bin", new.clone());
    // The rest of the old version is not cached: reading it must give old bytes or fail.
    f.seek(SeekFrom::Start(2 * CHUNK as u64)).unwrap();
    let mut rest = vec![0u8; CHUNK];
    match f.read_exact(&mut rest) {
        Ok(()) => assert_eq!(rest, old[2 * CHUNK..3 * CHUNK], "old bytes, never new ones"),
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
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let s = Scratch::new();
        let o = origin(&s, BUCKET);
        o.put_object(BUCKET, "a.bin", pattern(3 * CHUNK, 12));
        let m = mounted(&s, &o, &[]);
        assert_eq!(read_all(&m.path("a.bin")).len(), 3 * CHUNK);
        let mnt = m.mnt.clone();
        assert_eq!(m.signal(sig), 0, "exit 0 after signal {sig}");
        assert!(!is_mounted(&mnt), "no stale mount after signal {sig}");
        assert_eq!(
            std::fs::read_dir(s.path("cache").join("tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}

#[test]
fn fusermount_unmount_ends_the_process() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let mut m = mounted(&s, &o, &[]);
    let out = run_output("fusermount3", &["-u", m.mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(m.wait_exit(), 0);
    assert!(!is_mounted(&m.mnt));
}

#[test]
fn detached_mount_returns_once_live() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "d.txt", b"detached\n".to_vec());
    let mnt = s.path("mnt");
    let out = mount_command(&Target::of(&o), BUCKET, &mnt, &s.path("cache"), &[])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Live at the moment the command returned: no waiting.
    let live = is_mounted(&mnt);
    let content = std::fs::read(mnt.join("d.txt"));
    let _ = run_output("umount", &[mnt.to_str().unwrap()]);
    assert!(live);
    assert_eq!(content.unwrap(), b"detached\n");
    // The empty directory it was given became orcafs's: private, and so is the default log.
    assert_eq!(mode_of(&s.path("cache")), 0o700);
    assert_eq!(mode_of(&s.path("cache").join("orcafs.log")), 0o600);
}

#[test]
fn a_cache_dir_holding_other_files_keeps_them_and_the_cache_is_private() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(2 * CHUNK + 7, 21);
    o.put_object(BUCKET, "p.bin", data.clone());
    let cache = s.path("cache");
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The user's files, one of them named like an orcafs temp file, all where an orcafs before
    // this one would have swept them.
    let lookalike = format!("{}.{}", "ab".repeat(32), "0123456789abcdef");
    let foreign = [
        cache.join("notes.txt"),
        s.path("cache/tmp").join("foreign"),
        cache.join("tmp").join(lookalike),
    ];
    for p in &foreign {
        std::fs::write(p, b"not orcafs's").unwrap();
    }
    let log = s.dir.path().join("logs/orcafs.log");
    let m = mount_in(&s, &o, BUCKET, &["--log-file", log.to_str().unwrap()]);
    assert_eq!(sha256sum(&m.path("p.bin")), sha256_hex(&data));
    assert_eq!(m.unmount(), 0);

    for p in &foreign {
        assert_eq!(
            std::fs::read(p).unwrap(),
            b"not orcafs's",
            "{}",
            p.display()
        );
    }
    assert_eq!(
        mode_of(&cache),
        0o755,
        "the user's directory keeps its mode"
    );
    assert!(
        !cache.join("chunks").exists(),
        "nothing of orcafs's among the user's files"
    );
    let root = cache.join("orcafs");
    assert!(
        root.join(".orcafs-cache").is_file(),
        "orcafs keeps to its own subdirectory"
    );
    let files = walk(&root.join("objects"));
    assert_eq!(files.len(), 2, "the object's data and block map: {files:?}");
    for f in &files {
        assert_eq!(mode_of(f), 0o600, "{}", f.display());
        let mut dir = f.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(&root)) {
            assert_eq!(mode_of(d), 0o700, "{}", d.display());
            dir = d.parent();
        }
    }
    assert_eq!(mode_of(&root.join("tmp")), 0o700);
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    assert!(std::fs::read_to_string(&log).unwrap().contains("mounted"));
    assert_eq!(mode_of(&log), 0o600, "the log names buckets and keys");
    assert_eq!(
        mode_of(log.parent().unwrap()),
        0o700,
        "and so does its new directory"
    );
}

#[test]
fn eight_concurrent_readers_fetch_each_byte_once() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(8 * CHUNK + 5, 13);
    o.put_object(BUCKET, "shared.bin", data.clone());
    let m = mounted(&s, &o, &[]);
    o.reset_stats();
    let p = m.path("shared.bin");
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || sha256sum(&p))
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), sha256_hex(&data));
    }
    let st = o.stats();
    assert_eq!(
        st.get_bytes,
        data.len() as u64,
        "origin served each byte once: {st:?}"
    );
    assert_eq!(st.get_requests, 9, "one GET per chunk: {st:?}");
}

#[test]
fn a_stalled_read_does_not_block_other_requests() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "slow.bin", pattern(CHUNK, 14));
    o.put_object(BUCKET, "fast.txt", b"fast\n".to_vec());
    let m = mounted(&s, &o, &[]);
    o.faults()
        .stall_next_bodies(1, 1024, Duration::from_secs(6));
    let slow = m.path("slow.bin");
    let slow_reader = std::thread::spawn(move || read_all(&slow));
    std::thread::sleep(Duration::from_millis(300));
    // While the first read waits on the network, other operations complete.
    assert!(
        !slow_reader.is_finished(),
        "the stalled read is still waiting"
    );
    assert_eq!(read_all(&m.path("fast.txt")), b"fast\n");
    assert!(std::fs::read_dir(&m.mnt).unwrap().count() >= 2);
    assert!(
        !slow_reader.is_finished(),
        "and was still waiting while the others were served"
    );
    assert_eq!(slow_reader.join().unwrap(), pattern(CHUNK, 14));
}

#[test]
fn transient_origin_errors_are_retried_and_cut_bodies_resumed() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(3 * CHUNK, 15);
    o.put_object(BUCKET, "flaky.bin", data.clone());
    let m = mounted(&s, &o, &[]);
    o.faults().fail_next_gets(2, 503);
    assert_eq!(sha256sum(&m.path("flaky.bin")), sha256_hex(&data));
    o.put_object(BUCKET, "cut.bin", pattern(3 * CHUNK, 16));
    o.faults().cut_next_bodies(2);
    assert_eq!(
        sha256sum(&m.path("cut.bin")),
        sha256_hex(&pattern(3 * CHUNK, 16))
    );
}

#[test]
fn missing_file_is_enoent_and_hidden_names_stay_hidden() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "here.txt", b"x".to_vec());
    let m = mounted(&s, &o, &[]);
    let e = std::fs::metadata(m.path("not-here.txt")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(m.path("here.txt").exists());
}

/// A long sequential read keeps more and more chunk GETs in flight (a remote origin gives each
/// connection a share of its bandwidth), up to the window's bound, and fetches each byte once.
#[test]
fn a_long_sequential_read_widens_its_readahead_window_up_to_the_bound() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let mib = 1 << 20;
    let data = pattern(48 * mib, 11);
    o.put_object(BUCKET, "long.bin", data.clone());
    // Every GET waits before answering, so the GETs a reader keeps in flight overlap.
    o.faults().set_get_delay(Duration::from_millis(150));
    let read = |max: &str| {
        let m = mounted(
            &s,
            &o,
            &[
                "--chunk-size",
                "1MiB",
                "--readahead-chunks",
                "2",
                "--readahead-max-chunks",
                max,
            ],
        );
        o.reset_stats();
        let out = run_output(
            "dd",
            &[
                &format!("if={}", m.path("long.bin").display()),
                "of=/dev/null",
                "bs=1M",
            ],
        );
        assert!(out.status.success(), "dd: {out:?}");
        assert_eq!(sha256sum(&m.path("long.bin")), sha256_hex(&data));
        let stats = o.stats();
        assert_eq!(m.unmount(), 0);
        std::fs::remove_dir_all(s.path("cache")).unwrap();
        stats
    };
    let fixed = read("2");
    let widening = read("12");
    for st in [fixed, widening] {
        assert_eq!(st.get_bytes, data.len() as u64, "each byte once: {st:?}");
    }
    // The kernel's own readahead reaches one chunk past the reader at most.
    assert!(
        fixed.peak_gets_in_flight <= 4,
        "a window of 2: at most 2 ahead, the reader's chunk and the next: {fixed:?}"
    );
    assert!(
        (8..=14).contains(&widening.peak_gets_in_flight),
        "the window doubled from 2 to 12: {widening:?}"
    );
}

/// The attributes, `statfs` and `ioctl` answers that docs/semantics.md promises.
#[test]
fn attributes_statfs_and_ioctl_are_as_documented() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(100_001, 5);
    o.put_object(BUCKET, "d/f.bin", data.clone());
    let m = mounted(
        &s,
        &o,
        &[
            "--uid",
            "1234",
            "--gid",
            "5678",
            "--file-mode",
            "0640",
            "--dir-mode",
            "0750",
        ],
    );
    let f = std::fs::metadata(m.path("d/f.bin")).unwrap();
    assert!(f.is_file());
    assert_eq!(f.size(), data.len() as u64);
    assert_eq!(f.blocks(), (data.len() as u64).div_ceil(512));
    assert_eq!(f.blksize(), 128 * 1024);
    assert_eq!((f.uid(), f.gid()), (1234, 5678));
    assert_eq!(f.mode() & 0o7777, 0o640);
    assert_eq!(f.nlink(), 1);
    // mtime is the object's LastModified: s3s-fs takes it from its file's mtime.
    let at_origin = std::fs::metadata(o.root().join(BUCKET).join("d/f.bin")).unwrap();
    assert!(
        (f.mtime() - at_origin.mtime()).abs() <= 1,
        "mtime {} vs LastModified {}",
        f.mtime(),
        at_origin.mtime()
    );
    let d = std::fs::metadata(m.path("d")).unwrap();
    assert!(d.is_dir());
    assert_eq!((d.uid(), d.gid()), (1234, 5678));
    assert_eq!(d.mode() & 0o7777, 0o750);
    assert_eq!(d.nlink(), 2);
    assert_eq!(d.size(), 0);

    // statfs: 2^40 blocks of 4 KiB, none free; 2^32 inodes, none free; names up to 255 bytes.
    let mnt = std::ffi::CString::new(m.mnt.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(mnt.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_blocks as u64 * st.f_frsize as u64, (1u64 << 40) * 4096);
    assert_eq!((st.f_bfree, st.f_bavail), (0, 0));
    assert_eq!((st.f_files as u64, st.f_ffree as u64), (1 << 32, 0));
    assert_eq!(st.f_namemax, 255);

    // ioctl: orcafs's own request works, anything else is ENOTTY.
    let file = std::fs::File::open(m.path("d/f.bin")).unwrap();
    let fd = file.as_raw_fd();
    assert_eq!(
        unsafe { libc::ioctl(fd, orcafs::fs::IOC_WHOLE_CHUNKS as _) },
        0
    );
    assert_eq!(unsafe { libc::ioctl(fd, 0x4f02 as _) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    let mut all = Vec::new();
    (&file).read_to_end(&mut all).unwrap();
    assert!(all == data, "reads after the ioctl");
}

/// A source with a prefix (`bkt/team/data/`) makes the prefix the mount's root: only the keys
/// under it show, at their names below it, and nothing outside it can be reached.
#[test]
fn a_prefix_source_is_the_root() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "team/data/a.txt", b"a".to_vec());
    o.put_object(BUCKET, "team/data/sub/b.txt", b"b".to_vec());
    o.put_object(BUCKET, "team/other.txt", b"other".to_vec());
    o.put_object(BUCKET, "top.txt", b"top".to_vec());
    let m = mount_in(&s, &o, &format!("{BUCKET}/team/data/"), &[]);
    assert_eq!(names_in(&m.mnt), ["a.txt", "sub"]);
    assert_eq!(read_all(&m.path("a.txt")), b"a");
    assert_eq!(read_all(&m.path("sub/b.txt")), b"b");
    for outside in ["top.txt", "other.txt", "team", "data"] {
        let e = std::fs::metadata(m.path(outside)).expect_err(outside);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{outside}: {e}");
    }
}

/// The page cache outlives a close while the ETag is unchanged: reading a file again in a new
/// open asks orcafs nothing (FUSE path, so that passthrough does not answer instead).
#[test]
fn a_reopened_unchanged_file_is_read_from_the_page_cache() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(2 * CHUNK + 5, 8);
    o.put_object(BUCKET, "k.bin", data.clone());
    let metrics = free_addr();
    let m = mounted(&s, &o, &["--no-passthrough", "--metrics-addr", &metrics]);
    let reads = || metric_sample(&metrics, "orcafs_fuse_op_seconds_count{op=\"read\"}");
    assert!(read_all(&m.path("k.bin")) == data);
    // A reply reaches the reader a moment before its latency is counted.
    std::thread::sleep(Duration::from_millis(100));
    let after_first = reads().expect("reads were counted");
    assert!(after_first > 0.0);
    assert!(read_all(&m.path("k.bin")) == data);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        reads(),
        Some(after_first),
        "the second open's reads reached orcafs"
    );
}

/// The POSIX table of docs/semantics.md beyond reads: lseek's data and holes, fsync, a shared
/// writable mmap refused, flock between processes, entry types in readdir.
#[test]
fn posix_calls_beside_read_behave_as_documented() {
    use std::os::unix::io::AsRawFd;
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(3 * CHUNK + 10, 14);
    o.put_object(BUCKET, "p.bin", data.clone());
    o.put_object(BUCKET, "sub/x.txt", b"x".to_vec());
    let m = mounted(&s, &o, &[]);
    let f = std::fs::File::open(m.path("p.bin")).unwrap();
    let fd = f.as_raw_fd();
    let len = data.len() as i64;
    // SAFETY: plain system calls on a descriptor this test owns.
    unsafe {
        assert_eq!(libc::lseek(fd, 0, libc::SEEK_DATA), 0, "data from 0");
        assert_eq!(
            libc::lseek(fd, 100, libc::SEEK_HOLE),
            len,
            "the only hole is the end"
        );
        assert_eq!(libc::lseek(fd, 0, libc::SEEK_END), len);
        assert_eq!(libc::fsync(fd), 0);
        assert_eq!(libc::fdatasync(fd), 0);
        let shared = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_eq!(shared, libc::MAP_FAILED, "a writable shared mapping");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EACCES)
        );
        let private = libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            fd,
            0,
        );
        assert_ne!(private, libc::MAP_FAILED);
        let mapped = std::slice::from_raw_parts(private as *const u8, data.len());
        assert!(mapped == &data[..], "the mapping holds the object");
        libc::munmap(private, data.len());
        // flock: held here, so another process cannot take it; free again after unlock.
        assert_eq!(libc::flock(fd, libc::LOCK_EX), 0);
    }
    let path = m.path("p.bin");
    let other = || {
        run_output("flock", &["-n", "-s", path.to_str().unwrap(), "true"])
            .status
            .success()
    };
    assert!(!other(), "another process takes a lock held here");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::flock(fd, libc::LOCK_UN) }, 0);
    assert!(other(), "free after unlock");
    let mut kinds: Vec<(String, bool)> = std::fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.file_type().unwrap().is_dir())
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [("p.bin".to_string(), false), ("sub".to_string(), true)]
    );
}
