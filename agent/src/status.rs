//! What the agent knows about itself, shared by the parts that change it (supervisor, xDS
//! proxy) and the one that reports it (`health`). Plain atomics: every reader wants a
//! snapshot, never a consistent transaction across fields. The certificate expiries are one
//! map behind a lock, replaced whole by the identity manager.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

#[derive(Debug, Default)]
pub struct AgentStatus {
    /// 0 while no Envoy runs.
    envoy_pid: AtomicU32,
    /// The Envoy the agent runs has answered `/ready` itself (after a hot restart the previous
    /// one may still answer on the admin port for a moment; the supervisor checks the epoch).
    envoy_started: AtomicBool,
    envoy_restarts: AtomicU64,
    upstream_streams: AtomicU64,
    cache_streams: AtomicU64,
    enrolled: AtomicBool,
    certificate_renewals: AtomicU64,
    interception_wanted: AtomicBool,
    interception_installed: AtomicBool,
    interception_failures: AtomicU64,
    mesh_names: AtomicU64,
    /// SPIFFE ID -> not_after of each certificate the agent holds.
    certificates: Mutex<BTreeMap<String, SystemTime>>,
}

impl AgentStatus {
    pub fn set_envoy_pid(&self, pid: Option<u32>) {
        self.envoy_pid.store(pid.unwrap_or(0), Ordering::Relaxed);
    }

    /// The current Envoy became ready (`false` again when another one is started).
    pub fn set_envoy_started(&self, started: bool) {
        self.envoy_started.store(started, Ordering::Relaxed);
    }

    pub fn envoy_started(&self) -> bool {
        self.envoy_started.load(Ordering::Relaxed)
    }

    pub fn envoy_pid(&self) -> Option<u32> {
        Some(self.envoy_pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    pub fn envoy_up(&self) -> bool {
        self.envoy_pid().is_some()
    }

    pub fn envoy_restarted(&self) {
        self.envoy_restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn envoy_restarts(&self) -> u64 {
        self.envoy_restarts.load(Ordering::Relaxed)
    }

    /// Counts an open stream to discovery until the guard drops.
    pub fn upstream_stream(self: &Arc<Self>) -> StreamGuard {
        StreamGuard::new(self.clone(), |s| &s.upstream_streams)
    }

    pub fn upstream_connected(&self) -> bool {
        self.upstream_streams.load(Ordering::Relaxed) > 0
    }

    /// Counts a stream served from the local cache until the guard drops.
    pub fn cache_stream(self: &Arc<Self>) -> StreamGuard {
        StreamGuard::new(self.clone(), |s| &s.cache_streams)
    }

    pub fn served_from_cache(&self) -> bool {
        self.cache_streams.load(Ordering::Relaxed) > 0
    }

    /// The certificates held now (SPIFFE ID -> expiry) and whether a node certificate is.
    pub fn set_certificates(&self, expiries: BTreeMap<String, SystemTime>, enrolled: bool) {
        *self.certificates.lock().unwrap_or_else(|e| e.into_inner()) = expiries;
        self.enrolled.store(enrolled, Ordering::Relaxed);
    }

    pub fn certificates(&self) -> BTreeMap<String, SystemTime> {
        self.certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn enrolled(&self) -> bool {
        self.enrolled.load(Ordering::Relaxed)
    }

    pub fn certificate_renewed(&self) {
        self.certificate_renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the agent's nftables table is in place ([`crate::intercept`]).
    pub fn set_interception_installed(&self, installed: bool) {
        self.interception_installed
            .store(installed, Ordering::Relaxed);
    }

    /// `[interception]` is on: readiness waits for the table.
    pub fn set_interception_wanted(&self, wanted: bool) {
        self.interception_wanted.store(wanted, Ordering::Relaxed);
    }

    /// Off, or the table is in place.
    pub fn interception_ready(&self) -> bool {
        !self.interception_wanted.load(Ordering::Relaxed) || self.interception_installed()
    }

    pub fn interception_installed(&self) -> bool {
        self.interception_installed.load(Ordering::Relaxed)
    }

    /// `nft` could not run or refused the table.
    pub fn interception_failed(&self) {
        self.interception_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn interception_failures(&self) -> u64 {
        self.interception_failures.load(Ordering::Relaxed)
    }

    /// How many `<service>.mesh` names mesh DNS answers.
    pub fn set_mesh_names(&self, n: usize) {
        self.mesh_names.store(n as u64, Ordering::Relaxed);
    }

    pub fn mesh_names(&self) -> u64 {
        self.mesh_names.load(Ordering::Relaxed)
    }

    pub fn certificate_renewals(&self) -> u64 {
        self.certificate_renewals.load(Ordering::Relaxed)
    }
}

pub struct StreamGuard {
    status: Arc<AgentStatus>,
    counter: fn(&AgentStatus) -> &AtomicU64,
}

impl StreamGuard {
    fn new(status: Arc<AgentStatus>, counter: fn(&AgentStatus) -> &AtomicU64) -> Self {
        counter(&status).fetch_add(1, Ordering::Relaxed);
        StreamGuard { status, counter }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        (self.counter)(&self.status).fetch_sub(1, Ordering::Relaxed);
    }
}
