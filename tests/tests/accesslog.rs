//! Access logs and request ids, end to end, on a secure mesh with real Envoy.
//!
//! productpage on vm-a (`access_log` left at its default, stdout, so its lines land in the
//! agent's log) and ratings on vm-d (`access_log = "off"`) both call reviews on vm-b, which logs
//! to a file. A request leaves one outbound line on the caller and one inbound line on the
//! callee, with the same `request_id`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::{blocking, http_request, wait_for, Response};
use serde_json::Value;

const READY: Duration = Duration::from_secs(30);
/// Envoy flushes access logs about once a second.
const LOGGED: Duration = Duration::from_secs(15);

fn registry(mesh: &Mesh, reviews_port: u16) -> String {
    let calls = "upstreams = [\"reviews\"]";
    mesh.service_toml("productpage", calls, &[("vm-a", 9080, "")])
        + &mesh.service_toml("ratings", calls, &[("vm-d", 9080, "")])
        + &mesh.service_toml("reviews", "", &[("vm-b", reviews_port, "")])
}

async fn get(
    outbound: SocketAddr,
    path: String,
    request_id: Option<&'static str>,
) -> Result<Response> {
    blocking(move || {
        let headers: Vec<(&str, &str)> = request_id
            .map(|id| ("x-request-id", id))
            .into_iter()
            .collect();
        http_request(outbound, "GET", "reviews", &path, &headers, "")
    })
    .await
}

/// The access log lines in `file` (JSON objects with a `direction`), skipping everything else
/// the agent and Envoy write there.
fn access_lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("direction").is_some())
        .collect()
}

/// Waits for the line in `file` for a request to `path` going `direction`.
async fn line_for(file: &Path, direction: &str, path: &str) -> Result<Value> {
    wait_for(
        &format!(
            "{direction} access log line for {path} in {}",
            file.display()
        ),
        LOGGED,
        || async move {
            Ok(access_lines(file)
                .into_iter()
                .find(|l| l["direction"] == direction && l["path"] == path))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_and_callee_log_the_same_request_id() -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        ..MeshOptions::default()
    })?;
    mesh.add_host("vm-a", 2)?;
    // Relative to the agent's config directory, like every path in agent.toml.
    mesh.add_host_with("vm-b", 3, "access_log = \"access.log\"")?;
    mesh.add_host_with("vm-d", 5, "access_log = \"off\"")?;
    let b_ip = mesh.host("vm-b").ip;
    let port = mesh.start_app("reviews", "v1", b_ip, &[])?;
    mesh.write_registry("services.toml", &registry(&mesh, port))?;
    mesh.wait_all_ready(READY).await?;
    let a_out = mesh.host("vm-a").outbound;
    let d_out = mesh.host("vm-d").outbound;
    for out in [a_out, d_out] {
        let up = wait_for("reviews reachable over mTLS", READY, || async move {
            Ok(get(out, "/warmup".into(), None)
                .await
                .ok()
                .filter(|r| r.status == 200))
        })
        .await;
        if let Err(e) = up {
            bail!("{e:#}\n{}", mesh.logs());
        }
    }
    let a_log = mesh.host("vm-a").dir.join("agent.log");
    let b_file = mesh.host("vm-b").dir.join("access.log");
    let d_log = mesh.host("vm-d").dir.join("agent.log");

    // vm-d logs nothing, and its app's own x-request-id reaches the callee's line unchanged.
    let r = get(
        d_out,
        "/reviews/from-ratings".into(),
        Some("ratings-chose-this-id"),
    )
    .await?;
    assert_eq!(r.status, 200);
    let from_d = line_for(&b_file, "inbound", "/reviews/from-ratings").await?;
    assert_eq!(from_d["request_id"], "ratings-chose-this-id");
    assert_eq!(from_d["peer"], "spiffe://pilotfish.local/service/ratings");

    // vm-a: Envoy generates the id on the way out; vm-b keeps it.
    let r = get(a_out, "/reviews/from-productpage".into(), None).await?;
    assert_eq!(r.status, 200);
    let out = match line_for(&a_log, "outbound", "/reviews/from-productpage").await {
        Ok(l) => l,
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    };
    let inb = line_for(&b_file, "inbound", "/reviews/from-productpage").await?;

    let id = out["request_id"].as_str().unwrap_or_default();
    assert!(id.len() >= 32, "a generated request id: {out}");
    assert_eq!(inb["request_id"], id, "caller {out}\ncallee {inb}");

    for line in [&out, &inb] {
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["response_code"], 200, "{line}");
        assert!(line["duration_ms"].is_number(), "{line}");
        assert!(line["bytes_sent"].as_u64().is_some_and(|n| n > 0), "{line}");
        assert!(line["bytes_received"].is_number(), "{line}");
        assert!(line["start_time"].is_string(), "{line}");
        assert!(line.get("response_flags").is_some(), "{line}");
    }
    let b = mesh.host("vm-b");
    assert_eq!(out["upstream_cluster"], "outbound|reviews");
    assert_eq!(out["upstream_host"], format!("{}:{}", b.ip, b.mesh_port));
    assert_eq!(inb["upstream_cluster"], "inbound|reviews");
    assert_eq!(inb["upstream_host"], format!("{}:{port}", b.ip));
    // The verified SPIFFE ID of the caller's client certificate.
    assert_eq!(inb["peer"], "spiffe://pilotfish.local/service/productpage");

    // vm-d's request came before vm-a's, whose line has been flushed since: vm-d's would have
    // been too. And vm-b logged to its file only.
    assert_eq!(
        access_lines(&d_log),
        Vec::<Value>::new(),
        "access_log = \"off\""
    );
    assert_eq!(
        access_lines(&b.dir.join("agent.log")),
        Vec::<Value>::new(),
        "vm-b logs to its file, not stdout"
    );
    Ok(())
}
