//! Coordinated drain: a stopping host tells discovery it is leaving (`Host.Leave`), discovery
//! marks that node's instances draining (EDS `DRAINING`: callers finish what they sent and
//! choose other hosts for anything new), pushes that, and answers the host once the callers
//! have accepted it, so the host's Envoy stops only after nobody sends it new requests.
//!
//! A node stays draining until its agent comes back: the liveness stage
//! ([`crate::liveness`]) sees the leaving agent's streams close, then a new one open, and
//! calls [`Drains::observe`], which forgets the node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::mesh::MeshSnapshot;
use crate::store::liveness::RemoteNodes;
use crate::xds::connections::{Connections, NodeSeen};

/// Nodes leaving the mesh: `true` once their agent's streams have closed.
pub type Draining = Arc<BTreeMap<String, bool>>;

/// The set of draining nodes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drains {
    tx: Arc<watch::Sender<Draining>>,
}

impl Default for Drains {
    fn default() -> Self {
        Drains {
            tx: Arc::new(watch::channel(Draining::default()).0),
        }
    }
}

impl Drains {
    /// `node` is leaving.
    pub fn leave(&self, node: &str) {
        self.tx.send_if_modified(|d| {
            if d.contains_key(node) {
                return false;
            }
            Arc::make_mut(d).insert(node.to_string(), false);
            true
        });
    }

    pub fn watch(&self) -> watch::Receiver<Draining> {
        self.tx.subscribe()
    }

    /// Follows the draining nodes' agents: gone (no stream) once, then back (a stream again)
    /// ends the drain.
    pub fn observe(&self, seen: &BTreeMap<String, NodeSeen>) {
        self.tx.send_if_modified(|d| {
            if d.is_empty() {
                return false;
            }
            let mut next = BTreeMap::clone(d);
            for (node, gone) in next.iter_mut() {
                let streams = seen.get(node).map_or(0, |s| s.streams);
                if streams == 0 {
                    *gone = true;
                }
            }
            next.retain(|node, gone| !(*gone && seen.get(node).is_some_and(|s| s.streams > 0)));
            let changed = next != **d;
            if changed {
                *d = Arc::new(next);
            }
            changed
        });
    }
}

/// Longest a `Leave` call is held, whatever the agent asks for.
pub const MAX_LEAVE_WAIT: Duration = Duration::from_secs(60);
/// How often a `Leave` call checks the callers.
const POLL: Duration = Duration::from_millis(20);

/// What a leave waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Departure {
    /// Proxies (other than the leaving host's) that accepted the draining endpoints.
    pub callers: u32,
    /// Proxies that had not when the wait ended.
    pub pending: u32,
}

/// Marks `node` draining, waits until a snapshot carries that, then until every other
/// connected proxy has accepted that snapshot in full, and (with other replicas, `remote`)
/// until every live replica says its proxies have too; or until `wait` (at most
/// [`MAX_LEAVE_WAIT`]) has passed. Replicas still settling count in `pending`.
pub async fn leave(
    drains: &Drains,
    snapshots: &watch::Receiver<Arc<MeshSnapshot>>,
    connections: &Connections,
    remote: Option<&RemoteNodes>,
    node: &str,
    wait: Duration,
) -> Departure {
    let deadline = tokio::time::Instant::now() + wait.min(MAX_LEAVE_WAIT);
    drains.leave(node);
    let mut snapshots = snapshots.clone();
    let drained = |s: &MeshSnapshot| {
        !s.shared.catalog.services.values().any(|svc| {
            svc.instances
                .iter()
                .any(|i| i.node.as_deref() == Some(node) && !i.draining)
        })
    };
    let generation =
        match tokio::time::timeout_at(deadline, snapshots.wait_for(|s| drained(s))).await {
            Ok(Ok(s)) => s.generation,
            _ => return tally(connections, node, u64::MAX),
        };
    loop {
        let mut departure = tally(connections, node, generation);
        if let Some(remote) = remote {
            let unsettled = remote
                .borrow()
                .settled
                .iter()
                .filter(|s| !s.contains(node))
                .count();
            departure.pending += u32::try_from(unsettled).unwrap_or(u32::MAX);
        }
        if departure.pending == 0 || tokio::time::Instant::now() >= deadline {
            return departure;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Proxies other than `node`'s that run `generation` (or newer) in full, and those that do not.
fn tally(connections: &Connections, node: &str, generation: u64) -> Departure {
    let (callers, pending) = connections.settled_since(node, generation);
    Departure {
        callers: u32::try_from(callers).unwrap_or(u32::MAX),
        pending: u32::try_from(pending).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn seen(streams: usize) -> NodeSeen {
        NodeSeen {
            streams,
            last_seen: Instant::now(),
            last_seen_unix_ms: 0,
        }
    }

    #[test]
    fn callers_count_once_they_run_the_generation_and_the_leaver_never_counts() {
        use crate::xds::connections::StreamKind;
        let connections = Connections::default();
        let a = connections.register("vm-a", StreamKind::Delta);
        let _b = connections.register("vm-b", StreamKind::Delta);
        let c = connections.register("vm-c", StreamKind::Sotw);
        assert_eq!(
            tally(&connections, "vm-b", 7),
            Departure {
                callers: 0,
                pending: 2
            }
        );
        a.settled_at(7);
        c.settled_at(6);
        assert_eq!(tally(&connections, "vm-b", 7).pending, 1);
        c.settled_at(8);
        assert_eq!(
            tally(&connections, "vm-b", 7),
            Departure {
                callers: 2,
                pending: 0
            }
        );
    }

    #[test]
    fn a_node_drains_until_its_agent_comes_back() {
        let drains = Drains::default();
        let rx = drains.watch();
        drains.leave("vm-b");
        let connected = BTreeMap::from([("vm-b".to_string(), seen(1))]);
        drains.observe(&connected);
        assert_eq!(
            rx.borrow().get("vm-b"),
            Some(&false),
            "still draining while connected"
        );
        drains.observe(&BTreeMap::from([("vm-b".to_string(), seen(0))]));
        assert_eq!(rx.borrow().get("vm-b"), Some(&true), "gone, still draining");
        drains.observe(&connected);
        assert!(rx.borrow().is_empty(), "back: no longer draining");
    }
}
