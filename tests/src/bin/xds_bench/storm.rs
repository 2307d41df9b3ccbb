//! The reconnect storm: N simulated proxies, each with its own node certificate, connect at
//! once to a discovery in secure mode (mTLS, as in production) and are timed until every one
//! has CDS and EDS. Then the same clients storm the transport floor over TLS, which sends each
//! of them the initial responses one of them got from discovery.
//!
//! Node certificates: an agent normally enrols with a join token and discovery's CA signs its
//! CSR. The bench skips the token and signs the CSRs itself with the CA discovery created in
//! `state_dir/ca/` ([`Ca::sign_workload`], what Enrol calls), so making 5000 of them costs
//! seconds, not a token round trip each. Discovery then sees exactly what it sees from
//! enrolled agents: a client certificate for `spiffe://<td>/node/bench-<i>` and `node.id`
//! `bench-<i>`.
//!
//! A client whose connection or stream fails retries like Envoy: jittered exponential backoff
//! from 500 ms to 30 s, until the deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use pilotfish_pki::{Ca, CaOptions, LocalKey, SpiffeId, TrustDomain};
use tokio::task::JoinSet;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::discovery::{self, Discovery, Mem, STATE_DIR, TRUST_DOMAIN};
use crate::floor::{self, Floor};
use crate::proxy::{self, Backoff, Flavour, Tracker};
use crate::registry::write_registry;

/// Connection attempt deadline, as the agent's.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct StormOptions {
    pub clients: usize,
    pub flavour: Flavour,
    pub deadline: Duration,
    pub services: usize,
    pub instances: usize,
    pub floor: bool,
    pub keep: bool,
}

/// One storm against one server.
#[derive(Debug, Clone, Default)]
pub struct StormRun {
    /// When the last client synced; `None` if not all did before the deadline.
    pub all_synced: Option<Duration>,
    /// Per client, from the start of the storm to its initial sync (ms), synced ones only.
    pub sync_ms: Vec<f64>,
    /// Per client, from the start of the storm to its first connection (TCP + TLS + HTTP/2).
    pub connect_ms: Vec<f64>,
    pub connected: usize,
    pub synced: usize,
    pub connect_failures: usize,
    pub stream_failures: usize,
    pub first_errors: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct StormResult {
    pub clients: usize,
    pub services: usize,
    pub discovery: StormRun,
    pub peak: Mem,
    pub peak_reset: bool,
    pub floor: Option<StormRun>,
    pub initial_bytes: usize,
}

struct Credential {
    chain_pem: String,
    key_pem: String,
}

pub async fn run(opts: &StormOptions) -> Result<StormResult> {
    let (tmp, dir) = discovery::work_dir("storm")?;
    write_registry(&dir, opts.services, opts.instances)?;
    let discovery = Discovery::start(&dir, true).await?;
    let td = TrustDomain::new(TRUST_DOMAIN).map_err(|e| anyhow!("{e}"))?;
    let ca = Ca::load_or_create(&dir.join(STATE_DIR), &td, &CaOptions::default())
        .context("loading the CA discovery created")?;

    let started = Instant::now();
    let n = opts.clients;
    let ca = Arc::new(ca);
    let creds = {
        let ca = ca.clone();
        let td = td.clone();
        tokio::task::spawn_blocking(move || node_credentials(&ca, &td, n)).await??
    };
    let credentials = started.elapsed();
    println!(
        "storm: {n} node certificates signed with discovery's CA in {:.1} s",
        credentials.as_secs_f64()
    );
    let bundle = ca.bundle_pem().to_string();

    let peak_reset = discovery.reset_peak();
    let (run, tracker) = storm(discovery.grpc, &creds, &bundle, &td, opts).await?;
    // Let the last ACKs land before reading the peak.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak = discovery.memory();
    println!(
        "storm against discovery: {} of {n} connected, {} synced{}; discovery VmHWM {:.1} MB, VmRSS {:.1} MB",
        run.connected,
        run.synced,
        run.all_synced
            .map(|d| format!(", all in {:.2} s", d.as_secs_f64()))
            .unwrap_or_default(),
        discovery::mb(peak.hwm_kb),
        discovery::mb(peak.rss_kb)
    );
    for e in &run.first_errors {
        println!("  client error: {e}");
    }
    let initial = tracker.initial();
    let initial_bytes = initial[opts.flavour.index()].iter().map(|b| b.len()).sum();
    drop(tracker);
    discovery.stop();

    let floor = if opts.floor && initial_bytes > 0 {
        let key = LocalKey::generate().map_err(|e| anyhow!("{e}"))?;
        let csr = key
            .csr_pem(&SpiffeId::discovery(&td))
            .map_err(|e| anyhow!("{e}"))?;
        let issued = ca
            .issue_server_cert(&csr, None)
            .map_err(|e| anyhow!("{e}"))?;
        let chain = format!("{}{}", issued.cert_pem, issued.chain_pem);
        let config = floor::tls_config(&chain, &key.private_key_pem(), &bundle)?;
        let server = Floor::start(initial, Some(config))?;
        let (run, _) = storm(server.addr, &creds, &bundle, &td, opts).await?;
        server.stop();
        println!(
            "storm against the transport floor: {} connected, {} synced{}",
            run.connected,
            run.synced,
            run.all_synced
                .map(|d| format!(", all in {:.2} s", d.as_secs_f64()))
                .unwrap_or_default()
        );
        Some(run)
    } else {
        None
    };
    if opts.keep {
        println!("storm work directory kept: {}", tmp.keep().display());
    }
    Ok(StormResult {
        clients: n,
        services: opts.services,
        discovery: run,
        peak,
        peak_reset,
        floor,
        initial_bytes,
    })
}

/// A key and a node certificate for each of `bench-0..n`, on every core.
fn node_credentials(ca: &Ca, td: &TrustDomain, n: usize) -> Result<Vec<Credential>> {
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(2);
    let chunk = n.div_ceil(threads).max(1);
    let indices: Vec<usize> = (0..n).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|&i| node_credential(ca, td, i))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow!("a signing thread panicked"))??,
            );
        }
        Ok(all)
    })
}

fn node_credential(ca: &Ca, td: &TrustDomain, i: usize) -> Result<Credential> {
    let key = LocalKey::generate().map_err(|e| anyhow!("{e}"))?;
    let id = SpiffeId::node(td, &proxy::node_id(i)).map_err(|e| anyhow!("{e}"))?;
    let csr = key.csr_pem(&id).map_err(|e| anyhow!("{e}"))?;
    let issued = ca
        .sign_workload(&csr, &id, Some(Duration::from_secs(3600)))
        .map_err(|e| anyhow!("signing bench-{i}: {e}"))?;
    Ok(Credential {
        chain_pem: format!("{}{}", issued.cert_pem, issued.chain_pem),
        key_pem: key.private_key_pem(),
    })
}

#[derive(Default)]
struct Counters {
    connected: Vec<AtomicBool>,
    connected_count: AtomicUsize,
    connect_ms: Mutex<Vec<f64>>,
    connect_failures: AtomicUsize,
    stream_failures: AtomicUsize,
    first_errors: Mutex<Vec<String>>,
}

impl Counters {
    fn error(&self, e: String) {
        let mut errors = self
            .first_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if errors.len() < 5 {
            errors.push(e);
        }
    }
}

/// Every client connects at once to `addr` and runs until the deadline or until all synced.
async fn storm(
    addr: SocketAddr,
    creds: &[Credential],
    bundle: &str,
    td: &TrustDomain,
    opts: &StormOptions,
) -> Result<(StormRun, Arc<Tracker>)> {
    let n = creds.len();
    // TLS settings are built first, so the storm times only connecting and syncing.
    let mut endpoints = Vec::with_capacity(n);
    for c in creds {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(bundle))
            .domain_name(td.discovery_dns_name())
            .identity(Identity::from_pem(&c.chain_pem, &c.key_pem))
            .timeout(CONNECT_TIMEOUT);
        endpoints.push(
            Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls)?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .initial_connection_window_size(Some(4 * 1024 * 1024))
                .initial_stream_window_size(Some(1024 * 1024)),
        );
    }
    let delta_percent = if opts.flavour == Flavour::Delta {
        100
    } else {
        0
    };
    let tracker = Arc::new(Tracker::for_mix(n, delta_percent));
    let counters = Arc::new(Counters {
        connected: (0..n).map(|_| AtomicBool::new(false)).collect(),
        ..Default::default()
    });
    let started = Instant::now();
    let end = tokio::time::Instant::now() + opts.deadline;
    let mut tasks = JoinSet::new();
    for (i, endpoint) in endpoints.into_iter().enumerate() {
        let tracker = tracker.clone();
        let counters = counters.clone();
        let flavour = opts.flavour;
        tasks.spawn(async move {
            let mut backoff = Backoff::new(i as u64);
            loop {
                match tokio::time::timeout_at(end, endpoint.connect()).await {
                    Err(_) => return,
                    Ok(Err(e)) => {
                        counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                        counters.error(format!("bench-{i} connect: {}", chain(&e)));
                    }
                    Ok(Ok(channel)) => {
                        if !counters.connected[i].swap(true, Ordering::SeqCst) {
                            counters.connected_count.fetch_add(1, Ordering::SeqCst);
                            counters
                                .connect_ms
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(started.elapsed().as_secs_f64() * 1000.0);
                        }
                        let result = proxy::run(i, flavour, channel, tracker.clone()).await;
                        counters.stream_failures.fetch_add(1, Ordering::Relaxed);
                        let why = match result {
                            Ok(()) => "ended".to_string(),
                            Err(e) => format!("{e:#}"),
                        };
                        counters.error(format!("bench-{i} stream: {why}"));
                        if tracker.is_synced(i) {
                            backoff.reset();
                        }
                    }
                }
                let wait = backoff.next_wait();
                if tokio::time::Instant::now() + wait >= end {
                    return;
                }
                tokio::time::sleep(wait).await;
            }
        });
    }
    let all = tracker.wait_all_synced(opts.deadline).await;
    let all_synced = all.then(|| started.elapsed());
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let run = StormRun {
        all_synced,
        sync_ms: tracker
            .sync_times()
            .iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect(),
        connect_ms: counters
            .connect_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        connected: counters.connected_count.load(Ordering::SeqCst),
        synced: tracker.synced(),
        connect_failures: counters.connect_failures.load(Ordering::SeqCst),
        stream_failures: counters.stream_failures.load(Ordering::SeqCst),
        first_errors: counters
            .first_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
    };
    Ok((run, tracker))
}

/// tonic's transport error keeps the cause (refused, timed out, TLS) in its source chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}
