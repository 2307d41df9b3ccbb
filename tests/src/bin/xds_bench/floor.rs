//! The transport floor: a bare ADS server inside the bench that sends pre-encoded bytes.
//!
//! It speaks both ADS methods over tonic like discovery, on its own two-thread runtime (like a
//! separate process on this 2-core machine), but does no xDS work at all: a stream waits for
//! its first request (as discovery does), gets the `initial` responses, and from then on gets
//! every [`Floor::send`] — the same encoded bytes for every stream of a flavour, written by a
//! codec that only copies them into the gRPC frame. Requests (ACKs) are read and dropped.
//! Fed with responses captured from discovery, it shows what the same fan-out costs when
//! nothing but the transport (HTTP/2, TLS, the clients) is at work.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Buf, BufMut, Bytes};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Context as TaskContext, Poll, Service, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Status, Streaming};

use crate::proxy::{Captured, Flavour, MAX_MESSAGE};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Responses queued per stream, as in discovery.
const RESPONSE_QUEUE: usize = 2;

pub struct Floor {
    pub addr: SocketAddr,
    rounds: watch::Sender<Arc<Captured>>,
    streams: Arc<AtomicUsize>,
    shutdown: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Floor {
    /// Serves on a free loopback port; `tls`: a server config (the storm's floor) or plaintext.
    pub fn start(initial: Captured, tls: Option<rustls::ServerConfig>) -> Result<Floor> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("floor")
            .enable_all()
            .build()?;
        // Bound like discovery's listener (tokio's, backlog 1024): std's backlog of 128 drops
        // SYNs in a storm, and a dropped SYN costs the client a one-second retransmit.
        let listener = {
            let _in_floor_runtime = runtime.enter();
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))?;
            socket.listen(1024)?
        };
        let addr = listener.local_addr()?;
        let (rounds, rounds_rx) = watch::channel(Arc::new(Captured::default()));
        let streams = Arc::new(AtomicUsize::new(0));
        let service = FloorService(Arc::new(Shared {
            initial,
            rounds: rounds_rx,
            streams: streams.clone(),
        }));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        runtime.spawn(async move {
            let router = tonic::transport::Server::builder().add_service(service);
            let result = match tls {
                None => {
                    let incoming = NoDelay(TcpListenerStream::new(listener));
                    router
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                }
                Some(config) => {
                    let incoming = tls_incoming(listener, config, stop.clone());
                    router
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                }
            };
            if let Err(e) = result {
                eprintln!("floor: {e}");
            }
        });
        Ok(Floor {
            addr,
            rounds,
            streams,
            shutdown,
            runtime: Some(runtime),
        })
    }

    /// Streams that have had their first request.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Sends these responses, in order, to every stream of their flavour.
    pub fn send(&self, messages: Captured) {
        self.rounds.send_replace(Arc::new(messages));
    }

    /// Stops serving; its connections close with the runtime (see `Drop`).
    pub fn stop(self) {}
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Not `shutdown_timeout`: that blocks, and this runs inside the bench's runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Sets TCP_NODELAY on accepted connections (tonic does it only for listeners it binds).
struct NoDelay(TcpListenerStream);

impl futures::Stream for NoDelay {
    type Item = std::io::Result<tokio::net::TcpStream>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0).poll_next(cx).map(|item| {
            item.map(|conn| {
                conn.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            })
        })
    }
}

type TlsIncoming =
    ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>;

/// Handshaken connections: every handshake in its own task, no limit (a floor).
fn tls_incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    stop: CancellationToken,
) -> TlsIncoming {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(30), acceptor.accept(stream)).await
                {
                    let _ = tx.send(Ok(s)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

struct Shared {
    initial: Captured,
    rounds: watch::Receiver<Arc<Captured>>,
    streams: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct FloorService(Arc<Shared>);

impl NamedService for FloorService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl<B> Service<http::Request<B>> for FloorService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let flavour = match req.uri().path() {
            SOTW_PATH => Some(Flavour::Sotw),
            DELTA_PATH => Some(Flavour::Delta),
            _ => None,
        };
        let shared = self.0.clone();
        Box::pin(async move {
            let Some(flavour) = flavour else {
                return Ok(Status::unimplemented("not ADS").into_http());
            };
            let mut grpc = Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE));
            Ok(grpc.streaming(FloorStream { shared, flavour }, req).await)
        })
    }
}

struct FloorStream {
    shared: Arc<Shared>,
    flavour: Flavour,
}

impl StreamingService<Bytes> for FloorStream {
    type Response = Bytes;
    type ResponseStream = ReceiverStream<Result<Bytes, Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        tokio::spawn(serve_stream(
            self.shared.clone(),
            self.flavour,
            request.into_inner(),
            tx,
        ));
        Box::pin(async move { Ok(tonic::Response::new(ReceiverStream::new(rx))) })
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    flavour: Flavour,
    mut inbound: Streaming<Bytes>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
) {
    if !matches!(inbound.message().await, Ok(Some(_))) {
        return;
    }
    let mut rounds = shared.rounds.clone();
    rounds.borrow_and_update();
    shared.streams.fetch_add(1, Ordering::SeqCst);
    let f = flavour.index();
    for m in &shared.initial[f] {
        if tx.send(Ok(m.clone())).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(_)) => {}
                _ => return,
            },
            changed = rounds.changed() => {
                if changed.is_err() {
                    return;
                }
                let round = rounds.borrow_and_update().clone();
                for m in &round[f] {
                    if tx.send(Ok(m.clone())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Encodes by copying bytes that are already an encoded message; decodes to the raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A TLS server config like discovery's: this chain and key, TLS 1.3, ALPN h2, client
/// certificates verified against `roots` when presented.
pub fn tls_config(chain_pem: &str, key_pem: &str, roots_pem: &str) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        store.add(root.context("a root of the bundle")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the floor's certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("the floor's key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
