//! The `WatchBundle` stream, kept open beside the manager: discovery pushes the trust bundle
//! and its CRL on it whenever they change (a node revoked, the CA reloaded), and ends it with
//! PERMISSION_DENIED when this host is revoked. The watcher forwards both to the manager
//! ([`Pushed`]), which owns the state.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;
use tracing::debug;

use super::enrol;
use super::manager::RETRY_INITIAL;
use super::Identities;

/// Longest wait before reopening a failed `WatchBundle` stream.
const WATCH_RETRY_CAP: Duration = Duration::from_secs(30);

/// What the `WatchBundle` stream tells the manager.
#[derive(Debug)]
pub(super) enum Pushed {
    Bundle { bundle_pem: String, crl_pem: String },
    Revoked(String),
}

/// Keeps a `WatchBundle` stream open while the host holds a node certificate, and forwards
/// what discovery pushes. Reconnects with the new certificate when the node certificate
/// changes, and with backoff after a failure; a revocation is forwarded, then the watcher
/// waits for a new node certificate.
pub(super) async fn run(
    addrs: Vec<String>,
    mut identities: watch::Receiver<Arc<Identities>>,
    tls: watch::Receiver<Option<ClientTlsConfig>>,
    tx: mpsc::Sender<Pushed>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        // The node certificate the stream is opened with; `None` until enrolled.
        let node = identities
            .borrow_and_update()
            .node
            .as_ref()
            .map(|n| n.chain_pem.clone());
        let config = tls.borrow().clone();
        let (Some(node), Some(config)) = (node, config) else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = identities.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let stream = async {
            let mut stream = enrol::watch_bundle(&addrs, &config).await?;
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        let pushed = Pushed::Bundle {
                            bundle_pem: m.bundle_pem,
                            crl_pem: m.crl_pem,
                        };
                        if tx.send(pushed).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => {
                        return Err(enrol::CallError::Unreachable(
                            "discovery ended the bundle stream".into(),
                        ))
                    }
                    Err(status) => return Err(enrol::CallError::Refused(status)),
                }
            }
        };
        let node_changed = node_changed(&mut identities, &node);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = node_changed => continue,
            outcome = stream => outcome,
        };
        let wait = match outcome {
            Ok(()) => return,
            Err(e) if e.is_revoked() => {
                let _ = tx.send(Pushed::Revoked(e.to_string())).await;
                None
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = RETRY_INITIAL
                    .saturating_mul(1 << failures.min(5))
                    .min(WATCH_RETRY_CAP);
                debug!(error = %e, ?wait, "the bundle stream failed; reopening");
                Some(wait.mul_f64(rand::rng().random_range(0.5..=1.0)))
            }
        };
        // A revoked host waits for a new node certificate; otherwise back off, but reconnect
        // at once with a new certificate.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = node_changed_owned(identities.clone(), node) => failures = 0,
            _ = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Resolves when the node certificate is no longer `node` (or the channel closes).
async fn node_changed(identities: &mut watch::Receiver<Arc<Identities>>, node: &str) {
    loop {
        if identities.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = identities
            .borrow_and_update()
            .node
            .as_ref()
            .map(|n| n.chain_pem.clone());
        if now.as_deref() != Some(node) {
            return;
        }
    }
}

async fn node_changed_owned(mut identities: watch::Receiver<Arc<Identities>>, node: String) {
    let current = identities
        .borrow_and_update()
        .node
        .as_ref()
        .map(|n| n.chain_pem.clone());
    if current.as_deref() != Some(node.as_str()) {
        return;
    }
    node_changed(&mut identities, &node).await;
}
