//! Simulated proxies: ADS clients that behave like Envoy towards discovery (or towards the
//! transport floor, which cannot tell them apart), and the [`Tracker`] they report to.
//!
//! Each proxy opens one stream (SotW or Delta), subscribes CDS (wildcard), then EDS for every
//! cluster it gets, and ACKs every response. After a CDS update a SotW proxy asks for its
//! assignments again, as Envoy does when its clusters re-warm (a Delta server pushes them
//! itself). The tracker counts the initial sync, and while a [`Want`] is armed it records when
//! each proxy has received what the change being measured should bring it. The first proxy of
//! each flavour also keeps a copy of the responses it got (the initial ones and those of the
//! measured change), so the transport floor can send the very same bytes.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use prost::Message;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Sotw,
    Delta,
}

impl Flavour {
    pub fn index(self) -> usize {
        match self {
            Flavour::Sotw => 0,
            Flavour::Delta => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Sotw => "SotW",
            Flavour::Delta => "Delta",
        }
    }
}

/// Which proxies speak Delta: the first `delta_percent` of them.
pub fn flavour_of(i: usize, proxies: usize, delta_percent: usize) -> Flavour {
    if i * 100 < proxies * delta_percent {
        Flavour::Delta
    } else {
        Flavour::Sotw
    }
}

/// What a measured change must bring every proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// The assignment of `cluster`, with an endpoint on `port`.
    Assignment { cluster: String, port: u32 },
    /// The Cluster of every one of `services` services, with this `lb_policy`.
    LbPolicy { policy: i32, services: usize },
}

impl Want {
    fn needed(&self) -> usize {
        match self {
            Want::Assignment { .. } => 1,
            Want::LbPolicy { services, .. } => *services,
        }
    }
}

/// Responses by flavour (index [`Flavour::index`]), as encoded on the wire.
pub type Captured = [Vec<Bytes>; 2];

struct Target {
    armed: Instant,
    seen: Vec<Option<Duration>>,
    progress: Vec<usize>,
    needed: usize,
    remaining: usize,
    capture: Captured,
}

/// What one measured change did: per proxy, the time from arming to having it all (`None`:
/// never within the wait), and what the first proxy of each flavour received for it.
pub struct Outcome {
    pub seen: Vec<Option<Duration>>,
    pub capture: Captured,
}

pub struct Tracker {
    proxies: usize,
    /// The proxy of each flavour whose responses are kept.
    capturers: [Option<usize>; 2],
    started: Instant,
    active: AtomicBool,
    want: Mutex<Option<Arc<Want>>>,
    target: Mutex<Option<Target>>,
    all_seen: Notify,
    synced_flags: Vec<AtomicBool>,
    synced: AtomicUsize,
    all_synced: Notify,
    sync_times: Mutex<Vec<Duration>>,
    initial: Mutex<Captured>,
    /// Streams that ended (error or not) and were opened again.
    pub lost: AtomicUsize,
    pub bytes: AtomicU64,
    pub responses: AtomicU64,
    /// Cluster names by CDS version: every SotW proxy gets the same set, decoded once.
    cds_names: Mutex<HashMap<String, Arc<Vec<String>>>>,
    /// Per SotW CDS version: how many outbound clusters have each lb_policy.
    sotw_lb: Mutex<HashMap<String, Arc<HashMap<i32, usize>>>>,
    /// Per Delta cluster version (a content hash): its lb_policy, `None` if not outbound.
    delta_lb: Mutex<HashMap<String, Option<i32>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tracker {
    /// `capturers`: the proxies whose responses are kept, by flavour.
    pub fn new(proxies: usize, capturers: [Option<usize>; 2]) -> Tracker {
        Tracker {
            proxies,
            capturers,
            started: Instant::now(),
            active: AtomicBool::new(false),
            want: Mutex::new(None),
            target: Mutex::new(None),
            all_seen: Notify::new(),
            synced_flags: (0..proxies).map(|_| AtomicBool::new(false)).collect(),
            synced: AtomicUsize::new(0),
            all_synced: Notify::new(),
            sync_times: Mutex::new(Vec::new()),
            initial: Mutex::new(Default::default()),
            lost: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            cds_names: Mutex::default(),
            sotw_lb: Mutex::default(),
            delta_lb: Mutex::default(),
        }
    }

    /// Tracker for `proxies` split by `delta_percent`, keeping the first of each flavour.
    pub fn for_mix(proxies: usize, delta_percent: usize) -> Tracker {
        let first = |f| (0..proxies).find(|&i| flavour_of(i, proxies, delta_percent) == f);
        Tracker::new(proxies, [first(Flavour::Sotw), first(Flavour::Delta)])
    }

    /// Starts measuring a change: from now, record when each proxy has what `want` says.
    pub fn arm(&self, want: Want) {
        let needed = want.needed();
        *lock(&self.target) = Some(Target {
            armed: Instant::now(),
            seen: vec![None; self.proxies],
            progress: vec![0; self.proxies],
            needed,
            remaining: self.proxies,
            capture: Default::default(),
        });
        *lock(&self.want) = Some(Arc::new(want));
        self.active.store(true, Ordering::SeqCst);
    }

    pub fn disarm(&self) -> Option<Outcome> {
        self.active.store(false, Ordering::SeqCst);
        lock(&self.want).take();
        lock(&self.target).take().map(|t| Outcome {
            seen: t.seen,
            capture: t.capture,
        })
    }

    /// Waits until every proxy has what the armed change brings, or `timeout`; false then.
    pub async fn wait_all_seen(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.all_seen.notified();
            if lock(&self.target).as_ref().is_none_or(|t| t.remaining == 0) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until every proxy has its initial config, or `timeout`; false then.
    pub async fn wait_all_synced(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.all_synced.notified();
            if self.synced() >= self.proxies {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until no response has arrived for `quiet` (at most `max`): the pushes a change
    /// set off (EDS after CDS) are over before the next change.
    pub async fn settle(&self, quiet: Duration, max: Duration) {
        let end = Instant::now() + max;
        let mut last = self.responses.load(Ordering::SeqCst);
        while Instant::now() < end {
            tokio::time::sleep(quiet).await;
            let now = self.responses.load(Ordering::SeqCst);
            if now == last {
                return;
            }
            last = now;
        }
    }

    pub fn synced(&self) -> usize {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn is_synced(&self, i: usize) -> bool {
        self.synced_flags[i].load(Ordering::SeqCst)
    }

    /// Time from the tracker's creation to each proxy's initial sync, in sync order.
    pub fn sync_times(&self) -> Vec<Duration> {
        lock(&self.sync_times).clone()
    }

    /// The responses the capturers got before their initial sync.
    pub fn initial(&self) -> Captured {
        lock(&self.initial).clone()
    }

    fn synced_one(&self, i: usize) {
        if self.synced_flags[i].swap(true, Ordering::SeqCst) {
            return;
        }
        lock(&self.sync_times).push(self.started.elapsed());
        if self.synced.fetch_add(1, Ordering::SeqCst) + 1 >= self.proxies {
            self.all_synced.notify_one();
        }
    }

    fn count(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.responses.fetch_add(1, Ordering::Relaxed);
    }

    fn capture_initial(&self, i: usize, f: Flavour, encoded: impl FnOnce() -> Vec<u8>) {
        // Once only: not again when the proxy reconnects.
        if self.capturers[f.index()] == Some(i) && !self.is_synced(i) {
            lock(&self.initial)[f.index()].push(Bytes::from(encoded()));
        }
    }

    fn want(&self) -> Option<Arc<Want>> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.want).clone()
    }

    /// Proxy `i` received `amount` of what the armed change brings, at `now`.
    fn progress(
        &self,
        i: usize,
        f: Flavour,
        now: Instant,
        amount: usize,
        encoded: impl FnOnce() -> Vec<u8>,
    ) {
        if amount == 0 {
            return;
        }
        let mut guard = lock(&self.target);
        let Some(t) = guard.as_mut() else { return };
        if t.seen[i].is_some() {
            return;
        }
        if self.capturers[f.index()] == Some(i) {
            t.capture[f.index()].push(Bytes::from(encoded()));
        }
        t.progress[i] += amount;
        if t.progress[i] >= t.needed {
            t.seen[i] = Some(now.saturating_duration_since(t.armed));
            t.remaining -= 1;
            if t.remaining == 0 {
                self.all_seen.notify_one();
            }
        }
    }

    fn cds_names(&self, r: &DiscoveryResponse) -> Arc<Vec<String>> {
        let mut cache = lock(&self.cds_names);
        if let Some(names) = cache.get(&r.version_info) {
            return names.clone();
        }
        let names: Arc<Vec<String>> = Arc::new(
            r.resources
                .iter()
                .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                .filter(|c| c.name.starts_with("outbound|"))
                .map(|c| c.name)
                .collect(),
        );
        cache.insert(r.version_info.clone(), names.clone());
        names
    }

    /// How many outbound clusters of this SotW CDS response have `policy`.
    fn sotw_lb_count(&self, r: &DiscoveryResponse, policy: i32) -> usize {
        let mut cache = lock(&self.sotw_lb);
        let counts = cache
            .entry(r.version_info.clone())
            .or_insert_with(|| {
                let mut counts = HashMap::new();
                for c in r
                    .resources
                    .iter()
                    .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                    .filter(|c| c.name.starts_with("outbound|"))
                {
                    *counts.entry(c.lb_policy).or_default() += 1;
                }
                Arc::new(counts)
            })
            .clone();
        counts.get(&policy).copied().unwrap_or(0)
    }

    /// How many outbound clusters of this Delta CDS response have `policy`.
    fn delta_lb_count(&self, resources: &[DeltaResource], policy: i32) -> usize {
        let mut cache = lock(&self.delta_lb);
        resources
            .iter()
            .filter(|res| res.name.starts_with("outbound|"))
            .filter(|res| {
                let lb = *cache.entry(res.version.clone()).or_insert_with(|| {
                    res.resource
                        .as_ref()
                        .and_then(|any| Cluster::decode(any.value.as_slice()).ok())
                        .map(|c| c.lb_policy)
                });
                lb == Some(policy)
            })
            .count()
    }
}

fn has_port(cla: &ClusterLoadAssignment, port: u32) -> bool {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => s.port_specifier.as_ref(),
            _ => None,
        })
        .any(|p| matches!(p, socket_address::PortSpecifier::PortValue(v) if *v == port))
}

fn is_assignment(body: &[u8], cluster: &str, port: u32) -> bool {
    ClusterLoadAssignment::decode(body)
        .is_ok_and(|cla| cla.cluster_name == cluster && has_port(&cla, port))
}

/// The Envoy node of proxy `i`; its id is `bench-<i>` (the storm's certificates name it).
pub fn node(i: usize) -> Node {
    let string = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let outbound = format!("127.0.0.1:{}", 20000 + i % 40000);
    Node {
        id: node_id(i),
        cluster: "bench".into(),
        metadata: Some(Struct {
            fields: [
                ("pilotfish.outbound".to_string(), string(outbound)),
                ("pilotfish.address".to_string(), string("127.0.0.1".into())),
                (
                    "pilotfish.app_address".to_string(),
                    string("127.0.0.1".into()),
                ),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

pub fn node_id(i: usize) -> String {
    format!("bench-{i}")
}

/// Runs proxy `i` on `channel` until the stream ends.
pub async fn run(
    i: usize,
    flavour: Flavour,
    channel: Channel,
    tracker: Arc<Tracker>,
) -> Result<()> {
    match flavour {
        Flavour::Sotw => sotw(i, channel, tracker).await,
        Flavour::Delta => delta(i, channel, tracker).await,
    }
}

async fn sotw(i: usize, channel: Channel, tracker: Arc<Tracker>) -> Result<()> {
    let f = Flavour::Sotw;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::unbounded_channel();
    let send = |r: DiscoveryRequest| {
        tx.send(r)
            .map_err(|_| anyhow::anyhow!("request stream closed"))
    };
    send(DiscoveryRequest {
        node: Some(node(i)),
        type_url: CLUSTER.into(),
        ..Default::default()
    })?;
    let mut inbound = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut eds_names: Arc<Vec<String>> = Arc::default();
    let (mut eds_version, mut eds_nonce) = (String::new(), String::new());
    let mut eds_received = 0usize;
    let mut synced = false;
    while let Some(r) = inbound.message().await? {
        let now = Instant::now();
        tracker.count(r.encoded_len());
        if !synced {
            tracker.capture_initial(i, f, || r.encode_to_vec());
        }
        match r.type_url.as_str() {
            CLUSTER => {
                eds_names = tracker.cds_names(&r);
                send(DiscoveryRequest {
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    type_url: CLUSTER.into(),
                    ..Default::default()
                })?;
                // Updated clusters warm until they get assignments: ask again, like Envoy.
                send(DiscoveryRequest {
                    version_info: eds_version.clone(),
                    response_nonce: eds_nonce.clone(),
                    type_url: ENDPOINT.into(),
                    resource_names: eds_names.to_vec(),
                    ..Default::default()
                })?;
                if let Some(Want::LbPolicy { policy, .. }) = tracker.want().as_deref() {
                    let n = tracker.sotw_lb_count(&r, *policy);
                    tracker.progress(i, f, now, n, || r.encode_to_vec());
                }
            }
            ENDPOINT => {
                eds_version.clone_from(&r.version_info);
                eds_nonce.clone_from(&r.nonce);
                send(DiscoveryRequest {
                    version_info: eds_version.clone(),
                    response_nonce: eds_nonce.clone(),
                    type_url: ENDPOINT.into(),
                    resource_names: eds_names.to_vec(),
                    ..Default::default()
                })?;
                if !synced {
                    eds_received += r.resources.len();
                    if eds_received >= eds_names.len() && !eds_names.is_empty() {
                        synced = true;
                        tracker.synced_one(i);
                    }
                }
                // Also on a reconnected stream's first responses: the change arrived then.
                if let Some(Want::Assignment { cluster, port }) = tracker.want().as_deref() {
                    // SotW carries no names: the assignment says which cluster it is.
                    if r.resources
                        .iter()
                        .any(|a| is_assignment(&a.value, cluster, *port))
                    {
                        tracker.progress(i, f, now, 1, || r.encode_to_vec());
                    }
                }
            }
            _ => send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: r.type_url.clone(),
                ..Default::default()
            })?,
        }
    }
    Ok(())
}

async fn delta(i: usize, channel: Channel, tracker: Arc<Tracker>) -> Result<()> {
    let f = Flavour::Delta;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::unbounded_channel();
    let send = |r: DeltaDiscoveryRequest| {
        tx.send(r)
            .map_err(|_| anyhow::anyhow!("request stream closed"))
    };
    send(DeltaDiscoveryRequest {
        node: Some(node(i)),
        type_url: CLUSTER.into(),
        ..Default::default()
    })?;
    let mut inbound = client
        .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut clusters = BTreeSet::new();
    let mut eds_received = 0usize;
    let mut synced = false;
    while let Some(r) = inbound.message().await? {
        let now = Instant::now();
        tracker.count(r.encoded_len());
        if !synced {
            tracker.capture_initial(i, f, || r.encode_to_vec());
        }
        send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })?;
        match r.type_url.as_str() {
            CLUSTER => {
                let added: Vec<String> = r
                    .resources
                    .iter()
                    .filter(|res| res.name.starts_with("outbound|"))
                    .filter(|res| clusters.insert(res.name.clone()))
                    .map(|res| res.name.clone())
                    .collect();
                for gone in &r.removed_resources {
                    clusters.remove(gone);
                }
                if !added.is_empty() {
                    send(DeltaDiscoveryRequest {
                        type_url: ENDPOINT.into(),
                        resource_names_subscribe: added,
                        ..Default::default()
                    })?;
                }
                if let Some(Want::LbPolicy { policy, .. }) = tracker.want().as_deref() {
                    let n = tracker.delta_lb_count(&r.resources, *policy);
                    tracker.progress(i, f, now, n, || r.encode_to_vec());
                }
            }
            ENDPOINT => {
                if !synced {
                    eds_received += r.resources.len();
                    if eds_received >= clusters.len() && !clusters.is_empty() {
                        synced = true;
                        tracker.synced_one(i);
                    }
                }
                if let Some(Want::Assignment { cluster, port }) = tracker.want().as_deref() {
                    if delta_has(&r, cluster, *port) {
                        tracker.progress(i, f, now, 1, || r.encode_to_vec());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn delta_has(r: &DeltaDiscoveryResponse, cluster: &str, port: u32) -> bool {
    r.resources.iter().any(|res| {
        res.name == cluster
            && res
                .resource
                .as_ref()
                .is_some_and(|any| is_assignment(&any.value, cluster, port))
    })
}

/// Envoy's reconnect backoff: exponential from 500 ms to 30 s, each wait drawn between half
/// and all of the bound. A splitmix64 stream per proxy keeps the bench free of a RNG crate.
pub struct Backoff {
    state: u64,
    attempt: u32,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub fn new(seed: u64) -> Backoff {
        Backoff {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03,
            attempt: 0,
        }
    }

    fn random(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        let bound = Self::BASE
            .saturating_mul(1 << self.attempt.min(6))
            .min(Self::MAX);
        self.attempt += 1;
        let half = bound.as_millis() as u64 / 2;
        Duration::from_millis(half + self.random() % (half + 1))
    }

    /// A stream worked (the proxy synced on it): start from the base again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Runs proxy `i` on `channel` for good: when its stream ends it opens another after Envoy's
/// backoff (tonic reconnects the channel), counting the loss in `tracker.lost`.
pub async fn run_reconnecting(i: usize, flavour: Flavour, channel: Channel, tracker: Arc<Tracker>) {
    let mut backoff = Backoff::new(i as u64);
    loop {
        let result = run(i, flavour, channel.clone(), tracker.clone()).await;
        let lost = tracker.lost.fetch_add(1, Ordering::SeqCst);
        if lost < 5 {
            let why = match result {
                Ok(()) => "the server ended it".to_string(),
                Err(e) => format!("{e:#}"),
            };
            eprintln!("proxy {} lost its stream, reconnecting: {why}", node_id(i));
        }
        if tracker.is_synced(i) {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}
