//! Dialling discovery: the replicas in this host's order ([`super::replicas`]: rendezvous by
//! node name, replicas that just failed last), each with a short connect timeout so Envoy gets
//! a fast answer, and a jittered exponential backoff shared by every stream so a discovery
//! outage never turns into a dial loop (Envoy reconnects at least every 500 ms, the cache
//! fallback probes in the background). The backoff starts only when every replica failed in
//! one round: losing one replica costs no wait.
//!
//! In secure mode every connection is TLS: discovery's certificate is verified against the mesh
//! roots and the name `discovery.<trust_domain>`, and the node certificate is the client
//! identity. The identity manager publishes those settings on a `watch` channel and replaces
//! them after each renewal; every dial reads the current ones, so each new stream uses the
//! newest certificate. Until the host has enrolled there are none, and dials fail (the relay
//! serves Envoy from its cache meanwhile).

use std::sync::Mutex;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::debug;

use super::replicas::Replicas;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// xDS responses for large meshes exceed tonic's 4 MiB default (xDS checklist b.9).
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no discovery replica reachable ({0}); retrying in {1:?}")]
    Unreachable(String, Duration),
    #[error("discovery unreachable; next attempt in {0:?}")]
    BackingOff(Duration),
}

/// Jittered exponential backoff between failed dial rounds.
#[derive(Debug, Clone)]
pub struct DialBackoff {
    initial: Duration,
    cap: Duration,
    failures: u32,
    not_before: Option<Instant>,
}

impl DialBackoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        DialBackoff {
            initial,
            cap,
            failures: 0,
            not_before: None,
        }
    }

    /// How long until the next dial is allowed (zero: now).
    pub fn wait(&self, now: Instant) -> Duration {
        self.not_before
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// Records a failed round; returns the delay before the next one. The delay is drawn from
    /// [d/2, d] with d = initial * 2^failures, capped.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let exp = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        let full = self.initial.saturating_mul(1 << exp).min(self.cap);
        let half = full / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        let delay = half + Duration::from_millis(jitter);
        self.not_before = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }
}

impl Default for DialBackoff {
    fn default() -> Self {
        DialBackoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

/// How the relay reaches discovery.
#[derive(Debug, Clone)]
pub enum Transport {
    /// `insecure = true`: plaintext h2, no authentication.
    Plaintext,
    /// mTLS with the current settings; `None` until the host has a node certificate.
    Tls(watch::Receiver<Option<ClientTlsConfig>>),
}

/// A connection to one replica.
#[derive(Debug, Clone)]
pub struct Connected {
    pub channel: Channel,
    /// The replica's address, as configured.
    pub replica: String,
}

#[derive(Debug)]
pub struct Upstream {
    replicas: Replicas,
    transport: Transport,
    backoff: Mutex<DialBackoff>,
    /// Tracks which TLS settings the last dial saw, so that new ones (enrolment, renewal,
    /// a new root) clear the backoff and the next dial happens at once.
    tls_seen: Option<Mutex<watch::Receiver<Option<ClientTlsConfig>>>>,
}

impl Upstream {
    /// A plaintext upstream (`insecure = true`, and tests). `addrs` in the order to try them
    /// ([`super::replicas::order`]).
    pub fn new(addrs: Vec<String>, backoff: DialBackoff) -> Self {
        Self::with_transport(addrs, Transport::Plaintext, backoff)
    }

    pub fn with_transport(addrs: Vec<String>, transport: Transport, backoff: DialBackoff) -> Self {
        let tls_seen = match &transport {
            Transport::Plaintext => None,
            Transport::Tls(rx) => Some(Mutex::new(rx.clone())),
        };
        Upstream {
            replicas: Replicas::new(addrs),
            transport,
            backoff: Mutex::new(backoff),
            tls_seen,
        }
    }

    fn with_backoff<T>(&self, f: impl FnOnce(&mut DialBackoff) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-update; the backoff state is
        // still usable.
        let mut guard = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Whether the TLS settings changed since the last call; a change clears the backoff.
    fn tls_changed(&self) -> bool {
        let Some(seen) = &self.tls_seen else {
            return false;
        };
        let mut rx = seen.lock().unwrap_or_else(|e| e.into_inner());
        let changed = rx.has_changed().unwrap_or(false);
        if changed {
            rx.mark_unchanged();
            self.with_backoff(DialBackoff::succeeded);
        }
        changed
    }

    /// Resolves when the TLS settings change (never for plaintext).
    async fn tls_change(&self) {
        let rx = self
            .tls_seen
            .as_ref()
            .map(|seen| seen.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let Some(mut rx) = rx else {
            return std::future::pending().await;
        };
        if rx.changed().await.is_err() {
            // The manager is gone; nothing will change any more.
            std::future::pending::<()>().await;
        }
    }

    /// Connects to the first reachable replica, unless the backoff says not yet.
    pub async fn dial(&self) -> Result<Connected, DialError> {
        self.tls_changed();
        let wait = self.with_backoff(|b| b.wait(Instant::now()));
        if !wait.is_zero() {
            return Err(DialError::BackingOff(wait));
        }
        self.dial_now().await
    }

    async fn dial_now(&self) -> Result<Connected, DialError> {
        let tls = match &self.transport {
            Transport::Plaintext => None,
            Transport::Tls(rx) => match rx.borrow().clone() {
                Some(tls) => Some(tls),
                None => {
                    let delay = self.with_backoff(|b| b.failed(Instant::now()));
                    return Err(DialError::Unreachable(
                        "this host has no node certificate yet (enrolment pending)".into(),
                        delay,
                    ));
                }
            },
        };
        let mut errors = Vec::new();
        for addr in self.replicas.dial_order(Instant::now()) {
            match connect(&addr, tls.clone()).await {
                Ok(channel) => {
                    debug!(discovery = %addr, "connected to discovery");
                    self.with_backoff(DialBackoff::succeeded);
                    self.replicas.reached(&addr);
                    return Ok(Connected {
                        channel,
                        replica: addr,
                    });
                }
                Err(e) => {
                    self.replicas.failed(&addr, Instant::now());
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        let delay = self.with_backoff(|b| b.failed(Instant::now()));
        Err(DialError::Unreachable(errors.join("; "), delay))
    }

    /// Marks the current replica set as failing (a stream could not be opened on a connected
    /// channel), so the next streams back off too.
    pub fn stream_failed(&self) {
        self.with_backoff(|b| b.failed(Instant::now()));
    }

    /// A stream on `replica` broke (not closed for its age): the next dial tries the others
    /// first, without waiting.
    pub fn replica_failed(&self, replica: &str) {
        self.replicas.failed(replica, Instant::now());
    }

    /// Waits, honouring the backoff, until a replica accepts a connection.
    pub async fn wait_reachable(&self) -> Connected {
        loop {
            self.tls_changed();
            let wait = self.with_backoff(|b| b.wait(Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // New settings: dial now instead of waiting out the backoff.
                _ = self.tls_change() => continue,
            }
            match self.dial_now().await {
                Ok(channel) => return channel,
                Err(e) => debug!(error = %e, "discovery still unreachable"),
            }
        }
    }
}

/// Connects to one replica: TLS when `tls` is given (the `https` scheme is what makes tonic use
/// it), plaintext otherwise.
pub async fn connect(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    };
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => {
            // tonic's transport error hides the cause (refused, timed out) in its source chain.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            debug!(discovery = %addr, error = %msg, "cannot connect to discovery");
            Err(msg.into())
        }
        Err(_) => Err("connect timed out".into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let now = Instant::now();
        let mut b = DialBackoff::default();
        assert_eq!(b.wait(now), Duration::ZERO);
        let d1 = b.failed(now);
        assert!(
            d1 >= Duration::from_millis(250) && d1 <= Duration::from_millis(500),
            "{d1:?}"
        );
        assert_eq!(b.wait(now), d1);
        let d2 = b.failed(now);
        assert!(
            d2 >= Duration::from_millis(500) && d2 <= Duration::from_secs(1),
            "{d2:?}"
        );
        for _ in 0..20 {
            let d = b.failed(now);
            assert!(d <= Duration::from_secs(30));
        }
        assert!(b.failed(now) >= Duration::from_secs(15));
        b.succeeded();
        assert_eq!(b.wait(now), Duration::ZERO);
    }

    #[tokio::test]
    async fn no_identity_means_no_dial_and_new_tls_settings_clear_the_backoff() {
        let (tx, rx) = watch::channel(None);
        let port = crate::testutil::free_port();
        let up = Upstream::with_transport(
            vec![format!("127.0.0.1:{port}")],
            Transport::Tls(rx),
            DialBackoff::default(),
        );
        let Err(DialError::Unreachable(msg, _)) = up.dial().await else {
            panic!("dialled without a node certificate")
        };
        assert!(msg.contains("no node certificate"), "{msg}");
        assert!(matches!(up.dial().await, Err(DialError::BackingOff(_))));
        tx.send_replace(Some(ClientTlsConfig::new()));
        // Not backing off any more: the dial is attempted (and refused by the closed port).
        assert!(matches!(up.dial().await, Err(DialError::Unreachable(..))));
    }

    #[tokio::test]
    async fn refused_dials_back_off_instead_of_looping() {
        // A port nothing listens on: bind, read the port, close.
        let port = crate::testutil::free_port();
        let up = Upstream::new(vec![format!("127.0.0.1:{port}")], DialBackoff::default());
        assert!(matches!(up.dial().await, Err(DialError::Unreachable(..))));
        assert!(matches!(up.dial().await, Err(DialError::BackingOff(_))));
    }
}
