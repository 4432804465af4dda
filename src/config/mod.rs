//! config: turns the TOML file and the command-line flags into one validated [`Config`].
//!
//! Owns the option names (flag, TOML key), their defaults, and the parsing of sizes, durations and
//! modes. Precedence: flag > TOML key > default. It reads the config file and nothing else: no
//! network, no mount point checks (those belong to `mount`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use self::cluster::ClusterConfig;
use crate::s3::{ClientSettings, Credentials};

pub mod cluster;
pub mod de;
pub mod shared_cache;

pub use shared_cache::SharedCacheConfig;

/// Everything a mount needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub bucket: String,
    /// Key prefix the mount is rooted at: empty, or ending in `/`.
    pub prefix: String,
    pub mountpoint: PathBuf,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    /// Identifies the origin inside chunk keys, so two origins never share a cached chunk.
    pub origin_id: String,
    pub cache_dir: PathBuf,
    pub cache_max_size: u64,
    pub chunk_size: u64,
    pub metadata_ttl: Duration,
    pub negative_ttl: Duration,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub allow_other: bool,
    /// Let the kernel read objects held whole in the local cache itself (FUSE passthrough),
    /// where the kernel and privileges allow.
    pub passthrough: bool,
    pub foreground: bool,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub fuse_threads: usize,
    /// Attempts per origin request (first try included) for retryable failures.
    pub origin_max_attempts: u32,
    /// Connect timeout, per-read stall timeout and origin queue timeout.
    pub origin_timeout: Duration,
    /// Total time one chunk fill may spend retrying before it fails.
    pub origin_retry_time: Duration,
    /// Cap on concurrent origin GETs from this host.
    pub max_origin_requests: usize,
    /// Chunks prefetched ahead of a sequential reader when it starts.
    pub readahead_chunks: u64,
    /// The most chunks prefetched ahead of one reader: its window doubles up to this each time
    /// the reader catches up with it.
    pub readahead_max_chunks: u64,
    /// Bound on bytes held by fill buffers (readers' fills and readahead).
    pub memory_limit: u64,
    /// Local chunks not used for this long are evicted (besides the size bound).
    pub cache_max_age: Option<Duration>,
    /// The shared in-datacenter cache store, if any.
    pub shared_cache: Option<SharedCacheConfig>,
    /// Cluster membership and the internal RPC listener, if any.
    pub cluster: Option<ClusterConfig>,
    /// `/healthz`, `/readyz`, `/metrics` for a host without `[cluster]`.
    pub metrics_addr: Option<String>,
}

impl Config {
    /// How to build the origin's S3 client.
    pub fn origin_client(&self) -> ClientSettings {
        ClientSettings {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            credentials: Credentials::Chain,
            max_attempts: self.origin_max_attempts,
            initial_backoff: None,
            connect_timeout: self.origin_timeout.min(Duration::from_secs(10)),
            read_timeout: self.origin_timeout,
            operation_timeout: None,
        }
    }
}

pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;
pub const DEFAULT_CACHE_MAX_SIZE: u64 = 10 << 30;
const MIN_CHUNK_SIZE: u64 = 64 << 10;
const MAX_CHUNK_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("unknown mount option {0:?} (options are the `orcafs mount` flags without the dashes, e.g. cache_dir=DIR or allow_other; see docs/configuration.md)")]
    UnknownOption(String),
    #[error("mount option {option:?} is not supported: {reason}")]
    UnsupportedOption { option: String, reason: String },
}

fn invalid(what: &'static str, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        what,
        value: value.into(),
        reason: reason.into(),
    }
}

/// A size or duration as TOML may write it: `"8MiB"` / `"60s"` or a bare integer
/// (bytes / seconds).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Int(u64),
    Text(String),
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Int(n) => n.to_string(),
            Value::Text(s) => s.clone(),
        }
    }
}

/// The TOML file: one key per option, all optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: Option<bool>,
    pub origin_id: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub cache_max_size: Option<Value>,
    pub chunk_size: Option<Value>,
    pub metadata_ttl: Option<Value>,
    pub negative_ttl: Option<Value>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub file_mode: Option<Value>,
    pub dir_mode: Option<Value>,
    pub allow_other: Option<bool>,
    pub passthrough: Option<bool>,
    pub foreground: Option<bool>,
    pub log_level: Option<String>,
    pub log_file: Option<PathBuf>,
    pub fuse_threads: Option<usize>,
    pub origin_max_attempts: Option<u32>,
    pub origin_timeout: Option<Value>,
    pub origin_retry_time: Option<Value>,
    pub max_origin_requests: Option<usize>,
    pub readahead_chunks: Option<u64>,
    pub readahead_max_chunks: Option<u64>,
    pub memory_limit: Option<Value>,
    pub cache_max_age: Option<Value>,
    pub metrics_addr: Option<String>,
    pub shared_cache: Option<SharedCacheConfig>,
    pub cluster: Option<ClusterConfig>,
}

/// `orcafs mount` flags. Every flag has a TOML key of the same name (dashes become underscores).
#[derive(Debug, Clone, Default, Args)]
pub struct MountArgs {
    /// What to mount: BUCKET, BUCKET/PREFIX/ or s3://BUCKET/PREFIX/
    pub source: String,
    /// Existing empty directory to mount at
    pub mountpoint: PathBuf,
    /// TOML file with any of the options below (flags override it)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: AWS S3)
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Region (default: from the AWS chain, or us-east-1 when --endpoint-url is given)
    #[arg(long, value_name = "R")]
    pub region: Option<String>,
    /// Use path-style addressing (http://host/bucket/key), as most S3-compatible servers need
    #[arg(long)]
    pub force_path_style: bool,
    /// Name of the origin inside cache keys (default: derived from endpoint and region)
    #[arg(long, value_name = "ID")]
    pub origin_id: Option<String>,
    /// Local chunk cache directory (default /var/cache/orcafs as root, else ~/.cache/orcafs)
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Upper bound of the local cache, e.g. 10GiB (least recently used chunks are evicted)
    #[arg(long, value_name = "SIZE")]
    pub cache_max_size: Option<String>,
    /// Size of the chunks objects are fetched and cached in, 64KiB..1GiB [default: 8MiB]
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// How long names, attributes and listings are trusted, e.g. 60s, 5m [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub metadata_ttl: Option<String>,
    /// How long a missing name is remembered as missing [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub negative_ttl: Option<String>,
    /// Owner of every file and directory [default: the mounting user]
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group of every file and directory [default: the mounting user's group]
    #[arg(long)]
    pub gid: Option<u32>,
    /// Permission bits of files, octal [default: 0644]
    #[arg(long, value_name = "MODE")]
    pub file_mode: Option<String>,
    /// Permission bits of directories, octal [default: 0755]
    #[arg(long, value_name = "MODE")]
    pub dir_mode: Option<String>,
    /// Let users other than the mounting one access the mount
    #[arg(long)]
    pub allow_other: bool,
    /// Serve every read through orcafs, never letting the kernel read a cached object's file
    /// itself (FUSE passthrough, used by default where the kernel and privileges allow)
    #[arg(long)]
    pub no_passthrough: bool,
    /// Stay in the foreground instead of detaching once the mount is live
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// error, warn, info, debug or trace (or a tracing filter) [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log to this file instead of stderr (a detached daemon defaults to <cache-dir>/orcafs.log)
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Number of FUSE request threads [default: 4]
    #[arg(long, value_name = "N")]
    pub fuse_threads: Option<usize>,
    /// Attempts per origin request, first try included [default: 4]
    #[arg(long, value_name = "N")]
    pub origin_max_attempts: Option<u32>,
    /// Origin connect timeout and stall timeout of a body read [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub origin_timeout: Option<String>,
    /// Total time a chunk fill may spend retrying the origin before it fails [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub origin_retry_time: Option<String>,
    /// Most origin GETs in flight at once from this host [default: 16]
    #[arg(long, value_name = "N")]
    pub max_origin_requests: Option<usize>,
    /// Chunks prefetched ahead of a sequential reader when it starts, 0 to disable [default: 4]
    #[arg(long, value_name = "N")]
    pub readahead_chunks: Option<u64>,
    /// The most chunks prefetched ahead of one sequential reader: its window doubles from
    /// --readahead-chunks up to this each time the reader catches up with it [default: 16]
    #[arg(long, value_name = "N")]
    pub readahead_max_chunks: Option<u64>,
    /// Memory for chunk fills and readahead; new fills wait when it is used [default: 192MiB]
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Evict local chunks not read for this long, e.g. 7d [default: none, size bound only]
    #[arg(long, value_name = "DURATION")]
    pub cache_max_age: Option<String>,
    /// Shared cache store s3://BUCKET/PREFIX (TOML: the [shared_cache] section)
    #[arg(long, value_name = "URL")]
    pub shared_cache: Option<String>,
    /// Endpoint of the shared cache store, e.g. http://127.0.0.1:3900
    #[arg(long, value_name = "URL")]
    pub shared_cache_endpoint_url: Option<String>,
    /// File with the secret that authenticates shared cache objects [default: [cluster] secret_file]
    #[arg(long, value_name = "FILE")]
    pub shared_cache_secret_file: Option<PathBuf>,
    /// Serve /healthz, /readyz and /metrics on ADDR (hosts without [cluster])
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

impl MountArgs {
    /// Reads the config file named by `--config` (if any) and merges it under the flags.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let mut f = load_file(path)?;
                // A relative secret file is next to the config file, not wherever we started.
                if let (Some(c), Some(dir)) = (f.cluster.as_mut(), path.parent()) {
                    if c.secret_file.is_relative() {
                        c.secret_file = dir.join(&c.secret_file);
                    }
                }
                if let (Some(sc), Some(dir)) = (f.shared_cache.as_mut(), path.parent()) {
                    sc.secret_file = sc.secret_file.take().map(|p| dir.join(p));
                }
                f
            }
            None => FileConfig::default(),
        };
        merge(self, file)
    }
}

/// Parses a TOML config file; the error names the file and the line.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

fn parse_toml(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| {
            text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1
        });
        let message = e.message().trim().to_string();
        ConfigError::Toml {
            path: path.to_owned(),
            message: match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            },
        }
    })
}

fn merge(args: &MountArgs, file: FileConfig) -> Result<Config, ConfigError> {
    let (bucket, prefix) = parse_source(&args.source)?;
    let endpoint_url = args.endpoint_url.clone().or(file.endpoint_url);
    if let Some(url) = &endpoint_url {
        validate_url(url)?;
    }
    let region = args.region.clone().or(file.region).or_else(|| {
        // An explicit endpoint rarely has a region in the AWS chain; us-east-1 is what
        // S3-compatible servers accept by default.
        endpoint_url.as_ref().map(|_| "us-east-1".to_string())
    });
    let origin_id = args
        .origin_id
        .clone()
        .or(file.origin_id)
        .unwrap_or_else(|| default_origin_id(endpoint_url.as_deref(), region.as_deref()));

    let chunk_size =
        pick_size("chunk size", &args.chunk_size, &file.chunk_size)?.unwrap_or(DEFAULT_CHUNK_SIZE);
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(invalid(
            "chunk size",
            chunk_size.to_string(),
            "must be between 64KiB and 1GiB",
        ));
    }
    let cache_max_size = pick_size("cache max size", &args.cache_max_size, &file.cache_max_size)?
        .unwrap_or(DEFAULT_CACHE_MAX_SIZE);

    let metadata_ttl = pick_duration("metadata TTL", &args.metadata_ttl, &file.metadata_ttl)?
        .unwrap_or(Duration::from_secs(60));
    let negative_ttl = pick_duration("negative TTL", &args.negative_ttl, &file.negative_ttl)?
        .unwrap_or(Duration::from_secs(10));
    let origin_timeout =
        pick_duration("origin timeout", &args.origin_timeout, &file.origin_timeout)?
            .unwrap_or(Duration::from_secs(30));
    if origin_timeout.is_zero() {
        return Err(invalid("origin timeout", "0", "must be positive"));
    }

    let origin_retry_time = pick_duration(
        "origin retry time",
        &args.origin_retry_time,
        &file.origin_retry_time,
    )?
    .unwrap_or(Duration::from_secs(60));
    let max_origin_requests = args
        .max_origin_requests
        .or(file.max_origin_requests)
        .unwrap_or(16);
    if !(1..=1024).contains(&max_origin_requests) {
        return Err(invalid(
            "max origin requests",
            max_origin_requests.to_string(),
            "must be between 1 and 1024",
        ));
    }
    let readahead_chunks = args.readahead_chunks.or(file.readahead_chunks).unwrap_or(4);
    let readahead_max_chunks = args
        .readahead_max_chunks
        .or(file.readahead_max_chunks)
        .unwrap_or(16);
    for (what, n) in [
        ("readahead chunks", readahead_chunks),
        ("readahead max chunks", readahead_max_chunks),
    ] {
        if n > 1024 {
            return Err(invalid(what, n.to_string(), "must be at most 1024"));
        }
    }
    // A window never shrinks below where it starts: a larger start raises the most too.
    let readahead_max_chunks = readahead_max_chunks.max(readahead_chunks);
    let memory_limit =
        pick_size("memory limit", &args.memory_limit, &file.memory_limit)?.unwrap_or(192 << 20);
    if memory_limit < chunk_size {
        return Err(invalid(
            "memory limit",
            memory_limit.to_string(),
            "must hold at least one chunk (raise it or lower --chunk-size)",
        ));
    }

    let cache_max_age = pick_duration("cache max age", &args.cache_max_age, &file.cache_max_age)?;
    let shared_cache = shared_cache(args, file.shared_cache.clone(), file.cluster.as_ref())?;

    let file_mode = pick_mode("file mode", &args.file_mode, &file.file_mode)?.unwrap_or(0o644);
    let dir_mode = pick_mode("dir mode", &args.dir_mode, &file.dir_mode)?.unwrap_or(0o755);

    let log_level = args
        .log_level
        .clone()
        .or(file.log_level)
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::EnvFilter::try_new(&log_level)
        .map_err(|e| invalid("log level", &log_level, e.to_string()))?;

    let fuse_threads = args.fuse_threads.or(file.fuse_threads).unwrap_or(4);
    if !(1..=64).contains(&fuse_threads) {
        return Err(invalid(
            "FUSE thread count",
            fuse_threads.to_string(),
            "must be between 1 and 64",
        ));
    }
    let origin_max_attempts = args
        .origin_max_attempts
        .or(file.origin_max_attempts)
        .unwrap_or(4);
    if origin_max_attempts == 0 {
        return Err(invalid("origin max attempts", "0", "must be at least 1"));
    }

    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Ok(Config {
        bucket,
        prefix,
        mountpoint: args.mountpoint.clone(),
        endpoint_url,
        region,
        force_path_style: args.force_path_style || file.force_path_style.unwrap_or(false),
        origin_id,
        cache_dir: args
            .cache_dir
            .clone()
            .or(file.cache_dir)
            .unwrap_or_else(default_cache_dir),
        cache_max_size,
        chunk_size,
        metadata_ttl,
        negative_ttl,
        uid: args.uid.or(file.uid).unwrap_or(uid),
        gid: args.gid.or(file.gid).unwrap_or(gid),
        file_mode,
        dir_mode,
        allow_other: args.allow_other || file.allow_other.unwrap_or(false),
        passthrough: !args.no_passthrough && file.passthrough.unwrap_or(true),
        foreground: args.foreground || file.foreground.unwrap_or(false),
        log_level,
        log_file: args.log_file.clone().or(file.log_file),
        fuse_threads,
        origin_max_attempts,
        origin_timeout,
        origin_retry_time,
        max_origin_requests,
        readahead_chunks,
        readahead_max_chunks,
        memory_limit,
        cache_max_age,
        shared_cache,
        cluster: file.cluster,
        metrics_addr: args.metrics_addr.clone().or(file.metrics_addr),
    })
}

/// The shared store from `--shared-cache` (which replaces the TOML section) or `[shared_cache]`,
/// with `--shared-cache-endpoint-url` and `--shared-cache-secret-file` applied to either, and
/// the cluster's secret file when it has none of its own.
fn shared_cache(
    args: &MountArgs,
    file: Option<SharedCacheConfig>,
    cluster: Option<&ClusterConfig>,
) -> Result<Option<SharedCacheConfig>, ConfigError> {
    let mut sc = match &args.shared_cache {
        Some(url) => Some(SharedCacheConfig::from_url(url)?),
        None => file,
    };
    match (sc.as_mut(), &args.shared_cache_endpoint_url) {
        (Some(sc), Some(url)) => {
            validate_url(url)?;
            sc.endpoint_url = Some(url.clone());
            // Like the origin flags: an explicit endpoint is an S3-compatible server, which almost
            // always wants path-style requests (set the TOML section for anything else).
            sc.force_path_style = true;
        }
        (None, Some(url)) => {
            return Err(invalid(
                "shared cache endpoint URL",
                url,
                "needs --shared-cache s3://BUCKET/PREFIX or a [shared_cache] section",
            ))
        }
        _ => {}
    }
    let Some(mut sc) = sc else {
        if let Some(path) = &args.shared_cache_secret_file {
            return Err(invalid(
                "shared cache secret file",
                path.display().to_string(),
                "needs --shared-cache s3://BUCKET/PREFIX or a [shared_cache] section",
            ));
        }
        return Ok(None);
    };
    if let Some(path) = &args.shared_cache_secret_file {
        sc.secret_file = Some(path.clone());
    }
    if sc.secret_file.is_none() {
        sc.secret_file = cluster.map(|c| c.secret_file.clone());
    }
    if sc.secret_file.is_none() {
        // Refused rather than run open: without a secret, anyone who can write to the bucket
        // could serve this mount any bytes they like.
        return Err(invalid(
            "shared cache",
            format!("s3://{}/{}", sc.bucket, sc.prefix),
            "has no secret to authenticate its objects: set secret_file in [shared_cache] \
             (or --shared-cache-secret-file FILE), or [cluster] secret_file",
        ));
    }
    Ok(Some(sc))
}

/// `BUCKET`, `BUCKET/PREFIX/` or `s3://BUCKET/PREFIX/` → (bucket, prefix ending in `/` or empty).
pub fn parse_source(source: &str) -> Result<(String, String), ConfigError> {
    let rest = source.strip_prefix("s3://").unwrap_or(source);
    let (bucket, prefix) = match rest.split_once('/') {
        Some((b, p)) => (b, p),
        None => (rest, ""),
    };
    if !valid_bucket_name(bucket) {
        return Err(invalid(
            "source",
            source,
            "expected BUCKET, BUCKET/PREFIX/ or s3://BUCKET/PREFIX/ with a valid bucket name",
        ));
    }
    let prefix = prefix.trim_start_matches('/');
    let prefix = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_string(), prefix))
}

fn valid_bucket_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
        })
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

fn valid_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://"))
        && url.split("://").nth(1).is_some_and(|h| !h.is_empty())
}

fn validate_url(url: &str) -> Result<(), ConfigError> {
    if valid_url(url) {
        Ok(())
    } else {
        Err(invalid(
            "endpoint URL",
            url,
            "expected http://HOST[:PORT] or https://HOST[:PORT]",
        ))
    }
}

fn default_origin_id(endpoint: Option<&str>, region: Option<&str>) -> String {
    match endpoint {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!("aws-s3:{}", region.unwrap_or("default")),
    }
}

fn default_cache_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/orcafs");
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("orcafs");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/orcafs"),
        None => std::env::temp_dir().join("orcafs-cache"),
    }
}

fn pick_size(
    what: &'static str,
    flag: &Option<String>,
    file: &Option<Value>,
) -> Result<Option<u64>, ConfigError> {
    let text = flag.clone().or_else(|| file.as_ref().map(Value::text));
    text.map(|t| parse_size(what, &t)).transpose()
}

fn pick_duration(
    what: &'static str,
    flag: &Option<String>,
    file: &Option<Value>,
) -> Result<Option<Duration>, ConfigError> {
    let text = flag.clone().or_else(|| file.as_ref().map(Value::text));
    text.map(|t| parse_duration(what, &t)).transpose()
}

fn pick_mode(
    what: &'static str,
    flag: &Option<String>,
    file: &Option<Value>,
) -> Result<Option<u16>, ConfigError> {
    let text = match (flag, file) {
        (Some(f), _) => f.clone(),
        // A TOML integer is taken as written in octal digits (644), or as 0o644 literal value.
        (None, Some(Value::Int(n))) if *n <= 0o7777 && n.to_string().bytes().all(|b| b < b'8') => {
            n.to_string()
        }
        (None, Some(Value::Int(n))) => format!("{n:o}"),
        (None, Some(Value::Text(s))) => s.clone(),
        (None, None) => return Ok(None),
    };
    parse_mode(what, &text).map(Some)
}

/// Largest size accepted anywhere (1 EiB): far above any cache or chunk, far below overflow.
const MAX_SIZE: u64 = 1 << 60;
/// Longest duration accepted anywhere: deadlines computed from it can never overflow a clock.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// `10GiB`, `512MiB`, `8M`, `4096` (bytes), at most 1 EiB.
pub fn parse_size(what: &'static str, text: &str) -> Result<u64, ConfigError> {
    let size: bytesize::ByteSize = text
        .trim()
        .parse()
        .map_err(|_| invalid(what, text, "expected a size such as 512MiB, 10GiB or 4096"))?;
    let n = size.as_u64();
    if n > MAX_SIZE {
        return Err(invalid(what, text, "must be at most 1EiB"));
    }
    Ok(n)
}

/// `60s`, `5m`, `1h 30m`, `250ms`, or a bare number of seconds; at most ten years.
pub fn parse_duration(what: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let t = text.trim();
    let d = match t.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t).map_err(|_| {
            invalid(
                what,
                text,
                "expected a duration such as 500ms, 60s, 5m or 1h",
            )
        })?,
    };
    if d > MAX_DURATION {
        return Err(invalid(what, text, "must be at most 10 years (3650d)"));
    }
    Ok(d)
}

/// Octal permission bits: `644`, `0644`, `0o644`.
pub fn parse_mode(what: &'static str, text: &str) -> Result<u16, ConfigError> {
    let t = text.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    u16::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| invalid(what, text, "expected octal permission bits such as 0644"))
}

/// `-o` options (mount(8) and fstab form) turned into `orcafs mount` flags.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// `--flag` / `--flag=value` arguments, in the order the options were given.
    pub flags: Vec<String>,
    /// What was accepted without effect, and why (for the log).
    pub notes: Vec<String>,
}

/// mount(8), fstab and systemd options that orcafs accepts without a flag of its own.
const GENERIC_OPTIONS: &[(&str, &str)] = &[
    (
        "_netdev",
        "network filesystem (ordering for mount(8) and systemd)",
    ),
    ("nofail", "for mount(8) and systemd"),
    ("auto", "for mount(8) -a"),
    ("noauto", "for mount(8) -a"),
    ("defaults", "nothing to set"),
    ("ro", "orcafs is always read-only"),
    ("rw", "orcafs is always read-only; rw has no effect"),
    ("nodev", "orcafs always mounts nodev"),
    ("nosuid", "orcafs always mounts nosuid"),
    ("dev", "orcafs always mounts nodev"),
    ("suid", "orcafs always mounts nosuid"),
    ("exec", "programs on the mount may run (the default)"),
    (
        "default_permissions",
        "orcafs always checks permissions in the kernel",
    ),
    ("user", "for mount(8)"),
    ("users", "for mount(8)"),
    ("nouser", "for mount(8)"),
    ("owner", "for mount(8)"),
    ("group", "for mount(8)"),
    ("async", "read-only: nothing is written"),
    ("sync", "read-only: nothing is written"),
    ("dirsync", "read-only: nothing is written"),
    ("atime", "read-only: access times are not recorded"),
    ("noatime", "read-only: access times are not recorded"),
    ("relatime", "read-only: access times are not recorded"),
    ("norelatime", "read-only: access times are not recorded"),
    ("strictatime", "read-only: access times are not recorded"),
    ("nostrictatime", "read-only: access times are not recorded"),
    ("lazytime", "read-only: access times are not recorded"),
    ("nolazytime", "read-only: access times are not recorded"),
    ("diratime", "read-only: access times are not recorded"),
    ("nodiratime", "read-only: access times are not recorded"),
];

/// Generic options that take a value (`name=…`) or a family of names (`x-…`).
const GENERIC_PREFIXES: &[(&str, &str)] = &[
    ("x-", "for systemd and mount(8)"),
    ("comment=", "for mount(8)"),
    ("user=", "for mount(8)"),
    ("fsname=", "the source is the bucket"),
    ("subtype=", "the type is fuse.orcafs"),
];

/// Options that would weaken what the admin asked for if silently ignored.
const UNSUPPORTED_OPTIONS: &[(&str, &str)] = &[
    (
        "noexec",
        "orcafs cannot mount noexec yet; leave it out or use a bind mount with noexec",
    ),
    ("allow_root", "use allow_other"),
    ("remount", "unmount and mount again"),
    ("bind", "mount orcafs first, then bind-mount its directory"),
];

/// Splits `a,b=c,d="e,f"` at commas outside double quotes; quotes around a value are removed.
pub fn split_mount_options(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

/// Maps `-o` options to `orcafs mount` flags. Every flag is an option of the same name with
/// underscores (`cache_dir=/var/cache/orcafs`, `metadata_ttl=5m`; dashes are accepted too), a
/// switch without a value turns it on (`allow_other`, `force_path_style`, `foreground`; `=true`
/// / `=false` also work). The generic mount(8)/fstab/systemd options are accepted as described
/// in the `GENERIC_OPTIONS` table. Unknown options are an error naming the option, unless `sloppy`
/// (mount's `-s`), which notes and skips them.
pub fn mount_options_to_flags(
    options: &[String],
    sloppy: bool,
) -> Result<MountOptions, ConfigError> {
    use clap::Args as _;
    let cmd = MountArgs::augment_args(clap::Command::new("orcafs-mount"));
    let mut out = MountOptions::default();
    for opt in options.iter().flat_map(|o| split_mount_options(o)) {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt.as_str(), None),
        };
        if let Some((_, why)) = GENERIC_OPTIONS.iter().find(|(n, _)| *n == opt) {
            out.notes.push(format!("option {opt}: {why}"));
            continue;
        }
        if let Some((_, why)) = GENERIC_PREFIXES.iter().find(|(p, _)| opt.starts_with(p)) {
            out.notes.push(format!("option {opt}: {why}"));
            continue;
        }
        if let Some((_, why)) = UNSUPPORTED_OPTIONS.iter().find(|(n, _)| *n == name) {
            return Err(ConfigError::UnsupportedOption {
                option: opt.clone(),
                reason: why.to_string(),
            });
        }
        let wanted = name.replace('-', "_");
        let arg = cmd.get_arguments().find(|a| {
            a.get_long()
                .is_some_and(|l| l != "help" && l.replace('-', "_") == wanted)
        });
        let Some(arg) = arg else {
            if sloppy {
                out.notes
                    .push(format!("option {opt}: unknown, ignored (sloppy)"));
                continue;
            }
            return Err(ConfigError::UnknownOption(opt.clone()));
        };
        let long = arg.get_long().unwrap_or_default();
        if arg.get_action().takes_values() {
            match value {
                Some(v) if !v.is_empty() => out.flags.push(format!("--{long}={v}")),
                _ => {
                    return Err(invalid(
                        "mount option",
                        opt.clone(),
                        format!("needs a value: {wanted}=…"),
                    ))
                }
            }
        } else {
            match value.map(|v| v.to_ascii_lowercase()).as_deref() {
                None | Some("true" | "yes" | "on" | "1") => out.flags.push(format!("--{long}")),
                Some("false" | "no" | "off" | "0") => {}
                Some(_) => {
                    return Err(invalid(
                        "mount option",
                        opt.clone(),
                        format!("{wanted} is a switch: give it alone, or =true / =false"),
                    ))
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(source: &str) -> MountArgs {
        MountArgs {
            source: source.into(),
            mountpoint: "/mnt/x".into(),
            ..Default::default()
        }
    }

    #[test]
    fn source_forms() {
        assert_eq!(parse_source("bkt").unwrap(), ("bkt".into(), "".into()));
        assert_eq!(
            parse_source("bkt/a/b").unwrap(),
            ("bkt".into(), "a/b/".into())
        );
        assert_eq!(
            parse_source("s3://bkt/a/").unwrap(),
            ("bkt".into(), "a/".into())
        );
        assert_eq!(parse_source("s3://bkt").unwrap(), ("bkt".into(), "".into()));
        assert!(parse_source("B").is_err());
        assert!(parse_source("s3://").is_err());
        assert!(parse_source("UPPER").is_err());
    }

    #[test]
    fn overflowing_sizes_and_durations_are_parse_errors() {
        for d in ["100000000000d", "18446744073709551615", "3651d"] {
            let e = parse_duration("metadata TTL", d).unwrap_err().to_string();
            assert!(e.contains("at most 10 years"), "{d}: {e}");
        }
        assert_eq!(
            parse_duration("t", "3650d").unwrap(),
            Duration::from_secs(3650 * 86_400)
        );
        for s in ["100000EiB", "2EiB", "18446744073709551615"] {
            assert!(parse_size("cache max size", s).is_err(), "{s}");
        }
        assert_eq!(parse_size("s", "1EiB").unwrap(), 1 << 60);
        // The whole path, as a user types it.
        let mut a = args("bkt");
        a.metadata_ttl = Some("100000000000d".into());
        assert!(a.resolve().is_err());
    }

    #[test]
    fn sizes_durations_modes() {
        assert_eq!(parse_size("s", "8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("s", "10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("s", "4096").unwrap(), 4096);
        assert!(parse_size("s", "ten").is_err());
        assert!(parse_size("s", "5 parsecs").is_err());
        assert_eq!(parse_duration("d", "60s").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_duration("d", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("d", "7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("d", "soon").is_err());
        assert_eq!(parse_mode("m", "0644").unwrap(), 0o644);
        assert_eq!(parse_mode("m", "0o755").unwrap(), 0o755);
        assert!(parse_mode("m", "0999").is_err());
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let file = parse_toml(
            Path::new("x.toml"),
            "chunk_size = \"1MiB\"\nmetadata_ttl = 5\nregion = \"eu-west-1\"\nfile_mode = 600\n",
        )
        .unwrap();
        let mut a = args("bkt");
        a.chunk_size = Some("2MiB".into());
        let c = merge(&a, file).unwrap();
        assert_eq!(c.chunk_size, 2 << 20);
        assert_eq!(c.metadata_ttl, Duration::from_secs(5));
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.file_mode, 0o600);
        assert_eq!(c.dir_mode, 0o755);
        assert_eq!(c.cache_max_size, DEFAULT_CACHE_MAX_SIZE);
    }

    #[test]
    fn endpoint_implies_us_east_1() {
        let mut a = args("bkt");
        a.endpoint_url = Some("http://127.0.0.1:9000".into());
        let c = merge(&a, FileConfig::default()).unwrap();
        assert_eq!(c.region.as_deref(), Some("us-east-1"));
        assert_eq!(c.origin_id, "http://127.0.0.1:9000");
    }

    #[test]
    fn bad_toml_names_the_line() {
        let err = parse_toml(Path::new("x.toml"), "region = \"a\"\nchunk_size = [\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.toml") && msg.contains("line 2"), "{msg}");
        let err = parse_toml(Path::new("x.toml"), "\n\nbogus_key = 1\n").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn chunk_size_bounds() {
        let mut a = args("bkt");
        a.chunk_size = Some("1KiB".into());
        assert!(merge(&a, FileConfig::default()).is_err());
    }

    #[test]
    fn the_readahead_window_has_bounds_and_never_ends_below_its_start() {
        let c = merge(&args("bkt"), FileConfig::default()).unwrap();
        assert_eq!((c.readahead_chunks, c.readahead_max_chunks), (4, 16));
        let mut a = args("bkt");
        a.readahead_chunks = Some(32);
        let c = merge(&a, FileConfig::default()).unwrap();
        assert_eq!((c.readahead_chunks, c.readahead_max_chunks), (32, 32));
        let c = merge(
            &args("bkt"),
            parse_toml(Path::new("x.toml"), "readahead_max_chunks = 64\n").unwrap(),
        )
        .unwrap();
        assert_eq!(c.readahead_max_chunks, 64);
        a.readahead_max_chunks = Some(5000);
        assert!(merge(&a, FileConfig::default()).is_err());
    }

    #[test]
    fn mount_options_become_flags() {
        let opts = vec![
            "_netdev,ro,allow_other,cache_dir=/var/cache/orcafs,chunk-size=1MiB".to_string(),
            "nodev,nosuid,defaults,x-systemd.automount,force_path_style=false,foreground".into(),
            "endpoint_url=\"http://h:1\",comment=x".into(),
        ];
        let m = mount_options_to_flags(&opts, false).unwrap();
        assert_eq!(
            m.flags,
            [
                "--allow-other",
                "--cache-dir=/var/cache/orcafs",
                "--chunk-size=1MiB",
                "--foreground",
                "--endpoint-url=http://h:1",
            ]
        );
        assert!(m.notes.iter().any(|n| n.contains("_netdev")));
    }

    #[test]
    fn unknown_and_malformed_mount_options_are_errors() {
        let one = |o: &str| mount_options_to_flags(&[o.to_string()], false);
        let e = one("ro,bogus_option=1").unwrap_err().to_string();
        assert!(e.contains("unknown mount option \"bogus_option=1\""), "{e}");
        assert!(one("cache_dir")
            .unwrap_err()
            .to_string()
            .contains("needs a value"));
        assert!(one("allow_other=maybe").is_err());
        assert!(one("noexec")
            .unwrap_err()
            .to_string()
            .contains("not supported"));
        assert!(one("help").is_err());
        let sloppy = mount_options_to_flags(&["bogus".to_string()], true).unwrap();
        assert!(sloppy.flags.is_empty() && sloppy.notes[0].contains("bogus"));
    }
}
