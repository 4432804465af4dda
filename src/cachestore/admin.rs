//! admin: operator commands on a local cache directory (`orcafs cache stats|verify|evict|clear`).
//!
//! These work on the files alone, without a running mount, and read them through the same
//! [`super::chunkfile`] code the mount does: every check the mount applies on a read is applied
//! here to the whole file, so `verify` never passes a file the mount would refuse. A file's
//! mtime is its chunk's last use, so `evict` removes the oldest mtimes first, the order a mount
//! evicts in.
//!
//! Like the mount, they find the cache where [`chunkfile::find_root`] says (the directory given,
//! or its `orcafs/` subdirectory) and delete only orcafs's own files: chunk files at chunk
//! paths and temp files by name. Anything else there is counted and left in place.

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
    /// Files under `chunks/` that are not chunk files: not orcafs's, so never deleted by it.
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
    /// Bad chunk files deleted (with `repair`); files that are not chunk files are never deleted.
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
    /// Files under `chunks/` that are not chunk files, left in place.
    pub other_kept: u64,
}

/// The cache `--cache-dir dir` holds (`dir` or `dir/orcafs`); refuses a directory that holds
/// none, so no command empties a random directory.
pub fn check_cache_dir(dir: &Path) -> io::Result<PathBuf> {
    let found = chunkfile::find_root(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", dir.display())))?;
    found.ok_or_else(|| {
        let text = format!(
            "{} is not an orcafs cache directory (it has no {} marker, no chunks/ subdirectory, \
             and no {}/ subdirectory holding a cache)",
            dir.display(),
            chunkfile::MARKER,
            chunkfile::SUBDIR
        );
        io::Error::new(io::ErrorKind::NotFound, text)
    })
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

/// orcafs's temp files (by name) and their sizes.
fn temp_files(root: &Path) -> Vec<(PathBuf, u64)> {
    chunkfile::temp_files(root)
        .into_iter()
        .map(|p| {
            let len = fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, len)
        })
        .collect()
}

/// Counts what the cache directory holds; reads no chunk contents.
pub fn stats(dir: &Path) -> io::Result<Stats> {
    let root = &check_cache_dir(dir)?;
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
/// Files under `chunks/` that are not chunk files count as bad. With `repair`, bad chunk files
/// are deleted (a mount would refetch them anyway; it never serves them); the others are not
/// orcafs's and stay for the operator to look at.
pub fn verify(dir: &Path, repair: bool) -> io::Result<VerifyReport> {
    let root = &check_cache_dir(dir)?;
    let mut r = VerifyReport {
        temp_files: temp_files(root).len() as u64,
        ..Default::default()
    };
    for e in walk_chunks(root) {
        let result = if e.is_chunk {
            r.checked += 1;
            verify_file(&e.path)
        } else {
            Err("not a chunk file (foreign name or place); not orcafs's, left in place".to_string())
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
                if repair && e.is_chunk && fs::remove_file(&e.path).is_ok() {
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
pub fn evict(dir: &Path, max_bytes: u64) -> io::Result<EvictReport> {
    let root = &check_cache_dir(dir)?;
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

/// Deletes every chunk file and every temp file. The directory, its marker and log, and any
/// file orcafs did not write stay.
pub fn clear(dir: &Path) -> io::Result<ClearReport> {
    let root = &check_cache_dir(dir)?;
    let mut r = ClearReport::default();
    for e in walk_chunks(root) {
        if !e.is_chunk {
            r.other_kept += 1;
            continue;
        }
        fs::remove_file(&e.path).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot remove {}: {err}", e.path.display()),
            )
        })?;
        r.chunks_removed += 1;
        r.bytes_freed += e.size;
    }
    for (path, _) in temp_files(root) {
        if fs::remove_file(&path).is_ok() {
            r.temp_removed += 1;
        }
    }
    prune_empty_dirs(root);
    Ok(r)
}

/// Removes empty `chunks/<xx>/<yy>` and `chunks/<xx>` directories (a mount recreates them);
/// only those named as fan-out directories, which orcafs made.
fn prune_empty_dirs(root: &Path) {
    let fan_out = |p: &PathBuf| p.file_name().is_some_and(chunkfile::is_fan_out_name);
    for l1 in read_dir_paths(&chunkfile::chunks_dir(root))
        .into_iter()
        .filter(fan_out)
    {
        for l2 in read_dir_paths(&l1).into_iter().filter(fan_out) {
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
        // A stray file: not orcafs's.
        let stray = dir.path().join("chunks/stray");
        fs::write(&stray, b"x").unwrap();

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

        assert!(
            reason(&stray).contains("left in place"),
            "{}",
            reason(&stray)
        );

        let v = verify(dir.path(), true).unwrap();
        assert_eq!(v.removed, 3, "the bad chunk files, not the stray");
        let v = verify(dir.path(), false).unwrap();
        assert_eq!((v.good, v.bad.len()), (1, 1));
        assert_eq!(fs::read(&stray).unwrap(), b"x");
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
    fn clear_removes_only_orcafs_files() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, keys) = cache(dir.path());
        fs::write(chunkfile::temp_path(dir.path(), &keys[0].id()), b"half").unwrap();
        fs::write(dir.path().join("orcafs.log"), b"log").unwrap();
        let foreign = [
            dir.path().join("tmp/foreign"),
            dir.path().join("chunks/stray"),
            dir.path().join("chunks/notes"),
        ];
        fs::create_dir(&foreign[2]).unwrap();
        let foreign = [foreign[0].clone(), foreign[1].clone(), foreign[2].join("n")];
        for p in &foreign {
            fs::write(p, b"mine").unwrap();
        }
        let r = clear(dir.path()).unwrap();
        assert_eq!((r.chunks_removed, r.temp_removed, r.other_kept), (2, 1, 2));
        let st = stats(dir.path()).unwrap();
        assert_eq!((st.chunks, st.temp_files, st.other_files), (0, 0, 2));
        assert!(dir.path().join("orcafs.log").exists());
        assert!(chunkfile::marker_path(dir.path()).exists());
        assert!(dir.path().join("chunks").is_dir() && dir.path().join("tmp").is_dir());
        for p in &foreign {
            assert_eq!(fs::read(p).unwrap(), b"mine", "{} kept", p.display());
        }
    }

    #[test]
    fn commands_find_the_cache_in_the_orcafs_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious"), b"p").unwrap();
        let (s, keys) = cache(dir.path());
        assert_eq!(s.root(), dir.path().join(chunkfile::SUBDIR));
        assert_eq!(stats(dir.path()).unwrap().chunks, 2);
        assert_eq!(verify(dir.path(), false).unwrap().good, 2);
        assert_eq!(evict(dir.path(), 0).unwrap().removed, 2);
        s.write(&keys[1], &[data(1000, 2)]).unwrap();
        assert_eq!(clear(dir.path()).unwrap().chunks_removed, 1);
        assert_eq!(fs::read(dir.path().join("precious")).unwrap(), b"p");
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
