//! admin: operator commands on a local cache directory (`orcafs cache stats|verify|evict|clear`).
//!
//! These work on the files alone, without a running mount, and read them through the same
//! [`super::layout`] code the mount does: every check the mount applies on a read (map header,
//! placement, data length, each block's CRC) is applied here to every block held, so `verify`
//! never passes a block the mount would refuse. A map's mtime is its object's last use, so
//! `evict` removes the objects with the oldest mtimes first, the order a mount evicts in.
//!
//! Like the mount, they find the cache where [`layout::find_root`] says (the directory given,
//! or its `orcafs/` subdirectory) and delete only orcafs's own files: object data and map files
//! at their paths and temp files by name. Anything else there is counted and left in place.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::layout::{self, MapHeader, Role};
use crate::chunk::VersionId;

/// What a cache directory holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Object versions with at least one block held (maps not checked; see [`verify`]).
    pub objects: u64,
    /// Chunks with at least one block held, as the maps say.
    pub chunks: u64,
    /// The bytes of the blocks held (what `cache_max_size` bounds).
    pub bytes: u64,
    /// Writes in progress, or left by a crash (swept when a mount starts).
    pub temp_files: u64,
    pub temp_bytes: u64,
    /// Files under `objects/` that are not orcafs's: never deleted by it.
    pub other_files: u64,
    /// Least and most recent last use among the objects.
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
    /// Chunks (with a block held) checked in full.
    pub checked: u64,
    pub good: u64,
    pub good_bytes: u64,
    /// One line per bad object (or foreign file), naming the bad chunks.
    pub bad: Vec<BadFile>,
    /// Bad objects repaired (with `repair`: bad blocks marked absent, or unusable files
    /// deleted); files that are not orcafs's are never deleted.
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
    /// Files under `objects/` that are not orcafs's, left in place.
    pub other_kept: u64,
}

/// The cache `--cache-dir dir` holds (`dir` or `dir/orcafs`); refuses a directory that holds
/// none, so no command empties a random directory.
/// The cache `--cache-dir dir` holds (`dir` or `dir/orcafs`); refuses a directory that holds
/// none, so no command empties a random directory.
pub fn check_cache_dir(dir: &Path) -> io::Result<PathBuf> {
    let found = layout::find_root(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", dir.display())))?;
    found.ok_or_else(|| {
        let text = format!(
            "{} is not an orcafs cache directory (it has no {} marker, no chunks/ subdirectory, \
             and no {}/ subdirectory holding a cache)",
            dir.display(),
            layout::MARKER,
            layout::SUBDIR
        );
        io::Error::new(io::ErrorKind::NotFound, text)
    })
}

/// One object version's files as found under `objects/`.
struct Object {
    v: VersionId,
    map: PathBuf,
    data: PathBuf,
    mtime: SystemTime,
}

/// What a walk of `objects/` found: objects (by their maps), and files that are not orcafs's.
struct Found {
    objects: Vec<Object>,
    others: Vec<PathBuf>,
}

fn walk(root: &Path) -> Found {
    let w = layout::walk_objects(root);
    let mut found = Found {
        objects: Vec::new(),
        others: Vec::new(),
    };
    found
        .others
        .extend((0..w.strays).map(|_| layout::objects_dir(root)));
    for path in w.files {
        let meta = fs::symlink_metadata(&path);
        match (layout::file_at(root, &path), meta) {
            (Some((v, Role::Map)), Ok(m)) if m.is_file() => found.objects.push(Object {
                v,
                data: layout::data_path(root, &v),
                mtime: m.modified().unwrap_or(std::time::UNIX_EPOCH),
                map: path,
            }),
            // A data file is counted with its map (or removed by the next mount when alone).
            (Some((_, Role::Data)), Ok(m)) if m.is_file() => {}
            _ => found.others.push(path),
        }
    }
    found
}

/// A map's header and entries, checked as the mount checks them; the error says what is wrong.
fn read_map(o: &Object) -> Result<(MapHeader, Vec<Option<u32>>), String> {
    let map = File::open(&o.map).map_err(|e| format!("cannot open: {e}"))?;
    let h = layout::read_header(&map).map_err(|e| format!("cannot read: {e}"))??;
    if !h.is_of(&o.v) {
        return Err(format!(
            "holds the map of {}/{} at another version's place (foreign file)",
            h.bucket, h.key
        ));
    }
    let len = map
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    if len != h.file_len() {
        return Err(format!(
            "map is {len} bytes long, its header says {}",
            h.file_len()
        ));
    }
    let entries = layout::read_entries(&map, &h).map_err(|e| format!("cannot read: {e}"))?;
    Ok((h, entries))
}

/// Chunks with a block held, and the bytes held.
fn held(h: &MapHeader, entries: &[Option<u32>]) -> (u64, u64) {
    let mut chunks = std::collections::BTreeSet::new();
    let mut bytes = 0;
    for (i, _) in entries.iter().enumerate().filter(|(_, e)| e.is_some()) {
        let start = i as u64 * h.block;
        chunks.insert(start / h.chunk_size);
        bytes += (h.size - start).min(h.block);
    }
    (chunks.len() as u64, bytes)
}

/// orcafs's temp files (by name) and their sizes.
fn temp_files(root: &Path) -> Vec<(PathBuf, u64)> {
    layout::temp_files(root)
        .into_iter()
        .map(|p| {
            let len = fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, len)
        })
        .collect()
}

/// Counts what the cache directory holds; reads the maps, not the data.
pub fn stats(dir: &Path) -> io::Result<Stats> {
    let root = &check_cache_dir(dir)?;
    let mut s = Stats::default();
    let found = walk(root);
    s.other_files = found.others.len() as u64;
    for o in &found.objects {
        let Ok((h, entries)) = read_map(o) else {
            s.other_files += 1;
            continue;
        };
        let (chunks, bytes) = held(&h, &entries);
        s.objects += 1;
        s.chunks += chunks;
        s.bytes += bytes;
        s.oldest_use = Some(s.oldest_use.map_or(o.mtime, |t| t.min(o.mtime)));
        s.newest_use = Some(s.newest_use.map_or(o.mtime, |t| t.max(o.mtime)));
    }
    for (_, len) in temp_files(root) {
        s.temp_files += 1;
        s.temp_bytes += len;
    }
    Ok(s)
}

/// Reads every block held in full and checks it against its map entry (and the map's header,
/// placement and length, and the data file's length). Files under `objects/` that are not
/// orcafs's count as bad. With `repair`, bad blocks are marked absent (a mount would refetch
/// them anyway; it never serves them), and unusable object files deleted; the others are not
/// orcafs's and stay for the operator to look at.
pub fn verify(dir: &Path, repair: bool) -> io::Result<VerifyReport> {
    let root = &check_cache_dir(dir)?;
    let mut r = VerifyReport {
        temp_files: temp_files(root).len() as u64,
        ..Default::default()
    };
    let found = walk(root);
    for path in found.others {
        r.bad.push(BadFile {
            path,
            reason: "not orcafs's (foreign name or place); left in place".into(),
        });
    }
    for o in &found.objects {
        let checked = match read_map(o) {
            Ok((h, entries)) => verify_object(o, &h, &entries, repair),
            // Evicted by a running mount while we looked: not a bad file.
            Err(_) if fs::symlink_metadata(&o.map).is_err() => continue,
            Err(reason) => Checked::Unusable(o.map.clone(), reason),
        };
        match checked {
            Checked::Good { chunks, bytes } => {
                r.checked += chunks;
                r.good += chunks;
                r.good_bytes += bytes;
            }
            Checked::BadBlocks {
                chunks,
                bad,
                bytes,
                repaired,
            } => {
                r.checked += chunks;
                r.good += chunks - bad.len() as u64;
                r.good_bytes += bytes;
                r.removed += u64::from(repaired);
                let list: Vec<String> = bad
                    .iter()
                    .map(|(c, b)| format!("{c} (block {b})"))
                    .collect();
                r.bad.push(BadFile {
                    path: o.data.clone(),
                    reason: format!("chunks failing their CRC: {}", list.join(", ")),
                });
            }
            Checked::Unusable(path, reason) => {
                if repair {
                    let gone = fs::remove_file(&o.map).is_ok();
                    let _ = fs::remove_file(&o.data);
                    r.removed += u64::from(gone);
                }
                r.bad.push(BadFile { path, reason });
            }
        }
    }
    Ok(r)
}

enum Checked {
    Good {
        chunks: u64,
        bytes: u64,
    },
    /// (chunk, first bad block) per bad chunk; `bytes` of good blocks.
    BadBlocks {
        chunks: u64,
        bad: Vec<(u64, u64)>,
        bytes: u64,
        repaired: bool,
    },
    /// The file at fault and why.
    Unusable(PathBuf, String),
}

fn verify_object(o: &Object, h: &MapHeader, entries: &[Option<u32>], repair: bool) -> Checked {
    let data = match File::open(&o.data) {
        Ok(f) => f,
        Err(e) => return Checked::Unusable(o.data.clone(), format!("cannot open: {e}")),
    };
    match data.metadata() {
        Ok(m) if m.len() == h.size => {}
        Ok(m) => {
            let why = format!(
                "{} bytes long, the object {} (truncated or extended)",
                m.len(),
                h.size
            );
            return Checked::Unusable(o.data.clone(), why);
        }
        Err(e) => return Checked::Unusable(o.data.clone(), format!("cannot stat: {e}")),
    }
    let (chunks, _) = held(h, entries);
    let mut bad: Vec<(u64, u64)> = Vec::new();
    let mut bad_blocks = Vec::new();
    let mut bytes = 0;
    let mut buf = vec![0u8; h.block as usize];
    for (i, crc) in entries.iter().enumerate() {
        let Some(crc) = crc else { continue };
        let start = i as u64 * h.block;
        let len = (h.size - start).min(h.block) as usize;
        let ok = data.read_exact_at(&mut buf[..len], start).is_ok()
            && crc32c::crc32c(&buf[..len]) == *crc;
        if ok {
            bytes += len as u64;
            continue;
        }
        bad_blocks.push(i as u64);
        let chunk = start / h.chunk_size;
        if bad.last().is_none_or(|(c, _)| *c != chunk) {
            bad.push((chunk, i as u64));
        }
    }
    if bad.is_empty() {
        return Checked::Good { chunks, bytes };
    }
    let repaired = repair && clear_blocks(&o.map, h, &bad_blocks).is_ok();
    Checked::BadBlocks {
        chunks,
        bad,
        bytes,
        repaired,
    }
}

/// Marks blocks absent in a map file.
fn clear_blocks(map: &Path, h: &MapHeader, blocks: &[u64]) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(map)?;
    for b in blocks {
        f.write_all_at(&[0; layout::ENTRY as usize], h.entry_at(*b))?;
    }
    Ok(())
}

/// Deletes objects, least recently used first, until the blocks held total at most
/// `max_bytes`.
pub fn evict(dir: &Path, max_bytes: u64) -> io::Result<EvictReport> {
    let root = &check_cache_dir(dir)?;
    let mut objects: Vec<(Object, u64, u64)> = walk(root)
        .objects
        .into_iter()
        .filter_map(|o| {
            let (h, entries) = read_map(&o).ok()?;
            let (chunks, bytes) = held(&h, &entries);
            Some((o, chunks, bytes))
        })
        .collect();
    objects.sort_by_key(|(o, _, _)| o.mtime);
    let mut r = EvictReport {
        remaining_chunks: objects.iter().map(|(_, c, _)| c).sum(),
        remaining_bytes: objects.iter().map(|(_, _, b)| b).sum(),
        ..Default::default()
    };
    for (o, chunks, bytes) in &objects {
        if r.remaining_bytes <= max_bytes {
            break;
        }
        remove_object(o)?;
        r.removed += chunks;
        r.freed_bytes += bytes;
        r.remaining_chunks -= chunks;
        r.remaining_bytes -= bytes;
    }
    prune_empty_dirs(root);
    Ok(r)
}

/// Removes an object's map, then its data file.
fn remove_object(o: &Object) -> io::Result<()> {
    for p in [&o.map, &o.data] {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                let text = format!("cannot remove {}: {err}", p.display());
                return Err(io::Error::new(err.kind(), text));
            }
        }
    }
    Ok(())
}

/// Deletes every object's files and every temp file. The directory, its marker and log, and any
/// file orcafs did not write stay.
pub fn clear(dir: &Path) -> io::Result<ClearReport> {
    let root = &check_cache_dir(dir)?;
    let mut r = ClearReport::default();
    let found = walk(root);
    r.other_kept = found.others.len() as u64;
    for o in &found.objects {
        let (chunks, bytes) = read_map(o).map_or((0, 0), |(h, e)| held(&h, &e));
        remove_object(o)?;
        r.chunks_removed += chunks;
        r.bytes_freed += bytes;
    }
    // Data files left without a map.
    for path in layout::walk_objects(root).files {
        if layout::file_at(root, &path).is_some() && fs::remove_file(&path).is_ok() {
            r.bytes_freed += 0;
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

/// Removes empty fan-out directories under `objects/` (a mount recreates them); only those
/// named as fan-out directories, which orcafs made.
fn prune_empty_dirs(root: &Path) {
    for d in layout::walk_objects(root).fan_out_dirs {
        let _ = fs::remove_dir(d); // fails, harmlessly, unless empty
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cachestore::layout::{test_key as key, BLOCK};
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

    /// A cache written by the real disk store: one object of a full chunk and a short tail
    /// chunk, and another object of one chunk.
    fn cache(dir: &Path) -> (DiskStore, Vec<ChunkKey>) {
        let (s, _) = DiskStore::open(dir, 1 << 30, Arc::default()).unwrap();
        let chunk = 4 * BLOCK;
        let size = chunk + 1000;
        let keys = vec![
            key("e1", size, chunk, 0),
            key("e1", size, chunk, 1),
            key("e2", 3 * BLOCK, chunk, 0),
        ];
        s.write(&keys[0], &[data(chunk as usize, 1)]).unwrap();
        s.write(&keys[1], &[data(500, 2), data(500, 3)]).unwrap();
        s.write(&keys[2], &[data(3 * BLOCK as usize, 4)]).unwrap();
        (s, keys)
    }

    fn data_path(root: &Path, k: &ChunkKey) -> PathBuf {
        layout::data_path(root, &k.version())
    }

    #[test]
    fn stats_count_what_the_disk_store_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = cache(dir.path());
        let st = stats(dir.path()).unwrap();
        assert_eq!((st.objects, st.chunks), (2, 3));
        assert_eq!(st.bytes, s.used_bytes());
        assert_eq!(st.bytes, 4 * BLOCK + 1000 + 3 * BLOCK);
        assert!(st.oldest_use.is_some() && st.newest_use.is_some());
    }

    #[test]
    fn verify_finds_flipped_truncated_foreign_and_stray_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (s, keys) = cache(root);
        drop(s);
        let r = verify(root, false).unwrap();
        assert_eq!((r.checked, r.good, r.bad.len()), (3, 3, 0));

        // One flipped byte in the second block of the first object.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(data_path(root, &keys[0]))
            .unwrap();
        f.write_all_at(b"\xff", BLOCK + 9).unwrap();
        // The second object's data file cut short.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(data_path(root, &keys[2]))
            .unwrap();
        f.set_len(BLOCK).unwrap();
        // A stray file that is not orcafs's.
        fs::write(layout::objects_dir(root).join("stray"), b"x").unwrap();
        let r = verify(root, false).unwrap();
        assert_eq!((r.checked, r.good), (2, 1), "{r:?}");
        assert_eq!(r.bad.len(), 3, "{:?}", r.bad);
        let reasons: Vec<&str> = r.bad.iter().map(|b| b.reason.as_str()).collect();
        assert!(
            reasons
                .iter()
                .any(|t| t.contains("chunks failing their CRC: 0 (block 1)")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|t| t.contains("truncated")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|t| t.contains("not orcafs's")),
            "{reasons:?}"
        );

        let r = verify(root, true).unwrap();
        assert_eq!(r.removed, 2);
        let r = verify(root, false).unwrap();
        // Chunk 0 keeps its good blocks (it is partial now), chunk 1 is whole.
        assert_eq!(
            (r.checked, r.good, r.bad.len()),
            (2, 2, 1),
            "only the stray remains bad"
        );
        assert!(
            layout::objects_dir(root).join("stray").exists(),
            "never deleted"
        );
        // The mount agrees: the repaired chunk is absent, the other one still there.
        let (s, _) = DiskStore::open(root, 1 << 30, Arc::default()).unwrap();
        assert!(!s.contains(&keys[0]) && s.contains(&keys[1]) && !s.contains(&keys[2]));
    }

    #[test]
    fn evict_removes_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (s, keys) = cache(root);
        drop(s);
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(layout::map_path(root, &keys[2].version()))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let r = evict(root, 5 * BLOCK).unwrap();
        assert_eq!((r.removed, r.freed_bytes), (1, 3 * BLOCK));
        assert_eq!(
            (r.remaining_chunks, r.remaining_bytes),
            (2, 4 * BLOCK + 1000)
        );
        assert!(!data_path(root, &keys[2]).exists() && data_path(root, &keys[0]).exists());
        let r = evict(root, 0).unwrap();
        assert_eq!((r.removed, r.remaining_bytes), (2, 0));
        assert!(
            layout::walk_objects(root).fan_out_dirs.is_empty(),
            "empty dirs pruned"
        );
    }

    #[test]
    fn clear_removes_only_orcafs_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (s, keys) = cache(root);
        drop(s);
        let stray = layout::objects_dir(root).join("stray");
        fs::write(&stray, b"x").unwrap();
        let temp = layout::temp_path(root, &keys[0].version());
        fs::write(&temp, b"half").unwrap();
        let r = clear(root).unwrap();
        assert_eq!((r.chunks_removed, r.temp_removed, r.other_kept), (3, 1, 1));
        assert_eq!(r.bytes_freed, 7 * BLOCK + 1000);
        assert!(stray.exists() && !temp.exists());
        assert!(layout::marker_path(root).exists(), "still a cache");
        assert_eq!(stats(root).unwrap().objects, 0);
    }

    #[test]
    fn commands_find_the_cache_in_the_orcafs_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious"), b"p").unwrap();
        let (s, keys) = cache(dir.path());
        assert_eq!(s.root(), dir.path().join(layout::SUBDIR));
        assert_eq!(stats(dir.path()).unwrap().chunks, 3);
        assert_eq!(verify(dir.path(), false).unwrap().good, 3);
        assert_eq!(evict(dir.path(), 0).unwrap().removed, 3);
        drop(s);
        let (s, _) = DiskStore::open(dir.path(), 1 << 30, Arc::default()).unwrap();
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
