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
        interception: None,
        dns: None,
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

#[path = "../../tests/src/debian.rs"]
mod debian;

pub use debian::{ensure_tool, promtool_check};
