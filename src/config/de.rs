//! de: serde helpers so that config sections deserialize straight into typed values.
//!
//! A bad value inside a section (`[cluster] peer_timeout = "soon"`) then fails in the TOML parse,
//! whose error names the file, the line and the key, before anything is probed or mounted.

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
}
