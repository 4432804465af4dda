//! Running orcafs like a system: the real mount(8) with `-t fuse.orcafs` and an fstab file through
//! the /sbin/mount.fuse.orcafs helper link, systemd readiness over NOTIFY_SOCKET, SIGHUP, a
//! SIGKILL'ed mount cleared and recovered, the systemd units, and the operator commands.
//! Every mount is unmounted by a guard, also when a test fails.

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::Duration;

use common::*;

const BUCKET: &str = "bkt";
const HELPER: &str = "/sbin/mount.fuse.orcafs";

/// Installs the mount helper the way docs/operations.md says: a symlink to the binary.
/// Kept if it already points at this build; a symlink elsewhere is replaced (CI machine).
fn install_helper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let want = Path::new(orcafs_bin());
        match std::fs::symlink_metadata(HELPER) {
            Ok(m) if m.file_type().is_symlink() => {
                if std::fs::read_link(HELPER).ok().as_deref() == Some(want) {
                    return;
                }
                std::fs::remove_file(HELPER).expect("replace the old helper link");
            }
            Ok(_) => panic!("{HELPER} exists and is not a symlink; not touching it"),
            Err(_) => {}
        }
        std::os::unix::fs::symlink(want, HELPER).expect("create the mount helper link");
    });
}

/// Origin credentials and a clean AWS environment on any command.
fn with_s3_env<'a>(c: &'a mut Command, o: &DevOrigin) -> &'a mut Command {
    let _ = o;
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
}

fn origin_options(o: &DevOrigin, cache: &Path) -> String {
    format!(
        "endpoint_url={},force_path_style,cache_dir={},chunk_size=256KiB",
        o.endpoint(),
        cache.display()
    )
}

/// Lazily unmounts `mnt` on drop if it is still mounted (detached mounts have no child to reap).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// (fstype, source) of the mount at `mnt`, from /proc/self/mountinfo.
fn mount_entry(mnt: &Path) -> Option<(String, String)> {
    let want = mnt.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if Path::new(pre.split(' ').nth(4)?) != want {
            return None;
        }
        let mut f = post.split(' ');
        Some((f.next()?.to_string(), f.next()?.to_string()))
    })
}

fn orcafs(args: &[&str]) -> Output {
    Command::new(orcafs_bin())
        .args(args)
        .output()
        .expect("run orcafs")
}

#[test]
fn mount_t_fuse_orcafs_with_options_mounts_detached_and_umount_ends_it() {
    install_helper();
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "dir/hello.txt", b"hello from mount(8)\n".to_vec());
    let data = pattern(3 * CHUNK + 7, 21);
    o.put_object(BUCKET, "big.bin", data.clone());
    let mnt = s.path("mnt");
    let cache = s.path("cache");
    let _guard = Unmount(mnt.clone());

    let opts = format!(
        "{},_netdev,nofail,noauto,x-systemd.automount,ro,nodev,nosuid,defaults",
        origin_options(&o, &cache)
    );
    let out = with_s3_env(&mut Command::new("mount"), &o)
        .args(["-t", "fuse.orcafs", BUCKET])
        .arg(&mnt)
        .args(["-o", &opts])
        .output()
        .expect("run mount");
    assert!(out.status.success(), "mount -t fuse.orcafs: {}", text(&out));
    // mount(8) returned: the filesystem is live now, not eventually.
    assert!(is_mounted(&mnt), "not mounted when mount(8) returned");
    assert_eq!(
        mount_entry(&mnt),
        Some(("fuse.orcafs".to_string(), BUCKET.to_string()))
    );
    assert_eq!(
        std::fs::read(mnt.join("dir/hello.txt")).unwrap(),
        b"hello from mount(8)\n"
    );
    assert_eq!(sha256sum(&mnt.join("big.bin")), sha256_hex(&data));
    assert!(
        std::fs::read_to_string(cache.join("orcafs.log"))
            .unwrap_or_default()
            .contains("mounted"),
        "the detached daemon logs to <cache_dir>/orcafs.log"
    );

    run("umount", &[mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
}

#[test]
fn fstab_line_mounts_with_mount_dash_capital_t() {
    install_helper();
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "f.txt", b"from fstab\n".to_vec());
    let mnt = s.path("mnt");
    let cache = s.path("cache");
    let _guard = Unmount(mnt.clone());
    let fstab = s.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n{BUCKET} {} fuse.orcafs {},_netdev,nofail,noauto,x-systemd.automount,x-systemd.idle-timeout=10min,defaults 0 0\n",
            mnt.display(),
            origin_options(&o, &cache)
        ),
    )
    .unwrap();
    let out = with_s3_env(&mut Command::new("mount"), &o)
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .output()
        .expect("run mount");
    assert!(out.status.success(), "mount -T: {}", text(&out));
    assert!(is_mounted(&mnt));
    assert_eq!(std::fs::read(mnt.join("f.txt")).unwrap(), b"from fstab\n");
    assert_eq!(
        mount_entry(&mnt).map(|e| e.0).as_deref(),
        Some("fuse.orcafs")
    );
    run("umount", &[mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
}

#[test]
fn direct_helper_form_accepts_generic_options_and_fake_mounts_nothing() {
    install_helper();
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "x.txt", b"x\n".to_vec());
    let mnt = s.path("mnt");
    let cache = s.path("cache");
    let _guard = Unmount(mnt.clone());
    let generic = "_netdev,nofail,noauto,x-systemd.automount,ro,rw,nodev,nosuid,defaults,noatime";

    // mount(8)'s -f (fake): every option checked, nothing mounted.
    let out = with_s3_env(&mut Command::new(HELPER), &o)
        .arg(BUCKET)
        .arg(&mnt)
        .args(["-f", "-n", "-v", "-o"])
        .arg(format!("{},{generic}", origin_options(&o, &cache)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!is_mounted(&mnt), "-f must not mount");

    // `orcafs SOURCE MOUNTPOINT -o …` mounts for real, detached.
    let out = with_s3_env(&mut Command::new(orcafs_bin()), &o)
        .arg(BUCKET)
        .arg(&mnt)
        .arg("-o")
        .arg(format!("{},{generic}", origin_options(&o, &cache)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(is_mounted(&mnt));
    assert_eq!(std::fs::read(mnt.join("x.txt")).unwrap(), b"x\n");
    run("umount", &[mnt.to_str().unwrap()]);
}

#[test]
fn unknown_mount_option_is_one_clear_error_and_no_mount() {
    install_helper();
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let mnt = s.path("mnt");
    let cache = s.path("cache");
    let _guard = Unmount(mnt.clone());
    let opts = format!("{},_netdev,bogus_opt=3", origin_options(&o, &cache));

    let out = with_s3_env(&mut Command::new("mount"), &o)
        .args(["-t", "fuse.orcafs", BUCKET])
        .arg(&mnt)
        .args(["-o", &opts])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!is_mounted(&mnt));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown mount option \"bogus_opt=3\""),
        "{err}"
    );

    let out = with_s3_env(&mut Command::new(orcafs_bin()), &o)
        .arg(BUCKET)
        .arg(&mnt)
        .args(["-o", &opts])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(
        lines[0].starts_with("orcafs: error: unknown mount option \"bogus_opt=3\""),
        "{err}"
    );

    // The same options through `orcafs mount -o`.
    let out = with_s3_env(&mut Command::new(orcafs_bin()), &o)
        .arg("mount")
        .arg(BUCKET)
        .arg(&mnt)
        .args(["-o", "noexec"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("noexec"));
    assert!(!is_mounted(&mnt));
}

#[test]
fn second_mount_on_the_same_mountpoint_is_refused() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &[],
    );
    let out = mount_command(&Target::of(&o), BUCKET, &m.mnt, &s.path("cache2"), &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already a mount point"), "{err}");
    assert!(is_mounted(&m.mnt), "the first mount is untouched");
    assert_eq!(m.unmount(), 0);
}

/// Starts `orcafs mount --foreground` with our own flags and environment.
fn spawn_foreground(o: &DevOrigin, s: &Scratch, extra: &[&str], env: &[(&str, &Path)]) -> Mount {
    let mnt = s.path("mnt");
    let log = s.dir.path().join("stderr.log");
    let mut c = Command::new(orcafs_bin());
    c.arg("mount")
        .arg(BUCKET)
        .arg(&mnt)
        .args(["--endpoint-url", &o.endpoint(), "--force-path-style"])
        .arg("--cache-dir")
        .arg(s.path("cache"))
        .args(["--chunk-size", "256KiB", "--foreground"])
        .args(extra);
    with_s3_env(&mut c, o);
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn orcafs");
    let cache = s.path("cache");
    Mount::adopt(child, &mnt, &cache, &log)
}

#[test]
fn systemd_notify_gets_ready_when_live_and_stopping_on_sigterm() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "n.txt", b"notify\n".to_vec());
    let sock_path = s.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut p = spawn_foreground(&o, &s, &[], &[("NOTIFY_SOCKET", &sock_path)]);
    let recv = |sock: &UnixDatagram, p: &Mount| {
        let mut buf = [0u8; 4096];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}):\n{}", p.log_text()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    let msg = recv(&sock, &p);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(msg.contains("STATUS=serving bkt at "), "{msg:?}");
    // READY=1 is sent only once the mount is live.
    assert!(is_mounted(&p.mnt), "READY=1 before the mount was live");
    assert_eq!(std::fs::read(p.mnt.join("n.txt")).unwrap(), b"notify\n");

    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    let msg = recv(&sock, &p);
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
    assert_eq!(p.wait_exit(), 0);
    assert!(!is_mounted(&p.mnt));
}

#[test]
fn sighup_rereads_the_log_level_from_the_config_file() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "h.txt", b"hup\n".to_vec());
    let config = s.dir.path().join("orcafs.toml");
    std::fs::write(&config, "metadata_ttl = \"1s\"\n").unwrap();
    let log = s.dir.path().join("orcafs.log");
    let mut p = spawn_foreground(
        &o,
        &s,
        &[
            "--log-level",
            "warn",
            "--config",
            config.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
        ],
        &[],
    );
    wait_until("the mount", Duration::from_secs(30), || is_mounted(&p.mnt));
    assert_eq!(std::fs::read(p.mnt.join("h.txt")).unwrap(), b"hup\n");
    let before = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !before.contains("DEBUG") && !before.contains(" INFO "),
        "warn level logs no info or debug lines:\n{before}"
    );

    std::fs::write(&config, "metadata_ttl = \"1s\"\nlog_level = \"debug\"\n").unwrap();
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(p.pid() as i32, libc::SIGHUP) };
    wait_until("a debug line after SIGHUP", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("DEBUG"))
    });
    assert!(p.alive(), "SIGHUP must not end the process");
    assert!(is_mounted(&p.mnt));
    // Reads go on, now logged at debug.
    assert_eq!(std::fs::read(p.mnt.join("h.txt")).unwrap(), b"hup\n");

    // SAFETY: as above.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    assert_eq!(p.wait_exit(), 0);
}

#[test]
fn sigkill_leaves_a_mount_umount_l_clears_and_the_cache_recovers() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(12 * CHUNK + 99, 31);
    o.put_object(BUCKET, "big.bin", data.clone());
    let t = Target::of(&o);
    let mnt = s.path("mnt");
    let cache = s.path("cache");
    let mut m = Mount::start(&t, BUCKET, &mnt, &cache, &["--readahead-chunks", "0"]);

    // Warm the first chunks, then stall the origin so a read is in flight when we kill.
    let f = std::fs::File::open(m.path("big.bin")).unwrap();
    let mut head = vec![0u8; 4 * CHUNK];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, data[..4 * CHUNK]);
    drop(f);
    wait_until(
        "commits of the warm chunks",
        Duration::from_secs(10),
        || cached_chunks(&cache) >= 4,
    );
    o.faults()
        .stall_next_bodies(1000, 1000, Duration::from_secs(60));
    let path = m.path("big.bin");
    let reader = std::thread::spawn(move || {
        let f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; CHUNK];
        f.read_exact_at(&mut buf, 8 * CHUNK as u64)
    });
    wait_until("a stalled origin GET", Duration::from_secs(10), || {
        o.stats().get_requests > 4
    });
    std::thread::sleep(Duration::from_millis(200));

    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGKILL) };
    assert_eq!(m.wait_exit(), -1, "killed by a signal");
    let read = reader.join().expect("reader thread");
    assert!(read.is_err(), "the in-flight read fails, it does not hang");

    // The kernel keeps the dead mount until it is cleared.
    assert!(is_mounted(&mnt), "a killed FUSE daemon leaves its mount");
    let err = std::fs::metadata(mnt.join("big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let out = orcafs(&["status", mnt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let status_err = String::from_utf8_lossy(&out.stderr);
    assert!(
        status_err.contains("is an orcafs mount, but no process answers")
            && status_err.contains("umount -l"),
        "{status_err}"
    );
    run("umount", &["-l", mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));

    // What a crash at a worse moment leaves: a half-written temp file, and (after a power
    // loss, say) an object's data file cut short. Neither may ever be served.
    // (orcafs's own temp name: the version id in hex, a dot, 16 hex digits.)
    let temp_name = format!("{}.0123456789abcdef", "de".repeat(32));
    std::fs::write(cache.join("tmp").join(&temp_name), b"half").unwrap();
    let victim = cached_data_files(&cache)[0].clone();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 100).unwrap();
    drop(f);
    let out = orcafs(&["cache", "verify", "--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(victim.to_str().unwrap()),
        "{}",
        text(&out)
    );

    o.faults().clear();
    let m = Mount::start(&t, BUCKET, &mnt, &cache, &[]);
    assert_eq!(
        std::fs::read_dir(cache.join("tmp")).unwrap().count(),
        0,
        "temp files swept at start"
    );
    assert_eq!(sha256sum(&m.path("big.bin")), sha256_hex(&data));
    assert!(
        m.log_text().contains("temp_removed=1"),
        "start-up reports the swept temp file:\n{}",
        m.log_text()
    );
    assert_eq!(m.unmount(), 0);
    let out = orcafs(&["cache", "verify", "--cache-dir", cache.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "every chunk good again: {}",
        text(&out)
    );
}

#[test]
fn cache_commands_stats_verify_evict_clear() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let a = pattern(4 * CHUNK, 41);
    let b = pattern(2 * CHUNK + 5, 42);
    o.put_object(BUCKET, "a.bin", a.clone());
    o.put_object(BUCKET, "b.bin", b.clone());
    let cache = s.path("cache");
    let m = Mount::start(&Target::of(&o), BUCKET, &s.path("mnt"), &cache, &[]);
    assert_eq!(sha256sum(&m.path("a.bin")), sha256_hex(&a));
    assert_eq!(sha256sum(&m.path("b.bin")), sha256_hex(&b));
    assert_eq!(m.unmount(), 0);
    let dir = cache.to_str().unwrap();

    let out = orcafs(&["cache", "stats", "--cache-dir", dir]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("chunks       7 ("), "{stdout}");
    assert!(stdout.contains("objects      2"), "{stdout}");

    let out = orcafs(&["cache", "verify", "--cache-dir", dir]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("7 good"));

    // One flipped byte in the data of one object (its last byte, in its last chunk).
    let victim = cached_data_files(&cache)[0].clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&victim)
        .unwrap();
    let at = f.metadata().unwrap().len() - 1;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 1], at).unwrap();
    drop(f);
    let out = orcafs(&["cache", "verify", "--cache-dir", dir]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains(&format!(
            "bad  {}: chunks failing their CRC",
            victim.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("6 good"), "{stdout}");
    let out = orcafs(&["cache", "verify", "--repair", "--cache-dir", dir]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        victim.exists(),
        "--repair marks the bad blocks absent, keeps the rest"
    );
    let out = orcafs(&["cache", "verify", "--cache-dir", dir]);
    assert!(
        out.status.success(),
        "every block left is good: {}",
        text(&out)
    );

    // Evict whole objects, least recently used first, until the rest fits: a.bin is 1 MiB and
    // b.bin 512 KiB, so one of them goes, whichever was used last stays.
    let before = cache_stats(&cache);
    let out = orcafs(&[
        "cache",
        "evict",
        "--cache-dir",
        dir,
        "--max-size",
        "1100KiB",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let after = cache_stats(&cache);
    assert!(after.bytes <= 1100 * 1024, "{} bytes left", after.bytes);
    assert_eq!((before.objects, after.objects), (2, 1), "{}", text(&out));

    let temp_name = format!("{}.0123456789abcdef", "ab".repeat(32));
    std::fs::write(cache.join("tmp").join(&temp_name), b"x").unwrap();
    // A file orcafs did not write is kept, even in its own tmp/.
    std::fs::write(cache.join("tmp/leftover"), b"x").unwrap();
    let out = orcafs(&["cache", "clear", "--cache-dir", dir]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(cached_data_files(&cache).is_empty());
    assert_eq!(cached_chunks(&cache), 0);
    let left: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["leftover"], "only the foreign file is left");

    // The cache still works after all that.
    let m = Mount::start(&Target::of(&o), BUCKET, &s.path("mnt"), &cache, &[]);
    assert_eq!(sha256sum(&m.path("a.bin")), sha256_hex(&a));
    assert_eq!(m.unmount(), 0);

    // Not a cache: refused, nothing deleted.
    let other = s.path("not-a-cache");
    std::fs::write(other.join("keep"), b"k").unwrap();
    let out = orcafs(&["cache", "clear", "--cache-dir", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an orcafs cache directory"));
    assert!(other.join("keep").exists());
}

#[test]
fn status_of_a_path_nothing_serves_is_a_clear_error() {
    let s = Scratch::new();
    let dir = s.path("plain");
    let out = orcafs(&["status", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("orcafs: error: no orcafs process serves"),
        "{err}"
    );
}

/// `orcafs status` against a live mount (served by mount.rs through `control::serve`).
#[test]
fn status_shows_origin_cache_and_hit_ratio_of_a_live_mount() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(2 * CHUNK, 51);
    o.put_object(BUCKET, "s.bin", data.clone());
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &[],
    );
    assert_eq!(read_all(&m.path("s.bin")), data);
    let sock = orcafs::control::socket_path(&m.mnt);
    assert!(sock.exists(), "the mount serves {}", sock.display());
    let out = orcafs(&["status", m.mnt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains(&o.endpoint()), "{stdout}");
    assert!(stdout.contains("bucket bkt"), "{stdout}");
    assert!(stdout.contains("hit ratio"), "{stdout}");
    assert!(stdout.contains("peers"), "{stdout}");
    let out = orcafs(&["status", "--json", m.mnt.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["origin"]["bucket"], "bkt");
    assert!(doc["cache"]["used_bytes"].as_u64().unwrap() > 0);

    // A running mount's cache is not cleared from under it without --force.
    let out = orcafs(&[
        "cache",
        "clear",
        "--cache-dir",
        s.path("cache").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by the mount"));
    assert_eq!(m.unmount(), 0);
    assert!(!sock.exists(), "the socket goes with the mount");
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    // The units' ExecStart= is the documented install path; verify needs it to exist.
    let installed = Path::new("/usr/local/bin/orcafs");
    if std::fs::metadata(installed).is_err() {
        // Absent, or a link left dangling by an earlier build directory.
        if std::fs::symlink_metadata(installed).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(installed).expect("remove a dangling /usr/local/bin/orcafs");
        }
        std::os::unix::fs::symlink(orcafs_bin(), installed).expect("install /usr/local/bin/orcafs");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for units in [
        &["mnt-orca.mount", "mnt-orca.automount"][..],
        &["orcafs@.service"][..],
    ] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(units.iter().map(|u| dir.join(u)))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("orcafs") || l.contains("mnt-orca"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {units:?}: {}",
            text(&out)
        );
    }
    // The example config file parses and validates (the mount then stops at the mount point).
    let out = Command::new(orcafs_bin())
        .args(["mount", "--config"])
        .arg(dir.join("orcafs.toml"))
        .args(["my-bucket", "/nonexistent-mnt", "--foreground"])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mount point /nonexistent-mnt does not exist"),
        "the example config parses: {err}"
    );
}
