//! What the agent knows about itself, shared by the parts that change it (supervisor, xDS
//! proxy) and the one that reports it (`health`). Plain atomics: every reader wants a
//! snapshot, never a consistent transaction across fields.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct AgentStatus {
    /// 0 while no Envoy runs.
    envoy_pid: AtomicU32,
    envoy_restarts: AtomicU64,
    upstream_streams: AtomicU64,
    cache_streams: AtomicU64,
}

impl AgentStatus {
    pub fn set_envoy_pid(&self, pid: Option<u32>) {
        self.envoy_pid.store(pid.unwrap_or(0), Ordering::Relaxed);
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
