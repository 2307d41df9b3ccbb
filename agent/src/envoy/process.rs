//! The few raw syscalls the agent needs on Envoy processes, which std and tokio do not offer:
//! signals other than SIGKILL, watching or reaping an Envoy the agent did not spawn in this
//! process image (one inherited across a re-exec, or from a predecessor that crashed), and the
//! keeper that stands between the agent and Envoy ([`keep`]). This module alone allows `unsafe`.
#![allow(unsafe_code)]

use std::io;

fn pid_t(pid: u32) -> io::Result<libc::pid_t> {
    libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))
}

/// Sends SIGTERM to `pid`, Envoy's cue to shut down.
pub fn terminate(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGTERM)
}

/// Sends SIGKILL to `pid`.
pub fn kill(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGKILL)
}

fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = pid_t(pid)?;
    // SAFETY: kill has no memory-safety preconditions. Callers check the process's start time
    // (see `handover::Record::alive`) or hold its tokio `Child`, so `pid` is the Envoy meant.
    if unsafe { libc::kill(pid, sig) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps `pid` if it is an exited child of this process (an Envoy spawned before a re-exec
/// stays our child). `true` when it was reaped; `false` when it still runs or is not our child.
pub fn reap(pid: u32) -> bool {
    let Ok(pid) = pid_t(pid) else {
        return false;
    };
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid out-pointer for the duration of the call; WNOHANG never
    // blocks.
    let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    reaped == pid
}

/// A process as `/proc/<pid>/stat` shows it: its state letter and its start time (clock ticks
/// since boot), which tells a process from a later one that reuses its pid.
pub fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything, spaces included.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The argument that makes `pilotfish-agent` run as an Envoy keeper (see [`keep`]).
pub const KEEPER_ARG: &str = "--envoy-keeper";

/// Signals the keeper passes on to Envoy. SIGHUP is swallowed: the keeper outlives a closed
/// terminal, and Envoy has no use for it.
const FORWARDED: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, owned sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Runs `program args` (Envoy) as this process's child and stays its parent until it exits,
/// passing signals on; returns its exit code (128 + signal when a signal ended it).
///
/// Why: Envoy asks the kernel for SIGTERM when its parent dies (`PR_SET_PDEATHSIG`, seen with
/// Envoy 1.40). With the agent as its parent, a crash or `kill -9` of the agent would stop
/// Envoy and drop the host's connections. The keeper (the agent binary run with
/// [`KEEPER_ARG`], a few hundred KiB of memory) is a parent that does nothing but wait, so
/// Envoy lives until it is told to stop, and the next agent takes it over.
pub fn keep(program: &std::ffi::OsStr, args: &[std::ffi::OsString]) -> i32 {
    use std::os::unix::process::CommandExt;
    let mut all = FORWARDED.to_vec();
    all.extend([libc::SIGCHLD, libc::SIGHUP]);
    let waited = signal_set(&all);
    // SAFETY: blocks signals for this (single-threaded) process; `waited` is valid.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &waited, std::ptr::null_mut()) };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    // SAFETY: runs between fork and exec and calls only async-signal-safe functions
    // (sigemptyset, pthread_sigmask, prctl) on a local set: Envoy starts with no signal
    // blocked, and with no ambient capability. The agent may hold CAP_NET_ADMIN and
    // CAP_NET_BIND_SERVICE as ambient capabilities ([interception], mesh DNS); Envoy needs
    // neither, and would otherwise inherit them. (An older kernel without ambient capabilities
    // fails the call with EINVAL, and then there is nothing to clear.)
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            );
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "pilotfish-agent: cannot start {}: {e}",
                program.to_string_lossy()
            );
            return 127;
        }
    };
    let Ok(pid) = pid_t(child.id()) else {
        return 127;
    };
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `waited` and `sig` are valid for the call.
        if unsafe { libc::sigwait(&waited, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGCHLD {
            let mut status: libc::c_int = 0;
            // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                return if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    1
                };
            }
        } else if FORWARDED.contains(&sig) {
            // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_this_process() {
        let (state, start) = stat(std::process::id()).expect("own stat");
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert!(start > 0);
        assert_eq!(stat(std::process::id()).map(|s| s.1), Some(start));
        assert!(stat(u32::MAX).is_none());
    }
}
