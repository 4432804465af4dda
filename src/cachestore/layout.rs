//! layout: the local cache's files on disk, and the one place their format is written down.
//!
//! Layout 2: one sparse data file per object version (at one chunk size), holding the object's
//! bytes at their own offsets, beside a block map saying which 4 KiB blocks it holds and their
//! CRC32C:
//!
//! ```text
//! <root>/objects/<xx>/<yy>/<version id hex>       data: byte i of the object at offset i
//! <root>/objects/<xx>/<yy>/<version id hex>.map   block map: header, then one entry per block
//! <root>/tmp/                                     map files being created
//! ```
//!
//! One data file per object is what lets the kernel read a cached object itself (FUSE
//! passthrough); the block map is what lets a chunk be cached in part (random reads fetch a block
//! or a few, not a chunk) and still never serve a byte it has not checked. The map's header,
//! integers little-endian: magic `ORCAMAP2`, u32 header length, u32 block size, u64 object size,
//! u64 chunk size, four u32-length-prefixed strings (origin id, bucket, key, ETag), and a u32
//! CRC32C of all that precedes it. Then a 40-byte check [`Stamp`] (zeros: none). Then, for block
//! i, 8 bytes at `header length + 40 + 8 i`: the block's CRC32C and that CRC xor [`SEAL`]. Anything else there (zeros, a torn write) is an
//! absent block. The data is written before its entries, and entries are cleared before the data
//! is punched out, so a crash leaves at worst a block that is absent or fails its CRC: a miss,
//! never a wrong byte.
//!
//! The mount ([`super::disk`]), the operator commands ([`super::admin`]) and `orcafs warm` read
//! and name files through here, so they cannot disagree on what an intact file is. This module
//! only encodes, decodes and names: caching, indexing, eviction and deleting stay with them.
//!
//! Ownership: a directory is an orcafs cache when it holds the marker [`MARKER`] (or, written by
//! orcafs before the marker, nothing but `chunks/`, `tmp/` and the log). The only files orcafs
//! ever deletes are those named here as its own: object and map files at their paths, temp files
//! named as [`temp_path`] names them, and layout 1's chunk files at their paths ([`layout_1_files`]),
//! inside such a directory. [`dir_kind`] tells the cases apart; choosing and making the directory
//! is [`super::disk`]'s.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::chunk::{ChunkKey, ObjectVersion, VersionId};

/// The trailing digit is the format version: maps of another version are refused as foreign.
pub const MAGIC: &[u8; 8] = b"ORCAMAP2";
/// Data is checked in blocks of this size (a page; when the chunk size is a multiple of it), so a
/// 4 KiB read reads and checks 4 KiB, and what a random read fetched can be kept.
pub const BLOCK: u64 = 4 << 10;
/// Bytes of the check stamp between the header and the entries.
pub const STAMP: u64 = 40;
const STAMP_MAGIC: &[u8; 4] = b"OKD1";
/// A present entry is `crc, crc ^ SEAL`.
pub const SEAL: u32 = 0x4f52_4341;
/// Bytes of one block map entry.
pub const ENTRY: u64 = 8;
/// magic + header length + block size + object size + chunk size + 4 string lengths + CRC.
const MIN_HEADER: u64 = 8 + 4 + 4 + 8 + 8 + 4 * 4 + 4;
const MAX_HEADER: u64 = 1 << 20;
/// Enough for the fixed fields and typical key names; longer headers take a second read.
const FIRST_READ: u64 = 4096;

const OBJECTS: &str = "objects";
const TMP: &str = "tmp";
/// Layout 1's directory of chunk files.
const CHUNKS: &str = "chunks";
const MAP_SUFFIX: &str = ".map";
const LAYOUT_1_MARKER: &str = "orcafs-cache 1";

pub fn objects_dir(root: &Path) -> PathBuf {
    root.join(OBJECTS)
}

pub fn tmp_dir(root: &Path) -> PathBuf {
    root.join(TMP)
}

fn fan_out(root: &Path, hex: &str) -> PathBuf {
    objects_dir(root).join(&hex[0..2]).join(&hex[2..4])
}

/// `<root>/objects/<xx>/<yy>/<id hex>`: two levels of fan-out keep each directory small.
pub fn data_path(root: &Path, v: &VersionId) -> PathBuf {
    let hex = v.to_hex();
    fan_out(root, &hex).join(hex)
}

/// The block map beside [`data_path`].
pub fn map_path(root: &Path, v: &VersionId) -> PathBuf {
    let hex = v.to_hex();
    fan_out(root, &hex).join(hex + MAP_SUFFIX)
}

/// A fresh path under `tmp/` to create `v`'s map at; the random suffix keeps racers apart.
pub fn temp_path(root: &Path, v: &VersionId) -> PathBuf {
    tmp_dir(root).join(format!("{}.{:016x}", v.to_hex(), fastrand::u64(..)))
}

/// Which of an object version's files `path` is, going by its name and place alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Data,
    Map,
}

/// The version and role of the file at `path`, if it is named and placed as one of orcafs's.
pub fn file_at(root: &Path, path: &Path) -> Option<(VersionId, Role)> {
    let name = path.file_name()?.to_str()?;
    let (hex, role) = match name.strip_suffix(MAP_SUFFIX) {
        Some(hex) => (hex, Role::Map),
        None => (name, Role::Data),
    };
    let v = VersionId::from_hex(hex).filter(|v| v.to_hex() == hex)?;
    let expected = match role {
        Role::Data => data_path(root, &v),
        Role::Map => map_path(root, &v),
    };
    (expected == path).then_some((v, role))
}

/// True for a file name [`temp_path`] gives: `<version id hex>.<16 hex digits>`, lower case.
pub fn is_temp_name(name: &OsStr) -> bool {
    let Some((id, suffix)) = name.to_str().and_then(|n| n.split_once('.')) else {
        return false;
    };
    lower_hex(id, 64) && lower_hex(suffix, 16)
}

/// True for a directory name the layouts fan out into: two lower-case hex digits.
pub fn is_fan_out_name(name: &OsStr) -> bool {
    name.to_str().is_some_and(|n| lower_hex(n, 2))
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The temp files in `root`'s `tmp/`: the entries named as [`temp_path`] names them (or as
/// layout 1 named its temp files, the same shape), and no other.
pub fn temp_files(root: &Path) -> Vec<PathBuf> {
    let named = |p: &PathBuf| p.file_name().is_some_and(is_temp_name);
    read_dir_paths(&tmp_dir(root))
        .into_iter()
        .filter(named)
        .collect()
}

/// Every file under `objects/<xx>/<yy>/` with the fan-out directories it sits in; files
/// directly under `objects/` or in other directories are returned as strays.
pub struct Walk {
    pub files: Vec<PathBuf>,
    pub fan_out_dirs: Vec<PathBuf>,
    pub strays: u64,
}

pub fn walk_objects(root: &Path) -> Walk {
    let mut w = Walk {
        files: Vec::new(),
        fan_out_dirs: Vec::new(),
        strays: 0,
    };
    let fan = |p: &PathBuf| p.is_dir() && p.file_name().is_some_and(is_fan_out_name);
    for l1 in read_dir_paths(&objects_dir(root)) {
        if !fan(&l1) {
            w.strays += 1;
            continue;
        }
        for l2 in read_dir_paths(&l1) {
            if !fan(&l2) {
                w.strays += 1;
                continue;
            }
            w.files.extend(read_dir_paths(&l2));
            w.fan_out_dirs.push(l2);
        }
        w.fan_out_dirs.push(l1);
    }
    w
}

/// Layout 1's chunk files (`chunks/<xx>/<yy>/<64 hex>`) and fan-out directories, deepest
/// first: what a mount discards when it opens a cache of that layout.
pub fn layout_1_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for l1 in read_dir_paths(&root.join(CHUNKS)) {
        if !l1.file_name().is_some_and(is_fan_out_name) {
            continue;
        }
        for l2 in read_dir_paths(&l1) {
            if !l2.file_name().is_some_and(is_fan_out_name) {
                continue;
            }
            for f in read_dir_paths(&l2) {
                let name = f.file_name().and_then(OsStr::to_str).unwrap_or("");
                if lower_hex(name, 64)
                    && name[0..2] == *l1.file_name().and_then(OsStr::to_str).unwrap_or("")
                {
                    out.push(f);
                }
            }
            out.push(l2);
        }
        out.push(l1);
    }
    out.push(root.join(CHUNKS));
    out
}

/// The marker file that makes a directory an orcafs cache; it holds [`marker_text`].
pub const MARKER: &str = ".orcafs-cache";
/// The layout the marker names: `objects/` and `tmp/` as above. Another layout takes another
/// number; a directory marked with a number this build does not know is left alone, and one of
/// layout 1 (a file per chunk under `chunks/`) is this build's to discard and reuse.
pub const LAYOUT_VERSION: u32 = 2;
/// orcafs's own subdirectory of a cache directory that already holds other files.
pub const SUBDIR: &str = "orcafs";
/// The detached daemon's log, beside `objects/`.
pub const LOG: &str = "orcafs.log";

pub fn marker_path(root: &Path) -> PathBuf {
    root.join(MARKER)
}

pub fn log_path(root: &Path) -> PathBuf {
    root.join(LOG)
}

pub fn marker_text() -> String {
    format!("orcafs-cache {LAYOUT_VERSION}\n")
}

/// What a directory holds, as far as whose it is goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirKind {
    Missing,
    /// Something that is not a directory.
    NotADir,
    Empty,
    /// An orcafs cache of this layout: its marker is there.
    Marked,
    /// A marker this build does not know (a newer layout); its first line.
    OtherMarker(String),
    /// An orcafs cache of layout 1 (a file per chunk under `chunks/`): marked `orcafs-cache 1`,
    /// or written before the marker existed (a `chunks/` directory, and besides it nothing but
    /// `tmp/` and the log). Its chunk files are discarded when a mount opens it.
    Legacy,
    /// Anything else: files orcafs did not write.
    Foreign,
}

/// Classifies `dir`, reading its entries only until the answer is known.
pub fn dir_kind(dir: &Path) -> io::Result<DirKind> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Ok(DirKind::NotADir),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DirKind::Missing),
        Err(e) => return Err(e),
    }
    if let Some(kind) = read_marker(dir)? {
        return Ok(kind);
    }
    let (mut chunks, mut any) = (false, false);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_dir = entry.file_type()?.is_dir();
        any = true;
        match entry.file_name().to_str() {
            Some(CHUNKS) if is_dir => chunks = true,
            Some(TMP) if is_dir => {}
            Some(LOG) if !is_dir => {}
            _ => return Ok(DirKind::Foreign),
        }
    }
    Ok(match (any, chunks) {
        (false, _) => DirKind::Empty,
        (true, true) => DirKind::Legacy,
        (true, false) => DirKind::Foreign,
    })
}

/// `Marked` or `OtherMarker` when `dir` holds a marker, None when it holds none.
fn read_marker(dir: &Path) -> io::Result<Option<DirKind>> {
    use std::io::Read;
    let file = match File::open(marker_path(dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // A marker is one short line; whatever else has this name is not read in full.
    let mut bytes = Vec::new();
    file.take(256).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    // A marker cut short (a crash while orcafs wrote it) is still orcafs's own.
    if marker_text().starts_with(&*text) {
        return Ok(Some(DirKind::Marked));
    }
    if text.starts_with(LAYOUT_1_MARKER) {
        return Ok(Some(DirKind::Legacy));
    }
    let first: String = text.lines().next().unwrap_or("").chars().take(60).collect();
    Ok(Some(DirKind::OtherMarker(first)))
}

/// The cache an existing `--cache-dir dir` holds: `dir` itself, or its [`SUBDIR`] (where orcafs
/// keeps the cache when `dir` holds other files). None when neither is an orcafs cache.
pub fn find_root(dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut candidate = dir.to_owned();
    loop {
        match dir_kind(&candidate)? {
            DirKind::Marked | DirKind::Legacy => return Ok(Some(candidate)),
            DirKind::OtherMarker(line) => {
                let why = unknown_layout(&line);
                let text = format!("will not use {}: {why}", candidate.display());
                return Err(io::Error::new(io::ErrorKind::InvalidData, text));
            }
            DirKind::Foreign if candidate == dir => candidate = dir.join(SUBDIR),
            _ => return Ok(None),
        }
    }
}

/// Why a directory marked with a layout this build does not know is left alone, and what to do.
pub fn unknown_layout(marker_line: &str) -> String {
    format!(
        "its {MARKER} says {marker_line:?}, a cache layout this orcafs does not know; use the \
         orcafs that wrote it, or another directory"
    )
}

/// The entries of `dir`; none when it cannot be read (absent, or not a directory).
pub fn read_dir_paths(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    }
}

/// A block map's header, checked on its own terms; [`MapHeader::is_of`] says whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapHeader {
    /// Header length: the entries start here.
    pub len: u64,
    pub block: u64,
    pub size: u64,
    pub chunk_size: u64,
    pub origin_id: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
}

impl MapHeader {
    /// The object version this map describes.
    pub fn object(&self) -> ObjectVersion {
        ObjectVersion {
            origin_id: self.origin_id.as_str().into(),
            bucket: self.bucket.as_str().into(),
            key: self.key.as_str().into(),
            etag: self.etag.as_str().into(),
            size: self.size,
        }
    }

    /// True when this is the map of version `v`: the test for a foreign or misplaced file.
    pub fn is_of(&self, v: &VersionId) -> bool {
        VersionId::of(&self.object(), self.chunk_size) == *v
    }

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block)
    }

    /// The length of an intact map file with this header.
    pub fn file_len(&self) -> u64 {
        self.len + STAMP + ENTRY * self.blocks()
    }

    /// Where the check stamp is (see [`Stamp`]).
    pub fn stamp_at(&self) -> u64 {
        self.len
    }

    /// Where block `i`'s entry is.
    pub fn entry_at(&self, i: u64) -> u64 {
        self.len + STAMP + ENTRY * i
    }
}

/// The block size for a chunk size: [`BLOCK`] when chunks are made of whole blocks, else (a
/// chunk size that is not a multiple of 4 KiB) one block per chunk, so a block never straddles
/// two chunks.
pub fn block_size_for(chunk_size: u64) -> u64 {
    if chunk_size % BLOCK == 0 {
        BLOCK
    } else {
        chunk_size
    }
}

/// The header of the map of `object` at `chunk_size`.
pub fn encode_header(object: &ObjectVersion, chunk_size: u64) -> Vec<u8> {
    let o = object;
    let mut h = Vec::with_capacity(MIN_HEADER as usize + 64 + o.key.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&0u32.to_le_bytes()); // header length, patched below
    h.extend_from_slice(&(block_size_for(chunk_size) as u32).to_le_bytes());
    for n in [o.size, chunk_size] {
        h.extend_from_slice(&n.to_le_bytes());
    }
    for field in [&*o.origin_id, &*o.bucket, &*o.key, &*o.etag] {
        h.extend_from_slice(&(field.len() as u32).to_le_bytes());
        h.extend_from_slice(field.as_bytes());
    }
    let total = (h.len() + 4) as u32;
    h[8..12].copy_from_slice(&total.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes and checks a header (magic, length, own CRC, sizes); `bytes` must hold at least the
/// whole header. The error says what is wrong.
pub fn decode_header(bytes: &[u8]) -> Result<MapHeader, String> {
    let mut r = Reader(bytes);
    if r.take(8).map_err(|_| "shorter than a header")? != MAGIC {
        return Err("not an orcafs block map (bad magic)".into());
    }
    let len = r.u32()? as u64;
    if len < MIN_HEADER || len > bytes.len() as u64 || len > MAX_HEADER {
        return Err(format!("implausible header length {len}"));
    }
    let (head, crc) = bytes[..len as usize].split_at(len as usize - 4);
    if crc != crc32c::crc32c(head).to_le_bytes().as_slice() {
        return Err("header checksum mismatch".into());
    }
    let mut r = Reader(&head[12..]);
    // Fields in file order: a struct literal evaluates them in the order written.
    let h = MapHeader {
        len,
        block: r.u32()? as u64,
        size: r.u64()?,
        chunk_size: r.u64()?,
        origin_id: r.string("origin id")?,
        bucket: r.string("bucket")?,
        key: r.string("key")?,
        etag: r.string("etag")?,
    };
    if !r.0.is_empty() {
        return Err("trailing bytes in header".into());
    }
    if h.chunk_size == 0 || h.block != block_size_for(h.chunk_size) {
        return Err(format!(
            "block size {} does not go with chunk size {}",
            h.block, h.chunk_size
        ));
    }
    Ok(h)
}

/// "Every block held was checked against its entry, the data file was then flushed, and it has
/// not changed since": the data file's identity and change time when it was checked. Any write,
/// truncation, hole punch or attribute change moves the change time (which no program can set
/// back), so a stamp that still matches the file spares the next process the read-through check
/// before passthrough; one that does not match is ignored. Layout: magic `OKD1`, u64 inode,
/// i64 ctime seconds, u32 ctime nanoseconds, u64 size, u32 CRC32C of the preceding, zero padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub size: u64,
}

impl Stamp {
    pub fn of(meta: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: meta.ino(),
            ctime_sec: meta.ctime(),
            ctime_nsec: meta.ctime_nsec() as u32,
            size: meta.len(),
        }
    }

    pub fn encode(&self) -> [u8; STAMP as usize] {
        let mut b = [0u8; STAMP as usize];
        b[..4].copy_from_slice(STAMP_MAGIC);
        b[4..12].copy_from_slice(&self.ino.to_le_bytes());
        b[12..20].copy_from_slice(&self.ctime_sec.to_le_bytes());
        b[20..24].copy_from_slice(&self.ctime_nsec.to_le_bytes());
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// None for no stamp (zeros), a torn one, or anything else.
    pub fn decode(b: &[u8]) -> Option<Stamp> {
        let b: &[u8; STAMP as usize] = b.try_into().ok()?;
        let crc = u32::from_le_bytes(b[32..36].try_into().ok()?);
        if &b[..4] != STAMP_MAGIC || crc != crc32c::crc32c(&b[..32]) {
            return None;
        }
        Some(Stamp {
            ino: u64::from_le_bytes(b[4..12].try_into().ok()?),
            ctime_sec: i64::from_le_bytes(b[12..20].try_into().ok()?),
            ctime_nsec: u32::from_le_bytes(b[20..24].try_into().ok()?),
            size: u64::from_le_bytes(b[24..32].try_into().ok()?),
        })
    }
}

/// The stamp a map file holds, if any.
pub fn read_stamp(file: &File, h: &MapHeader) -> io::Result<Option<Stamp>> {
    let mut b = [0u8; STAMP as usize];
    file.read_exact_at(&mut b, h.stamp_at())?;
    Ok(Stamp::decode(&b))
}

/// A present block's entry.
pub fn entry(crc: u32) -> [u8; ENTRY as usize] {
    let mut e = [0u8; ENTRY as usize];
    e[..4].copy_from_slice(&crc.to_le_bytes());
    e[4..].copy_from_slice(&(crc ^ SEAL).to_le_bytes());
    e
}

/// The CRC an entry holds, or None for an absent (or torn) one.
pub fn decode_entry(e: &[u8]) -> Option<u32> {
    let crc = u32::from_le_bytes(e.get(..4)?.try_into().ok()?);
    let seal = u32::from_le_bytes(e.get(4..8)?.try_into().ok()?);
    (seal == crc ^ SEAL).then_some(crc)
}

/// Reads and checks a map file's header.
pub fn read_header(file: &File) -> io::Result<Result<MapHeader, String>> {
    let file_len = file.metadata()?.len();
    let mut head = vec![0u8; FIRST_READ.min(file_len) as usize];
    file.read_exact_at(&mut head, 0)?;
    let want = head.get(8..12).and_then(|b| b.try_into().ok());
    let want = want.map_or(0, u32::from_le_bytes) as u64;
    if want > head.len() as u64 && want <= MAX_HEADER.min(file_len) {
        head.resize(want as usize, 0);
        file.read_exact_at(&mut head, 0)?;
    }
    Ok(decode_header(&head))
}

/// The header of `file` when it is an intact map of version `v`: it decodes, names `v`, and the
/// file is as long as the header says. None for anything else (a foreign, misplaced, cut or
/// damaged map).
pub fn map_of(file: &File, v: &VersionId) -> io::Result<Option<MapHeader>> {
    let Ok(h) = read_header(file)? else {
        return Ok(None);
    };
    let intact = h.is_of(v) && file.metadata()?.len() == h.file_len();
    Ok(intact.then_some(h))
}

/// Every block's CRC (None = absent) as the map file says, after its header.
pub fn read_entries(file: &File, h: &MapHeader) -> io::Result<Vec<Option<u32>>> {
    let mut raw = vec![0u8; (ENTRY * h.blocks()) as usize];
    file.read_exact_at(&mut raw, h.entry_at(0))?;
    Ok(raw.chunks(ENTRY as usize).map(decode_entry).collect())
}

/// CRC32C of each `block` bytes of the data, computed across piece boundaries.
pub fn block_crcs(pieces: &[Bytes], block: u64) -> Vec<u32> {
    let mut crcs = BlockCrcs::new(block);
    pieces.iter().for_each(|p| crcs.add(p));
    crcs.finish()
}

/// The CRC32C of each block of a chunk's data, computed as its bytes come in order. A fill
/// computes them while each piece is still in the CPU's cache; reading the chunk again for them
/// at commit, after O_DIRECT wrote it past the cache, was a tenth of a cold read's CPU.
#[derive(Debug, Clone)]
pub struct BlockCrcs {
    block: u64,
    done: Vec<u32>,
    /// The CRC of the block being summed, and how many of its bytes it covers.
    crc: u32,
    in_block: u64,
}

impl BlockCrcs {
    pub fn new(block: u64) -> BlockCrcs {
        BlockCrcs {
            block: block.max(1),
            done: Vec::new(),
            crc: 0,
            in_block: 0,
        }
    }

    /// For the data of `key`'s chunk from its first byte, in the blocks the disk keeps.
    pub fn for_chunk(key: &ChunkKey) -> BlockCrcs {
        let mut crcs = BlockCrcs::new(block_size_for(key.chunk_size));
        crcs.done.reserve(key.len().div_ceil(crcs.block) as usize);
        crcs
    }

    /// The next bytes of the data.
    pub fn add(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = ((self.block - self.in_block) as usize).min(bytes.len());
            self.crc = crc32c::crc32c_append(self.crc, &bytes[..take]);
            self.in_block += take as u64;
            bytes = &bytes[take..];
            if self.in_block == self.block {
                self.done.push(self.crc);
                (self.crc, self.in_block) = (0, 0);
            }
        }
    }

    pub fn block(&self) -> u64 {
        self.block
    }

    /// Every block's CRC, the last (shorter) block's included.
    pub fn finish(mut self) -> Vec<u32> {
        if self.in_block > 0 {
            self.done.push(self.crc);
        }
        self.done
    }
}

/// True when every block of `key`'s chunk is in the cache at `root`, going by its map alone
/// (what `orcafs warm` asks from outside the mount; the mount checks the data on reads).
pub fn chunk_cached(root: &Path, key: &ChunkKey) -> bool {
    let Ok(file) = File::open(map_path(root, &key.version())) else {
        return false;
    };
    let Ok(Some(h)) = map_of(&file, &key.version()) else {
        return false;
    };
    if key.is_empty() {
        return false;
    }
    let first = key.start() / h.block;
    let n = key.len().div_ceil(h.block);
    let mut raw = vec![0u8; (ENTRY * n) as usize];
    if file.read_exact_at(&mut raw, h.entry_at(first)).is_err() {
        return false;
    }
    raw.chunks(ENTRY as usize)
        .all(|e| decode_entry(e).is_some())
}

/// Cursor over header bytes; every getter fails past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("header ends early".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap_or([0; N]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} in header is not UTF-8"))
    }
}

/// A chunk key for tests of the cache's files.
#[cfg(test)]
pub(crate) fn test_key(etag: &str, size: u64, chunk_size: u64, index: u64) -> ChunkKey {
    let object = ObjectVersion {
        origin_id: "http://o".into(),
        bucket: "bkt".into(),
        key: "dir/file".into(),
        etag: etag.into(),
        size,
    };
    ChunkKey::new(std::sync::Arc::new(object), chunk_size, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_names_its_version() {
        let k = test_key("e", 3 * BLOCK + 5, 4 * BLOCK, 0);
        let bytes = encode_header(&k.object, k.chunk_size);
        let h = decode_header(&bytes).unwrap();
        assert_eq!(h.len, bytes.len() as u64);
        assert_eq!(
            (h.size, h.chunk_size, h.block, h.blocks()),
            (3 * BLOCK + 5, 4 * BLOCK, BLOCK, 4)
        );
        assert!(h.is_of(&k.version()));
        assert!(!h.is_of(&test_key("other", 3 * BLOCK + 5, 4 * BLOCK, 0).version()));
        assert_eq!(
            block_size_for(100_000),
            100_000,
            "a block never straddles chunks"
        );
    }

    #[test]
    fn corrupt_truncated_or_foreign_headers_are_refused() {
        let k = test_key("e", 2 * BLOCK, BLOCK, 1);
        let good = encode_header(&k.object, k.chunk_size);
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        assert!(decode_header(&flipped).unwrap_err().contains("checksum"));
        assert!(decode_header(&good[..good.len() - 1]).is_err(), "truncated");
        assert!(decode_header(b"ORCAMAP2").is_err() && decode_header(b"garbage").is_err());
        let mut v1 = good.clone();
        v1[7] = b'1';
        assert!(decode_header(&v1).unwrap_err().contains("magic"));
    }

    #[test]
    fn entries_are_sealed_and_a_torn_or_zero_entry_is_absent() {
        for crc in [0, 1, SEAL, u32::MAX] {
            assert_eq!(decode_entry(&entry(crc)), Some(crc));
        }
        assert_eq!(decode_entry(&[0; 8]), None);
        let mut torn = entry(0x1234_5678);
        torn[6] = 0;
        assert_eq!(decode_entry(&torn), None);
    }

    #[test]
    fn stamps_round_trip_and_anything_else_is_none() {
        let s = Stamp {
            ino: 42,
            ctime_sec: 1_700_000_000,
            ctime_nsec: 123,
            size: 9,
        };
        assert_eq!(Stamp::decode(&s.encode()), Some(s));
        assert_eq!(Stamp::decode(&[0; STAMP as usize]), None);
        let mut torn = s.encode();
        torn[10] ^= 1;
        assert_eq!(Stamp::decode(&torn), None);
    }

    #[test]
    fn block_crcs_span_pieces() {
        let d: Vec<u8> = (0..(2 * BLOCK + 7) as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        let whole = block_crcs(&[Bytes::copy_from_slice(&d)], BLOCK);
        let split = block_crcs(
            &[
                Bytes::copy_from_slice(&d[..100]),
                Bytes::copy_from_slice(&d[100..]),
            ],
            BLOCK,
        );
        assert_eq!(whole, split);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[2], crc32c::crc32c(&d[2 * BLOCK as usize..]));
        // Bytes added a few at a time, across block boundaries, sum the same.
        let mut bit_by_bit = BlockCrcs::new(BLOCK);
        d.chunks(999).for_each(|c| bit_by_bit.add(c));
        assert_eq!(bit_by_bit.finish(), whole);
        assert!(BlockCrcs::new(BLOCK).finish().is_empty());
    }

    #[test]
    fn names_are_recognised_exactly() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let v = test_key("e", 1, BLOCK, 0).version();
        assert_eq!(file_at(root, &data_path(root, &v)), Some((v, Role::Data)));
        assert_eq!(file_at(root, &map_path(root, &v)), Some((v, Role::Map)));
        assert_eq!(
            file_at(root, &root.join("objects").join(v.to_hex())),
            None,
            "misplaced"
        );
        let upper = data_path(root, &v).with_file_name(v.to_hex().to_uppercase());
        assert_eq!(file_at(root, &upper), None);
        let temp = temp_path(root, &v);
        assert!(is_temp_name(temp.file_name().unwrap()));
        for bad in [
            "x",
            "notes.txt",
            &format!("{}.xyz", v.to_hex()),
            &v.to_hex(),
        ] {
            assert!(!is_temp_name(OsStr::new(bad)), "{bad}");
        }
    }

    #[test]
    fn directory_kinds_tell_whose_a_directory_is() {
        let t = tempfile::tempdir().unwrap();
        let d = |name: &str| t.path().join(name);
        let kind = |name: &str| dir_kind(&d(name)).unwrap();
        assert_eq!(kind("absent"), DirKind::Missing);
        fs::write(d("file"), b"x").unwrap();
        assert_eq!(kind("file"), DirKind::NotADir);
        fs::create_dir(d("empty")).unwrap();
        assert_eq!(kind("empty"), DirKind::Empty);

        fs::create_dir_all(d("old/chunks/ab")).unwrap();
        fs::create_dir_all(d("old/tmp")).unwrap();
        fs::write(d("old").join(LOG), b"log").unwrap();
        assert_eq!(kind("old"), DirKind::Legacy, "chunks/, tmp/ and the log");
        fs::write(d("old/notes"), b"x").unwrap();
        assert_eq!(kind("old"), DirKind::Foreign, "anything else beside them");
        fs::create_dir_all(d("tmponly/tmp")).unwrap();
        assert_eq!(
            kind("tmponly"),
            DirKind::Foreign,
            "a tmp/ alone is not orcafs's"
        );

        fs::create_dir(d("marked")).unwrap();
        fs::write(d("marked/notes"), b"x").unwrap();
        fs::write(marker_path(&d("marked")), marker_text()).unwrap();
        assert_eq!(kind("marked"), DirKind::Marked, "the marker decides");
        fs::write(marker_path(&d("marked")), &marker_text()[..5]).unwrap();
        assert_eq!(
            kind("marked"),
            DirKind::Marked,
            "a marker cut short by a crash"
        );
        fs::write(marker_path(&d("marked")), "orcafs-cache 3\n").unwrap();
        assert_eq!(
            kind("marked"),
            DirKind::OtherMarker("orcafs-cache 3".into())
        );
        fs::write(marker_path(&d("marked")), "orcafs-cache 1\n").unwrap();
        assert_eq!(kind("marked"), DirKind::Legacy, "layout 1, marked");
    }
}
