//! origin: the S3 bucket being mounted. HEAD, paginated ListObjectsV2 with a delimiter, and
//! ranged GETs pinned to an ETag.
//!
//! Owns the aws-sdk-s3 client and the translation of SDK failures into [`OriginError`]. Every GET
//! carries `If-Match`, and the response's ETag is checked too, because some S3-compatible servers
//! (s3s-fs) ignore `If-Match`. Knows nothing of chunks' storage, inodes or FUSE.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use crate::config::Config;
use crate::metrics::Metrics;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub etag: String,
    pub size: u64,
    pub last_modified: SystemTime,
}

/// One object in a listing. Some servers omit the ETag in listings, so it is optional.
#[derive(Debug, Clone)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    pub last_modified: SystemTime,
    pub etag: Option<String>,
}

/// One page of ListObjectsV2 with delimiter `/`.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub prefixes: Vec<String>,
    pub objects: Vec<ListedObject>,
    pub next_token: Option<String>,
}

pub struct S3Origin {
    client: aws_sdk_s3::Client,
    bucket: String,
    metrics: Arc<Metrics>,
}

/// A streaming body of a ranged GET.
pub struct RangeBody {
    body: ByteStream,
    metrics: Arc<Metrics>,
}

impl RangeBody {
    /// The next piece of the body, `None` at its end.
    pub async fn next(&mut self) -> Option<Result<Bytes, OriginError>> {
        match self.body.try_next().await {
            Ok(Some(bytes)) => {
                Metrics::add(&self.metrics.origin_get_bytes, bytes.len() as u64);
                Some(Ok(bytes))
            }
            Ok(None) => None,
            Err(e) => Some(Err(OriginError::Transient(format!(
                "body read failed: {}",
                DisplayErrorContext(&e)
            )))),
        }
    }
}

impl S3Origin {
    pub async fn new(cfg: &Config, metrics: Arc<Metrics>) -> S3Origin {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.force_path_style)
            // Checksums on ranged GETs cannot be validated, and some servers reject the
            // newer checksum headers: only send or check them where S3 requires it.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(cfg.origin_max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.origin_timeout.min(Duration::from_secs(10)))
                    .read_timeout(cfg.origin_timeout)
                    .build(),
            );
        if let Some(url) = &cfg.endpoint_url {
            b = b.endpoint_url(url);
        }
        S3Origin {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            metrics,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Proves the bucket exists and can be listed with these credentials.
    pub async fn probe(&self, prefix: &str) -> Result<(), OriginError> {
        self.list_page(prefix, None, 1).await.map(|_| ())
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    pub async fn head(&self, key: &str) -> Result<ObjectMeta, OriginError> {
        Metrics::inc(&self.metrics.origin_head_requests);
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.classify(e, key))?;
        Ok(ObjectMeta {
            etag: out.e_tag().unwrap_or_default().to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            last_modified: to_system_time(out.last_modified()),
        })
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    pub async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: i32,
    ) -> Result<ListPage, OriginError> {
        Metrics::inc(&self.metrics.origin_list_requests);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .delimiter("/")
            .max_keys(max_keys)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| self.classify(e, prefix))?;
        let prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_string))
            .collect();
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ListedObject {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified: to_system_time(o.last_modified()),
                    etag: o.e_tag().map(str::to_string),
                })
            })
            .collect();
        let next_token = match out.is_truncated() {
            Some(true) => out.next_continuation_token().map(str::to_string),
            _ => None,
        };
        Ok(ListPage {
            prefixes,
            objects,
            next_token,
        })
    }

    /// GET bytes `[start, start+len)` of `key`, only if its ETag is still `etag`.
    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    pub async fn get_range(
        &self,
        key: &str,
        etag: &str,
        start: u64,
        len: u64,
    ) -> Result<RangeBody, OriginError> {
        debug_assert!(len > 0);
        Metrics::inc(&self.metrics.origin_get_requests);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .if_match(etag)
            .range(format!("bytes={}-{}", start, start + len - 1))
            // fetch owns the retry policy of GETs (budget, resume), so the SDK tries once.
            .customize()
            .config_override(
                aws_sdk_s3::config::Builder::default().retry_config(RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| match self.classify(e, key) {
                // 412: the If-Match failed, the object was replaced.
                OriginError::Other(m) if m.starts_with("412") => OriginError::EtagChanged {
                    expected: etag.to_string(),
                    actual: "a different version".into(),
                },
                other => other,
            })?;
        let actual = out.e_tag().unwrap_or_default();
        if actual != etag {
            return Err(OriginError::EtagChanged {
                expected: etag.to_string(),
                actual: actual.to_string(),
            });
        }
        let got = out.content_length().unwrap_or(-1);
        if got >= 0 && got as u64 != len {
            return Err(OriginError::Other(format!(
                "asked for {len} bytes at {start}, origin answers {got}"
            )));
        }
        Ok(RangeBody {
            body: out.body,
            metrics: self.metrics.clone(),
        })
    }

    fn classify<E, R>(&self, err: SdkError<E, R>, what: &str) -> OriginError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let text = DisplayErrorContext(&err).to_string();
        let e = match &err {
            SdkError::DispatchFailure(d) if d.is_timeout() => OriginError::Transient(text),
            SdkError::DispatchFailure(d) if d.is_io() => OriginError::Unreachable(text),
            SdkError::DispatchFailure(_) => OriginError::Unreachable(text),
            SdkError::TimeoutError(_) => OriginError::Transient(text),
            SdkError::ResponseError(_) => OriginError::Transient(text),
            SdkError::ServiceError(s) => {
                let status = s.raw().status_code();
                let code = s.err().code().unwrap_or("");
                match (status, code) {
                    (_, "NoSuchBucket") => OriginError::NoSuchBucket(self.bucket.clone()),
                    (404, _) | (_, "NoSuchKey") => OriginError::NotFound(what.to_string()),
                    (401 | 403, _) => OriginError::AccessDenied(if code.is_empty() {
                        format!("HTTP {status}")
                    } else {
                        code.to_string()
                    }),
                    (s, _) if s >= 500 || code == "SlowDown" => OriginError::Transient(text),
                    (s, _) => OriginError::Other(format!("{s} {code}: {text}")),
                }
            }
            _ => OriginError::Other(text),
        };
        if !matches!(e, OriginError::NotFound(_)) {
            Metrics::inc(&self.metrics.origin_errors);
        }
        e
    }
}

/// The HTTP status of a raw response, whatever the SDK's response type.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn to_system_time(t: Option<&aws_smithy_types::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
