//! origin: the bucket being mounted, behind one trait, [`Origin`]: HEAD, one ListObjectsV2 page
//! (delimiter `/`), and ranged GETs pinned to an ETag.
//!
//! Drivers: [`s3`] (any S3-compatible server, through the crate's one S3 client layer) and
//! [`fault`] (in memory, with injected delays, errors, cut or hung bodies and replaced objects,
//! and counts of requests and bytes: the fetch path's unit tests run on it without a kernel or
//! a server). [`fleet`] wraps another origin so that a cluster lists each prefix (and HEADs each
//! key) once per TTL for the whole fleet. `fetch` and `namespace` hold an `Arc<dyn Origin>`.
//!
//! Knows nothing of chunks' storage, inodes or FUSE.

use std::pin::Pin;
use std::time::SystemTime;

use bytes::Bytes;
use futures::Stream;

pub mod fault;
pub mod fleet;
pub mod s3;

pub use s3::S3Origin;

#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bucket {0:?} does not exist at this endpoint")]
    NoSuchBucket(String),
    #[error("access denied by the origin ({0}); check the credentials")]
    AccessDenied(String),
    #[error(
        "object changed at the origin: ETag {expected} was pinned, the origin now has {actual}"
    )]
    EtagChanged { expected: String, actual: String },
    #[error("cannot reach the origin: {0}")]
    Unreachable(String),
    #[error("origin error, may succeed on retry: {0}")]
    Transient(String),
    #[error("origin error: {0}")]
    Other(String),
}

impl OriginError {
    /// Whether trying the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            OriginError::Transient(_) | OriginError::Unreachable(_)
        )
    }
}

/// What HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectMeta {
    /// Empty when the origin sends none.
    pub etag: String,
    pub size: u64,
    pub last_modified: SystemTime,
}

/// One object in a listing. Some servers omit the ETag in listings, so it is optional.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    pub last_modified: SystemTime,
    pub etag: Option<String>,
}

/// One page of ListObjectsV2 with delimiter `/`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ListPage {
    pub prefixes: Vec<String>,
    pub objects: Vec<ListedObject>,
    pub next_token: Option<String>,
}

/// The body of a ranged GET, piece by piece as it arrives.
pub type RangeBody = Pin<Box<dyn Stream<Item = Result<Bytes, OriginError>> + Send>>;

/// The bucket being mounted.
#[async_trait::async_trait]
pub trait Origin: Send + Sync + 'static {
    fn bucket(&self) -> &str;

    async fn head(&self, key: &str) -> Result<ObjectMeta, OriginError>;

    /// One page of the keys and common prefixes under `prefix` (delimiter `/`).
    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: i32,
    ) -> Result<ListPage, OriginError>;

    /// Bytes `[start, start+len)` of `key`, only if its ETag is still `etag`
    /// ([`OriginError::EtagChanged`] otherwise). The response length is checked; the body may
    /// still end early or break, which the caller retries from where it stopped.
    async fn get_range(
        &self,
        key: &str,
        etag: &str,
        start: u64,
        len: u64,
    ) -> Result<RangeBody, OriginError>;

    /// Proves the bucket exists and can be listed with these credentials.
    async fn probe(&self, prefix: &str) -> Result<(), OriginError> {
        self.list_page(prefix, None, 1).await.map(|_| ())
    }
}
