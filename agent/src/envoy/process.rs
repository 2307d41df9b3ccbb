//! The two places the agent needs raw syscalls on Envoy's process: tying Envoy's life to the
//! agent's (`PR_SET_PDEATHSIG`) and asking it to stop politely (`SIGTERM`). std and tokio offer
//! neither (tokio's `start_kill` is SIGKILL only), so this module alone allows `unsafe`.
#![allow(unsafe_code)]

use std::io;

use tokio::process::Command;

/// Makes the kernel SIGKILL the child when the agent dies, so a crashed or killed agent never
/// leaves an orphan Envoy holding the admin port and listeners. (SIGKILL rather than SIGTERM:
/// with its agent gone nobody would wait for a drain anyway.)
///
/// The signal fires when the *thread* that forked the child exits. tokio spawns children from a
/// runtime worker thread, and those live as long as the runtime, i.e. the agent.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is async-signal-safe and called before fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec, and only calls async-signal-safe
    // functions (prctl, getppid) and builds an io::Error without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The agent may have died between fork and prctl; then nobody would signal us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Sends SIGTERM to `pid`, Envoy's cue to shut down.
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own child, not yet reaped
    // (the caller holds its tokio Child), so the pid cannot have been reused.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
