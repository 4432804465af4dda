//! cli: the `orcafs` command line. Parses arguments, sets up logging, and either runs the mount
//! in the foreground or detaches: the parent re-executes itself in the background with a pipe,
//! and exits 0 only once the child reports the mount live (or non-zero with the child's reason).
//!
//! Re-executing instead of `fork()` keeps the tokio runtime and the SDK out of a forked child.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use clap::{Parser, Subcommand};

use crate::config::{Config, MountArgs};
use crate::mount::{self, ReadyNotifier};

/// Mount an S3 bucket read-only through FUSE. Objects are fetched lazily in content-addressed
/// chunks and kept in a local disk cache, so ls, cat, cp, grep, tail, dd, sha256sum and any
/// program can read them as plain files.
#[derive(Debug, Parser)]
#[command(name = "orcafs", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mount SOURCE (BUCKET, BUCKET/PREFIX/ or s3://BUCKET/PREFIX/) read-only at MOUNTPOINT.
    ///
    /// Credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
    /// AWS_PROFILE and ~/.aws, web identity, or instance metadata. Every option can also be
    /// set in the --config TOML file under the same name with underscores; flags win.
    Mount(MountArgs),
}

/// Env var naming the fd a detached child reports readiness on.
const READY_FD_ENV: &str = "ORCAFS_READY_FD";
/// The fd number the ready pipe is placed at in the child.
const READY_FD: i32 = 3;

pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Mount(args) => mount_command(args),
    }
}

fn mount_command(args: MountArgs) -> i32 {
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let ready_fd = std::env::var(READY_FD_ENV).ok();
    if !cfg.foreground && ready_fd.is_none() {
        return detach(&cfg);
    }
    let detached = ready_fd.is_some();
    if let Err(e) = init_logging(&cfg, detached) {
        return fail(&e);
    }
    let mut notifier: Box<dyn ReadyNotifier> = match ready_fd {
        Some(_) => Box::new(PipeNotifier::take()),
        None => Box::new(NoNotifier),
    };
    match mount::run(cfg, notifier.as_mut()) {
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

fn init_logging(cfg: &Config, detached: bool) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .map_err(|e| format!("invalid log level {:?}: {e}", cfg.log_level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let file = match &cfg.log_file {
        Some(p) => Some(p.clone()),
        None if detached => Some(cfg.cache_dir.join("orcafs.log")),
        None => None,
    };
    match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            builder.with_ansi(false).with_writer(Mutex::new(f)).init();
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

struct NoNotifier;

impl ReadyNotifier for NoNotifier {
    fn ready(&mut self) {}
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
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
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
            .unwrap_or_else(|| cfg.cache_dir.join("orcafs.log"))
            .display()
    ))
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
