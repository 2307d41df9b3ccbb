//! Metrics as an operator's Prometheus sees them: a real `prometheus` server (Debian's package,
//! installed here when missing) scrapes discovery's `/metrics` and one agent's health port, and
//! its query API shows both targets up, a change's convergence on discovery, and the agent's
//! own metrics beside its Envoy's in the same target. `promtool` checks both texts first.
//!
//! Run: `cargo build --workspace --bins && cargo test -p pilotfish-tests --test prometheus`

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pilotfish_tests::mesh::Mesh;
use pilotfish_tests::{admin_get, blocking, ensure_debian_tool, free_port, http_get, wait_for};
use pilotfish_tests::{http_request, Process};
use serde_json::Value;

const READY: Duration = Duration::from_secs(30);
/// Prometheus scrapes every second; a few scrapes, and its own start, fit in this.
const SCRAPED: Duration = Duration::from_secs(20);

/// productpage on vm-a calls reviews on vm-b; `with_ratings` adds a second upstream.
fn registry(mesh: &Mesh, reviews_port: u16, with_ratings: bool) -> String {
    let mut text = if with_ratings {
        mesh.service_toml(
            "productpage",
            "upstreams = [\"reviews\", \"ratings\"]",
            &[("vm-a", 9080, "")],
        ) + &mesh.service_toml("ratings", "", &[("vm-b", 9099, "")])
    } else {
        mesh.service_toml(
            "productpage",
            "upstreams = [\"reviews\"]",
            &[("vm-a", 9080, "")],
        )
    };
    text += &mesh.service_toml("reviews", "", &[("vm-b", reviews_port, "")]);
    text
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query against Prometheus' HTTP API: each series' labels and value.
async fn query(prometheus: SocketAddr, promql: &str) -> Result<Vec<(Value, f64)>> {
    let path = format!("/api/v1/query?query={}", encode(promql));
    let body = blocking(move || admin_get(prometheus, &path)).await?;
    let json: Value = serde_json::from_str(&body).context("the query API answers JSON")?;
    if json["status"] != "success" {
        bail!("query {promql}: {json}");
    }
    Ok(json["data"]["result"]
        .as_array()
        .context("a vector result")?
        .iter()
        .filter_map(|s| {
            let value = s["value"][1].as_str()?.parse().ok()?;
            Some((s["metric"].clone(), value))
        })
        .collect())
}

/// Waits until `promql` returns at least one series and every value passes `ok`.
async fn until(prometheus: SocketAddr, promql: &str, ok: fn(f64) -> bool) -> Result<()> {
    wait_for(&format!("Prometheus: {promql}"), SCRAPED, || async {
        let series = query(prometheus, promql).await?;
        Ok((!series.is_empty() && series.iter().all(|(_, v)| ok(*v))).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_discovery_and_an_agent_with_its_envoy() -> Result<()> {
    let prometheus_bin = blocking(|| ensure_debian_tool("prometheus", "prometheus")).await?;

    let mut mesh = Mesh::start()?;
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-b", 3)?;
    let reviews = mesh.start_app("reviews", "v1", mesh.host("vm-b").ip, &[])?;
    mesh.write_registry("services.toml", &registry(&mesh, reviews, false))?;
    mesh.wait_all_ready(READY).await?;

    // A change while both proxies are connected: its convergence is what discovery times.
    mesh.write_registry("services.toml", &registry(&mesh, reviews, true))?;
    // Traffic through vm-a's Envoy, so its scrape has cluster counters.
    let outbound = mesh.host("vm-a").outbound;
    wait_for("a request from vm-a reaches reviews", READY, || async {
        let r = blocking(move || http_request(outbound, "GET", "reviews", "/", &[], "")).await;
        Ok(r.ok().filter(|r| r.status == 200).map(|_| ()))
    })
    .await?;

    // The texts themselves, through a strict parser.
    let discovery = mesh.http;
    let agent = mesh.host("vm-a").health;
    let scrape = blocking(move || http_get(discovery, "discovery", "/metrics")).await?;
    assert_eq!(
        scrape.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let (exit, said) = pilotfish_tests::debian::promtool_check(&scrape.body);
    assert_eq!((exit, said.as_str()), (0, ""), "{}", scrape.body);
    let scrape = blocking(move || http_get(agent, "agent", "/metrics")).await?;
    assert_eq!(
        scrape.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let (exit, said) = pilotfish_tests::debian::promtool_check(&scrape.body);
    // It parses; lint findings are only Envoy's own names (help texts, counter suffixes).
    assert!(exit == 0 || exit == 3, "promtool exit {exit}: {said}");
    for finding in said.lines() {
        assert!(finding.starts_with("envoy_"), "{finding}");
    }

    // A real Prometheus, on its own address, port and storage: nothing shared with a system
    // one (which a container without systemd does not run anyway).
    let ip = mesh.net.host(9);
    let web = SocketAddr::new(ip, free_port(ip));
    let dir = mesh.path("prometheus");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: discovery\n    static_configs:\n      - targets: [\"{discovery}\"]\n\
             \x20 - job_name: agent\n    static_configs:\n      - targets: [\"{agent}\"]\n"
        ),
    )?;
    let _prometheus = Process::spawn(
        "prometheus",
        &prometheus_bin,
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={web}"),
        ],
        dir.join("prometheus.log"),
    )?;

    let checks = async {
        // Both scrapes succeed: a scrape whose text Prometheus cannot parse is `up` 0.
        wait_for("Prometheus: up == 1 for both targets", SCRAPED, || async {
            let mut up: Vec<(String, f64)> = query(web, "up")
                .await?
                .into_iter()
                .map(|(m, v)| (m["job"].as_str().unwrap_or_default().to_string(), v))
                .collect();
            up.sort_by(|a, b| a.0.cmp(&b.0));
            let both = [("agent".to_string(), 1.0), ("discovery".to_string(), 1.0)];
            Ok((up == both).then_some(()))
        })
        .await?;
        // Discovery timed the change from learned to ACKed on the proxies.
        until(
            web,
            "sum(pilotfish_xds_convergence_seconds_count{job=\"discovery\"})",
            |v| v > 0.0,
        )
        .await?;
        until(
            web,
            "sum(pilotfish_snapshot_build_seconds_count{job=\"discovery\"})",
            |v| v > 0.0,
        )
        .await?;
        // The agent's own metrics and its Envoy's, from the same target.
        until(web, "pilotfish_agent_envoy_up{job=\"agent\"}", |v| v == 1.0).await?;
        until(
            web,
            "sum(envoy_cluster_upstream_rq_total{job=\"agent\"})",
            |v| v > 0.0,
        )
        .await?;
        anyhow::Ok(())
    };
    if let Err(e) = checks.await {
        bail!(
            "{e:#}\nprometheus log:\n{}\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default(),
            mesh.logs()
        );
    }
    Ok(())
}
