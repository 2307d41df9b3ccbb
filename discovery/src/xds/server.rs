//! The gRPC shell around the protocol state: one task per ADS stream.
//!
//! Each stream task reads requests and watches the mesh snapshot channel, feeds both to its
//! [`SotwState`] or [`DeltaState`], and writes the responses into a small bounded channel that
//! tonic drains. A client that does not take a response within the send timeout loses its
//! stream (it reconnects and gets full state), so a slow proxy never holds up the others. While
//! a task waits on a slow client, snapshot changes collapse in the watch channel: a proxy gets
//! the latest snapshot, never a queue of stale ones.
//!
//! Every stream ends after its maximum age, drawn per stream from [0.9, 1.1] x
//! `max_stream_age`, with `UNAVAILABLE` ([`pilotfish_pki::wire::ads::aged_out`]): the agent
//! dials again in its own replica order, so hosts return to a replica that came back, and the
//! jitter keeps streams opened together (after a failover) from closing together. Envoy keeps
//! its config meanwhile and reconnects with the versions it holds, which are not sent again.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use std::convert::Infallible;
use std::task::Poll;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::{Request, Status};
use tracing::{debug, info, info_span, warn, Instrument};

use super::connections::{ConnectionGuard, Connections, StreamKind};
use super::delta::DeltaState;
use super::metrics::{StreamTimer, XdsMetrics};
use super::sotw::SotwState;
use super::stages::Stages;
use super::wire::{AdsBody, BodyItem, Outgoing, Requests};
use super::{Event, ProtocolError, Step};
use crate::identity::PeerAuth;
use crate::mesh::MeshSnapshot;
use crate::proxy::Proxy;
use crate::resources::ProxyResources;
use crate::resources::{short_name, CLUSTER, LISTENER, ROUTE};

/// Largest gRPC message accepted or sent; xDS responses for a large mesh exceed tonic's 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Responses buffered per stream before the stream task waits on the client.
const RESPONSE_QUEUE: usize = 2;
/// Streams that may do their initial sync (the full config, the biggest responses) at once.
/// When thousands of proxies connect together (discovery restarted, a network partition
/// healed) the rest wait their turn in order (the semaphore is fair), while streams already
/// synced keep getting pushes: their tasks never take a permit.
const INITIAL_SYNCS: usize = 64;
/// A stream gives its permit back once settled on its first config, or after this long.
const INITIAL_SYNC_HOLD: Duration = Duration::from_secs(5);

/// The default `max_stream_age` (istiod's `keepaliveMaxServerConnectionAge`).
pub const DEFAULT_MAX_STREAM_AGE: Duration = Duration::from_secs(30 * 60);

/// A stream's maximum age: `age` x [0.9, 1.1], by `unit` in [0, 1).
pub fn jittered_age(age: Duration, unit: f64) -> Duration {
    age.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

#[derive(Debug, Clone)]
pub struct AdsOptions {
    /// `control_plane.identifier` in every response.
    pub control_plane: String,
    /// How long a client may take to accept a response before its stream is dropped.
    pub send_timeout: Duration,
    /// Streams are closed after about this long (+-10%, per stream) so clients rebalance
    /// across replicas; connections get a GOAWAY after it.
    pub max_stream_age: Duration,
    /// Who may open a stream: `Some` requires a node client certificate and binds the stream to
    /// that node; `None` is insecure mode (anyone, as any node; logged on every stream).
    pub auth: Option<PeerAuth>,
}

impl Default for AdsOptions {
    fn default() -> Self {
        AdsOptions {
            control_plane: "pilotfish-discovery".into(),
            send_timeout: Duration::from_secs(30),
            max_stream_age: DEFAULT_MAX_STREAM_AGE,
            auth: None,
        }
    }
}

/// The ADS server: serves both protocol variants on one listener.
pub struct AdsServer {
    service: AdsService,
}

impl AdsServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<MeshSnapshot>>,
        connections: Connections,
        metrics: Arc<XdsMetrics>,
        options: AdsOptions,
    ) -> AdsServer {
        AdsServer {
            service: AdsService {
                snapshots,
                connections,
                metrics,
                control_plane: options.control_plane.into(),
                send_timeout: options.send_timeout,
                auth: options.auth,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                initial_syncs: Arc::new(Semaphore::new(INITIAL_SYNCS)),
                max_stream_age: options.max_stream_age,
            },
        }
    }

    /// The gRPC service, for the router of the gRPC port ([`crate::grpc`]), and what that
    /// port needs to know: how long a connection may live, and the stream tasks to wait for
    /// once it stops.
    pub fn into_parts(self, shutdown: CancellationToken) -> AdsParts {
        let mut service = self.service;
        service.shutdown = shutdown;
        let tracker = service.tracker.clone();
        // Connections outlive their ADS streams a little: the streams close themselves first,
        // each at its own jittered age; the GOAWAY then only ends what else the connection
        // carried (a bundle watch), which the agent reopens.
        let max_connection_age = service.max_stream_age.mul_f64(1.2);
        AdsParts {
            routes: Routes::new(service),
            tasks: tracker,
            max_connection_age,
        }
    }
}

/// [`AdsServer::into_parts`].
pub struct AdsParts {
    pub routes: Routes,
    pub tasks: TaskTracker,
    pub max_connection_age: Duration,
}

#[derive(Clone)]
struct AdsService {
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    connections: Connections,
    metrics: Arc<XdsMetrics>,
    control_plane: Arc<str>,
    send_timeout: Duration,
    auth: Option<PeerAuth>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Admission: streams doing their initial sync at once (see [`INITIAL_SYNCS`]).
    initial_syncs: Arc<Semaphore>,
    max_stream_age: Duration,
}

impl AdsService {
    /// The node a stream is bound to (from its client certificate), before anything is read.
    fn authorize<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        match &self.auth {
            Some(auth) => auth.node("ads", request).map(Some),
            None => {
                warn!("INSECURE MODE: accepting an ADS stream without authentication");
                Ok(None)
            }
        }
    }
}

/// The gRPC name of the service, for the router.
impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

/// ADS by hand rather than through generated code: requests are decoded by tonic, responses
/// are written as pre-encoded frames ([`wire`]), so every stream sends the same shared bytes.
impl Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let response = match request.uri().path().rsplit('/').next() {
            Some("StreamAggregatedResources") => self.open::<SotwState>(request),
            Some("DeltaAggregatedResources") => self.open::<DeltaState>(request),
            _ => Status::unimplemented("no such ADS method").into_http(),
        };
        std::future::ready(Ok(response))
    }
}

impl AdsService {
    /// Authorizes a new stream and starts its task; the response body carries what it sends.
    fn open<S: StreamState>(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let (parts, body) = request.into_parts();
        let bound = match self.authorize(&Request::from_http(http::Request::from_parts(parts, ())))
        {
            Ok(bound) => bound,
            Err(status) => return status.into_http(),
        };
        let inbound = Requests::<S::Request>::new(body, MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        self.tracker
            .spawn(serve_stream::<S>(self.clone(), bound, inbound, tx));
        let mut response = http::Response::new(tonic::body::Body::new(AdsBody::new(rx)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

/// What the stream loop needs from a protocol variant.
trait StreamState: Sized + Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: prost::Message + Default + Send + 'static;
    const KIND: StreamKind;
    fn new(control_plane: &str, node: &str, resources: ProxyResources) -> Self;
    fn node(request: &Self::Request) -> Option<&Node>;
    fn type_url(request: &Self::Request) -> &str;
    fn response_type(response: &Self::Response) -> &str;
    fn on_request(
        &mut self,
        request: Self::Request,
    ) -> Result<Step<Outgoing<Self::Response>>, ProtocolError>;
    fn on_resources(&mut self, resources: ProxyResources) -> Step<Outgoing<Self::Response>>;
    fn settled(&self) -> bool;
    fn forget_rejections(&mut self);
}

impl StreamState for SotwState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const KIND: StreamKind = StreamKind::Sotw;
    fn new(control_plane: &str, node: &str, resources: ProxyResources) -> Self {
        SotwState::new(control_plane, node, resources)
    }
    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }
    fn response_type(response: &DiscoveryResponse) -> &str {
        &response.type_url
    }
    fn on_request(
        &mut self,
        request: DiscoveryRequest,
    ) -> Result<Step<Outgoing<DiscoveryResponse>>, ProtocolError> {
        SotwState::on_request(self, request)
    }
    fn on_resources(&mut self, resources: ProxyResources) -> Step<Outgoing<DiscoveryResponse>> {
        SotwState::on_resources(self, resources)
    }
    fn settled(&self) -> bool {
        SotwState::settled(self)
    }
    fn forget_rejections(&mut self) {
        SotwState::forget_rejections(self)
    }
}

impl StreamState for DeltaState {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const KIND: StreamKind = StreamKind::Delta;
    fn new(control_plane: &str, node: &str, resources: ProxyResources) -> Self {
        DeltaState::new(control_plane, node, resources)
    }
    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }
    fn response_type(response: &DeltaDiscoveryResponse) -> &str {
        &response.type_url
    }
    fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
    ) -> Result<Step<Outgoing<DeltaDiscoveryResponse>>, ProtocolError> {
        DeltaState::on_request(self, request)
    }
    fn on_resources(
        &mut self,
        resources: ProxyResources,
    ) -> Step<Outgoing<DeltaDiscoveryResponse>> {
        DeltaState::on_resources(self, resources)
    }
    fn settled(&self) -> bool {
        DeltaState::settled(self)
    }
    fn forget_rejections(&mut self) {
        DeltaState::forget_rejections(self)
    }
}

type Responses = mpsc::Sender<BodyItem>;

/// `bound`: the node of the client certificate (secure mode); the first request's `node.id`
/// must name it, and [`check_node`](super::check_node) keeps it fixed for the stream.
async fn serve_stream<S: StreamState>(
    svc: AdsService,
    bound: Option<String>,
    mut inbound: Requests<S::Request>,
    tx: Responses,
) {
    let first = tokio::select! {
        _ = svc.shutdown.cancelled() => return,
        message = inbound.message() => match message {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(status) => {
                debug!(%status, "ADS stream failed before its first request");
                return;
            }
        },
    };
    if let (Some(bound), Some(auth), Some(node)) = (&bound, &svc.auth, S::node(&first)) {
        if node.id != *bound {
            let _ = tx.send(Err(auth.node_mismatch(bound, &node.id))).await;
            return;
        }
    }
    let proxy = match Proxy::from_node(S::node(&first)) {
        Ok(proxy) => proxy,
        Err(e) => {
            warn!(error = %e, "rejecting ADS stream");
            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
            return;
        }
    };
    let span = info_span!("ads", node = %proxy.node, stream = ?S::KIND);
    let (agent, envoy) = crate::proxy::versions(S::node(&first));
    let guard = svc.connections.register_proxy(
        &proxy.node,
        S::KIND,
        agent,
        envoy,
        Some(Arc::new(proxy.clone())),
    );
    stream_loop::<S>(&svc, proxy, first, inbound, tx, &guard)
        .instrument(span)
        .await;
}

async fn stream_loop<S: StreamState>(
    svc: &AdsService,
    proxy: Proxy,
    first: S::Request,
    mut inbound: Requests<S::Request>,
    tx: Responses,
    guard: &ConnectionGuard,
) {
    info!("proxy connected");
    let mut snapshots = svc.snapshots.clone();
    // Until the first catalog is built there is nothing true to say: an empty answer would
    // make Envoy delete the config it already runs. Requests wait in the stream meanwhile.
    let snapshot = tokio::select! {
        _ = svc.shutdown.cancelled() => return,
        ready = snapshots.wait_for(|s| s.generation > 0) => match ready {
            Ok(s) => Arc::clone(&s),
            Err(_) => return,
        },
    };
    let mut generation = snapshot.generation;
    // When discovery learned of the change behind the snapshot being served, once one arrives
    // while the stream is open: the initial sync is not timed (see `metrics`).
    let mut learned = None;
    let mut timer = StreamTimer::default();
    let initial = snapshot.shared.for_proxy(&proxy);
    drop(snapshot);
    let mut stages = Stages::new(initial.clone());
    let mut state = S::new(&svc.control_plane, &proxy.node, initial);
    // Admission: wait for a turn before answering anything (the first request waits too).
    let mut admission = tokio::select! {
        _ = svc.shutdown.cancelled() => return,
        permit = Arc::clone(&svc.initial_syncs).acquire_owned() => permit.ok(),
    };
    let admitted_until = tokio::time::Instant::now() + INITIAL_SYNC_HOLD;
    let mut sent = 0usize;
    // Make-before-break on (re)connect: a proxy that asks for clusters gets its listeners and
    // routes only once it has accepted the clusters and their assignments. Envoy asks in that
    // order anyway; a reconnecting one (it runs its old config meanwhile) asks for all at once.
    let mut gate = InitialGate::<S::Request>::default();
    let mut next = Some(first);
    // A node revoked while its stream is open is cut off at once.
    let node = proxy.node.clone();
    let revoked = async {
        match &svc.auth {
            Some(auth) => auth.revoked("ads", &node).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(revoked);
    let max_age = jittered_age(svc.max_stream_age, rand::random::<f64>());
    let aged = tokio::time::sleep(max_age);
    tokio::pin!(aged);
    loop {
        let step = match next.take() {
            Some(request) if gate.holds(S::type_url(&request)) => {
                gate.held.push(request);
                continue;
            }
            Some(request) => {
                gate.clusters_answered |= S::type_url(&request) == CLUSTER;
                match state.on_request(request) {
                    Ok(step) => step,
                    Err(e) => {
                        warn!(error = %e, "closing ADS stream");
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
            None if gate.open && !gate.held.is_empty() => {
                next = Some(gate.held.remove(0));
                continue;
            }
            None => tokio::select! {
                _ = svc.shutdown.cancelled() => break,
                status = &mut revoked => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                _ = &mut aged => {
                    info!(age = ?max_age, "closing the stream at its maximum age");
                    svc.metrics.aged_out();
                    let _ = tx.send(Err(pilotfish_pki::wire::ads::aged_out())).await;
                    return;
                }
                _ = tokio::time::sleep_until(admitted_until), if admission.is_some() || !gate.open => {
                    admission = None;
                    gate.open = true;
                    continue;
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        next = Some(request);
                        continue;
                    }
                    Ok(None) => break,
                    Err(status) => {
                        info!(%status, "ADS stream failed");
                        break;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = Arc::clone(&snapshots.borrow_and_update());
                    if snapshot.generation == generation {
                        continue;
                    }
                    generation = snapshot.generation;
                    learned = snapshot.learned_mono;
                    stages.set_target(snapshot.shared.for_proxy(&proxy));
                    // What the proxy rejected is superseded: the chain goes on toward the new
                    // target (a resource still rejected is rejected again, and stops it again).
                    state.forget_rejections();
                    Step::default()
                }
            },
        };
        sent += step.responses.len();
        let sending = Sending {
            generation,
            learned,
            timer: &mut timer,
        };
        if !deliver::<S>(svc, step, sending, &tx, guard).await {
            return;
        }
        // The initial sync is done once the proxy accepted its clusters and assignments, or
        // when a reconnecting proxy needed none of them.
        let nothing_needed = sent == 0 && gate.clusters_answered;
        if admission.is_some() && (sent >= 2 || nothing_needed) && state.settled() {
            admission = None;
        }
        if !gate.open && gate.clusters_asked && (sent >= 1 || nothing_needed) && state.settled() {
            gate.open = true;
        }
        // Make-before-break: the next stage goes out once the proxy accepted the last one.
        while state.settled() {
            let Some(resources) = stages.next_stage() else {
                // It runs this generation's target in full (what a leaving host waits for).
                guard.settled_at(generation);
                break;
            };
            let step = state.on_resources(resources);
            let sending = Sending {
                generation,
                learned,
                timer: &mut timer,
            };
            if !deliver::<S>(svc, step, sending, &tx, guard).await {
                return;
            }
        }
    }
    info!("proxy disconnected");
}

/// Listener and route requests held back until the proxy has its clusters (see
/// `stream_loop`). Opens for good once the proxy settles after asking for clusters, or after
/// [`INITIAL_SYNC_HOLD`]; a stream that never asks for clusters is not held at all.
struct InitialGate<R> {
    open: bool,
    clusters_asked: bool,
    /// A clusters request has been through the protocol state (answered, or found current).
    clusters_answered: bool,
    held: Vec<R>,
}

impl<R> Default for InitialGate<R> {
    fn default() -> Self {
        InitialGate {
            open: false,
            clusters_asked: false,
            clusters_answered: false,
            held: Vec::new(),
        }
    }
}

impl<R> InitialGate<R> {
    /// Whether a request of this type waits.
    fn holds(&mut self, type_url: &str) -> bool {
        if type_url == CLUSTER {
            self.clusters_asked = true;
        }
        !self.open && self.clusters_asked && (type_url == LISTENER || type_url == ROUTE)
    }
}

/// What a step is sent for: the snapshot generation, when its change was learned (if timed),
/// and the stream's convergence timer.
struct Sending<'a> {
    generation: u64,
    learned: Option<tokio::time::Instant>,
    timer: &'a mut StreamTimer,
}

/// Records a step's events and sends its responses; false when the stream is gone.
async fn deliver<S: StreamState>(
    svc: &AdsService,
    step: Step<Outgoing<S::Response>>,
    sending: Sending<'_>,
    tx: &Responses,
    guard: &ConnectionGuard,
) -> bool {
    for event in &step.events {
        guard.record(event);
        svc.metrics.record(event, sending.timer, sending.learned);
        log_event(event, sending.generation);
    }
    for response in step.responses {
        let resources = response.count;
        let type_url = S::response_type(&response.head).to_string();
        let chunks = response.into_chunks();
        let bytes = chunks.iter().map(|c| c.len()).sum();
        match tx.send_timeout(Ok(chunks), svc.send_timeout).await {
            Ok(()) => {
                svc.metrics.sent(&type_url, resources, bytes);
                guard.sent(&type_url, resources, bytes);
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                svc.metrics.send_timeout();
                warn!(
                    timeout = ?svc.send_timeout,
                    "proxy did not accept a response in time; closing its stream"
                );
                return false;
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                info!("proxy disconnected");
                return false;
            }
        }
    }
    true
}

fn log_event(event: &Event, generation: u64) {
    match event {
        Event::Nack {
            type_url,
            version,
            nonce,
            message,
        } => warn!(
            r#type = short_name(type_url),
            nonce = %nonce,
            accepted_version = %version,
            reason = %message,
            "proxy rejected config (NACK)"
        ),
        Event::Ack {
            type_url, version, ..
        } => debug!(r#type = short_name(type_url), version = %version, "ACK"),
        Event::StaleNonce { type_url, nonce } => {
            debug!(r#type = short_name(type_url), nonce = %nonce, "ignoring stale nonce")
        }
        Event::Pushed {
            type_url,
            version,
            resources,
        } => debug!(
            r#type = short_name(type_url),
            version = %version,
            resources,
            generation,
            "pushed"
        ),
        Event::Resumed { type_url, version } => debug!(
            r#type = short_name(type_url),
            version = %version,
            "proxy reconnected with the current version; nothing to send"
        ),
        Event::UnknownType { type_url } => {
            warn!(type_url = %type_url, "proxy asked for a type discovery does not serve")
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
