//! namespace::listing: one directory listing as it streams from the origin, page by page.
//!
//! A [`DirStream`] fetches ListObjectsV2 pages in a task of its own and hands entries to its
//! readers as soon as a page has arrived, so the first names of a cold directory reach `ls`
//! after the first page, not after the last. It fetches at most [`AHEAD`] entries beyond the
//! furthest reader, so the next page is on its way while the kernel consumes the previous one,
//! and a reader that stops stops the fetching. Readers that open the directory while the stream
//! is young share it (one listing in flight per directory).
//!
//! Memory is bounded by configuration, not by directory size: while a listing is small enough to
//! become the directory's cached listing (`keep_limit` entries) every entry is kept; past that,
//! entries every reader has passed are dropped, and the listing is not cached. A reader that
//! seeks back before what is kept gets [`Read::Restart`] and reads a new stream.
//!
//! A name that is both an object and a prefix is the directory: an object `x` is held back
//! until the listing has passed `x/` (keys between them, such as `x-1` or `x.txt`, may come
//! first), so no name is ever given twice. Entries come in the listing's order, except for those
//! held back; the cached listing is sorted by name.
//!
//! Owns no inode and never touches the namespace's lock: the namespace numbers the entries.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

use super::{page_entries, DirEntry, NsError};
use crate::origin::{ListPage, Origin};

/// Entries fetched ahead of the furthest reader: two pages.
pub const AHEAD: usize = 2 * PAGE as usize;
/// Most entries a listing that will not be cached holds between its slowest reader and its
/// newest page: a reader that stalls stops the fetching instead of growing memory.
pub const MAX_HELD: usize = 20 * PAGE as usize;
/// Keys asked for per LIST request (S3's maximum).
pub const PAGE: i32 = 1000;

/// What a complete small listing becomes: the directory's cached listing, sorted by name.
pub type OnComplete = Box<dyn FnOnce(Vec<DirEntry>) + Send>;

pub struct DirStream {
    state: Mutex<State>,
    /// Bumped whenever entries arrive or the stream ends.
    progress: watch::Sender<u64>,
    /// Readers moved on: the fetcher may fetch more.
    demand: Notify,
}

struct State {
    /// Listing index of `entries[0]`.
    base: usize,
    entries: VecDeque<DirEntry>,
    /// Objects waiting until the listing passes `name/` (a directory of the same name wins).
    pending: BTreeMap<String, DirEntry>,
    /// The largest key or prefix listed so far.
    cursor: String,
    done: Option<Result<(), NsError>>,
    /// Next index each reader wants.
    readers: HashMap<u64, usize>,
    next_reader: u64,
    /// Every entry is still here: the listing may become the cached one.
    keep_all: bool,
    keep_limit: usize,
    /// Its readers left before the end: the listing is incomplete for good.
    stopped: bool,
}

/// The answer of [`DirReader::read`].
pub enum Read {
    /// Entries from the asked index on (empty: the listing ended there).
    Entries(Vec<DirEntry>),
    /// The asked index was dropped (a seek back in a huge directory): read a new stream.
    Restart,
    Failed(NsError),
}

impl DirStream {
    /// Starts listing `prefix` on `rt`; `on_complete` gets the sorted listing when it ends with
    /// at most `keep_limit` entries.
    pub fn start(
        origin: Arc<dyn Origin>,
        prefix: String,
        keep_limit: usize,
        on_complete: OnComplete,
        rt: &tokio::runtime::Handle,
    ) -> Arc<DirStream> {
        let stream = Arc::new(DirStream::new(keep_limit));
        let s = stream.clone();
        rt.spawn(async move { s.fetch(origin, prefix, on_complete).await });
        stream
    }

    fn new(keep_limit: usize) -> DirStream {
        DirStream {
            state: Mutex::new(State {
                base: 0,
                entries: VecDeque::new(),
                pending: BTreeMap::new(),
                cursor: String::new(),
                done: None,
                readers: HashMap::new(),
                next_reader: 0,
                keep_all: true,
                keep_limit,
                stopped: false,
            }),
            progress: watch::Sender::new(0),
            demand: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a new reader can still start from the first entry.
    pub fn can_share(&self) -> bool {
        let st = self.lock();
        st.base == 0 && !st.stopped && !matches!(st.done, Some(Err(_)))
    }

    pub fn reader(self: &Arc<Self>) -> DirReader {
        let id = {
            let mut st = self.lock();
            st.next_reader += 1;
            let id = st.next_reader;
            st.readers.insert(id, 0);
            id
        };
        DirReader {
            stream: self.clone(),
            id,
        }
    }

    async fn fetch(self: Arc<Self>, origin: Arc<dyn Origin>, prefix: String, done: OnComplete) {
        let mut token = None;
        loop {
            if !self.wait_for_demand().await {
                // Every reader left before the end: stop listing (nobody can join it now).
                self.lock().stopped = true;
                return;
            }
            let page = match origin.list_page(&prefix, token, PAGE).await {
                Ok(p) => p,
                Err(e) => return self.finish(Err(e.into()), done),
            };
            token = page.next_token.clone();
            self.add_page(&prefix, &page);
            if token.is_none() {
                return self.finish(Ok(()), done);
            }
        }
    }

    /// Waits while the listing is [`AHEAD`] entries beyond the furthest reader (or beyond the
    /// start while nobody reads yet). False when every reader has gone.
    async fn wait_for_demand(&self) -> bool {
        loop {
            let notified = self.demand.notified();
            {
                let st = self.lock();
                if st.readers.is_empty() && st.next_reader > 0 {
                    return false;
                }
                let furthest = st.readers.values().copied().max().unwrap_or(0);
                let have = st.base + st.entries.len();
                if have < furthest + AHEAD && (st.keep_all || st.entries.len() < MAX_HELD) {
                    return true;
                }
            }
            notified.await;
        }
    }

    fn add_page(&self, prefix: &str, page: &ListPage) {
        {
            let mut st = self.lock();
            let (files, dirs) = page_entries(prefix, page);
            for f in files {
                st.pending.insert(f.name.clone(), f);
            }
            for d in dirs {
                st.pending.remove(&d.name);
                st.push(d);
            }
            let last = [
                page.objects.last().map(|o| o.key.as_str()),
                page.prefixes.last().map(String::as_str),
            ];
            if let Some(max) = last.into_iter().flatten().max() {
                if *max > *st.cursor {
                    st.cursor = max.to_string();
                }
            }
            // Objects whose `name/` lies behind the cursor can have no directory twin anymore.
            let cursor = st.cursor.clone();
            let ready: Vec<String> = st
                .pending
                .keys()
                .filter(|n| format!("{prefix}{n}/") < cursor)
                .cloned()
                .collect();
            for n in ready {
                if let Some(e) = st.pending.remove(&n) {
                    st.push(e);
                }
            }
        }
        self.progress.send_modify(|g| *g += 1);
    }

    fn finish(&self, result: Result<(), NsError>, on_complete: OnComplete) {
        let complete = {
            let mut st = self.lock();
            if result.is_ok() {
                let rest = std::mem::take(&mut st.pending);
                for e in rest.into_values() {
                    st.push(e);
                }
            }
            let ok = result.is_ok();
            st.done = Some(result);
            (ok && st.keep_all).then(|| {
                let mut all: Vec<DirEntry> = st.entries.iter().cloned().collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                all
            })
        };
        self.progress.send_modify(|g| *g += 1);
        if let Some(all) = complete {
            on_complete(all);
        }
    }
}

impl State {
    fn push(&mut self, e: DirEntry) {
        self.entries.push_back(e);
        if self.keep_all && self.base + self.entries.len() > self.keep_limit {
            self.keep_all = false;
        }
        self.trim();
    }

    /// Drops what every reader has passed, once the listing will not be cached.
    fn trim(&mut self) {
        if self.keep_all {
            return;
        }
        let Some(slowest) = self.readers.values().copied().min() else {
            return;
        };
        while self.base < slowest && self.entries.pop_front().is_some() {
            self.base += 1;
        }
    }
}

/// What an open directory reads: the cached listing, or a stream.
pub enum DirHandle {
    Snapshot(Arc<Vec<DirEntry>>),
    Live(DirReader),
}

impl DirHandle {
    /// Up to `max` entries from listing index `index` on.
    pub async fn read(&self, index: usize, max: usize) -> Read {
        match self {
            DirHandle::Snapshot(all) => {
                Read::Entries(all.iter().skip(index).take(max).cloned().collect())
            }
            DirHandle::Live(r) => r.read(index, max).await,
        }
    }
}

/// One reader of a stream (an open directory handle).
pub struct DirReader {
    stream: Arc<DirStream>,
    id: u64,
}

impl DirReader {
    /// Up to `max` entries from listing index `index` on, waiting until they have arrived.
    pub async fn read(&self, index: usize, max: usize) -> Read {
        let mut rx = self.stream.progress.subscribe();
        loop {
            {
                let mut st = self.stream.lock();
                if index < st.base {
                    return Read::Restart;
                }
                let have = st.base + st.entries.len();
                if have > index || st.done.is_some() {
                    st.readers.insert(self.id, index);
                    st.trim();
                    let out: Vec<DirEntry> = st
                        .entries
                        .iter()
                        .skip(index - st.base)
                        .take(max)
                        .cloned()
                        .collect();
                    let failed = match (&st.done, out.is_empty()) {
                        (Some(Err(e)), true) => Some(e.clone()),
                        _ => None,
                    };
                    drop(st);
                    self.stream.demand.notify_one();
                    return match failed {
                        Some(e) => Read::Failed(e),
                        None => Read::Entries(out),
                    };
                }
                st.readers.insert(self.id, index);
            }
            self.stream.demand.notify_one();
            if rx.changed().await.is_err() {
                return Read::Failed(NsError::NotFound);
            }
        }
    }
}

impl Drop for DirReader {
    fn drop(&mut self) {
        let mut st = self.stream.lock();
        st.readers.remove(&self.id);
        st.trim();
        drop(st);
        self.stream.demand.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::Kind;
    use crate::origin::fault::FaultOrigin;

    fn origin_with(keys: &[String]) -> Arc<FaultOrigin> {
        let o = Arc::new(FaultOrigin::new("b"));
        for k in keys {
            o.put(k, bytes::Bytes::from_static(b"x"));
        }
        o
    }

    async fn drain(r: &DirReader) -> Vec<DirEntry> {
        let mut all = Vec::new();
        loop {
            match r.read(all.len(), 700).await {
                Read::Entries(e) if e.is_empty() => return all,
                Read::Entries(e) => all.extend(e),
                Read::Restart => panic!("restart"),
                Read::Failed(e) => panic!("{e}"),
            }
        }
    }

    fn start(o: &Arc<FaultOrigin>, keep: usize) -> (Arc<DirStream>, Arc<Mutex<Option<usize>>>) {
        let kept = Arc::new(Mutex::new(None));
        let k = kept.clone();
        let on_complete = Box::new(move |all: Vec<DirEntry>| *k.lock().unwrap() = Some(all.len()));
        let s = DirStream::start(
            o.clone(),
            "d/".into(),
            keep,
            on_complete,
            &tokio::runtime::Handle::current(),
        );
        (s, kept)
    }

    #[tokio::test]
    async fn a_name_both_object_and_prefix_is_one_directory_across_pages() {
        let mut keys: Vec<String> = (0..2500).map(|i| format!("d/f{i:05}")).collect();
        // `x` (object), `x-1` and `x.txt` sort between `x` and `x/`; page size 1000 puts them
        // apart from `x/` when enough keys come first.
        keys.extend(["d/x", "d/x-1", "d/x.txt", "d/x/inner", "d/y"].map(String::from));
        let o = origin_with(&keys);
        let (s, kept) = start(&o, 100_000);
        let r = s.reader();
        let all = drain(&r).await;
        let xs: Vec<_> = all.iter().filter(|e| e.name == "x").collect();
        assert_eq!(xs.len(), 1, "one x");
        assert_eq!(xs[0].kind, Kind::Dir, "the directory wins");
        assert_eq!(all.len(), 2500 + 4);
        let mut names: Vec<_> = all.iter().map(|e| e.name.clone()).collect();
        names.dedup();
        assert_eq!(names.len(), all.len(), "no name twice");
        assert_eq!(*kept.lock().unwrap(), Some(2504), "small: cached, sorted");
    }

    #[tokio::test]
    async fn the_first_names_arrive_after_the_first_page_and_fetching_follows_the_reader() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("d/f{i:05}")).collect();
        let o = origin_with(&keys);
        let (s, _) = start(&o, 100_000);
        let r = s.reader();
        match r.read(0, 10).await {
            Read::Entries(e) => assert_eq!(e[0].name, "f00000"),
            _ => panic!("no entries"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Ahead of the reader by at most AHEAD entries: 3 pages, not 20.
        assert!(
            o.lists() <= 3,
            "{} pages fetched for a reader at 10",
            o.lists()
        );
        drop(r);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let fetched = o.lists();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(o.lists(), fetched, "a listing nobody reads stops");
        assert!(!s.can_share());
    }

    #[tokio::test]
    async fn a_listing_too_big_to_cache_holds_a_bounded_window() {
        let keys: Vec<String> = (0..60_000).map(|i| format!("d/f{i:06}")).collect();
        let o = origin_with(&keys);
        let (s, kept) = start(&o, 10_000);
        let r = s.reader();
        let mut seen = 0;
        let mut peak = 0;
        loop {
            match r.read(seen, 700).await {
                Read::Entries(e) if e.is_empty() => break,
                Read::Entries(e) => seen += e.len(),
                _ => panic!(),
            }
            peak = peak.max(s.lock().entries.len());
        }
        assert_eq!(seen, 60_000);
        assert!(peak <= MAX_HELD + PAGE as usize, "held {peak}");
        assert_eq!(*kept.lock().unwrap(), None, "not cached");
        // A reader going back before the window restarts.
        assert!(matches!(r.read(0, 10).await, Read::Restart));
    }

    #[tokio::test]
    async fn two_readers_share_one_listing() {
        let keys: Vec<String> = (0..3000).map(|i| format!("d/f{i:05}")).collect();
        let o = origin_with(&keys);
        let (s, _) = start(&o, 100_000);
        let (a, b) = (s.reader(), s.reader());
        let (x, y) = tokio::join!(drain(&a), drain(&b));
        assert_eq!((x.len(), y.len()), (3000, 3000));
        assert_eq!(o.lists(), 3, "one LIST per page for both readers");
    }
}
