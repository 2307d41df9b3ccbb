//! The mesh end to end: TOML registry -> discovery -> agents -> real Envoy, with real traffic.
//!
//! Topology (each host on its own loopback address): vm-a runs only a client (productpage, which
//! calls reviews); vm-b runs reviews v1; vm-c runs reviews v2. Requests enter vm-a's outbound
//! listener with `Host: reviews` and cross to the chosen host's mesh port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pilotfish_tests::mesh::Mesh;
use pilotfish_tests::{blocking, http_request, wait_for};

const READY: Duration = Duration::from_secs(30);

/// Reviews v1 on vm-b and v2 on vm-c, productpage on vm-a; returns the registry text builder.
struct Reviews {
    mesh: Mesh,
    v1_port: u16,
    v2_port: u16,
}

fn services_toml(mesh: &Mesh, v1_port: u16, v2_port: u16) -> String {
    let a = mesh.host("vm-a");
    let b = mesh.host("vm-b");
    let c = mesh.host("vm-c");
    format!(
        r#"[services.productpage]
port = 9080
upstreams = ["reviews"]

[[services.productpage.instances]]
node = "vm-a"
address = "{a_ip}"
port = 9080
mesh_port = {a_mesh}

[services.reviews]
port = 9080

[[services.reviews.instances]]
node = "vm-b"
address = "{b_ip}"
port = {v1_port}
mesh_port = {b_mesh}
labels = {{ version = "v1" }}

[[services.reviews.instances]]
node = "vm-c"
address = "{c_ip}"
port = {v2_port}
mesh_port = {c_mesh}
labels = {{ version = "v2" }}
"#,
        a_ip = a.ip,
        a_mesh = a.mesh_port,
        b_ip = b.ip,
        b_mesh = b.mesh_port,
        c_ip = c.ip,
        c_mesh = c.mesh_port,
    )
}

fn routes_toml(v1: u32, v2: u32) -> String {
    format!(
        r#"[routes.reviews]
timeout = "3s"

[[routes.reviews.rules]]
match = {{ headers = {{ "x-canary" = "1" }} }}
to = [{{ subset = "v2" }}]

[[routes.reviews.rules]]
to = [{{ subset = "v1", weight = {v1} }}, {{ subset = "v2", weight = {v2} }}]

[policies.reviews]
subsets = {{ v1 = {{ version = "v1" }}, v2 = {{ version = "v2" }} }}
"#
    )
}

async fn reviews_mesh(xds: &'static str, v1: u32, v2: u32) -> Result<Reviews> {
    let mut mesh = Mesh::start_with(xds)?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    let (b_ip, c_ip) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1_port = mesh.start_app("reviews", "v1", b_ip, &[])?;
    let v2_port = mesh.start_app("reviews", "v2", c_ip, &[])?;
    mesh.write_registry("services.toml", &services_toml(&mesh, v1_port, v2_port))?;
    mesh.write_registry("routes.toml", &routes_toml(v1, v2))?;
    mesh.wait_all_ready(READY).await?;
    let out = mesh.host("vm-a").outbound;
    // Ready means Envoy has its first config; wait until the route actually serves.
    if let Err(e) = wait_for("reviews reachable through vm-a", READY, || async move {
        Ok(call(out, &[])
            .await
            .ok()
            .filter(|r| r.starts_with("reviews-")))
    })
    .await
    {
        bail!("{e:#}\n{}", mesh.logs());
    }
    Ok(Reviews {
        mesh,
        v1_port,
        v2_port,
    })
}

/// One call to reviews through `outbound`; returns who answered (`reviews-v1`...).
async fn call(outbound: SocketAddr, headers: &[(&'static str, &'static str)]) -> Result<String> {
    let headers = headers.to_vec();
    blocking(move || {
        let r = http_request(outbound, "GET", "reviews", "/reviews/1", &headers, "")?;
        if r.status != 200 {
            bail!("status {}: {}", r.status, r.body);
        }
        Ok(r.header("x-served-by").unwrap_or("?").to_string())
    })
    .await
}

/// Send `n` calls and count who answered (failures count under "error").
async fn split(
    outbound: SocketAddr,
    n: usize,
    headers: &[(&'static str, &'static str)],
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = call(outbound, headers)
            .await
            .unwrap_or_else(|_| "error".into());
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

fn count(seen: &BTreeMap<String, usize>, who: &str) -> usize {
    seen.get(who).copied().unwrap_or(0)
}

/// Wait until every one of `probe` consecutive calls is answered by `who`.
async fn wait_all_to(
    outbound: SocketAddr,
    who: &'static str,
    deadline: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    wait_for(&format!("all traffic to {who}"), deadline, || async move {
        let seen = split(outbound, 20, &[]).await;
        Ok((count(&seen, who) == 20).then(|| start.elapsed()))
    })
    .await
}

async fn weighted_split_and_header_rule(xds: &'static str) -> Result<()> {
    let r = reviews_mesh(xds, 80, 20).await?;
    let out = r.mesh.host("vm-a").outbound;

    let seen = split(out, 500, &[]).await;
    let (v1, v2) = (count(&seen, "reviews-v1"), count(&seen, "reviews-v2"));
    assert_eq!(
        v1 + v2,
        500,
        "every request answered: {seen:?}\n{}",
        r.mesh.logs()
    );
    // 20% of 500 = 100; binomial sd ~ 9; accept +-4 sd.
    assert!(
        (64..=136).contains(&v2),
        "v2 got {v2}/500, want ~100: {seen:?}"
    );

    let canary = split(out, 50, &[("x-canary", "1")]).await;
    assert_eq!(
        count(&canary, "reviews-v2"),
        50,
        "x-canary: 1 goes only to v2: {canary:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_weighted_split_and_header_rule() -> Result<()> {
    weighted_split_and_header_rule("delta").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_weighted_split_and_header_rule() -> Result<()> {
    weighted_split_and_header_rule("sotw").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toml_edits_move_live_traffic_without_restart() -> Result<()> {
    let mut r = reviews_mesh("delta", 80, 20).await?;
    let out = r.mesh.host("vm-a").outbound;
    let envoy_before = r.mesh.host("vm-a").envoy_pid();

    // Weights: everything to v2.
    r.mesh.write_registry("routes.toml", &routes_toml(0, 100))?;
    let took = wait_all_to(out, "reviews-v2", Duration::from_secs(2)).await?;
    eprintln!("weight change reached traffic in {took:?}");

    // A third instance on a fourth host, in subset v1 with label version=v3 so we can see it.
    let d = r.mesh.add_host("vm-d", 5)?.ip;
    r.mesh.host("vm-d").wait_ready(READY).await?;
    let v3_port = r.mesh.start_app("reviews", "v3", d, &[])?;
    let d_mesh = r.mesh.host("vm-d").mesh_port;
    let mut services = services_toml(&r.mesh, r.v1_port, r.v2_port);
    services.push_str(&format!(
        "\n[[services.reviews.instances]]\nnode = \"vm-d\"\naddress = \"{d}\"\nport = {v3_port}\nmesh_port = {d_mesh}\nlabels = {{ version = \"v2\", build = \"v3\" }}\n"
    ));
    let start = Instant::now();
    r.mesh.write_registry("services.toml", &services)?;
    wait_for(
        "the new instance on vm-d receives traffic",
        Duration::from_secs(2),
        || async move {
            let seen = split(out, 20, &[]).await;
            Ok((count(&seen, "reviews-v3") > 0).then_some(()))
        },
    )
    .await?;
    eprintln!("new instance served after {:?}", start.elapsed());
    assert_eq!(
        r.mesh.host("vm-a").envoy_pid(),
        envoy_before,
        "Envoy was not restarted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_toml_leaves_traffic_as_it_was() -> Result<()> {
    let r = reviews_mesh("delta", 0, 100).await?;
    let out = r.mesh.host("vm-a").outbound;
    wait_all_to(out, "reviews-v2", Duration::from_secs(5)).await?;

    // A syntax error in the routes file.
    r.mesh
        .write_registry("routes.toml", "[routes.reviews]\ntimeout = \n")?;
    let log = &r.mesh;
    wait_for(
        "the syntax error in the discovery log",
        Duration::from_secs(5),
        || async move { Ok(log.discovery_log().contains("routes.toml:2").then_some(())) },
    )
    .await?;
    let seen = split(out, 50, &[]).await;
    assert_eq!(
        count(&seen, "reviews-v2"),
        50,
        "traffic unchanged after a syntax error: {seen:?}"
    );

    // A route to an unknown subset (valid TOML, invalid meaning).
    let bad = routes_toml(50, 50).replace("subset = \"v1\"", "subset = \"v9\"");
    r.mesh.write_registry("routes.toml", &bad)?;
    wait_for(
        "the unknown-subset error in the discovery log",
        Duration::from_secs(5),
        || async move { Ok(log.discovery_log().contains("v9").then_some(())) },
    )
    .await?;
    let text = r.mesh.discovery_log();
    let line = text.lines().find(|l| l.contains("v9")).unwrap_or_default();
    assert!(
        line.contains("routes.toml:"),
        "the error names file:line: {line}"
    );
    let seen = split(out, 50, &[]).await;
    assert_eq!(
        count(&seen, "reviews-v2"),
        50,
        "traffic unchanged after a bad subset: {seen:?}"
    );

    // And a good edit afterwards still applies.
    r.mesh.write_registry("routes.toml", &routes_toml(100, 0))?;
    wait_all_to(out, "reviews-v1", Duration::from_secs(2)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_envoy_is_restarted_by_its_agent() -> Result<()> {
    let r = reviews_mesh("delta", 0, 100).await?;
    let out = r.mesh.host("vm-a").outbound;
    let c = r.mesh.host("vm-c");
    let old = c.envoy_pid().expect("vm-c runs an envoy");
    std::process::Command::new("kill")
        .args(["-9", &old.to_string()])
        .status()?;
    let killed = Instant::now();
    wait_for(
        "vm-c's envoy back and serving",
        Duration::from_secs(5),
        || async move { Ok(call(out, &[]).await.ok().filter(|w| w == "reviews-v2")) },
    )
    .await?;
    eprintln!("traffic back {:?} after kill -9", killed.elapsed());
    let new = c.envoy_pid().expect("a new envoy runs");
    assert_ne!(old, new);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_a_discovery_outage_and_catches_up() -> Result<()> {
    let mut r = reviews_mesh("sotw", 0, 100).await?;
    let out = r.mesh.host("vm-a").outbound;
    wait_all_to(out, "reviews-v2", Duration::from_secs(5)).await?;

    r.mesh.discovery.kill();
    let seen = split(out, 50, &[]).await;
    assert_eq!(
        count(&seen, "reviews-v2"),
        50,
        "traffic keeps flowing without discovery: {seen:?}"
    );

    // A change made while discovery is down reaches the proxies once it is back.
    r.mesh.write_registry("routes.toml", &routes_toml(100, 0))?;
    let seen = split(out, 20, &[]).await;
    assert_eq!(
        count(&seen, "reviews-v2"),
        20,
        "nothing changes while discovery is down"
    );
    r.mesh.discovery.restart()?;
    // Envoy reconnects with jittered backoff (up to 30 s in the worst case).
    wait_all_to(out, "reviews-v1", Duration::from_secs(40)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stops_cleanly_on_sigterm() -> Result<()> {
    let mut r = reviews_mesh("delta", 100, 0).await?;
    let envoy = r.mesh.host("vm-b").envoy_pid().expect("vm-b runs an envoy");
    let status = r
        .mesh
        .host_mut("vm-b")
        .agent
        .terminate(Duration::from_secs(15));
    let status = status.expect("agent exits within its drain time");
    assert!(status.success(), "agent exits 0 on SIGTERM: {status:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{envoy}")).exists()
            || std::fs::read_to_string(format!("/proc/{envoy}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true),
        "envoy stopped with its agent"
    );
    Ok(())
}

/// Changing a cluster (here its load balancer) must not leave it warming: discovery answers
/// the EDS request that follows every CDS update, in both xDS flavours.
async fn cluster_change_completes_warming(xds: &'static str) -> Result<()> {
    let r = reviews_mesh(xds, 0, 100).await?;
    let a = r.mesh.host("vm-a");
    let (out, admin) = (a.outbound, a.admin);
    let routes = routes_toml(0, 100).replace(
        "subsets = {",
        "load_balancer = \"least_request\"\nconnect_timeout = \"2s\"\nsubsets = {",
    );
    r.mesh.write_registry("routes.toml", &routes)?;
    wait_for(
        "the new cluster config applied",
        Duration::from_secs(5),
        || async move {
            let dump = blocking(move || {
                pilotfish_tests::admin_get(admin, "/config_dump?resource=dynamic_active_clusters")
            })
            .await?;
            Ok(dump.contains("LEAST_REQUEST").then_some(()))
        },
    )
    .await?;
    wait_for(
        "no warming clusters",
        Duration::from_secs(5),
        || async move {
            let warming = blocking(move || {
                pilotfish_tests::envoy_stat(admin, "cluster_manager.warming_clusters")
            })
            .await?;
            Ok((warming == Some(0)).then_some(()))
        },
    )
    .await?;
    let seen = split(out, 20, &[]).await;
    assert_eq!(
        count(&seen, "reviews-v2"),
        20,
        "{seen:?}\n{}",
        r.mesh.logs()
    );
    for stat in [
        "cluster_manager.cds.init_fetch_timeout",
        "listener_manager.lds.init_fetch_timeout",
    ] {
        let n = blocking(move || pilotfish_tests::envoy_stat(admin, stat)).await?;
        assert_eq!(n, Some(0), "{stat}");
    }
    let rejected =
        blocking(move || pilotfish_tests::envoy_stat(admin, "cluster_manager.cds.update_rejected"))
            .await?;
    assert_eq!(rejected, Some(0), "no NACKs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_cluster_change_completes_warming() -> Result<()> {
    cluster_change_completes_warming("delta").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_cluster_change_completes_warming() -> Result<()> {
    cluster_change_completes_warming("sotw").await
}

/// Issue 9: a registry file that is broken when discovery restarts keeps its last good
/// version (stored in state_dir/last-good): traffic to its services goes on across the restart
/// and the proxies that reconnect keep their clusters; fixing the file is picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_its_services_across_a_discovery_restart() -> Result<()> {
    let mut r = reviews_mesh("delta", 0, 100).await?;
    let out = r.mesh.host("vm-a").outbound;
    wait_all_to(out, "reviews-v2", Duration::from_secs(5)).await?;
    let stored = r.mesh.path("state/last-good/files");
    wait_for(
        "services.toml in the last-good store",
        Duration::from_secs(5),
        || {
            let stored = stored.clone();
            async move {
                let names: Vec<String> = std::fs::read_dir(&stored)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(names
                    .iter()
                    .any(|n| n.starts_with("services-"))
                    .then_some(()))
            }
        },
    )
    .await?;

    // services.toml declares reviews and its instances; break it.
    r.mesh
        .write_registry("services.toml", "[services.reviews]\nport = \n")?;
    let log = &r.mesh;
    wait_for(
        "the syntax error in the discovery log",
        Duration::from_secs(5),
        || async move {
            Ok(log
                .discovery_log()
                .contains("services.toml:2:")
                .then_some(()))
        },
    )
    .await?;

    // A steady load from vm-a across the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                let who = call(out, &[])
                    .await
                    .unwrap_or_else(|e| format!("error: {e:#}"));
                *seen.entry(who).or_insert(0) += 1;
            }
            seen
        }
    });
    let before = r.mesh.discovery_log().len();
    r.mesh.discovery.restart()?;
    // Envoy reconnects with jittered backoff (up to 30 s in the worst case).
    if let Err(e) = r.mesh.wait_resynced(Duration::from_secs(40)).await {
        stop.store(true, Ordering::Relaxed);
        return Err(e);
    }
    // Requests after every proxy took the restarted discovery's config.
    let after = split(out, 50, &[]).await;
    stop.store(true, Ordering::Relaxed);
    let during = load.await?;
    eprintln!("requests across the restart: {during:?}");
    assert_eq!(
        count(&after, "reviews-v2"),
        50,
        "traffic after the restart: {after:?}\n{}",
        r.mesh.logs()
    );
    assert_eq!(
        during.keys().collect::<Vec<_>>(),
        ["reviews-v2"],
        "every request across the restart was answered: {during:?}"
    );
    let admin = r.mesh.host("vm-a").admin;
    let clusters = blocking(move || pilotfish_tests::admin_get(admin, "/clusters")).await?;
    assert!(
        clusters.contains("reviews"),
        "vm-a's Envoy keeps the reviews clusters"
    );
    let log = r.mesh.discovery_log()[before..].to_string();
    assert!(
        log.contains("services.toml:2:"),
        "the restarted discovery names the problem as file:line:column:\n{log}"
    );
    let http = r.mesh.http;
    let status: serde_json::Value = serde_json::from_str(
        &blocking(move || pilotfish_tests::admin_get(http, "/status")).await?,
    )?;
    let file = status["sources"]["files"]
        .as_object()
        .and_then(|files| {
            files
                .iter()
                .find(|(path, _)| path.ends_with("services.toml"))
        })
        .map(|(_, f)| f.clone())
        .unwrap_or_default();
    assert_eq!(file["restored"], true, "{status:#}");
    assert_eq!(file["stale"], true, "{status:#}");
    assert!(file["since"].is_string(), "{status:#}");

    // Fixed, with vm-b's instance now labelled v2 as well: both apps answer the v2 subset.
    let fixed = services_toml(&r.mesh, r.v1_port, r.v2_port).replace(
        "labels = { version = \"v1\" }",
        "labels = { version = \"v2\" }",
    );
    r.mesh.write_registry("services.toml", &fixed)?;
    wait_for(
        "the fixed file's instance serves",
        Duration::from_secs(5),
        || async move {
            let seen = split(out, 20, &[]).await;
            Ok((count(&seen, "reviews-v1") > 0 && count(&seen, "error") == 0).then_some(()))
        },
    )
    .await?;
    Ok(())
}
