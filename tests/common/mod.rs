//! Shared harness for the end-to-end tests: a real S3 server on 127.0.0.1, the real `orcafs`
//! binary mounted for real, and a guard that always unmounts.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use orcafs_devorigin::{DevOrigin, ACCESS_KEY, SECRET_KEY};

pub const KIB: usize = 1024;
/// Chunk size used by the tests: small, so edge cases need little data.
pub const CHUNK: usize = 256 * KIB;

pub fn orcafs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_orcafs")
}

/// Deterministic bytes that differ per seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A temp dir holding an s3s-fs root, a cache dir and mount points.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("orcafs-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

/// Starts a DevOrigin with a fresh root and one bucket.
pub fn origin(scratch: &Scratch, bucket: &str) -> DevOrigin {
    let o = DevOrigin::start(&scratch.path("s3root")).expect("start dev origin");
    o.create_bucket(bucket);
    o
}

/// Zeroes the origin's counts once it has had no request for 200 ms: a request orcafs sent and
/// then dropped (a lookup's HEAD, raced by its LIST) may still be on its way on a loaded machine.
pub fn reset_stats_when_quiet(o: &DevOrigin) {
    let mut seen = o.stats().requests;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = o.stats().requests;
        if now == seen {
            break;
        }
        seen = now;
    }
    o.reset_stats();
}

/// A loopback address nobody listens on right now (a `--metrics-addr`, a dead endpoint).
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A loopback port nobody listens on right now, for a listener that starts later. It is taken
/// below the kernel's ephemeral range: a port from that range (what binding port 0 gives) may
/// meanwhile become the source port of some process's outgoing connection, and then the
/// listener cannot bind it (a host of a test cluster exited before mounting).
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .clamp(2048, 61000);
    let below = 1024..low;
    loop {
        let port = fastrand::u16(below.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One sample of a mount's plain-HTTP `/metrics` (`name` with its labels, as written), if any.
pub fn metric_sample(addr: &str, name: &str) -> Option<f64> {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().unwrap())
}

/// Connection settings for any S3 server (DevOrigin or Garage).
#[derive(Clone, Debug)]
pub struct Target {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

impl Target {
    pub fn of(o: &DevOrigin) -> Target {
        Target {
            endpoint: o.endpoint(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
        }
    }
}

/// The `orcafs mount` command for a target, with the test environment.
pub fn mount_command(
    t: &Target,
    source: &str,
    mnt: &Path,
    cache: &Path,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(orcafs_bin());
    c.arg("mount")
        .arg(source)
        .arg(mnt)
        .args(["--endpoint-url", &t.endpoint, "--force-path-style"])
        .arg("--cache-dir")
        .arg(cache);
    // Tests use small chunks unless they name a size.
    if !extra.contains(&"--chunk-size") {
        c.args(["--chunk-size", "256KiB"]);
    }
    c.args(["--log-level", "info,orcafs=debug"])
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", &t.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &t.secret_key)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL")
        .stdin(Stdio::null());
    c
}

/// `source` of `o` mounted at the scratch's `mnt` with its cache in `cache`.
pub fn mount_in(scratch: &Scratch, o: &DevOrigin, source: &str, extra: &[&str]) -> Mount {
    Mount::start(
        &Target::of(o),
        source,
        &scratch.path("mnt"),
        &scratch.path("cache"),
        extra,
    )
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` once `limit` has passed.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The names in directory `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

pub fn is_mounted(p: &Path) -> bool {
    let abs = p.canonicalize().unwrap_or_else(|_| p.to_owned());
    orcafs::mount::is_mount_point(&abs)
}

/// A live foreground `orcafs mount`; dropping it unmounts and reaps the process.
pub struct Mount {
    pub mnt: PathBuf,
    pub cache: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mount {
    pub fn start(t: &Target, source: &str, mnt: &Path, cache: &Path, extra: &[&str]) -> Mount {
        let log = cache.with_extension("log");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = mount_command(t, source, mnt, cache, extra)
            .arg("--foreground")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn orcafs");
        let mut m = Mount {
            mnt: mnt.to_owned(),
            cache: cache.to_owned(),
            child: Some(child),
            log,
        };
        m.wait_mounted();
        m
    }

    /// Takes charge of an `orcafs mount --foreground` started by the caller (its own flags or
    /// environment); does not wait for the mount.
    pub fn adopt(child: Child, mnt: &Path, cache: &Path, log: &Path) -> Mount {
        Mount {
            mnt: mnt.to_owned(),
            cache: cache.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// The process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if is_mounted(&self.mnt) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "orcafs exited with {status} before mounting:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("orcafs did not mount within 30 s:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Unmounts with `umount` and waits for the process to exit; returns its exit code.
    pub fn unmount(mut self) -> i32 {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "umount failed:\n{}", self.log_text());
        self.wait_exit()
    }

    /// Sends a signal and waits for the process to exit; returns its exit code.
    pub fn signal(mut self, sig: i32) -> i32 {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> i32 {
        let mut child = self.child.take().expect("child");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("orcafs did not exit within 20 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a program, asserting success; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = run_output(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn run_output(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// `sha256sum FILE` through the real program.
pub fn sha256sum(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().expect("utf8 path")]);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

pub fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// Permission bits of `p` (not following a symlink).
pub fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// A TLS client that accepts any server certificate, as `curl -k` or a Prometheus job with
/// `insecure_skip_verify` does: enough to scrape a cluster listener without its secret.
pub fn insecure_tls_client() -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AcceptAny(rustls::crypto::WebPkiSupportedAlgorithms);
    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algs = provider.signature_verification_algorithms;
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAny(algs)))
            .with_no_client_auth(),
    )
}

/// `GET path` over TLS from a cluster listener (certificate not checked, as `curl -k`); the
/// whole response, head and body. Empty when the connection or handshake fails.
pub fn https_get(addr: &str, path: &str) -> String {
    use std::io::Write as _;
    let Ok(tcp) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let name = rustls::pki_types::ServerName::try_from(orcafs::cluster::DERIVED_SERVER_NAME)
        .expect("a valid name");
    let Ok(conn) = rustls::ClientConnection::new(insecure_tls_client(), name) else {
        return String::new();
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    if write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return String::new();
    }
    let mut out = Vec::new();
    // The server may close without close_notify after `Connection: close`: keep what came.
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// What the local cache at `cache` holds, as `orcafs cache stats` counts it (zeros when there is
/// no cache there yet).
pub fn cache_stats(cache: &Path) -> orcafs::cachestore::admin::Stats {
    orcafs::cachestore::admin::stats(cache).unwrap_or_default()
}

/// Chunks with a block in the local cache at `cache`.
pub fn cached_chunks(cache: &Path) -> u64 {
    cache_stats(cache).chunks
}

/// The objects' data files in the local cache at `cache` (not their block maps), sorted.
pub fn cached_data_files(cache: &Path) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_none() {
                out.push(p);
            }
        }
    }
    let root = orcafs::cachestore::layout::find_root(cache)
        .ok()
        .flatten()
        .unwrap_or_else(|| cache.to_owned());
    let mut out = Vec::new();
    walk(&orcafs::cachestore::layout::objects_dir(&root), &mut out);
    out.sort();
    out
}

/// Twenty versions of a 3-chunk object, each a different size.
pub fn churn_versions() -> Vec<Vec<u8>> {
    (0..20)
        .map(|i| pattern(3 * CHUNK + i * 1000, 70 + i as u64))
        .collect()
}

/// Replaces the object at `path` with each of `versions[1..]` in turn (one every 150 ms,
/// through `put`) while this thread opens and reads it whole in a loop. Every `open` must
/// succeed (one that finds a newer version behind the name's inode makes the kernel look the
/// name up again), and every read must give one whole version, or ESTALE when the object was
/// replaced between the open and the read: never a mix.
pub fn open_and_read_while_replaced(
    path: &Path,
    versions: &[Vec<u8>],
    put: impl Fn(&[u8]) + Send + 'static,
) {
    let writer = {
        let versions = versions.to_vec();
        std::thread::spawn(move || {
            for v in &versions[1..] {
                std::thread::sleep(Duration::from_millis(150));
                put(v);
            }
            // Handed back, not dropped: it may own the origin, which the last reads still need.
            put
        })
    };
    let (mut opens, mut whole, mut stale) = (0, 0, 0);
    while !writer.is_finished() {
        let mut f = std::fs::File::open(path).expect("open never fails");
        opens += 1;
        let mut got = Vec::new();
        match f.read_to_end(&mut got) {
            Ok(_) => {
                assert!(versions.contains(&got), "{}", describe_mix(&got, versions));
                whole += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
                stale += 1;
            }
        }
    }
    drop(writer.join().unwrap());
    eprintln!("{opens} opens: {whole} whole versions, {stale} ESTALE reads");
    assert!(opens >= 20 && whole >= 10, "{opens} opens, {whole} whole");
}

/// What a read that is no single version is made of: its length, and per run of 4 KiB blocks
/// which versions it matches.
fn describe_mix(got: &[u8], versions: &[Vec<u8>]) -> String {
    let sized: Vec<usize> = (0..versions.len())
        .filter(|&i| versions[i].len() == got.len())
        .collect();
    let mut runs: Vec<(usize, Vec<usize>)> = Vec::new();
    for (b, block) in got.chunks(4096).enumerate() {
        let at = b * 4096;
        let from: Vec<usize> = (0..versions.len())
            .filter(|&i| versions[i].get(at..at + block.len()) == Some(block))
            .collect();
        match runs.last_mut() {
            Some((_, f)) if *f == from => {}
            _ => runs.push((at, from)),
        }
    }
    format!(
        "read {} bytes, the size of versions {sized:?}; (offset, versions it matches from there): {runs:?}",
        got.len()
    )
}
