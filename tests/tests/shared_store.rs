//! Two discovery replicas over `[store.consul]` (the Consul double's KV store), each on its own
//! intermediate: join tokens made through one enrol hosts through the other, a rules-API write
//! to one moves live traffic at hosts connected to the other within a second, and two writes
//! with the same `If-Match` on both replicas cannot both win.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pilotfish_consul_double::ConsulDouble;
use pilotfish_tests::mesh::{Mesh, MeshOptions, API_TOKEN};
use pilotfish_tests::replica::{discovery_cmd, intermediate_for, root_keeper, Replica};
use pilotfish_tests::{blocking, http_request, wait_for, Response};

const READY: Duration = Duration::from_secs(30);

async fn api(
    http: SocketAddr,
    method: &'static str,
    if_match: Option<String>,
    body: String,
) -> Result<Response> {
    blocking(move || {
        let auth = format!("Bearer {API_TOKEN}");
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        if let Some(v) = &if_match {
            headers.push(("If-Match", v.as_str()));
        }
        http_request(
            http,
            method,
            "discovery",
            "/v1/routes/reviews",
            &headers,
            &body,
        )
    })
    .await
}

fn canary(v2: u32) -> String {
    format!(
        r#"{{"rules":[{{"to":[{{"subset":"v1","weight":{}}},{{"subset":"v2","weight":{v2}}}]}}]}}"#,
        100 - v2
    )
}

/// Who served each of `n` calls through `out`.
async fn split(out: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    blocking(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let who = match http_request(out, "GET", "reviews", "/", &[], "") {
                Ok(r) if r.status == 200 => r.header("x-served-by").unwrap_or("?").to_string(),
                Ok(r) => format!("HTTP {}", r.status),
                Err(_) => "error".into(),
            };
            *seen.entry(who).or_insert(0) += 1;
        }
        seen
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_tokens_and_rules_through_consul_kv() -> Result<()> {
    let double = ConsulDouble::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    let keeper = tempfile::tempdir()?;
    let (keeper_config, _root) = root_keeper(keeper.path())?;
    let (a_dir, b_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (a_cert, a_key) = intermediate_for(&keeper_config, a_dir.path(), "replica-a")?;
    let (b_cert, b_key) = intermediate_for(&keeper_config, b_dir.path(), "replica-b")?;
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        discovery_extra: format!(
            "[ca]\ncert_file = \"{a_cert}\"\nkey_file = \"{a_key}\"\n\
             [api]\ntoken_file = \"api-token\"\n\
             [store.consul]\naddress = \"{}\"\n",
            double.url()
        ),
        ..MeshOptions::default()
    })?;
    let b = Replica::start(&mesh, "b", &[(&a_cert, &b_cert), (&a_key, &b_key)])?;

    // Every host's join token is made through replica A (`token create` with A's config);
    // every host enrols and gets its config through replica B.
    let grpc_a = mesh.grpc;
    mesh.grpc = b.grpc;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    mesh.grpc = grpc_a;
    let (vb, vc) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", vb, &[])?;
    let v2 = mesh.start_app("reviews", "v2", vc, &[])?;
    let (b_mesh, c_mesh) = (mesh.host("vm-b").mesh_port, mesh.host("vm-c").mesh_port);
    mesh.write_registry(
        "services.toml",
        &format!(
            "[services.reviews]\nport = 9080\n\n[[services.reviews.instances]]\nnode = \"vm-b\"\naddress = \"{vb}\"\nport = {v1}\nmesh_port = {b_mesh}\nlabels = {{ version = \"v1\" }}\n\n\
             [[services.reviews.instances]]\nnode = \"vm-c\"\naddress = \"{vc}\"\nport = {v2}\nmesh_port = {c_mesh}\nlabels = {{ version = \"v2\" }}\n\n\
             [policies.reviews]\nsubsets = {{ v1 = {{ version = \"v1\" }}, v2 = {{ version = \"v2\" }} }}\n\
             [services.productpage]\nport = 9090\n"
        ),
    )?;
    if let Err(e) = mesh.wait_all_ready(READY).await {
        bail!("{e:#}\n{}\n{}", mesh.logs(), b.log_text());
    }
    // Each token was used once, and both replicas say so.
    for config in [&mesh.config, &b.config] {
        let out = std::process::Command::new(pilotfish_tests::binary("pilotfish-discovery")?)
            .arg("--config")
            .arg(config)
            .args(["token", "list"])
            .output()?;
        let list = String::from_utf8_lossy(&out.stdout);
        for node in ["vm-a", "vm-b", "vm-c"] {
            assert!(
                list.lines().any(|l| l.contains(node) && l.contains("used")),
                "{node} used, per {}:\n{list}",
                config.display()
            );
        }
    }

    // A canary written through A: hosts on B follow within a second.
    let out = mesh.host("vm-a").outbound;
    let all_v1 = api(mesh.http, "PUT", None, canary(0)).await?;
    assert_eq!(all_v1.status, 201, "{}", all_v1.body);
    wait_for("all traffic on v1", READY, || async move {
        let seen = split(out, 20).await;
        Ok((seen.get("reviews-v1") == Some(&20)).then_some(()))
    })
    .await?;
    let version = all_v1.header("etag").unwrap_or_default().to_string();
    let written = Instant::now();
    let moved = api(mesh.http, "PUT", Some(version), canary(100)).await?;
    assert_eq!(moved.status, 200, "{}", moved.body);
    let shifted = wait_for(
        "all traffic on v2 at a host of replica B",
        Duration::from_secs(5),
        || async move {
            let seen = split(out, 5).await;
            Ok((seen.get("reviews-v2") == Some(&5)).then(|| written.elapsed()))
        },
    )
    .await?;
    println!("write on A -> traffic moved at a host of B in {shifted:?}");
    assert!(
        shifted < Duration::from_secs(1),
        "traffic moved after {shifted:?}\n{}",
        b.log_text()
    );

    // The same If-Match sent to both replicas at once: exactly one write wins.
    let current = api(mesh.http, "GET", None, String::new()).await?;
    let version = current.header("etag").unwrap_or_default().to_string();
    let (on_a, on_b) = tokio::join!(
        api(mesh.http, "PUT", Some(version.clone()), canary(10)),
        api(b.http, "PUT", Some(version), canary(10)),
    );
    let mut statuses = [on_a?.status, on_b?.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 409],
        "exactly one of two concurrent writes wins"
    );

    // Revocations made through one replica are enforced by the other.
    discovery_cmd(&mesh.config, &["node", "revoke", "vm-c"])?;
    let list = blocking({
        let config = b.config.clone();
        move || {
            std::process::Command::new(pilotfish_tests::binary("pilotfish-discovery")?)
                .arg("--config")
                .arg(&config)
                .args(["node", "list"])
                .output()
                .map_err(anyhow::Error::from)
        }
    })
    .await?;
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.lines()
            .any(|l| l.starts_with("vm-c") && l.contains("revoked")),
        "{list}"
    );
    Ok(())
}
