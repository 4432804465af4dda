//! `orcafs-bench`: measures a real orcafs mount end to end and writes the
//! results to a Markdown report (docs/benchmarks.md).
//!
//! One run starts a local S3 origin (`orcafs-devorigin`, s3s-fs on
//! 127.0.0.1) in a temporary directory, puts the test objects, mounts the
//! given `orcafs` binary for real (FUSE, `--foreground` so its pid is known)
//! and measures: cold sequential read vs a plain SDK GET, warm and hot
//! re-reads vs a local file, time to first byte, 4 KiB random reads (cached
//! IOPS, cold read amplification), origin bytes with 8 readers of one cold
//! object, and peak RSS with 8 readers of different objects. With
//! `--with-peers` it measures rclone and s3fs the same way when installed.
//!
//! Needs root (page cache dropping, mounting) and /dev/fuse. Run it through
//! `scripts/bench`; it is not part of `cargo test`.

mod error;
mod fs;
mod fsmount;
mod origin;
mod phases;
mod reads;
mod report;
mod sys;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use orcafs_devorigin::DevOrigin;

use crate::error::{Context, Result};
use crate::fs::{Fs, MountEnv};
use crate::origin::{PlainClient, Plan};
use crate::phases::{Bench, Knobs};
use crate::report::{PeerRow, Quantity, Report, Row, Target};

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
    /// Random 4 KiB reads of the cached object.
    #[arg(long, default_value_t = 2000)]
    random_reads: usize,
    /// Random 4 KiB reads of the cold object (origin bytes test).
    #[arg(long, default_value_t = 100)]
    cold_random_reads: usize,
    /// Never-read objects timed for the time to first byte (median).
    #[arg(long, default_value_t = 5)]
    ttfb_samples: usize,
    /// Size of each time-to-first-byte object, MiB.
    #[arg(long, default_value_t = 64)]
    ttfb_object_mib: u64,
    /// Also measure rclone and s3fs (each skipped when not installed).
    #[arg(long)]
    with_peers: bool,
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
}

impl Args {
    fn main_mib(&self) -> u64 {
        self.size_mib.unwrap_or(if self.quick { 256 } else { 1024 })
    }

    fn rss_mib(&self) -> u64 {
        self.rss_object_mib.unwrap_or(if self.quick { 256 } else { 1024 })
    }

    fn plan(&self) -> Plan {
        Plan {
            main_size: self.main_mib() * MIB,
            ttfb_objects: self.ttfb_samples,
            ttfb_size: self.ttfb_object_mib * MIB,
            rss_objects: self.readers,
            rss_size: self.rss_mib() * MIB,
        }
    }

    fn knobs(&self) -> Knobs {
        Knobs {
            random_reads: self.random_reads,
            cold_random_reads: self.cold_random_reads,
            readers: self.readers,
            phase_limit: Duration::from_secs(self.phase_timeout),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("orcafs-bench: some measurements failed; see {}", args.out.display());
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
    let outcome = run_in(args, work.path(), started);
    if args.keep_work {
        let kept = work.keep();
        eprintln!("orcafs-bench: kept the work directory {}", kept.display());
    }
    outcome
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
    if args.readers == 0 || args.ttfb_samples == 0 || args.main_mib() == 0 || args.rss_mib() == 0 {
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
    let origin = DevOrigin::start(&work.join("s3")).context("starting the local S3 origin")?;
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
    let data = plain.create_objects(&plan, &local_copy)?;
    let env = MountEnv {
        endpoint: origin.endpoint(),
        work: work.to_owned(),
        orcafs_flags: orcafs_flags(args, &orcafs)?,
        orcafs,
    };
    let mut bench = Bench::new(args.knobs(), origin, plain, data, env, local_copy);
    let mut report = new_report(args, &bench, work);
    let baselines = measure_orcafs(&mut bench, args, &mut report);
    if args.with_peers {
        measure_peers(&mut bench, &mut report, baselines);
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    write_report(&args.out, &report)?;
    print_summary(&report, &args.out);
    Ok(report.rows.iter().all(|r| r.outcome.is_ok()))
}

fn progress(what: &str) {
    eprintln!("== {what}");
}

/// Tuning flags for `orcafs mount`, each only if given and known to this orcafs.
fn orcafs_flags(args: &Args, orcafs: &Path) -> Result<Vec<String>> {
    let help = Command::new(orcafs)
        .args(["mount", "--help"])
        .output()
        .with_context(|| format!("running {} mount --help", orcafs.display()))?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let wanted = [
        ("--chunk-size", args.chunk_size.clone()),
        ("--readahead-chunks", args.readahead_chunks.map(|n| n.to_string())),
        ("--memory-limit", args.memory_limit.clone()),
        ("--max-origin-requests", args.max_origin_requests.map(|n| n.to_string())),
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
    Ok(flags)
}

fn new_report(args: &Args, bench: &Bench, work: &Path) -> Report {
    let program_command = std::env::args().collect::<Vec<_>>().join(" ");
    let command = std::env::var("ORCAFS_BENCH_COMMAND").unwrap_or_else(|_| program_command.clone());
    let plan = args.plan();
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
            format!("orcafs mount: `{}`", Fs::Orcafs.describe(&bench.env)),
        ],
        rows: Vec::new(),
        peers: None,
        peer_notes: Vec::new(),
        peer_baselines: (None, None),
        details: Vec::new(),
        elapsed_secs: 0.0,
    }
}

/// The baselines the peers are compared with too.
#[derive(Debug, Clone, Copy, Default)]
struct Baselines {
    plain_mibps: Option<f64>,
    local_warm_mibps: Option<f64>,
}

/// Every orcafs metric, in the order of the issue; failures become rows.
fn measure_orcafs(bench: &mut Bench, args: &Args, report: &mut Report) -> Baselines {
    progress("plain SDK GET of the large object");
    let plain = bench.plain_get();
    progress("orcafs: cold sequential read");
    let cold = bench.cold_seq(Fs::Orcafs);
    progress("orcafs: warm and hot re-read, cached random reads");
    let reread = bench.reread(Fs::Orcafs, true);
    progress("local file: cold, hot and random reads");
    let local = bench.local();
    sequential_rows(report, &plain, &cold, &reread, &local, bench.data.main_size);

    progress("orcafs: time to first byte");
    ttfb_rows(report, &bench.ttfb());
    random_rows(report, &reread, &local);
    progress("orcafs: random reads of a cold object");
    cold_random_rows(report, &bench.cold_random(), args.cold_random_reads);
    progress(&format!("orcafs: {} readers of one cold object", args.readers));
    readers_rows(report, &bench.readers(Fs::Orcafs), bench.data.main_size, args.readers);
    progress(&format!("orcafs: {} readers of different cold objects (memory)", args.readers));
    rss_rows(report, &bench.rss(), bench.data.rss_size, args.readers);
    Baselines {
        plain_mibps: plain.as_ref().ok().copied(),
        local_warm_mibps: local.as_ref().ok().map(|l| l.warm_mibps),
    }
}

const M_COLD: &str = "1. Cold sequential read (1 MiB reads)";
const M_WARM: &str = "2. Warm re-read from the disk cache (page cache dropped)";
const M_HOT: &str = "3. Hot re-read (page cache kept)";
const M_TTFB: &str = "4. Time to first byte, cold object (median)";
const M_RANDOM: &str = "5a. 4 KiB random reads, cached object";
const M_COLD_RANDOM: &str = "5b. 4 KiB random reads, cold object: origin bytes";
const M_READERS: &str = "6. Readers of one cold object: origin bytes";
const M_RSS: &str = "7. Peak RSS, readers of different cold objects";

fn err_text<T>(r: &Result<T>) -> String {
    r.as_ref().err().map(ToString::to_string).unwrap_or_default()
}

/// The first error of a list of results, as text.
fn first_error(results: &[String]) -> String {
    results.iter().find(|e| !e.is_empty()).cloned().unwrap_or_default()
}

fn sequential_rows(
    report: &mut Report,
    plain: &Result<f64>,
    cold: &Result<phases::ColdSeq>,
    reread: &Result<phases::Reread>,
    local: &Result<phases::Local>,
    size: u64,
) {
    let cold_target = Target::RatioAtLeast(1.05);
    report.rows.push(match (plain, cold) {
        (Ok(p), Ok(c)) => Row::compared(M_COLD, Quantity::MibPerSec(c.mibps), Quantity::MibPerSec(*p), "plain GET", cold_target),
        _ => Row::failed(M_COLD, &first_error(&[err_text(cold), err_text(plain)]), cold_target),
    });
    let (warm_target, hot_target) = (Target::RatioAtLeast(0.8), Target::RatioAtLeast(0.5));
    match (reread, local) {
        (Ok(r), Ok(l)) => {
            report.rows.push(Row::compared(M_WARM, Quantity::MibPerSec(r.warm_mibps), Quantity::MibPerSec(l.warm_mibps), "local file", warm_target));
            report.rows.push(Row::compared(M_HOT, Quantity::MibPerSec(r.hot_mibps), Quantity::MibPerSec(l.hot_mibps), "local file", hot_target));
        }
        _ => {
            let e = first_error(&[err_text(reread), err_text(local)]);
            report.rows.push(Row::failed(M_WARM, &e, warm_target));
            report.rows.push(Row::failed(M_HOT, &e, hot_target));
        }
    }
    if let Ok(c) = cold {
        report.details.push(format!(
            "Cold sequential read: the origin sent {:.3} x the object size ({} bytes).",
            c.origin_bytes as f64 / size as f64,
            c.origin_bytes
        ));
    }
    if let Ok(r) = reread {
        report.details.push(format!(
            "Warm and hot re-reads: the origin sent {} body bytes (0 = all from the disk cache).",
            r.origin_bytes
        ));
    }
}

fn ttfb_rows(report: &mut Report, ttfb: &Result<phases::Ttfb>) {
    let target = Target::RatioAtMost(1.5);
    let t = match ttfb {
        Ok(t) => t,
        Err(e) => return report.rows.push(Row::failed(M_TTFB, &e.to_string(), target)),
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mount, plain) = (reads::median(&t.mount), reads::median(&t.plain));
    report.rows.push(Row::compared(M_TTFB, Quantity::Millis(ms(mount)), Quantity::Millis(ms(plain)), "plain GET", target));
    let list = |v: &[Duration]| v.iter().map(|d| format!("{:.2}", ms(*d))).collect::<Vec<_>>().join(", ");
    report.details.push(format!(
        "Time to first byte samples (ms): orcafs {}; plain GET {}.",
        list(&t.mount),
        list(&t.plain)
    ));
}

fn random_rows(report: &mut Report, reread: &Result<phases::Reread>, local: &Result<phases::Local>) {
    let iops = reread.as_ref().ok().and_then(|r| r.random_iops);
    report.rows.push(match (iops, local) {
        (Some(i), Ok(l)) => Row::compared(M_RANDOM, Quantity::Iops(i), Quantity::Iops(l.random_iops), "local file", Target::None),
        _ => Row::failed(M_RANDOM, &first_error(&[err_text(reread), err_text(local)]), Target::None),
    });
}

fn cold_random_rows(report: &mut Report, r: &Result<phases::ColdRandom>, count: usize) {
    let metric = format!("{M_COLD_RANDOM} ({count} reads)");
    let r = match r {
        Ok(r) => r,
        Err(e) => return report.rows.push(Row::failed(&metric, &e.to_string(), Target::None)),
    };
    let mib = |b: u64| b as f64 / MIB as f64;
    report.rows.push(Row::compared(&metric, Quantity::Mib(mib(r.origin_bytes)), Quantity::Mib(mib(r.requested)), "bytes requested", Target::None));
    report.details.push(format!(
        "Cold random reads: {count} reads in {:.2} s ({:.0} IOPS).",
        r.elapsed.as_secs_f64(),
        count as f64 / r.elapsed.as_secs_f64()
    ));
}

fn readers_rows(report: &mut Report, r: &Result<phases::Readers>, size: u64, readers: usize) {
    let metric = format!("{} ({readers} threads)", M_READERS);
    let target = Target::RatioAtMost(1.0);
    let r = match r {
        Ok(r) => r,
        Err(e) => return report.rows.push(Row::failed(&metric, &e.to_string(), target)),
    };
    let mib = |b: u64| b as f64 / MIB as f64;
    report.rows.push(Row::compared(&metric, Quantity::Mib(mib(r.origin_bytes)), Quantity::Mib(mib(size)), "object size", target));
    report.details.push(format!(
        "{readers} readers of one cold object: all done in {:.1} s ({:.1} MiB/s per reader).",
        r.elapsed.as_secs_f64(),
        mib(size) / r.elapsed.as_secs_f64()
    ));
}

fn rss_rows(report: &mut Report, r: &Result<phases::Rss>, size: u64, readers: usize) {
    let metric = format!("{M_RSS} ({readers} x {} MiB), MiB", size / MIB);
    let target = Target::ValueAtMost(256.0);
    let r = match r {
        Ok(r) => r,
        Err(e) => return report.rows.push(Row::failed(&metric, &e.to_string(), target)),
    };
    let mib = |b: u64| b as f64 / MIB as f64;
    report.rows.push(Row::alone(&metric, Quantity::Mib(mib(r.hwm_bytes)), target));
    let total = size * readers as u64;
    report.details.push(format!(
        "Memory test: orcafs RSS {:.1} MiB when idle after mounting; {readers} x {} MiB read in {:.1} s ({:.1} MiB/s in all); origin sent {:.3} x the bytes read.",
        mib(r.idle_bytes),
        size / MIB,
        r.elapsed.as_secs_f64(),
        mib(total) / r.elapsed.as_secs_f64(),
        r.origin_bytes as f64 / total as f64
    ));
}

/// rclone and s3fs: cold read, warm re-read and shared-object origin bytes.
fn measure_peers(bench: &mut Bench, report: &mut Report, baselines: Baselines) {
    report.peer_baselines = (baselines.plain_mibps, baselines.local_warm_mibps);
    let mut rows = vec![orcafs_peer_row(report)];
    for fs in [Fs::Rclone, Fs::S3fs] {
        if !fs.installed() {
            report.peer_notes.push(format!("{}: not installed, skipped.", fs.name()));
            continue;
        }
        report.peer_notes.push(format!("{}: `{}`", fs.name(), fs.describe(&bench.env)));
        rows.push(measure_peer(bench, fs));
    }
    report.peers = Some(rows);
}

/// The orcafs line of the peer table, from the rows already measured.
fn orcafs_peer_row(report: &Report) -> PeerRow {
    let value = |prefix: &str| -> std::result::Result<f64, String> {
        let row = report.rows.iter().find(|r| r.metric.starts_with(prefix));
        match row.map(|r| &r.outcome) {
            Some(Ok(m)) => Ok(m.value_number()),
            Some(Err(e)) => Err(e.clone()),
            None => Err("not measured".into()),
        }
    };
    let readers = report
        .rows
        .iter()
        .find(|r| r.metric.starts_with(M_READERS))
        .and_then(|r| r.outcome.as_ref().ok())
        .and_then(|m| m.ratio())
        .ok_or_else(|| "not measured".to_string());
    PeerRow {
        name: "orcafs".into(),
        cold_seq: value(M_COLD),
        warm: value(M_WARM),
        readers8: readers,
    }
}

fn measure_peer(bench: &mut Bench, fs: Fs) -> PeerRow {
    let text = |e: error::Error| e.to_string();
    progress(&format!("{}: cold sequential read", fs.name()));
    let cold = bench.cold_seq(fs).map(|c| c.mibps).map_err(text);
    progress(&format!("{}: warm re-read", fs.name()));
    let warm = bench.reread(fs, false).map(|r| r.warm_mibps).map_err(text);
    progress(&format!("{}: readers of one cold object", fs.name()));
    let size = bench.data.main_size as f64;
    let readers8 = bench.readers(fs).map(|r| r.origin_bytes as f64 / size).map_err(text);
    PeerRow {
        name: fs.name().into(),
        cold_seq: cold,
        warm,
        readers8,
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
