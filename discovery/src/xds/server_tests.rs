//! The gRPC shell over a real TCP port: both variants, node check, pushes on snapshot change.

use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use pilotfish_registries::model::{Catalog, Instance, Origin, Protocol, Service};
use tokio_stream::StreamExt;

use super::*;
use crate::resources::CLUSTER;
use crate::translate::Shared;
use crate::xds::testing::node;

fn catalog(services: &[&str]) -> Arc<Catalog> {
    let mut c = Catalog::default();
    for s in services {
        c.services.insert(
            s.to_string(),
            Service {
                name: s.to_string(),
                protocol: Protocol::Http,
                port: 9080,
                upstreams: None,
                instances: vec![Instance {
                    node: Some("vm-b".into()),
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

fn snapshot(generation: u64, services: &[&str]) -> Arc<MeshSnapshot> {
    Arc::new(MeshSnapshot::new(
        generation,
        Arc::new(Shared::build(catalog(services))),
    ))
}

struct Running {
    client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    snapshots: watch::Sender<Arc<MeshSnapshot>>,
    connections: Connections,
    metrics: Arc<XdsMetrics>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start(initial: Arc<MeshSnapshot>) -> Running {
    start_aging(initial, AdsOptions::default().max_stream_age).await
}

async fn start_aging(initial: Arc<MeshSnapshot>, max_stream_age: Duration) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (snapshots, rx) = watch::channel(initial);
    let connections = Connections::default();
    let metrics = Arc::new(XdsMetrics::default());
    let server = AdsServer::new(
        rx,
        connections.clone(),
        metrics.clone(),
        AdsOptions {
            control_plane: "cp-test".into(),
            max_stream_age,
            ..AdsOptions::default()
        },
    );
    let shutdown = CancellationToken::new();
    let debug = crate::proxy_config::HostService::new(Default::default(), None, shutdown.clone());
    let server = tokio::spawn(crate::grpc::serve_plain(
        server,
        debug,
        listener,
        shutdown.clone(),
    ));
    let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Running {
        client,
        snapshots,
        connections,
        metrics,
        shutdown,
        server,
    }
}

async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a response in time")
        .expect("stream ok")
        .expect("not ended")
}

/// Waits for `condition` with a deadline.
async fn eventually(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn sotw_stream_answers_acks_and_pushes_changes() {
    let mut r = start(snapshot(1, &["a"])).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: node(),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut responses = r
        .client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = next(&mut responses).await;
    assert_eq!(first.type_url, CLUSTER);
    assert_eq!(
        first.control_plane.as_ref().map(|c| c.identifier.as_str()),
        Some("cp-test")
    );
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("ack");
    // The ACK is recorded before the next push, so it is not stale.
    let acked = Some(first.version_info.clone());
    eventually(|| {
        r.connections
            .list()
            .first()
            .and_then(|p| p.types.get("cds"))
            .is_some_and(|t| t.acked_version == acked)
    })
    .await;

    r.snapshots.send_replace(snapshot(2, &["a", "b"]));
    let second = next(&mut responses).await;
    assert_ne!(second.version_info, first.version_info);
    assert!(second.resources.len() > first.resources.len());

    let proxies = r.connections.list();
    assert_eq!(proxies.len(), 1);
    assert_eq!(proxies[0].node, "vm-a");
    assert_eq!(proxies[0].types["cds"].pushes, 2);
    assert_eq!(r.metrics.pushes().next(), Some((CLUSTER, 2)));

    drop(tx);
    r.shutdown.cancel();
    r.server.await.expect("joins").expect("serves");
}

#[tokio::test]
async fn delta_stream_is_served_and_missing_node_is_rejected() {
    let mut r = start(snapshot(1, &["a"])).await;
    let request = DeltaDiscoveryRequest {
        node: node(),
        type_url: CLUSTER.into(),
        ..Default::default()
    };
    let mut responses = r
        .client
        .delta_aggregated_resources(
            tokio_stream::iter(vec![request]).chain(tokio_stream::pending()),
        )
        .await
        .expect("stream")
        .into_inner();
    let first = next(&mut responses).await;
    assert_eq!(first.type_url, CLUSTER);
    assert!(!first.resources.is_empty());
    assert!(first.resources.iter().all(|res| !res.version.is_empty()));

    let mut bad = r
        .client
        .stream_aggregated_resources(tokio_stream::iter(vec![DiscoveryRequest {
            type_url: CLUSTER.into(),
            ..Default::default()
        }]))
        .await
        .expect("stream")
        .into_inner();
    let status = bad.message().await.expect_err("rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "missing node information");

    r.shutdown.cancel();
    r.server.await.expect("joins").expect("serves");
}

#[tokio::test]
async fn streams_wait_for_the_first_real_snapshot() {
    let mut r = start(Arc::new(MeshSnapshot::placeholder())).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: node(),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut responses = r
        .client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let early = tokio::time::timeout(Duration::from_millis(200), responses.message()).await;
    assert!(
        early.is_err(),
        "nothing is served before the first snapshot"
    );
    r.snapshots.send_replace(snapshot(1, &["a"]));
    let first = next(&mut responses).await;
    assert!(!first.resources.is_empty());
    r.shutdown.cancel();
    r.server.await.expect("joins").expect("serves");
}

/// A reconnecting Envoy asks for every type at once; its listeners must not arrive before it
/// accepted the clusters they may name.
#[tokio::test]
async fn listeners_wait_for_clusters_when_asked_together() {
    use crate::resources::{ENDPOINT, LISTENER};
    let mut r = start(snapshot(1, &["a"])).await;
    let (tx, rx) = mpsc::channel(8);
    for type_url in [CLUSTER, LISTENER] {
        tx.send(DiscoveryRequest {
            node: node(),
            type_url: type_url.into(),
            ..Default::default()
        })
        .await
        .expect("send");
    }
    let mut responses = r
        .client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let cds = next(&mut responses).await;
    assert_eq!(cds.type_url, CLUSTER, "clusters first");
    tx.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names: vec!["outbound|a".into()],
        ..Default::default()
    })
    .await
    .expect("eds");
    let eds = next(&mut responses).await;
    assert_eq!(
        eds.type_url, ENDPOINT,
        "the listener waits while clusters warm"
    );
    for (type_url, response) in [(CLUSTER, &cds), (ENDPOINT, &eds)] {
        tx.send(DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: if type_url == ENDPOINT {
                vec!["outbound|a".into()]
            } else {
                vec![]
            },
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await
        .expect("ack");
    }
    let lds = next(&mut responses).await;
    assert_eq!(lds.type_url, LISTENER, "then the listener");
    drop(tx);
    r.shutdown.cancel();
    r.server.await.expect("joins").expect("serves");
}

#[test]
fn stream_ages_are_jittered_within_ten_percent() {
    let age = Duration::from_secs(1800);
    assert_eq!(jittered_age(age, 0.0), Duration::from_secs(1620));
    assert_eq!(jittered_age(age, 0.5), age);
    assert!(jittered_age(age, 0.999_999) <= Duration::from_secs(1980));
    assert_eq!(jittered_age(age, 7.0), Duration::from_secs(1980), "clamped");
}

/// A stream closes at its (jittered) maximum age with the status the agent recognises; the
/// proxy reconnects with the version it holds and nothing is sent again.
#[tokio::test]
async fn an_aged_out_stream_closes_and_its_reconnect_costs_no_resources() {
    let mut r = start_aging(snapshot(1, &["a"]), Duration::from_secs(1)).await;
    let cds = |version: &str| DiscoveryRequest {
        node: node(),
        type_url: CLUSTER.into(),
        version_info: version.into(),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(cds("")).await.expect("send");
    let started = tokio::time::Instant::now();
    let mut responses = r
        .client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = next(&mut responses).await;
    let sent = r.connections.list()[0].types["cds"].clone();
    assert_eq!(sent.resources_sent, 1);
    assert!(sent.bytes_sent > 0);

    let end = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("closed in time")
        .expect_err("closed with a status");
    assert!(pilotfish_pki::wire::ads::is_aged_out(&end), "{end:?}");
    let age = started.elapsed();
    assert!(
        age >= Duration::from_millis(850) && age < Duration::from_secs(3),
        "{age:?}"
    );
    eventually(|| r.connections.count() == 0).await;

    let (tx2, rx2) = mpsc::channel(4);
    tx2.send(cds(&first.version_info)).await.expect("send");
    let mut again = r
        .client
        .stream_aggregated_resources(ReceiverStream::new(rx2))
        .await
        .expect("stream")
        .into_inner();
    eventually(|| {
        r.connections.list().first().is_some_and(|p| {
            p.types
                .get("cds")
                .is_some_and(|t| t.acked_version.as_ref() == Some(&first.version_info))
        })
    })
    .await;
    let resumed = r.connections.list()[0].types["cds"].clone();
    assert_eq!((resumed.resources_sent, resumed.bytes_sent), (0, 0));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), again.message())
            .await
            .is_err(),
        "nothing sent"
    );

    drop((tx, tx2));
    r.shutdown.cancel();
    r.server.await.expect("joins").expect("serves");
}
