//! Host liveness across replicas. A replica knows which hosts hold an ADS stream to *it*; with
//! several replicas a host connected to another one would look gone and, after `node_grace`,
//! its instances unhealthy. So each replica publishes the nodes connected to it
//! (`liveness/<replica>`: the serving nodes and a beat counter, rewritten on every change and
//! every [`BEAT`]), and counts a node live while any replica's record, fresh, lists it.
//!
//! Leaving hosts too: a replica that takes a host's `Host.Leave` lists the node as draining in
//! its record, every replica marks the node's instances draining for the proxies connected to
//! it, and lists it as settled once they all run that; the `Leave` call waits for every
//! replica's settled list (see [`crate::drain::leave`]).
//!
//! A record is fresh while it keeps changing: its beat moves every [`BEAT`], and this replica
//! notes *when it saw* each change, so no clocks are compared. A replica that dies stops
//! beating; [`STALE`] later its nodes count as disconnected from that moment (their grace
//! starts then), unless they are live elsewhere (an agent fails over within a second or two).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::path::Path;

use pilotfish_durable as durable;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{SharedStore, LIVENESS_KEY};
use crate::drain::Drains;
use crate::mesh::MeshSnapshot;
use crate::xds::connections::{Connections, NodeSeen};

/// How often a replica rewrites its record when nothing changed.
pub const BEAT: Duration = Duration::from_secs(2);
/// A record not seen changing for this long is a replica gone.
pub const STALE: Duration = Duration::from_secs(7);

/// What the other replicas say, for [`crate::liveness`] and [`crate::drain`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remote {
    /// Nodes live at other replicas (`streams > 0`), and the ones that were and are not any
    /// more (`streams == 0`, `last_seen` when that was noticed).
    pub seen: BTreeMap<String, NodeSeen>,
    /// Nodes leaving through another replica.
    pub draining: BTreeSet<String>,
    /// Per live replica: the draining nodes its proxies all run drained.
    pub settled: Vec<BTreeSet<String>>,
}

/// [`Remote`], as it changes.
pub type RemoteNodes = watch::Receiver<Arc<Remote>>;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// Nodes with a serving stream to this replica.
    nodes: BTreeSet<String>,
    /// Nodes whose `Host.Leave` this replica took.
    #[serde(default)]
    draining: BTreeSet<String>,
    /// Draining nodes (whoever took their leave) that every proxy connected here runs drained.
    #[serde(default)]
    settled: BTreeSet<String>,
    /// Moves on every write, so that readers see the replica is alive.
    beat: u64,
}

/// How often settling drains are checked (proxies ACK without telling this task).
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// The file in `state_dir` that keeps this replica's name.
pub const REPLICA_ID_FILE: &str = "replica-id";

/// This replica's name in `liveness/`: its host name and a random tag made on first start and
/// kept in `state_dir/replica-id`, so that it stays the same across restarts and two replicas
/// never share one (cloned machines may share a host name and listen address). Blocking.
pub fn replica_id(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join(REPLICA_ID_FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.chars().all(is_key_char) {
            return Ok(id.to_string());
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| if is_key_char(c) { c } else { '_' })
        .collect();
    let id = format!("{host}-{:016x}", rand::random::<u64>());
    durable::create_dir_all(state_dir, durable::PRIVATE_DIR_MODE)?;
    durable::write_atomic(&path, id.as_bytes(), durable::SECRET_MODE)?;
    Ok(id)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'
}

/// What [`share_liveness`] works with.
pub struct Sharing {
    pub store: Arc<SharedStore>,
    pub connections: Connections,
    pub drains: Drains,
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    /// This replica's name ([`replica_id`]).
    pub id: String,
}

/// Publishes this replica's record and follows the others', until `shutdown`.
pub async fn share_liveness(
    sharing: Sharing,
    out: watch::Sender<Arc<Remote>>,
    shutdown: CancellationToken,
) {
    let Sharing {
        store,
        connections,
        drains,
        mut snapshots,
        id,
    } = sharing;
    let key = format!("{LIVENESS_KEY}{id}");
    let mut records = store.liveness();
    let mut nodes_changed = connections.watch_nodes();
    let mut leaving = drains.watch();
    let mut follower = Follower::default();
    // The snapshot generation from which each draining node's instances were drained.
    let mut drained_at: BTreeMap<String, u64> = BTreeMap::new();
    let mut beat = 0u64;
    let mut written: Option<Record> = None;
    let mut next_beat = tokio::time::Instant::now();
    loop {
        let now = Instant::now();
        let theirs = records.borrow_and_update().clone();
        let remote = follower.follow(&theirs, &key, now);
        let local: BTreeSet<String> = leaving.borrow_and_update().keys().cloned().collect();
        let all: BTreeSet<String> = local.union(&remote.draining).cloned().collect();
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        drained_at.retain(|n, _| all.contains(n));
        for node in &all {
            if !drained_at.contains_key(node) && drained(&snapshot, node) {
                drained_at.insert(node.clone(), snapshot.generation);
            }
        }
        let settled: BTreeSet<String> = drained_at
            .iter()
            .filter(|(node, generation)| connections.settled_since(node, **generation).1 == 0)
            .map(|(node, _)| node.clone())
            .collect();
        let unsettled = settled.len() < all.len();
        let record = Record {
            nodes: connections.with_nodes(|seen| {
                seen.iter()
                    .filter(|(_, s)| s.streams > 0)
                    .map(|(n, _)| n.clone())
                    .collect()
            }),
            draining: local,
            settled,
            beat: 0,
        };
        if written.as_ref() != Some(&record) || tokio::time::Instant::now() >= next_beat {
            beat += 1;
            let bytes = serde_json::to_vec(&Record {
                beat,
                ..record.clone()
            })
            .unwrap_or_default();
            match store.put(&key, &bytes).await {
                Ok(()) => written = Some(record),
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "cannot share which hosts are connected here")
                }
            }
            next_beat = tokio::time::Instant::now() + BEAT;
        }
        out.send_if_modified(|current| {
            let changed = **current != remote;
            if changed {
                *current = Arc::new(remote);
            }
            changed
        });
        let recheck = follower.next_stale(now).map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = records.changed() => {}
            _ = nodes_changed.changed() => {}
            _ = leaving.changed() => {}
            Ok(()) = snapshots.changed() => {}
            _ = tokio::time::sleep_until(next_beat) => {}
            _ = tokio::time::sleep(SETTLE_POLL), if unsettled => {}
            _ = async { match recheck {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            } } => {}
        }
    }
}

/// Whether every instance on `node` is draining in `snapshot`.
fn drained(snapshot: &MeshSnapshot, node: &str) -> bool {
    !snapshot.shared.catalog.services.values().any(|svc| {
        svc.instances
            .iter()
            .any(|i| i.node.as_deref() == Some(node) && !i.draining)
    })
}

/// What this replica knows of the others' records.
#[derive(Debug, Default)]
struct Follower {
    /// Each record's bytes and when they were last seen to change.
    seen: BTreeMap<String, (Vec<u8>, Instant)>,
    /// Nodes that were live at another replica and are not now: since when.
    gone: BTreeMap<String, (Instant, u64)>,
    live: BTreeSet<String>,
}

impl Follower {
    /// Takes the records (by key, `own` excluded) as of `now`; what [`RemoteNodes`] says.
    fn follow(&mut self, records: &BTreeMap<String, Vec<u8>>, own: &str, now: Instant) -> Remote {
        self.seen.retain(|k, _| records.contains_key(k));
        for (key, bytes) in records.iter().filter(|(k, _)| k.as_str() != own) {
            if self.seen.get(key).is_none_or(|(old, _)| old != bytes) {
                self.seen.insert(key.clone(), (bytes.clone(), now));
            }
        }
        let mut live = BTreeSet::new();
        let mut remote = Remote::default();
        for (bytes, at) in self.seen.values() {
            if now.duration_since(*at) >= STALE {
                continue;
            }
            match serde_json::from_slice::<Record>(bytes) {
                Ok(r) => {
                    live.extend(r.nodes);
                    remote.draining.extend(r.draining);
                    remote.settled.push(r.settled);
                }
                Err(e) => warn!(error = %e, "a replica's liveness record does not parse"),
            }
        }
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for node in self.live.difference(&live) {
            self.gone.insert(node.clone(), (now, unix_ms));
        }
        for node in &live {
            self.gone.remove(node);
        }
        self.live = live;
        remote.seen = self
            .gone
            .iter()
            .map(|(n, (at, ms))| {
                (
                    n.clone(),
                    NodeSeen {
                        streams: 0,
                        last_seen: *at,
                        last_seen_unix_ms: *ms,
                    },
                )
            })
            .collect();
        for node in &self.live {
            remote.seen.insert(
                node.clone(),
                NodeSeen {
                    streams: 1,
                    last_seen: now,
                    last_seen_unix_ms: unix_ms,
                },
            );
        }
        remote
    }

    /// When the freshest-seen record that is not stale yet would become stale.
    fn next_stale(&self, now: Instant) -> Option<Instant> {
        self.seen
            .values()
            .map(|(_, at)| *at + STALE)
            .filter(|t| *t > now)
            .min()
    }
}

/// Adds to `seen` (this replica's nodes) the nodes live elsewhere, counted live, and those
/// that were, as last seen then.
pub fn merge_seen(seen: &mut BTreeMap<String, NodeSeen>, remote: &BTreeMap<String, NodeSeen>) {
    for (node, r) in remote {
        match seen.get_mut(node) {
            None => {
                seen.insert(node.clone(), *r);
            }
            Some(l) => {
                l.streams += r.streams;
                if r.last_seen > l.last_seen {
                    l.last_seen = r.last_seen;
                    l.last_seen_unix_ms = r.last_seen_unix_ms;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(nodes: &[&str], beat: u64) -> Vec<u8> {
        serde_json::to_vec(&Record {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            beat,
            ..Record::default()
        })
        .unwrap()
    }

    #[test]
    fn nodes_of_a_beating_replica_are_live_and_of_a_silent_one_gone_from_then() {
        let mut f = Follower::default();
        let t0 = Instant::now();
        let mut records = BTreeMap::from([
            ("p/liveness/own".to_string(), record(&["vm-own"], 1)),
            ("p/liveness/b".to_string(), record(&["vm-1", "vm-2"], 1)),
            ("p/liveness/c".to_string(), record(&["vm-3"], 1)),
        ]);
        let out = f.follow(&records, "p/liveness/own", t0).seen;
        let live: Vec<&str> = out
            .iter()
            .filter(|(_, s)| s.streams > 0)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(
            live,
            ["vm-1", "vm-2", "vm-3"],
            "its own record is not counted"
        );

        // b beats on; c stays silent past STALE.
        let t1 = t0 + STALE;
        records.insert("p/liveness/b".to_string(), record(&["vm-1"], 2));
        let out = f.follow(&records, "p/liveness/own", t1).seen;
        assert_eq!(out["vm-1"].streams, 1);
        assert_eq!(out["vm-2"].streams, 0, "left b");
        assert_eq!(out["vm-2"].last_seen, t1);
        assert_eq!(out["vm-3"].streams, 0, "c stopped beating");
        assert_eq!(f.next_stale(t1), Some(t1 + STALE));

        // vm-3 comes back through b.
        records.insert("p/liveness/b".to_string(), record(&["vm-1", "vm-3"], 3));
        let out = f.follow(&records, "p/liveness/own", t1 + BEAT).seen;
        assert_eq!(out["vm-3"].streams, 1);

        // b takes vm-1's leave and its proxies have settled: every replica learns both.
        let leaving = Record {
            nodes: ["vm-3".to_string()].into(),
            draining: ["vm-1".to_string()].into(),
            settled: ["vm-1".to_string()].into(),
            beat: 4,
        };
        records.insert(
            "p/liveness/b".to_string(),
            serde_json::to_vec(&leaving).unwrap(),
        );
        let remote = f.follow(&records, "p/liveness/own", t1 + BEAT * 2);
        assert!(remote.draining.contains("vm-1"));
        assert_eq!(remote.settled, vec![BTreeSet::from(["vm-1".to_string()])]);
    }

    #[test]
    fn a_replica_keeps_its_name_across_restarts_and_two_never_share_one() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = replica_id(a.path()).unwrap();
        assert_eq!(
            replica_id(a.path()).unwrap(),
            first,
            "the same after a restart"
        );
        assert_ne!(replica_id(b.path()).unwrap(), first);
        assert!(first.chars().all(is_key_char), "{first}");
    }

    #[test]
    fn remote_streams_add_to_local_ones() {
        let t = Instant::now();
        let seen = |streams, last_seen| NodeSeen {
            streams,
            last_seen,
            last_seen_unix_ms: 0,
        };
        let local = BTreeMap::from([("a".to_string(), seen(0, t)), ("b".to_string(), seen(1, t))]);
        let later = t + Duration::from_secs(1);
        let remote = BTreeMap::from([
            ("a".to_string(), seen(1, later)),
            ("c".to_string(), seen(0, later)),
        ]);
        let mut merged = local;
        merge_seen(&mut merged, &remote);
        assert_eq!(merged["a"].streams, 1);
        assert_eq!(merged["a"].last_seen, later);
        assert_eq!(merged["b"].streams, 1);
        assert_eq!(merged["c"].streams, 0);
    }
}
