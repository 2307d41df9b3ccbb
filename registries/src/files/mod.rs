//! The TOML file registry: every `*.toml` under the configured paths, merged into one
//! [`Catalog`] and republished whenever a file changes.
//!
//! Data flows scan -> parse -> merge/validate -> publish:
//!
//! - [`scan`] lists and reads the files (blocking I/O, on tokio's blocking pool);
//! - [`parse`] (with [`rules`] for routes and policies, [`authz`] for authorizations) turns
//!   one file into declarations with positions, checking what one file alone can get wrong;
//!   [`validate`] merges the declarations of all files and checks what needs several;
//! - [`state`] keeps the last good version of each file and decides which versions are in
//!   force: bad input never replaces good state;
//! - [`watch`] tells [`FileRegistry::run`] when to rescan;
//! - [`persist`] keeps the versions in force in the last-good store (when there is one), and at
//!   start [`state::FileSet::restore`] puts them back in force for files that are broken now.
//!
//! Problems are reported as `path:line:column: field: message`, logged when they first
//! appear, and kept in [`FilesStatus`] for discovery's status API.

mod actions;
mod authz;
mod gateways;
mod overlay;
mod parse;
mod persist;
mod rules;
mod scan;
mod state;
mod validate;
mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch as channel};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::config_vocab::Problem;
use crate::last_good::LastGoodStore;
use crate::model::Catalog;
pub use overlay::{check_with, declared, Declared};
pub use parse::is_valid_name;
use state::{FileSet, Settled};

/// How often the registry rescans even without events: a safety net for lost watches (a
/// deleted and recreated directory, an inotify limit) and the way a missing directory is
/// noticed when its parent is not watchable either.
const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// The state of every registry file, for discovery's status API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesStatus {
    pub files: BTreeMap<PathBuf, FileState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileState {
    /// A good version of this file is in force (the latest, unless `problems` is non-empty).
    /// A deleted file can still be in force when withdrawing it would break other files.
    pub in_force: bool,
    /// Why the latest version is not in force; empty when it is. A problem may point into
    /// another file (a route there to a service this version removes).
    pub problems: Vec<Problem>,
    /// The version in force is the last good copy an earlier run stored (the file on disk has
    /// had problems since this run started).
    pub restored: Option<Restored>,
}

/// Where a restored version in force comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The stored copy (under `<state_dir>/last-good/files/`).
    pub copy: PathBuf,
    /// When it was stored.
    pub saved: std::time::SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot start the registry file watcher")]
    Watcher(#[source] notify::Error),
    #[error("the registry file scan did not finish")]
    Scan(#[source] tokio::task::JoinError),
    #[error("reading or writing the last-good store did not finish")]
    Store(#[source] tokio::task::JoinError),
}

/// Loads every `*.toml` under `paths` once (for `--check` and at startup). Returns the catalog
/// of every file that is good, and all problems (sorted by file and position). Nothing is
/// logged except missing paths, which count as empty: the caller prints the problems.
pub fn load_once(paths: &[PathBuf]) -> (Catalog, Vec<Problem>) {
    load_once_with(paths, None)
}

/// [`load_once`], with the stored last good version in force for each file that is broken now
/// (see [`FileRegistry::with_last_good`]). Blocking.
pub fn load_once_with(paths: &[PathBuf], store: Option<&LastGoodStore>) -> (Catalog, Vec<Problem>) {
    let mut set = FileSet::default();
    rescan_blocking(paths, &mut set);
    if let Some(store) = store {
        set.restore(store.load_files());
    }
    set.settle();
    let (catalog, invariant) = set.catalog();
    let mut problems = set.problems();
    problems.extend(invariant);
    (catalog, problems)
}

/// Reads the files and updates `set`; returns whether anything changed on disk.
fn rescan_blocking(paths: &[PathBuf], set: &mut FileSet) -> bool {
    let scanned = scan::scan(paths);
    apply_scan(scanned, set, false)
}

fn apply_scan(scanned: scan::Scan, set: &mut FileSet, quiet_missing: bool) -> bool {
    if !quiet_missing {
        for path in &scanned.missing {
            tracing::warn!(path = %path.display(), "registry path does not exist; treating it as empty");
        }
    }
    for (dir, error) in &scanned.unlisted {
        tracing::warn!(path = %dir.display(), %error, "cannot list registry directory; keeping its files as they were");
    }
    let unlisted: Vec<PathBuf> = scanned.unlisted.into_iter().map(|(p, _)| p).collect();
    set.update(scanned.files, &unlisted)
}

/// The file registry as a long-running part: see [`FileRegistry::run`].
#[derive(Debug, Clone)]
pub struct FileRegistry {
    paths: Vec<PathBuf>,
    store: Option<LastGoodStore>,
}

impl FileRegistry {
    pub fn new(paths: Vec<PathBuf>) -> FileRegistry {
        FileRegistry { paths, store: None }
    }

    /// Keeps the version in force of every file in `store`, and at start serves the stored
    /// version of each file that exists but is broken (a deleted file is not brought back).
    pub fn with_last_good(mut self, store: LastGoodStore) -> FileRegistry {
        self.store = Some(store);
        self
    }

    /// Loads everything, publishes the first catalog, then watches. Publishes a new
    /// `Arc<Catalog>` only when the merged catalog actually changed, and a new status only
    /// when a file's state changed. Returns when `shutdown` is cancelled.
    pub async fn run(
        self,
        catalog: channel::Sender<Arc<Catalog>>,
        status: channel::Sender<Arc<FilesStatus>>,
        shutdown: CancellationToken,
    ) -> Result<(), FilesError> {
        let span = tracing::info_span!("file_registry");
        self.watch_and_publish(catalog, status, shutdown)
            .instrument(span)
            .await
    }

    async fn watch_and_publish(
        self,
        catalog: channel::Sender<Arc<Catalog>>,
        status: channel::Sender<Arc<FilesStatus>>,
        shutdown: CancellationToken,
    ) -> Result<(), FilesError> {
        // Watch before the first scan, so that nothing written in between is missed.
        let (events_tx, mut events) = mpsc::channel(1);
        let mut watcher = watch::Watcher::new(events_tx).map_err(FilesError::Watcher)?;
        let mut set = FileSet::default();
        // The watcher warns about missing paths (once each); the scan need not repeat it.
        watcher.refresh(&self.paths);
        self.rescan(&mut set).await?;
        // What the last-good store holds, by the real file's path.
        let mut stored = persist::Stored::new();
        if let Some(store) = self.store.clone() {
            let files = tokio::task::spawn_blocking(move || store.load_files())
                .await
                .map_err(FilesError::Store)?;
            stored = files
                .iter()
                .map(|(p, f)| (p.clone(), f.content.clone()))
                .collect();
            set.restore(files);
        }
        self.settle_and_publish(&mut set, &catalog, &status, true);
        for (path, r) in set.restored() {
            tracing::warn!(
                file = %path.display(),
                copy = %r.copy.display(),
                saved_unix_s = crate::last_good::unix_secs(r.saved),
                "registry file has problems (above); serving its last good version from an earlier run"
            );
        }
        stored = self.sync_store(&set, stored).await?;

        let mut tick = tokio::time::interval(RESCAN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        // When files were last read: events soon after are part of the same burst.
        let mut last_rescan = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                event = events.recv() => {
                    if event.is_none() {
                        // Only the watcher holds the sender, and it lives as long as this loop.
                        return Ok(());
                    }
                    let (quiet, max) = if last_rescan.elapsed() >= watch::QUIET {
                        (watch::LEADING_QUIET, watch::QUIET)
                    } else {
                        (watch::QUIET, watch::MAX_DELAY)
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = watch::coalesce(&mut events, quiet, max) => {}
                    }
                }
                _ = tick.tick() => {}
            }
            watcher.refresh(&self.paths);
            let rescanned = self.rescan(&mut set).await?;
            last_rescan = tokio::time::Instant::now();
            if rescanned {
                self.settle_and_publish(&mut set, &catalog, &status, false);
                stored = self.sync_store(&set, stored).await?;
            }
        }
    }

    /// Writes the versions in force to the last-good store (and removes withdrawn files).
    async fn sync_store(
        &self,
        set: &FileSet,
        stored: persist::Stored,
    ) -> Result<persist::Stored, FilesError> {
        let Some(store) = self.store.clone() else {
            return Ok(stored);
        };
        let ops = persist::plan(&stored, &set.accepted_contents());
        if ops.is_empty() {
            return Ok(stored);
        }
        tokio::task::spawn_blocking(move || persist::apply(&store, stored, ops))
            .await
            .map_err(FilesError::Store)
    }

    async fn rescan(&self, set: &mut FileSet) -> Result<bool, FilesError> {
        let paths = self.paths.clone();
        let scanned = tokio::task::spawn_blocking(move || scan::scan(&paths))
            .await
            .map_err(FilesError::Scan)?;
        Ok(apply_scan(scanned, set, true))
    }

    fn settle_and_publish(
        &self,
        set: &mut FileSet,
        catalog: &channel::Sender<Arc<Catalog>>,
        status: &channel::Sender<Arc<FilesStatus>>,
        first: bool,
    ) {
        let settled = set.settle();
        log(&settled);
        let (merged, invariant) = set.catalog();
        for p in &invariant {
            // Cannot happen by construction (see `state`); if it does, publishing anyway
            // beats freezing the mesh, and the log says where to look.
            tracing::error!(file = %p.file.display(), line = p.line, "bug: accepted registry files do not merge cleanly: {}", p);
        }
        let published = catalog.send_if_modified(|current| {
            if first || **current != merged {
                *current = Arc::new(merged);
                true
            } else {
                false
            }
        });
        if published {
            let c = catalog.borrow();
            tracing::info!(
                services = c.services.len(),
                routes = c.routes.len(),
                policies = c.policies.len(),
                "published registry catalog from files"
            );
        }
        let new_status = set.status();
        status.send_if_modified(|current| {
            if first || **current != new_status {
                *current = Arc::new(new_status);
                true
            } else {
                false
            }
        });
    }
}

fn log(settled: &Settled) {
    for path in &settled.accepted {
        tracing::info!(file = %path.display(), "registry file accepted");
    }
    for path in &settled.removed {
        tracing::info!(file = %path.display(), "registry file removed; its declarations are withdrawn");
    }
    for p in &settled.new_problems {
        tracing::error!(file = %p.file.display(), line = p.line, "{}", p);
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod traffic_tests;
