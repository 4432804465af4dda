//! The local disk cache: one sparse file per object version and its block map, in the layout
//! [`super::layout`] owns.
//!
//! A chunk is stored at its own offsets in its object's data file, and its 4 KiB blocks are
//! entered in the map with their CRC32C once the data is written. A read checks only the blocks
//! it touches, so a 4 KiB read of a cached chunk reads 4 KiB, as a local file would, and never
//! serves a byte that fails its CRC: a mismatch, a truncated or foreign file is a miss, and the chunk is dropped. Blocks
//! may be held without their whole chunk (a random read caches what it fetched).
//!
//! An in-memory index of the blocks held (a bit per block) and an LRU of chunks bound the total
//! size; it is rebuilt at start from the maps, ordered by their modification times (a read
//! refreshes its object's at most once a minute). Evicting a chunk clears its map entries, then
//! punches its bytes out of the data file; an object with nothing left loses both files.
//!
//! A whole, verified object can be handed out as a file ([`DiskStore::whole_object`]) for the
//! kernel to read itself (FUSE passthrough): it is pinned meanwhile (never evicted or punched).
//! Every block of it is read through and checked before it is first handed out, once it is whole
//! (in the background) or at that open; the check is stamped into the map with the data file's
//! change time after a flush, so a later process re-checks only a file that changed meanwhile,
//! and a file damaged while the mount was down is never served that way either.
//!
//! The cache is private and never destroys what it did not write. [`prepare_root`] picks the
//! directory: `--cache-dir` itself when it is absent, empty or already an orcafs cache, else
//! orcafs's own subdirectory of it, and refuses the root, home and system directories. What
//! orcafs creates is 0700 (directories) and 0600 (files), never looser whatever the umask;
//! what an earlier orcafs left looser is tightened at start. Sweeps delete only orcafs's temp
//! files, and eviction only files at object paths: anything else found there is counted, kept
//! and never served.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use lru::LruCache;

use super::layout::{self, BlockCrcs, DirKind, MapHeader, Role};
use super::{
    check_put, once, read_after_write, CacheStore, ChunkStream, Committed, Info, LocalFile,
    StoreError,
};
use crate::chunk::{ChunkId, ChunkKey, ObjectVersion, VersionId};
use crate::metrics::Metrics;
use crate::pagebuf;

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
    /// Recently used objects, their files open and their maps read: a warm read is a pread and
    /// a CRC check, not an open, a stat and a map parse.
    open: Mutex<LruCache<VersionId, Arc<Obj>>>,
    /// When each recently advised chunk was (see [`DiskStore::advise`]).
    advised: Mutex<LruCache<ChunkId, Instant>>,
    /// Objects handed out whole (passthrough): never evicted or punched while pinned.
    pins: Arc<Mutex<HashMap<VersionId, usize>>>,
    /// Serializes creating an object's files, so two writers never both create them.
    creating: Mutex<()>,
    /// Background checks of whole objects (see [`DiskStore::seal`]).
    sealing: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub(super) metrics: Arc<Metrics>,
}

/// How long a read-ahead advice is taken to hold (pages may be reclaimed after).
const ADVICE_FRESH: Duration = Duration::from_secs(10);

/// Numbers every write of map entries in this process, so a write count seen on one handle
/// never matches one of files created again since.
static WRITE_SEQ: AtomicU64 = AtomicU64::new(0);

/// How many objects stay open.
const OPEN_FILES: usize = 64;

/// How stale a map's mtime may get before a read refreshes it.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// What a read of an object's blocks found.
enum Got {
    Bytes(Bytes),
    /// These blocks are not in the map (the index thought they were).
    Absent(Vec<u64>),
    /// A block failed its CRC, or the data file is shorter than the map says; with the
    /// object's write count seen before the read (see [`Obj::writes`]).
    Bad(u64),
}

/// What opening an object's files found.
enum Opened {
    Obj(Arc<Obj>),
    /// No map file.
    Absent,
    /// Files that cannot be used (bad or foreign map, missing or wrong-sized data).
    Broken,
}

/// An object version's files, open, with the map's header checked and its entries read.
struct Obj {
    data: File,
    /// The data file opened with O_DIRECT, where its file system allows it: see [`write_data`].
    direct: Option<File>,
    map: File,
    head: MapHeader,
    /// Each block's CRC as the map holds it.
    crcs: Mutex<Entries>,
    /// Every block was checked against its CRC by this process.
    verified: AtomicBool,
    /// Every entry in the map was entered through this handle, from the bytes it wrote (the map
    /// was empty when opened, and no entry was cleared or read in since): reading the data back
    /// to check it would only read this process's own writes from the page cache.
    written_here: AtomicBool,
    /// A check (and stamp) is running (one at a time).
    verifying: AtomicBool,
    /// The number ([`WRITE_SEQ`]) of the last write of entries through this handle: a block
    /// found bad is dropped only if no write came after the read that found it (else the read
    /// may have seen a writer's bytes before its entries).
    writes: AtomicU64,
    /// Writers hold it shared from their first byte to their index update; a removal holds it
    /// alone, so it never clears or punches what a writer is in the middle of storing.
    writing: RwLock<()>,
}

/// Block CRCs as a map holds them, kept compactly (a CRC and a presence bit per 4 KiB block).
struct Entries {
    crc: Vec<u32>,
    present: Vec<u64>,
}

impl Entries {
    fn new(list: &[Option<u32>]) -> Entries {
        let mut e = Entries {
            crc: vec![0; list.len()],
            present: vec![0; list.len().div_ceil(64)],
        };
        for (i, c) in list.iter().enumerate() {
            e.set(i, *c);
        }
        e
    }

    fn len(&self) -> usize {
        self.crc.len()
    }

    fn get(&self, i: usize) -> Option<u32> {
        let on = self.present.get(i / 64)? & (1 << (i % 64)) != 0;
        on.then(|| self.crc[i])
    }

    fn set(&mut self, i: usize, c: Option<u32>) {
        if i >= self.crc.len() {
            return;
        }
        let bit = 1u64 << (i % 64);
        match c {
            Some(c) => {
                self.crc[i] = c;
                self.present[i / 64] |= bit;
            }
            None => self.present[i / 64] &= !bit,
        }
    }

    /// Entries `first..=last` (clipped to the map).
    fn range(&self, first: usize, last: usize) -> Vec<Option<u32>> {
        (first..=last.min(self.len().saturating_sub(1)))
            .map(|i| self.get(i))
            .collect()
    }
}

impl Obj {
    /// Its map file is still linked (not removed behind this handle: `orcafs cache clear`, a
    /// removed map); an error counts as unlinked.
    fn linked(&self) -> bool {
        self.map.metadata().is_ok_and(|m| m.nlink() > 0)
    }

    fn crcs(&self) -> MutexGuard<'_, Entries> {
        self.crcs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters blocks `first..` with these CRCs (None clears), in the map file and in memory.
    fn set_entries(&self, first: u64, crcs: &[Option<u32>]) -> io::Result<()> {
        let mut raw = Vec::with_capacity(crcs.len() * layout::ENTRY as usize);
        for c in crcs {
            raw.extend_from_slice(&c.map_or([0; layout::ENTRY as usize], layout::entry));
        }
        let mut mem = self.crcs();
        if crcs.iter().any(Option::is_none) {
            self.written_here.store(false, Ordering::Relaxed);
        }
        let seq = WRITE_SEQ.fetch_add(1, Ordering::SeqCst) + 1;
        self.writes.store(seq, Ordering::SeqCst);
        self.map.write_all_at(&raw, self.head.entry_at(first))?;
        for (i, c) in crcs.iter().enumerate() {
            mem.set(first as usize + i, *c);
        }
        Ok(())
    }

    /// Re-reads entries `first..=last` from the map file: another handle on the same files (an
    /// older one, evicted from the open-object cache while a writer held it) may have entered
    /// blocks since these were read.
    fn refresh(&self, first: u64, last: u64) -> io::Result<()> {
        let mut raw = vec![0u8; ((last - first + 1) * layout::ENTRY) as usize];
        let mut mem = self.crcs();
        self.map
            .read_exact_at(&mut raw, self.head.entry_at(first))?;
        for (i, e) in raw.chunks(layout::ENTRY as usize).enumerate() {
            let entry = layout::decode_entry(e);
            if entry.is_some() && mem.get(first as usize + i) != entry {
                self.written_here.store(false, Ordering::Relaxed);
            }
            mem.set(first as usize + i, entry);
        }
        Ok(())
    }

    /// Bytes `[start, end)` of the object, whole blocks read and checked.
    fn read(&self, start: u64, end: u64) -> io::Result<Got> {
        let block = self.head.block;
        let first = start / block;
        let last = (end - 1) / block;
        let seen = self.writes.load(Ordering::SeqCst);
        let mut want = self.crcs().range(first as usize, last as usize);
        if want.iter().any(Option::is_none) {
            self.refresh(first, last)?;
            want = self.crcs().range(first as usize, last as usize);
        }
        let absent: Vec<u64> = (first..=last)
            .zip(&want)
            .filter(|(_, c)| c.is_none())
            .map(|(i, _)| i)
            .collect();
        if !absent.is_empty() {
            return Ok(Got::Absent(absent));
        }
        let span_start = first * block;
        let span_end = ((last + 1) * block).min(self.head.size);
        let buf = match pread_exact(&self.data, (span_end - span_start) as usize, span_start) {
            Ok(b) => b,
            // Truncated behind our back.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Got::Bad(seen)),
            Err(e) => return Err(e),
        };
        let good = buf
            .chunks(block as usize)
            .zip(&want)
            .all(|(b, crc)| Some(crc32c::crc32c(b)) == *crc);
        if !good {
            return Ok(Got::Bad(seen));
        }
        let from = (start - span_start) as usize;
        let to = (end - span_start) as usize;
        Ok(Got::Bytes(buf.slice(from..to)))
    }

    /// Checks every block against its CRC; the first bad block's index, if any, with the
    /// write count seen before the check.
    fn verify_all(&self) -> io::Result<Option<(u64, u64)>> {
        let seen = self.writes.load(Ordering::SeqCst);
        // Read in 1 MiB spans.
        let block = self.head.block;
        let span = (1 << 20) / block;
        let blocks = self.crcs().len() as u64;
        let mut i = 0u64;
        while i < blocks {
            let n = span.max(1).min(blocks - i);
            let crcs = self.crcs().range(i as usize, (i + n - 1) as usize);
            let start = i * block;
            let end = ((i + n) * block).min(self.head.size);
            let buf = match pread_exact(&self.data, (end - start) as usize, start) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some((i, seen))),
                Err(e) => return Err(e),
            };
            for (j, b) in buf.chunks(block as usize).enumerate() {
                if crcs[j] != Some(crc32c::crc32c(b)) {
                    return Ok(Some((i + j as u64, seen)));
                }
            }
            i += n;
        }
        Ok(None)
    }
}

/// `len` bytes at `at`, read straight into a new page-aligned buffer's spare capacity (no
/// zero-fill first; aligned because a cached read goes on to the kernel as a FUSE reply).
fn pread_exact(file: &File, len: usize, at: u64) -> io::Result<Bytes> {
    let mut buf = pagebuf::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let pos = libc::off_t::try_from(at + done as u64).map_err(io::Error::other)?;
        // SAFETY: the buffer has room for `len` bytes; pread writes at most `len - done` of
        // them after the `done` already read, and only the bytes it reports are marked set.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                len - done,
                pos,
            )
        };
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
    Ok(pagebuf::freeze(buf))
}

/// Frees `[at, at+len)` of a file's blocks, keeping its size (reads there give zeros).
fn punch(file: &File, at: u64, len: u64) -> io::Result<()> {
    let (at, len) = (libc::off_t::try_from(at), libc::off_t::try_from(len));
    let (Ok(at), Ok(len)) = (at, len) else {
        return Err(io::Error::other("offset out of range"));
    };
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Which blocks of one object version the cache holds, and the chunks' geometry.
pub(super) struct Held {
    bits: Vec<u64>,
    count: u64,
    blocks: u64,
    block: u64,
    size: u64,
    chunk_size: u64,
    /// Last use, mirrored into the map's mtime (at most once a minute), so the LRU order and
    /// idle ages survive a restart.
    used: SystemTime,
}

impl Held {
    fn new(h: &MapHeader, used: SystemTime) -> Held {
        let blocks = h.blocks();
        Held {
            bits: vec![0; blocks.div_ceil(64) as usize],
            count: 0,
            blocks,
            block: h.block,
            size: h.size,
            chunk_size: h.chunk_size,
            used,
        }
    }

    fn has(&self, i: u64) -> bool {
        self.bits
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64, on: bool) {
        let Some(w) = self.bits.get_mut((i / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (i % 64);
        if on && *w & bit == 0 {
            *w |= bit;
            self.count += 1;
        } else if !on && *w & bit != 0 {
            *w &= !bit;
            self.count -= 1;
        }
    }

    /// True when every block in `first..=last` is held. Word by word: readahead asks this of
    /// every chunk in a reader's window on each read, 2048 blocks a chunk.
    fn all(&self, first: u64, last: u64) -> bool {
        if first > last {
            return true;
        }
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        let Some(words) = self.bits.get(fw..=lw) else {
            return false;
        };
        let head = u64::MAX << (first % 64);
        let tail = u64::MAX >> (63 - last % 64);
        words.iter().enumerate().all(|(i, w)| {
            let mut mask = u64::MAX;
            if i == 0 {
                mask &= head;
            }
            if i == words.len() - 1 {
                mask &= tail;
            }
            w & mask == mask
        })
    }

    /// Blocks of chunk `index`: first and last.
    fn chunk_blocks(&self, index: u64) -> Option<(u64, u64)> {
        let start = index * self.chunk_size;
        let end = (start + self.chunk_size).min(self.size);
        (start < end).then(|| (start / self.block, (end - 1) / self.block))
    }

    /// Bytes held of chunk `index`.
    fn chunk_bytes(&self, index: u64) -> u64 {
        let Some((first, last)) = self.chunk_blocks(index) else {
            return 0;
        };
        (first..=last)
            .filter(|i| self.has(*i))
            .map(|i| (self.size - i * self.block).min(self.block))
            .sum()
    }

    fn whole(&self) -> bool {
        self.count == self.blocks
    }
}

pub(super) struct Index {
    /// Chunks with at least one block held, least recently used first; the value is the bytes
    /// held of the chunk.
    pub(super) lru: LruCache<(VersionId, u64), u64>,
    pub(super) bytes: u64,
    pub(super) objects: HashMap<VersionId, Held>,
}

impl Index {
    /// Marks object `v` used at `now`; true when its map's mtime should be refreshed (at most
    /// once every [`TOUCH_EVERY`]).
    fn touch(&mut self, v: &VersionId, now: SystemTime) -> bool {
        let Some(h) = self.objects.get_mut(v) else {
            return false;
        };
        let stale = now.duration_since(h.used).unwrap_or_default() >= TOUCH_EVERY;
        if stale {
            h.used = now;
        }
        stale
    }

    /// Records what is now held of chunk `index` of `v` (after its bits changed).
    fn account(&mut self, v: VersionId, index: u64) {
        let held = self.objects.get(&v).map_or(0, |h| h.chunk_bytes(index));
        let old = if held > 0 {
            self.lru.put((v, index), held)
        } else {
            self.lru.pop(&(v, index))
        };
        self.bytes = self.bytes - old.unwrap_or(0) + held;
    }
}

/// What start-up found in the cache directory.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanReport {
    /// Object versions with at least one block held.
    pub objects: u64,
    /// Chunks with at least one block held.
    pub chunks: u64,
    pub bytes: u64,
    pub temp_removed: u64,
    /// Files under `objects/` that are not orcafs's (by name and place): they stay.
    pub foreign_files: u64,
    /// Object files that were unusable (bad map, missing partner, wrong size): removed.
    pub removed_broken: u64,
    /// Files and directories an earlier orcafs left readable by others, now private.
    pub made_private: u64,
}

/// An object handed out whole: the data file, open for reading, and a pin that keeps the
/// store from evicting or punching it until dropped.
pub struct Whole {
    pub file: File,
    pub pin: Pin,
}

/// Keeps an object version from being evicted while held.
pub struct Pin {
    pins: Arc<Mutex<HashMap<VersionId, usize>>>,
    v: VersionId,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pins.get_mut(&self.v) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.v);
            }
        }
    }
}

/// Objects up to this size are checked in full when first handed out whole after a restart;
/// bigger ones are checked in the background meanwhile, and served the ordinary way until then.
pub const VERIFY_INLINE: u64 = 1 << 30;
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
    let kind = layout::dir_kind(dir).map_err(io_err(dir))?;
    check_usable(dir, &kind)?;
    if kind != DirKind::Foreign {
        return Ok((dir.to_owned(), kind));
    }
    let sub = dir.join(layout::SUBDIR);
    let sub_kind = layout::dir_kind(&sub).map_err(io_err(&sub))?;
    if sub_kind == DirKind::Foreign {
        let why = format!(
            "it holds other files, and so does its {}/ subdirectory; point --cache-dir at an \
             empty directory or an orcafs cache",
            layout::SUBDIR
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
            return Err(refused(dir, layout::unknown_layout(line)));
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
/// earlier orcafs left it looser, with `objects/` and `tmp/` in it. Returns the cache's root.
pub fn prepare_root(dir: &Path) -> Result<PathBuf, DiskError> {
    let (root, kind) = choose_root(dir)?;
    if root != dir && dir.join("chunks").is_dir() {
        tracing::warn!(
            dir = %dir.display(),
            cache = %root.display(),
            "a chunks/ directory sits beside other files here: if an earlier orcafs wrote it, it is \
             no longer used (orcafs keeps to its own subdirectory); delete chunks/ and tmp/ to free the space"
        );
    }
    create_private_dir(&root).map_err(io_err(&root))?;
    make_private(&root, 0o700)?;
    if kind == DirKind::Legacy {
        // Layout 1 kept a file per chunk; this layout keeps a file per object. Its chunks are
        // discarded (they would cost a conversion as long as a refill from the shared store).
        let discarded = discard_layout_1(&root);
        // Written 0644 by the orcafs that made this cache.
        make_private(&layout::log_path(&root), 0o600)?;
        let dir = root.display();
        tracing::info!(%dir, discarded, "adopted the cache of an earlier orcafs (layout 1): discarded its chunk files, marked it, made it private");
        let _ = fs::remove_file(layout::marker_path(&root));
    }
    if kind != DirKind::Marked {
        write_marker(&root)?;
    }
    for p in [layout::objects_dir(&root), layout::tmp_dir(&root)] {
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
    let path = layout::marker_path(root);
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
    file.write_all(layout::marker_text().as_bytes())
        .map_err(io_err(&path))
}

/// Deletes layout 1's chunk files and their (then empty) directories; returns how many files.
fn discard_layout_1(root: &Path) -> u64 {
    let mut files = 0;
    for p in layout::layout_1_files(root) {
        if p.is_dir() {
            let _ = fs::remove_dir(&p);
        } else if fs::remove_file(&p).is_ok() {
            files += 1;
        }
    }
    files
}

impl DiskStore {
    /// Opens (creating) the cache for `--cache-dir dir` (see [`prepare_root`]: its root may be
    /// `dir/orcafs`), sweeps temp files, and indexes the objects.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<(DiskStore, ScanReport), DiskError> {
        let root = prepare_root(dir)?;
        let n = std::num::NonZeroUsize::new(OPEN_FILES).expect("non-zero");
        let store = DiskStore {
            root,
            max_bytes,
            index: Mutex::new(Index {
                lru: LruCache::unbounded(),
                bytes: 0,
                objects: HashMap::new(),
            }),
            open: Mutex::new(LruCache::new(n)),
            advised: Mutex::new(LruCache::new(n)),
            pins: Arc::default(),
            creating: Mutex::new(()),
            sealing: Mutex::new(Vec::new()),
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

    /// True when every block of the chunk is held.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.contains_range(key, 0, key.len())
    }

    /// True when the blocks under `[offset, offset+len)` of the chunk are held.
    pub fn contains_range(&self, key: &ChunkKey, offset: u64, len: u64) -> bool {
        let start = key.start() + offset;
        let end = (key.start() + offset.saturating_add(len).min(key.len())).max(start);
        if start == end {
            return self.lock().objects.contains_key(&key.version());
        }
        let idx = self.lock();
        idx.objects
            .get(&key.version())
            .is_some_and(|h| h.all(start / h.block, (end - 1) / h.block))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the index lock leaves plain data behind; keep going.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_objects(&self) -> MutexGuard<'_, LruCache<VersionId, Arc<Obj>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pinned(&self, v: &VersionId) -> bool {
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.contains_key(v)
    }

    /// Reads `len` bytes at `offset` inside the chunk; `Ok(None)` on a miss (absent, or found
    /// bad and dropped), counted.
    pub fn read(&self, key: &ChunkKey, offset: u64, len: u64) -> Result<Option<Bytes>, DiskError> {
        let found = self.read_held(key, offset, len)?;
        if found.is_none() {
            Metrics::inc(&self.metrics.disk_misses);
        }
        Ok(found)
    }

    /// [`Self::read`] without counting a miss: what the FUSE thread tries before the fetch path
    /// (which counts it).
    pub fn read_held(
        &self,
        key: &ChunkKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, DiskError> {
        let start = key.start() + offset.min(key.len());
        let end = key.start() + offset.saturating_add(len).min(key.len());
        if !self.contains_range(key, offset, len) {
            return Ok(None);
        }
        if start >= end {
            return Ok(Some(Bytes::new()));
        }
        let v = key.version();
        let Some(obj) = self.open_obj(&v, None)? else {
            return Ok(None);
        };
        // The path only for messages: a cached read is a pread and a CRC, not a hex encoding.
        let path = || layout::data_path(&self.root, &v);
        match obj.read(start, end).map_err(|e| io_err(&path())(e))? {
            Got::Bytes(bytes) => {
                if self.promote(key) {
                    // Best effort: a failed touch only makes the object look older after a restart.
                    let _ = obj.map.set_modified(SystemTime::now());
                }
                Metrics::inc(&self.metrics.disk_hits);
                Metrics::add(&self.metrics.disk_bytes_read, bytes.len() as u64);
                Ok(Some(bytes))
            }
            Got::Absent(blocks) => {
                // The index was ahead of the map: correct it, so the next fill stores them.
                let mut idx = self.lock();
                if let Some(h) = idx.objects.get_mut(&v) {
                    for b in blocks {
                        h.set(b, false);
                    }
                }
                idx.account(v, key.index);
                drop(idx);
                Ok(None)
            }
            Got::Bad(seen) => {
                tracing::warn!(?key, path = %path().display(), "cache blocks failing their CRC: dropping the chunk");
                Metrics::inc(&self.metrics.disk_corrupt);
                self.remove_chunk(&v, key.index, Some(seen));
                Ok(None)
            }
        }
    }

    /// The object's files, open and checked: from the open-object cache, else opened now (and,
    /// with `create`, created when absent). None when there is no usable pair of files (a
    /// missing one heals the index; a broken, truncated or foreign one is removed).
    fn open_obj(
        &self,
        v: &VersionId,
        create: Option<(&ObjectVersion, u64)>,
    ) -> Result<Option<Arc<Obj>>, DiskError> {
        let cached = self.open_objects().get(v).cloned();
        if let Some(obj) = cached {
            // Unlinked behind our back (`orcafs cache clear`, a removed map): let its space go,
            // and serve nothing a map no longer vouches for.
            if obj.linked() {
                return Ok(Some(obj));
            }
            self.open_objects().pop(v);
        }
        let map_path = layout::map_path(&self.root, v);
        // A writer creates its files where broken ones were: a second try.
        for _ in 0..2 {
            let broken = {
                // Creating, opening and removing an object's files are serialized, so a writer
                // never opens the files a remover is deleting, and two openers share one handle
                // (whose entries in memory are the ones writers update).
                let _files = self.files_lock();
                let cached = self.open_objects().get(v).cloned();
                if let Some(obj) = cached.filter(|o| o.linked()) {
                    return Ok(Some(obj));
                }
                match self.open_files_of(v, &map_path, create)? {
                    Opened::Obj(obj) => {
                        self.open_objects().put(*v, obj.clone());
                        return Ok(Some(obj));
                    }
                    Opened::Absent => false,
                    Opened::Broken => true,
                }
            };
            if !broken {
                // An index entry without its files (a put racing a removal) heals here.
                self.forget_object(v);
                return Ok(None);
            }
            tracing::warn!(path = %map_path.display(), "broken, truncated or foreign cache files: removing them");
            Metrics::inc(&self.metrics.disk_corrupt);
            self.remove_object(v);
            if create.is_none() {
                break;
            }
        }
        Ok(None)
    }

    fn files_lock(&self) -> MutexGuard<'_, ()> {
        self.creating.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens (with `create`, creating when absent) and checks an object's files. Called under
    /// [`Self::files_lock`].
    fn open_files_of(
        &self,
        v: &VersionId,
        map_path: &Path,
        create: Option<(&ObjectVersion, u64)>,
    ) -> Result<Opened, DiskError> {
        let map = match fs::OpenOptions::new().read(true).write(true).open(map_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match create {
                Some((object, chunk_size)) => self.create_files(v, object, chunk_size)?,
                None => return Ok(Opened::Absent),
            },
            Err(e) => return Err(io_err(map_path)(e)),
        };
        let data_path = layout::data_path(&self.root, v);
        let obj = (|| -> io::Result<Option<Obj>> {
            let Some(head) = layout::map_of(&map, v)? else {
                return Ok(None);
            };
            let data = match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&data_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let meta = data.metadata()?;
            if meta.len() != head.size {
                return Ok(None);
            }
            let crcs = layout::read_entries(&map, &head)?;
            // Checked by an earlier process, and unchanged since: no need to read it through.
            let stamp = layout::read_stamp(&map, &head)?;
            let stamped = stamp == Some(layout::Stamp::of(&meta));
            if stamp.is_some() && !stamped {
                tracing::debug!(?stamp, now = ?layout::Stamp::of(&meta), "stamp does not match the data file: checking it again");
            }
            Ok(Some(Obj {
                direct: open_direct(&data_path),
                data,
                map,
                head,
                written_here: AtomicBool::new(crcs.iter().all(Option::is_none)),
                crcs: Mutex::new(Entries::new(&crcs)),
                verified: AtomicBool::new(stamped),
                verifying: AtomicBool::new(false),
                writes: AtomicU64::new(0),
                writing: RwLock::new(()),
            }))
        })()
        .map_err(io_err(map_path))?;
        Ok(obj.map_or(Opened::Broken, |o| Opened::Obj(Arc::new(o))))
    }

    /// Creates an object's data file (sparse, its full size) and its map (all blocks absent),
    /// the map through `tmp/` so that it is never seen half written. Called under `creating`.
    fn create_files(
        &self,
        v: &VersionId,
        object: &ObjectVersion,
        chunk_size: u64,
    ) -> Result<File, DiskError> {
        let data_path = layout::data_path(&self.root, v);
        let map_path = layout::map_path(&self.root, v);
        let tmp = layout::temp_path(&self.root, v);
        let result = (|| -> io::Result<File> {
            if let Some(dir) = data_path.parent() {
                create_private_dir(dir)?;
            }
            // 0600 from the start, whatever the umask; a stale data file of a lost map is reused
            // only after being emptied.
            let data = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&data_path)?;
            data.set_len(object.size)?;
            let head = layout::encode_header(object, chunk_size);
            let blocks = object.size.div_ceil(layout::block_size_for(chunk_size));
            let mut f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&head)?;
            f.set_len(head.len() as u64 + layout::STAMP + layout::ENTRY * blocks)?;
            fs::rename(&tmp, &map_path)?;
            Ok(f)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&map_path)(e)
        })
    }

    /// Asks the kernel to read the chunk's bytes into the page cache in the background, so a
    /// sequential reader finds them there instead of waiting on the disk read by read.
    pub fn advise(&self, key: &ChunkKey) {
        if let Ok(Some(obj)) = self.open_obj(&key.version(), None) {
            let (at, len) = (key.start() as i64, key.len() as i64);
            // SAFETY: a plain advice call on an fd this store keeps open.
            unsafe {
                libc::posix_fadvise(obj.data.as_raw_fd(), at, len, libc::POSIX_FADV_WILLNEED);
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

    /// Marks a chunk used now; true when its object's map mtime should be refreshed.
    fn promote(&self, key: &ChunkKey) -> bool {
        let v = key.version();
        let mut idx = self.lock();
        idx.lru.promote(&(v, key.index));
        idx.touch(&v, SystemTime::now())
    }

    /// Evicts chunks of objects not used for `max_age` (least recently used first); returns
    /// how many chunks.
    pub fn evict_idle(&self, max_age: Duration) -> u64 {
        let Some(cutoff) = SystemTime::now().checked_sub(max_age) else {
            return 0;
        };
        let victims: Vec<(VersionId, u64)> = {
            let idx = self.lock();
            let idle = |v: &VersionId| idx.objects.get(v).is_some_and(|h| h.used < cutoff);
            idx.lru
                .iter()
                .rev()
                .filter(|((v, _), _)| idle(v))
                .map(|(k, _)| *k)
                .collect()
        };
        let mut n = 0;
        for (v, index) in &victims {
            if !self.pinned(v) {
                self.remove_chunk(v, *index, None);
                Metrics::inc(&self.metrics.disk_evictions);
                n += 1;
            }
        }
        n
    }

    /// Stores a complete chunk given as pieces, at its offsets in its object's file, then
    /// enters its blocks in the map.
    pub fn write(&self, key: &ChunkKey, pieces: &[Bytes]) -> Result<(), DiskError> {
        self.write_blocks(key, 0, pieces)
    }

    /// [`Self::write`] with the blocks' CRCs already computed; they are taken when they are of
    /// this chunk's blocks (its block size, its number of blocks), else computed here.
    pub fn write_summed(
        &self,
        key: &ChunkKey,
        pieces: &[Bytes],
        crcs: BlockCrcs,
    ) -> Result<(), DiskError> {
        let crcs = (crcs.block() == layout::block_size_for(key.chunk_size)).then(|| crcs.finish());
        self.write_blocks_with(key, 0, pieces, crcs.as_deref())
    }

    /// Stores bytes of a chunk starting at `offset` inside it, a block boundary; they must end
    /// at a block boundary or at the chunk's end. What a random read fetched is kept this way.
    pub fn write_blocks(
        &self,
        key: &ChunkKey,
        offset: u64,
        pieces: &[Bytes],
    ) -> Result<(), DiskError> {
        self.write_blocks_with(key, offset, pieces, None)
    }

    /// [`Self::write_blocks`], with the blocks' CRCs when they are known (else computed; also
    /// when there are not as many as the bytes have blocks).
    fn write_blocks_with(
        &self,
        key: &ChunkKey,
        offset: u64,
        pieces: &[Bytes],
        crcs: Option<&[u32]>,
    ) -> Result<(), DiskError> {
        // Files removed while this writer held them (a racing delete or eviction) lost what it
        // wrote: write again into new files, once.
        if !self.write_blocks_once(key, offset, pieces, crcs)? {
            self.forget_object(&key.version());
            self.write_blocks_once(key, offset, pieces, crcs)?;
        }
        Ok(())
    }

    /// [`Self::write_blocks_with`]; false when the files were unlinked meanwhile.
    fn write_blocks_once(
        &self,
        key: &ChunkKey,
        offset: u64,
        pieces: &[Bytes],
        crcs: Option<&[u32]>,
    ) -> Result<bool, DiskError> {
        let v = key.version();
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let block = layout::block_size_for(key.chunk_size);
        let end = offset + len;
        let aligned = offset % block == 0 && (end % block == 0 || end == key.len());
        let empty_object = key.object.size == 0;
        if !aligned || end > key.len() || (len == 0 && !empty_object) {
            let why = format!("blocks {offset}+{len} of a {}-byte chunk", key.len());
            return Err(io_err(&self.root)(io::Error::other(why)));
        }
        let Some(obj) = self.open_obj(&v, Some((&key.object, key.chunk_size)))? else {
            let why = "its files could not be created";
            return Err(io_err(&layout::map_path(&self.root, &v))(io::Error::other(
                why,
            )));
        };
        let data_path = layout::data_path(&self.root, &v);
        let sharing = obj.writing.read().unwrap_or_else(|p| p.into_inner());
        write_data(&obj, pieces, key.start() + offset).map_err(io_err(&data_path))?;
        let summed;
        let crcs = match crcs {
            Some(known) if known.len() as u64 == len.div_ceil(block) => known,
            _ => {
                summed = layout::block_crcs(pieces, block);
                &summed
            }
        };
        let crcs: Vec<Option<u32>> = crcs.iter().copied().map(Some).collect();
        let first = (key.start() + offset) / block;
        obj.set_entries(first, &crcs)
            .map_err(io_err(&layout::map_path(&self.root, &v)))?;
        {
            let mut idx = self.lock();
            let now = SystemTime::now();
            let h = idx
                .objects
                .entry(v)
                .or_insert_with(|| Held::new(&obj.head, now));
            h.used = now;
            for i in first..first + crcs.len() as u64 {
                h.set(i, true);
            }
            idx.account(v, key.index);
        }
        // Eviction below may remove a chunk of this object: it waits for writers.
        drop(sharing);
        if obj.map.metadata().is_ok_and(|m| m.nlink() == 0) {
            self.open_objects().pop(&v);
            return Ok(false);
        }
        Metrics::inc(&self.metrics.disk_commits);
        Metrics::add(&self.metrics.disk_bytes_written, len);
        self.evict_to_fit(0);
        Ok(true)
    }

    /// Drops an object from the index only (its files are already gone).
    fn forget_object(&self, v: &VersionId) {
        let mut idx = self.lock();
        if let Some(h) = idx.objects.remove(v) {
            for index in 0..h.size.div_ceil(h.chunk_size) {
                if let Some(b) = idx.lru.pop(&(*v, index)) {
                    idx.bytes -= b;
                }
            }
        }
    }

    /// Removes an object's files and its index entries.
    fn remove_object(&self, v: &VersionId) {
        self.open_objects().pop(v);
        self.forget_object(v);
        self.unlink(v);
    }

    fn unlink(&self, v: &VersionId) {
        let _files = self.files_lock();
        let _ = fs::remove_file(layout::map_path(&self.root, v));
        let _ = fs::remove_file(layout::data_path(&self.root, v));
    }

    /// Drops chunk `index` of `v`: its map entries cleared first, then its bytes punched out
    /// (not while the object is pinned: a passthrough reader may be reading them); the object's
    /// files go when nothing is left. With `seen` (a bad block's finder's write count), nothing
    /// is dropped if a write came since: the finder may have read a writer's new bytes.
    pub(super) fn remove_chunk(&self, v: &VersionId, index: u64, seen: Option<u64>) {
        // Nothing held: no files to open.
        if !self.lock().objects.contains_key(v) {
            return;
        }
        let obj = self.open_obj(v, None).ok().flatten();
        let _alone = obj
            .as_ref()
            .map(|o| o.writing.write().unwrap_or_else(|p| p.into_inner()));
        if let (Some(seen), Some(o)) = (seen, &obj) {
            if o.writes.load(Ordering::SeqCst) != seen {
                tracing::debug!(?v, index, "rewritten since found bad: kept");
                return;
            }
        }
        let (range, empty) = {
            let mut idx = self.lock();
            let Some(h) = idx.objects.get_mut(v) else {
                return;
            };
            let Some((first, last)) = h.chunk_blocks(index) else {
                // An empty object's one (empty) chunk: the object is all there is to drop.
                if h.size == 0 {
                    drop(idx);
                    self.remove_object(v);
                }
                return;
            };
            for i in first..=last {
                h.set(i, false);
            }
            let range = (first, last, h.block, h.size);
            let empty = h.count == 0;
            if empty {
                idx.objects.remove(v);
            }
            if let Some(b) = idx.lru.pop(&(*v, index)) {
                idx.bytes -= b;
            }
            (range, empty)
        };
        let pinned = self.pinned(v);
        if empty && !pinned {
            self.open_objects().pop(v);
            self.unlink(v);
            return;
        }
        let (first, last, block, size) = range;
        if let Some(obj) = &obj {
            let _ = obj.set_entries(first, &vec![None; (last - first + 1) as usize]);
            obj.verified.store(false, Ordering::Relaxed);
            if !pinned {
                let at = first * block;
                let _ = punch(&obj.data, at, ((last + 1) * block).min(size) - at);
            }
        }
    }

    /// Evicts least recently used chunks until `extra` more bytes fit under the bound; chunks
    /// of pinned objects are passed over.
    pub(super) fn evict_to_fit(&self, extra: u64) {
        loop {
            let victim = {
                let idx = self.lock();
                if idx.bytes + extra <= self.max_bytes {
                    return;
                }
                let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
                let v = idx
                    .lru
                    .iter()
                    .rev()
                    .find(|((v, _), _)| !pins.contains_key(v));
                match v {
                    Some((k, _)) => *k,
                    None => return,
                }
            };
            self.remove_chunk(&victim.0, victim.1, None);
            Metrics::inc(&self.metrics.disk_evictions);
        }
    }

    /// The whole object, when every block of it is held and checks out: its data file open for
    /// reading and pinned. Blocks found bad are dropped (and None returned). An object bigger
    /// than [`VERIFY_INLINE`] not yet checked by this process is checked in the background and
    /// None returned meanwhile.
    pub fn whole_object(
        self: &Arc<Self>,
        object: &ObjectVersion,
        chunk_size: u64,
    ) -> Result<Option<Whole>, DiskError> {
        let v = VersionId::of(object, chunk_size);
        let whole = self.lock().objects.get(&v).is_some_and(Held::whole);
        if !whole {
            return Ok(None);
        }
        let pin = self.pin(v);
        let Some(obj) = self.open_obj(&v, None)? else {
            return Ok(None);
        };
        if !obj.verified.load(Ordering::Relaxed) {
            if object.size > VERIFY_INLINE {
                self.seal_in_background(v, obj);
                return Ok(None);
            }
            if !self.seal(&v, &obj) {
                return Ok(None);
            }
        }
        let path = layout::data_path(&self.root, &v);
        // A descriptor of its own: the kernel keeps it for the open file's life.
        let file = File::open(&path).map_err(io_err(&path))?;
        self.used_whole(&v, &obj);
        Ok(Some(Whole { file, pin }))
    }

    /// Marks every chunk of an object handed out whole as used now: the kernel's reads of it
    /// never pass through [`Self::read`].
    fn used_whole(&self, v: &VersionId, obj: &Obj) {
        let now = SystemTime::now();
        let stale = {
            let mut idx = self.lock();
            let chunks = obj.head.size.div_ceil(obj.head.chunk_size);
            for index in 0..chunks {
                idx.lru.promote(&(*v, index));
            }
            idx.touch(v, now)
        };
        if stale {
            let _ = obj.map.set_modified(now);
        }
    }

    /// Checks a whole object in a thread of its own (one at a time per object), unless done.
    fn seal_in_background(self: &Arc<Self>, v: VersionId, obj: Arc<Obj>) {
        if obj.verified.load(Ordering::Relaxed) || obj.verifying.swap(true, Ordering::Relaxed) {
            return;
        }
        let store = self.clone();
        let handle = std::thread::spawn(move || {
            store.seal(&v, &obj);
            obj.verifying.store(false, Ordering::Relaxed);
        });
        let mut sealing = self.sealing.lock().unwrap_or_else(|p| p.into_inner());
        sealing.retain(|h| !h.is_finished());
        sealing.push(handle);
    }

    /// Once an object is whole, checks and stamps it in the background, so that the next
    /// process hands it to the kernel without reading it through first.
    pub fn seal_if_whole(self: &Arc<Self>, key: &ChunkKey) {
        let v = key.version();
        // A self-test probe is deleted at once: nothing to check.
        if &*key.object.origin_id == super::PROBE_ORIGIN {
            return;
        }
        if !self.lock().objects.get(&v).is_some_and(Held::whole) {
            return;
        }
        if let Ok(Some(obj)) = self.open_obj(&v, None) {
            self.seal_in_background(v, obj);
        }
    }

    /// Waits (up to `limit`) for background checks to finish, so their stamps are written
    /// before the process exits.
    pub fn finish_sealing(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let handles = std::mem::take(&mut *self.sealing.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// Checks every block of a whole object against its entry; when all are good, flushes the
    /// data file and stamps the map (see [`layout::Stamp`]) if the file did not change
    /// meanwhile. Drops the chunk of a bad block. True when all are good.
    fn seal(&self, v: &VersionId, obj: &Obj) -> bool {
        let before = obj.data.metadata().map(|m| layout::Stamp::of(&m));
        if !self.verify(v, obj) {
            return false;
        }
        let stamped = obj.data.sync_data().and_then(|()| {
            let after = layout::Stamp::of(&obj.data.metadata()?);
            match before {
                Ok(b) if b == after => obj.map.write_all_at(&after.encode(), obj.head.stamp_at()),
                _ => {
                    tracing::debug!(
                        ?before,
                        ?after,
                        "the file changed while it was checked: not stamped"
                    );
                    Ok(())
                }
            }
        });
        match stamped {
            Ok(()) => tracing::debug!(?v, "checked a whole object"),
            Err(e) => tracing::debug!(?v, error = %e, "checked a whole object; could not stamp it"),
        }
        true
    }

    /// Checks every block of an object; drops the chunk of a bad one. True when all are good.
    /// An object this handle wrote all of is taken as checked: its CRCs were computed from the
    /// very bytes written.
    fn verify(&self, v: &VersionId, obj: &Obj) -> bool {
        if obj.written_here.load(Ordering::Relaxed) {
            obj.verified.store(true, Ordering::Relaxed);
            return true;
        }
        Metrics::inc(&self.metrics.cache_checks);
        match obj.verify_all() {
            Ok(None) => {
                obj.verified.store(true, Ordering::Relaxed);
                true
            }
            Ok(Some((bad, seen))) => {
                let path = layout::data_path(&self.root, v);
                tracing::warn!(path = %path.display(), block = bad, "cache block failing its CRC: dropping its chunk");
                Metrics::inc(&self.metrics.disk_corrupt);
                let index = bad * obj.head.block / obj.head.chunk_size;
                self.remove_chunk(v, index, Some(seen));
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a cached object");
                false
            }
        }
    }

    fn pin(&self, v: VersionId) -> Pin {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        *pins.entry(v).or_default() += 1;
        Pin {
            pins: self.pins.clone(),
            v,
        }
    }

    /// Removes temp files (a crashed or interrupted writer's), makes private what an earlier
    /// orcafs left readable, counts files that are not orcafs's (and leaves them), removes
    /// object files that cannot be used, then indexes the maps' blocks oldest first.
    fn scan(&self) -> Result<ScanReport, DiskError> {
        let mut report = ScanReport {
            temp_removed: self.sweep_temp(),
            ..Default::default()
        };
        // Best effort: `objects/` itself is already 0700, so a miss here exposes nothing.
        let mut private = |p: &Path, m: &fs::Metadata, mode| {
            report.made_private += u64::from(tighten(p, m, mode).unwrap_or(false));
        };
        let walk = layout::walk_objects(&self.root);
        let mut found: Vec<(SystemTime, VersionId, Held)> = Vec::new();
        let mut foreign = walk.strays;
        let mut broken = Vec::new();
        for file in &walk.files {
            let meta = fs::symlink_metadata(file);
            let (v, m) = match (layout::file_at(&self.root, file), meta) {
                (Some((v, role)), Ok(m)) if m.is_file() => {
                    private(file, &m, 0o600);
                    if role == Role::Data {
                        if !layout::map_path(&self.root, &v).exists() {
                            broken.push(v);
                        }
                        continue;
                    }
                    (v, m)
                }
                _ => {
                    foreign += 1;
                    continue;
                }
            };
            match index_map(
                &self.root,
                &v,
                m.modified().unwrap_or(std::time::UNIX_EPOCH),
            ) {
                // An object whose every block was evicted before a crash: nothing to keep.
                Some(held) if held.count == 0 && held.blocks > 0 => {
                    let _ = fs::remove_file(layout::map_path(&self.root, &v));
                    let _ = fs::remove_file(layout::data_path(&self.root, &v));
                }
                Some(held) => found.push((held.used, v, held)),
                None => broken.push(v),
            }
        }
        for d in &walk.fan_out_dirs {
            if let Some(m) = fs::symlink_metadata(d).ok().filter(|m| m.is_dir()) {
                private(d, &m, 0o700);
            }
        }
        report.foreign_files = foreign;
        for v in &broken {
            let _ = fs::remove_file(layout::map_path(&self.root, v));
            let _ = fs::remove_file(layout::data_path(&self.root, v));
        }
        report.removed_broken = broken.len() as u64;
        found.sort_by_key(|(t, v, _)| (*t, *v));
        let mut idx = self.lock();
        for (_, v, held) in found {
            let chunks = held.size.div_ceil(held.chunk_size);
            idx.objects.insert(v, held);
            report.objects += 1;
            for index in 0..chunks {
                idx.account(v, index);
                if idx.lru.contains(&(v, index)) {
                    report.chunks += 1;
                }
            }
        }
        report.bytes = idx.bytes;
        Ok(report)
    }

    /// Deletes orcafs's temp files in `tmp/` (named as [`layout::temp_path`] names them, and
    /// nothing else there); returns how many.
    pub fn sweep_temp(&self) -> u64 {
        let temp = layout::temp_files(&self.root);
        temp.iter().filter(|p| fs::remove_file(p).is_ok()).count() as u64
    }

    /// Size and commit time of a stored chunk, when all of it is held.
    pub fn stat(&self, key: &ChunkKey) -> Result<Option<Info>, DiskError> {
        if !self.contains(key) {
            return Ok(None);
        }
        let used = self.lock().objects.get(&key.version()).map(|h| h.used);
        let present = self.open_obj(&key.version(), None)?.is_some();
        Ok(used.filter(|_| present).map(|committed| Info {
            size: key.len(),
            committed,
        }))
    }

    /// Removes a chunk if present.
    pub fn delete(&self, key: &ChunkKey) {
        self.remove_chunk(&key.version(), key.index, None);
    }
}

/// The blocks a map file says are held, when the map and its data file are intact and
/// belong together; None for a file to remove.
fn index_map(root: &Path, v: &VersionId, mtime: SystemTime) -> Option<Held> {
    let map = File::open(layout::map_path(root, v)).ok()?;
    let head = layout::map_of(&map, v).ok()??;
    let data = fs::metadata(layout::data_path(root, v)).ok()?;
    if !data.is_file() || data.len() != head.size {
        return None;
    }
    let mut held = Held::new(&head, mtime);
    for (i, c) in layout::read_entries(&map, &head).ok()?.iter().enumerate() {
        held.set(i as u64, c.is_some());
    }
    Some(held)
}

/// The disk store behind the [`CacheStore`] trait; file I/O runs on the blocking pool.
#[derive(Clone)]
pub struct DiskDriver(pub Arc<DiskStore>);

fn store_err(e: DiskError) -> StoreError {
    StoreError::Transient(e.to_string())
}

impl DiskDriver {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Arc<DiskStore>) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Other(format!("disk task failed: {e}")))
    }
}

impl DiskDriver {
    async fn put(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
        crcs: Option<BlockCrcs>,
    ) -> Result<Committed, StoreError> {
        check_put(key, size, &data)?;
        if self.0.contains(key) {
            return Ok(Committed::AlreadyThere);
        }
        let k = key.clone();
        self.blocking(move |d| {
            match crcs {
                Some(crcs) => d.write_summed(&k, &data, crcs)?,
                None => d.write(&k, &data)?,
            }
            d.seal_if_whole(&k);
            Ok(())
        })
        .await?
        .map_err(store_err)?;
        Ok(Committed::Stored)
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
        // The index is complete (built from the maps at open, kept by this process alone), so
        // a miss needs no trip to a blocking thread: cold reads start their fill at once.
        if !self.0.contains_range(key, offset, len) {
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
        self.put(key, size, data, None).await
    }

    async fn put_chunk_summed(
        &self,
        key: &ChunkKey,
        size: u64,
        data: Vec<Bytes>,
        crcs: BlockCrcs,
    ) -> Result<Committed, StoreError> {
        self.put(key, size, data, Some(crcs)).await
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
        Some(self.0.contains(key))
    }

    fn will_read(&self, key: &ChunkKey) {
        if !self.0.contains(key) || !self.0.first_advice(&key.id()) {
            return;
        }
        let (store, key) = (self.0.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.advise(&key));
    }

    fn contains_range_hint(&self, key: &ChunkKey, offset: u64, len: u64) -> Option<bool> {
        Some(self.0.contains_range(key, offset, len))
    }

    fn read_now(&self, key: &ChunkKey, offset: u64, len: u64) -> Option<Bytes> {
        match self.0.read_held(key, offset, len) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(?key, error = %e, "cache read failed");
                None
            }
        }
    }

    async fn put_blocks(
        &self,
        key: &ChunkKey,
        offset: u64,
        data: Vec<Bytes>,
    ) -> Result<(), StoreError> {
        let k = key.clone();
        self.blocking(move |d| {
            d.write_blocks(&k, offset, &data)?;
            d.seal_if_whole(&k);
            Ok(())
        })
        .await?
        .map_err(store_err)
    }

    async fn whole_object(
        &self,
        object: &ObjectVersion,
        chunk_size: u64,
    ) -> Result<Option<LocalFile>, StoreError> {
        let o = object.clone();
        let whole = self
            .blocking(move |d| d.whole_object(&o, chunk_size))
            .await?
            .map_err(store_err)?;
        Ok(whole.map(|w| LocalFile {
            file: w.file,
            pin: Box::new(w.pin),
        }))
    }
}
/// The data file for writing with O_DIRECT; None where its file system refuses it (tmpfs).
fn open_direct(path: &Path) -> Option<File> {
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Writes `parts` one after another from `at`, through the page cache.
fn write_buffered<'a>(
    data: &File,
    parts: impl IntoIterator<Item = &'a [u8]>,
    at: u64,
) -> io::Result<()> {
    let mut pos = at;
    for p in parts {
        data.write_all_at(p, pos)?;
        pos += p.len() as u64;
    }
    Ok(())
}

/// How much of a fill goes to the disk per O_DIRECT write through the staging buffer.
const DIRECT_STAGE: usize = 1 << 20;

/// Writes `pieces` at `at` in the data file. A cold read writes every byte it fetches; written
/// through the page cache, each written page is a page the kernel must first find (on a busy
/// host, by reclaiming another) and later write back, and readers are served from the fill in
/// memory, not from these pages. So whole 4 KiB blocks go with O_DIRECT; a short last block of
/// the object, or a file system without O_DIRECT, goes through the page cache. A fill hands over
/// page-aligned segments of whole blocks, which go as they are; other pieces go through a
/// page-aligned staging buffer, as O_DIRECT needs.
fn write_data(obj: &Obj, pieces: &[Bytes], at: u64) -> io::Result<()> {
    let direct = match &obj.direct {
        Some(f) if at % layout::BLOCK == 0 => f,
        _ => return write_buffered(&obj.data, pieces.iter().map(|p| &p[..]), at),
    };
    let block = layout::BLOCK as usize;
    let mut pos = at;
    for (i, p) in pieces.iter().enumerate() {
        let whole = p.len() / block * block;
        let last = i + 1 == pieces.len();
        if p.as_ptr() as usize % block != 0 || (whole < p.len() && !last) {
            return write_staged(obj, direct, &pieces[i..], pos);
        }
        if let Err(e) = direct.write_all_at(&p[..whole], pos) {
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            // A file system that took the flag but not these writes: the page cache it is.
            return write_buffered(&obj.data, pieces[i..].iter().map(|p| &p[..]), pos);
        }
        write_buffered(&obj.data, [&p[whole..]], pos + whole as u64)?;
        pos += p.len() as u64;
    }
    Ok(())
}

/// [`write_data`] for pieces of any size and alignment, from a block boundary `at`: whole
/// blocks through a page-aligned staging buffer with O_DIRECT, the short tail buffered.
fn write_staged(obj: &Obj, direct: &File, pieces: &[Bytes], at: u64) -> io::Result<()> {
    let total: u64 = pieces.iter().map(|p| p.len() as u64).sum();
    let direct_len = total / layout::BLOCK * layout::BLOCK;
    let mut stage = pagebuf::with_capacity(DIRECT_STAGE.min(direct_len as usize));
    // The next byte to write is pieces[i][off].
    let (mut i, mut off, mut done) = (0usize, 0usize, 0u64);
    while done < direct_len {
        let want = (direct_len - done).min(DIRECT_STAGE as u64) as usize;
        stage.clear();
        while stage.len() < want {
            let p = &pieces[i][off..];
            let n = p.len().min(want - stage.len());
            stage.extend_from_slice(&p[..n]);
            off += n;
            if off == pieces[i].len() {
                (i, off) = (i + 1, 0);
            }
        }
        if let Err(e) = direct.write_all_at(&stage, at + done) {
            pagebuf::recycle(stage);
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            return write_buffered(&obj.data, pieces.iter().map(|p| &p[..]), at);
        }
        done += want as u64;
    }
    pagebuf::recycle(stage);
    // The short last block, if any.
    let tail = pieces.iter().enumerate().skip(i);
    let tail = tail.map(|(j, p)| if j == i { &p[off..] } else { &p[..] });
    write_buffered(&obj.data, tail, at + done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cachestore::layout::{self, read_dir_paths, test_key as key, BLOCK};

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn store(dir: &Path, max: u64) -> DiskStore {
        DiskStore::open(dir, max, Arc::default()).unwrap().0
    }

    #[test]
    fn held_ranges_are_checked_word_by_word_as_block_by_block() {
        let blocks = 300;
        let mut h = Held {
            bits: vec![0; 5],
            count: 0,
            blocks,
            block: BLOCK,
            size: blocks * BLOCK,
            chunk_size: 64 * BLOCK,
            used: SystemTime::UNIX_EPOCH,
        };
        for i in (0..blocks).filter(|i| !matches!(i, 63 | 64 | 130 | 191..=193 | 299)) {
            h.set(i, true);
        }
        for first in 0..blocks {
            for last in first..blocks + 70 {
                let one_by_one = (first..=last).all(|i| h.has(i));
                assert_eq!(h.all(first, last), one_by_one, "blocks {first}..={last}");
            }
        }
        assert!(h.all(5, 4), "an empty range is held");
    }

    #[test]
    fn crcs_summed_by_the_fill_are_the_ones_kept_when_they_fit_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let size = 3 * BLOCK as usize + 100;
        let d = data(size);
        let pieces = vec![Bytes::from(d.clone())];
        let summed = |block| {
            let mut c = BlockCrcs::new(block);
            c.add(&d);
            c
        };
        // Right ones: stored, and the data reads back checked against them.
        let k = key("e", size as u64, 4 << 20, 0);
        s.write_summed(&k, &pieces, summed(BLOCK)).unwrap();
        assert_eq!(s.read(&k, 0, size as u64).unwrap().unwrap(), d);
        // Of another block size: not taken, the store sums its own.
        let k = key("f", size as u64, 4 << 20, 0);
        s.write_summed(&k, &pieces, summed(2 * BLOCK)).unwrap();
        assert_eq!(s.read(&k, 0, size as u64).unwrap().unwrap(), d);
        // Of this block size but other bytes: taken as given, so the block they do not match
        // is never served (these are the CRCs the cache checks reads against).
        let k = key("g", size as u64, 4 << 20, 0);
        let mut other = d.clone();
        other[BLOCK as usize + 1] ^= 1;
        let mut wrong = BlockCrcs::new(BLOCK);
        wrong.add(&other);
        s.write_summed(&k, &pieces, wrong).unwrap();
        assert!(s.read(&k, 0, BLOCK).unwrap().is_some(), "block 0 matches");
        assert!(
            s.read(&k, BLOCK, BLOCK).unwrap().is_none(),
            "block 1 does not"
        );
        assert!(s.metrics.disk_corrupt.get() >= 1);
    }

    #[test]
    fn writes_across_staging_buffers_and_a_short_tail_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let size = 2 * DIRECT_STAGE + DIRECT_STAGE / 2 + 5;
        let d = data(size);
        let k = key("e", size as u64, 4 << 20, 0);
        let pieces: Vec<Bytes> = d.chunks(7777).map(Bytes::copy_from_slice).collect();
        s.write(&k, &pieces).unwrap();
        let direct = s
            .open_obj(&k.version(), None)
            .unwrap()
            .unwrap()
            .direct
            .is_some();
        eprintln!("O_DIRECT writes here: {direct}");
        let got = s.read(&k, 0, size as u64).unwrap().unwrap();
        assert!(got[..] == d[..], "every byte back, in place");

        // As a fill hands them over: page-aligned whole-block segments, then (here) pieces of
        // any size after them, and a short tail.
        let k = key("f", size as u64, 4 << 20, 0);
        let aligned = |b: &[u8]| {
            let mut v = pagebuf::with_capacity(b.len());
            v.extend_from_slice(b);
            pagebuf::freeze(v)
        };
        let mut pieces = vec![
            aligned(&d[..DIRECT_STAGE]),
            aligned(&d[DIRECT_STAGE..2 * DIRECT_STAGE]),
        ];
        pieces.extend(
            d[2 * DIRECT_STAGE..]
                .chunks(7777)
                .map(Bytes::copy_from_slice),
        );
        s.write(&k, &pieces).unwrap();
        let got = s.read(&k, 0, size as u64).unwrap().unwrap();
        assert!(
            got[..] == d[..],
            "every byte back from aligned segments and pieces"
        );
        let k = key("g", size as u64, 4 << 20, 0);
        let pieces = vec![
            aligned(&d[..2 * DIRECT_STAGE]),
            aligned(&d[2 * DIRECT_STAGE..]),
        ];
        s.write(&k, &pieces).unwrap();
        let got = s.read(&k, 0, size as u64).unwrap().unwrap();
        assert!(
            got[..] == d[..],
            "every byte back from aligned segments with a short tail"
        );
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

    fn data_of(s: &DiskStore, k: &ChunkKey) -> PathBuf {
        layout::data_path(s.root(), &k.version())
    }

    fn map_of(s: &DiskStore, k: &ChunkKey) -> PathBuf {
        layout::map_path(s.root(), &k.version())
    }

    #[test]
    fn corrupt_truncated_or_foreign_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * BLOCK as usize;
        let k = key("e", size as u64, 1 << 20, 0);
        let data_path = layout::data_path(dir.path(), &k.version());
        let map_path = layout::map_path(dir.path(), &k.version());
        let fresh = || {
            let _ = fs::remove_dir_all(dir.path().join("objects"));
            let s = store(dir.path(), 1 << 30);
            s.write(&k, &[Bytes::from(data(size))]).unwrap();
            s
        };

        let s = fresh();
        let f = fs::OpenOptions::new().write(true).open(&data_path).unwrap();
        f.write_all_at(b"X", BLOCK + 5).unwrap();
        assert!(
            s.read(&k, 0, 10).unwrap().is_some(),
            "untouched block still verifies"
        );
        assert!(
            s.read(&k, BLOCK, 10).unwrap().is_none(),
            "flipped byte detected"
        );
        assert!(!s.contains(&k), "bad chunk dropped");
        assert!(!data_path.exists(), "and its object's files with it");

        // Damage done while no mount runs is found when the files are opened.
        drop(fresh());
        let f = fs::OpenOptions::new().write(true).open(&data_path).unwrap();
        f.set_len(size as u64 - 1).unwrap();
        let s = store(dir.path(), 1 << 30);
        assert!(s.read(&k, 0, 10).unwrap().is_none(), "truncation detected");

        // Another version's map copied over this version's.
        let s = fresh();
        let other = key("other-etag", size as u64, 1 << 20, 0);
        s.write(&other, &[Bytes::from(data(size))]).unwrap();
        drop(s);
        fs::copy(layout::map_path(dir.path(), &other.version()), &map_path).unwrap();
        let s = store(dir.path(), 1 << 30);
        assert!(s.read(&k, 0, 10).unwrap().is_none(), "foreign map detected");
        assert!(s.read(&other, 0, 10).unwrap().is_some());

        drop(fresh());
        fs::write(&map_path, b"garbage").unwrap();
        let (s, report) = DiskStore::open(dir.path(), 1 << 30, Arc::default()).unwrap();
        assert_eq!(report.removed_broken, 1);
        assert!(s.read(&k, 0, 10).unwrap().is_none());
        assert!(!data_path.exists(), "its data file went with it");
    }

    #[test]
    fn a_bad_block_found_before_a_rewrite_does_not_drop_the_rewrite() {
        // The background check of a whole object reads a block while it is damaged; before it
        // drops the chunk, a reader has dropped it already and a fill has stored it again.
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let size = 2 * BLOCK as usize;
        let k = key("e", size as u64, 1 << 20, 0);
        let d = Bytes::from(data(size));
        s.write(&k, std::slice::from_ref(&d)).unwrap();
        // Damages the first block behind the store's back; what a whole-object check finds.
        let damage_and_check = || {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(data_of(&s, &k))
                .unwrap();
            f.write_all_at(b"X", 5).unwrap();
            let obj = s.open_obj(&k.version(), None).unwrap().unwrap();
            obj.verify_all().unwrap().expect("damage found")
        };
        let (bad, seen) = damage_and_check();
        assert_eq!(bad, 0);
        assert!(s.read(&k, 0, 10).unwrap().is_none(), "the reader drops it");
        s.write(&k, std::slice::from_ref(&d)).unwrap();
        s.remove_chunk(&k.version(), 0, Some(seen));
        let got = s.read(&k, 0, size as u64).unwrap();
        assert!(got.as_ref() == Some(&d), "kept");
        // With no write since, the finding stands (the files are new: the reader dropped the old).
        let (_, seen) = damage_and_check();
        s.remove_chunk(&k.version(), 0, Some(seen));
        assert!(!s.contains(&k), "dropped");
    }

    #[test]
    fn a_write_replaces_broken_files_in_its_way() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let k = key("e", BLOCK, 1 << 20, 0);
        let map = map_of(&s, &k);
        fs::create_dir_all(map.parent().unwrap()).unwrap();
        fs::write(&map, b"not a map").unwrap();
        let d = Bytes::from(data(BLOCK as usize));
        s.write(&k, std::slice::from_ref(&d)).unwrap();
        let got = s.read(&k, 0, BLOCK).unwrap();
        assert!(got.as_ref() == Some(&d));
    }

    #[test]
    fn idle_chunks_age_out_and_use_survives_restart_via_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let old = key("e", 2 * BLOCK, BLOCK, 0);
        let fresh = key("f", 2 * BLOCK, BLOCK, 1);
        s.write(&old, &[Bytes::from(data(BLOCK as usize))]).unwrap();
        s.write(&fresh, &[Bytes::from(data(BLOCK as usize))])
            .unwrap();
        // Pretend `old` was last used two hours ago, as a restart would read from its mtime.
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(map_of(&s, &old))
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

        fs::write(layout::temp_path(dir.path(), &keys[1].version()), b"half").unwrap();
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
            layout::temp_path(root, &k.version()),
            layout::temp_path(root, &key("f", 9, BLOCK, 0).version()),
        ];
        for p in &own {
            fs::write(p, b"half").unwrap();
        }
        // What a user (or a program sharing the directory) put there: never orcafs's to delete.
        let hex = k.version().to_hex();
        let lookalike = format!("{}.{}", hex.to_uppercase(), "0123456789abcdef");
        let foreign = [
            root.join("tmp/foreign"),
            root.join("tmp").join(lookalike),
            root.join("tmp").join(format!("{hex}.xyz")),
            root.join("notes.txt"),
            root.join("objects/stray"),
            layout::data_path(root, &k.version()).with_extension("bak"),
        ];
        for p in &foreign {
            fs::write(p, b"mine").unwrap();
        }
        let (s, report) = DiskStore::open(root, 1 << 30, Arc::default()).unwrap();
        assert_eq!((report.temp_removed, report.chunks), (2, 1));
        assert_eq!(
            report.foreign_files, 2,
            "the stray and the .bak beside an object file"
        );
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
            dirs >= 4 && files == 3,
            "{dirs} dirs, {files} files (the object's data and map, and the marker)"
        );
    }

    #[test]
    fn a_directory_holding_other_files_gets_an_orcafs_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious"), b"p").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let s = store(dir.path(), 1 << 30);
        let sub = dir.path().join(layout::SUBDIR);
        assert_eq!(s.root(), sub);
        assert!(layout::marker_path(&sub).is_file());
        assert!(!layout::marker_path(dir.path()).exists());
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
        assert_eq!(layout::find_root(dir.path()).unwrap(), Some(sub.clone()));
        assert_eq!(fs::read(dir.path().join("precious")).unwrap(), b"p");
        // An empty directory, or one that is already orcafs's, is used as is.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(store(empty.path(), 1 << 30).root(), empty.path());
        fs::write(empty.path().join("later"), b"x").unwrap();
        assert_eq!(store(empty.path(), 1 << 30).root(), empty.path(), "marked");
    }

    /// Layout 1's chunk file `chunks/<xx>/<yy>/<hex>`, as an earlier orcafs wrote it.
    fn layout_1_chunk(root: &Path, seed: u8) -> PathBuf {
        let hex = hex::encode([seed; 32]);
        let dir = root.join("chunks").join(&hex[0..2]).join(&hex[2..4]);
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(&hex);
        fs::write(&p, b"ORCACHK1...").unwrap();
        p
    }

    #[test]
    fn a_cache_of_layout_1_is_adopted_emptied_of_its_chunks_and_made_private() {
        for marked in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            // As an earlier orcafs left it: readable by all, a log beside, maybe no marker.
            let chunks = [layout_1_chunk(root, 0xab), layout_1_chunk(root, 0x12)];
            fs::create_dir(root.join("tmp")).unwrap();
            fs::write(layout::log_path(root), b"log").unwrap();
            if marked {
                fs::write(layout::marker_path(root), "orcafs-cache 1\n").unwrap();
            }
            for p in tree(root).into_iter().chain([root.to_owned()]) {
                let m = if p.is_dir() { 0o755 } else { 0o644 };
                fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
            }
            assert_eq!(layout::dir_kind(root).unwrap(), DirKind::Legacy);
            assert_eq!(layout::find_root(root).unwrap(), Some(root.to_owned()));
            // Not orcafs's: stays.
            fs::write(root.join("chunks/keep.txt"), b"mine").unwrap();

            let (s, report) = DiskStore::open(root, 1 << 30, Arc::default()).unwrap();
            assert_eq!(s.root(), root, "kept in place, not moved");
            assert_eq!(report.objects, 0);
            assert!(
                chunks.iter().all(|p| !p.exists()),
                "layout 1's chunks discarded"
            );
            assert_eq!(fs::read(root.join("chunks/keep.txt")).unwrap(), b"mine");
            assert_eq!(layout::dir_kind(root).unwrap(), DirKind::Marked);
            assert_eq!(fs::read(layout::log_path(root)).unwrap(), b"log");
            assert_eq!(mode(&layout::log_path(root)), 0o600);
            assert_eq!(mode(root), 0o700);
            let k = key("e", 10, BLOCK, 0);
            s.write(&k, &[Bytes::from_static(b"0123456789")]).unwrap();
            assert!(s.read(&k, 0, 10).unwrap().is_some());
        }
    }

    #[test]
    fn blocks_of_a_chunk_are_kept_and_served_without_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 30);
        let chunk = 4 * BLOCK;
        let size = 2 * chunk + 100;
        let d = data(size as usize);
        let tail = key("e", size, chunk, 2); // 100 bytes
        let k1 = key("e", size, chunk, 1);
        let block =
            |i: u64| Bytes::copy_from_slice(&d[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize]);
        // Blocks 1 and 2 of chunk 1 (the object's blocks 5 and 6).
        s.write_blocks(&k1, BLOCK, &[block(5), block(6)]).unwrap();
        assert!(s.contains_range(&k1, BLOCK, 2 * BLOCK));
        assert!(s.contains_range(&k1, BLOCK + 7, 10));
        assert!(!s.contains(&k1) && !s.contains_range(&k1, 0, 10));
        let got = s.read(&k1, BLOCK + 7, BLOCK).unwrap().unwrap();
        assert_eq!(
            &got[..],
            &d[(chunk + BLOCK + 7) as usize..][..BLOCK as usize]
        );
        assert!(
            s.read(&k1, 0, 10).unwrap().is_none(),
            "an absent block is a miss"
        );
        assert!(s.read(&k1, 3 * BLOCK, 10).unwrap().is_none());
        assert_eq!(s.used_bytes(), 2 * BLOCK);
        // Misaligned or short pieces are refused.
        assert!(s.write_blocks(&k1, 7, &[block(5)]).is_err());
        assert!(s
            .write_blocks(&k1, 0, &[Bytes::from_static(b"short")])
            .is_err());
        // The tail chunk's one short block.
        let tail_bytes = Bytes::copy_from_slice(&d[(2 * chunk) as usize..]);
        s.write_blocks(&tail, 0, &[tail_bytes]).unwrap();
        assert!(s.contains(&tail));
        drop(s);
        let (s, report) = DiskStore::open(dir.path(), 1 << 30, Arc::default()).unwrap();
        assert_eq!(
            (report.objects, report.chunks, report.bytes),
            (1, 2, 2 * BLOCK + 100)
        );
        assert!(s.contains_range(&k1, BLOCK, 2 * BLOCK) && !s.contains(&k1));
        // The rest of the chunk completes it.
        let whole = Bytes::copy_from_slice(&d[chunk as usize..(2 * chunk) as usize]);
        s.write(&k1, std::slice::from_ref(&whole)).unwrap();
        assert!(s.contains(&k1));
        assert_eq!(s.read(&k1, 0, chunk).unwrap().unwrap(), whole);
    }

    fn allocated(p: &Path) -> u64 {
        fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn eviction_punches_the_chunk_out_and_removes_an_empty_object() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 4 * BLOCK;
        let s = store(dir.path(), 2 * chunk);
        let size = 3 * chunk;
        let d = data(size as usize);
        let keys: Vec<ChunkKey> = (0..3).map(|i| key("e", size, chunk, i)).collect();
        let piece =
            |i: u64| Bytes::copy_from_slice(&d[(i * chunk) as usize..((i + 1) * chunk) as usize]);
        s.write(&keys[0], &[piece(0)]).unwrap();
        s.write(&keys[1], &[piece(1)]).unwrap();
        let path = data_of(&s, &keys[0]);
        let before = allocated(&path);
        assert!(before >= 2 * chunk, "{before}");
        s.write(&keys[2], &[piece(2)]).unwrap();
        assert!(!s.contains(&keys[0]), "the least recently used chunk went");
        assert!(s.read(&keys[0], 0, 10).unwrap().is_none());
        assert!(
            allocated(&path) <= before,
            "its bytes punched out: {} vs {before}",
            allocated(&path)
        );
        assert_eq!(s.used_bytes(), 2 * chunk);
        s.delete(&keys[1]);
        s.delete(&keys[2]);
        assert!(
            !path.exists() && !map_of(&s, &keys[0]).exists(),
            "nothing left: files removed"
        );
        assert_eq!(s.used_bytes(), 0);
    }

    #[test]
    fn a_stamped_object_is_trusted_until_its_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 2 * BLOCK;
        let size = 2 * chunk;
        let d = data(size as usize);
        let keys: Vec<ChunkKey> = (0..2).map(|i| key("e", size, chunk, i)).collect();
        let object = keys[0].object.clone();
        let metrics = Arc::new(Metrics::default());
        let open = || {
            Arc::new(
                DiskStore::open(dir.path(), 1 << 30, metrics.clone())
                    .unwrap()
                    .0,
            )
        };
        let s = open();
        for k in &keys {
            let from = k.start() as usize;
            s.write(
                k,
                &[Bytes::copy_from_slice(&d[from..from + chunk as usize])],
            )
            .unwrap();
            s.seal_if_whole(k);
        }
        s.finish_sealing(Duration::from_secs(10));
        assert_eq!(
            metrics.cache_checks.get(),
            0,
            "stamped without reading back what this process wrote (its CRCs came from those bytes)"
        );
        drop(s);
        let s = open();
        assert!(s.whole_object(&object, chunk).unwrap().is_some());
        assert_eq!(
            metrics.cache_checks.get(),
            0,
            "the stamp spares the next process the check"
        );
        drop(s);
        // Any change to the data file (here: its mode) voids the stamp.
        let path = layout::data_path(dir.path(), &keys[0].version());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let s = open();
        assert!(s.whole_object(&object, chunk).unwrap().is_some());
        assert_eq!(metrics.cache_checks.get(), 1, "checked");
    }

    #[test]
    fn a_whole_object_is_handed_out_pinned_and_checked_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 2 * BLOCK;
        let size = 2 * chunk + 5;
        let d = data(size as usize);
        let keys: Vec<ChunkKey> = (0..3).map(|i| key("e", size, chunk, i)).collect();
        let object = keys[0].object.clone();
        let write = |s: &DiskStore, k: &ChunkKey| {
            let from = k.start() as usize;
            let bytes = Bytes::copy_from_slice(&d[from..from + k.len() as usize]);
            s.write(k, &[bytes]).unwrap();
        };
        let s = Arc::new(store(dir.path(), 1 << 30));
        write(&s, &keys[0]);
        write(&s, &keys[1]);
        assert!(
            s.whole_object(&object, chunk).unwrap().is_none(),
            "not whole yet"
        );
        write(&s, &keys[2]);
        let whole = s.whole_object(&object, chunk).unwrap().expect("whole");
        let mut read = Vec::new();
        io::Read::read_to_end(&mut &whole.file, &mut read).unwrap();
        assert_eq!(read, d, "the data file is the object, byte for byte");
        // Pinned: a bound it no longer fits under passes it over.
        s.evict_to_fit(u64::MAX / 2);
        assert!(
            keys.iter().all(|k| s.contains(k)),
            "pinned objects are not evicted"
        );
        drop(whole);
        s.evict_to_fit(u64::MAX / 2);
        assert!(!s.contains(&keys[0]), "unpinned, it goes");
        for k in &keys {
            write(&s, k);
        }
        drop(s);

        // Damaged while no mount ran: found before it is handed out, and its chunk dropped.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(layout::data_path(dir.path(), &keys[0].version()))
            .unwrap();
        f.write_all_at(b"X", chunk + 3).unwrap();
        let s = Arc::new(store(dir.path(), 1 << 30));
        assert!(s.contains(&keys[1]), "the index trusts the map");
        assert!(
            s.whole_object(&object, chunk).unwrap().is_none(),
            "the check finds it"
        );
        assert!(!s.contains(&keys[1]) && s.contains(&keys[0]));
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
        assert!(!shared.join(layout::SUBDIR).exists(), "nothing made");

        let file = t.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(why(&file).contains("not a directory"));

        let newer = t.path().join("newer");
        fs::create_dir(&newer).unwrap();
        fs::write(layout::marker_path(&newer), b"orcafs-cache 3\n").unwrap();
        assert!(why(&newer).contains("does not know"));
        assert!(
            layout::find_root(&newer).is_err(),
            "the cache commands refuse it too"
        );

        let taken = t.path().join("taken");
        fs::create_dir_all(taken.join(layout::SUBDIR)).unwrap();
        fs::write(taken.join("a"), b"x").unwrap();
        fs::write(taken.join(layout::SUBDIR).join("b"), b"x").unwrap();
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
