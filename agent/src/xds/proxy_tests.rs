//! The proxy between a fake Envoy (a tonic client on the Unix socket) and a fake discovery (a
#![allow(clippy::unwrap_used)]
//! tonic server on 127.0.0.1), both in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use super::*;
use crate::testutil::wait_until;
use crate::xds::cache::tests::cluster;
use crate::xds::cache::CLUSTER;
use crate::xds::upstream::DialBackoff;

const STEP: Duration = Duration::from_secs(10);

/// Answers the first request of each type with one cluster "a"; reports every request it sees.
#[derive(Clone)]
struct FakeDiscovery {
    seen: mpsc::UnboundedSender<DiscoveryRequest>,
    kill: CancellationToken,
    /// Ends the SotW streams open now (see [`Discovery::end_streams`]).
    ending: Arc<std::sync::Mutex<Arc<Ending>>>,
}

/// How the SotW streams open now end, once `token` is cancelled: with `status`, or cleanly.
#[derive(Default)]
struct Ending {
    token: CancellationToken,
    status: std::sync::Mutex<Option<Status>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeDiscovery {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        let kill = self.kill.clone();
        let ending = self.ending.lock().unwrap().clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let req = tokio::select! {
                    r = inbound.message() => r,
                    _ = kill.cancelled() => return, // drops tx: the stream ends
                    _ = ending.token.cancelled() => {
                        let status = ending.status.lock().unwrap().clone();
                        if let Some(status) = status {
                            let _ = tx.send(Err(status)).await;
                        }
                        return;
                    }
                };
                let Ok(Some(req)) = req else { return };
                let _ = seen.send(req.clone());
                if req.response_nonce.is_empty() {
                    n += 1;
                    let resp = DiscoveryResponse {
                        type_url: req.type_url.clone(),
                        version_info: format!("v{n}"),
                        nonce: format!("up-{n}"),
                        resources: vec![cluster("a")],
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut inbound = request.into_inner();
        let kill = self.kill.clone();
        tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    r = inbound.message() => r,
                    _ = kill.cancelled() => return,
                };
                let Ok(Some(req)) = req else { return };
                if req.response_nonce.is_empty() {
                    let resp = DeltaDiscoveryResponse {
                        type_url: req.type_url.clone(),
                        nonce: "delta-1".into(),
                        resources: vec![Resource {
                            name: "a".into(),
                            version: "1".into(),
                            resource: Some(cluster("a")),
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Discovery {
    addr: SocketAddr,
    kill: CancellationToken,
    task: JoinHandle<()>,
    seen: mpsc::UnboundedReceiver<DiscoveryRequest>,
    ending: Arc<std::sync::Mutex<Arc<Ending>>>,
}

impl Discovery {
    async fn start(addr: SocketAddr) -> Discovery {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let kill = CancellationToken::new();
        let svc = FakeDiscovery {
            seen: seen_tx,
            kill: kill.clone(),
            ending: Arc::default(),
        };
        let ending = svc.ending.clone();
        let k = kill.clone();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(svc))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), k.cancelled_owned())
                .await;
        });
        Discovery {
            addr,
            kill,
            task,
            seen,
            ending,
        }
    }

    /// Ends the SotW streams open now with `status` (`None`: cleanly); the server stays up
    /// and later streams are served.
    fn end_streams(&self, status: Option<Status>) {
        let now = std::mem::take(&mut *self.ending.lock().unwrap());
        *now.status.lock().unwrap() = status;
        now.token.cancel();
    }

    async fn stop(self) -> SocketAddr {
        self.kill.cancel();
        self.task.await.unwrap();
        self.addr
    }
}

struct Agent {
    socket: PathBuf,
    cache: SharedCache,
    status: Arc<AgentStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ProxyError>>,
}

impl Agent {
    fn start(dir: &Path, discovery: SocketAddr, cache: XdsCache) -> Agent {
        Agent::start_replicas(dir, &[discovery], cache)
    }

    /// An agent whose replicas are `replicas`, tried in that order.
    fn start_replicas(dir: &Path, replicas: &[SocketAddr], cache: XdsCache) -> Agent {
        let socket = dir.join("xds.sock");
        // A stale socket file from a "previous run" must not stop the agent.
        std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let listener = bind(&socket).unwrap();
        let cache = SharedCache::new(cache);
        let status = Arc::new(AgentStatus::default());
        let upstream = Upstream::new(
            replicas.iter().map(|r| r.to_string()).collect(),
            DialBackoff::new(Duration::from_millis(50), Duration::from_millis(200)),
        );
        let proxy = XdsProxy::new(upstream, cache.clone(), status.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(proxy.run(listener, shutdown.clone()));
        Agent {
            socket,
            cache,
            status,
            shutdown,
            task,
        }
    }

    async fn client(&self) -> AggregatedDiscoveryServiceClient<Channel> {
        let path = self.socket.clone();
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
        AggregatedDiscoveryServiceClient::new(channel)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(STEP, self.task)
            .await
            .expect("proxy stops")
            .unwrap()
            .unwrap();
    }
}

/// A fake Envoy's SotW stream: a sender for requests and the response stream.
async fn sotw_stream(
    client: &mut AggregatedDiscoveryServiceClient<Channel>,
) -> (
    mpsc::UnboundedSender<DiscoveryRequest>,
    Streaming<DiscoveryResponse>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stream = client
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

fn cds_request(nonce: &str, with_node: bool) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: nonce.into(),
        node: with_node.then(|| Node {
            id: "vm-test".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn next<T>(stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
    tokio::time::timeout(STEP, stream.message())
        .await
        .expect("no answer in time")
}

#[tokio::test]
async fn relays_sotw_and_caches_what_envoy_acks_then_serves_the_cache_when_discovery_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut discovery = Discovery::start("127.0.0.1:0".parse().unwrap()).await;
    let agent = Agent::start(dir.path(), discovery.addr, XdsCache::default());
    let mut client = agent.client().await;

    // Envoy -> agent -> discovery, node and nonces verbatim.
    let (tx, mut responses) = sotw_stream(&mut client).await;
    tx.send(cds_request("", true)).unwrap();
    let first = discovery.seen.recv().await.unwrap();
    assert_eq!(first.node.unwrap().id, "vm-test");
    let resp = next(&mut responses).await.unwrap().unwrap();
    assert_eq!(resp.nonce, "up-1");
    assert_eq!(resp.resources, vec![cluster("a")]);
    assert!(agent.status.upstream_connected());
    assert!(agent.cache.is_empty(), "nothing cached before Envoy ACKs");

    tx.send(cds_request("up-1", false)).unwrap();
    let ack = discovery.seen.recv().await.unwrap();
    assert_eq!(ack.response_nonce, "up-1");
    wait_until(STEP, || async { !agent.cache.is_empty() }).await;
    let cached = agent.cache.snapshot();
    assert!(cached.resources(CLUSTER).unwrap().contains_key("a"));

    // Discovery dies: Envoy's stream ends with UNAVAILABLE so it restarts its sequence.
    let addr = discovery.stop().await;
    let end = next(&mut responses).await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    wait_until(STEP, || async { !agent.status.upstream_connected() }).await;

    // Envoy reconnects; discovery is unreachable, so the agent answers from its cache.
    let (tx, mut responses) = sotw_stream(&mut client).await;
    tx.send(cds_request("", true)).unwrap();
    let resp = next(&mut responses).await.unwrap().unwrap();
    assert_eq!(resp.resources, vec![cluster("a")]);
    assert!(
        resp.version_info.starts_with("cached-"),
        "{}",
        resp.version_info
    );
    assert!(agent.status.served_from_cache());
    tx.send(cds_request(&resp.nonce, false)).unwrap();

    // Discovery comes back: the cached stream ends so Envoy reconnects through the relay.
    let mut discovery = Discovery::start(addr).await;
    let end = next(&mut responses).await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    wait_until(STEP, || async { !agent.status.served_from_cache() }).await;
    let (tx, mut responses) = sotw_stream(&mut client).await;
    tx.send(cds_request("", true)).unwrap();
    assert_eq!(next(&mut responses).await.unwrap().unwrap().nonce, "up-1");
    assert!(discovery.seen.recv().await.is_some());

    agent.stop().await;
    discovery.stop().await;
}

#[tokio::test]
async fn a_new_stream_closes_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let discovery = Discovery::start("127.0.0.1:0".parse().unwrap()).await;
    let agent = Agent::start(dir.path(), discovery.addr, XdsCache::default());
    let mut client = agent.client().await;
    let (tx1, mut old) = sotw_stream(&mut client).await;
    tx1.send(cds_request("", true)).unwrap();
    assert!(next(&mut old).await.unwrap().is_some());

    let (tx2, mut new) = sotw_stream(&mut client).await;
    tx2.send(cds_request("", true)).unwrap();
    assert!(next(&mut new).await.unwrap().is_some());
    let end = next(&mut old).await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);

    agent.stop().await;
    discovery.stop().await;
}

#[tokio::test]
async fn unreachable_discovery_with_an_empty_cache_is_unavailable_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::testutil::free_port();
    let agent = Agent::start(
        dir.path(),
        ([127, 0, 0, 1], port).into(),
        XdsCache::default(),
    );
    let mut client = agent.client().await;
    for _ in 0..3 {
        let (tx, mut responses) = sotw_stream(&mut client).await;
        // The agent may answer before reading anything, closing the request side.
        let _ = tx.send(cds_request("", true));
        let end = next(&mut responses).await.unwrap_err();
        assert_eq!(end.code(), Code::Unavailable);
    }
    agent.stop().await;
}

#[tokio::test]
async fn relays_delta_and_caches_acked_resources() {
    let dir = tempfile::tempdir().unwrap();
    let discovery = Discovery::start("127.0.0.1:0".parse().unwrap()).await;
    let agent = Agent::start(dir.path(), discovery.addr, XdsCache::default());
    let mut client = agent.client().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut responses = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .unwrap();
    let resp = next(&mut responses).await.unwrap().unwrap();
    assert_eq!(resp.nonce, "delta-1");
    // The ACK puts the resource in the cache.
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: "delta-1".into(),
        ..Default::default()
    })
    .unwrap();
    wait_until(STEP, || async { !agent.cache.is_empty() }).await;
    assert_eq!(
        agent.cache.snapshot().resources(CLUSTER).unwrap()["a"].version,
        "1"
    );
    agent.stop().await;
    discovery.stop().await;
}

#[tokio::test]
async fn a_cache_loaded_from_disk_serves_a_delta_envoy_without_discovery() {
    let dir = tempfile::tempdir().unwrap();
    let mut cache = XdsCache::default();
    cache.apply_sotw(&crate::xds::cache::tests::sotw(
        CLUSTER,
        "9",
        vec![cluster("a")],
    ));
    let path = dir.path().join("xds-cache.bin");
    crate::xds::store::save(&path, &cache).await.unwrap();
    let loaded = crate::xds::store::load(&path).await;

    let port = crate::testutil::free_port();
    let agent = Agent::start(dir.path(), ([127, 0, 0, 1], port).into(), loaded);
    let mut client = agent.client().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut responses = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .unwrap();
    let resp = next(&mut responses).await.unwrap().unwrap();
    assert_eq!(resp.resources.len(), 1);
    assert_eq!(resp.resources[0].name, "a");
    assert_eq!(resp.resources[0].resource, Some(cluster("a")));
    agent.stop().await;
}

/// A broken stream sends the reconnect to the next replica even though the first one still
/// accepts connections; a stream closed for its age goes back to the first choice.
#[tokio::test]
async fn a_broken_stream_fails_over_and_an_aged_out_one_returns_to_the_first_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Discovery::start("127.0.0.1:0".parse().unwrap()).await;
    let mut second = Discovery::start("127.0.0.1:0".parse().unwrap()).await;
    let agent = Agent::start_replicas(dir.path(), &[first.addr, second.addr], XdsCache::default());
    let mut client = agent.client().await;
    // Envoy's reconnect: a new stream, the request again.
    let mut reconnect = async || {
        let (tx, mut responses) = sotw_stream(&mut client).await;
        tx.send(cds_request("", true)).unwrap();
        assert!(next(&mut responses).await.unwrap().is_some());
        (tx, responses)
    };

    let (_tx, mut responses) = reconnect().await;
    assert!(
        first.seen.recv().await.is_some(),
        "the first replica serves"
    );
    first.end_streams(Some(pilotfish_pki::wire::ads::aged_out()));
    assert_eq!(
        next(&mut responses).await.unwrap_err().code(),
        Code::Unavailable
    );
    let (_tx, mut responses) = reconnect().await;
    assert!(
        first.seen.recv().await.is_some(),
        "an aged-out stream comes back to the first choice"
    );

    first.end_streams(Some(Status::internal("replica failing")));
    assert_eq!(
        next(&mut responses).await.unwrap_err().code(),
        Code::Unavailable
    );
    let (_tx, _responses) = reconnect().await;
    assert!(second.seen.recv().await.is_some(), "failed over");
    assert!(
        first.seen.try_recv().is_err(),
        "without trying the failed one, which still accepts connections"
    );

    agent.stop().await;
    first.stop().await;
    second.stop().await;
}
