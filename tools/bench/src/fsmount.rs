//! A FUSE filesystem process (orcafs, rclone or s3fs) kept in the
//! foreground as our child, with a guard that always unmounts and reaps it,
//! and a watchdog that kills it when a phase stops making progress (so a
//! hung mount turns into read errors instead of a hung benchmark).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bail;
use crate::error::{Context, Result};
use crate::sys;

/// How long a filesystem may take to show up in the mount table.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to exit after its unmount.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Mount points and server pids of the live mounts, for [`abort_all`].
static LIVE: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());

/// Kills every live server and lazily unmounts its mount point: the last
/// resort when the benchmark is interrupted by a signal.
pub fn abort_all() {
    let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for (mnt, pid) in live {
        // SAFETY: kill(2) of a child process we started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
}

fn register(mnt: &Path, pid: u32) {
    if let Ok(mut live) = LIVE.lock() {
        live.push((mnt.to_owned(), pid));
    }
}

fn deregister(pid: u32) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|&(_, p)| p != pid);
    }
}

/// A live mount served by a child process. Dropping it unmounts (lazily if
/// busy) and kills the process if it does not exit by itself.
pub struct FsMount {
    name: String,
    mnt: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl FsMount {
    /// Spawns `cmd` (which must stay in the foreground) with its output sent
    /// to `log`, and waits until `mnt` is mounted.
    pub fn spawn(name: &str, mut cmd: Command, mnt: &Path, log: &Path) -> Result<FsMount> {
        std::fs::create_dir_all(mnt).with_context(|| format!("creating {}", mnt.display()))?;
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        register(mnt, child.id());
        let mut mount = FsMount {
            name: name.to_owned(),
            mnt: mnt.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        };
        mount.wait_mounted()?;
        Ok(mount)
    }

    fn wait_mounted(&mut self) -> Result<()> {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while Instant::now() < deadline {
            if sys::is_mounted(&self.mnt) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                deregister(self.pid());
                self.child = None;
                bail!(
                    "{} exited with {status} before mounting; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} did not mount {} within {MOUNT_TIMEOUT:?}; log:\n{}",
            self.name,
            self.mnt.display(),
            self.log_tail()
        )
    }

    /// The process id of the filesystem server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mnt
    }

    /// `rel` inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.last_log_lines(|_| true)
    }

    /// Runs `f` while a watchdog kills the server if `f` takes longer than
    /// `limit`; a killed server makes blocked reads fail, so `f` returns.
    pub fn guarded<T>(
        &self,
        what: &str,
        limit: Duration,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let watchdog = Watchdog::start(self.pid(), limit);
        let result = f();
        if watchdog.stop() {
            bail!(
                "{what}: not done after {limit:?}, so {} (pid {}) was killed; was the mount hung? log:\n{}",
                self.name,
                self.pid(),
                self.log_tail()
            );
        }
        if result.is_err() {
            // The table keeps one line per row; the log says why (it goes with the work dir).
            eprintln!(
                "{what} through {} failed; the last warnings of its log:\n{}",
                self.name,
                self.log_warnings()
            );
        }
        result.with_context(|| format!("{what} through {}", self.name))
    }

    /// The last 20 lines of the log that are not INFO or DEBUG.
    fn log_warnings(&self) -> String {
        self.last_log_lines(|l| !l.contains(" INFO ") && !l.contains(" DEBUG "))
    }

    /// The last 20 lines of the log that `keep` keeps.
    fn last_log_lines(&self, keep: impl Fn(&str) -> bool) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Unmounts and waits for the process to exit; errors say why not.
    pub fn unmount(mut self) -> Result<()> {
        let pid = self.pid();
        let result = self.try_unmount();
        if self.child.is_none() {
            deregister(pid);
        }
        result
    }

    fn try_unmount(&mut self) -> Result<()> {
        let status = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .context("running umount")?;
        if !status.success() {
            bail!("umount {} failed with {status}", self.mnt.display());
        }
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for the server")? {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "{} exited with {status} after unmount; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {EXIT_TIMEOUT:?} of its unmount; killed",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        deregister(child.id());
        if sys::is_mounted(&self.mnt) {
            let clean = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !clean {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Kills a process with SIGKILL unless stopped within a time limit.
struct Watchdog {
    stop: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(pid: u32, limit: Duration) -> Watchdog {
        let (stop, stopped) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&fired);
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(limit) {
                flag.store(true, Ordering::SeqCst);
                if pid != 0 {
                    // SAFETY: kill(2) of our own child process.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        });
        Watchdog {
            stop,
            fired,
            thread: Some(thread),
        }
    }

    /// Stops the watchdog; true if it had already fired.
    fn stop(mut self) -> bool {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.load(Ordering::SeqCst)
    }
}
