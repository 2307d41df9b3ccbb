//! The identity service over a real loopback TCP connection (plaintext: TLS and peer
//! authorisation are discovery's; here the test service treats every caller as `vm-b`).

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use super::*;
use crate::{Ca, CaOptions, LocalKey, SpiffeId, TokenStore, TrustDomain};

struct TestIdentity {
    ca: Ca,
    tokens: TokenStore,
}

#[async_trait]
impl Identity for TestIdentity {
    async fn enrol(
        &self,
        request: tonic::Request<EnrolRequest>,
    ) -> Result<tonic::Response<EnrolResponse>, tonic::Status> {
        let r = request.into_inner();
        self.tokens.redeem(&r.token, &r.node)?;
        let id = SpiffeId::node(self.ca.trust_domain(), &r.node)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let issued = self.ca.sign_workload(&r.csr_pem, &id, None)?;
        Ok(tonic::Response::new(issued.into()))
    }

    async fn sign(
        &self,
        request: tonic::Request<SignRequest>,
    ) -> Result<tonic::Response<SignResponse>, tonic::Status> {
        let r = request.into_inner();
        let td = self.ca.trust_domain();
        let id = if r.service.is_empty() {
            SpiffeId::node(td, "vm-b")
        } else {
            SpiffeId::service(td, &r.service)
        }
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let issued = self
            .ca
            .sign_workload(&r.csr_pem, &id, Some(Duration::from_secs(3600)))?;
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

    async fn watch_bundle(
        &self,
        _request: tonic::Request<BundleRequest>,
    ) -> Result<tonic::Response<BundleStream>, tonic::Status> {
        // The current bundle, then a refusal as discovery sends it when the node is revoked.
        let first = BundleResponse {
            bundle_pem: self.ca.bundle_pem().to_owned(),
            crl_pem: "crl".into(),
        };
        let items = vec![
            Ok(first),
            Err(tonic::Status::permission_denied(format!(
                "node vm-b {REVOKED_MARK}"
            ))),
        ];
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

#[tokio::test]
async fn round_trips_each_method_over_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("pilotfish.local").unwrap();
    let ca = Ca::load_or_create(dir.path(), &td, &CaOptions::default()).unwrap();
    let bundle = ca.bundle_pem().to_owned();
    let tokens = TokenStore::new(dir.path());
    let token = tokens.create("vm-b", Duration::from_secs(3600)).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(TestIdentity { ca, tokens }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );

    let mut client = IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let key = LocalKey::generate().unwrap();
    let node_id = SpiffeId::node(&td, "vm-b").unwrap();

    // Enrol: token + CSR -> node certificate.
    let enrol = EnrolRequest {
        token: token.clone(),
        node: "vm-b".into(),
        csr_pem: key.csr_pem(&node_id).unwrap(),
    };
    let resp = client.enrol(enrol.clone()).await.unwrap().into_inner();
    assert_eq!(crate::parse_cert_pem(&resp.cert_pem).unwrap().id, node_id);
    assert_eq!(resp.bundle_pem, bundle);
    assert!(resp.chain_pem.is_empty());
    assert!(resp.not_after_unix_secs > 0);

    // The token is spent; the refusal reaches the client with its reason.
    let err = client.enrol(enrol).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{}", err.message());

    // WatchBundle: messages, then the stream's end status.
    let mut watch = client
        .watch_bundle(BundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        (first.bundle_pem.as_str(), first.crl_pem.as_str()),
        (bundle.as_str(), "crl")
    );
    let end = watch.message().await.unwrap_err();
    assert!(is_revoked(&end), "{end:?}");

    // Sign: renew the node certificate, then a service certificate.
    let resp = client
        .sign(SignRequest {
            csr_pem: key.csr_pem(&node_id).unwrap(),
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(crate::parse_cert_pem(&resp.cert_pem).unwrap().id, node_id);
    let svc = SpiffeId::service(&td, "reviews").unwrap();
    let resp = client
        .sign(SignRequest {
            csr_pem: key.csr_pem(&svc).unwrap(),
            service: "reviews".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let info = crate::parse_cert_pem(&resp.cert_pem).unwrap();
    assert_eq!(info.id, svc);
    assert_eq!(
        resp.not_after_unix_secs,
        info.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs()
    );

    // A CSR for another identity is refused as PermissionDenied.
    let err = client
        .sign(SignRequest {
            csr_pem: key.csr_pem(&svc).unwrap(),
            service: "ratings".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // Bundle.
    let resp = client.bundle(BundleRequest {}).await.unwrap().into_inner();
    assert_eq!(resp.bundle_pem, bundle);

    // Oversized requests are refused before the service sees them.
    let err = client
        .sign(SignRequest {
            csr_pem: "x".repeat(DEFAULT_MAX_REQUEST_BYTES + 1),
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn messages_encode_as_the_documented_proto() {
    use prost::Message;
    let req = SignRequest {
        csr_pem: "a".into(),
        service: "b".into(),
    };
    // field 1 (len-delimited) "a", field 2 "b"
    assert_eq!(req.encode_to_vec(), vec![0x0a, 1, b'a', 0x12, 1, b'b']);
    let resp = SignResponse {
        not_after_unix_secs: 1,
        ..Default::default()
    };
    assert_eq!(resp.encode_to_vec(), vec![0x20, 1]);
}
