//! The watcher against the Consul double (C-series of fault-tests.md d.2).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pilotfish_consul_double::{
    ConsulDouble, CutFault, DeregisterRequest, DoubleConfig, DoubleHandle, ErrorFault, Faults,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::Catalog;

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn double(dcs: &[&str]) -> DoubleHandle {
    ConsulDouble::start_with(
        any_port(),
        DoubleConfig {
            datacenters: dcs.iter().map(|d| d.to_string()).collect(),
            ..DoubleConfig::default()
        },
    )
    .await
    .unwrap()
}

fn fast_config(d: &DoubleHandle, dcs: &[&str]) -> ConsulConfig {
    let mut c = ConsulConfig::new(d.url(), dcs.iter().map(|d| d.to_string()).collect());
    c.wait = Duration::from_secs(2);
    c.rate_limit_burst = 50;
    c.rate_limit_interval = Duration::from_millis(10);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c.sweep_min_interval = Duration::from_millis(300);
    c
}

struct Running {
    catalog: watch::Receiver<Arc<Catalog>>,
    status: watch::Receiver<Arc<ConsulStatus>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ConsulError>>,
}

impl Running {
    fn start(config: ConsulConfig) -> Running {
        Running::start_with(config, None)
    }

    fn start_with(config: ConsulConfig, store: Option<crate::last_good::LastGoodStore>) -> Running {
        let (ctx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let (stx, status) = watch::channel(Arc::new(ConsulStatus::default()));
        let shutdown = CancellationToken::new();
        let mut reg = ConsulRegistry::new(config).unwrap();
        if let Some(store) = store {
            reg = reg.with_last_good(store);
        }
        let task = tokio::spawn(reg.run(ctx, stx, shutdown.clone()));
        Running {
            catalog,
            status,
            shutdown,
            task,
        }
    }

    async fn until(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Catalog) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if pred(&self.catalog.borrow_and_update()) {
                return start.elapsed();
            }
            if tokio::time::timeout_at(start + within, self.catalog.changed())
                .await
                .is_err()
            {
                panic!(
                    "{what}: not seen within {within:?}; catalog: {:?}; status: {:?}",
                    summary(&self.catalog.borrow()),
                    self.status.borrow()
                );
            }
        }
    }

    async fn status_until(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&ConsulStatus) -> bool,
    ) {
        let start = Instant::now();
        loop {
            {
                let s = self.status.borrow_and_update();
                // Before run() publishes its first status the map is empty.
                if !s.datacenters.is_empty() && pred(&s) {
                    return;
                }
            }
            if tokio::time::timeout_at(start + within, self.status.changed())
                .await
                .is_err()
            {
                panic!(
                    "{what}: status not seen within {within:?}: {:?}",
                    self.status.borrow()
                );
            }
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn summary(c: &Catalog) -> Vec<(String, usize)> {
    c.services
        .iter()
        .map(|(k, s)| (k.clone(), s.instances.len()))
        .collect()
}

fn count(c: &Catalog) -> usize {
    c.services.values().map(|s| s.instances.len()).sum()
}

fn seed(d: &DoubleHandle, dc: &str, services: usize, per: usize, nodes: usize) {
    for s in 0..services {
        for i in 0..per {
            let n = (s * per + i) % nodes;
            d.register_instance(
                dc,
                &format!("node-{n}"),
                &format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256),
                &format!("svc-{s}"),
                &format!("svc-{s}-{i}"),
                8000 + i as u16,
            )
            .unwrap();
        }
    }
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn consul_watch_syncs_and_sees_changes_within_a_second() {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 50, 3, 20);
    let mut r = Running::start(fast_config(&d, &["dc1"]));
    r.until("initial sync", 10 * SECOND, |c| {
        c.services.len() == 50 && count(c) == 150
    })
    .await;
    r.status_until("synced", SECOND, |s| {
        s.datacenters["dc1"].synced && !s.stale()
    })
    .await;

    // C2: register while the long-polls are open: seen within 1 s, one version bump.
    r.catalog.borrow_and_update();
    d.register_instance("dc1", "node-new", "10.9.0.1", "svc-7", "svc-7-new", 9000)
        .unwrap();
    r.until("register", SECOND, |c| {
        c.services["svc-7"].instances.len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !r.catalog.has_changed().unwrap(),
        "exactly one publish per change"
    );

    // Fail a health check.
    assert!(d.set_check_status("dc1", "node-new", "service:svc-7-new", "critical"));
    r.until("check failed", SECOND, |c| {
        c.services["svc-7"]
            .instances
            .iter()
            .any(|i| i.address == "10.9.0.1" && !i.healthy)
    })
    .await;
    // The node's Serf check going critical fails every instance on that node.
    assert!(d.set_check_status("dc1", "node-new", "service:svc-7-new", "passing"));
    assert!(d.set_check_status("dc1", "node-new", "serfHealth", "critical"));
    r.until("serf critical", SECOND, |c| {
        c.services["svc-7"]
            .instances
            .iter()
            .any(|i| i.address == "10.9.0.1" && !i.healthy)
    })
    .await;

    // Deregister: gone within 1 s.
    d.deregister(DeregisterRequest {
        node: "node-new".into(),
        service_id: Some("svc-7-new".into()),
        ..Default::default()
    })
    .unwrap();
    r.until("deregister", SECOND, |c| {
        c.services["svc-7"].instances.len() == 3
    })
    .await;

    // C10: a service leaving the catalog leaves the model.
    for i in 0..3 {
        d.deregister(DeregisterRequest {
            node: format!("node-{}", (7 * 3 + i) % 20),
            service_id: Some(format!("svc-7-{i}")),
            ..Default::default()
        })
        .unwrap();
    }
    r.until("service removed", SECOND, |c| {
        !c.services.contains_key("svc-7")
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn consul_spurious_wakeups_publish_nothing() {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 20, 2, 5);
    let mut r = Running::start(fast_config(&d, &["dc1"]));
    r.until("sync", 10 * SECOND, |c| count(c) == 40).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.catalog.borrow_and_update();
    for _ in 0..100 {
        d.spurious_wakeup();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Idempotent re-registration (Consul's own spurious wake-up).
    d.register_instance("dc1", "node-0", "10.0.0.0", "svc-0", "svc-0-0", 8000)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !r.catalog.has_changed().unwrap(),
        "a wake-up without change published"
    );
    // And a real change still gets through.
    d.register_instance("dc1", "node-9", "10.0.0.99", "svc-1", "svc-1-x", 8000)
        .unwrap();
    r.until("real change", SECOND, |c| {
        c.services["svc-1"].instances.len() == 3
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn consul_index_regression_resyncs() {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 5, 2, 3);
    let mut r = Running::start(fast_config(&d, &["dc1"]));
    r.until("sync", 10 * SECOND, |c| count(c) == 10).await;
    for _ in 0..20 {
        d.spurious_wakeup();
    }
    let before = d.index("dc1");
    d.regress_index(before / 2);
    d.register_instance("dc1", "node-x", "10.7.7.7", "svc-2", "svc-2-x", 8000)
        .unwrap();
    assert!(d.index("dc1") < before);
    // The blocked queries return at their 2 s timeout with a lower index; the watcher resets.
    r.until("after regression", 5 * SECOND, |c| {
        c.services["svc-2"].instances.len() == 3
    })
    .await;
    d.register_instance("dc1", "node-y", "10.7.7.8", "svc-3", "svc-3-y", 8000)
        .unwrap();
    r.until("and keeps going", 2 * SECOND, |c| {
        c.services["svc-3"].instances.len() == 3
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn consul_faults_keep_last_good_and_recover() {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 10, 2, 4);
    let mut config = fast_config(&d, &["dc1"]);
    config.stale = false;
    let mut r = Running::start(config);
    r.until("sync", 10 * SECOND, |c| count(c) == 20).await;
    let faults: Vec<(&str, Faults)> = vec![
        (
            "500 no leader",
            Faults {
                error: Some(ErrorFault::NoLeader),
                ..Faults::default()
            },
        ),
        (
            "500 internal",
            Faults {
                error: Some(ErrorFault::Internal),
                ..Faults::default()
            },
        ),
        (
            "429",
            Faults {
                error: Some(ErrorFault::RateLimited),
                ..Faults::default()
            },
        ),
        (
            "cut mid-body",
            Faults {
                cut: Some(CutFault::MidBody),
                ..Faults::default()
            },
        ),
        (
            "truncated json",
            Faults {
                cut: Some(CutFault::TruncatedJson),
                ..Faults::default()
            },
        ),
        (
            "connection refused",
            Faults {
                refuse_connections: true,
                ..Faults::default()
            },
        ),
    ];
    for (n, (name, fault)) in faults.into_iter().enumerate() {
        let good = r.catalog.borrow().clone();
        d.set_faults(fault);
        // A change during the fault: the spurious wake-up and the sweep hit the fault too.
        d.spurious_wakeup();
        r.status_until(name, 3 * SECOND, |s| {
            s.datacenters["dc1"].stale && s.datacenters["dc1"].last_error.is_some()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            **r.catalog.borrow(),
            *good,
            "{name}: last good catalog kept"
        );
        let addr = format!("10.8.0.{n}");
        d.register_instance(
            "dc1",
            &format!("node-f{n}"),
            &addr,
            "svc-1",
            &format!("svc-1-f{n}"),
            8000,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            **r.catalog.borrow(),
            *good,
            "{name}: nothing published while failing"
        );
        d.set_faults(Faults::default());
        r.until(name, 3 * SECOND, |c| {
            c.services["svc-1"]
                .instances
                .iter()
                .any(|i| i.address == addr)
        })
        .await;
        r.status_until(name, 3 * SECOND, |s| {
            !s.stale() && s.datacenters["dc1"].last_error.is_none()
        })
        .await;
    }
    r.stop().await;
}

#[tokio::test]
async fn consul_stale_reads_survive_no_leader() {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 3, 1, 3);
    let mut r = Running::start(fast_config(&d, &["dc1"]));
    r.until("sync", 10 * SECOND, |c| count(c) == 3).await;
    d.set_faults(Faults {
        error: Some(ErrorFault::NoLeader),
        ..Faults::default()
    });
    d.register_instance("dc1", "node-z", "10.6.0.1", "svc-0", "svc-0-z", 8000)
        .unwrap();
    // ?stale still answers: the change is used, and the status says the data may be stale.
    r.until("stale read", 2 * SECOND, |c| {
        c.services["svc-0"].instances.len() == 2
    })
    .await;
    r.status_until("no leader", 2 * SECOND, |s| {
        let d = &s.datacenters["dc1"];
        !d.known_leader && d.last_contact_ms >= 60_000 && d.stale
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn consul_hold_until_timeout_is_not_an_error() {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 3, 1, 3);
    let mut r = Running::start(fast_config(&d, &["dc1"]));
    r.until("sync", 10 * SECOND, |c| count(c) == 3).await;
    d.set_faults(Faults {
        hold: true,
        ..Faults::default()
    });
    d.register_instance("dc1", "node-h", "10.6.0.2", "svc-1", "svc-1-h", 8000)
        .unwrap();
    // Seen when the held query times out (wait 2 s + jitter), with no error recorded.
    r.until("after hold", 4 * SECOND, |c| {
        c.services["svc-1"].instances.len() == 2
    })
    .await;
    assert_eq!(r.status.borrow().datacenters["dc1"].errors_total, 0);
    d.set_faults(Faults::default());
    r.stop().await;
}

#[tokio::test]
async fn consul_missing_index_does_not_busy_loop() {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 2, 1, 2);
    let mut config = fast_config(&d, &["dc1"]);
    config.rate_limit_burst = 2;
    config.rate_limit_interval = Duration::from_millis(500);
    let mut r = Running::start(config);
    r.until("sync", 10 * SECOND, |c| count(c) == 2).await;
    d.set_faults(Faults {
        missing_index: true,
        ..Faults::default()
    });
    d.spurious_wakeup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.reset_stats();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = d.stats();
    // Index floored to 1 returns at once; the token bucket holds each long-poll to ~2/s.
    let polls = s.requests_to("/v1/catalog/services") + s.requests_to("/v1/health/state");
    assert!(
        polls <= 12,
        "busy loop: {polls} long-poll requests in 2 s: {s:?}"
    );
    r.stop().await;
}

#[tokio::test]
async fn consul_acl_not_found_names_the_token_file_and_keeps_last_good() {
    let d = ConsulDouble::start_with(
        any_port(),
        DoubleConfig {
            tokens: Some(BTreeSet::from(["good".to_string()])),
            ..DoubleConfig::default()
        },
    )
    .await
    .unwrap();
    seed(&d, "dc1", 3, 2, 2);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("consul-token");
    std::fs::write(&token_file, "good\n").unwrap();
    let mut config = fast_config(&d, &["dc1"]);
    config.token_file = Some(token_file.clone());
    let mut r = Running::start(config);
    r.until("sync", 10 * SECOND, |c| count(c) == 6).await;
    let good = r.catalog.borrow().clone();
    d.set_tokens(Some(BTreeSet::from(["rotated".to_string()])));
    let path = token_file.display().to_string();
    r.status_until("403", 3 * SECOND, |s| {
        s.datacenters["dc1"]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(&path) && e.contains("ACL not found"))
    })
    .await;
    assert_eq!(**r.catalog.borrow(), *good);
    // The operator writes the new token: picked up without a restart.
    std::fs::write(&token_file, "rotated").unwrap();
    d.register_instance("dc1", "node-t", "10.5.0.1", "svc-0", "svc-0-t", 8000)
        .unwrap();
    r.until("after rotation", 3 * SECOND, |c| {
        c.services["svc-0"].instances.len() == 3
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn consul_two_datacenters_carry_locality() {
    let d = double(&["dc1", "dc2"]).await;
    d.register_instance("dc1", "a", "10.0.0.1", "web", "web-1", 80)
        .unwrap();
    d.register_instance("dc2", "b", "10.1.0.1", "web", "web-1", 80)
        .unwrap();
    d.register_instance("dc2", "c", "10.1.0.2", "db", "db-1", 5432)
        .unwrap();
    let mut r = Running::start(fast_config(&d, &["dc1", "dc2"]));
    r.until("both dcs", 10 * SECOND, |c| count(c) == 3).await;
    let c = r.catalog.borrow().clone();
    let loc: Vec<_> = c.services["web"]
        .instances
        .iter()
        .map(|i| (i.address.clone(), i.locality.clone().unwrap()))
        .collect();
    assert_eq!(
        loc,
        [
            ("10.0.0.1".to_string(), "dc1".to_string()),
            ("10.1.0.1".to_string(), "dc2".to_string())
        ]
    );
    assert_eq!(
        c.services["db"].instances[0].locality.as_deref(),
        Some("dc2")
    );
    r.stop().await;
}

#[tokio::test]
async fn consul_unknown_datacenter_and_enterprise_params_are_surfaced() {
    let d = double(&["dc1"]).await;
    d.register_instance("dc1", "a", "10.0.0.1", "web", "web-1", 80)
        .unwrap();
    let mut r = Running::start(fast_config(&d, &["dc1", "nowhere"]));
    r.until("dc1 still served", 10 * SECOND, |c| count(c) == 1)
        .await;
    r.status_until("unknown dc", 3 * SECOND, |s| {
        s.datacenters["nowhere"]
            .last_error
            .as_deref()
            .is_some_and(|e| {
                e.contains("No path to datacenter") && e.contains("registry.consul.datacenters")
            })
    })
    .await;
    r.stop().await;

    let mut config = fast_config(&d, &["dc1"]);
    config.enterprise = Some(Enterprise {
        namespace: Some("team".into()),
        partition: None,
    });
    let mut r = Running::start(config);
    r.status_until("enterprise on CE", 3 * SECOND, |s| {
        s.datacenters["dc1"]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("400") && e.contains("Enterprise"))
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn consul_agent_nodes_are_reached_through_the_mesh_port() {
    let d = double(&["dc1"]).await;
    d.register(pilotfish_consul_double::RegisterRequest {
        node: "vm-b".into(),
        address: "127.0.0.12".into(),
        node_meta: Some(
            [
                ("pilotfish-agent".to_string(), "true".to_string()),
                ("pilotfish-mesh-port".to_string(), "15106".to_string()),
            ]
            .into(),
        ),
        service: Some(pilotfish_consul_double::ServiceIn {
            id: "reviews-1".into(),
            service: "reviews".into(),
            port: 9080,
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    let mut r = Running::start(fast_config(&d, &["dc1"]));
    r.until("agent instance", 10 * SECOND, |c| count(c) == 1)
        .await;
    let c = r.catalog.borrow().clone();
    let i = &c.services["reviews"].instances[0];
    assert_eq!(i.node.as_deref(), Some("vm-b"));
    assert_eq!(i.target(), ("127.0.0.12", 15106));
    r.stop().await;
}

/// 1000 services x 10 instances: the cost of one change.
async fn thousand_services() -> (DoubleHandle, Running) {
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 1000, 10, 500);
    let mut config = fast_config(&d, &["dc1"]);
    config.wait = Duration::from_secs(60);
    let mut r = Running::start(config);
    r.until("sync 10k", 120 * SECOND, |c| count(c) == 10_000)
        .await;
    // Let the initial sweep settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    (d, r)
}

#[tokio::test]
async fn consul_one_change_costs_bounded_requests_with_1000_services() {
    let (d, mut r) = thousand_services().await;
    let peak = d
        .stats()
        .connections_peak
        .values()
        .copied()
        .max()
        .unwrap_or(0);
    assert!(peak <= 2 + 8 + 2, "connections per client: {peak}");
    for (what, change) in [
        ("check fails", 0),
        ("instance registered", 1),
        ("instance deregistered", 2),
    ] {
        d.reset_stats();
        match change {
            0 => assert!(d.set_check_status("dc1", "node-17", "service:svc-1-7", "critical")),
            1 => d
                .register_instance("dc1", "node-new", "10.99.0.1", "svc-2", "svc-2-new", 9000)
                .unwrap(),
            _ => d
                .deregister(DeregisterRequest {
                    node: "node-new".into(),
                    service_id: Some("svc-2-new".into()),
                    ..Default::default()
                })
                .unwrap(),
        }
        r.until(what, 10 * SECOND, |c| match change {
            0 => c.services["svc-1"].instances.iter().any(|i| !i.healthy),
            1 => c.services["svc-2"].instances.len() == 11,
            _ => c.services["svc-2"].instances.len() == 10,
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s = d.stats();
        assert!(
            s.total_requests <= 8,
            "{what}: {} requests: {:?}",
            s.total_requests,
            s.requests
        );
    }
    r.stop().await;
}

/// `cargo test -p pilotfish-registries --release consul_benchmark -- --ignored --nocapture`
#[tokio::test]
#[ignore = "benchmark: prints requests per change and detection latency"]
async fn consul_benchmark_change_detection() {
    let start = Instant::now();
    let (d, mut r) = thousand_services().await;
    println!(
        "initial sync of 1000 services x 10 instances: {:?}",
        start.elapsed()
    );
    let mut latencies = Vec::new();
    let mut requests = Vec::new();
    for k in 0..60 {
        // Alternate: fail one instance's check, then heal it (same service), each a change.
        let svc = ((k / 2) * 37) % 1000;
        let node = (svc * 10 + 3) % 500;
        let want_healthy = k % 2 == 1;
        let status = if want_healthy { "passing" } else { "critical" };
        tokio::time::sleep(Duration::from_millis(100)).await;
        d.reset_stats();
        assert!(d.set_check_status(
            "dc1",
            &format!("node-{node}"),
            &format!("service:svc-{svc}-3"),
            status
        ));
        let name = format!("svc-{svc}");
        latencies.push(
            r.until("bench change", 5 * SECOND, |c| {
                c.services[&name]
                    .instances
                    .iter()
                    .any(|i| i.port == 8003 && i.healthy == want_healthy)
            })
            .await,
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        requests.push(d.stats().total_requests);
    }
    latencies.sort();
    requests.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 - 1.0) * p) as usize];
    println!(
        "changes: {}; requests per change: min {} median {} max {}; detection latency p50 {:?} p99 {:?}",
        latencies.len(),
        requests[0],
        requests[requests.len() / 2],
        requests[requests.len() - 1],
        pct(&latencies, 0.5),
        pct(&latencies, 0.99)
    );
    r.stop().await;
}

/// Issue 9: the last good catalog of each datacenter is stored; a registry that starts while
/// Consul is unreachable serves it (stale, restored) until the first full read replaces it,
/// even when that read finds the datacenter empty.
#[tokio::test]
async fn a_stored_catalog_serves_while_consul_is_down_at_start() {
    let state = tempfile::tempdir().unwrap();
    let store = crate::last_good::LastGoodStore::in_state_dir(state.path());
    let d = double(&["dc1"]).await;
    seed(&d, "dc1", 3, 2, 2);
    let mut r = Running::start_with(fast_config(&d, &["dc1"]), Some(store.clone()));
    r.until("initial sync", 10 * SECOND, |c| count(c) == 6)
        .await;
    let deadline = Instant::now() + 10 * SECOND;
    while store
        .load_consul("dc1")
        .unwrap()
        .is_none_or(|s| s.services.len() != 3)
    {
        assert!(Instant::now() < deadline, "catalog stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.stop().await;

    // Consul is down at start: the stored catalog is published, marked restored and stale.
    d.set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    let mut r = Running::start_with(fast_config(&d, &["dc1"]), Some(store.clone()));
    r.until("the stored catalog", SECOND, |c| count(c) == 6)
        .await;
    r.status_until("restored, stale and ready", 5 * SECOND, |s| {
        let dc1 = &s.datacenters["dc1"];
        dc1.restored_since.is_some() && dc1.stale && !dc1.synced && s.ready()
    })
    .await;

    // Consul back with every service gone: the empty fresh catalog replaces the stored one.
    for s in 0..3 {
        for i in 0..2 {
            d.deregister(DeregisterRequest {
                datacenter: "dc1".into(),
                node: format!("node-{}", (s * 2 + i) % 2),
                service_id: Some(format!("svc-{s}-{i}")),
                check_id: None,
            })
            .unwrap();
        }
    }
    d.set_faults(Faults::default());
    r.until("the fresh, empty catalog", 5 * SECOND, |c| {
        c.services.is_empty()
    })
    .await;
    r.status_until("fresh", 5 * SECOND, |s| {
        let dc1 = &s.datacenters["dc1"];
        dc1.restored_since.is_none() && !dc1.stale && dc1.synced
    })
    .await;
    r.stop().await;
    assert_eq!(
        store.load_consul("dc1").unwrap().unwrap().services.len(),
        0,
        "stored on shutdown"
    );
}

#[test]
fn ready_means_read_or_restored_and_unreachable() {
    let mut s = ConsulStatus::default();
    assert!(!s.ready(), "no datacenter yet");
    s.datacenters
        .insert("dc1".into(), DatacenterStatus::default());
    assert!(!s.ready());
    let dc1 = s.datacenters.get_mut("dc1").unwrap();
    dc1.restored_since = Some(std::time::SystemTime::now());
    assert!(!s.ready(), "restored, but Consul may still answer");
    s.datacenters.get_mut("dc1").unwrap().last_error = Some("unreachable".into());
    assert!(s.ready());
    s.datacenters.insert(
        "dc2".into(),
        DatacenterStatus {
            synced: true,
            ..DatacenterStatus::default()
        },
    );
    assert!(s.ready());
    s.datacenters
        .insert("dc3".into(), DatacenterStatus::default());
    assert!(!s.ready());
}

#[tokio::test]
async fn consul_request_times_are_reported_per_datacenter_and_request() {
    let d = double(&["dc1", "dc2"]).await;
    seed(&d, "dc2", 2, 1, 1);
    let seen = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let observer: RequestObserver = {
        let seen = Arc::clone(&seen);
        Arc::new(move |dc: &str, request: &'static str, took: Duration| {
            assert!(took < Duration::from_secs(10), "{took:?}");
            seen.lock().unwrap().insert((dc.to_string(), request));
        })
    };
    let (ctx, mut catalog) = watch::channel(Arc::new(Catalog::default()));
    let (stx, _status) = watch::channel(Arc::new(ConsulStatus::default()));
    let shutdown = CancellationToken::new();
    let registry = ConsulRegistry::new(fast_config(&d, &["dc1", "dc2"]))
        .unwrap()
        .with_request_observer(observer);
    let task = tokio::spawn(registry.run(ctx, stx, shutdown.clone()));
    tokio::time::timeout(10 * SECOND, catalog.wait_for(|c| c.services.len() == 2))
        .await
        .expect("dc2's services within 10 s")
        .unwrap();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    for (dc, request) in [
        ("dc1", "services"),
        ("dc1", "checks"),
        ("dc2", "services"),
        ("dc2", "checks"),
        ("dc2", "service"),
    ] {
        assert!(
            seen.contains(&(dc.to_string(), request)),
            "{dc} {request} in {seen:?}"
        );
    }
    // dc1 has no services: nothing was fetched there.
    assert!(!seen.contains(&("dc1".to_string(), "service")), "{seen:?}");
}
