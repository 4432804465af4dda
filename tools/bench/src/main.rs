//! `orcafs-bench`: measures a real orcafs mount end to end and writes the
//! results to a Markdown report (docs/benchmarks.md).
//!
//! One run starts a local S3 origin on 127.0.0.1 in a temporary directory (a
//! single-node Garage by default, s3s-fs with `--origin s3s-fs`), puts the
//! test objects, mounts the given `orcafs` binary for real (FUSE,
//! `--foreground` so its pid is known) and measures: cold sequential read vs
//! a plain SDK GET and vs parallel ranged GETs, warm (1 MiB and 128 KiB
//! reads), hot and random (4 KiB and 1 MiB) reads of the cached object with
//! FUSE passthrough and without vs the same reads of a local file, time to
//! first byte, random 4 KiB reads of a cold object (origin bytes per read,
//! IOPS vs plain ranged GETs), origin bytes with 8 readers of one cold
//! object, peak RSS with 8 readers of different objects, directory listings
//! (`ls -l`, first names, tree walks) vs plain LISTs and local directories,
//! and a cold read with a hung shared cache store. With `--with-peers` it
//! measures rclone, s3fs and Mountpoint the same way when installed. The
//! report sums up the goals of issue #13 from the rows.
//!
//! Needs root (page cache dropping, mounting) and /dev/fuse. Run it through
//! `scripts/bench`, which runs it in a network namespace of its own with
//! delayed ACKs off on loopback; it is not part of `cargo test`.

mod dir_rows;
mod dirs;
mod error;
mod fs;
mod fsmount;
mod measure;
mod origin;
mod paced;
mod phases;
mod reads;
mod report;
mod seq_rows;
mod server;
mod shared;
mod sys;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::error::{Context, Result};
use crate::fs::{Fs, MountEnv};
use crate::origin::{PlainClient, Plan};
use crate::phases::{Bench, Knobs, Phase};
use crate::report::Report;
use crate::server::{OriginKind, OriginServer};

/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;

/// Measure a real orcafs mount against a local S3 origin and write a Markdown report.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The orcafs binary to mount (use a release build).
    #[arg(long, default_value = "target/release/orcafs")]
    orcafs: PathBuf,
    /// Where to write the report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Size of the large object, MiB [default: 1024, 256 with --quick].
    #[arg(long)]
    size_mib: Option<u64>,
    /// Size of each object of the memory test, MiB [default: 1024, 256 with --quick].
    #[arg(long)]
    rss_object_mib: Option<u64>,
    /// Use 256 MiB objects everywhere (a few minutes less).
    #[arg(long)]
    quick: bool,
    /// Concurrent readers in the shared-object and memory tests.
    #[arg(long, default_value_t = 8)]
    readers: usize,
    /// Rounds of the sequential, re-read and cached random measurements
    /// (the table shows medians).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Random 4 KiB reads of the cached object.
    #[arg(long, default_value_t = 2000)]
    random_reads: usize,
    /// Random 1 MiB reads of the cached object.
    #[arg(long, default_value_t = 400)]
    random_large_reads: usize,
    /// Random 4 KiB reads of the cold object in each round (origin bytes and IOPS).
    #[arg(long, default_value_t = 100)]
    cold_random_reads: usize,
    /// Ranged GETs at once of the parallel baseline of the cold sequential read.
    #[arg(long, default_value_t = 8)]
    parallel_gets: usize,
    /// Never-read objects timed for the time to first byte (median).
    #[arg(long, default_value_t = 15)]
    ttfb_samples: usize,
    /// Size of each time-to-first-byte object, MiB.
    #[arg(long, default_value_t = 64)]
    ttfb_object_mib: u64,
    /// Also measure rclone, s3fs and Mountpoint (`mount-s3`), each skipped when not installed.
    #[arg(long)]
    with_peers: bool,
    /// The S3 server to measure against.
    #[arg(long, value_enum, default_value = "garage")]
    origin: OriginKind,
    /// Objects of the large directory (rows 8-10).
    #[arg(long, default_value_t = 30_000)]
    dir_objects: usize,
    /// Directories of the tree (row 11).
    #[arg(long, default_value_t = 100)]
    tree_dirs: usize,
    /// Objects in each directory of the tree.
    #[arg(long, default_value_t = 300)]
    tree_objects: usize,
    /// Objects of the one-page directory (row 12).
    #[arg(long, default_value_t = 1000)]
    page_objects: usize,
    /// Internal: run as the TCP proxy in front of the shared store (row 13) and do nothing else.
    #[arg(long, hide = true, value_name = "ADDR")]
    tcp_proxy_to: Option<std::net::SocketAddr>,
    /// Internal: with --tcp-proxy-to, pace each client connection to this many bytes a second.
    #[arg(long, hide = true, value_name = "BYTES")]
    tcp_proxy_pace: Option<u64>,
    /// Per-connection rate of the paced origin (rows 1d, 1e), MiB/s.
    #[arg(long, default_value_t = 25)]
    paced_mibps: u64,
    /// Directory for the temporary origin, caches, mounts and local copy.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the temporary directory (logs) instead of deleting it.
    #[arg(long)]
    keep_work: bool,
    /// Seconds a phase may run before the filesystem is killed as hung.
    #[arg(long, default_value_t = 900)]
    phase_timeout: u64,
    /// orcafs --chunk-size (default: orcafs's own).
    #[arg(long)]
    chunk_size: Option<String>,
    /// orcafs --readahead-chunks, passed only if this orcafs has the flag.
    #[arg(long)]
    readahead_chunks: Option<u32>,
    /// orcafs --memory-limit, passed only if this orcafs has the flag.
    #[arg(long)]
    memory_limit: Option<String>,
    /// orcafs --max-origin-requests, passed only if this orcafs has the flag.
    #[arg(long)]
    max_origin_requests: Option<u32>,
    /// Measure only these orcafs phases (for profiling; write to another --out).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Phase>,
}

impl Args {
    fn main_mib(&self) -> u64 {
        self.size_mib.unwrap_or(if self.quick { 256 } else { 1024 })
    }

    fn rss_mib(&self) -> u64 {
        self.rss_object_mib
            .unwrap_or(if self.quick { 256 } else { 1024 })
    }

    fn plan(&self) -> Plan {
        Plan {
            main_size: self.main_mib() * MIB,
            ttfb_objects: self.ttfb_samples,
            ttfb_size: self.ttfb_object_mib * MIB,
            rss_objects: self.readers,
            rss_size: self.rss_mib() * MIB,
            dir_large: self.dir_objects,
            dir_page: self.page_objects,
            tree: (self.tree_dirs, self.tree_objects),
        }
    }

    fn knobs(&self) -> Knobs {
        Knobs {
            random_reads: self.random_reads,
            random_large_reads: self.random_large_reads,
            cold_random_reads: self.cold_random_reads,
            parallel_gets: self.parallel_gets,
            readers: self.readers,
            repeat: self.repeat,
            phase_limit: Duration::from_secs(self.phase_timeout),
            only: self.only.clone(),
            paced_mibps: self.paced_mibps,
            mountpoint_paced: self.with_peers && Fs::MountpointNoCache.installed(),
            mountpoint_cold: self.with_peers && Fs::MountpointNoCache.installed(),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(target) = args.tcp_proxy_to {
        return match shared::serve(target, args.tcp_proxy_pace) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("orcafs-bench proxy: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "orcafs-bench: some measurements failed; see {}",
                args.out.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("orcafs-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything and writes the report; `Ok(false)` when a phase failed.
fn run(args: &Args) -> Result<bool> {
    let started = Instant::now();
    preflight(args)?;
    let work = make_work_dir(args)?;
    clean_up_on_signals(work.path().to_owned(), args.keep_work)?;
    let outcome = run_in(args, work.path(), started);
    if args.keep_work {
        let kept = work.keep();
        eprintln!("orcafs-bench: kept the work directory {}", kept.display());
    }
    outcome
}

/// On SIGINT, SIGTERM or SIGHUP: kill the filesystems, unmount, delete the
/// work directory and exit. Must run before any thread starts, so that every
/// thread inherits the blocked mask and only the waiting thread sees them.
fn clean_up_on_signals(work: PathBuf, keep: bool) -> Result<()> {
    // SAFETY: plain signal-set manipulation on a local, zero-initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(error::Error::msg(format!("pthread_sigmask failed: {rc}")));
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits for one of the signals blocked above.
            unsafe { libc::sigwait(&set, &mut sig) };
            eprintln!("orcafs-bench: signal {sig}: unmounting and cleaning up");
            fsmount::abort_all();
            if !keep {
                remove_racing_writers(&work);
            }
            std::process::exit(128 + sig);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Deletes `dir` while the origin may still be writing into it: retries
/// when a file appears behind the deletion.
fn remove_racing_writers(dir: &Path) {
    for _ in 0..20 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("orcafs-bench: could not delete {}", dir.display());
}

fn preflight(args: &Args) -> Result<()> {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(error::Error::msg(
            "needs root: it drops the page cache and mounts FUSE filesystems",
        ));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(error::Error::msg("/dev/fuse is missing (modprobe fuse)"));
    }
    if !args.orcafs.is_file() {
        return Err(error::Error::msg(format!(
            "no orcafs binary at {} (cargo build --release -p orcafs)",
            args.orcafs.display()
        )));
    }
    if args.readers == 0
        || args.repeat == 0
        || args.parallel_gets == 0
        || args.random_reads == 0
        || args.random_large_reads == 0
        || args.cold_random_reads == 0
        || args.ttfb_samples == 0
        || args.main_mib() == 0
        || args.rss_mib() == 0
        || args.dir_objects == 0
        || args.page_objects == 0
        || args.tree_dirs == 0
        || args.tree_objects == 0
        || args.paced_mibps == 0
    {
        return Err(error::Error::msg("counts and sizes must be at least 1"));
    }
    Ok(())
}

fn make_work_dir(args: &Args) -> Result<tempfile::TempDir> {
    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix("orcafs-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))
}

fn run_in(args: &Args, work: &Path, started: Instant) -> Result<bool> {
    let orcafs = args
        .orcafs
        .canonicalize()
        .with_context(|| format!("resolving {}", args.orcafs.display()))?;
    progress(&format!("starting the origin ({:?})", args.origin));
    let origin = OriginServer::start(args.origin, work)?;
    let plain = PlainClient::new(&origin)?;
    let plan = args.plan();
    progress(&format!(
        "putting objects: {} MiB, {} x {} MiB, {} x {} MiB",
        plan.main_size / MIB,
        plan.ttfb_objects,
        plan.ttfb_size / MIB,
        plan.rss_objects,
        plan.rss_size / MIB
    ));
    let local_copy = work.join("local-copy.bin");
    let put_started = Instant::now();
    let data = plain.create_objects(&origin, &plan, &local_copy)?;
    let put_secs = put_started.elapsed().as_secs_f64();
    let help = orcafs_mount_help(&orcafs)?;
    let env = MountEnv {
        endpoint: origin.endpoint(),
        access_key: origin.access_key(),
        secret_key: origin.secret_key(),
        work: work.to_owned(),
        orcafs_flags: orcafs_flags(args, &help),
        no_passthrough: help.contains(phases::NO_PASSTHROUGH),
        orcafs,
    };
    // The puts leave the page cache full and the server busy finishing them: the first
    // rounds would pay for reclaiming that memory and share the cores with that work.
    let settled = sys::settle(origin.pid())?;
    let retrans_at_start = sys::tcp_retransmitted_segments();
    let mut bench = Bench::new(args.knobs(), origin, plain, data, env, local_copy);
    let mut report = new_report(args, &bench, work);
    report
        .details
        .push(format!("Putting every object took {put_secs:.0} s."));
    let idle_share = sys::IDLE_SHARE * 100.0;
    report.details.push(match settled {
        sys::Settled::Idle(s) => format!(
            "Then the origin server was left to finish its work ({:.0} s, until it used under \
             {idle_share:.0}% of a core for a second) and the page cache was dropped.",
            s.as_secs_f64()
        ),
        sys::Settled::Busy(s) => format!(
            "Then the origin server was left to finish its work, but after {:.0} s it still \
             used over {idle_share:.0}% of a core; the page cache was dropped and measuring \
             started anyway.",
            s.as_secs_f64()
        ),
        sys::Settled::Unknown => "Then the page cache was dropped.".into(),
    });
    let baselines = measure::measure_orcafs(&mut bench, &mut report);
    if args.with_peers && args.only.is_empty() {
        measure::measure_peers(&mut bench, &mut report, baselines);
    }
    if let (Some(first), Some(last)) = (retrans_at_start, sys::tcp_retransmitted_segments()) {
        report.details.push(format!(
            "TCP segments retransmitted in the bench's network namespace during the run: {} \
             (loopback loses nothing: any are spurious, and each adds up to 64 KiB to the \
             origin bytes counted).",
            last.saturating_sub(first)
        ));
    }
    report.details.push(format!(
        "Load average at the end: {}. Anything else running (builds, tests) disturbs the numbers.",
        sys::load_average()
    ));
    report.elapsed_secs = started.elapsed().as_secs_f64();
    write_report(&args.out, &report)?;
    print_summary(&report, &args.out);
    Ok(report
        .rows
        .iter()
        .all(|r| r.outcome.is_ok() || !r.attempted()))
}

/// One line of progress on stderr.
pub fn progress(what: &str) {
    eprintln!("== {what}");
}

/// `orcafs mount --help`: which flags this orcafs has.
fn orcafs_mount_help(orcafs: &Path) -> Result<String> {
    let help = Command::new(orcafs)
        .args(["mount", "--help"])
        .output()
        .with_context(|| format!("running {} mount --help", orcafs.display()))?;
    Ok(String::from_utf8_lossy(&help.stdout).into_owned())
}

/// Tuning flags for `orcafs mount`, each only if given and known to this orcafs (`help`).
fn orcafs_flags(args: &Args, help: &str) -> Vec<String> {
    let wanted = [
        ("--chunk-size", args.chunk_size.clone()),
        (
            "--readahead-chunks",
            args.readahead_chunks.map(|n| n.to_string()),
        ),
        ("--memory-limit", args.memory_limit.clone()),
        (
            "--max-origin-requests",
            args.max_origin_requests.map(|n| n.to_string()),
        ),
    ];
    let mut flags = Vec::new();
    for (flag, value) in wanted {
        let Some(value) = value else { continue };
        if help.contains(flag) {
            flags.extend([flag.to_owned(), value]);
        } else {
            eprintln!("orcafs-bench: this orcafs has no {flag}; not passing it");
        }
    }
    flags
}

fn new_report(args: &Args, bench: &Bench, work: &Path) -> Report {
    let program_command = std::env::args().collect::<Vec<_>>().join(" ");
    let command = std::env::var("ORCAFS_BENCH_COMMAND").unwrap_or_else(|_| program_command.clone());
    let plan = args.plan();
    let (goals_issue, goals) = measure::issue_goals();
    Report {
        machine: sys::Machine::describe(work),
        command,
        program_command,
        setup: vec![
            format!(
                "Objects: large object {} MiB; {} time-to-first-byte objects of {} MiB; {} memory-test objects of {} MiB",
                plan.main_size / MIB,
                plan.ttfb_objects,
                plan.ttfb_size / MIB,
                plan.rss_objects,
                plan.rss_size / MIB
            ),
            format!(
                "Directories: {} objects in one prefix (rows 8-10); a tree of {} x {} objects (row 11); {} objects in one prefix (row 12)",
                plan.dir_large, plan.tree.0, plan.tree.1, plan.dir_page
            ),
            format!(
                "Reads: {} rounds; per round {} random 4 KiB and {} random 1 MiB reads of the cached large object, {} random 4 KiB reads of the cold large object, {} parallel ranged GETs for row 1b",
                args.repeat, args.random_reads, args.random_large_reads, args.cold_random_reads, args.parallel_gets
            ),
            format!("Origin: {}", bench.origin.describe()),
            format!("Network: {}", sys::loopback_setup()),
            format!("orcafs mount: `{}`", Fs::Orcafs.describe(&bench.env)),
            format!(
                "Cached-read rows: that mount (FUSE passthrough where the kernel and privileges allow it; this orcafs {} `{}`) and the same mount with `{}` added",
                if bench.env.no_passthrough { "has" } else { "has **no**" },
                phases::NO_PASSTHROUGH,
                phases::NO_PASSTHROUGH
            ),
            format!(
                "Directory rows mount orcafs with `--metadata-ttl {}` added; row 13 with `--config FILE` naming the shared store",
                dir_rows::metadata_ttl()
            ),
        ],
        rows: Vec::new(),
        goals_issue,
        goals,
        peers: None,
        peer_notes: Vec::new(),
        peer_baselines: Default::default(),
        details: vec![format!(
            "Load average (1, 5, 15 min) when measuring started: {}.",
            sys::load_average()
        )],
        elapsed_secs: 0.0,
    }
}

fn write_report(out: &Path, report: &Report) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, report.to_markdown()).with_context(|| format!("writing {}", out.display()))
}

fn print_summary(report: &Report, out: &Path) {
    eprintln!("== results (written to {}):", out.display());
    let md = report.to_markdown();
    let table = md
        .lines()
        .skip_while(|l| !l.starts_with("| Metric"))
        .take_while(|l| l.starts_with('|'));
    for line in table {
        eprintln!("{line}");
    }
    let bad = report.rows.iter().filter(|r| r.is_bad()).count();
    if bad > 0 {
        eprintln!("== {bad} row(s) failed or missed their target");
    }
}
