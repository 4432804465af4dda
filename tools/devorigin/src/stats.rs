//! Request and byte counters kept by the server.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::classify::RequestKind;

/// Counters of what the server was asked for and served. All atomics, cheap.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    get_requests: AtomicU64,
    get_bytes: AtomicU64,
    head_requests: AtomicU64,
    list_requests: AtomicU64,
    put_requests: AtomicU64,
    other_requests: AtomicU64,
    gets_in_flight: AtomicU64,
    peak_gets_in_flight: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Every HTTP request.
    pub requests: u64,
    /// GetObject requests (GET on an object key, not a listing), whatever the status.
    pub get_requests: u64,
    /// Body bytes actually handed to the connection in successful (2xx) GetObject responses.
    pub get_bytes: u64,
    /// HEAD on an object key.
    pub head_requests: u64,
    /// Bucket-level GETs (ListObjectsV2, ListObjects, GetBucketLocation, ...).
    pub list_requests: u64,
    /// Every PUT (PutObject, CreateBucket, CopyObject, UploadPart, ...).
    pub put_requests: u64,
    /// Everything else (DELETE, POST, HEAD bucket, GET on the service root, ...).
    pub other_requests: u64,
    /// The most GetObject requests waiting for their response at once (the injected GET delay
    /// and the server's reply, not the body's streaming): how many GETs a client keeps in flight.
    pub peak_gets_in_flight: u64,
}

impl Stats {
    /// Counts one request of the given kind.
    pub(crate) fn count_request(&self, kind: RequestKind) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let counter = match kind {
            RequestKind::GetObject => &self.get_requests,
            RequestKind::HeadObject => &self.head_requests,
            RequestKind::List => &self.list_requests,
            RequestKind::Put => &self.put_requests,
            RequestKind::Other => &self.other_requests,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a GetObject as in flight until the guard is dropped.
    pub(crate) fn get_in_flight(self: &std::sync::Arc<Self>) -> InFlight {
        let now = self.gets_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_gets_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(std::sync::Arc::clone(self))
    }

    /// Counts GetObject body bytes that were just handed to the connection.
    pub(crate) fn add_get_bytes(&self, n: u64) {
        self.get_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: load(&self.requests),
            get_requests: load(&self.get_requests),
            get_bytes: load(&self.get_bytes),
            head_requests: load(&self.head_requests),
            list_requests: load(&self.list_requests),
            put_requests: load(&self.put_requests),
            other_requests: load(&self.other_requests),
            peak_gets_in_flight: load(&self.peak_gets_in_flight),
        }
    }

    /// Sets all counters back to zero.
    pub fn reset(&self) {
        for c in [
            &self.requests,
            &self.get_requests,
            &self.get_bytes,
            &self.head_requests,
            &self.list_requests,
            &self.put_requests,
            &self.other_requests,
            &self.peak_gets_in_flight,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// A GetObject in flight (see [`Stats::get_in_flight`]).
pub(crate) struct InFlight(std::sync::Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.gets_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
