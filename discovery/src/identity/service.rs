//! `pilotfish.identity.v1.Identity` as discovery serves it.
//!
//! | method | caller proves | gets |
//! |---|---|---|
//! | Enrol | a join token bound to the node it names | a node certificate (`node_ttl`) |
//! | Sign, `service = ""` | its node certificate | a renewed node certificate |
//! | Sign, `service = "x"` | its node certificate, and the catalog places an instance of `x` on that node | a certificate for `x` (`workload_ttl`) |
//! | Bundle | its node certificate | the trust bundle |
//! | WatchBundle | its node certificate | the trust bundle and CRL, again on every change |
//!
//! A revoked node (or a revoked certificate) is refused everything, and its `WatchBundle`
//! stream is ended when the revocation comes in force ([`super::revocation`]). Every
//! certificate is recorded in `issued.jsonl` before it is returned, so it can be revoked.
//!
//! The identity signed always comes from the proof, never from the CSR: the CSR only lends
//! its public key, and pki refuses one that asks for any other name. The decisions are the
//! plain functions [`service_identity`] and [`token_reason`]; the trait methods around them
//! only read the request, call the CA and count.

use std::sync::Arc;

use std::time::{Duration, Instant, SystemTime};

use pilotfish_pki::wire::{
    BundleRequest, BundleResponse, BundleStream, EnrolRequest, EnrolResponse, Identity,
    SignRequest, SignResponse,
};
use pilotfish_pki::{CsrRejected, Issued, IssuedCert, SpiffeId, TokenRejected, TrustDomain};
use pilotfish_registries::model::Catalog;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::metrics::{Kind, Refusal};
use super::{utc, Authority, PeerAuth};

/// The identity service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct IdentityService {
    authority: Arc<Authority>,
    auth: PeerAuth,
    catalogs: watch::Receiver<Arc<Catalog>>,
    /// Ends `WatchBundle` streams when discovery stops.
    shutdown: CancellationToken,
}

/// How often an open `WatchBundle` stream re-checks the bundle (a CA reload changes it
/// without changing the revocations).
const BUNDLE_RECHECK: Duration = Duration::from_secs(30);

impl IdentityService {
    /// `catalogs`: the registry's latest catalog, which decides where services are placed.
    pub fn new(authority: Arc<Authority>, catalogs: watch::Receiver<Arc<Catalog>>) -> Self {
        IdentityService {
            auth: authority.peer_auth(),
            authority,
            catalogs,
            shutdown: CancellationToken::new(),
        }
    }

    /// Ends open `WatchBundle` streams once `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Records the certificate (so it can be revoked), then counts and logs it. A certificate
    /// that cannot be recorded is not handed out.
    async fn issued(
        &self,
        kind: Kind,
        node: &str,
        id: &SpiffeId,
        issued: &Issued,
    ) -> Result<(), Status> {
        let record = IssuedCert::new(
            &issued.serial,
            node,
            &id.uri(),
            SystemTime::now(),
            issued.not_after,
        );
        let authority = Arc::clone(&self.authority);
        let recorded = tokio::task::spawn_blocking(move || {
            authority.revoker().record(&authority.ca(), record)
        })
        .await;
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, node, "cannot record an issued certificate; not handing it out");
                return Err(Status::internal("discovery cannot record the certificate"));
            }
            Err(e) => {
                warn!(error = %e, "recording an issued certificate failed");
                return Err(Status::internal("discovery cannot record the certificate"));
            }
        }
        self.authority.metrics().issued(kind);
        info!(
            node,
            identity = %id,
            kind = kind.as_str(),
            serial = %issued.serial,
            not_after = %utc(issued.not_after),
            "issued certificate"
        );
        Ok(())
    }

    /// The current bundle and CRL.
    fn bundle_now(&self) -> BundleResponse {
        BundleResponse {
            bundle_pem: self.authority.ca().bundle_pem().to_string(),
            crl_pem: self.authority.revoker().view().crl_pem.clone(),
        }
    }

    fn csr_refused(&self, call: &'static str, node: &str, id: &SpiffeId, e: CsrRejected) -> Status {
        warn!(call, node, identity = %id, reason = %e, "refused a CSR");
        self.authority.metrics().refused(call, "csr_rejected");
        e.into()
    }
}

/// One open `WatchBundle` stream.
struct WatchState {
    service: IdentityService,
    views: watch::Receiver<Arc<super::revocation::RevocationView>>,
    last: Option<BundleResponse>,
    /// Resolves when the caller's node is revoked.
    revoked: std::pin::Pin<Box<dyn std::future::Future<Output = Status> + Send>>,
    ended: bool,
}

/// The identity `node` may get a certificate for in a Sign call: its own node ID for an empty
/// `service`, else the service's ID if the catalog places an instance of it on `node`.
pub fn service_identity(
    trust_domain: &TrustDomain,
    catalog: &Catalog,
    node: &str,
    service: &str,
) -> Result<(SpiffeId, Kind), Refusal> {
    if service.is_empty() {
        let id =
            SpiffeId::node(trust_domain, node).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        return Ok((id, Kind::Node));
    }
    let placed = catalog
        .services
        .get(service)
        .is_some_and(|s| s.instances.iter().any(|i| i.node.as_deref() == Some(node)));
    if !placed {
        return Err(Refusal::NotPlaced {
            service: service.to_string(),
            node: node.to_string(),
        });
    }
    let id =
        SpiffeId::service(trust_domain, service).map_err(|e| Refusal::BadRequest(e.to_string()))?;
    Ok((id, Kind::Service))
}

/// The `reason` label of a refused join token.
pub fn token_reason(e: &TokenRejected) -> &'static str {
    match e {
        TokenRejected::Malformed => "token_malformed",
        TokenRejected::Unknown { .. } => "token_unknown",
        TokenRejected::Revoked { .. } => "token_revoked",
        TokenRejected::Expired { .. } => "token_expired",
        TokenRejected::AlreadyUsed { .. } => "token_used",
        TokenRejected::WrongNode { .. } => "token_wrong_node",
        TokenRejected::Store(_) => "token_store_failed",
    }
}

/// Cheap checks before a token is spent on a CSR that cannot be signed.
fn looks_like_csr(csr_pem: &str) -> bool {
    csr_pem.len() <= 16 * 1024 && csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----")
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn enrol(
        &self,
        request: Request<EnrolRequest>,
    ) -> Result<Response<EnrolResponse>, Status> {
        let EnrolRequest {
            token,
            node,
            csr_pem,
        } = request.into_inner();
        let td = self.authority.trust_domain();
        let refuse = |r: Refusal| {
            warn!(node = %node, reason = %r, "refused enrolment");
            self.auth.refuse("enrol", r)
        };
        let id =
            SpiffeId::node(td, &node).map_err(|e| refuse(Refusal::BadRequest(e.to_string())))?;
        if !looks_like_csr(&csr_pem) {
            return Err(refuse(Refusal::BadRequest(
                "csr_pem is not a PEM CERTIFICATE REQUEST".into(),
            )));
        }
        // A revoked node may not enrol, whatever token it holds (and its token stays unspent).
        if let Some(r) = self.auth.revoked_now(&node, None) {
            return Err(refuse(r));
        }
        // Authenticate before any real work on the request: the token, in the blocking pool
        // (it locks and rewrites the token file).
        let tokens = self.authority.tokens().clone();
        let presented = node.clone();
        let redeemed = tokio::task::spawn_blocking(move || tokens.redeem(&token, &presented))
            .await
            .map_err(|e| {
                warn!(error = %e, "the token check failed");
                Status::internal("the join token check failed")
            })?;
        if let Err(e) = redeemed {
            warn!(node = %node, reason = %e, "refused enrolment: join token not accepted");
            self.authority.metrics().refused("enrol", token_reason(&e));
            return Err(e.into());
        }
        let started = Instant::now();
        let issued = self
            .authority
            .ca()
            .sign_workload(&csr_pem, &id, Some(self.authority.node_ttl()))
            .inspect(|_| self.authority.metrics().signed(Kind::Node, started.elapsed()))
            .map_err(|e| {
                warn!(node = %node, "the join token was spent on a CSR that was refused; the host needs a new token");
                self.csr_refused("enrol", &node, &id, e)
            })?;
        self.issued(Kind::Node, &node, &id, &issued).await?;
        info!(node = %node, "enrolled a node");
        Ok(Response::new(issued.into()))
    }

    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let node = self.auth.node("sign", &request)?;
        let SignRequest { csr_pem, service } = request.into_inner();
        let catalog = Arc::clone(&self.catalogs.borrow());
        let td = self.authority.trust_domain();
        let (id, kind) = service_identity(td, &catalog, &node, &service).map_err(|r| {
            warn!(node = %node, service = %service, reason = %r, "refused a certificate");
            self.auth.refuse("sign", r)
        })?;
        let ttl = match kind {
            Kind::Node => Some(self.authority.node_ttl()),
            Kind::Service => None,
        };
        let started = Instant::now();
        let issued = self
            .authority
            .ca()
            .sign_workload(&csr_pem, &id, ttl)
            .inspect(|_| self.authority.metrics().signed(kind, started.elapsed()))
            .map_err(|e| self.csr_refused("sign", &node, &id, e))?;
        self.issued(kind, &node, &id, &issued).await?;
        Ok(Response::new(issued.into()))
    }

    async fn bundle(
        &self,
        request: Request<BundleRequest>,
    ) -> Result<Response<BundleResponse>, Status> {
        self.auth.node("bundle", &request)?;
        Ok(Response::new(self.bundle_now()))
    }

    /// The bundle and CRL now, then whenever they change; ends with PERMISSION_DENIED when
    /// the caller's node is revoked, and when discovery stops.
    async fn watch_bundle(
        &self,
        request: Request<BundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        let node = self.auth.node("watch_bundle", &request)?;
        let auth = self.auth.clone();
        let revoked: std::pin::Pin<Box<dyn std::future::Future<Output = Status> + Send>> =
            Box::pin(async move { auth.revoked("watch_bundle", &node).await });
        let state = WatchState {
            service: self.clone(),
            views: self.authority.revoker().subscribe(),
            last: None,
            revoked,
            ended: false,
        };
        // No task of its own: the stream is polled by the connection and dropped with it.
        let stream = futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.ended {
                    return None;
                }
                let now = st.service.bundle_now();
                if st.last.as_ref() != Some(&now) {
                    st.last = Some(now.clone());
                    return Some((Ok(now), st));
                }
                tokio::select! {
                    _ = st.service.shutdown.cancelled() => return None,
                    status = &mut st.revoked => {
                        st.ended = true;
                        return Some((Err(status), st));
                    }
                    changed = st.views.changed() => if changed.is_err() { return None },
                    _ = tokio::time::sleep(BUNDLE_RECHECK) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
