//! mount: brings one configured mount to life and takes it down cleanly.
//!
//! Order matters: check the mount point and the cache directory, prove the bucket answers with
//! these credentials, open the cache, and only then mount, so every bad input fails with one
//! clear sentence and leaves no mount behind. SIGINT/SIGTERM and an external `umount` both end
//! in the same shutdown: the FUSE session ends, in-flight commits get a few seconds, and temp
//! files are swept.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{MountOption, SessionACL};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::cachestore::disk::{self, DiskDriver, DiskError};
use crate::cachestore::replica::{Replica, TierTimeouts};
use crate::cachestore::s3::{S3Store, StoreKey};
use crate::cachestore::{CacheStore, ChunkStream, DiskStore, StoreError};
use crate::chunk::ChunkKey;
use crate::cluster::{self, Cluster, LocalFills, LocalMeta, Observe};
use crate::config::Config;
use crate::control;
use crate::fetch::{FetchPolicy, Fetcher, Peers};
use crate::fs::{OrcaFs, Passthrough, Presentation, Source, MAX_READ};
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::origin::fleet::{FleetOrigin, MetaPeers, MetaQuery};
use crate::origin::{Origin, OriginError, S3Origin};
use crate::peer::{PeerAddr, PeerError};
use crate::secret::{Secret, SecretError};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0} does not exist")]
    MountpointMissing(PathBuf),
    #[error("mount point {0} is not a directory")]
    MountpointNotDir(PathBuf),
    #[error("mount point {0} is already a mount point; unmount it first")]
    AlreadyMounted(PathBuf),
    #[error("cannot use mount point {path}: {source}")]
    Mountpoint { path: PathBuf, source: io::Error },
    #[error("bucket {bucket:?} does not exist at {endpoint}")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error("the origin at {endpoint} refused access to bucket {bucket:?} ({detail}); check the credentials")]
    AccessDenied {
        bucket: String,
        endpoint: String,
        detail: String,
    },
    #[error("cannot reach the origin at {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("checking bucket {bucket:?} at {endpoint} failed: {source}")]
    Origin {
        bucket: String,
        endpoint: String,
        source: OriginError,
    },
    /// The cache directory is refused (the root, a home directory…): the sentence says why.
    #[error("{0}")]
    CacheRefused(DiskError),
    #[error("cannot open the cache directory: {0}")]
    Cache(DiskError),
    #[error("FUSE mount at {path} failed: {source}")]
    Fuse { path: PathBuf, source: io::Error },
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error("{store} failed its self test: {source}")]
    Store { store: String, source: StoreError },
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("the shared cache has no secret to authenticate its objects: set secret_file in [shared_cache] or [cluster]")]
    SharedNoSecret,
    #[error("the shared cache: {0}")]
    SharedSecret(#[source] SecretError),
}

impl From<DiskError> for MountError {
    fn from(e: DiskError) -> MountError {
        match e {
            DiskError::Refused { .. } => MountError::CacheRefused(e),
            e => MountError::Cache(e),
        }
    }
}

/// Tells whoever started us (the detaching parent) that the mount is live or has failed.
/// Also how systemd (`Type=notify`) learns of readiness and shutdown.
pub trait ReadyNotifier: Send {
    /// The mount is live.
    fn ready(&mut self);
    /// The mount failed before going live.
    fn failed(&mut self, _reason: &str) {}
    /// Shutdown has begun (signal or external unmount).
    fn stopping(&mut self) {}
}

/// Runs the mount until it is unmounted or signalled. Returns once it is down.
pub fn run(cfg: Config, notifier: &mut dyn ReadyNotifier) -> Result<(), MountError> {
    let mountpoint = check_mountpoint(&cfg.mountpoint)?;
    // Refuse a dangerous cache directory now, before the origin is asked anything.
    disk::choose_root(&cfg.cache_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("orcafs-io")
        .build()
        .map_err(MountError::Runtime)?;
    let metrics = Arc::new(Metrics::default());

    let origin: Arc<dyn Origin> = Arc::new(rt.block_on(S3Origin::new(
        &cfg.origin_client(),
        &cfg.bucket,
        metrics.clone(),
    )));
    rt.block_on(probe_origin(&cfg, &*origin))?;

    let (disk, scan) = DiskStore::open(&cfg.cache_dir, cfg.cache_max_size, metrics.clone())?;
    tracing::info!(
        dir = %disk.root().display(),
        objects = scan.objects,
        chunks = scan.chunks,
        bytes = scan.bytes,
        removed_broken = scan.removed_broken,
        temp_removed = scan.temp_removed,
        foreign_files = scan.foreign_files,
        made_private = scan.made_private,
        "disk cache opened"
    );
    if disk.root() != cfg.cache_dir {
        tracing::info!(
            cache_dir = %cfg.cache_dir.display(),
            root = %disk.root().display(),
            "the cache directory holds other files: orcafs keeps to its own subdirectory"
        );
    }
    let disk = Arc::new(disk);
    let (store, replica, shared) = rt.block_on(build_store(&cfg, &disk, &metrics))?;
    let fetch = Fetcher::new(origin.clone(), store, fetch_policy(&cfg), metrics.clone());
    let _evictors = rt.block_on(async { start_eviction(&cfg, &disk, shared.as_ref()) });
    let observe = Arc::new(MountObserve {
        fetch: fetch.clone(),
        metrics: metrics.clone(),
        replica: replica.clone(),
        ready: AtomicBool::new(false),
    });
    // Names, listings and HEADs: the fleet's, once per TTL, when there is a cluster.
    let fleet = FleetOrigin::new(origin.clone(), cfg.metadata_ttl);
    let cluster = match &cfg.cluster {
        Some(cc) => {
            let c = rt.block_on(Cluster::start(cc))?;
            fetch.set_peers(Arc::new(ClusterPeers(c.clone())));
            fleet.set_peers(Arc::new(ClusterMeta(c.clone())));
            c.set_local_meta(Arc::new(LocalFleetMeta(fleet.clone())));
            Some(c)
        }
        None => None,
    };
    // Kept alive until the session ends. The cluster listener speaks TLS; `metrics_addr`, with
    // or without a cluster, serves /healthz, /readyz and /metrics in plain HTTP.
    let _listener = match &cluster {
        Some(c) => {
            let fills = Arc::new(LocalFetchFills(fetch.clone()));
            let listener = rt.block_on(c.serve(fills, observe.clone()))?;
            // Serving now: tell the others at once, so hosts that start together agree on who
            // coordinates what from the first read, not a health round later.
            rt.block_on(c.announce(true));
            Some(listener)
        }
        None => None,
    };
    let _metrics_listener = match &cfg.metrics_addr {
        Some(addr) => Some(rt.block_on(cluster::serve_metrics_only(addr, observe.clone()))?),
        None => None,
    };
    let _control = serve_control(&cfg, &mountpoint, &metrics, &disk, cluster.clone());
    let ns = Arc::new(Namespace::new(
        fleet,
        &cfg.prefix,
        cfg.metadata_ttl,
        cfg.negative_ttl,
    ));
    let show = Presentation {
        uid: cfg.uid,
        gid: cfg.gid,
        file_mode: cfg.file_mode,
        dir_mode: cfg.dir_mode,
        ttl: cfg.metadata_ttl,
    };
    let fs = OrcaFs::new(
        ns,
        fetch,
        rt.handle().clone(),
        show,
        Source {
            origin_id: &cfg.origin_id,
            bucket: &cfg.bucket,
        },
        Arc::new(metrics.fuse_op_latency.clone()),
        Arc::new(Passthrough::new(cfg.passthrough, metrics.clone())),
    );

    let knob = fs.readahead_knob();
    let names = fs.kernel_names();
    let mounted = mount_fuse(fs, &mountpoint, &cfg)?;
    names.attach(mounted.session.notifier());
    match mount_device(&mountpoint) {
        Some(device) => knob.set(format!("/sys/class/bdi/{device}/read_ahead_kb").into()),
        None => tracing::info!("the new mount is not in /proc/self/mountinfo: the kernel's readahead stays at its default"),
    }
    tracing::info!(bucket = %cfg.bucket, prefix = %cfg.prefix, mountpoint = %mountpoint.display(), "mounted");
    let mut unmount = mounted.unmounter;
    rt.spawn(async move {
        wait_for_stop_signal().await;
        tracing::info!("signal received: unmounting");
        if let Err(e) = unmount() {
            tracing::warn!(error = %e, "unmount after signal failed");
        }
    });
    notifier.ready();
    observe.ready.store(true, Ordering::Relaxed);

    let result = mounted.session.run();
    observe.ready.store(false, Ordering::Relaxed);
    notifier.stopping();
    if let Some(c) = &cluster {
        // Out of the others' coordinator choice before this host stops answering.
        rt.block_on(c.announce(false));
    }
    tracing::info!(metrics = %metrics.summary(), "unmounted");
    if let Some(r) = &replica {
        if !rt.block_on(r.drain(WRITE_BEHIND_DRAIN)) {
            tracing::warn!(queued = ?r.queue_depths(), "write-behind to the shared cache not finished at exit");
        }
    }
    // In-flight fills finish or are dropped; a commit cut short leaves only a temp file.
    rt.shutdown_timeout(Duration::from_secs(5));
    // Checks of objects that became whole write their stamps, so the next start trusts them.
    disk.finish_sealing(Duration::from_secs(10));
    disk.sweep_temp();
    if let Err(e) = result {
        tracing::warn!(error = %e, "FUSE session ended with an error");
    }
    Ok(())
}

/// The store fetch uses, the replica behind it (when tiered) and the shared store (when any).
type Stores = (
    Arc<dyn CacheStore>,
    Option<Arc<Replica>>,
    Option<Arc<S3Store>>,
);

/// The local disk cache, tiered with the shared store when one is configured (disk synchronous,
/// shared write-behind). Every store proves read-after-write before the mount goes live.
async fn build_store(
    cfg: &Config,
    disk: &Arc<DiskStore>,
    metrics: &Arc<Metrics>,
) -> Result<Stores, MountError> {
    let local: Arc<dyn CacheStore> = Arc::new(DiskDriver(disk.clone()));
    local
        .self_test()
        .await
        .map_err(|source| MountError::Store {
            store: "the local disk cache".into(),
            source,
        })?;
    let Some(sc) = &cfg.shared_cache else {
        return Ok((local, None, None));
    };
    let what = format!("the shared cache s3://{}/{}", sc.bucket, sc.prefix);
    // Resolving the config sets the file (its own, else the cluster's) or refuses the mount. A
    // bad secret stops the mount even when the store is not `required`: it is a config error.
    let secret_file = sc.secret_file.as_ref().ok_or(MountError::SharedNoSecret)?;
    let secret = Secret::read(secret_file).map_err(MountError::SharedSecret)?;
    let key = StoreKey::from_secret(&secret);
    let shared = async {
        let s = Arc::new(S3Store::new(sc, key, metrics.clone()).await);
        s.self_test().await?;
        Ok::<_, StoreError>(s)
    }
    .await;
    let shared = match shared {
        Ok(s) => s,
        Err(source) if sc.required => {
            return Err(MountError::Store {
                store: what,
                source,
            })
        }
        Err(e) => {
            tracing::warn!(store = %what, error = %e, "shared cache failed its self test; running without it (required = false)");
            return Ok((local, None, None));
        }
    };
    tracing::info!(store = %what, "shared cache self-tested");
    let replica = Arc::new(Replica::new(
        vec![local],
        vec![shared.clone() as Arc<dyn CacheStore>],
        SHARED_QUEUE_LEN,
        TierTimeouts {
            first_byte: sc.first_byte_timeout,
            floor: sc.first_byte_floor,
            whole: sc.timeout,
        },
        metrics.clone(),
    ));
    replica.sample_first_byte().await;
    tracing::info!(deadlines = ?replica.first_byte_deadlines(), "shared cache read-through deadlines");
    Ok((replica.clone(), Some(replica), Some(shared)))
}

/// How long unmount waits for the write-behind queues to reach the shared store.
const WRITE_BEHIND_DRAIN: Duration = Duration::from_secs(10);

/// Chunk keys queued for the shared store; past that, write-behinds are dropped (counted).
const SHARED_QUEUE_LEN: usize = 1024;

/// Background eviction: idle local chunks (`cache_max_age`) and old shared ones (`max_age`).
fn start_eviction(
    cfg: &Config,
    disk: &Arc<DiskStore>,
    shared: Option<&Arc<S3Store>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(age) = cfg.cache_max_age {
        let disk = disk.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(
                (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(300)),
            );
            loop {
                tick.tick().await;
                let d = disk.clone();
                if let Ok(n) = tokio::task::spawn_blocking(move || d.evict_idle(age)).await {
                    if n > 0 {
                        tracing::info!(evicted = n, "idle local chunks evicted");
                    }
                }
            }
        }));
    }
    if let Some((s, age)) = shared.and_then(|s| s.max_age().map(|a| (s, a))) {
        tasks.push(s.spawn_eviction(
            age,
            (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(600)),
        ));
    }
    tasks
}

/// `orcafs status` answers from this socket; a failure to serve it only costs the command.
fn serve_control(
    cfg: &Config,
    mountpoint: &Path,
    metrics: &Arc<Metrics>,
    disk: &Arc<DiskStore>,
    cluster: Option<Arc<Cluster>>,
) -> Option<control::ControlServer> {
    let d = disk.clone();
    let report = control::mount_report_with_peers(
        cfg,
        mountpoint,
        metrics.clone(),
        move || d.used_bytes(),
        move || {
            let peers = cluster.as_ref().map(|c| c.peers()).unwrap_or_default();
            serde_json::Value::Array(
                peers
                    .into_iter()
                    .map(|(addr, alive)| serde_json::json!({"addr": addr.to_string(), "state": if alive { "up" } else { "down" }}))
                    .collect(),
            )
        },
    );
    match control::serve(&control::socket_path(mountpoint), report) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve the status socket; `orcafs status` will not see this mount");
            None
        }
    }
}

/// The cluster as fetch sees it.
struct ClusterPeers(Arc<Cluster>);

#[async_trait::async_trait]
impl Peers for ClusterPeers {
    fn coordinator_for(&self, key: &ChunkKey) -> Option<PeerAddr> {
        self.0.coordinator_for(&key.id())
    }

    async fn fetch(&self, peer: &PeerAddr, key: &ChunkKey) -> Result<ChunkStream, PeerError> {
        self.0.fetch_from_peer(peer, key).await
    }
}

/// The cluster as the fleet origin sees it: who coordinates a name, and asking it.
struct ClusterMeta(Arc<Cluster>);

#[async_trait::async_trait]
impl MetaPeers for ClusterMeta {
    fn coordinator_for_name(&self, name: &str) -> Option<PeerAddr> {
        self.0.coordinator_for_name(name)
    }

    async fn ask(&self, peer: &PeerAddr, query: &MetaQuery) -> Result<bytes::Bytes, PeerError> {
        let text = serde_json::to_string(query).map_err(|e| PeerError::Request(e.to_string()))?;
        self.0.ask_meta(peer, &text).await
    }
}

/// Metadata served to peers: this host's answers, never forwarded.
struct LocalFleetMeta(Arc<FleetOrigin>);

impl LocalMeta for LocalFleetMeta {
    fn name_of(&self, query: &str) -> Option<String> {
        serde_json::from_str::<MetaQuery>(query)
            .ok()
            .map(|q| q.name())
    }

    fn answer(
        &self,
        query: String,
    ) -> futures::future::BoxFuture<'static, Result<bytes::Bytes, String>> {
        let fleet = self.0.clone();
        Box::pin(async move {
            let q: MetaQuery = serde_json::from_str(&query).map_err(|e| e.to_string())?;
            fleet.answer_local(&q).await
        })
    }
}

/// Fills served to peers: local only, never forwarded again.
struct LocalFetchFills(Arc<Fetcher>);

impl LocalFills for LocalFetchFills {
    fn stream_local(&self, key: ChunkKey) -> ChunkStream {
        self.0.stream_local(key)
    }

    fn chunk_size(&self) -> u64 {
        self.0.chunk_size()
    }
}

/// What /readyz and /metrics report.
struct MountObserve {
    fetch: Arc<Fetcher>,
    metrics: Arc<Metrics>,
    replica: Option<Arc<Replica>>,
    ready: AtomicBool,
}

impl Observe for MountObserve {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Sets the gauges from their live sources, then encodes the whole registry.
    fn metrics_text(&self) -> String {
        let m = &self.metrics;
        m.fill_memory_in_use_bytes
            .set(self.fetch.memory_in_use() as i64);
        m.fills_in_flight.set(self.fetch.fills_in_flight() as i64);
        if let Some(r) = &self.replica {
            let depth: u64 = r.queue_depths().iter().map(|(_, d)| d).sum();
            m.shared_queue_depth.set(depth as i64);
            m.shared_error_state.set(i64::from(!r.errors().is_empty()));
        }
        m.encode()
    }
}

fn fetch_policy(cfg: &Config) -> FetchPolicy {
    FetchPolicy {
        chunk_size: cfg.chunk_size,
        max_attempts: cfg.origin_max_attempts,
        retry_time: cfg.origin_retry_time,
        stall_timeout: cfg.origin_timeout,
        queue_timeout: cfg.origin_timeout,
        max_origin_requests: cfg.max_origin_requests,
        readahead_chunks: cfg.readahead_chunks,
        readahead_max_chunks: cfg.readahead_max_chunks,
        memory_limit: cfg.memory_limit,
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

struct Mounted {
    session: fuser::Session<OrcaFs>,
    unmounter: Box<dyn FnMut() -> io::Result<()> + Send>,
}

/// Mounts with type `fuse.orcafs` and the bucket as source, as `mount -t fuse.orcafs` would:
/// directly with mount(2) when we may (root), else through fusermount3 via fuser.
fn mount_fuse(fs: OrcaFs, mountpoint: &Path, cfg: &Config) -> Result<Mounted, MountError> {
    let fuse_err = |source: io::Error| MountError::Fuse {
        path: mountpoint.to_owned(),
        source,
    };
    match mount_syscall(mountpoint, cfg) {
        Ok(fd) => {
            let session =
                fuser::Session::from_fd(fs, fd, acl(cfg), fuse_config(cfg)).map_err(|e| {
                    let _ = detach_mount(mountpoint);
                    fuse_err(e)
                })?;
            let path = mountpoint.to_owned();
            Ok(Mounted {
                session,
                unmounter: Box::new(move || detach_mount(&path)),
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let mut config = fuse_config(cfg);
            config.mount_options.extend([
                MountOption::FSName(source_name(cfg)),
                MountOption::Subtype("orcafs".into()),
                MountOption::RO,
                MountOption::NoDev,
                MountOption::NoSuid,
                MountOption::DefaultPermissions,
                MountOption::CUSTOM(format!("max_read={MAX_READ}")),
            ]);
            let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(fuse_err)?;
            let mut u = session.unmount_callable();
            Ok(Mounted {
                session,
                unmounter: Box::new(move || u.unmount()),
            })
        }
        Err(e) => Err(fuse_err(e)),
    }
}

fn source_name(cfg: &Config) -> String {
    format!("{}{}", cfg.bucket, slash_prefix(&cfg.prefix))
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in mount argument"))
}

fn mount_syscall(mountpoint: &Path, cfg: &Config) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(dev);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut opts = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions,max_read={MAX_READ}",
        fd.as_raw_fd()
    );
    if cfg.allow_other {
        opts.push_str(",allow_other");
    }
    let source = cstring(&source_name(cfg))?;
    let target = cstring(&mountpoint.to_string_lossy())?;
    let fstype = cstring("fuse.orcafs")?;
    let data = cstring(&opts)?;
    let flags = libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Lazy unmount: the mount disappears now; open files finish, then the session ends.
fn detach_mount(path: &Path) -> io::Result<()> {
    let target = cstring(&path.to_string_lossy())?;
    // SAFETY: target is a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // Already gone (unmounted from outside) is fine.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Ok(())
}

fn acl(cfg: &Config) -> SessionACL {
    if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    }
}

fn fuse_config(cfg: &Config) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.acl = acl(cfg);
    c.n_threads = Some(cfg.fuse_threads);
    c.clone_fd = true;
    c
}

fn slash_prefix(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!("/{}", prefix.trim_end_matches('/'))
    }
}

async fn probe_origin(cfg: &Config, origin: &dyn Origin) -> Result<(), MountError> {
    let endpoint = cfg
        .endpoint_url
        .clone()
        .unwrap_or_else(|| "AWS S3".to_string());
    let bucket = cfg.bucket.clone();
    match origin.probe(&cfg.prefix).await {
        Ok(()) => Ok(()),
        Err(OriginError::NoSuchBucket(_)) => Err(MountError::NoSuchBucket { bucket, endpoint }),
        Err(OriginError::AccessDenied(detail)) => Err(MountError::AccessDenied {
            bucket,
            endpoint,
            detail,
        }),
        Err(OriginError::Unreachable(detail)) => Err(MountError::Unreachable {
            endpoint,
            detail: first_line(&detail),
        }),
        Err(source) => Err(MountError::Origin {
            bucket,
            endpoint,
            source,
        }),
    }
}

/// The SDK's error text ends with a debug dump of the error chain; keep the readable part.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    line.split(" (DispatchFailure")
        .next()
        .unwrap_or(line)
        .to_string()
}

/// The mount point must exist, be a directory, and not be a mount point already.
fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::MountpointMissing(path.to_owned()))
        }
        Err(source) => {
            return Err(MountError::Mountpoint {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(MountError::MountpointNotDir(path.to_owned()));
    }
    let abs = path
        .canonicalize()
        .map_err(|source| MountError::Mountpoint {
            path: path.to_owned(),
            source,
        })?;
    if is_mount_point(&abs) {
        return Err(MountError::AlreadyMounted(abs));
    }
    Ok(abs)
}

/// The `major:minor` of the filesystem mounted at `abs` (canonical), from /proc/self/mountinfo
/// (not a `stat`, which would be a request to ourselves).
fn mount_device(abs: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = abs.to_string_lossy();
    info.lines().rev().find_map(|l| {
        let mut fields = l.split(' ');
        let device = fields.nth(2)?;
        let point = fields.nth(1)?;
        (unescape_mountinfo(point) == want).then(|| device.to_string())
    })
}

/// Whether `abs` (canonical) is listed as a mount point in /proc/self/mountinfo.
pub fn is_mount_point(abs: &Path) -> bool {
    mount_device(abs).is_some()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert!(mount_device(Path::new("/")).is_some_and(|d| d.contains(':')));
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/definitely/not/mounted/here")));
    }
}
