//! namespace: the directory tree seen through the mount. Inodes, lookups and listings built from
//! HEAD and ListObjectsV2 (delimiter `/`), with positive and negative TTL caches.
//!
//! Directories are `/`-delimited prefixes; a name that is both an object and a prefix is shown as
//! the directory. Keys that cannot be a path component (`.`, `..`, empty components, names over
//! 255 bytes) are hidden.
//!
//! **A file inode is one object version.** The kernel's page cache belongs to an inode, so two
//! versions of one key must never share one: once a file node knows its ETag, it stands for that
//! version only. A lookup that finds another ETag (after the TTL) makes a new node with its own
//! inode; the old node lives on, with its own size and pages, until the kernel forgets it, so a
//! handle opened on the old version keeps reading the old version (or fails), never a mix, and
//! its size never shrinks under it. Opening a superseded inode fails with `Stale` (ESTALE), on
//! which the kernel looks the name up again and opens the new version.
//!
//! Inode numbers are a hash of the path and version (with collision probing), so a version keeps
//! its number while mounted even after the kernel forgets it; nodes live only while the kernel
//! holds a lookup reference (`forget` frees them), so memory does not grow with every name ever
//! seen. Never holds its lock across a network call. Knows nothing of FUSE or chunks.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::origin::{ListPage, ObjectMeta, Origin, OriginError};

pub mod listing;

use listing::DirStream;
pub use listing::{DirHandle, Read};

/// Most entries one directory keeps as its cached listing (lookups and repeated `ls` answered
/// without a request); a bigger directory is streamed each time it is read.
const KEEP_LIMIT: usize = 100_000;
/// Most entries all cached listings hold together; past it, expired and then other listings go.
const LISTINGS_BUDGET: usize = 500_000;

pub const ROOT_INO: u64 = 1;
const MAX_NAME: usize = 255;
const LIST_PAGE: i32 = listing::PAGE;

#[derive(Debug, Clone, thiserror::Error)]
pub enum NsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    /// The inode's version was replaced at the origin; look the name up again.
    #[error("the object changed at the origin; this inode is an older version")]
    Stale,
    /// The origin gives the object no ETag, so no version can be pinned for it.
    #[error("object {0:?} has no ETag at the origin (listing and HEAD), so orcafs cannot pin a version of it; serve it from an S3-compatible origin that sets ETags")]
    NoEtag(String),
    #[error(transparent)]
    Origin(#[from] OriginError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Attributes of one node, as FUSE needs them.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: String,
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
}

/// The answer of a `*_local` call: final, or what to ask the origin.
pub enum Local<T> {
    Answer(Result<T, NsError>),
    AskOrigin(String),
}

/// What a name turned out to be at the origin.
enum Resolved {
    /// A directory, with its complete listing when one LIST page held all of it.
    Dir(DirEntry, Option<BTreeMap<String, DirEntry>>),
    File(DirEntry),
    Missing,
}

impl DirEntry {
    /// The entry's key (file) or prefix (directory) in the directory with prefix `dir`.
    fn path_under(&self, dir: &str) -> String {
        match self.kind {
            Kind::Dir => format!("{dir}{}/", self.name),
            Kind::File => format!("{dir}{}", self.name),
        }
    }
}

/// The version of an object an open file pins.
#[derive(Debug, Clone)]
pub struct OpenedObject {
    pub key: String,
    pub etag: String,
    pub size: u64,
    /// The kernel may keep its page cache: this inode was last opened at the same ETag.
    pub keep_cache: bool,
}

struct Node {
    parent: u64,
    name: String,
    /// Object key of a file; prefix (empty or ending in `/`) of a directory.
    path: String,
    kind: Kind,
    lookups: u64,
    size: u64,
    mtime: SystemTime,
    /// The version this file inode stands for, once known; never changes after that.
    etag: Option<String>,
    fresh_until: Instant,
    listing: Option<Listing>,
    opened_etag: Option<String>,
    /// A newer version replaced this one at the origin: the node answers with its own
    /// attributes, without asking the origin, and cannot be opened again.
    superseded: bool,
    /// The listing generation last handed to the kernel whole (see `opendir`).
    served_generation: u64,
}

struct Listing {
    entries: Arc<Vec<DirEntry>>,
    fresh_until: Instant,
    /// Tells one listing from the next, so the kernel keeps its cached directory pages only
    /// while they hold this one.
    generation: u64,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    /// The current node of each name (older versions may still be in `nodes`).
    by_name: HashMap<(u64, String), u64>,
    negative: HashMap<(u64, String), Instant>,
    /// Keys whose HEAD had no ETag, remembered for the negative TTL.
    no_etag: HashMap<String, Instant>,
    /// Directory listings in flight, shared by readers that open the directory meanwhile.
    streams: HashMap<u64, std::sync::Weak<DirStream>>,
    /// Entries held by all cached listings.
    listed_entries: usize,
    generations: u64,
}

pub struct Namespace {
    origin: Arc<dyn Origin>,
    ttl: Duration,
    negative_ttl: Duration,
    state: Mutex<State>,
}

/// Whether a key component can be shown as a file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= MAX_NAME
        && !name.contains('/')
        && !name.contains('\0')
}

fn path_hash(kind: Kind, path: &str, etag: Option<&str>) -> u64 {
    let mut h = DefaultHasher::new();
    (kind == Kind::Dir).hash(&mut h);
    path.hash(&mut h);
    etag.hash(&mut h);
    // Keep clear of the root and of 0, which FUSE reserves.
    h.finish().max(2)
}

impl State {
    /// The inode number for a path and version: its hash, probed past numbers held by others.
    fn ino_for(&self, kind: Kind, path: &str, etag: Option<&str>) -> u64 {
        let mut ino = path_hash(kind, path, etag);
        while let Some(n) = self.nodes.get(&ino) {
            if n.path == path && n.kind == kind && n.etag.as_deref() == etag {
                break;
            }
            ino = ino.wrapping_add(1).max(2);
        }
        ino
    }

    /// Records one kernel lookup of `entry` under `parent` and returns its attributes.
    fn remember(
        &mut self,
        parent: u64,
        parent_path: &str,
        e: &DirEntry,
        fresh_until: Instant,
    ) -> Attr {
        let path = e.path_under(parent_path);
        // The name's current node, while it is the same version; else the version's own node.
        let ino = match self.by_name.get(&(parent, e.name.clone())) {
            Some(&ino)
                if self
                    .nodes
                    .get(&ino)
                    .is_some_and(|n| n.kind == e.kind && n.path == path && same_version(n, e)) =>
            {
                ino
            }
            Some(&old) => {
                // Another version now has the name: the old node keeps its own attributes.
                self.supersede(old);
                self.ino_for(e.kind, &path, e.etag.as_deref())
            }
            None => self.ino_for(e.kind, &path, e.etag.as_deref()),
        };
        let node = self.nodes.entry(ino).or_insert_with(|| Node {
            parent,
            name: e.name.clone(),
            path,
            kind: e.kind,
            lookups: 0,
            size: 0,
            mtime: SystemTime::UNIX_EPOCH,
            etag: None,
            fresh_until,
            listing: None,
            opened_etag: None,
            superseded: false,
            served_generation: 0,
        });
        node.lookups += 1;
        // The origin names this version as current (again: same ETag, same bytes).
        node.superseded = false;
        if node.etag.is_none() {
            // Learning the version: the node now stands for it.
            node.size = e.size;
            node.mtime = e.mtime;
            node.etag = e.etag.clone();
        }
        node.fresh_until = fresh_until;
        self.by_name.insert((parent, e.name.clone()), ino);
        self.negative.remove(&(parent, e.name.clone()));
        attr_of(ino, node)
    }

    /// Marks a node as an older version: no longer fresh, no longer the name's node, and its
    /// directory's listing (which may name it) dropped, so the next lookup asks the origin.
    /// Returns the `(parent, name)` it stood under for the kernel to forget too, unless a newer
    /// version already has the name (the kernel's entry is that one's).
    fn supersede(&mut self, ino: u64) -> Option<(u64, String)> {
        let n = self.nodes.get_mut(&ino)?;
        n.fresh_until = Instant::now();
        n.superseded = true;
        let key = (n.parent, n.name.clone());
        let named = self.by_name.get(&key).copied();
        if named == Some(ino) {
            self.by_name.remove(&key);
        }
        self.drop_listing(key.0);
        named.is_none_or(|named| named == ino).then_some(key)
    }

    /// Stores a complete listing of directory `ino` (prefix `prefix`, entries sorted by name),
    /// numbering its entries, within the budget of all cached listings.
    fn keep_listing(
        &mut self,
        ino: u64,
        prefix: &str,
        sorted: Vec<DirEntry>,
        fresh_until: Instant,
    ) -> Arc<Vec<DirEntry>> {
        let entries: Vec<DirEntry> = sorted
            .into_iter()
            .map(|mut e| {
                e.ino = self.ino_for(e.kind, &e.path_under(prefix), e.etag.as_deref());
                e
            })
            .collect();
        let entries = Arc::new(entries);
        self.generations += 1;
        let listing = Listing {
            entries: entries.clone(),
            fresh_until,
            generation: self.generations,
        };
        let Some(n) = self.nodes.get_mut(&ino) else {
            return entries;
        };
        let old = n.listing.replace(listing).map_or(0, |l| l.entries.len());
        self.listed_entries = self.listed_entries + entries.len() - old;
        if self.listed_entries > LISTINGS_BUDGET {
            self.shed_listings(ino);
        }
        entries
    }

    /// Drops expired listings, then others (never `keep`'s), until within the budget.
    fn shed_listings(&mut self, keep: u64) {
        let now = Instant::now();
        for expired_only in [true, false] {
            for (ino, n) in self.nodes.iter_mut() {
                if self.listed_entries <= LISTINGS_BUDGET {
                    return;
                }
                let drop_it = *ino != keep
                    && n.listing
                        .as_ref()
                        .is_some_and(|l| !expired_only || l.fresh_until <= now);
                if drop_it {
                    if let Some(l) = n.listing.take() {
                        self.listed_entries -= l.entries.len();
                    }
                }
            }
        }
    }

    /// Forgets a node's listing (it names a version that changed, or the node goes).
    fn drop_listing(&mut self, ino: u64) {
        if let Some(l) = self.nodes.get_mut(&ino).and_then(|n| n.listing.take()) {
            self.listed_entries -= l.entries.len();
        }
    }
}

/// The entries one LIST page under `prefix` shows: its objects (files) and its common prefixes
/// (directories). Keys outside the prefix (a server may list them) and names that cannot be
/// paths are left out.
fn page_entries<'a>(
    prefix: &'a str,
    page: &'a ListPage,
) -> (
    impl Iterator<Item = DirEntry> + 'a,
    impl Iterator<Item = DirEntry> + 'a,
) {
    let files = page.objects.iter().filter_map(move |o| {
        let name = o.key.strip_prefix(prefix)?;
        valid_name(name).then(|| DirEntry {
            name: name.to_string(),
            ino: 0,
            kind: Kind::File,
            size: o.size,
            mtime: o.last_modified,
            etag: o.etag.clone(),
        })
    });
    let dirs = page.prefixes.iter().filter_map(move |p| {
        let rest = p.strip_prefix(prefix)?;
        let name = rest.trim_end_matches('/');
        // `a//b` lists the prefix `a//`, whose name is empty: hidden.
        (rest.len() == name.len() + 1 && valid_name(name)).then(|| dir_entry(name))
    });
    (files, dirs)
}

/// Adds one LIST page under `prefix` to a directory's entries; a directory wins over an object
/// of the same name.
fn merge_page(prefix: &str, page: &ListPage, merged: &mut BTreeMap<String, DirEntry>) {
    let (files, dirs) = page_entries(prefix, page);
    for f in files {
        merged.entry(f.name.clone()).or_insert(f);
    }
    for d in dirs {
        merged.insert(d.name.clone(), d);
    }
}

/// Whether a listed or looked-up entry is the version a node stands for. An entry without an
/// ETag (some listings) is taken for the same version when size and time agree.
fn same_version(n: &Node, e: &DirEntry) -> bool {
    match (&n.etag, &e.etag) {
        (None, _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => n.size == e.size && n.mtime == e.mtime,
    }
}

fn attr_of(ino: u64, n: &Node) -> Attr {
    Attr {
        ino,
        kind: n.kind,
        size: if n.kind == Kind::File { n.size } else { 0 },
        mtime: n.mtime,
    }
}

impl Namespace {
    pub fn new(
        origin: Arc<dyn Origin>,
        root_prefix: &str,
        ttl: Duration,
        negative_ttl: Duration,
    ) -> Namespace {
        let mut state = State::default();
        state.nodes.insert(
            ROOT_INO,
            Node {
                parent: ROOT_INO,
                name: String::new(),
                path: root_prefix.to_string(),
                kind: Kind::Dir,
                lookups: 1,
                size: 0,
                mtime: SystemTime::now(),
                etag: None,
                fresh_until: Instant::now(),
                listing: None,
                opened_etag: None,
                superseded: false,
                served_generation: 0,
            },
        );
        Namespace {
            origin,
            ttl,
            negative_ttl,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `lookup` without the origin: answered from the parent's listing, a fresh node or the
    /// negative cache, or else the parent's path to ask the origin with. Cheap enough for the
    /// FUSE thread: one short lock, no I/O.
    pub fn lookup_local(&self, parent: u64, name: &str) -> Local<Attr> {
        if !valid_name(name) {
            return Local::Answer(Err(NsError::NotFound));
        }
        let now = Instant::now();
        let mut st = self.lock();
        let st = &mut *st;
        let Some(p) = st.nodes.get(&parent) else {
            return Local::Answer(Err(NsError::UnknownInode(parent)));
        };
        if p.kind != Kind::Dir {
            return Local::Answer(Err(NsError::NotADirectory));
        }
        let parent_path = p.path.clone();
        if let Some(l) = p.listing.as_ref().filter(|l| l.fresh_until > now) {
            let fresh_until = l.fresh_until;
            return Local::Answer(
                match l.entries.binary_search_by(|e| e.name.as_str().cmp(name)) {
                    Ok(i) => {
                        let e = l.entries[i].clone();
                        Ok(st.remember(parent, &parent_path, &e, fresh_until))
                    }
                    Err(_) => Err(NsError::NotFound),
                },
            );
        }
        let key = (parent, name.to_string());
        if let Some(ino) = st.by_name.get(&key).copied() {
            if let Some(n) = st.nodes.get_mut(&ino).filter(|n| n.fresh_until > now) {
                n.lookups += 1;
                return Local::Answer(Ok(attr_of(ino, n)));
            }
        }
        if st.negative.get(&key).is_some_and(|t| *t > now) {
            return Local::Answer(Err(NsError::NotFound));
        }
        Local::AskOrigin(parent_path)
    }

    /// Resolves `name` in directory `parent`, counting one kernel lookup on success.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, NsError> {
        let parent_path = match self.lookup_local(parent, name) {
            Local::Answer(r) => return r,
            Local::AskOrigin(p) => p,
        };
        let resolved = self.resolve_remote(&parent_path, name).await?;
        let mut st = self.lock();
        let fresh_until = Instant::now() + self.ttl;
        match resolved {
            Resolved::File(e) => Ok(st.remember(parent, &parent_path, &e, fresh_until)),
            Resolved::Dir(e, listing) => {
                let attr = st.remember(parent, &parent_path, &e, fresh_until);
                if let Some(merged) = listing {
                    let prefix = format!("{parent_path}{name}/");
                    st.keep_listing(
                        attr.ino,
                        &prefix,
                        merged.into_values().collect(),
                        fresh_until,
                    );
                }
                Ok(attr)
            }
            Resolved::Missing => {
                let until = Instant::now() + self.negative_ttl;
                bounded_insert(&mut st.negative, (parent, name.to_string()), until);
                Err(NsError::NotFound)
            }
        }
    }

    /// Asks the origin what `name` is: a directory if anything lives under `name/`, else a file
    /// if HEAD finds it. Both requests start together; the HEAD is dropped when it is a directory.
    /// The directory's LIST asks for a whole page: when that page is the complete directory, it
    /// is kept as the directory's listing, so looking up its children (what usually follows)
    /// costs no request.
    async fn resolve_remote(&self, parent_path: &str, name: &str) -> Result<Resolved, NsError> {
        let full = format!("{parent_path}{name}");
        let origin = self.origin.clone();
        let head_key = full.clone();
        let head = tokio::spawn(async move { origin.head(&head_key).await });
        let prefix = format!("{full}/");
        let page = match self.origin.list_page(&prefix, None, LIST_PAGE).await {
            Ok(p) => p,
            Err(e) => {
                head.abort();
                return Err(e.into());
            }
        };
        if !page.prefixes.is_empty() || !page.objects.is_empty() {
            head.abort();
            let listing = page.next_token.is_none().then(|| {
                let mut merged = BTreeMap::new();
                merge_page(&prefix, &page, &mut merged);
                merged
            });
            return Ok(Resolved::Dir(dir_entry(name), listing));
        }
        match head.await {
            Ok(Ok(meta)) => Ok(Resolved::File(file_entry(name, &meta))),
            Ok(Err(OriginError::NotFound(_))) => Ok(Resolved::Missing),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(NsError::Origin(OriginError::Other(
                "HEAD task failed".into(),
            ))),
        }
    }

    /// Attributes of a known inode. A file whose attributes are older than the TTL is re-read
    /// with HEAD so a replaced object shows its new size.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, NsError> {
        let key = match self.getattr_local(ino) {
            Local::Answer(r) => return r,
            Local::AskOrigin(key) => key,
        };
        match self.origin.head(&key).await {
            // A superseded version keeps its own attributes: its size never shrinks under a
            // handle that reads it.
            Ok(meta) => Ok(self.update_file(ino, &meta).1),
            Err(OriginError::NotFound(_)) => Err(NsError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// `getattr` without the origin, or the key to HEAD.
    pub fn getattr_local(&self, ino: u64) -> Local<Attr> {
        let st = self.lock();
        match st.nodes.get(&ino) {
            None => Local::Answer(Err(NsError::UnknownInode(ino))),
            Some(n) if n.kind == Kind::Dir || n.superseded || n.fresh_until > Instant::now() => {
                Local::Answer(Ok(attr_of(ino, n)))
            }
            Some(n) => Local::AskOrigin(n.path.clone()),
        }
    }

    /// Records what a HEAD found for a file inode. Returns whether the inode still stands for
    /// the origin's version, and its attributes (a superseded inode keeps its own).
    fn update_file(&self, ino: u64, meta: &ObjectMeta) -> (bool, Attr) {
        let mut st = self.lock();
        let fresh_until = Instant::now() + self.ttl;
        let Some(n) = st.nodes.get_mut(&ino) else {
            let attr = Attr {
                ino,
                kind: Kind::File,
                size: meta.size,
                mtime: meta.last_modified,
            };
            return (false, attr);
        };
        match &n.etag {
            Some(etag) if *etag != meta.etag => {
                let attr = attr_of(ino, n);
                st.supersede(ino);
                (false, attr)
            }
            _ => {
                n.size = meta.size;
                n.mtime = meta.last_modified;
                n.etag = Some(meta.etag.clone());
                n.fresh_until = fresh_until;
                (true, attr_of(ino, n))
            }
        }
    }

    /// Pins the object version an open file will read: the cached ETag if fresh, else HEAD.
    pub async fn open(&self, ino: u64) -> Result<OpenedObject, NsError> {
        let key = match self.open_local(ino) {
            Local::Answer(r) => return r,
            Local::AskOrigin(key) => key,
        };
        let meta = match self.origin.head(&key).await {
            Ok(meta) => meta,
            Err(OriginError::NotFound(_)) => return Err(NsError::NotFound),
            Err(e) => return Err(e.into()),
        };
        if meta.etag.is_empty() {
            tracing::warn!(
                key,
                "object has no ETag at the origin: cannot pin a version, open fails"
            );
            let until = Instant::now() + self.negative_ttl;
            bounded_insert(&mut self.lock().no_etag, key.clone(), until);
            return Err(NsError::NoEtag(key));
        }
        match self.update_file(ino, &meta) {
            (true, _) => Ok(self.pin(ino, key, meta.etag, meta.size)),
            (false, _) => Err(NsError::Stale),
        }
    }

    /// `open` without the origin (the node's ETag is fresh), or the key to HEAD.
    pub fn open_local(&self, ino: u64) -> Local<OpenedObject> {
        let (key, etag, size) = {
            let st = self.lock();
            let Some(n) = st.nodes.get(&ino) else {
                return Local::Answer(Err(NsError::UnknownInode(ino)));
            };
            if n.kind == Kind::Dir {
                return Local::Answer(Err(NsError::IsADirectory));
            }
            if n.superseded {
                return Local::Answer(Err(NsError::Stale));
            }
            let now = Instant::now();
            if st.no_etag.get(&n.path).is_some_and(|t| *t > now) {
                return Local::Answer(Err(NsError::NoEtag(n.path.clone())));
            }
            match (&n.etag, n.fresh_until > now) {
                (Some(etag), true) => (n.path.clone(), etag.clone(), n.size),
                _ => return Local::AskOrigin(n.path.clone()),
            }
        };
        Local::Answer(Ok(self.pin(ino, key, etag, size)))
    }

    /// Records the version an open pins; the page cache may be kept when it is the one the
    /// previous open pinned.
    fn pin(&self, ino: u64, key: String, etag: String, size: u64) -> OpenedObject {
        let mut st = self.lock();
        let keep_cache = match st.nodes.get_mut(&ino) {
            Some(n) => {
                let same = n.opened_etag.as_deref() == Some(etag.as_str());
                n.opened_etag = Some(etag.clone());
                same
            }
            None => false,
        };
        OpenedObject {
            key,
            etag,
            size,
            keep_cache,
        }
    }

    /// The inode's object changed at the origin: the inode keeps standing for its version, and
    /// the name's next lookup asks the origin (and finds the new version's inode). Returns the
    /// `(parent, name)` the inode stood under.
    pub fn invalidate(&self, ino: u64) -> Option<(u64, String)> {
        self.lock().supersede(ino)
    }

    /// Opens directory `ino` for reading: its cached listing while fresh, else a listing that
    /// streams from the origin (shared with readers already on it). The flag says whether the
    /// kernel may keep the directory pages it cached: they hold this same listing.
    pub fn opendir(
        self: &Arc<Self>,
        ino: u64,
        rt: &tokio::runtime::Handle,
    ) -> Result<(DirHandle, bool), NsError> {
        let mut st = self.lock();
        let n = st.nodes.get_mut(&ino).ok_or(NsError::UnknownInode(ino))?;
        if n.kind != Kind::Dir {
            return Err(NsError::NotADirectory);
        }
        if let Some(l) = n
            .listing
            .as_ref()
            .filter(|l| l.fresh_until > Instant::now())
        {
            let same = n.served_generation == l.generation;
            n.served_generation = l.generation;
            return Ok((DirHandle::Snapshot(l.entries.clone()), same));
        }
        let prefix = n.path.clone();
        if let Some(stream) = st.streams.get(&ino).and_then(|w| w.upgrade()) {
            if stream.can_share() {
                return Ok((DirHandle::Live(stream.reader()), false));
            }
        }
        let weak = Arc::downgrade(self);
        let (ttl, keep_prefix) = (self.ttl, prefix.clone());
        let on_complete = Box::new(move |sorted: Vec<DirEntry>| {
            if let Some(ns) = weak.upgrade() {
                let mut st = ns.lock();
                st.streams.remove(&ino);
                st.keep_listing(ino, &keep_prefix, sorted, Instant::now() + ttl);
            }
        });
        let stream = DirStream::start(self.origin.clone(), prefix, KEEP_LIMIT, on_complete, rt);
        st.streams.insert(ino, Arc::downgrade(&stream));
        Ok((DirHandle::Live(stream.reader()), false))
    }

    /// Inode numbers for listed entries of directory `parent` (for a plain `readdir`: no lookup
    /// is counted).
    pub fn number(&self, parent: u64, entries: &mut [DirEntry]) {
        let st = self.lock();
        let Some(prefix) = st.nodes.get(&parent).map(|n| n.path.clone()) else {
            return;
        };
        for e in entries.iter_mut().filter(|e| e.ino == 0) {
            e.ino = st.ino_for(e.kind, &e.path_under(&prefix), e.etag.as_deref());
        }
    }

    /// Counts one kernel lookup of each listed entry (READDIRPLUS hands the kernel entries as if
    /// looked up) and returns their attributes.
    pub fn remember_listed(&self, parent: u64, entries: &[DirEntry]) -> Vec<Attr> {
        let mut st = self.lock();
        let Some(prefix) = st.nodes.get(&parent).map(|n| n.path.clone()) else {
            return Vec::new();
        };
        let fresh_until = Instant::now() + self.ttl;
        entries
            .iter()
            .map(|e| st.remember(parent, &prefix, e, fresh_until))
            .collect()
    }

    /// Every entry of a directory (for tests and tools; the FUSE layer streams with `opendir`).
    pub async fn readdir(
        self: &Arc<Self>,
        ino: u64,
        rt: &tokio::runtime::Handle,
    ) -> Result<Vec<DirEntry>, NsError> {
        let (dir, _) = self.opendir(ino, rt)?;
        let mut all = Vec::new();
        loop {
            match dir.read(all.len(), 4096).await {
                Read::Entries(e) if e.is_empty() => break,
                Read::Entries(e) => all.extend(e),
                Read::Restart => return Box::pin(self.readdir(ino, rt)).await,
                Read::Failed(e) => return Err(e),
            }
        }
        self.number(ino, &mut all);
        Ok(all)
    }

    /// The parent of a directory inode (for `..`).
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.lock().nodes.get(&ino).map_or(ROOT_INO, |n| n.parent)
    }

    /// The kernel dropped `n` references to `ino`; frees the node at zero.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut st = self.lock();
        let Some(node) = st.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return;
        }
        st.drop_listing(ino);
        st.streams.remove(&ino);
        if let Some(node) = st.nodes.remove(&ino) {
            let key = (node.parent, node.name);
            if st.by_name.get(&key) == Some(&ino) {
                st.by_name.remove(&key);
            }
        }
    }

    /// Nodes currently held (for tests and stats).
    pub fn node_count(&self) -> usize {
        self.lock().nodes.len()
    }
}

/// Most names a negative cache remembers: it saves requests, it must not grow without bound.
const MAX_NEGATIVE: usize = 100_000;

/// Inserts into a negative cache, dropping expired entries when it is full, and everything when
/// all are still fresh (a miss only costs one request again).
fn bounded_insert<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Instant>, key: K, until: Instant) {
    if map.len() >= MAX_NEGATIVE {
        let now = Instant::now();
        map.retain(|_, t| *t > now);
        if map.len() >= MAX_NEGATIVE {
            map.clear();
        }
    }
    map.insert(key, until);
}

fn dir_entry(name: &str) -> DirEntry {
    DirEntry {
        name: name.to_string(),
        ino: 0,
        kind: Kind::Dir,
        size: 0,
        mtime: SystemTime::now(),
        etag: None,
    }
}

fn file_entry(name: &str, meta: &ObjectMeta) -> DirEntry {
    DirEntry {
        name: name.to_string(),
        ino: 0,
        kind: Kind::File,
        size: meta.size,
        mtime: meta.last_modified,
        // An origin without ETags answers HEAD with none: unknown, to be asked at open.
        etag: Some(meta.etag.clone()).filter(|e| !e.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_paths_are_invalid() {
        for bad in ["", ".", "..", "a/b", &"x".repeat(256)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["a", "...", "with space", "ü名前", "%+", &"x".repeat(255)] {
            assert!(valid_name(good), "{good:?}");
        }
    }

    use crate::origin::fault::FaultOrigin;
    use crate::origin::ListedObject;

    fn ns(origin: &Arc<FaultOrigin>, ttl: Duration) -> Namespace {
        Namespace::new(origin.clone(), "", ttl, Duration::from_secs(10))
    }

    #[tokio::test]
    async fn a_new_version_gets_its_own_inode_and_the_old_one_keeps_its_attributes() {
        let origin = Arc::new(FaultOrigin::new("b"));
        origin.put("f", vec![1u8; 1000]);
        // TTL zero: every lookup and open asks the origin, as after the TTL.
        let ns = ns(&origin, Duration::ZERO);
        let a = ns.lookup(ROOT_INO, "f").await.unwrap();
        let opened_a = ns.open(a.ino).await.unwrap();
        assert_eq!(opened_a.size, 1000);

        let etag_b = origin.put("f", vec![2u8; 10]);
        let b = ns.lookup(ROOT_INO, "f").await.unwrap();
        assert_ne!(a.ino, b.ino, "a new version is a new inode");
        assert_eq!(b.size, 10);
        let heads = origin.heads();
        // The old inode keeps its own size (never shrinks under a reader), without a request.
        assert_eq!(ns.getattr(a.ino).await.unwrap().size, 1000);
        assert_eq!(origin.heads(), heads);
        // Opening the old inode again is ESTALE (the kernel then looks the name up again).
        assert!(matches!(ns.open(a.ino).await, Err(NsError::Stale)));
        let opened_b = ns.open(b.ino).await.unwrap();
        assert_eq!(
            (opened_b.etag.as_str(), opened_b.size),
            (etag_b.as_str(), 10)
        );
        // Both versions stay known until the kernel forgets them.
        assert_eq!(ns.node_count(), 3);
        ns.forget(a.ino, 1);
        assert_eq!(ns.node_count(), 2);
    }

    #[tokio::test]
    async fn an_open_that_finds_a_new_version_is_stale_and_supersedes_the_inode() {
        let origin = Arc::new(FaultOrigin::new("b"));
        origin.put("d/f", vec![1u8; 100]);
        let ns = ns(&origin, Duration::ZERO);
        let d = ns.lookup(ROOT_INO, "d").await.unwrap();
        let a = ns.lookup(d.ino, "f").await.unwrap();
        origin.put("d/f", vec![2u8; 50]);
        assert!(matches!(ns.open(a.ino).await, Err(NsError::Stale)));
        assert_eq!(ns.getattr(a.ino).await.unwrap().size, 100);
        let b = ns.lookup(d.ino, "f").await.unwrap();
        assert_ne!(a.ino, b.ino);
        assert_eq!(ns.open(b.ino).await.unwrap().size, 50);
    }

    #[tokio::test]
    async fn an_object_without_etag_fails_to_open_with_a_clear_error_once_per_ttl() {
        let origin = Arc::new(FaultOrigin::new("b"));
        origin.put_without_etag("plain", vec![0u8; 10]);
        let ns = ns(&origin, Duration::from_secs(60));
        let f = ns.lookup(ROOT_INO, "plain").await.unwrap();
        let ns = Arc::new(ns);
        let listed = ns
            .readdir(ROOT_INO, &tokio::runtime::Handle::current())
            .await
            .unwrap();
        assert!(listed.iter().any(|e| e.name == "plain" && e.etag.is_none()));
        match ns.open(f.ino).await {
            Err(e @ NsError::NoEtag(_)) => {
                let text = e.to_string();
                assert!(text.contains("plain") && text.contains("no ETag"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let heads = origin.heads();
        assert!(matches!(ns.open(f.ino).await, Err(NsError::NoEtag(_))));
        assert_eq!(origin.heads(), heads, "remembered: no second HEAD");
    }

    #[test]
    fn listed_keys_outside_the_prefix_are_skipped_never_a_panic() {
        let listed = |key: &str| ListedObject {
            key: key.into(),
            size: 1,
            last_modified: SystemTime::UNIX_EPOCH,
            etag: None,
        };
        let page = ListPage {
            prefixes: vec!["é".into(), "dir/sub/".into(), "x/".into()],
            objects: vec![
                listed("é"),
                listed("d"),
                listed("dir/ok"),
                listed("other/z"),
            ],
            next_token: None,
        };
        let mut merged = BTreeMap::new();
        merge_page("dir/", &page, &mut merged);
        let names: Vec<_> = merged.keys().cloned().collect();
        assert_eq!(names, ["ok", "sub"]);
    }

    #[test]
    fn negative_caches_are_bounded() {
        let mut m = HashMap::new();
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..MAX_NEGATIVE + 10 {
            bounded_insert(&mut m, i, later);
        }
        assert!(m.len() <= MAX_NEGATIVE);
    }

    #[test]
    fn inode_numbers_are_stable_and_distinct() {
        let st = State::default();
        let a = st.ino_for(Kind::File, "a/b", Some("e1"));
        assert_eq!(a, st.ino_for(Kind::File, "a/b", Some("e1")));
        assert_ne!(a, st.ino_for(Kind::File, "a/b", Some("e2")));
        assert_ne!(a, st.ino_for(Kind::Dir, "a/b/", None));
        assert!(a >= 2);
    }
}
