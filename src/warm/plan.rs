//! warm::plan: what a warm has to read. Finds the orcafs mount that holds a path (its status
//! says how it names chunks), lists the files under a path, names each file's chunks as the
//! mount does (key and ETag from the file's xattrs) and splits them into cached and to read by
//! looking for their files in the local cache directory. Looks only: reads no chunk data, and
//! writes nothing.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cachestore::layout;
use crate::chunk::{chunk_count, ChunkKey, ObjectVersion};
use crate::control::{self, human_bytes};

/// The xattrs a mount gives each file (see `fs`).
const XATTR_KEY: &str = "user.orcafs.key";
const XATTR_ETAG: &str = "user.orcafs.etag";

/// How a mount names its chunks and where it keeps them, from its status document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub origin_id: String,
    pub bucket: String,
    pub chunk_size: u64,
    /// The local cache's bound, when the status gives it.
    pub max_bytes: Option<u64>,
}

impl MountInfo {
    pub fn from_status(mountpoint: &Path, doc: &Value) -> Result<MountInfo, String> {
        let text = |v: &Value| v.as_str().map(str::to_string);
        let fields = (
            text(&doc["cache"]["dir"]),
            text(&doc["origin"]["origin_id"]),
            text(&doc["origin"]["bucket"]),
            doc["cache"]["chunk_size"].as_u64().filter(|n| *n > 0),
        );
        let (Some(cache_dir), Some(origin_id), Some(bucket), Some(chunk_size)) = fields else {
            return Err(format!(
                "the orcafs process serving {} does not say how it names chunks (an older \
                 version?); remount it with this version to warm it",
                mountpoint.display()
            ));
        };
        Ok(MountInfo {
            mountpoint: mountpoint.to_owned(),
            cache_dir: cache_dir.into(),
            origin_id,
            bucket,
            chunk_size,
            max_bytes: doc["cache"]["max_bytes"].as_u64().filter(|n| *n > 0),
        })
    }
}

/// The nearest of `abs` and its ancestors that `is_mount` says is a mount point.
pub fn mount_root(abs: &Path, is_mount: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    abs.ancestors().find(|a| is_mount(a)).map(Path::to_path_buf)
}

/// The canonical form of `path` and the orcafs mount that holds it, or a one-line error.
/// `fs_type` names the filesystem mounted at a mount point, for the error when it is not orcafs.
pub fn locate(
    path: &Path,
    fs_type: &dyn Fn(&Path) -> Option<String>,
) -> Result<(PathBuf, MountInfo), String> {
    let abs = path.canonicalize().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("{}: no such file or directory", path.display()),
        _ => format!("cannot resolve {}: {e}", path.display()),
    })?;
    let root = mount_root(&abs, crate::mount::is_mount_point).unwrap_or_else(|| "/".into());
    let sock = control::socket_path(&root);
    match control::query(&sock) {
        Ok(doc) => Ok((abs, MountInfo::from_status(&root, &doc)?)),
        Err(e) => Err(match fs_type(&root).as_deref() {
            Some("fuse.orcafs") => format!(
                "{} is in the orcafs mount at {}, but no orcafs process of this user answers on \
                 {} ({e})",
                path.display(),
                root.display(),
                sock.display()
            ),
            Some(other) => format!(
                "{} is not inside an orcafs mount (it is on the {other} filesystem at {})",
                path.display(),
                root.display()
            ),
            None => format!("{} is not inside an orcafs mount", path.display()),
        }),
    }
}

/// One chunk to read through the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRead {
    pub index: u64,
    pub len: u64,
}

/// Which chunks of one object version to read, and how much of it is cached already.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkPlan {
    pub missing: Vec<ChunkRead>,
    pub cached_bytes: u64,
}

impl ChunkPlan {
    pub fn missing_bytes(&self) -> u64 {
        self.missing.iter().map(|c| c.len).sum()
    }
}

/// Splits an object version's chunks into those `is_cached` says the local cache holds and those
/// to read.
pub fn plan_chunks(
    object: &Arc<ObjectVersion>,
    chunk_size: u64,
    is_cached: impl Fn(&ChunkKey) -> bool,
) -> ChunkPlan {
    let mut plan = ChunkPlan::default();
    for index in 0..chunk_count(object.size, chunk_size) {
        let key = ChunkKey::new(object.clone(), chunk_size, index);
        if is_cached(&key) {
            plan.cached_bytes += key.len();
        } else {
            plan.missing.push(ChunkRead {
                index,
                len: key.len(),
            });
        }
    }
    plan
}

/// Whether all of the chunk is in the local cache, as its object's block map says. A map this
/// user cannot read counts as missing: reading it through the mount is then a local hit, not a
/// fetch.
fn in_local_cache(cache_dir: &Path, key: &ChunkKey) -> bool {
    layout::chunk_cached(cache_dir, key)
}

/// The regular files at or under `abs`, in name order, appended to `out`. Directories that
/// cannot be listed are reported in `errors` and skipped.
pub fn walk(abs: &Path, stop: &AtomicBool, out: &mut Vec<PathBuf>, errors: &mut Vec<String>) {
    let mut dirs = vec![abs.to_owned()];
    match std::fs::metadata(abs) {
        Ok(m) if m.is_file() => return out.push(abs.to_owned()),
        Ok(m) if m.is_dir() => {}
        Ok(_) => return,
        Err(e) => return errors.push(format!("{}: {e}", abs.display())),
    }
    while let Some(dir) = dirs.pop() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let entries = match std::fs::read_dir(&dir).and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
        {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("cannot list {}: {e}", dir.display()));
                continue;
            }
        };
        let mut subdirs = Vec::new();
        let mut files = Vec::new();
        for e in entries {
            match e.file_type() {
                Ok(t) if t.is_dir() => subdirs.push(e.path()),
                Ok(t) if t.is_file() => files.push(e.path()),
                _ => {}
            }
        }
        files.sort();
        out.extend(files);
        // Popped in name order.
        subdirs.sort_by(|a, b| b.cmp(a));
        dirs.extend(subdirs);
    }
}

/// One file of the plan.
pub struct FilePlan {
    pub path: PathBuf,
    pub mount: Arc<MountInfo>,
    pub object: Arc<ObjectVersion>,
    pub chunks: ChunkPlan,
}

/// Plans one file: its version from the mount, its chunks against the local cache.
pub fn plan_file(path: &Path, mount: &Arc<MountInfo>) -> io::Result<FilePlan> {
    let file = File::open(path)?;
    let object = version_of(&file, mount)?;
    let chunks = plan_chunks(&object, mount.chunk_size, |key| {
        in_local_cache(&mount.cache_dir, key)
    });
    Ok(FilePlan {
        path: path.to_owned(),
        mount: mount.clone(),
        object,
        chunks,
    })
}

/// A file's object version, as the mount names it.
fn version_of(file: &File, mount: &MountInfo) -> io::Result<Arc<ObjectVersion>> {
    let size = file.metadata()?.len();
    let need = |name: &str| {
        xattr(file, name)?.ok_or_else(|| {
            io::Error::other(format!(
                "the mount gives it no {name} (not an orcafs file, or an object without ETag)"
            ))
        })
    };
    Ok(Arc::new(ObjectVersion {
        origin_id: mount.origin_id.as_str().into(),
        bucket: mount.bucket.as_str().into(),
        key: need(XATTR_KEY)?.into(),
        etag: need(XATTR_ETAG)?.into(),
        size,
    }))
}

/// An extended attribute of an open file; None when it has none.
fn xattr(file: &File, name: &str) -> io::Result<Option<String>> {
    let cname = CString::new(name).map_err(io::Error::other)?;
    // S3 keys are at most 1 KiB; longer values take a second call.
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: the fd is open for the call, the name is NUL-terminated and the buffer holds
        // `buf.len()` writable bytes.
        let n = unsafe {
            libc::fgetxattr(
                file.as_raw_fd(),
                cname.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if let Ok(n) = usize::try_from(n) {
            buf.truncate(n);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
}

/// What the plan adds up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub objects: u64,
    pub bytes: u64,
    /// Objects with at least one chunk to read, and those chunks.
    pub fetch_objects: u64,
    pub fetch_bytes: u64,
    pub fetch_chunks: u64,
    pub cached_bytes: u64,
}

pub fn totals(files: &[FilePlan]) -> Totals {
    let mut t = Totals::default();
    for f in files {
        t.objects += 1;
        t.bytes += f.object.size;
        t.cached_bytes += f.chunks.cached_bytes;
        if !f.chunks.missing.is_empty() {
            t.fetch_objects += 1;
            t.fetch_bytes += f.chunks.missing_bytes();
            t.fetch_chunks += f.chunks.missing.len() as u64;
        }
    }
    t
}

/// Warnings for mounts asked to warm more than their cache holds: the first chunks would be
/// evicted by the last.
pub fn over_bound(files: &[FilePlan]) -> Vec<String> {
    let mut per_mount: HashMap<&Path, (&MountInfo, u64)> = HashMap::new();
    for f in files {
        per_mount
            .entry(&f.mount.mountpoint)
            .or_insert((&f.mount, 0))
            .1 += f.chunks.missing_bytes();
    }
    per_mount
        .into_values()
        .filter_map(|(m, bytes)| {
            let max = m.max_bytes?;
            (bytes > max).then(|| {
                format!(
                    "warm: {} to fetch into {} is more than its cache bound ({}): the first \
                     chunks will be evicted by the last",
                    human_bytes(bytes),
                    m.mountpoint.display(),
                    human_bytes(max)
                )
            })
        })
        .collect()
}

/// How long a run waits for the chunks it read to reach the local cache: the mount answers a
/// read before it writes the chunk to its cache.
const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Waits until the chunks of `files` it should have read are in the local cache, for at most
/// [`COMMIT_WAIT`], so the next run finds them; returns how many are still absent. Mounts whose
/// cache this user cannot look into are not checked.
pub fn wait_committed<'a>(files: impl Iterator<Item = &'a FilePlan>) -> usize {
    let mut visible: HashMap<&Path, bool> = HashMap::new();
    let mut pending: Vec<(&Path, ChunkKey)> = Vec::new();
    for f in files {
        let dir = f.mount.cache_dir.as_path();
        if !*visible
            .entry(dir)
            .or_insert_with(|| cache_unreadable(&f.mount).is_none())
        {
            continue;
        }
        for c in &f.chunks.missing {
            let key = ChunkKey::new(f.object.clone(), f.mount.chunk_size, c.index);
            pending.push((dir, key));
        }
    }
    let deadline = Instant::now() + COMMIT_WAIT;
    loop {
        pending.retain(|(dir, key)| !in_local_cache(dir, key));
        if pending.is_empty() || Instant::now() >= deadline {
            return pending.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Why the mount's cache directory cannot be looked into, if it cannot.
pub fn cache_unreadable(mount: &MountInfo) -> Option<io::Error> {
    std::fs::read_dir(layout::objects_dir(&mount.cache_dir)).err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(size: u64) -> Arc<ObjectVersion> {
        Arc::new(ObjectVersion {
            origin_id: "o".into(),
            bucket: "b".into(),
            key: "dir/k".into(),
            etag: "\"e\"".into(),
            size,
        })
    }

    #[test]
    fn plan_reads_only_uncached_chunks_with_the_tail_short() {
        let o = object(25);
        let none = plan_chunks(&o, 10, |_| false);
        assert_eq!(
            none.missing,
            [
                ChunkRead { index: 0, len: 10 },
                ChunkRead { index: 1, len: 10 },
                ChunkRead { index: 2, len: 5 }
            ]
        );
        assert_eq!((none.missing_bytes(), none.cached_bytes), (25, 0));

        let middle = ChunkKey::new(o.clone(), 10, 1).id();
        let tail = ChunkKey::new(o.clone(), 10, 2).id();
        let some = plan_chunks(&o, 10, |k| k.id() == middle || k.id() == tail);
        assert_eq!(some.missing, [ChunkRead { index: 0, len: 10 }]);
        assert_eq!(some.cached_bytes, 15);

        let all = plan_chunks(&o, 10, |_| true);
        assert!(all.missing.is_empty());
        assert_eq!(all.cached_bytes, 25);
        assert_eq!(plan_chunks(&object(0), 10, |_| false), ChunkPlan::default());
    }

    #[test]
    fn plan_names_chunks_as_the_mount_does() {
        let dir = tempfile::tempdir().unwrap();
        let o = object(30);
        let (store, _) =
            crate::cachestore::DiskStore::open(dir.path(), 1 << 20, Arc::default()).unwrap();
        let k = ChunkKey::new(o.clone(), 10, 1);
        store
            .write(&k, &[bytes::Bytes::from_static(b"0123456789")])
            .unwrap();
        let plan = plan_chunks(&o, 10, |k| in_local_cache(dir.path(), k));
        assert_eq!(
            plan.missing.iter().map(|c| c.index).collect::<Vec<_>>(),
            [0, 2]
        );
        assert_eq!(plan.cached_bytes, 10);
    }

    #[test]
    fn mount_root_is_the_nearest_mount_point_above() {
        let mounts = [Path::new("/"), Path::new("/mnt/a")];
        let is_mount = |p: &Path| mounts.contains(&p);
        let root = |p: &str| mount_root(Path::new(p), is_mount).unwrap();
        assert_eq!(root("/mnt/a/x/y.bin"), Path::new("/mnt/a"));
        assert_eq!(root("/mnt/a"), Path::new("/mnt/a"));
        assert_eq!(root("/mnt/ab/c"), Path::new("/"));
        assert_eq!(mount_root(Path::new("/x"), |_| false), None);
    }

    #[test]
    fn a_path_outside_any_orcafs_mount_or_missing_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = locate(dir.path(), &|_| Some("tmpfs".into())).unwrap_err();
        assert!(e.contains("is not inside an orcafs mount"), "{e}");
        assert!(e.contains("tmpfs"), "{e}");
        assert!(!e.contains('\n'));
        let e = locate(&dir.path().join("nope"), &|_| None).unwrap_err();
        assert!(e.ends_with("nope: no such file or directory"), "{e}");
    }

    #[test]
    fn mount_info_comes_from_the_status_document() {
        let doc = json!({
            "origin": { "bucket": "bkt", "origin_id": "http://o" },
            "cache": { "dir": "/var/cache/orcafs", "chunk_size": 1024 },
        });
        let m = MountInfo::from_status(Path::new("/mnt/x"), &doc).unwrap();
        assert_eq!(
            m,
            MountInfo {
                mountpoint: "/mnt/x".into(),
                cache_dir: "/var/cache/orcafs".into(),
                origin_id: "http://o".into(),
                bucket: "bkt".into(),
                chunk_size: 1024,
                max_bytes: None,
            }
        );
        let old = json!({ "origin": { "bucket": "bkt" }, "cache": { "dir": "/c" } });
        let e = MountInfo::from_status(Path::new("/mnt/x"), &old).unwrap_err();
        assert!(e.contains("older version"), "{e}");
    }

    #[test]
    fn walk_lists_files_in_name_order_depth_first() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b/2", "b/1", "a", "c/d/e", "c/0"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        walk(dir.path(), &AtomicBool::new(false), &mut out, &mut errors);
        let rel: Vec<_> = out
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(rel, ["a", "b/1", "b/2", "c/0", "c/d/e"]);
        assert!(errors.is_empty());
        let mut one = Vec::new();
        walk(
            &dir.path().join("a"),
            &AtomicBool::new(false),
            &mut one,
            &mut errors,
        );
        assert_eq!(one, [dir.path().join("a")]);
    }
}
