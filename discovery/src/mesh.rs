//! The mesh snapshot every ADS stream serves from, and the debouncer that builds it.
//!
//! Registries publish whole catalogs on a watch channel, often in bursts (an editor writes a
//! file twice, a deploy touches ten). The [`Debouncer`] waits for a quiet period (bounded by a
//! maximum delay after the first change), translates the latest catalog once, and publishes a
//! [`MeshSnapshot`] with the next generation number. Streams then pick what their proxy sees
//! with [`Shared::for_proxy`].
//!
//! Two kinds of build, decided by comparing the latest catalog with the last one built
//! ([`endpoint_change`]):
//!
//! - **endpoints**: only instances changed, in ways that only change endpoint assignments (and
//!   the local view of a few nodes). Debounced briefly ([`DebounceTimes::endpoint_quiet`], at
//!   most [`DebounceTimes::endpoint_max`]) and built with [`Shared::with_endpoints`], which
//!   keeps every other resource's `Arc`, so streams push EDS only (Istio #14349, #20100).
//! - **full**: anything else. Debounced with [`DebounceTimes::quiet`] / [`DebounceTimes::max`]
//!   and built from scratch with [`Shared::build`].
//!
//! A burst that starts endpoint-only and then changes something else becomes a full build,
//! timed from the first change of the burst.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pilotfish_registries::model::Catalog;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::{latencies, Latencies, StaticLabels};
use crate::translate::{endpoint_change, EndpointChange, Settings, Shared};

/// One translated catalog. Generation 0 is the placeholder before the first build; ADS streams
/// wait for a later one rather than serve an empty mesh.
pub struct MeshSnapshot {
    pub generation: u64,
    pub shared: Arc<Shared>,
    /// How it was built.
    pub kind: BuildKind,
    /// When the debouncer first saw a catalog change that this snapshot includes: the moment
    /// discovery learned of it. `None` for the placeholder.
    pub learned_at: Option<SystemTime>,
    /// The same moment on the monotonic clock, which the convergence histograms measure from
    /// (see `xds::metrics`).
    pub learned_mono: Option<Instant>,
    /// When it was published.
    pub built_at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildKind {
    Full,
    Endpoints,
}

impl BuildKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildKind::Full => "full",
            BuildKind::Endpoints => "endpoints",
        }
    }
}

impl std::fmt::Debug for MeshSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSnapshot")
            .field("generation", &self.generation)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl MeshSnapshot {
    /// A fully built snapshot, published now.
    pub fn new(generation: u64, shared: Arc<Shared>) -> MeshSnapshot {
        MeshSnapshot {
            generation,
            shared,
            kind: BuildKind::Full,
            learned_at: None,
            learned_mono: None,
            built_at: SystemTime::now(),
        }
    }

    pub fn placeholder() -> MeshSnapshot {
        MeshSnapshot::new(0, Arc::new(Shared::build(Arc::new(Catalog::default()))))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebounceTimes {
    /// Build once no change arrived for this long...
    pub quiet: Duration,
    /// ...or once this long passed since the first change of a burst.
    pub max: Duration,
    /// The same two for a burst of endpoint-only changes, which are cheap to build and push.
    pub endpoint_quiet: Duration,
    pub endpoint_max: Duration,
}

impl Default for DebounceTimes {
    fn default() -> Self {
        DebounceTimes {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(1),
            endpoint_quiet: Duration::from_millis(5),
            endpoint_max: Duration::from_millis(50),
        }
    }
}

/// What the latest catalog needs, compared with the last one built.
enum Plan {
    Unchanged,
    Endpoints(EndpointChange),
    Full,
}

fn plan(last: Option<&Shared>, catalog: &Arc<Catalog>) -> Plan {
    let Some(last) = last else {
        return Plan::Full;
    };
    if Arc::ptr_eq(&last.catalog, catalog) || *last.catalog == **catalog {
        return Plan::Unchanged;
    }
    match endpoint_change(&last.catalog, catalog) {
        Some(change) => Plan::Endpoints(change),
        None => Plan::Full,
    }
}

/// The debouncer's metrics: how long translation takes, and which generation is served.
#[derive(Debug, Clone)]
pub struct MeshMetrics {
    build_seconds: Latencies<StaticLabels<1>>,
    generation: Gauge,
}

impl Default for MeshMetrics {
    fn default() -> Self {
        let build_seconds = latencies();
        // Both kinds are shown from the start, at 0.
        for kind in [BuildKind::Full, BuildKind::Endpoints] {
            build_seconds.get_or_create_owned(&[("kind", kind.as_str())]);
        }
        MeshMetrics {
            build_seconds,
            generation: Gauge::default(),
        }
    }
}

impl MeshMetrics {
    /// Registers under `pilotfish_snapshot_`.
    pub fn register(&self, registry: &mut Registry) {
        let snapshot = registry.sub_registry_with_prefix("snapshot");
        snapshot.register(
            "generation",
            "Generation of the mesh snapshot being served",
            self.generation.clone(),
        );
        snapshot.register(
            "build_seconds",
            "Time to translate the catalog into a mesh snapshot, by kind of build (full or \
             endpoints)",
            self.build_seconds.clone(),
        );
    }

    fn built(&self, kind: BuildKind, took: Duration, generation: u64) {
        self.build_seconds
            .get_or_create(&[("kind", kind.as_str())])
            .observe(took.as_secs_f64());
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }
}

pub struct Debouncer {
    catalogs: watch::Receiver<Arc<Catalog>>,
    snapshots: watch::Sender<Arc<MeshSnapshot>>,
    times: DebounceTimes,
    settings: Arc<Settings>,
    metrics: MeshMetrics,
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
            settings: Arc::new(Settings::default()),
            metrics: MeshMetrics::default(),
        }
    }

    /// Records builds in `metrics` (a clone shares them).
    pub fn with_metrics(mut self, metrics: MeshMetrics) -> Debouncer {
        self.metrics = metrics;
        self
    }

    /// Translate with these settings (trust domain, mTLS) rather than the insecure default.
    pub fn with_settings(mut self, settings: Arc<Settings>) -> Debouncer {
        self.settings = settings;
        self
    }

    /// Runs until `shutdown` or until the catalog sender is gone.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // The last snapshot built here; the placeholder does not count.
        let mut last: Option<Arc<Shared>> = None;
        let mut generation = self.snapshots.borrow().generation;
        let mut pending = true;
        // When the last change was seen or built: `None` until the first build.
        let mut last_activity: Option<Instant> = None;
        loop {
            if !pending {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = self.catalogs.changed() => if changed.is_err() { return },
                }
            }
            pending = false;
            let learned_at = SystemTime::now();
            let first = Instant::now();
            let mut closed = false;
            // Leading edge: the first change after a quiet period is built at once; only the
            // changes that follow it within the quiet time are coalesced.
            let quiet_for = |catalog: &Arc<Catalog>| match plan(last.as_deref(), catalog) {
                Plan::Full => self.times.quiet,
                Plan::Endpoints(_) | Plan::Unchanged => self.times.endpoint_quiet,
            };
            let idle = last_activity
                .is_none_or(|t: Instant| t.elapsed() >= quiet_for(&self.catalogs.borrow()));
            if !idle {
                loop {
                    // Re-planned on every change: a burst may turn from endpoint-only to full.
                    let catalog = Arc::clone(&self.catalogs.borrow());
                    let (quiet, max) = match plan(last.as_deref(), &catalog) {
                        Plan::Full => (self.times.quiet, self.times.max),
                        Plan::Endpoints(_) | Plan::Unchanged => {
                            (self.times.endpoint_quiet, self.times.endpoint_max)
                        }
                    };
                    let wake = (Instant::now() + quiet).min(first + max);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(wake) => break,
                        changed = self.catalogs.changed() => if changed.is_err() {
                            closed = true;
                            break;
                        },
                    }
                }
            }
            let catalog = Arc::clone(&self.catalogs.borrow_and_update());
            let input = Arc::clone(&catalog);
            let settings = Arc::clone(&self.settings);
            let built = match plan(last.as_deref(), &catalog) {
                Plan::Unchanged => None,
                Plan::Full => Some((
                    BuildKind::Full,
                    build_timed(move || Shared::build_with(input, settings)).await,
                )),
                Plan::Endpoints(change) => {
                    let previous = last.clone();
                    Some((
                        BuildKind::Endpoints,
                        build_timed(move || match previous {
                            Some(previous) => previous.with_endpoints(input, &change),
                            None => Shared::build_with(input, settings),
                        })
                        .await,
                    ))
                }
            };
            match built {
                None => {}
                Some((kind, Ok((shared, took)))) => {
                    generation += 1;
                    self.metrics.built(kind, took, generation);
                    let shared = Arc::new(shared);
                    self.snapshots.send_replace(Arc::new(MeshSnapshot {
                        generation,
                        shared: shared.clone(),
                        kind,
                        learned_at: Some(learned_at),
                        learned_mono: Some(first),
                        built_at: SystemTime::now(),
                    }));
                    info!(
                        generation,
                        kind = kind.as_str(),
                        services = catalog.services.len(),
                        routes = catalog.routes.len(),
                        policies = catalog.policies.len(),
                        after_ms = first.elapsed().as_millis() as u64,
                        "mesh snapshot built"
                    );
                    last = Some(shared);
                }
                // The last good snapshot stays in force.
                Some((_, Err(e))) => error!(error = %e, "building the mesh snapshot failed"),
            }
            last_activity = Some(Instant::now());
            if closed {
                return;
            }
        }
    }
}

/// Runs `build` in the blocking pool, timed there: the translation, not the wait for a thread.
fn build_timed(
    build: impl FnOnce() -> Shared + Send + 'static,
) -> tokio::task::JoinHandle<(Shared, Duration)> {
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let shared = build();
        (shared, started.elapsed())
    })
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
                    mtls: Default::default(),
                    health: Default::default(),
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

    /// Waits for the next snapshot and checks that no (paused) time passed: no timer runs
    /// while a build does, so time stands still unless the debouncer waited.
    async fn built_at_once(h: &mut Harness) {
        let sent = Instant::now();
        h.snapshots.changed().await.expect("built");
        assert_eq!(
            sent.elapsed(),
            Duration::ZERO,
            "leading edge: built at once"
        );
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
    async fn initial_catalog_is_built_at_once() {
        let h = start(catalog(&["a"]));
        advance(10).await;
        assert_eq!(generation(&h), 1);
        assert_eq!(services(&h), 1);
        h.shutdown.cancel();
        h.task.await.expect("debouncer ends");
    }

    #[tokio::test(start_paused = true)]
    async fn first_change_is_built_at_once_and_the_rest_of_a_burst_coalesced() {
        let mut h = start(catalog(&["a"]));
        advance(200).await;
        assert_eq!(generation(&h), 1);
        h.snapshots.borrow_and_update();
        for i in 1..5 {
            h.catalogs
                .send_replace(catalog(&["a", "b", "c", "d", "e"][..=i]));
            if i == 1 {
                built_at_once(&mut h).await;
                assert_eq!((generation(&h), services(&h)), (2, 2));
            }
            advance(50).await;
        }
        assert_eq!(generation(&h), 2, "still changing: the rest waits");
        advance(150).await;
        assert_eq!(generation(&h), 3, "the rest of the burst is one build");
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
            if built_at.is_none() && generation(&h) == 3 {
                built_at = Some((i + 1) * 50);
            }
        }
        // The first change was built at once (generation 2); the churn after it within max.
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

    /// `catalog(&["a"])` with one instance of `a` (outside the mesh) on `port`.
    fn with_instance(port: u16) -> Arc<Catalog> {
        let mut c = Catalog::clone(&catalog(&["a"]));
        if let Some(a) = c.services.get_mut("a") {
            a.instances.push(pilotfish_registries::model::Instance {
                node: None,
                address: "10.0.0.1".into(),
                port,
                mesh_port: 15006,
                labels: Default::default(),
                weight: 1,
                healthy: true,
                draining: false,
                locality: None,
            });
        }
        Arc::new(c)
    }

    /// Like `advance`, in 1 ms steps.
    async fn advance_fine(ms: u64) {
        for _ in 0..ms {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn kind(h: &Harness) -> BuildKind {
        h.snapshots.borrow().kind
    }

    #[tokio::test(start_paused = true)]
    async fn endpoint_change_is_built_quickly_and_keeps_other_resources() {
        let h = start(with_instance(80));
        advance(200).await;
        assert_eq!(generation(&h), 1);
        let p = crate::proxy::Proxy {
            node: "vm-x".into(),
            address: std::net::Ipv4Addr::new(10, 0, 0, 9).into(),
            mesh_port: 15006,
            outbound: std::net::SocketAddr::from(([127, 0, 0, 1], 15001)),
            app_address: std::net::Ipv4Addr::LOCALHOST.into(),
            access_log: Default::default(),
            tracing: None,
            intercept: None,
        };
        let before = h.snapshots.borrow().shared.for_proxy(&p);

        h.catalogs.send_replace(with_instance(81));
        advance_fine(15).await;
        assert_eq!(generation(&h), 2, "built within a few ms");
        assert_eq!(kind(&h), BuildKind::Endpoints);
        let after = h.snapshots.borrow().shared.for_proxy(&p);
        assert!(Arc::ptr_eq(&before.clusters, &after.clusters));
        assert!(Arc::ptr_eq(&before.listeners, &after.listeners));
        assert!(Arc::ptr_eq(&before.routes, &after.routes));
        assert!(!Arc::ptr_eq(&before.endpoints, &after.endpoints));
        assert!(h.snapshots.borrow().learned_at.is_some());
        h.shutdown.cancel();
        h.task.await.expect("debouncer ends");
    }

    #[tokio::test(start_paused = true)]
    async fn endpoint_churn_is_built_within_the_endpoint_max() {
        let h = start(with_instance(80));
        advance(200).await;
        let mut built_at = None;
        for i in 0..40u16 {
            h.catalogs.send_replace(with_instance(100 + i));
            advance_fine(3).await;
            if built_at.is_none() && generation(&h) == 3 {
                built_at = Some((u64::from(i) + 1) * 3);
            }
        }
        // The first change was built at once (generation 2); the churn after it within max.
        let built_at = built_at.expect("built during churn");
        assert!((50..=60).contains(&built_at), "built at {built_at} ms");
        assert_eq!(kind(&h), BuildKind::Endpoints);
        h.shutdown.cancel();
        h.task.await.expect("debouncer ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_turns_full_waits_the_full_quiet_period() {
        let mut h = start(with_instance(80));
        advance(200).await;
        h.snapshots.borrow_and_update();
        h.catalogs.send_replace(with_instance(81));
        built_at_once(&mut h).await;
        assert_eq!(generation(&h), 2);
        advance_fine(2).await;
        let mut full = Catalog::clone(&with_instance(81));
        full.services
            .insert("b".into(), catalog(&["b"]).services["b"].clone());
        h.catalogs.send_replace(Arc::new(full));
        advance_fine(50).await;
        assert_eq!(
            generation(&h),
            2,
            "a full change within the burst waits for quiet"
        );
        advance(100).await;
        assert_eq!(generation(&h), 3);
        assert_eq!(kind(&h), BuildKind::Full);
        assert_eq!(services(&h), 2);
        h.shutdown.cancel();
        h.task.await.expect("debouncer ends");
    }
}
