//! Pilotfish agent: one per host. It writes Envoy's bootstrap, keeps Envoy running, relays
//! Envoy's ADS stream to discovery over a Unix socket (serving the last accepted config from
//! disk when discovery is unreachable), holds the host's identity (node and service
//! certificates, see [`identity`]) and serves it to Envoy over SDS, and reports health and
//! metrics.
//!
//! [`run`] wires the parts. The SDS server starts at once and serves the certificates stored in
//! `state_dir`; the identity manager enrols or renews in the background. In secure mode the
//! relay dials discovery only with the node certificate (until the host has one, Envoy is
//! served from the xDS cache, or waits). Envoy is drained and stopped first on shutdown; the xDS proxy,
//! health endpoint and cache writer keep running until it is gone, so Envoy keeps its xDS
//! stream and probes keep answering (503) while connections drain.

pub mod config;
pub mod dns;
pub mod envoy;
pub mod health;
pub mod host;
pub mod identity;
pub mod intercept;
pub mod notify;
pub mod socket;
pub mod status;
pub mod xds;

#[cfg(test)]
mod testutil;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::AgentConfig;
use envoy::admin::Admin;
use envoy::supervisor::Supervisor;
use health::Health;
use identity::manager::{IdentityError, IdentityManager, IdentitySettings};
use identity::sds::{SdsError, SdsServer};
use identity::{Identities, Wanted};
use intercept::Interceptor;
use status::AgentStatus;
use xds::proxy::{ProxyError, XdsProxy};
use xds::store::SharedCache;
use xds::upstream::{DialBackoff, Transport, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the Envoy bootstrap {}: {source}", path.display())]
    Bootstrap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Sds(#[from] SdsError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("health endpoint {addr}: {source}")]
    Health {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("[interception]: {0}")]
    Intercept(#[from] intercept::InterceptError),
    #[error("[dns]: {0}")]
    Dns(#[from] dns::DnsError),
}

enum Part {
    Supervisor,
    Proxy(Result<(), ProxyError>),
    Health(std::io::Result<()>),
    Sds(Result<(), SdsError>),
    Persist,
    Identity,
    ConfigDump,
    Leave,
    Systemd,
    Intercept,
    Dns(Result<(), dns::DnsError>),
}

/// Runs the agent until `shutdown` is cancelled (then drains Envoy and returns `Ok`) or a part
/// fails (then stops Envoy the same way and returns the error).
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    if config.insecure {
        warn!(
            discovery = ?config.discovery,
            "INSECURE: xDS to discovery is PLAINTEXT and UNAUTHENTICATED, and this host gets no \
             certificates; local experiments only, never on a real network"
        );
    }
    create_dir(&config.run_dir, 0o755)?;
    create_dir(&config.state_dir, 0o700)?;
    write_bootstrap(&config)?;
    let status = Arc::new(AgentStatus::default());
    let identity = if config.insecure {
        None
    } else {
        Some(IdentityManager::load(
            IdentitySettings::from_config(&config)?,
            status.clone(),
        )?)
    };
    let sds_listener = identity::sds::bind(&config.sds_socket())?;

    let cache = SharedCache::new(xds::store::load(&config.cache_path()).await);
    // Before anything else listens: a table a crashed agent left is replaced or removed.
    let interceptor = Interceptor::start(
        config.interception.clone(),
        intercept::Host {
            uid: intercept::own_uid()?,
            address: config.address,
            mesh_port: config.mesh_port,
        },
        cache.clone(),
        status.clone(),
    )
    .await?;
    let dns = match &config.dns {
        Some(dns) => Some(dns::bind(dns).await?),
        None => None,
    };
    let xds_listener = xds::proxy::bind(&config.xds_socket())?;
    let health_listener =
        TcpListener::bind(config.health)
            .await
            .map_err(|source| AgentError::Health {
                addr: config.health,
                source,
            })?;
    info!(
        node = %config.node,
        xds_socket = %config.xds_socket().display(),
        health = %config.health,
        admin = %config.envoy.admin,
        "agent starting"
    );

    // Stops the parts Envoy depends on, once Envoy is gone.
    let services = CancellationToken::new();
    let mut parts = JoinSet::new();
    let supervisor = Supervisor::new(&config, status.clone());
    // Envoy is stopped once discovery has drained this host (or could not be told).
    let envoy_stop = CancellationToken::new();
    let sd = envoy_stop.clone();
    parts.spawn(async move {
        supervisor.run(sd).await;
        Part::Supervisor
    });
    let (identities, wanted, transport) = match &identity {
        Some(m) => (m.identities(), m.wanted(), Transport::Tls(m.client_tls())),
        None => (
            tokio::sync::watch::channel(Arc::new(Identities::default())).1,
            Arc::new(Wanted::default()),
            Transport::Plaintext,
        ),
    };
    let sds = SdsServer::new(identities, wanted);
    let sd = services.clone();
    parts.spawn(async move { Part::Sds(sds.run(sds_listener, sd).await) });
    if let Some(manager) = identity {
        let sd = services.clone();
        parts.spawn(async move {
            manager.run(sd).await;
            Part::Identity
        });
    }
    let proxy = XdsProxy::new(
        Upstream::with_transport(
            xds::replicas::order(&config.node, &config.discovery),
            transport,
            DialBackoff::default(),
        ),
        cache.clone(),
        status.clone(),
    );
    let (relay, node, wait) = (
        proxy.relay_channel(),
        config.node.clone(),
        config.envoy.drain_time,
    );
    let token = shutdown.clone();
    parts.spawn(async move {
        token.cancelled().await;
        host::leave(&relay, &node, wait).await;
        envoy_stop.cancel();
        Part::Leave
    });
    let (relay, node, admin) = (
        proxy.relay_channel(),
        config.node.clone(),
        Admin::new(config.envoy.admin),
    );
    let sd = services.clone();
    parts.spawn(async move {
        host::run(relay, node, admin, sd).await;
        Part::ConfigDump
    });
    let sd = services.clone();
    parts.spawn(async move { Part::Proxy(proxy.run(xds_listener, sd).await) });
    let health = Health {
        status,
        admin: Admin::new(config.envoy.admin),
    };
    // systemd: READY=1 once Envoy serves, watchdog pings, STOPPING=1 (see notify.rs).
    let (probe, sd, done) = (health.clone(), shutdown.clone(), services.clone());
    parts.spawn(async move {
        notify::run(probe, sd, done).await;
        Part::Systemd
    });
    let sd = services.clone();
    parts.spawn(async move { Part::Health(health.run(health_listener, sd).await) });
    if let Some(dns) = dns {
        info!(listen = %dns.local_addr(), "mesh DNS serving");
        let (names, sd) = (interceptor.names(), services.clone());
        parts.spawn(async move { Part::Dns(dns.serve(names, sd).await) });
    }
    // Removes the table once Envoy is gone (`services` is cancelled after the supervisor).
    let sd = services.clone();
    parts.spawn(async move {
        interceptor.run(sd).await;
        Part::Intercept
    });
    let sd = services.clone();
    let cache_path = config.cache_path();
    parts.spawn(async move {
        xds::store::persist(cache, cache_path, sd).await;
        Part::Persist
    });

    let mut failure = None;
    while let Some(joined) = parts.join_next().await {
        let err = match joined {
            Ok(Part::Supervisor) => {
                services.cancel();
                continue;
            }
            Ok(Part::Proxy(Err(e))) => AgentError::Proxy(e),
            Ok(Part::Sds(Err(e))) => AgentError::Sds(e),
            Ok(Part::Dns(Err(e))) => AgentError::Dns(e),
            Ok(Part::Health(Err(source))) => AgentError::Health {
                addr: config.health,
                source,
            },
            Ok(_) => continue,
            Err(e) => {
                services.cancel();
                AgentError::Task(e)
            }
        };
        error!(error = %err, "agent part failed; shutting down");
        shutdown.cancel();
        failure.get_or_insert(err);
    }
    let _ = std::fs::remove_file(config.xds_socket());
    let _ = std::fs::remove_file(config.sds_socket());
    match failure {
        Some(e) => Err(e),
        None => {
            info!("agent stopped");
            Ok(())
        }
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| AgentError::Dir {
            path: path.to_path_buf(),
            source,
        })
}

fn write_bootstrap(config: &AgentConfig) -> Result<(), AgentError> {
    let path = config.bootstrap_path();
    let err = |source| AgentError::Bootstrap {
        path: path.clone(),
        source,
    };
    let doc = envoy::bootstrap::bootstrap(config, &config.xds_socket());
    let json = serde_json::to_vec_pretty(&doc).map_err(|e| err(e.into()))?;
    pilotfish_durable::write_atomic(&path, &json, pilotfish_durable::PUBLIC_MODE).map_err(err)
}
