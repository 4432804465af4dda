//! notify: the systemd readiness protocol (`sd_notify`), for `Type=notify` units.
//!
//! systemd names a datagram socket in `NOTIFY_SOCKET` (a path, or an abstract name written with a
//! leading `@`); a service sends newline-separated `KEY=VALUE` assignments to it: `READY=1` once
//! it is serving, `STOPPING=1` when it begins to shut down, `STATUS=…` as a one-line status for
//! `systemctl status`, `MAINPID=…` when another process takes over as the main one. Without
//! `NOTIFY_SOCKET` every call is a no-op, so the same binary runs with or without systemd.
//!
//! Plain `std` datagrams: the protocol is one `sendto` per message and needs no crate.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::mount::ReadyNotifier;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to the socket named by `NOTIFY_SOCKET`.
/// `Ok(false)` when the variable is unset or empty (not started by systemd).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET_ENV) {
        Some(target) if !target.is_empty() => {
            send_to(&target.to_string_lossy(), state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `state` to the notify socket `target` (a path, or `@name` for an abstract socket).
pub fn send_to(target: &str, state: &str) -> io::Result<()> {
    let addr = socket_addr(target)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to the notify socket",
        ));
    }
    Ok(())
}

fn socket_addr(target: &str) -> io::Result<SocketAddr> {
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name.as_bytes());
    }
    if !target.starts_with('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {target:?} is neither an absolute path nor @abstract"),
        ));
    }
    SocketAddr::from_pathname(target)
}

/// A status line must stay one line for `systemctl status`.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// [`ReadyNotifier`] for systemd: `READY=1` when the mount is live, `STOPPING=1` when it is going
/// down, and a `STATUS=` line with each. Inert when `NOTIFY_SOCKET` was not set at creation.
pub struct SystemdNotifier {
    target: Option<String>,
    /// What the mount serves, e.g. `bucket at /mnt/orca`, for the status line.
    what: String,
}

impl SystemdNotifier {
    /// Reads `NOTIFY_SOCKET` now; `None` when it is not set (not under systemd's `Type=notify`).
    pub fn from_env(what: impl Into<String>) -> Option<SystemdNotifier> {
        let target = std::env::var(NOTIFY_SOCKET_ENV)
            .ok()
            .filter(|t| !t.is_empty())?;
        Some(SystemdNotifier {
            target: Some(target),
            what: what.into(),
        })
    }

    fn send(&self, state: &str) {
        if let Some(target) = &self.target {
            if let Err(e) = send_to(target, state) {
                tracing::warn!(error = %e, socket = %target, "cannot notify systemd");
            }
        }
    }
}

impl ReadyNotifier for SystemdNotifier {
    fn ready(&mut self) {
        self.send(&format!("READY=1\nSTATUS=serving {}", one_line(&self.what)));
    }

    fn failed(&mut self, reason: &str) {
        self.send(&format!("STATUS=mount failed: {}", one_line(reason)));
    }

    fn stopping(&mut self) {
        self.send(&format!(
            "STOPPING=1\nSTATUS=unmounted {}",
            one_line(&self.what)
        ));
    }
}

/// Several notifiers told the same thing, in order (e.g. the detach pipe and systemd).
pub struct Notifiers(pub Vec<Box<dyn ReadyNotifier>>);

impl ReadyNotifier for Notifiers {
    fn ready(&mut self) {
        self.0.iter_mut().for_each(|n| n.ready());
    }

    fn failed(&mut self, reason: &str) {
        self.0.iter_mut().for_each(|n| n.failed(reason));
    }

    fn stopping(&mut self) {
        self.0.iter_mut().for_each(|n| n.stopping());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn path_socket_receives_ready_and_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut n = SystemdNotifier {
            target: Some(path.to_string_lossy().into_owned()),
            what: "bkt at /mnt/x".into(),
        };
        n.ready();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=serving bkt at /mnt/x");
        n.failed("bad\nthing");
        assert_eq!(recv(&sock), "STATUS=mount failed: bad thing");
        n.stopping();
        assert!(recv(&sock).starts_with("STOPPING=1\n"));
    }

    #[test]
    fn abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("orcafs-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        send_to(&format!("@{name}"), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
    }

    #[test]
    fn relative_target_is_refused() {
        assert!(send_to("relative/sock", "READY=1").is_err());
    }
}
