//! The results and their rendering as docs/benchmarks.md.

use std::fmt::Write as _;

use crate::sys::Machine;

/// A measured quantity with its unit.
#[derive(Debug, Clone, Copy)]
pub enum Quantity {
    MibPerSec(f64),
    Millis(f64),
    Iops(f64),
    Mib(f64),
}

impl Quantity {
    fn number(self) -> f64 {
        match self {
            Quantity::MibPerSec(v) | Quantity::Millis(v) | Quantity::Iops(v) | Quantity::Mib(v) => {
                v
            }
        }
    }

    fn render(self) -> String {
        match self {
            Quantity::MibPerSec(v) => format!("{v:.1} MiB/s"),
            Quantity::Millis(v) => format!("{v:.2} ms"),
            Quantity::Iops(v) => format!("{v:.0} IOPS"),
            Quantity::Mib(v) if v < 10.0 => format!("{v:.3} MiB"),
            Quantity::Mib(v) => format!("{v:.1} MiB"),
        }
    }
}

/// What a row is checked against.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    ValueAtMost(f64),
    /// Reported for information; no target.
    None,
}

impl Target {
    fn render(self) -> String {
        match self {
            Target::RatioAtLeast(t) => format!("ratio ≥ {t:.2}"),
            Target::RatioAtMost(t) => format!("ratio ≤ {t:.2}"),
            Target::ValueAtMost(t) => format!("≤ {t:.0}"),
            Target::None => "—".into(),
        }
    }

    /// Whether the row meets it, comparing at the precision shown.
    fn met(self, value: f64, ratio: Option<f64>) -> Option<bool> {
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        match (self, ratio) {
            (Target::RatioAtLeast(t), Some(r)) => Some(round2(r) >= t),
            (Target::RatioAtMost(t), Some(r)) => Some(round2(r) <= t),
            (Target::ValueAtMost(t), _) => Some(value <= t),
            _ => None,
        }
    }
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub metric: String,
    pub outcome: Result<Measured, String>,
    pub target: Target,
}

/// A value, what it is compared with, and their ratio.
#[derive(Debug, Clone)]
pub struct Measured {
    pub value: Quantity,
    pub baseline: Option<(Quantity, String)>,
}

impl Measured {
    /// The value as a plain number in its unit.
    pub fn value_number(&self) -> f64 {
        self.value.number()
    }

    /// value / baseline.
    pub fn ratio(&self) -> Option<f64> {
        let (base, _) = self.baseline.as_ref()?;
        (base.number() != 0.0).then(|| self.value.number() / base.number())
    }
}

impl Row {
    /// A value with a baseline (ratio = value / baseline).
    pub fn compared(
        metric: &str,
        value: Quantity,
        baseline: Quantity,
        baseline_what: &str,
        target: Target,
    ) -> Row {
        Row {
            metric: metric.into(),
            outcome: Ok(Measured {
                value,
                baseline: Some((baseline, baseline_what.into())),
            }),
            target,
        }
    }

    /// A value without a baseline.
    pub fn alone(metric: &str, value: Quantity, target: Target) -> Row {
        Row {
            metric: metric.into(),
            outcome: Ok(Measured {
                value,
                baseline: None,
            }),
            target,
        }
    }

    /// A measurement that could not be made.
    pub fn failed(metric: &str, error: &str, target: Target) -> Row {
        Row {
            metric: metric.into(),
            outcome: Err(error.into()),
            target,
        }
    }

    fn render(&self) -> String {
        let target = self.target.render();
        let m = match &self.outcome {
            Ok(m) => m,
            Err(e) => {
                let first = e.lines().next().unwrap_or("");
                return format!(
                    "| {} | **failed**: {} | — | — | {target} | **FAILED** |",
                    self.metric,
                    escape(first)
                );
            }
        };
        let ratio = m.ratio();
        let baseline = m
            .baseline
            .as_ref()
            .map_or("—".into(), |(q, what)| format!("{} ({what})", q.render()));
        let status = match self.target.met(m.value.number(), ratio) {
            Some(true) => "met",
            Some(false) => "**MISSED**",
            None => "—",
        };
        format!(
            "| {} | {} | {} | {} | {target} | {status} |",
            self.metric,
            m.value.render(),
            baseline,
            ratio.map_or("—".into(), |r| format!("{r:.2}")),
        )
    }

    /// Whether the row failed or missed its target.
    pub fn is_bad(&self) -> bool {
        match &self.outcome {
            Err(_) => true,
            Ok(m) => self.target.met(m.value.number(), m.ratio()) == Some(false),
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// One filesystem's numbers in the comparison with other S3 FUSE mounts.
#[derive(Debug, Clone)]
pub struct PeerRow {
    pub name: String,
    pub cold_seq: Result<f64, String>,
    pub warm: Result<f64, String>,
    pub readers8: Result<f64, String>,
}

/// Everything the report needs.
#[derive(Debug)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub program_command: String,
    pub setup: Vec<String>,
    pub rows: Vec<Row>,
    pub peers: Option<Vec<PeerRow>>,
    pub peer_notes: Vec<String>,
    /// Baselines the peer table divides by: plain GET and local-file MiB/s.
    pub peer_baselines: (Option<f64>, Option<f64>),
    pub details: Vec<String>,
    pub elapsed_secs: f64,
}

impl Report {
    /// The whole Markdown document.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.results(&mut md);
        self.peers_section(&mut md);
        self.details_section(&mut md);
        md.push_str(METHOD);
        md
    }

    fn header(&self, md: &mut String) {
        let m = &self.machine;
        let _ = writeln!(md, "# orcafs benchmarks\n");
        md.push_str(
            "Generated by `scripts/bench` (the `orcafs-bench` program in `tools/bench`): a real \
             `orcafs` release build mounted over FUSE against a local S3 origin \
             (`orcafs-devorigin`, s3s-fs) on 127.0.0.1, everything measured in one run. \
             Regenerate this file with the command below; do not edit it by hand.\n\n",
        );
        let _ = writeln!(md, "- Date: {}", m.date_utc);
        let _ = writeln!(md, "- Commit: `{}`", m.commit);
        let _ = writeln!(
            md,
            "- Machine: {}, {} cores, {:.1} GiB RAM; {}; Linux {}",
            m.cpu, m.cores, m.memory_gib, m.os, m.kernel
        );
        let _ = writeln!(
            md,
            "- Work directory (origin files, caches, local copy): {}",
            m.work_fs
        );
        let _ = writeln!(md, "- Command: `{}`", self.command);
        if self.program_command != self.command {
            let _ = writeln!(md, "  (runs `{}`)", self.program_command);
        }
        for line in &self.setup {
            let _ = writeln!(md, "- {line}");
        }
        let _ = writeln!(md, "- Whole run: {:.0} s\n", self.elapsed_secs);
    }

    fn results(&self, md: &mut String) {
        md.push_str("## Results\n\n");
        md.push_str("| Metric | Value | Baseline | Ratio | Target | Status |\n");
        md.push_str("|---|---|---|---|---|---|\n");
        for row in &self.rows {
            md.push_str(&row.render());
            md.push('\n');
        }
        let failures: Vec<&Row> = self.rows.iter().filter(|r| r.outcome.is_err()).collect();
        if !failures.is_empty() {
            md.push_str("\nErrors:\n\n");
            for row in failures {
                if let Err(e) = &row.outcome {
                    let _ = writeln!(md, "- {}:\n\n```text\n{}\n```", row.metric, e);
                }
            }
        }
        md.push('\n');
    }

    fn peers_section(&self, md: &mut String) {
        md.push_str("## Other S3 FUSE filesystems\n\n");
        let Some(peers) = &self.peers else {
            md.push_str("Not measured in this run (`scripts/bench --with-peers` adds rclone and s3fs when installed).\n\n");
            return;
        };
        let (plain, local) = self.peer_baselines;
        md.push_str(
            "Same objects, same origin, same procedure as the orcafs rows above (orcafs: medians of the rounds above; the others: one round each). \
             Ratios: cold read / plain GET, warm re-read / local file, origin bytes / object size.\n\n",
        );
        md.push_str("| Filesystem | Cold sequential read | Warm re-read (page cache dropped) | 8 readers: origin bytes / size |\n");
        md.push_str("|---|---|---|---|\n");
        for p in peers {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                p.name,
                speed_cell(&p.cold_seq, plain),
                speed_cell(&p.warm, local),
                match &p.readers8 {
                    Ok(r) => format!("{r:.2}"),
                    Err(_) => "failed (below)".into(),
                }
            );
        }
        md.push('\n');
        for note in &self.peer_notes {
            let _ = writeln!(md, "- {note}");
        }
        for p in peers {
            let errors = [
                ("cold read", &p.cold_seq),
                ("warm re-read", &p.warm),
                ("8 readers", &p.readers8),
            ];
            for (what, result) in errors {
                if let Err(e) = result {
                    let _ = writeln!(md, "- {} {what} failed:\n\n```text\n{e}\n```", p.name);
                }
            }
        }
        if !self.peer_notes.is_empty() {
            md.push('\n');
        }
    }

    fn details_section(&self, md: &mut String) {
        md.push_str("## Details of this run\n\n");
        for d in &self.details {
            let _ = writeln!(md, "- {d}");
        }
        md.push('\n');
    }
}

fn speed_cell(v: &Result<f64, String>, base: Option<f64>) -> String {
    match (v, base) {
        (Ok(s), Some(b)) if b > 0.0 => format!("{s:.1} MiB/s ({:.2})", s / b),
        (Ok(s), _) => format!("{s:.1} MiB/s"),
        (Err(_), _) => "failed (below)".into(),
    }
}

/// How each metric is measured, and the caveats of this setup.
const METHOD: &str = "\
## How each metric is measured

All reads go through the real mount with ordinary system calls. \"Fresh mount\" means a new
`orcafs mount --foreground` process (its kernel page cache starts empty); \"fresh cache\" means an
empty `--cache-dir`; \"page cache dropped\" means `sync; echo 3 > /proc/sys/vm/drop_caches`.
Before every cold measurement the origin's own files are read once, so the origin serves them
from memory like a remote server would, and its disk reads neither compete with orcafs's cache
writes nor add noise. Rows 1-3 and 5a are medians of several rounds (`--repeat`), each round
measuring orcafs and its baseline back to back; every round is listed under the details.

1. **Cold sequential read**: fresh cache, fresh mount; `read(2)` of the large object from offset
   0 to EOF in 1 MiB reads, open to EOF timed; the data's SHA-256 is then checked against the
   source. Baseline: one plain `GetObject` of the same object with the AWS SDK for Rust (one
   stream, whole body read into memory, SHA-256 checked too).
2. **Warm re-read**: a fresh mount over the cache the cold read filled, page cache dropped, the
   same read. The origin bytes pulled meanwhile are under the details (0 = all from the disk
   cache). Baseline: the same read of a local copy of the object on the same disk, page cache
   dropped.
3. **Hot re-read**: right after the warm re-read, the same read again through the same mount
   (page cache kept). Baseline: the local copy read a second time.
4. **Time to first byte**: fresh cache and mount; the objects' directory is looked up first
   (`stat`), then for each of several never-read objects, the origin idle before each:
   `stat(2)` of its name (never looked up before), `open(2)`, then `pread(2)` of the first
   4 KiB; median. The lookup's share is under the details. In a directory of up to 1000 objects
   the directory's lookup brings the names, sizes and ETags, so only the GET goes to the origin;
   row 4b does the same in a directory of over 1000 objects, where each name costs a lookup at
   the origin (LIST and HEAD together) first. Baseline: median over the same objects of a plain
   SDK `GetObject` on an open connection, from sending the request to the first body bytes,
   each taken right after the mount's sample of the same object and after the same idle wait
   (an idle machine answers slower than a busy one, so both sides get the same wait). The page
   cache is dropped before this phase so earlier phases' dirty pages do not weigh on it, and
   the mount first reads 4 KiB of another object (the large one) so that its code is paged in
   and its connections are open, as the plain client's are.
5. **4 KiB random reads**: *cached*: on the warm mount (whole object in the disk cache), page
   cache dropped, one `open` then `pread(2)` of 4 KiB at random 4 KiB-aligned offsets, one at a
   time; IOPS vs the same offsets on the local copy with its page cache dropped. *Cold*: fresh
   cache and mount, a smaller number of random 4 KiB reads of the large object; value = bytes
   the origin sent (its GetObject body byte counter, read once the origin is idle again),
   baseline = bytes asked for, ratio = read amplification (whole chunks are fetched, so about
   chunk size / 4 KiB per chunk touched is expected).
6. **Readers of one cold object**: fresh cache and mount, several threads each reading the whole
   large object at the same time; origin GetObject body bytes / object size (1.00 = every byte
   fetched once).
7. **Peak RSS**: fresh cache and mount, one thread per object reading a different cold object
   each, all at once; `VmHWM` of the orcafs process from `/proc/PID/status` after the reads.

Caveats of this setup:

- The origin is s3s-fs in the benchmark's own process. It streams bodies in 4 KiB pieces and is
  CPU-bound (roughly 130-200 MB/s per stream on a small machine), so cold numbers measure
  orcafs against a slow, CPU-hungry origin, not a network link; the plain-GET baseline pays the
  same cost. orcafs fetches several chunks at once, which is how it can beat one plain stream.
- Origin, orcafs and the reading threads share the machine's cores; on a 2-core machine they
  compete, which lowers the cold and concurrent numbers of every filesystem alike.
- On a virtual machine, \"page cache dropped\" reads of the local copy may still be served from
  the host's cache, which makes the local-file baselines (rows 2 and 5a) fast and variable.
- The rclone and s3fs rows (with `--with-peers`) are one round each.
";
