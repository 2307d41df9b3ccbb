//! The SDS server Envoy reaches through the `pilotfish-sds` cluster: SotW `StreamSecrets` on a
//! Unix socket (`run_dir/sds.sock`, mode 0600; security checklist c.7). Delta and REST fetches
//! are not served.
//!
//! Secret names:
//!
//! - `service/<name>`: `tls_certificate` with the certificate chain and key of
//!   `spiffe://<td>/service/<name>`. Asking for one makes the identity manager get it from
//!   discovery; until it has one (or when discovery refuses: the service is not placed on this
//!   host) the name is not answered and Envoy keeps waiting.
//! - `node`: `tls_certificate` with the node certificate and key.
//! - `roots`: `validation_context` with the trust bundle as `trusted_ca`, and, once a node is
//!   revoked, discovery's CRL as `crl` (`only_verify_leaf_cert_crl`), so Envoy refuses the
//!   revoked node's certificates on the mesh port and as an upstream.
//!
//! Each stream runs a pure [`SdsStream`] (xDS checklist b.2-b.4): it answers a new request
//! with every requested secret it has, ignores requests with a stale nonce, records a NACK and
//! does not resend the rejected version, and pushes again only when the content of what was
//! requested changes. Versions are content hashes. Every new [`Identities`] snapshot is offered
//! to every open stream, which is how a renewed certificate or a new bundle reaches Envoy
//! without any listener or cluster update.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use super::{Credential, Identities, Wanted};

pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const NODE_SECRET: &str = "node";
pub const ROOTS_SECRET: &str = "roots";
pub const SERVICE_SECRET_PREFIX: &str = "service/";

/// Responses queued per stream before the sender waits for Envoy to read.
const RESPONSE_QUEUE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    #[error("SDS socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("SDS server: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// The service named by a `service/<name>` secret.
pub fn service_of(secret_name: &str) -> Option<&str> {
    secret_name
        .strip_prefix(SERVICE_SECRET_PREFIX)
        .filter(|s| !s.is_empty())
}

/// The secret called `name`, if the host holds it.
pub fn secret(name: &str, ids: &Identities) -> Option<Secret> {
    let tls = |c: &Credential| {
        secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&c.chain_pem)),
            private_key: Some(inline(&c.key_pem)),
            ..Default::default()
        })
    };
    let kind = match name {
        NODE_SECRET => tls(ids.node.as_ref()?),
        ROOTS_SECRET => secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(inline(ids.bundle_pem.as_ref()?)),
            // Only the leaf is checked: the CRL is the signing CA's, and a CRL set for any CA
            // of a chain otherwise makes Envoy demand one for every CA in it (intermediates,
            // the root), refusing every certificate.
            crl: ids.crl_pem.as_deref().map(inline),
            only_verify_leaf_cert_crl: ids.crl_pem.is_some(),
            ..Default::default()
        }),
        _ => tls(ids.services.get(service_of(name)?)?),
    };
    Some(Secret {
        name: name.to_owned(),
        r#type: Some(kind),
    })
}

fn inline(s: &str) -> DataSource {
    DataSource {
        specifier: Some(Specifier::InlineString(s.to_owned())),
        ..Default::default()
    }
}

/// What one SDS stream has asked for and been sent. No I/O.
#[derive(Debug, Default)]
pub struct SdsStream {
    requested: BTreeSet<String>,
    /// The nonce of the last response sent; `None` before the first.
    last_nonce: Option<String>,
    /// The version of the last response sent (whether ACKed, NACKed or in flight).
    sent_version: Option<String>,
    nonces: u64,
}

/// What to do with one request from Envoy.
#[derive(Debug, Default, PartialEq)]
pub struct Reply {
    pub response: Option<DiscoveryResponse>,
    /// Envoy rejected our last response with this message.
    pub nack: Option<String>,
    /// The request carried a nonce other than the last one sent, and was ignored.
    pub stale: bool,
}

impl SdsStream {
    pub fn requested(&self) -> &BTreeSet<String> {
        &self.requested
    }

    /// Handles a request from Envoy given what the host holds now.
    pub fn on_request(&mut self, req: &DiscoveryRequest, ids: &Identities) -> Reply {
        let mut reply = Reply::default();
        let initial = req.response_nonce.is_empty() || self.last_nonce.is_none();
        if !initial && self.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
            // b.3: a newer response is in flight; its ACK will carry the current names.
            reply.stale = true;
            return reply;
        }
        self.requested = req.resource_names.iter().cloned().collect();
        if let Some(status) = &req.error_detail {
            reply.nack = Some(status.message.clone());
        }
        // A new request gets everything requested; an ACK or NACK only what changed (new
        // names). A NACK with unchanged names leaves the rejected version unsent (b.2).
        reply.response = self.respond(ids, initial && reply.nack.is_none());
        reply
    }

    /// The host's identities changed: the response to push on this stream, if any requested
    /// secret changed.
    pub fn on_update(&mut self, ids: &Identities) -> Option<DiscoveryResponse> {
        if self.last_nonce.is_none() && self.requested.is_empty() {
            return None;
        }
        self.respond(ids, false)
    }

    fn respond(&mut self, ids: &Identities, force: bool) -> Option<DiscoveryResponse> {
        let secrets: Vec<Secret> = self
            .requested
            .iter()
            .filter_map(|name| secret(name, ids))
            .collect();
        if secrets.is_empty() {
            // Nothing requested is known yet: stay silent, Envoy waits (b.4: remember names).
            return None;
        }
        let resources: Vec<Any> = secrets
            .iter()
            .map(|s| Any {
                type_url: SECRET_TYPE_URL.to_owned(),
                value: s.encode_to_vec(),
            })
            .collect();
        let version = content_version(&resources);
        if !force && self.sent_version.as_deref() == Some(version.as_str()) {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        self.last_nonce = Some(nonce.clone());
        self.sent_version = Some(version.clone());
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
            ..Default::default()
        })
    }
}

/// A hash of the resources' bytes: the same content always has the same version.
fn content_version(resources: &[Any]) -> String {
    let mut h = Sha256::new();
    for r in resources {
        h.update((r.value.len() as u64).to_be_bytes());
        h.update(&r.value);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Binds the SDS socket, replacing a stale socket file, mode 0600 (only the agent's user, which
/// Envoy runs as, may connect).
pub fn bind(path: &Path) -> Result<UnixListener, SdsError> {
    crate::socket::bind_private(path).map_err(|source| SdsError::Socket {
        path: path.display().to_string(),
        source,
    })
}

/// The SDS server.
pub struct SdsServer {
    inner: Arc<Inner>,
}

struct Inner {
    identities: watch::Receiver<Arc<Identities>>,
    wanted: Arc<Wanted>,
    root: CancellationToken,
    tasks: TaskTracker,
}

impl SdsServer {
    pub fn new(identities: watch::Receiver<Arc<Identities>>, wanted: Arc<Wanted>) -> Self {
        SdsServer {
            inner: Arc::new(Inner {
                identities,
                wanted,
                root: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    pub async fn run(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), SdsError> {
        let inner = self.inner.clone();
        let result = tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(Service(inner.clone())))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                shutdown.cancelled().await;
                // Ends the open streams so the server can close.
                inner.root.cancel();
            })
            .await;
        self.inner.root.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        result.map_err(SdsError::Serve)
    }
}

struct Service(Arc<Inner>);

#[tonic::async_trait]
impl SecretDiscoveryService for Service {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "the agent serves SDS as state of the world (api_type GRPC)",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let inner = self.0.clone();
        let span = tracing::info_span!("sds_stream");
        self.0.tasks.spawn(
            serve_stream(
                request.into_inner(),
                tx,
                inner.identities.clone(),
                inner.wanted.clone(),
                inner.root.clone(),
            )
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("use StreamSecrets"))
    }
}

async fn serve_stream(
    mut requests: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    mut identities: watch::Receiver<Arc<Identities>>,
    wanted: Arc<Wanted>,
    shutdown: CancellationToken,
) {
    let mut stream = SdsStream::default();
    // Without a manager (insecure mode) nothing ever changes; keep answering requests.
    let mut watching = true;
    loop {
        let response = tokio::select! {
            _ = shutdown.cancelled() => return,
            req = requests.message() => {
                let req = match req {
                    Ok(Some(req)) => req,
                    Ok(None) => return,
                    Err(status) => {
                        debug!(%status, "SDS stream ended");
                        return;
                    }
                };
                if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
                    warn!(type_url = %req.type_url, "not a secret request; ignored");
                    continue;
                }
                for name in &req.resource_names {
                    match service_of(name) {
                        Some(service) => wanted.add(service),
                        None if name == NODE_SECRET || name == ROOTS_SECRET => {}
                        None => debug!(%name, "unknown secret name; it will not be answered"),
                    }
                }
                let ids = identities.borrow_and_update().clone();
                let reply = stream.on_request(&req, &ids);
                if let Some(message) = &reply.nack {
                    warn!(
                        version = %req.version_info,
                        nonce = %req.response_nonce,
                        %message,
                        "Envoy rejected secrets"
                    );
                }
                reply.response
            }
            changed = identities.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let ids = identities.borrow_and_update().clone();
                stream.on_update(&ids)
            }
        };
        if let Some(response) = response {
            info!(
                version = %response.version_info,
                secrets = ?stream.requested(),
                "sending secrets"
            );
            tokio::select! {
                r = tx.send(Ok(response)) => if r.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
#[path = "sds_tests.rs"]
mod tests;
