//! Discovery's side of identity: the mesh CA, who a gRPC caller is, and the TLS of the gRPC
//! port.
//!
//! - [`Authority`] owns the [`Ca`] (loaded from `state_dir/ca` or the operator's `[ca]` files),
//!   the join token store, and discovery's own serving certificate. It re-issues that
//!   certificate at half life and reloads the CA on request (SIGHUP), swapping both into the
//!   port's TLS config ([`tls::ServerTls`]) so new connections see them at once.
//! - [`PeerAuth`] turns the TLS peer certificate of a call into the node it speaks for. The
//!   TLS layer accepts connections without a client certificate (so a host with only a join
//!   token can reach `Enrol`) but verifies any certificate it gets against the bundle; each
//!   method then requires what it needs.
//! - [`service::IdentityService`] is `pilotfish.identity.v1.Identity`: Enrol (join token), Sign,
//!   Bundle and WatchBundle (node certificate).
//! - [`revocation::Revoker`] keeps what `node revoke` cut off: `PeerAuth` refuses it and ends
//!   its streams, and the CRL goes to every agent with the bundle.
//!
//! Root rotation is a file change made by `pilotfish-discovery ca ...` (see `pilotfish_pki::ca`);
//! a SIGHUP makes the running discovery load it: new bundle for new handshakes and in every
//! response, new signing root, and a fresh serving certificate from it.

pub mod metrics;
pub mod revocation;
pub mod service;
pub mod tls;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pilotfish_pki::{Ca, CaError, CaOptions, LocalKey, Role, SpiffeId, TokenStore, TrustDomain};
use rustls_pki_types::CertificateDer;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};
use tracing::{error, info, warn};

use self::metrics::{CaMetrics, Refusal};
use self::revocation::{RevocationView, Revoker, RevokerError};
use self::tls::ServerTls;
use crate::config::Config;
use crate::error_chain;

/// Discovery's own key, next to `ca/` in the state directory.
pub const SERVER_KEY_FILE: &str = "discovery.key";
/// Discovery's serving certificate lives `workload_ttl`, but at least this long (seconds-long
/// workload TTLs are for tests; the serving certificate need not churn with them).
const MIN_SERVER_TTL: Duration = Duration::from_secs(3600);
/// How soon to retry a failed renewal of the serving certificate.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// The CA and the serving certificate could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("loading the CA")]
    Ca(#[from] CaError),
    #[error("discovery's key in {}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: pilotfish_pki::KeyError,
    },
    #[error("issuing discovery's serving certificate")]
    ServerCert(#[source] pilotfish_pki::CsrRejected),
    #[error("building the TLS configuration")]
    Tls(#[from] tls::TlsSetupError),
    #[error("a CA task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("loading the revocations")]
    Revocations(#[from] RevokerError),
}

/// The mesh CA as discovery runs it. Share it behind an `Arc`.
pub struct Authority {
    state_dir: PathBuf,
    trust_domain: TrustDomain,
    options: CaOptions,
    node_ttl: Duration,
    server_ttl: Duration,
    ca: RwLock<Arc<Ca>>,
    server_key: LocalKey,
    /// When the current serving certificate expires.
    server_not_after: RwLock<SystemTime>,
    tls: Arc<ServerTls>,
    tokens: TokenStore,
    revoker: Arc<Revoker>,
    metrics: Arc<CaMetrics>,
    reload: Notify,
    /// Counts reload attempts, so a SIGHUP can wait for its own.
    reloaded: watch::Sender<u64>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("state_dir", &self.state_dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads (or on first start creates) the CA and discovery's key, and issues the serving
    /// certificate. Blocking file I/O: call it from `spawn_blocking` in async code.
    pub fn load(config: &Config, metrics: Arc<CaMetrics>) -> Result<Authority, IdentityError> {
        let options = config.ca.options();
        let ca = Ca::load_or_create(&config.state_dir, &config.trust_domain, &options)?;
        let key_path = config.state_dir.join(SERVER_KEY_FILE);
        let server_key =
            LocalKey::load_or_generate(&key_path).map_err(|source| IdentityError::Key {
                path: key_path.clone(),
                source,
            })?;
        let server_ttl = config.ca.workload_ttl.max(MIN_SERVER_TTL);
        let (config_tls, not_after) = server_tls_config(&ca, &server_key, server_ttl)?;
        log_roots(&ca);
        let revoker = Arc::new(Revoker::load(&config.state_dir, &ca)?);
        Ok(Authority {
            state_dir: config.state_dir.clone(),
            trust_domain: config.trust_domain.clone(),
            options,
            node_ttl: config.ca.node_ttl,
            server_ttl,
            ca: RwLock::new(Arc::new(ca)),
            server_key,
            server_not_after: RwLock::new(not_after),
            tls: Arc::new(ServerTls::new(config_tls)),
            tokens: TokenStore::new(&config.state_dir),
            revoker,
            metrics,
            reload: Notify::new(),
            reloaded: watch::Sender::new(0),
        })
    }

    /// The CA as last loaded.
    pub fn ca(&self) -> Arc<Ca> {
        match self.ca.read() {
            Ok(ca) => Arc::clone(&ca),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// Join tokens from `tokens` (the replicas' shared store) instead of `state_dir`.
    pub fn with_tokens(mut self, tokens: TokenStore) -> Authority {
        self.tokens = tokens;
        self
    }

    /// Revoked nodes and certificates, and the CRL.
    pub fn revoker(&self) -> &Arc<Revoker> {
        &self.revoker
    }

    pub fn node_ttl(&self) -> Duration {
        self.node_ttl
    }

    pub fn metrics(&self) -> &Arc<CaMetrics> {
        &self.metrics
    }

    /// The gRPC port's TLS configuration, kept current by [`Authority::run`].
    pub fn tls(&self) -> Arc<ServerTls> {
        Arc::clone(&self.tls)
    }

    /// How callers' certificates are checked.
    pub fn peer_auth(&self) -> PeerAuth {
        PeerAuth {
            trust_domain: self.trust_domain.clone(),
            metrics: Arc::clone(&self.metrics),
            revocations: Some(self.revoker.subscribe()),
        }
    }

    /// Asks [`Authority::run`] to reload the CA files (SIGHUP) and waits until it has tried (it
    /// logs the outcome). Waits for ever once `run` has returned.
    pub async fn request_reload(&self) {
        let mut attempts = self.reloaded.subscribe();
        attempts.mark_unchanged();
        self.reload.notify_one();
        let _ = attempts.changed().await;
    }

    /// Re-reads the CA files and, if they load, makes them current: the new bundle for
    /// handshakes and responses, the new signer, and a serving certificate from it. On
    /// failure the CA in force stays. Blocking file I/O.
    pub fn reload(&self) -> Result<(), IdentityError> {
        let ca = Ca::load_or_create(&self.state_dir, &self.trust_domain, &self.options)?;
        let (config, not_after) = server_tls_config(&ca, &self.server_key, self.server_ttl)?;
        log_roots(&ca);
        let ca = Arc::new(ca);
        match self.ca.write() {
            Ok(mut slot) => *slot = Arc::clone(&ca),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&ca),
        }
        // After the swap: the new view wakes every WatchBundle stream, which then reads the
        // new bundle too.
        self.revoker.resign(&ca);
        self.set_server_cert(config, not_after);
        info!("reloaded the CA");
        Ok(())
    }

    /// Issues a fresh serving certificate from the current CA and puts it in force.
    pub fn renew_server_cert(&self) -> Result<(), IdentityError> {
        let (config, not_after) = server_tls_config(&self.ca(), &self.server_key, self.server_ttl)?;
        self.set_server_cert(config, not_after);
        Ok(())
    }

    fn set_server_cert(&self, config: rustls::ServerConfig, not_after: SystemTime) {
        self.tls.set(config);
        match self.server_not_after.write() {
            Ok(mut slot) => *slot = not_after,
            Err(poisoned) => *poisoned.into_inner() = not_after,
        }
    }

    /// How long until the serving certificate is half way through its life.
    fn renew_in(&self) -> Duration {
        let not_after = match self.server_not_after.read() {
            Ok(t) => *t,
            Err(poisoned) => *poisoned.into_inner(),
        };
        not_after
            .duration_since(SystemTime::now())
            .map(|left| left / 2)
            .unwrap_or(Duration::ZERO)
    }

    /// Renews the serving certificate at half life and reloads on request, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut wait = self.renew_in();
        loop {
            let reload = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => false,
                _ = self.reload.notified() => true,
            };
            let this = Arc::clone(&self);
            let done = tokio::task::spawn_blocking(move || {
                if reload {
                    this.reload()
                } else {
                    this.renew_server_cert()
                }
            })
            .await;
            if reload {
                self.reloaded.send_modify(|n| *n += 1);
            }
            wait = match done {
                Ok(Ok(())) => {
                    if !reload {
                        info!("renewed discovery's serving certificate");
                    }
                    self.renew_in()
                }
                Ok(Err(e)) if reload => {
                    error!(error = %error_chain(&e), "reloading the CA failed; the CA in force stays");
                    self.renew_in()
                }
                Ok(Err(e)) => {
                    error!(error = %error_chain(&e), "renewing discovery's serving certificate failed; retrying");
                    RENEW_RETRY
                }
                Err(e) => {
                    error!(error = %e, "a CA task failed");
                    RENEW_RETRY
                }
            };
        }
    }
}

/// A TLS config serving a fresh certificate for `spiffe://<td>/discovery` (DNS
/// `discovery.<td>`), trusting `ca`'s bundle for client certificates.
fn server_tls_config(
    ca: &Ca,
    key: &LocalKey,
    ttl: Duration,
) -> Result<(rustls::ServerConfig, SystemTime), IdentityError> {
    let id = SpiffeId::discovery(ca.trust_domain());
    let csr = key.csr_pem(&id).map_err(|source| IdentityError::Key {
        path: PathBuf::from(SERVER_KEY_FILE),
        source,
    })?;
    let issued = ca
        .issue_server_cert(&csr, Some(ttl))
        .map_err(IdentityError::ServerCert)?;
    info!(
        identity = %id,
        dns = %ca.trust_domain().discovery_dns_name(),
        serial = %issued.serial,
        not_after = %utc(issued.not_after),
        "issued discovery's serving certificate"
    );
    let chain = format!("{}{}", issued.cert_pem, issued.chain_pem);
    let config = tls::server_config(&chain, &key.private_key_pem(), ca.bundle_der())?;
    Ok((config, issued.not_after))
}

fn log_roots(ca: &Ca) {
    for root in ca.trusted_roots() {
        info!(
            fingerprint = %root.fingerprint,
            subject = %root.subject,
            not_after = %utc(root.not_after),
            signing = root.signing,
            source = %root.source.display(),
            "trusted root"
        );
    }
}

/// Checks callers' client certificates. The TLS layer has verified the chain against the
/// bundle; this decides what the certificate may do.
#[derive(Debug, Clone)]
pub struct PeerAuth {
    trust_domain: TrustDomain,
    metrics: Arc<CaMetrics>,
    /// What is revoked (`None`: nothing ever is, in tests).
    revocations: Option<watch::Receiver<Arc<RevocationView>>>,
}

impl PeerAuth {
    pub fn new(trust_domain: TrustDomain, metrics: Arc<CaMetrics>) -> PeerAuth {
        PeerAuth {
            trust_domain,
            metrics,
            revocations: None,
        }
    }

    /// Also refuse revoked nodes and certificates.
    pub fn with_revocations(mut self, revocations: watch::Receiver<Arc<RevocationView>>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// The node whose certificate made this call; `Unauthenticated` without one, or with a
    /// certificate of another role or trust domain; `PermissionDenied` when the node or the
    /// certificate is revoked. `call` names the method in logs and metrics.
    pub fn node<T>(&self, call: &'static str, request: &Request<T>) -> Result<String, Status> {
        let certs = request.peer_certs();
        let certs = certs.as_deref().map(Vec::as_slice);
        let node = node_of_peer(&self.trust_domain, certs).map_err(|refusal| {
            warn!(call, remote = ?request.remote_addr(), reason = %refusal, "refused an unauthenticated call");
            self.refuse(call, refusal)
        })?;
        if let Some(refusal) = self.revoked_now(&node, certs.and_then(|c| c.first())) {
            warn!(call, node = %node, remote = ?request.remote_addr(), reason = %refusal, "refused a revoked caller");
            return Err(self.refuse(call, refusal));
        }
        Ok(node)
    }

    /// Why `node` (with this leaf certificate, if given) may not call now, if it may not.
    pub fn revoked_now(
        &self,
        node: &str,
        leaf: Option<&CertificateDer<'static>>,
    ) -> Option<Refusal> {
        let view = Arc::clone(&self.revocations.as_ref()?.borrow());
        if let Some(refusal) = view.node_refusal(node) {
            return Some(refusal);
        }
        if view.serials.is_empty() {
            return None;
        }
        let serial = revocation::serial_of(leaf?)?;
        view.serial_refusal(&serial)
    }

    /// Resolves once `node` is revoked, with the status to end its stream with (counted as a
    /// refusal of `call`). Never resolves without revocations.
    pub async fn revoked(&self, call: &'static str, node: &str) -> Status {
        let Some(mut rx) = self.revocations.clone() else {
            return std::future::pending().await;
        };
        loop {
            let refusal = rx.borrow_and_update().node_refusal(node);
            if let Some(refusal) = refusal {
                warn!(call, node, reason = %refusal, "closing the stream of a revoked node");
                return self.refuse(call, refusal);
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Counts a refusal and turns it into the status the caller gets.
    pub fn refuse(&self, call: &'static str, refusal: Refusal) -> Status {
        self.metrics.refused(call, refusal.reason());
        refusal.into()
    }

    /// A stream whose `node.id` is not the node of its certificate.
    pub fn node_mismatch(&self, certificate: &str, claimed: &str) -> Status {
        warn!(
            certificate_node = %certificate,
            node_id = %claimed,
            "refusing ADS stream: node.id {claimed} is not the node in the client certificate ({certificate})"
        );
        self.refuse(
            "ads",
            Refusal::NodeMismatch {
                certificate: certificate.to_string(),
                claimed: claimed.to_string(),
            },
        )
    }
}

/// The node named by the leaf of a verified peer chain.
pub fn node_of_peer(
    trust_domain: &TrustDomain,
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<String, Refusal> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(Refusal::NoCertificate)?;
    let id = pilotfish_pki::peer_spiffe_id(leaf).ok_or(Refusal::NoIdentity)?;
    if id.trust_domain() != trust_domain {
        return Err(Refusal::WrongRole(id.uri()));
    }
    match id.role() {
        Role::Node(node) => Ok(node.clone()),
        _ => Err(Refusal::WrongRole(id.uri())),
    }
}

/// `2024-05-01T12:00:00Z`, for logs and the CLI.
pub fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
