//! origin::fault: an in-memory [`Origin`] with injected faults, for fast tests of everything
//! above the origin (fetch, namespace) without a kernel or a server.
//!
//! Objects are put and replaced by the test (each version gets a new ETag). Faults are queued
//! with [`FaultOrigin::inject`] and taken one per GET, in order: a retryable failure, a final
//! one, a body that breaks or hangs after some bytes, a slow first byte, or a replacement of the
//! object just before the GET (the If-Match then fails, as at a real server). Every request and
//! every body byte delivered is counted, so dedup claims can be checked at the origin.
//!
//! Not for production use; it is public so the crate's integration tests can use it too.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;

use super::{ListPage, ListedObject, ObjectMeta, Origin, OriginError, RangeBody};

/// What the next GET meets.
#[derive(Debug, Clone)]
pub enum Fault {
    /// A 503 before any byte (retryable).
    Unavailable,
    /// A 403 (final).
    Denied,
    /// The body delivers this many bytes, then breaks.
    CutAfter(u64),
    /// The body delivers this many bytes, then never delivers another.
    StallAfter(u64),
    /// The response waits this long before answering.
    Delay(Duration),
    /// The object is replaced by these bytes just before the GET is answered.
    ReplaceWith(Bytes),
}

struct Object {
    data: Bytes,
    etag: String,
    modified: SystemTime,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Object>,
    faults: VecDeque<Fault>,
    versions: u64,
}

/// Requests and bytes the origin served.
#[derive(Debug, Default)]
pub struct Counts {
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    pub gets: AtomicU64,
    /// Body bytes delivered by GETs.
    pub get_bytes: AtomicU64,
}

pub struct FaultOrigin {
    bucket: String,
    state: Mutex<State>,
    counts: Arc<Counts>,
    /// Body pieces are at most this long, as a server streams them.
    piece: usize,
}

impl FaultOrigin {
    pub fn new(bucket: &str) -> FaultOrigin {
        FaultOrigin {
            bucket: bucket.to_string(),
            state: Mutex::new(State::default()),
            counts: Arc::new(Counts::default()),
            piece: 64 << 10,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores (or replaces) an object; returns its new ETag.
    pub fn put(&self, key: &str, data: impl Into<Bytes>) -> String {
        put(&mut self.lock(), key, data.into())
    }

    /// Stores an object the way an origin without ETags does: none in listings, an empty one
    /// from HEAD.
    pub fn put_without_etag(&self, key: &str, data: impl Into<Bytes>) {
        let mut state = self.lock();
        put(&mut state, key, data.into());
        if let Some(o) = state.objects.get_mut(key) {
            o.etag.clear();
        }
    }

    pub fn remove(&self, key: &str) {
        self.lock().objects.remove(key);
    }

    /// Queues a fault for the next GET that has none yet.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    pub fn lists(&self) -> u64 {
        self.counts.lists.load(Ordering::Relaxed)
    }

    pub fn heads(&self) -> u64 {
        self.counts.heads.load(Ordering::Relaxed)
    }

    pub fn gets(&self) -> u64 {
        self.counts.gets.load(Ordering::Relaxed)
    }

    pub fn get_bytes(&self) -> u64 {
        self.counts.get_bytes.load(Ordering::Relaxed)
    }

    fn not_found(key: &str) -> OriginError {
        OriginError::NotFound(key.to_string())
    }
}

fn put(state: &mut State, key: &str, data: Bytes) -> String {
    state.versions += 1;
    let etag = format!("\"v{}\"", state.versions);
    state.objects.insert(
        key.to_string(),
        Object {
            data,
            etag: etag.clone(),
            modified: SystemTime::now(),
        },
    );
    etag
}

#[async_trait::async_trait]
impl Origin for FaultOrigin {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, OriginError> {
        self.counts.heads.fetch_add(1, Ordering::Relaxed);
        let state = self.lock();
        let o = state.objects.get(key).ok_or_else(|| Self::not_found(key))?;
        Ok(ObjectMeta {
            etag: o.etag.clone(),
            size: o.data.len() as u64,
            last_modified: o.modified,
        })
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max_keys: i32,
    ) -> Result<ListPage, OriginError> {
        self.counts.lists.fetch_add(1, Ordering::Relaxed);
        let state = self.lock();
        let max = max_keys.max(1) as usize;
        let after = token.unwrap_or_default();
        let mut page = ListPage::default();
        // Entries in key order; a common prefix counts once, as at S3.
        for (key, o) in state.objects.range(prefix.to_string()..) {
            let Some(rest) = key.strip_prefix(prefix) else {
                break;
            };
            let common = rest.find('/').map(|i| format!("{prefix}{}", &rest[..=i]));
            let entry = common.clone().unwrap_or_else(|| key.clone());
            if entry <= after || page.prefixes.last() == Some(&entry) {
                continue;
            }
            if page.prefixes.len() + page.objects.len() == max {
                page.next_token = Some(after_of(&page));
                break;
            }
            if common.is_some() {
                page.prefixes.push(entry);
            } else {
                page.objects.push(ListedObject {
                    key: key.clone(),
                    size: o.data.len() as u64,
                    last_modified: o.modified,
                    etag: Some(o.etag.clone()).filter(|e| !e.is_empty()),
                });
            }
        }
        Ok(page)
    }

    async fn get_range(
        &self,
        key: &str,
        etag: &str,
        start: u64,
        len: u64,
    ) -> Result<RangeBody, OriginError> {
        self.counts.gets.fetch_add(1, Ordering::Relaxed);
        let fault = self.lock().faults.pop_front();
        let mut limit = None;
        let mut stall = false;
        match fault {
            None => {}
            Some(Fault::Unavailable) => {
                return Err(OriginError::Transient("503 SlowDown (injected)".into()))
            }
            Some(Fault::Denied) => {
                return Err(OriginError::AccessDenied("AccessDenied (injected)".into()))
            }
            Some(Fault::CutAfter(n)) => limit = Some(n),
            Some(Fault::StallAfter(n)) => (limit, stall) = (Some(n), true),
            Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            Some(Fault::ReplaceWith(data)) => {
                put(&mut self.lock(), key, data);
            }
        }
        let data = {
            let state = self.lock();
            let o = state.objects.get(key).ok_or_else(|| Self::not_found(key))?;
            if o.etag != etag {
                return Err(OriginError::EtagChanged {
                    expected: etag.to_string(),
                    actual: o.etag.clone(),
                });
            }
            let end = start.saturating_add(len);
            if end > o.data.len() as u64 || len == 0 {
                return Err(OriginError::Other(format!(
                    "416: range {start}+{len} outside {} bytes",
                    o.data.len()
                )));
            }
            o.data.slice(start as usize..end as usize)
        };
        let deliver = limit.map_or(data.len(), |n| (n as usize).min(data.len()));
        let pieces: Vec<Result<Bytes, OriginError>> = (0..deliver)
            .step_by(self.piece)
            .map(|at| Ok(data.slice(at..(at + self.piece).min(deliver))))
            .collect();
        let counts = self.counts.clone();
        let body = futures::stream::iter(pieces).inspect(move |p| {
            if let Ok(b) = p {
                counts
                    .get_bytes
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
            }
        });
        let ending: RangeBody = match (limit, stall) {
            (Some(_), true) => futures::stream::pending().boxed(),
            (Some(n), false) if (n as usize) < data.len() => futures::stream::once(async move {
                Err(OriginError::Transient(format!(
                    "connection reset after {n} bytes (injected)"
                )))
            })
            .boxed(),
            _ => futures::stream::empty().boxed(),
        };
        Ok(body.chain(ending).boxed())
    }
}

/// The continuation token of a full page: its last entry.
fn after_of(page: &ListPage) -> String {
    let last_prefix = page.prefixes.last().cloned().unwrap_or_default();
    let last_key = page
        .objects
        .last()
        .map(|o| o.key.clone())
        .unwrap_or_default();
    last_prefix.max(last_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(o: &FaultOrigin, key: &str, etag: &str, start: u64, len: u64) -> Vec<u8> {
        let mut b = o.get_range(key, etag, start, len).await.unwrap();
        let mut out = Vec::new();
        while let Some(Ok(p)) = b.next().await {
            out.extend_from_slice(&p);
        }
        out
    }

    #[tokio::test]
    async fn serves_ranges_counts_and_injects() {
        let o = FaultOrigin::new("b");
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let etag = o.put("k", data.clone());
        assert_eq!(body(&o, "k", &etag, 10, 100_000).await, &data[10..100_010]);
        assert_eq!((o.gets(), o.get_bytes()), (1, 100_000));

        o.inject(Fault::CutAfter(70_000));
        let mut b = o.get_range("k", &etag, 0, 100_000).await.unwrap();
        let mut got = 0;
        let mut broke = false;
        while let Some(p) = b.next().await {
            match p {
                Ok(p) => got += p.len(),
                Err(_) => broke = true,
            }
        }
        assert_eq!((got, broke), (70_000, true));

        o.inject(Fault::Unavailable);
        assert!(o
            .get_range("k", &etag, 0, 1)
            .await
            .err()
            .unwrap()
            .is_retryable());
        o.inject(Fault::ReplaceWith(Bytes::from_static(b"new")));
        assert!(matches!(
            o.get_range("k", &etag, 0, 1).await,
            Err(OriginError::EtagChanged { .. })
        ));
        assert!(matches!(
            o.head("gone").await,
            Err(OriginError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn lists_with_delimiter_and_pages() {
        let o = FaultOrigin::new("b");
        for k in ["d/a", "d/b", "d/sub/x", "d/sub/y", "d/z", "e"] {
            o.put(k, Bytes::from_static(b"x"));
        }
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let p = o.list_page("d/", token, 2).await.unwrap();
            names.extend(p.prefixes.iter().cloned());
            names.extend(p.objects.iter().map(|o| o.key.clone()));
            token = p.next_token;
            if token.is_none() {
                break;
            }
        }
        names.sort();
        assert_eq!(names, ["d/a", "d/b", "d/sub/", "d/z"]);
    }
}
