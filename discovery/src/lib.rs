//! Pilotfish discovery: builds the mesh snapshot from the registries, translates it into Envoy
//! resources per proxy, and serves them over ADS.
//!
//! [`run`] wires the parts: the file registry (and, when configured, the Consul adapter,
//! merged in by [`sources::Combiner`]) publishes catalogs -> the [`mesh::Debouncer`] turns
//! bursts into one [`mesh::MeshSnapshot`] -> the [`xds::server::AdsServer`] streams per-proxy
//! resources; the [`http::HttpServer`] reports on all of them.
//!
//! Unless `insecure`, the gRPC port is TLS and also serves the identity service: the
//! [`identity::Authority`] (the mesh CA) issues node certificates to hosts that enrol with a
//! join token and workload certificates for the services placed on them, and every ADS stream
//! is bound to the node of its client certificate. [`admin`] holds the operator commands
//! (`token ...`, `ca ...`).

pub mod admin;
pub mod config;
pub mod console;
pub mod drain;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod liveness;
pub mod mesh;
pub mod metrics;
pub mod proxy;
pub mod proxy_config;
pub mod proxy_status;
pub mod resources;
pub mod rules_api;
pub mod service_list;
pub mod sources;
pub mod store;
pub mod translate;
pub mod xds;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use pilotfish_pki::TokenStore;
use pilotfish_registries::consul::{ConsulError, ConsulRegistry, ConsulStatus};
use pilotfish_registries::files::{load_once_with, FileRegistry, FilesError, FilesStatus};
use pilotfish_registries::last_good::LastGoodStore;
use pilotfish_registries::model::Catalog;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::http::{HttpServer, HttpState};
use crate::identity::metrics::CaMetrics;
use crate::identity::service::IdentityService;
use crate::identity::{Authority, IdentityError};
use crate::liveness::LivenessStage;
use crate::mesh::{Debouncer, MeshMetrics, MeshSnapshot};
use crate::sources::metrics::SourcesMetrics;
use crate::sources::{Combiner, ConsulView, SourcesView, CONSUL_FIRST_SYNC_WAIT};
use crate::store::{SharedStore, TOKENS_KEY};
use crate::xds::connections::Connections;
use crate::xds::metrics::XdsMetrics;
use crate::xds::server::{AdsOptions, AdsServer};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the file registry failed")]
    Registry(#[source] FilesError),
    #[error("the Consul registry failed")]
    Consul(#[source] ConsulError),
    #[error("the ADS server failed")]
    Ads(#[source] tonic::transport::Error),
    #[error("the CA could not be set up")]
    Identity(#[source] IdentityError),
    #[error("the HTTP server failed")]
    Http(#[source] std::io::Error),
    #[error("the rules API could not be set up")]
    RulesApi(#[source] rules_api::RulesApiError),
    #[error("a discovery task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("the shared store ([store.consul]) could not be set up")]
    Store(#[source] ConsulError),
    #[error("cannot keep this replica's name in state_dir/replica-id")]
    StoreId(#[source] std::io::Error),
}

/// How long a starting replica waits for its first copy of the shared store before serving
/// what its `state_dir` holds.
const STORE_SYNC_WAIT: Duration = Duration::from_secs(10);

/// Runs discovery on the given listeners until `shutdown` is cancelled or a part fails; then
/// stops every part and waits for it. Each part is expected to run until shutdown, so one that
/// ends early stops the others too.
pub async fn run(
    config: Config,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    if config.insecure {
        warn!(
            grpc = %config.grpc,
            "INSECURE MODE: xDS is served in plaintext with no authentication; any host that \
             reaches this port can read the mesh configuration. Local experiments only."
        );
    }
    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();
    // [store.consul]: mirror the shared state into state_dir before anything reads it.
    let shared_store = match &config.store {
        None => None,
        Some(store_config) => {
            let store =
                SharedStore::new(store_config, &config.state_dir).map_err(RunError::Store)?;
            let (synced_tx, synced) = tokio::sync::oneshot::channel();
            let (s, token) = (store.clone(), stop.clone());
            tasks.spawn(async move {
                s.run(token, Some(synced_tx)).await;
                Ok(())
            });
            if tokio::time::timeout(STORE_SYNC_WAIT, synced).await.is_err() {
                warn!(
                    consul = store.address(),
                    "the shared store did not answer in time; serving this replica's copy"
                );
            }
            Some(store)
        }
    };
    let ca_metrics = Arc::new(CaMetrics::default());
    let authority = if config.insecure {
        None
    } else {
        let (cfg, m) = (config.clone(), ca_metrics.clone());
        let authority = tokio::task::spawn_blocking(move || Authority::load(&cfg, m))
            .await
            .map_err(RunError::Task)?
            .map_err(RunError::Identity)?;
        let authority = match &shared_store {
            Some(store) => authority.with_tokens(TokenStore::shared(store.document(TOKENS_KEY))),
            None => authority,
        };
        let authority = Arc::new(authority);
        if let Some(store) = &shared_store {
            let (s, a, token) = (store.clone(), authority.clone(), stop.clone());
            tasks.spawn(async move {
                crate::store::share_crls(s, a, token).await;
                Ok(())
            });
            let (s, a, token) = (store.clone(), authority.clone(), stop.clone());
            tasks.spawn(async move {
                crate::store::share_roots(s, a, token).await;
                Ok(())
            });
        }
        Some(authority)
    };

    // Load the files once before serving, so the first snapshot is the real catalog rather
    // than an empty one that would make reconnecting proxies drop their config (a file broken
    // now counts with its stored last good version). The registry loads them again as it
    // starts watching, and logs any problems then.
    // The rules API writes into its own directory (state_dir/rules.d), which the file registry
    // watches with the configured paths: an accepted API write is pushed like a file edit.
    let cfg = config.clone();
    let rules_api = tokio::task::spawn_blocking(move || rules_api::RulesApi::from_config(&cfg))
        .await
        .map_err(RunError::Task)?
        .map_err(RunError::RulesApi)?;
    let rules_api = match &shared_store {
        Some(store) => rules_api.with_store(store.clone()),
        None => rules_api,
    };
    let registry_paths = rules_api.registry_paths().to_vec();
    // The last good registry files and Consul catalogs, so that a restart never shrinks the
    // mesh: a file broken now, or a Consul not reachable now, is served from there (stale).
    let last_good = LastGoodStore::in_state_dir(&config.state_dir);
    let paths = registry_paths.clone();
    let store = last_good.clone();
    let (catalog, _problems) =
        tokio::task::spawn_blocking(move || load_once_with(&paths, Some(&store)))
            .await
            .map_err(RunError::Task)?;
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(catalog));
    let sources_metrics = SourcesMetrics::default();
    // With Consul, everything downstream (debouncer, CA) reads the merge of both sources.
    let (catalog_rx, sources_view, combiner) = match &config.consul {
        None => (catalog_rx, SourcesView::files_only(), None),
        Some(consul) => {
            let registry = ConsulRegistry::new(consul.clone())
                .map_err(RunError::Consul)?
                .with_last_good(last_good.clone())
                .with_request_observer(sources_metrics.consul_observer());
            let (consul_tx, consul_rx) = watch::channel(Arc::new(Catalog::default()));
            let (status_tx, mut status_rx) = watch::channel(Arc::new(ConsulStatus::default()));
            let token = stop.clone();
            tasks.spawn(async move {
                registry
                    .run(consul_tx, status_tx, token)
                    .await
                    .map_err(RunError::Consul)
            });
            info!(address = %consul.address, datacenters = ?consul.datacenters, "reading the Consul catalog");
            if !sources::wait_first_sync(&mut status_rx, CONSUL_FIRST_SYNC_WAIT, &stop).await {
                warn!(
                    waited = ?CONSUL_FIRST_SYNC_WAIT,
                    "Consul is not fully read yet; starting with the TOML registry and the \
                     datacenters read so far (see /status sources.consul)"
                );
            }
            let (combiner, merged_rx, conflicts_rx) = Combiner::new(catalog_rx, consul_rx);
            let view = SourcesView {
                consul: Some(ConsulView {
                    address: consul.address.clone(),
                    token_file: consul.token_file.clone(),
                    status: status_rx,
                }),
                conflicts: conflicts_rx,
                unresolved: watch::channel(Arc::new(Vec::new())).1,
            };
            (merged_rx, view, Some(combiner))
        }
    };
    let mut sources_view = sources_view;
    let (unresolved_tx, unresolved_rx) = watch::channel(Arc::new(Vec::new()));
    sources_view.unresolved = unresolved_rx;
    let (catalogs, token) = (catalog_rx.clone(), stop.clone());
    tasks.spawn(async move {
        sources::report_unresolved(catalogs, unresolved_tx, token).await;
        Ok(())
    });
    let (status_tx, status_rx) = watch::channel(Arc::new(FilesStatus::default()));
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(MeshSnapshot::placeholder()));
    let first_snapshot = snapshot_rx.clone();
    let connections = Connections::default();
    let xds_metrics = Arc::new(XdsMetrics::default());
    let mesh_metrics = MeshMetrics::default();

    let registry = FileRegistry::new(registry_paths).with_last_good(last_good);
    let identity = authority
        .as_ref()
        .map(|a| IdentityService::new(a.clone(), catalog_rx.clone()));
    let settings = Arc::new(translate::Settings {
        trust_domain: config.trust_domain.to_string(),
        mtls: !config.insecure,
        vip_range: config.vip_range,
    });
    // Host liveness: dead hosts' instances become unhealthy before translation. Revoked nodes
    // are never alive.
    // The nodes cut off by `pilotfish-discovery node revoke` (none in insecure mode).
    let (_no_revocations, none_revoked) = watch::channel(Arc::new(BTreeSet::<String>::new()));
    let revoked_rx = authority
        .as_ref()
        .map_or(none_revoked, |a| a.revoker().revoked_nodes());
    let drains = drain::Drains::default();
    let (liveness, live_catalog_rx, nodes_rx) = LivenessStage::new(
        catalog_rx.clone(),
        connections.clone(),
        revoked_rx,
        drains.clone(),
        config.node_grace,
    );
    // With several replicas, a host connected to another one is alive too, and one leaving
    // through another one is leaving here too.
    let (liveness, remote) = match &shared_store {
        None => (liveness, None),
        Some(store) => {
            let (remote_tx, remote_rx) = watch::channel(Arc::default());
            let sharing = store::liveness::Sharing {
                store: store.clone(),
                connections: connections.clone(),
                drains: drains.clone(),
                snapshots: snapshot_rx.clone(),
                id: store::liveness::replica_id(&config.state_dir).map_err(RunError::StoreId)?,
            };
            let token = stop.clone();
            tasks.spawn(async move {
                store::liveness::share_liveness(sharing, remote_tx, token).await;
                Ok(())
            });
            (liveness.with_remote(remote_rx.clone()), Some(remote_rx))
        }
    };
    let token = stop.clone();
    tasks.spawn(async move {
        liveness.run(token).await;
        Ok(())
    });
    let debouncer = Debouncer::new(live_catalog_rx, snapshot_tx, config.debounce)
        .with_settings(settings)
        .with_metrics(mesh_metrics.clone());
    let ads = AdsServer::new(
        snapshot_rx.clone(),
        connections.clone(),
        xds_metrics.clone(),
        AdsOptions {
            control_plane: control_plane_identifier(),
            auth: authority.as_ref().map(|a| a.peer_auth()),
            max_stream_age: config.max_stream_age,
            ..AdsOptions::default()
        },
    );
    let dumps = proxy_config::DumpHub::default();
    let proxy_debug = proxy_config::HostService::new(
        dumps.clone(),
        authority.as_ref().map(|a| a.peer_auth()),
        stop.clone(),
    )
    .with_leaving(proxy_config::Leaving {
        drains,
        snapshots: snapshot_rx.clone(),
        connections: connections.clone(),
        remote,
    });
    let rules_api = Arc::new(rules_api.with_catalog(catalog_rx.clone()));
    let http = HttpServer::new(HttpState {
        dumps,
        files: status_rx,
        snapshots: snapshot_rx,
        connections,
        nodes: nodes_rx,
        ca: authority.clone(),
        sources: sources_view,
        api: Some(rules_api.clone()),
        xds_metrics,
        ca_metrics,
        mesh_metrics,
        sources_metrics,
        store: shared_store,
    })
    .with_rules(rules_api.clone().router());
    info!(grpc = %config.grpc, http = %config.http, "discovery starting");

    if let Some(combiner) = combiner {
        let token = stop.clone();
        tasks.spawn(async move {
            combiner.run(token).await;
            Ok(())
        });
    }
    let token = stop.clone();
    tasks.spawn(async move {
        registry
            .run(catalog_tx, status_tx, token)
            .await
            .map_err(RunError::Registry)
    });
    let token = stop.clone();
    tasks.spawn(async move {
        debouncer.run(token).await;
        Ok(())
    });
    let token = stop.clone();
    match (authority.clone(), identity) {
        (Some(authority), Some(identity)) => {
            let token_poll = stop.clone();
            let revoker = Arc::clone(authority.revoker());
            let ca_source = Arc::clone(&authority);
            tasks.spawn(async move {
                revoker.run(move || ca_source.ca(), token_poll).await;
                Ok(())
            });
            let tls = authority.tls();
            tasks.spawn(async move {
                grpc::serve_tls(ads, proxy_debug, identity, tls, grpc_listener, token)
                    .await
                    .map_err(RunError::Ads)
            });
            let token = stop.clone();
            tasks.spawn(async move {
                authority.run(token).await;
                Ok(())
            });
        }
        _ => {
            tasks.spawn(async move {
                grpc::serve_plain(ads, proxy_debug, grpc_listener, token)
                    .await
                    .map_err(RunError::Ads)
            });
        }
    }
    let token = stop.clone();
    tasks.spawn(async move {
        reload_on_sighup(authority, token).await;
        Ok(())
    });
    let token = stop.clone();
    tasks.spawn(async move { http.run(http_listener, token).await.map_err(RunError::Http) });
    // systemd (Type=notify): READY=1 once the first snapshot is built (the listeners are bound
    // already), watchdog pings from this runtime until every part has stopped, STOPPING=1.
    // Joined after the parts, so it pings while they drain.
    let drained = CancellationToken::new();
    let systemd = tokio::spawn(talk_to_systemd(
        first_snapshot,
        stop.clone(),
        drained.clone(),
    ));

    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(RunError::Task).and_then(|r| r);
        if let Err(e) = outcome {
            error!(error = %error_chain(&e), "stopping discovery");
            if result.is_ok() {
                result = Err(e);
            }
        } else if !stop.is_cancelled() {
            warn!("a discovery task ended before shutdown; stopping discovery");
        }
        stop.cancel();
    }
    drained.cancel();
    let _ = systemd.await;
    info!("discovery stopped");
    result
}

async fn talk_to_systemd(
    mut snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    stop: CancellationToken,
    drained: CancellationToken,
) {
    let built = async move {
        // A closed channel means discovery is stopping; STOPPING=1 comes from `stop` then.
        if snapshots.wait_for(|s| s.generation > 0).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    pilotfish_systemd::converse(built, "serving", stop, drained).await;
}

/// Reloads the CA on every SIGHUP until `shutdown` (root rotation: `ca prepare-rotation`,
/// `ca switch` and `ca retire` change files; the signal makes them take effect).
async fn reload_on_sighup(authority: Option<Arc<Authority>>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGHUP; restart discovery to reload the CA");
            shutdown.cancelled().await;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hup.recv() => if got.is_none() {
                shutdown.cancelled().await;
                return;
            },
        }
        match &authority {
            Some(a) => {
                info!("SIGHUP: reloading the CA");
                // `systemctl reload` shows the unit reloading until the CA files are read.
                pilotfish_systemd::reloading();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = a.request_reload() => pilotfish_systemd::ready("serving"),
                }
            }
            None => warn!("SIGHUP: insecure mode has no CA to reload"),
        }
    }
}

/// `control_plane.identifier` in responses: which discovery replica answered.
fn control_plane_identifier() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("pilotfish-discovery@{host}")
}

/// An error and its sources, `: `-separated, for one log line. A source whose text is
/// already there (an error that prints its source too) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
