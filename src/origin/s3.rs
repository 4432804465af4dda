//! origin::s3: the [`Origin`] of any S3-compatible server.
//!
//! Every GET carries `If-Match`, and the response's ETag is checked too, because some
//! S3-compatible servers (s3s-fs) ignore `If-Match`. Client building and the classification of
//! SDK failures are the crate's one S3 layer ([`crate::s3`]); this file maps them to
//! [`OriginError`] and counts requests and bytes.

use std::sync::Arc;
use std::time::SystemTime;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use futures::StreamExt;

use super::{ListPage, ListedObject, ObjectMeta, Origin, OriginError, RangeBody};
use crate::metrics::Metrics;
use crate::s3::{self, ClientSettings, HasStatus, Kind};

pub struct S3Origin {
    client: aws_sdk_s3::Client,
    /// The same client (and connection pool) with the SDK's retries off, for ranged GETs: fetch
    /// owns their retry policy (budget, resume). Built once instead of a config override on
    /// every request.
    gets: aws_sdk_s3::Client,
    bucket: String,
    metrics: Arc<Metrics>,
}

impl S3Origin {
    /// The origin `bucket` through a client built from `settings`; sends no request.
    pub async fn new(settings: &ClientSettings, bucket: &str, metrics: Arc<Metrics>) -> S3Origin {
        let client = s3::client(settings).await;
        let once = client
            .config()
            .to_builder()
            .retry_config(RetryConfig::disabled());
        S3Origin {
            gets: aws_sdk_s3::Client::from_conf(once.build()),
            client,
            bucket: bucket.to_string(),
            metrics,
        }
    }

    fn classify<E, R>(&self, err: SdkError<E, R>, what: &str) -> OriginError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let f = s3::classify(&err);
        let e = match f.kind {
            Kind::NoSuchBucket => OriginError::NoSuchBucket(self.bucket.clone()),
            Kind::NotFound => OriginError::NotFound(what.to_string()),
            Kind::Auth => OriginError::AccessDenied(f.short()),
            Kind::Precondition => OriginError::EtagChanged {
                expected: "the pinned version".into(),
                actual: "a different version".into(),
            },
            Kind::Unreachable => OriginError::Unreachable(f.text),
            Kind::Retryable => OriginError::Transient(f.text),
            Kind::Other => OriginError::Other(f.text),
        };
        if !matches!(e, OriginError::NotFound(_)) {
            Metrics::inc(&self.metrics.origin_errors);
        }
        e
    }
}

#[async_trait::async_trait]
impl Origin for S3Origin {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    #[tracing::instrument(level = "debug", skip(self), fields(bucket = %self.bucket))]
    async fn head(&self, key: &str) -> Result<ObjectMeta, OriginError> {
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
    async fn list_page(
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
                    etag: o.e_tag().filter(|e| !e.is_empty()).map(str::to_string),
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
    async fn get_range(
        &self,
        key: &str,
        etag: &str,
        start: u64,
        len: u64,
    ) -> Result<RangeBody, OriginError> {
        debug_assert!(len > 0);
        Metrics::inc(&self.metrics.origin_get_requests);
        let out = self
            .gets
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .if_match(etag)
            .range(format!("bytes={}-{}", start, start + len - 1))
            .send()
            .await
            .map_err(|e| match self.classify(e, key) {
                OriginError::EtagChanged { actual, .. } => OriginError::EtagChanged {
                    expected: etag.to_string(),
                    actual,
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
        // Bytes from another place in the object would be served and cached as these: the
        // range must be the one asked for, and a body that says neither where it starts nor how
        // long it is must start at the object's first byte (a server that ignored the range).
        crate::s3::check_range(out.content_range(), start, start + len, None)
            .map_err(OriginError::Other)?;
        if out.content_range().is_none() && got < 0 && start > 0 {
            return Err(OriginError::Other(format!(
                "asked for bytes from {start}, the origin says neither which bytes it sends nor how many"
            )));
        }
        let metrics = self.metrics.clone();
        // A broken body ends the stream after its error.
        let body = futures::stream::unfold(Some(out.body), move |body| {
            let metrics = metrics.clone();
            async move {
                let mut body = body?;
                let piece = match body.try_next().await {
                    Ok(Some(bytes)) => {
                        Metrics::add(&metrics.origin_get_bytes, bytes.len() as u64);
                        Ok(bytes)
                    }
                    Ok(None) => return None,
                    Err(e) => {
                        let e = format!("body read failed: {}", DisplayErrorContext(&e));
                        return Some((Err(OriginError::Transient(e)), None));
                    }
                };
                Some((piece, Some(body)))
            }
        });
        Ok(body.boxed())
    }
}

fn to_system_time(t: Option<&aws_smithy_types::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
