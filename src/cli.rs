//! cli: the `orcafs` command line. Parses arguments, sets up logging, and either runs the mount
//! in the foreground or detaches: the parent re-executes itself in the background with a pipe,
//! and exits 0 only once the child reports the mount live (or non-zero with the child's reason).
//!
//! Re-executing instead of `fork()` keeps the tokio runtime and the SDK out of a forked child.
//!
//! Besides `orcafs mount …`, the binary accepts the mount helper form that mount(8) and fstab
//! use: `orcafs SOURCE MOUNTPOINT [-o OPTIONS]`, and the same when invoked as `mount.fuse.orcafs`
//! (mount(8) runs `/sbin/mount.fuse.orcafs SOURCE MOUNTPOINT [-sfnvrw] -o OPTIONS`). `-o` options
//! are the flags' names ([`config::mount_options_to_flags`]).

use std::ffi::OsString;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::cachestore::{admin, disk, layout};
use crate::config::{self, Config, MountArgs};
use crate::control;
use crate::mount::{self, ReadyNotifier};
use crate::notify::{self, Notifiers, SystemdNotifier};
use crate::warm;

/// Mount an S3 bucket read-only through FUSE. Objects are fetched lazily in content-addressed
/// chunks and kept in a local disk cache, so ls, cat, cp, grep, tail, dd, sha256sum and any
/// program can read them as plain files.
///
/// Also runs as a mount(8) helper: `orcafs SOURCE MOUNTPOINT -o OPTIONS`, or installed as
/// /sbin/mount.fuse.orcafs for `mount -t fuse.orcafs` and fstab.
#[derive(Debug, Parser)]
#[command(name = "orcafs", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

const MOUNT_AFTER_HELP: &str = "\
Mount options: -o OPT[,OPT=VALUE…] sets the flags above by name (underscores or dashes), e.g.
  -o cache_dir=/var/cache/orcafs,allow_other,metadata_ttl=5m
The generic mount(8)/fstab options (_netdev, nofail, auto, noauto, defaults, ro, rw, nodev,
nosuid, x-systemd.*, …) are accepted. Signals: SIGTERM/SIGINT unmount and exit 0; SIGHUP
re-reads log_level from the --config file.";

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mount SOURCE (BUCKET, BUCKET/PREFIX/ or s3://BUCKET/PREFIX/) read-only at MOUNTPOINT.
    ///
    /// Credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
    /// AWS_PROFILE and ~/.aws, web identity, or instance metadata. Every option can also be
    /// set in the --config TOML file under the same name with underscores; flags win.
    #[command(after_help = MOUNT_AFTER_HELP)]
    Mount(Box<MountArgs>),
    /// Show what the orcafs process serving MOUNTPOINT is doing: origin, cache use, hit ratio,
    /// peers and counters.
    Status(StatusArgs),
    /// Inspect and maintain a local cache directory.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Fill the cache of mounted files and directories (recursively) so later reads are warm.
    ///
    /// Reads through the mount, so each chunk takes the normal path: this host's cache, the
    /// shared store, the chunk's coordinator peer, and only then the origin; a chunk is filled
    /// once for the whole cluster. Chunks already in this host's cache are skipped, so a second
    /// run fetches only what is missing.
    #[command(after_help = WARM_AFTER_HELP)]
    Warm(WarmArgs),
}

const WARM_AFTER_HELP: &str = "\
Progress goes to stderr: a bar on a terminal, else a line every few seconds; the summary goes to
stdout. Ctrl-C stops after the reads in flight, prints the summary and exits 130 (a second
Ctrl-C quits at once); run the same command again to resume. Exit 1 when a file or chunk could
not be read (each is named on stderr). PATHs must be inside orcafs mounts of this user.

Examples:
  orcafs warm /mnt/orca/datasets/imagenet
  orcafs warm --dry-run -v /mnt/orca/models      # what would be fetched, per file
  orcafs warm -j 32 /mnt/orca/a /mnt/orca/b.bin  # 32 chunks at a time";

#[derive(Debug, Args)]
struct WarmArgs {
    /// Files or directories inside an orcafs mount (directories are warmed recursively)
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Show what would be fetched (objects, bytes, chunks) and fetch nothing
    #[arg(long)]
    dry_run: bool,
    /// Chunks read at once
    #[arg(short, long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: u16,
    /// One line per file (with --dry-run: what each would fetch)
    #[arg(short, long)]
    verbose: bool,
    /// How often a progress line is printed when stderr is not a terminal
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration, hide = true)]
    progress_every: std::time::Duration,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Mount point of a running orcafs mount
    mountpoint: PathBuf,
    /// Print the raw status document (JSON)
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct CacheDirArgs {
    /// The cache directory [default: cache_dir from --config, else the mount default]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Take cache_dir (and cache_max_size) from this mount config file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CacheCmd {
    /// Count the objects, chunks and bytes held (reads the block maps, not the data).
    Stats(CacheDirArgs),
    /// Read every block held in full and check it against its block map entry (and each map's
    /// header, placement and length). Exits 1 if bad blocks or files were found (and not all
    /// repaired with --repair).
    Verify {
        #[command(flatten)]
        dir: CacheDirArgs,
        /// Mark bad blocks absent and delete unusable files (a mount never serves them; it
        /// refetches them)
        #[arg(long)]
        repair: bool,
    },
    /// Delete least recently used objects until the cache fits in --max-size.
    Evict {
        #[command(flatten)]
        dir: CacheDirArgs,
        /// Target size, e.g. 5GiB [default: cache_max_size from --config, else 10GiB]
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Proceed even if a running mount uses the cache
        #[arg(long)]
        force: bool,
    },
    /// Delete every chunk and temp file (the directory and its log stay).
    Clear {
        #[command(flatten)]
        dir: CacheDirArgs,
        /// Proceed even if a running mount uses the cache
        #[arg(long)]
        force: bool,
    },
}

/// Env var naming the fd a detached child reports readiness on.
const READY_FD_ENV: &str = "ORCAFS_READY_FD";
/// The fd number the ready pipe is placed at in the child.
const READY_FD: i32 = 3;
/// Subcommand names; anything else in first position is the helper form's SOURCE.
const SUBCOMMANDS: &[&str] = &["mount", "status", "cache", "warm", "help"];

pub fn main() -> i32 {
    default_home();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let inv = match normalize_args(argv) {
        Ok(inv) => inv,
        Err(e) => return fail(&e),
    };
    let cli = match Cli::try_parse_from(&inv.argv) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Cmd::Mount(args) if inv.fake => match args.resolve() {
            // mount -f: check everything, mount nothing.
            Ok(_) => 0,
            Err(e) => fail(&e.to_string()),
        },
        Cmd::Mount(args) => mount_command(*args, &inv.notes),
        Cmd::Status(a) => status_command(&a),
        Cmd::Cache(c) => cache_command(c),
        Cmd::Warm(a) => warm_command(a),
    }
}

/// Systemd mount and service units run without `HOME`; the AWS SDK needs it to find `~/.aws`.
fn default_home() {
    if std::env::var_os("HOME").is_some_and(|h| !h.is_empty()) {
        return;
    }
    // SAFETY: getpwuid_r writes only into the buffers given; single-threaded at this point.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        );
        if rc == 0 && !out.is_null() && !pw.pw_dir.is_null() {
            let dir = std::ffi::CStr::from_ptr(pw.pw_dir);
            if !dir.to_bytes().is_empty() {
                use std::os::unix::ffi::OsStrExt;
                std::env::set_var("HOME", std::ffi::OsStr::from_bytes(dir.to_bytes()));
            }
        }
    }
}

/// The command line as clap should see it.
#[derive(Debug, PartialEq, Eq)]
struct Invocation {
    argv: Vec<OsString>,
    /// Accepted mount options without effect, for the log.
    notes: Vec<String>,
    /// mount(8)'s `-f`: check, do not mount.
    fake: bool,
}

/// Rewrites the helper forms and `-o` options into plain `orcafs mount …` flags.
fn normalize_args(argv: Vec<OsString>) -> Result<Invocation, String> {
    let arg0 = argv.first().cloned().unwrap_or_else(|| "orcafs".into());
    let invoked_as = Path::new(&arg0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let first = argv.get(1).map(|a| a.to_string_lossy().into_owned());
    if invoked_as.starts_with("mount.") {
        return helper_form(argv, true);
    }
    match first.as_deref() {
        Some("mount") => {
            let mut rest = argv[2..].to_vec();
            let options = take_options(&mut rest)?;
            let m = config::mount_options_to_flags(&options, false).map_err(|e| e.to_string())?;
            let mut out = vec![arg0, "mount".into()];
            out.extend(rest);
            out.extend(m.flags.into_iter().map(OsString::from));
            Ok(Invocation {
                argv: out,
                notes: m.notes,
                fake: false,
            })
        }
        Some(f) if argv.len() >= 3 && !f.starts_with('-') && !SUBCOMMANDS.contains(&f) => {
            helper_form(argv, false)
        }
        _ => Ok(Invocation {
            argv,
            notes: Vec::new(),
            fake: false,
        }),
    }
}

/// Removes `-o X`, `-oX`, `--options X` and `--options=X` from `args`; returns the option lists.
fn take_options(args: &mut Vec<OsString>) -> Result<Vec<String>, String> {
    let mut options = Vec::new();
    let mut kept = Vec::new();
    let mut it = std::mem::take(args).into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        if s == "-o" || s == "--options" {
            let v = it
                .next()
                .ok_or_else(|| format!("{s} needs a value: {s} OPT[,OPT=VALUE…]"))?;
            options.push(v.to_string_lossy().into_owned());
        } else if let Some(v) = s.strip_prefix("--options=") {
            options.push(v.to_string());
        } else if let Some(v) = s.strip_prefix("-o").filter(|_| !s.starts_with("--")) {
            options.push(v.to_string());
        } else {
            kept.push(a);
        }
    }
    *args = kept;
    Ok(options)
}

/// `SOURCE MOUNTPOINT [-o OPTS] [flags]`. As mount(8)'s helper (`from_mount`), the short flags
/// are mount's: `-s` sloppy, `-f` fake, `-n` no mtab, `-v` verbose, `-r`/`-w` ro/rw; run
/// directly, `-f` keeps its usual meaning (foreground), and `--flags` pass through.
fn helper_form(argv: Vec<OsString>, from_mount: bool) -> Result<Invocation, String> {
    use clap::Args as _;
    let mount_cmd = MountArgs::augment_args(clap::Command::new("orcafs-mount"));
    let takes_value = |long: &str| {
        mount_cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .is_some_and(|a| a.get_action().takes_values())
    };
    let usage = "usage: mount.fuse.orcafs SOURCE MOUNTPOINT [-o OPTIONS]";
    let arg0 = argv.first().cloned().unwrap_or_else(|| "orcafs".into());
    let mut options = Vec::new();
    let mut positionals: Vec<OsString> = Vec::new();
    let mut passthrough: Vec<OsString> = Vec::new();
    let (mut sloppy, mut fake) = (false, false);
    let mut notes = Vec::new();
    let mut it = argv.into_iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        if s == "-o" || s == "--options" {
            let v = it.next().ok_or_else(|| format!("{s} needs a value"))?;
            options.push(v.to_string_lossy().into_owned());
        } else if let Some(v) = s.strip_prefix("--options=") {
            options.push(v.to_string());
        } else if s == "-t" {
            let t = it.next().ok_or("-t needs a type")?;
            let t = t.to_string_lossy();
            if t != "fuse.orcafs" && t != "orcafs" {
                return Err(format!(
                    "filesystem type {t:?} is not orcafs (expected fuse.orcafs)"
                ));
            }
        } else if s == "-N" || s.starts_with("--namespace") {
            return Err("mounting in another namespace (-N) is not supported".into());
        } else if let Some(long) = s.strip_prefix("--") {
            passthrough.push(a.clone());
            if !long.contains('=') && takes_value(long) {
                passthrough.extend(it.next());
            }
        } else if let Some(v) = s.strip_prefix("-o") {
            options.push(v.to_string());
        } else if from_mount && s.len() > 1 && s.starts_with('-') {
            for c in s[1..].chars() {
                match c {
                    's' => sloppy = true,
                    'f' => fake = true,
                    'n' | 'v' => {}
                    'r' => notes.push("-r: orcafs is always read-only".to_string()),
                    'w' => notes.push("-w: orcafs is always read-only; ignored".to_string()),
                    other => return Err(format!("unknown mount helper flag -{other}; {usage}")),
                }
            }
        } else if s.starts_with('-') && s.len() > 1 {
            passthrough.push(a);
        } else {
            positionals.push(a);
        }
    }
    let [source, mountpoint]: [OsString; 2] =
        positionals.try_into().map_err(|p: Vec<OsString>| {
            format!(
                "expected SOURCE and MOUNTPOINT, got {} arguments; {usage}",
                p.len()
            )
        })?;
    let m = config::mount_options_to_flags(&options, sloppy).map_err(|e| e.to_string())?;
    notes.extend(m.notes);
    let mut out = vec![arg0, "mount".into(), source, mountpoint];
    out.extend(m.flags.into_iter().map(OsString::from));
    out.extend(passthrough);
    Ok(Invocation {
        argv: out,
        notes,
        fake,
    })
}

fn mount_command(args: MountArgs, notes: &[String]) -> i32 {
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let ready_fd = std::env::var(READY_FD_ENV).ok();
    if !cfg.foreground && ready_fd.is_none() {
        return detach(&cfg);
    }
    let detached = ready_fd.is_some();
    let reload = match init_logging(&cfg, detached) {
        Ok(r) => r,
        Err(e) => {
            // Our stderr is /dev/null when detached: the waiting parent prints the reason.
            if detached {
                PipeNotifier::take().failed(&e);
            }
            return fail(&e);
        }
    };
    for n in notes {
        tracing::debug!("{n}");
    }
    if let Err(e) = watch_sighup(args.config.clone(), cfg.log_level.clone(), reload) {
        tracing::warn!(error = %e, "cannot watch SIGHUP; the log level cannot be reloaded");
    }
    let mut list: Vec<Box<dyn ReadyNotifier>> = Vec::new();
    if ready_fd.is_some() {
        list.push(Box::new(PipeNotifier::take()));
    }
    let what = format!(
        "{}{} at {}",
        cfg.bucket,
        if cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", cfg.prefix)
        },
        cfg.mountpoint.display()
    );
    if let Some(sd) = SystemdNotifier::from_env(what) {
        list.push(Box::new(sd));
    }
    let mut notifier = Notifiers(list);
    match mount::run(cfg, &mut notifier) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "mount failed");
            notifier.failed(&e.to_string());
            fail(&e.to_string())
        }
    }
}

fn fail(message: &str) -> i32 {
    eprintln!("orcafs: error: {message}");
    1
}

/// Replaces the log filter (on SIGHUP).
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

fn init_logging(cfg: &Config, detached: bool) -> Result<Reload, String> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = EnvFilter::try_new(&cfg.log_level)
        .map_err(|e| format!("invalid log level {:?}: {e}", cfg.log_level))?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let file = match &cfg.log_file {
        Some(p) => Some(p.clone()),
        // In the cache's own directory (made and checked here, before anything is logged).
        None if detached => Some(layout::log_path(
            &disk::prepare_root(&cfg.cache_dir).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let (writer, ansi) = match file {
        Some(path) => (BoxMakeWriter::new(Mutex::new(open_log(&path)?)), false),
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(writer),
        )
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    Ok(Box::new(move |f| {
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

/// Opens the log for appending; a new file is 0600 (logs name buckets and keys), in a new
/// directory 0700. An existing file keeps its mode: it is the operator's.
fn open_log(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Best effort: opening the file says what is wrong if this failed.
        let _ = disk::create_private_dir(dir);
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))
}

/// On SIGHUP, sets the log level to `log_level` from the config file (re-read), or back to
/// `start_level` (what the mount started with) when the file has none or there is no file.
fn watch_sighup(
    config: Option<PathBuf>,
    start_level: String,
    reload: Reload,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    // Registered here, before the mount goes live, so a SIGHUP never kills the process.
    let mut hup = {
        let _guard = rt.enter();
        signal(SignalKind::hangup())?
    };
    std::thread::Builder::new()
        .name("orcafs-sighup".into())
        .spawn(move || {
            rt.block_on(async move {
                while hup.recv().await.is_some() {
                    reload_log_level(config.as_deref(), &start_level, &reload);
                }
            })
        })?;
    Ok(())
}

fn reload_log_level(config: Option<&Path>, start_level: &str, reload: &Reload) {
    let level = match config.map(config::load_file) {
        Some(Ok(file)) => file.log_level.unwrap_or_else(|| start_level.to_string()),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "SIGHUP: cannot re-read the config file; log level unchanged");
            return;
        }
        None => start_level.to_string(),
    };
    let filter = match EnvFilter::try_new(&level) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(level = %level, error = %e, "SIGHUP: invalid log level; unchanged");
            return;
        }
    };
    match reload(filter) {
        Ok(()) => {
            tracing::info!(level = %level, "SIGHUP: log level reloaded");
            tracing::debug!(level = %level, "debug logging is on");
        }
        Err(e) => tracing::warn!(error = %e, "SIGHUP: cannot change the log level"),
    }
}

/// The child's end of the ready pipe: one line, `ok` or `error: …`, then closed.
struct PipeNotifier(Option<File>);

impl PipeNotifier {
    fn take() -> PipeNotifier {
        std::env::remove_var(READY_FD_ENV);
        // SAFETY: the parent placed the pipe's write end at READY_FD for us and nothing
        // else in this process owns that fd.
        PipeNotifier(Some(unsafe { File::from_raw_fd(READY_FD) }))
    }

    fn send(&mut self, line: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "{line}");
        }
    }
}

impl ReadyNotifier for PipeNotifier {
    fn ready(&mut self) {
        self.send("ok");
    }

    fn failed(&mut self, reason: &str) {
        self.send(&format!("error: {reason}"));
    }
}

/// Starts the mount in a detached child and waits for its verdict.
fn detach(cfg: &Config) -> i32 {
    let (read_end, write_end) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(&format!("cannot create a pipe: {e}")),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(&format!("cannot find my own executable: {e}")),
    };
    let write_raw = write_end.as_raw_fd();
    let mut args = std::env::args_os();
    let mut cmd = Command::new(exe);
    // The same argv[0], so the child parses the same form (e.g. mount.fuse.orcafs).
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args)
        .env(READY_FD_ENV, READY_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (setsid, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::dup2(write_raw, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot start the mount process: {e}")),
    };
    // Under a systemd Type=notify unit, the child becomes the main process and notifies itself.
    let _ = notify::notify(&format!("MAINPID={}", child.id()));
    drop(write_end);
    let mut verdict = String::new();
    let _ = File::from(read_end).read_to_string(&mut verdict);
    let verdict = verdict.trim();
    if verdict == "ok" {
        return 0;
    }
    if let Some(reason) = verdict.strip_prefix("error: ") {
        let _ = child.wait();
        return fail(reason);
    }
    let status = child.wait();
    fail(&format!(
        "the mount process exited before the mount was live ({}); see {}",
        status
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string()),
        cfg.log_file
            .clone()
            .unwrap_or_else(|| default_log(cfg))
            .display()
    ))
}

/// Where a detached mount with `cfg` logs by default: in the cache's own directory.
fn default_log(cfg: &Config) -> PathBuf {
    let root = layout::find_root(&cfg.cache_dir).ok().flatten();
    layout::log_path(&root.unwrap_or_else(|| cfg.cache_dir.clone()))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints; O_CLOEXEC keeps the ends out of other children
    // (the child gets its copy through dup2, which clears the flag).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn status_command(a: &StatusArgs) -> i32 {
    let mnt = control::canonical_mountpoint(&a.mountpoint);
    let sock = control::socket_path(&mnt);
    match control::query(&sock) {
        Ok(doc) if a.json => {
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            0
        }
        Ok(doc) => {
            print!("{}", control::render(&doc));
            0
        }
        Err(e) => match fs_type_at(&mnt).as_deref() {
            Some("fuse.orcafs") => fail(&format!(
                "{} is an orcafs mount, but no process answers on {} ({e}); if its process is \
                 gone, clear the mount with `umount -l {}`",
                mnt.display(),
                sock.display(),
                mnt.display()
            )),
            Some(other) => fail(&format!(
                "{} is a {other} mount, not an orcafs mount",
                mnt.display()
            )),
            None => fail(&format!(
                "no orcafs process serves {} (it is not a mount point; nothing answers on {})",
                mnt.display(),
                sock.display()
            )),
        },
    }
}

fn warm_command(a: WarmArgs) -> i32 {
    let opts = warm::Options {
        paths: a.paths,
        dry_run: a.dry_run,
        jobs: usize::from(a.jobs),
        verbose: a.verbose,
        progress_every: a.progress_every,
    };
    match warm::run(&opts, &fs_type_at) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// Filesystem type of the mount at `abs`, from /proc/self/mountinfo (the last one wins).
fn fs_type_at(abs: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = abs.to_string_lossy();
    info.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let point = pre.split(' ').nth(4)?;
        let fstype = post.split(' ').next()?;
        (unescape_octal(point) == want).then(|| fstype.to_string())
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = |c: &u8| (b'0'..=b'7').contains(c);
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(oct) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Cache directory and size bound as a mount with the same flags/config would use them.
fn cache_settings(dir: &CacheDirArgs, max_size: Option<String>) -> Result<(PathBuf, u64), String> {
    let args = MountArgs {
        source: "orcafs-admin".into(),
        mountpoint: "/".into(),
        config: dir.config.clone(),
        cache_dir: dir.cache_dir.clone(),
        cache_max_size: max_size,
        ..Default::default()
    };
    let cfg = args.resolve().map_err(|e| e.to_string())?;
    Ok((cfg.cache_dir, cfg.cache_max_size))
}

/// Mounts (of this user) whose status says they use `dir`.
fn mounts_using(dir: &Path) -> Vec<String> {
    let want = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    control::live_reports()
        .into_iter()
        .filter(|doc| {
            doc["cache"]["dir"].as_str().is_some_and(|d| {
                let d = Path::new(d);
                d.canonicalize().unwrap_or_else(|_| d.to_owned()) == want
            })
        })
        .map(|doc| {
            format!(
                "{} (pid {})",
                doc["mountpoint"].as_str().unwrap_or("?"),
                doc["pid"]
            )
        })
        .collect()
}

fn refuse_if_in_use(dir: &Path, force: bool) -> Result<(), String> {
    let users = mounts_using(dir);
    if users.is_empty() || force {
        return Ok(());
    }
    Err(format!(
        "cache {} is in use by the mount at {}; unmount it first, or pass --force",
        dir.display(),
        users.join(", ")
    ))
}

fn cache_command(cmd: CacheCmd) -> i32 {
    match run_cache_command(cmd) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn run_cache_command(cmd: CacheCmd) -> Result<i32, String> {
    use control::human_bytes as hb;
    let err = |e: std::io::Error| e.to_string();
    match cmd {
        CacheCmd::Stats(d) => {
            let (dir, max) = cache_settings(&d, None)?;
            let s = admin::stats(&dir).map_err(err)?;
            let when = |t: Option<std::time::SystemTime>| {
                t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_else(|| "-".into())
            };
            println!("cache dir    {}", dir.display());
            println!("objects      {}", s.objects);
            println!(
                "chunks       {} ({}, {} bytes; bound {})",
                s.chunks,
                hb(s.bytes),
                s.bytes,
                hb(max)
            );
            println!("temp files   {} ({})", s.temp_files, hb(s.temp_bytes));
            println!("other files  {}", s.other_files);
            println!(
                "last use     oldest {}, newest {}",
                when(s.oldest_use),
                when(s.newest_use)
            );
            Ok(0)
        }
        CacheCmd::Verify { dir, repair } => {
            let (dir, _) = cache_settings(&dir, None)?;
            let r = admin::verify(&dir, repair).map_err(err)?;
            for b in &r.bad {
                println!("bad  {}: {}", b.path.display(), b.reason);
            }
            println!(
                "checked {} chunks: {} good ({}), {} bad{}",
                r.checked,
                r.good,
                hb(r.good_bytes),
                r.bad.len(),
                if repair {
                    format!(", {} repaired", r.removed)
                } else {
                    String::new()
                }
            );
            let unresolved = r.bad.len() as u64 - if repair { r.removed } else { 0 };
            Ok(if unresolved > 0 { 1 } else { 0 })
        }
        CacheCmd::Evict {
            dir,
            max_size,
            force,
        } => {
            let (dir, max) = cache_settings(&dir, max_size)?;
            admin::check_cache_dir(&dir).map_err(err)?;
            refuse_if_in_use(&dir, force)?;
            let r = admin::evict(&dir, max).map_err(err)?;
            println!(
                "evicted {} chunks ({}); {} chunks ({}) remain, bound {}",
                r.removed,
                hb(r.freed_bytes),
                r.remaining_chunks,
                hb(r.remaining_bytes),
                hb(max)
            );
            Ok(0)
        }
        CacheCmd::Clear { dir, force } => {
            let (dir, _) = cache_settings(&dir, None)?;
            admin::check_cache_dir(&dir).map_err(err)?;
            refuse_if_in_use(&dir, force)?;
            let r = admin::clear(&dir).map_err(err)?;
            println!(
                "removed {} chunks ({}) and {} temp files from {}; kept {} other files",
                r.chunks_removed,
                hb(r.bytes_freed),
                r.temp_removed,
                dir.display(),
                r.other_kept
            );
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn mount8_helper_form() {
        let inv = normalize_args(argv(&[
            "/sbin/mount.fuse.orcafs",
            "bkt",
            "/mnt/x",
            "-n",
            "-v",
            "-o",
            "rw,cache_dir=/c,_netdev,nofail,allow_other",
        ]))
        .unwrap();
        assert_eq!(
            strs(&inv.argv),
            [
                "/sbin/mount.fuse.orcafs",
                "mount",
                "bkt",
                "/mnt/x",
                "--cache-dir=/c",
                "--allow-other"
            ]
        );
        assert!(!inv.fake);
        let cli = Cli::try_parse_from(&inv.argv).unwrap();
        let Cmd::Mount(m) = cli.command else {
            panic!("not a mount")
        };
        assert_eq!(m.cache_dir.as_deref(), Some(Path::new("/c")));
        assert!(m.allow_other);

        let fake = normalize_args(argv(&["mount.fuse.orcafs", "bkt", "/m", "-f", "-o", "ro"]));
        assert!(fake.unwrap().fake);
        let sloppy = normalize_args(argv(&["mount.fuse.orcafs", "bkt", "/m", "-s", "-o", "zz"]));
        assert!(sloppy.is_ok());
        let e = normalize_args(argv(&["mount.fuse.orcafs", "bkt", "/m", "-o", "zz=1"]));
        assert!(e.unwrap_err().contains("\"zz=1\""));
        let e = normalize_args(argv(&["mount.fuse.orcafs", "bkt", "-o", "ro"]));
        assert!(e.unwrap_err().contains("SOURCE and MOUNTPOINT"));
        let e = normalize_args(argv(&["mount.fuse.orcafs", "b", "/m", "-t", "nfs"]));
        assert!(e.is_err());
    }

    #[test]
    fn direct_helper_form_and_mount_with_o() {
        let inv = normalize_args(argv(&[
            "orcafs",
            "bkt",
            "/mnt/x",
            "-o",
            "metadata_ttl=5m",
            "--log-file",
            "/l",
            "-f",
        ]))
        .unwrap();
        assert_eq!(
            strs(&inv.argv),
            [
                "orcafs",
                "mount",
                "bkt",
                "/mnt/x",
                "--metadata-ttl=5m",
                "--log-file",
                "/l",
                "-f"
            ]
        );
        let inv = normalize_args(argv(&["orcafs", "mount", "bkt", "/m", "-oallow_other"])).unwrap();
        assert_eq!(
            strs(&inv.argv),
            ["orcafs", "mount", "bkt", "/m", "--allow-other"]
        );
        // Subcommands keep their meaning.
        let inv = normalize_args(argv(&["orcafs", "status", "/m"])).unwrap();
        assert_eq!(strs(&inv.argv), ["orcafs", "status", "/m"]);
        let inv = normalize_args(argv(&["orcafs", "cache", "stats", "--cache-dir", "/c"])).unwrap();
        assert_eq!(inv.argv.len(), 5);
        // Two paths to warm are not the helper form's SOURCE MOUNTPOINT.
        let inv = normalize_args(argv(&["orcafs", "warm", "/m/a", "/m/b"])).unwrap();
        assert_eq!(strs(&inv.argv), ["orcafs", "warm", "/m/a", "/m/b"]);
        let cli = Cli::try_parse_from(&inv.argv).unwrap();
        let Cmd::Warm(w) = cli.command else {
            panic!("not a warm")
        };
        assert_eq!((w.paths.len(), w.jobs, w.dry_run), (2, 8, false));
        assert!(
            Cli::try_parse_from(["orcafs", "warm"]).is_err(),
            "a PATH is required"
        );
        assert!(Cli::try_parse_from(["orcafs", "warm", "-j", "0", "/m"]).is_err());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_octal("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(fs_type_at(Path::new("/definitely/not/here")), None);
    }
}
