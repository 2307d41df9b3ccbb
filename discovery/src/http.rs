//! The HTTP listener: `/healthz`, `/status` (JSON) and `/metrics` (Prometheus text),
//! `/v1/proxies` and `/v1/services`, the web console at `/ui/` ([`crate::console`]), and the
//! rules API under `/v1` ([`crate::rules_api`], which has its own authentication).
//!
//! Handlers only read shared state: the sources' status (file registry, Consul per datacenter,
//! merge conflicts) and the mesh snapshot from their watch channels, the ADS connection
//! registry and the CA (its roots, how many join tokens exist; never a secret). Each part owns
//! its metrics; [`metrics`] assembles them into one registry for `/metrics`. The port is
//! plaintext and unauthenticated, so keep it on loopback (the default).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use pilotfish_registries::files::FilesStatus;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::identity::metrics::CaMetrics;
use crate::identity::{utc, Authority};
use crate::liveness::{NodeLiveness, NodesView};
use crate::mesh::{MeshMetrics, MeshSnapshot};
use crate::sources::metrics::SourcesMetrics;
use crate::sources::SourcesView;
use crate::xds::connections::{Connections, ProxyStatus};
use crate::xds::metrics::XdsMetrics;

pub mod metrics;

/// What the handlers read. Cheap to clone.
#[derive(Clone)]
pub struct HttpState {
    pub files: watch::Receiver<Arc<FilesStatus>>,
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub connections: Connections,
    /// Each mesh node's liveness (see [`crate::liveness`]).
    pub nodes: NodesView,
    /// The rules API, whose token also guards `/v1/proxies`; `None`: open (tests).
    pub api: Option<Arc<crate::rules_api::RulesApi>>,
    /// The CA; `None` in insecure mode.
    pub ca: Option<Arc<Authority>>,
    /// Consul's status and the merge conflicts.
    pub sources: SourcesView,
    /// The agents' config-dump streams (`/v1/proxies/{node}/config`).
    pub dumps: crate::proxy_config::DumpHub,
    /// What each part records as it runs, for `/metrics` (see [`metrics`]).
    pub xds_metrics: Arc<XdsMetrics>,
    pub ca_metrics: Arc<CaMetrics>,
    pub mesh_metrics: MeshMetrics,
    pub sources_metrics: SourcesMetrics,
    /// `[store.consul]`; `None` without it.
    pub store: Option<Arc<crate::store::SharedStore>>,
}

pub struct HttpServer {
    state: HttpState,
    /// The rules API (`/v1/...`), merged in by [`HttpServer::with_rules`].
    rules: Option<Router>,
}

impl HttpServer {
    pub fn new(state: HttpState) -> HttpServer {
        HttpServer { state, rules: None }
    }

    /// Also serves `rules` (the rules API's router, see `crate::rules_api`).
    pub fn with_rules(mut self, rules: Router) -> HttpServer {
        self.rules = Some(rules);
        self
    }

    pub fn router(state: HttpState) -> Router {
        let registry = Arc::new(metrics::registry(&state));
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/status", get(status))
            .route(
                "/metrics",
                get(move || {
                    let registry = Arc::clone(&registry);
                    async move {
                        (
                            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                            metrics::encode(&registry),
                        )
                    }
                }),
            )
            .route("/v1/proxies", get(proxies))
            .route("/v1/proxies/{node}/config", get(proxy_config))
            .route("/v1/services", get(services))
            .merge(crate::console::router())
            .with_state(state)
    }

    /// Serves until `shutdown`.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let mut app = HttpServer::router(self.state);
        if let Some(rules) = self.rules {
            app = app.merge(rules);
        }
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub snapshot: SnapshotStatus,
    pub sources: SourcesStatus,
    pub proxies: Vec<ProxyStatus>,
    /// Every node the registries place instances on or that has connected: `live`, `grace`
    /// (its agent disconnected less than `node_grace` ago), `dead` or `revoked`.
    pub nodes: Vec<NodeLiveness>,
    /// Absent in insecure mode.
    pub ca: Option<CaStatus>,
    /// The shared store (`[store.consul]`); absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::store::StoreStatus>,
}

#[derive(Debug, Serialize)]
pub struct CaStatus {
    pub trust_domain: String,
    /// Every root in the trust bundle; `signing` marks the one new certificates chain to.
    pub roots: Vec<RootStatus>,
    /// Join tokens by state (`valid`, `used`, `expired`, `revoked`).
    pub tokens: BTreeMap<&'static str, usize>,
    /// Set when the token file could not be read.
    pub tokens_error: Option<String>,
    /// Nodes cut off by `node revoke`, with when (UTC).
    pub revoked_nodes: BTreeMap<String, String>,
    /// Unexpired certificates in the CRL pushed to every host.
    pub revoked_certificates: usize,
}

#[derive(Debug, Serialize)]
pub struct RootStatus {
    /// SHA-256 of the DER, hex (what `ca retire` takes).
    pub fingerprint: String,
    pub subject: String,
    pub not_after: String,
    pub signing: bool,
    pub source: String,
}

/// Reads the token file: call from the blocking pool.
fn ca_status(authority: &Authority) -> CaStatus {
    let ca = authority.ca();
    let roots = ca
        .trusted_roots()
        .iter()
        .map(|r| RootStatus {
            fingerprint: r.fingerprint.clone(),
            subject: r.subject.clone(),
            not_after: utc(r.not_after),
            signing: r.signing,
            source: r.source.display().to_string(),
        })
        .collect();
    let now = std::time::SystemTime::now();
    let (tokens, tokens_error) = match authority.tokens().list() {
        Ok(list) => {
            let mut counts = BTreeMap::new();
            for t in &list {
                *counts.entry(t.state(now)).or_default() += 1;
            }
            (counts, None)
        }
        Err(e) => (BTreeMap::new(), Some(crate::error_chain(&e))),
    };
    let revocations = authority.revoker().view();
    let revoked_nodes = revocations
        .revocations
        .nodes()
        .iter()
        .filter(|(_, r)| r.in_force())
        .map(|(node, r)| (node.clone(), utc(r.revoked_at())))
        .collect();
    CaStatus {
        trust_domain: authority.trust_domain().to_string(),
        roots,
        tokens,
        tokens_error,
        revoked_nodes,
        revoked_certificates: revocations.serials.len(),
    }
}

#[derive(Debug, Serialize)]
pub struct SnapshotStatus {
    /// 0 until the first catalog is translated.
    pub generation: u64,
    /// `full` or `endpoints` (see `mesh`).
    pub kind: &'static str,
    /// When discovery learned of the first catalog change in this snapshot (Unix ms); absent
    /// before the first build.
    pub learned_unix_ms: Option<u64>,
    /// When this snapshot was published (Unix ms).
    pub built_unix_ms: u64,
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Every source of the catalog and how they merged.
#[derive(Debug, Serialize)]
pub struct SourcesStatus {
    pub files: BTreeMap<String, FileStatus>,
    /// Absent when `[registry.consul]` is not configured.
    pub consul: Option<ConsulSourceStatus>,
    /// Instances declared by TOML and Consul at the same address:port (TOML's is used).
    pub merge_conflicts: Vec<ConflictStatus>,
    /// References to services that no file or Consul datacenter declares (yet), as
    /// `file:line: key: message`: warnings, nothing is refused for them.
    pub unresolved: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ConsulSourceStatus {
    pub address: String,
    pub token_file: Option<String>,
    /// True when any datacenter serves its last good catalog.
    pub stale: bool,
    pub datacenters: BTreeMap<String, DatacenterSourceStatus>,
}

#[derive(Debug, Serialize)]
pub struct DatacenterSourceStatus {
    /// Every selected service was read once (nothing of this datacenter is used before).
    pub synced: bool,
    /// The last successful answer, UTC (RFC 3339); absent before the first.
    pub last_sync: Option<String>,
    pub last_sync_unix_ms: Option<u64>,
    /// `X-Consul-Index` of the service list and of the health checks.
    pub index: u64,
    pub checks_index: u64,
    /// The last good catalog is served: a request is failing, Consul has no known leader, or
    /// Consul has not been read in full since start (`restored`).
    pub stale: bool,
    /// The catalog served is the one an earlier run stored in `state_dir/last-good/consul/`:
    /// Consul has not been read in full since discovery started.
    pub restored: bool,
    /// When that stored catalog was saved, UTC (RFC 3339); absent unless `restored`.
    pub since: Option<String>,
    pub known_leader: bool,
    pub last_contact_ms: u64,
    /// The error still in force, if any (cleared when that request succeeds again).
    pub last_error: Option<String>,
    pub errors_total: u64,
    pub requests_total: u64,
    pub services: usize,
    pub instances: usize,
    /// Entries not used, with why.
    pub rejected: Vec<RejectedStatus>,
}

#[derive(Debug, Serialize)]
pub struct RejectedStatus {
    pub service: String,
    pub node: String,
    pub service_id: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct ConflictStatus {
    pub service: String,
    pub address: String,
    pub port: u16,
    /// `file:line` of the TOML service, whose instance is used.
    pub toml: String,
    pub consul_datacenter: Option<String>,
    pub message: String,
}

fn sources_status(state: &HttpState) -> SourcesStatus {
    let files = state.files.borrow().clone();
    let consul = state.sources.consul.as_ref().map(|view| {
        let status = view.status.borrow().clone();
        ConsulSourceStatus {
            address: view.address.clone(),
            token_file: view.token_file.as_ref().map(|p| p.display().to_string()),
            stale: status.stale(),
            datacenters: status
                .datacenters
                .iter()
                .map(|(dc, d)| {
                    (
                        dc.clone(),
                        DatacenterSourceStatus {
                            synced: d.synced,
                            last_sync: d.last_sync.map(utc),
                            last_sync_unix_ms: d.last_sync.map(unix_ms),
                            index: d.index,
                            checks_index: d.checks_index,
                            stale: d.stale,
                            restored: d.restored_since.is_some(),
                            since: d.restored_since.map(utc),
                            known_leader: d.known_leader,
                            last_contact_ms: d.last_contact_ms,
                            last_error: d.last_error.clone(),
                            errors_total: d.errors_total,
                            requests_total: d.requests_total,
                            services: d.services,
                            instances: d.instances,
                            rejected: d
                                .rejected
                                .iter()
                                .map(|r| RejectedStatus {
                                    service: r.service.clone(),
                                    node: r.node.clone(),
                                    service_id: r.service_id.clone(),
                                    reason: r.reason.clone(),
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
        }
    });
    let merge_conflicts = state
        .sources
        .conflicts
        .borrow()
        .iter()
        .map(|c| ConflictStatus {
            service: c.service.clone(),
            address: c.address.clone(),
            port: c.port,
            toml: c.toml.to_string(),
            consul_datacenter: c.consul_datacenter.clone(),
            message: c.to_string(),
        })
        .collect();
    SourcesStatus {
        files: files
            .files
            .iter()
            .map(|(path, f)| {
                (
                    path.display().to_string(),
                    FileStatus {
                        in_force: f.in_force,
                        stale: f.in_force && !f.problems.is_empty(),
                        restored: f.restored.is_some(),
                        since: f.restored.as_ref().map(|r| utc(r.saved)),
                        last_good_copy: f.restored.as_ref().map(|r| r.copy.display().to_string()),
                        problems: f.problems.iter().map(|p| p.to_string()).collect(),
                    },
                )
            })
            .collect(),
        consul,
        merge_conflicts,
        unresolved: state
            .sources
            .unresolved
            .borrow()
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}

#[derive(Debug, Serialize)]
pub struct FileStatus {
    pub in_force: bool,
    /// The version in force is not the one on disk (which has `problems`): an earlier good one.
    pub stale: bool,
    /// The version in force is the copy an earlier run stored (`last_good_copy`, saved
    /// `since`), because the file has been broken since discovery started.
    pub restored: bool,
    pub since: Option<String>,
    pub last_good_copy: Option<String>,
    /// `file:line:col: message`.
    pub problems: Vec<String>,
}

/// Does blocking file I/O (the token file): call from the blocking pool.
pub fn status_of(state: &HttpState) -> Status {
    let snapshot = state.snapshots.borrow().clone();
    Status {
        snapshot: SnapshotStatus {
            generation: snapshot.generation,
            kind: snapshot.kind.as_str(),
            learned_unix_ms: snapshot.learned_at.map(unix_ms),
            built_unix_ms: unix_ms(snapshot.built_at),
        },
        sources: sources_status(state),
        proxies: state.connections.list(),
        nodes: state.nodes.borrow().as_ref().clone(),
        ca: state.ca.as_deref().map(ca_status),
        store: state
            .store
            .as_deref()
            .map(crate::store::SharedStore::status),
    }
}

/// Reads of `/v1/...` need the rules API's token when its reads do: the refusal, if any.
fn refused_read(
    state: &HttpState,
    headers: &axum::http::HeaderMap,
) -> Option<axum::response::Response> {
    let api = state.api.as_ref()?;
    api.authorize(headers, false)
        .err()
        .map(IntoResponse::into_response)
}

/// `GET /v1/proxies`: `{"items": [...]}`, see [`crate::proxy_status`]. Reads need the rules
/// API's token when its reads do.
async fn proxies(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if let Some(refused) = refused_read(&state, &headers) {
        return refused;
    }
    let catalog = Arc::clone(&state.snapshots.borrow().shared.catalog);
    let nodes = Arc::clone(&state.nodes.borrow());
    let items = crate::proxy_status::entries(
        state.connections.list(),
        state.connections.gone(),
        &catalog,
        &nodes,
    );
    Json(serde_json::json!({ "items": items })).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct ProxyConfigQuery {
    /// `clusters`, `endpoints`, `listeners`, `routes`, `secrets` or `all` (the default).
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Compare with what discovery sends instead of returning the dump.
    #[serde(default)]
    diff: bool,
}

/// `GET /v1/proxies/{node}/config[?type=clusters][&diff=true]`: what the node's Envoy holds
/// (its config dump, through its agent's stream; see [`crate::proxy_config`]), or with
/// `diff=true` how that differs from what discovery sends it:
/// `{"node", "flavour", "in_sync", "types": {"clusters": {"missing", "unexpected",
/// "not_active", "outdated"}, ...}}`. Reads need the rules API's token when its reads do.
async fn proxy_config(
    State(state): State<HttpState>,
    axum::extract::Path(node): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<ProxyConfigQuery>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use crate::proxy_config::{DumpError, TYPES};
    use axum::http::StatusCode;
    if let Some(refused) = refused_read(&state, &headers) {
        return refused;
    }
    let error = |code: StatusCode, message: String| {
        (code, Json(serde_json::json!({ "errors": [message] }))).into_response()
    };
    let types: Vec<&str> = match query.kind.as_deref() {
        None | Some("all") => TYPES.to_vec(),
        Some(t) if TYPES.contains(&t) => vec![t],
        Some(t) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("type={t}: expected one of all, {}", TYPES.join(", ")),
            )
        }
    };
    let dump = match state.dumps.dump(&node, &types).await {
        Ok(dump) => dump,
        Err(e @ DumpError::NotConnected(_)) => return error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ DumpError::Timeout(..)) => {
            return error(StatusCode::GATEWAY_TIMEOUT, e.to_string())
        }
        Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    if !query.diff {
        return Json(dump).into_response();
    }
    let Some((proxy, flavour)) = state.connections.proxy_of(&node) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("node {node} has no ADS stream open: nothing to compare with"),
        );
    };
    let intended = state.snapshots.borrow().shared.for_proxy(&proxy);
    let mut diff = crate::proxy_config::diff(&intended, flavour, &dump);
    diff.retain(|t, _| types.contains(t));
    let in_sync = diff.values().all(crate::proxy_config::TypeDiff::is_empty);
    Json(serde_json::json!({
        "node": node,
        "flavour": flavour,
        "in_sync": in_sync,
        "types": diff,
    }))
    .into_response()
}

/// `GET /v1/services`: `{"items": [...]}`, see [`crate::service_list`]: the catalog after the
/// liveness stage, as the proxies get it. Reads need the rules API's token when its reads do.
async fn services(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if let Some(refused) = refused_read(&state, &headers) {
        return refused;
    }
    let snapshot = Arc::clone(&state.snapshots.borrow());
    let items = crate::service_list::entries(&snapshot.shared.catalog, snapshot.shared.vips());
    Json(serde_json::json!({ "items": items })).into_response()
}

async fn status(State(state): State<HttpState>) -> axum::response::Response {
    match tokio::task::spawn_blocking(move || status_of(&state)).await {
        Ok(status) => Json(status).into_response(),
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use pilotfish_registries::files::{FileState, Problem};

    use super::*;
    use crate::resources::CLUSTER;
    use crate::xds::connections::StreamKind;
    use crate::xds::Event;

    fn state() -> (HttpState, watch::Sender<Arc<FilesStatus>>) {
        let mut files = FilesStatus::default();
        files.files.insert(
            PathBuf::from("/r/services.toml"),
            FileState {
                in_force: true,
                problems: vec![Problem::new(
                    "/r/services.toml",
                    3,
                    7,
                    "services.reviews.port",
                    "expected a number",
                )],
                restored: Some(pilotfish_registries::files::Restored {
                    copy: PathBuf::from(
                        "/var/lib/pilotfish/discovery/last-good/files/services-0.toml",
                    ),
                    saved: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
                }),
            },
        );
        let (files_tx, files_rx) = watch::channel(Arc::new(files));
        let (_snap_tx, snapshots) = watch::channel(Arc::new(MeshSnapshot::placeholder()));
        let state = HttpState {
            dumps: Default::default(),
            files: files_rx,
            snapshots,
            connections: Connections::default(),
            nodes: watch::channel(Arc::new(Vec::new())).1,
            api: None,
            ca: None,
            sources: SourcesView::files_only(),
            xds_metrics: Arc::new(XdsMetrics::default()),
            ca_metrics: Arc::new(CaMetrics::default()),
            mesh_metrics: MeshMetrics::default(),
            sources_metrics: SourcesMetrics::default(),
            store: None,
        };
        (state, files_tx)
    }

    #[test]
    fn status_shows_problems_as_file_line_col_and_proxies() {
        let (state, _keep) = state();
        let guard = state.connections.register("vm-a", StreamKind::Sotw);
        guard.record(&Event::Nack {
            type_url: CLUSTER.into(),
            version: "".into(),
            nonce: "1".into(),
            message: "bad".into(),
        });
        let json = serde_json::to_value(status_of(&state)).expect("serializes");
        assert_eq!(
            json["sources"]["files"]["/r/services.toml"]["problems"][0],
            "/r/services.toml:3:7: services.reviews.port: expected a number"
        );
        let file = &json["sources"]["files"]["/r/services.toml"];
        assert_eq!(file["stale"], true);
        assert_eq!(file["restored"], true);
        assert_eq!(file["since"], "2023-11-14T22:13:20Z");
        assert_eq!(
            file["last_good_copy"],
            "/var/lib/pilotfish/discovery/last-good/files/services-0.toml"
        );
        assert_eq!(json["snapshot"]["generation"], 0);
        assert_eq!(json["proxies"][0]["node"], "vm-a");
        assert_eq!(json["proxies"][0]["stream"], "sotw");
        assert_eq!(json["proxies"][0]["types"]["cds"]["nacks"], 1);
        assert_eq!(json["proxies"][0]["types"]["cds"]["last_nack"], "bad");
    }

    #[test]
    fn metrics_text() {
        let (mut state, _keep) = state();
        let _guard = state.connections.register("vm-a", StreamKind::Delta);
        state.ca_metrics.refused("ads", "no_certificate");
        state.ca_metrics.signed(
            crate::identity::metrics::Kind::Service,
            std::time::Duration::from_millis(3),
        );
        let mut timer = crate::xds::metrics::StreamTimer::default();
        let learned = Some(tokio::time::Instant::now());
        state.xds_metrics.record(
            &Event::Pushed {
                type_url: CLUSTER.into(),
                version: "v".into(),
                resources: 1,
            },
            &mut timer,
            learned,
        );
        state.xds_metrics.record(
            &Event::Ack {
                type_url: CLUSTER.into(),
                version: "v".into(),
                nonce: "1".into(),
            },
            &mut timer,
            learned,
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let api = crate::rules_api::RulesApi::new(
            dir.path().to_path_buf(),
            vec![dir.path().to_path_buf()],
            crate::rules_api::Access::Open,
        )
        .expect("api");
        api.metrics().write(
            crate::rules_api::Kind::Routes,
            axum::http::StatusCode::CONFLICT,
        );
        state.api = Some(Arc::new(api));
        let text = metrics::render(&state);
        for line in [
            "# TYPE pilotfish_xds_pushes_total counter",
            "# TYPE pilotfish_xds_convergence_seconds histogram",
            "pilotfish_xds_convergence_seconds_count{type=\"cds\"} 1",
            "pilotfish_xds_push_seconds_count{type=\"cds\"} 1",
            "pilotfish_xds_push_seconds_count{type=\"lds\"} 0",
            "pilotfish_ca_sign_seconds_count{kind=\"service\"} 1",
            "pilotfish_ca_sign_seconds_bucket{kind=\"service\",le=\"0.0025\"} 0",
            "pilotfish_ca_sign_seconds_bucket{kind=\"service\",le=\"0.005\"} 1",
            "pilotfish_snapshot_build_seconds_count{kind=\"full\"} 0",
            "pilotfish_rules_api_writes_total{kind=\"routes\",outcome=\"conflict\"} 1",
            "pilotfish_xds_connected_proxies 1",
            "pilotfish_xds_pushes_total{type=\"cds\"} 1",
            "pilotfish_xds_pushes_total{type=\"eds\"} 0",
            "pilotfish_xds_nacks_total 0",
            "pilotfish_registry_file_problems 1",
            "pilotfish_registry_files_restored 1",
            "pilotfish_snapshot_generation 0",
            "pilotfish_ca_certificates_issued_total{kind=\"node\"} 0",
            "pilotfish_ca_refusals_total{call=\"ads\",reason=\"no_certificate\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line} in:\n{text}"
            );
        }
        // A real parser accepts it, and its linter finds nothing (names, units, help texts).
        assert_eq!(
            crate::metrics::debian::promtool_check(&text),
            (0, String::new()),
            "promtool on:\n{text}"
        );
    }

    #[test]
    fn consul_status_and_metrics_per_datacenter() {
        use pilotfish_registries::consul::{ConsulStatus, DatacenterStatus, RejectedEntry};
        use pilotfish_registries::merge::MergeConflict;
        use pilotfish_registries::model::Origin;

        let (mut state, _keep) = state();
        let mut consul = ConsulStatus::default();
        consul.datacenters.insert(
            "dc1".into(),
            DatacenterStatus {
                synced: true,
                last_sync: Some(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
                ),
                index: 42,
                stale: true,
                last_error: Some("Consul is rate limiting (429 )".into()),
                errors_total: 3,
                requests_total: 10,
                services: 2,
                instances: 5,
                rejected: vec![RejectedEntry {
                    datacenter: "dc1".into(),
                    service: "web".into(),
                    node: "n1".into(),
                    service_id: "web-1".into(),
                    reason: "port 0".into(),
                }],
                ..DatacenterStatus::default()
            },
        );
        consul.datacenters.insert(
            "dc2".into(),
            DatacenterStatus {
                stale: true,
                restored_since: Some(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
                ),
                last_error: Some("Consul at http://127.0.0.1:8500 unreachable".into()),
                ..DatacenterStatus::default()
            },
        );
        // Label values are escaped: a quote, a backslash and a newline stay inside the label.
        consul
            .datacenters
            .insert("we\"ird\\dc\n".into(), DatacenterStatus::default());
        let (_status_tx, status) = watch::channel(Arc::new(consul));
        let (_conflicts_tx, conflicts) = watch::channel(Arc::new(vec![MergeConflict {
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 80,
            toml: Origin {
                file: "/r/web.toml".into(),
                line: 3,
            },
            consul_datacenter: Some("dc1".into()),
        }]));
        state.sources = SourcesView {
            consul: Some(crate::sources::ConsulView {
                address: "http://127.0.0.1:8500".into(),
                token_file: Some(PathBuf::from("/etc/pilotfish/consul-token")),
                status,
            }),
            conflicts,
            unresolved: watch::channel(Arc::new(vec![
                pilotfish_registries::references::Unresolved {
                    origin: Origin {
                        file: "/r/app.toml".into(),
                        line: 1,
                    },
                    field: "services.app.upstreams[0]".into(),
                    service: "web2".into(),
                },
            ]))
            .1,
        };
        let json = serde_json::to_value(status_of(&state)).expect("serializes");
        assert_eq!(
            json["sources"]["unresolved"][0],
            "/r/app.toml:1: services.app.upstreams[0]: unknown service \"web2\" (no file or Consul datacenter declares it yet)"
        );
        let dc1 = &json["sources"]["consul"]["datacenters"]["dc1"];
        assert_eq!(json["sources"]["consul"]["stale"], true);
        assert_eq!(dc1["index"], 42);
        assert_eq!(dc1["last_sync"], "2023-11-14T22:13:20Z");
        assert_eq!(dc1["errors_total"], 3);
        assert_eq!(dc1["rejected"][0]["reason"], "port 0");
        assert_eq!(dc1["restored"], false);
        assert_eq!(dc1["since"], serde_json::Value::Null);
        let dc2 = &json["sources"]["consul"]["datacenters"]["dc2"];
        assert_eq!(
            (&dc2["stale"], &dc2["restored"]),
            (&true.into(), &true.into())
        );
        assert_eq!(dc2["since"], "2023-11-14T22:13:20Z");
        assert_eq!(
            json["sources"]["merge_conflicts"][0]["toml"],
            "/r/web.toml:3"
        );
        let observe = state.sources_metrics.consul_observer();
        observe("dc1", "checks", std::time::Duration::from_secs(2));
        let text = metrics::render(&state);
        for line in [
            "pilotfish_consul_stale{dc=\"dc1\"} 1",
            "pilotfish_consul_restored{dc=\"dc1\"} 0",
            "pilotfish_consul_restored{dc=\"dc2\"} 1",
            "pilotfish_consul_last_sync_timestamp_seconds{dc=\"dc1\"} 1700000000",
            "pilotfish_consul_errors_total{dc=\"dc1\"} 3",
            "pilotfish_consul_requests_total{dc=\"dc1\"} 10",
            "pilotfish_consul_rejected_entries{dc=\"dc1\"} 1",
            "pilotfish_consul_stale{dc=\"we\\\"ird\\\\dc\\n\"} 0",
            "pilotfish_consul_poll_seconds_count{dc=\"dc1\",request=\"checks\"} 1",
            "pilotfish_consul_poll_seconds_bucket{dc=\"dc1\",request=\"checks\",le=\"1\"} 0",
            "pilotfish_consul_poll_seconds_bucket{dc=\"dc1\",request=\"checks\",le=\"2.5\"} 1",
            "pilotfish_registry_merge_conflicts 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line} in:\n{text}"
            );
        }
        assert_eq!(
            crate::metrics::debian::promtool_check(&text),
            (0, String::new()),
            "promtool on:\n{text}"
        );
    }

    #[tokio::test]
    async fn routes_services_and_the_console() {
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let (state, _keep) = state();
        let get = |path: &str| {
            HttpServer::router(state.clone()).oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .expect("request"),
            )
        };
        let response = get("/v1/services").await.expect("infallible");
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        let body = response.into_body().collect().await.expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body.to_bytes()).expect("json");
        assert_eq!(json, serde_json::json!({ "items": [] }));
        let page = get("/ui/").await.expect("infallible");
        assert_eq!(page.status(), axum::http::StatusCode::OK);
        assert_eq!(page.headers()[header::CACHE_CONTROL], "no-store");
        let redirect = get("/ui?token=t").await.expect("infallible");
        assert_eq!(redirect.headers()[header::LOCATION], "/ui/?token=t");
        let scrape = get("/metrics").await.expect("infallible");
        assert_eq!(
            scrape.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let body = scrape.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8(body.to_vec()).expect("utf-8");
        assert!(
            text.contains("\npilotfish_registry_file_problems 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn serves_healthz_over_tcp() {
        let (state, _keep) = state();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(HttpServer::new(state).run(listener, shutdown.clone()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("ok"), "{reply}");
        shutdown.cancel();
        server.await.expect("joins").expect("serves");
    }
}
