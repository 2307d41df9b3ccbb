//! Three discovery replicas over `[store.consul]` (the Consul double's KV store), each on its own
//! intermediate: join tokens made through one enrol hosts through another, a rules-API write
//! to one moves live traffic at hosts connected to another within a second, of three writes
//! with the same `If-Match` (one per replica) exactly one wins, a revocation keeps hosts of
//! different replicas talking (shared CRLs), and without Consul traffic goes on while writes
//! are refused with a reason.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pilotfish_consul_double::ConsulDouble;
use pilotfish_tests::leaving::flowing;
use pilotfish_tests::load::Load;
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::replica::{discovery_cmd, intermediate_for, root_keeper, Replica};
use pilotfish_tests::rules::{api, canary, split};
use pilotfish_tests::{blocking, wait_for};

const READY: Duration = Duration::from_secs(30);

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
    // A third replica takes part in the concurrent writes, on its own intermediate too.
    let c_dir = tempfile::tempdir()?;
    let (c_cert, c_key) = intermediate_for(&keeper_config, c_dir.path(), "replica-c")?;
    let c = Replica::start(&mesh, "c", &[(&a_cert, &c_cert), (&a_key, &c_key)])?;

    // vm-b's and vm-c's join tokens are made through replica A (`token create` with A's
    // config), and they enrol and get their config through replica B; vm-a the other way
    // round. So vm-a's certificates come from A's intermediate, the others' from B's.
    let (grpc_a, config_a) = (mesh.grpc, mesh.config.clone());
    (mesh.grpc, mesh.config) = (grpc_a, b.config.clone());
    mesh.add_host("vm-a", 2)?;
    (mesh.grpc, mesh.config) = (b.grpc, config_a);
    for (node, i) in [("vm-b", 3), ("vm-c", 4)] {
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
    // Every replica mirrors the store, and says so.
    for http in [mesh.http, b.http, c.http] {
        let status =
            blocking(move || pilotfish_tests::http_get(http, "discovery", "/status")).await?;
        let json: serde_json::Value = serde_json::from_str(&status.body)?;
        assert_eq!(json["store"]["up"], true, "{}", status.body);
        assert!(
            json["store"]["applied_index"].as_u64() > Some(0),
            "{}",
            status.body
        );
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
    let all_v1 = api(mesh.http, "PUT", "/v1/routes/reviews", vec![], canary(0)).await?;
    assert_eq!(all_v1.status, 201, "{}", all_v1.body);
    wait_for("all traffic on v1", READY, || async move {
        let seen = split(out, 20).await;
        Ok((seen.get("reviews-v1") == Some(&20)).then_some(()))
    })
    .await?;
    let version = all_v1.header("etag").unwrap_or_default().to_string();
    let written = Instant::now();
    let moved = api(
        mesh.http,
        "PUT",
        "/v1/routes/reviews",
        vec![("If-Match", version)],
        canary(100),
    )
    .await?;
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

    // The same If-Match sent to the three replicas at once: exactly one write wins.
    let current = api(
        mesh.http,
        "GET",
        "/v1/routes/reviews",
        vec![],
        String::new(),
    )
    .await?;
    let version = current.header("etag").unwrap_or_default().to_string();
    let put = |http| {
        api(
            http,
            "PUT",
            "/v1/routes/reviews",
            vec![("If-Match", version.clone())],
            canary(10),
        )
    };
    let (on_a, on_b, on_c) = tokio::join!(put(mesh.http), put(b.http), put(c.http));
    let mut statuses = [on_a?.status, on_b?.status, on_c?.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 409, 409],
        "exactly one of three concurrent writes wins"
    );

    // Revoking vm-c through A, under load from vm-a (A's certificates) to vm-b (B's): each
    // replica signs a CRL for its own certificates and serves the other's beside it, so vm-b,
    // which now holds CRLs, still accepts vm-a's certificate. Not one request fails.
    // A may not mirror the concurrent round's winner (on B or C) yet: read and write again
    // on 409, as the API asks a client to.
    let to_v1 = wait_for("the write to v1 on A", READY, || async {
        let current = api(
            mesh.http,
            "GET",
            "/v1/routes/reviews",
            vec![],
            String::new(),
        )
        .await?;
        let version = current.header("etag").unwrap_or_default().to_string();
        let r = api(
            mesh.http,
            "PUT",
            "/v1/routes/reviews",
            vec![("If-Match", version)],
            canary(0),
        )
        .await?;
        Ok((r.status != 409).then_some(r))
    })
    .await?;
    assert_eq!(to_v1.status, 200, "{}", to_v1.body);
    wait_for("all traffic on v1 (vm-b)", READY, || async move {
        let seen = split(out, 20).await;
        Ok((seen.get("reviews-v1") == Some(&20)).then_some(()))
    })
    .await?;
    let load = Load::start(out, "reviews", &[&[], &[]]);
    discovery_cmd(&mesh.config, &["node", "revoke", "vm-c"])?;
    let crl_file = mesh.path("vm-b").join("state").join("crl.pem");
    let crls = wait_for("the three replicas' CRLs at vm-b", READY, || {
        let crl_file = crl_file.clone();
        async move {
            let pem = std::fs::read_to_string(&crl_file).unwrap_or_default();
            Ok((pem.matches("BEGIN X509 CRL").count() == 3).then_some(pem))
        }
    })
    .await;
    if let Err(e) = crls {
        bail!(
            "{e:#}
{}
{}",
            mesh.logs(),
            b.log_text()
        );
    }
    // Traffic keeps flowing with the CRLs in force, and the CRLs stay put: no replica
    // re-signs its own because another's changed (which would go round for ever).
    let crl_writes = double.stats().requests_to("/v1/kv/pilotfish/crls/");
    assert!(
        crl_writes >= 3,
        "each replica shared its CRL ({crl_writes} writes)"
    );
    let before = load.total();
    wait_for("1000 more requests with the CRLs in force", READY, || {
        let total = load.total();
        async move { Ok((total > before + 1000).then_some(())) }
    })
    .await?;
    assert_eq!(
        double.stats().requests_to("/v1/kv/pilotfish/crls/"),
        crl_writes,
        "CRLs were written again while nothing changed"
    );
    let tally = load.stop().await;
    assert_eq!(
        tally.failed,
        0,
        "{} of {} requests failed: {:?}",
        tally.failed,
        tally.total(),
        &tally.failures
    );
    println!(
        "revocation under load: {} requests, 0 failed",
        tally.total()
    );
    // Connections opened before the CRLs arrived are not checked again: a host that joins
    // now, with a certificate from A, opens new ones to vm-b (whose CRLs are in force).
    mesh.add_host("vm-d", 5)?;
    mesh.host("vm-d").wait_ready(READY).await?;
    let out_d = mesh.host("vm-d").outbound;
    let fresh = wait_for(
        "vm-d (A's certificate) reaches vm-b (B's CRLs)",
        READY,
        || async move {
            let seen = split(out_d, 20).await;
            Ok((seen.get("reviews-v1") == Some(&20)).then_some(seen))
        },
    )
    .await;
    if let Err(e) = fresh {
        let seen = split(out_d, 5).await;
        bail!("{e:#}: {seen:?}\n{}", mesh.logs());
    }
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

    // Consul goes away: traffic goes on as configured, writes are refused with a reason that
    // names the store, reads are served from each replica's copy.
    let load = Load::start(out_d, "reviews", &[&[], &[]]);
    flowing(&load, 200).await?;
    double.shutdown().await;
    let refused = api(mesh.http, "PUT", "/v1/routes/reviews", vec![], canary(50)).await?;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused
            .body
            .contains("the shared store (Consul KV pilotfish/rules/routes-reviews at")
            && refused.body.contains("writes need it"),
        "{}",
        refused.body
    );
    let read = api(b.http, "GET", "/v1/routes/reviews", vec![], String::new()).await?;
    assert_eq!(read.status, 200, "{}", read.body);
    flowing(&load, 500).await?;
    let tally = load.stop().await;
    assert_eq!(
        tally.failed,
        0,
        "{} of {} requests failed with Consul gone: {:?}",
        tally.failed,
        tally.total(),
        &tally.failures
    );
    println!("Consul gone: {} requests, 0 failed", tally.total());
    Ok(())
}
