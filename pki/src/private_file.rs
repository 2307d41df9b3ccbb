//! The file plumbing of the identity stores: an I/O error that names its file, and the lock
//! that serialises read-modify-write of a state file several processes change. Writing the
//! files themselves (atomically, durably, with their mode) is `pilotfish_durable`'s.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An I/O error that names the file it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Attaches the path to an I/O error.
pub(crate) fn at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_owned(),
        source,
    }
}

/// A lock file older than this was left by a crashed writer.
const STALE_LOCK: Duration = Duration::from_secs(10);

/// An exclusive lock file (created with `create_new`), removed on drop: writers of a state
/// file that several processes change (discovery and the CLI) hold it around their
/// read-modify-write. `WouldBlock` when another writer keeps it for about two seconds.
pub(crate) struct Lock {
    path: PathBuf,
}

impl Lock {
    pub(crate) fn acquire(path: &Path) -> io::Result<Self> {
        for _ in 0..200 {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(_) => {
                    return Ok(Self {
                        path: path.to_owned(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .is_some_and(|age| age > STALE_LOCK);
                    if stale {
                        tracing::warn!(lock = %path.display(), "removing a stale lock");
                        let _ = fs::remove_file(path);
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "another writer holds the lock",
        ))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
