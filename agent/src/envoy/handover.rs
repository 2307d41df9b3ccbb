//! Which Envoy runs for this host, on disk (`run_dir/envoy.json`), so that the next agent finds
//! it: the same agent after `systemctl reload` (it re-executes itself), or the one systemd starts
//! after a crash or `kill -9` (Envoy outlives its agent). The next agent takes over from that
//! Envoy with a hot restart (`--restart-epoch` + 1, the same `--base-id`), so the listening
//! sockets pass from the old process to the new one and no connection is refused.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::process;

/// File name under `run_dir`.
pub const FILE: &str = "envoy.json";
/// Where Envoy writes the base id it picked (`--base-id-path`), under `run_dir`.
pub const BASE_ID_FILE: &str = "envoy.base-id";

/// One Envoy process, as the agent that started it recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    /// Its `--restart-epoch`.
    pub epoch: u32,
    /// Its hot-restart base id (shared memory and domain sockets are named after it).
    pub base_id: u32,
    /// Its start time (clock ticks since boot, `/proc/<pid>/stat` field 22), so that a pid
    /// reused by another process is never mistaken for it.
    pub start: u64,
}

impl Record {
    /// The record of the running process `pid`.
    pub fn of(pid: u32, epoch: u32, base_id: u32) -> Option<Record> {
        let (_, start) = process::stat(pid)?;
        Some(Record {
            pid,
            epoch,
            base_id,
            start,
        })
    }

    /// Whether that very process still runs (an exited child of ours is reaped on the way).
    pub fn alive(&self) -> bool {
        if process::reap(self.pid) {
            return false;
        }
        matches!(process::stat(self.pid), Some((state, start)) if start == self.start && state != 'Z' && state != 'X')
    }

    /// The record in `run_dir`, if any (and readable).
    pub fn load(run_dir: &Path) -> Option<Record> {
        let path = run_dir.join(FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the Envoy record");
                return None;
            }
        };
        match serde_json::from_slice(&text) {
            Ok(record) => Some(record),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring a malformed Envoy record");
                None
            }
        }
    }

    /// Records this process as the host's Envoy (replacing the file atomically).
    pub fn store(&self, run_dir: &Path) {
        let path = run_dir.join(FILE);
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|json| {
                pilotfish_durable::write_atomic(&path, &json, pilotfish_durable::SECRET_MODE)
            });
        match written {
            Ok(()) => debug!(record = ?self, "recorded envoy"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot record envoy; a restarted agent will not find it")
            }
        }
    }
}

/// Reads the base id Envoy wrote to `run_dir/envoy.base-id` (`--use-dynamic-base-id`).
pub fn read_base_id(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(run_dir.join(BASE_ID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_tells_the_living_from_the_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Record::load(dir.path()), None);
        let me = Record::of(std::process::id(), 3, 17).expect("own record");
        me.store(dir.path());
        assert_eq!(Record::load(dir.path()), Some(me));
        assert!(me.alive());
        let reused = Record {
            start: me.start + 1,
            ..me
        };
        assert!(
            !reused.alive(),
            "same pid, other start time: not that process"
        );
        std::fs::write(dir.path().join(FILE), "{not json").expect("write");
        assert_eq!(Record::load(dir.path()), None);
    }

    #[test]
    fn an_exited_child_is_not_alive() {
        // `sleep` runs long enough to be recorded; it is killed, then the record's own check
        // must reap it and call it gone.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let record = Record::of(pid, 0, 1).expect("a running child has a record");
        assert!(record.alive());
        process::kill(pid).expect("kill");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process::stat(pid).is_some_and(|(s, _)| s != 'Z') {
            assert!(std::time::Instant::now() < deadline, "sleep did not die");
            std::thread::yield_now();
        }
        assert!(!record.alive(), "a dead child is not alive");
        assert!(
            process::stat(pid).is_none(),
            "and it was reaped by the check"
        );
        assert!(child.try_wait().is_err(), "nothing left for std to reap");
    }
}
