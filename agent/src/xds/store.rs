//! The cache on disk (`state_dir/xds-cache.bin`, mode 0600): loaded once at start, rewritten
//! whenever Envoy accepts a change. It is what lets a host boot without discovery, so it is
//! written with `pilotfish_durable::write_atomic` (on a blocking thread): after a crash or a
//! power loss it holds the last version written, whole.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::cache::XdsCache;

/// The cache shared by the relay (writes on ACK), the fallback (reads), the persister and
/// whoever follows what Envoy accepted ([`SharedCache::changes`]).
#[derive(Debug, Clone)]
pub struct SharedCache {
    inner: Arc<Mutex<XdsCache>>,
    dirty: Arc<Notify>,
    /// Counts changes, for followers.
    changed: Arc<watch::Sender<u64>>,
}

impl Default for SharedCache {
    fn default() -> Self {
        SharedCache::new(XdsCache::default())
    }
}

impl SharedCache {
    pub fn new(cache: XdsCache) -> Self {
        SharedCache {
            inner: Arc::new(Mutex::new(cache)),
            dirty: Arc::new(Notify::new()),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    /// Wakes on every change of the cache (the value counts them); read the cache itself
    /// with [`SharedCache::resource`] or [`SharedCache::snapshot`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reads the cache as Envoy last accepted it, without copying it.
    pub fn read<R>(&self, f: impl FnOnce(&XdsCache) -> R) -> R {
        f(&self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `f` on the cache; when it reports a change the persister is woken.
    pub fn update(&self, f: impl FnOnce(&mut XdsCache) -> bool) {
        let changed = {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        };
        if changed {
            self.dirty.notify_one();
            self.changed.send_modify(|n| *n += 1);
        }
    }

    pub fn snapshot(&self) -> XdsCache {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_empty(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct StoreError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Reads the cache file. A missing file is an empty cache; an unreadable or corrupt one is
/// logged and ignored, since discovery will refill it.
pub async fn load(path: &Path) -> XdsCache {
    match tokio::fs::read(path).await {
        Ok(bytes) => match XdsCache::decode(&bytes) {
            Ok(cache) => {
                info!(path = %path.display(), types = cache.type_urls().count(), "loaded xDS cache");
                cache
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring corrupt xDS cache");
                XdsCache::default()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => XdsCache::default(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read xDS cache");
            XdsCache::default()
        }
    }
}

pub async fn save(path: &Path, cache: &XdsCache) -> Result<(), StoreError> {
    let bytes = cache.encode();
    let owned = path.to_path_buf();
    // fsync blocks for milliseconds; keep it off the runtime's workers.
    let written = tokio::task::spawn_blocking(move || {
        pilotfish_durable::write_atomic(&owned, &bytes, pilotfish_durable::SECRET_MODE)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    written.map_err(|source| StoreError {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the cache whenever it changes, and once more on shutdown. Bursts of ACKs coalesce
/// into one write because `Notify` keeps at most one pending wake-up.
pub async fn persist(cache: SharedCache, path: PathBuf, shutdown: CancellationToken) {
    // What is on disk: the file was loaded into the cache at start.
    let mut on_disk = cache.snapshot();
    loop {
        let stop = tokio::select! {
            _ = cache.dirty.notified() => false,
            _ = shutdown.cancelled() => true,
        };
        let snapshot = cache.snapshot();
        if snapshot != on_disk {
            match save(&path, &snapshot).await {
                Ok(()) => {
                    debug!(path = %path.display(), "xDS cache written");
                    on_disk = snapshot;
                }
                Err(e) => warn!(error = %e, "cannot write xDS cache"),
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::xds::cache::tests::{cluster, sotw};
    use crate::xds::cache::CLUSTER;

    #[tokio::test]
    async fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds-cache.bin");
        assert!(load(&path).await.is_empty());
        let mut c = XdsCache::default();
        c.apply_sotw(&sotw(CLUSTER, "1", vec![cluster("a")]));
        save(&path, &c).await.unwrap();
        assert_eq!(load(&path).await, c);
        // Private, and no temporary file left next to it.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, b"junk").unwrap();
        assert!(load(&path).await.is_empty());
    }
}
