//! The xDS proxy: Envoy <-> Unix socket <-> agent <-> discovery (xDS checklist b.10).
//!
//! Every ADS stream Envoy opens (SotW or Delta) becomes one session:
//!
//! - a pump copies Envoy's requests into an unbounded queue (so a slow discovery can never
//!   block Envoy's writes and deadlock the bidirectional stream);
//! - the session dials discovery (replicas in order, shared backoff) and opens one upstream
//!   stream fed by that queue; responses come back through a queue of at most 2 entries, so
//!   back-pressure reaches discovery instead of piling up in the agent. Nonces pass verbatim.
//! - when the upstream stream ends or fails, Envoy's stream ends with `UNAVAILABLE`: nonces do
//!   not survive a stream, so Envoy must restart its whole sequence. It reconnects within
//!   500 ms (its backoff restarts at [0, 500 ms) after any response) and sends the versions it
//!   holds, which a replica with the same inputs does not send again. A broken stream marks
//!   its replica failed, so that reconnect goes to another one; a stream discovery closed for
//!   its age does not (the host returns to its first choice).
//! - a new stream from Envoy ends the previous one.
//!
//! Responses Envoy ACKs go into the cache. When no replica can be reached and the cache holds
//! something, the session serves Envoy from it instead, probes discovery in the background,
//! and ends the stream once discovery answers, so Envoy reconnects through the real relay.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient as AdsClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use super::cache::{AckTracker, XdsCache};
use super::fallback::{DeltaFallback, FallbackServer, SotwFallback};
use super::store::SharedCache;
use super::upstream::{Upstream, MAX_MESSAGE_SIZE};
use crate::status::AgentStatus;

/// Discovery -> Envoy queue depth (b.10: bounded, 1-2).
const RESPONSE_QUEUE: usize = 2;
/// How long in-flight gRPC connections get to close after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("xDS socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("xDS proxy server: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Binds the xDS socket: removes a stale socket file left by a previous run and restricts the
/// socket to the agent's user (Envoy runs as the same user).
pub fn bind(path: &Path) -> Result<UnixListener, ProxyError> {
    crate::socket::bind_private(path).map_err(|source| ProxyError::Socket {
        path: path.display().to_string(),
        source,
    })
}

pub struct XdsProxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Upstream,
    cache: SharedCache,
    status: Arc<AgentStatus>,
    /// Cancelled on shutdown; every session token is its child.
    root: CancellationToken,
    /// The token of the session currently serving Envoy.
    current: Mutex<Option<CancellationToken>>,
    tasks: TaskTracker,
    /// The connection the current session relays on (`None` while none does), for the
    /// streams that share it ([`crate::config_dump`]).
    relay: watch::Sender<Option<(u64, Channel)>>,
}

impl XdsProxy {
    pub fn new(upstream: Upstream, cache: SharedCache, status: Arc<AgentStatus>) -> Self {
        XdsProxy {
            inner: Arc::new(Inner {
                upstream,
                cache,
                status,
                root: CancellationToken::new(),
                current: Mutex::new(None),
                tasks: TaskTracker::new(),
                relay: watch::channel(None).0,
            }),
        }
    }

    /// The connection to discovery the relay uses now, numbered (`None` while it has none).
    pub fn relay_channel(&self) -> watch::Receiver<Option<(u64, Channel)>> {
        self.inner.relay.subscribe()
    }

    pub async fn run(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), ProxyError> {
        let inner = self.inner.clone();
        let service = AggregatedDiscoveryServiceServer::new(AdsService(inner.clone()))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let root = inner.root.clone();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                root.cancelled_owned(),
            );
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r,
            _ = shutdown.cancelled() => {
                // Ends every session (Envoy sees UNAVAILABLE), then lets the server close.
                inner.root.cancel();
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!("xDS proxy connections did not close in time");
                        Ok(())
                    }
                }
            }
        };
        inner.root.cancel();
        inner.tasks.close();
        inner.tasks.wait().await;
        result.map_err(ProxyError::Serve)
    }
}

impl Inner {
    /// A token for a new session; the previous session (if any) is ended.
    fn replace_current(&self) -> CancellationToken {
        let token = self.root.child_token();
        let previous = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(token.clone());
        if let Some(previous) = previous {
            if !previous.is_cancelled() {
                info!("registered overlapping stream; closing previous");
                previous.cancel();
            }
        }
        token
    }

    fn open<F: Flavor>(
        self: &Arc<Self>,
        downstream: Streaming<F::Req>,
    ) -> ReceiverStream<Result<F::Resp, Status>> {
        let token = self.replace_current();
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::channel(RESPONSE_QUEUE);
        let span = tracing::info_span!("xds_stream", flavor = F::NAME);
        self.tasks
            .spawn(pump(downstream, req_tx, token.clone()).instrument(span.clone()));
        let inner = self.clone();
        self.tasks.spawn(
            async move {
                inner.session::<F>(req_rx, down_tx, token.clone()).await;
                token.cancel();
            }
            .instrument(span),
        );
        ReceiverStream::new(down_rx)
    }

    async fn session<F: Flavor>(
        self: Arc<Self>,
        req_rx: mpsc::UnboundedReceiver<F::Req>,
        down_tx: mpsc::Sender<Result<F::Resp, Status>>,
        token: CancellationToken,
    ) {
        let channel = tokio::select! {
            c = self.upstream.dial() => c,
            _ = token.cancelled() => return,
        };
        let (channel, replica) = match channel {
            Ok(c) => (c.channel, c.replica),
            Err(e) => {
                if self.cache.is_empty() {
                    warn!(error = %e, "discovery unreachable and nothing cached; Envoy will retry");
                    let _ = down_tx.send(Err(Status::unavailable(e.to_string()))).await;
                } else {
                    warn!(error = %e, "discovery unreachable; serving Envoy from the local cache");
                    self.serve_cached::<F>(req_rx, down_tx, token).await;
                }
                return;
            }
        };
        let tracker = Arc::new(Mutex::new(AckTracker::<F::Resp>::default()));
        let observe = {
            let tracker = tracker.clone();
            let cache = self.cache.clone();
            move |req: F::Req| {
                if let Some((type_url, nonce, nack)) = F::answer(&req) {
                    let accepted = tracker
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .answered(type_url, nonce, nack);
                    if nack {
                        debug!(type_url, nonce, "envoy rejected a response");
                    }
                    if !accepted.is_empty() {
                        cache.update(|c| accepted.iter().fold(false, |ch, r| F::apply(c, r) | ch));
                    }
                }
                req
            }
        };
        let requests = UnboundedReceiverStream::new(req_rx).map(observe);
        let shared = channel.clone();
        let client = AdsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let opened = tokio::select! {
            r = F::open(client, requests) => r,
            _ = token.cancelled() => return,
        };
        let mut upstream = match opened {
            Ok(upstream) => upstream,
            Err(status) => {
                warn!(%status, discovery = %replica, "discovery refused the stream");
                self.upstream.stream_failed();
                self.upstream.replica_failed(&replica);
                let _ = down_tx
                    .send(Err(Status::unavailable(format!(
                        "discovery refused the stream: {status}"
                    ))))
                    .await;
                return;
            }
        };
        let _connected = self.status.upstream_stream();
        let _published = Published::new(&self.relay, shared);
        info!(discovery = %replica, "relaying to discovery");
        let end = loop {
            let msg = tokio::select! {
                m = upstream.message() => m,
                _ = token.cancelled() => break Status::unavailable("stream closed by the agent"),
            };
            match msg {
                Ok(Some(resp)) => {
                    let (type_url, nonce) = F::sent(&resp);
                    tracker.lock().unwrap_or_else(|e| e.into_inner()).sent(
                        type_url,
                        nonce,
                        resp.clone(),
                    );
                    tokio::select! {
                        r = down_tx.send(Ok(resp)) => if r.is_err() { return },
                        _ = token.cancelled() => break Status::unavailable("stream closed by the agent"),
                    }
                }
                Ok(None) => {
                    // Discovery stopping; a replica that only rebalances says so.
                    self.upstream.replica_failed(&replica);
                    break Status::unavailable("discovery ended the stream");
                }
                Err(status) if pilotfish_pki::wire::ads::is_aged_out(&status) => {
                    break Status::unavailable(format!(
                        "discovery rebalances: {}",
                        status.message()
                    ))
                }
                Err(status) => {
                    self.upstream.replica_failed(&replica);
                    break Status::unavailable(format!("discovery stream failed: {status}"));
                }
            }
        };
        info!(discovery = %replica, reason = %end.message(), "xDS stream ended");
        end_stream(&down_tx, end).await;
    }

    async fn serve_cached<F: Flavor>(
        &self,
        mut req_rx: mpsc::UnboundedReceiver<F::Req>,
        down_tx: mpsc::Sender<Result<F::Resp, Status>>,
        token: CancellationToken,
    ) {
        let _cached = self.status.cache_stream();
        let mut server = F::fallback(self.cache.snapshot());
        let probe = self.upstream.wait_reachable();
        tokio::pin!(probe);
        let end = loop {
            tokio::select! {
                _ = token.cancelled() => break Status::unavailable("stream closed by the agent"),
                _ = &mut probe => {
                    info!("discovery reachable again; ending the cached stream");
                    break Status::unavailable("discovery is reachable again; reconnect");
                }
                req = req_rx.recv() => {
                    let Some(req) = req else { return };
                    if let Some(resp) = server.handle(&req) {
                        tokio::select! {
                            r = down_tx.send(Ok(resp)) => if r.is_err() { return },
                            _ = token.cancelled() => return,
                        }
                    }
                }
            }
        };
        end_stream(&down_tx, end).await;
    }
}

/// Ends Envoy's stream with `status`. Bounded: if Envoy stopped reading, dropping the sender
/// ends the stream anyway.
async fn end_stream<T>(down_tx: &mpsc::Sender<Result<T, Status>>, status: Status) {
    let _ = tokio::time::timeout(Duration::from_secs(1), down_tx.send(Err(status))).await;
}

/// Envoy -> queue. Ends the session when Envoy's side ends.
async fn pump<R>(
    mut downstream: Streaming<R>,
    tx: mpsc::UnboundedSender<R>,
    token: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = downstream.message() => m,
            _ = token.cancelled() => return,
        };
        match msg {
            Ok(Some(req)) => {
                if tx.send(req).is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(status) => {
                debug!(%status, "envoy stream failed");
                break;
            }
        }
    }
    token.cancel();
}

/// What differs between SotW and Delta for the proxy.
pub(crate) trait Flavor: Send + Sync + 'static {
    type Req: Send + 'static;
    type Resp: Clone + Send + Sync + 'static;
    type Fallback: FallbackServer<Req = Self::Req, Resp = Self::Resp>;
    const NAME: &'static str;

    fn open(
        client: AdsClient<Channel>,
        requests: impl Stream<Item = Self::Req> + Send + 'static,
    ) -> impl Future<Output = Result<Streaming<Self::Resp>, Status>> + Send;
    /// (type_url, nonce) of a response.
    fn sent(resp: &Self::Resp) -> (&str, &str);
    /// (type_url, nonce, is_nack) when a request answers a response.
    fn answer(req: &Self::Req) -> Option<(&str, &str, bool)>;
    fn apply(cache: &mut XdsCache, resp: &Self::Resp) -> bool;
    fn fallback(cache: XdsCache) -> Self::Fallback;
}

pub(crate) enum Sotw {}

impl Flavor for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    type Fallback = SotwFallback;
    const NAME: &'static str = "sotw";

    async fn open(
        mut client: AdsClient<Channel>,
        requests: impl Stream<Item = DiscoveryRequest> + Send + 'static,
    ) -> Result<Streaming<DiscoveryResponse>, Status> {
        Ok(client
            .stream_aggregated_resources(requests)
            .await?
            .into_inner())
    }

    fn sent(resp: &DiscoveryResponse) -> (&str, &str) {
        (&resp.type_url, &resp.nonce)
    }

    fn answer(req: &DiscoveryRequest) -> Option<(&str, &str, bool)> {
        (!req.response_nonce.is_empty()).then(|| {
            (
                req.type_url.as_str(),
                req.response_nonce.as_str(),
                req.error_detail.is_some(),
            )
        })
    }

    fn apply(cache: &mut XdsCache, resp: &DiscoveryResponse) -> bool {
        cache.apply_sotw(resp)
    }

    fn fallback(cache: XdsCache) -> SotwFallback {
        SotwFallback::new(cache)
    }
}

pub(crate) enum Delta {}

impl Flavor for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    type Fallback = DeltaFallback;
    const NAME: &'static str = "delta";

    async fn open(
        mut client: AdsClient<Channel>,
        requests: impl Stream<Item = DeltaDiscoveryRequest> + Send + 'static,
    ) -> Result<Streaming<DeltaDiscoveryResponse>, Status> {
        Ok(client
            .delta_aggregated_resources(requests)
            .await?
            .into_inner())
    }

    fn sent(resp: &DeltaDiscoveryResponse) -> (&str, &str) {
        (&resp.type_url, &resp.nonce)
    }

    fn answer(req: &DeltaDiscoveryRequest) -> Option<(&str, &str, bool)> {
        (!req.response_nonce.is_empty()).then(|| {
            (
                req.type_url.as_str(),
                req.response_nonce.as_str(),
                req.error_detail.is_some(),
            )
        })
    }

    fn apply(cache: &mut XdsCache, resp: &DeltaDiscoveryResponse) -> bool {
        cache.apply_delta(resp)
    }

    fn fallback(cache: XdsCache) -> DeltaFallback {
        DeltaFallback::new(cache)
    }
}

struct AdsService(Arc<Inner>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.0.open::<Sotw>(request.into_inner())))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.0.open::<Delta>(request.into_inner())))
    }
}

/// Publishes a session's connection on [`Inner::relay`] while the session relays on it.
struct Published<'a> {
    relay: &'a watch::Sender<Option<(u64, Channel)>>,
    id: u64,
}

impl<'a> Published<'a> {
    fn new(relay: &'a watch::Sender<Option<(u64, Channel)>>, channel: Channel) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        relay.send_replace(Some((id, channel)));
        Published { relay, id }
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        self.relay.send_if_modified(|current| {
            let mine = current.as_ref().is_some_and(|(id, _)| *id == self.id);
            if mine {
                *current = None;
            }
            mine
        });
    }
}

#[cfg(test)]
#[path = "proxy_tests.rs"]
mod tests;
