//! What a host's Envoy actually holds, fetched through discovery: `pilotfish-ctl proxy-config`.
//!
//! Every agent keeps a `Host.Attach` stream open ([`pilotfish_pki::wire::host`]) on its
//! authenticated connection to discovery. [`DumpHub`] remembers the newest stream of each node;
//! `GET /v1/proxies/{node}/config` sends a request down it and waits for the agent's answer,
//! Envoy's `/config_dump` with private keys redacted. No port opens on the host, and Envoy's
//! admin stays on loopback.
//!
//! [`diff`] compares that dump with what discovery means the proxy to run now (the snapshot's
//! resources for it): resources missing or unexpected by name, resources Envoy holds but does
//! not serve (warming, or refused), and versions. Delta streams carry each resource's content
//! hash as its version, so every resource is compared exactly; SotW carries one version per
//! response, so for SotW the cluster and listener sets are compared by version and the others
//! by name only. Contents are not compared field by field (Envoy's JSON and our encoded
//! protobuf have no common form without the proto descriptors). Envoy keeps no version for
//! endpoints, so they are compared by name only.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pilotfish_pki::wire::host::{DumpReply, DumpRequest, Host, LeaveRequest, LeaveResponse};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::identity::PeerAuth;
use crate::resources::{map_version, ProxyResources, ResourceMap};
use crate::xds::connections::StreamKind;

/// How long `GET /v1/proxies/{node}/config` waits for the agent.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The sections of a dump, as `proxy-config` names them.
pub const TYPES: [&str; 5] = ["clusters", "endpoints", "listeners", "routes", "secrets"];

/// The open `Attach` streams, by node. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DumpHub {
    inner: Arc<Mutex<HubInner>>,
}

#[derive(Debug, Default)]
struct HubInner {
    next_id: u64,
    /// The newest stream of each node (an agent that reconnects replaces its old one).
    agents: HashMap<String, Attached>,
    pending: HashMap<u64, oneshot::Sender<Result<String, String>>>,
}

#[derive(Debug)]
struct Attached {
    stream: u64,
    requests: mpsc::Sender<DumpRequest>,
}

/// Why there is no dump.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("node {0} has no agent connected to this discovery")]
    NotConnected(String),
    #[error("the agent of node {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("the agent of node {node} could not read its Envoy's config: {message}")]
    Agent { node: String, message: String },
    #[error("the agent of node {node} sent a config dump that is not JSON: {message}")]
    Malformed { node: String, message: String },
}

impl DumpHub {
    fn lock(&self) -> MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nodes with an open stream.
    pub fn attached(&self) -> Vec<String> {
        let mut nodes: Vec<_> = self.lock().agents.keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// Asks `node`'s agent for its Envoy's config dump (`types`: sections, empty for all).
    pub async fn dump(&self, node: &str, types: &[&str]) -> Result<Value, DumpError> {
        let (tx, rx) = oneshot::channel();
        let (id, requests) = {
            let mut inner = self.lock();
            let requests = match inner.agents.get(node) {
                Some(a) => a.requests.clone(),
                None => return Err(DumpError::NotConnected(node.to_string())),
            };
            inner.next_id += 1;
            let id = inner.next_id;
            inner.pending.insert(id, tx);
            (id, requests)
        };
        let request = DumpRequest {
            id,
            types: types.iter().map(|t| t.to_string()).collect(),
        };
        let answer = tokio::time::timeout(DUMP_TIMEOUT, async {
            requests.send(request).await.ok()?;
            rx.await.ok()
        })
        .await;
        self.lock().pending.remove(&id);
        match answer {
            Ok(Some(Ok(json))) => serde_json::from_str(&json).map_err(|e| DumpError::Malformed {
                node: node.to_string(),
                message: e.to_string(),
            }),
            Ok(Some(Err(message))) => Err(DumpError::Agent {
                node: node.to_string(),
                message,
            }),
            // The stream closed before answering.
            Ok(None) => Err(DumpError::NotConnected(node.to_string())),
            Err(_) => Err(DumpError::Timeout(node.to_string(), DUMP_TIMEOUT)),
        }
    }

    /// Registers `node`'s new stream; returns its id and the requests to send down it.
    fn attach(&self, node: &str) -> (u64, mpsc::Receiver<DumpRequest>) {
        let (tx, rx) = mpsc::channel(8);
        let mut inner = self.lock();
        inner.next_id += 1;
        let stream = inner.next_id;
        inner.agents.insert(
            node.to_string(),
            Attached {
                stream,
                requests: tx,
            },
        );
        (stream, rx)
    }

    fn detach(&self, node: &str, stream: u64) {
        let mut inner = self.lock();
        if inner.agents.get(node).is_some_and(|a| a.stream == stream) {
            inner.agents.remove(node);
        }
    }

    fn answer(&self, reply: DumpReply) {
        let Some(waiter) = self.lock().pending.remove(&reply.id) else {
            debug!(
                id = reply.id,
                "a config dump came after its request was given up"
            );
            return;
        };
        let answer = if reply.error.is_empty() {
            Ok(reply.config_dump_json)
        } else {
            Err(reply.error)
        };
        let _ = waiter.send(answer);
    }
}

/// What `Host.Leave` needs (see [`crate::drain`]).
#[derive(Debug, Clone)]
pub struct Leaving {
    pub drains: crate::drain::Drains,
    pub snapshots: tokio::sync::watch::Receiver<Arc<crate::mesh::MeshSnapshot>>,
    pub connections: crate::xds::connections::Connections,
    /// What the other replicas say (`[store.consul]`); `None` with one replica.
    pub remote: Option<crate::store::liveness::RemoteNodes>,
}

/// The `Host` gRPC service: config dumps over a [`DumpHub`], and leaving hosts.
#[derive(Debug, Clone)]
pub struct HostService {
    hub: DumpHub,
    leaving: Option<Leaving>,
    /// Secure mode: the node comes from the client certificate.
    auth: Option<PeerAuth>,
    shutdown: CancellationToken,
}

impl HostService {
    pub fn new(hub: DumpHub, auth: Option<PeerAuth>, shutdown: CancellationToken) -> Self {
        HostService {
            hub,
            leaving: None,
            auth,
            shutdown,
        }
    }

    /// Also serve `Leave`.
    pub fn with_leaving(mut self, leaving: Leaving) -> Self {
        self.leaving = Some(leaving);
        self
    }
}

#[tonic::async_trait]
impl Host for HostService {
    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let Some(leaving) = &self.leaving else {
            return Err(Status::unimplemented(
                "this discovery does not coordinate drains",
            ));
        };
        let node = match &self.auth {
            Some(auth) => auth.node("leave", &request)?,
            None => match request.get_ref().node.as_str() {
                "" => return Err(Status::invalid_argument("the leave request names no node")),
                node => node.to_string(),
            },
        };
        // Answer a little before the agent gives up waiting.
        let wait = Duration::from_millis(request.get_ref().wait_ms).mul_f64(0.9);
        info!(node = %node, ?wait, "host is leaving: draining its instances");
        let started = std::time::Instant::now();
        let d = crate::drain::leave(
            &leaving.drains,
            &leaving.snapshots,
            &leaving.connections,
            leaving.remote.as_ref(),
            &node,
            wait,
        )
        .await;
        info!(node = %node, callers = d.callers, pending = d.pending, after = ?started.elapsed(), "callers stopped choosing the leaving host");
        Ok(Response::new(LeaveResponse {
            callers: d.callers,
            pending: d.pending,
        }))
    }

    async fn attach(
        &self,
        request: Request<Streaming<DumpReply>>,
    ) -> Result<Response<BoxStream<DumpRequest>>, Status> {
        let bound = match &self.auth {
            Some(auth) => Some(auth.node("dump", &request)?),
            None => None,
        };
        let mut replies = request.into_inner();
        let hello = match replies.message().await? {
            Some(hello) if hello.id == 0 => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on Host.Attach must be a hello (id 0) naming the node",
                ))
            }
        };
        let node = match (bound, hello.node.as_str()) {
            (Some(bound), claimed) if !claimed.is_empty() && claimed != bound => {
                return Err(Status::permission_denied(format!(
                    "node {claimed} is not the node in the client certificate ({bound})"
                )))
            }
            (Some(bound), _) => bound,
            (None, "") => return Err(Status::invalid_argument("the hello names no node")),
            (None, claimed) => {
                warn!(
                    node = claimed,
                    "INSECURE MODE: accepting a config-dump stream without authentication"
                );
                claimed.to_string()
            }
        };
        let (stream, requests) = self.hub.attach(&node);
        info!(node = %node, "agent attached for config dumps");
        let (hub, auth, shutdown) = (self.hub.clone(), self.auth.clone(), self.shutdown.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let revoked = async {
                match &auth {
                    Some(auth) => {
                        auth.revoked("dump", &node).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(revoked);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = &mut revoked => break,
                    message = replies.message() => match message {
                        Ok(Some(reply)) => hub.answer(reply),
                        Ok(None) => break,
                        Err(status) => {
                            debug!(node = %node, %status, "config-dump stream failed");
                            break;
                        }
                    },
                }
            }
            hub.detach(&node, stream);
            stop.cancel();
        });
        let requests =
            futures::stream::unfold((requests, stopped), |(mut rx, stopped)| async move {
                tokio::select! {
                    _ = stopped.cancelled() => None,
                    r = rx.recv() => r.map(|r| (Ok(r), (rx, stopped))),
                }
            });
        Ok(Response::new(Box::pin(requests)))
    }
}

/// `clusters` -> the `@type` of its section in Envoy's config dump.
pub fn section_type(name: &str) -> Option<&'static str> {
    Some(match name {
        "clusters" => "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
        "endpoints" => "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
        "listeners" => "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "routes" => "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        "secrets" => "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        _ => return None,
    })
}

/// What [`diff`] found for one type.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct TypeDiff {
    /// Discovery sends it; Envoy does not hold it.
    pub missing: Vec<String>,
    /// Envoy holds it (dynamically); discovery no longer sends it.
    pub unexpected: Vec<String>,
    /// Envoy holds it but does not serve it: `warming`, or `refused` (with Envoy's reason).
    pub not_active: Vec<NotActive>,
    /// Envoy holds another version than discovery sends.
    pub outdated: Vec<Outdated>,
}

impl TypeDiff {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.not_active.is_empty()
            && self.outdated.is_empty()
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NotActive {
    pub name: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Outdated {
    /// The resource's name, or `*` for the whole set (SotW clusters and listeners).
    pub name: String,
    pub sent: String,
    pub holds: String,
}

/// One resource in a config dump.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Held {
    /// `clusters`, `endpoints`, `listeners`, `routes` or `secrets`.
    pub kind: &'static str,
    pub name: String,
    /// The `version_info` Envoy keeps with it (empty for static resources).
    pub version: String,
    /// `static` (from the bootstrap), `active`, `warming`, `draining` or `refused`.
    pub state: &'static str,
    /// Why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Compares what discovery means `flavour`'s proxy to run with its Envoy's config dump.
pub fn diff(
    intended: &ProxyResources,
    flavour: StreamKind,
    dump: &Value,
) -> BTreeMap<&'static str, TypeDiff> {
    let all = held(dump);
    let mut out = BTreeMap::new();
    let types: [(&'static str, &Arc<ResourceMap>); 4] = [
        ("clusters", &intended.clusters),
        ("endpoints", &intended.endpoints),
        ("listeners", &intended.listeners),
        ("routes", &intended.routes),
    ];
    for (name, sent) in types {
        let held: BTreeMap<&str, &Held> = all
            .iter()
            .filter(|h| h.kind == name && h.state != "static")
            .map(|h| (h.name.as_str(), h))
            .collect();
        let mut d = TypeDiff::default();
        for (resource, r) in sent.iter() {
            match held.get(resource.as_str()) {
                None => d.missing.push(resource.clone()),
                // Envoy keeps no version for endpoints (it shows an empty one).
                Some(h)
                    if flavour == StreamKind::Delta
                        && !h.version.is_empty()
                        && h.version != r.version =>
                {
                    d.outdated.push(Outdated {
                        name: resource.clone(),
                        sent: r.version.clone(),
                        holds: h.version.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        for (resource, h) in &held {
            // Envoy lists the endpoints of every cluster, also those that carry their own
            // (inline `load_assignment`, not EDS).
            let inline = name == "endpoints" && intended.clusters.contains_key(*resource);
            if !sent.contains_key(*resource) && !inline {
                d.unexpected.push(resource.to_string());
            }
            if h.state != "active" {
                d.not_active.push(NotActive {
                    name: resource.to_string(),
                    state: h.state,
                    detail: h.detail.clone(),
                });
            }
        }
        // SotW versions a cluster or listener set as a whole (see `sotw`).
        if flavour == StreamKind::Sotw && matches!(name, "clusters" | "listeners") {
            let holds = section(dump, name)
                .get("version_info")
                .and_then(Value::as_str)
                .unwrap_or("");
            let want = map_version(sent);
            if holds != want {
                d.outdated.push(Outdated {
                    name: "*".into(),
                    sent: want,
                    holds: holds.to_string(),
                });
            }
        }
        out.insert(name, d);
    }
    out
}

/// The section of a config dump holding `kind` (`Null` when absent).
fn section<'a>(dump: &'a Value, kind: &str) -> &'a Value {
    let ty = section_type(kind);
    dump.get("configs")
        .and_then(Value::as_array)
        .and_then(|c| {
            c.iter()
                .find(|s| s.get("@type").and_then(Value::as_str) == ty)
        })
        .unwrap_or(&Value::Null)
}

/// Every resource of a config dump, by type then as Envoy lists them.
pub fn held(dump: &Value) -> Vec<Held> {
    let str_at = |v: &Value, path: &[&str]| -> String {
        path.iter()
            .try_fold(v, |v, k| v.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut out = Vec::new();
    // (type, list key, state, path to the name, path to the version)
    type Layout = (
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    );
    const LAYOUT: [Layout; 12] = [
        (
            "clusters",
            "static_clusters",
            "static",
            &["cluster", "name"],
            &[],
        ),
        (
            "clusters",
            "dynamic_active_clusters",
            "active",
            &["cluster", "name"],
            &["version_info"],
        ),
        (
            "clusters",
            "dynamic_warming_clusters",
            "warming",
            &["cluster", "name"],
            &["version_info"],
        ),
        (
            "endpoints",
            "static_endpoint_configs",
            "static",
            &["endpoint_config", "cluster_name"],
            &[],
        ),
        (
            "endpoints",
            "dynamic_endpoint_configs",
            "active",
            &["endpoint_config", "cluster_name"],
            &["version_info"],
        ),
        (
            "listeners",
            "static_listeners",
            "static",
            &["listener", "name"],
            &[],
        ),
        ("listeners", "dynamic_listeners", "", &["name"], &[]),
        (
            "routes",
            "static_route_configs",
            "static",
            &["route_config", "name"],
            &[],
        ),
        (
            "routes",
            "dynamic_route_configs",
            "active",
            &["route_config", "name"],
            &["version_info"],
        ),
        ("secrets", "static_secrets", "static", &["name"], &[]),
        (
            "secrets",
            "dynamic_active_secrets",
            "active",
            &["name"],
            &["version_info"],
        ),
        (
            "secrets",
            "dynamic_warming_secrets",
            "warming",
            &["name"],
            &["version_info"],
        ),
    ];
    for (kind, key, state, name_at, version_at) in LAYOUT {
        let list = section(dump, kind)
            .get(key)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for item in list {
            let name = str_at(item, name_at);
            if name.is_empty() {
                continue;
            }
            if kind == "listeners" && state.is_empty() {
                // A dynamic listener: its most serving state decides; refused if none.
                let serving = [
                    ("active_state", "active"),
                    ("warming_state", "warming"),
                    ("draining_state", "draining"),
                ]
                .into_iter()
                .find(|(key, _)| item.get(key).is_some());
                out.push(match serving {
                    Some((key, state)) => Held {
                        kind,
                        version: str_at(item, &[key, "version_info"]),
                        name,
                        state,
                        detail: None,
                    },
                    None => Held {
                        kind,
                        name,
                        version: String::new(),
                        state: "refused",
                        detail: Some(str_at(item, &["error_state", "details"])),
                    },
                });
                continue;
            }
            out.push(Held {
                kind,
                name,
                version: str_at(item, version_at),
                state,
                detail: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Resource;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    fn map(names: &[&str]) -> Arc<ResourceMap> {
        Arc::new(
            names
                .iter()
                .map(|n| {
                    let c = Cluster {
                        name: n.to_string(),
                        ..Default::default()
                    };
                    (n.to_string(), Resource::encode(*n, &c))
                })
                .collect(),
        )
    }

    fn intended(clusters: &[&str]) -> ProxyResources {
        ProxyResources {
            clusters: map(clusters),
            endpoints: map(clusters),
            listeners: map(&[]),
            routes: map(&[]),
        }
    }

    #[test]
    fn delta_compares_every_resource_by_name_and_version() {
        let want = intended(&["a", "b", "c"]);
        let va = want.clusters["a"].version.clone();
        let dump = serde_json::json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "dynamic_active_clusters": [
                {"version_info": va, "cluster": {"name": "a"}},
                {"version_info": "old", "cluster": {"name": "b"}},
                {"version_info": "x", "cluster": {"name": "gone"}},
             ],
             "static_clusters": [{"cluster": {"name": "pilotfish-xds"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
             "dynamic_listeners": [{"name": "bad", "error_state": {"details": "no such cluster"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
             "dynamic_endpoint_configs": [{"endpoint_config": {"cluster_name": "a"}}]},
        ]});
        let d = diff(&want, StreamKind::Delta, &dump);
        let c = &d["clusters"];
        assert_eq!(c.missing, ["c"]);
        assert_eq!(c.unexpected, ["gone"]);
        assert_eq!(c.outdated.len(), 1);
        assert_eq!(c.outdated[0].name, "b");
        assert_eq!(c.outdated[0].holds, "old");
        let l = &d["listeners"];
        assert_eq!(l.unexpected, ["bad"]);
        assert_eq!(l.not_active[0].state, "refused");
        assert_eq!(l.not_active[0].detail.as_deref(), Some("no such cluster"));
        // Endpoints carry no version in Envoy's dump: compared by name.
        assert_eq!(d["endpoints"].missing, ["b", "c"]);
        assert!(d["endpoints"].outdated.is_empty() && d["endpoints"].unexpected.is_empty());
        assert!(d["routes"].is_empty());
    }

    #[test]
    fn sotw_compares_the_cluster_set_version() {
        let want = intended(&["a"]);
        let version = map_version(&want.clusters);
        let section = |v: &str| {
            serde_json::json!({"configs": [
                {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                 "version_info": v,
                 "dynamic_active_clusters": [{"version_info": v, "cluster": {"name": "a"}}]},
                {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                 "version_info": map_version(&want.listeners)},
                {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
                 "dynamic_endpoint_configs": [{"endpoint_config": {"cluster_name": "a"}}]},
            ]})
        };
        let d = diff(&want, StreamKind::Sotw, &section(&version));
        assert!(d.values().all(TypeDiff::is_empty), "{d:?}");
        let d = diff(&want, StreamKind::Sotw, &section("older"));
        assert_eq!(d["clusters"].outdated[0].name, "*");
        assert_eq!(d["clusters"].outdated[0].sent, version);
    }
}
