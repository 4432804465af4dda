//! de: serde helpers so that config sections deserialize straight into typed values.
//!
//! A bad value inside a section (`[cluster] peer_timeout = "soon"`) then fails in the TOML parse,
//! whose error names the file, the line and the key, before anything is probed or mounted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::Value;

/// An optional duration (`"5s"`, `"250ms"`, or a bare number of seconds) that must be positive.
pub fn opt_positive_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    let Some(v) = Option::<Value>::deserialize(d)? else {
        return Ok(None);
    };
    let text = v.text();
    let dur = super::parse_duration("duration", &text).map_err(serde::de::Error::custom)?;
    if dur.is_zero() {
        return Err(serde::de::Error::custom(format!(
            "invalid duration {text:?}: must be positive"
        )));
    }
    Ok(Some(dur))
}

/// An optional path that must be absolute (nothing relative is guessed for key material).
pub fn opt_absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let Some(path) = Option::<PathBuf>::deserialize(d)? else {
        return Ok(None);
    };
    if path.is_absolute() {
        Ok(Some(path))
    } else {
        Err(serde::de::Error::custom(format!(
            "invalid path {:?}: must be absolute",
            path.display().to_string()
        )))
    }
}

/// An optional count that must be at least 1.
pub fn opt_positive_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match Option::<usize>::deserialize(d)? {
        Some(0) => Err(serde::de::Error::custom(
            "invalid count 0: must be at least 1",
        )),
        n => Ok(n),
    }
}

/// Defines one `deserialize_with` function per key, named after the key, that deserializes with
/// the given function and names `[section] key` in the error: serde does not tell a field's
/// helper its key, and the operator should read which key is wrong, not count lines.
macro_rules! named_keys {
    ($section:literal: $($key:ident -> $ty:ty = $inner:expr;)+) => {$(
        fn $key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            let key = concat!("[", $section, "] ", stringify!($key));
            $inner(d).map_err(|e| {
                let why = e.to_string(); // toml ends its text with a newline
                <D::Error as serde::de::Error>::custom(format!("{key}: {}", why.trim_end()))
            })
        }
    )+};
}
pub(crate) use named_keys;

/// A `host:port` (a name or an IP address, and a port), trimmed and checked as it is parsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HostPort(String);

impl HostPort {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<HostPort, String> {
        let t = text.trim();
        if valid_host_port(t) {
            Ok(HostPort(t.to_string()))
        } else {
            Err(format!("invalid address {text:?}: expected HOST:PORT"))
        }
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;

    fn try_from(text: String) -> Result<HostPort, String> {
        text.parse()
    }
}

/// A name a TLS certificate can be checked for: a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TlsName(String);

impl TlsName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn to_server_name(&self) -> rustls::pki_types::ServerName<'static> {
        // Checked when parsed.
        rustls::pki_types::ServerName::try_from(self.0.clone())
            .unwrap_or_else(|_| unreachable!("TlsName is checked when parsed"))
    }
}

impl TryFrom<String> for TlsName {
    type Error = String;

    fn try_from(text: String) -> Result<TlsName, String> {
        let t = text.trim();
        match rustls::pki_types::ServerName::try_from(t) {
            Ok(_) => Ok(TlsName(t.to_string())),
            Err(_) => Err(format!(
                "invalid name {text:?}: expected a DNS name or an IP address"
            )),
        }
    }
}

/// A `host:port` whose port is a non-zero number and whose host is not empty (nor a URL).
fn valid_host_port(text: &str) -> bool {
    if text.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(['/', ' ', '[', ']'])
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "opt_positive_duration")]
        d: Option<Duration>,
    }

    #[test]
    fn durations_parse_or_name_the_problem() {
        let t: T = toml::from_str("d = \"250ms\"").unwrap();
        assert_eq!(t.d, Some(Duration::from_millis(250)));
        let t: T = toml::from_str("d = 3").unwrap();
        assert_eq!(t.d, Some(Duration::from_secs(3)));
        let t: T = toml::from_str("").unwrap();
        assert_eq!(t.d, None);
        let e = toml::from_str::<T>("d = \"0s\"").unwrap_err().to_string();
        assert!(e.contains("must be positive"), "{e}");
        let e = toml::from_str::<T>("d = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("soon"), "{e}");
    }

    #[test]
    fn host_port_validation() {
        for ok in [
            "10.0.0.1:7420",
            "[::1]:1",
            "orcafs.internal:7420",
            "a:65535",
        ] {
            assert!(valid_host_port(ok), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            ":7420",
            "host:",
            "host:0",
            "host:99999",
            "http://h:1",
            "",
        ] {
            assert!(!valid_host_port(bad), "{bad}");
        }
        assert_eq!(" h:1 ".parse::<HostPort>().unwrap().as_str(), "h:1");
    }
}
