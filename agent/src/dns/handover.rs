//! Mesh DNS keeps its sockets across a reload (SIGHUP re-executes the agent in place), so a
//! lookup made during the reload waits in the socket for the new image instead of being
//! refused: the host's apps see no failed lookup when the agent is upgraded.
//!
//! [`keep`] stores a duplicate of each socket when the server binds (close-on-exec, so Envoy
//! and `nft` never inherit them). Just before `exec`, [`prepare`] clears close-on-exec on those
//! duplicates and names them for the new image's `PILOTFISH_DNS_FDS` (`<pid>:<udp fd>:<tcp
//! fd>`; the pid is the same after `exec`). The new image calls [`take`] first thing in `main`, while it has one
//! thread: it removes the variable (so no child sees it) and adopts the sockets when the pid is
//! its own. [`super::bind`] uses them when they are bound to the configured address, and
//! otherwise binds as usual (and the inherited sockets are closed).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Mutex;

/// The environment variable that names the inherited sockets.
pub const ENV: &str = "PILOTFISH_DNS_FDS";

/// The duplicates [`prepare`] hands over.
static KEPT: Mutex<Option<(UdpSocket, TcpListener)>> = Mutex::new(None);
/// What [`take`] adopted, until [`super::bind`] claims it.
static INHERITED: Mutex<Option<(UdpSocket, TcpListener)>> = Mutex::new(None);

/// Keeps close-on-exec duplicates of the server's sockets for a later reload.
pub fn keep(udp: &tokio::net::UdpSocket, tcp: &tokio::net::TcpListener) {
    use std::os::fd::AsFd;
    let dup_udp = udp.as_fd().try_clone_to_owned().map(UdpSocket::from);
    let dup_tcp = tcp.as_fd().try_clone_to_owned().map(TcpListener::from);
    match (dup_udp, dup_tcp) {
        (Ok(u), Ok(t)) => *lock(&KEPT) = Some((u, t)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "mesh DNS: cannot keep its sockets for reloads")
        }
    }
}

/// Before `exec`: makes the kept sockets inheritable and returns the value of [`ENV`] for the
/// new image. `None` when DNS is off (or the sockets cannot be handed over: it then rebinds).
pub fn prepare() -> Option<String> {
    let guard = lock(&KEPT);
    let (udp, tcp) = guard.as_ref()?;
    let inheritable = |fd: socket2::SockRef<'_>| fd.set_cloexec(false);
    match (
        inheritable(socket2::SockRef::from(udp)),
        inheritable(socket2::SockRef::from(tcp)),
    ) {
        (Ok(()), Ok(())) => Some(format!(
            "{}:{}:{}",
            std::process::id(),
            udp.as_raw_fd(),
            tcp.as_raw_fd()
        )),
        (Err(e), _) | (_, Err(e)) => {
            drop(guard);
            cancel();
            tracing::warn!(error = %e, "mesh DNS: cannot hand its sockets over; it rebinds");
            None
        }
    }
}

/// After a failed `exec`: close-on-exec again, so Envoy and nft never inherit the sockets.
pub fn cancel() {
    if let Some((udp, tcp)) = lock(&KEPT).as_ref() {
        let _ = socket2::SockRef::from(udp).set_cloexec(true);
        let _ = socket2::SockRef::from(tcp).set_cloexec(true);
    }
}

/// First thing in `main`: removes [`ENV`] and adopts the sockets it names, when it was set by
/// this very process before `exec`.
pub fn take() {
    let Some(value) = std::env::var_os(ENV) else {
        return;
    };
    std::env::remove_var(ENV);
    let Some((udp, tcp)) = parse(&value.to_string_lossy(), std::process::id()) else {
        return;
    };
    // SAFETY: the variable names two descriptors this process left open across `exec` for
    // exactly this (see `prepare`); `parse` checked that it was set by this process (same pid),
    // and nothing has opened or closed a descriptor since `exec` (this runs first in `main`).
    // Each becomes the sole owner of its descriptor.
    #[allow(unsafe_code)]
    let (udp, tcp) = unsafe { (UdpSocket::from_raw_fd(udp), TcpListener::from_raw_fd(tcp)) };
    // Close-on-exec again, so Envoy and nft never inherit them.
    let _ = socket2::SockRef::from(&udp).set_cloexec(true);
    let _ = socket2::SockRef::from(&tcp).set_cloexec(true);
    *lock(&INHERITED) = Some((udp, tcp));
}

/// `<pid>:<udp fd>:<tcp fd>`, when `pid` is `own_pid` and both descriptors are above stderr.
fn parse(value: &str, own_pid: u32) -> Option<(RawFd, RawFd)> {
    let mut parts = value.split(':');
    let pid: u32 = parts.next()?.parse().ok()?;
    let udp: RawFd = parts.next()?.parse().ok()?;
    let tcp: RawFd = parts.next()?.parse().ok()?;
    (pid == own_pid && parts.next().is_none() && udp > 2 && tcp > 2 && udp != tcp)
        .then_some((udp, tcp))
}

/// The inherited sockets, when both are bound to `listen`; otherwise they are closed.
pub fn claim(listen: SocketAddr) -> Option<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let (udp, tcp) = lock(&INHERITED).take()?;
    let same = |addr: std::io::Result<SocketAddr>| {
        addr.is_ok_and(|a| a == listen || (listen.port() == 0 && a.ip() == listen.ip()))
    };
    if !same(udp.local_addr()) || !same(tcp.local_addr()) {
        tracing::info!(%listen, "mesh DNS: the inherited sockets are not on listen; rebinding");
        return None;
    }
    let adopt = || -> std::io::Result<_> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((
            tokio::net::UdpSocket::from_std(udp)?,
            tokio::net::TcpListener::from_std(tcp)?,
        ))
    };
    match adopt() {
        Ok(sockets) => {
            tracing::info!(%listen, "mesh DNS: serving on the sockets of the previous image");
            Some(sockets)
        }
        Err(e) => {
            tracing::warn!(error = %e, "mesh DNS: cannot adopt the inherited sockets; rebinding");
            None
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_this_process_s_own_descriptors_are_taken() {
        assert_eq!(parse("42:7:8", 42), Some((7, 8)));
        for bad in [
            "41:7:8", "42:7", "42:7:8:9", "42:1:8", "42:7:7", "x:7:8", "",
        ] {
            assert_eq!(parse(bad, 42), None, "{bad}");
        }
    }
}
