//! A single-node [Garage](https://garagehq.deuxfleurs.fr) S3 server on 127.0.0.1, started from
//! the installed `garage` binary for tests that want a second, independent S3 implementation
//! next to [`DevOrigin`](crate::DevOrigin).
//!
//! [`Garage::start`] writes a config (LMDB metadata, replication factor 1, region
//! [`REGION`](crate::REGION), loopback-only ports picked at random) under a directory the caller
//! owns, runs `garage server` with its log in `<dir>/garage.log`, assigns and applies a one-node
//! layout, and imports a random access key. Dropping the [`Garage`] kills the server; the
//! directory is left to the caller (normally a tempdir). Bucket creation goes through the
//! `garage` CLI, objects through the S3 API.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::error::DisplayErrorContext;
use bytes::Bytes;
use tokio::runtime::Runtime;

/// Environment variable naming the garage binary to use.
pub const GARAGE_BIN_ENV: &str = "ORCAFS_GARAGE_BIN";

/// How long the server may take to answer, and any one CLI call to finish.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between readiness probes.
const POLL: Duration = Duration::from_millis(25);
/// Starts tried when another process takes one of our ports between picking and binding.
const PORT_ATTEMPTS: usize = 3;
/// Lines of the server log quoted in error messages.
const LOG_TAIL_LINES: usize = 30;

/// A single-node Garage server on 127.0.0.1 started for a test; killed (and its dir left to the
/// caller's tempdir) on Drop.
pub struct Garage {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3_addr: SocketAddr,
    access_key: String,
    secret_key: String,
    child: Child,
    runtime: Option<Runtime>,
    helper: aws_sdk_s3::Client,
}

impl Garage {
    /// The garage binary: $ORCAFS_GARAGE_BIN if set, else `garage` found on PATH, else
    /// /usr/local/bin/garage or ~/.cargo/bin/garage if present.
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(GARAGE_BIN_ENV).filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
        on_path
            .into_iter()
            .chain([PathBuf::from("/usr/local/bin")])
            .chain(home)
            .map(|d| d.join("garage"))
            .find(|p| is_executable(p))
    }

    /// Writes a config under `dir`, starts `garage server`, waits until it answers, assigns and
    /// applies the layout, and imports an access key. `dir` should be fresh (a tempdir).
    pub fn start(dir: &Path) -> io::Result<Garage> {
        let bin = Self::binary().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no garage binary: set {GARAGE_BIN_ENV} or put `garage` on PATH"),
            )
        })?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let rpc_secret = random_hex(32)?;
        let mut attempt = 1;
        loop {
            let mut garage = Self::spawn(&bin, &dir, &rpc_secret)?;
            match garage.come_up() {
                Ok(()) => return Ok(garage),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < PORT_ATTEMPTS => {
                    drop(garage);
                    wipe_state(&dir)?;
                    attempt += 1;
                }
                Err(e) => return Err(garage.failure(e)),
            }
        }
    }

    /// `http://127.0.0.1:PORT` (the S3 API).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3_addr)
    }

    /// The access key ID every bucket made by [`Garage::create_bucket`] allows.
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The secret of [`Garage::access_key`].
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The server process, for its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// A new SDK client for this server: our key, [`REGION`](crate::REGION), path-style,
    /// checksums only when required, no IMDS or environment lookups.
    pub fn client(&self) -> aws_sdk_s3::Client {
        crate::client_for(&self.endpoint(), &self.access_key, &self.secret_key)
    }

    /// The S3 API's address.
    pub fn s3_addr(&self) -> SocketAddr {
        self.s3_addr
    }

    /// Creates `bucket` and allows our key to read, write and own it. Panics on error (test
    /// helper).
    pub fn create_bucket(&self, bucket: &str) {
        self.try_create_bucket(bucket)
            .unwrap_or_else(|e| panic!("garage create_bucket {bucket}: {e}"));
    }

    /// [`Garage::create_bucket`] for callers that report errors instead of panicking (the
    /// benchmark); the error quotes the tail of the server log.
    pub fn try_create_bucket(&self, bucket: &str) -> io::Result<()> {
        let key = self.access_key.as_str();
        let allow = [
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", key,
        ];
        self.cli(["bucket", "create", bucket])
            .and_then(|_| self.cli(allow))
            .map(drop)
            .map_err(|e| self.failure(e))
    }

    /// Puts an object through the S3 API. Panics on error (test helper).
    pub fn put_object(&self, bucket: &str, key: &str, body: impl Into<Bytes>) {
        let body: Bytes = body.into();
        let req = self
            .helper
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into());
        self.block_on(req.send()).unwrap_or_else(|e| {
            let e = io::Error::other(DisplayErrorContext(e).to_string());
            panic!("garage put_object {bucket}/{key}: {}", self.failure(e))
        });
    }

    /// Writes the config with fresh ports and spawns `garage server`.
    fn spawn(bin: &Path, dir: &Path, rpc_secret: &str) -> io::Result<Garage> {
        let rpc_addr = free_loopback_addr()?;
        let s3_addr = free_loopback_addr()?;
        // Garage key IDs are `GK` and 24 hex digits; secrets 64 hex digits.
        let access_key = format!("GK{}", random_hex(12)?);
        let secret_key = random_hex(32)?;
        let helper = crate::client_for(&format!("http://{s3_addr}"), &access_key, &secret_key);
        let runtime = helper_runtime()?;
        let config = dir.join("garage.toml");
        write_private(&config, &config_text(dir, rpc_addr, s3_addr, rpc_secret))?;
        let log = dir.join("garage.log");
        let logf = std::fs::File::create(&log)?;
        let child = garage_command(bin, &config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .map_err(|e| context(e, format!("cannot run {} server", bin.display())))?;
        Ok(Garage {
            bin: bin.to_owned(),
            config,
            log,
            s3_addr,
            access_key,
            secret_key,
            child,
            runtime: Some(runtime),
            helper,
        })
    }

    /// Waits until the server answers, then sets it up.
    fn come_up(&mut self) -> io::Result<()> {
        self.wait_answering()?;
        self.assign_layout()?;
        self.import_key()?;
        self.wait_s3_ready()
    }

    /// Polls `garage status` until the server answers over RPC.
    fn wait_answering(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.ensure_healthy()?;
            let probe = self.cli(["status"]);
            match probe {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let why = format!("garage server did not answer in {STARTUP_TIMEOUT:?}: {e}");
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Gives this node a role and applies layout version 1.
    fn assign_layout(&self) -> io::Result<()> {
        let out = self.cli(["node", "id", "-q"])?;
        let node_id = out.trim().split('@').next().unwrap_or_default();
        if node_id.is_empty() {
            return Err(io::Error::other(format!("garage node id printed {out:?}")));
        }
        self.cli(["layout", "assign", "-z", "dc1", "-c", "1G", node_id])?;
        self.cli(["layout", "apply", "--version", "1"])?;
        Ok(())
    }

    /// Imports our random access key.
    fn import_key(&self) -> io::Result<()> {
        let (id, secret) = (self.access_key.as_str(), self.secret_key.as_str());
        self.cli(["key", "import", "--yes", "-n", "orcafs-test", id, secret])?;
        Ok(())
    }

    /// Waits until the S3 API accepts our key (ListBuckets succeeds).
    fn wait_s3_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.ensure_healthy()?;
            match self.block_on(self.helper.list_buckets().send()) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let why = format!("garage S3 API not ready: {}", DisplayErrorContext(e));
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Runs `garage -c CONFIG ARGS...`; its stdout, or an error quoting the command and its
    /// stderr.
    fn cli<const N: usize>(&self, args: [&str; N]) -> io::Result<String> {
        let shown = format!(
            "{} -c {} {}",
            self.bin.display(),
            self.config.display(),
            args.join(" ")
        );
        let mut cmd = garage_command(&self.bin, &self.config);
        cmd.args(args);
        let (status, stdout, stderr) = run_with_timeout(cmd, STARTUP_TIMEOUT)
            .map_err(|e| context(e, format!("cannot run `{shown}`")))?;
        if status.success() {
            return Ok(stdout);
        }
        Err(io::Error::other(format!(
            "`{shown}` failed ({status}): {}",
            stderr.trim()
        )))
    }

    /// An error if the server has exited or could not bind a port we picked (another process
    /// took it meanwhile: Garage then dies, or runs on without its S3 API).
    fn ensure_healthy(&mut self) -> io::Result<()> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if log.contains("Address already in use") {
            let why = "a port picked for garage was taken before it could bind it";
            return Err(io::Error::new(io::ErrorKind::AddrInUse, why));
        }
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(io::Error::other(format!("garage server exited ({status})"))),
        }
    }

    /// `e` with the tail of the server log appended.
    fn failure(&self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{e}\n{}", self.log_tail()))
    }

    /// The last lines of the server log, without backtrace frames.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !is_backtrace_frame(l)).collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "--- tail of {} ---\n{}",
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Runs `fut` on the helper runtime and waits for it; works from any thread.
    fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("garage helper runtime");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .expect("garage helper task died (panicked or the runtime shut down)")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Garage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Garage")
            .field("s3_addr", &self.s3_addr)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn config_text(dir: &Path, rpc: SocketAddr, s3: SocketAddr, rpc_secret: &str) -> String {
    let meta = dir.join("meta");
    let data = dir.join("data");
    format!(
        r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "{rpc}"
rpc_public_addr = "{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "{s3}"
"#,
        meta = meta.display(),
        data = data.display(),
        region = crate::REGION,
    )
}

/// `garage -c CONFIG` with a clean environment: no inherited `GARAGE_*` overrides, plain logs.
fn garage_command(bin: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GARAGE_") {
            cmd.env_remove(name);
        }
    }
    cmd.arg("-c")
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    cmd
}

/// Runs `cmd` to completion (killing it after `timeout`); returns status, stdout and stderr.
fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
) -> io::Result<(ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let join = |h: std::thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok((status, join(stdout), join(stderr)))
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ")
        || t.split_once(':')
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_addr() -> io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

/// Removes the metadata and data a failed start left under `dir`.
fn wipe_state(dir: &Path) -> io::Result<()> {
    for sub in ["meta", "data"] {
        match std::fs::remove_dir_all(dir.join(sub)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Writes `text` to `path`, readable by the owner only (the config holds the RPC secret).
fn write_private(path: &Path, text: &str) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// `n` random bytes from the kernel, as lowercase hex.
fn random_hex(n: usize) -> io::Result<String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn helper_runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("garage-helper")
        .enable_all()
        .build()
}
