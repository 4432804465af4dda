//! fs: the fuser adapter. Maps FUSE operations onto `namespace` (names, attributes) and `fetch`
//! (bytes), and errors onto errno in one place ([`errno_of`]).
//!
//! Every operation that may touch the network is answered from a task on the tokio runtime, so
//! the FUSE threads never wait on the network and a slow read never blocks other requests; what
//! needs no network (a lookup of a listed name, a read the local cache holds) is answered on the
//! FUSE thread, as a local filesystem would. The mount is read-only: everything that would
//! change it answers EROFS.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::chunk::ObjectVersion;
use crate::fetch::{Access, FetchError, Fetcher};
use crate::metrics::OpLatency;
use crate::namespace::{
    Attr, DirEntry, DirHandle, Kind, Local, Namespace, NsError, OpenedObject, Read,
};
use crate::origin::OriginError;

mod passthrough;
use passthrough::Mode;
pub use passthrough::Passthrough;

/// Largest read the kernel may send (and `max_read`).
pub const MAX_READ: u32 = 1 << 20;

/// Ownership and permissions shown for every node.
#[derive(Debug, Clone, Copy)]
pub struct Presentation {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub ttl: Duration,
}

struct OpenFile {
    object: Arc<ObjectVersion>,
    ino: u64,
    /// Where the last read ended, to tell sequential readers from random ones.
    next_offset: AtomicU64,
    /// Every read fills whole chunks (asked with [`IOC_WHOLE_CHUNKS`], as `orcafs warm` does).
    whole_chunks: AtomicBool,
    /// The last read was taken as sequential.
    sequential: AtomicBool,
    /// Readahead window in chunks (0 until a sequential run starts; see `Fetcher::next_window`).
    window: AtomicU64,
    /// The chunk the last sequential read was in (u64::MAX before any): entering another one
    /// while it is still being filled grows the window.
    chunk: AtomicU64,
}

/// `_IO('O', 1)`: on an open file of the mount, makes every read of that handle fill whole
/// chunks, however scattered the reads are (`orcafs warm` reads one byte per chunk).
pub const IOC_WHOLE_CHUNKS: u32 = 0x4f01;

impl OpenFile {
    fn new(object: Arc<ObjectVersion>, ino: u64) -> OpenFile {
        OpenFile {
            object,
            ino,
            next_offset: AtomicU64::new(0),
            whole_chunks: AtomicBool::new(false),
            sequential: AtomicBool::new(true),
            window: AtomicU64::new(0),
            chunk: AtomicU64::new(u64::MAX),
        }
    }

    /// Sequential when the read starts at 0 or where the previous one ended, or, while the
    /// handle reads sequentially, near that (the kernel's concurrent readahead reads arrive, and
    /// are answered, a little out of order); random otherwise. A random reader turns sequential
    /// only by continuing exactly where it stopped.
    fn access(&self, offset: u64) -> Access {
        if self.whole_chunks.load(Ordering::Relaxed) {
            return Access::Sequential;
        }
        let expected = self.next_offset.load(Ordering::Relaxed);
        let was_sequential = self.sequential.load(Ordering::Relaxed);
        // Before any read has been answered `expected` is 0, and the kernel's first readahead
        // reads may be handled before the read at 0 itself: near 0 is the start of a sequential
        // reader too. Until then the kernel has sent only its first window (it reads further
        // ahead once the reader reaches pages of that window), so a read far from 0 is random.
        let slack = if expected == 0 {
            FIRST_SLACK
        } else {
            SEQUENTIAL_SLACK
        };
        let near = offset.abs_diff(expected) <= slack;
        let sequential =
            offset == 0 || (expected > 0 && offset == expected) || (was_sequential && near);
        self.sequential.store(sequential, Ordering::Relaxed);
        if sequential {
            Access::Sequential
        } else {
            Access::Random
        }
    }
}

/// Readahead requests the kernel may keep in flight (`max_background`, set at FUSE_INIT).
const MAX_BACKGROUND: u16 = 16;

/// How far from the previous read's end a read may start and still continue its pattern: the
/// kernel keeps up to [`MAX_BACKGROUND`] readahead requests of up to [`MAX_READ`] in flight, and
/// our threads may answer them in any order. A sequential read taken for a random one would be
/// fetched as blocks beside the chunk fill readahead starts: the same bytes twice.
const SEQUENTIAL_SLACK: u64 = (MAX_BACKGROUND as u64 + 1) * MAX_READ as u64;

/// [`SEQUENTIAL_SLACK`] before the handle's first read was answered.
const FIRST_SLACK: u64 = 2 * MAX_READ as u64;

type Handles = Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>;

/// An open directory. The kernel serializes `readdir` calls on one handle; the async mutex only
/// lets a restart (a seek back in a huge directory) swap the listing.
struct OpenDir {
    ino: u64,
    listing: tokio::sync::Mutex<DirHandle>,
}

type Dirs = Arc<Mutex<HashMap<u64, Arc<OpenDir>>>>;

/// Entries asked of the listing per `readdir` reply (a reply holds a few dozen to a few hundred).
const DIR_BATCH: usize = 256;
/// Entries per READDIRPLUS reply attempt: each one is counted as a lookup until it is known not
/// to fit, so the batch stays near what one reply holds.
const DIRPLUS_BATCH: usize = 64;

/// Records an operation's latency when dropped, i.e. on every path out of its task.
struct Timer<'a>(&'a OpLatency, &'static str, Instant);

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.0.observe(self.1, self.2);
    }
}

fn lock_handles(h: &Handles) -> MutexGuard<'_, HashMap<u64, Arc<OpenFile>>> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct OrcaFs {
    ns: Arc<Namespace>,
    fetch: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    show: Presentation,
    origin_id: Arc<str>,
    bucket: Arc<str>,
    handles: Handles,
    dirs: Dirs,
    next_fh: AtomicU64,
    latency: Arc<OpLatency>,
    passthrough: Arc<Passthrough>,
    readahead_knob: Arc<ReadaheadKnob>,
    kernel_names: Arc<KernelNames>,
}

/// The kernel's cache of names: told to forget a name whose version a read found gone at the
/// origin, so that the next `stat` or `open` of the name looks it up again at once instead of
/// after the entry's TTL. Attached once the session exists (the notifier comes from it).
///
/// The kernel takes the directory's lock for it, which lookups and readdirs in that directory
/// hold while they wait for us (as long as an origin retry budget): so the notifications go out
/// from one thread of their own, never a FUSE or runtime thread, and a read waits for its
/// notification at most [`FORGET_WAIT`] before it replies anyway.
#[derive(Default)]
pub struct KernelNames {
    queue: OnceLock<std::sync::mpsc::Sender<Forget>>,
}

/// How long a failed read waits for the kernel to drop the name before it replies.
const FORGET_WAIT: Duration = Duration::from_millis(100);

struct Forget {
    parent: u64,
    name: String,
    done: tokio::sync::oneshot::Sender<()>,
}

impl KernelNames {
    /// Starts the thread that sends the notifications through `notifier`.
    pub fn attach(&self, notifier: fuser::Notifier) {
        let (tx, rx) = std::sync::mpsc::channel::<Forget>();
        let sender = move || {
            for f in rx {
                // fuser takes the kernel's ENOENT (no such entry cached) as success.
                let name = std::ffi::OsStr::new(&f.name);
                if let Err(e) = notifier.inval_entry(INodeNo(f.parent), name) {
                    tracing::debug!(parent = f.parent, name = %f.name, error = %e, "kernel entry not dropped");
                }
                let _ = f.done.send(());
            }
        };
        match std::thread::Builder::new()
            .name("orcafs-names".into())
            .spawn(sender)
        {
            Ok(_) => {
                let _ = self.queue.set(tx);
            }
            Err(e) => {
                tracing::warn!(error = %e, "no thread for kernel name notifications; names follow the TTL")
            }
        }
    }

    /// Has the kernel drop `name` in directory `parent`; waits at most [`FORGET_WAIT`].
    async fn forget(&self, parent: u64, name: String) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        let (done, sent) = tokio::sync::oneshot::channel();
        let asked = Forget { parent, name, done };
        if queue.send(asked).is_ok() {
            let _ = tokio::time::timeout(FORGET_WAIT, sent).await;
        }
    }
}

/// The kernel reads ahead of a FUSE file by at most its device's `read_ahead_kb` (128 KiB unless
/// raised; FUSE_INIT cannot ask for more), so a sequential reader's reads would reach us as
/// 128 KiB requests, eight per MiB. The mounter names the device's knob; the first request after
/// FUSE_INIT (the kernel sends none before it has taken our INIT reply, which would lower the
/// knob again) raises it to [`MAX_READ`], as gcsfuse's `max-read-ahead-kb` does. Needs root;
/// without it reads are smaller, never wrong.
#[derive(Default)]
pub struct ReadaheadKnob {
    path: OnceLock<PathBuf>,
    turned: AtomicBool,
}

impl ReadaheadKnob {
    /// The `read_ahead_kb` file of the mount's device.
    pub fn set(&self, path: PathBuf) {
        let _ = self.path.set(path);
    }

    fn turn(&self) {
        if self.turned.load(Ordering::Relaxed) {
            return;
        }
        let Some(path) = self.path.get() else { return };
        if self.turned.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Err(e) = std::fs::write(path, format!("{}", MAX_READ / 1024)) {
            tracing::info!(path = %path.display(), error = %e, "cannot raise the kernel's readahead: sequential reads arrive in 128 KiB requests");
        }
    }
}

/// The one place errors become errno.
pub fn errno_of(e: &NsError) -> Errno {
    match e {
        NsError::NotFound => Errno::ENOENT,
        NsError::UnknownInode(_) => Errno::ESTALE,
        NsError::NotADirectory => Errno::ENOTDIR,
        NsError::IsADirectory => Errno::EISDIR,
        NsError::Stale => Errno::ESTALE,
        NsError::NoEtag(_) => Errno::EIO,
        NsError::Origin(o) => errno_of_origin(o),
    }
}

fn errno_of_origin(e: &OriginError) -> Errno {
    match e {
        OriginError::NotFound(_) => Errno::ENOENT,
        OriginError::AccessDenied(_) => Errno::EACCES,
        OriginError::EtagChanged { .. } => Errno::ESTALE,
        OriginError::NoSuchBucket(_)
        | OriginError::Unreachable(_)
        | OriginError::Transient(_)
        | OriginError::Other(_) => Errno::EIO,
    }
}

fn errno_of_fetch(e: &FetchError) -> Errno {
    match e {
        FetchError::Origin(o) => errno_of_origin(o),
        FetchError::Abandoned | FetchError::QueueTimeout(_) => Errno::EIO,
    }
}

/// Where the mount's objects come from: named in every object version it opens.
pub struct Source<'a> {
    pub origin_id: &'a str,
    pub bucket: &'a str,
}

impl OrcaFs {
    /// The knob the first request after FUSE_INIT turns (see [`ReadaheadKnob`]).
    pub fn readahead_knob(&self) -> Arc<ReadaheadKnob> {
        self.readahead_knob.clone()
    }

    /// Where the session's notifier goes once the session exists (see [`KernelNames`]).
    pub fn kernel_names(&self) -> Arc<KernelNames> {
        self.kernel_names.clone()
    }

    pub fn new(
        ns: Arc<Namespace>,
        fetch: Arc<Fetcher>,
        rt: tokio::runtime::Handle,
        show: Presentation,
        source: Source<'_>,
        latency: Arc<OpLatency>,
        passthrough: Arc<Passthrough>,
    ) -> OrcaFs {
        OrcaFs {
            passthrough,
            ns,
            fetch,
            rt,
            show,
            origin_id: source.origin_id.into(),
            bucket: source.bucket.into(),
            handles: Handles::default(),
            dirs: Dirs::default(),
            next_fh: AtomicU64::new(1),
            readahead_knob: Arc::default(),
            kernel_names: Arc::default(),
            latency,
        }
    }

    fn dirs(&self) -> MutexGuard<'_, HashMap<u64, Arc<OpenDir>>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Arc<OpenFile>>> {
        lock_handles(&self.handles)
    }

    fn file_attr(show: &Presentation, a: &Attr) -> FileAttr {
        let (kind, perm, nlink) = match a.kind {
            Kind::Dir => (FileType::Directory, show.dir_mode, 2),
            Kind::File => (FileType::RegularFile, show.file_mode, 1),
        };
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind,
            perm,
            nlink,
            uid: show.uid,
            gid: show.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }
}

impl Filesystem for OrcaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Names come with attributes (no lookup per name for `ls -l`); the kernel chooses plain
        // readdir when nobody stats the entries (`find`, `ls`), so a huge listing does not
        // become a node per name.
        let plus = InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO;
        if config.add_capabilities(plus).is_err() {
            tracing::info!("the kernel offers no READDIRPLUS: ls -l looks names up one by one");
        }
        // Objects held whole in the local cache are read by the kernel from their files.
        if self.passthrough.is_on() {
            let offered = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !offered {
                self.passthrough.turn_off();
                tracing::info!("the kernel offers no FUSE passthrough (Linux 6.9+): cached objects are read through orcafs");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.readahead_knob.turn();
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        let show = self.show;
        let started = Instant::now();
        // Answered here when no origin request is needed: no hop to the runtime.
        if let Local::Answer(r) = self.ns.lookup_local(parent.0, &name) {
            let _timer = Timer(&self.latency, "lookup", started);
            return reply_entry(reply, &show, r, parent.0, &name);
        }
        let ns = self.ns.clone();
        let latency = self.latency.clone();
        self.rt.spawn(async move {
            let _timer = Timer(&latency, "lookup", started);
            let r = ns.lookup(parent.0, &name).await;
            reply_entry(reply, &show, r, parent.0, &name);
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.ns.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.readahead_knob.turn();
        let show = self.show;
        let started = Instant::now();
        if let Local::Answer(r) = self.ns.getattr_local(ino.0) {
            let _timer = Timer(&self.latency, "getattr", started);
            return reply_attr(reply, &show, r);
        }
        let ns = self.ns.clone();
        let latency = self.latency.clone();
        self.rt.spawn(async move {
            let _timer = Timer(&latency, "getattr", started);
            reply_attr(reply, &show, ns.getattr(ino.0).await);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.readahead_knob.turn();
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        let opener = Opener {
            origin_id: self.origin_id.clone(),
            bucket: self.bucket.clone(),
            fh: self.next_fh.fetch_add(1, Ordering::Relaxed),
            ino: ino.0,
            handles: self.handles.clone(),
            passthrough: self.passthrough.clone(),
            fetch: self.fetch.clone(),
            rt: self.rt.clone(),
        };
        let started = Instant::now();
        if let Local::Answer(r) = self.ns.open_local(ino.0) {
            let _timer = Timer(&self.latency, "open", started);
            return opener.reply(reply, r);
        }
        let ns = self.ns.clone();
        let latency = self.latency.clone();
        self.rt.spawn(async move {
            let _timer = Timer(&latency, "open", started);
            opener.reply(reply, ns.open(ino.0).await);
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.handles().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let started = Instant::now();
        let access = file.access(offset);
        // Held in the local cache: read it here, as a local filesystem would, without a hop to
        // the runtime and its blocking pool (two thread wake-ups per read).
        if let Some(bytes) = self
            .fetch
            .read_cached_now(&file.object, offset, size as u64)
        {
            let timer = Timer(&self.latency, "read", started);
            reply.data(&bytes);
            drop(timer);
            let _runtime = self.rt.enter();
            readahead(&self.fetch, &file, offset, size as u64);
            return;
        }
        let fetch = self.fetch.clone();
        let ns = self.ns.clone();
        let names = self.kernel_names.clone();
        let latency = self.latency.clone();
        self.rt.spawn(async move {
            let timer = Timer(&latency, "read", started);
            match fetch
                .read_object_as(&file.object, offset, size as u64, access)
                .await
            {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => {
                    tracing::warn!(bucket = %file.object.bucket, key = %file.object.key, offset, error = %e, "read failed");
                    // The name is another version now, or none: forgotten here and in the
                    // kernel before the reader hears of it, so its next `stat` or `open` of
                    // the name finds what the origin has.
                    if e.is_version_gone() {
                        if let Some((parent, name)) = ns.invalidate(file.ino) {
                            names.forget(parent, name).await;
                        }
                    }
                    return reply.error(errno_of_fetch(&e));
                }
            }
            drop(timer);
            // After replying, so prefetches never delay this read or take its memory.
            readahead(&fetch, &file, offset, size as u64);
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(file) = self.handles().remove(&fh.0) {
            self.passthrough.release(file.ino);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // No I/O here: a cold listing starts streaming in the background.
        let (listing, same) = match self.ns.opendir(ino.0, &self.rt) {
            Ok(d) => d,
            Err(e) => return reply.error(errno_of(&e)),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let dir = Arc::new(OpenDir {
            ino: ino.0,
            listing: tokio::sync::Mutex::new(listing),
        });
        self.dirs().insert(fh, dir);
        // The kernel caches the directory's pages; it keeps them while they hold the same
        // listing, so a repeated `ls` within the TTL does not even reach this process.
        let mut flags = FopenFlags::FOPEN_CACHE_DIR;
        if same {
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        reply.opened(FileHandle(fh), flags);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs().remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.dirs().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let (ns, rt) = (self.ns.clone(), self.rt.clone());
        let (latency, started) = (self.latency.clone(), Instant::now());
        self.rt.spawn(async move {
            let _timer = Timer(&latency, "readdir", started);
            // Offsets: 1 = ".", 2 = "..", 3 + i = entry i.
            for (i, (dino, name)) in dots(&ns, ino.0).iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*dino), i as u64 + 1, FileType::Directory, name) {
                    return reply.ok();
                }
            }
            let start = offset.saturating_sub(2) as usize;
            let mut entries = match read_listing(&ns, &rt, &dir, start, DIR_BATCH).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno_of(&e)),
            };
            ns.number(dir.ino, &mut entries);
            for (i, e) in entries.iter().enumerate() {
                let off = (start + i) as u64 + 3;
                if reply.add(INodeNo(e.ino), off, file_type(e.kind), &e.name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(dir) = self.dirs().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let (ns, rt, show) = (self.ns.clone(), self.rt.clone(), self.show);
        let (latency, started) = (self.latency.clone(), Instant::now());
        self.rt.spawn(async move {
            let _timer = Timer(&latency, "readdirplus", started);
            let gen = Generation(0);
            for (i, (dino, name)) in dots(&ns, ino.0).iter().enumerate().skip(offset as usize) {
                let attr = OrcaFs::file_attr(&show, &dir_attr(*dino));
                if reply.add(INodeNo(*dino), i as u64 + 1, name, &show.ttl, &attr, gen) {
                    return reply.ok();
                }
            }
            let start = offset.saturating_sub(2) as usize;
            let entries = match read_listing(&ns, &rt, &dir, start, DIRPLUS_BATCH).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno_of(&e)),
            };
            // Each entry the kernel receives counts as looked up; those that do not fit are
            // forgotten again.
            let attrs = ns.remember_listed(dir.ino, &entries);
            for (i, (e, a)) in entries.iter().zip(&attrs).enumerate() {
                let off = (start + i) as u64 + 3;
                let fa = OrcaFs::file_attr(&show, a);
                if reply.add(INodeNo(a.ino), off, &e.name, &show.ttl, &fa, gen) {
                    for a in &attrs[i..] {
                        ns.forget(a.ino, 1);
                    }
                    break;
                }
            }
            reply.ok();
        });
    }

    fn flush(&self, _r: &Request, _i: INodeNo, _fh: FileHandle, _l: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _r: &Request, _i: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn ioctl(
        &self,
        _r: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _f: fuser::IoctlFlags,
        cmd: u32,
        _in: &[u8],
        _out: u32,
        reply: fuser::ReplyIoctl,
    ) {
        if cmd != IOC_WHOLE_CHUNKS {
            return reply.error(Errno::ENOTTY);
        }
        match self.handles().get(&fh.0) {
            Some(file) => {
                file.whole_chunks.store(true, Ordering::Relaxed);
                reply.ioctl(0, &[]);
            }
            None => reply.error(Errno::EBADF),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // An object store has no fixed capacity: report a large, full-looking volume, as other
        // S3 mounts do, so `df` works and nothing tries to write.
        const BLOCKS: u64 = 1 << 40;
        reply.statfs(BLOCKS, 0, 0, 1 << 32, 0, 4096, 255, 4096);
    }

    /// `user.orcafs.key` and `user.orcafs.etag` of a file: the object version the inode stands
    /// for, so a tool (`orcafs warm`) can name its chunks. An open handle of the inode answers
    /// without any lookup; otherwise the version is pinned as `open` pins it (a HEAD only when
    /// the node's attributes are older than the TTL). Directories have none.
    ///
    /// Other `user.` names have no value (ENODATA). The other namespaces (`security.`,
    /// `system.`, `trusted.`) are not supported (EOPNOTSUPP), as on a filesystem without them:
    /// `ls -l` asks every name for `security.selinux` and `system.posix_acl_access`, and
    /// remembers an unsupported answer for the whole device, so a repeated `ls -l` of a big
    /// directory costs two requests here instead of two per name. (ENOSYS would stop the
    /// kernel from sending any getxattr, the `user.orcafs.` ones included.)
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let started = Instant::now();
        let Some(attr) = name.to_str().and_then(VersionXattr::parse) else {
            let _timer = Timer(&self.latency, "getxattr", started);
            return reply.error(VersionXattr::missing(name));
        };
        let open = self
            .handles()
            .values()
            .find(|f| f.ino == ino.0)
            .map(|f| f.object.clone());
        if let Some(o) = open {
            let _timer = Timer(&self.latency, "getxattr", started);
            return reply_xattr(reply, size, attr.of(&o.key, &o.etag).as_bytes());
        }
        // Pinning marks this version as the inode's last opened one. An inode stands for one
        // version and has no cached pages before its first open, so no open's page-cache
        // decision changes in effect.
        if let Local::Answer(r) = self.ns.open_local(ino.0) {
            let _timer = Timer(&self.latency, "getxattr", started);
            return reply_version_xattr(reply, size, attr, r);
        }
        let ns = self.ns.clone();
        let latency = self.latency.clone();
        self.rt.spawn(async move {
            let _timer = Timer(&latency, "getxattr", started);
            reply_version_xattr(reply, size, attr, ns.open(ino.0).await);
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = Timer(&self.latency, "listxattr", Instant::now());
        let is_file = self.handles().values().any(|f| f.ino == ino.0)
            || match self.ns.getattr_local(ino.0) {
                Local::Answer(r) => r.is_ok_and(|a| a.kind == Kind::File),
                // Only a file's attributes expire.
                Local::AskOrigin(_) => true,
            };
        let names: &[u8] = if is_file { VersionXattr::LIST } else { &[] };
        reply_xattr(reply, size, names)
    }

    // Everything below would change the bucket: the mount is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _t: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _r: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _d: &[u8],
        _wf: WriteFlags,
        _f: OpenFlags,
        _l: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _r: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}

/// Prefetches the next chunks when a read continues where the previous one ended; a random
/// reader triggers nothing.
fn reply_entry(
    reply: ReplyEntry,
    show: &Presentation,
    r: Result<Attr, NsError>,
    parent: u64,
    name: &str,
) {
    match r {
        Ok(a) => reply.entry(&show.ttl, &OrcaFs::file_attr(show, &a), Generation(0)),
        Err(e) => {
            if !matches!(e, NsError::NotFound) {
                tracing::warn!(parent, name, error = %e, "lookup failed");
            }
            reply.error(errno_of(&e))
        }
    }
}

fn reply_attr(reply: ReplyAttr, show: &Presentation, r: Result<Attr, NsError>) {
    match r {
        Ok(a) => reply.attr(&show.ttl, &OrcaFs::file_attr(show, &a)),
        Err(e) => reply.error(errno_of(&e)),
    }
}

/// `.` and `..` of a directory.
fn dots(ns: &Namespace, ino: u64) -> [(u64, &'static str); 2] {
    [(ino, "."), (ns.parent_of(ino), "..")]
}

fn dir_attr(ino: u64) -> Attr {
    Attr {
        ino,
        kind: Kind::Dir,
        size: 0,
        mtime: SystemTime::UNIX_EPOCH,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

/// Up to `max` entries of an open directory from index `start`, reopening the listing when the
/// reader went back before what a huge directory's stream still holds.
async fn read_listing(
    ns: &Arc<Namespace>,
    rt: &tokio::runtime::Handle,
    dir: &OpenDir,
    start: usize,
    max: usize,
) -> Result<Vec<DirEntry>, NsError> {
    let mut listing = dir.listing.lock().await;
    loop {
        match listing.read(start, max).await {
            Read::Entries(e) => return Ok(e),
            Read::Failed(e) => return Err(e),
            Read::Restart => *listing = ns.opendir(dir.ino, rt)?.0,
        }
    }
}

/// The read-only extended attributes of a file.
#[derive(Debug, Clone, Copy)]
enum VersionXattr {
    Key,
    Etag,
}

impl VersionXattr {
    /// What `listxattr` answers for a file: the names, each NUL-terminated.
    const LIST: &'static [u8] = b"user.orcafs.etag\0user.orcafs.key\0";

    fn parse(name: &str) -> Option<VersionXattr> {
        match name {
            "user.orcafs.key" => Some(VersionXattr::Key),
            "user.orcafs.etag" => Some(VersionXattr::Etag),
            _ => None,
        }
    }

    /// The answer for any other name: none in the `user.` namespace, and no other namespace.
    fn missing(name: &OsStr) -> Errno {
        if name.as_encoded_bytes().starts_with(b"user.") {
            Errno::ENODATA
        } else {
            Errno::EOPNOTSUPP
        }
    }

    fn of<'a>(self, key: &'a str, etag: &'a str) -> &'a str {
        match self {
            VersionXattr::Key => key,
            VersionXattr::Etag => etag,
        }
    }
}

/// A value, or its length when the caller asks with size 0 (the xattr protocol).
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}

fn reply_version_xattr(
    reply: ReplyXattr,
    size: u32,
    attr: VersionXattr,
    r: Result<OpenedObject, NsError>,
) {
    match r {
        Ok(o) => reply_xattr(reply, size, attr.of(&o.key, &o.etag).as_bytes()),
        // Nothing to name: a directory, or an object without a version to pin.
        Err(NsError::IsADirectory | NsError::NoEtag(_)) => reply.error(Errno::ENODATA),
        Err(e) => reply.error(errno_of(&e)),
    }
}

/// What an `open` needs to register its handle once the version is pinned.
struct Opener {
    origin_id: Arc<str>,
    bucket: Arc<str>,
    fh: u64,
    ino: u64,
    handles: Handles,
    passthrough: Arc<Passthrough>,
    fetch: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
}

impl Opener {
    fn reply(self, reply: ReplyOpen, r: Result<OpenedObject, NsError>) {
        let o = match r {
            Ok(o) => o,
            Err(e) => return reply.error(errno_of(&e)),
        };
        let object = Arc::new(ObjectVersion {
            origin_id: self.origin_id.clone(),
            bucket: self.bucket.clone(),
            key: o.key.into(),
            etag: o.etag.into(),
            size: o.size,
        });
        let flags = if o.keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        if !self.passthrough.is_on() {
            return self.answer(reply, object, flags, Mode::Orcafs);
        }
        if let Some(mode) = self.passthrough.join(self.ino) {
            return self.answer(reply, object, flags, mode);
        }
        if !self.fetch.is_whole_locally(&object) {
            let mode = self.passthrough.open_through_orcafs(self.ino);
            return self.answer(reply, object, flags, mode);
        }
        // All of it is cached: get the checked file off the FUSE thread (a first open after a
        // restart reads it through once to check it).
        let rt = self.rt.clone();
        rt.spawn(async move {
            let mode = match self.fetch.whole_object(&object).await {
                Some(local) => self.passthrough.open_backing(self.ino, local, &reply),
                None => self.passthrough.open_through_orcafs(self.ino),
            };
            self.answer(reply, object, flags, mode);
        });
    }

    fn answer(self, reply: ReplyOpen, object: Arc<ObjectVersion>, flags: FopenFlags, mode: Mode) {
        lock_handles(&self.handles).insert(self.fh, Arc::new(OpenFile::new(object, self.ino)));
        match mode {
            Mode::Orcafs => reply.opened(FileHandle(self.fh), flags),
            Mode::Backing(id) => {
                self.passthrough.count_open();
                reply.opened_passthrough(FileHandle(self.fh), FopenFlags::empty(), &id)
            }
        }
    }
}

fn readahead(fetch: &Arc<Fetcher>, file: &OpenFile, offset: u64, size: u64) {
    let expected = file.next_offset.swap(offset + size, Ordering::Relaxed);
    if offset != expected {
        // A random read ends the run: the next one starts with a small window again.
        if !file.sequential.load(Ordering::Relaxed) {
            file.window.store(0, Ordering::Relaxed);
        }
        return;
    }
    let index = offset / fetch.chunk_size();
    let entered = file.chunk.swap(index, Ordering::Relaxed) != index;
    let window = match file.window.load(Ordering::Relaxed) {
        0 => fetch.first_window(),
        // Entering a chunk whose fill still runs: readahead did not keep ahead, widen it.
        w if entered && fetch.is_filling(&file.object, index) => fetch.next_window(w),
        w => w,
    };
    file.window.store(window, Ordering::Relaxed);
    fetch.readahead(&file.object, index, window);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> OpenFile {
        let object = ObjectVersion {
            origin_id: "o".into(),
            bucket: "b".into(),
            key: "k".into(),
            etag: "\"e\"".into(),
            size: 1 << 40,
        };
        OpenFile::new(Arc::new(object), 2)
    }

    const MIB: u64 = 1 << 20;

    /// The thresholds docs/semantics.md states: 2 MiB from 0 before any read was answered,
    /// 17 MiB from where the last read ended while the handle reads sequentially, exact
    /// continuation to turn a random reader sequential.
    #[test]
    fn sequential_and_random_reads_are_told_apart_as_documented() {
        use Access::{Random, Sequential};
        let f = handle();
        assert_eq!(f.access(2 * MIB), Sequential, "near 0 before any answer");
        let f = handle();
        assert_eq!(
            f.access(2 * MIB + 1),
            Random,
            "far from 0 before any answer"
        );
        let f = handle();
        f.next_offset.store(100 * MIB, Ordering::Relaxed);
        assert_eq!(f.access(100 * MIB + 17 * MIB), Sequential, "within 17 MiB");
        assert_eq!(f.access(100 * MIB + 17 * MIB + 1), Random, "past 17 MiB");
        assert_eq!(
            f.access(100 * MIB + 4096),
            Random,
            "near, but the handle is random now"
        );
        assert_eq!(
            f.access(100 * MIB),
            Sequential,
            "exactly where the last read ended"
        );
        assert_eq!(f.access(0), Sequential, "offset 0 always");
        f.whole_chunks.store(true, Ordering::Relaxed);
        assert_eq!(
            f.access(900 * MIB),
            Sequential,
            "IOC_WHOLE_CHUNKS: always whole chunks"
        );
    }
}
