//! Runs the phases in order and turns their results (or errors) into the
//! report's rows and details.

use std::time::Duration;

use crate::dir_rows::{self, PageMedians};
use crate::error::{Context, Result};
use crate::fs::Fs;
use crate::origin::{BIG_DIR_FILLERS, KERNEL_FIRST_READ};
use crate::paced;
use crate::phases::{self, Bench, ColdSeq, Phase, NO_PASSTHROUGH};
use crate::reads;
use crate::report::{Goal, PeerBaselines, PeerRow, Quantity, Report, Row, Target};
use crate::seq_rows::{self, CachedMedians, CachedRound, ColdRound, L_MOUNTPOINT, L_S3FS};
use crate::{progress, sys, MIB};

/// The baselines and orcafs numbers the peers are compared with too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baselines {
    plain_mibps: Option<f64>,
    /// orcafs's cold sequential read (median), MiB/s.
    orcafs_cold_mibps: Option<f64>,
    /// Medians of the cached reads: default mount, `--no-passthrough`, local file.
    cached: Option<CachedMedians>,
    /// orcafs's `ls -l` of one page and its baselines.
    page: Option<PageMedians>,
}

/// The goals of issue #13 and the rows that measure them (rows with a target only count).
pub fn issue_goals() -> (String, Vec<Goal>) {
    let goal = |text: &str, rows: &[&str]| Goal {
        text: text.into(),
        rows: rows.iter().map(|r| (*r).to_owned()).collect(),
    };
    let goals = vec![
        goal(
            "Cold sequential read at the server's ceiling: ≥ 0.9 x parallel ranged GETs of the \
             object, ≥ 1.1 x Mountpoint without its cache (on loopback, and from an origin that \
             paces each connection as a remote endpoint does)",
            &["1b.", L_MOUNTPOINT, "1d.", "1e."],
        ),
        goal(
            "Cold random 4 KiB reads: ≤ 64 KiB of origin bytes per read (≤ 16 x the bytes \
             asked), ≥ 0.7 x the IOPS of plain ranged GETs one at a time",
            &["5b.", "5c."],
        ),
        goal(
            "Cached reads at local speed (FUSE passthrough): warm 1 MiB and 128 KiB reads, hot \
             reads, random 4 KiB and 1 MiB reads ≥ 0.8 x the same reads of the local file",
            &["2.", "2b.", "3.", "5a.", "5d."],
        ),
        goal(
            "FUSE path without passthrough: cached random 4 KiB reads ≥ 1.0 x s3fs",
            &[L_S3FS],
        ),
    ];
    ("#13".into(), goals)
}

/// Mountpoint's cold read without its cache (row 1c), in a fresh cache directory deleted after.
fn mountpoint_cold(bench: &mut Bench) -> std::result::Result<ColdSeq, String> {
    let nocache = Fs::MountpointNoCache;
    let cold = bench.cold_seq(nocache).map_err(|e| e.to_string());
    if let Err(e) = bench.forget_cache(nocache) {
        eprintln!("orcafs-bench: {e}");
    }
    cold
}

/// Every orcafs metric, in the order of the issue; failures become rows.
pub fn measure_orcafs(bench: &mut Bench, report: &mut Report) -> Baselines {
    let rounds = bench.knobs.repeat;
    let readers = bench.knobs.readers;
    let knobs = bench.knobs.clone();
    let size = bench.data.main_size;
    let mut out = Baselines::default();
    if knobs.runs(Phase::Cold) {
        let parallel = knobs.parallel_gets;
        let what =
            format!("plain GET, {parallel} parallel ranged GETs, orcafs cold sequential read");
        let gib = |field| sys::meminfo_bytes(field).map(|b| b as f64 / (1u64 << 30) as f64);
        if let (Some(total), Some(free), Some(cached)) =
            (gib("MemTotal"), gib("MemFree"), gib("Cached"))
        {
            report.details.push(format!(
                "Memory when the cold rounds started: {free:.1} GiB free of {total:.1}, \
                 {cached:.1} GiB page cache (where free memory runs short, the pages a cold \
                 read needs, for the reader and for a cache file, are reclaimed from the page \
                 cache, at a CPU cost to the process that asks)."
            ));
        }
        let what = match knobs.mountpoint_cold {
            true => format!("{what}, Mountpoint's without its cache"),
            false => what,
        };
        let cold = repeated(rounds, &what, || {
            Ok(ColdRound {
                plain: bench.plain_get().context("plain GET")?,
                parallel: bench.plain_parallel_get().context("parallel ranged GETs")?,
                orcafs: bench.cold_seq(Fs::Orcafs)?,
                mountpoint: match knobs.mountpoint_cold {
                    true => Some(mountpoint_cold(bench)),
                    false => None,
                },
            })
        });
        out.plain_mibps = cold
            .as_ref()
            .ok()
            .map(|v| median_of(v.iter().map(|r| r.plain.mibps)));
        out.orcafs_cold_mibps = seq_rows::cold_rows(report, &cold, size, parallel);
    }
    if knobs.runs(Phase::Paced) {
        let rounds = bench.paced_rounds();
        paced::paced_rows(
            report,
            &rounds,
            knobs.paced_mibps,
            knobs.parallel_gets,
            knobs.mountpoint_paced,
            size,
        );
    }
    let mut cached = Err(skipped());
    if knobs.runs(Phase::Cached) {
        cached = cached_rounds(bench, rounds);
        if let Err(e) = bench.forget_cache(Fs::Orcafs) {
            report
                .details
                .push(format!("Could not delete a cache directory: {e}"));
        }
        out.cached = seq_rows::cached_sequential_rows(report, &cached);
    }
    if knobs.runs(Phase::Ttfb) {
        progress("orcafs: time to first byte");
        ttfb_rows(report, &bench.ttfb());
    }
    if knobs.runs(Phase::Cached) {
        seq_rows::cached_random_rows(report, &cached, false);
    }
    if knobs.runs(Phase::ColdRandom) {
        let what = format!(
            "plain 4 KiB ranged GETs, then orcafs random reads of a cold object ({} reads)",
            knobs.cold_random_reads
        );
        let mut round = 0;
        let v = repeated(rounds, &what, || {
            round += 1;
            bench.cold_random(round)
        });
        seq_rows::cold_random_rows(report, &v, size);
    }
    if knobs.runs(Phase::Cached) {
        seq_rows::cached_random_rows(report, &cached, true);
    }
    if knobs.runs(Phase::Readers) {
        progress(&format!("orcafs: {} readers of one cold object", readers));
        readers_rows(report, &bench.readers(Fs::Orcafs), size, readers);
    }
    if knobs.runs(Phase::Rss) {
        progress(&format!(
            "orcafs: {} readers of different cold objects (memory)",
            readers
        ));
        rss_rows(report, &bench.rss(), bench.data.rss_size, readers);
    }
    if knobs.runs(Phase::Dirs) {
        out.page = dir_rows::measure_dirs(bench, report);
    }
    if knobs.runs(Phase::SharedStall) {
        dir_rows::measure_shared_stall(bench, report);
    }
    out
}

/// The rounds of the cached reads: the default mount, a `--no-passthrough` mount and the local
/// file, each round in that order over the cache of the last cold read (one unmeasured cold
/// read fills it when the cold phase did not run).
fn cached_rounds(bench: &mut Bench, rounds: usize) -> Result<Vec<CachedRound>> {
    if !bench.knobs.runs(Phase::Cold) {
        progress("orcafs: one cold read to fill the cache");
        bench.cold_seq(Fs::Orcafs).context("filling the cache")?;
    }
    let no_passthrough = [NO_PASSTHROUGH.to_owned()];
    let what = "orcafs cached reads with passthrough, then with --no-passthrough; the local file";
    repeated(rounds, what, || {
        Ok(CachedRound {
            passthrough: bench.reread(Fs::Orcafs, &[]).context("default mount")?,
            fuse: bench
                .reread(Fs::Orcafs, &no_passthrough)
                .context("--no-passthrough mount")?,
            local: bench.local().context("local file")?,
        })
    })
}

fn skipped() -> crate::error::Error {
    crate::error::Error::msg("not measured in this run (--only)")
}

/// Runs `f` for each of `rounds` rounds; the first error ends it.
pub fn repeated<T>(rounds: usize, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    (0..rounds)
        .map(|i| {
            progress(&format!("{what} (round {} of {rounds})", i + 1));
            f().with_context(|| format!("round {} of {rounds}", i + 1))
        })
        .collect()
}

/// Median of the values (the upper middle for even counts).
pub fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Values as a short comma-separated list.
pub fn listed(values: impl Iterator<Item = f64>) -> String {
    values
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

const M_TTFB: &str = "4. Time to first byte, cold object (stat + open + 4 KiB read, median)";
const M_TTFB_BIG: &str =
    "4b. The same, name in a directory of over 1000 objects (lookup = LIST + HEAD)";
const M_READERS: &str = "6. Readers of one cold object: origin bytes";
const M_RSS: &str = "7. Peak RSS, readers of different cold objects";

fn ttfb_rows(report: &mut Report, ttfb: &Result<phases::Ttfb>) {
    let target = Target::RatioAtMost(1.5);
    let Some(t) = report.ok_or_fail(ttfb, &[(M_TTFB, target)]) else {
        return;
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // The baseline is timed to the bytes the kernel asks orcafs for, not to the first byte.
    let (mount, plain) = (reads::median(&t.mount), reads::median(&t.plain_16k));
    let plain_what = format!("plain GET, first {} KiB", KERNEL_FIRST_READ >> 10);
    report.rows.push(Row::compared(
        M_TTFB,
        Quantity::Millis(ms(mount)),
        Quantity::Millis(ms(plain)),
        &plain_what,
        target,
    ));
    let list = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.2}", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.rows.push(Row::compared(
        M_TTFB_BIG,
        Quantity::Millis(ms(reads::median(&t.big_dir))),
        Quantity::Millis(ms(plain)),
        &plain_what,
        Target::None,
    ));
    report.details.push(format!(
        "Time to first byte samples (ms): orcafs {} (of which the name lookup: {}, median {:.2}); \
         in a directory of more than {} objects {} (lookup: {}, median {:.2}); plain GET {}. \
         A 4 KiB `pread` at offset 0 reaches orcafs as a {} KiB read (the kernel's first \
         readahead window); the plain GET's time to its first {} KiB: {} (median {:.2}).",
        list(&t.mount),
        list(&t.lookup),
        ms(reads::median(&t.lookup)),
        BIG_DIR_FILLERS,
        list(&t.big_dir),
        list(&t.big_dir_lookup),
        ms(reads::median(&t.big_dir_lookup)),
        list(&t.plain),
        KERNEL_FIRST_READ >> 10,
        KERNEL_FIRST_READ >> 10,
        list(&t.plain_16k),
        ms(reads::median(&t.plain_16k)),
    ));
}

fn readers_rows(report: &mut Report, r: &Result<phases::Readers>, size: u64, readers: usize) {
    let metric = format!("{} ({readers} threads)", M_READERS);
    let target = Target::RatioAtMost(1.0);
    let Some(r) = report.ok_or_fail(r, &[(&metric, target)]) else {
        return;
    };
    let mib = |b: u64| b as f64 / MIB as f64;
    report.rows.push(Row::compared(
        &metric,
        Quantity::Mib(mib(r.origin_bytes)),
        Quantity::Mib(mib(size)),
        "object size",
        target,
    ));
    report.details.push(format!(
        "{readers} readers of one cold object: all done in {:.1} s ({:.1} MiB/s per reader).",
        r.elapsed.as_secs_f64(),
        mib(size) / r.elapsed.as_secs_f64()
    ));
}

fn rss_rows(report: &mut Report, r: &Result<phases::Rss>, size: u64, readers: usize) {
    let metric = format!("{M_RSS} ({readers} x {} MiB)", size / MIB);
    let target = Target::ValueAtMost(256.0);
    let Some(r) = report.ok_or_fail(r, &[(&metric, target)]) else {
        return;
    };
    let mib = |b: u64| b as f64 / MIB as f64;
    report
        .rows
        .push(Row::alone(&metric, Quantity::Mib(mib(r.hwm_bytes)), target));
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

/// rclone, s3fs and Mountpoint: cold read, warm re-read, cached random 4 KiB reads,
/// shared-object origin bytes, and `ls -l` of one page cold and warm, and s3fs's random reads
/// beside orcafs's FUSE path (row 5e). (Mountpoint without its cache, row 1c, is read in the
/// cold rounds.)
pub fn measure_peers(bench: &mut Bench, report: &mut Report, b: Baselines) {
    report.peer_baselines = PeerBaselines {
        plain_mibps: b.plain_mibps,
        local_warm_mibps: b.cached.map(|c| c.local.warm_mibps),
        local_random_iops: b.cached.map(|c| c.local.random_iops),
        plain_ls_ms: b.page.map(|p| p.plain_page_ms),
        local_ls_ms: b.page.map(|p| p.local_ms),
    };
    let mut rows = orcafs_peer_rows(report, &b);
    for fs in [Fs::Rclone, Fs::S3fs, Fs::Mountpoint] {
        if !fs.installed() {
            let why = match fs {
                Fs::Mountpoint => {
                    "no `mount-s3` on PATH (Mountpoint has no Debian package), skipped"
                }
                _ => "not installed (scripts/bench --with-peers installs it), skipped",
            };
            report.peer_notes.push(format!("{}: {why}.", fs.name()));
            let label = match fs {
                Fs::Mountpoint => Some(L_MOUNTPOINT),
                Fs::S3fs => Some(L_S3FS),
                _ => None,
            };
            if let Some(label) = label {
                let why = why.trim_end_matches(", skipped");
                let row = seq_rows::peer_missing_row(label, &format!("{}: {why}", fs.name()));
                report.replace_row(label, row);
            }
            continue;
        }
        report
            .peer_notes
            .push(format!("{}: `{}`", fs.name(), fs.describe(&bench.env)));
        let row = measure_peer(bench, fs);
        if fs == Fs::S3fs {
            let (ours, theirs) = s3fs_beside_orcafs(bench, report);
            report.replace_row(L_S3FS, seq_rows::s3fs_row(ours, &theirs));
        }
        if fs == Fs::Mountpoint {
            let nocache = Fs::MountpointNoCache;
            report.peer_notes.push(format!(
                "{} (row 1c): `{}`",
                nocache.name(),
                nocache.describe(&bench.env)
            ));
        }
        rows.push(row);
    }
    report.peers = Some(rows);
}

/// The orcafs lines of the peer table, from the rows already measured: the default mount, and
/// the cached reads of the `--no-passthrough` mount.
fn orcafs_peer_rows(report: &Report, b: &Baselines) -> Vec<PeerRow> {
    let not = || Some(Err("not measured".to_string()));
    let or_not = |v: Option<f64>| v.map_or_else(not, |v| Some(Ok(v)));
    let readers = report
        .rows
        .iter()
        .find(|r| r.metric.starts_with(M_READERS))
        .and_then(|r| r.outcome.as_ref().ok())
        .and_then(|m| m.ratio());
    let page = b.page;
    let default = PeerRow {
        name: "orcafs".into(),
        cold_seq: or_not(b.orcafs_cold_mibps),
        warm: or_not(b.cached.map(|c| c.passthrough.warm_mibps)),
        random: or_not(b.cached.map(|c| c.passthrough.random_iops)),
        readers8: or_not(readers),
        ls_cold: or_not(page.map(|p| p.cold_ms)),
        ls_warm: or_not(page.map(|p| p.warm_ms)),
        ls_warm_requests: page.map_or_else(
            || Some(Err("not measured".to_string())),
            |p| Some(Ok(p.warm_requests)),
        ),
    };
    let fuse = PeerRow {
        name: format!("orcafs {NO_PASSTHROUGH}"),
        cold_seq: None,
        warm: or_not(b.cached.map(|c| c.fuse.warm_mibps)),
        random: or_not(b.cached.map(|c| c.fuse.random_iops)),
        readers8: None,
        ls_cold: None,
        ls_warm: None,
        ls_warm_requests: None,
    };
    vec![default, fuse]
}

/// Row 5e: cached random 4 KiB reads through orcafs's FUSE path (`--no-passthrough`) and
/// through s3fs, in rounds that alternate the two (a round of such reads swings by a fifth on
/// these VMs, and with the machine's state: only reads made back to back compare). orcafs's
/// cache is filled again first (an unmeasured cold read); s3fs's is the one its peer reads
/// filled. The medians of the alternated rounds, orcafs's and s3fs's.
fn s3fs_beside_orcafs(
    bench: &mut Bench,
    report: &mut Report,
) -> (Option<f64>, std::result::Result<f64, String>) {
    let flags = [NO_PASSTHROUGH.to_string()];
    let rounds = bench.knobs.repeat;
    progress("orcafs: one cold read to fill the cache again (row 5e)");
    let alternated = bench.cold_seq(Fs::Orcafs).and_then(|_| {
        repeated(
            rounds,
            "cached random reads, orcafs --no-passthrough then s3fs",
            || {
                let ours = bench.reread(Fs::Orcafs, &flags)?.reads.random_iops;
                let theirs = bench.reread(Fs::S3fs, &[])?.reads.random_iops;
                Ok((ours, theirs))
            },
        )
    });
    for fs in [Fs::Orcafs, Fs::S3fs] {
        if let Err(e) = bench.forget_cache(fs) {
            eprintln!("orcafs-bench: {e}");
        }
    }
    match alternated {
        Ok(v) => {
            report.details.push(format!(
                "Cached random 4 KiB (IOPS), alternated rounds for row 5e, orcafs \
                 `--no-passthrough` / s3fs: {} / {}.",
                listed(v.iter().map(|r| r.0)),
                listed(v.iter().map(|r| r.1))
            ));
            (
                Some(median_of(v.iter().map(|r| r.0))),
                Ok(median_of(v.iter().map(|r| r.1))),
            )
        }
        Err(e) => (None, Err(e.to_string())),
    }
}

fn measure_peer(bench: &mut Bench, fs: Fs) -> PeerRow {
    let text = |e: crate::error::Error| e.to_string();
    progress(&format!("{}: cold sequential read", fs.name()));
    let cold = bench.cold_seq(fs).map(|c| c.mibps).map_err(text);
    progress(&format!(
        "{}: warm re-read and cached random reads",
        fs.name()
    ));
    let reread = bench.reread(fs, &[]).map_err(text);
    let random = reread
        .as_ref()
        .map(|r| r.reads.random_iops)
        .map_err(Clone::clone);
    // s3fs's cache is read again beside orcafs's for row 5e (which then deletes it).
    if fs != Fs::S3fs {
        if let Err(e) = bench.forget_cache(fs) {
            eprintln!("orcafs-bench: {e}");
        }
    }
    progress(&format!("{}: readers of one cold object", fs.name()));
    let size = bench.data.main_size as f64;
    let readers8 = bench
        .readers(fs)
        .map(|r| r.origin_bytes as f64 / size)
        .map_err(text);
    progress(&format!("{}: ls -l cold and warm", fs.name()));
    let rounds = bench.knobs.repeat;
    let pages = repeated(rounds, &format!("{}: ls -l", fs.name()), || {
        bench.page_ls(fs)
    });
    let med = |f: fn(&crate::dirs::PageLs) -> f64| {
        pages
            .as_ref()
            .map(|v| median_of(v.iter().map(f)))
            .map_err(|e| e.to_string())
    };
    PeerRow {
        name: fs.name().into(),
        cold_seq: Some(cold),
        warm: Some(
            reread
                .as_ref()
                .map(|r| r.reads.warm_mibps)
                .map_err(Clone::clone),
        ),
        random: Some(random),
        readers8: Some(readers8),
        ls_cold: Some(med(|p| p.cold.as_secs_f64() * 1000.0)),
        ls_warm: Some(med(|p| p.warm.as_secs_f64() * 1000.0)),
        ls_warm_requests: Some(
            pages
                .as_ref()
                .map(|v| v.iter().map(|p| p.warm_requests).max().unwrap_or(0))
                .map_err(|e| e.to_string()),
        ),
    }
}
