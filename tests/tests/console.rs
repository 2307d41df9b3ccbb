//! The web console (issue 10), driven in a real headless Chromium against a real mesh: the page
//! lists the services, routes and proxies; a weight change made in the page (through
//! `?set=`, the same code path as its Apply button) moves real traffic; a route declared in an
//! operator's file answers 409, which the page shows; a wrong token brings the token form
//! back; a broken registry file is listed with `file:line:column`. It ends with a screenshot, which
//! `PILOTFISH_UPDATE_SCREENSHOT=1` saves as the README's `docs/console.png`.
//!
//! Chromium is Debian's `chromium` package, installed here when missing (`apt-get`; the test
//! fails, never passes, when that is impossible).
//! Run: `cargo build --workspace --bins && cargo test -p pilotfish-tests --test console`
//! (`PILOTFISH_UPDATE_SCREENSHOT=1 cargo test ...` to refresh the README's screenshot).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pilotfish_tests::mesh::{Mesh, MeshOptions, API_TOKEN};
use pilotfish_tests::{blocking, ensure_debian_tool, http_request, wait_for, workspace_root};
use serde_json::Value;

const READY: Duration = Duration::from_secs(30);
const PATIENCE: Duration = Duration::from_secs(15);
/// A whole Chromium run, start to exit.
const BROWSER: Duration = Duration::from_secs(60);

/// Headless Chromium opening `url` with its own profile; `extra` picks what it does
/// (`--dump-dom`, `--screenshot=...`). Scripts run for up to 5 s of virtual time, which does
/// not pass while the page's requests are pending. Returns stdout (the DOM for `--dump-dom`).
fn chromium(browser: &Path, url: &str, extra: &[&str]) -> Result<String> {
    let profile = tempfile::Builder::new()
        .prefix("pilotfish-chromium-")
        .tempdir()?;
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", browser.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout));
    let end = Instant::now() + BROWSER;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish {url} within {BROWSER:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = reader
        .join()
        .map_err(|_| anyhow::anyhow!("stdout reader panicked"))??;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            use std::io::Read;
            let _ = stderr.read_to_string(&mut err);
        }
        bail!("chromium {url}: {status}\n{err}");
    }
    Ok(dom)
}

async fn dump_dom(browser: &Path, url: String) -> Result<String> {
    let browser = browser.to_path_buf();
    blocking(move || chromium(&browser, &url, &["--dump-dom"])).await
}

/// productpage on vm-a (with an operator-declared split of its own), reviews v1 on vm-b and v2
/// on vm-c; reviews' subsets are declared here, its route is written through the rules API.
fn registry(mesh: &Mesh, v1: u16, v2: u16) -> String {
    mesh.service_toml("productpage", "", &[("vm-a", 9080, "version = \"a\"")])
        + &mesh.service_toml(
            "reviews",
            "",
            &[
                ("vm-b", v1, "version = \"v1\""),
                ("vm-c", v2, "version = \"v2\""),
            ],
        )
        + r#"[policies.reviews]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }

[policies.productpage]
subsets = { a = { version = "a" }, b = { version = "a" } }

[routes.productpage]
[[routes.productpage.rules]]
to = [{ subset = "a", weight = 50 }, { subset = "b", weight = 50 }]
"#
}

/// A rules-API call with the token.
async fn api(mesh: &Mesh, method: &'static str, path: &str, body: &str) -> Result<(u16, Value)> {
    let (http, path, body) = (mesh.http, path.to_string(), body.to_string());
    blocking(move || {
        let auth = format!("Bearer {API_TOKEN}");
        let headers = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
            ("If-None-Match", "*"),
        ];
        let headers = if method == "PUT" {
            &headers[..]
        } else {
            &headers[..1]
        };
        let r = http_request(http, method, "discovery", &path, headers, &body)?;
        Ok((
            r.status,
            serde_json::from_str(&r.body).unwrap_or(Value::Null),
        ))
    })
    .await
}

/// Who answers one call to reviews through vm-a's outbound listener.
async fn who(mesh: &Mesh) -> Result<String> {
    let out = mesh.host("vm-a").outbound;
    blocking(move || {
        let r = http_request(out, "GET", "reviews", "/reviews/1", &[], "")?;
        if r.status != 200 {
            bail!("status {}: {}", r.status, r.body);
        }
        Ok(r.header("x-served-by").unwrap_or("?").to_string())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_lists_the_mesh_and_moves_real_traffic() -> Result<()> {
    let browser = blocking(|| ensure_debian_tool("chromium", "chromium")).await?;
    let mut mesh = Mesh::start_opts(MeshOptions {
        discovery_extra: "[api]\ntoken_file = \"api-token\"\n".into(),
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    let v1 = mesh.start_app("reviews", "v1", mesh.host("vm-b").ip, &[])?;
    let v2 = mesh.start_app("reviews", "v2", mesh.host("vm-c").ip, &[])?;
    mesh.write_registry("services.toml", &registry(&mesh, v1, v2))?;
    let canary = r#"{"rules":[{"to":[{"subset":"v1","weight":50},{"subset":"v2","weight":50}]}]}"#;
    let created = wait_for("reviews' route created", PATIENCE, || async {
        let (status, body) = api(&mesh, "PUT", "/v1/routes/reviews", canary).await?;
        // 400 until discovery has read the registry file that declares the subsets.
        Ok((status == 201).then_some(body))
    })
    .await?;
    assert_eq!(created["managed"], true, "{created}");
    mesh.wait_all_ready(READY).await?;
    if let Err(e) = wait_for("both versions answer through vm-a", READY, || async {
        let (a, b) = (who(&mesh).await?, who(&mesh).await?);
        Ok((a.starts_with("reviews-") && b.starts_with("reviews-")).then_some(()))
    })
    .await
    {
        bail!("{e:#}\n{}", mesh.logs());
    }

    // /v1/services: the token rule of rules-API reads, then services with their instances.
    let http = mesh.http;
    let anonymous =
        blocking(move || http_request(http, "GET", "d", "/v1/services", &[], "")).await?;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    let (status, services) = api(&mesh, "GET", "/v1/services", "").await?;
    assert_eq!(status, 200, "{services}");
    let reviews = services["items"]
        .as_array()
        .and_then(|items| items.iter().find(|s| s["name"] == "reviews"))
        .context("reviews listed")?;
    assert!(
        reviews["origin"]
            .as_str()
            .is_some_and(|o| o.contains("services.toml:")),
        "{reviews}"
    );
    assert_eq!(reviews["instances"][0]["node"], "vm-b");
    assert_eq!(reviews["instances"][0]["labels"]["version"], "v1");

    // Without a token the page asks for one.
    let base = format!("http://{}/ui/", mesh.http);
    let dom = dump_dom(&browser, base.clone()).await?;
    assert!(
        dom.contains("<form id=\"login\">"),
        "the token form is shown:\n{dom}"
    );

    // A wrong token: the page says why and asks again.
    let dom = dump_dom(&browser, format!("{base}?token=wrong")).await?;
    assert!(
        dom.contains("<form id=\"login\">") && dom.contains("not valid"),
        "a 401 asks for the token again:\n{dom}"
    );

    // With `?token=`: services with instances, routes with their split, proxies.
    let page = wait_for("the console lists the mesh", PATIENCE, || async {
        let dom = dump_dom(&browser, format!("{base}?token={API_TOKEN}")).await?;
        let complete = [
            "data-service=\"reviews\"",
            "data-service=\"productpage\"",
            "data-route=\"reviews\"",
            "data-proxy=\"vm-a\"",
            "data-proxy=\"vm-c\"",
        ]
        .iter()
        .all(|n| dom.contains(n));
        Ok(complete.then_some(dom))
    })
    .await?;
    for needle in [
        "healthy",
        "version=v2",
        "synced",
        "written by the rules API",
        "Every registry file is in force.",
    ] {
        assert!(page.contains(needle), "missing {needle:?} in:\n{page}");
    }
    assert!(
        !page.contains("<form id=\"login\">"),
        "no token form:\n{page}"
    );

    // A route declared in an operator's file: the API refuses with 409, and the page says so.
    let dom = dump_dom(
        &browser,
        format!("{base}?token={API_TOKEN}&set=productpage:0,100"),
    )
    .await?;
    assert!(
        dom.contains("data-ok=\"false\"") && dom.contains("409"),
        "the 409 is shown:\n{dom}"
    );
    assert!(dom.contains("services.toml"), "409 names the file:\n{dom}");

    // The weight change made in the page moves real traffic: everything to v2.
    let dom = dump_dom(
        &browser,
        format!("{base}?token={API_TOKEN}&set=reviews:0,100"),
    )
    .await?;
    assert!(
        dom.contains("data-ok=\"true\"") && dom.contains("applied v1=0 v2=100"),
        "the change is applied:\n{dom}"
    );
    let (_, route) = api(&mesh, "GET", "/v1/routes/reviews", "").await?;
    assert_eq!(route["spec"]["rules"][0]["to"][1]["weight"], 100, "{route}");
    wait_for("all traffic reaches v2", PATIENCE, || async {
        for _ in 0..20 {
            if who(&mesh).await? != "reviews-v2" {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;

    // A broken registry file is listed with file:line:column while its last good version
    // stays in force.
    mesh.write_registry("broken.toml", "[services.web]\nport = \"eighty\"\n")?;
    let dom = wait_for("the page lists the refused file", PATIENCE, || async {
        let dom = dump_dom(&browser, format!("{base}?token={API_TOKEN}")).await?;
        Ok(dom.contains("broken.toml:2:").then_some(dom))
    })
    .await?;
    assert!(dom.contains("refused: "), "{dom}");

    // A screenshot of the console as it is now; `PILOTFISH_UPDATE_SCREENSHOT=1` makes it the
    // README's (docs/console.png), so that ordinary runs leave the checkout clean.
    let shot = if std::env::var_os("PILOTFISH_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        workspace_root().join("docs").join("console.png")
    } else {
        mesh.path("console.png")
    };
    let url = format!("{base}?token={API_TOKEN}");
    let arg = format!("--screenshot={}", shot.display());
    let b = browser.clone();
    blocking(move || {
        chromium(
            &b,
            &url,
            &[&arg, "--window-size=1280,1300", "--hide-scrollbars"],
        )
    })
    .await?;
    let png = std::fs::read(&shot).with_context(|| format!("reading {}", shot.display()))?;
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
    Ok(())
}
