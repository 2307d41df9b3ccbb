#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use pilotfish_pki::wire::{
    BundleRequest, BundleResponse, EnrolRequest, EnrolResponse, Identity, IdentityServer,
    SignRequest, SignResponse,
};
use pilotfish_pki::{peer_spiffe_id, Ca, CaOptions, Role, TokenStore};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, ServerTlsConfig};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type as SecretType;

use super::*;
use crate::identity::sds;
use crate::testutil::wait_until;

const HOUR: Duration = Duration::from_secs(3600);

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn info(not_before: SystemTime, lifetime: Duration) -> CertInfo {
    CertInfo {
        id: SpiffeId::node(&td(), "vm-b").unwrap(),
        not_before,
        not_after: not_before + lifetime,
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("pilotfish.local").unwrap()
}

#[test]
fn schedule_enrols_first_then_renews_at_half_life() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut s = Schedule::new(t0(), 0.0);
    s.want("reviews", None, t0(), &mut rng);
    // Not enrolled: only enrolment, even though a service is wanted.
    assert_eq!(s.due(t0()), vec![Job::Enrol]);
    s.node_issued(&info(t0(), HOUR), &mut rng);
    assert_eq!(
        s.due(t0()),
        vec![Job::Service("reviews".into()), Job::Bundle]
    );
    s.service_issued("reviews", &info(t0(), HOUR), &mut rng);
    s.bundle_fetched(t0());
    assert!(s.due(t0()).is_empty());
    assert_eq!(s.next_due(t0()), t0() + BUNDLE_REFRESH);
    let half = t0() + HOUR / 2;
    assert_eq!(
        s.due(half),
        vec![Job::RenewNode, Job::Service("reviews".into()), Job::Bundle]
    );
}

#[test]
fn failures_back_off_and_an_expired_node_needs_enrolment() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut s = Schedule::new(t0(), 0.1);
    let d1 = s.failed(&Job::Enrol, t0(), &mut rng);
    let d2 = s.failed(&Job::Enrol, t0(), &mut rng);
    assert!(d1 >= RETRY_INITIAL / 2 && d1 <= RETRY_INITIAL, "{d1:?}");
    assert!(d2 >= RETRY_INITIAL && d2 <= RETRY_INITIAL * 2, "{d2:?}");
    for _ in 0..20 {
        assert!(s.failed(&Job::Enrol, t0(), &mut rng) <= RETRY_CAP);
    }
    assert!(s.due(t0()).is_empty());
    assert_eq!(s.due(t0() + RETRY_CAP), vec![Job::Enrol]);

    // Renewal keeps failing until the certificate expires: enrolment is due instead.
    s.node_issued(&info(t0(), HOUR), &mut rng);
    let late = t0() + HOUR.mul_f64(0.7);
    assert!(s.due(late).contains(&Job::RenewNode));
    s.failed(&Job::RenewNode, late, &mut rng);
    assert!(s.next_due(late) <= t0() + HOUR);
    assert_eq!(s.due(t0() + HOUR + RETRY_CAP), vec![Job::Enrol]);
}

#[test]
fn a_stored_service_certificate_is_renewed_when_due_not_at_once() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut s = Schedule::new(t0(), 0.0);
    s.node_issued(&info(t0(), HOUR), &mut rng);
    s.bundle_fetched(t0());
    s.want("reviews", Some(&info(t0(), HOUR)), t0(), &mut rng);
    s.want(
        "expired",
        Some(&info(t0() - 2 * HOUR, HOUR)),
        t0(),
        &mut rng,
    );
    assert_eq!(s.due(t0()), vec![Job::Service("expired".into())]);
    assert!(s
        .due(t0() + HOUR / 2)
        .contains(&Job::Service("reviews".into())));
}

/// Discovery's identity service, as the discovery crate implements it in spirit: tokens are
/// redeemed in a real `TokenStore`, certificates signed by a real `Ca`, and `Sign` authorised
/// by the TLS peer's node certificate; only `reviews` is placed on `vm-b`.
struct FakeDiscovery {
    ca: Ca,
    tokens: TokenStore,
    placed: BTreeSet<String>,
    /// Set: every call is refused as discovery refuses a revoked node.
    revoked: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeDiscovery {
    fn check_revoked(&self) -> Result<(), tonic::Status> {
        if self.revoked.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(tonic::Status::permission_denied(format!(
                "node vm-b {}",
                pilotfish_pki::wire::REVOKED_MARK
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Identity for FakeDiscovery {
    async fn enrol(
        &self,
        request: tonic::Request<EnrolRequest>,
    ) -> Result<tonic::Response<EnrolResponse>, tonic::Status> {
        self.check_revoked()?;
        let r = request.into_inner();
        self.tokens.redeem(&r.token, &r.node)?;
        let id = SpiffeId::node(self.ca.trust_domain(), &r.node)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let issued = self.ca.sign_workload(&r.csr_pem, &id, Some(2 * HOUR))?;
        Ok(tonic::Response::new(issued.into()))
    }

    async fn sign(
        &self,
        request: tonic::Request<SignRequest>,
    ) -> Result<tonic::Response<SignResponse>, tonic::Status> {
        self.check_revoked()?;
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| peer_spiffe_id(c)))
            .ok_or_else(|| tonic::Status::unauthenticated("a node certificate is required"))?;
        let Role::Node(node) = peer.role().clone() else {
            return Err(tonic::Status::permission_denied("not a node"));
        };
        let r = request.into_inner();
        let td = self.ca.trust_domain();
        let id = if r.service.is_empty() {
            peer.clone()
        } else if node == "vm-b" && self.placed.contains(&r.service) {
            SpiffeId::service(td, &r.service)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        } else {
            return Err(tonic::Status::permission_denied(format!(
                "service {} has no instance on node {node}",
                r.service
            )));
        };
        let issued = self.ca.sign_workload(&r.csr_pem, &id, Some(2 * HOUR))?;
        Ok(tonic::Response::new(issued.into()))
    }

    async fn bundle(
        &self,
        _request: tonic::Request<BundleRequest>,
    ) -> Result<tonic::Response<BundleResponse>, tonic::Status> {
        Ok(tonic::Response::new(BundleResponse {
            bundle_pem: self.ca.bundle_pem().to_owned(),
            crl_pem: String::new(),
        }))
    }

    /// The bundle with a CRL, then, once revoked, the refusal that ends the stream.
    async fn watch_bundle(
        &self,
        _request: tonic::Request<BundleRequest>,
    ) -> Result<tonic::Response<pilotfish_pki::wire::BundleStream>, tonic::Status> {
        self.check_revoked()?;
        let first = BundleResponse {
            bundle_pem: self.ca.bundle_pem().to_owned(),
            crl_pem: "CRL".into(),
        };
        let revoked = self.revoked.clone();
        let stream = futures::stream::unfold(Some(first), move |first| {
            let revoked = revoked.clone();
            async move {
                if let Some(first) = first {
                    return Some((Ok(first), None));
                }
                loop {
                    if revoked.load(std::sync::atomic::Ordering::SeqCst) {
                        let status = tonic::Status::permission_denied(format!(
                            "node vm-b {}",
                            pilotfish_pki::wire::REVOKED_MARK
                        ));
                        return Some((Err(status), None));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

struct Server {
    addr: SocketAddr,
    revoked: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Serves `FakeDiscovery` over TLS on 127.0.0.1:0 with a certificate for `discovery.<td>`
/// issued by the CA in `ca_dir`, client certificates optional (Enrol has none).
async fn start_discovery(ca_dir: &Path) -> Server {
    let ca = Ca::load_or_create(ca_dir, &td(), &CaOptions::default()).unwrap();
    let key = LocalKey::generate().unwrap();
    let issued = ca
        .issue_server_cert(&key.csr_pem(&SpiffeId::discovery(&td())).unwrap(), None)
        .unwrap();
    let tls = ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            format!("{}{}", issued.cert_pem, issued.chain_pem),
            key.private_key_pem(),
        ))
        .client_ca_root(Certificate::from_pem(ca.bundle_pem()))
        .client_auth_optional(true);
    let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = FakeDiscovery {
        tokens: TokenStore::new(ca_dir),
        ca,
        placed: ["reviews".to_string()].into(),
        revoked: revoked.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let sd = stop.clone();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(IdentityServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), sd.cancelled_owned())
            .await
            .unwrap();
    });
    Server {
        addr,
        revoked,
        stop,
        task,
    }
}

fn settings(dir: &Path, ca_dir: &Path, addr: SocketAddr) -> IdentitySettings {
    IdentitySettings {
        node: "vm-b".into(),
        trust_domain: td(),
        discovery: vec![addr.to_string()],
        ca_pem: std::fs::read_to_string(ca_dir.join("ca/root.pem")).unwrap(),
        token_file: Some(dir.join("token")),
        state_dir: dir.join("state"),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Waits until the published identities satisfy `f`; returns them.
async fn until(
    ids: &mut watch::Receiver<Arc<Identities>>,
    f: fn(&Identities) -> bool,
) -> Identities {
    wait_until(Duration::from_secs(20), || {
        let done = f(&ids.borrow_and_update());
        async move { done }
    })
    .await;
    Identities::clone(&ids.borrow())
}

/// A CRL pushed on the bundle stream reaches the SDS snapshot; a revocation drops every
/// certificate; a new token in token_file enrols the host again without waiting out a backoff.
#[tokio::test]
async fn takes_the_pushed_crl_drops_everything_when_revoked_and_enrols_with_a_new_token() {
    let ca_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_discovery(ca_dir.path()).await;
    let tokens = TokenStore::new(ca_dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, tokens.create("vm-b", HOUR).unwrap()).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let m = IdentityManager::load(
        settings(dir.path(), ca_dir.path(), server.addr),
        Arc::new(AgentStatus::default()),
    )
    .unwrap();
    let mut ids = m.identities();
    m.wanted().add("reviews");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(m.run(shutdown.clone()));
    let first = until(&mut ids, |i| {
        i.node.is_some() && i.services.contains_key("reviews") && i.crl_pem.is_some()
    })
    .await;
    assert_eq!(first.crl_pem.as_deref(), Some("CRL"));
    let Some(sds_roots) = sds::secret("roots", &first) else {
        panic!("no roots secret")
    };
    let Some(SecretType::ValidationContext(v)) = sds_roots.r#type else {
        panic!("not a validation context")
    };
    assert!(v.crl.is_some() && v.only_verify_leaf_cert_crl);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state/crl.pem")).unwrap(),
        "CRL"
    );

    server
        .revoked
        .store(true, std::sync::atomic::Ordering::SeqCst);
    until(&mut ids, |i| i.node.is_none() && i.services.is_empty()).await;

    // Restored, with a new token: enrolled again, with new certificates.
    server
        .revoked
        .store(false, std::sync::atomic::Ordering::SeqCst);
    std::fs::write(&token_file, tokens.create("vm-b", HOUR).unwrap()).unwrap();
    let back = until(&mut ids, |i| {
        i.node.is_some() && i.services.contains_key("reviews")
    })
    .await;
    assert_ne!(
        back.node.as_ref().unwrap().chain_pem,
        first.node.as_ref().unwrap().chain_pem
    );
    assert_ne!(
        back.services["reviews"].chain_pem,
        first.services["reviews"].chain_pem
    );
    shutdown.cancel();
    run.await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn enrols_with_the_token_then_lives_on_stored_certificates() {
    let ca_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_discovery(ca_dir.path()).await;
    let tokens = TokenStore::new(ca_dir.path());
    let token = tokens.create("vm-b", HOUR).unwrap();
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();

    // First start: nothing stored.
    let status = Arc::new(AgentStatus::default());
    let m = IdentityManager::load(
        settings(dir.path(), ca_dir.path(), server.addr),
        status.clone(),
    )
    .unwrap();
    let mut ids = m.identities();
    let tls = m.client_tls();
    assert!(ids.borrow().node.is_none());
    assert!(tls.borrow().is_none());
    let wanted = m.wanted();
    wanted.add("reviews");
    wanted.add("ratings"); // not placed on vm-b: refused, retried, never served
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(m.run(shutdown.clone()));
    wait_until(Duration::from_secs(20), || {
        let done = {
            let now = ids.borrow_and_update();
            now.node.is_some() && now.services.contains_key("reviews") && now.bundle_pem.is_some()
        };
        async move { done }
    })
    .await;
    let snapshot = ids.borrow().clone();
    assert!(!snapshot.services.contains_key("ratings"));
    assert_eq!(
        snapshot.node.as_ref().unwrap().info.id.uri(),
        "spiffe://pilotfish.local/node/vm-b"
    );
    assert!(status.enrolled());
    assert!(status.certificate_renewals() >= 1);
    // SDS has something to serve for reviews, nothing for ratings.
    assert!(sds::secret("service/reviews", &snapshot).is_some());
    assert!(sds::secret("service/ratings", &snapshot).is_none());
    assert_eq!(tokens.list().unwrap()[0].state(SystemTime::now()), "used");
    shutdown.cancel();
    run.await.unwrap();

    let state = dir.path().join("state");
    for f in [
        "node.key",
        "node.pem",
        "roots.pem",
        "service-reviews.key",
        "service-reviews.pem",
    ] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    assert!(!state.join("service-ratings.pem").exists());

    // The relay's TLS settings authenticate this host to discovery (mTLS).
    let channel = crate::xds::upstream::connect(&server.addr.to_string(), tls.borrow().clone())
        .await
        .unwrap();
    let mut client = pilotfish_pki::wire::IdentityClient::new(channel);
    let svc_key = LocalKey::generate().unwrap();
    let svc_id = SpiffeId::service(&td(), "reviews").unwrap();
    client
        .sign(SignRequest {
            csr_pem: svc_key.csr_pem(&svc_id).unwrap(),
            service: "reviews".into(),
        })
        .await
        .unwrap();

    // Restart with discovery down and the token gone: the stored certificates are used.
    server.stop().await;
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let status = Arc::new(AgentStatus::default());
    let m = IdentityManager::load(
        settings(dir.path(), ca_dir.path(), server_addr_down()),
        status.clone(),
    )
    .unwrap();
    let restored = m.identities().borrow().clone();
    assert_eq!(restored, snapshot);
    assert!(m.client_tls().borrow().is_some());
    assert!(status.enrolled());

    // Discovery back (on another port): renewal works without a token, with a new key.
    let server = start_discovery(ca_dir.path()).await;
    let mut m = IdentityManager::load(
        settings(dir.path(), ca_dir.path(), server.addr),
        status.clone(),
    )
    .unwrap();
    m.renew_node().await.unwrap();
    let renewed = m.identities().borrow().node.clone().unwrap();
    assert_ne!(renewed.chain_pem, snapshot.node.as_ref().unwrap().chain_pem);
    assert_ne!(renewed.key_pem, snapshot.node.as_ref().unwrap().key_pem);
    assert_eq!(Store::new(&state).load_node().unwrap().unwrap(), renewed);
    server.stop().await;
}

fn server_addr_down() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::testutil::free_port()))
}

#[tokio::test]
async fn a_refused_token_is_reported_without_the_token() {
    let ca_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_discovery(ca_dir.path()).await;
    let tokens = TokenStore::new(ca_dir.path());
    let token = tokens.create("vm-other", HOUR).unwrap();
    std::fs::write(dir.path().join("token"), &token).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let mut m = IdentityManager::load(
        settings(dir.path(), ca_dir.path(), server.addr),
        Arc::new(AgentStatus::default()),
    )
    .unwrap();
    let err = m.enrol().await.unwrap_err();
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(err.contains("different node"), "{err}");
    let secret = token.rsplit('.').next().unwrap();
    assert!(!err.contains(secret));

    std::fs::remove_file(dir.path().join("token")).unwrap();
    let err = m.enrol().await.unwrap_err();
    assert!(err.contains("cannot read token_file"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn refuses_a_server_with_another_name_or_root() {
    let ca_dir = tempfile::tempdir().unwrap();
    let server = start_discovery(ca_dir.path()).await;
    let tokens = TokenStore::new(ca_dir.path());
    let token = tokens.create("vm-b", HOUR).unwrap();
    let root = std::fs::read_to_string(ca_dir.path().join("ca/root.pem")).unwrap();
    let addrs = vec![server.addr.to_string()];
    let csr = || {
        LocalKey::generate()
            .unwrap()
            .csr_pem(&SpiffeId::node(&td(), "vm-b").unwrap())
            .unwrap()
    };

    // Trusted root, but the certificate names discovery.pilotfish.local, not discovery.other.
    let other_td = TrustDomain::new("other").unwrap();
    let tls = client_config(&root, &other_td, None);
    let err = enrol::enrol(&addrs, &tls, &token, "vm-b", csr())
        .await
        .unwrap_err();
    assert!(matches!(err, enrol::CallError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");

    // Right name, but another root.
    let other_ca = tempfile::tempdir().unwrap();
    let other = Ca::load_or_create(other_ca.path(), &td(), &CaOptions::default()).unwrap();
    let tls = client_config(other.bundle_pem(), &td(), None);
    let err = enrol::enrol(&addrs, &tls, &token, "vm-b", csr())
        .await
        .unwrap_err();
    assert!(matches!(err, enrol::CallError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");

    // The token never reached the server: it is still valid.
    assert_eq!(tokens.list().unwrap()[0].state(SystemTime::now()), "valid");
    // The right settings work.
    let tls = client_config(&root, &td(), None);
    enrol::enrol(&addrs, &tls, &token, "vm-b", csr())
        .await
        .unwrap();
    server.stop().await;
}
