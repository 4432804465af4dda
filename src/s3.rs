//! s3: the one S3 client layer, shared by the origin (`origin::s3`) and the shared cache store
//! (`cachestore::s3`): how a client is built (endpoint, region, credentials, checksums, retries,
//! timeouts) and how an SDK failure is classified ([`Failure`]), so the two users agree on what
//! is retryable, missing, refused or a failed precondition.
//!
//! Knows nothing of chunks, configs or FUSE; its users map a [`Failure`] into their own error.

use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials as StaticCredentials, Region, RequestChecksumCalculation,
    ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// Where the client's credentials come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// The AWS default chain (environment, profile, web identity, instance role), optionally
    /// with a named profile.
    #[default]
    Chain,
    Profile(String),
    /// Fixed keys: nothing is looked up, neither the environment nor the instance metadata.
    Static {
        id: String,
        secret: String,
    },
}

/// Everything a client is built from.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub endpoint_url: Option<String>,
    /// Without one: the AWS chain's, else us-east-1 (what S3-compatible servers accept).
    pub region: Option<String>,
    pub force_path_style: bool,
    pub credentials: Credentials,
    /// Attempts per request by the SDK, the first included.
    pub max_attempts: u32,
    /// First pause between attempts (the SDK's default, 1 s, when None).
    pub initial_backoff: Option<Duration>,
    pub connect_timeout: Duration,
    /// A response (or a piece of its body) that takes longer than this fails.
    pub read_timeout: Duration,
    /// Bound on a whole request, retries included, where one is wanted.
    pub operation_timeout: Option<Duration>,
}

/// Builds a client; sends no request.
pub async fn client(s: &ClientSettings) -> aws_sdk_s3::Client {
    let builder = match &s.credentials {
        Credentials::Static { id, secret } => {
            let region = match &s.region {
                Some(r) => Region::new(r.clone()),
                None => aws_config::default_provider::region::DefaultRegionChain::builder()
                    .build()
                    .region()
                    .await
                    .unwrap_or_else(|| Region::new("us-east-1")),
            };
            aws_sdk_s3::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .region(region)
                .credentials_provider(StaticCredentials::new(id, secret, None, None, "orcafs"))
        }
        chain => {
            let mut loader = aws_config::defaults(BehaviorVersion::latest());
            if let Credentials::Profile(p) = chain {
                loader = loader.profile_name(p);
            }
            if let Some(r) = &s.region {
                loader = loader.region(Region::new(r.clone()));
            }
            let shared = loader.load().await;
            let mut b = aws_sdk_s3::config::Builder::from(&shared);
            if shared.region().is_none() {
                b = b.region(Region::new("us-east-1"));
            }
            b
        }
    };
    let mut timeouts = TimeoutConfig::builder()
        .connect_timeout(s.connect_timeout)
        .read_timeout(s.read_timeout);
    if let Some(t) = s.operation_timeout {
        timeouts = timeouts.operation_attempt_timeout(t).operation_timeout(t);
    }
    let mut b = builder
        .force_path_style(s.force_path_style)
        // Checksums on ranged GETs cannot be validated, and some servers reject the newer
        // checksum headers: only send or check them where S3 requires it.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .timeout_config(timeouts.build());
    let mut retry = RetryConfig::standard().with_max_attempts(s.max_attempts.max(1));
    if let Some(pause) = s.initial_backoff {
        retry = retry.with_initial_backoff(pause);
    }
    b = b.retry_config(retry);
    if let Some(url) = &s.endpoint_url {
        b = b.endpoint_url(url);
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

/// What kind of failure an S3 request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The key (or, for a HEAD of a bucket, the bucket) is not there.
    NotFound,
    NoSuchBucket,
    /// 401/403: the credentials are refused.
    Auth,
    /// 412: `If-Match` failed, the object changed.
    Precondition,
    /// Connecting failed: the endpoint is down or unreachable. Retrying may help.
    Unreachable,
    /// Timeouts, resets, 5xx, throttling: retrying may help.
    Retryable,
    Other,
}

/// A classified S3 failure: its kind, and the text that says what happened.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: Kind,
    /// The HTTP status when the server answered, with its error code.
    pub status: Option<u16>,
    pub code: String,
    pub text: String,
}

impl Failure {
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, Kind::Retryable | Kind::Unreachable)
    }

    /// The error code, else `HTTP <status>`, else the text: short enough for one sentence.
    pub fn short(&self) -> String {
        match (self.code.is_empty(), self.status) {
            (false, _) => self.code.clone(),
            (true, Some(s)) => format!("HTTP {s}"),
            (true, None) => self.text.clone(),
        }
    }
}

/// Error codes that mean "slow down or try again", whatever the status says.
const RETRYABLE_CODES: &[&str] = &[
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalError",
    "ServiceUnavailable",
];

/// Checks `Content-Range: bytes A-B/TOTAL` against the bytes `[start, end)` that were asked
/// for (and TOTAL against the object's size, when known): a server or gateway that answers
/// another range must not have its bytes taken for these. A server that leaves the header out
/// is trusted on Content-Length alone.
pub fn check_range(
    header: Option<&str>,
    start: u64,
    end: u64,
    total: Option<u64>,
) -> Result<(), String> {
    let Some(h) = header else {
        return Ok(());
    };
    let parsed = h.strip_prefix("bytes ").and_then(|r| {
        let (span, size) = r.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?, size))
    });
    let size_ok = |size: &str| total.is_none_or(|t| size == t.to_string());
    match parsed {
        Some((a, b, size)) if a == start && b + 1 == end && size_ok(size) => Ok(()),
        Some((_, _, size)) if !size_ok(size) => Err(format!(
            "the object holds {size} bytes, not {}",
            total.unwrap_or_default()
        )),
        _ => Err(format!(
            "asked for bytes {start}-{}, the server answers {h:?}",
            end - 1
        )),
    }
}

/// Classifies any SDK failure of any S3 operation.
pub fn classify<E, R>(err: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let text = DisplayErrorContext(err).to_string();
    let failure = |kind, status, code: &str| Failure {
        kind,
        status,
        code: code.to_string(),
        text: text.clone(),
    };
    match err {
        SdkError::DispatchFailure(d) if d.is_timeout() => failure(Kind::Retryable, None, ""),
        SdkError::DispatchFailure(_) => failure(Kind::Unreachable, None, ""),
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            failure(Kind::Retryable, None, "")
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status_code();
            let code = s.err().code().unwrap_or("");
            let kind = match (status, code) {
                (_, "NoSuchBucket") => Kind::NoSuchBucket,
                (404, _) | (_, "NoSuchKey" | "NotFound") => Kind::NotFound,
                (401 | 403, _) => Kind::Auth,
                (412, _) | (_, "PreconditionFailed") => Kind::Precondition,
                (s, c) if s >= 500 || s == 429 || RETRYABLE_CODES.contains(&c) => Kind::Retryable,
                _ => Kind::Other,
            };
            failure(kind, Some(status), code)
        }
        _ => failure(Kind::Other, None, ""),
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
