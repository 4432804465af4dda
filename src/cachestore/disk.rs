//! The local disk cache: one file per chunk, in the format [`super::chunkfile`] owns.
//!
//! A read verifies only the blocks it touches, so a 4 KiB read of a cached 8 MiB chunk reads
//! 64 KiB, not 8 MiB, and still never serves a corrupt byte: any mismatch, truncation or foreign
//! header makes the file a miss and it is removed.
//!
//! Writes go to `<dir>/tmp/` and are renamed into place, so a crash leaves only temp files,
//! which are swept at start. An in-memory LRU index of the files bounds the total size; it is
//! rebuilt at start from the files themselves, ordered by modification time.
//!
//! The cache is private and never destroys what it did not write. [`prepare_root`] picks the
//! directory: `--cache-dir` itself when it is absent, empty or already an orcafs cache, else
//! orcafs's own subdirectory of it, and refuses the root, home and system directories. What
//! orcafs creates is 0700 (directories) and 0600 (files), never looser whatever the umask;
//! what an earlier orcafs left looser is tightened at start. Sweeps delete only orcafs's temp
//! files, and eviction only chunk files at chunk paths: anything else found there is counted,
//! kept and never served.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use lru::LruCache;

use super::chunkfile::{self, read_dir_paths, DirKind, Header, BLOCK};
use super::{
    check_put, once, read_after_write, CacheStore, ChunkStream, Committed, Info, StoreError,
};
use crate::chunk::{ChunkId, ChunkKey};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cache I/O error at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A directory orcafs will not keep its cache in; `why` ends with what to do instead.
    #[error("will not use {dir} as the cache directory: {why}")]
    Refused { dir: PathBuf, why: String },
}

fn refused(dir: &Path, why: impl Into<String>) -> DiskError {
    DiskError::Refused {
        dir: dir.to_owned(),
        why: why.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct DiskStore {
    pub(super) root: PathBuf,
    pub(super) max_bytes: u64,
    pub(super) index: Mutex<Index>,
    /// Recently read chunk files, open with their headers decoded: a warm read is a pread and
    /// a CRC check, not an open, a stat and a header parse.
    open: Mutex<LruCache<ChunkId, Arc<OpenChunk>>>,
    /// When each recently advised chunk was (see [`DiskStore::advise`]).
    advised: Mutex<LruCache<ChunkId, Instant>>,
    pub(super) metrics: Arc<Metrics>,
}

/// How long a read-ahead advice is taken to hold (pages may be reclaimed after).
const ADVICE_FRESH: Duration = Duration::from_secs(10);

/// How many chunk files stay open for reading.
const OPEN_FILES: usize = 64;

/// A chunk file whose header matched its key and whose length matched the header.
struct OpenChunk {
    file: File,
    header: Header,
}

impl OpenChunk {
    fn open(file: File, key: &ChunkKey) -> io::Result<Option<OpenChunk>> {
        let file_len = file.metadata()?.len();
        let head = chunkfile::read_header(&file, file_len)?;
        Ok(chunkfile::decode(&head)
            .ok()
            .filter(|h| h.is_of(key) && h.file_len() == file_len)
            .map(|header| OpenChunk { file, header }))
    }

    /// Bytes `[offset, offset+len)` of the data, clipped to its length; None when a block they
    /// touch fails its CRC. Whole blocks are read (into fresh, unzeroed memory) and checked.
    fn read(&self, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        let h = &self.header;
        let end = offset.saturating_add(len).min(h.data_len);
        if offset >= end {
            return Ok(Some(Bytes::new()));
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let span_start = first * BLOCK;
        let span_end = ((last + 1) * BLOCK).min(h.data_len);
        let buf = match pread_exact(
            &self.file,
            (span_end - span_start) as usize,
            h.len + span_start,
        ) {
            Ok(b) => b,
            // Truncated since it was opened.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if h.bad_block(first, &buf).is_some() {
            return Ok(None);
        }
        let from = (offset - span_start) as usize;
        let to = (end - span_start) as usize;
        Ok(Some(buf.freeze().slice(from..to)))
    }
}

/// `len` bytes at `at`, read straight into a new buffer's spare capacity (no zero-fill first).
fn pread_exact(file: &File, len: usize, at: u64) -> io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let spare = buf.spare_capacity_mut();
        let pos = libc::off_t::try_from(at + done as u64).map_err(io::Error::other)?;
        // SAFETY: pread writes at most `len - done` bytes (<= spare.len()) to the spare
        // capacity, which is valid for writes; only the bytes it reports are marked initialised.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), len - done, pos) };
        match n {
            n if n > 0 => unsafe { buf.set_len(done + n as usize) },
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

pub(super) struct Index {
    pub(super) lru: LruCache<ChunkId, u64>,
    pub(super) bytes: u64,
    /// Last use of each chunk, mirrored into the file's mtime (at most once a minute), so the
    /// LRU order and idle ages survive a restart.
    pub(super) used: HashMap<ChunkId, SystemTime>,
}

/// How stale a file's mtime may get before a read refreshes it.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// What start-up found in the cache directory.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanReport {
    pub chunks: u64,
    pub bytes: u64,
    pub temp_removed: u64,
    /// Files under `chunks/` that are not chunk files: orcafs did not write them, so they stay.
    pub foreign_files: u64,
    /// Chunk files and directories an earlier orcafs left readable by others, now private.
    pub made_private: u64,
}

/// What to do instead, for the refusals that any directory of its own cures.
const USE_OWN: &str =
    "point --cache-dir at a directory for orcafs alone, or leave it out for the default";

/// Directories of the system itself: refused by name, whatever they hold.
const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
    "/run", "/sbin", "/sys", "/usr", "/var",
];

/// Why `dir` may never be a cache directory, whatever it holds: the root, a home directory
/// (`$HOME`, `/root`, `/home/NAME`) or a system directory. Compared with symlinks resolved.
fn forbidden(dir: &Path) -> Option<&'static str> {
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let dir = real(dir);
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    let is_home = home.is_some_and(|h| real(Path::new(&h)) == dir)
        || dir == Path::new("/root")
        || dir.parent() == Some(Path::new("/home"));
    if dir == Path::new("/") {
        Some("it is the root directory")
    } else if is_home {
        Some("it is a home directory")
    } else if SYSTEM_DIRS.iter().any(|s| dir == Path::new(s)) {
        Some("it is a system directory")
    } else {
        None
    }
}

/// The directory the cache lives in for `--cache-dir dir`, and what it holds now: `dir` itself
/// when it is absent, empty or already an orcafs cache; else orcafs's own subdirectory
/// `dir/orcafs/`, so that files orcafs did not write are never among its own. Reads only.
/// Refuses, in one sentence saying what to do: the root, home and system directories, a
/// directory every user may write (such as /tmp: anyone could make or swap `orcafs/` there),
/// one owned by another user, and a marker of a layout this build does not know.
pub fn choose_root(dir: &Path) -> Result<(PathBuf, DirKind), DiskError> {
    if let Some(why) = forbidden(dir) {
        return Err(refused(dir, format!("{why}; {USE_OWN}")));
    }
    let kind = chunkfile::dir_kind(dir).map_err(io_err(dir))?;
    check_usable(dir, &kind)?;
    if kind != DirKind::Foreign {
        return Ok((dir.to_owned(), kind));
    }
    let sub = dir.join(chunkfile::SUBDIR);
    let sub_kind = chunkfile::dir_kind(&sub).map_err(io_err(&sub))?;
    if sub_kind == DirKind::Foreign {
        let why = format!(
            "it holds other files, and so does its {}/ subdirectory; point --cache-dir at an \
             empty directory or an orcafs cache",
            chunkfile::SUBDIR
        );
        return Err(refused(dir, why));
    }
    check_usable(&sub, &sub_kind)?;
    Ok((sub, sub_kind))
}

/// Refuses an existing `dir` orcafs cannot make or keep its own (or, holding other files, keep
/// its subdirectory safe in).
fn check_usable(dir: &Path, kind: &DirKind) -> Result<(), DiskError> {
    match kind {
        DirKind::Missing => return Ok(()),
        DirKind::NotADir => return Err(refused(dir, "it is not a directory")),
        DirKind::OtherMarker(line) => {
            return Err(refused(dir, chunkfile::unknown_layout(line)));
        }
        _ => {}
    }
    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    if *kind == DirKind::Foreign && meta.mode() & 0o002 != 0 {
        let why = format!(
            "every user may write to it, so anyone could plant or swap orcafs's directory there; \
             {USE_OWN}"
        );
        return Err(refused(dir, why));
    }
    let owner = meta.uid();
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if owner != me {
        let why = format!(
            "it belongs to uid {owner}, not to uid {me} that runs orcafs, who could not keep it \
             private; use a directory of your own"
        );
        return Err(refused(dir, why));
    }
    Ok(())
}

/// [`choose_root`], then makes the choice orcafs's: created (0700), marked, made private if an
/// earlier orcafs left it looser, with `chunks/` and `tmp/` in it. Returns the cache's root.
pub fn prepare_root(dir: &Path) -> Result<PathBuf, DiskError> {
    let (root, kind) = choose_root(dir)?;
    if root != dir && chunkfile::chunks_dir(dir).is_dir() {
        tracing::warn!(
            dir = %dir.display(),
            cache = %root.display(),
            "a chunks/ directory sits beside other files here: if an earlier orcafs wrote it, it is \
             no longer used (orcafs keeps to its own subdirectory); delete chunks/ and tmp/ to free the space"
        );
    }
    create_private_dir(&root).map_err(io_err(&root))?;
    make_private(&root, 0o700)?;
    if kind != DirKind::Marked {
        write_marker(&root)?;
    }
    if kind == DirKind::Legacy {
        // Written 0644 by the orcafs that made this cache.
        make_private(&chunkfile::log_path(&root), 0o600)?;
        let dir = root.display();
        tracing::info!(%dir, "adopted the cache of an earlier orcafs: marked it, made it private");
    }
    for p in [chunkfile::chunks_dir(&root), chunkfile::tmp_dir(&root)] {
        create_private_dir(&p).map_err(io_err(&p))?;
        make_private(&p, 0o700)?;
    }
    Ok(root)
}

/// Creates `dir` and any missing parents, 0700 (less if the umask says so, never more).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Sets orcafs's own `path` to `mode` if group or others have any access to it.
fn make_private(path: &Path, mode: u32) -> Result<(), DiskError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    if tighten(path, &meta, mode).map_err(io_err(path))? {
        let was = format!("{:o}", meta.mode() & 0o777);
        tracing::info!(path = %path.display(), was, "made private");
    }
    Ok(())
}

/// Sets `path` (whose metadata is `meta`) to `mode` if group or others have any access to it;
/// true when it did.
fn tighten(path: &Path, meta: &fs::Metadata, mode: u32) -> io::Result<bool> {
    if meta.mode() & 0o077 == 0 {
        return Ok(false);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// Writes the marker, unless a mount starting at the same moment wrote it first.
fn write_marker(root: &Path) -> Result<(), DiskError> {
    let path = chunkfile::marker_path(root);
    let mut file = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    file.write_all(chunkfile::marker_text().as_bytes())
        .map_err(io_err(&path))
}

impl DiskStore {
    /// Opens (creating) the cache for `--cache-dir dir` (see [`prepare_root`]: its root may be
    /// `dir/orcafs`), sweeps temp files, and indexes the chunks.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<(DiskStore, ScanReport), DiskError> {
        let root = prepare_root(dir)?;
        let store = DiskStore {
            root,
            max_bytes,
            index: Mutex::new(Index {
                lru: LruCache::unbounded(),
                bytes: 0,
                used: HashMap::new(),
            }),
            open: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(OPEN_FILES).expect("non-zero"),
            )),
            advised: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(OPEN_FILES).expect("non-zero"),
            )),
            metrics,
        };
        let report = store.scan()?;
        store.evict_to_fit(0);
        Ok((store, report))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes held, as the index counts them.
    pub fn used_bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().lru.contains(id)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the index lock leaves plain data behind; keep going.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn path_of(&self, id: &ChunkId) -> PathBuf {
        chunkfile::chunk_path(&self.root, id)
    }

    /// Reads `len` bytes at `offset` inside the chunk; `Ok(None)` on a miss (absent, or found bad
    /// and removed).
    pub fn read(&self, key: &ChunkKey, offset: u64, len: u64) -> Result<Option<Bytes>, DiskError> {
        let id = key.id();
        let path = self.path_of(&id);
        let Some(chunk) = self.open_chunk(&id, key, &path)? else {
            Metrics::inc(&self.metrics.disk_misses);
            return Ok(None);
        };
        match chunk.read(offset, len).map_err(io_err(&path))? {
            Some(bytes) => {
                if self.promote(&id) {
                    // Best effort: a failed touch only makes the chunk look older after a restart.
                    let _ = chunk.file.set_modified(SystemTime::now());
                }
                Metrics::inc(&self.metrics.disk_hits);
                Metrics::add(&self.metrics.disk_bytes_read, bytes.len() as u64);
                Ok(Some(bytes))
            }
            None => {
                self.drop_corrupt(&id, key, &path);
                Metrics::inc(&self.metrics.disk_misses);
                Ok(None)
            }
        }
    }

    /// The chunk's file, open with its header checked: from the open-file cache, else opened
    /// now. None when there is no usable file (a missing one heals the index; a corrupt,
    /// truncated or foreign one is removed).
    fn open_chunk(
        &self,
        id: &ChunkId,
        key: &ChunkKey,
        path: &Path,
    ) -> Result<Option<Arc<OpenChunk>>, DiskError> {
        let cached = self.open_files().get(id).cloned();
        if let Some(chunk) = cached {
            // Unlinked behind our back (`orcafs cache clear`): let its space go.
            if chunk.file.metadata().is_ok_and(|m| m.nlink() > 0) {
                return Ok(Some(chunk));
            }
            self.open_files().pop(id);
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // An index entry without its file (a put racing a delete) heals here.
                self.forget_entry(id);
                return Ok(None);
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        match OpenChunk::open(file, key).map_err(io_err(path))? {
            Some(chunk) => {
                let chunk = Arc::new(chunk);
                self.open_files().put(*id, chunk.clone());
                Ok(Some(chunk))
            }
            None => {
                self.drop_corrupt(id, key, path);
                Ok(None)
            }
        }
    }

    /// Asks the kernel to read the chunk's file into the page cache in the background, so a
    /// sequential reader finds it there instead of waiting on the disk read by read.
    pub fn advise(&self, key: &ChunkKey) {
        let id = key.id();
        if let Ok(Some(chunk)) = self.open_chunk(&id, key, &self.path_of(&id)) {
            // SAFETY: a plain advice call on an fd this store keeps open.
            unsafe {
                libc::posix_fadvise(chunk.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
            }
        }
    }

    /// True unless the chunk was advised moments ago (readahead asks on every read).
    fn first_advice(&self, id: &ChunkId) -> bool {
        let now = Instant::now();
        let mut advised = self.advised.lock().unwrap_or_else(|p| p.into_inner());
        match advised.get(id) {
            Some(t) if now.duration_since(*t) < ADVICE_FRESH => false,
            _ => {
                advised.put(*id, now);
                true
            }
        }
    }

    fn drop_corrupt(&self, id: &ChunkId, key: &ChunkKey, path: &Path) {
        tracing::warn!(?key, path = %path.display(), "corrupt, truncated or foreign cache file: dropping it");
        Metrics::inc(&self.metrics.disk_corrupt);
        self.remove(id);
    }

    fn open_files(&self) -> MutexGuard<'_, LruCache<ChunkId, Arc<OpenChunk>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a chunk used now; true when its file's mtime should be refreshed.
    fn promote(&self, id: &ChunkId) -> bool {
        let now = SystemTime::now();
        let mut idx = self.lock();
        idx.lru.promote(id);
        let stale = idx
            .used
            .get(id)
            .is_none_or(|t| now.duration_since(*t).unwrap_or_default() >= TOUCH_EVERY);
        if stale {
            idx.used.insert(*id, now);
        }
        stale
    }

    /// Evicts chunks not used for `max_age` (least recently used first); returns how many.
    pub fn evict_idle(&self, max_age: Duration) -> u64 {
        let Some(cutoff) = SystemTime::now().checked_sub(max_age) else {
            return 0;
        };
        let victims: Vec<ChunkId> = {
            let idx = self.lock();
            idx.lru
                .iter()
                .rev()
                .take_while(|(id, _)| idx.used.get(id).is_some_and(|t| *t < cutoff))
                .map(|(id, _)| *id)
                .collect()
        };
        for id in &victims {
            self.remove(id);
            Metrics::inc(&self.metrics.disk_evictions);
        }
        victims.len() as u64
    }

    /// Stores a complete chunk given as pieces: temp file, then rename into place.
    pub fn write(&self, key: &ChunkKey, pieces: &[Bytes]) -> Result<(), DiskError> {
        let id = key.id();
        let data_len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let header = chunkfile::encode(key, pieces);
        let final_path = self.path_of(&id);
        let tmp = chunkfile::temp_path(&self.root, &id);
        let result = (|| {
            // 0600 from the start, whatever the umask; a new name, so no planted file is reused.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&header)?;
            for p in pieces {
                f.write_all(p)?;
            }
            drop(f);
            if let Some(dir) = final_path.parent() {
                create_private_dir(dir)?;
            }
            fs::rename(&tmp, &final_path)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&final_path)(e));
        }
        let file_bytes = header.len() as u64 + data_len;
        self.open_files().pop(&id);
        {
            let mut idx = self.lock();
            if let Some(old) = idx.lru.put(id, file_bytes) {
                idx.bytes -= old;
            }
            idx.used.insert(id, SystemTime::now());
            idx.bytes += file_bytes;
        }
        Metrics::inc(&self.metrics.disk_commits);
        Metrics::add(&self.metrics.disk_bytes_written, data_len);
        self.evict_to_fit(0);
        Ok(())
    }

    /// Drops a chunk from the index only (its file is already gone).
    fn forget_entry(&self, id: &ChunkId) {
        let mut idx = self.lock();
        if let Some(size) = idx.lru.pop(id) {
            idx.bytes -= size;
        }
        idx.used.remove(id);
    }

    pub(super) fn remove(&self, id: &ChunkId) {
        self.open_files().pop(id);
        {
            let mut idx = self.lock();
            if let Some(size) = idx.lru.pop(id) {
                idx.bytes -= size;
            }
            idx.used.remove(id);
        }
        let _ = fs::remove_file(self.path_of(id));
    }

    /// Evicts least recently used chunks until `extra` more bytes fit under the bound.
    pub(super) fn evict_to_fit(&self, extra: u64) {
        loop {
            // Decide under the lock, unlink outside it.
            let victim = {
                let mut idx = self.lock();
                if idx.bytes + extra <= self.max_bytes {
                    return;
                }
                match idx.lru.pop_lru() {
                    Some((id, size)) => {
                        idx.bytes -= size;
                        idx.used.remove(&id);
                        id
                    }
                    None => return,
                }
            };
            self.open_files().pop(&victim);
            let _ = fs::remove_file(self.path_of(&victim));
            Metrics::inc(&self.metrics.disk_evictions);
        }
    }

    /// Removes temp files (a crashed or interrupted writer's), makes private what an earlier
    /// orcafs left readable, counts files that are not chunk files (and leaves them), then
    /// indexes the chunk files oldest first.
    fn scan(&self) -> Result<ScanReport, DiskError> {
        let mut report = ScanReport {
            temp_removed: self.sweep_temp(),
            ..Default::default()
        };
        // Best effort: `chunks/` itself is already 0700, so a miss here exposes nothing.
        let mut private = |p: &Path, m: &fs::Metadata, mode| {
            report.made_private += u64::from(tighten(p, m, mode).unwrap_or(false));
        };
        let mut found: Vec<(std::time::SystemTime, ChunkId, u64)> = Vec::new();
        let mut foreign = 0;
        for l1 in read_dir_paths(&chunkfile::chunks_dir(&self.root)) {
            for l2 in read_dir_paths(&l1) {
                for file in read_dir_paths(&l2) {
                    let meta = fs::symlink_metadata(&file);
                    match (chunkfile::chunk_id_at(&self.root, &file), meta) {
                        (Some(id), Ok(m)) if m.is_file() => {
                            private(&file, &m, 0o600);
                            let mtime = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                            found.push((mtime, id, m.len()));
                        }
                        _ => foreign += 1,
                    }
                }
                if let Some(m) = fs::symlink_metadata(&l2).ok().filter(|m| m.is_dir()) {
                    private(&l2, &m, 0o700);
                }
            }
            if let Some(m) = fs::symlink_metadata(&l1).ok().filter(|m| m.is_dir()) {
                private(&l1, &m, 0o700);
            }
        }
        report.foreign_files = foreign;
        found.sort();
        let mut idx = self.lock();
        for (mtime, id, size) in found {
            idx.lru.put(id, size);
            idx.used.insert(id, mtime);
            idx.bytes += size;
            report.chunks += 1;
            report.bytes += size;
        }
        Ok(report)
    }

    /// Deletes orcafs's temp files in `tmp/` (named as [`chunkfile::temp_path`] names them, and
    /// nothing else there); returns how many.
    pub fn sweep_temp(&self) -> u64 {
        let temp = chunkfile::temp_files(&self.root);
        temp.iter().filter(|p| fs::remove_file(p).is_ok()).count() as u64
    }
}

/// The disk store behind the [`CacheStore`] trait; file I/O runs on the blocking pool.
#[derive(Clone)]
pub struct DiskDriver(pub Arc<DiskStore>);

impl DiskStore {
    /// Size and commit time of a stored chunk, after checking its header and length.
    pub fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, DiskError> {
        let path = self.path_of(&key.id());
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        let info = Info {
            size: key.len(),
            committed: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        };
        Ok(OpenChunk::open(file, key)
            .map_err(io_err(&path))?
            .map(|_| info))
    }

    /// Removes a chunk if present.
    pub fn delete(&self, key: &ChunkKey) {
        self.remove(&key.id());
    }
}

fn store_err(e: DiskError) -> StoreError {
    StoreError::Transient(e.to_string())
}

impl DiskDriver {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DiskStore) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Other(format!("disk task failed: {e}")))
    }
}

#[async_trait::async_trait]
impl CacheStore for DiskDriver {
    fn name(&self) -> &str {
        "disk"
    }

    async fn get_chunk(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<ChunkStream>, StoreError> {
        // The index is complete (built from the files at open, kept by this process alone), so
        // a miss needs no trip to a blocking thread: cold reads start their fill at once.
        if !self.0.contains(&key.id()) {
            Metrics::inc(&self.0.metrics.disk_misses);
            return Ok(None);
        }
        let k = key.clone();
        let bytes = self
            .blocking(move |d| d.read(&k, offset, len))
            .await?
            .map_err(store_err)?;
        Ok(bytes.map(once))
    }

    async fn put_chunk(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
    ) -> Result<Committed, StoreError> {
        check_put(key, size, &data)?;
        let id = key.id();
        // The index can name a file a racing delete just removed: trust it only with the file.
        if self.0.contains(&id) && self.0.path_of(&id).exists() {
            return Ok(Committed::AlreadyThere);
        }
        let k = key.clone();
        self.blocking(move |d| d.write(&k, &data))
            .await?
            .map_err(store_err)?;
        Ok(Committed::Stored)
    }

    async fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, StoreError> {
        let k = key.clone();
        self.blocking(move |d| d.stat(&k)).await?.map_err(store_err)
    }

    async fn delete(&self, key: &ChunkKey) -> Result<(), StoreError> {
        let k = key.clone();
        self.blocking(move |d| d.delete(&k)).await
    }

    async fn self_test(&self) -> Result<(), StoreError> {
        read_after_write(self).await
    }

    fn contains_hint(&self, key: &ChunkKey) -> Option<bool> {
        Some(self.0.contains(&key.id()))
    }

    fn will_read(&self, key: &ChunkKey) {
        if !self.0.contains(&key.id()) || !self.0.first_advice(&key.id()) {
            return;
        }
        let (store, key) = (self.0.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.advise(&key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cachestore::chunkfile::test_key as key;
    use std::os::unix::fs::FileExt;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn store(dir: &Path, max: u64) -> DiskStore {
        DiskStore::open(dir, max, Arc::default()).unwrap().0
    }

    #[test]
    fn round_trip_any_range_across_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let size = 3 * BLOCK as usize + 123;
        let d = data(size);
        let k = key("e", size as u64, 1 << 20, 0);
        let pieces: Vec<Bytes> = d.chunks(10_000).map(Bytes::copy_from_slice).collect();
        s.write(&k, &pieces).unwrap();
        for (off, len) in [
            (0, size),
            (1, 5),
            (BLOCK as usize - 3, 10),
            (size - 1, 1),
            (100, 200_000),
        ] {
            let got = s.read(&k, off as u64, len as u64).unwrap().unwrap();
            assert_eq!(&got[..], &d[off..(off + len).min(size)]);
        }
    }

    #[test]
    fn corrupt_truncated_or_foreign_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let size = 2 * BLOCK as usize;
        let k = key("e", size as u64, 1 << 20, 0);
        let path = s.path_of(&k.id());

        s.write(&k, &[Bytes::from(data(size))]).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 5000 + BLOCK).unwrap();
        assert!(
            s.read(&k, 0, 10).unwrap().is_some(),
            "untouched block still verifies"
        );
        assert!(
            s.read(&k, BLOCK, 10).unwrap().is_none(),
            "flipped byte detected"
        );
        assert!(!path.exists(), "bad file removed");

        s.write(&k, &[Bytes::from(data(size))]).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(f.metadata().unwrap().len() - 1).unwrap();
        assert!(s.read(&k, 0, 10).unwrap().is_none(), "truncation detected");

        // Another chunk's file copied to this chunk's path.
        let other = key("other-etag", size as u64, 1 << 20, 0);
        s.write(&other, &[Bytes::from(data(size))]).unwrap();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::copy(s.path_of(&other.id()), &path).unwrap();
        assert!(
            s.read(&k, 0, 10).unwrap().is_none(),
            "foreign header detected"
        );

        fs::write(&path, b"garbage").unwrap();
        assert!(s.read(&k, 0, 10).unwrap().is_none());
    }

    #[test]
    fn idle_chunks_age_out_and_use_survives_restart_via_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let old = key("e", 2 * BLOCK, BLOCK, 0);
        let fresh = key("e", 2 * BLOCK, BLOCK, 1);
        s.write(&old, &[Bytes::from(data(BLOCK as usize))]).unwrap();
        s.write(&fresh, &[Bytes::from(data(BLOCK as usize))])
            .unwrap();
        // Pretend `old` was last used two hours ago, as a restart would read from its mtime.
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(s.path_of(&old.id()))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        drop(s);
        let (s, _) = DiskStore::open(dir.path(), 1 << 30, Arc::default()).unwrap();
        assert_eq!(s.evict_idle(Duration::from_secs(3600)), 1);
        assert!(s.read(&old, 0, 1).unwrap().is_none(), "idle chunk evicted");
        assert!(s.read(&fresh, 0, 1).unwrap().is_some(), "recent chunk kept");
    }

    #[test]
    fn evicts_least_recently_used_and_reindexes_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let one = BLOCK as usize;
        let s = store(dir.path(), 3 * (one as u64 + 200));
        let keys: Vec<ChunkKey> = (0..4)
            .map(|i| key("e", 4 * one as u64, one as u64, i))
            .collect();
        for k in &keys[..3] {
            s.write(k, &[Bytes::from(data(one))]).unwrap();
        }
        assert!(s.read(&keys[0], 0, 1).unwrap().is_some()); // 0 is now most recent
        s.write(&keys[3], &[Bytes::from(data(one))]).unwrap();
        assert!(s.read(&keys[1], 0, 1).unwrap().is_none(), "LRU victim gone");
        assert!(s.read(&keys[0], 0, 1).unwrap().is_some());
        assert!(s.used_bytes() <= 3 * (one as u64 + 200));

        fs::write(chunkfile::temp_path(dir.path(), &keys[1].id()), b"half").unwrap();
        drop(s);
        let (s, report) = DiskStore::open(dir.path(), 1 << 30, Arc::default()).unwrap();
        assert_eq!(report.chunks, 3);
        assert_eq!(report.temp_removed, 1);
        assert!(s.read(&keys[3], 0, 1).unwrap().is_some());
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// Every path below `dir`, directories included.
    fn tree(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for p in read_dir_paths(dir) {
            if p.is_dir() {
                out.extend(tree(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn sweeps_remove_only_orcafs_temp_files_and_keep_foreign_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let s = store(root, 1 << 30);
        let k = key("e", BLOCK, BLOCK, 0);
        s.write(&k, &[Bytes::from(data(BLOCK as usize))]).unwrap();
        drop(s);
        let own = [
            chunkfile::temp_path(root, &k.id()),
            chunkfile::temp_path(root, &key("f", 9, BLOCK, 0).id()),
        ];
        for p in &own {
            fs::write(p, b"half").unwrap();
        }
        // What a user (or a program sharing the directory) put there: never orcafs's to delete.
        let lookalike = format!("{}.{}", k.id().to_hex().to_uppercase(), "0123456789abcdef");
        let foreign = [
            root.join("tmp/foreign"),
            root.join("tmp").join(lookalike),
            root.join("tmp").join(format!("{}.xyz", k.id().to_hex())),
            root.join("notes.txt"),
            root.join("chunks/stray"),
            chunkfile::chunk_path(root, &k.id()).with_extension("bak"),
        ];
        for p in &foreign {
            fs::write(p, b"mine").unwrap();
        }
        let (s, report) = DiskStore::open(root, 1 << 30, Arc::default()).unwrap();
        assert_eq!((report.temp_removed, report.chunks), (2, 1));
        assert_eq!(report.foreign_files, 1, "the .bak beside a chunk file");
        assert!(
            own.iter().all(|p| !p.exists()),
            "own temp files swept at open"
        );
        fs::write(&own[0], b"half").unwrap();
        assert_eq!(s.sweep_temp(), 1, "and at unmount");
        for p in &foreign {
            assert_eq!(fs::read(p).unwrap(), b"mine", "{} kept", p.display());
        }
        assert!(s.read(&k, 0, 1).unwrap().is_some());
    }

    /// Under the usual umask (022) a plain create gives 0755 and 0644. (The umask is not set to
    /// 0 here: it is the whole test process's, and other tests create files meanwhile.)
    #[test]
    fn created_directories_are_0700_and_files_0600() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new/cache");
        let s = store(&root, 1 << 30);
        assert_eq!(s.root(), root, "a new directory is orcafs's own");
        for i in 0..3 {
            let k = key("e", 3 * BLOCK, BLOCK, i);
            s.write(&k, &[Bytes::from(data(BLOCK as usize))]).unwrap();
        }
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&dir.path().join("new")), 0o700, "parents it made too");
        let (mut dirs, mut files) = (0, 0);
        for p in tree(&root) {
            if p.is_dir() {
                assert_eq!(mode(&p), 0o700, "{}", p.display());
                dirs += 1;
            } else {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
                files += 1;
            }
        }
        assert!(
            dirs >= 4 && files == 4,
            "{dirs} dirs, {files} files (3 chunks and the marker)"
        );
    }

    #[test]
    fn a_directory_holding_other_files_gets_an_orcafs_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious"), b"p").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let s = store(dir.path(), 1 << 30);
        let sub = dir.path().join(chunkfile::SUBDIR);
        assert_eq!(s.root(), sub);
        assert!(chunkfile::marker_path(&sub).is_file());
        assert!(!chunkfile::marker_path(dir.path()).exists());
        assert_eq!(
            mode(dir.path()),
            0o755,
            "the user's directory keeps its mode"
        );
        assert_eq!(mode(&sub), 0o700);
        let k = key("e", 10, BLOCK, 0);
        s.write(&k, &[Bytes::from_static(b"0123456789")]).unwrap();
        drop(s);
        // The next start finds the same cache; so do the cache commands.
        let s = store(dir.path(), 1 << 30);
        assert_eq!(s.root(), sub);
        assert!(s.read(&k, 0, 10).unwrap().is_some());
        assert_eq!(chunkfile::find_root(dir.path()).unwrap(), Some(sub.clone()));
        assert_eq!(fs::read(dir.path().join("precious")).unwrap(), b"p");
        // An empty directory, or one that is already orcafs's, is used as is.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(store(empty.path(), 1 << 30).root(), empty.path());
        fs::write(empty.path().join("later"), b"x").unwrap();
        assert_eq!(store(empty.path(), 1 << 30).root(), empty.path(), "marked");
    }

    #[test]
    fn a_cache_written_before_the_marker_is_adopted_and_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let k = key("e", 10, BLOCK, 0);
        store(root, 1 << 30)
            .write(&k, &[Bytes::from_static(b"0123456789")])
            .unwrap();
        // As an earlier orcafs left it: no marker, everything readable by all, a log beside.
        fs::remove_file(chunkfile::marker_path(root)).unwrap();
        fs::write(chunkfile::log_path(root), b"log").unwrap();
        for p in tree(root).into_iter().chain([root.to_owned()]) {
            let m = if p.is_dir() { 0o755 } else { 0o644 };
            fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
        }
        assert_eq!(chunkfile::dir_kind(root).unwrap(), DirKind::Legacy);
        assert_eq!(chunkfile::find_root(root).unwrap(), Some(root.to_owned()));

        let (s, report) = DiskStore::open(root, 1 << 30, Arc::default()).unwrap();
        assert_eq!(s.root(), root, "kept in place, not moved or emptied");
        assert_eq!(report.chunks, 1);
        assert_eq!(
            report.made_private, 3,
            "the chunk file and its two fan-out directories"
        );
        assert!(s.read(&k, 0, 10).unwrap().is_some());
        assert_eq!(chunkfile::dir_kind(root).unwrap(), DirKind::Marked);
        assert_eq!(fs::read(chunkfile::log_path(root)).unwrap(), b"log");
        for p in tree(root).into_iter().chain([root.to_owned()]) {
            let want = if p.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&p), want, "{}", p.display());
        }
    }

    #[test]
    fn dangerous_or_unusable_directories_are_refused_with_what_to_do() {
        let why = |dir: &Path| match choose_root(dir) {
            Err(e @ DiskError::Refused { .. }) => e.to_string(),
            other => panic!("{} not refused: {other:?}", dir.display()),
        };
        for (dir, says) in [
            ("/", "root directory"),
            ("/root", "home directory"),
            ("/home/someone", "home directory"),
            ("/etc", "system directory"),
            ("/usr/", "system directory"),
            ("/home", "system directory"),
        ] {
            let e = why(Path::new(dir));
            assert!(e.contains(says) && e.contains("--cache-dir"), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|h| Path::new(h).is_dir()) {
            assert!(why(Path::new(&home)).contains("directory"));
        }
        let t = tempfile::tempdir().unwrap();
        let shared = t.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::write(shared.join("someone's"), b"x").unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(why(&shared).contains("every user may write"));
        assert!(!shared.join(chunkfile::SUBDIR).exists(), "nothing made");

        let file = t.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(why(&file).contains("not a directory"));

        let newer = t.path().join("newer");
        fs::create_dir(&newer).unwrap();
        fs::write(chunkfile::marker_path(&newer), b"orcafs-cache 2\n").unwrap();
        assert!(why(&newer).contains("does not know"));
        assert!(
            chunkfile::find_root(&newer).is_err(),
            "the cache commands refuse it too"
        );

        let taken = t.path().join("taken");
        fs::create_dir_all(taken.join(chunkfile::SUBDIR)).unwrap();
        fs::write(taken.join("a"), b"x").unwrap();
        fs::write(taken.join(chunkfile::SUBDIR).join("b"), b"x").unwrap();
        assert!(why(&taken).contains("so does its orcafs/ subdirectory"));

        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = t.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            assert!(why(&theirs).contains("belongs to uid 65534"));
        }
    }
}
