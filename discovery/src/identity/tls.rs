//! TLS on the gRPC port, done here rather than by tonic so that the serving certificate and
//! the client CA bundle can change while the port stays open: each new connection takes the
//! [`ServerTls`] config current at its handshake; connections already open keep theirs until
//! they close (`max_connection_age` bounds that).
//!
//! Client certificates are optional at this layer (a host enrolling has only a join token) but
//! any certificate presented must chain to the bundle and carry clientAuth; the gRPC methods
//! then demand the certificate they need (`super::PeerAuth`). TLS 1.3 only, ALPN `h2`.
//! Handshakes are bounded in time and in number, since they happen before anything is
//! authenticated.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further accepted connections wait their turn (in order).
pub const MAX_HANDSHAKES: usize = 256;
/// Connections accepted and not yet handshaken (waiting or in progress). Accepting eagerly
/// keeps a reconnect storm out of the kernel's backlog, where dropped SYNs would make clients
/// wait for their 1 s, 3 s, 7 s retransmissions.
pub const MAX_PENDING: usize = 8192;

/// The serving certificate, key or bundle could not be made into a TLS config.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("the serving certificate chain is not PEM")]
    Chain(#[source] rustls_pki_types::pem::Error),
    #[error("the serving key is not PEM")]
    Key(#[source] rustls_pki_types::pem::Error),
    #[error("a root of the trust bundle is unusable")]
    Root(#[source] rustls::Error),
    #[error("the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// A server config: this certificate chain and key; client certificates optional, verified
/// against `roots` when presented.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    roots: &[CertificateDer<'static>],
) -> Result<ServerConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(TlsSetupError::Root)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(TlsSetupError::Verifier)?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsSetupError::Chain)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(TlsSetupError::Key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsSetupError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsSetupError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The TLS config new connections get; replaced on renewal and CA reload.
#[derive(Debug)]
pub struct ServerTls {
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    pub fn new(config: ServerConfig) -> ServerTls {
        ServerTls {
            current: RwLock::new(Arc::new(config)),
        }
    }

    pub fn set(&self, config: ServerConfig) {
        let config = Arc::new(config);
        match self.current.write() {
            Ok(mut slot) => *slot = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        TlsAcceptor::from(config)
    }
}

/// Handshaken connections, for `tonic`'s `serve_with_incoming`.
pub type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// Accepts connections on `listener` and hands them on once their TLS handshake succeeds,
/// until `shutdown`. The accept loop and the handshakes run on `tracker`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Incoming {
    let (tx, rx) = mpsc::channel(16);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let spawner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                permit = Arc::clone(&pending).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (stream, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            let shutdown = shutdown.clone();
            let handshakes = Arc::clone(&handshakes);
            spawner.spawn(async move {
                let _pending = permit;
                let _turn = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    turn = handshakes.acquire_owned() => match turn {
                        Ok(t) => t,
                        Err(_) => return,
                    },
                };
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                let stream = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    done = handshake => match done {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            info!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    },
                };
                let _ = tx.send(Ok(stream)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
