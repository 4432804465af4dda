//! peer: the words `fetch` and `cluster` share about another host of the cluster, so that the two
//! meet through the `fetch::Peers` trait (wired in `mount`) without importing each other.
//!
//! Owns [`PeerAddr`] (how a peer is named) and [`PeerError`] (why a peer fill was not started).
//! Vocabulary only: must not touch the network, hashing, configuration or fills.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A peer as the cluster names it: `host:port`, canonical (IP literals normalised) so that every
/// host hashes the same bytes for it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(Arc<str>);

impl PeerAddr {
    pub fn new(text: &str) -> PeerAddr {
        let t = text.trim();
        match t.parse::<SocketAddr>() {
            Ok(sa) => PeerAddr(sa.to_string().into()),
            Err(_) => PeerAddr(t.to_ascii_lowercase().into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(sa: SocketAddr) -> PeerAddr {
        PeerAddr(sa.to_string().into())
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a peer fill failed. The caller fills locally in every case, from where the peer's bytes
/// stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the peer is not the coordinator of this chunk in its own view (409)")]
    NotCoordinator,
    #[error("the peer refused our credentials (401); check secret_file on both hosts")]
    Unauthorized,
    #[error("the peer answered HTTP {0}")]
    Status(u16),
    #[error("cannot connect to the peer: {0}")]
    Connect(String),
    /// Connected, but the peer did not prove the cluster's TLS identity (an impostor at a
    /// member's address, or a listener that closed the handshake). None of its bytes were read.
    #[error("the peer failed TLS authentication: {0}")]
    Tls(String),
    /// A 200 without the proof that the server holds the cluster secret. None of its body was read.
    #[error("the peer's answer does not prove the cluster secret")]
    Unauthenticated,
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer announced {got:?} bytes for a chunk of {expected}")]
    BadLength { expected: u64, got: Option<u64> },
    #[error("peer request failed: {0}")]
    Request(String),
    /// The fill started, then its body broke, stalled past the timeout, or had the wrong length.
    #[error("the peer's body failed: {0}")]
    Body(String),
}

impl PeerError {
    /// A short label for the reason (the `reason` of the cluster's fallback counter).
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::NotCoordinator => "not_coordinator",
            PeerError::Unauthorized => "unauthorized",
            PeerError::Status(_) => "status",
            PeerError::Connect(_) => "connect",
            PeerError::Tls(_) => "tls",
            PeerError::Unauthenticated => "unauthenticated",
            PeerError::Timeout(_) => "timeout",
            PeerError::BadLength { .. } => "bad_length",
            PeerError::Request(_) => "request",
            PeerError::Body(_) => "body",
        }
    }
}
