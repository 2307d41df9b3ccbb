//! Host liveness (issue 9): a host whose agent and Envoy die leaves every caller's rotation
//! within `node_grace`, with no failed request from then on, and gets traffic back when it
//! returns. Real discovery, agents and Envoy; the caller runs continuous load throughout.
//! Run: `cargo build --workspace --bins && cargo test -p pilotfish-tests --test liveness`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pilotfish_tests::load::Load;
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::{admin_get, blocking, envoy_stat, http_get, wait_for};

const READY: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(2);
/// From the grace running out until every caller has the new health: a snapshot build and an
/// EDS push, with slack for a loaded 2-core machine.
const PUSH_SLACK: Duration = Duration::from_secs(5);
const PLAIN: &[(&str, &str)] = &[];

fn services_toml(mesh: &Mesh, v1_port: u16, v2_port: u16, health: &str) -> String {
    mesh.service_toml("productpage", "", &[("vm-a", 9080, "")])
        + &mesh.service_toml(
            "reviews",
            health,
            &[("vm-b", v1_port, ""), ("vm-c", v2_port, "")],
        )
}

/// How the caller's Envoy sees the host at `ip:port` in cluster `outbound|reviews`: its
/// health flags from `/clusters` (`healthy` when none), or `None` when it is not listed.
fn health_flags(admin: SocketAddr, ip: &str, port: u16) -> Result<Option<String>> {
    let clusters = admin_get(admin, "/clusters")?;
    let prefix = format!("outbound|reviews::{ip}:{port}::health_flags::");
    Ok(clusters
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string))
}

/// A mesh of three hosts: vm-a calls `reviews`, which runs on vm-b (v1) and vm-c (v2).
/// Returns the mesh and the two apps' ports.
async fn reviews_mesh(health: &str) -> Result<(Mesh, u16, u16)> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        discovery_top: format!("node_grace = \"{}s\"", GRACE.as_secs()),
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    let v1 = mesh.start_app("reviews", "v1", mesh.host("vm-b").ip, &[])?;
    let v2 = mesh.start_app("reviews", "v2", mesh.host("vm-c").ip, &[])?;
    mesh.write_registry("services.toml", &services_toml(&mesh, v1, v2, health))?;
    mesh.wait_all_ready(READY).await?;
    let out = mesh.host("vm-a").outbound;
    let both = wait_for("both reviews versions answer", READY, || async move {
        let seen = blocking(move || {
            (0..20)
                .filter_map(|_| http_get(out, "reviews", "/reviews/1").ok())
                .filter_map(|r| r.header("x-served-by").map(str::to_string))
                .collect::<Vec<_>>()
        })
        .await;
        let v1 = seen.iter().any(|s| s.contains("v1"));
        let v2 = seen.iter().any(|s| s.contains("v2"));
        Ok((v1 && v2).then_some(()))
    })
    .await;
    if let Err(e) = both {
        bail!("{e:#}\n{}", mesh.logs());
    }
    Ok((mesh, v1, v2))
}

/// SIGKILL a host's agent and its Envoy at once, as a power loss would stop them.
fn kill_host(mesh: &mut Mesh, node: &str) {
    let envoy = mesh.host(node).envoy_pid();
    mesh.host_mut(node).agent.kill();
    if let Some(pid) = envoy {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_leaves_rotation_within_the_grace_and_returns() -> Result<()> {
    let (mut mesh, _, _) = reviews_mesh("").await?;
    let a = mesh.host("vm-a");
    let (out, admin) = (a.outbound, a.admin);
    let (c_ip, c_mesh) = (
        mesh.host("vm-c").ip.to_string(),
        mesh.host("vm-c").mesh_port,
    );
    let load = Load::start(out, "reviews", &[PLAIN, PLAIN, PLAIN, PLAIN]);
    let warm = load.total();
    wait_for("load running", READY, || async {
        Ok((load.total() > warm + 100).then_some(()))
    })
    .await?;

    kill_host(&mut mesh, "vm-c");
    let killed = Instant::now();
    let (ip, port) = (c_ip.clone(), c_mesh);
    let out_of_rotation = wait_for(
        "vm-c marked unhealthy at the caller",
        GRACE + PUSH_SLACK,
        || {
            let ip = ip.clone();
            async move {
                let flags = blocking(move || health_flags(admin, &ip, port)).await?;
                Ok(flags.filter(|f| f.contains("failed_eds_health")))
            }
        },
    )
    .await;
    if let Err(e) = out_of_rotation {
        bail!("{e:#}\n{}", mesh.logs());
    }
    let gone_after = killed.elapsed();
    assert!(
        gone_after >= GRACE,
        "vm-c left before its grace ran out ({gone_after:?})"
    );
    // From here on no request may fail, and the caller must not even try vm-c.
    let failed_before = load.failed();
    let connect_fails = |admin| {
        blocking(move || envoy_stat(admin, "cluster.outbound|reviews.upstream_cx_connect_fail"))
    };
    let fails_then = connect_fails(admin).await?;
    let total_then = load.total();
    wait_for("500 more requests", READY, || async {
        Ok((load.total() > total_then + 500).then_some(()))
    })
    .await?;
    assert_eq!(
        connect_fails(admin).await?,
        fails_then,
        "the caller still tried the dead host"
    );
    let served_by_v1_only = load.served_by();

    // vm-c comes back: its instances are healthy again once its Envoy serves.
    mesh.host_mut("vm-c").agent.restart()?;
    let (ip, port) = (c_ip.clone(), c_mesh);
    wait_for("vm-c healthy again at the caller", READY, || {
        let ip = ip.clone();
        async move {
            let flags = blocking(move || health_flags(admin, &ip, port)).await?;
            Ok(flags.filter(|f| f == "healthy"))
        }
    })
    .await?;
    let v2_then = served_by_v1_only.get("reviews-v2").copied().unwrap_or(0);
    wait_for("vm-c gets traffic back", READY, || async {
        let v2 = load.served_by().get("reviews-v2").copied().unwrap_or(0);
        Ok((v2 > v2_then + 50).then_some(()))
    })
    .await?;
    let tally = load.stop().await;
    // Logs go to files here, as to journald: no terminal, so no colour codes.
    for log in [mesh.discovery_log(), mesh.host("vm-a").agent.log_text()] {
        // Envoy's own lines start with `[`; the agent's and discovery's must be plain.
        let ours = log.lines().filter(|l| !l.starts_with('['));
        assert!(
            ours.clone().count() > 0 && ours.clone().all(|l| !l.contains('\x1b')),
            "ANSI escape codes in a log that is not a terminal"
        );
    }
    let after = tally.failed - failed_before;
    assert_eq!(
        after,
        0,
        "failed requests after vm-c left the rotation: {:?}\n{}",
        tally.failures,
        mesh.logs()
    );
    eprintln!(
        "vm-c left after {gone_after:?}; {} requests, {} failed while it was dying (within \
         the grace): {:?}",
        tally.total(),
        failed_before,
        tally.failures
    );
    Ok(())
}

/// `health = "static"`: instances reached without an agent keep their declared health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_health_keeps_an_instance_without_its_agent() -> Result<()> {
    let health = "health = \"static\"";
    let (mut mesh, v1, v2) = reviews_mesh(health).await?;
    let admin = mesh.host("vm-a").admin;
    let (c_ip, c_mesh) = (
        mesh.host("vm-c").ip.to_string(),
        mesh.host("vm-c").mesh_port,
    );
    kill_host(&mut mesh, "vm-c");
    let http = mesh.http;
    wait_for(
        "discovery sees vm-c dead",
        GRACE + PUSH_SLACK,
        || async move {
            let status = blocking(move || http_get(http, "discovery", "/status")).await?;
            let json: serde_json::Value = serde_json::from_str(&status.body)?;
            let dead = json["nodes"].as_array().is_some_and(|n| {
                n.iter()
                    .any(|n| n["node"] == "vm-c" && n["state"] == "dead")
            });
            Ok(dead.then_some(()))
        },
    )
    .await?;
    // A later edit reaches the caller after anything vm-c's death would have changed.
    let marker = "\n[services.ratings]\nport = 9080\n";
    let edited = services_toml(&mesh, v1, v2, health) + marker;
    mesh.write_registry("services.toml", &edited)?;
    wait_for("the later edit at the caller", READY, || async move {
        let clusters = blocking(move || admin_get(admin, "/clusters")).await?;
        Ok(clusters.contains("outbound|ratings::").then_some(()))
    })
    .await?;
    let flags = blocking(move || health_flags(admin, &c_ip, c_mesh)).await?;
    assert_eq!(flags.as_deref(), Some("healthy"), "{}", mesh.logs());
    Ok(())
}
