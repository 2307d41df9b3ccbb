//! Who is connected, and how each proxy's config is doing: the ADS streams record here what
//! their protocol state reports, and the status API reads it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use super::Event;
use crate::proxy::Proxy;
use crate::resources::{short_name, LISTENER};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Sotw,
    Delta,
}

/// One connected proxy, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub node: String,
    pub stream: StreamKind,
    /// Seconds since the Unix epoch.
    pub connected_since: u64,
    /// The proxy has accepted listeners on this stream: its host serves the mesh.
    pub serving: bool,
    /// The Pilotfish agent's version (node metadata), when the proxy is run by one.
    pub agent: Option<String>,
    /// Envoy's build version, as the proxy reports it.
    pub envoy: Option<String>,
    /// By short type name (`cds`, `eds`, `lds`, `rds`).
    pub types: BTreeMap<&'static str, TypeStatus>,
    /// The newest mesh snapshot generation whose resources this proxy has accepted in full.
    pub generation: u64,
    /// The proxy as translation sees it (what `proxy-config --diff` compares against).
    #[serde(skip)]
    pub proxy: Option<Arc<Proxy>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// Version of the last response sent (Delta: over the resources the client holds).
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub pushes: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    /// The last answer to a push was a NACK (cleared by the next ACK).
    pub nacked: bool,
    /// When the last response was sent (milliseconds since the Unix epoch).
    pub sent_unix_ms: Option<u64>,
    /// Resources sent on this stream, and the bytes of the responses (gRPC frames) that carried
    /// them: what a reconnect cost. A reconnect that found the client up to date sends none.
    pub resources_sent: u64,
    pub bytes_sent: u64,
}

/// Where one resource type stands at one proxy, as `proxy-status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// The proxy accepted the last version sent.
    Synced,
    /// Sent, not answered yet.
    Stale,
    /// The proxy rejected the last version sent.
    Nacked,
    /// Nothing of this type was sent on this stream.
    NotSent,
}

impl TypeStatus {
    pub fn state(&self) -> SyncState {
        match (&self.sent_version, &self.acked_version) {
            _ if self.nacked => SyncState::Nacked,
            (None, _) => SyncState::NotSent,
            (Some(sent), Some(acked)) if sent == acked => SyncState::Synced,
            _ => SyncState::Stale,
        }
    }
}

/// A node as its streams show it: how many serve, and when one last did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSeen {
    /// Open ADS streams from this node on which its proxy has accepted listeners (a proxy
    /// that has only connected does not serve yet).
    pub streams: usize,
    /// When it last had an open stream: now, while `streams > 0`.
    pub last_seen: Instant,
    /// The same, in milliseconds since the Unix epoch (for `/status`).
    pub last_seen_unix_ms: u64,
}

/// How long a node that disconnected is remembered (at least; see [`PRUNE_EVERY`]).
const FORGET_NODES_AFTER: Duration = Duration::from_secs(3600);
/// How often registering a stream forgets nodes older than [`FORGET_NODES_AFTER`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The registry of open ADS streams, and of the nodes seen lately. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Connections {
    inner: Arc<Mutex<Inner>>,
    /// Bumped whenever a node's first serving stream starts or its last one closes.
    nodes_changed: Arc<watch::Sender<u64>>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            inner: Arc::default(),
            nodes_changed: Arc::new(watch::channel(0).0),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    streams: BTreeMap<u64, ProxyStatus>,
    nodes: BTreeMap<String, NodeSeen>,
    /// The last stream of each node that has none open now (kept as long as `nodes` keeps it).
    gone: BTreeMap<String, ProxyStatus>,
    /// When `nodes` and `gone` were last pruned.
    pruned_at: Option<Instant>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Connections {
    /// Registers a stream; it stays listed until the guard is dropped.
    pub fn register(&self, node: &str, stream: StreamKind) -> ConnectionGuard {
        self.register_proxy(node, stream, None, None, None)
    }

    /// [`Connections::register`], with the versions of the agent and Envoy behind the stream.
    pub fn register_proxy(
        &self,
        node: &str,
        stream: StreamKind,
        agent: Option<String>,
        envoy: Option<String>,
        proxy: Option<Arc<Proxy>>,
    ) -> ConnectionGuard {
        let connected_since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let now = Instant::now();
        // Forgetting old nodes walks them all: at most once a minute, not once per stream (a
        // reconnect storm registers thousands of streams in seconds).
        if inner
            .pruned_at
            .is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY)
        {
            inner.pruned_at = Some(now);
            let Inner { nodes, gone, .. } = &mut *inner;
            nodes.retain(|_, n| {
                n.streams > 0 || now.duration_since(n.last_seen) < FORGET_NODES_AFTER
            });
            gone.retain(|node, _| nodes.contains_key(node));
        }
        inner.gone.remove(node);
        let seen = inner.nodes.entry(node.to_string()).or_insert(NodeSeen {
            streams: 0,
            last_seen: now,
            last_seen_unix_ms: 0,
        });
        seen.last_seen = now;
        seen.last_seen_unix_ms = unix_ms(SystemTime::now());
        inner.streams.insert(
            id,
            ProxyStatus {
                node: node.to_string(),
                stream,
                connected_since,
                serving: false,
                agent,
                envoy,
                types: BTreeMap::new(),
                generation: 0,
                proxy,
            },
        );
        ConnectionGuard {
            id,
            connections: self.clone(),
        }
    }

    /// Every open stream, ordered by node.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut all: Vec<_> = self.lock().streams.values().cloned().collect();
        all.sort_by(|a, b| a.node.cmp(&b.node));
        all
    }

    /// The newest open stream of `node`: its proxy and flavour.
    pub fn proxy_of(&self, node: &str) -> Option<(Arc<Proxy>, StreamKind)> {
        let inner = self.lock();
        inner
            .streams
            .values()
            .rev()
            .find(|s| s.node == node)
            .and_then(|s| Some((Arc::clone(s.proxy.as_ref()?), s.stream)))
    }

    /// Open streams of nodes other than `node`: how many have settled at `generation` or
    /// later, and how many have not.
    pub fn settled_since(&self, node: &str, generation: u64) -> (usize, usize) {
        let inner = self.lock();
        let others = inner.streams.values().filter(|s| s.node != node);
        let (mut done, mut pending) = (0, 0);
        for s in others {
            if s.generation >= generation {
                done += 1;
            } else {
                pending += 1;
            }
        }
        (done, pending)
    }

    pub fn count(&self) -> usize {
        self.lock().streams.len()
    }

    /// The last stream of every node that has none open now and was seen in the last hour,
    /// with when it was last seen (milliseconds since the Unix epoch).
    pub fn gone(&self) -> Vec<(ProxyStatus, u64)> {
        let inner = self.lock();
        inner
            .gone
            .iter()
            .filter_map(|(node, status)| {
                let seen = inner.nodes.get(node)?;
                (seen.streams == 0 && !inner.streams.values().any(|s| &s.node == node))
                    .then(|| (status.clone(), seen.last_seen_unix_ms))
            })
            .collect()
    }

    /// Every node with an open stream or one seen in the last hour.
    pub fn nodes(&self) -> BTreeMap<String, NodeSeen> {
        self.lock().nodes.clone()
    }

    /// `f` over [`Connections::nodes`] without copying them (keep `f` short: streams wait).
    pub fn with_nodes<T>(&self, f: impl FnOnce(&BTreeMap<String, NodeSeen>) -> T) -> T {
        f(&self.lock().nodes)
    }

    /// Changes whenever a node gets its first open stream or loses its last one.
    pub fn watch_nodes(&self) -> watch::Receiver<u64> {
        self.nodes_changed.subscribe()
    }

    /// `node` gained (`delta` 1) or lost (-1) a serving stream, or (0) just lost a stream.
    fn serving(&self, inner: &mut Inner, node: &str, delta: isize) {
        let Some(seen) = inner.nodes.get_mut(node) else {
            return;
        };
        let before = seen.streams;
        seen.streams = seen.streams.saturating_add_signed(delta);
        seen.last_seen = Instant::now();
        seen.last_seen_unix_ms = unix_ms(SystemTime::now());
        if (before == 0) != (seen.streams == 0) {
            self.nodes_changed.send_modify(|n| *n += 1);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stream's entry in [`Connections`]; removes it on drop.
#[derive(Debug)]
pub struct ConnectionGuard {
    id: u64,
    connections: Connections,
}

impl ConnectionGuard {
    /// The proxy has accepted everything of snapshot `generation`.
    pub fn settled_at(&self, generation: u64) {
        if let Some(status) = self.connections.lock().streams.get_mut(&self.id) {
            status.generation = status.generation.max(generation);
        }
    }

    pub fn record(&self, event: &Event) {
        let mut inner = self.connections.lock();
        let Some(status) = inner.streams.get_mut(&self.id) else {
            return;
        };
        match event {
            Event::Ack {
                type_url, version, ..
            } => {
                status
                    .types
                    .entry(short_name(type_url))
                    .or_default()
                    .acked_version = Some(version.clone());
                if let Some(t) = status.types.get_mut(short_name(type_url)) {
                    t.nacked = false;
                }
                if type_url == LISTENER && !status.serving {
                    status.serving = true;
                    let node = status.node.clone();
                    self.connections.serving(&mut inner, &node, 1);
                }
            }
            Event::Nack {
                type_url, message, ..
            } => {
                let t = status.types.entry(short_name(type_url)).or_default();
                t.nacks += 1;
                t.last_nack = Some(message.clone());
                t.nacked = true;
            }
            Event::Pushed {
                type_url, version, ..
            } => {
                let t = status.types.entry(short_name(type_url)).or_default();
                t.pushes += 1;
                t.sent_version = Some(version.clone());
                t.sent_unix_ms = Some(unix_ms(SystemTime::now()));
            }
            Event::Resumed { type_url, version } => {
                let t = status.types.entry(short_name(type_url)).or_default();
                t.sent_version = Some(version.clone());
                t.acked_version = Some(version.clone());
                if type_url == LISTENER && !status.serving {
                    status.serving = true;
                    let node = status.node.clone();
                    self.connections.serving(&mut inner, &node, 1);
                }
            }
            Event::StaleNonce { .. } | Event::UnknownType { .. } => {}
        }
    }

    /// A response of `type_url` with `resources` resources went out in `bytes` bytes.
    pub fn sent(&self, type_url: &str, resources: usize, bytes: usize) {
        let mut inner = self.connections.lock();
        if let Some(status) = inner.streams.get_mut(&self.id) {
            let t = status.types.entry(short_name(type_url)).or_default();
            t.resources_sent += resources as u64;
            t.bytes_sent += bytes as u64;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut inner = self.connections.lock();
        let Some(status) = inner.streams.remove(&self.id) else {
            return;
        };
        let delta = if status.serving { -1 } else { 0 };
        self.connections.serving(&mut inner, &status.node, delta);
        let node = status.node.clone();
        inner.gone.insert(node, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::CLUSTER;

    #[test]
    fn records_acks_and_nacks_and_forgets_closed_streams() {
        let c = Connections::default();
        let g = c.register("vm-a", StreamKind::Delta);
        g.record(&Event::Pushed {
            type_url: CLUSTER.into(),
            version: "v1".into(),
            resources: 2,
        });
        g.record(&Event::Ack {
            type_url: CLUSTER.into(),
            version: "v1".into(),
            nonce: "1".into(),
        });
        g.record(&Event::Nack {
            type_url: CLUSTER.into(),
            version: "v1".into(),
            nonce: "2".into(),
            message: "bad".into(),
        });
        let list = c.list();
        assert_eq!(list.len(), 1);
        let cds = &list[0].types["cds"];
        assert_eq!(cds.acked_version.as_deref(), Some("v1"));
        assert_eq!((cds.nacks, cds.last_nack.as_deref()), (1, Some("bad")));
        drop(g);
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn remembers_nodes_after_their_last_stream_closes() {
        let c = Connections::default();
        let mut changes = c.watch_nodes();
        let listeners = |version: &str| Event::Ack {
            type_url: LISTENER.into(),
            version: version.into(),
            nonce: "1".into(),
        };
        let first = c.register("vm-a", StreamKind::Delta);
        assert_eq!(c.nodes()["vm-a"].streams, 0, "connected, not serving yet");
        assert!(!changes.has_changed().unwrap());
        first.record(&listeners("v1"));
        assert!(
            changes.has_changed().unwrap(),
            "the first serving stream is a change"
        );
        changes.mark_unchanged();
        first.record(&listeners("v2"));
        let second = c.register("vm-a", StreamKind::Sotw);
        second.record(&listeners("v2"));
        assert!(!changes.has_changed().unwrap(), "a second one is not");
        assert_eq!(c.nodes()["vm-a"].streams, 2);
        drop(first);
        assert!(!changes.has_changed().unwrap());
        let before = c.nodes()["vm-a"].last_seen;
        drop(second);
        assert!(
            changes.has_changed().unwrap(),
            "losing the last one is a change"
        );
        let seen = c.nodes()["vm-a"];
        assert_eq!(seen.streams, 0);
        assert!(seen.last_seen >= before && seen.last_seen_unix_ms > 0);
    }
}
