//! auth: the shared-secret signature of internal requests, the refusal of replays, and the
//! proof that an answer comes from a holder of the secret.
//!
//! `x-orcafs-auth: t=<unix seconds>,n=<hex nonce>,sig=<hex HMAC-SHA256(secret, METHOD "\n"
//! PATH?QUERY "\n" t "\n" n)>`. The receiver recomputes it over the request line it got, rejects a
//! timestamp more than [`MAX_SKEW`] away from its clock, compares in constant time, and refuses a
//! signature it has already accepted ([`ReplayGuard`]): the random nonce makes two honest requests
//! for the same chunk in the same second differ. A 200 answer carries `x-orcafs-proof`, an HMAC of
//! the request's signature header ([`response_proof`]): whatever TLS identity a server shows, it
//! knows the secret. Neither the secret nor a signature is ever logged.
//!
//! Owns the signatures (the secret file is read by [`crate::secret`]). Must not touch HTTP, TLS,
//! the peer set or the wire format of the request it signs.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ClusterError;
pub(crate) use crate::secret::Secret;
use crate::secret::SecretError;

/// The header carrying the signature.
pub const HEADER: &str = "x-orcafs-auth";
/// The header of a 200 answer carrying the proof that the server holds the secret.
pub const PROOF_HEADER: &str = "x-orcafs-proof";
/// Largest accepted distance between the signer's clock and ours.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Shortest accepted secret: the public key derived from it is shown to anyone who connects, so a
/// guessable secret could be found offline.
pub const MIN_SECRET_LEN: usize = 16;
/// Signatures remembered at most for replay refusal (some 16 MiB): more requests than this
/// within [`MAX_SKEW`] shorten the window instead of growing memory.
const REPLAY_CAPACITY: usize = 1 << 18;
const NONCE_LEN: usize = 12;

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
    #[error("signature already used (a replayed request)")]
    Replayed,
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

fn mac(secret: &[u8], method: &str, path_and_query: &str, t: u64, nonce: &str) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(method.as_bytes());
    m.update(b"\n");
    m.update(path_and_query.as_bytes());
    m.update(b"\n");
    m.update(t.to_string().as_bytes());
    m.update(b"\n");
    m.update(nonce.as_bytes());
    m
}

/// A fresh random nonce, hex.
fn nonce() -> String {
    let mut raw = [0u8; NONCE_LEN];
    if aws_lc_rs::rand::fill(&mut raw).is_err() {
        // The system RNG failed: a counter still keeps nonces unique within this process,
        // which is all replay refusal needs from them.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        raw[..8].copy_from_slice(&n.to_le_bytes());
        raw[8..].copy_from_slice(&(std::process::id()).to_le_bytes());
    }
    hex::encode(raw)
}

/// The header value signing `method path_and_query` at unix time `t`, with a fresh nonce: two
/// calls never sign alike.
pub fn sign(secret: &[u8], method: &str, path_and_query: &str, t: u64) -> String {
    let n = nonce();
    let sig = mac(secret, method, path_and_query, t, &n)
        .finalize()
        .into_bytes();
    format!("t={t},n={n},sig={}", hex::encode(sig))
}

/// A signature that verified: what [`ReplayGuard`] remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub t: u64,
    pub sig: [u8; 32],
}

/// Checks a header value against the request it came with, at unix time `now`.
pub fn verify(
    secret: &[u8],
    method: &str,
    path_and_query: &str,
    header: Option<&[u8]>,
    now: u64,
) -> Result<Verified, AuthFailure> {
    let header = header.ok_or(AuthFailure::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| AuthFailure::Malformed)?;
    let (mut t, mut n, mut sig) = (None, None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) if t.is_none() => t = Some(v),
            Some(("n", v)) if n.is_none() => n = Some(v),
            Some(("sig", v)) if sig.is_none() => sig = Some(v),
            _ => return Err(AuthFailure::Malformed),
        }
    }
    let t: u64 = t
        .and_then(|t| t.parse().ok())
        .ok_or(AuthFailure::Malformed)?;
    let n = n
        .filter(|n| n.len() == 2 * NONCE_LEN && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(AuthFailure::Malformed)?;
    let mut raw = [0u8; 32];
    hex::decode_to_slice(sig.ok_or(AuthFailure::Malformed)?, &mut raw)
        .map_err(|_| AuthFailure::Malformed)?;
    if now.abs_diff(t) > MAX_SKEW.as_secs() {
        return Err(AuthFailure::Stale);
    }
    mac(secret, method, path_and_query, t, n)
        .verify_slice(&raw)
        .map_err(|_| AuthFailure::BadSignature)?;
    Ok(Verified { t, sig: raw })
}

/// The `x-orcafs-proof` value answering the request signed by `request_header`.
pub fn response_proof(secret: &[u8], request_header: &str) -> String {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(b"orcafs fill response\n");
    m.update(request_header.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Whether `proof` answers the request signed by `request_header` (constant time).
pub fn check_response_proof(secret: &[u8], request_header: &str, proof: Option<&[u8]>) -> bool {
    let mut raw = [0u8; 32];
    let Some(Ok(())) = proof.map(|p| hex::decode_to_slice(p, &mut raw)) else {
        return false;
    };
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(b"orcafs fill response\n");
    m.update(request_header.as_bytes());
    m.verify_slice(&raw).is_ok()
}

/// The signatures accepted within the skew window, so that each is accepted once.
///
/// Bounded: past [`REPLAY_CAPACITY`] the oldest are forgotten and `floor` rises past their
/// timestamp, so a request as old as a forgotten one is refused rather than risked.
pub struct ReplayGuard {
    state: Mutex<ReplayState>,
    capacity: usize,
}

struct ReplayState {
    seen: BTreeSet<(u64, [u8; 32])>,
    /// Signatures older than this (unix seconds) are refused: some of them were forgotten.
    floor: u64,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard::with_capacity(REPLAY_CAPACITY)
    }
}

impl ReplayGuard {
    pub fn with_capacity(capacity: usize) -> ReplayGuard {
        ReplayGuard {
            state: Mutex::new(ReplayState {
                seen: BTreeSet::new(),
                floor: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    /// Records a verified signature at unix time `now`; Err if it was accepted before (or is
    /// older than what the guard still remembers).
    pub fn first_use(&self, v: Verified, now: u64) -> Result<(), AuthFailure> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // What the skew check refuses anyway need not be remembered.
        let horizon = now.saturating_sub(MAX_SKEW.as_secs());
        while s.seen.first().is_some_and(|(t, _)| *t < horizon) {
            s.seen.pop_first();
        }
        if v.t < s.floor || !s.seen.insert((v.t, v.sig)) {
            return Err(AuthFailure::Replayed);
        }
        while s.seen.len() > self.capacity {
            if let Some((t, _)) = s.seen.pop_first() {
                s.floor = s.floor.max(t + 1);
            }
        }
        Ok(())
    }
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
        assert!(h.starts_with("t=1700000000,n="), "{h}");
        assert!(verify(s, "GET", pq, Some(h.as_bytes()), now).is_ok());
        assert!(verify(s, "GET", pq, Some(h.as_bytes()), now + 299).is_ok());
        assert_ne!(
            h,
            sign(s, "GET", pq, now),
            "a nonce makes each signature unique"
        );
        let err = |h: &str, secret: &[u8], method, pq, now| {
            verify(secret, method, pq, Some(h.as_bytes()), now).unwrap_err()
        };
        assert_eq!(err(&h, s, "GET", pq, now + 301), AuthFailure::Stale);
        assert_eq!(err(&h, s, "GET", pq, now - 301), AuthFailure::Stale);
        assert_eq!(
            err(&h, b"another secret!!", "GET", pq, now),
            AuthFailure::BadSignature
        );
        assert_eq!(
            err(&h, s, "GET", "/internal/fill?bucket=b&key=k2", now),
            AuthFailure::BadSignature
        );
        assert_eq!(err(&h, s, "HEAD", pq, now), AuthFailure::BadSignature);
        assert_eq!(verify(s, "GET", pq, None, now), Err(AuthFailure::Missing));
        let n = "n=00112233445566778899aabb";
        for bad in [
            "".to_string(),
            "t=1".into(),
            "sig=00".into(),
            format!("t=x,{n},sig=00"),
            format!("t=1700000000,{n},sig=zz"),
            format!("t=1700000000,{n},sig=00"),
            "t=1700000000,n=00,sig=00".into(),
            format!("t=1700000000,sig={}", "00".repeat(32)),
            format!("t=1,t=2,{n},sig=00"),
        ] {
            assert_eq!(
                err(&bad, s, "GET", pq, now),
                AuthFailure::Malformed,
                "{bad}"
            );
        }
        // A signature over a later timestamp or another nonce does not verify.
        let forged = h.replace("t=1700000000", "t=1700000001");
        assert_eq!(err(&forged, s, "GET", pq, now), AuthFailure::BadSignature);
        let at = h.find("n=").unwrap() + 2;
        let flipped = if &h[at..at + 1] == "0" { "1" } else { "0" };
        let forged = format!("{}{flipped}{}", &h[..at], &h[at + 1..]);
        assert_eq!(err(&forged, s, "GET", pq, now), AuthFailure::BadSignature);
    }

    #[test]
    fn a_signature_is_accepted_once() {
        let s = b"0123456789abcdef";
        let now = 1_700_000_000;
        let guard = ReplayGuard::with_capacity(3);
        let v = |t| {
            verify(
                s,
                "GET",
                "/p",
                Some(sign(s, "GET", "/p", t).as_bytes()),
                now,
            )
            .unwrap()
        };
        let first = v(now);
        assert_eq!(guard.first_use(first, now), Ok(()));
        assert_eq!(guard.first_use(first, now), Err(AuthFailure::Replayed));
        assert_eq!(guard.first_use(first, now + 10), Err(AuthFailure::Replayed));
        // Full: the oldest is forgotten, and requests as old as it are refused from then on.
        let old = v(now - 100);
        assert_eq!(guard.first_use(old, now), Ok(()));
        assert_eq!(guard.first_use(v(now - 50), now), Ok(()));
        assert_eq!(guard.first_use(v(now - 20), now), Ok(()));
        assert_eq!(guard.first_use(old, now), Err(AuthFailure::Replayed));
        assert_eq!(
            guard.first_use(v(now - 100), now),
            Err(AuthFailure::Replayed)
        );
        assert_eq!(guard.first_use(v(now - 99), now), Ok(()));
        assert_eq!(guard.first_use(first, now), Err(AuthFailure::Replayed));
        // What left the skew window is forgotten without raising the floor.
        let guard = ReplayGuard::with_capacity(2);
        assert_eq!(guard.first_use(v(now - 290), now), Ok(()));
        assert_eq!(guard.first_use(v(now), now + 20), Ok(()));
        assert_eq!(guard.first_use(v(now), now + 20), Ok(()));
        assert_eq!(guard.state.lock().unwrap().floor, 0);
    }

    #[test]
    fn a_response_proof_binds_the_secret_and_the_request() {
        let s = b"0123456789abcdef";
        let req = sign(s, "GET", "/p", 1);
        let proof = response_proof(s, &req);
        assert!(check_response_proof(s, &req, Some(proof.as_bytes())));
        assert!(!check_response_proof(
            b"another secret!!",
            &req,
            Some(proof.as_bytes())
        ));
        let other = sign(s, "GET", "/p", 1);
        assert!(!check_response_proof(s, &other, Some(proof.as_bytes())));
        assert!(!check_response_proof(s, &req, None));
        assert!(!check_response_proof(s, &req, Some(b"zz")));
    }
}
