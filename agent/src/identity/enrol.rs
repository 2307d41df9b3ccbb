//! The agent's calls to discovery's identity service: `Enrol` (join token, server TLS only),
//! `Sign` (node certificate as client certificate), `Bundle`, and `WatchBundle` (kept open). Each call dials the
//! replicas in order over TLS and uses the first that answers; a refusal from discovery is
//! final for that call (another replica would say the same).

use std::time::Duration;

use pilotfish_pki::wire::{BundleRequest, EnrolRequest, IdentityClient, SignRequest};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::xds::upstream;

/// Deadline for one call, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no discovery replica reachable: {0}")]
    Unreachable(String),
    #[error("discovery refused ({code:?}): {message}", code = .0.code(), message = .0.message())]
    Refused(tonic::Status),
    #[error("timed out after {CALL_TIMEOUT:?}")]
    Timeout,
}

impl CallError {
    /// Discovery said no (as opposed to not answering).
    pub fn is_refusal(&self) -> bool {
        matches!(self, CallError::Refused(_))
    }

    /// Discovery refused because this host (or its certificate) is revoked.
    pub fn is_revoked(&self) -> bool {
        matches!(self, CallError::Refused(s) if pilotfish_pki::wire::is_revoked(s))
    }
}

/// A certificate discovery issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Leaf then intermediates, PEM: what TLS serves.
    pub chain_pem: String,
    /// Every root to trust, PEM.
    pub bundle_pem: String,
}

impl Grant {
    fn new(cert_pem: String, chain_pem: String, bundle_pem: String) -> Self {
        let mut chain = cert_pem;
        if !chain_pem.trim().is_empty() {
            if !chain.ends_with('\n') {
                chain.push('\n');
            }
            chain.push_str(&chain_pem);
        }
        Grant {
            chain_pem: chain,
            bundle_pem,
        }
    }
}

async fn client(
    addrs: &[String],
    tls: &ClientTlsConfig,
) -> Result<IdentityClient<Channel>, CallError> {
    let mut errors = Vec::new();
    for addr in addrs {
        match upstream::connect(addr, Some(tls.clone())).await {
            Ok(channel) => return Ok(IdentityClient::new(channel)),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(CallError::Unreachable(errors.join("; ")))
}

async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or(Err(CallError::Timeout))
}

/// First contact: trades the join token for a node certificate. `tls` carries no client
/// identity. The token goes only into the request, never into a log.
pub async fn enrol(
    addrs: &[String],
    tls: &ClientTlsConfig,
    token: &str,
    node: &str,
    csr_pem: String,
) -> Result<Grant, CallError> {
    timed(async {
        let mut c = client(addrs, tls).await?;
        let r = c
            .enrol(EnrolRequest {
                token: token.to_owned(),
                node: node.to_owned(),
                csr_pem,
            })
            .await
            .map_err(CallError::Refused)?
            .into_inner();
        Ok(Grant::new(r.cert_pem, r.chain_pem, r.bundle_pem))
    })
    .await
}

/// Renews the node certificate (`service` empty) or gets a service certificate; `tls` carries
/// the node certificate.
pub async fn sign(
    addrs: &[String],
    tls: &ClientTlsConfig,
    service: &str,
    csr_pem: String,
) -> Result<Grant, CallError> {
    timed(async {
        let mut c = client(addrs, tls).await?;
        let r = c
            .sign(SignRequest {
                csr_pem,
                service: service.to_owned(),
            })
            .await
            .map_err(CallError::Refused)?
            .into_inner();
        Ok(Grant::new(r.cert_pem, r.chain_pem, r.bundle_pem))
    })
    .await
}

/// Opens `WatchBundle`: the bundle and CRL now, then on every change. Only the connection is
/// bounded by [`CALL_TIMEOUT`]; the stream stays open.
pub async fn watch_bundle(
    addrs: &[String],
    tls: &ClientTlsConfig,
) -> Result<tonic::Streaming<pilotfish_pki::wire::BundleResponse>, CallError> {
    timed(async {
        let mut c = client(addrs, tls).await?;
        Ok(c.watch_bundle(BundleRequest {})
            .await
            .map_err(CallError::Refused)?
            .into_inner())
    })
    .await
}

/// The current trust bundle and CRL (a fallback for when the `WatchBundle` stream is stuck).
pub async fn bundle(
    addrs: &[String],
    tls: &ClientTlsConfig,
) -> Result<pilotfish_pki::wire::BundleResponse, CallError> {
    timed(async {
        let mut c = client(addrs, tls).await?;
        let r = c
            .bundle(BundleRequest {})
            .await
            .map_err(CallError::Refused)?
            .into_inner();
        Ok(r)
    })
    .await
}
