//! Runs the phases in order and turns their results (or errors) into the
//! report's rows and details.

use std::time::Duration;

use crate::dir_rows::{self, PageMedians};
use crate::error::{Context, Result};
use crate::fs::Fs;
use crate::origin::{BIG_DIR_FILLERS, KERNEL_FIRST_READ};
use crate::phases::{self, Bench, Phase};
use crate::reads;
use crate::report::{PeerRow, Quantity, Report, Row, Target};
use crate::{progress, MIB};

/// The baselines the peers are compared with too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baselines {
    plain_mibps: Option<f64>,
    local_warm_mibps: Option<f64>,
    /// orcafs's `ls -l` of one page and its baselines.
    page: Option<PageMedians>,
}

/// Every orcafs metric, in the order of the issue; failures become rows.
pub fn measure_orcafs(bench: &mut Bench, report: &mut Report) -> Baselines {
    let rounds = bench.knobs.repeat;
    let readers = bench.knobs.readers;
    let knobs = bench.knobs.clone();
    let (mut seq, mut reread) = (Err(skipped()), Err(skipped()));
    if knobs.runs(Phase::Seq) {
        seq = repeated(rounds, "plain GET and orcafs cold sequential read", || {
            Ok((
                bench.plain_get().context("plain GET")?,
                bench.cold_seq(Fs::Orcafs)?,
            ))
        });
        reread = repeated(
            rounds,
            "orcafs warm, hot and random re-reads; the same on a local file",
            || {
                Ok((
                    bench.reread(Fs::Orcafs, true)?,
                    bench.local().context("local file")?,
                ))
            },
        );
        if let Err(e) = bench.forget_cache(Fs::Orcafs) {
            report
                .details
                .push(format!("Could not delete a cache directory: {e}"));
        }
        sequential_rows(report, &seq, &reread, bench.data.main_size);
    }
    if knobs.runs(Phase::Ttfb) {
        progress("orcafs: time to first byte");
        ttfb_rows(report, &bench.ttfb());
    }
    if knobs.runs(Phase::Seq) {
        random_rows(report, &reread);
    }
    if knobs.runs(Phase::ColdRandom) {
        progress("orcafs: random reads of a cold object");
        cold_random_rows(report, &bench.cold_random(), bench.knobs.cold_random_reads);
    }
    if knobs.runs(Phase::Readers) {
        progress(&format!("orcafs: {} readers of one cold object", readers));
        readers_rows(
            report,
            &bench.readers(Fs::Orcafs),
            bench.data.main_size,
            readers,
        );
    }
    if knobs.runs(Phase::Rss) {
        progress(&format!(
            "orcafs: {} readers of different cold objects (memory)",
            readers
        ));
        rss_rows(report, &bench.rss(), bench.data.rss_size, readers);
    }
    let mut page = None;
    if knobs.runs(Phase::Dirs) {
        page = dir_rows::measure_dirs(bench, report);
    }
    if knobs.runs(Phase::SharedStall) {
        dir_rows::measure_shared_stall(bench, report);
    }
    Baselines {
        page,
        plain_mibps: seq.as_ref().ok().map(|v| median_of(v.iter().map(|s| s.0))),
        local_warm_mibps: reread
            .as_ref()
            .ok()
            .map(|v| median_of(v.iter().map(|r| r.1.warm_mibps))),
    }
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

const M_COLD: &str = "1. Cold sequential read (1 MiB reads)";
const M_WARM: &str = "2. Warm re-read from the disk cache (page cache dropped)";
const M_HOT: &str = "3. Hot re-read (page cache kept)";
const M_TTFB: &str = "4. Time to first byte, cold object (stat + open + 4 KiB read, median)";
const M_TTFB_BIG: &str =
    "4b. The same, name in a directory of over 1000 objects (lookup = LIST + HEAD)";
const M_RANDOM: &str = "5a. 4 KiB random reads, cached object";
const M_COLD_RANDOM: &str = "5b. 4 KiB random reads, cold object: origin bytes";
const M_READERS: &str = "6. Readers of one cold object: origin bytes";
const M_RSS: &str = "7. Peak RSS, readers of different cold objects";

type SeqRounds = Result<Vec<(f64, phases::ColdSeq)>>;
type RereadRounds = Result<Vec<(phases::Reread, phases::Local)>>;

fn sequential_rows(report: &mut Report, seq: &SeqRounds, reread: &RereadRounds, size: u64) {
    let cold_target = Target::RatioAtLeast(1.05);
    report.rows.push(match seq {
        Ok(v) => {
            let plain = median_of(v.iter().map(|s| s.0));
            let cold = median_of(v.iter().map(|s| s.1.mibps));
            report.details.push(format!(
                "Sequential rounds (MiB/s): plain GET {}; orcafs cold {}. Origin bytes / size of the cold reads: {}.",
                listed(v.iter().map(|s| s.0)),
                listed(v.iter().map(|s| s.1.mibps)),
                v.iter().map(|s| format!("{:.3}", s.1.origin_bytes as f64 / size as f64)).collect::<Vec<_>>().join(", ")
            ));
            Row::compared(M_COLD, Quantity::MibPerSec(cold), Quantity::MibPerSec(plain), "plain GET", cold_target)
        }
        Err(e) => Row::failed(M_COLD, &e.to_string(), cold_target),
    });
    let (warm_target, hot_target) = (Target::RatioAtLeast(0.8), Target::RatioAtLeast(0.5));
    let v = match reread {
        Ok(v) => v,
        Err(e) => {
            report
                .rows
                .push(Row::failed(M_WARM, &e.to_string(), warm_target));
            report
                .rows
                .push(Row::failed(M_HOT, &e.to_string(), hot_target));
            return;
        }
    };
    let med = |f: fn(&(phases::Reread, phases::Local)) -> f64| median_of(v.iter().map(f));
    report.rows.push(Row::compared(
        M_WARM,
        Quantity::MibPerSec(med(|r| r.0.warm_mibps)),
        Quantity::MibPerSec(med(|r| r.1.warm_mibps)),
        "local file",
        warm_target,
    ));
    report.rows.push(Row::compared(
        M_HOT,
        Quantity::MibPerSec(med(|r| r.0.hot_mibps)),
        Quantity::MibPerSec(med(|r| r.1.hot_mibps)),
        "local file",
        hot_target,
    ));
    report.details.push(format!(
        "Re-read rounds (MiB/s): orcafs warm {}, local warm {}; orcafs hot {}, local hot {}. \
         The origin answered {} GetObject requests during them (0 = all from the disk \
         cache) and sent {} bytes in all (lookups included).",
        listed(v.iter().map(|r| r.0.warm_mibps)),
        listed(v.iter().map(|r| r.1.warm_mibps)),
        listed(v.iter().map(|r| r.0.hot_mibps)),
        listed(v.iter().map(|r| r.1.hot_mibps)),
        v.iter().map(|r| r.0.origin_gets).sum::<u64>(),
        v.iter().map(|r| r.0.origin_bytes).sum::<u64>()
    ));
}

fn ttfb_rows(report: &mut Report, ttfb: &Result<phases::Ttfb>) {
    let target = Target::RatioAtMost(1.5);
    let t = match ttfb {
        Ok(t) => t,
        Err(e) => {
            return report
                .rows
                .push(Row::failed(M_TTFB, &e.to_string(), target))
        }
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

fn random_rows(report: &mut Report, reread: &RereadRounds) {
    let v = match reread {
        Ok(v) => v,
        Err(e) => {
            return report
                .rows
                .push(Row::failed(M_RANDOM, &e.to_string(), Target::None))
        }
    };
    let mount = || v.iter().filter_map(|r| r.0.random_iops);
    report.rows.push(Row::compared(
        M_RANDOM,
        Quantity::Iops(median_of(mount())),
        Quantity::Iops(median_of(v.iter().map(|r| r.1.random_iops))),
        "local file",
        Target::None,
    ));
    report.details.push(format!(
        "Cached random read rounds (IOPS): orcafs {}; local file {}.",
        listed(mount()),
        listed(v.iter().map(|r| r.1.random_iops))
    ));
}

fn cold_random_rows(report: &mut Report, r: &Result<phases::ColdRandom>, count: usize) {
    let metric = format!("{M_COLD_RANDOM} ({count} reads)");
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            return report
                .rows
                .push(Row::failed(&metric, &e.to_string(), Target::None))
        }
    };
    let mib = |b: u64| b as f64 / MIB as f64;
    report.rows.push(Row::compared(
        &metric,
        Quantity::Mib(mib(r.origin_bytes)),
        Quantity::Mib(mib(r.requested)),
        "bytes requested",
        Target::None,
    ));
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
        Err(e) => {
            return report
                .rows
                .push(Row::failed(&metric, &e.to_string(), target))
        }
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
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            return report
                .rows
                .push(Row::failed(&metric, &e.to_string(), target))
        }
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

/// rclone, s3fs and Mountpoint: cold read, warm re-read, shared-object origin bytes, and
/// `ls -l` of one page cold and warm.
pub fn measure_peers(bench: &mut Bench, report: &mut Report, baselines: Baselines) {
    report.peer_baselines = (baselines.plain_mibps, baselines.local_warm_mibps);
    report.peer_ls_baselines = (
        baselines.page.map(|p| p.plain_page_ms),
        baselines.page.map(|p| p.local_ms),
    );
    let mut rows = vec![orcafs_peer_row(report, baselines.page)];
    for fs in [Fs::Rclone, Fs::S3fs, Fs::Mountpoint] {
        if !fs.installed() {
            let why = match fs {
                Fs::Mountpoint => {
                    "no `mount-s3` on PATH (Mountpoint has no Debian package), skipped"
                }
                _ => "not installed (scripts/bench --with-peers installs it), skipped",
            };
            report.peer_notes.push(format!("{}: {why}.", fs.name()));
            continue;
        }
        report
            .peer_notes
            .push(format!("{}: `{}`", fs.name(), fs.describe(&bench.env)));
        rows.push(measure_peer(bench, fs));
    }
    report.peers = Some(rows);
}

/// The orcafs line of the peer table, from the rows already measured.
fn orcafs_peer_row(report: &Report, page: Option<PageMedians>) -> PeerRow {
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
    let not = || "not measured".to_string();
    PeerRow {
        name: "orcafs".into(),
        cold_seq: value(M_COLD),
        warm: value(M_WARM),
        readers8: readers,
        ls_cold: page.map(|p| p.cold_ms).ok_or_else(not),
        ls_warm: page.map(|p| p.warm_ms).ok_or_else(not),
        ls_warm_requests: page.map(|p| p.warm_requests).ok_or_else(not),
    }
}

fn measure_peer(bench: &mut Bench, fs: Fs) -> PeerRow {
    let text = |e: crate::error::Error| e.to_string();
    progress(&format!("{}: cold sequential read", fs.name()));
    let cold = bench.cold_seq(fs).map(|c| c.mibps).map_err(text);
    progress(&format!("{}: warm re-read", fs.name()));
    let warm = bench.reread(fs, false).map(|r| r.warm_mibps).map_err(text);
    if let Err(e) = bench.forget_cache(fs) {
        eprintln!("orcafs-bench: {e}");
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
        cold_seq: cold,
        warm,
        readers8,
        ls_cold: med(|p| p.cold.as_secs_f64() * 1000.0),
        ls_warm: med(|p| p.warm.as_secs_f64() * 1000.0),
        ls_warm_requests: pages
            .as_ref()
            .map(|v| v.iter().map(|p| p.warm_requests).max().unwrap_or(0))
            .map_err(|e| e.to_string()),
    }
}
