//! Rows of the large object's reads from their rounds (medians; every round listed under the
//! details): the cold sequential read (rows 1, 1b, 1c), the cached reads with FUSE passthrough
//! and without (rows 2, 2b, 3, 5a, 5d, 5e), and the random reads of a cold object (5b, 5c).

use crate::error::Result;
use crate::measure::{listed, median_of};
use crate::phases::{CachedReads, ColdRandom, ColdSeq, CpuUse, Reread, Speed};
use crate::reads::BLOCK;
use crate::report::{Quantity, Report, Row, Target};
use crate::MIB;

/// One round of the cold sequential read and its baselines.
#[derive(Debug, Clone)]
pub struct ColdRound {
    /// One plain GET.
    pub plain: Speed,
    /// Parallel ranged GETs of the object.
    pub parallel: Speed,
    pub orcafs: ColdSeq,
    /// Mountpoint without its cache, right after orcafs (row 1c), when it is measured.
    pub mountpoint: Option<std::result::Result<ColdSeq, String>>,
}

/// One round of the cached reads: the default mount, a `--no-passthrough` mount, the local copy.
#[derive(Debug, Clone, Copy)]
pub struct CachedRound {
    pub passthrough: Reread,
    pub fuse: Reread,
    pub local: CachedReads,
}

/// Medians of the cached rounds that the peer table and rows 5e use.
#[derive(Debug, Clone, Copy)]
pub struct CachedMedians {
    pub passthrough: CachedReads,
    pub fuse: CachedReads,
    pub local: CachedReads,
}

/// One mount's (or the local file's) reads of a cached round.
type Pick = fn(&CachedRound) -> &CachedReads;
/// One number of a mount's cached reads.
type Of = fn(&CachedReads) -> f64;
/// The unit a row shows.
type Unit = fn(f64) -> Quantity;

const PASSTHROUGH: Pick = |r| &r.passthrough.reads;
const FUSE: Pick = |r| &r.fuse.reads;
const LOCAL: Pick = |r| &r.local;

pub const M_COLD: &str = "1. Cold sequential read (1 MiB reads)";
/// Label of the row comparing with Mountpoint, read in the cold rounds (with the peers).
pub const L_MOUNTPOINT: &str = "1c.";
const M_MOUNTPOINT: &str = "1c. The same cold read vs Mountpoint without its cache";
/// Label of the row comparing the FUSE path with s3fs, measured with the peers.
pub const L_S3FS: &str = "5e.";
const M_S3FS: &str =
    "5e. 4 KiB random reads, cached object (page cache dropped), FUSE path (`--no-passthrough`) vs s3fs";
const FUSE_PATH: &str = "FUSE path (`--no-passthrough`)";

const COLD_TARGET: Target = Target::RatioAtLeast(1.05);
const PARALLEL_TARGET: Target = Target::RatioAtLeast(0.9);
const MOUNTPOINT_TARGET: Target = Target::RatioAtLeast(1.1);
const LOCAL_TARGET: Target = Target::RatioAtLeast(0.8);
const S3FS_TARGET: Target = Target::RatioAtLeast(1.0);
const AMPLIFICATION_TARGET: Target = Target::RatioAtMost(16.0);
const COLD_IOPS_TARGET: Target = Target::RatioAtLeast(0.7);

/// Rows 1, 1b and 1c (not measured without Mountpoint); returns orcafs's median.
pub fn cold_rows(
    report: &mut Report,
    rounds: &Result<Vec<ColdRound>>,
    size: u64,
    parallel: usize,
) -> Option<f64> {
    let m_parallel =
        format!("1b. The same cold read vs {parallel} parallel ranged GETs of the object");
    let rows = [
        (M_COLD, COLD_TARGET),
        (&*m_parallel, PARALLEL_TARGET),
        (M_MOUNTPOINT, MOUNTPOINT_TARGET),
    ];
    let v = report.ok_or_fail(rounds, &rows)?;
    let cold = median_of(v.iter().map(|r| r.orcafs.mibps));
    report.rows.push(Row::compared(
        M_COLD,
        Quantity::MibPerSec(cold),
        Quantity::MibPerSec(median_of(v.iter().map(|r| r.plain.mibps))),
        "plain GET",
        COLD_TARGET,
    ));
    report.rows.push(Row::compared(
        &m_parallel,
        Quantity::MibPerSec(cold),
        Quantity::MibPerSec(median_of(v.iter().map(|r| r.parallel.mibps))),
        &format!("{parallel} plain ranged GETs at once, warm connections"),
        PARALLEL_TARGET,
    ));
    let mountpoint = mountpoint_rounds_row(report, v, cold, size);
    report.rows.push(mountpoint);
    report.details.push(format!(
        "Cold sequential rounds (MiB/s): plain GET {}; {parallel} parallel ranged GETs {}; orcafs \
         cold {}. Origin bytes / size of the cold reads: {}.",
        listed(v.iter().map(|r| r.plain.mibps)),
        listed(v.iter().map(|r| r.parallel.mibps)),
        listed(v.iter().map(|r| r.orcafs.mibps)),
        v.iter()
            .map(|r| format!("{:.3}", r.orcafs.origin_bytes as f64 / size as f64))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if let Some(line) = cpu_details(v, size) {
        report.details.push(line);
    }
    Some(cold)
}

/// Row 1c from Mountpoint's cold reads in the same rounds as orcafs's, each right after
/// orcafs's: a cold read swings by a fifth between rounds here, with the server's state and the
/// machine's, so only reads made back to back compare.
fn mountpoint_rounds_row(report: &mut Report, v: &[ColdRound], cold: f64, size: u64) -> Row {
    let Some(rounds) = v
        .iter()
        .map(|r| r.mountpoint.clone())
        .collect::<Option<Vec<_>>>()
    else {
        return Row::not_measured(
            M_MOUNTPOINT,
            "needs `--with-peers` and `mount-s3` on PATH",
            MOUNTPOINT_TARGET,
        );
    };
    let rounds = match rounds
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()
    {
        Ok(r) => r,
        Err(e) => return mountpoint_row(cold, Err(e)),
    };
    report.details.push(format!(
        "Mountpoint without its cache, cold sequential rounds (MiB/s), each right after \
         orcafs's: {}.",
        listed(rounds.iter().map(|c| c.mibps))
    ));
    if let Some(cpu) = cpu_per_gib(rounds.iter().map(|c| c.cpu), size) {
        report.details.push(format!(
            "CPU seconds per GiB of Mountpoint's cold rounds without its cache (medians), origin \
             server / client: {:.2} / {:.2} (its process) + {:.2} (the bench process reading it).",
            cpu.server, cpu.fs, cpu.bench
        ));
    }
    mountpoint_row(cold, Ok(median_of(rounds.iter().map(|c| c.mibps))))
}

/// The medians of some reads' CPU, per GiB of a `size`-byte object; None when a read has no
/// count (an in-process origin).
pub fn cpu_per_gib(uses: impl Iterator<Item = Option<CpuUse>>, size: u64) -> Option<CpuUse> {
    let gib = size as f64 / (1u64 << 30) as f64;
    let uses: Vec<CpuUse> = uses.collect::<Option<_>>()?;
    let med = |f: fn(&CpuUse) -> f64| median_of(uses.iter().map(|c| f(c) / gib));
    Some(CpuUse {
        server: med(|c| c.server),
        bench: med(|c| c.bench),
        fs: med(|c| c.fs),
    })
}

/// Where the cold rounds' CPU went (medians per GiB), when the origin is a process of its own.
fn cpu_details(v: &[ColdRound], size: u64) -> Option<String> {
    let plain = cpu_per_gib(v.iter().map(|r| r.plain.cpu), size)?;
    let parallel = cpu_per_gib(v.iter().map(|r| r.parallel.cpu), size)?;
    let orcafs = cpu_per_gib(v.iter().map(|r| r.orcafs.cpu), size)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let parallel_gib_s = median_of(v.iter().map(|r| r.parallel.mibps)) / 1024.0;
    let parallel_cost = parallel.server + parallel.bench;
    Some(format!(
        "CPU seconds per GiB of the cold rounds (medians), origin server / client: plain GET \
         {:.2} / {:.2}; parallel ranged GETs {:.2} / {:.2}; orcafs {:.2} / {:.2} (the mount's \
         process) + {:.2} (the bench process reading the mount into its buffer). Server and \
         clients share this machine's {cores} cores: at the parallel GETs' rate the server \
         alone keeps {:.1} of them busy, server and client {:.1}. When the cores are the limit, \
         a filesystem that cost no more CPU than the parallel GETs' client, plus what its reader \
         spends copying out of the kernel, would reach at most {:.2} x the parallel GETs \
         ({parallel_cost:.2} / ({parallel_cost:.2} + {:.2})).",
        plain.server,
        plain.bench,
        parallel.server,
        parallel.bench,
        orcafs.server,
        orcafs.fs,
        orcafs.bench,
        parallel.server * parallel_gib_s,
        parallel_cost * parallel_gib_s,
        parallel_cost / (parallel_cost + orcafs.bench),
        orcafs.bench,
    ))
}

/// Row 1c from Mountpoint's cold reads without a cache (median of rounds).
fn mountpoint_row(orcafs_cold: f64, mountpoint: std::result::Result<f64, String>) -> Row {
    match mountpoint {
        Ok(mp) => Row::compared(
            M_MOUNTPOINT,
            Quantity::MibPerSec(orcafs_cold),
            Quantity::MibPerSec(mp),
            "mount-s3 without `--cache`, median of the same rounds",
            MOUNTPOINT_TARGET,
        ),
        Err(e) => Row::failed(M_MOUNTPOINT, &format!("mount-s3: {e}"), MOUNTPOINT_TARGET),
    }
}

/// Row 1c or 5e when the peer it compares with is not installed.
pub fn peer_missing_row(label: &str, why: &str) -> Row {
    match label {
        L_MOUNTPOINT => Row::not_measured(M_MOUNTPOINT, why, MOUNTPOINT_TARGET),
        _ => Row::not_measured(M_S3FS, why, S3FS_TARGET),
    }
}

/// Row 5e from the medians of alternated rounds of orcafs's FUSE path and of s3fs.
pub fn s3fs_row(orcafs_fuse_iops: Option<f64>, s3fs: &std::result::Result<f64, String>) -> Row {
    match (orcafs_fuse_iops, s3fs) {
        (Some(iops), Ok(theirs)) => Row::compared(
            M_S3FS,
            Quantity::Iops(iops),
            Quantity::Iops(*theirs),
            "s3fs, same offsets, median of rounds",
            S3FS_TARGET,
        ),
        (_, Err(e)) => Row::failed(M_S3FS, &format!("s3fs: {e}"), S3FS_TARGET),
        (None, Ok(_)) => Row::failed(
            M_S3FS,
            "orcafs's cached reads without passthrough failed",
            S3FS_TARGET,
        ),
    }
}

/// The kind of mount of a row: passthrough when every round's default mount used it.
fn passthrough_label(v: &[CachedRound]) -> String {
    let unused = v
        .iter()
        .filter(|r| r.passthrough.passthrough_opens.unwrap_or(0) == 0)
        .count();
    match unused {
        0 => "FUSE passthrough".into(),
        n => format!(
            "default mount, passthrough **not used** in {n} of {} rounds (`passthrough_opens` 0)",
            v.len()
        ),
    }
}

/// Rows 2, 2b and 3, each for the default mount (target) and the FUSE path (no target).
pub fn cached_sequential_rows(
    report: &mut Report,
    rounds: &Result<Vec<CachedRound>>,
) -> Option<CachedMedians> {
    let rows: [(&str, &str, Of); 3] = [
        (
            "2. Warm re-read from the disk cache, 1 MiB reads (`dd bs=1M`, page cache dropped)",
            "local file, same reads",
            |r| r.warm_mibps,
        ),
        (
            "2b. Warm re-read from the disk cache, 128 KiB reads (`cat`, page cache dropped)",
            "local file, same reads",
            |r| r.warm_cat_mibps,
        ),
        (
            "3. Hot re-read, 1 MiB reads (page cache kept)",
            "local file, same reads",
            |r| r.hot_mibps,
        ),
    ];
    let failed = rows.map(|(metric, _, _)| (metric, LOCAL_TARGET));
    let v = report.ok_or_fail(rounds, &failed)?;
    let pt = passthrough_label(v);
    for (metric, base, f) in rows {
        push_pair(
            report,
            v,
            &format!("{metric}, {pt}"),
            base,
            Quantity::MibPerSec,
            f,
        );
    }
    let reads = |sel: Pick, f: Of| listed(v.iter().map(|r| f(sel(r))));
    let (p, u, l) = (PASSTHROUGH, FUSE, LOCAL);
    report.details.push(format!(
        "Cached sequential rounds (MiB/s), default mount / `--no-passthrough` mount / local file: \
         warm 1 MiB reads {} / {} / {} (of which the `open(2)`, ms: {} / {} / {}; with \
         passthrough the first open in a process checks the whole cache file); warm 128 KiB \
         reads {} / {} / {}; hot 1 MiB reads {} / {} / {}.",
        reads(p, |r| r.warm_mibps),
        reads(u, |r| r.warm_mibps),
        reads(l, |r| r.warm_mibps),
        reads(p, |r| r.warm_open_ms),
        reads(u, |r| r.warm_open_ms),
        reads(l, |r| r.warm_open_ms),
        reads(p, |r| r.warm_cat_mibps),
        reads(u, |r| r.warm_cat_mibps),
        reads(l, |r| r.warm_cat_mibps),
        reads(p, |r| r.hot_mibps),
        reads(u, |r| r.hot_mibps),
        reads(l, |r| r.hot_mibps),
    ));
    let opens = |f: fn(&CachedRound) -> Option<u64>| {
        v.iter()
            .map(|r| f(r).map_or("?".into(), |n| n.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.details.push(format!(
        "FUSE passthrough (`passthrough_opens` of `orcafs status --json` after each round's cached \
         reads): default mount {}; `--no-passthrough` mount {}. Origin GetObject requests during \
         all the cached reads: {} (0 = all from the disk cache), bytes sent {} (lookups included).",
        opens(|r| r.passthrough.passthrough_opens),
        opens(|r| r.fuse.passthrough_opens),
        v.iter()
            .map(|r| r.passthrough.origin_gets + r.fuse.origin_gets)
            .sum::<u64>(),
        v.iter()
            .map(|r| r.passthrough.origin_bytes + r.fuse.origin_bytes)
            .sum::<u64>(),
    ));
    let med = |sel: Pick| CachedReads {
        warm_mibps: median_of(v.iter().map(|r| sel(r).warm_mibps)),
        warm_open_ms: median_of(v.iter().map(|r| sel(r).warm_open_ms)),
        hot_mibps: median_of(v.iter().map(|r| sel(r).hot_mibps)),
        warm_cat_mibps: median_of(v.iter().map(|r| sel(r).warm_cat_mibps)),
        random_iops: median_of(v.iter().map(|r| sel(r).random_iops)),
        random_large_mibps: median_of(v.iter().map(|r| sel(r).random_large_mibps)),
    };
    Some(CachedMedians {
        passthrough: med(p),
        fuse: med(u),
        local: med(l),
    })
}

/// The row of the default mount (with the target) and the FUSE path's (without) for one read.
fn push_pair(report: &mut Report, v: &[CachedRound], metric: &str, base: &str, unit: Unit, f: Of) {
    let local = unit(median_of(v.iter().map(|r| f(&r.local))));
    report.rows.push(Row::compared(
        metric,
        unit(median_of(v.iter().map(|r| f(&r.passthrough.reads)))),
        local,
        base,
        LOCAL_TARGET,
    ));
    let label = metric.split(' ').next().unwrap_or("");
    report.rows.push(Row::compared(
        &format!("{label} The same, {FUSE_PATH}"),
        unit(median_of(v.iter().map(|r| f(&r.fuse.reads)))),
        local,
        base,
        Target::None,
    ));
}

/// Row 5a (cached random 4 KiB), or 5d (cached random 1 MiB) with `large`; after 5d, the
/// placeholder of 5e (filled in with the peers).
pub fn cached_random_rows(report: &mut Report, rounds: &Result<Vec<CachedRound>>, large: bool) {
    let metric = match large {
        false => "5a. 4 KiB random reads, cached object (page cache dropped)",
        true => "5d. 1 MiB random reads, cached object (page cache dropped)",
    };
    if let Some(v) = report.ok_or_fail(rounds, &[(metric, LOCAL_TARGET)]) {
        let pt = passthrough_label(v);
        let (unit, f): (Unit, Of) = match large {
            false => (Quantity::Iops, |r| r.random_iops),
            true => (Quantity::MibPerSec, |r| r.random_large_mibps),
        };
        push_pair(
            report,
            v,
            &format!("{metric}, {pt}"),
            "local file, same offsets",
            unit,
            f,
        );
        let what = match large {
            false => "4 KiB (IOPS)",
            true => "1 MiB (MiB/s)",
        };
        report.details.push(format!(
            "Cached random {what} rounds, default mount / `--no-passthrough` mount / local \
             file: {} / {} / {}.",
            listed(v.iter().map(|r| f(&r.passthrough.reads))),
            listed(v.iter().map(|r| f(&r.fuse.reads))),
            listed(v.iter().map(|r| f(&r.local))),
        ));
    }
    if large {
        report.rows.push(Row::not_measured(
            M_S3FS,
            "needs `--with-peers` and s3fs",
            S3FS_TARGET,
        ));
    }
}

/// Rows 5b (origin bytes per read) and 5c (IOPS vs plain ranged GETs one at a time).
pub fn cold_random_rows(report: &mut Report, rounds: &Result<Vec<ColdRandom>>, size: u64) {
    let m_bytes = format!(
        "5b. 4 KiB random reads of a cold {} MiB object: origin body bytes per read",
        size / MIB
    );
    let m_iops = "5c. The same reads: IOPS, one at a time";
    let rows = [
        (&*m_bytes, AMPLIFICATION_TARGET),
        (m_iops, COLD_IOPS_TARGET),
    ];
    let Some(v) = report.ok_or_fail(rounds, &rows) else {
        return;
    };
    let per_read = |r: &ColdRandom| r.origin_body_bytes() / r.reads as f64 / 1024.0;
    report.rows.push(Row::compared(
        &m_bytes,
        Quantity::Kib(median_of(v.iter().map(per_read))),
        Quantity::Kib(BLOCK as f64 / 1024.0),
        "bytes asked per read",
        AMPLIFICATION_TARGET,
    ));
    report.rows.push(Row::compared(
        m_iops,
        Quantity::Iops(median_of(v.iter().map(ColdRandom::iops))),
        Quantity::Iops(median_of(v.iter().map(ColdRandom::plain_iops))),
        "plain 4 KiB ranged GETs of the same offsets, one at a time, one keep-alive connection",
        COLD_IOPS_TARGET,
    ));
    let reads = v.first().map_or(0, |r| r.reads);
    report.details.push(format!(
        "Cold random rounds ({reads} reads each, new offsets and a fresh cache and mount each \
         round): orcafs IOPS {}; plain ranged GETs IOPS {}. Bytes the origin sent the mount \
         (HTTP headers included, MiB) {} in {} GetObject requests; the plain GETs' bytes beyond \
         their bodies per response {} (subtracted per GET of the mount); body KiB per read {}. \
         orcafs's own counters: block fills (64 KiB-aligned blocks around a random read) {}, \
         whole-chunk fills (reads it took for sequential ones) {}, body KiB per read received {}.",
        listed(v.iter().map(ColdRandom::iops)),
        listed(v.iter().map(ColdRandom::plain_iops)),
        v.iter()
            .map(|r| format!("{:.3}", r.origin_bytes as f64 / MIB as f64))
            .collect::<Vec<_>>()
            .join(", "),
        v.iter()
            .map(|r| r.origin_gets.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        listed(v.iter().map(ColdRandom::overhead_per_response)),
        listed(v.iter().map(per_read)),
        v.iter()
            .map(|r| r.block_fills.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        v.iter()
            .map(|r| r.chunk_fills.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        listed(
            v.iter()
                .map(|r| r.orcafs_body_bytes as f64 / r.reads as f64 / 1024.0)
        ),
    ));
}
