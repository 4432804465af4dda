//! admin: operator commands on a local cache directory (`orcafs cache stats|verify|evict|clear`).
//!
//! These work on the files alone, without a running mount, so they read the chunk file format
//! themselves (documented in [`super::disk`]): magic `ORCACHK1`, u32 header length, u32 block
//! size, u64 data length, u64 chunk size, u64 index, four u32-length-prefixed strings (origin id,
//! bucket, key, ETag), u32 block count, one CRC32C per block, u32 CRC32C of the header; then the
//! data. Every check the mount applies on a read is applied here to the whole file, and the
//! mount's own header check (`disk::decode_header`) has the last word, so `verify` never
//! passes a file the mount would refuse.
//!
//! Layout: `<dir>/chunks/<xx>/<yy>/<chunk id hex>` and `<dir>/tmp/` for writes in progress. A
//! file's mtime is its chunk's last use, so `evict` removes the oldest mtimes first, the order a
//! mount evicts in.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::chunk::{ChunkKey, ObjectVersion};

const MAGIC: &[u8; 8] = b"ORCACHK1";
/// magic + header length + block size + data length + chunk size + index + 4 string lengths +
/// block count + header CRC.
const MIN_HEADER: u64 = 8 + 4 + 4 + 8 + 8 + 8 + 4 * 4 + 4 + 4;
const MAX_HEADER: u64 = 16 << 20;
const FIRST_READ: u64 = 4096;

/// What a cache directory holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Files named and placed like chunk files (not checked; see [`verify`]).
    pub chunks: u64,
    /// Their size on disk, headers included (what `cache_max_size` bounds).
    pub bytes: u64,
    /// Writes in progress, or left by a crash (swept when a mount starts).
    pub temp_files: u64,
    pub temp_bytes: u64,
    /// Files under `chunks/` that are not chunk files (removed when a mount starts).
    pub other_files: u64,
    /// Least and most recent last use among the chunks.
    pub oldest_use: Option<SystemTime>,
    pub newest_use: Option<SystemTime>,
}

/// One file `verify` found bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFile {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// Chunk files checked in full.
    pub checked: u64,
    pub good: u64,
    pub good_bytes: u64,
    pub bad: Vec<BadFile>,
    /// Bad files deleted (with `repair`).
    pub removed: u64,
    pub temp_files: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EvictReport {
    pub removed: u64,
    pub freed_bytes: u64,
    pub remaining_chunks: u64,
    pub remaining_bytes: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClearReport {
    pub chunks_removed: u64,
    pub bytes_freed: u64,
    pub temp_removed: u64,
    pub other_removed: u64,
}

/// Refuses directories that are not orcafs caches, so `clear` cannot empty a random directory.
pub fn check_cache_dir(root: &Path) -> io::Result<()> {
    let chunks = root.join("chunks");
    match fs::metadata(&chunks) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(not_a_cache(root)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_a_cache(root)),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read {}: {e}", chunks.display()),
        )),
    }
}

fn not_a_cache(root: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} is not an orcafs cache directory (it has no chunks/ subdirectory)",
            root.display()
        ),
    )
}

/// A file found under `chunks/`.
struct Entry {
    path: PathBuf,
    size: u64,
    mtime: SystemTime,
    /// Named and placed as the chunk file of some chunk id.
    is_chunk: bool,
}

fn list_dir(dir: &Path) -> Vec<fs::DirEntry> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}

/// Every file under `<root>/chunks`, at any depth.
fn walk_chunks(root: &Path) -> Vec<Entry> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<Entry>) {
        for e in list_dir(dir) {
            let path = e.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(&path, depth + 1, out);
                continue;
            }
            let is_chunk = depth == 2 && meta.is_file() && chunk_name_fits(&path);
            out.push(Entry {
                path,
                size: meta.len(),
                mtime: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                is_chunk,
            });
        }
    }
    let mut out = Vec::new();
    walk(&root.join("chunks"), 0, &mut out);
    out
}

/// `chunks/<xx>/<yy>/<64 hex digits starting xxyy>`.
fn chunk_name_fits(path: &Path) -> bool {
    let name = |p: Option<&Path>| {
        p.and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    };
    let (Some(file), Some(l2), Some(l1)) = (
        name(Some(path)),
        name(path.parent()),
        name(path.parent().and_then(Path::parent)),
    ) else {
        return false;
    };
    file.len() == 64
        && file
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && file[0..2] == l1
        && file[2..4] == l2
}

fn temp_files(root: &Path) -> Vec<(PathBuf, u64)> {
    list_dir(&root.join("tmp"))
        .into_iter()
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.path(), len)
        })
        .collect()
}

/// Counts what the cache directory holds; reads no chunk contents.
pub fn stats(root: &Path) -> io::Result<Stats> {
    check_cache_dir(root)?;
    let mut s = Stats::default();
    for e in walk_chunks(root) {
        if !e.is_chunk {
            s.other_files += 1;
            continue;
        }
        s.chunks += 1;
        s.bytes += e.size;
        s.oldest_use = Some(s.oldest_use.map_or(e.mtime, |t| t.min(e.mtime)));
        s.newest_use = Some(s.newest_use.map_or(e.mtime, |t| t.max(e.mtime)));
    }
    for (_, len) in temp_files(root) {
        s.temp_files += 1;
        s.temp_bytes += len;
    }
    Ok(s)
}

/// Reads every chunk file in full and checks header, placement, length and every block's CRC.
/// Files under `chunks/` that are not chunk files count as bad. With `repair`, bad files are
/// deleted (a mount would refetch them anyway; it never serves them).
pub fn verify(root: &Path, repair: bool) -> io::Result<VerifyReport> {
    check_cache_dir(root)?;
    let mut r = VerifyReport {
        temp_files: temp_files(root).len() as u64,
        ..Default::default()
    };
    for e in walk_chunks(root) {
        let result = if e.is_chunk {
            r.checked += 1;
            verify_file(&e.path)
        } else {
            Err("not a chunk file (foreign name or place)".to_string())
        };
        match result {
            Ok(()) => {
                r.good += 1;
                r.good_bytes += e.size;
            }
            // Evicted by a running mount while we looked: not a bad file.
            Err(_) if fs::symlink_metadata(&e.path).is_err() => {
                r.checked -= u64::from(e.is_chunk);
            }
            Err(reason) => {
                if repair && fs::remove_file(&e.path).is_ok() {
                    r.removed += 1;
                }
                r.bad.push(BadFile {
                    path: e.path,
                    reason,
                });
            }
        }
    }
    Ok(r)
}

/// Deletes chunks, least recently used first, until the chunks total at most `max_bytes`.
pub fn evict(root: &Path, max_bytes: u64) -> io::Result<EvictReport> {
    check_cache_dir(root)?;
    let mut chunks: Vec<Entry> = walk_chunks(root)
        .into_iter()
        .filter(|e| e.is_chunk)
        .collect();
    chunks.sort_by_key(|e| e.mtime);
    let mut r = EvictReport {
        remaining_chunks: chunks.len() as u64,
        remaining_bytes: chunks.iter().map(|e| e.size).sum(),
        ..Default::default()
    };
    for e in &chunks {
        if r.remaining_bytes <= max_bytes {
            break;
        }
        match fs::remove_file(&e.path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("cannot remove {}: {err}", e.path.display()),
                ))
            }
        }
        r.removed += 1;
        r.freed_bytes += e.size;
        r.remaining_chunks -= 1;
        r.remaining_bytes -= e.size;
    }
    prune_empty_dirs(root);
    Ok(r)
}

/// Deletes every chunk file, every temp file and anything else under `chunks/` and `tmp/`.
/// The directory itself (and files beside them, such as a log) stay.
pub fn clear(root: &Path) -> io::Result<ClearReport> {
    check_cache_dir(root)?;
    let mut r = ClearReport::default();
    for e in walk_chunks(root) {
        fs::remove_file(&e.path).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot remove {}: {err}", e.path.display()),
            )
        })?;
        if e.is_chunk {
            r.chunks_removed += 1;
            r.bytes_freed += e.size;
        } else {
            r.other_removed += 1;
        }
    }
    for (path, _) in temp_files(root) {
        if fs::remove_file(&path).is_ok() {
            r.temp_removed += 1;
        }
    }
    prune_empty_dirs(root);
    Ok(r)
}

/// Removes empty `chunks/<xx>/<yy>` and `chunks/<xx>` directories (a mount recreates them).
fn prune_empty_dirs(root: &Path) {
    for l1 in list_dir(&root.join("chunks")) {
        for l2 in list_dir(&l1.path()) {
            let _ = fs::remove_dir(l2.path()); // fails, harmlessly, unless empty
        }
        let _ = fs::remove_dir(l1.path());
    }
}

/// A chunk file header, parsed without knowing which chunk to expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHeader {
    pub header_len: u64,
    pub block: u64,
    pub data_len: u64,
    pub chunk_size: u64,
    pub index: u64,
    pub origin_id: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub crcs: Vec<u32>,
}

impl ParsedHeader {
    /// The chunk key this header names. The object size is not stored; a size ending with this
    /// chunk gives the same id and the same chunk length.
    pub fn chunk_key(&self) -> ChunkKey {
        ChunkKey::new(
            Arc::new(ObjectVersion {
                origin_id: self.origin_id.as_str().into(),
                bucket: self.bucket.as_str().into(),
                key: self.key.as_str().into(),
                etag: self.etag.as_str().into(),
                size: self.index * self.chunk_size + self.data_len,
            }),
            self.chunk_size,
            self.index,
        )
    }
}

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
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} in header is not UTF-8"))
    }
}

/// Parses and checks a header (magic, length, own CRC, block table size); `bytes` must hold at
/// least the whole header.
pub fn parse_header(bytes: &[u8]) -> Result<ParsedHeader, String> {
    let mut r = Reader(bytes);
    if r.take(8).map_err(|_| "shorter than a header")? != MAGIC {
        return Err("not an orcafs chunk file (bad magic)".into());
    }
    let header_len = r.u32()? as u64;
    if header_len < MIN_HEADER || header_len > bytes.len() as u64 {
        return Err(format!("implausible header length {header_len}"));
    }
    let hl = header_len as usize;
    let stored = u32::from_le_bytes(bytes[hl - 4..hl].try_into().unwrap_or_default());
    if crc32c::crc32c(&bytes[..hl - 4]) != stored {
        return Err("header checksum mismatch".into());
    }
    let mut r = Reader(&bytes[12..hl - 4]);
    let block = r.u32()? as u64;
    let data_len = r.u64()?;
    let chunk_size = r.u64()?;
    let index = r.u64()?;
    let origin_id = r.string("origin id")?;
    let bucket = r.string("bucket")?;
    let key = r.string("key")?;
    let etag = r.string("etag")?;
    let n = r.u32()? as u64;
    if block == 0 || chunk_size == 0 {
        return Err("zero block or chunk size in header".into());
    }
    if data_len > chunk_size {
        return Err(format!(
            "data length {data_len} exceeds the chunk size {chunk_size}"
        ));
    }
    if n != data_len.div_ceil(block) {
        return Err(format!(
            "{n} block checksums for {data_len} bytes of {block}-byte blocks"
        ));
    }
    let crcs = (0..n).map(|_| r.u32()).collect::<Result<Vec<u32>, _>>()?;
    if !r.0.is_empty() {
        return Err("trailing bytes in header".into());
    }
    Ok(ParsedHeader {
        header_len,
        block,
        data_len,
        chunk_size,
        index,
        origin_id,
        bucket,
        key,
        etag,
        crcs,
    })
}

/// Full check of one chunk file; the error says what is wrong.
pub fn verify_file(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    let mut head = vec![0u8; FIRST_READ.min(file_len) as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| format!("cannot read: {e}"))?;
    if head.len() >= 12 {
        let want = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default()) as u64;
        if want > head.len() as u64 && want <= MAX_HEADER.min(file_len) {
            head.resize(want as usize, 0);
            file.read_exact_at(&mut head, 0)
                .map_err(|e| format!("cannot read: {e}"))?;
        }
    }
    let h = parse_header(&head)?;
    if file_len != h.header_len + h.data_len {
        return Err(format!(
            "{} bytes long, the header says {} (truncated or extended)",
            file_len,
            h.header_len + h.data_len
        ));
    }
    let key = h.chunk_key();
    let id = key.id().to_hex();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name != id {
        return Err(format!(
            "holds chunk {} of {}/{} but is stored as {name} (foreign file)",
            h.index, h.bucket, h.key
        ));
    }
    if super::disk::decode_header(&head[..h.header_len as usize], &key).is_none() {
        return Err("header refused by the mount's own check (format or block size)".into());
    }
    let mut buf = vec![0u8; h.block as usize];
    for (i, want) in h.crcs.iter().enumerate() {
        let start = i as u64 * h.block;
        let len = h.block.min(h.data_len - start) as usize;
        file.read_exact_at(&mut buf[..len], h.header_len + start)
            .map_err(|e| format!("cannot read block {i}: {e}"))?;
        if crc32c::crc32c(&buf[..len]) != *want {
            return Err(format!("block {i} (bytes {start}..) checksum mismatch"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cachestore::DiskStore;
    use bytes::Bytes;

    fn key(etag: &str, size: u64, chunk: u64, index: u64) -> ChunkKey {
        ChunkKey::new(
            Arc::new(ObjectVersion {
                origin_id: "http://o".into(),
                bucket: "bkt".into(),
                key: "dir/file".into(),
                etag: etag.into(),
                size,
            }),
            chunk,
            index,
        )
    }

    fn data(n: usize, seed: u8) -> Bytes {
        Bytes::from(
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect::<Vec<_>>(),
        )
    }

    /// A cache written by the real disk store: a full chunk and a short tail chunk.
    fn cache(dir: &Path) -> (DiskStore, Vec<ChunkKey>) {
        let (s, _) = DiskStore::open(dir, 1 << 30, Arc::default()).unwrap();
        let chunk = 256 << 10;
        let size = chunk + 1000;
        let keys = vec![key("e1", size, chunk, 0), key("e1", size, chunk, 1)];
        s.write(&keys[0], &[data(chunk as usize, 1)]).unwrap();
        s.write(&keys[1], &[data(500, 2), data(500, 3)]).unwrap();
        (s, keys)
    }

    fn chunk_path(root: &Path, k: &ChunkKey) -> PathBuf {
        let hex = k.id().to_hex();
        root.join("chunks")
            .join(&hex[0..2])
            .join(&hex[2..4])
            .join(hex)
    }

    #[test]
    fn layout_and_header_agree_with_the_disk_store() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, keys) = cache(dir.path());
        for k in &keys {
            let p = chunk_path(dir.path(), k);
            assert!(p.exists(), "disk store path layout changed");
            verify_file(&p).unwrap();
            let bytes = fs::read(&p).unwrap();
            let h = parse_header(&bytes).unwrap();
            assert_eq!(h.chunk_key().id(), k.id());
            assert_eq!(h.data_len, k.len());
        }
        let st = stats(dir.path()).unwrap();
        assert_eq!(st.chunks, 2);
        assert_eq!(
            st.bytes,
            keys.iter()
                .map(|k| fs::metadata(chunk_path(dir.path(), k)).unwrap().len())
                .sum::<u64>()
        );
        let v = verify(dir.path(), false).unwrap();
        assert_eq!((v.checked, v.good, v.bad.len()), (2, 2, 0));
    }

    #[test]
    fn verify_finds_flipped_truncated_foreign_and_stray_files() {
        let dir = tempfile::tempdir().unwrap();
        let (s, keys) = cache(dir.path());
        let p0 = chunk_path(dir.path(), &keys[0]);
        let p1 = chunk_path(dir.path(), &keys[1]);
        // Flip one byte in the last block of chunk 0.
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p0)
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, len - 10).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], len - 10).unwrap();
        // Truncate chunk 1.
        let f = fs::OpenOptions::new().write(true).open(&p1).unwrap();
        f.set_len(f.metadata().unwrap().len() - 1).unwrap();
        // A foreign chunk copied to a third chunk's path.
        let other = key("e2", 100, 256 << 10, 0);
        s.write(&other, &[data(100, 4)]).unwrap();
        let third = chunk_path(dir.path(), &key("e3", 100, 256 << 10, 0));
        fs::create_dir_all(third.parent().unwrap()).unwrap();
        fs::copy(chunk_path(dir.path(), &other), &third).unwrap();
        // A stray file.
        fs::write(dir.path().join("chunks/stray"), b"x").unwrap();

        let v = verify(dir.path(), false).unwrap();
        assert_eq!(v.good, 1, "{:?}", v.bad);
        assert_eq!(v.bad.len(), 4, "{:?}", v.bad);
        let reason = |p: &Path| {
            v.bad
                .iter()
                .find(|b| b.path == p)
                .map(|b| b.reason.clone())
                .unwrap()
        };
        assert!(reason(&p0).contains("checksum"), "{}", reason(&p0));
        assert!(reason(&p1).contains("truncated"), "{}", reason(&p1));
        assert!(reason(&third).contains("foreign"), "{}", reason(&third));
        assert!(p0.exists(), "verify without repair deletes nothing");

        let v = verify(dir.path(), true).unwrap();
        assert_eq!(v.removed, 4);
        let v = verify(dir.path(), false).unwrap();
        assert_eq!((v.good, v.bad.len()), (1, 0));
    }

    #[test]
    fn evict_removes_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let (s, keys) = cache(dir.path());
        let third = key("e9", 1000, 256 << 10, 0);
        s.write(&third, &[data(1000, 9)]).unwrap();
        let now = SystemTime::now();
        let age = |k: &ChunkKey, secs: u64| {
            File::options()
                .write(true)
                .open(chunk_path(dir.path(), k))
                .unwrap()
                .set_modified(now - std::time::Duration::from_secs(secs))
                .unwrap();
        };
        age(&keys[0], 300); // oldest use
        age(&keys[1], 10);
        age(&third, 200);
        let sizes: Vec<u64> = [&keys[0], &keys[1], &third]
            .iter()
            .map(|k| fs::metadata(chunk_path(dir.path(), k)).unwrap().len())
            .collect();
        let r = evict(dir.path(), sizes[1] + sizes[2]).unwrap();
        assert_eq!(r.removed, 1);
        assert!(!chunk_path(dir.path(), &keys[0]).exists());
        let r = evict(dir.path(), sizes[1]).unwrap();
        assert_eq!((r.removed, r.remaining_chunks), (1, 1));
        assert!(chunk_path(dir.path(), &keys[1]).exists());
        assert_eq!(evict(dir.path(), 0).unwrap().remaining_bytes, 0);
    }

    #[test]
    fn clear_empties_chunks_and_tmp_but_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, _) = cache(dir.path());
        fs::write(dir.path().join("tmp/half"), b"half").unwrap();
        fs::write(dir.path().join("orcafs.log"), b"log").unwrap();
        let r = clear(dir.path()).unwrap();
        assert_eq!((r.chunks_removed, r.temp_removed), (2, 1));
        assert_eq!(stats(dir.path()).unwrap(), Stats::default());
        assert!(dir.path().join("orcafs.log").exists());
        assert!(dir.path().join("chunks").is_dir() && dir.path().join("tmp").is_dir());
    }

    #[test]
    fn refuses_a_directory_that_is_not_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious"), b"x").unwrap();
        let err = clear(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not an orcafs cache"), "{err}");
        assert!(dir.path().join("precious").exists());
    }
}
