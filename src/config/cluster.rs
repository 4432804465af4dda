//! cluster: the `[cluster]` section of the config file, typed and checked as it is parsed.
//!
//! Owns the section's keys, their defaults and the form of each value, so that a bad duration or
//! address is a TOML error naming the file, the line and the key, before anything is probed or
//! mounted. Checks between keys (`peers` or `dns`; an `advertise` peers can reach) belong to
//! `crate::cluster`, which imports this; this file must not import anything from it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::de::{self, HostPort, TlsName};

const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(10);
/// Enough for every peer's pooled connections and a few scrapers; excess ones are closed.
const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// The `[cluster]` section of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Address the internal RPC, `/healthz`, `/readyz` and `/metrics` listen on.
    #[serde(deserialize_with = "listen")]
    pub listen: HostPort,
    /// How peers reach this host; defaults to `listen`.
    #[serde(default, deserialize_with = "advertise")]
    pub advertise: Option<HostPort>,
    /// Static peer set (this host's own address may be listed).
    #[serde(default, deserialize_with = "peers")]
    pub peers: Vec<HostPort>,
    /// Or: a `name:port` resolved to the peer set every `dns_interval`.
    #[serde(default, deserialize_with = "dns")]
    pub dns: Option<HostPort>,
    /// File holding the shared secret that signs internal requests (and, without `tls_cert`,
    /// from which every member's TLS identity is derived).
    pub secret_file: PathBuf,
    /// PEM certificate chain this host's listener presents, from the operator's CA.
    #[serde(default, deserialize_with = "tls_cert")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default, deserialize_with = "tls_key")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) the peers' certificates are verified against.
    #[serde(default, deserialize_with = "tls_ca")]
    pub tls_ca: Option<PathBuf>,
    /// Name checked in every peer's certificate [default: the peer's own host].
    #[serde(default, deserialize_with = "tls_server_name")]
    pub tls_server_name: Option<TlsName>,
    /// Connections the listener holds at once [default: 512]; more are closed at once.
    #[serde(default, deserialize_with = "max_connections")]
    pub max_connections: Option<usize>,
    /// How often peers are health-checked [default: 2s].
    #[serde(default, deserialize_with = "health_interval")]
    pub health_interval: Option<Duration>,
    /// Connect, response and body-stall timeout of a peer fill [default: 5s].
    #[serde(default, deserialize_with = "peer_timeout")]
    pub peer_timeout: Option<Duration>,
    /// How often `dns` is re-resolved [default: 10s].
    #[serde(default, deserialize_with = "dns_interval")]
    pub dns_interval: Option<Duration>,
}

de::named_keys! { "cluster":
    listen -> HostPort = Deserialize::deserialize;
    advertise -> Option<HostPort> = Deserialize::deserialize;
    peers -> Vec<HostPort> = Deserialize::deserialize;
    dns -> Option<HostPort> = Deserialize::deserialize;
    health_interval -> Option<Duration> = de::opt_positive_duration;
    peer_timeout -> Option<Duration> = de::opt_positive_duration;
    dns_interval -> Option<Duration> = de::opt_positive_duration;
    tls_cert -> Option<PathBuf> = de::opt_absolute_path;
    tls_key -> Option<PathBuf> = de::opt_absolute_path;
    tls_ca -> Option<PathBuf> = de::opt_absolute_path;
    tls_server_name -> Option<TlsName> = Deserialize::deserialize;
    max_connections -> Option<usize> = de::opt_positive_count;
}

impl ClusterConfig {
    /// `health_interval`, or its default.
    pub fn health_interval(&self) -> Duration {
        self.health_interval.unwrap_or(DEFAULT_HEALTH_INTERVAL)
    }

    /// `peer_timeout`, or its default.
    pub fn peer_timeout(&self) -> Duration {
        self.peer_timeout.unwrap_or(DEFAULT_PEER_TIMEOUT)
    }

    /// `dns_interval`, or its default.
    pub fn dns_interval(&self) -> Duration {
        self.dns_interval.unwrap_or(DEFAULT_DNS_INTERVAL)
    }

    /// `max_connections`, or its default.
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::MountArgs;

    #[test]
    fn section_parses_into_typed_values() {
        let cfg: ClusterConfig = toml::from_str(
            r#"
            listen = "127.0.0.2:7420"
            advertise = " 127.0.0.2:7420 "
            peers = ["127.0.0.2:7420", "127.0.0.3:7420", "peer.example:7420"]
            secret_file = "/etc/orcafs/cluster.secret"
            peer_timeout = "2s"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.peers.len(), 3);
        assert_eq!(cfg.advertise.as_ref().unwrap().as_str(), "127.0.0.2:7420");
        assert_eq!(cfg.peer_timeout(), Duration::from_secs(2));
        assert_eq!(cfg.health_interval(), Duration::from_secs(2));
        assert_eq!(cfg.dns_interval(), Duration::from_secs(10));
        assert_eq!(cfg.max_connections(), 512);
        assert_eq!(cfg.tls_cert, None);
        let tls: ClusterConfig = toml::from_str(
            r#"
            listen = "127.0.0.2:7420"
            secret_file = "/etc/orcafs/cluster.secret"
            tls_cert = "/etc/orcafs/host.pem"
            tls_key = "/etc/orcafs/host.key"
            tls_ca = "/etc/orcafs/ca.pem"
            tls_server_name = " orcafs.internal "
            max_connections = 64
            "#,
        )
        .unwrap();
        assert_eq!(
            tls.tls_ca.as_deref().unwrap(),
            Path::new("/etc/orcafs/ca.pem")
        );
        assert_eq!(
            tls.tls_server_name.as_ref().unwrap().as_str(),
            "orcafs.internal"
        );
        assert_eq!(tls.max_connections(), 64);
        assert!(toml::from_str::<ClusterConfig>(
            "listen = \"a:1\"\nsecret_file = \"s\"\nbogus = 1"
        )
        .is_err());
    }

    /// Runs `MountArgs::resolve` over a config file holding `section`.
    fn resolve(dir: &Path, section: &str) -> Result<crate::config::Config, String> {
        let path = dir.join("orcafs.toml");
        std::fs::write(
            &path,
            format!("region = \"eu-west-1\"\n\n[cluster]\n{section}"),
        )
        .unwrap();
        MountArgs {
            source: "bkt".into(),
            mountpoint: "/mnt/x".into(),
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .map_err(|e| e.to_string())
    }

    #[test]
    fn bad_values_fail_the_parse_naming_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let good =
            "listen = \"127.0.0.1:7420\"\npeers = [\"127.0.0.1:7420\"]\nsecret_file = \"s\"\n";
        let c = resolve(dir.path(), good).unwrap().cluster.unwrap();
        // A relative secret file is next to the config file.
        assert_eq!(c.secret_file, dir.path().join("s"));

        for (bad, key, line) in [
            ("peer_timeout = \"soon\"\n", "[cluster] peer_timeout", 7),
            ("health_interval = \"0s\"\n", "[cluster] health_interval", 7),
            ("dns_interval = true\n", "[cluster] dns_interval", 7),
            ("advertise = \"http://h:1\"\n", "[cluster] advertise", 7),
            ("tls_cert = \"host.pem\"\n", "[cluster] tls_cert", 7),
            (
                "tls_server_name = \"a b\"\n",
                "[cluster] tls_server_name",
                7,
            ),
            ("max_connections = 0\n", "[cluster] max_connections", 7),
        ] {
            let e = resolve(dir.path(), &format!("{good}{bad}")).unwrap_err();
            assert!(e.contains("orcafs.toml"), "{e}");
            assert!(e.contains(&format!("line {line}: {key}: ")), "{e}");
        }
        let e = resolve(dir.path(), &good.replace("127.0.0.1:7420\"]", "nope\"]")).unwrap_err();
        assert!(
            e.contains("line 5: [cluster] peers: invalid address \"nope\": expected HOST:PORT"),
            "{e}"
        );
        let e = resolve(
            dir.path(),
            &good.replace("listen = \"127.0.0.1:7420\"", "listen = \"host:0\""),
        )
        .unwrap_err();
        assert!(e.contains("line 4: [cluster] listen"), "{e}");
    }
}
