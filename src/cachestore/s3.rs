//! s3: the shared store, a bucket (or a prefix of one) on any S3-compatible server, written by
//! every orcafs host of a site so that a chunk fetched once from the origin is fetched from here
//! by the others.
//!
//! One object per chunk, at `<prefix><origin id>/<object hash>/<index>`: the origin id sanitized
//! to `[A-Za-z0-9._-]`, the object hash the hex SHA-256 of the length-prefixed (origin id, bucket,
//! key, ETag) and the chunk size, the index in decimal. The body is the raw chunk; user metadata
//! carries what makes it verifiable: `orcafs-id` (the [`ChunkKey::id`]), `orcafs-len`,
//! `orcafs-block` (the block size, a power of two ≥ 64 KiB chosen so a chunk has at most 128
//! blocks), `orcafs-tags` (per block, the first 8 bytes of HMAC-SHA256 under the store key over
//! the chunk id, the block index and the block's bytes; base64) and `orcafs-mac` (HMAC-SHA256
//! over the id, length, block size and tags; hex). The store key is derived from a secret every
//! member holds ([`StoreKey`]), so someone who can write to the bucket but holds no secret can
//! neither forge an object nor move a member's object to another key.
//!
//! A read is one ranged GET of the blocks covering the range; the metadata's MAC is checked
//! first, then every block's tag before any of its bytes is yielded. An object that fails
//! (unauthenticated, written with another secret or before objects were authenticated, moved,
//! short, damaged) is never served: it is counted (`shared_rejected`), logged, deleted so the
//! next fill stores it afresh, and read as a miss (or, when a block fails mid-stream, the stream
//! ends with [`StoreError::Corrupt`]).
//!
//! A put is stat-then-put: when an intact copy is already there it reports
//! [`Committed::AlreadyThere`] and uploads nothing. Two hosts racing both upload identical bytes,
//! which S3 makes atomic per object, so that race is harmless. Every request is bounded by the
//! configured timeout with at most two attempts, so a dead or hung store answers
//! [`StoreError::Transient`] within seconds. The self test refuses a versioned bucket (deletes
//! and eviction would only hide old versions, never free them) and then proves
//! read-after-write. Optional active eviction deletes chunks older than a maximum age.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::BucketVersioningStatus;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use super::{check_put, read_after_write, CacheStore, ChunkStream, Committed, Info, StoreError};
use crate::chunk::{ChunkId, ChunkKey};
use crate::config::SharedCacheConfig;
use crate::metrics::Metrics;
use crate::s3::{self, HasStatus, Kind};
use crate::secret::Secret;

/// Smallest block with its own tag.
const MIN_BLOCK: u64 = 64 << 10;
/// Most blocks a chunk has, so `orcafs-tags` stays within S3's 2 KiB of user metadata.
const MAX_BLOCKS: u64 = 128;
/// Bytes of each block's tag: 128 of them are 1368 base64 characters, leaving room for the rest
/// of the metadata under 2 KiB; a forger still has one chance in 2^64 per try, and each try is
/// deleted and counted.
const TAG_LEN: usize = 8;
/// What the store key is derived for; changing it makes every stored object a miss.
const KEY_LABEL: &str = "orcafs shared cache objects v1";
/// Domain separation of the two MACs under the store key.
const TAG_DOMAIN: &[u8] = b"orcafs-block\0";
const MAC_DOMAIN: &[u8] = b"orcafs-meta\0";
/// Deletes in flight during an eviction pass.
const EVICT_PARALLEL: usize = 8;
/// Shortest interval between eviction passes.
const MIN_EVICT_EVERY: Duration = Duration::from_millis(100);

const META_ID: &str = "orcafs-id";
const META_LEN: &str = "orcafs-len";
const META_BLOCK: &str = "orcafs-block";
const META_TAGS: &str = "orcafs-tags";
const META_MAC: &str = "orcafs-mac";
/// The CRC list of objects written before they were authenticated: named only to say so.
const META_CRCS: &str = "orcafs-crcs";

type HmacSha256 = Hmac<Sha256>;

/// The key a store's objects are authenticated with: HMAC-SHA256 under the fleet secret of a
/// fixed label ([`Secret::derive`]), so the cluster's request-signing key is never used as is.
/// Its Debug never shows it.
#[derive(Clone)]
pub struct StoreKey([u8; 32]);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(redacted)")
    }
}

impl StoreKey {
    pub fn from_secret(secret: &Secret) -> StoreKey {
        StoreKey(secret.derive(KEY_LABEL))
    }

    fn mac(&self, domain: &[u8], id: &ChunkId) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        m.update(domain);
        m.update(&id.0);
        m
    }

    /// The MAC state of block `index` of chunk `id`, ready to finalize or verify.
    fn block_mac(&self, id: &ChunkId, index: u64, data: &[u8]) -> HmacSha256 {
        let mut m = self.mac(TAG_DOMAIN, id);
        m.update(&index.to_le_bytes());
        m.update(data);
        m
    }

    /// The MAC state over the metadata fields; `tags` are the raw concatenated tags.
    fn meta_mac(&self, id: &ChunkId, len: u64, block: u64, tags: &[u8]) -> HmacSha256 {
        let mut m = self.mac(MAC_DOMAIN, id);
        m.update(&len.to_le_bytes());
        m.update(&block.to_le_bytes());
        m.update(tags);
        m
    }

    /// The metadata that makes `body` (the whole chunk `key`) verifiable, as put stores it.
    fn sign(&self, key: &ChunkKey, body: &[u8]) -> Vec<(&'static str, String)> {
        let id = key.id();
        let len = body.len() as u64;
        let block = block_size(len);
        let mut tags = Vec::with_capacity(len.div_ceil(block) as usize * TAG_LEN);
        for (i, b) in body.chunks(block as usize).enumerate() {
            let full = self.block_mac(&id, i as u64, b).finalize().into_bytes();
            tags.extend_from_slice(&full[..TAG_LEN]);
        }
        let mac = self
            .meta_mac(&id, len, block, &tags)
            .finalize()
            .into_bytes();
        vec![
            (META_ID, id.to_hex()),
            (META_LEN, len.to_string()),
            (META_BLOCK, block.to_string()),
            (META_TAGS, aws_smithy_types::base64::encode(&tags)),
            (META_MAC, hex::encode(mac)),
        ]
    }
}

/// The shared store over one bucket and prefix.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    timeout: Duration,
    max_age: Option<Duration>,
    required: bool,
    key: StoreKey,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What a HEAD or GET found about a stored chunk object, once authenticated.
#[derive(Debug)]
struct Meta {
    block: u64,
    /// `TAG_LEN` bytes per block.
    tags: Vec<u8>,
    committed: SystemTime,
}

/// What a HEAD found.
enum Found {
    Absent,
    Good(Meta),
    /// There, but failed a check: why.
    Bad(String),
}

impl S3Store {
    /// Builds the client; no request is sent (that is [`CacheStore::self_test`]'s job). Objects
    /// are written and checked with `key`; rejected ones are counted in `metrics`.
    pub async fn new(cfg: &SharedCacheConfig, key: StoreKey, metrics: Arc<Metrics>) -> S3Store {
        S3Store {
            client: s3::client(&cfg.client()).await,
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            max_age: cfg.max_age,
            required: cfg.required,
            key,
            metrics,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The normalized prefix (empty, or ending in `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether a failed self test must stop the mount (`required`, default true).
    pub fn required(&self) -> bool {
        self.required
    }

    /// The configured `max_age` of active eviction, if any.
    pub fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    /// The object key of a chunk: `<prefix><origin id>/<object hash>/<index>`.
    pub fn object_key(&self, key: &ChunkKey) -> String {
        object_key(&self.prefix, key)
    }

    /// One eviction pass: deletes this store's chunks whose commit time is older than `max_age`;
    /// returns how many. Only keys of the chunk layout under the prefix are considered, so other
    /// objects in the bucket are never touched.
    pub async fn evict_older_than(&self, max_age: Duration) -> Result<u64, StoreError> {
        let mut token = None;
        let mut deleted = 0u64;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.classify(e, "list"))?;
            let now = SystemTime::now();
            let victims: Vec<String> = page
                .contents()
                .iter()
                .filter_map(|o| {
                    let key = o.key()?;
                    let rest = key.strip_prefix(self.prefix.as_str())?;
                    if !is_chunk_path(rest) {
                        return None;
                    }
                    let modified = SystemTime::try_from(*o.last_modified()?).ok()?;
                    let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
                    (age >= max_age).then(|| key.to_string())
                })
                .collect();
            let mut results = futures::stream::iter(victims)
                .map(|k| async move { self.delete_object(&k).await })
                .buffer_unordered(EVICT_PARALLEL);
            while let Some(r) = results.next().await {
                r?;
                deleted += 1;
            }
            match (page.is_truncated(), page.next_continuation_token()) {
                (Some(true), Some(t)) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(deleted)
    }

    /// Runs [`S3Store::evict_older_than`] every `every` (at least 100 ms; the first pass at once)
    /// on a tokio task. The task stops when it is aborted or when the store is dropped: it holds
    /// the store weakly. Dropping the handle alone detaches the task (tokio semantics), so
    /// `abort()` it to stop eviction while the store lives.
    pub fn spawn_eviction(
        self: &Arc<Self>,
        max_age: Duration,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let weak: Weak<S3Store> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(MIN_EVICT_EVERY));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else {
                    return;
                };
                match store.evict_older_than(max_age).await {
                    Ok(0) => {
                        tracing::debug!(bucket = %store.bucket, "shared cache eviction: nothing to evict")
                    }
                    Ok(n) => {
                        tracing::info!(bucket = %store.bucket, evicted = n, ?max_age, "shared cache eviction")
                    }
                    Err(e) => {
                        tracing::warn!(bucket = %store.bucket, error = %e, "shared cache eviction failed")
                    }
                }
            }
        })
    }

    async fn delete_object(&self, object: &str) -> Result<(), StoreError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(object)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(self.classify(e, object)),
        }
    }

    /// HEAD the chunk's object and check its metadata against the key and the store key:
    /// `Good` only for an authentic copy (as far as HEAD can tell: the block tags are checked by
    /// reads).
    async fn head(&self, key: &ChunkKey) -> Result<Found, StoreError> {
        let object = self.object_key(key);
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&object)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if is_missing(&e) => return Ok(Found::Absent),
            Err(e) => return Err(self.classify(e, &object)),
        };
        let meta = match check_meta(&self.key, key, out.metadata(), out.last_modified()) {
            Ok(meta) => meta,
            Err(why) => return Ok(Found::Bad(why)),
        };
        let stored = out.content_length().unwrap_or(-1);
        if stored != key.len() as i64 {
            let why = format!("object holds {stored} bytes, the chunk has {}", key.len());
            return Ok(Found::Bad(why));
        }
        Ok(Found::Good(meta))
    }

    /// Counts and logs an object that failed a check; it is never served.
    fn count_rejected(&self, object: &str, why: &str) {
        Metrics::inc(&self.metrics.shared_rejected);
        tracing::warn!(
            bucket = %self.bucket,
            object,
            why,
            "shared cache object rejected: not written by a member holding this secret, or damaged"
        );
    }

    /// Rejects an object and deletes it, so the next fill stores it afresh (best effort).
    async fn reject(&self, object: &str, why: &str) {
        self.count_rejected(object, why);
        if let Err(e) = self.delete_object(object).await {
            tracing::warn!(bucket = %self.bucket, object, error = %e, "cannot delete a rejected shared cache object");
        }
    }

    fn classify<E, R>(&self, err: SdkError<E, R>, what: &str) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        classify(&self.bucket, err, what)
    }
}

/// The decision on a bucket's versioning status: only an unversioned bucket will do. A bucket
/// whose versioning is suspended still keeps the versions written while it was enabled, and
/// cannot become unversioned again, so it is refused too. `None` (never enabled, or a server
/// without versioning) is accepted.
pub fn check_versioning(
    bucket: &str,
    status: Option<&BucketVersioningStatus>,
) -> Result<(), StoreError> {
    let what = match status {
        None => return Ok(()),
        Some(BucketVersioningStatus::Enabled) => "has versioning enabled",
        Some(BucketVersioningStatus::Suspended) => {
            "has versioning suspended (it was enabled once, so it still keeps old versions)"
        }
        Some(other) if other.as_str().is_empty() => return Ok(()),
        Some(_) => "reports an unknown versioning status",
    };
    Err(StoreError::Other(format!(
        "shared cache bucket {bucket:?} {what}; orcafs needs an unversioned bucket, because on a \
         versioned one deleted and evicted chunks only become hidden old versions that are never \
         freed. Use a bucket that never had versioning enabled."
    )))
}

#[async_trait::async_trait]
impl CacheStore for S3Store {
    fn name(&self) -> &str {
        "s3"
    }

    async fn get_chunk(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<ChunkStream>, StoreError> {
        let klen = key.len();
        let end = offset.saturating_add(len).min(klen);
        if offset >= end {
            // Nothing to read; still tell a miss (or a bad object) from a hit.
            return match self.head(key).await? {
                Found::Good(_) => Ok(Some(Box::pin(futures::stream::empty()))),
                Found::Absent => Ok(None),
                Found::Bad(why) => {
                    self.reject(&self.object_key(key), &why).await;
                    Ok(None)
                }
            };
        }
        let block = block_size(klen);
        let first = offset / block;
        let last = (end - 1) / block;
        let span_start = first * block;
        let span_end = ((last + 1) * block).min(klen);
        let object = self.object_key(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object)
            .range(format!("bytes={}-{}", span_start, span_end - 1))
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(SdkError::ServiceError(s)) if s.raw().status().as_u16() == 416 => {
                let why = "object is shorter than the chunk (range not satisfiable)";
                self.reject(&object, why).await;
                return Ok(None);
            }
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(self.classify(e, &object)),
        };
        let whole = span_start == 0 && span_end == klen;
        if out.content_range().is_none() && !whole && out.content_length() == Some(klen as i64) {
            // The whole object instead of the range: a server that ignores Range, not damage.
            return Err(StoreError::Other(format!(
                "{}/{object}: the store ignored the Range header",
                self.bucket
            )));
        }
        let checked =
            check_meta(&self.key, key, out.metadata(), out.last_modified()).and_then(|meta| {
                crate::s3::check_range(out.content_range(), span_start, span_end, Some(klen))?;
                let got = out.content_length().unwrap_or(-1);
                if got != (span_end - span_start) as i64 {
                    return Err(format!(
                        "asked for {} bytes at {span_start}, the store answers {got}",
                        span_end - span_start
                    ));
                }
                Ok(meta)
            });
        let meta = match checked {
            Ok(meta) => meta,
            Err(why) => {
                self.reject(&object, &why).await;
                return Ok(None);
            }
        };
        let reader = BlockReader {
            store: self.clone_handle(),
            id: key.id(),
            object,
            body: out.body,
            pending: BytesMut::new(),
            block: meta.block,
            next: first,
            last,
            klen,
            want: (offset, end),
            tags: meta.tags,
        };
        Ok(Some(Box::pin(futures::stream::unfold(
            Some(reader),
            |state| async move {
                let mut reader = state?;
                match reader.next_block().await {
                    Some(Ok(bytes)) => Some((Ok(bytes), Some(reader))),
                    Some(Err(e)) => Some((Err(e), None)),
                    None => None,
                }
            },
        ))))
    }

    async fn put_chunk(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
    ) -> Result<Committed, StoreError> {
        check_put(key, size, &data)?;
        match self.head(key).await? {
            Found::Good(_) => return Ok(Committed::AlreadyThere),
            Found::Absent => {}
            // Replaced by the upload below, so not deleted first.
            Found::Bad(why) => self.count_rejected(&self.object_key(key), &why),
        }
        let body = match <[Bytes; 1]>::try_from(data) {
            Ok([one]) => one,
            Err(pieces) => {
                let mut buf = BytesMut::with_capacity(size as usize);
                for p in &pieces {
                    buf.extend_from_slice(p);
                }
                buf.freeze()
            }
        };
        let object = self.object_key(key);
        // SHA-256 over a whole chunk takes milliseconds: keep it off the async workers.
        let (store_key, chunk, whole) = (self.key.clone(), key.clone(), body.clone());
        let metadata: HashMap<String, String> =
            tokio::task::spawn_blocking(move || store_key.sign(&chunk, &whole))
                .await
                .map_err(|e| StoreError::Other(format!("signing {object}: {e}")))?
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&object)
            .content_length(size as i64)
            .content_type("application/octet-stream")
            .set_metadata(Some(metadata))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.classify(e, &object))?;
        Ok(Committed::Stored)
    }

    async fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, StoreError> {
        match self.head(key).await? {
            Found::Good(meta) => Ok(Some(Info {
                size: key.len(),
                committed: meta.committed,
            })),
            Found::Absent => Ok(None),
            Found::Bad(why) => {
                self.reject(&self.object_key(key), &why).await;
                Ok(None)
            }
        }
    }

    async fn delete(&self, key: &ChunkKey) -> Result<(), StoreError> {
        self.delete_object(&self.object_key(key)).await
    }

    async fn self_test(&self) -> Result<(), StoreError> {
        // Some servers (s3s-fs) create a missing bucket on the first put: ask first.
        if let Err(e) = self.client.head_bucket().bucket(&self.bucket).send().await {
            if is_missing(&e) {
                return Err(StoreError::Other(format!(
                    "shared cache bucket {:?} does not exist at this endpoint",
                    self.bucket
                )));
            }
            return Err(self.classify(e, ""));
        }
        let status = match self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => out.status().cloned(),
            Err(e) => {
                let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("");
                let status = e.raw_response().map(|r| r.status().as_u16());
                if code == "NotImplemented" || status == Some(501) {
                    // A server without versioning (s3s-fs): unversioned by construction.
                    tracing::debug!(bucket = %self.bucket, "the shared store does not implement versioning");
                    None
                } else {
                    return Err(match self.classify(e, "versioning") {
                        StoreError::Auth(m) => StoreError::Auth(format!(
                            "{m}: checking that shared cache bucket {:?} is unversioned needs \
                             s3:GetBucketVersioning",
                            self.bucket
                        )),
                        other => other,
                    });
                }
            }
        };
        check_versioning(&self.bucket, status.as_ref())?;
        read_after_write(self).await
    }
}

impl S3Store {
    /// What a body reader needs of the store (the client is a cheap handle).
    fn clone_handle(&self) -> S3Store {
        S3Store {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            timeout: self.timeout,
            max_age: self.max_age,
            required: self.required,
            key: self.key.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Reads a ranged GET body block by block, yielding each block's part of the wanted range only
/// after its tag matched.
struct BlockReader {
    store: S3Store,
    id: ChunkId,
    object: String,
    body: ByteStream,
    pending: BytesMut,
    block: u64,
    /// Next block to read, and the last one.
    next: u64,
    last: u64,
    klen: u64,
    /// `[from, to)` inside the chunk.
    want: (u64, u64),
    tags: Vec<u8>,
}

impl BlockReader {
    async fn next_block(&mut self) -> Option<Result<Bytes, StoreError>> {
        if self.next > self.last {
            return None;
        }
        let start = self.next * self.block;
        let end = (start + self.block).min(self.klen);
        let need = (end - start) as usize;
        while self.pending.len() < need {
            let piece = tokio::time::timeout(self.store.timeout, self.body.try_next()).await;
            match piece {
                Ok(Ok(Some(bytes))) => self.pending.extend_from_slice(&bytes),
                Ok(Ok(None)) => {
                    let why = format!(
                        "body ended at {} bytes into block {} of {need}",
                        self.pending.len(),
                        self.next
                    );
                    self.store.reject(&self.object, &why).await;
                    return Some(Err(corrupt(&self.object, &why)));
                }
                Ok(Err(e)) => {
                    return Some(Err(StoreError::Transient(format!(
                        "reading {}/{}: {}",
                        self.store.bucket,
                        self.object,
                        DisplayErrorContext(&e)
                    ))))
                }
                Err(_) => {
                    return Some(Err(StoreError::Transient(format!(
                        "reading {}/{}: body stalled for {:?}",
                        self.store.bucket, self.object, self.store.timeout
                    ))))
                }
            }
        }
        let data = self.pending.split_to(need).freeze();
        let i = self.next as usize;
        let authentic = self
            .store
            .key
            .block_mac(&self.id, self.next, &data)
            .verify_truncated_left(&self.tags[i * TAG_LEN..(i + 1) * TAG_LEN])
            .is_ok();
        if !authentic {
            let why = format!("block {} does not match its tag", self.next);
            self.store.reject(&self.object, &why).await;
            return Some(Err(corrupt(&self.object, &why)));
        }
        self.next += 1;
        let from = self.want.0.max(start) - start;
        let to = self.want.1.min(end) - start;
        Some(Ok(data.slice(from as usize..to as usize)))
    }
}

fn classify<E, R>(bucket: &str, err: SdkError<E, R>, what: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let f = s3::classify(&err);
    let text = format!("{bucket}/{what}: {}", f.text);
    match f.kind {
        Kind::NoSuchBucket => StoreError::Other(format!(
            "shared cache bucket {bucket:?} does not exist at this endpoint"
        )),
        Kind::NotFound => StoreError::Other(format!("{text}: not found")),
        Kind::Auth => StoreError::Auth(text),
        Kind::Retryable | Kind::Unreachable => StoreError::Transient(text),
        Kind::Precondition | Kind::Other => StoreError::Other(text),
    }
}

/// A 404: the object is absent (a miss, not a failure).
fn is_missing<E, R>(err: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    s3::classify(err).kind == Kind::NotFound
}

fn corrupt(object: &str, why: &str) -> StoreError {
    StoreError::Corrupt(format!("{object}: {why}"))
}

/// The block size of a chunk of `len` bytes: the smallest power of two ≥ 64 KiB that cuts it
/// into at most 128 blocks.
pub fn block_size(len: u64) -> u64 {
    len.div_ceil(MAX_BLOCKS).next_power_of_two().max(MIN_BLOCK)
}

/// `[A-Za-z0-9._-]` kept, anything else `_`; never empty, `.` or `..`.
pub fn sanitize_origin_id(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.chars().all(|c| c == '.') {
        // Empty, `.` or `..`: not a usable path segment.
        format!("_{s}")
    } else {
        s
    }
}

/// `<prefix><sanitized origin id>/<object hash>/<index>`; `prefix` is used as given.
pub fn object_key(prefix: &str, key: &ChunkKey) -> String {
    let o = &key.object;
    let mut h = Sha256::new();
    for field in [&*o.origin_id, &*o.bucket, &*o.key, &*o.etag] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    h.update(key.chunk_size.to_le_bytes());
    format!(
        "{prefix}{}/{}/{}",
        sanitize_origin_id(&o.origin_id),
        hex::encode(h.finalize()),
        key.index
    )
}

/// Whether a key (below the prefix) has the layout of a chunk object.
fn is_chunk_path(rest: &str) -> bool {
    let mut parts = rest.split('/');
    let (Some(origin), Some(hash), Some(index), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !origin.is_empty()
        && hash.len() == 64
        && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
}

fn meta_get<'a>(meta: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    meta.get(name)
        .or_else(|| {
            meta.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .map(String::as_str)
}

/// Authenticates an object's user metadata with the store key, then checks it against the
/// chunk it should hold. The error says why, for the log (never key material).
fn check_meta(
    store_key: &StoreKey,
    key: &ChunkKey,
    meta: Option<&HashMap<String, String>>,
    last_modified: Option<&aws_smithy_types::DateTime>,
) -> Result<Meta, String> {
    let meta = meta.ok_or("no orcafs metadata")?;
    let field = |name: &str| meta_get(meta, name).ok_or(format!("no {name} metadata"));
    if meta_get(meta, META_MAC).is_none() && meta_get(meta, META_CRCS).is_some() {
        return Err(format!(
            "no {META_MAC}: written before shared objects were authenticated, or by a non-member"
        ));
    }
    let mac = field(META_MAC)?;
    let mut mac_raw = [0u8; 32];
    hex::decode_to_slice(mac, &mut mac_raw).map_err(|_| format!("bad {META_MAC}"))?;
    let id = field(META_ID)?;
    let id_raw = ChunkId::from_hex(id).ok_or(format!("bad {META_ID}"))?;
    let len: u64 = field(META_LEN)?
        .parse()
        .map_err(|_| format!("bad {META_LEN}"))?;
    let block: u64 = field(META_BLOCK)?
        .parse()
        .map_err(|_| format!("bad {META_BLOCK}"))?;
    let tags = aws_smithy_types::base64::decode(field(META_TAGS)?)
        .map_err(|_| format!("bad {META_TAGS}"))?;
    store_key
        .meta_mac(&id_raw, len, block, &tags)
        .verify_slice(&mac_raw)
        .map_err(|_| {
            format!("{META_MAC} does not match: written by a non-member, or with another secret")
        })?;
    // Authentic from here on: what is left catches a member's object under another key.
    if id_raw != key.id() {
        return Err(format!("holds chunk {id}, not this one (moved or swapped)"));
    }
    if len != key.len() {
        return Err(format!("{META_LEN} is {len}, the chunk has {}", key.len()));
    }
    if block != block_size(len) {
        return Err(format!(
            "{META_BLOCK} is {block}, expected {}",
            block_size(len)
        ));
    }
    let blocks = len.div_ceil(block) as usize;
    if tags.len() != blocks * TAG_LEN {
        return Err(format!("{META_TAGS} does not hold {blocks} tags"));
    }
    let committed = last_modified
        .and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(Meta {
        block,
        tags,
        committed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ObjectVersion;

    fn key(origin: &str, size: u64, chunk: u64, index: u64) -> ChunkKey {
        ChunkKey::new(
            Arc::new(ObjectVersion {
                origin_id: origin.into(),
                bucket: "b".into(),
                key: "dir/file".into(),
                etag: "\"e\"".into(),
                size,
            }),
            chunk,
            index,
        )
    }

    #[test]
    fn block_size_keeps_at_most_128_blocks() {
        assert_eq!(block_size(0), MIN_BLOCK);
        assert_eq!(block_size(1), MIN_BLOCK);
        assert_eq!(block_size(8 << 20), 64 << 10);
        assert_eq!(block_size((8 << 20) + 1), 128 << 10);
        assert_eq!(block_size(1 << 30), 8 << 20);
        for len in [1u64, 4095, 65536, 8 << 20, 9 << 20, (1 << 30) - 7, 1 << 30] {
            let b = block_size(len);
            assert!(b.is_power_of_two() && b >= MIN_BLOCK);
            assert!(len.div_ceil(b) <= MAX_BLOCKS, "{len}");
        }
    }

    #[test]
    fn object_keys() {
        let k = key("http://127.0.0.1:9000 us-east-1", 100, 64, 1);
        let o = object_key("pre/", &k);
        let parts: Vec<&str> = o.split('/').collect();
        assert_eq!(parts[0], "pre");
        assert_eq!(parts[1], "http___127.0.0.1_9000_us-east-1");
        assert_eq!(parts[2].len(), 64);
        assert_eq!(parts[3], "1");
        assert!(is_chunk_path(o.strip_prefix("pre/").unwrap()));
        // The object hash does not depend on the index; the key does.
        let k2 = key("http://127.0.0.1:9000 us-east-1", 100, 64, 0);
        let o2 = object_key("pre/", &k2);
        assert_eq!(
            o2.rsplit_once('/').unwrap().0,
            o.rsplit_once('/').unwrap().0
        );
        assert_ne!(o, o2);
        assert_eq!(sanitize_origin_id(""), "_");
        assert_eq!(sanitize_origin_id(".."), "_..");
        assert_eq!(sanitize_origin_id("a/b"), "a_b");
        assert!(!is_chunk_path("x/abc/1"));
        assert!(!is_chunk_path(&format!("x/{}/1/2", "a".repeat(64))));
        assert!(!is_chunk_path(&format!("x/{}/z", "a".repeat(64))));
    }

    #[test]
    fn versioning_decision() {
        assert!(check_versioning("b", None).is_ok());
        for s in [
            BucketVersioningStatus::Enabled,
            BucketVersioningStatus::Suspended,
        ] {
            match check_versioning("b", Some(&s)) {
                Err(StoreError::Other(m)) => {
                    assert!(m.contains("versioning") && m.contains("unversioned"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    fn store_key(secret: &[u8]) -> StoreKey {
        StoreKey::from_secret(&Secret::from_bytes(secret))
    }

    fn as_map(fields: Vec<(&'static str, String)>) -> HashMap<String, String> {
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// The derivation, the tag and the MAC, pinned (computed independently with Python's hmac):
    /// changing any of them turns every stored object into a miss.
    #[test]
    fn format_is_pinned() {
        let k = store_key(b"orcafs test secret");
        assert_eq!(
            hex::encode(k.0),
            "9561e0c65e7b6ae5a91d66e7784394d63bfd572db26790bcf88cb03b8ef8f163"
        );
        let id = ChunkId([7; 32]);
        let tag = k.block_mac(&id, 1, b"abc").finalize().into_bytes();
        assert_eq!(hex::encode(&tag[..TAG_LEN]), "6212f1b50b1e9f03");
        let tags: Vec<u8> = (1..=8).collect();
        let mac = k.meta_mac(&id, 3, 65536, &tags).finalize().into_bytes();
        assert_eq!(
            hex::encode(mac),
            "6eea43ba591ee532b8ba8b2e84f9fede4d6722602ac8e39b381d61e9eca8f6ae"
        );
        assert_eq!(format!("{k:?}"), "StoreKey(redacted)");
    }

    /// 128 blocks (the most a chunk has) with the longest length and block size still fit S3's
    /// 2 KiB of user metadata (names and values, as AWS counts it).
    #[test]
    fn metadata_fits_in_2_kib() {
        let len = MAX_BLOCKS * MIN_BLOCK;
        let k = key("o", len, len, 0);
        let fields = store_key(b"s").sign(&k, &vec![0u8; len as usize]);
        let size: usize = fields.iter().map(|(n, v)| n.len() + v.len()).sum();
        // The largest chunk (1 GiB) has a 10-digit length and a 7-digit block size.
        let worst = size + (10 - len.to_string().len()) + (7 - MIN_BLOCK.to_string().len());
        assert!(worst <= 2048, "{worst} bytes of metadata");
        assert_eq!(fields[3].1.len(), 1368, "128 tags in base64");
    }

    #[test]
    fn metadata_checks() {
        let sk = store_key(b"fleet secret");
        let k = key("o", 200_000, 1 << 20, 0);
        let body = vec![5u8; 200_000];
        let good = || as_map(sk.sign(&k, &body));
        let meta = check_meta(&sk, &k, Some(&good()), None).unwrap();
        assert_eq!((meta.block, meta.tags.len()), (65536, 4 * TAG_LEN));
        assert!(check_meta(&sk, &k, None, None).is_err());

        // Another secret: the MAC does not match.
        let e = check_meta(&store_key(b"other secret"), &k, Some(&good()), None).unwrap_err();
        assert!(e.contains("another secret"), "{e}");
        // Any field changed, even to another member's plausible value, breaks the MAC.
        let other_tags = as_map(sk.sign(&k, &vec![6u8; 200_000]))[META_TAGS].clone();
        for (field, value) in [
            (META_ID, "00".repeat(32)),
            (META_LEN, "199999".into()),
            (META_BLOCK, "131072".into()),
            (META_TAGS, other_tags),
            (META_TAGS, "AAAA".into()),
            (META_MAC, "00".repeat(32)),
            (META_MAC, "zz".into()),
        ] {
            let mut m = good();
            m.insert(field.to_string(), value);
            assert!(check_meta(&sk, &k, Some(&m), None).is_err(), "{field}");
        }
        for field in [META_ID, META_LEN, META_BLOCK, META_TAGS, META_MAC] {
            let mut m = good();
            m.remove(field);
            assert!(check_meta(&sk, &k, Some(&m), None).is_err(), "{field}");
        }
        // An object of the format before authentication.
        let mut old = good();
        old.remove(META_MAC);
        old.remove(META_TAGS);
        old.insert(META_CRCS.to_string(), "0000000a".repeat(4));
        let e = check_meta(&sk, &k, Some(&old), None).unwrap_err();
        assert!(
            e.contains("before shared objects were authenticated"),
            "{e}"
        );
        // A member's authentic object under another chunk's key.
        let other = key("o", 200_000, 1 << 20, 1);
        let e = check_meta(&sk, &other, Some(&good()), None).unwrap_err();
        assert!(e.contains("moved or swapped"), "{e}");
    }

    #[test]
    fn content_range_checks() {
        use crate::s3::check_range;
        assert!(check_range(None, 0, 10, Some(10)).is_ok());
        assert!(check_range(Some("bytes 0-9/10"), 0, 10, Some(10)).is_ok());
        assert!(check_range(Some("bytes 0-9/11"), 0, 10, Some(10)).is_err());
        assert!(check_range(Some("bytes 0-9/11"), 0, 10, None).is_ok());
        assert!(check_range(Some("bytes 1-9/10"), 0, 10, Some(10)).is_err());
        assert!(check_range(Some("bytes 1-10/10"), 0, 10, None).is_err());
        assert!(check_range(Some("junk"), 0, 10, None).is_err());
    }
}
