//! config::shared_cache: the `[shared_cache]` section (or `--shared-cache s3://BUCKET/PREFIX`),
//! typed and validated when the file is parsed, so a bad value names the file, the line and the
//! key before anything is probed. Builds no client and sends nothing: `cachestore::s3` does.
//! Names the secret file but does not read it: `mount` does.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{de, valid_url, ConfigError};
use crate::s3::{ClientSettings, Credentials};

/// Per-request timeout when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the store may take to start answering before it is skipped for a while, when not
/// configured: an in-datacenter store answers in milliseconds.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_millis(200);
/// The shortest time a read waits for the store before it fills from elsewhere, when not
/// configured: several times an in-datacenter answer, a small part of a chunk's transfer time.
pub const DEFAULT_FIRST_BYTE_FLOOR: Duration = Duration::from_millis(50);
/// Attempts per shared-store request, the first included: a dead store must answer fast.
const ATTEMPTS: u32 = 2;

/// The shared in-datacenter cache store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Section")]
pub struct SharedCacheConfig {
    /// S3 endpoint, e.g. `http://10.0.0.5:3900` (default: AWS S3).
    pub endpoint_url: Option<String>,
    pub bucket: String,
    /// Key prefix of every chunk object: empty, or ending in `/` (never starting with one).
    pub prefix: String,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub credentials: Credentials,
    /// false: a failed self test is a warning and the mount runs without the shared store.
    pub required: bool,
    /// Optional active eviction: delete chunks older than this.
    pub max_age: Option<Duration>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// A store that has not started answering a read-through by then is skipped for a while;
    /// at most `timeout`. Also the ceiling of a read's patience: 8x the store's usual time to
    /// answer, at least `first_byte_floor`; a read past its patience fills from elsewhere while
    /// the store's answer is still awaited (a late one only slows the patience).
    pub first_byte_timeout: Duration,
    /// The shortest patience; at most `first_byte_timeout` (equal to it: a fixed deadline).
    pub first_byte_floor: Duration,
    /// The file whose secret authenticates every object (`secret_file`, else `[cluster]
    /// secret_file`; relative to the config file). Always set once a mount's config is resolved.
    pub secret_file: Option<PathBuf>,
}

/// The section as written (these names are an interface; keep them).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    endpoint_url: Option<String>,
    bucket: String,
    #[serde(default)]
    prefix: String,
    region: Option<String>,
    #[serde(default)]
    force_path_style: bool,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    profile: Option<String>,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default, deserialize_with = "de::opt_positive_duration")]
    max_age: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_positive_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_positive_duration")]
    first_byte_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_positive_duration")]
    first_byte_floor: Option<Duration>,
    secret_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl TryFrom<Section> for SharedCacheConfig {
    type Error = String;

    fn try_from(s: Section) -> Result<Self, String> {
        if s.bucket.is_empty() || s.bucket.contains('/') {
            return Err(format!(
                "shared_cache.bucket {:?} is not a bucket name",
                s.bucket
            ));
        }
        if let Some(url) = &s.endpoint_url {
            if !valid_url(url) {
                return Err(format!(
                    "shared_cache.endpoint_url {url:?}: expected http://HOST[:PORT] or https://HOST[:PORT]"
                ));
            }
        }
        let credentials = match (s.access_key_id, s.secret_access_key, s.profile) {
            (Some(id), Some(secret), None) => Credentials::Static { id, secret },
            (None, None, Some(p)) => Credentials::Profile(p),
            (None, None, None) => Credentials::Chain,
            (Some(_), Some(_), Some(_)) => return Err(
                "[shared_cache]: set either access_key_id/secret_access_key or profile, not both"
                    .into(),
            ),
            _ => {
                return Err(
                    "[shared_cache]: access_key_id and secret_access_key go together".into(),
                )
            }
        };
        let timeout = s.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let first_byte_timeout = s
            .first_byte_timeout
            .unwrap_or(DEFAULT_FIRST_BYTE_TIMEOUT)
            .min(timeout);
        Ok(SharedCacheConfig {
            endpoint_url: s.endpoint_url,
            bucket: s.bucket,
            prefix: normalize_prefix(&s.prefix),
            region: s.region,
            force_path_style: s.force_path_style,
            credentials,
            required: s.required,
            max_age: s.max_age,
            timeout,
            first_byte_timeout,
            first_byte_floor: s
                .first_byte_floor
                .unwrap_or(DEFAULT_FIRST_BYTE_FLOOR)
                .min(first_byte_timeout),
            secret_file: s.secret_file,
        })
    }
}

impl SharedCacheConfig {
    /// The store at `s3://BUCKET/PREFIX` (as `--shared-cache` takes it), every other setting at
    /// its default.
    pub fn from_url(url: &str) -> Result<SharedCacheConfig, ConfigError> {
        let bad = |reason: &str| super::invalid("shared cache", url, reason);
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://BUCKET or s3://BUCKET/PREFIX"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name"));
        }
        Ok(SharedCacheConfig {
            endpoint_url: None,
            bucket: bucket.to_string(),
            prefix: normalize_prefix(prefix),
            region: None,
            force_path_style: false,
            credentials: Credentials::Chain,
            required: true,
            max_age: None,
            timeout: DEFAULT_TIMEOUT,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            first_byte_floor: DEFAULT_FIRST_BYTE_FLOOR,
            secret_file: None,
        })
    }

    /// How to build the store's client: every request bounded by the timeout, two attempts.
    pub fn client(&self) -> ClientSettings {
        ClientSettings {
            endpoint_url: self.endpoint_url.clone(),
            region: self
                .region
                .clone()
                .or_else(|| self.endpoint_url.as_ref().map(|_| "us-east-1".into())),
            force_path_style: self.force_path_style,
            credentials: self.credentials.clone(),
            max_attempts: ATTEMPTS,
            initial_backoff: Some(Duration::from_millis(50)),
            connect_timeout: self.timeout,
            read_timeout: self.timeout,
            operation_timeout: Some(self.timeout),
        }
    }
}

/// No leading `/`, a trailing `/` unless empty.
fn normalize_prefix(prefix: &str) -> String {
    let p = prefix.trim_start_matches('/');
    if p.is_empty() || p.ends_with('/') {
        p.to_string()
    } else {
        format!("{p}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        shared_cache: SharedCacheConfig,
    }

    #[test]
    fn section_from_toml() {
        let f: File = toml::from_str(
            r#"
            [shared_cache]
            endpoint_url = "http://127.0.0.1:3900"
            bucket = "chunks"
            prefix = "orcafs"
            region = "garage"
            force_path_style = true
            access_key_id = "AK"
            secret_access_key = "SK"
            required = false
            max_age = "7d"
            timeout = "2s"
            secret_file = "shared.secret"
            "#,
        )
        .unwrap();
        let c = f.shared_cache;
        assert_eq!(c.prefix, "orcafs/");
        assert_eq!(c.max_age, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.secret_file, Some(PathBuf::from("shared.secret")));
        assert!(!c.required);
        assert_eq!(
            c.credentials,
            Credentials::Static {
                id: "AK".into(),
                secret: "SK".into()
            }
        );
        let f: File = toml::from_str("[shared_cache]\nbucket = \"b\"\n").unwrap();
        assert!(f.shared_cache.required);
        assert_eq!(f.shared_cache.timeout, DEFAULT_TIMEOUT);
        assert_eq!(f.shared_cache.secret_file, None);
        // The patience adapts above its floor; neither it nor the ceiling above `timeout`.
        assert_eq!(f.shared_cache.first_byte_floor, DEFAULT_FIRST_BYTE_FLOOR);
        let f: File = toml::from_str(
            "[shared_cache]\nbucket = \"b\"\ntimeout = \"100ms\"\nfirst_byte_floor = \"20ms\"\n",
        )
        .unwrap();
        assert_eq!(
            f.shared_cache.first_byte_timeout,
            Duration::from_millis(100)
        );
        assert_eq!(f.shared_cache.first_byte_floor, Duration::from_millis(20));
        let f: File =
            toml::from_str("[shared_cache]\nbucket = \"b\"\nfirst_byte_floor = \"1s\"\n").unwrap();
        assert_eq!(f.shared_cache.first_byte_floor, DEFAULT_FIRST_BYTE_TIMEOUT);
    }

    #[test]
    fn bad_sections_are_parse_errors() {
        for (text, says) in [
            ("bucket = \"b\"\nbukcet = 1", "bukcet"),
            ("bucket = \"b\"\ntimeout = \"0s\"", "positive"),
            ("bucket = \"b\"\nmax_age = \"soon\"", "soon"),
            ("bucket = \"a/b\"", "not a bucket name"),
            ("bucket = \"b\"\nendpoint_url = \"ftp://x\"", "endpoint_url"),
            ("bucket = \"b\"\naccess_key_id = \"A\"", "go together"),
            (
                "bucket = \"b\"\naccess_key_id = \"A\"\nsecret_access_key = \"S\"\nprofile = \"p\"",
                "not both",
            ),
        ] {
            let e = toml::from_str::<File>(&format!("[shared_cache]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    /// Resolves a mount over a config file holding `toml` (in `dir`), with `args` adjusted.
    fn resolve(
        dir: &std::path::Path,
        toml: &str,
        adjust: impl FnOnce(&mut crate::config::MountArgs),
    ) -> Result<Option<SharedCacheConfig>, String> {
        let path = dir.join("orcafs.toml");
        std::fs::write(&path, toml).unwrap();
        let mut args = crate::config::MountArgs {
            source: "bkt".into(),
            mountpoint: "/mnt/x".into(),
            config: Some(path),
            ..Default::default()
        };
        adjust(&mut args);
        args.resolve()
            .map(|c| c.shared_cache)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_secret_file_is_its_own_or_the_clusters_and_never_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let section = "[shared_cache]\nbucket = \"b\"\n";
        let cluster = "[cluster]\nlisten = \"127.0.0.1:7420\"\nsecret_file = \"cluster.secret\"\n";
        let own = "secret_file = \"shared.secret\"\n";
        let secret = |r: Result<Option<SharedCacheConfig>, String>| r.unwrap().unwrap().secret_file;

        // Its own, next to the config file; it wins over the cluster's.
        let r = resolve(d, &format!("{section}{own}"), |_| {});
        assert_eq!(secret(r), Some(d.join("shared.secret")));
        let r = resolve(d, &format!("{section}{own}{cluster}"), |_| {});
        assert_eq!(secret(r), Some(d.join("shared.secret")));
        // Else the cluster's.
        let r = resolve(d, &format!("{section}{cluster}"), |_| {});
        assert_eq!(secret(r), Some(d.join("cluster.secret")));
        // The flag form, with the secret as a flag.
        let r = resolve(d, "", |a| {
            a.shared_cache = Some("s3://b/p".into());
            a.shared_cache_secret_file = Some("/etc/orcafs/shared.secret".into());
        });
        assert_eq!(secret(r), Some(PathBuf::from("/etc/orcafs/shared.secret")));

        // None at all: refused, in one sentence naming the keys to set.
        for (toml, flag) in [(section, None), ("", Some("s3://b/p"))] {
            let e = resolve(d, toml, |a| a.shared_cache = flag.map(Into::into)).unwrap_err();
            assert!(
                e.contains("has no secret")
                    && e.contains("secret_file in [shared_cache]")
                    && e.contains("--shared-cache-secret-file")
                    && e.contains("[cluster] secret_file"),
                "{e}"
            );
        }
        let e = resolve(d, "", |a| a.shared_cache_secret_file = Some("s".into())).unwrap_err();
        assert!(e.contains("needs --shared-cache"), "{e}");
        assert_eq!(resolve(d, "", |_| {}), Ok(None));
    }

    #[test]
    fn from_url() {
        let u = SharedCacheConfig::from_url("s3://chunks/site-a/orcafs").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.prefix.as_str()),
            ("chunks", "site-a/orcafs/")
        );
        assert_eq!(SharedCacheConfig::from_url("s3://b").unwrap().prefix, "");
        assert!(SharedCacheConfig::from_url("b/p").is_err());
        assert!(SharedCacheConfig::from_url("s3:///p").is_err());
    }
}
