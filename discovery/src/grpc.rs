//! The gRPC port: ADS, the config-dump channel (`proxy-config`), and in secure mode the
//! identity service, on one listener.
//!
//! This module assembles the server so that neither `xds` nor `identity` needs the other:
//! `xds` offers its service ([`AdsServer::into_parts`]), `identity` offers TLS and its service,
//! and only this module knows both.

use std::sync::Arc;
use std::time::Duration;

use pilotfish_pki::wire::host::HostServer;
use pilotfish_pki::wire::IdentityServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::identity::service::IdentityService;
use crate::identity::tls::{self, ServerTls};
use crate::proxy_config::HostService;
use crate::xds::server::AdsServer;

/// Insecure mode: ADS in plaintext on `listener` until `shutdown`, then waits for every stream.
pub async fn serve_plain(
    ads: AdsServer,
    debug: HostService,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // Small responses (one assignment) must not wait for Nagle.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    serve(ads, debug, incoming, None, shutdown).await
}

/// ADS and the identity service over TLS on `listener` until `shutdown`, then waits for every
/// stream and handshake task.
pub async fn serve_tls(
    ads: AdsServer,
    debug: HostService,
    identity: IdentityService,
    tls: Arc<ServerTls>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let handshakes = TaskTracker::new();
    let incoming = tls::incoming(listener, tls, &handshakes, shutdown.clone());
    let result = serve(ads, debug, incoming, Some(identity), shutdown).await;
    handshakes.close();
    handshakes.wait().await;
    result
}

async fn serve<I, IO, IE>(
    ads: AdsServer,
    debug: HostService,
    incoming: I,
    identity: Option<IdentityService>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error>
where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parts = ads.into_parts(shutdown.clone());
    let mut routes: Routes = parts.routes.add_service(HostServer::new(debug));
    if let Some(identity) = identity {
        routes = routes.add_service(IdentityServer::new(
            identity.with_shutdown(shutdown.clone()),
        ));
    }
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_connection_age(parts.max_connection_age)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    parts.tasks.close();
    parts.tasks.wait().await;
    result
}
