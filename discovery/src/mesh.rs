//! The mesh snapshot every ADS stream serves from, and the debouncer that builds it.
//!
//! Registries publish whole catalogs on a watch channel, often in bursts (an editor writes a
//! file twice, a deploy touches ten). The [`Debouncer`] waits for a quiet period (bounded by a
//! maximum delay after the first change), translates the latest catalog once with
//! [`Shared::build`], and publishes a [`MeshSnapshot`] with the next generation number. Streams
//! then pick what their proxy sees with [`Shared::for_proxy`].

use std::sync::Arc;
use std::time::Duration;

use pilotfish_registries::model::Catalog;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::translate::Shared;

/// One translated catalog. Generation 0 is the placeholder before the first build; ADS streams
/// wait for a later one rather than serve an empty mesh.
pub struct MeshSnapshot {
    pub generation: u64,
    pub shared: Arc<Shared>,
}

impl std::fmt::Debug for MeshSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSnapshot")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl MeshSnapshot {
    pub fn placeholder() -> MeshSnapshot {
        MeshSnapshot {
            generation: 0,
            shared: Arc::new(Shared::build(Arc::new(Catalog::default()))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebounceTimes {
    /// Build once no change arrived for this long...
    pub quiet: Duration,
    /// ...or once this long passed since the first change of a burst.
    pub max: Duration,
}

impl Default for DebounceTimes {
    fn default() -> Self {
        DebounceTimes {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

pub struct Debouncer {
    catalogs: watch::Receiver<Arc<Catalog>>,
    snapshots: watch::Sender<Arc<MeshSnapshot>>,
    times: DebounceTimes,
}

impl Debouncer {
    /// The catalog currently in `catalogs` counts as a change: it is built after the first
    /// quiet period.
    pub fn new(
        catalogs: watch::Receiver<Arc<Catalog>>,
        snapshots: watch::Sender<Arc<MeshSnapshot>>,
        times: DebounceTimes,
    ) -> Debouncer {
        Debouncer {
            catalogs,
            snapshots,
            times,
        }
    }

    /// Runs until `shutdown` or until the catalog sender is gone.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut last_built: Option<Arc<Catalog>> = None;
        let mut generation = self.snapshots.borrow().generation;
        let mut pending = true;
        loop {
            if !pending {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = self.catalogs.changed() => if changed.is_err() { return },
                }
            }
            pending = false;
            let deadline = Instant::now() + self.times.max;
            let mut closed = false;
            loop {
                let wake = (Instant::now() + self.times.quiet).min(deadline);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(wake) => break,
                    changed = self.catalogs.changed() => if changed.is_err() {
                        closed = true;
                        break;
                    },
                }
            }
            let catalog = Arc::clone(&self.catalogs.borrow_and_update());
            let unchanged = last_built
                .as_ref()
                .is_some_and(|last| Arc::ptr_eq(last, &catalog) || **last == *catalog);
            if !unchanged {
                let input = Arc::clone(&catalog);
                match tokio::task::spawn_blocking(move || Shared::build(input)).await {
                    Ok(shared) => {
                        generation += 1;
                        info!(
                            generation,
                            services = catalog.services.len(),
                            routes = catalog.routes.len(),
                            policies = catalog.policies.len(),
                            "mesh snapshot built"
                        );
                        self.snapshots.send_replace(Arc::new(MeshSnapshot {
                            generation,
                            shared: Arc::new(shared),
                        }));
                        last_built = Some(catalog);
                    }
                    // The last good snapshot stays in force.
                    Err(e) => error!(error = %e, "building the mesh snapshot failed"),
                }
            }
            if closed {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotfish_registries::model::{Origin, Protocol, Service};

    fn catalog(services: &[&str]) -> Arc<Catalog> {
        let mut c = Catalog::default();
        for s in services {
            c.services.insert(
                s.to_string(),
                Service {
                    name: s.to_string(),
                    protocol: Protocol::Http,
                    port: 80,
                    upstreams: None,
                    instances: vec![],
                    origin: Origin::default(),
                },
            );
        }
        Arc::new(c)
    }

    struct Harness {
        catalogs: watch::Sender<Arc<Catalog>>,
        snapshots: watch::Receiver<Arc<MeshSnapshot>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(initial: Arc<Catalog>) -> Harness {
        let (catalogs, catalog_rx) = watch::channel(initial);
        let (snap_tx, snapshots) = watch::channel(Arc::new(MeshSnapshot::placeholder()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            Debouncer::new(catalog_rx, snap_tx, DebounceTimes::default()).run(shutdown.clone()),
        );
        Harness {
            catalogs,
            snapshots,
            shutdown,
            task,
        }
    }

    fn generation(h: &Harness) -> u64 {
        h.snapshots.borrow().generation
    }

    fn services(h: &Harness) -> usize {
        h.snapshots.borrow().shared.catalog.services.len()
    }

    /// Advances paused time in small steps so spawned tasks (and `spawn_blocking`) run.
    async fn advance(ms: u64) {
        for _ in 0..ms / 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn initial_catalog_is_built_after_quiet_period() {
        let h = start(catalog(&["a"]));
        advance(50).await;
        assert_eq!(generation(&h), 0);
        advance(100).await;
        assert_eq!(generation(&h), 1);
        assert_eq!(services(&h), 1);
        h.shutdown.cancel();
        h.task.await.expect("debouncer ends");
    }

    #[tokio::test(start_paused = true)]
    async fn burst_is_coalesced_into_one_build() {
        let h = start(catalog(&["a"]));
        advance(200).await;
        assert_eq!(generation(&h), 1);
        for i in 0..5 {
            h.catalogs
                .send_replace(catalog(&["a", "b", "c", "d", "e"][..=i]));
            advance(50).await;
        }
        assert_eq!(generation(&h), 1, "still changing: no build yet");
        advance(150).await;
        assert_eq!(generation(&h), 2);
        assert_eq!(services(&h), 5);
        h.shutdown.cancel();
        h.task.await.expect("debouncer ends");
    }

    #[tokio::test(start_paused = true)]
    async fn constant_churn_still_builds_within_max() {
        let h = start(catalog(&["a"]));
        advance(200).await;
        let mut built_at = None;
        for i in 0..30u64 {
            let names: Vec<String> = (0..=i % 3).map(|n| format!("s{n}-{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            h.catalogs.send_replace(catalog(&refs));
            advance(50).await;
            if built_at.is_none() && generation(&h) == 2 {
                built_at = Some((i + 1) * 50);
            }
        }
        let built_at = built_at.expect("built during churn");
        assert!((1000..=1100).contains(&built_at), "built at {built_at} ms");
        h.shutdown.cancel();
        h.task.await.expect("debouncer ends");
    }

    #[tokio::test(start_paused = true)]
    async fn equal_catalog_is_not_rebuilt() {
        let h = start(catalog(&["a"]));
        advance(200).await;
        assert_eq!(generation(&h), 1);
        h.catalogs.send_replace(catalog(&["a"]));
        advance(300).await;
        assert_eq!(generation(&h), 1);
        h.catalogs.send_replace(catalog(&["b"]));
        advance(300).await;
        assert_eq!(generation(&h), 2);
        // The registry going away ends the debouncer.
        drop(h.catalogs);
        h.task.await.expect("debouncer ends");
    }
}
