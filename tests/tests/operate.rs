//! Operating the mesh (issue 10), as an operator does it: `pilotfish-ctl proxy-status` against
//! a real discovery with real agents and Envoy, through the documented `PILOTFISH_URL` and
//! `PILOTFISH_TOKEN_FILE`.
//! Run: `cargo build --workspace --bins && cargo test -p pilotfish-tests --test operate`.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use pilotfish_tests::load::Load;
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::{binary, blocking, http_get, wait_for};
use serde_json::Value;

const READY: Duration = Duration::from_secs(30);
const PATIENCE: Duration = Duration::from_secs(15);

/// How an operator reaches discovery: `PILOTFISH_URL` and `PILOTFISH_TOKEN_FILE`.
#[derive(Clone)]
struct Ctl {
    url: String,
    token_file: std::path::PathBuf,
}

impl Ctl {
    fn of(mesh: &Mesh) -> Ctl {
        Ctl {
            url: format!("http://{}", mesh.http),
            token_file: mesh.path("api-token"),
        }
    }

    /// `pilotfish-ctl ARGS`: exit code and stdout (stderr appended).
    fn run(&self, token: bool, args: &[&str]) -> Result<(i32, String)> {
        let mut cmd = Command::new(binary("pilotfish-ctl")?);
        cmd.args(args)
            .env("PILOTFISH_URL", &self.url)
            .env_remove("PILOTFISH_TOKEN_FILE");
        if token {
            cmd.env("PILOTFISH_TOKEN_FILE", &self.token_file);
        }
        let out = cmd.output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// `proxy-status` with the token, off the async runtime.
    async fn status(&self, args: &'static [&'static str]) -> Result<(i32, String)> {
        let ctl = self.clone();
        blocking(move || ctl.run(true, args)).await
    }
}

fn services(mesh: &Mesh, reviews_port: u16, gateway: Option<&str>) -> String {
    let mut text = mesh.service_toml("productpage", "", &[("vm-a", 9080, "")])
        + &mesh.service_toml("reviews", "", &[("vm-b", reviews_port, "")]);
    if let Some(listen) = gateway {
        text.push_str(&format!(
            "\n[gateways.edge]\nnode = \"vm-b\"\nlisten = \"{listen}\"\n\
             [[gateways.edge.routes]]\nservice = \"reviews\"\n"
        ));
    }
    text
}

/// The rows of `proxy-status` for `node`.
fn row<'a>(table: &'a str, node: &str) -> Option<&'a str> {
    table.lines().find(|l| l.starts_with(&format!("{node} ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_shows_sync_nacks_and_disconnected_proxies() -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        discovery_extra: "[api]\ntoken_file = \"api-token\"\n".into(),
        ..MeshOptions::default()
    })?;
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-b", 3)?;
    let reviews = mesh.start_app("reviews", "v1", mesh.host("vm-b").ip, &[])?;
    mesh.write_registry("services.toml", &services(&mesh, reviews, None))?;
    mesh.wait_all_ready(READY).await?;

    // Without the token: refused, and said so.
    let ctl = Ctl::of(&mesh);
    let (code, text) = ctl.run(false, &["proxy-status"])?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("Bearer"), "{text}");

    // Both proxies synced on every type discovery sends.
    let synced = wait_for("proxy-status: all synced", READY, || async {
        let (code, table) = ctl.status(&["proxy-status"]).await?;
        let both = ["vm-a", "vm-b"].iter().all(|n| {
            row(&table, n).is_some_and(|r| r.matches("SYNCED").count() == 4 && r.contains("delta"))
        });
        Ok((code == 0 && both).then_some(table))
    })
    .await;
    let table = match synced {
        Ok(t) => t,
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    };
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        row(&table, "vm-b").is_some_and(|r| r.contains("reviews")),
        "{table}"
    );

    // One scrape per host: the agent's metrics and its Envoy's, on the agent's port.
    let health = mesh.host("vm-b").health;
    let scrape = blocking(move || http_get(health, "agent", "/metrics")).await?;
    assert_eq!(scrape.status, 200);
    for metric in [
        "pilotfish_agent_envoy_up 1",
        "envoy_server_live",
        "envoy_cluster_upstream_cx_total",
    ] {
        assert!(
            scrape.body.contains(metric),
            "{metric} missing from the agent's scrape"
        );
    }

    let (code, json) = ctl.run(true, &["proxy-status", "--output", "json"])?;
    assert_eq!(code, 0, "{json}");
    let list: Vec<Value> = serde_json::from_str(&json)?;
    let b = list
        .iter()
        .find(|p| p["node"] == "vm-b")
        .expect("vm-b listed");
    assert_eq!(b["connected"], true);
    assert_eq!(b["flavour"], "delta");
    assert_eq!(b["services"], serde_json::json!(["reviews"]));
    assert_eq!(b["agent"], env!("CARGO_PKG_VERSION"));
    let clusters = &b["types"]["clusters"];
    assert_eq!(clusters["state"], "synced");
    assert_eq!(clusters["version"], clusters["acked_version"]);
    assert_eq!(b["types"]["secrets"]["state"], "not_sent");

    // A gateway on vm-b's Envoy admin port: vm-b's Envoy rejects the listener. Traffic from
    // vm-a to vm-b runs through the rejection and the fix: neither may drop a request.
    const PLAIN: &[(&str, &str)] = &[];
    let load = Load::start(mesh.host("vm-a").outbound, "reviews", &[PLAIN, PLAIN]);
    let admin = mesh.host("vm-b").admin.to_string();
    mesh.write_registry("services.toml", &services(&mesh, reviews, Some(&admin)))?;
    let nacked = wait_for("proxy-status: vm-b NACKs listeners", PATIENCE, || async {
        let (code, table) = ctl.status(&["proxy-status"]).await?;
        let shown = row(&table, "vm-b").is_some_and(|r| r.contains("NACKED"))
            && table.contains("vm-b LDS NACKED: ");
        Ok((code == 2 && shown).then_some(table))
    })
    .await?;
    assert!(
        nacked.contains("bind"),
        "the reason names the bind failure: {nacked}"
    );
    let (_, json) = ctl.run(true, &["proxy-status", "--output", "json"])?;
    let list: Vec<Value> = serde_json::from_str(&json)?;
    let b = list
        .iter()
        .find(|p| p["node"] == "vm-b")
        .expect("vm-b listed");
    assert_eq!(b["types"]["listeners"]["state"], "nacked");
    assert!(b["types"]["listeners"]["nack_reason"]
        .as_str()
        .is_some_and(|r| r.contains("bind")));

    // Fixed: synced again, exit 0.
    mesh.write_registry("services.toml", &services(&mesh, reviews, None))?;
    wait_for("proxy-status: synced after the fix", PATIENCE, || async {
        let (code, _) = ctl.status(&["proxy-status"]).await?;
        Ok((code == 0).then_some(()))
    })
    .await?;
    let tally = load.stop().await;
    assert!(tally.total() > 0, "the load ran");
    assert_eq!(tally.failed, 0, "requests failed: {:?}", tally.failures);

    // vm-b's agent stops: listed as disconnected, which does not fail the command.
    mesh.host_mut("vm-b").agent.kill();
    let table = wait_for("proxy-status: vm-b disconnected", PATIENCE, || async {
        let (code, table) = ctl.status(&["proxy-status"]).await?;
        let gone = row(&table, "vm-b").is_some_and(|r| r.contains("DISCONNECTED (last seen"));
        Ok((code == 0 && gone).then_some(table))
    })
    .await?;
    assert!(
        row(&table, "vm-a").is_some_and(|r| r.contains("SYNCED")),
        "{table}"
    );
    // /status shows the node's liveness too.
    let http = mesh.http;
    let status = blocking(move || http_get(http, "discovery", "/status")).await?;
    let status: Value = serde_json::from_str(&status.body)?;
    assert!(status["nodes"]
        .as_array()
        .is_some_and(|n| n.iter().any(|n| n["node"] == "vm-b" && n["streams"] == 0)));
    Ok(())
}
