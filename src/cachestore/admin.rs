//! admin: operator commands on a local cache directory (`orcafs cache stats|verify|evict|clear`).
//!
//! These work on the files alone, without a running mount, and read them through the same
//! [`super::chunkfile`] code the mount does: every check the mount applies on a read is applied
//! here to the whole file, so `verify` never passes a file the mount would refuse. A file's
//! mtime is its chunk's last use, so `evict` removes the oldest mtimes first, the order a mount
//! evicts in.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::chunkfile::{self, read_dir_paths, BLOCK};

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
    let chunks = chunkfile::chunks_dir(root);
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

/// Every file under `<root>/chunks`, at any depth.
fn walk_chunks(root: &Path) -> Vec<Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) {
        for path in read_dir_paths(dir) {
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(root, &path, out);
                continue;
            }
            out.push(Entry {
                is_chunk: meta.is_file() && chunkfile::chunk_id_at(root, &path).is_some(),
                size: meta.len(),
                mtime: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                path,
            });
        }
    }
    let mut out = Vec::new();
    walk(root, &chunkfile::chunks_dir(root), &mut out);
    out
}

fn temp_files(root: &Path) -> Vec<(PathBuf, u64)> {
    read_dir_paths(&chunkfile::tmp_dir(root))
        .into_iter()
        .map(|p| {
            let len = fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, len)
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
    for l1 in read_dir_paths(&chunkfile::chunks_dir(root)) {
        for l2 in read_dir_paths(&l1) {
            let _ = fs::remove_dir(l2); // fails, harmlessly, unless empty
        }
        let _ = fs::remove_dir(l1);
    }
}

/// Full check of one chunk file; the error says what is wrong.
pub fn verify_file(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    let head =
        chunkfile::read_header(&file, meta.len()).map_err(|e| format!("cannot read: {e}"))?;
    let h = chunkfile::decode(&head)?;
    if meta.len() != h.file_len() {
        let (is, says) = (meta.len(), h.file_len());
        return Err(format!(
            "{is} bytes long, the header says {says} (truncated or extended)"
        ));
    }
    let key = h.chunk_key();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name != key.id().to_hex() {
        return Err(format!(
            "holds chunk {} of {}/{} but is stored as {name} (foreign file)",
            h.index, h.bucket, h.key
        ));
    }
    // Holds by construction today; kept so a check the mount gains is one verify applies too.
    if !h.is_of(&key) {
        return Err("header refused by the mount's own check".into());
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..h.crcs.len() as u64 {
        let start = i * BLOCK;
        let len = BLOCK.min(h.data_len - start) as usize;
        file.read_exact_at(&mut buf[..len], h.len + start)
            .map_err(|e| format!("cannot read block {i}: {e}"))?;
        if h.bad_block(i, &buf[..len]).is_some() {
            return Err(format!("block {i} (bytes {start}..) checksum mismatch"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cachestore::chunkfile::test_key as key;
    use crate::cachestore::DiskStore;
    use crate::chunk::ChunkKey;
    use bytes::Bytes;
    use std::sync::Arc;

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
        chunkfile::chunk_path(root, &k.id())
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
            let h = chunkfile::decode(&bytes).unwrap();
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
