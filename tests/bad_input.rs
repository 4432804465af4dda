//! Bad input: each case exits non-zero with one clear sentence and leaves no mount behind.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const BUCKET: &str = "bkt";

/// Runs `orcafs mount` in the foreground (so a hang would show) and returns (code, stderr).
fn mount_fails(
    t: &Target,
    source: &str,
    mnt: &Path,
    cache: &Path,
    extra: &[&str],
) -> (i32, String) {
    let mut cmd = mount_command(t, source, mnt, cache, extra);
    cmd.arg("--foreground");
    command_fails(cmd, mnt)
}

/// Runs an `orcafs mount` that must fail; returns (code, stderr). Panics if it left a mount.
fn command_fails(mut cmd: Command, mnt: &Path) -> (i32, String) {
    let out = cmd.output().expect("run orcafs");
    if is_mounted(mnt) {
        let _ = run_output("umount", &["-l", mnt.to_str().unwrap()]);
        panic!("a failed mount left a mount behind at {}", mnt.display());
    }
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), err)
}

fn assert_clear(code: i32, stderr: &str, needle: &str) {
    assert_ne!(code, 0, "must fail: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("orcafs: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(lines.len(), 1, "one error sentence, got:\n{stderr}");
    assert!(
        lines[0].contains(needle),
        "{needle:?} not in {:?}",
        lines[0]
    );
}

#[test]
fn each_bad_input_gets_one_clear_error_and_no_mount() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let t = Target::of(&o);
    let mnt = s.path("mnt");
    let cache = s.path("cache");

    let (c, e) = mount_fails(&t, "no-such-bucket", &mnt, &cache, &[]);
    assert_clear(c, &e, "bucket \"no-such-bucket\" does not exist");

    let bad_creds = Target {
        secret_key: "wrong".into(),
        ..t.clone()
    };
    let (c, e) = mount_fails(&bad_creds, BUCKET, &mnt, &cache, &[]);
    assert_clear(c, &e, "check the credentials");

    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let unreachable = Target {
        endpoint: dead,
        ..t.clone()
    };
    let (c, e) = mount_fails(
        &unreachable,
        BUCKET,
        &mnt,
        &cache,
        &["--origin-max-attempts", "2"],
    );
    assert_clear(c, &e, "cannot reach the origin");

    let (c, e) = mount_fails(&t, BUCKET, &s.dir.path().join("missing"), &cache, &[]);
    assert_clear(c, &e, "does not exist");

    let file = s.dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let (c, e) = mount_fails(&t, BUCKET, &file, &cache, &[]);
    assert_clear(c, &e, "is not a directory");

    let toml = s.dir.path().join("bad.toml");
    std::fs::write(
        &toml,
        "region = \"us-east-1\"\nchunk_size = \"8MiB\"\ncache_dir = [\n",
    )
    .unwrap();
    let (c, e) = mount_fails(
        &t,
        BUCKET,
        &mnt,
        &cache,
        &["--config", toml.to_str().unwrap()],
    );
    assert_clear(c, &e, "line 3");

    let unknown = s.dir.path().join("unknown.toml");
    std::fs::write(&unknown, "chunk_sise = \"8MiB\"\n").unwrap();
    let (c, e) = mount_fails(
        &t,
        BUCKET,
        &mnt,
        &cache,
        &["--config", unknown.to_str().unwrap()],
    );
    assert_clear(c, &e, "unknown field `chunk_sise`");

    let (c, e) = mount_fails(&t, BUCKET, &mnt, &cache, &["--cache-max-size", "lots"]);
    assert_clear(c, &e, "invalid cache max size \"lots\"");

    let (c, e) = mount_fails(&t, BUCKET, &mnt, &cache, &["--metadata-ttl", "a while"]);
    assert_clear(c, &e, "invalid metadata TTL \"a while\"");

    let (c, e) = mount_fails(&t, "Not_A_Bucket!", &mnt, &cache, &[]);
    assert_clear(c, &e, "invalid source");
}

#[test]
fn dangerous_cache_dirs_are_refused_before_anything_is_made_or_mounted() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let t = Target::of(&o);
    let mnt = s.path("mnt");
    let home = s.path("home");
    // What orcafs would make in a directory it used; none of it may appear.
    let would_make = |dir: &Path| {
        ["orcafs", ".orcafs-cache", "chunks", "orcafs.log"].map(|name| dir.join(name).exists())
    };
    let dirs = [
        (
            Path::new("/"),
            "will not use / as the cache directory: it is the root directory",
        ),
        (home.as_path(), "it is a home directory"),
        (Path::new("/root"), "it is a home directory"),
        (Path::new("/etc"), "it is a system directory"),
        (Path::new("/tmp"), "every user may write to it"),
    ];
    let before: Vec<_> = dirs.iter().map(|(d, _)| would_make(d)).collect();
    for (dir, needle) in dirs {
        let mut cmd = mount_command(&t, BUCKET, &mnt, dir, &[]);
        // The invoking user's home, as orcafs sees it.
        cmd.env("HOME", &home).arg("--foreground");
        let (c, e) = command_fails(cmd, &mnt);
        assert_clear(c, &e, needle);
        assert!(e.contains("point --cache-dir at"), "says what to do: {e}");
    }
    // Detached, the refusal comes from the background process, through the parent.
    let mut cmd = mount_command(&t, BUCKET, &mnt, Path::new("/"), &[]);
    cmd.env("HOME", &home);
    let (c, e) = command_fails(cmd, &mnt);
    assert_clear(c, &e, "it is the root directory");
    let after: Vec<_> = dirs.iter().map(|(d, _)| would_make(d)).collect();
    assert_eq!(before, after, "nothing made in a refused directory");
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
}

#[test]
fn second_mount_on_the_same_mountpoint_is_refused() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let t = Target::of(&o);
    let mnt = s.path("mnt");
    let m = Mount::start(&t, BUCKET, &mnt, &s.path("cache"), &[]);
    let out = mount_command(&t, BUCKET, &mnt, &s.path("cache2"), &[])
        .arg("--foreground")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_clear(
        out.status.code().unwrap_or(-1),
        &err,
        "already a mount point",
    );
    assert!(is_mounted(&mnt), "the first mount is untouched");
    assert_eq!(m.unmount(), 0);
}

#[test]
fn help_explains_every_option() {
    let out = run(orcafs_bin(), &["mount", "--help"]);
    let help = String::from_utf8(out).unwrap();
    for flag in [
        "--config",
        "--endpoint-url",
        "--region",
        "--force-path-style",
        "--cache-dir",
        "--cache-max-size",
        "--chunk-size",
        "--metadata-ttl",
        "--negative-ttl",
        "--uid",
        "--gid",
        "--file-mode",
        "--dir-mode",
        "--allow-other",
        "--foreground",
        "--log-level",
    ] {
        assert!(help.contains(flag), "{flag} missing from mount --help");
    }
    let top = String::from_utf8(run(orcafs_bin(), &["--help"])).unwrap();
    assert!(top.contains("mount"));
}
