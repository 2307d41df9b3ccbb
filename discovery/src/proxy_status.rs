//! `GET /v1/proxies`, what `pilotfish-ctl proxy-status` shows: every proxy discovery knows,
//! connected or seen in the last hour, with where each resource type stands (`synced`, `stale`,
//! `nacked`, `not_sent`), its versions and the NACK reason. Pure: built from the connection
//! registry, the current catalog and the nodes' liveness.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use pilotfish_registries::model::Catalog;
use serde::Serialize;

use crate::liveness::NodeLiveness;
use crate::xds::connections::{ProxyStatus, StreamKind, SyncState, TypeStatus};

/// One proxy, as `proxy-status --output json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyEntry {
    pub node: String,
    pub connected: bool,
    /// Now when connected; else when its last stream closed.
    pub last_seen_unix_ms: u64,
    pub flavour: StreamKind,
    /// Services the registries place on the node.
    pub services: Vec<String>,
    /// The Pilotfish agent's version; `None` for a proxy without one.
    pub agent: Option<String>,
    pub envoy: Option<String>,
    /// The node's liveness (`live`, `grace`, `dead`, `revoked`), see `crate::liveness`.
    pub liveness: Option<&'static str>,
    /// By type: `clusters`, `listeners`, `endpoints`, `routes`, `secrets`.
    pub types: BTreeMap<&'static str, TypeEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeEntry {
    pub state: SyncState,
    /// The last version sent.
    pub version: Option<String>,
    pub acked_version: Option<String>,
    /// Set while the type is `nacked`.
    pub nack_reason: Option<String>,
    /// When the last version was sent (milliseconds since the Unix epoch).
    pub sent_unix_ms: Option<u64>,
}

/// The types in `proxy-status` order, with the short names the streams record them under.
/// Secrets are served by the agent's SDS on the host, so discovery never sends them.
pub const TYPES: [(&str, &str); 5] = [
    ("clusters", "cds"),
    ("listeners", "lds"),
    ("endpoints", "eds"),
    ("routes", "rds"),
    ("secrets", "sds"),
];

/// Every proxy: the open streams, then the nodes whose last stream closed in the last hour.
pub fn entries(
    open: Vec<ProxyStatus>,
    gone: Vec<(ProxyStatus, u64)>,
    catalog: &Catalog,
    nodes: &[NodeLiveness],
) -> Vec<ProxyEntry> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    // Services by node, once for every proxy (the console asks every 2 s).
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for s in catalog.services.values() {
        let on: BTreeSet<&str> = s
            .instances
            .iter()
            .filter_map(|i| i.node.as_deref())
            .collect();
        for node in on {
            by_node.entry(node).or_default().push(s.name.clone());
        }
    }
    let mut out: Vec<ProxyEntry> = open
        .into_iter()
        .map(|p| (p, true, now))
        .chain(gone.into_iter().map(|(p, seen)| (p, false, seen)))
        .map(|(p, connected, last_seen_unix_ms)| {
            let services = by_node.get(p.node.as_str()).cloned().unwrap_or_default();
            entry(p, connected, last_seen_unix_ms, services, nodes)
        })
        .collect();
    out.sort_by(|a, b| (&a.node, !a.connected).cmp(&(&b.node, !b.connected)));
    out
}

fn entry(
    p: ProxyStatus,
    connected: bool,
    last_seen_unix_ms: u64,
    services: Vec<String>,
    nodes: &[NodeLiveness],
) -> ProxyEntry {
    let types = TYPES
        .iter()
        .map(|(name, short)| {
            let t = p.types.get(short).cloned().unwrap_or_default();
            (*name, type_entry(t))
        })
        .collect();
    ProxyEntry {
        liveness: nodes.iter().find(|n| n.node == p.node).map(|n| n.state),
        node: p.node,
        connected,
        last_seen_unix_ms,
        flavour: p.stream,
        services,
        agent: p.agent,
        envoy: p.envoy,
        types,
    }
}

fn type_entry(t: TypeStatus) -> TypeEntry {
    let state = t.state();
    TypeEntry {
        state,
        nack_reason: (state == SyncState::Nacked)
            .then_some(t.last_nack)
            .flatten(),
        version: t.sent_version,
        acked_version: t.acked_version,
        sent_unix_ms: t.sent_unix_ms,
    }
}

/// Whether every connected proxy has every type it was sent in force (`proxy-status` exits 0).
pub fn all_synced(entries: &[ProxyEntry]) -> bool {
    entries.iter().filter(|e| e.connected).all(|e| {
        e.types
            .values()
            .all(|t| matches!(t.state, SyncState::Synced | SyncState::NotSent))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(node: &str, types: &[(&'static str, TypeStatus)]) -> ProxyStatus {
        ProxyStatus {
            node: node.into(),
            stream: StreamKind::Delta,
            connected_since: 1,
            serving: true,
            agent: Some("0.1.0".into()),
            envoy: None,
            types: types.iter().cloned().collect(),
            generation: 0,
            proxy: None,
        }
    }

    fn sent(version: &str, acked: Option<&str>, nack: Option<&str>) -> TypeStatus {
        TypeStatus {
            sent_version: Some(version.into()),
            acked_version: acked.map(str::to_string),
            pushes: 1,
            nacks: nack.is_some() as u64,
            last_nack: nack.map(str::to_string),
            nacked: nack.is_some(),
            sent_unix_ms: Some(5),
            ..TypeStatus::default()
        }
    }

    #[test]
    fn states_per_type_and_disconnected_proxies() {
        let open = vec![status(
            "vm-a",
            &[
                ("cds", sent("v2", Some("v2"), None)),
                ("eds", sent("v3", Some("v2"), None)),
                ("lds", sent("v4", Some("v1"), Some("bad listener"))),
            ],
        )];
        let gone = vec![(status("vm-b", &[("cds", sent("v1", Some("v1"), None))]), 42)];
        let list = entries(open, gone, &Catalog::default(), &[]);
        assert_eq!(list.len(), 2);
        let a = &list[0];
        assert!(a.connected);
        assert_eq!(a.types["clusters"].state, SyncState::Synced);
        assert_eq!(a.types["endpoints"].state, SyncState::Stale);
        assert_eq!(a.types["listeners"].state, SyncState::Nacked);
        assert_eq!(
            a.types["listeners"].nack_reason.as_deref(),
            Some("bad listener")
        );
        assert_eq!(a.types["routes"].state, SyncState::NotSent);
        assert_eq!(a.types["secrets"].state, SyncState::NotSent);
        let b = &list[1];
        assert!(!b.connected);
        assert_eq!(b.last_seen_unix_ms, 42);
        assert!(!all_synced(&list), "vm-a is stale and NACKing");
        assert!(
            all_synced(&list[1..]),
            "a disconnected proxy does not count"
        );
        let json = serde_json::to_value(&list[0]).unwrap();
        assert_eq!(json["types"]["listeners"]["state"], "nacked");
        assert_eq!(json["types"]["routes"]["state"], "not_sent");
        assert_eq!(json["flavour"], "delta");
    }
}
