//! Host liveness: a mesh instance (one with a `node`) is healthy only while its host is alive,
//! that is, while the host's agent holds an ADS stream to discovery on which its Envoy has
//! accepted listeners (so a host that is starting gets traffic once it can take it), and for
//! `node_grace` after its last such stream closed. A node not seen since discovery started gets the same grace, counted
//! from the start, so a discovery restart does not empty the mesh. A revoked node is never
//! alive.
//!
//! The [`LivenessStage`] sits between the registries and the debouncer: it republishes the
//! merged catalog with the instances of dead hosts marked unhealthy, which the debouncer sees as
//! an endpoint-only change (EDS pushes only). Services declared `health = "static"` are left as
//! declared. A Consul instance keeps Consul's own health as well: it is healthy only when both
//! say so.
//!
//! The decision ([`judge`]) and the marking ([`mark_dead`]) are plain functions; the stage only
//! moves catalogs and sleeps until the next grace runs out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilotfish_registries::model::{Catalog, HealthMode};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::drain::{Draining, Drains};
use crate::store::liveness::{merge_seen, RemoteNodes};
use crate::xds::connections::{Connections, NodeSeen};

/// The default `node_grace`.
pub const DEFAULT_NODE_GRACE: Duration = Duration::from_secs(15);

/// One node of the mesh, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeLiveness {
    pub node: String,
    /// `live`, `grace` (disconnected, within `node_grace`), `dead` or `revoked`.
    pub state: &'static str,
    /// Open ADS streams from the node's agent.
    pub streams: usize,
    /// When the node last had an open stream (milliseconds since the Unix epoch); `None` when
    /// it has not been seen since discovery started.
    pub last_seen_unix_ms: Option<u64>,
}

/// What [`judge`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Nodes whose instances are unhealthy.
    pub dead: BTreeSet<String>,
    /// Every node the catalog or the connections name, for `/status`.
    pub nodes: Vec<NodeLiveness>,
    /// When the next node's grace runs out, if any node is within its grace.
    pub next_check: Option<Instant>,
}

/// Which nodes are dead at `now`. A node counts when an instance of a service with agent
/// health runs on it, or when it has (or had) a stream.
pub fn judge(
    catalog: &Catalog,
    seen: &BTreeMap<String, NodeSeen>,
    revoked: &BTreeSet<String>,
    started: Instant,
    now: Instant,
    grace: Duration,
) -> Verdict {
    let mut names: BTreeSet<&str> = catalog
        .services
        .values()
        .filter(|s| s.health == HealthMode::Agent)
        .flat_map(|s| s.instances.iter().filter_map(|i| i.node.as_deref()))
        .collect();
    names.extend(seen.keys().map(String::as_str));
    let mut verdict = Verdict::default();
    for node in names {
        let s = seen.get(node);
        let streams = s.map_or(0, |s| s.streams);
        let state = if revoked.contains(node) {
            "revoked"
        } else if streams > 0 {
            "live"
        } else {
            // Gone since its last stream closed, or since discovery started.
            let since = s.map_or(started, |s| s.last_seen.max(started));
            let deadline = since + grace;
            if now >= deadline {
                "dead"
            } else {
                verdict.next_check = Some(verdict.next_check.map_or(deadline, |t| t.min(deadline)));
                "grace"
            }
        };
        if matches!(state, "dead" | "revoked") {
            verdict.dead.insert(node.to_string());
        }
        verdict.nodes.push(NodeLiveness {
            node: node.to_string(),
            state,
            streams,
            last_seen_unix_ms: s.map(|s| s.last_seen_unix_ms),
        });
    }
    verdict
}

/// `catalog` with the instances on `dead` nodes unhealthy (services with agent health only);
/// the same `Arc` when that changes nothing.
pub fn mark_dead(catalog: &Arc<Catalog>, dead: &BTreeSet<String>) -> Arc<Catalog> {
    let affected = |c: &Catalog| {
        c.services.values().any(|s| {
            s.health == HealthMode::Agent
                && s.instances
                    .iter()
                    .any(|i| i.healthy && i.node.as_ref().is_some_and(|n| dead.contains(n)))
        })
    };
    if dead.is_empty() || !affected(catalog) {
        return Arc::clone(catalog);
    }
    let mut out = Catalog::clone(catalog);
    for s in out.services.values_mut() {
        if s.health != HealthMode::Agent {
            continue;
        }
        for i in &mut s.instances {
            if i.node.as_ref().is_some_and(|n| dead.contains(n)) {
                i.healthy = false;
            }
        }
    }
    Arc::new(out)
}

/// Each node's liveness, for `/status`.
pub type NodesView = watch::Receiver<Arc<Vec<NodeLiveness>>>;

/// `catalog` with every instance on a `draining` node marked draining; the same `Arc` when
/// that changes nothing.
pub fn mark_draining(catalog: &Arc<Catalog>, draining: &Draining) -> Arc<Catalog> {
    let on = |i: &pilotfish_registries::model::Instance| {
        i.node.as_ref().is_some_and(|n| draining.contains_key(n))
    };
    let affected = catalog
        .services
        .values()
        .any(|s| s.instances.iter().any(|i| on(i) && !i.draining));
    if !affected {
        return Arc::clone(catalog);
    }
    let mut out = Catalog::clone(catalog);
    for s in out.services.values_mut() {
        for i in &mut s.instances {
            if on(i) {
                i.draining = true;
            }
        }
    }
    Arc::new(out)
}

/// Republishes the registries' catalog with dead hosts' instances unhealthy and leaving
/// hosts' instances draining.
pub struct LivenessStage {
    catalogs: watch::Receiver<Arc<Catalog>>,
    drains: Drains,
    draining: watch::Receiver<Draining>,
    out: watch::Sender<Arc<Catalog>>,
    connections: Connections,
    revoked: watch::Receiver<Arc<BTreeSet<String>>>,
    view: watch::Sender<Arc<Vec<NodeLiveness>>>,
    grace: Duration,
    started: Instant,
    /// Nodes connected to other replicas (`[store.consul]`); `None` with one replica.
    remote: Option<RemoteNodes>,
}

impl LivenessStage {
    /// The stage, the catalog it publishes (starting with `catalogs`' current one: every node
    /// is within its grace at start), and the nodes' liveness for `/status`.
    pub fn new(
        catalogs: watch::Receiver<Arc<Catalog>>,
        connections: Connections,
        revoked: watch::Receiver<Arc<BTreeSet<String>>>,
        drains: Drains,
        grace: Duration,
    ) -> (LivenessStage, watch::Receiver<Arc<Catalog>>, NodesView) {
        let started = Instant::now();
        let first = {
            let catalog = catalogs.borrow();
            let verdict = judge(
                &catalog,
                &connections.nodes(),
                &revoked.borrow(),
                started,
                started,
                grace,
            );
            mark_dead(&catalog, &verdict.dead)
        };
        let (out, out_rx) = watch::channel(first);
        let (view, view_rx) = watch::channel(Arc::new(Vec::new()));
        let draining = drains.watch();
        let stage = LivenessStage {
            catalogs,
            drains,
            draining,
            out,
            connections,
            revoked,
            view,
            grace,
            started,
            remote: None,
        };
        (stage, out_rx, view_rx)
    }

    /// Counts the nodes connected to other replicas as connected here too.
    pub fn with_remote(mut self, remote: RemoteNodes) -> LivenessStage {
        self.remote = Some(remote);
        self
    }

    /// Runs until `shutdown` or until the registries are gone.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut nodes_changed = self.connections.watch_nodes();
        let mut dead = BTreeSet::new();
        // The catalog the last marking was made from: a node connecting or leaving changes
        // nothing to mark unless the dead set changes too.
        let mut marked_from: Option<Arc<Catalog>> = None;
        let mut drained: Draining = Draining::default();
        // Without a revocation source (its sender gone), there is nothing more to wait for.
        let mut revocations = true;
        loop {
            let catalog = Arc::clone(&self.catalogs.borrow_and_update());
            let revoked = Arc::clone(&self.revoked.borrow_and_update());
            nodes_changed.mark_unchanged();
            let remote = self
                .remote
                .as_mut()
                .map(|r| Arc::clone(&r.borrow_and_update()));
            // With other replicas: their hosts count as connected, and their leaving hosts as
            // leaving here too.
            let mut seen = self.connections.nodes();
            if let Some(r) = &remote {
                merge_seen(&mut seen, &r.seen);
            }
            self.drains.observe(&seen);
            let mut draining = Arc::clone(&self.draining.borrow_and_update());
            if let Some(r) = remote.as_ref().filter(|r| !r.draining.is_empty()) {
                let map = Arc::make_mut(&mut draining);
                for node in &r.draining {
                    map.entry(node.clone()).or_insert(false);
                }
            }
            let now = Instant::now();
            let verdict = judge(&catalog, &seen, &revoked, self.started, now, self.grace);
            for node in verdict.dead.difference(&dead) {
                let state = if revoked.contains(node) {
                    "revoked"
                } else {
                    "dead"
                };
                warn!(%node, state, grace = ?self.grace, "host is not alive: its instances are marked unhealthy");
            }
            for node in dead.difference(&verdict.dead) {
                info!(%node, "host is alive again: its instances are healthy");
            }
            for node in draining.keys().filter(|n| !drained.contains_key(*n)) {
                info!(%node, "host is leaving: its instances are draining");
            }
            let draining_same = draining.keys().eq(drained.keys());
            drained = Arc::clone(&draining);
            let unchanged = verdict.dead == dead
                && draining_same
                && marked_from
                    .as_ref()
                    .is_some_and(|c| Arc::ptr_eq(c, &catalog));
            dead = verdict.dead;
            if !unchanged {
                let marked = mark_draining(&mark_dead(&catalog, &dead), &drained);
                self.out.send_if_modified(|current| {
                    let changed = !Arc::ptr_eq(current, &marked) && **current != *marked;
                    if changed {
                        *current = Arc::clone(&marked);
                    }
                    changed
                });
                marked_from = Some(catalog);
            }
            self.view.send_replace(Arc::new(verdict.nodes));
            let wake = verdict.next_check.map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = self.catalogs.changed() => if changed.is_err() { return },
                _ = nodes_changed.changed() => {}
                changed = self.revoked.changed(), if revocations => revocations = changed.is_ok(),
                _ = self.draining.changed() => {}
                _ = async { match &mut self.remote {
                    // Its sender gone (shutdown): nothing more to wait for.
                    Some(remote) => if remote.changed().await.is_err() {
                        std::future::pending::<()>().await
                    },
                    None => std::future::pending().await,
                } } => {}
                _ = async { match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                } } => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pilotfish_registries::model::{Instance, Origin, Protocol, Service};

    fn instance(node: Option<&str>, port: u16) -> Instance {
        Instance {
            node: node.map(str::to_string),
            address: "10.0.0.1".into(),
            port,
            mesh_port: 15006,
            labels: Default::default(),
            weight: 1,
            healthy: true,
            draining: false,
            locality: None,
        }
    }

    fn catalog(health: HealthMode) -> Arc<Catalog> {
        let mut c = Catalog::default();
        for (name, node) in [("reviews", "vm-b"), ("ratings", "vm-c")] {
            c.services.insert(
                name.into(),
                Service {
                    name: name.into(),
                    protocol: Protocol::Http,
                    port: 9080,
                    upstreams: None,
                    instances: vec![instance(Some(node), 1), instance(None, 2)],
                    mtls: Default::default(),
                    health,
                    origin: Origin::default(),
                },
            );
        }
        Arc::new(c)
    }

    fn seen(streams: usize, last_seen: Instant) -> NodeSeen {
        NodeSeen {
            streams,
            last_seen,
            last_seen_unix_ms: 1,
        }
    }

    const GRACE: Duration = Duration::from_secs(15);

    #[test]
    fn nodes_never_seen_get_the_grace_from_start() {
        let c = catalog(HealthMode::Agent);
        let start = Instant::now();
        let none = BTreeSet::new();
        let early = judge(&c, &BTreeMap::new(), &none, start, start + GRACE / 2, GRACE);
        assert!(early.dead.is_empty());
        assert_eq!(early.next_check, Some(start + GRACE));
        assert!(early.nodes.iter().all(|n| n.state == "grace"));
        let late = judge(&c, &BTreeMap::new(), &none, start, start + GRACE, GRACE);
        assert_eq!(late.dead, BTreeSet::from(["vm-b".into(), "vm-c".into()]));
        assert_eq!(late.next_check, None);
    }

    #[test]
    fn a_connected_node_is_live_and_a_disconnected_one_dies_after_the_grace() {
        let c = catalog(HealthMode::Agent);
        let start = Instant::now();
        let left = start + Duration::from_secs(100);
        let nodes = BTreeMap::from([
            ("vm-b".to_string(), seen(1, left)),
            ("vm-c".to_string(), seen(0, left)),
        ]);
        let none = BTreeSet::new();
        let v = judge(
            &c,
            &nodes,
            &none,
            start,
            left + GRACE - Duration::from_millis(1),
            GRACE,
        );
        assert!(v.dead.is_empty());
        assert_eq!(v.next_check, Some(left + GRACE));
        let v = judge(&c, &nodes, &none, start, left + GRACE, GRACE);
        assert_eq!(v.dead, BTreeSet::from(["vm-c".to_string()]));
        let b = v.nodes.iter().find(|n| n.node == "vm-b").unwrap();
        assert_eq!((b.state, b.streams), ("live", 1));
    }

    #[test]
    fn revoked_nodes_are_dead_even_when_connected() {
        let c = catalog(HealthMode::Agent);
        let start = Instant::now();
        let nodes = BTreeMap::from([("vm-b".to_string(), seen(1, start))]);
        let revoked = BTreeSet::from(["vm-b".to_string()]);
        let v = judge(&c, &nodes, &revoked, start, start, GRACE);
        assert_eq!(v.dead, revoked);
        assert_eq!(v.nodes[0].state, "revoked");
    }

    #[test]
    fn marking_touches_only_agent_health_instances_on_dead_nodes() {
        let c = catalog(HealthMode::Agent);
        let dead = BTreeSet::from(["vm-b".to_string()]);
        let marked = mark_dead(&c, &dead);
        let reviews = &marked.services["reviews"].instances;
        assert!(!reviews[0].healthy, "the instance on vm-b");
        assert!(reviews[1].healthy, "an instance without a node");
        assert!(marked.services["ratings"]
            .instances
            .iter()
            .all(|i| i.healthy));
        // Nothing dead, or nothing affected: the very same catalog.
        assert!(Arc::ptr_eq(&mark_dead(&c, &BTreeSet::new()), &c));
        assert!(Arc::ptr_eq(&mark_dead(&marked, &dead), &marked));
        let fixed = catalog(HealthMode::Static);
        assert!(Arc::ptr_eq(&mark_dead(&fixed, &dead), &fixed));
        let start = Instant::now();
        let v = judge(&fixed, &BTreeMap::new(), &dead, start, start, GRACE);
        assert!(v.nodes.is_empty(), "static services' nodes are not judged");
    }
}
