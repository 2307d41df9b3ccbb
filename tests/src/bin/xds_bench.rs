//! `pilotfish-xds-bench`: push latency, memory and connect-storm behaviour of a real discovery
//! process, each next to the transport floor measured in the same run.
//!
//! Run (release build, on an otherwise idle machine):
//!
//! ```text
//! cargo build --release -p pilotfish-discovery -p pilotfish-agent -p pilotfish-tests
//! target/release/pilotfish-xds-bench                   # everything, 7-10 minutes
//! target/release/pilotfish-xds-bench --only endpoint,global --flavour delta
//! target/release/pilotfish-xds-bench --only storm,floor --storm 2000
//! ```
//!
//! # What runs
//!
//! 1. **Push runs**, one per flavour (`--flavour both`: all proxies SotW, then all Delta), each
//!    with a fresh discovery (`insecure`, in a temp dir) and a TOML registry of N services x M
//!    instances (one file per service). P simulated proxies (tonic ADS clients, one HTTP/2
//!    connection each) subscribe CDS (wildcard) then EDS for every cluster, ACK every response
//!    and, for SotW, re-request EDS after a CDS update as Envoy does. A proxy whose stream ends
//!    opens a new one after Envoy's backoff (500 ms to 30 s, jittered); the run counts these
//!    *lost streams*, and a change reaches such a proxy when its new stream delivers it.
//!    - *initial sync*: from the first connection until every proxy has CDS and EDS.
//!    - *endpoint changes* (K): rewrite one service's file with a new port on one instance, one
//!      change at a time; per proxy, the time until it received that ClusterLoadAssignment.
//!    - *global changes* (G): rewrite `registry.d/policies.toml`, which sets
//!      `[policies.<svc>] load_balancer` for every service, alternating `least_request` and
//!      `random`; per proxy, the time until it has the updated Cluster of every service.
//!    - discovery's *peak RSS* (VmHWM from /proc) during the sync, the endpoint changes and the
//!      global changes: the peak is reset before each phase (`clear_refs` 5).
//!    - the *transport floor*: discovery is stopped, and a bare tonic server inside the bench
//!      (own two-thread runtime, see `xds_bench/floor.rs`) serves the same P proxies (same
//!      client code, same connection settings) with the bytes discovery sent: the initial
//!      responses one proxy of each flavour got, then, as often as discovery made each kind of
//!      change, the responses that proxy got for the first one, copied into each stream by a
//!      codec that does no encoding. Timed from the send to each proxy having it. The floor
//!      sets TCP_NODELAY on its connections; discovery's insecure listener does not (tonic
//!      ignores its own nodelay setting for a listener passed in), its TLS listener does.
//! 2. **Storm**: a fresh discovery in secure mode (mTLS, its own CA) and S simulated proxies
//!    that connect at once, each with its own node certificate (signed in the bench with the CA
//!    discovery created in its state dir; see `xds_bench/storm.rs`), retrying with Envoy's
//!    jittered backoff, until every one has CDS and EDS or the deadline. Then the same storm
//!    against the transport floor over TLS, serving the initial responses discovery sent
//!    (when the `floor` part is chosen too).
//! 3. **Agent**: during the first push run, one `pilotfish-agent` with real Envoy against the
//!    same discovery; its RSS and Envoy's.
//!
//! # The figures (final table)
//!
//! - *write -> every proxy has it*, p50 / p99 over all (proxy, change) deliveries: includes
//!   the file registry's detection and discovery's debounce. Targets: endpoint p99 <= 100 ms,
//!   global p99 <= 1 s.
//! - *fan-out*: from the moment discovery published the snapshot (`built_unix_ms` in
//!   `/status`) to the proxy having it. Compared with the floor's send -> proxy for the same
//!   bytes; target p99 <= 3x the floor's p99. The "vs transport floor" column is measured /
//!   floor at p50 and at p99.
//! - *peak RSS*: target <= 128 MB in the push runs, <= 256 MB in the storm.
//! - *lost streams*: proxy streams that ended during a push run (target 0).
//! - *storm*: time until every proxy synced (target <= 10 s), proxies that never connected
//!   within the deadline (target 0), failed connection attempts and lost streams.
//!
//! Before the table, each phase prints its detail: p50/p90/p99/max, registry detection and
//! debounce + build times from `/status`, discovery CPU per change, bytes per proxy.
//!
//! # Flags
//!
//! - `--services N` (1000), `--instances M` (2), `--proxies P` (2000)
//! - `--flavour sotw|delta|both` (both): which push runs.
//! - `--delta-percent D`: instead, one mixed run with D % Delta proxies (the rest SotW).
//! - `--changes K` (20) endpoint changes, `--interval-ms` (300) pause after each.
//! - `--global-changes G` (10) global changes, `--global-interval-ms` (1000) pause after each
//!   (after the pushes it set off have ended).
//! - `--streams-per-connection S` (1: one HTTP/2 connection per proxy, like real agents).
//! - `--storm S` (5000; 0 = no storm), `--storm-flavour sotw|delta` (delta, the agent's
//!   default), `--storm-deadline-s` (60), `--storm-services N` (default `--services`; about
//!   300 gives the ~100 KB per proxy of a scoped config instead of full visibility).
//! - `--only LIST`: comma-separated parts among `endpoint`, `global`, `floor`, `storm`, `agent`
//!   (default: all). A push run (with its initial sync) happens when any of the first three or
//!   `agent` is chosen.
//! - `--no-agent`: skip the agent. `--keep`: keep the work directories and print their paths.
//!
//! Environment: `PILOTFISH_LOG` for discovery (default `warn,pilotfish_discovery::mesh=info`),
//! `MALLOC_ARENA_MAX` (default 2, as discovery's systemd unit sets it),
//! `PILOTFISH_BENCH_WRAP=heaptrack` (or `perf record -g --`) runs discovery under a profiler.

#[path = "xds_bench/agent.rs"]
mod agent;
#[path = "xds_bench/changes.rs"]
mod changes;
#[path = "xds_bench/discovery.rs"]
mod discovery;
#[path = "xds_bench/floor.rs"]
mod floor;
#[path = "xds_bench/proxy.rs"]
mod proxy;
#[path = "xds_bench/registry.rs"]
mod registry;
#[path = "xds_bench/report.rs"]
mod report;
#[path = "xds_bench/storm.rs"]
mod storm;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::changes::RunOptions;
use crate::proxy::Flavour;
use crate::storm::StormOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    Sotw,
    Delta,
    Both,
    /// One run, this percentage of proxies Delta.
    Mixed(usize),
}

#[derive(Debug, Clone, Copy)]
struct Parts {
    endpoint: bool,
    global: bool,
    floor: bool,
    storm: bool,
    agent: bool,
}

#[derive(Debug, Clone)]
struct Args {
    services: usize,
    instances: usize,
    proxies: usize,
    runs: Runs,
    changes: usize,
    interval: Duration,
    global_changes: usize,
    global_interval: Duration,
    per_connection: usize,
    storm: usize,
    /// Services in the storm's registry (default: `services`).
    storm_services: Option<usize>,
    storm_flavour: Flavour,
    storm_deadline: Duration,
    parts: Parts,
    keep: bool,
}

fn parse_flavour(flag: &str, value: Option<String>) -> Result<Option<Flavour>> {
    match value.as_deref() {
        Some("sotw") => Ok(Some(Flavour::Sotw)),
        Some("delta") => Ok(Some(Flavour::Delta)),
        Some("both") => Ok(None),
        Some(other) => bail!("{flag}: {other}: expected sotw, delta or both"),
        None => bail!("{flag} needs a value"),
    }
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        services: 1000,
        instances: 2,
        proxies: 2000,
        runs: Runs::Both,
        changes: 20,
        interval: Duration::from_millis(300),
        global_changes: 10,
        global_interval: Duration::from_millis(1000),
        per_connection: 1,
        storm: 5000,
        storm_services: None,
        storm_flavour: Flavour::Delta,
        storm_deadline: Duration::from_secs(60),
        parts: Parts {
            endpoint: true,
            global: true,
            floor: true,
            storm: true,
            agent: true,
        },
        keep: false,
    };
    let mut no_agent = false;
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
            "--interval-ms" => a.interval = Duration::from_millis(num()? as u64),
            "--global-changes" => a.global_changes = num()?,
            "--global-interval-ms" => a.global_interval = Duration::from_millis(num()? as u64),
            "--delta-percent" => a.runs = Runs::Mixed(num()?.min(100)),
            "--streams-per-connection" => a.per_connection = num()?.max(1),
            "--storm" => a.storm = num()?,
            "--storm-services" => a.storm_services = Some(num()?.max(1)),
            "--storm-deadline-s" => a.storm_deadline = Duration::from_secs(num()? as u64),
            "--flavour" => {
                a.runs = match parse_flavour("--flavour", it.next())? {
                    Some(Flavour::Sotw) => Runs::Sotw,
                    Some(Flavour::Delta) => Runs::Delta,
                    None => Runs::Both,
                }
            }
            "--storm-flavour" => {
                a.storm_flavour = parse_flavour("--storm-flavour", it.next())?
                    .context("--storm-flavour: sotw or delta")?
            }
            "--only" => {
                let list = it.next().context("--only needs a value")?;
                let mut p = Parts {
                    endpoint: false,
                    global: false,
                    floor: false,
                    storm: false,
                    agent: false,
                };
                for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match part {
                        "endpoint" => p.endpoint = true,
                        "global" => p.global = true,
                        "floor" => p.floor = true,
                        "storm" => p.storm = true,
                        "agent" => p.agent = true,
                        other => bail!(
                            "--only: unknown part {other} (endpoint, global, floor, storm, agent)"
                        ),
                    }
                }
                a.parts = p;
            }
            "--no-agent" => no_agent = true,
            "--keep" => a.keep = true,
            other => bail!("unknown flag {other} (see the comment at the top of xds_bench.rs)"),
        }
    }
    if no_agent {
        a.parts.agent = false;
    }
    if a.storm == 0 {
        a.parts.storm = false;
    }
    if a.services == 0 || a.instances == 0 || a.services > 60000 || a.instances > 250 {
        bail!("--services must be 1..=60000 and --instances 1..=250");
    }
    if a.proxies == 0 {
        bail!("--proxies must be at least 1");
    }
    Ok(a)
}

fn main() -> Result<()> {
    if pilotfish_tests::help_or_version(
        "pilotfish-xds-bench",
        "pilotfish-xds-bench [--services N] [--instances M] [--proxies P] \
         [--flavour sotw|delta|both] [--only endpoint,global,floor,storm,agent] [--storm S] ...\n\n\
         Push latency, memory and connect-storm figures of a real discovery, each next to the \
         transport floor. Every flag is described at the top of tests/src/bin/xds_bench.rs.",
    ) {
        return Ok(());
    }
    let args = parse_args()?;
    raise_fd_limit();
    // Per-stream debug lines would cost more than the pushes being measured.
    if std::env::var_os("PILOTFISH_LOG").is_none() {
        std::env::set_var("PILOTFISH_LOG", "warn,pilotfish_discovery::mesh=info");
    }
    // Discovery runs with this in its systemd unit (fewer glibc malloc arenas: less memory
    // held by idle per-thread arenas); measure it as it is deployed.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        std::env::set_var("MALLOC_ARENA_MAX", "2");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// Thousands of connections need more than the usual 1024 descriptors (discovery inherits
/// the limit too). Raised to the hard limit with prlimit(1), which keeps this crate free of
/// unsafe code.
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

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let p = args.parts;
    let runs: Vec<(String, usize)> = if p.endpoint || p.global || p.floor || p.agent {
        match args.runs {
            Runs::Sotw => vec![("SotW".into(), 0)],
            Runs::Delta => vec![("Delta".into(), 100)],
            Runs::Both => vec![("SotW".into(), 0), ("Delta".into(), 100)],
            Runs::Mixed(d) => vec![(format!("{d}% Delta"), d)],
        }
    } else {
        Vec::new()
    };
    println!(
        "pilotfish-xds-bench: {} services x {} instances, {} proxies; {} CPUs",
        args.services,
        args.instances,
        args.proxies,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut results = Vec::new();
    for (k, (label, delta_percent)) in runs.into_iter().enumerate() {
        let opts = RunOptions {
            label,
            services: args.services,
            instances: args.instances,
            proxies: args.proxies,
            delta_percent,
            per_connection: args.per_connection,
            changes: args.changes,
            interval: args.interval,
            global_changes: args.global_changes,
            global_interval: args.global_interval,
            endpoint: p.endpoint && args.changes > 0,
            global: p.global && args.global_changes > 0,
            floor: p.floor,
            agent: p.agent && k == 0,
            keep: args.keep,
        };
        results.push(changes::run(&opts).await?);
    }
    let storm = if p.storm {
        println!(
            "\n== storm: {} {} proxies with mTLS against a secure discovery ==",
            args.storm,
            args.storm_flavour.name()
        );
        Some(
            storm::run(&StormOptions {
                clients: args.storm,
                flavour: args.storm_flavour,
                deadline: args.storm_deadline,
                services: args.storm_services.unwrap_or(args.services),
                instances: args.instances,
                floor: p.floor,
                keep: args.keep,
            })
            .await?,
        )
    } else {
        None
    };
    let title = format!(
        "Results: {} services x {} instances, {} proxies, {} endpoint + {} global changes; whole run {:.0} s",
        args.services,
        args.instances,
        args.proxies,
        args.changes,
        args.global_changes,
        started.elapsed().as_secs_f64()
    );
    report::print_table(
        &title,
        &results,
        args.services,
        storm
            .as_ref()
            .map(|s| (s, args.storm_deadline.as_secs(), args.storm_flavour.name())),
    );
    Ok(())
}
