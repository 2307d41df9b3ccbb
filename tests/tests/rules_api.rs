//! The rules API end to end: a canary moved from 1% to 50% through the API changes live
//! traffic, survives a discovery restart, refuses stale and invalid writes, and needs its token.

use std::time::Duration;

use anyhow::{bail, Result};
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::rules::{api, canary, split};
use pilotfish_tests::{blocking, http_request, wait_for};

const READY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_through_the_rules_api() -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        discovery_extra: "[api]\ntoken_file = \"api-token\"\n".into(),
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    let (b, c) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", b, &[])?;
    let v2 = mesh.start_app("reviews", "v2", c, &[])?;
    let (b_mesh, c_mesh) = (mesh.host("vm-b").mesh_port, mesh.host("vm-c").mesh_port);
    mesh.write_registry(
        "services.toml",
        &format!(
            "[services.reviews]\nport = 9080\n\n[[services.reviews.instances]]\nnode = \"vm-b\"\naddress = \"{b}\"\nport = {v1}\nmesh_port = {b_mesh}\nlabels = {{ version = \"v1\" }}\n\n\
             [[services.reviews.instances]]\nnode = \"vm-c\"\naddress = \"{c}\"\nport = {v2}\nmesh_port = {c_mesh}\nlabels = {{ version = \"v2\" }}\n\n\
             [policies.reviews]\nsubsets = {{ v1 = {{ version = \"v1\" }}, v2 = {{ version = \"v2\" }} }}\n"
        ),
    )?;
    mesh.wait_all_ready(READY).await?;
    let http = mesh.http;
    let out = mesh.host("vm-a").outbound;

    // Without the token: refused.
    let anon = blocking(move || {
        http_request(
            http,
            "PUT",
            "discovery",
            "/v1/routes/reviews",
            &[],
            &canary(1),
        )
    })
    .await?;
    assert_eq!(anon.status, 401, "{}", anon.body);

    // Create the 1% canary.
    let created = api(http, "PUT", "/v1/routes/reviews", vec![], canary(1)).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let v_created = created.header("etag").unwrap_or_default().to_string();
    wait_for("the 1% canary in force", READY, || async move {
        let seen = split(out, 100).await;
        Ok((seen.get("reviews-v1").copied().unwrap_or(0) >= 95).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;

    // Move it to 50% with the version just read.
    let moved = api(
        http,
        "PUT",
        "/v1/routes/reviews",
        vec![("If-Match", v_created.clone())],
        canary(50),
    )
    .await?;
    assert_eq!(moved.status, 200, "{}", moved.body);
    wait_for(
        "50/50 in live traffic",
        Duration::from_secs(5),
        || async move {
            let seen = split(out, 200).await;
            let v2 = seen.get("reviews-v2").copied().unwrap_or(0);
            Ok((60..=140).contains(&v2).then_some(()))
        },
    )
    .await?;

    // A write with the old version is stale: 409, nothing changes.
    let stale = api(
        http,
        "PUT",
        "/v1/routes/reviews",
        vec![("If-Match", v_created)],
        canary(0),
    )
    .await?;
    assert_eq!(stale.status, 409, "{}", stale.body);
    // An invalid rule: 400 with the errors, nothing changes.
    let invalid = api(
        http,
        "PUT",
        "/v1/routes/reviews",
        vec![(
            "If-Match",
            moved.header("etag").unwrap_or_default().to_string(),
        )],
        r#"{"rules":[{"to":[{"subset":"v9"}]}]}"#.to_string(),
    )
    .await?;
    assert_eq!(invalid.status, 400, "{}", invalid.body);
    assert!(invalid.body.contains("v9"), "{}", invalid.body);

    // The change was persisted as TOML and survives a restart of discovery.
    let file = mesh.path("state/rules.d/routes-reviews.toml");
    let text = std::fs::read_to_string(&file)?;
    assert!(text.contains("weight = 50"), "{text}");
    mesh.discovery.restart()?;
    let got = wait_for("discovery back with the route", READY, || async move {
        Ok(
            api(http, "GET", "/v1/routes/reviews", vec![], String::new())
                .await
                .ok()
                .filter(|r| r.status == 200),
        )
    })
    .await?;
    assert!(got.body.contains("\"weight\":50"), "{}", got.body);
    let seen = split(out, 200).await;
    let v2 = seen.get("reviews-v2").copied().unwrap_or(0);
    if !(60..=140).contains(&v2) {
        bail!("after restart the split is still 50/50: {seen:?}");
    }
    Ok(())
}
