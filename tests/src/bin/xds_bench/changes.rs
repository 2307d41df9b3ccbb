//! One push run: a fresh insecure discovery, P simulated proxies of one flavour (or a mix),
//! the initial sync, K endpoint changes, G global changes; then the transport floor with the
//! same proxies and the bytes discovery sent them.
//!
//! Every change is timed per proxy from the file write. `/status` says when discovery learned
//! of the change and when it published the snapshot, which splits that time into registry
//! detection + debounce + build, and the fan-out (snapshot published -> proxy has it) that the
//! floor is compared with.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;
use tonic::transport::Endpoint;

use crate::agent;
use crate::discovery::{self, mb, Discovery, Mem};
use crate::floor::Floor;
use crate::proxy::{self, flavour_of, Captured, Tracker, Want};
use crate::registry::{
    cluster_name, policies_toml, service_name, service_toml, write_atomically, write_registry,
    LB_ALTERNATES, POLICIES_FILE,
};
use crate::report::summary;

const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);
const GLOBAL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub label: String,
    pub services: usize,
    pub instances: usize,
    pub proxies: usize,
    pub delta_percent: usize,
    pub per_connection: usize,
    pub changes: usize,
    pub interval: Duration,
    pub global_changes: usize,
    pub global_interval: Duration,
    pub endpoint: bool,
    pub global: bool,
    pub floor: bool,
    pub agent: bool,
    pub keep: bool,
}

/// What a series of changes did, over every proxy and change.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub count: usize,
    /// Per delivery: file write -> the proxy has it (ms).
    pub from_write: Vec<f64>,
    /// Per delivery: snapshot published -> the proxy has it (ms).
    pub fan_out: Vec<f64>,
    /// Per change: write -> discovery learned (registry detection), learned -> published.
    pub detection: Vec<f64>,
    pub build: Vec<f64>,
    pub missed: usize,
    pub kinds: BTreeMap<String, usize>,
    pub cpu_ms_per_change: f64,
    pub bytes_per_proxy: f64,
    /// The first change's target and what the first proxy of each flavour got for it.
    pub sample: Option<(Want, Captured)>,
}

#[derive(Debug, Clone, Default)]
pub struct FloorResult {
    pub sync: Duration,
    pub endpoint: Option<Vec<f64>>,
    pub global: Option<Vec<f64>>,
    pub missed: usize,
}

#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub label: String,
    pub sync: Duration,
    pub idle: Mem,
    pub peak_reset: bool,
    pub peak_sync_kb: u64,
    pub peak_endpoint_kb: Option<u64>,
    pub peak_global_kb: Option<u64>,
    pub rss_end_kb: u64,
    pub endpoint: Option<Changes>,
    pub global: Option<Changes>,
    pub floor: Option<FloorResult>,
    /// Encoded sizes of one proxy's initial, endpoint-change and global-change responses.
    pub initial_bytes: usize,
    pub endpoint_bytes: usize,
    pub global_bytes: usize,
    /// Proxy streams that ended during the run (each reopened after a backoff).
    pub lost_streams: usize,
    pub agent: Option<(Mem, Mem)>,
}

pub async fn run(opts: &RunOptions) -> Result<RunResult> {
    let (tmp, dir) = discovery::work_dir(&opts.label.to_lowercase())?;
    write_registry(&dir, opts.services, opts.instances)?;
    let discovery = Discovery::start(&dir, false).await?;
    let mut result = RunResult {
        label: opts.label.clone(),
        idle: discovery.memory(),
        ..Default::default()
    };
    println!(
        "\n== {}: {} services x {} instances, {} proxies ({}% Delta), {} streams per connection ==",
        opts.label,
        opts.services,
        opts.instances,
        opts.proxies,
        opts.delta_percent,
        opts.per_connection
    );
    println!(
        "discovery before proxies: VmRSS {:.1} MB, VmHWM {:.1} MB",
        mb(result.idle.rss_kb),
        mb(result.idle.hwm_kb)
    );
    result.peak_reset = discovery.reset_peak();
    if !result.peak_reset {
        println!("note: cannot reset VmHWM (clear_refs refused): peaks count from the start");
    }

    let tracker = Arc::new(Tracker::for_mix(opts.proxies, opts.delta_percent));
    let url = format!("http://{}", discovery.grpc);
    let (mut tasks, sync) = match connect_all(&url, opts, tracker.clone()).await {
        Ok(r) => r,
        Err(e) => bail!("{e:#}; log: {}", discovery.log().display()),
    };
    result.sync = sync;
    let initial_bytes = tracker.bytes.load(Ordering::SeqCst);
    // Let the ACKs of the initial push land before measuring memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_sync = discovery.memory();
    result.peak_sync_kb = after_sync.hwm_kb;
    let initial = tracker.initial();
    result.initial_bytes = captured_len(&initial);
    println!(
        "initial sync: all {} proxies had CDS+EDS after {:.2} s; {:.1} MB received",
        opts.proxies,
        sync.as_secs_f64(),
        initial_bytes as f64 / 1e6
    );
    println!(
        "discovery after sync: VmRSS {:.1} MB, peak (VmHWM) during sync {:.1} MB",
        mb(after_sync.rss_kb),
        mb(after_sync.hwm_kb)
    );

    if opts.endpoint {
        discovery.reset_peak();
        let changes = endpoint_changes(opts, &dir, &discovery, &tracker).await?;
        let mem = discovery.memory();
        result.peak_endpoint_kb = Some(mem.hwm_kb);
        println!(
            "discovery after endpoint changes: VmRSS {:.1} MB, peak during them {:.1} MB",
            mb(mem.rss_kb),
            mb(mem.hwm_kb)
        );
        result.endpoint_bytes = changes.sample.as_ref().map_or(0, |s| captured_len(&s.1));
        result.endpoint = Some(changes);
    }
    if opts.global {
        discovery.reset_peak();
        let changes = global_changes(opts, &dir, &discovery, &tracker).await?;
        let mem = discovery.memory();
        result.peak_global_kb = Some(mem.hwm_kb);
        println!(
            "discovery after global changes: VmRSS {:.1} MB, peak during them {:.1} MB",
            mb(mem.rss_kb),
            mb(mem.hwm_kb)
        );
        result.global_bytes = changes.sample.as_ref().map_or(0, |s| captured_len(&s.1));
        result.global = Some(changes);
    }
    result.rss_end_kb = discovery.memory().rss_kb;
    result.lost_streams = tracker.lost.load(Ordering::SeqCst);
    if result.lost_streams > 0 {
        println!(
            "WARNING: {} proxy streams were lost (and reopened after a backoff)",
            result.lost_streams
        );
    }
    if opts.agent {
        match agent::rss(&dir, discovery.grpc, opts.services).await {
            Ok(mem) => result.agent = Some(mem),
            Err(e) => println!("agent: not measured: {e:#}"),
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    discovery.stop();
    if opts.keep {
        println!("work directory kept: {}", tmp.keep().display());
    }

    if opts.floor {
        let endpoint = result.endpoint.as_ref().and_then(|c| c.sample.clone());
        let global = result.global.as_ref().and_then(|c| c.sample.clone());
        result.floor = Some(floor_run(opts, initial, endpoint, global).await?);
    }
    Ok(result)
}

/// Bytes one proxy received: of the flavour that received more, in a mixed run.
fn captured_len(c: &Captured) -> usize {
    c.iter()
        .map(|v| v.iter().map(|b| b.len()).sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// Connects every proxy to `url` (one HTTP/2 connection per `per_connection` proxies) and
/// waits until all have their initial config.
async fn connect_all(
    url: &str,
    opts: &RunOptions,
    tracker: Arc<Tracker>,
) -> Result<(JoinSet<()>, Duration)> {
    let endpoint = Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .initial_stream_window_size(Some(1024 * 1024));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut channel = None;
    for i in 0..opts.proxies {
        if i % opts.per_connection == 0 {
            channel = Some(endpoint.connect().await.context("connecting")?);
        }
        let ch = channel.clone().context("channel")?;
        let tracker = tracker.clone();
        let flavour = flavour_of(i, opts.proxies, opts.delta_percent);
        tasks.spawn(proxy::run_reconnecting(i, flavour, ch, tracker));
    }
    if !tracker.wait_all_synced(SYNC_TIMEOUT).await {
        bail!(
            "only {} of {} proxies synced in {SYNC_TIMEOUT:?} ({} streams lost)",
            tracker.synced(),
            opts.proxies,
            tracker.lost.load(Ordering::SeqCst)
        );
    }
    Ok((tasks, started.elapsed()))
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Folds one change's outcome into `into`: per-proxy times from the write and from the
/// snapshot's publication.
async fn record(
    into: &mut Changes,
    outcome: proxy::Outcome,
    want: Want,
    written_wall: f64,
    discovery: &Discovery,
) -> Result<()> {
    let status = discovery.status().await?;
    *into.kinds.entry(status.kind.clone()).or_default() += 1;
    let detect = status.learned_unix_ms - written_wall;
    let published = status.built_unix_ms - written_wall;
    into.detection.push(detect);
    into.build
        .push(status.built_unix_ms - status.learned_unix_ms);
    for d in &outcome.seen {
        match d {
            Some(d) => {
                let ms = d.as_secs_f64() * 1000.0;
                into.from_write.push(ms);
                into.fan_out.push(ms - published);
            }
            None => into.missed += 1,
        }
    }
    if into.sample.is_none() && outcome.capture.iter().any(|c| !c.is_empty()) {
        into.sample = Some((want, outcome.capture));
    }
    into.count += 1;
    Ok(())
}

async fn endpoint_changes(
    opts: &RunOptions,
    dir: &std::path::Path,
    discovery: &Discovery,
    tracker: &Tracker,
) -> Result<Changes> {
    let mut changes = Changes::default();
    let bytes_before = tracker.bytes.load(Ordering::SeqCst);
    let cpu_before = discovery.cpu_seconds();
    for k in 0..opts.changes {
        let j = (k * 7919 + 13) % opts.services;
        let port = 30000 + (k % 30000) as u16;
        let want = Want::Assignment {
            cluster: cluster_name(j),
            port: u32::from(port),
        };
        tracker.arm(want.clone());
        let written_wall = unix_ms(SystemTime::now());
        write_atomically(
            dir,
            &format!("{}.toml", service_name(j)),
            &service_toml(j, opts.instances, port),
        )?;
        tracker.wait_all_seen(ENDPOINT_TIMEOUT).await;
        let outcome = tracker.disarm().context("target")?;
        record(&mut changes, outcome, want, written_wall, discovery).await?;
        tokio::time::sleep(opts.interval).await;
    }
    finish(
        &mut changes,
        opts,
        discovery,
        tracker,
        bytes_before,
        cpu_before,
    );
    println!(
        "{} endpoint changes (snapshot kinds: {:?}); {} deliveries missed ({ENDPOINT_TIMEOUT:?} timeout)",
        changes.count, changes.kinds, changes.missed
    );
    print_changes(&changes);
    Ok(changes)
}

async fn global_changes(
    opts: &RunOptions,
    dir: &std::path::Path,
    discovery: &Discovery,
    tracker: &Tracker,
) -> Result<Changes> {
    let mut changes = Changes::default();
    let bytes_before = tracker.bytes.load(Ordering::SeqCst);
    let cpu_before = discovery.cpu_seconds();
    for k in 0..opts.global_changes {
        let (lb_name, lb) = LB_ALTERNATES[k % LB_ALTERNATES.len()];
        let want = Want::LbPolicy {
            policy: lb as i32,
            services: opts.services,
        };
        tracker.arm(want.clone());
        let written_wall = unix_ms(SystemTime::now());
        write_atomically(dir, POLICIES_FILE, &policies_toml(opts.services, lb_name))?;
        let all = tracker.wait_all_seen(GLOBAL_TIMEOUT).await;
        let waited = unix_ms(SystemTime::now()) - written_wall;
        let outcome = tracker.disarm().context("target")?;
        record(&mut changes, outcome, want, written_wall, discovery).await?;
        println!(
            "  global change {}: load_balancer = {lb_name}: {} after {:.0} ms",
            k + 1,
            if all {
                "all proxies have it"
            } else {
                "NOT all proxies have it"
            },
            waited
        );
        // The EDS pushes that follow a CDS change end before the next change starts.
        tracker
            .settle(Duration::from_millis(300), Duration::from_secs(30))
            .await;
        tokio::time::sleep(opts.global_interval).await;
    }
    finish(
        &mut changes,
        opts,
        discovery,
        tracker,
        bytes_before,
        cpu_before,
    );
    println!(
        "{} global changes (every service's load balancer; snapshot kinds: {:?}); {} deliveries missed ({GLOBAL_TIMEOUT:?} timeout)",
        changes.count, changes.kinds, changes.missed
    );
    print_changes(&changes);
    Ok(changes)
}

fn finish(
    changes: &mut Changes,
    opts: &RunOptions,
    discovery: &Discovery,
    tracker: &Tracker,
    bytes_before: u64,
    cpu_before: f64,
) {
    let n = changes.count.max(1) as f64;
    changes.cpu_ms_per_change = (discovery.cpu_seconds() - cpu_before) * 1000.0 / n;
    let bytes = tracker.bytes.load(Ordering::SeqCst) - bytes_before;
    changes.bytes_per_proxy = bytes as f64 / (n * opts.proxies as f64);
}

fn print_changes(c: &Changes) {
    println!("{}", summary("  from file write", &c.from_write));
    println!(
        "{}",
        summary("  fan-out (snapshot published -> proxy)", &c.fan_out)
    );
    println!(
        "{}",
        summary("  registry detection (write -> learned)", &c.detection)
    );
    println!(
        "{}",
        summary("  debounce + build (learned -> published)", &c.build)
    );
    println!(
        "  discovery CPU {:.1} ms per change; {:.0} bytes received per proxy per change (including follow-up pushes)",
        c.cpu_ms_per_change, c.bytes_per_proxy
    );
}

/// The same proxies against the transport floor: initial sync with the initial responses,
/// then every captured change sent as often as discovery made it.
async fn floor_run(
    opts: &RunOptions,
    initial: Captured,
    endpoint: Option<(Want, Captured)>,
    global: Option<(Want, Captured)>,
) -> Result<FloorResult> {
    let floor = Floor::start(initial, None)?;
    let tracker = Arc::new(Tracker::for_mix(opts.proxies, opts.delta_percent));
    let url = format!("http://{}", floor.addr);
    let (mut tasks, sync) = connect_all(&url, opts, tracker.clone())
        .await
        .context("transport floor")?;
    let mut result = FloorResult {
        sync,
        ..Default::default()
    };
    tracker
        .settle(Duration::from_millis(200), Duration::from_secs(10))
        .await;
    for (sample, rounds, slot, timeout) in [
        (
            endpoint,
            opts.changes,
            &mut result.endpoint,
            ENDPOINT_TIMEOUT,
        ),
        (
            global,
            opts.global_changes,
            &mut result.global,
            GLOBAL_TIMEOUT,
        ),
    ] {
        let Some((want, messages)) = sample else {
            continue;
        };
        let mut times = Vec::new();
        for _ in 0..rounds {
            tracker.arm(want.clone());
            floor.send(messages.clone());
            tracker.wait_all_seen(timeout).await;
            let outcome = tracker.disarm().context("target")?;
            for d in &outcome.seen {
                match d {
                    Some(d) => times.push(d.as_secs_f64() * 1000.0),
                    None => result.missed += 1,
                }
            }
            tracker
                .settle(Duration::from_millis(100), Duration::from_secs(10))
                .await;
        }
        *slot = Some(times);
    }
    println!(
        "transport floor ({} streams, same clients, same bytes): initial sync {:.2} s",
        floor.streams(),
        sync.as_secs_f64()
    );
    if let Some(t) = &result.endpoint {
        println!("{}", summary("  endpoint change: send -> proxy", t));
    }
    if let Some(t) = &result.global {
        println!("{}", summary("  global change: send -> proxy", t));
    }
    if result.missed > 0 {
        println!("  WARNING: {} floor deliveries missed", result.missed);
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    floor.stop();
    Ok(result)
}
