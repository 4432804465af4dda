//! chunkfile: the local cache's files on disk, and the one place their format is written down.
//!
//! Layout: `<dir>/chunks/<xx>/<yy>/<chunk id hex>`, one file per chunk, and `<dir>/tmp/` for
//! writes in progress. A file is a header, then the chunk's data. The header, integers
//! little-endian: magic `ORCACHK1`, u32 header length, u32 block size, u64 data length, u64
//! chunk size, u64 index, four u32-length-prefixed strings (origin id, bucket, key, ETag), u32
//! block count, a CRC32C per 64 KiB block of data, and a u32 CRC32C of all that precedes it.
//! The key fields expose a foreign file at a colliding path; the block CRCs let a read check
//! only the blocks it touches.
//!
//! The mount ([`super::disk`]) and the operator commands ([`super::admin`]) both read and name
//! files through here, so they cannot disagree on what an intact file is. This module only
//! encodes, decodes and names: caching, indexing, eviction and deleting stay with them. Existing
//! caches must stay readable: a new layout takes a new magic, never a changed meaning of this one.
//!
//! Ownership: a directory is an orcafs cache when it holds the marker [`MARKER`] (or, written by
//! orcafs before the marker, nothing but `chunks/`, `tmp/` and the log). The only files orcafs
//! ever deletes are those named here as its own: chunk files at their chunk paths and temp
//! files named as [`temp_path`] names them, inside such a directory. [`dir_kind`] tells the
//! cases apart; choosing and making the directory is [`super::disk`]'s.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::chunk::{ChunkId, ChunkKey, ObjectVersion};

/// The trailing digit is the format version: files of another version are refused as foreign.
pub const MAGIC: &[u8; 8] = b"ORCACHK1";
/// Data is checked in blocks of this size, so a small read verifies one block, not the chunk.
pub const BLOCK: u64 = 64 << 10;
/// magic + header length + block size + data length + chunk size + index + 4 string lengths +
/// block count + header CRC.
const MIN_HEADER: u64 = 8 + 4 + 4 + 8 + 8 + 8 + 4 * 4 + 4 + 4;
/// Enough for the fixed fields and typical key names; longer headers take a second read.
const FIRST_READ: u64 = 4096;
const MAX_HEADER: u64 = 16 << 20;

const CHUNKS: &str = "chunks";
const TMP: &str = "tmp";

pub fn chunks_dir(root: &Path) -> PathBuf {
    root.join(CHUNKS)
}

pub fn tmp_dir(root: &Path) -> PathBuf {
    root.join(TMP)
}

/// `<root>/chunks/<xx>/<yy>/<id hex>`: two levels of fan-out keep each directory small.
pub fn chunk_path(root: &Path, id: &ChunkId) -> PathBuf {
    let hex = id.to_hex();
    chunks_dir(root).join(&hex[0..2]).join(&hex[2..4]).join(hex)
}

/// A fresh path under `tmp/` to write chunk `id` to; the random suffix keeps racing writers apart.
pub fn temp_path(root: &Path, id: &ChunkId) -> PathBuf {
    tmp_dir(root).join(format!("{}.{:016x}", id.to_hex(), fastrand::u64(..)))
}

/// The chunk whose file `path` is, going by its name and place alone (contents unchecked).
pub fn chunk_id_at(root: &Path, path: &Path) -> Option<ChunkId> {
    let name = path.file_name()?.to_str()?;
    ChunkId::from_hex(name).filter(|id| chunk_path(root, id) == path)
}

/// True for a file name [`temp_path`] gives: `<chunk id hex>.<16 hex digits>`, lower case.
pub fn is_temp_name(name: &OsStr) -> bool {
    let Some((id, suffix)) = name.to_str().and_then(|n| n.split_once('.')) else {
        return false;
    };
    ChunkId::from_hex(id).is_some_and(|c| c.to_hex() == id) && lower_hex(suffix, 16)
}

/// True for a directory name [`chunk_path`] fans out into: two lower-case hex digits.
pub fn is_fan_out_name(name: &OsStr) -> bool {
    name.to_str().is_some_and(|n| lower_hex(n, 2))
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The temp files in `root`'s `tmp/`: the entries named as [`temp_path`] names them, and no other.
pub fn temp_files(root: &Path) -> Vec<PathBuf> {
    let named = |p: &PathBuf| p.file_name().is_some_and(is_temp_name);
    read_dir_paths(&tmp_dir(root))
        .into_iter()
        .filter(named)
        .collect()
}

/// The marker file that makes a directory an orcafs cache; it holds [`marker_text`].
pub const MARKER: &str = ".orcafs-cache";
/// The layout the marker names: `chunks/` and `tmp/` as above. Another layout takes another
/// number, and a directory marked with a number this build does not know is left alone.
pub const LAYOUT_VERSION: u32 = 1;
/// orcafs's own subdirectory of a cache directory that already holds other files.
pub const SUBDIR: &str = "orcafs";
/// The detached daemon's log, beside `chunks/`.
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
    /// A cache written before the marker existed: a `chunks/` directory, and besides it nothing
    /// but `tmp/` and the log.
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

/// A chunk file's header, checked on its own terms; [`Header::is_of`] says whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header length: the data starts here.
    pub len: u64,
    pub data_len: u64,
    pub chunk_size: u64,
    pub index: u64,
    pub origin_id: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    /// CRC32C of each [`BLOCK`] of the data.
    pub crcs: Vec<u32>,
}

impl Header {
    /// True when this is the header of `key`'s chunk: the mount's test for a foreign file.
    pub fn is_of(&self, key: &ChunkKey) -> bool {
        let o = &key.object;
        self.chunk_size == key.chunk_size
            && self.index == key.index
            && self.data_len == key.len()
            && self.origin_id == *o.origin_id
            && self.bucket == *o.bucket
            && self.key == *o.key
            && self.etag == *o.etag
    }

    /// The chunk key this header names. The object size is not stored; a size ending with this
    /// chunk gives the same id and the same chunk length.
    pub fn chunk_key(&self) -> ChunkKey {
        let object = ObjectVersion {
            origin_id: self.origin_id.as_str().into(),
            bucket: self.bucket.as_str().into(),
            key: self.key.as_str().into(),
            etag: self.etag.as_str().into(),
            size: self.index * self.chunk_size + self.data_len,
        };
        ChunkKey::new(Arc::new(object), self.chunk_size, self.index)
    }

    /// The length of an intact file with this header.
    pub fn file_len(&self) -> u64 {
        self.len + self.data_len
    }

    /// The first block failing its CRC in `span`: whole blocks of data from block `first` on.
    /// A block past the CRC list fails too.
    pub fn bad_block(&self, first: u64, span: &[u8]) -> Option<u64> {
        let mut blocks = (first..).zip(span.chunks(BLOCK as usize));
        let bad = |(i, b): &(u64, &[u8])| self.crcs.get(*i as usize) != Some(&crc32c::crc32c(b));
        blocks.find(bad).map(|(i, _)| i)
    }
}

/// The header of `key`'s chunk with these bytes, given as pieces.
pub fn encode(key: &ChunkKey, pieces: &[Bytes]) -> Vec<u8> {
    let data_len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
    let crcs = block_crcs(pieces, data_len);
    let o = &key.object;
    let mut h = Vec::with_capacity(MIN_HEADER as usize + 64 + o.key.len() + crcs.len() * 4);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&0u32.to_le_bytes()); // header length, patched below
    h.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    for n in [data_len, key.chunk_size, key.index] {
        h.extend_from_slice(&n.to_le_bytes());
    }
    for field in [&*o.origin_id, &*o.bucket, &*o.key, &*o.etag] {
        h.extend_from_slice(&(field.len() as u32).to_le_bytes());
        h.extend_from_slice(field.as_bytes());
    }
    h.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    for c in &crcs {
        h.extend_from_slice(&c.to_le_bytes());
    }
    let total = (h.len() + 4) as u32;
    h[8..12].copy_from_slice(&total.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes and checks a header (magic, length, own CRC, sizes, CRC list); `bytes` must hold at
/// least the whole header. The error says what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Header, String> {
    let (len, body) = framed(bytes)?;
    let mut r = Reader(body);
    let block = r.u32()? as u64;
    // Fields in file order: a struct literal evaluates them in the order written.
    let mut h = Header {
        len,
        data_len: r.u64()?,
        chunk_size: r.u64()?,
        index: r.u64()?,
        origin_id: r.string("origin id")?,
        bucket: r.string("bucket")?,
        key: r.string("key")?,
        etag: r.string("etag")?,
        crcs: Vec::new(),
    };
    let n = r.u32()? as u64;
    check_sizes(&h, block, n)?;
    h.crcs = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
    if !r.0.is_empty() {
        return Err("trailing bytes in header".into());
    }
    Ok(h)
}

/// Checks magic, length and CRC; returns the header length and the bytes between the length
/// field and the CRC.
fn framed(bytes: &[u8]) -> Result<(u64, &[u8]), String> {
    let mut r = Reader(bytes);
    if r.take(8).map_err(|_| "shorter than a header")? != MAGIC {
        return Err("not an orcafs chunk file (bad magic)".into());
    }
    let len = r.u32()? as u64;
    if len < MIN_HEADER || len > bytes.len() as u64 {
        return Err(format!("implausible header length {len}"));
    }
    let (head, crc) = bytes[..len as usize].split_at(len as usize - 4);
    if crc != crc32c::crc32c(head).to_le_bytes().as_slice() {
        return Err("header checksum mismatch".into());
    }
    Ok((len, &head[12..]))
}

fn check_sizes(h: &Header, block: u64, n: u64) -> Result<(), String> {
    if block != BLOCK {
        return Err(format!("block size {block} in header, not {BLOCK}"));
    }
    if h.chunk_size == 0 {
        return Err("zero chunk size in header".into());
    }
    let (d, c) = (h.data_len, h.chunk_size);
    if d > c {
        return Err(format!("data length {d} exceeds the chunk size {c}"));
    }
    if n != d.div_ceil(BLOCK) {
        return Err(format!(
            "{n} block checksums for {d} bytes of {BLOCK}-byte blocks"
        ));
    }
    Ok(())
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

/// The first bytes of a chunk file `file_len` long, holding its whole header if it has one: a
/// read sized for typical headers, and a second when the header says it is longer.
pub fn read_header(file: &File, file_len: u64) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; FIRST_READ.min(file_len) as usize];
    file.read_exact_at(&mut head, 0)?;
    let want = head.get(8..12).and_then(|b| b.try_into().ok());
    let want = want.map_or(0, u32::from_le_bytes) as u64;
    if want > head.len() as u64 && want <= MAX_HEADER.min(file_len) {
        head.resize(want as usize, 0);
        file.read_exact_at(&mut head, 0)?;
    }
    Ok(head)
}

/// CRC32C of each [`BLOCK`] of the data, computed across piece boundaries.
fn block_crcs(pieces: &[Bytes], data_len: u64) -> Vec<u32> {
    let mut crcs = Vec::with_capacity(data_len.div_ceil(BLOCK) as usize);
    let (mut crc, mut in_block) = (0u32, 0u64);
    for piece in pieces {
        let mut rest: &[u8] = piece;
        while !rest.is_empty() {
            let take = ((BLOCK - in_block) as usize).min(rest.len());
            crc = crc32c::crc32c_append(crc, &rest[..take]);
            in_block += take as u64;
            rest = &rest[take..];
            if in_block == BLOCK {
                crcs.push(crc);
                (crc, in_block) = (0, 0);
            }
        }
    }
    if in_block > 0 {
        crcs.push(crc);
    }
    crcs
}

/// A chunk key for tests of the cache's files.
#[cfg(test)]
pub(super) fn test_key(etag: &str, size: u64, chunk_size: u64, index: u64) -> ChunkKey {
    let object = ObjectVersion {
        origin_id: "http://o".into(),
        bucket: "bkt".into(),
        key: "dir/file".into(),
        etag: etag.into(),
        size,
    };
    ChunkKey::new(Arc::new(object), chunk_size, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(n: usize) -> Vec<Bytes> {
        let d: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        vec![
            Bytes::copy_from_slice(&d[..100]),
            Bytes::copy_from_slice(&d[100..]),
        ]
    }

    #[test]
    fn bytes_and_paths_are_those_existing_caches_hold() {
        let object = ObjectVersion {
            origin_id: "o".into(),
            bucket: "b".into(),
            key: "k".into(),
            etag: "e".into(),
            size: BLOCK + 3,
        };
        let k = ChunkKey::new(Arc::new(object), 1 << 20, 0);
        // Written by the disk store before this module existed.
        let golden = "4f52434143484b314c00000000000100030001000000000000001000000000000000000000\
                      000000010000006f0100000062010000006b010000006502000000defcaa0dc81c9581ecd0366b";
        assert_eq!(hex::encode(encode(&k, &pieces(BLOCK as usize + 3))), golden);
        let hex = "1cb4ea6f63251d32537e667d96046eb5599eb636ce44f1d172f0585871a05490";
        let path = chunk_path(Path::new("/r"), &k.id());
        assert_eq!(path, Path::new("/r/chunks/1c/b4").join(hex));
        assert_eq!(chunk_id_at(Path::new("/r"), &path), Some(k.id()));
        assert_eq!(
            chunk_id_at(Path::new("/r"), &Path::new("/r/chunks").join(hex)),
            None
        );
    }

    #[test]
    fn round_trip_names_the_key_and_checks_blocks() {
        let k = test_key("e", 3 * BLOCK + 5, 4 * BLOCK, 0);
        let p = pieces(3 * BLOCK as usize + 5);
        let bytes = encode(&k, &p);
        let h = decode(&bytes).unwrap();
        assert_eq!(
            (h.len, h.data_len, h.crcs.len()),
            (bytes.len() as u64, k.len(), 4)
        );
        assert!(h.is_of(&k) && !h.is_of(&test_key("other", 3 * BLOCK + 5, 4 * BLOCK, 0)));
        assert_eq!(h.chunk_key().id(), k.id());
        let data: Vec<u8> = p.concat();
        assert_eq!(h.bad_block(0, &data), None);
        assert_eq!(h.bad_block(3, &data[3 * BLOCK as usize..]), None);
        let mut bad = data[BLOCK as usize..].to_vec();
        bad[BLOCK as usize + 7] ^= 1;
        assert_eq!(h.bad_block(1, &bad), Some(2));
        assert_eq!(h.bad_block(4, &data[..1]), Some(4), "past the CRC list");
    }

    #[test]
    fn temp_names_are_recognised_exactly() {
        let id = test_key("e", 1, BLOCK, 0).id();
        let root = Path::new("/r");
        let p = temp_path(root, &id);
        assert_eq!(p.parent(), Some(tmp_dir(root).as_path()));
        assert!(is_temp_name(p.file_name().unwrap()));
        let hex = id.to_hex();
        for foreign in [
            "foreign".to_string(),
            hex.clone(),
            format!("{hex}.0123456789abcde"),
            format!("{hex}.0123456789abcdeF"),
            format!("{}.0123456789abcdef", hex.to_uppercase()),
            format!("{}.0123456789abcdef", &hex[2..]),
            format!("{hex}.0123456789abcdef.bak"),
        ] {
            assert!(!is_temp_name(OsStr::new(&foreign)), "{foreign}");
        }
        assert!(is_fan_out_name(OsStr::new("0f")) && !is_fan_out_name(OsStr::new("0g")));
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
        fs::write(marker_path(&d("marked")), "orcafs-cache 2\n").unwrap();
        assert_eq!(
            kind("marked"),
            DirKind::OtherMarker("orcafs-cache 2".into())
        );
    }

    #[test]
    fn corrupt_truncated_or_foreign_headers_are_refused() {
        let k = test_key("e", 2 * BLOCK, BLOCK, 1);
        let good = encode(&k, &pieces(BLOCK as usize));
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        assert!(decode(&flipped).unwrap_err().contains("checksum"));
        assert!(decode(&good[..good.len() - 1]).is_err(), "truncated");
        assert!(decode(b"ORCACHK1").is_err() && decode(b"garbage").is_err());
        let mut v2 = good.clone();
        v2[7] = b'2';
        assert!(decode(&v2).unwrap_err().contains("magic"));
        let foreign = decode(&encode(&test_key("x", 2 * BLOCK, BLOCK, 1), &pieces(200))).unwrap();
        assert!(!foreign.is_of(&k), "another chunk's header");
    }
}
