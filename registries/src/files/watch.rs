//! Noticing that registry files changed: a notify watcher on the configured paths, and the
//! coalescing of bursts of events into one rescan.
//!
//! Events carry no information the registry uses: any relevant event means "rescan
//! everything", and the rescan finds what changed by comparing contents. That makes editors'
//! write-to-temp-then-rename, `rm -rf`, and queue overflows all the same case. The watcher
//! callback runs on notify's own thread and only pokes a capacity-1 channel; a poke that finds
//! the channel full is redundant, since a rescan is already due.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Wait this long without events before rescanning: an editor's save is several events.
pub(crate) const QUIET: Duration = Duration::from_millis(50);
/// Leading edge: the first event after a quiet period is acted on after only this long
/// without another event (the truncate and the write of one save come microseconds apart),
/// and at most [`QUIET`] later; what follows within a burst is coalesced with [`QUIET`].
pub(crate) const LEADING_QUIET: Duration = Duration::from_millis(3);
/// But never longer than this after the first event, so a steady trickle of writes (a
/// deploy tool copying many files) still gets picked up.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(500);

/// The notify watcher and the set of watches it should hold for the configured paths.
pub(crate) struct Watcher {
    inner: RecommendedWatcher,
    watched: BTreeMap<PathBuf, RecursiveMode>,
    /// Paths already warned about (missing, or failed to watch), so a periodic refresh does
    /// not repeat the warning.
    warned: BTreeSet<PathBuf>,
}

impl Watcher {
    pub(crate) fn new(events: mpsc::Sender<()>) -> notify::Result<Watcher> {
        let inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = &event {
                // Our own rescans open and read every file; those events must not trigger
                // another rescan. A finished write is the one access that matters.
                if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
                {
                    return;
                }
            }
            // Errors (such as an overflowed inotify queue) also mean "something may have
            // changed". Full: a rescan is already due. Closed: the registry is shutting down.
            let _ = events.try_send(());
        })?;
        Ok(Watcher {
            inner,
            watched: BTreeMap::new(),
            warned: BTreeSet::new(),
        })
    }

    /// Brings the watches in line with what exists now: a directory is watched recursively;
    /// a file, or a path that does not exist yet, through its parent directory (editors
    /// replace files by renaming, which a watch on the file itself would not survive; and a
    /// missing directory is noticed when it is created). Called before every rescan and
    /// periodically, since a watch is lost when its directory is deleted.
    pub(crate) fn refresh(&mut self, paths: &[PathBuf]) {
        let mut desired: BTreeMap<PathBuf, RecursiveMode> = BTreeMap::new();
        for path in paths {
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => {
                    if self.warned.remove(path) {
                        tracing::info!(path = %path.display(), "registry directory now exists");
                    }
                    desired.insert(path.clone(), RecursiveMode::Recursive);
                }
                Ok(_) => {
                    self.warned.remove(path);
                    desired
                        .entry(parent(path))
                        .or_insert(RecursiveMode::NonRecursive);
                }
                Err(err) => {
                    if self.warned.insert(path.clone()) {
                        tracing::warn!(path = %path.display(), error = %err, "registry path does not exist; treating it as empty until it appears");
                    }
                    let parent = parent(path);
                    if parent.is_dir() {
                        desired.entry(parent).or_insert(RecursiveMode::NonRecursive);
                    }
                }
            }
        }
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(p, mode)| desired.get(*p) != Some(*mode))
            .map(|(p, _)| p.clone())
            .collect();
        for path in stale {
            // Fails when the directory is already gone, which is why it is stale.
            let _ = self.inner.unwatch(&path);
            self.watched.remove(&path);
        }
        for (path, mode) in desired {
            if self.watched.contains_key(&path) {
                continue;
            }
            match self.inner.watch(&path, mode) {
                Ok(()) => {
                    self.warned.remove(&path);
                    self.watched.insert(path, mode);
                }
                Err(err) => {
                    // Not fatal: the periodic rescan still picks changes up, only later.
                    if self.warned.insert(path.clone()) {
                        tracing::warn!(path = %path.display(), error = %err, "cannot watch registry path; relying on periodic rescans");
                    }
                }
            }
        }
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Called after a first event: returns once no event came for `quiet`, or `max` after it was
/// called, whichever is first. Returns false when the channel is closed.
pub(crate) async fn coalesce(
    events: &mut mpsc::Receiver<()>,
    quiet: Duration,
    max: Duration,
) -> bool {
    let deadline = Instant::now() + max;
    loop {
        let until = (Instant::now() + quiet).min(deadline);
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(())) if Instant::now() < deadline => continue,
            Ok(Some(())) | Err(_) => return true,
            Ok(None) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_quiet() {
        let (tx, mut rx) = mpsc::channel(1);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(()).await;
            }
            tx
        });
        assert!(coalesce(&mut rx, QUIET, MAX_DELAY).await);
        // Three events 20 ms apart, then 50 ms of quiet.
        assert_eq!(start.elapsed(), Duration::from_millis(110));
        let _tx = sender.await.expect("sender task");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_waiting_at_max() {
        let (tx, mut rx) = mpsc::channel(1);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if tx.send(()).await.is_err() {
                    break;
                }
            }
        });
        assert!(coalesce(&mut rx, QUIET, MAX_DELAY).await);
        assert_eq!(start.elapsed(), MAX_DELAY);
        drop(rx);
        sender.await.expect("sender task");
    }

    #[tokio::test(start_paused = true)]
    async fn reports_closed_channel() {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        drop(tx);
        assert!(!coalesce(&mut rx, QUIET, MAX_DELAY).await);
    }
}
