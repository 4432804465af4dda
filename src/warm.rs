//! warm: `orcafs warm PATH…`, which fills a mount's cache ahead of its readers (like JuiceFS
//! `warmup` or Alluxio `load`).
//!
//! Every byte is read *through the mount*, so each chunk takes the path any reader's would: a
//! fill in flight on this host (joined), the local disk cache, the shared store, the chunk's
//! coordinator peer, and only then the origin. So a chunk is filled once for the whole fleet,
//! and the warm needs no credentials and no knowledge of the stores. One read of the page that
//! holds a chunk's last byte is enough: the mount fills the whole chunk into its cache, and that
//! page is answered only once the whole chunk has arrived. Readahead is off for the file and the
//! chunk's pages are dropped from the page cache before the read (so it reaches the mount) and
//! after (so warming does not fill this host's memory).
//!
//! To skip what is cached (a second run resumes; `--dry-run` tells what it would fetch), the
//! command names each chunk as the mount does: origin id, bucket, chunk size and cache directory
//! from the mount's status document ([`control`]), object key and ETag from the file's read-only
//! xattrs (`user.orcafs.key`, `user.orcafs.etag`), size from `fstat`. A chunk whose blocks the
//! object's block map in the local cache directory lists is skipped (the map only: the mount
//! checks the bytes when it reads them); any other chunk is read (whole: the files are opened
//! with [`crate::fs::IOC_WHOLE_CHUNKS`]), and may come from the shared store or a peer
//! instead of the origin, which is the point.
//!
//! Layout: [`plan`] finds the mount and what to read, [`report`] tells the operator (progress,
//! plan and summary lines), and this file runs it: Ctrl-C, the worker pool, the reads.
//!
//! Owns: finding the orcafs mount that holds a path, the plan, the worker pool, progress and the
//! summary. Must not touch: the cache directory's files (it only looks for them), the stores,
//! `fetch` and `cluster` (everything goes through the mount), or the mount process's state.

mod plan;
mod report;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::chunk::chunk_count;
use crate::control::human_bytes;

use plan::{ChunkRead, FilePlan, MountInfo, Totals};
use report::{Display, Ending, Progress};

/// The exit code of a warm stopped by Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: i32 = 130;

/// What `orcafs warm` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub paths: Vec<PathBuf>,
    pub dry_run: bool,
    /// Chunks read at once.
    pub jobs: usize,
    /// One line per file.
    pub verbose: bool,
    /// How often a progress line is printed when stderr is not a terminal.
    pub progress_every: Duration,
}

/// Ctrl-C (SIGINT) and SIGTERM: the first stops dispatching reads, the second exits at once.
/// The signals are blocked in this thread and every thread it starts from now on, and taken by
/// one watcher thread, so no read through the mount is interrupted half way.
fn watch_signals(stop: Arc<AtomicBool>) -> io::Result<()> {
    // SAFETY: sigemptyset/sigaddset fill a local set; pthread_sigmask changes this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new()
        .name("orcafs-warm-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("warm: stopped");
                std::process::exit(EXIT_INTERRUPTED);
            }
            eprintln!("warm: stopping after the reads in flight (Ctrl-C again to quit now)");
        })?;
    Ok(())
}

/// Warms `opts.paths`; returns the exit code (0, 1 when something failed, 130 when stopped), or
/// a one-line error when a path cannot be warmed at all.
pub fn run(opts: &Options, fs_type: &dyn Fn(&Path) -> Option<String>) -> Result<i32, String> {
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = watch_signals(stop.clone()) {
        eprintln!("warm: cannot catch Ctrl-C ({e}); it ends the command at once");
    }
    // Every path is located before anything is read: one bad path fails the command up front.
    let mut mounts: HashMap<PathBuf, Arc<MountInfo>> = HashMap::new();
    let mut roots = Vec::new();
    for p in &opts.paths {
        let (abs, info) = plan::locate(p, fs_type)?;
        let info = mounts
            .entry(info.mountpoint.clone())
            .or_insert_with(|| Arc::new(info))
            .clone();
        roots.push((abs, info));
    }
    let display = Display::for_stderr(opts.progress_every);
    let mut errors = Vec::new();
    let files = scan(&roots, &stop, &display, &mut errors);
    if stop.load(Ordering::SeqCst) {
        display.clear();
        println!("warm: interrupted while scanning; nothing fetched");
        return Ok(EXIT_INTERRUPTED);
    }
    let t = plan::totals(&files);
    if opts.dry_run {
        display.clear();
        return Ok(dry_run(&files, &t, opts.verbose, &errors));
    }
    display.note(&report::plan_line(&t));
    for line in plan::over_bound(&files) {
        display.note(&line);
    }
    let started = Instant::now();
    let progress = Progress::default();
    let finished = AtomicBool::new(false);
    let job = Job::new(&files, &stop, &progress, &display, opts.verbose);
    std::thread::scope(|s| {
        s.spawn(|| report::show_progress(&display, &t, &progress, started, &finished));
        let workers: Vec<_> = (0..opts.jobs.max(1))
            .map(|_| s.spawn(|| job.work()))
            .collect();
        for w in workers {
            let _ = w.join();
        }
        finished.store(true, Ordering::Relaxed);
    });
    let interrupted = stop.load(Ordering::SeqCst)
        && progress.chunks.load(Ordering::SeqCst) + progress.failed_chunks.load(Ordering::SeqCst)
            < t.fetch_chunks;
    let ending = if interrupted {
        Ending::Interrupted
    } else {
        Ending::Complete
    };
    if ending == Ending::Complete {
        let read_ok = files
            .iter()
            .zip(&job.failed)
            .filter(|(_, failed)| !failed.load(Ordering::Relaxed))
            .map(|(f, _)| f);
        let absent = plan::wait_committed(read_ok);
        if absent > 0 {
            eprintln!(
                "warm: {absent} chunks read are not in the local cache (evicted while warming? \
                 the cache may be smaller than what was warmed)"
            );
        }
    }
    let d = progress.snapshot(started);
    println!("{}", report::summary(&t, &d, ending));
    Ok(match ending {
        Ending::Interrupted => EXIT_INTERRUPTED,
        Ending::Complete if d.failed_chunks > 0 || !errors.is_empty() => 1,
        Ending::Complete => 0,
    })
}

/// Lists the files under every root and plans each; what cannot be planned is reported in
/// `errors` and left out.
fn scan(
    roots: &[(PathBuf, Arc<MountInfo>)],
    stop: &AtomicBool,
    display: &Display,
    errors: &mut Vec<String>,
) -> Vec<FilePlan> {
    display.scanning(0);
    let mut seen = BTreeSet::new();
    let mut plans = Vec::new();
    for (abs, mount) in roots {
        let mut found = Vec::new();
        plan::walk(abs, stop, &mut found, errors);
        let unreadable = plan::cache_unreadable(mount);
        if let Some(e) = unreadable {
            display.note(&format!(
                "warm: cannot look into the cache at {} ({e}): chunks already there are read \
                 again, from it, and counted as fetched",
                mount.cache_dir.display()
            ));
        }
        for path in found {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if !seen.insert(path.clone()) {
                continue;
            }
            match plan::plan_file(&path, mount) {
                Ok(p) => plans.push(p),
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
            display.scanning(plans.len());
        }
    }
    for e in errors.iter() {
        display.note(&format!("warm: {e}"));
    }
    plans
}

/// Prints what a run would fetch; fetches nothing.
fn dry_run(files: &[FilePlan], t: &Totals, verbose: bool, errors: &[String]) -> i32 {
    if verbose {
        for f in files {
            let (missing, all) = (
                f.chunks.missing.len(),
                chunk_count(f.object.size, f.mount.chunk_size),
            );
            if missing == 0 {
                println!(
                    "cached {:>10}  {}",
                    human_bytes(f.object.size),
                    f.path.display()
                );
            } else {
                println!(
                    "fetch  {:>10}  {missing} of {all} chunks  {}",
                    human_bytes(f.chunks.missing_bytes()),
                    f.path.display()
                );
            }
        }
    }
    println!(
        "warm: dry run: would fetch {} ({} bytes, {} chunks) of {} of {} objects; {} ({} bytes) \
         already cached",
        human_bytes(t.fetch_bytes),
        t.fetch_bytes,
        t.fetch_chunks,
        t.fetch_objects,
        t.objects,
        human_bytes(t.cached_bytes),
        t.cached_bytes
    );
    i32::from(!errors.is_empty())
}

/// A file's handle while its chunks are being read: opened by the first read, closed by the
/// last, so a large tree never holds more than a few files open.
enum Handle {
    Unopened,
    Open(Arc<File>),
    Closed,
}

/// The reads of a run, shared by the workers.
struct Job<'a> {
    files: &'a [FilePlan],
    /// The next read: (file, chunk of its missing list), in plan order.
    cursor: Mutex<(usize, usize)>,
    handles: Vec<Mutex<Handle>>,
    /// Reads not yet finished, per file.
    left: Vec<AtomicUsize>,
    failed: Vec<AtomicBool>,
    stop: &'a AtomicBool,
    progress: &'a Progress,
    display: &'a Display,
    verbose: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'a> Job<'a> {
    fn new(
        files: &'a [FilePlan],
        stop: &'a AtomicBool,
        progress: &'a Progress,
        display: &'a Display,
        verbose: bool,
    ) -> Job<'a> {
        Job {
            files,
            cursor: Mutex::new((0, 0)),
            handles: files.iter().map(|_| Mutex::new(Handle::Unopened)).collect(),
            left: files
                .iter()
                .map(|f| AtomicUsize::new(f.chunks.missing.len()))
                .collect(),
            failed: files.iter().map(|_| AtomicBool::new(false)).collect(),
            stop,
            progress,
            display,
            verbose,
        }
    }

    /// The next chunk to read, or None when all are dispatched or the run is stopping.
    fn next(&self) -> Option<(usize, ChunkRead)> {
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        let mut c = lock(&self.cursor);
        loop {
            let f = self.files.get(c.0)?;
            if let Some(read) = f.chunks.missing.get(c.1) {
                c.1 += 1;
                return Some((c.0, *read));
            }
            *c = (c.0 + 1, 0);
        }
    }

    fn work(&self) {
        while let Some((f, read)) = self.next() {
            let plan = &self.files[f];
            let result = self
                .open(f)
                .and_then(|file| read_chunk(&file, read.index * plan.mount.chunk_size, read.len));
            match result {
                Ok(()) => {
                    self.progress.bytes.fetch_add(read.len, Ordering::Relaxed);
                    self.progress.chunks.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.progress.failed_chunks.fetch_add(1, Ordering::Relaxed);
                    self.progress
                        .failed_bytes
                        .fetch_add(read.len, Ordering::Relaxed);
                    // One line per file: its other chunks likely fail the same way.
                    if !self.failed[f].swap(true, Ordering::Relaxed) {
                        self.display.note(&format!(
                            "warm: {}: chunk {}: {e}",
                            plan.path.display(),
                            read.index
                        ));
                    }
                }
            }
            if self.left[f].fetch_sub(1, Ordering::AcqRel) == 1 {
                self.finish(f);
            }
        }
    }

    /// The file's handle, opened by its first read; an error when it cannot be opened.
    fn open(&self, f: usize) -> io::Result<Arc<File>> {
        let mut h = lock(&self.handles[f]);
        match &*h {
            Handle::Open(file) => return Ok(file.clone()),
            Handle::Closed => return Err(io::Error::other("the file could not be opened")),
            Handle::Unopened => {}
        }
        let file = match File::open(&self.files[f].path) {
            Ok(file) => Arc::new(file),
            Err(e) => {
                *h = Handle::Closed;
                return Err(e);
            }
        };
        // Readahead would ask the mount for pages past the one this read needs.
        // SAFETY: plain fadvise on an open fd.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        // One byte per chunk would otherwise look like random reads, which fetch only a block:
        // ask the mount for whole chunks. (A mount that does not know the request fills whole
        // chunks anyway.)
        // SAFETY: an argument-less ioctl on an open fd; its failure changes nothing.
        unsafe { libc::ioctl(file.as_raw_fd(), crate::fs::IOC_WHOLE_CHUNKS as _) };
        *h = Handle::Open(file.clone());
        Ok(file)
    }

    /// The file's last read is done: close it and count it.
    fn finish(&self, f: usize) {
        *lock(&self.handles[f]) = Handle::Closed;
        if self.failed[f].load(Ordering::Relaxed) {
            return;
        }
        self.progress.objects.fetch_add(1, Ordering::Relaxed);
        if self.verbose {
            let plan = &self.files[f];
            self.display.note(&format!(
                "warmed {} ({}, {} chunks)",
                plan.path.display(),
                human_bytes(plan.chunks.missing_bytes()),
                plan.chunks.missing.len()
            ));
        }
    }
}

/// Reads the byte at the end of the chunk at `start`: the mount answers once the whole chunk
/// has arrived, and keeps it in its cache.
fn read_chunk(file: &File, start: u64, len: u64) -> io::Result<()> {
    // Dropped before so the read reaches the mount even if the page was cached, and after so
    // the warm does not fill this host's page cache.
    drop_pages(file, start, len);
    let mut byte = [0u8; 1];
    let n = loop {
        match file.read_at(&mut byte, start + len - 1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    drop_pages(file, start, len);
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file ends before its size (replaced at the origin?)",
        ));
    }
    Ok(())
}

fn drop_pages(file: &File, start: u64, len: u64) {
    let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(len)) else {
        return;
    };
    // SAFETY: plain fadvise on an open fd; advice only, its failure changes nothing.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), start, len, libc::POSIX_FADV_DONTNEED) };
}
