//! Host plumbing: page cache dropping, mount table, `/proc` memory counters,
//! and the machine/commit description written into the report.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Context, Result};

/// `sync; echo 3 > /proc/sys/vm/drop_caches`: the next read of any file
/// (origin objects, cache chunks, local copies) comes from disk. Needs root.
pub fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("dropping the page cache (echo 3 > /proc/sys/vm/drop_caches; run as root)")
}

/// The share of one core under which a server counts as idle.
pub const IDLE_SHARE: f64 = 0.05;

/// How [`settle`] found the server.
pub enum Settled {
    /// It used under [`IDLE_SHARE`] of a core for a second, this long after the wait began.
    Idle(Duration),
    /// It was still busy when the wait gave up.
    Busy(Duration),
    /// There is no server process to watch (or its CPU time cannot be read).
    Unknown,
}

/// Waits (at most two minutes) until the server process `pid` uses under [`IDLE_SHARE`] of a
/// core for a second, then drops the page cache (after: what the server wrote while finishing
/// its work is dropped too).
pub fn settle(pid: Option<u32>) -> Result<Settled> {
    let settled = pid.map_or(Settled::Unknown, wait_idle);
    drop_caches()?;
    Ok(settled)
}

/// [`settle`]'s wait.
fn wait_idle(pid: u32) -> Settled {
    let started = Instant::now();
    loop {
        let Some(before) = cpu_seconds(pid) else {
            return Settled::Unknown;
        };
        std::thread::sleep(Duration::from_secs(1));
        let Some(after) = cpu_seconds(pid) else {
            return Settled::Unknown;
        };
        if after - before < IDLE_SHARE {
            return Settled::Idle(started.elapsed());
        }
        if started.elapsed() >= Duration::from_secs(120) {
            return Settled::Busy(started.elapsed());
        }
    }
}

/// Whether `path` (absolute) is a mount point listed in /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| unescape_mountinfo(field) == want)
}

/// Undoes the octal escapes (`\040` for a space, ...) of mountinfo fields.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `kB` line of /proc/PID/status (`VmHWM`, `VmRSS`, ...), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> Result<u64> {
    kib_line(&format!("/proc/{pid}/status"), field)
}

/// A line of /proc/meminfo (`MemFree`, `Cached`, ...), in bytes.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    kib_line("/proc/meminfo", field).ok()
}

/// The `FIELD: N kB` line of a /proc file, in bytes.
fn kib_line(path: &str, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let prefix = format!("{field}:");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("{path} has no {field} line"))?;
    let kib: u64 = line[prefix.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("parsing {line:?} of {path}"))?;
    Ok(kib * 1024)
}

/// CPU time (user + system, all threads) that process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces: from its closing parenthesis,
    // field 3 (state) on; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i - 3)?.parse::<u64>().ok();
    // SAFETY: sysconf only reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = if per_second > 0 {
        per_second as f64
    } else {
        100.0
    };
    Some((ticks(14)? + ticks(15)?) as f64 / per_second)
}

/// CPU seconds that some processes spend over a span of work (read from /proc before and
/// after; a clock tick is 10 ms, so it suits spans of a second or more).
pub struct CpuMeter {
    start: Vec<(u32, f64)>,
}

impl CpuMeter {
    /// Starts counting for `pids`; None when one of them cannot be read.
    pub fn start(pids: &[u32]) -> Option<CpuMeter> {
        let start = pids
            .iter()
            .map(|&p| Some((p, cpu_seconds(p)?)))
            .collect::<Option<Vec<_>>>()?;
        Some(CpuMeter { start })
    }

    /// Seconds each process used since [`CpuMeter::start`], in the order given there.
    pub fn stop(&self) -> Option<Vec<f64>> {
        self.start
            .iter()
            .map(|&(p, s)| Some(cpu_seconds(p)? - s))
            .collect()
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg shows them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether an executable called `name` is on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// Trimmed stdout of a command, or `None` when it cannot run or fails.
pub fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What the report says about where and when it was measured.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub date_utc: String,
    pub commit: String,
    pub work_fs: String,
}

impl Machine {
    /// Describes this host; `work_dir` is where objects, caches and mounts live.
    pub fn describe(work_dir: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpu: field_after(&cpuinfo, "model name").unwrap_or_else(|| "unknown CPU".into()),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: field_after(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
                .map_or(0.0, |kib| kib / (1024.0 * 1024.0)),
            kernel: command_output("uname", &["-r"]).unwrap_or_default(),
            os: os_name(),
            date_utc: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
            commit: git_commit(),
            work_fs: work_filesystem(work_dir),
        }
    }
}

/// The value after `key<spaces>:` on the first matching line.
fn field_after(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn os_name() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "unknown OS".into())
}

/// `git rev-parse --short HEAD`, marked when the work tree has changes.
fn git_commit() -> String {
    let Some(head) = command_output("git", &["rev-parse", "--short", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

/// `df --output=fstype,source` of the work directory, e.g. `ext4 on /dev/vda`.
fn work_filesystem(dir: &Path) -> String {
    let dir = dir.to_string_lossy();
    command_output("df", &["--output=fstype,source", &dir])
        .and_then(|out| out.lines().nth(1).map(str::to_owned))
        .map(|line| {
            let mut parts = line.split_whitespace();
            let fstype = parts.next().unwrap_or("?");
            let source = parts.next().unwrap_or("?");
            format!("{fstype} on {source}")
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Whether loopback is the only network interface this process sees (/proc/net/dev follows
/// the process's network namespace): true in a namespace made by `unshare --net`, where rules
/// and routes touch nothing but the bench's own traffic.
pub fn in_private_net_namespace() -> bool {
    let Ok(dev) = std::fs::read_to_string("/proc/net/dev") else {
        return false;
    };
    // Two header lines, then `NAME: counters…` per interface.
    let names: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    names == ["lo"]
}

/// How loopback is set up for the report: whether the namespace is private and whether the
/// local routes of 127.0.0.0/8 and 127.0.0.1 carry `quickack 1` (no delayed ACKs).
pub fn loopback_setup() -> String {
    let private = in_private_net_namespace();
    let routes = command_output("ip", &["route", "show", "table", "local"]).unwrap_or_default();
    let quick = |dst: &str| {
        routes
            .lines()
            .any(|l| l.starts_with(&format!("local {dst} ")) && l.contains("quickack 1"))
    };
    let quickack = quick("127.0.0.0/8") && quick("127.0.0.1");
    let probes = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_early_retrans")
        .is_ok_and(|v| v.trim() == "0");
    format!(
        "{}; delayed ACKs on loopback {}; TCP tail loss probes {}",
        if private {
            "a network namespace of its own (`unshare --net`: loopback only)"
        } else {
            "the host's network namespace"
        },
        if quickack {
            "off (`quickack 1` on the local routes of 127.0.0.0/8 and 127.0.0.1)"
        } else {
            "**on** (a small request may stall 40 ms on a delayed ACK)"
        },
        if probes {
            "off (`net.ipv4.tcp_early_retrans=0`: loopback loses nothing)"
        } else {
            "on"
        }
    )
}

/// TCP segments retransmitted in this network namespace so far (`RetransSegs` of
/// /proc/net/snmp), or `None` when unreadable.
pub fn tcp_retransmitted_segments() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "RetransSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}
