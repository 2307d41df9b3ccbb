//! Helpers shared by the unit tests.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{AgentConfig, EnvoyConfig, XdsFlavor};

/// The real Envoy, when installed: `PILOTFISH_ENVOY`, then the workspace's `.tools`, then PATH.
pub fn envoy_binary() -> Option<PathBuf> {
    let mut candidates = std::env::var_os("PILOTFISH_ENVOY")
        .map(PathBuf::from)
        .into_iter()
        .chain([Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/envoy/bin/envoy")])
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("envoy"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
    candidates.find(|c| c.is_file())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn test_config(dir: &Path) -> AgentConfig {
    AgentConfig {
        node: "vm-test".into(),
        address: "127.0.0.1".parse().unwrap(),
        discovery: vec!["127.0.0.1:1".into()],
        token_file: None,
        ca_file: None,
        trust_domain: pilotfish_pki::TrustDomain::new("pilotfish.local").unwrap(),
        insecure: true,
        outbound: "127.0.0.1:15001".parse().unwrap(),
        app_address: "127.0.0.1".parse().unwrap(),
        mesh_port: 15006,
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        health: SocketAddr::from(([127, 0, 0, 1], free_port())),
        envoy: EnvoyConfig {
            binary: envoy_binary().unwrap_or_else(|| "/nonexistent/envoy".into()),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            concurrency: Some(1),
            drain_time: Duration::from_secs(1),
            log_level: "warning".into(),
            xds: XdsFlavor::Delta,
            access_log: crate::config::AccessLog::Stdout,
        },
        tracing: None,
    }
}

/// Polls `cond` until it holds; panics after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (code, _, body) = http_get_with_head(addr, path).await;
    (code, body)
}

/// A plain HTTP/1.1 GET: (status, status line and headers, body).
pub async fn http_get_with_head(addr: SocketAddr, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf[9..12].parse().unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((buf.as_str(), ""));
    (code, head.to_string(), body.to_string())
}

/// What `promtool check metrics` (a real Prometheus parser and linter) says about `text`: its
/// exit code (0: valid and clean, 3: valid with lint findings, 1: not parseable) and output.
/// Installs Debian's `prometheus` package when promtool is missing; fails, never skips, when
/// that is impossible.
pub fn promtool_check(text: &str) -> (i32, String) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    {
        // Tests run on threads: one apt-get at a time (dpkg takes a lock).
        static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        let found = || {
            Command::new("promtool")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !found() {
            let install = || {
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends", "prometheus"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .output()
                    .unwrap()
            };
            let mut out = install();
            if !out.status.success() {
                // A fresh machine may have no package lists yet.
                let _ = Command::new("apt-get").arg("update").output();
                out = install();
            }
            assert!(
                found(),
                "promtool (Debian's prometheus package) is missing and apt-get failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), said)
}
