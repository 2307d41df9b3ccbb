//! Hosts in production (issue 11): `systemctl reload` (SIGHUP) of an agent, with the same
//! config, with a new Envoy binary and with a new agent binary, and a `kill -9` of the agent,
//! all under continuous load through that host as caller and as callee, where it is the only
//! instance of its service: no request may fail, and exactly one Envoy is left.
//! Run: `cargo build --workspace --bins && cargo test -p pilotfish-tests --test reload`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use pilotfish_tests::leaving::{flowing, stop_under_load};
use pilotfish_tests::load::Load;
use pilotfish_tests::mesh::{Host, Mesh, MeshOptions};
use pilotfish_tests::{binary, blocking, envoy_binary, http_get, wait_for};

const READY: Duration = Duration::from_secs(30);
/// A hot restart ends when the old Envoy has drained (`drain_time` 2 s) and been stopped
/// (5 s later at most).
const HANDOVER: Duration = Duration::from_secs(30);
const PLAIN: &[(&str, &str)] = &[];

/// Waits until `old` is gone and exactly one other Envoy of `host` runs and is ready.
async fn handed_over(host: &Host, old: u32) -> Result<u32> {
    let admin = host.admin;
    wait_for(
        &format!("{}: envoy {old} replaced by exactly one new one", host.node),
        HANDOVER,
        || async move {
            let pids = host.envoy_pids();
            let ready = blocking(move || http_get(admin, "admin", "/ready"))
                .await
                .is_ok_and(|r| r.status == 200);
            Ok((ready && pids.len() == 1 && pids[0] != old).then(|| pids[0]))
        },
    )
    .await
}

fn exe_of(pid: u32) -> Result<std::path::PathBuf> {
    Ok(std::fs::read_link(format!("/proc/{pid}/exe"))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_upgrades_and_a_killed_agent_drop_no_request() -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        ..MeshOptions::default()
    })?;
    mesh.add_host("vm-a", 2)?;
    // vm-b's agent runs from a copy of its binary, which the test replaces as an upgrade does.
    let agent_bin = mesh.dir.join("pilotfish-agent");
    std::fs::copy(binary("pilotfish-agent")?, &agent_bin)?;
    mesh.add_host_running("vm-b", 3, "", &agent_bin)?;
    let (a_ip, b_ip) = (mesh.host("vm-a").ip, mesh.host("vm-b").ip);
    let ratings = mesh.start_app("ratings", "v1", a_ip, &[])?;
    let reviews = mesh.start_app("reviews", "v1", b_ip, &[])?;
    let services = mesh.service_toml("ratings", "", &[("vm-a", ratings, "")])
        + &mesh.service_toml("reviews", "", &[("vm-b", reviews, "")]);
    mesh.write_registry("services.toml", &services)?;
    mesh.wait_all_ready(READY).await?;

    // Both ways answer before the load starts (routes arrive after Envoy is ready).
    for (from, service) in [("vm-a", "reviews"), ("vm-b", "ratings")] {
        let out = mesh.host(from).outbound;
        wait_for(&format!("{from} reaches {service}"), READY, || async move {
            let answer = blocking(move || http_get(out, service, "/")).await;
            Ok(answer.is_ok_and(|r| r.status == 200).then_some(()))
        })
        .await?;
    }
    // vm-b as callee (the only reviews) and as caller.
    let into_b = Load::start(mesh.host("vm-a").outbound, "reviews", &[PLAIN, PLAIN]);
    let from_b = Load::start(mesh.host("vm-b").outbound, "ratings", &[PLAIN, PLAIN]);
    flowing(&into_b, 200).await?;
    flowing(&from_b, 200).await?;
    let agent_pid = mesh.host("vm-b").agent.pid().expect("agent runs");
    let mut envoy = mesh.host("vm-b").envoy_pid().expect("vm-b runs an envoy");

    // A reload with a config that does not check is refused: nothing changes.
    let config = mesh.host("vm-b").config.clone();
    let good = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        good.replace("concurrency = 1", "concurrency = \"one\""),
    )?;
    mesh.host("vm-b").agent.signal(1);
    wait_for("the refused reload is logged", READY, || async {
        Ok(mesh
            .host("vm-b")
            .agent
            .log_text()
            .contains("reload refused")
            .then_some(()))
    })
    .await?;
    ensure!(mesh.host("vm-b").envoy_pids() == [envoy], "Envoy untouched");
    std::fs::write(&config, &good)?;

    // 1. Reload with the same config.
    mesh.host("vm-b").agent.signal(1);
    envoy = match handed_over(mesh.host("vm-b"), envoy).await {
        Ok(pid) => pid,
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    };
    ensure!(
        mesh.host("vm-b").agent.pid() == Some(agent_pid),
        "same agent process"
    );
    flowing(&into_b, 200).await?;
    flowing(&from_b, 200).await?;

    // 2. A new Envoy binary (`[envoy] binary` changed).
    let new_envoy = mesh.host("vm-b").dir.join("envoy-next");
    std::fs::copy(envoy_binary()?, &new_envoy)?;
    let old_line = good
        .lines()
        .find(|l| l.starts_with("binary = "))
        .expect("binary line")
        .to_string();
    let upgraded = good.replace(&old_line, &format!("binary = \"{}\"", new_envoy.display()));
    std::fs::write(&config, &upgraded)?;
    mesh.host("vm-b").agent.signal(1);
    envoy = handed_over(mesh.host("vm-b"), envoy).await?;
    ensure!(exe_of(envoy)? == new_envoy, "the new Envoy binary runs");
    flowing(&into_b, 200).await?;
    flowing(&from_b, 200).await?;

    // 3. A new agent binary, installed over the old one as a package manager does (a new
    // file renamed into place).
    let staged = mesh.dir.join("pilotfish-agent.new");
    std::fs::copy(binary("pilotfish-agent")?, &staged)?;
    let inode = std::fs::metadata(&staged)?.ino();
    std::fs::rename(&staged, &agent_bin)?;
    ensure!(
        std::fs::metadata(format!("/proc/{agent_pid}/exe"))?.ino() != inode,
        "the agent runs the old file until the reload"
    );
    mesh.host("vm-b").agent.signal(1);
    envoy = handed_over(mesh.host("vm-b"), envoy).await?;
    ensure!(
        mesh.host("vm-b").agent.pid() == Some(agent_pid),
        "same agent process"
    );
    ensure!(
        std::fs::metadata(format!("/proc/{agent_pid}/exe"))?.ino() == inode
            && exe_of(agent_pid)? == agent_bin,
        "the agent re-executed the new binary"
    );
    flowing(&into_b, 200).await?;
    flowing(&from_b, 200).await?;

    // 4. kill -9 of the agent: Envoy keeps serving; the agent started next takes it over.
    mesh.host_mut("vm-b").restart_agent()?;
    envoy = handed_over(mesh.host("vm-b"), envoy).await?;
    flowing(&into_b, 200).await?;
    flowing(&from_b, 200).await?;
    ensure!(
        Path::new(&format!("/proc/{envoy}")).exists(),
        "the new Envoy runs"
    );

    let (into_b, from_b) = (into_b.stop().await, from_b.stop().await);
    eprintln!(
        "into vm-b: {} requests, from vm-b: {} requests",
        into_b.total(),
        from_b.total()
    );
    if into_b.failed + from_b.failed > 0 {
        eprintln!("{}", mesh.logs());
    }
    ensure!(
        into_b.failed == 0,
        "requests into vm-b failed: {:?}",
        into_b.failures
    );
    ensure!(
        from_b.failed == 0,
        "requests from vm-b failed: {:?}",
        from_b.failures
    );
    Ok(())
}

/// Stopping a host (`systemctl stop`: SIGTERM to its agent) while its service has instances
/// elsewhere: the agent tells discovery, callers stop choosing the host before its Envoy
/// drains, and no request fails or reaches the host afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_host_is_drained_from_its_callers_first() -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        ..MeshOptions::default()
    })?;
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-b", 3)?;
    mesh.add_host("vm-c", 4)?;
    let (b_ip, c_ip) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", b_ip, &[])?;
    let v2 = mesh.start_app("reviews", "v2", c_ip, &[])?;
    let services = mesh.service_toml("reviews", "", &[("vm-b", v1, ""), ("vm-c", v2, "")]);
    mesh.write_registry("services.toml", &services)?;
    mesh.wait_all_ready(READY).await?;
    stop_under_load(&mut mesh, "vm-a", "vm-b", "reviews", "v1").await?;
    Ok(())
}
