//! The control plane trusts certificates, never the network: what a client that talks to
//! discovery's gRPC port directly (no agent) gets with no certificate, another node's
//! certificate, or a CSR that asks for more than it may have.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use pilotfish_pki::keys::LocalKey;
use pilotfish_pki::spiffe::{SpiffeId, TrustDomain};
use pilotfish_pki::wire::{IdentityClient, SignRequest};
use pilotfish_tests::mesh::Mesh;
use pilotfish_tests::wait_for;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// A TLS channel to discovery, verifying it as `discovery.pilotfish.local`, optionally with a
/// client certificate read from an agent's state directory.
async fn channel(mesh: &Mesh, client: Option<&Path>) -> Result<Channel> {
    let ca = std::fs::read_to_string(&mesh.ca_file)?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("discovery.pilotfish.local");
    if let Some(state) = client {
        let cert = std::fs::read_to_string(state.join("node.pem"))?;
        let key = std::fs::read_to_string(state.join("node.key"))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(Channel::from_shared(format!("https://{}", mesh.grpc))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Open an ADS stream claiming `node_id` and return the code of the first answer (Ok = config).
async fn ads_as(channel: Channel, node_id: &str) -> Code {
    let request = DiscoveryRequest {
        node: Some(Node {
            id: node_id.to_string(),
            cluster: "pilotfish".into(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        ..Default::default()
    };
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let outbound = tokio_stream::iter(vec![request]).chain(tokio_stream::pending());
    let mut inbound = match client.stream_aggregated_resources(outbound).await {
        Ok(r) => r.into_inner(),
        Err(status) => return status.code(),
    };
    match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
        Ok(Ok(Some(_))) => Code::Ok,
        Ok(Ok(None)) => Code::Aborted,
        Ok(Err(status)) => status.code(),
        Err(_) => Code::DeadlineExceeded,
    }
}

use tokio_stream::StreamExt as _;

async fn enrolled_mesh() -> Result<Mesh> {
    let mut mesh = Mesh::start_secure()?;
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-b", 3)?;
    let (a, b) = (mesh.host("vm-a"), mesh.host("vm-b"));
    let registry = format!(
        "[services.productpage]\nport = 9080\n[[services.productpage.instances]]\nnode = \"vm-a\"\naddress = \"{}\"\nport = 9080\nmesh_port = {}\n\n\
         [services.reviews]\nport = 9080\n[[services.reviews.instances]]\nnode = \"vm-b\"\naddress = \"{}\"\nport = 9080\nmesh_port = {}\n",
        a.ip, a.mesh_port, b.ip, b.mesh_port
    );
    mesh.write_registry("services.toml", &registry)?;
    for node in ["vm-a", "vm-b"] {
        let cert = mesh.host(node).dir.join("state/node.pem");
        wait_for(&format!("{node} enrolled"), Duration::from_secs(30), || {
            let cert = cert.clone();
            async move { Ok(cert.exists().then_some(())) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
    }
    Ok(mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_needs_a_node_certificate_matching_the_node() -> Result<()> {
    let mesh = enrolled_mesh().await?;
    let b_state = mesh.host("vm-b").dir.join("state");

    let anonymous = channel(&mesh, None).await?;
    assert_eq!(
        ads_as(anonymous, "vm-b").await,
        Code::Unauthenticated,
        "no certificate: no config"
    );

    let as_b = channel(&mesh, Some(&b_state)).await?;
    assert_eq!(
        ads_as(as_b.clone(), "vm-a").await,
        Code::PermissionDenied,
        "vm-b's certificate cannot fetch vm-a's config"
    );
    assert_eq!(ads_as(as_b, "vm-b").await, Code::Ok, "its own node works");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_only_for_services_placed_on_the_node() -> Result<()> {
    let mesh = enrolled_mesh().await?;
    let a_state = mesh.host("vm-a").dir.join("state");
    let td = TrustDomain::new("pilotfish.local")?;
    let key = LocalKey::generate()?;

    let mut as_a = IdentityClient::new(channel(&mesh, Some(&a_state)).await?);
    let reviews = SpiffeId::service(&td, "reviews")?;
    let refused = as_a
        .sign(SignRequest {
            csr_pem: key.csr_pem(&reviews)?,
            service: "reviews".into(),
        })
        .await
        .expect_err("reviews is not placed on vm-a");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let productpage = SpiffeId::service(&td, "productpage")?;
    let issued = as_a
        .sign(SignRequest {
            csr_pem: key.csr_pem(&productpage)?,
            service: "productpage".into(),
        })
        .await
        .context("productpage runs on vm-a")?
        .into_inner();
    let info = pilotfish_pki::keys::parse_cert_pem(&issued.cert_pem)?;
    assert_eq!(info.id, productpage);

    // A CSR for the allowed identity plus an extra SAN is refused, whatever the caller may hold.
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![
        rcgen::SanType::URI(productpage.uri().try_into()?),
        rcgen::SanType::URI("spiffe://pilotfish.local/service/reviews".try_into()?),
    ];
    let keypair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let extra = params.serialize_request(&keypair)?.pem()?;
    let refused = as_a
        .sign(SignRequest {
            csr_pem: extra,
            service: "productpage".into(),
        })
        .await
        .expect_err("a CSR with an extra SAN is refused");
    assert!(
        matches!(
            refused.code(),
            Code::InvalidArgument | Code::PermissionDenied
        ),
        "{refused:?}"
    );

    // Without a certificate nothing is signed.
    let mut anonymous = IdentityClient::new(channel(&mesh, None).await?);
    let refused = anonymous
        .sign(SignRequest {
            csr_pem: key.csr_pem(&productpage)?,
            service: "productpage".into(),
        })
        .await
        .expect_err("anonymous callers get nothing");
    assert_eq!(refused.code(), Code::Unauthenticated);
    Ok(())
}
