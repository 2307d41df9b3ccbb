//! Who is connected, and how each proxy's config is doing: the ADS streams record here what
//! their protocol state reports, and the status API reads it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Event;
use crate::resources::short_name;

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
    /// By short type name (`cds`, `eds`, `lds`, `rds`).
    pub types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// Version of the last response sent (Delta: over the resources the client holds).
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub pushes: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
}

/// The registry of open ADS streams. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    streams: BTreeMap<u64, ProxyStatus>,
}

impl Connections {
    /// Registers a stream; it stays listed until the guard is dropped.
    pub fn register(&self, node: &str, stream: StreamKind) -> ConnectionGuard {
        let connected_since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.streams.insert(
            id,
            ProxyStatus {
                node: node.to_string(),
                stream,
                connected_since,
                types: BTreeMap::new(),
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

    pub fn count(&self) -> usize {
        self.lock().streams.len()
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
            }
            Event::Nack {
                type_url, message, ..
            } => {
                let t = status.types.entry(short_name(type_url)).or_default();
                t.nacks += 1;
                t.last_nack = Some(message.clone());
            }
            Event::Pushed {
                type_url, version, ..
            } => {
                let t = status.types.entry(short_name(type_url)).or_default();
                t.pushes += 1;
                t.sent_version = Some(version.clone());
            }
            Event::StaleNonce { .. } | Event::UnknownType { .. } => {}
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.connections.lock().streams.remove(&self.id);
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
}
