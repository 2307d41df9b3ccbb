//! The Pilotfish demo: a whole mesh on this machine, from the configs in `examples/demo`.
//!
//! Discovery on 127.0.0.1, three simulated hosts (vm-a, vm-b, vm-c on 127.0.0.2-4, each an agent
//! with its own Envoy), reviews v1 on vm-b and v2 on vm-c. It sends traffic from vm-a through the
//! mesh, prints the split, edits the routes TOML while everything runs, and shows the new split.
//!
//! `pilotfish-demo [--keep-running]` (scripts/demo.sh builds and runs it).

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pilotfish_tests::mesh::wait_port;
use pilotfish_tests::{
    binary, blocking, envoy_binary, http_request, prepare_demo, wait_for, workspace_root, Process,
};

const OUTBOUND_A: &str = "127.0.0.2:15001";

async fn split(
    outbound: SocketAddr,
    n: usize,
    headers: &[(&'static str, &'static str)],
) -> BTreeMap<String, usize> {
    let headers = headers.to_vec();
    blocking(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let who = match http_request(outbound, "GET", "reviews", "/reviews/1", &headers, "") {
                Ok(r) if r.status == 200 => r.header("x-served-by").unwrap_or("?").to_string(),
                Ok(r) => format!("HTTP {}", r.status),
                Err(_) => "connection error".to_string(),
            };
            *seen.entry(who).or_insert(0) += 1;
        }
        seen
    })
    .await
}

fn show(title: &str, seen: &BTreeMap<String, usize>) {
    let total: usize = seen.values().sum();
    println!("\n{title}");
    for (who, n) in seen {
        let pct = 100.0 * *n as f64 / total.max(1) as f64;
        let bar = "#".repeat((pct / 2.0).round() as usize);
        println!("  {who:<12} {n:>4}  {pct:5.1}%  {bar}");
    }
}

fn set_weights(routes: &Path, v1: u32, v2: u32) -> Result<()> {
    let text = fs::read_to_string(routes)?;
    let old = text
        .lines()
        .find(|l| l.contains("subset = \"v1\", weight"))
        .context("weighted rule in routes file")?;
    let new = format!(
        "to = [{{ subset = \"v1\", weight = {v1} }}, {{ subset = \"v2\", weight = {v2} }}]"
    );
    // Write a new file and rename it over the old one, as editors do: discovery never sees a
    // half-written file.
    let tmp = routes.with_extension("toml.tmp");
    fs::write(&tmp, text.replace(old, &new))?;
    fs::rename(&tmp, routes)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    if pilotfish_tests::help_or_version(
        "pilotfish-demo",
        "pilotfish-demo [--keep-running]\n\n\
         Runs discovery, three hosts (agent + Envoy) and sample apps on loopback addresses, \
         moves a canary's weights under traffic, and stops (or keeps running).\n\
         PILOTFISH_DEMO_DIR: work directory (default .demo).",
    ) {
        return Ok(());
    }
    let keep_running = std::env::args().any(|a| a == "--keep-running");
    let root = workspace_root();
    let work: PathBuf = std::env::var_os("PILOTFISH_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".demo"));
    prepare_demo(&work)?;
    let logs = work.join("logs");
    fs::create_dir_all(&logs)?;

    // The example agent configs find Envoy on PATH.
    let envoy = envoy_binary()?;
    if let Some(dir) = envoy.parent() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        std::env::set_var("PATH", std::env::join_paths(dirs)?);
    }

    println!(
        "Pilotfish demo (work dir {}, logs in {})",
        work.display(),
        logs.display()
    );
    let discovery = Process::spawn(
        "discovery",
        &binary("pilotfish-discovery")?,
        &[
            "--config",
            &work.join("discovery.toml").display().to_string(),
        ],
        logs.join("discovery.log"),
    )?;
    wait_port("127.0.0.1:15012".parse()?, Duration::from_secs(10))
        .with_context(|| format!("discovery did not start: see {}", discovery.log.display()))?;
    println!(
        "  discovery      127.0.0.1:15012 (xDS)   127.0.0.1:15014 (status, metrics, console /ui/)"
    );

    let mut apps = Vec::new();
    for (version, ip) in [("v1", "127.0.0.3"), ("v2", "127.0.0.4")] {
        let listen = format!("{ip}:9080");
        apps.push(Process::spawn(
            &format!("reviews-{version}"),
            &binary("pilotfish-sample-app")?,
            &[
                "--listen",
                &listen,
                "--name",
                "reviews",
                "--version",
                version,
            ],
            logs.join(format!("reviews-{version}.log")),
        )?);
        wait_port(listen.parse()?, Duration::from_secs(10))?;
        println!("  reviews {version}     {listen} (app)");
    }

    let mut agents = Vec::new();
    for (node, ip) in [
        ("vm-a", "127.0.0.2"),
        ("vm-b", "127.0.0.3"),
        ("vm-c", "127.0.0.4"),
    ] {
        let config = work.join("agents").join(format!("{node}.toml"));
        agents.push(Process::spawn(
            node,
            &binary("pilotfish-agent")?,
            &["--config", &config.display().to_string()],
            logs.join(format!("agent-{node}.log")),
        )?);
        println!("  agent {node}    {ip}: outbound :15001, mesh :15006, envoy admin :15000");
    }
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let admin: SocketAddr = format!("{ip}:15000").parse()?;
        wait_for(
            &format!("envoy on {ip} ready"),
            Duration::from_secs(60),
            || async move {
                Ok(
                    blocking(move || http_request(admin, "GET", "admin", "/ready", &[], ""))
                        .await
                        .ok()
                        .filter(|r| r.status == 200)
                        .map(|_| ()),
                )
            },
        )
        .await
        .with_context(|| format!("see the logs in {}", logs.display()))?;
    }
    let out: SocketAddr = OUTBOUND_A.parse()?;
    wait_for(
        "reviews reachable through vm-a",
        Duration::from_secs(30),
        || async move {
            let seen = split(out, 1, &[]).await;
            Ok(seen.keys().any(|k| k.starts_with("reviews-")).then_some(()))
        },
    )
    .await?;

    println!("\nThe mesh is up. productpage on vm-a calls reviews through its Envoy:");
    println!("  curl -H 'Host: reviews' http://{OUTBOUND_A}/reviews/1");
    let first =
        blocking(move || http_request(out, "GET", "reviews", "/reviews/1", &[], "")).await?;
    if let Some(xfcc) = first.body.split("xfcc=").nth(1) {
        println!("\nEvery hop between hosts is mutual TLS; reviews' Envoy verified the caller as:");
        println!(
            "  {}",
            xfcc.trim()
                .split(';')
                .find(|p| p.starts_with("URI="))
                .unwrap_or(xfcc.trim())
        );
    }
    let denied =
        blocking(move || http_request(out, "DELETE", "reviews", "/reviews/1", &[], "")).await?;
    println!(
        "An authorization rule lets productpage only GET /reviews/*: DELETE /reviews/1 -> HTTP {}",
        denied.status
    );

    let seen = split(out, 500, &[]).await;
    show("500 requests, routes say v1 80% / v2 20%:", &seen);
    let canary = split(out, 50, &[("x-canary", "1")]).await;
    show(
        "50 requests with header x-canary: 1 (rule: only v2):",
        &canary,
    );

    let routes = work.join("registry.d/reviews-routes.toml");
    println!(
        "\nEditing {} while traffic flows: v1 20% / v2 80% ...",
        routes.display()
    );
    let edited = Instant::now();
    set_weights(&routes, 20, 80)?;
    let took = wait_for(
        "the new weights to apply",
        Duration::from_secs(10),
        || async move {
            let seen = split(out, 100, &[]).await;
            let v2 = seen.get("reviews-v2").copied().unwrap_or(0);
            Ok((v2 >= 65).then(|| edited.elapsed()))
        },
    )
    .await?;
    println!("  applied within {:.1} s, no restart", took.as_secs_f64());
    let seen = split(out, 500, &[]).await;
    show("500 requests after the edit:", &seen);

    println!(
        "\nA broken edit (a route to an unknown subset) is refused and traffic stays as it was:"
    );
    let text = fs::read_to_string(&routes)?;
    fs::write(
        &routes,
        text.replace("subset = \"v1\", weight", "subset = \"v9\", weight"),
    )?;
    let log = logs.join("discovery.log");
    wait_for(
        "discovery to report the error",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move { Ok(fs::read_to_string(&log)?.contains("v9").then_some(())) }
        },
    )
    .await?;
    if let Some(line) = fs::read_to_string(&log)?.lines().find(|l| l.contains("v9")) {
        println!("  discovery log: {}", line.trim());
    }
    let seen = split(out, 200, &[]).await;
    show("200 requests after the broken edit:", &seen);
    fs::write(&routes, text)?;

    if seen.keys().any(|k| !k.starts_with("reviews-")) {
        bail!("some requests failed: {seen:?}");
    }
    if keep_running {
        // The demo's token is a sample (`change-me`): printing it here is the point.
        let token = fs::read_to_string(work.join("api-token"))?;
        println!(
            "\nWeb console: http://127.0.0.1:15014/ui/?token={}",
            token.trim()
        );
        println!(
            "  (reviews' route is declared in registry.d, so its canary control shows the rules \
             API's 409 naming that file;\n   routes written through the API, e.g. with \
             `pilotfish-ctl routes put`, can be moved there)"
        );
        println!("\nThe mesh keeps running; press Ctrl-C to stop it.");
        tokio::signal::ctrl_c().await?;
    }
    println!("\nStopping the mesh.");
    drop(agents);
    drop(apps);
    drop(discovery);
    Ok(())
}
