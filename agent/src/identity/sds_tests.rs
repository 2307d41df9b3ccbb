#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use pilotfish_pki::{CertInfo, SpiffeId, TrustDomain};
use tokio::net::UnixStream;
use tonic::transport::Endpoint;

use super::*;
use crate::testutil::wait_until;

fn td() -> TrustDomain {
    TrustDomain::new("pilotfish.local").unwrap()
}

fn cred(id: SpiffeId, tag: &str) -> Credential {
    let now = SystemTime::now();
    Credential {
        chain_pem: format!("CHAIN {tag}"),
        key_pem: format!("KEY {tag}"),
        info: CertInfo {
            id,
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        },
    }
}

fn with_service(ids: &Identities, name: &str, tag: &str) -> Identities {
    let mut ids = ids.clone();
    ids.services.insert(
        name.into(),
        cred(SpiffeId::service(&td(), name).unwrap(), tag),
    );
    ids
}

fn base() -> Identities {
    Identities {
        node: Some(cred(SpiffeId::node(&td(), "vm-b").unwrap(), "node")),
        bundle_pem: Some("ROOTS".into()),
        crl_pem: None,
        services: Default::default(),
    }
}

fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn nack(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: "bad secret".into(),
            details: vec![],
        }),
        ..req(names, version, nonce)
    }
}

fn decode(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn chain_of(s: &Secret) -> String {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            match t.certificate_chain.as_ref().unwrap().specifier.as_ref() {
                Some(Specifier::InlineString(s)) => s.clone(),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("not a tls certificate: {other:?}"),
    }
}

#[test]
fn secrets_have_the_contract_shapes() {
    let ids = with_service(&base(), "reviews", "r1");
    let s = secret("service/reviews", &ids).unwrap();
    assert_eq!(s.name, "service/reviews");
    assert_eq!(chain_of(&s), "CHAIN r1");
    let Some(secret::Type::TlsCertificate(t)) = &s.r#type else {
        panic!()
    };
    assert_eq!(
        t.private_key.as_ref().unwrap().specifier,
        Some(Specifier::InlineString("KEY r1".into()))
    );
    assert_eq!(chain_of(&secret("node", &ids).unwrap()), "CHAIN node");
    let Some(secret::Type::ValidationContext(v)) = secret("roots", &ids).unwrap().r#type else {
        panic!()
    };
    assert_eq!(
        v.trusted_ca.unwrap().specifier,
        Some(Specifier::InlineString("ROOTS".into()))
    );
    assert!(v.crl.is_none() && !v.only_verify_leaf_cert_crl);
    // With revocations: the CRL, checked for the leaf only.
    let revoking = Identities {
        crl_pem: Some("CRL".into()),
        ..ids.clone()
    };
    let Some(secret::Type::ValidationContext(v)) = secret("roots", &revoking).unwrap().r#type
    else {
        panic!()
    };
    assert_eq!(
        v.crl.unwrap().specifier,
        Some(Specifier::InlineString("CRL".into()))
    );
    assert!(v.only_verify_leaf_cert_crl);
    assert!(secret("service/ratings", &ids).is_none());
    assert!(secret("service/", &ids).is_none());
    assert!(secret("default", &ids).is_none());
    assert!(secret("node", &Identities::default()).is_none());
}

#[test]
fn request_ack_then_silence() {
    let ids = with_service(&base(), "reviews", "r1");
    let mut s = SdsStream::default();
    let r = s.on_request(&req(&["service/reviews", "roots"], "", ""), &ids);
    let resp = r.response.unwrap();
    assert_eq!(resp.nonce, "1");
    let names: Vec<String> = decode(&resp).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["roots", "service/reviews"]);
    // ACK: nothing to say.
    let r = s.on_request(
        &req(&["service/reviews", "roots"], &resp.version_info, "1"),
        &ids,
    );
    assert_eq!(r, Reply::default());
    // Same content again: no push.
    assert!(s.on_update(&ids).is_none());
    // Versions are content hashes: another stream with the same content agrees.
    let mut other = SdsStream::default();
    let again = other
        .on_request(&req(&["roots", "service/reviews"], "", ""), &ids)
        .response
        .unwrap();
    assert_eq!(again.version_info, resp.version_info);
}

#[test]
fn rotation_is_pushed_with_a_new_version() {
    let ids = with_service(&base(), "reviews", "r1");
    let mut s = SdsStream::default();
    let first = s
        .on_request(&req(&["service/reviews"], "", ""), &ids)
        .response
        .unwrap();
    s.on_request(&req(&["service/reviews"], &first.version_info, "1"), &ids);
    // An unrelated change (the node certificate) is not pushed to this stream.
    let mut node_renewed = ids.clone();
    node_renewed.node = Some(cred(SpiffeId::node(&td(), "vm-b").unwrap(), "node2"));
    assert!(s.on_update(&node_renewed).is_none());
    let rotated = with_service(&node_renewed, "reviews", "r2");
    let push = s.on_update(&rotated).unwrap();
    assert_ne!(push.version_info, first.version_info);
    assert_eq!(push.nonce, "2");
    assert_eq!(chain_of(&decode(&push)[0]), "CHAIN r2");
    // The ACK of the push is quiet.
    let r = s.on_request(
        &req(&["service/reviews"], &push.version_info, "2"),
        &rotated,
    );
    assert!(r.response.is_none());
}

#[test]
fn nack_is_recorded_and_the_version_not_resent() {
    let ids = with_service(&base(), "reviews", "r1");
    let mut s = SdsStream::default();
    let first = s
        .on_request(&req(&["service/reviews"], "", ""), &ids)
        .response
        .unwrap();
    let r = s.on_request(&nack(&["service/reviews"], "", "1"), &ids);
    assert_eq!(r.nack.as_deref(), Some("bad secret"));
    assert!(r.response.is_none());
    // Still the same content: nothing to send.
    assert!(s.on_update(&ids).is_none());
    // A real change is sent.
    let push = s.on_update(&with_service(&ids, "reviews", "r2")).unwrap();
    assert_ne!(push.version_info, first.version_info);
}

#[test]
fn stale_nonces_are_ignored() {
    let ids = with_service(&base(), "reviews", "r1");
    let mut s = SdsStream::default();
    s.on_request(&req(&["service/reviews"], "", ""), &ids);
    let push = s.on_update(&with_service(&ids, "reviews", "r2")).unwrap();
    assert_eq!(push.nonce, "2");
    // Envoy's ACK of nonce 1 arrives after we sent nonce 2; even with a new name it is stale.
    let r = s.on_request(&req(&["service/reviews", "roots"], "v", "1"), &ids);
    assert!(r.stale);
    assert!(r.response.is_none());
    assert_eq!(s.requested().len(), 1);
}

#[test]
fn unknown_names_wait_until_they_exist() {
    let ids = base();
    let mut s = SdsStream::default();
    let r = s.on_request(&req(&["service/ratings"], "", ""), &ids);
    assert!(r.response.is_none());
    assert!(s.on_update(&with_service(&ids, "reviews", "r1")).is_none());
    let now_known = with_service(&ids, "ratings", "t1");
    let push = s.on_update(&now_known).unwrap();
    assert_eq!(decode(&push)[0].name, "service/ratings");
    assert_eq!(push.nonce, "1");
}

#[test]
fn added_names_are_answered_on_ack() {
    let ids = with_service(&base(), "reviews", "r1");
    let mut s = SdsStream::default();
    let first = s
        .on_request(&req(&["service/reviews"], "", ""), &ids)
        .response
        .unwrap();
    let r = s.on_request(
        &req(&["service/reviews", "roots"], &first.version_info, "1"),
        &ids,
    );
    let resp = r.response.unwrap();
    assert_eq!(decode(&resp).len(), 2);
}

async fn client(
    path: std::path::PathBuf,
) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    let channel = Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    SecretDiscoveryServiceClient::new(channel)
}

/// The server over its Unix socket: 0600, answers what it has, records wanted services, pushes
/// a rotation on the open stream.
#[tokio::test]
async fn serves_and_pushes_over_the_unix_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sds.sock");
    std::os::unix::net::UnixListener::bind(&path).unwrap(); // a stale socket file
    let listener = bind(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (tx, rx) = watch::channel(Arc::new(with_service(&base(), "reviews", "r1")));
    let wanted = Arc::new(Wanted::default());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(SdsServer::new(rx, wanted.clone()).run(listener, shutdown.clone()));

    let mut c = client(path.clone()).await;
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    req_tx
        .send(req(
            &["service/reviews", "service/ratings", "roots"],
            "",
            "",
        ))
        .unwrap();
    let mut responses = c
        .stream_secrets(tokio_stream::wrappers::UnboundedReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let names: Vec<String> = decode(&first).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["roots", "service/reviews"]);
    assert_eq!(
        wanted.names().into_iter().collect::<Vec<_>>(),
        ["ratings", "reviews"]
    );
    req_tx
        .send(req(
            &["service/reviews", "service/ratings", "roots"],
            &first.version_info,
            &first.nonce,
        ))
        .unwrap();

    // The manager obtains ratings and rotates reviews: one push with both.
    let next = with_service(&with_service(&base(), "reviews", "r2"), "ratings", "t1");
    tx.send_replace(Arc::new(next));
    let push = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let secrets = decode(&push);
    assert_eq!(secrets.len(), 3);
    assert_eq!(chain_of(&secrets[2]), "CHAIN r2");
    assert_ne!(push.version_info, first.version_info);

    // Delta is not served.
    let err = c.delta_secrets(tokio_stream::empty()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    shutdown.cancel();
    wait_until(Duration::from_secs(5), || async { server.is_finished() }).await;
    server.await.unwrap().unwrap();
}
