//! The authorization rules as plain calls, then the real gRPC port over TLS on loopback.

use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use pilotfish_pki::wire::{BundleRequest, IdentityClient, SignRequest};
use pilotfish_registries::model::{Catalog, Instance, Origin, Protocol, Service};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use tonic::Code;

use super::metrics::Kind;
use super::service::{service_identity, IdentityService};
use super::*;
use crate::mesh::MeshSnapshot;
use crate::resources::CLUSTER;
use crate::translate::Shared;
use crate::xds::connections::Connections;
use crate::xds::metrics::XdsMetrics;
use crate::xds::server::{AdsOptions, AdsServer};

fn td() -> TrustDomain {
    TrustDomain::new("pilotfish.local").expect("td")
}

fn config(dir: &Path) -> Config {
    let text = format!(
        "state_dir = \"{}\"\n[registry.files]\npaths = [\"r\"]\n",
        dir.display()
    );
    Config::parse(&text, &dir.join("discovery.toml")).expect("config")
}

/// `reviews` runs on vm-b; `ratings` has an instance outside the mesh only.
fn catalog() -> Arc<Catalog> {
    let mut c = Catalog::default();
    for (name, node) in [("reviews", Some("vm-b")), ("ratings", None)] {
        c.services.insert(
            name.to_string(),
            Service {
                name: name.to_string(),
                protocol: Protocol::Http,
                port: 9080,
                upstreams: None,
                instances: vec![Instance {
                    node: node.map(str::to_string),
                    address: "10.0.0.2".into(),
                    port: 9080,
                    mesh_port: 15006,
                    labels: Default::default(),
                    weight: 1,
                    healthy: true,
                    draining: false,
                    locality: None,
                }],
                mtls: Default::default(),
                health: Default::default(),
                origin: Origin::default(),
            },
        );
    }
    Arc::new(c)
}

#[test]
fn peer_identity_must_be_a_node_of_this_trust_domain() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = Ca::load_or_create(dir.path(), &td(), &CaOptions::default()).expect("ca");
    let cert = |id: &SpiffeId| {
        let key = LocalKey::generate().expect("key");
        let pem = ca
            .sign_workload(&key.csr_pem(id).expect("csr"), id, None)
            .expect("signed")
            .cert_pem;
        vec![CertificateDer::from_pem_slice(pem.as_bytes()).expect("der")]
    };
    use rustls_pki_types::pem::PemObject;
    let node = cert(&SpiffeId::node(&td(), "vm-b").expect("id"));
    assert_eq!(node_of_peer(&td(), Some(&node)), Ok("vm-b".to_string()));
    assert_eq!(node_of_peer(&td(), None), Err(Refusal::NoCertificate));
    assert_eq!(node_of_peer(&td(), Some(&[])), Err(Refusal::NoCertificate));
    let service = cert(&SpiffeId::service(&td(), "reviews").expect("id"));
    assert!(matches!(
        node_of_peer(&td(), Some(&service)),
        Err(Refusal::WrongRole(_))
    ));
    let other = TrustDomain::new("other.mesh").expect("td");
    assert!(matches!(
        node_of_peer(&other, Some(&node)),
        Err(Refusal::WrongRole(_))
    ));
}

#[test]
fn sign_gives_only_services_placed_on_the_callers_node() {
    let c = catalog();
    let (id, kind) = service_identity(&td(), &c, "vm-b", "reviews").expect("placed");
    assert_eq!(id.uri(), "spiffe://pilotfish.local/service/reviews");
    assert_eq!(kind, Kind::Service);
    let (id, kind) = service_identity(&td(), &c, "vm-b", "").expect("renewal");
    assert_eq!(id.uri(), "spiffe://pilotfish.local/node/vm-b");
    assert_eq!(kind, Kind::Node);

    let refused = service_identity(&td(), &c, "vm-a", "reviews").expect_err("other node");
    assert_eq!(
        refused.to_string(),
        "service reviews has no instance on node vm-a"
    );
    assert_eq!(tonic::Status::from(refused).code(), Code::PermissionDenied);
    // An instance with no node is in nobody's mesh.
    assert!(service_identity(&td(), &c, "vm-b", "ratings").is_err());
    assert!(service_identity(&td(), &c, "vm-b", "nope").is_err());
}

fn authority(dir: &Path) -> Arc<Authority> {
    Arc::new(Authority::load(&config(dir), Arc::new(CaMetrics::default())).expect("authority"))
}

fn enrol_request(
    token: &str,
    node: &str,
    key: &LocalKey,
) -> Request<pilotfish_pki::wire::EnrolRequest> {
    let id = SpiffeId::node(&td(), node).expect("id");
    Request::new(pilotfish_pki::wire::EnrolRequest {
        token: token.to_string(),
        node: node.to_string(),
        csr_pem: key.csr_pem(&id).expect("csr"),
    })
}

#[tokio::test]
async fn enrol_needs_a_live_token_for_the_node_it_names() {
    use pilotfish_pki::wire::Identity as _;
    let dir = tempfile::tempdir().expect("tmp");
    let a = authority(dir.path());
    let (_tx, catalogs) = watch::channel(catalog());
    let svc = IdentityService::new(a.clone(), catalogs);
    let key = LocalKey::generate().expect("key");
    let tokens = a.tokens();

    let good = tokens
        .create("vm-b", Duration::from_secs(600))
        .expect("token");
    let wrong_node = svc
        .enrol(enrol_request(&good, "vm-c", &key))
        .await
        .expect_err("wrong node");
    assert_eq!(wrong_node.code(), Code::Unauthenticated);
    assert!(
        wrong_node.message().contains("different node"),
        "{wrong_node}"
    );

    let issued = svc
        .enrol(enrol_request(&good, "vm-b", &key))
        .await
        .expect("enrolled")
        .into_inner();
    let info = pilotfish_pki::parse_cert_pem(&issued.cert_pem).expect("cert");
    assert_eq!(info.id.uri(), "spiffe://pilotfish.local/node/vm-b");
    let life = info
        .not_after
        .duration_since(SystemTime::now())
        .expect("future");
    assert!(
        life > Duration::from_secs(6 * 86_400),
        "node_ttl 7d: {life:?}"
    );
    assert_eq!(issued.bundle_pem, a.ca().bundle_pem());

    let again = svc
        .enrol(enrol_request(&good, "vm-b", &key))
        .await
        .expect_err("single use");
    assert!(again.message().contains("already used"), "{again}");

    let unknown = svc
        .enrol(enrol_request(
            "pft1.0123456789abcdef.0000000000000000000000000000000000000000000000000000000000000000",
            "vm-b",
            &key,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(unknown.message().contains("unknown"), "{unknown}");

    let revoked = tokens
        .create("vm-b", Duration::from_secs(600))
        .expect("token");
    tokens
        .revoke(revoked.split('.').nth(1).expect("id"))
        .expect("revoke");
    let e = svc
        .enrol(enrol_request(&revoked, "vm-b", &key))
        .await
        .expect_err("revoked");
    assert!(e.message().contains("revoked"), "{e}");

    let expired = tokens
        .create_at(
            "vm-b",
            Duration::from_secs(60),
            SystemTime::now() - Duration::from_secs(3600),
        )
        .expect("token");
    let e = svc
        .enrol(enrol_request(&expired, "vm-b", &key))
        .await
        .expect_err("expired");
    assert!(e.message().contains("expired"), "{e}");

    // A CSR for another identity is refused even with a good token.
    let fresh = tokens
        .create("vm-b", Duration::from_secs(600))
        .expect("token");
    let mut req = enrol_request(&fresh, "vm-b", &key);
    req.get_mut().csr_pem = key
        .csr_pem(&SpiffeId::service(&td(), "reviews").expect("id"))
        .expect("csr");
    let e = svc.enrol(req).await.expect_err("csr for a service");
    assert_eq!(e.code(), Code::PermissionDenied);

    let m = a.metrics();
    assert_eq!(m.issued_count(Kind::Node), 1);
    for reason in [
        "token_wrong_node",
        "token_used",
        "token_unknown",
        "token_revoked",
        "token_expired",
        "csr_rejected",
    ] {
        assert_eq!(m.refusal_count("enrol", reason), 1, "{reason}");
    }
}

struct Running {
    addr: std::net::SocketAddr,
    authority: Arc<Authority>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Kept, so open ADS streams are not ended by a closed snapshot channel.
    _snapshots: watch::Sender<Arc<MeshSnapshot>>,
    _dir: tempfile::TempDir,
}

async fn start_secure() -> Running {
    let dir = tempfile::tempdir().expect("tmp");
    let authority = authority(dir.path());
    let (_tx, catalogs) = watch::channel(catalog());
    let (snap_tx, snapshots) = watch::channel(Arc::new(MeshSnapshot::new(
        1,
        Arc::new(Shared::build(catalog())),
    )));
    let ads = AdsServer::new(
        snapshots,
        Connections::default(),
        Arc::new(XdsMetrics::default()),
        AdsOptions {
            auth: Some(authority.peer_auth()),
            ..AdsOptions::default()
        },
    );
    let identity = IdentityService::new(authority.clone(), catalogs);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let debug = crate::proxy_config::HostService::new(
        Default::default(),
        Some(authority.peer_auth()),
        shutdown.clone(),
    );
    let server = tokio::spawn(crate::grpc::serve_tls(
        ads,
        debug,
        identity,
        authority.tls(),
        listener,
        shutdown.clone(),
    ));
    Running {
        addr,
        authority,
        shutdown,
        server,
        _snapshots: snap_tx,
        _dir: dir,
    }
}

/// A TLS channel that verifies discovery as `discovery.pilotfish.local` against `bundle`,
/// presenting `identity` if given.
async fn channel(
    addr: std::net::SocketAddr,
    bundle: &str,
    identity: Option<TlsIdentity>,
) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .domain_name("discovery.pilotfish.local");
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

/// Opens a SotW stream as `node_id`; the first response or the status that ended it.
async fn ads_first(channel: Channel, node_id: &str) -> Result<String, tonic::Status> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: node_id.to_string(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an answer in time")?;
    drop(tx);
    Ok(first.map(|r| r.type_url).unwrap_or_default())
}

#[tokio::test]
async fn grpc_port_requires_node_certificates_and_binds_streams_to_them() {
    let r = start_secure().await;
    let bundle = r.authority.ca().bundle_pem().to_string();

    // No client certificate: ADS, Sign and Bundle are refused; Enrol is reachable.
    let anonymous = channel(r.addr, &bundle, None).await;
    let e = ads_first(anonymous.clone(), "vm-b")
        .await
        .expect_err("no cert");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = IdentityClient::new(anonymous.clone())
        .bundle(BundleRequest {})
        .await
        .expect_err("no cert");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    let key = LocalKey::generate().expect("key");
    let token = r
        .authority
        .tokens()
        .create("vm-b", Duration::from_secs(600))
        .expect("token");
    let enrolled = IdentityClient::new(anonymous)
        .enrol(enrol_request(&token, "vm-b", &key).into_inner())
        .await
        .expect("enrolled")
        .into_inner();
    let node_identity = TlsIdentity::from_pem(
        format!("{}{}", enrolled.cert_pem, enrolled.chain_pem),
        key.private_key_pem(),
    );

    // With the node certificate: ADS as that node works; as another node it is refused.
    let node = channel(r.addr, &enrolled.bundle_pem, Some(node_identity.clone())).await;
    let first = ads_first(node.clone(), "vm-b").await.expect("served");
    assert_eq!(first, CLUSTER);
    let e = ads_first(node.clone(), "vm-d")
        .await
        .expect_err("other node");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("vm-b") && e.message().contains("vm-d"),
        "{e}"
    );

    // Sign: a placed service, renewal, and a service that is not on this node.
    let mut ident = IdentityClient::new(node.clone());
    let reviews_key = LocalKey::generate().expect("key");
    let reviews = SpiffeId::service(&td(), "reviews").expect("id");
    let signed = ident
        .sign(SignRequest {
            csr_pem: reviews_key.csr_pem(&reviews).expect("csr"),
            service: "reviews".into(),
        })
        .await
        .expect("placed service")
        .into_inner();
    let info = pilotfish_pki::parse_cert_pem(&signed.cert_pem).expect("cert");
    assert_eq!(info.id, reviews);
    let renewed = ident
        .sign(SignRequest {
            csr_pem: key
                .csr_pem(&SpiffeId::node(&td(), "vm-b").expect("id"))
                .expect("csr"),
            service: String::new(),
        })
        .await
        .expect("renewal")
        .into_inner();
    assert_eq!(
        pilotfish_pki::parse_cert_pem(&renewed.cert_pem)
            .expect("cert")
            .id
            .uri(),
        "spiffe://pilotfish.local/node/vm-b"
    );
    let ratings = SpiffeId::service(&td(), "ratings").expect("id");
    let e = ident
        .sign(SignRequest {
            csr_pem: key.csr_pem(&ratings).expect("csr"),
            service: "ratings".into(),
        })
        .await
        .expect_err("not placed");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "service ratings has no instance on node vm-b");
    let got = ident
        .bundle(BundleRequest {})
        .await
        .expect("bundle")
        .into_inner();
    assert_eq!(got.bundle_pem, bundle);

    // A workload certificate is not a node certificate.
    let workload = TlsIdentity::from_pem(signed.cert_pem.clone(), reviews_key.private_key_pem());
    let as_service = channel(r.addr, &bundle, Some(workload)).await;
    let e = ads_first(as_service, "vm-b")
        .await
        .expect_err("service cert");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // Root rotation, live: prepare + reload serves both roots; switch + reload signs with the
    // new root, and the node certificate from the old root still connects.
    let state = r._dir.path();
    Ca::prepare_rotation(state, &td()).expect("prepare");
    r.authority.reload().expect("reload");
    let both = r.authority.ca().bundle_pem().to_string();
    assert_eq!(both.matches("BEGIN CERTIFICATE").count(), 2);
    Ca::switch_to_next(state).expect("switch");
    r.authority.reload().expect("reload");
    let after = channel(r.addr, &both, Some(node_identity)).await;
    let got = IdentityClient::new(after.clone())
        .bundle(BundleRequest {})
        .await
        .expect("old node cert still trusted")
        .into_inner();
    assert_eq!(got.bundle_pem.matches("BEGIN CERTIFICATE").count(), 2);
    // Discovery now serves a certificate from the new root: a client trusting only the old
    // root cannot connect any more.
    let old_only = Endpoint::from_shared(format!("https://{}", r.addr))
        .expect("endpoint")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&bundle))
                .domain_name("discovery.pilotfish.local"),
        )
        .expect("tls")
        .connect()
        .await;
    assert!(old_only.is_err(), "server certificate is from the new root");

    let text = r.authority.metrics().encoded();
    for reason in ["no_certificate", "node_mismatch", "not_placed"] {
        assert!(text.contains(&format!("reason=\"{reason}\"}}")), "{text}");
    }
    r.shutdown.cancel();
    r.server.await.expect("joins").expect("serves");
}

/// `node revoke` while the node is connected: its ADS and WatchBundle streams end with
/// PERMISSION_DENIED at once, and it is refused everything; after `node restore` its old
/// certificate stays refused, and a new token enrols it again.
#[tokio::test]
async fn a_revoked_node_is_cut_off_and_comes_back_only_with_a_new_token() {
    use pilotfish_pki::wire::is_revoked;
    use pilotfish_pki::RevocationStore;

    let r = start_secure().await;
    let bundle = r.authority.ca().bundle_pem().to_string();
    let anonymous = channel(r.addr, &bundle, None).await;
    let enrol = |node: &'static str| {
        let (anonymous, authority) = (anonymous.clone(), r.authority.clone());
        async move {
            let key = LocalKey::generate().expect("key");
            let token = authority
                .tokens()
                .create(node, Duration::from_secs(600))
                .expect("token");
            let got = IdentityClient::new(anonymous)
                .enrol(enrol_request(&token, node, &key).into_inner())
                .await
                .map(|e| {
                    TlsIdentity::from_pem(
                        format!("{}{}", e.get_ref().cert_pem, e.get_ref().chain_pem),
                        key.private_key_pem(),
                    )
                });
            (got, key)
        }
    };
    let (identity, key) = enrol("vm-b").await;
    let node = channel(r.addr, &bundle, Some(identity.expect("enrolled"))).await;

    // An open ADS stream and an open WatchBundle stream.
    let (ads_tx, ads_rx) = mpsc::channel(1);
    ads_tx
        .send(DiscoveryRequest {
            node: Some(Node {
                id: "vm-b".into(),
                ..Default::default()
            }),
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await
        .expect("send");
    let mut ads = AggregatedDiscoveryServiceClient::new(node.clone())
        .stream_aggregated_resources(ReceiverStream::new(ads_rx))
        .await
        .expect("ads")
        .into_inner();
    ads.message().await.expect("served").expect("a response");
    let mut watch = IdentityClient::new(node.clone())
        .watch_bundle(BundleRequest {})
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("ok").expect("bundle");
    assert_eq!(first.bundle_pem, bundle);
    assert!(first.crl_pem.is_empty(), "nothing revoked yet");

    let state = r._dir.path();
    RevocationStore::new(state)
        .revoke("vm-b", std::time::SystemTime::now())
        .expect("revoke");
    r.authority.revoker().poll(&r.authority.ca()).expect("poll");

    let ended = tokio::time::timeout(Duration::from_secs(5), ads.message())
        .await
        .expect("the ADS stream ends at once")
        .expect_err("refused");
    assert!(is_revoked(&ended), "{ended:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the bundle stream ends at once");
    assert!(is_revoked(&ended), "{ended:?}");
    let mut ident = IdentityClient::new(node.clone());
    let e = ident.bundle(BundleRequest {}).await.expect_err("refused");
    assert!(
        is_revoked(&e) && e.message().contains("node restore vm-b"),
        "{e:?}"
    );
    let (refused, _) = enrol("vm-b").await;
    assert!(is_revoked(&refused.expect_err("enrol refused")));
    // Other nodes carry on, and they now get the CRL of vm-b's certificates.
    let (other, _) = enrol("vm-d").await;
    let other = channel(r.addr, &bundle, Some(other.expect("vm-d enrols"))).await;
    let got = IdentityClient::new(other)
        .bundle(BundleRequest {})
        .await
        .expect("vm-d served")
        .into_inner();
    assert!(got.crl_pem.contains("BEGIN X509 CRL"), "{got:?}");

    // Restored: the old certificate stays refused; a new token enrols vm-b again.
    RevocationStore::new(state)
        .restore("vm-b", std::time::SystemTime::now())
        .expect("restore");
    r.authority.revoker().poll(&r.authority.ca()).expect("poll");
    let e = ident
        .sign(SignRequest {
            csr_pem: key
                .csr_pem(&SpiffeId::node(&td(), "vm-b").expect("id"))
                .expect("csr"),
            service: String::new(),
        })
        .await
        .expect_err("old certificate refused");
    assert!(
        is_revoked(&e) && e.message().contains("certificate"),
        "{e:?}"
    );
    let (again, _) = enrol("vm-b").await;
    let again = channel(r.addr, &bundle, Some(again.expect("enrols again"))).await;
    assert_eq!(ads_first(again, "vm-b").await.expect("served"), CLUSTER);

    let text = r.authority.metrics().encoded();
    assert!(text.contains("reason=\"node_revoked\"}"), "{text}");
    assert!(text.contains("reason=\"certificate_revoked\"}"), "{text}");
    r.shutdown.cancel();
    r.server.await.expect("joins").expect("serves");
}
