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
    Kib(f64),
    Count(f64),
}

impl Quantity {
    fn number(self) -> f64 {
        match self {
            Quantity::MibPerSec(v)
            | Quantity::Millis(v)
            | Quantity::Iops(v)
            | Quantity::Mib(v)
            | Quantity::Kib(v)
            | Quantity::Count(v) => v,
        }
    }

    fn render(self) -> String {
        match self {
            Quantity::MibPerSec(v) => format!("{v:.1} MiB/s"),
            Quantity::Millis(v) => format!("{v:.2} ms"),
            Quantity::Iops(v) => format!("{v:.0} IOPS"),
            Quantity::Mib(v) if v < 10.0 => format!("{v:.3} MiB"),
            Quantity::Mib(v) => format!("{v:.1} MiB"),
            Quantity::Kib(v) => format!("{v:.1} KiB"),
            Quantity::Count(v) => format!("{v:.0}"),
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
    /// The measurement, or why there is none: an error, or (with `skipped`) a reason.
    pub outcome: Result<Measured, String>,
    pub target: Target,
    /// Not measured in this run, for the reason in `outcome` (not a failure).
    pub skipped: bool,
}

/// A value, what it is compared with, and their ratio.
#[derive(Debug, Clone)]
pub struct Measured {
    pub value: Quantity,
    pub baseline: Option<(Quantity, String)>,
}

impl Measured {
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
            skipped: false,
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
            skipped: false,
        }
    }

    /// A measurement that could not be made.
    pub fn failed(metric: &str, error: &str, target: Target) -> Row {
        Row {
            metric: metric.into(),
            outcome: Err(error.into()),
            target,
            skipped: false,
        }
    }

    /// A measurement this run did not make, and why (shown instead of a value).
    pub fn not_measured(metric: &str, why: &str, target: Target) -> Row {
        Row {
            metric: metric.into(),
            outcome: Err(why.into()),
            target,
            skipped: true,
        }
    }

    /// Whether it was measured, or failed: not skipped.
    pub fn attempted(&self) -> bool {
        !self.skipped
    }

    /// met, missed, or neither (no target, failed, not measured).
    pub fn status(&self) -> Option<bool> {
        match &self.outcome {
            Ok(m) => self.target.met(m.value.number(), m.ratio()),
            Err(_) => None,
        }
    }

    fn render(&self) -> String {
        let target = self.target.render();
        let m = match &self.outcome {
            Ok(m) => m,
            Err(why) if self.skipped => {
                return format!(
                    "| {} | not measured: {} | — | — | {target} | not measured |",
                    self.metric,
                    escape(why)
                );
            }
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
            Err(_) => !self.skipped,
            Ok(m) => self.target.met(m.value.number(), m.ratio()) == Some(false),
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// A cell of the peer table: `None` where it does not apply (shown as "—").
pub type Cell<T> = Option<Result<T, String>>;

/// One filesystem's numbers in the comparison with other S3 FUSE mounts.
#[derive(Debug, Clone)]
pub struct PeerRow {
    pub name: String,
    pub cold_seq: Cell<f64>,
    pub warm: Cell<f64>,
    /// Cached random 4 KiB reads (page cache dropped), IOPS.
    pub random: Cell<f64>,
    pub readers8: Cell<f64>,
    /// `ls -l` of one LIST page of objects: cold and warm ms, origin requests when warm.
    pub ls_cold: Cell<f64>,
    pub ls_warm: Cell<f64>,
    pub ls_warm_requests: Cell<u64>,
}

/// What the peer table divides by.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerBaselines {
    /// Plain GET, MiB/s.
    pub plain_mibps: Option<f64>,
    /// The local copy read with 1 MiB reads, page cache dropped, MiB/s.
    pub local_warm_mibps: Option<f64>,
    /// Random 4 KiB reads of the local copy, page cache dropped, IOPS.
    pub local_random_iops: Option<f64>,
    /// One plain LIST page and local `ls -l`, ms.
    pub plain_ls_ms: Option<f64>,
    pub local_ls_ms: Option<f64>,
}

/// A goal of the issue the report answers, and the rows that measure it (by the label their
/// metric starts with, e.g. `1b.`); only rows with a target count.
#[derive(Debug, Clone)]
pub struct Goal {
    pub text: String,
    pub rows: Vec<String>,
}

/// Everything the report needs.
#[derive(Debug)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub program_command: String,
    pub setup: Vec<String>,
    pub rows: Vec<Row>,
    /// The issue whose goals are summed up (e.g. "#13"), and its goals.
    pub goals_issue: String,
    pub goals: Vec<Goal>,
    pub peers: Option<Vec<PeerRow>>,
    pub peer_notes: Vec<String>,
    pub peer_baselines: PeerBaselines,
    pub details: Vec<String>,
    pub elapsed_secs: f64,
}

impl Report {
    /// What a measurement found, or None after one failed row for each of `rows` (metric,
    /// target) that it was for.
    pub fn ok_or_fail<'a, T>(
        &mut self,
        found: &'a crate::error::Result<T>,
        rows: &[(&str, Target)],
    ) -> Option<&'a T> {
        match found {
            Ok(v) => Some(v),
            Err(e) => {
                for (metric, target) in rows {
                    self.rows.push(Row::failed(metric, &e.to_string(), *target));
                }
                None
            }
        }
    }

    /// The whole Markdown document.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.results(&mut md);
        self.goals_section(&mut md);
        self.peers_section(&mut md);
        self.details_section(&mut md);
        md.push_str(METHOD);
        md
    }

    /// Replaces the row whose metric starts with `label` (e.g. a placeholder pushed before
    /// the measurement could be made), or adds `row` at the end when there is none.
    pub fn replace_row(&mut self, label: &str, row: Row) {
        match self.rows.iter_mut().find(|r| r.metric.starts_with(label)) {
            Some(r) => *r = row,
            None => self.rows.push(row),
        }
    }

    fn header(&self, md: &mut String) {
        let m = &self.machine;
        let _ = writeln!(md, "# orcafs benchmarks\n");
        md.push_str(
            "Generated by `scripts/bench` (the `orcafs-bench` program in `tools/bench`): a real \
             `orcafs` release build mounted over FUSE against a local S3 origin on 127.0.0.1 \
             (named below), every row and its baseline measured side by side in one run. \
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
        let failures: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.outcome.is_err() && r.attempted())
            .collect();
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

    /// Each goal of the issue with the status of its rows: met only when every row with a
    /// target was measured and met it.
    fn goals_section(&self, md: &mut String) {
        if self.goals.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Goals of issue {}\n", self.goals_issue);
        md.push_str(
            "Each goal with the rows above that measure it (the status is computed from those \
             rows: met only when every one of them was measured and met its target).\n\n",
        );
        md.push_str("| Goal | Rows | Status |\n|---|---|---|\n");
        for goal in &self.goals {
            let rows: Vec<&Row> = goal
                .rows
                .iter()
                .flat_map(|label| {
                    self.rows.iter().filter(move |r| {
                        r.metric.starts_with(label.as_str()) && !matches!(r.target, Target::None)
                    })
                })
                .collect();
            let label = |r: &Row| {
                r.metric
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .trim_end_matches('.')
                    .to_owned()
            };
            let mut parts = Vec::new();
            let (mut missed, mut failed, mut unmeasured) = (false, false, rows.is_empty());
            for r in &rows {
                let what = match (&r.outcome, r.status()) {
                    (Ok(m), Some(met)) => {
                        missed |= !met;
                        let shown = m
                            .ratio()
                            .map_or_else(|| m.value.render(), |x| format!("{x:.2}"));
                        format!(
                            "{} {shown} ({}): {}",
                            label(r),
                            r.target.render(),
                            if met { "met" } else { "**MISSED**" }
                        )
                    }
                    (Err(_), _) if r.skipped => {
                        unmeasured = true;
                        format!("{}: not measured", label(r))
                    }
                    _ => {
                        failed = true;
                        format!("{}: **failed**", label(r))
                    }
                };
                parts.push(what);
            }
            let status = if missed {
                "**MISSED**"
            } else if failed {
                "**FAILED**"
            } else if unmeasured {
                "not (fully) measured"
            } else {
                "met"
            };
            let shown = if rows.is_empty() {
                "not measured in this run".to_owned()
            } else {
                parts.join("; ")
            };
            let _ = writeln!(md, "| {} | {} | {status} |", goal.text, escape(&shown));
        }
        md.push('\n');
    }

    fn peers_section(&self, md: &mut String) {
        md.push_str("## Other S3 FUSE filesystems\n\n");
        let Some(peers) = &self.peers else {
            md.push_str("Not measured in this run (`scripts/bench --with-peers` installs rclone and s3fs, and adds Mountpoint when `mount-s3` is on PATH).\n\n");
            return;
        };
        let b = self.peer_baselines;
        md.push_str(
            "Same objects, same origin, same procedure as the orcafs rows above (orcafs: medians of the rounds above; the others: one round each of the reads, the rounds of row 12 for `ls -l`; row 1c is read in the cold rounds and row 5e has rounds of its own, listed under the details). \
             `orcafs` is the default mount (FUSE passthrough where the kernel allows it), `orcafs --no-passthrough` the same reads through orcafs's own read handler. \
             Ratios: cold read / plain GET, warm re-read / local file, cached random 4 KiB reads / the same reads of the local file, origin bytes / object size, \
             cold `ls -l` / one plain LIST page, warm `ls -l` / local `ls -l`.\n\n",
        );
        md.push_str("| Filesystem | Cold sequential read | Warm re-read (page cache dropped) | Cached random 4 KiB reads (page cache dropped) | 8 readers: origin bytes / size | `ls -l` of row 12, cold | `ls -l` again (warm) | origin requests during it |\n");
        md.push_str("|---|---|---|---|---|---|---|---|\n");
        for p in peers {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                cell(&p.cold_seq, |s| ratio_cell(s, "MiB/s", 1, b.plain_mibps)),
                cell(&p.warm, |s| ratio_cell(s, "MiB/s", 1, b.local_warm_mibps)),
                cell(&p.random, |s| ratio_cell(s, "IOPS", 0, b.local_random_iops)),
                cell(&p.readers8, |r| format!("{r:.2}")),
                cell(&p.ls_cold, |s| ratio_cell(s, "ms", 1, b.plain_ls_ms)),
                cell(&p.ls_warm, |s| ratio_cell(s, "ms", 1, b.local_ls_ms)),
                cell(&p.ls_warm_requests, |n| n.to_string()),
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
                ("cached random reads", &p.random),
                ("8 readers", &p.readers8),
                ("ls -l cold", &p.ls_cold),
                ("ls -l warm", &p.ls_warm),
            ];
            for (what, result) in errors {
                if let Some(Err(e)) = result {
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

/// A peer-table cell: "—" where it does not apply, a pointer to the error below, or `shown`.
fn cell<T>(c: &Cell<T>, shown: impl Fn(&T) -> String) -> String {
    match c {
        None => "—".into(),
        Some(Err(_)) => "failed (below)".into(),
        Some(Ok(v)) => shown(v),
    }
}

/// `value unit (value / base)`, the ratio left out without a base.
fn ratio_cell(v: &f64, unit: &str, decimals: usize, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{v:.decimals$} {unit} ({:.2})", v / b),
        _ => format!("{v:.decimals$} {unit}"),
    }
}

/// How each metric is measured, and the caveats of this setup.
const METHOD: &str = "\
## How each metric is measured

**Setup.** `scripts/bench` runs the whole benchmark in a network namespace of its own
(`unshare --net`): only loopback exists, and before anything starts it brings `lo` up and turns
delayed ACKs off on it (`ip route change local 127.0.0.0/8 dev lo table local proto kernel scope
host src 127.0.0.1 quickack 1`, the same for 127.0.0.1), or a small request would wait 40 ms for
a delayed ACK that no real endpoint has. It also turns TCP tail loss probes off there
(`net.ipv4.tcp_early_retrans=0`): loopback loses nothing, but on a busy machine its ACKs can lag
past the probe timeout, and each needless 64 KiB retransmission would count as origin bytes (the
retransmissions that remain are counted under the details). The mount namespace is the host's, so the FUSE mounts
are ordinary ones. The origin is a single-node Garage (a real, fast S3 engine written in Rust)
that the bench starts in the work directory, as a separate process (`--origin s3s-fs` measures
against the in-process s3s-fs server instead, whose slow 4 KiB body streaming flatters every
ratio). Objects are put through the S3 API before measuring: large ones as single PUTs, two at a
time, small ones 32 at a time. Origin-side counts: Garage logs one line per S3 request, which
gives the request counts; the bytes it sent are counted by an nftables rule on its S3 port (in
the bench's namespace only), IP and TCP headers subtracted, HTTP headers included (a few hundred
bytes per response).

All reads go through the real mount with ordinary system calls. \"Fresh mount\" means a new
`orcafs mount --foreground` process (its kernel page cache starts empty); \"fresh cache\" means an
empty `--cache-dir`; \"page cache dropped\" means `sync; echo 3 > /proc/sys/vm/drop_caches`.
Before every cold read the object is read once from the origin (a plain GET for Garage, the
file for s3s-fs), so the origin serves it from memory like a remote server would, and its disk
reads neither compete with the cache writes nor add noise. Rows 1-3 and 5a-5d are medians of
several rounds (`--repeat`), each round measuring orcafs and its baseline back to back; the
directory rows are medians of `--repeat` rounds too, row 13 of up to 3; every round is listed
under the details. Where a row's baseline is also a median, the ratio is of the two medians.

**Baselines.** A plain client: the AWS SDK for Rust on its own single-threaded runtime, on a warm
connection, timed to the bytes the kernel asks for (the whole object for sequential reads, the
first 16 KiB for the time to first byte, every page of a listing, each 4 KiB block of the cold
random reads). For row 1b, a second SDK client on a multi-threaded runtime fetching the object as
parallel ranged GETs on connections opened just before. And the local file or directory on the
same disk, read the same way. On these virtual machines the local disk is fast (and a \"page
cache dropped\" read may still be served from the host's cache), so the local baselines are hard
ones.

1. **Cold sequential read**: fresh cache, fresh mount; `read(2)` of the large object from offset
   0 to EOF in 1 MiB reads, open to EOF timed; the data's SHA-256 is then checked against the
   source. Baseline: one plain `GetObject` of the same object (one stream, whole body read into
   memory, SHA-256 checked too). 1b: the same cold read (same medians) vs the object fetched as
   8 (`--parallel-gets`) ranged `GetObject`s of contiguous ranges at once, each body copied into
   its part of one buffer, timed from sending them to the last byte of the last one, SHA-256
   checked: what the server gives one client that asks for everything at once. 1c: vs
   Mountpoint (`mount-s3`) without `--cache`, the same cold read in the same rounds, each right
   after orcafs's (median); not measured without `--with-peers` or without `mount-s3` on PATH
   (Mountpoint has no Debian package: build it from its public source, outside this
   repository). The CPU time that the origin server's process, the filesystem's process and
   the bench process (the reader, or the plain client) use during each of these reads is read
   from /proc and listed under the details: server and client share this machine's cores, so
   a client that spends more CPU per byte leaves the server less of them.
   1d and 1e: the same cold read (fresh cache, fresh mount, SHA-256 checked) through a TCP
   proxy in front of Garage that paces every connection to the same rate (`--paced-mibps`,
   25 MiB/s: the kernel's TCP pacing, `SO_MAX_PACING_RATE` on the proxy's side of each client
   connection), as a remote S3 endpoint gives each connection a share of its bandwidth. 1d's
   baseline: the 8 parallel ranged GETs of 1b through the same proxy (about 8 x the rate); 1e's:
   Mountpoint without `--cache` through the same proxy, in the same rounds (with
   `--with-peers` and `mount-s3` on PATH). Here the reader's speed is the GETs it keeps in
   flight times the rate, not the CPU the server and the clients share.
2. **Warm re-read**: a fresh mount over the cache the cold read filled (the whole object is in
   it), page cache dropped, the same read in 1 MiB `read(2)`s (`dd bs=1M`); 2b: page cache
   dropped again, the same with 128 KiB `read(2)`s (what `cat` asks for). Open to EOF timed,
   SHA-256 checked. Each cached-read row is measured on two mounts in each round: the default
   mount, which hands the kernel the cache file of an object held whole (FUSE passthrough, on
   Linux 6.9 and later as root: the kernel then reads that file itself), and the same mount with
   `--no-passthrough` (every read goes through orcafs's read handler: \"FUSE path\"). The
   default mount's rows say whether passthrough was used in every round: the bench reads the
   mount's `passthrough_opens` counter (`orcafs status --json MNT`) after the reads, and the
   counts are under the details. With passthrough, the first open of an object in a process
   checks every block of its cache file (CRC32C) before handing it to the kernel; that check is
   inside row 2's time (a fresh mount each round). Baseline: the same reads of a local copy of
   the object, page cache dropped. The targets of issue #13 (≥ 0.8 x the local file) apply to
   the default mount; the FUSE path's rows are shown against the same baselines, without a
   target, and row 5e compares its random reads with s3fs. Origin requests during all the
   cached reads are under the details (0 = all from the disk cache).
3. **Hot re-read**: right after the warm 1 MiB re-read, the same read again through the same
   mount (page cache kept). Baseline: the local copy read a second time.
4. **Time to first byte**: fresh cache and mount; the objects' directory is looked up first
   (`stat`), then for each of several never-read objects, the origin idle before each:
   `stat(2)` of its name (never looked up before), `open(2)`, then `pread(2)` of the first
   4 KiB; median. The lookup's share is under the details. In a directory of up to 1000 objects
   the directory's lookup brings the names, sizes and ETags, so only the GET goes to the origin;
   row 4b does the same in a directory of over 1000 objects, where each name costs a lookup at
   the origin first. Baseline: a plain `GetObject` of the same object on an open connection,
   from sending the request to the first 16 KiB of body (a 4 KiB `pread` at offset 0 reaches a
   FUSE filesystem as a 16 KiB read), each taken right after the mount's sample of the same
   object and after the same idle wait. The page cache is dropped before this phase, and the
   mount first reads 4 KiB of another object so that its code is paged in and its connections
   are open, as the plain client's are.
5. **Random reads**: one `open`, then `pread(2)`s one at a time at random 4 KiB-aligned
   offsets (the same offsets for every filesystem and the local copy); open excluded.
   *5a, cached 4 KiB*: on the mounts of row 2 (whole object in the disk cache), page cache
   dropped, 4 KiB reads; IOPS vs the same offsets on the local copy with its page cache
   dropped. *5d, cached 1 MiB*: the same with 1 MiB reads (`--random-large-reads` of them),
   in MiB/s. *5e*: the FUSE path's (`--no-passthrough`) cached 4 KiB IOPS vs s3fs's, the same
   offsets on s3fs's cache, in the peer run: `--repeat` rounds that alternate a fresh
   `--no-passthrough` mount over orcafs's cache (filled again by an unmeasured cold read) and a
   fresh s3fs mount over its cache, page cache dropped before each, medians of both (such
   reads swing by a fifth between rounds, so only reads made back to back compare); not
   measured without `--with-peers` or s3fs. *5b, cold*: in each round, new offsets (`--cold-random-reads` of
   them) in the never-read large object (its size is in the row), a fresh cache and a fresh
   mount; the name is looked up first, then the origin's counters are zeroed and the 4 KiB
   reads made; value = body bytes the origin sent per read, read once the origin is idle again,
   baseline = the 4 KiB asked, ratio = read amplification (≤ 16 means ≤ 64 KiB per read). The
   origin's byte count includes each response's HTTP headers; they are subtracted at the size
   measured on the baseline's responses (bytes sent during the plain GETs minus their bodies,
   per GET) times the mount's GetObject requests; raw bytes, requests and that size are under
   the details, beside orcafs's own counters (block fills, whole-chunk fills, body bytes it
   received). *5c*: the same reads' IOPS vs the plain client's ranged `GetObject`s of the same
   4 KiB blocks, one at a time on one keep-alive connection (opened just before), made just
   before the mount's reads in the same round.
6. **Readers of one cold object**: fresh cache and mount, several threads each reading the whole
   large object at the same time; origin bytes / object size (1.00 = every byte fetched once).
7. **Peak RSS**: fresh cache and mount, one thread per object reading a different cold object
   each, all at once; `VmHWM` of the orcafs process from `/proc/PID/status` after the reads.
8. **`ls -l` of a large directory, cold**: a fresh mount with `--metadata-ttl 300s` and a fresh
   cache, which first looks up the large object (so its connection is open and its root listed,
   as the plain client's connection is warm); then `ls -l DIR` (`LC_ALL=C`, output read and its
   lines counted), process start to exit. Baseline: a plain paginated `ListObjectsV2` of the
   same prefix (delimiter `/`, 1000 keys a page), every page, in the same round.
9. **The same `ls -l` again** on the same mount, within the TTL, vs `ls -l` of a local directory
   holding the same number of files of the same sizes, run once before so its page cache is
   warm. 9b: origin requests (Garage's log) during that warm `ls -l`, the most of any round.
10. **First names of a cold directory**: on a fresh mount (warmed up as in row 8), python3 times
   `os.stat(DIR)` and then `next(os.scandir(DIR))` of the never-listed large directory
   (python's own start-up excluded); the row is their sum, the `stat` share is under the
   details. Baseline: one plain `ListObjectsV2` page (1000 keys) of the same prefix.
11. **Tree walks**: `find`, `du -s` and `ls -R` of a tree of directories of small objects, each
   on its own fresh mount (warmed up as in row 8): cold, then again warm. Baselines: the plain
   LISTs a client needs to see the whole tree (the tree's root with delimiter `/`, then every
   directory), their times summed; and the same command on a local copy of the tree, run once
   before (page cache warm).
12. **`ls -l` of one LIST page of objects**, cold and warm as in rows 8 and 9, vs one plain LIST
   page and a local directory; the peer table has the same for rclone, s3fs and Mountpoint.
13. **Hung shared cache store**: a fresh mount whose `[shared_cache]` (a second bucket on the same
   Garage, authenticated with a `secret_file`, default timeouts) is reached through a TCP proxy
   in a process of its own; once the mount is up (its store self test passed through the
   proxy), the proxy is SIGSTOPped: the kernel still accepts connections and nothing answers.
   Then the cold sequential read of row 1. Baseline: the same cold read on a fresh mount without
   a shared store, just before, in the same round. 13b: peak RSS (`VmHWM`) of each mount.

Caveats of this setup:

- Origin, orcafs and the reading threads share the machine's cores; on a 2-core machine they
  compete, which lowers the cold and concurrent numbers of every filesystem alike, and anything
  else running (builds) disturbs every number: see the load averages under the details.
- The rclone, s3fs and Mountpoint read cells (with `--with-peers`) are one round each; row 1c
  reads Mountpoint in each cold round right after orcafs, and row 5e alternates rounds of
  orcafs and s3fs.
- The goals table restates the rows: a goal is met only when every row of it that has a target
  was measured in this run and met it.
";
