//! A remote origin's per-connection share (rows 1d, 1e): the cold sequential read through a TCP
//! proxy that paces every connection to the same rate (the kernel's TCP pacing), beside the
//! object fetched as parallel ranged GETs through the same proxy and Mountpoint's cold read.
//!
//! On loopback one connection gets all the server can send, and the 2 cores the server and the
//! clients share are the limit (rows 1, 1b). A remote S3 endpoint gives each connection a share
//! of its bandwidth instead, so a reader's speed there is the GETs it keeps in flight times that
//! share: what this phase measures. The proxy is this program again (`shared::Proxy`).

use crate::error::{Context, Result};
use crate::fs::Fs;
use crate::measure::{listed, median_of, repeated};
use crate::origin::PlainClient;
use crate::phases::{Bench, ColdSeq, Speed};
use crate::report::{Quantity, Report, Row, Target};
use crate::shared::Proxy;
use crate::MIB;

const PARALLEL_TARGET: Target = Target::RatioAtLeast(0.9);
const MOUNTPOINT_TARGET: Target = Target::RatioAtLeast(1.1);

/// One round: the parallel GETs, orcafs, and Mountpoint when it is measured.
#[derive(Debug)]
pub struct PacedRound {
    pub parallel: Speed,
    pub orcafs: ColdSeq,
    pub mountpoint: Option<ColdSeq>,
}

impl Bench {
    /// The paced rounds, one proxy for all of them.
    pub fn paced_rounds(&mut self) -> Result<Vec<PacedRound>> {
        let rate = self.knobs.paced_mibps * MIB;
        let proxy = Proxy::start(self.origin.addr(), Some(rate))?;
        let endpoint = format!("http://{}", proxy.addr);
        let client = PlainClient::at(&self.origin, &endpoint)?;
        let mut env = self.env.clone();
        env.endpoint = endpoint;
        let what = format!(
            "origin paced to {} MiB/s per connection: parallel ranged GETs, orcafs{}",
            self.knobs.paced_mibps,
            if self.knobs.mountpoint_paced {
                ", mount-s3 without cache"
            } else {
                ""
            }
        );
        let with_mountpoint = self.knobs.mountpoint_paced;
        let rounds = repeated(self.knobs.repeat, &what, || {
            let parallel = self.parallel_get(Some(&client)).context("parallel GETs")?;
            let orcafs = self.cold_seq_in(Fs::Orcafs, &env, "paced")?;
            let mountpoint = if with_mountpoint {
                Some(self.cold_seq_in(Fs::MountpointNoCache, &env, "paced")?)
            } else {
                None
            };
            Ok(PacedRound {
                parallel,
                orcafs,
                mountpoint,
            })
        });
        for fs in [Fs::Orcafs, Fs::MountpointNoCache] {
            if let Err(e) = self.forget_cache_of(fs, "paced") {
                eprintln!("orcafs-bench: {e}");
            }
        }
        drop(proxy);
        rounds
    }
}

/// Rows 1d and 1e.
pub fn paced_rows(
    report: &mut Report,
    rounds: &Result<Vec<PacedRound>>,
    mibps: u64,
    parallel: usize,
    mountpoint_measured: bool,
    size: u64,
) {
    let m_parallel = format!(
        "1d. Cold sequential read, origin connections paced to {mibps} MiB/s each (a remote \
         endpoint's share per connection), vs {parallel} parallel ranged GETs through the same pacing"
    );
    let m_mountpoint =
        "1e. The same paced cold read vs Mountpoint without its cache, through the same pacing";
    let rows = [
        (&*m_parallel, PARALLEL_TARGET),
        (m_mountpoint, MOUNTPOINT_TARGET),
    ];
    let Some(v) = report.ok_or_fail(rounds, &rows) else {
        return;
    };
    let orcafs = median_of(v.iter().map(|r| r.orcafs.mibps));
    report.rows.push(Row::compared(
        &m_parallel,
        Quantity::MibPerSec(orcafs),
        Quantity::MibPerSec(median_of(v.iter().map(|r| r.parallel.mibps))),
        &format!("{parallel} plain ranged GETs at once through the pacing proxy"),
        PARALLEL_TARGET,
    ));
    let mp: Vec<f64> = v
        .iter()
        .filter_map(|r| r.mountpoint.map(|m| m.mibps))
        .collect();
    if mountpoint_measured && mp.len() == v.len() {
        report.rows.push(Row::compared(
            m_mountpoint,
            Quantity::MibPerSec(orcafs),
            Quantity::MibPerSec(median_of(mp.iter().copied())),
            "mount-s3 without `--cache` through the pacing proxy, median of rounds",
            MOUNTPOINT_TARGET,
        ));
    } else {
        report.rows.push(Row::not_measured(
            m_mountpoint,
            "needs `--with-peers` and `mount-s3` on PATH",
            MOUNTPOINT_TARGET,
        ));
    }
    let mut line = format!(
        "Paced origin rounds (MiB/s; every connection to Garage goes through a proxy that sends \
         at most {mibps} MiB/s on it): {parallel} parallel ranged GETs {}; orcafs cold {}",
        listed(v.iter().map(|r| r.parallel.mibps)),
        listed(v.iter().map(|r| r.orcafs.mibps)),
    );
    if !mp.is_empty() {
        line.push_str(&format!(
            "; mount-s3 without cache {}",
            listed(mp.iter().copied())
        ));
    }
    line.push_str(&format!(
        ". orcafs's origin bytes / size: {}.",
        v.iter()
            .map(|r| format!("{:.3}", r.orcafs.origin_bytes as f64 / size as f64))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.details.push(line);
}
