//! A test double of the Consul HTTP API subset Pilotfish reads (shared/reference/consul-api.md),
//! blocking queries included, with switches that reproduce the ways Consul misbehaves.
//!
//! Endpoints: `/v1/catalog/{services,service/:name,register,deregister,datacenters}`,
//! `/v1/health/{service/:name,state/:state}`, `/v1/status/leader`, and the KV store
//! `/v1/kv/<key>` (GET with `?recurse`/`?keys`/`?separator`/`?raw`, PUT with `?cas`/`?flags`,
//! DELETE with `?recurse`/`?cas`; no sessions, so no locks), whose indexes, 404s, value limit and
//! key checks follow Consul's `agent/kvs_endpoint.go` and `agent/consul/state/kvs.go`.
//!
//! [`ConsulDouble::start`] binds a listener and serves in the background; the returned
//! [`DoubleHandle`] seeds the catalog (the same `register`/`deregister` writes a client would
//! send over HTTP), flips fault switches, and reads request and connection counters. The binary
//! `pilotfish-consul-double --listen ADDR` runs the same server for manual use; faults are then
//! set with `PUT /_double/faults` (a JSON [`Faults`]) and counters read at `GET /_double/stats`.
//!
//! Data flow: the HTTP layer ([`http`]) parses the common parameters, applies the fault switches,
//! and runs blocking reads against the [`store`] (catalog) and its [`kv`] store under a mutex;
//! each write, catalog or KV, consumes the datacenter's one Raft index and bumps a `watch`
//! generation that wakes blocked readers, which re-evaluate their result index. Error faults
//! fail KV writes too; catalog registration stays open so tests can seed during an outage.

mod conn;
pub mod http;
pub mod json;
pub mod kv;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use store::{CheckIn, DeregisterRequest, RegisterRequest, ServiceIn, StoreError, Weights};

/// How the double is set up: its datacenters (the first is the agent's own) and ACLs.
#[derive(Debug, Clone)]
pub struct DoubleConfig {
    pub datacenters: Vec<String>,
    /// `None`: ACLs disabled (default policy allow). `Some`: only these tokens are known;
    /// others get 403 `ACL not found`, requests without a token see nothing (default deny).
    pub tokens: Option<BTreeSet<String>>,
    /// List `"consul": []` in `/v1/catalog/services`, as a real cluster does.
    pub list_consul_service: bool,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        DoubleConfig {
            datacenters: vec!["dc1".into()],
            tokens: None,
            list_consul_service: true,
        }
    }
}

/// An error every read returns while the switch is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorFault {
    /// 500 `No cluster leader` for default reads; `?stale` still answers with
    /// `X-Consul-KnownLeader: false` and a large `X-Consul-LastContact`.
    NoLeader,
    /// 429 `Too many requests`.
    RateLimited,
    /// 403 `ACL not found` (a revoked token).
    AclNotFound,
    /// 500 `No known Consul servers`.
    Internal,
}

/// How a response is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutFault {
    /// Half the body is sent, then the connection is closed.
    MidBody,
    /// A complete HTTP response whose JSON body is truncated.
    TruncatedJson,
}

/// Fault switches (consul-api.md a.8). Settable from tests via [`DoubleHandle::set_faults`] and
/// over HTTP with `PUT /_double/faults`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub error: Option<ErrorFault>,
    /// Blocking reads (index > 0) ignore changes and hold for the full wait plus jitter.
    pub hold: bool,
    pub cut: Option<CutFault>,
    /// Shuffle list elements (and tag lists) on every read.
    pub reorder: bool,
    /// Omit `X-Consul-Index`, as old buggy versions effectively did.
    pub missing_index: bool,
    /// Close every new connection at once, and cut requests on open ones: Consul is down.
    pub refuse_connections: bool,
    /// Answer reads with an empty list and `X-Consul-Results-Filtered-By-ACLs: true`.
    pub filter_results: bool,
    /// Delay every response by this many milliseconds (a slow server).
    pub delay_ms: u64,
    /// Concurrent connections allowed per client IP (0: unlimited); Consul's default is 200.
    pub max_conns_per_client: usize,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error: None,
            hold: false,
            cut: None,
            reorder: false,
            missing_index: false,
            refuse_connections: false,
            filter_results: false,
            delay_ms: 0,
            max_conns_per_client: 200,
        }
    }
}

/// Counters for tests and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests by path (no query string), admin paths excluded.
    pub requests: BTreeMap<String, u64>,
    pub total_requests: u64,
    /// Blocking reads being held right now.
    pub blocked_now: u64,
    pub connections_now: BTreeMap<IpAddr, usize>,
    pub connections_peak: BTreeMap<IpAddr, usize>,
    pub connections_refused: u64,
    pub connections_accepted: u64,
}

impl Stats {
    pub fn requests_to(&self, prefix: &str) -> u64 {
        self.requests
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }
}

pub(crate) struct Shared {
    pub config: Mutex<DoubleConfig>,
    pub dcs: Mutex<BTreeMap<String, store::DcStore>>,
    pub faults: Mutex<Faults>,
    pub requests: Mutex<(BTreeMap<String, u64>, u64)>,
    pub blocked: std::sync::atomic::AtomicU64,
    pub conns: Arc<Mutex<conn::ConnTable>>,
    /// Bumped on every write and fault change; blocked readers wait on it.
    pub generation: watch::Sender<u64>,
    pub shutdown: CancellationToken,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-written in a way that matters
    // to a test double; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    pub fn wake(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn write<R>(
        &self,
        dc: &str,
        f: impl FnOnce(&mut store::DcStore) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let dc = if dc.is_empty() {
            self.default_dc()
        } else {
            dc.to_string()
        };
        let r = {
            let mut dcs = lock(&self.dcs);
            let store = dcs.get_mut(&dc).ok_or(StoreError::NoPathToDatacenter)?;
            f(store)
        };
        self.wake();
        r
    }

    pub fn default_dc(&self) -> String {
        lock(&self.config)
            .datacenters
            .first()
            .cloned()
            .unwrap_or_else(|| "dc1".into())
    }
}

/// Starts doubles.
pub struct ConsulDouble;

impl ConsulDouble {
    /// Binds `addr` (port 0 for a free one) and serves with the default config (`dc1`, no ACLs).
    pub async fn start(addr: SocketAddr) -> std::io::Result<DoubleHandle> {
        Self::start_with(addr, DoubleConfig::default()).await
    }

    pub async fn start_with(
        addr: SocketAddr,
        config: DoubleConfig,
    ) -> std::io::Result<DoubleHandle> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve(listener, config)
    }

    /// Serves on a listener the caller bound.
    pub fn serve(listener: TcpListener, config: DoubleConfig) -> std::io::Result<DoubleHandle> {
        let addr = listener.local_addr()?;
        let dcs = config
            .datacenters
            .iter()
            .map(|d| (d.clone(), store::DcStore::default()))
            .collect();
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            dcs: Mutex::new(dcs),
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new((BTreeMap::new(), 0)),
            blocked: std::sync::atomic::AtomicU64::new(0),
            conns: Arc::new(Mutex::new(conn::ConnTable::default())),
            generation: watch::channel(0).0,
            shutdown: CancellationToken::new(),
        });
        let app = http::router(shared.clone());
        let listener = conn::CappedListener {
            inner: listener,
            shared: shared.clone(),
        };
        let token = shared.shutdown.clone();
        let task = tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "consul double stopped");
            }
        });
        Ok(DoubleHandle { addr, shared, task })
    }
}

/// Controls a running double. Dropping it stops the server.
pub struct DoubleHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for DoubleHandle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

impl DoubleHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: blocked queries return, connections close.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            tracing::warn!("consul double did not stop within 5s");
        }
    }

    /// The same write as `PUT /v1/catalog/register`.
    pub fn register(&self, req: RegisterRequest) -> Result<(), StoreError> {
        let dc = req.datacenter.clone();
        self.shared.write(&dc, |s| s.register(req))
    }

    /// The same write as `PUT /v1/catalog/deregister`.
    pub fn deregister(&self, req: DeregisterRequest) -> Result<(), StoreError> {
        let dc = req.datacenter.clone();
        self.shared.write(&dc, |s| s.deregister(req))
    }

    /// Registers (or re-registers) one service instance with a passing service check
    /// `service:<id>`, on `node` at `address`. A shortcut for tests.
    pub fn register_instance(
        &self,
        dc: &str,
        node: &str,
        address: &str,
        service: &str,
        id: &str,
        port: u16,
    ) -> Result<(), StoreError> {
        self.register(RegisterRequest {
            datacenter: dc.into(),
            node: node.into(),
            address: address.into(),
            service: Some(ServiceIn {
                id: id.into(),
                service: service.into(),
                port,
                ..ServiceIn::default()
            }),
            checks: Some(vec![CheckIn {
                check_id: format!("service:{id}"),
                name: format!("Service '{service}' check"),
                status: "passing".into(),
                service_id: id.into(),
                kind: "tcp".into(),
                ..CheckIn::default()
            }]),
            ..RegisterRequest::default()
        })
    }

    /// Sets a check's status; false when there is no such check.
    pub fn set_check_status(&self, dc: &str, node: &str, check_id: &str, status: &str) -> bool {
        self.shared
            .write(dc, |s| Ok(s.set_check_status(node, check_id, status)))
            .unwrap_or(false)
    }

    /// Spurious wake-up: every catalog index moves on, nothing else changes. KV indexes stay:
    /// Consul skips a KV write that changes nothing, so KV watchers see no spurious wake-ups.
    pub fn spurious_wakeup(&self) {
        let mut dcs = lock(&self.shared.dcs);
        for s in dcs.values_mut() {
            s.spurious_write();
        }
        drop(dcs);
        self.shared.wake();
    }

    /// Index regression (snapshot restore): every index drops to at most `to`.
    pub fn regress_index(&self, to: u64) {
        let mut dcs = lock(&self.shared.dcs);
        for s in dcs.values_mut() {
            s.regress_index(to);
        }
        drop(dcs);
        self.shared.wake();
    }

    /// Reaps the KV tombstones in every datacenter, as Consul's reaper does once they are old:
    /// a prefix whose newest key was deleted then reports a lower index (a KV index reset).
    pub fn reap_kv_tombstones(&self) {
        for s in lock(&self.shared.dcs).values_mut() {
            s.kv.reap_tombstones();
        }
        self.shared.wake();
    }

    /// The current Raft index of `dc`.
    pub fn index(&self, dc: &str) -> u64 {
        lock(&self.shared.dcs).get(dc).map_or(0, |s| s.index)
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
        self.shared.wake();
    }

    /// Changes fault switches in place.
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut lock(&self.shared.faults));
        self.shared.wake();
    }

    /// Sets the known ACL tokens (`None`: ACLs off). Removing a token "revokes" it.
    pub fn set_tokens(&self, tokens: Option<BTreeSet<String>>) {
        lock(&self.shared.config).tokens = tokens;
        self.shared.wake();
    }

    pub fn stats(&self) -> Stats {
        stats(&self.shared)
    }

    pub fn reset_stats(&self) {
        *lock(&self.shared.requests) = (BTreeMap::new(), 0);
        let mut c = lock(&self.shared.conns);
        c.peak = c.current.clone();
        c.refused = 0;
        c.accepted = 0;
    }
}

pub(crate) fn stats(shared: &Shared) -> Stats {
    let (requests, total) = lock(&shared.requests).clone();
    let c = lock(&shared.conns);
    Stats {
        requests,
        total_requests: total,
        blocked_now: shared.blocked.load(std::sync::atomic::Ordering::Relaxed),
        connections_now: c.current.clone(),
        connections_peak: c.peak.clone(),
        connections_refused: c.refused,
        connections_accepted: c.accepted,
    }
}
