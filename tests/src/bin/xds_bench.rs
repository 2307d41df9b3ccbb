//! `pilotfish-xds-bench`: endpoint-change push latency and memory of a real discovery process.
//!
//! Starts `target/<profile>/pilotfish-discovery` (insecure, in a temp dir) with a TOML registry
//! of N services x M instances (one file per service), opens P ADS streams as simulated proxies
//! (tonic clients, a share of them Delta, the rest SotW), each subscribing CDS (wildcard) then
//! EDS for every cluster it gets and ACKing every response. Once every stream has its initial
//! config it makes K endpoint changes, one at a time: rewrite one service's file atomically with
//! a new port on one instance, and record when each proxy receives the new
//! ClusterLoadAssignment. Latency is reported from the write (includes the file registry's own
//! detection) and from the moment discovery learned of the change (`learned_unix_ms` of the
//! snapshot in `/status`). Then it starts one `pilotfish-agent` with real Envoy against the same
//! discovery and reports the agent's own RSS.
//!
//! Run (release build, on an otherwise idle machine):
//!
//! ```text
//! cargo build --release -p pilotfish-discovery -p pilotfish-agent -p pilotfish-tests
//! target/release/pilotfish-xds-bench                  # 1000 svc x 2, 2000 proxies, half Delta
//! target/release/pilotfish-xds-bench --instances 10 --changes 50 --delta-percent 0
//! ```
//!
//! Flags: `--services N` (1000), `--instances M` (2), `--proxies P` (2000), `--changes K` (20),
//! `--delta-percent D` (50), `--streams-per-connection S` (1: one HTTP/2 connection per proxy,
//! like real agents), `--interval-ms` (300, pause between changes), `--no-agent`, `--keep`
//! (keep the work directory and print its path).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use pilotfish_tests::{binary, envoy_binary, free_port, http_get, Process};
use prost::Message;
use tokio::sync::{mpsc, Notify};
use tonic::transport::{Channel, Endpoint};

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
struct Args {
    services: usize,
    instances: usize,
    proxies: usize,
    changes: usize,
    delta_percent: usize,
    per_connection: usize,
    interval: Duration,
    agent: bool,
    keep: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        services: 1000,
        instances: 2,
        proxies: 2000,
        changes: 20,
        delta_percent: 50,
        per_connection: 1,
        interval: Duration::from_millis(300),
        agent: true,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = || -> Result<usize> {
            it.next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("{flag}: not a number"))
        };
        match flag.as_str() {
            "--services" => a.services = num()?,
            "--instances" => a.instances = num()?,
            "--proxies" => a.proxies = num()?,
            "--changes" => a.changes = num()?,
            "--delta-percent" => a.delta_percent = num()?.min(100),
            "--streams-per-connection" => a.per_connection = num()?.max(1),
            "--interval-ms" => a.interval = Duration::from_millis(num()? as u64),
            "--no-agent" => a.agent = false,
            "--keep" => a.keep = true,
            other => bail!("unknown flag {other} (see the comment at the top of xds_bench.rs)"),
        }
    }
    if a.services == 0 || a.instances == 0 || a.services > 60000 || a.instances > 250 {
        bail!("--services must be 1..=60000 and --instances 1..=250");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// 2000 streams, one connection each, need more than the usual 1024 descriptors (discovery
/// inherits the limit too). Raised to the hard limit with prlimit(1), which keeps this crate
/// free of unsafe code.
fn raise_fd_limit() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
        return;
    };
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    if let [soft, hard] = nums[..] {
        if soft != hard {
            let _ = std::process::Command::new("prlimit")
                .arg(format!("--pid={}", std::process::id()))
                .arg(format!("--nofile={hard}:{hard}"))
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registry

fn service_name(j: usize) -> String {
    format!("svc-{j:05}")
}

fn cluster_name(j: usize) -> String {
    format!("outbound|{}", service_name(j))
}

/// One file per service; instance `k` of service `j` at 10.a.b.(k+1), not on a mesh node (so
/// its port is its EDS port). `port0` overrides instance 0's port.
fn service_toml(j: usize, instances: usize, port0: u16) -> String {
    let name = service_name(j);
    let mut s = format!("[services.{name}]\nprotocol = \"http\"\nport = 8080\n");
    for k in 0..instances {
        let port = if k == 0 { port0 } else { 8080 };
        let _ = write!(
            s,
            "\n[[services.{name}.instances]]\naddress = \"10.{}.{}.{}\"\nport = {port}\n",
            j / 256,
            j % 256,
            k + 1
        );
    }
    s
}

fn write_atomically(dir: &Path, name: &str, content: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, dir.join("registry.d").join(name))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// What the simulated proxies report

/// The change being measured: which assignment, with which port, written when.
struct Target {
    cluster: String,
    port: u32,
    written: Instant,
    seen: Vec<Option<Duration>>,
    remaining: usize,
}

#[derive(Default)]
struct Tracker {
    active: AtomicBool,
    target: Mutex<Option<Target>>,
    all_seen: Notify,
    synced: AtomicUsize,
    all_synced: Notify,
    failed: AtomicUsize,
    bytes: AtomicU64,
    responses: AtomicU64,
    /// Cluster names by CDS version: every SotW proxy gets the same set, decoded once.
    cds_names: Mutex<HashMap<String, Arc<Vec<String>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tracker {
    fn arm(&self, cluster: String, port: u32, proxies: usize) {
        *lock(&self.target) = Some(Target {
            cluster,
            port,
            written: Instant::now(),
            seen: vec![None; proxies],
            remaining: proxies,
        });
        self.active.store(true, Ordering::SeqCst);
    }

    fn disarm(&self) -> Option<Target> {
        self.active.store(false, Ordering::SeqCst);
        lock(&self.target).take()
    }

    /// An assignment reached proxy `i`: record it if it is the one being waited for.
    fn check(&self, i: usize, cluster: &str, body: &[u8]) {
        let now = Instant::now();
        let mut guard = lock(&self.target);
        let Some(t) = guard.as_mut() else { return };
        if t.cluster != cluster || t.seen[i].is_some() {
            return;
        }
        let Ok(cla) = ClusterLoadAssignment::decode(body) else {
            return;
        };
        if !has_port(&cla, t.port) {
            return;
        }
        t.seen[i] = Some(now - t.written);
        t.remaining -= 1;
        if t.remaining == 0 {
            self.all_seen.notify_one();
        }
    }

    fn count(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.responses.fetch_add(1, Ordering::Relaxed);
    }

    fn synced_one(&self, total: usize) {
        if self.synced.fetch_add(1, Ordering::SeqCst) + 1 == total {
            self.all_synced.notify_one();
        }
    }

    fn cds_names(&self, r: &DiscoveryResponse) -> Arc<Vec<String>> {
        if let Some(names) = lock(&self.cds_names).get(&r.version_info) {
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
        lock(&self.cds_names).insert(r.version_info.clone(), names.clone());
        names
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

// ---------------------------------------------------------------------------------------------
// Simulated proxies

fn node(i: usize) -> Node {
    let string = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let outbound = format!("127.0.0.1:{}", 20000 + i);
    Node {
        id: format!("bench-{i}"),
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

async fn sotw_proxy(i: usize, channel: Channel, total: usize, tracker: Arc<Tracker>) -> Result<()> {
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
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut eds_names: Arc<Vec<String>> = Arc::default();
    let (mut eds_version, mut eds_nonce) = (String::new(), String::new());
    let mut eds_received = 0usize;
    let mut synced = false;
    while let Some(r) = inbound.message().await? {
        tracker.count(r.encoded_len());
        match r.type_url.as_str() {
            CLUSTER => {
                let names = tracker.cds_names(&r);
                send(DiscoveryRequest {
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    type_url: CLUSTER.into(),
                    ..Default::default()
                })?;
                if names != eds_names {
                    eds_names = names;
                    send(DiscoveryRequest {
                        version_info: eds_version.clone(),
                        response_nonce: eds_nonce.clone(),
                        type_url: ENDPOINT.into(),
                        resource_names: eds_names.to_vec(),
                        ..Default::default()
                    })?;
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
                        tracker.synced_one(total);
                    }
                } else if tracker.active.load(Ordering::Relaxed) {
                    for a in &r.resources {
                        // SotW carries no names: the assignment says which cluster it is.
                        if let Ok(cla) = ClusterLoadAssignment::decode(a.value.as_slice()) {
                            tracker.check(i, &cla.cluster_name, &a.value);
                        }
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

async fn delta_proxy(
    i: usize,
    channel: Channel,
    total: usize,
    tracker: Arc<Tracker>,
) -> Result<()> {
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
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut clusters = std::collections::BTreeSet::new();
    let mut eds_received = 0usize;
    let mut synced = false;
    while let Some(r) = inbound.message().await? {
        tracker.count(r.encoded_len());
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
            }
            ENDPOINT => {
                if !synced {
                    eds_received += r.resources.len();
                    if eds_received >= clusters.len() && !clusters.is_empty() {
                        synced = true;
                        tracker.synced_one(total);
                    }
                } else if tracker.active.load(Ordering::Relaxed) {
                    for res in &r.resources {
                        if let Some(body) = &res.resource {
                            tracker.check(i, &res.name, &body.value);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[derive(Debug, Default, Clone, Copy)]
struct Mem {
    rss_kb: u64,
    hwm_kb: u64,
}

fn memory(pid: u32) -> Mem {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Mem {
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
    }
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = text.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |n: usize| f.get(n).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    let hz = 100.0; // USER_HZ on Linux
    (ticks(11) + ticks(12)) as f64 / hz
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(label: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{label}: n={} p50={:.1} ms p90={:.1} ms p99={:.1} ms max={:.1} ms",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// (generation, kind, learned_unix_ms, built_unix_ms) from discovery's /status.
async fn snapshot_status(http: SocketAddr) -> Result<(u64, String, f64, f64)> {
    let r = pilotfish_tests::blocking(move || http_get(http, "discovery", "/status")).await?;
    let v: serde_json::Value = serde_json::from_str(&r.body).context("/status is not JSON")?;
    let s = &v["snapshot"];
    Ok((
        s["generation"].as_u64().unwrap_or(0),
        s["kind"].as_str().unwrap_or("?").to_string(),
        s["learned_unix_ms"].as_f64().unwrap_or(f64::NAN),
        s["built_unix_ms"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------

async fn run(args: Args) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("pilotfish-xds-bench-")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("registry.d"))?;
    for j in 0..args.services {
        write_atomically(
            &dir,
            &format!("{}.toml", service_name(j)),
            &service_toml(j, args.instances, 8080),
        )?;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let grpc = SocketAddr::new(ip, free_port(ip));
    let http = SocketAddr::new(ip, free_port(ip));
    let config = dir.join("discovery.toml");
    std::fs::write(
        &config,
        format!(
            "insecure = true\ntrust_domain = \"pilotfish.local\"\nstate_dir = \"state\"\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\n[registry.files]\npaths = [\"registry.d\"]\n"
        ),
    )?;
    // Per-stream debug lines would cost more than the pushes being measured.
    if std::env::var_os("PILOTFISH_LOG").is_none() {
        std::env::set_var("PILOTFISH_LOG", "warn,pilotfish_discovery::mesh=info");
    }
    // PILOTFISH_BENCH_WRAP=heaptrack (or `perf record -g --`) runs discovery under a profiler.
    let program = binary("pilotfish-discovery")?;
    let config_arg = config.display().to_string();
    let wrap = std::env::var("PILOTFISH_BENCH_WRAP").unwrap_or_default();
    let mut words: Vec<String> = wrap.split_whitespace().map(str::to_string).collect();
    words.extend([program.display().to_string(), "--config".into(), config_arg]);
    let argv: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
    let mut discovery = Process::spawn(
        "discovery",
        Path::new(&words[0]),
        &argv,
        dir.join("discovery.log"),
    )?;
    let mut pid = discovery.pid().context("discovery pid")?;
    pilotfish_tests::wait_for("discovery serving", Duration::from_secs(60), || async {
        Ok(snapshot_status(http)
            .await
            .ok()
            .filter(|s| s.0 > 0)
            .map(|_| ()))
    })
    .await?;
    if !wrap.is_empty() {
        // The wrapper's child is discovery.
        pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(pid);
    }
    let idle = memory(pid);
    println!(
        "pilotfish-xds-bench: {} services x {} instances, {} proxies ({}% delta), {} streams per connection",
        args.services, args.instances, args.proxies, args.delta_percent, args.per_connection
    );
    println!(
        "discovery before proxies: VmRSS {:.1} MB, VmHWM {:.1} MB",
        mb(idle.rss_kb),
        mb(idle.hwm_kb)
    );

    // Connect every proxy.
    let tracker = Arc::new(Tracker::default());
    let endpoint = Endpoint::from_shared(format!("http://{grpc}"))?
        .tcp_nodelay(true)
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .initial_stream_window_size(Some(1024 * 1024));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut channel = None;
    for i in 0..args.proxies {
        if i % args.per_connection == 0 {
            channel = Some(
                endpoint
                    .connect()
                    .await
                    .context("connecting to discovery")?,
            );
        }
        let ch = channel.clone().context("channel")?;
        let tracker = tracker.clone();
        let total = args.proxies;
        let delta = i * 100 < args.proxies * args.delta_percent;
        tasks.spawn(async move {
            let result = if delta {
                delta_proxy(i, ch, total, tracker.clone()).await
            } else {
                sotw_proxy(i, ch, total, tracker.clone()).await
            };
            if let Err(e) = &result {
                if tracker.failed.fetch_add(1, Ordering::SeqCst) < 5 {
                    eprintln!("proxy bench-{i}: {e:#}");
                }
            }
        });
    }
    let connected = started.elapsed();
    let synced = tokio::time::timeout(Duration::from_secs(120), async {
        while tracker.synced.load(Ordering::SeqCst) < args.proxies {
            tracker.all_synced.notified().await;
        }
    })
    .await;
    let sync_time = started.elapsed();
    if synced.is_err() {
        bail!(
            "only {} of {} proxies synced in 120 s ({} failed); log: {}",
            tracker.synced.load(Ordering::SeqCst),
            args.proxies,
            tracker.failed.load(Ordering::SeqCst),
            discovery.log.display()
        );
    }
    let initial_bytes = tracker.bytes.load(Ordering::SeqCst);
    // Let the ACKs of the initial push land before measuring memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_sync = memory(pid);
    println!(
        "initial sync: all {} proxies connected in {:.2} s and had CDS+EDS after {:.2} s; {:.1} MB received",
        args.proxies,
        connected.as_secs_f64(),
        sync_time.as_secs_f64(),
        initial_bytes as f64 / 1e6
    );
    println!(
        "discovery after sync: VmRSS {:.1} MB, VmHWM {:.1} MB",
        mb(after_sync.rss_kb),
        mb(after_sync.hwm_kb)
    );

    // Endpoint changes, one at a time.
    let mut from_write = Vec::new();
    let mut from_learned = Vec::new();
    let mut detection = Vec::new();
    let mut builds = Vec::new();
    let mut missed = 0usize;
    let mut kinds: HashMap<String, usize> = HashMap::new();
    let bytes_before = tracker.bytes.load(Ordering::SeqCst);
    let cpu_before = cpu_seconds(pid);
    for k in 0..args.changes {
        let j = (k * 7919 + 13) % args.services;
        let port = 30000 + k as u16;
        tracker.arm(cluster_name(j), u32::from(port), args.proxies);
        let written_wall = unix_ms(SystemTime::now());
        write_atomically(
            &dir,
            &format!("{}.toml", service_name(j)),
            &service_toml(j, args.instances, port),
        )?;
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.all_seen.notified()).await;
        let target = tracker.disarm().context("target")?;
        let (_, kind, learned, built) = snapshot_status(http).await?;
        *kinds.entry(kind).or_default() += 1;
        let detect_ms = learned - written_wall;
        detection.push(detect_ms);
        builds.push(built - learned);
        for d in target.seen.iter() {
            match d {
                Some(d) => {
                    let ms = d.as_secs_f64() * 1000.0;
                    from_write.push(ms);
                    from_learned.push(ms - detect_ms);
                }
                None => missed += 1,
            }
        }
        tokio::time::sleep(args.interval).await;
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let change_bytes = tracker.bytes.load(Ordering::SeqCst) - bytes_before;
    let after_changes = memory(pid);
    println!(
        "{} endpoint changes (snapshot kinds: {kinds:?}); {} deliveries missed (10 s timeout)",
        args.changes, missed
    );
    println!("{}", summary("  from file write  ", from_write));
    println!("{}", summary("  from discovery learned", from_learned));
    println!(
        "{}",
        summary("  registry detection (write -> learned)", detection)
    );
    println!(
        "{}",
        summary("  snapshot build (learned -> published)", builds)
    );
    println!(
        "  discovery CPU {:.1} ms per change; {:.1} KB received per change ({:.0} bytes per proxy)",
        cpu * 1000.0 / args.changes.max(1) as f64,
        change_bytes as f64 / 1e3 / args.changes.max(1) as f64,
        change_bytes as f64 / (args.changes.max(1) * args.proxies) as f64
    );
    println!(
        "discovery after changes: VmRSS {:.1} MB, VmHWM {:.1} MB",
        mb(after_changes.rss_kb),
        mb(after_changes.hwm_kb)
    );
    if tracker.failed.load(Ordering::SeqCst) > 0 {
        println!(
            "WARNING: {} proxy streams failed",
            tracker.failed.load(Ordering::SeqCst)
        );
    }

    if args.agent {
        match agent_rss(&dir, grpc).await {
            Ok((agent, envoy)) => println!(
                "agent (real Envoy, {} clusters): agent VmRSS {:.1} MB, VmHWM {:.1} MB (Envoy itself: VmRSS {:.1} MB)",
                args.services,
                mb(agent.rss_kb),
                mb(agent.hwm_kb),
                mb(envoy.rss_kb)
            ),
            Err(e) => println!("agent: not measured: {e:#}"),
        }
    }

    tasks.abort_all();
    if !wrap.is_empty() {
        // The wrapper does not pass SIGTERM on: stop discovery itself first.
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    discovery.terminate(Duration::from_secs(5));
    if args.keep {
        let kept = tmp.keep();
        println!("work directory kept: {}", kept.display());
    }
    Ok(())
}

/// Starts one agent with real Envoy against the bench discovery; its RSS (and Envoy's) once
/// Envoy is ready and has settled.
async fn agent_rss(dir: &Path, grpc: SocketAddr) -> Result<(Mem, Mem)> {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let home: PathBuf = dir.join("bench-agent");
    std::fs::create_dir_all(&home)?;
    let admin = SocketAddr::new(ip, free_port(ip));
    let config = home.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"node = "bench-agent"
address = "{ip}"
discovery = ["{grpc}"]
insecure = true
outbound = "{ip}:{outbound}"
app_address = "{ip}"
mesh_port = {mesh}
state_dir = "state"
run_dir = "run"
health = "{ip}:{health}"

[envoy]
binary = "{envoy}"
admin = "{admin}"
concurrency = 1
drain_time = "2s"
xds = "delta"
"#,
            outbound = free_port(ip),
            mesh = free_port(ip),
            health = free_port(ip),
            envoy = envoy_binary()?.display(),
        ),
    )?;
    let mut agent = Process::spawn(
        "agent",
        &binary("pilotfish-agent")?,
        &["--config", &config.display().to_string()],
        home.join("agent.log"),
    )?;
    let pid = agent.pid().context("agent pid")?;
    let ready = pilotfish_tests::wait_for("envoy ready", Duration::from_secs(90), || async {
        Ok(
            pilotfish_tests::blocking(move || http_get(admin, "admin", "/ready"))
                .await
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ()),
        )
    })
    .await;
    if let Err(e) = ready {
        agent.terminate(Duration::from_secs(5));
        bail!("{e:#}; agent log: {}", agent.log.display());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mem = memory(pid);
    let envoy = envoy_child(pid).map(memory).unwrap_or_default();
    agent.terminate(Duration::from_secs(10));
    Ok((mem, envoy))
}

fn envoy_child(agent: u32) -> Option<u32> {
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{agent}/task"))
        .ok()?
        .flatten()
    {
        children
            .push_str(&std::fs::read_to_string(task.path().join("children")).unwrap_or_default());
        children.push(' ');
    }
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().starts_with("envoy"))
                .unwrap_or(false)
        })
}
