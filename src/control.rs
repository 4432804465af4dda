//! control: how a running mount answers `orcafs status`.
//!
//! Each mount process serves a status document on a unix socket whose path derives from the
//! canonical mount point ([`socket_path`]): `/run/orcafs/<h>.sock` when running as root, else
//! `$XDG_RUNTIME_DIR/orcafs/<h>.sock` or `/tmp/orcafs-<uid>/<h>.sock`, where `<h>` is the first 16
//! hex digits of SHA-256 of the mount point path. The socket is mode 0600: only the mounting user
//! (and root) may ask.
//!
//! The protocol is deliberately trivial: connect, read one JSON document (terminated by a newline
//! and end of stream), done. Nothing is read from the client.
//!
//! The document ([`mount_report`] builds it) has this shape; consumers must ignore keys they do
//! not know, and producers may add keys:
//!
//! ```json
//! {
//!   "version": "0.1.0",                      // orcafs version of the serving process
//!   "pid": 1234,
//!   "uptime_secs": 3600,
//!   "mountpoint": "/mnt/orca",
//!   "origin": { "endpoint": "http://127.0.0.1:3900", "bucket": "bkt", "prefix": "",
//!               "origin_id": "http://127.0.0.1:3900" },   // endpoint null means AWS S3
//!   "cache": { "dir": "/var/cache/orcafs", "used_bytes": 123, "max_bytes": 10737418240,
//!              "chunk_size": 8388608 },   // dir is absolute; origin_id, bucket and chunk_size
//!                                         // name chunks (`orcafs warm` computes their keys)
//!   "metrics": { "disk_hits": 10, "disk_misses": 2, "origin_get_requests": 2, ... },
//!   "peers": [ { "addr": "10.0.0.2:7070", "state": "up" } ]   // empty without a cluster
//! }
//! ```

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::metrics::Metrics;

/// Builds the status document on each request.
pub type Report = Arc<dyn Fn() -> Value + Send + Sync>;

/// How long a client waits for the document, and a server for a slow reader.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The mount point as the kernel lists it: canonical when it can be resolved. A dead FUSE mount
/// (its process killed) cannot be stat'ed, so then only the parent is resolved.
pub fn canonical_mountpoint(mountpoint: &Path) -> PathBuf {
    if let Ok(p) = mountpoint.canonicalize() {
        return p;
    }
    let abs = if mountpoint.is_absolute() {
        mountpoint.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(mountpoint))
            .unwrap_or_else(|_| mountpoint.to_owned())
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent.canonicalize().map(|p| p.join(name)).unwrap_or(abs),
        _ => abs,
    }
}

/// Directory holding the status sockets of this user's mounts.
pub fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/orcafs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("orcafs"),
        None => PathBuf::from(format!("/tmp/orcafs-{uid}")),
    }
}

/// Where the process serving `mountpoint` listens (see the module docs).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let canonical = canonical_mountpoint(mountpoint);
    let digest = Sha256::digest(canonical.as_os_str().as_bytes());
    runtime_dir().join(format!("{}.sock", &hex::encode(digest)[..16]))
}

/// A listening status socket; dropping it stops the listener and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    ino: u64,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Remove the file only if it is still ours (not a successor's socket).
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves `report()` on a unix socket at `path` from a background thread.
///
/// A stale socket file (its process gone) is replaced; a socket another live process answers on
/// is an `AddrInUse` error, since that process serves the same mount point.
pub fn serve(path: &Path, report: Report) -> io::Result<ControlServer> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        // A directory someone else made (e.g. /tmp/orcafs-UID planted by another user) could
        // swap our socket for theirs: refuse it.
        let meta = std::fs::symlink_metadata(dir)?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a directory owned by uid {me}; not serving status there",
                    dir.display()
                ),
            ));
        }
        // The directory itself stays traversable; the socket is what is private.
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another orcafs process already serves status at {}",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let ino = std::fs::symlink_metadata(path)?.ino();
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("orcafs-control".into())
            .spawn(move || accept_loop(listener, report, stop))?
    };
    Ok(ControlServer {
        path: path.to_owned(),
        ino,
        stop,
        thread: Some(thread),
    })
}

fn accept_loop(listener: UnixListener, report: Report, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a timeout bounds how late a stop is noticed.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => answer(stream, &report),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!(error = %e, "status socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(mut stream: UnixStream, report: &Report) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let doc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| report()))
        .unwrap_or_else(|_| json!({ "error": "the status report panicked" }));
    let mut bytes = serde_json::to_vec(&doc).unwrap_or_default();
    bytes.push(b'\n');
    let _ = stream.write_all(&bytes);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Reads the status document from the socket at `path`.
pub fn query(path: &Path) -> io::Result<Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed status document: {e}"),
        )
    })
}

/// The status documents of every mount this user's processes serve. Sockets nobody listens on
/// any more (left by a killed process) are removed on the way.
pub fn live_reports() -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(runtime_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter_map(|p| match query(&p) {
            Ok(doc) => Some(doc),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&p);
                None
            }
            Err(_) => None,
        })
        .collect()
}

/// The report closure a mount serves: origin and cache from `cfg`, live counters from `metrics`,
/// cache use from `used_bytes` (e.g. `DiskStore::used_bytes`), and no peers.
pub fn mount_report(
    cfg: &Config,
    mountpoint: &Path,
    metrics: Arc<Metrics>,
    used_bytes: impl Fn() -> u64 + Send + Sync + 'static,
) -> Report {
    mount_report_with_peers(cfg, mountpoint, metrics, used_bytes, || json!([]))
}

/// [`mount_report`] with the cluster's peers: `peers()` returns a JSON array, one object per
/// peer, e.g. `{"addr": "10.0.0.2:7070", "state": "up"}` (`orcafs status` prints every field).
pub fn mount_report_with_peers(
    cfg: &Config,
    mountpoint: &Path,
    metrics: Arc<Metrics>,
    used_bytes: impl Fn() -> u64 + Send + Sync + 'static,
    peers: impl Fn() -> Value + Send + Sync + 'static,
) -> Report {
    let started = Instant::now();
    let origin = json!({
        "endpoint": cfg.endpoint_url,
        "bucket": cfg.bucket,
        "prefix": cfg.prefix,
        "origin_id": cfg.origin_id,
    });
    let mountpoint = mountpoint.to_string_lossy().into_owned();
    // Absolute, so a client in another working directory finds the chunk files.
    let cache_dir = std::path::absolute(&cfg.cache_dir)
        .unwrap_or_else(|_| cfg.cache_dir.clone())
        .to_string_lossy()
        .into_owned();
    let (max_bytes, chunk_size) = (cfg.cache_max_size, cfg.chunk_size);
    Arc::new(move || {
        let counters: serde_json::Map<String, Value> = metrics
            .snapshot()
            .into_iter()
            .map(|(name, _, v)| (name.to_string(), json!(v)))
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_secs": started.elapsed().as_secs(),
            "mountpoint": mountpoint,
            "origin": origin,
            "cache": {
                "dir": cache_dir,
                "used_bytes": used_bytes(),
                "max_bytes": max_bytes,
                "chunk_size": chunk_size,
            },
            "metrics": counters,
            "peers": peers(),
        })
    })
}

/// Human-readable rendering of a status document for `orcafs status`.
pub fn render(doc: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let metric = |name: &str| doc["metrics"][name].as_u64();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));

    line(&mut out, "mountpoint", s(&doc["mountpoint"]));
    let o = &doc["origin"];
    let endpoint = match &o["endpoint"] {
        Value::Null => "AWS S3".to_string(),
        v => s(v),
    };
    let prefix = o["prefix"].as_str().unwrap_or("");
    line(
        &mut out,
        "origin",
        format!(
            "{endpoint}  bucket {}{}",
            s(&o["bucket"]),
            if prefix.is_empty() {
                String::new()
            } else {
                format!("  prefix {prefix}")
            }
        ),
    );
    let c = &doc["cache"];
    let used = c["used_bytes"].as_u64().unwrap_or(0);
    let cache = match c["max_bytes"].as_u64() {
        Some(max) if max > 0 => format!(
            "{}  {} of {} ({:.1}%)",
            s(&c["dir"]),
            human_bytes(used),
            human_bytes(max),
            used as f64 * 100.0 / max as f64
        ),
        _ => format!("{}  {}", s(&c["dir"]), human_bytes(used)),
    };
    line(&mut out, "cache", cache);
    let ratio = |hits: Option<u64>, misses: Option<u64>| match (hits, misses) {
        (Some(h), Some(m)) if h + m > 0 => Some(format!(
            "{:.1}% ({h} hits, {m} misses)",
            h as f64 * 100.0 / (h + m) as f64
        )),
        (Some(_), Some(_)) => Some("n/a (no chunk reads yet)".to_string()),
        _ => None,
    };
    if let Some(r) = ratio(metric("disk_hits"), metric("disk_misses")) {
        line(&mut out, "hit ratio", r);
    }
    // The shared store's ratio only when one is in use.
    if metric("shared_hits").unwrap_or(0) + metric("shared_misses").unwrap_or(0) > 0 {
        if let Some(r) = ratio(metric("shared_hits"), metric("shared_misses")) {
            line(&mut out, "shared hits", r);
        }
    }
    let peers = doc["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        line(&mut out, "peers", "none".to_string());
    } else {
        for (i, p) in peers.iter().enumerate() {
            let text = match p {
                Value::Object(m) => m
                    .iter()
                    .map(|(k, v)| format!("{k}={}", s(v)))
                    .collect::<Vec<_>>()
                    .join(" "),
                other => s(other),
            };
            line(&mut out, if i == 0 { "peers" } else { "" }, text);
        }
    }
    let mut process = Vec::new();
    if let Some(pid) = doc["pid"].as_u64() {
        process.push(format!("pid {pid}"));
    }
    if let Some(v) = doc["version"].as_str() {
        process.push(format!("orcafs {v}"));
    }
    if let Some(up) = doc["uptime_secs"].as_u64() {
        process.push(format!(
            "up {}",
            humantime::format_duration(Duration::from_secs(up))
        ));
    }
    if !process.is_empty() {
        line(&mut out, "process", process.join(", "));
    }
    if let Some(m) = doc["metrics"].as_object() {
        out.push_str("metrics\n");
        let width = m.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, v) in m {
            out.push_str(&format!("  {k:<width$}  {}\n", s(v)));
        }
    }
    out
}

/// `1.5 GiB` style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> Report {
        Arc::new(|| {
            json!({
                "mountpoint": "/mnt/orca",
                "origin": { "endpoint": "http://127.0.0.1:9000", "bucket": "bkt", "prefix": "a/" },
                "cache": { "dir": "/var/cache/orcafs", "used_bytes": 3u64 << 30, "max_bytes": 10u64 << 30 },
                "metrics": { "disk_hits": 3, "disk_misses": 1, "origin_get_requests": 1 },
                "peers": [],
            })
        })
    }

    #[test]
    fn serve_query_and_drop_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/s.sock");
        let server = serve(&path, fake()).unwrap();
        let doc = query(&path).unwrap();
        assert_eq!(doc["origin"]["bucket"], "bkt");
        assert_eq!(query(&path).unwrap(), doc, "answers more than once");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let second = serve(&path, fake());
        assert_eq!(
            second.err().map(|e| e.kind()),
            Some(io::ErrorKind::AddrInUse)
        );

        drop(server);
        assert!(!path.exists(), "socket removed on drop");
        assert!(query(&path).is_err());
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(UnixListener::bind(&path).unwrap()); // a crashed process's leftover
        assert!(path.exists());
        assert_eq!(
            query(&path).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused,
            "what live_reports prunes"
        );
        let _server = serve(&path, fake()).unwrap();
        assert_eq!(query(&path).unwrap()["mountpoint"], "/mnt/orca");
    }

    #[test]
    fn socket_path_is_stable_and_per_mountpoint() {
        let a = socket_path(Path::new("/mnt/a"));
        assert_eq!(a, socket_path(Path::new("/mnt/a")));
        assert_ne!(a, socket_path(Path::new("/mnt/b")));
        assert_eq!(a.parent().unwrap(), runtime_dir());
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name.len(), 16 + ".sock".len());
    }

    #[test]
    fn render_shows_hit_ratio_and_cache_use() {
        let text = render(&fake()());
        assert!(
            text.contains("hit ratio    75.0% (3 hits, 1 misses)"),
            "{text}"
        );
        assert!(text.contains("3.0 GiB of 10.0 GiB (30.0%)"), "{text}");
        assert!(text.contains("bucket bkt  prefix a/"), "{text}");
        assert!(text.contains("peers        none"), "{text}");
        assert!(text.contains("origin_get_requests"), "{text}");
    }

    #[test]
    fn mount_report_has_the_documented_shape() {
        let args = crate::config::MountArgs {
            source: "s3://bkt/pre/".into(),
            mountpoint: "/mnt/x".into(),
            endpoint_url: Some("http://127.0.0.1:9000".into()),
            cache_dir: Some("/var/cache/orcafs".into()),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        let metrics = Arc::new(Metrics::default());
        Metrics::inc(&metrics.disk_hits);
        let report = mount_report_with_peers(
            &cfg,
            Path::new("/mnt/x"),
            metrics,
            || 42,
            || json!([{ "addr": "10.0.0.2:7070", "state": "up" }]),
        );
        let doc = report();
        assert_eq!(doc["origin"]["endpoint"], "http://127.0.0.1:9000");
        assert_eq!(doc["origin"]["bucket"], "bkt");
        assert_eq!(doc["origin"]["prefix"], "pre/");
        assert_eq!(doc["mountpoint"], "/mnt/x");
        assert_eq!(doc["cache"]["used_bytes"], 42);
        assert_eq!(doc["cache"]["max_bytes"], cfg.cache_max_size);
        assert_eq!(doc["cache"]["chunk_size"], cfg.chunk_size);
        assert_eq!(doc["origin"]["origin_id"], cfg.origin_id);
        let relative = crate::config::MountArgs {
            source: "bkt".into(),
            mountpoint: "/mnt/x".into(),
            cache_dir: Some("rel/cache".into()),
            ..Default::default()
        };
        let cfg_rel = relative.resolve().unwrap();
        let doc_rel = mount_report(&cfg_rel, Path::new("/mnt/x"), Arc::default(), || 0)();
        let dir = doc_rel["cache"]["dir"].as_str().unwrap();
        assert!(
            dir.starts_with('/') && dir.ends_with("/rel/cache"),
            "the cache dir is reported absolute: {dir}"
        );
        assert_eq!(doc["metrics"]["disk_hits"], 1);
        assert_eq!(doc["pid"], std::process::id());
        let text = render(&doc);
        assert!(
            text.contains("peers        addr=10.0.0.2:7070 state=up"),
            "{text}"
        );
        assert!(
            text.contains("hit ratio    100.0% (1 hits, 0 misses)"),
            "{text}"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }
}
