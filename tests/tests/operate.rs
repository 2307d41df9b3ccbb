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

/// vm-a (no service) and vm-b (reviews), the rules API's token in `api-token`, all ready; and
/// reviews' port.
async fn two_hosts(opts: MeshOptions) -> Result<(Mesh, u16)> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        discovery_extra: "[api]\ntoken_file = \"api-token\"\n".into(),
        ..opts
    })?;
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-b", 3)?;
    let reviews = mesh.start_app("reviews", "v1", mesh.host("vm-b").ip, &[])?;
    mesh.write_registry("services.toml", &services(&mesh, reviews, None))?;
    mesh.wait_all_ready(READY).await?;
    Ok((mesh, reviews))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_shows_sync_nacks_and_disconnected_proxies() -> Result<()> {
    let (mut mesh, reviews) = two_hosts(MeshOptions::default()).await?;

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
    // Synced means the Envoy holds it: proxy-config --diff agrees, resource by resource.
    for node in ["vm-a", "vm-b"] {
        let (code, text) = ctl.run(true, &["proxy-config", node, "--diff"])?;
        assert_eq!(code, 0, "{node}: {text}");
        assert!(
            text.contains(&format!("{node}: Envoy holds what discovery sends (delta)")),
            "{text}"
        );
    }

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

/// Every `*.key` file under `dir` (the agent's private keys), as text.
fn private_keys(dir: &std::path::Path) -> Vec<String> {
    let mut keys = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "key") {
                keys.extend(std::fs::read_to_string(&path).ok());
            }
        }
    }
    keys
}

/// The base64 body of a PEM block (what Envoy would print of it), without line breaks.
fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_config_shows_what_envoy_holds_and_how_it_differs() -> Result<()> {
    let (mesh, reviews) = two_hosts(MeshOptions {
        xds: "sotw",
        secure: true,
        ..MeshOptions::default()
    })
    .await?;
    let ctl = Ctl::of(&mesh);

    // Without the token: refused.
    let (code, text) = ctl.run(false, &["proxy-config", "vm-a"])?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("Bearer"), "{text}");

    // vm-a's Envoy, as its admin port would show it: the cluster for reviews, and the mesh
    // listeners, through discovery (the test never asks vm-a's admin port).
    let listing = wait_for("proxy-config vm-a lists reviews", READY, || async {
        let (code, table) = ctl.status(&["proxy-config", "vm-a"]).await?;
        let has = |kind: &str, name: &str| {
            table.lines().any(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells.first() == Some(&kind) && cells.get(1).is_some_and(|n| n.contains(name))
            })
        };
        Ok(
            (code == 0 && has("clusters", "reviews") && has("listeners", "") && has("secrets", ""))
                .then_some(table),
        )
    })
    .await;
    let table = match listing {
        Ok(t) => t,
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    };
    assert!(table.starts_with("TYPE"), "{table}");
    assert!(
        table.lines().any(|l| l.contains("active")),
        "dynamic resources are active: {table}"
    );

    // The JSON dump of one type is Envoy's own config dump, cut to that section.
    let (code, json) = ctl.run(
        true,
        &["proxy-config", "vm-a", "clusters", "--output", "json"],
    )?;
    assert_eq!(code, 0, "{json}");
    let dump: Value = serde_json::from_str(&json)?;
    let configs = dump["configs"].as_array().expect("configs");
    assert_eq!(configs.len(), 1, "{json}");
    assert_eq!(
        configs[0]["@type"],
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"
    );
    assert!(json.contains("reviews"));

    // Secrets: the certificates are there, no private key ever leaves the host.
    let (code, json) = ctl.run(
        true,
        &["proxy-config", "vm-a", "secrets", "--output", "json"],
    )?;
    assert_eq!(code, 0, "{json}");
    assert!(json.contains("dynamic_active_secrets"), "{json}");
    let keys = private_keys(&mesh.host("vm-a").dir);
    assert!(
        !keys.is_empty(),
        "the agent keeps its keys under its state dir"
    );
    let compact: String = json.split_whitespace().collect();
    for key in &keys {
        let body = pem_body(key);
        assert!(
            !compact.contains(&body[..64.min(body.len())]),
            "a private key left the host"
        );
    }

    // In sync: --diff says so and exits 0.
    let synced = wait_for("proxy-config --diff: in sync", PATIENCE, || async {
        let (code, text) = ctl.status(&["proxy-config", "vm-b", "--diff"]).await?;
        Ok((code == 0).then_some((code, text)))
    })
    .await;
    let (code, text) = match synced {
        Ok(found) => found,
        Err(e) => bail!(
            "{e:#}: {:?}",
            ctl.run(true, &["proxy-config", "vm-b", "--diff"])?
        ),
    };
    assert!(
        text.contains("holds what discovery sends (sotw)"),
        "{code} {text}"
    );

    // vm-b's Envoy refuses a gateway listener on its own admin port: --diff names it with
    // Envoy's reason and exits 2; the JSON form says the same.
    let admin = mesh.host("vm-b").admin.to_string();
    mesh.write_registry("services.toml", &services(&mesh, reviews, Some(&admin)))?;
    let refused = wait_for(
        "proxy-config --diff: the refused gateway",
        PATIENCE,
        || async {
            let (code, text) = ctl
                .status(&["proxy-config", "vm-b", "listeners", "--diff"])
                .await?;
            Ok((code == 2 && text.contains("is refused: ")).then_some(text))
        },
    )
    .await;
    let text = match refused {
        Ok(text) => text,
        Err(e) => bail!(
            "{e:#}: {:?}",
            ctl.run(true, &["proxy-config", "vm-b", "listeners", "--diff"])?
        ),
    };
    assert!(
        text.contains("edge"),
        "the gateway's listener is named: {text}"
    );
    let (code, json) = ctl.run(
        true,
        &[
            "proxy-config",
            "vm-b",
            "listeners",
            "--diff",
            "--output",
            "json",
        ],
    )?;
    assert_eq!(code, 2, "{json}");
    let diff: Value = serde_json::from_str(&json)?;
    assert_eq!(diff["in_sync"], false);
    let refused = diff["types"]["listeners"]["not_active"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|n| n["name"].as_str().is_some_and(|n| n.contains("edge")))
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(refused["state"], "refused", "{json}");
    assert!(
        refused["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "Envoy's reason: {json}"
    );
    assert!(
        diff["types"].get("clusters").is_none(),
        "only the type asked for"
    );

    // A node with no agent connected: a clear error, exit 1.
    let (code, text) = ctl.run(true, &["proxy-config", "vm-z"])?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("vm-z has no agent connected"), "{text}");
    Ok(())
}
