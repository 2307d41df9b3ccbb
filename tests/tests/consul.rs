//! Consul as a registry, end to end: the Consul double (in this process) -> discovery's Consul
//! adapter, merged with the TOML registry -> agents -> real Envoy, with real traffic.
//!
//! Topology: vm-a only calls (its outbound listener is where requests enter, `Host: reviews`);
//! reviews v1 runs on vm-b and v2 on vm-c. The double registers those instances on Consul nodes
//! named like the hosts and marked `pilotfish-agent = "true"` with the host's mesh port, so
//! traffic crosses vm-b's or vm-c's Envoy as for TOML instances. productpage (on vm-a) comes
//! from TOML in every test, so the merged catalog always has both sources.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pilotfish_consul_double::{
    CheckIn, ConsulDouble, CutFault, DeregisterRequest, DoubleConfig, DoubleHandle, ErrorFault,
    Faults, RegisterRequest, ServiceIn,
};
use pilotfish_tests::mesh::{Host, Mesh, MeshOptions};
use pilotfish_tests::{admin_get, blocking, http_request, wait_for};

const READY: Duration = Duration::from_secs(30);
/// What the issue asks of a registration, deregistration or failed check.
const ONE_SECOND: Duration = Duration::from_secs(1);
/// How long a test waits for something that should take about a second, before failing.
const PATIENCE: Duration = Duration::from_secs(10);

async fn double(dcs: &[&str], tokens: Option<&[&str]>) -> Result<DoubleHandle> {
    let config = DoubleConfig {
        datacenters: dcs.iter().map(|d| d.to_string()).collect(),
        tokens: tokens.map(|t| t.iter().map(|t| t.to_string()).collect()),
        ..DoubleConfig::default()
    };
    Ok(ConsulDouble::start_with(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await?)
}

/// A mesh whose discovery reads `d` (short long-polls and backoff, so faults show quickly).
async fn consul_mesh(d: &DoubleHandle, dcs: &[&str], extra: &str) -> Result<Mesh> {
    let dcs: Vec<String> = dcs.iter().map(|d| format!("\"{d}\"")).collect();
    let mut mesh = Mesh::start_opts(MeshOptions {
        discovery_extra: format!(
            "[registry.consul]\naddress = \"{}\"\ndatacenters = [{}]\nwait = \"3s\"\n\
             backoff_max = \"1s\"\n{extra}",
            d.url(),
            dcs.join(", ")
        ),
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    let a = mesh.host("vm-a");
    mesh.write_registry(
        "productpage.toml",
        &format!(
            "[services.productpage]\nport = 9080\n\n[[services.productpage.instances]]\n\
             node = \"vm-a\"\naddress = \"{}\"\nport = 9080\nmesh_port = {}\n",
            a.ip, a.mesh_port
        ),
    )?;
    Ok(mesh)
}

async fn ready(mesh: &Mesh) -> Result<()> {
    mesh.wait_all_ready(READY).await?;
    Ok(())
}

/// Registers `service` instance `id` (app port `port`, label `version`) on the Consul node of
/// `host`, fronted by its agent, with a passing service check `service:<id>`.
fn register(
    d: &DoubleHandle,
    dc: &str,
    host: &Host,
    service: &str,
    id: &str,
    port: u16,
    version: &str,
) -> Result<()> {
    d.register(RegisterRequest {
        datacenter: dc.into(),
        node: host.node.clone(),
        address: host.ip.to_string(),
        node_meta: Some(BTreeMap::from([
            ("pilotfish-agent".to_string(), "true".to_string()),
            (
                "pilotfish-mesh-port".to_string(),
                host.mesh_port.to_string(),
            ),
        ])),
        service: Some(ServiceIn {
            id: id.into(),
            service: service.into(),
            port,
            meta: Some(BTreeMap::from([(
                "version".to_string(),
                version.to_string(),
            )])),
            ..ServiceIn::default()
        }),
        checks: Some(vec![CheckIn {
            check_id: format!("service:{id}"),
            name: format!("{service} http"),
            status: "passing".into(),
            service_id: id.into(),
            kind: "http".into(),
            ..CheckIn::default()
        }]),
        ..RegisterRequest::default()
    })
    .map_err(|e| anyhow::anyhow!("register {id}: {e:?}"))
}

fn deregister(d: &DoubleHandle, dc: &str, node: &str, id: &str) -> Result<()> {
    d.deregister(DeregisterRequest {
        datacenter: dc.into(),
        node: node.into(),
        service_id: Some(id.into()),
        check_id: None,
    })
    .map_err(|e| anyhow::anyhow!("deregister {id}: {e:?}"))
}

/// One call to reviews through `outbound`; who answered (`reviews-v1`...).
async fn call(outbound: SocketAddr) -> Result<String> {
    blocking(move || {
        let r = http_request(outbound, "GET", "reviews", "/reviews/1", &[], "")?;
        if r.status != 200 {
            bail!("status {}: {}", r.status, r.body);
        }
        Ok(r.header("x-served-by").unwrap_or("?").to_string())
    })
    .await
}

/// Who answered `n` calls (failures count as "error").
async fn split(outbound: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = call(outbound).await.unwrap_or_else(|_| "error".into());
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

/// Waits until 20 calls in a row are answered by exactly the set `who`; the time it took.
async fn until_served_by(mesh: &Mesh, who: &[&str], deadline: Duration) -> Result<Duration> {
    let start = Instant::now();
    let out = mesh.host("vm-a").outbound;
    let want: BTreeSet<String> = who.iter().map(|w| w.to_string()).collect();
    let r = wait_for(&format!("traffic served by {who:?}"), deadline, || {
        let want = want.clone();
        async move {
            let seen = split(out, 20).await;
            let got: BTreeSet<String> = seen.keys().cloned().collect();
            Ok((got == want).then(|| start.elapsed()))
        }
    })
    .await;
    match r {
        Ok(t) => Ok(t),
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    }
}

/// Every call of a batch is answered, only by `who`.
async fn assert_served_only_by(mesh: &Mesh, who: &[&str], what: &str) -> Result<()> {
    let seen = split(mesh.host("vm-a").outbound, 20).await;
    let got: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = who.iter().copied().collect();
    if got != want {
        bail!(
            "{what}: traffic went to {seen:?}, want only {who:?}\n{}",
            mesh.logs()
        );
    }
    Ok(())
}

async fn status(mesh: &Mesh) -> Result<serde_json::Value> {
    let http = mesh.http;
    let body = blocking(move || admin_get(http, "/status")).await?;
    serde_json::from_str(&body).context("/status is not JSON")
}

async fn metrics(mesh: &Mesh) -> Result<String> {
    let http = mesh.http;
    blocking(move || admin_get(http, "/metrics")).await
}

/// The value of one sample (`name{labels}`) in discovery's /metrics.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// Every xDS response discovery sent, all types, and the snapshot generation.
fn pushes(text: &str) -> (u64, u64) {
    let total = text
        .lines()
        .filter(|l| l.starts_with("pilotfish_xds_pushes_total"))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    (
        total,
        sample(text, "pilotfish_snapshot_generation").unwrap_or(0),
    )
}

async fn until_status(
    mesh: &Mesh,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let check = &check;
    let r = wait_for(what, PATIENCE, || async move {
        let s = status(mesh).await?;
        Ok(check(&s).then_some(s))
    })
    .await;
    match r {
        Ok(s) => Ok(s),
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_registration_deregistration_and_health_reach_envoy_within_a_second() -> Result<()> {
    let d = double(&["dc1"], None).await?;
    let mut mesh = consul_mesh(&d, &["dc1"], "").await?;
    let (b, c) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", b, &[])?;
    let v2 = mesh.start_app("reviews", "v2", c, &[])?;
    register(
        &d,
        "dc1",
        mesh.host("vm-b"),
        "reviews",
        "reviews-b",
        v1,
        "v1",
    )?;
    ready(&mesh).await?;
    until_served_by(&mesh, &["reviews-v1"], READY).await?;

    let mut timings = Vec::new();
    // A second instance: registering it adds an endpoint.
    register(
        &d,
        "dc1",
        mesh.host("vm-c"),
        "reviews",
        "reviews-c",
        v2,
        "v2",
    )?;
    let t = until_served_by(&mesh, &["reviews-v1", "reviews-v2"], PATIENCE).await?;
    timings.push(("register", t));
    // Deregistering v1 removes it.
    deregister(&d, "dc1", "vm-b", "reviews-b")?;
    let t = until_served_by(&mesh, &["reviews-v2"], PATIENCE).await?;
    timings.push(("deregister", t));
    register(
        &d,
        "dc1",
        mesh.host("vm-b"),
        "reviews",
        "reviews-b",
        v1,
        "v1",
    )?;
    until_served_by(&mesh, &["reviews-v1", "reviews-v2"], PATIENCE).await?;
    // A critical check takes v2 out of traffic: everything goes to the healthy v1.
    assert!(d.set_check_status("dc1", "vm-c", "service:reviews-c", "critical"));
    let t = until_served_by(&mesh, &["reviews-v1"], PATIENCE).await?;
    timings.push(("check critical", t));
    assert!(d.set_check_status("dc1", "vm-c", "service:reviews-c", "passing"));
    let t = until_served_by(&mesh, &["reviews-v1", "reviews-v2"], PATIENCE).await?;
    timings.push(("check passing", t));
    println!("consul change -> Envoy traffic: {timings:?}");
    for (what, t) in &timings {
        assert!(*t < ONE_SECOND, "{what} took {t:?}, want < 1s");
    }

    // A spurious wake-up (every index moves, nothing changes) pushes nothing to any proxy.
    let before = metrics(&mesh).await?;
    let (pushed, generation) = pushes(&before);
    let admin = mesh.host("vm-a").admin;
    let cds = |admin| {
        blocking(move || pilotfish_tests::envoy_stat(admin, "cluster_manager.cds.update_success"))
    };
    let cds_before = cds(admin).await?;
    let sweeps = d.stats().requests_to("/v1/health/service/");
    d.spurious_wakeup();
    // The adapter re-reads every service after an unexplained service-list wake-up (a sweep);
    // once that happened and the debouncer had time to act, nothing may have been pushed.
    wait_for("the adapter re-read reviews", PATIENCE, || async {
        Ok((d.stats().requests_to("/v1/health/service/") > sweeps).then_some(()))
    })
    .await?;
    let quiet_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < quiet_until {
        let now = metrics(&mesh).await?;
        assert_eq!(
            pushes(&now),
            (pushed, generation),
            "a wake-up without change caused a push"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cds(admin).await?, cds_before, "Envoy got a CDS update");
    assert_served_only_by(&mesh, &["reviews-v1", "reviews-v2"], "after the wake-up").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_faults_keep_endpoints_and_recover() -> Result<()> {
    let d = double(&["dc1"], Some(&["s3cret"])).await?;
    let tmp = tempfile::tempdir()?;
    let token_file = tmp.path().join("consul-token");
    std::fs::write(&token_file, "s3cret\n")?;
    let mut mesh = consul_mesh(
        &d,
        &["dc1"],
        &format!("token_file = \"{}\"\n", token_file.display()),
    )
    .await?;
    let (b, c) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", b, &[])?;
    let v2 = mesh.start_app("reviews", "v2", c, &[])?;
    register(
        &d,
        "dc1",
        mesh.host("vm-b"),
        "reviews",
        "reviews-b",
        v1,
        "v1",
    )?;
    ready(&mesh).await?;
    until_served_by(&mesh, &["reviews-v1"], READY).await?;

    let error = |e| Faults {
        error: Some(e),
        ..Faults::default()
    };
    // (name, fault switches, the fault makes the datacenter stale)
    let faults: Vec<(&str, Faults, bool)> = vec![
        ("500 no leader", error(ErrorFault::NoLeader), true),
        ("500 internal", error(ErrorFault::Internal), true),
        ("429 rate limited", error(ErrorFault::RateLimited), true),
        ("403 ACL not found", error(ErrorFault::AclNotFound), true),
        (
            "connections cut",
            Faults {
                refuse_connections: true,
                ..Faults::default()
            },
            true,
        ),
        (
            "response cut mid-body",
            Faults {
                cut: Some(CutFault::MidBody),
                ..Faults::default()
            },
            true,
        ),
        (
            "truncated JSON",
            Faults {
                cut: Some(CutFault::TruncatedJson),
                ..Faults::default()
            },
            true,
        ),
        (
            "hold",
            Faults {
                hold: true,
                ..Faults::default()
            },
            false,
        ),
    ];
    let mut recoveries = Vec::new();
    for (name, fault, stale) in faults {
        d.set_faults(fault);
        // Something for the woken long-polls to read, so they meet the fault now.
        d.spurious_wakeup();
        if stale {
            let s = until_status(&mesh, &format!("{name}: dc1 stale"), |s| {
                s["sources"]["consul"]["datacenters"]["dc1"]["stale"] == true
            })
            .await?;
            if name.starts_with("403") {
                let err = s["sources"]["consul"]["datacenters"]["dc1"]["last_error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    err.contains(&token_file.display().to_string()),
                    "the 403 error names the token file: {err}"
                );
            }
            let m = metrics(&mesh).await?;
            assert_eq!(
                sample(&m, "pilotfish_consul_stale{dc=\"dc1\"}"),
                Some(1),
                "{name}"
            );
        }
        assert_served_only_by(&mesh, &["reviews-v1"], name).await?;
        d.set_faults(Faults::default());
        d.spurious_wakeup();
        let cleared = Instant::now();
        register(
            &d,
            "dc1",
            mesh.host("vm-c"),
            "reviews",
            "reviews-c",
            v2,
            "v2",
        )?;
        until_served_by(&mesh, &["reviews-v1", "reviews-v2"], PATIENCE).await?;
        recoveries.push((name, cleared.elapsed()));
        until_status(&mesh, &format!("{name}: dc1 fresh again"), |s| {
            s["sources"]["consul"]["datacenters"]["dc1"]["stale"] == false
        })
        .await?;
        deregister(&d, "dc1", "vm-c", "reviews-c")?;
        until_served_by(&mesh, &["reviews-v1"], PATIENCE).await?;
    }

    // One-shot events: an index regression (snapshot restore) and a burst of spurious
    // wake-ups. Traffic keeps flowing, and the next registration is picked up.
    for name in ["index regression", "spurious wake-ups"] {
        if name == "index regression" {
            d.regress_index(1);
        } else {
            for _ in 0..20 {
                d.spurious_wakeup();
            }
        }
        assert_served_only_by(&mesh, &["reviews-v1"], name).await?;
        let start = Instant::now();
        register(
            &d,
            "dc1",
            mesh.host("vm-c"),
            "reviews",
            "reviews-c",
            v2,
            "v2",
        )?;
        until_served_by(&mesh, &["reviews-v1", "reviews-v2"], PATIENCE).await?;
        recoveries.push((name, start.elapsed()));
        deregister(&d, "dc1", "vm-c", "reviews-c")?;
        until_served_by(&mesh, &["reviews-v1"], PATIENCE).await?;
    }
    println!("fault cleared -> new registration served: {recoveries:?}");
    let m = metrics(&mesh).await?;
    assert!(sample(&m, "pilotfish_consul_errors_total{dc=\"dc1\"}").unwrap_or(0) > 0);
    assert_eq!(sample(&m, "pilotfish_consul_stale{dc=\"dc1\"}"), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_two_datacenters_carry_locality_and_merge_with_toml() -> Result<()> {
    let d = double(&["dc1", "dc2"], None).await?;
    let mut mesh = consul_mesh(&d, &["dc1", "dc2"], "").await?;
    let (b, c) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", b, &[])?;
    let v2 = mesh.start_app("reviews", "v2", c, &[])?;
    let v3 = mesh.start_app("reviews", "v3", b, &[])?;
    // reviews in both sources: v1 from dc1 (vm-b), v2 from dc2 (vm-c), and v3 from TOML,
    // reached directly (no node) at vm-b's address.
    let toml = format!(
        "[services.reviews]\nport = 9080\n\n[[services.reviews.instances]]\n\
         address = \"{b}\"\nport = {v3}\nlabels = {{ version = \"v3\" }}\n"
    );
    mesh.write_registry("reviews.toml", &toml)?;
    register(
        &d,
        "dc1",
        mesh.host("vm-b"),
        "reviews",
        "reviews-b",
        v1,
        "v1",
    )?;
    register(
        &d,
        "dc2",
        mesh.host("vm-c"),
        "reviews",
        "reviews-c",
        v2,
        "v2",
    )?;
    ready(&mesh).await?;
    until_served_by(&mesh, &["reviews-v1", "reviews-v2", "reviews-v3"], READY).await?;

    // Envoy on vm-a knows each Consul endpoint's datacenter as its locality zone (mesh
    // endpoints are the hosts' mesh ports).
    let admin = mesh.host("vm-a").admin;
    let clusters: serde_json::Value =
        serde_json::from_str(&blocking(move || admin_get(admin, "/clusters?format=json")).await?)?;
    let mut zones = BTreeMap::new();
    for cluster in clusters["cluster_statuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for host in cluster["host_statuses"].as_array().into_iter().flatten() {
            let socket = &host["address"]["socket_address"];
            let addr = format!(
                "{}:{}",
                socket["address"].as_str().unwrap_or_default(),
                socket["port_value"]
            );
            let zone = host["locality"]["zone"].as_str().unwrap_or("").to_string();
            zones.insert(addr, zone);
        }
    }
    let at = |h: &str| format!("{}:{}", mesh.host(h).ip, mesh.host(h).mesh_port);
    assert_eq!(
        zones.get(&at("vm-b")).map(String::as_str),
        Some("dc1"),
        "{zones:?}"
    );
    assert_eq!(
        zones.get(&at("vm-c")).map(String::as_str),
        Some("dc2"),
        "{zones:?}"
    );
    assert_eq!(
        zones.get(&format!("{b}:{v3}")).map(String::as_str),
        Some(""),
        "the TOML instance has no locality: {zones:?}"
    );

    // The same instance in both sources: TOML's is kept, the conflict is shown with file:line.
    register(
        &d,
        "dc1",
        mesh.host("vm-b"),
        "reviews",
        "reviews-b3",
        v3,
        "v3",
    )?;
    let s = until_status(&mesh, "a merge conflict", |s| {
        s["sources"]["merge_conflicts"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    })
    .await?;
    let conflict = &s["sources"]["merge_conflicts"][0];
    assert_eq!(conflict["service"], "reviews");
    assert_eq!(conflict["port"], v3);
    assert!(
        conflict["toml"]
            .as_str()
            .is_some_and(|t| t.contains("reviews.toml:")),
        "{conflict}"
    );
    let dcs = &s["sources"]["consul"]["datacenters"];
    assert_eq!(dcs["dc1"]["synced"], true);
    assert_eq!(dcs["dc2"]["synced"], true);
    assert_eq!(dcs["dc2"]["instances"], 1);
    let m = metrics(&mesh).await?;
    assert_eq!(sample(&m, "pilotfish_registry_merge_conflicts"), Some(1));
    assert!(
        sample(
            &m,
            "pilotfish_consul_last_sync_timestamp_seconds{dc=\"dc2\"}"
        )
        .unwrap_or(0)
            > 0
    );
    assert_served_only_by(
        &mesh,
        &["reviews-v1", "reviews-v2", "reviews-v3"],
        "after the conflict",
    )
    .await?;
    Ok(())
}

/// Issue 9: a TOML file may name a service that only Consul declares. Its `upstreams` are in
/// force (the host is scoped to them, not shown the whole mesh), the reference is a warning in
/// `/status` until Consul declares the service, and then it resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toml_may_name_a_service_only_consul_declares() -> Result<()> {
    let d = double(&["dc1"], None).await?;
    let mut mesh = consul_mesh(&d, &["dc1"], "").await?;
    let a = mesh.host("vm-a");
    let (a_ip, a_mesh, admin) = (a.ip, a.mesh_port, a.admin);
    mesh.write_registry(
        "productpage.toml",
        &format!(
            "[services.productpage]\nport = 9080\nupstreams = [\"reviews\"]\n\n\
             [[services.productpage.instances]]\nnode = \"vm-a\"\naddress = \"{a_ip}\"\n\
             port = 9080\nmesh_port = {a_mesh}\n",
        ),
    )?;
    let http = mesh.http;
    let status = move || async move {
        let r = blocking(move || pilotfish_tests::http_get(http, "discovery", "/status")).await?;
        Ok::<_, anyhow::Error>(serde_json::from_str::<serde_json::Value>(&r.body)?)
    };
    wait_for("the upstream reference reported, the file in force", PATIENCE, || async move {
        let s = status().await?;
        let in_force = s["sources"]["files"]
            .as_object()
            .into_iter()
            .flatten()
            .any(|(path, f)| path.ends_with("productpage.toml") && f["in_force"] == true && f["problems"] == serde_json::json!([]));
        let warned = s["sources"]["unresolved"].as_array().is_some_and(|u| {
            u.iter().any(|w| {
                let w = w.as_str().unwrap_or("");
                w.contains("productpage.toml:1: services.productpage.upstreams[0]: unknown service \"reviews\"")
            })
        });
        Ok((in_force && warned).then_some(()))
    })
    .await?;

    let v1 = mesh.start_app("reviews", "v1", mesh.host("vm-b").ip, &[])?;
    register(
        &d,
        "dc1",
        mesh.host("vm-b"),
        "reviews",
        "reviews-b",
        v1,
        "v1",
    )?;
    ready(&mesh).await?;
    until_served_by(&mesh, &["reviews-v1"], READY).await?;
    wait_for("the reference resolved", PATIENCE, || async move {
        let s = status().await?;
        Ok((s["sources"]["unresolved"] == serde_json::json!([])).then_some(()))
    })
    .await?;
    // Scoped to its upstreams: vm-a has reviews, and not the rest of the mesh.
    let clusters = blocking(move || admin_get(admin, "/clusters")).await?;
    assert!(clusters.contains("outbound|reviews::"), "{clusters}");
    assert!(
        !clusters.contains("outbound|productpage::"),
        "vm-a sees the whole mesh: its upstreams were not in force"
    );
    Ok(())
}

/// Issue 9: discovery stores each datacenter's last good catalog in state_dir/last-good; one
/// that restarts while Consul is unreachable serves it (marked stale and restored) so the
/// Consul services keep working, and takes Consul's new state once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_at_restart_serves_the_stored_catalog_until_it_is_back() -> Result<()> {
    let d = double(&["dc1"], None).await?;
    let mut mesh = consul_mesh(&d, &["dc1"], "").await?;
    let (b, c) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", b, &[])?;
    let v2 = mesh.start_app("reviews", "v2", c, &[])?;
    register(
        &d,
        "dc1",
        mesh.host("vm-b"),
        "reviews",
        "reviews-b",
        v1,
        "v1",
    )?;
    ready(&mesh).await?;
    until_served_by(&mesh, &["reviews-v1"], READY).await?;
    let stored = mesh.path("state/last-good/consul/dc1.json");
    wait_for("dc1's catalog stored", PATIENCE, || {
        let stored = stored.clone();
        async move {
            let text = std::fs::read_to_string(&stored).unwrap_or_default();
            Ok(text.contains("\"reviews\"").then_some(()))
        }
    })
    .await?;

    // Consul goes away, then discovery restarts.
    d.set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    d.spurious_wakeup();
    mesh.discovery.restart()?;
    let s = until_status(&mesh, "dc1 served from the store", |s| {
        let dc1 = &s["sources"]["consul"]["datacenters"]["dc1"];
        dc1["restored"] == true && dc1["stale"] == true
    })
    .await?;
    assert!(
        s["sources"]["consul"]["datacenters"]["dc1"]["since"].is_string(),
        "{s:#}"
    );
    mesh.wait_resynced(Duration::from_secs(40)).await?;
    assert_served_only_by(&mesh, &["reviews-v1"], "Consul down, stored catalog").await?;
    assert!(
        mesh.discovery_log().contains("stored by an earlier run"),
        "the restore is logged"
    );

    // Consul changes while unreachable (v1 leaves, v2 arrives), then comes back.
    deregister(&d, "dc1", "vm-b", "reviews-b")?;
    register(
        &d,
        "dc1",
        mesh.host("vm-c"),
        "reviews",
        "reviews-c",
        v2,
        "v2",
    )?;
    assert_served_only_by(&mesh, &["reviews-v1"], "Consul still down").await?;
    d.set_faults(Faults::default());
    d.spurious_wakeup();
    until_served_by(&mesh, &["reviews-v2"], PATIENCE).await?;
    until_status(&mesh, "dc1 fresh, no longer restored", |s| {
        let dc1 = &s["sources"]["consul"]["datacenters"]["dc1"];
        dc1["restored"] == false && dc1["stale"] == false
    })
    .await?;
    wait_for("the new catalog stored", PATIENCE, || {
        let stored = stored.clone();
        async move {
            let text = std::fs::read_to_string(&stored).unwrap_or_default();
            Ok(text.contains(&format!("\"port\":{v2}")).then_some(()))
        }
    })
    .await?;
    Ok(())
}
