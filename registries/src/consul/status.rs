//! What the Consul adapter tells operators (status API, metrics): per datacenter, when it last
//! heard from Consul, at which index, whether it is serving a stale catalog, and why.

use std::collections::BTreeMap;
use std::time::SystemTime;

pub use super::mapping::RejectedEntry;

/// The adapter's state, published on a `watch` channel next to the catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsulStatus {
    pub datacenters: BTreeMap<String, DatacenterStatus>,
}

impl ConsulStatus {
    /// True when any datacenter serves its last good state instead of a fresh one.
    pub fn stale(&self) -> bool {
        self.datacenters.values().any(|d| d.stale)
    }

    /// Every datacenter has something to serve: it was read in full, or it serves the catalog
    /// an earlier run stored and Consul does not answer (waiting longer would not help).
    pub fn ready(&self) -> bool {
        !self.datacenters.is_empty() && self.datacenters.values().all(DatacenterStatus::ready)
    }
}

impl DatacenterStatus {
    /// See [`ConsulStatus::ready`].
    pub fn ready(&self) -> bool {
        self.synced || (self.restored_since.is_some() && self.last_error.is_some())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatacenterStatus {
    /// Every selected service has been read once; before that nothing from this datacenter is
    /// published.
    pub synced: bool,
    /// The last successful answer from Consul.
    pub last_sync: Option<SystemTime>,
    /// `X-Consul-Index` of the service list and of the check states.
    pub index: u64,
    pub checks_index: u64,
    /// The catalog of this datacenter is the last good one: a request is failing, or Consul
    /// answered without a known leader.
    pub stale: bool,
    /// The catalog of this datacenter is the one an earlier run stored (saved at this time):
    /// Consul has not been read in full since start. Implies `stale`.
    pub restored_since: Option<SystemTime>,
    pub known_leader: bool,
    /// `X-Consul-LastContact` of the last answer, in milliseconds.
    pub last_contact_ms: u64,
    /// The most recent error still in force (cleared when that request succeeds again).
    pub last_error: Option<String>,
    pub errors_total: u64,
    pub requests_total: u64,
    pub services: usize,
    pub instances: usize,
    pub rejected: Vec<RejectedEntry>,
}
