//! Dialling discovery: the configured replicas in order, each with a short connect timeout so
//! Envoy gets a fast answer, and a jittered exponential backoff shared by every stream so a
//! discovery outage never turns into a dial loop (Envoy reconnects at least every 500 ms, the
//! cache fallback probes in the background).

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

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

#[derive(Debug)]
pub struct Upstream {
    addrs: Vec<String>,
    backoff: Mutex<DialBackoff>,
}

impl Upstream {
    pub fn new(addrs: Vec<String>, backoff: DialBackoff) -> Self {
        Upstream {
            addrs,
            backoff: Mutex::new(backoff),
        }
    }

    fn with_backoff<T>(&self, f: impl FnOnce(&mut DialBackoff) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-update; the backoff state is
        // still usable.
        let mut guard = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Connects to the first reachable replica, unless the backoff says not yet.
    pub async fn dial(&self) -> Result<Channel, DialError> {
        let wait = self.with_backoff(|b| b.wait(Instant::now()));
        if !wait.is_zero() {
            return Err(DialError::BackingOff(wait));
        }
        self.dial_now().await
    }

    async fn dial_now(&self) -> Result<Channel, DialError> {
        let mut errors = Vec::new();
        for addr in &self.addrs {
            match connect(addr).await {
                Ok(channel) => {
                    debug!(discovery = %addr, "connected to discovery");
                    self.with_backoff(DialBackoff::succeeded);
                    return Ok(channel);
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
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

    /// Waits, honouring the backoff, until a replica accepts a connection.
    pub async fn wait_reachable(&self) -> Channel {
        loop {
            let wait = self.with_backoff(|b| b.wait(Instant::now()));
            tokio::time::sleep(wait).await;
            match self.dial_now().await {
                Ok(channel) => return channel,
                Err(e) => debug!(error = %e, "discovery still unreachable"),
            }
        }
    }
}

async fn connect(addr: &str) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
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
    async fn refused_dials_back_off_instead_of_looping() {
        // A port nothing listens on: bind, read the port, close.
        let port = crate::testutil::free_port();
        let up = Upstream::new(vec![format!("127.0.0.1:{port}")], DialBackoff::default());
        assert!(matches!(up.dial().await, Err(DialError::Unreachable(..))));
        assert!(matches!(up.dial().await, Err(DialError::BackingOff(_))));
    }
}
