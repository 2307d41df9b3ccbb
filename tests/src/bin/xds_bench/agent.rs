//! One real agent with real Envoy against the bench's discovery: its memory once Envoy is
//! ready and has settled.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pilotfish_tests::{binary, envoy_binary, free_port, http_get, Process};

use crate::discovery::{memory, Mem};

/// The agent's memory and Envoy's.
pub async fn rss(dir: &Path, grpc: SocketAddr, services: usize) -> Result<(Mem, Mem)> {
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
    println!(
        "agent (real Envoy, {services} clusters): agent VmRSS {:.1} MB (private {:.1} MB), VmHWM {:.1} MB (Envoy itself: VmRSS {:.1} MB)",
        crate::discovery::mb(mem.rss_kb),
        crate::discovery::mb(mem.anon_kb),
        crate::discovery::mb(mem.hwm_kb),
        crate::discovery::mb(envoy.rss_kb)
    );
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
