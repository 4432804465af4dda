//! auth: the shared-secret signature of internal requests.
//!
//! `x-orcafs-auth: t=<unix seconds>,sig=<hex HMAC-SHA256(secret, METHOD "\n" PATH?QUERY "\n" t)>`.
//! The receiver recomputes it over the request line it got, rejects a timestamp more than
//! [`MAX_SKEW`] away from its clock, and compares in constant time. Neither the secret nor a
//! signature is ever logged.
//!
//! Owns the signature (the secret file is read by [`crate::secret`]). Must not touch HTTP, the
//! peer set or the wire format of the request it signs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ClusterError;
pub(crate) use crate::secret::Secret;
use crate::secret::SecretError;

/// The header carrying the signature.
pub const HEADER: &str = "x-orcafs-auth";
/// Largest accepted distance between the signer's clock and ours.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

type HmacSha256 = Hmac<Sha256>;

/// Why a request's signature was refused (safe to log: holds no secret material).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no signature header")]
    Missing,
    #[error("malformed signature header")]
    Malformed,
    #[error("timestamp too far from this host's clock")]
    Stale,
    #[error("signature does not match")]
    BadSignature,
}

/// The secret file's errors, worded as the cluster's.
impl From<SecretError> for ClusterError {
    fn from(e: SecretError) -> ClusterError {
        match e {
            SecretError::Read { path, source } => ClusterError::SecretRead { path, source },
            SecretError::Empty { path } => ClusterError::SecretEmpty { path },
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mac(secret: &[u8], method: &str, path_and_query: &str, t: u64) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(method.as_bytes());
    m.update(b"\n");
    m.update(path_and_query.as_bytes());
    m.update(b"\n");
    m.update(t.to_string().as_bytes());
    m
}

/// The header value signing `method path_and_query` at unix time `t`.
pub fn sign(secret: &[u8], method: &str, path_and_query: &str, t: u64) -> String {
    let sig = mac(secret, method, path_and_query, t)
        .finalize()
        .into_bytes();
    format!("t={t},sig={}", hex::encode(sig))
}

/// Checks a header value against the request it came with, at unix time `now`.
pub fn verify(
    secret: &[u8],
    method: &str,
    path_and_query: &str,
    header: Option<&[u8]>,
    now: u64,
) -> Result<(), AuthFailure> {
    let header = header.ok_or(AuthFailure::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| AuthFailure::Malformed)?;
    let (mut t, mut sig) = (None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) if t.is_none() => t = Some(v),
            Some(("sig", v)) if sig.is_none() => sig = Some(v),
            _ => return Err(AuthFailure::Malformed),
        }
    }
    let t: u64 = t
        .and_then(|t| t.parse().ok())
        .ok_or(AuthFailure::Malformed)?;
    let mut raw = [0u8; 32];
    hex::decode_to_slice(sig.ok_or(AuthFailure::Malformed)?, &mut raw)
        .map_err(|_| AuthFailure::Malformed)?;
    if now.abs_diff(t) > MAX_SKEW.as_secs() {
        return Err(AuthFailure::Stale);
    }
    mac(secret, method, path_and_query, t)
        .verify_slice(&raw)
        .map_err(|_| AuthFailure::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_secret_request_and_time() {
        let s = b"0123456789abcdef";
        let pq = "/internal/fill?bucket=b&key=k";
        let now = 1_700_000_000;
        let h = sign(s, "GET", pq, now);
        assert!(h.starts_with("t=1700000000,sig="));
        assert_eq!(verify(s, "GET", pq, Some(h.as_bytes()), now), Ok(()));
        assert_eq!(verify(s, "GET", pq, Some(h.as_bytes()), now + 299), Ok(()));
        assert_eq!(
            verify(s, "GET", pq, Some(h.as_bytes()), now + 301),
            Err(AuthFailure::Stale)
        );
        assert_eq!(
            verify(s, "GET", pq, Some(h.as_bytes()), now - 301),
            Err(AuthFailure::Stale)
        );
        assert_eq!(
            verify(b"another secret!!", "GET", pq, Some(h.as_bytes()), now),
            Err(AuthFailure::BadSignature)
        );
        assert_eq!(
            verify(
                s,
                "GET",
                "/internal/fill?bucket=b&key=k2",
                Some(h.as_bytes()),
                now
            ),
            Err(AuthFailure::BadSignature)
        );
        assert_eq!(
            verify(s, "HEAD", pq, Some(h.as_bytes()), now),
            Err(AuthFailure::BadSignature)
        );
        assert_eq!(verify(s, "GET", pq, None, now), Err(AuthFailure::Missing));
        for bad in [
            "",
            "t=1",
            "sig=00",
            "t=x,sig=00",
            "t=1700000000,sig=zz",
            "t=1700000000,sig=00",
            "t=1,t=2,sig=00",
        ] {
            assert_eq!(
                verify(s, "GET", pq, Some(bad.as_bytes()), now),
                Err(AuthFailure::Malformed),
                "{bad}"
            );
        }
        // A signature over a later timestamp does not verify under the earlier one.
        let forged = h.replace("t=1700000000", "t=1700000001");
        assert_eq!(
            verify(s, "GET", pq, Some(forged.as_bytes()), now),
            Err(AuthFailure::BadSignature)
        );
    }
}
