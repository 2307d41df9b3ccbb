//! Counters for the ADS server, exported by `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Event;
use crate::resources::PUSH_ORDER;

#[derive(Debug, Default)]
pub struct XdsMetrics {
    /// Responses sent, indexed like [`PUSH_ORDER`].
    pushes: [AtomicU64; 4],
    nacks: AtomicU64,
    stale_nonces: AtomicU64,
    /// Streams dropped because the client did not take a response in time.
    send_timeouts: AtomicU64,
}

impl XdsMetrics {
    pub fn record(&self, event: &Event) {
        match event {
            Event::Pushed { type_url, .. } => {
                if let Some(i) = PUSH_ORDER.iter().position(|t| t == type_url) {
                    self.pushes[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Nack { .. } => {
                self.nacks.fetch_add(1, Ordering::Relaxed);
            }
            Event::StaleNonce { .. } => {
                self.stale_nonces.fetch_add(1, Ordering::Relaxed);
            }
            Event::Ack { .. } | Event::UnknownType { .. } => {}
        }
    }

    pub fn send_timeout(&self) {
        self.send_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Pushes per type URL, in push order.
    pub fn pushes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        PUSH_ORDER
            .iter()
            .zip(&self.pushes)
            .map(|(t, n)| (*t, n.load(Ordering::Relaxed)))
    }

    pub fn nacks(&self) -> u64 {
        self.nacks.load(Ordering::Relaxed)
    }

    pub fn stale_nonces(&self) -> u64 {
        self.stale_nonces.load(Ordering::Relaxed)
    }

    pub fn send_timeouts(&self) -> u64 {
        self.send_timeouts.load(Ordering::Relaxed)
    }
}
