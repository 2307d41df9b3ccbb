//! The units are `Type=notify` with a watchdog: what discovery and the agent tell systemd, read
//! from a socket that stands in for systemd's (`NOTIFY_SOCKET`), with the real binaries and a
//! real Envoy. Every other test runs without `NOTIFY_SOCKET`, where all of this is a no-op.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::{admin_get, blocking, http_get};
use tokio::net::UnixDatagram;

/// What the units' `WatchdogSec=` would hand the process; short, so pings are frequent.
const WATCHDOG_USEC: &str = "400000";

/// systemd's end of the notify protocol: one datagram per `sd_notify` call.
struct NotifySocket {
    socket: UnixDatagram,
    /// Every message so far, in order.
    seen: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(path: &Path) -> Result<NotifySocket> {
        Ok(NotifySocket {
            socket: UnixDatagram::bind(path)?,
            seen: Vec::new(),
        })
    }

    fn env(path: &Path) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            ("WATCHDOG_USEC".into(), WATCHDOG_USEC.into()),
        ]
    }

    /// Reads messages until one has a line equal to `line`; returns that message.
    async fn until(&mut self, line: &str, deadline: Duration) -> Result<String> {
        let end = tokio::time::Instant::now() + deadline;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::time::timeout_at(end, self.socket.recv(&mut buf))
                .await
                .map_err(|_| {
                    anyhow!(
                        "no {line:?} within {deadline:?}; got {:?}",
                        self.seen.iter().map(|(_, m)| m).collect::<Vec<_>>()
                    )
                })??;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push((Instant::now(), msg.clone()));
            if msg.lines().any(|l| l == line) {
                return Ok(msg);
            }
        }
    }

    /// How many `WATCHDOG=1` pings arrived at or after `since`.
    fn pings_since(&self, since: Instant) -> usize {
        self.seen
            .iter()
            .filter(|(t, m)| *t >= since && m.lines().any(|l| l == "WATCHDOG=1"))
            .count()
    }

    fn count(&self, line: &str) -> usize {
        self.seen
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .count()
    }
}

#[tokio::test]
async fn discovery_is_ready_once_serving_pings_reloads_and_stops() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let mut systemd = NotifySocket::bind(&path)?;
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        discovery_env: NotifySocket::env(&path),
        ..MeshOptions::default()
    })?;
    let http = mesh.http;

    let ready = systemd.until("READY=1", Duration::from_secs(30)).await?;
    assert!(ready.contains("STATUS=serving"), "{ready}");
    // What a unit ordered after discovery would find at that moment: the ports answer and the
    // snapshot ADS serves is a built one, not the empty placeholder.
    let status = blocking(move || http_get(http, "discovery", "/status")).await?;
    assert_eq!(status.status, 200);
    let status: serde_json::Value = serde_json::from_str(&status.body)?;
    assert!(
        status["snapshot"]["generation"].as_u64() > Some(0),
        "{status}"
    );
    assert!(std::net::TcpStream::connect(mesh.grpc).is_ok());

    // Pinged every WATCHDOG_USEC / 2 = 200 ms.
    let since = Instant::now();
    for _ in 0..3 {
        systemd.until("WATCHDOG=1", Duration::from_secs(2)).await?;
    }
    assert!(systemd.pings_since(since) >= 3);

    // `systemctl reload`: RELOADING=1 with the monotonic clock, the CA is read, READY=1.
    mesh.discovery.signal(1);
    let reloading = systemd
        .until("RELOADING=1", Duration::from_secs(10))
        .await?;
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .ok_or_else(|| anyhow!("RELOADING=1 without MONOTONIC_USEC: {reloading}"))?;
    assert!(usec.parse::<u64>()? > 0, "{reloading}");
    systemd.until("READY=1", Duration::from_secs(10)).await?;
    assert!(
        mesh.discovery.log_text().contains("reloaded the CA"),
        "READY=1 came before the reload was done:\n{}",
        mesh.discovery.log_text()
    );

    // `systemctl stop`: STOPPING=1, then a clean exit.
    mesh.discovery.signal(15);
    systemd.until("STOPPING=1", Duration::from_secs(10)).await?;
    let exit = blocking(move || {
        let status = mesh.discovery.terminate(Duration::from_secs(10));
        (status, mesh)
    })
    .await;
    assert_eq!(exit.0.map(|s| s.success()), Some(true));
    assert_eq!(systemd.count("READY=1"), 2, "{:?}", systemd.seen);
    Ok(())
}

#[tokio::test]
async fn agent_is_ready_only_once_envoy_serves_and_says_stopping_on_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let mut systemd = NotifySocket::bind(&path)?;
    let mut mesh = Mesh::start()?;
    mesh.agent_env = NotifySocket::env(&path);
    mesh.add_host("vm-a", 2)?;
    let admin = mesh.host("vm-a").admin;
    let health = mesh.host("vm-a").health;

    // The agent starts pinging long before Envoy is up (the watchdog covers start-up too).
    systemd.until("WATCHDOG=1", Duration::from_secs(30)).await?;
    let ready = systemd.until("READY=1", Duration::from_secs(60)).await?;
    assert!(ready.contains("STATUS=Envoy is ready"), "{ready}");
    // READY=1 means Envoy serves with its config: its admin /ready and the agent's readiness
    // endpoint both say so at once.
    let envoy = blocking(move || http_get(admin, "admin", "/ready")).await?;
    assert_eq!(envoy.status, 200, "{}", envoy.body);
    let agent = blocking(move || http_get(health, "agent", "/healthz/ready")).await?;
    assert_eq!(agent.status, 200, "{}", agent.body);
    let listeners = blocking(move || admin_get(admin, "/listeners")).await?;
    assert!(!listeners.trim().is_empty(), "Envoy has no listeners");

    let since = Instant::now();
    for _ in 0..3 {
        systemd.until("WATCHDOG=1", Duration::from_secs(2)).await?;
    }
    assert!(systemd.pings_since(since) >= 3);

    mesh.host("vm-a").agent.signal(15);
    systemd.until("STOPPING=1", Duration::from_secs(10)).await?;
    let exit = blocking(move || {
        let status = mesh
            .host_mut("vm-a")
            .agent
            .terminate(Duration::from_secs(15));
        (status, mesh)
    })
    .await;
    if exit.0.map(|s| s.success()) != Some(true) {
        bail!("the agent did not exit cleanly: {:?}", exit.0);
    }
    assert_eq!(systemd.count("READY=1"), 1, "{:?}", systemd.seen);
    Ok(())
}
