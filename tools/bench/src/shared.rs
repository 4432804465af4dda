//! A shared cache store that hangs (issue #11 item 7): the cold sequential read through a mount
//! whose `[shared_cache]` store (a second bucket on the same server) is reached through a TCP
//! proxy in a process of its own, SIGSTOPped once the mount is up, beside the same cold read
//! without a store. A stopped process is the honest hang: the kernel still accepts connections
//! to it and nothing ever answers.
//!
//! The proxy is this program started again with `--tcp-proxy-to ADDR` ([`serve`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::bail;
use crate::error::{Context, Result};
use crate::fs::Fs;
use crate::origin::MAIN_KEY;
use crate::phases::{remove_dir, Bench, ColdSeq};
use crate::sys;

/// The shared store's bucket.
pub const SHARED_BUCKET: &str = "bench-shared";

/// Runs a TCP proxy from an ephemeral 127.0.0.1 port to `target`: prints the port's address on
/// stdout, then serves until killed (or until the bench that started it dies). With `pace`
/// (bytes per second), each client connection is sent at most that fast (the kernel's TCP
/// pacing, `SO_MAX_PACING_RATE`), as a remote endpoint gives each connection a share.
pub fn serve(target: SocketAddr, pace: Option<u64>) -> Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the proxy")?;
    let addr = listener.local_addr().context("the proxy's address")?;
    let mut out = std::io::stdout();
    writeln!(out, "{addr}")
        .and_then(|()| out.flush())
        .context("printing the proxy's address")?;
    // Serves until the bench kills it (or dies: PR_SET_PDEATHSIG above).
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        if let Some(rate) = pace {
            set_pacing(&client, rate)?;
        }
        std::thread::spawn(move || relay(client, target));
    }
    Ok(())
}

/// Caps the rate the kernel sends `socket`'s bytes at (TCP paces itself to it, no qdisc needed).
fn set_pacing(socket: &TcpStream, rate: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt(2) on an open socket with a pointer to a u64 and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&rate as *const u64).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_MAX_PACING_RATE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies bytes both ways between `client` and a new connection to `target` until both ends
/// are done.
fn relay(client: TcpStream, target: SocketAddr) {
    let Ok(upstream) = TcpStream::connect(target) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(mut c_read), Ok(mut u_read)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let (mut c_write, mut u_write) = (client, upstream);
    let up = std::thread::spawn(move || {
        let _ = pump(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(std::net::Shutdown::Write);
    });
    let _ = pump(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

/// Copies `from` to `to` until EOF through a 256 KiB buffer: `io::copy`'s 8 KiB one would make
/// the proxy's syscalls a visible share of the CPU the paced rows' readers need.
fn pump(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

/// The proxy process; killed on drop.
pub struct Proxy {
    child: Child,
    pub addr: String,
}

impl Proxy {
    /// A proxy to `target`, each connection paced to `pace` bytes per second when given.
    pub fn start(target: SocketAddr, pace: Option<u64>) -> Result<Proxy> {
        let exe = std::env::current_exe().context("finding this program to start the proxy")?;
        let mut command = Command::new(exe);
        command.arg("--tcp-proxy-to").arg(target.to_string());
        if let Some(rate) = pace {
            command.arg("--tcp-proxy-pace").arg(rate.to_string());
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the proxy")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("the proxy's stdout")?;
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the proxy's address")?;
        let addr = line.trim().to_owned();
        if addr.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the proxy exited without printing its address");
        }
        Ok(Proxy { child, addr })
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: kill(2) of our own child process.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } != 0 {
            bail!("kill({}, {sig}) failed", self.child.id());
        }
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round: the cold read without a store, then with the stalled store.
#[derive(Debug, Clone, Copy)]
pub struct StallRound {
    pub without: ColdSeq,
    pub stalled: ColdSeq,
}

impl Bench {
    /// Creates the shared store's bucket and its secret file (once).
    pub fn prepare_shared_store(&self) -> Result<PathBuf> {
        let secret = self.env.work.join("shared.secret");
        if secret.exists() {
            return Ok(secret);
        }
        self.plain.create_bucket(&self.origin, SHARED_BUCKET)?;
        write_private(
            &secret,
            b"orcafs-bench shared store secret, fresh per run\n",
        )?;
        Ok(secret)
    }

    /// One round of the stalled-store comparison.
    pub fn shared_stall(&mut self) -> Result<StallRound> {
        let secret = self.prepare_shared_store()?;
        let without = self.cold_seq(Fs::Orcafs)?;
        self.forget_cache(Fs::Orcafs)?;
        let stalled = self.stalled_cold_seq(&secret)?;
        Ok(StallRound { without, stalled })
    }

    fn stalled_cold_seq(&mut self, secret: &Path) -> Result<ColdSeq> {
        let proxy = Proxy::start(self.origin.addr(), None)?;
        let config = self.write_shared_config(&proxy.addr, secret)?;
        let cache = self.fresh_cache("orcafs-shared")?;
        let flags = ["--config".to_owned(), config.to_string_lossy().into_owned()];
        let mount = Fs::Orcafs.mount_with(&self.env, &cache, "shared-stalled", &flags)?;
        proxy.signal(libc::SIGSTOP)?;
        self.preload_origin(&[MAIN_KEY])?;
        let (elapsed, cpu) =
            self.timed_main_read(&mount, "cold read with a stalled shared store")?;
        let hwm_bytes = sys::proc_status_bytes(mount.pid(), "VmHWM")?;
        // Killed before the unmount, so that no request to it holds the exit back.
        drop(proxy);
        mount.unmount()?;
        remove_dir(&cache)?;
        Ok(ColdSeq {
            mibps: self.mibps(elapsed),
            origin_bytes: 0,
            hwm_bytes,
            cpu,
        })
    }

    /// The mount config naming the store behind the proxy at `addr` (0600: it holds keys).
    fn write_shared_config(&self, addr: &str, secret: &Path) -> Result<PathBuf> {
        let path = self.env.work.join("shared-store.toml");
        let text = format!(
            "[shared_cache]\n\
             bucket = \"{SHARED_BUCKET}\"\n\
             endpoint_url = \"http://{addr}\"\n\
             force_path_style = true\n\
             access_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\n\
             secret_file = \"{}\"\n",
            self.env.access_key,
            self.env.secret_key,
            secret.display()
        );
        let _ = std::fs::remove_file(&path);
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// Writes a new file only its owner can read (it holds keys or the store's secret).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("writing {}", path.display()))
}
