//! Zero trust between hosts, end to end: join tokens, the CA, certificates over SDS, mTLS on
//! the mesh port and authorization, with real discovery, agents and Envoy.
//!
//! Topology: productpage on vm-a and ratings on vm-d both call reviews, which runs on vm-b.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::replica::{intermediate_for, root_keeper, Replica};
use pilotfish_tests::{blocking, envoy_stat, http_request, wait_for, Response};

const READY: Duration = Duration::from_secs(30);

struct Secure {
    mesh: Mesh,
}

fn registry(mesh: &Mesh, reviews_port: u16, mtls: &str) -> String {
    let a = mesh.host("vm-a");
    let b = mesh.host("vm-b");
    let d = mesh.host("vm-d");
    format!(
        r#"[services.productpage]
port = 9080
upstreams = ["reviews"]

[[services.productpage.instances]]
node = "vm-a"
address = "{a_ip}"
port = 9080
mesh_port = {a_mesh}

[services.ratings]
port = 9080
upstreams = ["reviews"]

[[services.ratings.instances]]
node = "vm-d"
address = "{d_ip}"
port = 9080
mesh_port = {d_mesh}

[services.reviews]
port = 9080
mtls = "{mtls}"

[[services.reviews.instances]]
node = "vm-b"
address = "{b_ip}"
port = {reviews_port}
mesh_port = {b_mesh}
labels = {{ version = "v1" }}
"#,
        a_ip = a.ip,
        a_mesh = a.mesh_port,
        b_ip = b.ip,
        b_mesh = b.mesh_port,
        d_ip = d.ip,
        d_mesh = d.mesh_port,
    )
}

async fn secure_mesh(mtls: &str, discovery_extra: &str) -> Result<Secure> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        discovery_extra: discovery_extra.to_string(),
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-d", 5)] {
        mesh.add_host(node, i)?;
    }
    let b_ip = mesh.host("vm-b").ip;
    let port = mesh.start_app("reviews", "v1", b_ip, &[])?;
    mesh.write_registry("services.toml", &registry(&mesh, port, mtls))?;
    mesh.wait_all_ready(READY).await?;
    let out = mesh.host("vm-a").outbound;
    if let Err(e) = wait_for("reviews reachable over mTLS", READY, || async move {
        Ok(call(out, "GET", "/reviews/1")
            .await
            .ok()
            .filter(|r| r.status == 200))
    })
    .await
    {
        bail!("{e:#}\n{}", mesh.logs());
    }
    Ok(Secure { mesh })
}

async fn call(outbound: SocketAddr, method: &'static str, path: &'static str) -> Result<Response> {
    blocking(move || http_request(outbound, method, "reviews", path, &[], "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_hops_are_mutual_tls_with_spiffe_identities() -> Result<()> {
    let s = secure_mesh("strict", "").await?;
    let out = s.mesh.host("vm-a").outbound;
    let r = call(out, "GET", "/reviews/1").await?;
    assert_eq!(r.status, 200);
    // reviews' Envoy tells the app who called, from the verified client certificate.
    assert!(
        r.body
            .contains("URI=spiffe://pilotfish.local/service/productpage"),
        "the caller's identity reaches the app: {}",
        r.body
    );
    // The hop itself was TLS: vm-b's inbound listener counted a handshake.
    let b = s.mesh.host("vm-b");
    let admin = b.admin;
    let stats =
        blocking(move || pilotfish_tests::admin_get(admin, "/stats?filter=ssl.handshake")).await?;
    assert!(
        stats
            .lines()
            .any(|l| l.contains("ssl.handshake") && !l.ends_with(": 0")),
        "TLS handshakes on vm-b: {stats}"
    );

    // A plaintext client to the mesh port of a strict service gets nothing.
    let mesh_addr = SocketAddr::new(b.ip, b.mesh_port);
    let plain =
        blocking(move || http_request(mesh_addr, "GET", "reviews", "/reviews/1", &[], "")).await;
    assert!(
        !matches!(&plain, Ok(r) if r.status == 200),
        "strict mTLS refuses plaintext: {plain:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_accepts_plaintext_and_mtls() -> Result<()> {
    let s = secure_mesh("permissive", "").await?;
    let out = s.mesh.host("vm-a").outbound;
    let r = call(out, "GET", "/reviews/1").await?;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("service/productpage"), "{}", r.body);
    let b = s.mesh.host("vm-b");
    let mesh_addr = SocketAddr::new(b.ip, b.mesh_port);
    let plain =
        blocking(move || http_request(mesh_addr, "GET", "reviews", "/reviews/1", &[], "")).await?;
    assert_eq!(
        plain.status, 200,
        "permissive accepts plaintext: {}",
        plain.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_only_productpage_get_reviews() -> Result<()> {
    let s = secure_mesh("strict", "").await?;
    s.mesh.write_registry(
        "authz.toml",
        r#"[[authorization.reviews.rules]]
action = "allow"
from = ["productpage"]
methods = ["GET"]
paths = ["/reviews/*"]
"#,
    )?;
    let a = s.mesh.host("vm-a").outbound;
    let d = s.mesh.host("vm-d").outbound;
    wait_for(
        "the rule in force (POST denied)",
        Duration::from_secs(5),
        || async move { Ok((call(a, "POST", "/reviews/1").await?.status == 403).then_some(())) },
    )
    .await?;
    assert_eq!(
        call(a, "GET", "/reviews/1").await?.status,
        200,
        "allowed call passes"
    );
    assert_eq!(
        call(a, "GET", "/other").await?.status,
        403,
        "other path denied"
    );
    assert_eq!(
        call(d, "GET", "/reviews/1").await?.status,
        403,
        "other source denied"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_bad_token_gets_no_certificate_and_no_config() -> Result<()> {
    let mut s = secure_mesh("strict", "").await?;
    let forged = s.mesh.add_host("vm-x", 7)?;
    std::fs::write(
        forged.dir.join("token"),
        "pft1.0000000000000000.0000000000000000000000000000000000000000000000000000000000000000",
    )?;
    let _ = std::fs::remove_dir_all(forged.dir.join("state"));
    s.mesh.host_mut("vm-x").agent.restart()?;
    let mesh = &s.mesh;
    wait_for(
        "discovery refuses vm-x's token",
        Duration::from_secs(20),
        || async move {
            let log = mesh.discovery_log();
            Ok(log
                .lines()
                .any(|l| l.contains("refused enrolment") && l.contains("vm-x"))
                .then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
    let x = s.mesh.host("vm-x");
    assert!(
        !x.dir.join("state/node.pem").exists(),
        "no node certificate"
    );
    // Its Envoy runs (the agent starts it regardless) but has received no clusters.
    let admin = x.admin;
    let clusters = wait_for(
        "vm-x's envoy admin",
        Duration::from_secs(20),
        || async move {
            Ok(
                blocking(move || envoy_stat(admin, "cluster_manager.cds.update_success"))
                    .await
                    .ok(),
            )
        },
    )
    .await?;
    assert_eq!(clusters.unwrap_or(0), 0, "vm-x got no clusters");
    Ok(())
}

#[allow(dead_code)]
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Workload certificates that live seconds rotate several times while traffic flows: no
/// request fails and Envoy receives no new listeners or clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_errors_or_config_pushes() -> Result<()> {
    let s = secure_mesh("strict", "[ca]\nworkload_ttl = \"8s\"\n").await?;
    let out = s.mesh.host("vm-a").outbound;
    let (a_admin, b_admin) = (s.mesh.host("vm-a").admin, s.mesh.host("vm-b").admin);
    let stat = |admin: SocketAddr, name: &'static str| async move {
        blocking(move || envoy_stat(admin, name))
            .await
            .map(|v| v.unwrap_or(0))
    };
    let lds_before = stat(b_admin, "listener_manager.lds.update_success").await?;
    let cds_before = stat(a_admin, "cluster_manager.cds.update_success").await?;
    let sds_name = format!(
        "listener.{}_{}.server_ssl_socket_factory.ssl_context_update_by_sds",
        s.mesh.host("vm-b").ip,
        s.mesh.host("vm-b").mesh_port
    );
    let sds_before = blocking({
        let n = sds_name.clone();
        move || envoy_stat(b_admin, &n)
    })
    .await?
    .unwrap_or(0);

    let start = Instant::now();
    let (mut ok, mut failed) = (0, Vec::new());
    while start.elapsed() < Duration::from_secs(20) {
        match call(out, "GET", "/reviews/1").await {
            Ok(r) if r.status == 200 => ok += 1,
            Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let sds_after = blocking(move || envoy_stat(b_admin, &sds_name))
        .await?
        .unwrap_or(0);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        sds_after >= sds_before + 2,
        "the server certificate rotated at least twice over SDS ({sds_before} -> {sds_after})"
    );
    assert_eq!(
        stat(b_admin, "listener_manager.lds.update_success").await?,
        lds_before,
        "no LDS push"
    );
    assert_eq!(
        stat(a_admin, "cluster_manager.cds.update_success").await?,
        cds_before,
        "no CDS push"
    );
    eprintln!(
        "{ok} requests, 0 failures, {} SDS rotations",
        sds_after - sds_before
    );
    Ok(())
}

/// An agent restarted while discovery is down comes back with its stored node and workload
/// certificates (and last config): traffic to its host works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarts_during_discovery_outage_with_stored_certificates() -> Result<()> {
    let mut s = secure_mesh("strict", "").await?;
    s.mesh.discovery.kill();
    {
        let b = s.mesh.host_mut("vm-b");
        b.agent.terminate(Duration::from_secs(15));
        b.agent.restart()?;
    }
    s.mesh.host("vm-b").wait_ready(READY).await?;
    let out = s.mesh.host("vm-a").outbound;
    wait_for(
        "reviews on restarted vm-b reachable",
        Duration::from_secs(20),
        || async move {
            Ok(call(out, "GET", "/reviews/1")
                .await
                .ok()
                .filter(|r| r.status == 200))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", s.mesh.logs()))?;
    Ok(())
}

/// Three hosts with mTLS; vm-c is revoked while a and b talk to each other without pause:
/// within a few seconds vm-c's agent is cut off from discovery and neither c -> b nor b -> c
/// gets through (the peers' Envoys refuse c's certificates by the CRL), while a <-> b sees
/// no failure. `node restore` and a new join token bring vm-c back.
///
/// Envoy applies a new CRL to new handshakes only (connections already open stay up), so the
/// policies set a short `idle_timeout` and the checks are paced beyond it: each check of
/// c <-> b opens a new connection.
/// A revoked node's instances leave EDS too: b's Envoy marks vm-c's endpoint unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_host_is_cut_off_within_seconds_and_comes_back_with_a_new_token() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    let mut registry = String::new();
    for (service, node) in [("alpha", "vm-a"), ("beta", "vm-b"), ("gamma", "vm-c")] {
        let ip = mesh.host(node).ip;
        let port = mesh.start_app(service, "v1", ip, &[])?;
        registry.push_str(&format!(
            "[services.{service}]\nport = 9080\n\n[[services.{service}.instances]]\n\
             node = \"{node}\"\naddress = \"{ip}\"\nport = {port}\nmesh_port = {mesh_port}\n\n\
             [policies.{service}]\nidle_timeout = \"500ms\"\n\n",
            mesh_port = mesh.host(node).mesh_port,
        ));
    }
    mesh.write_registry("services.toml", &registry)?;
    mesh.wait_all_ready(READY).await?;
    let out = |node: &str| mesh.host(node).outbound;
    let (a, b, c) = (out("vm-a"), out("vm-b"), out("vm-c"));
    let get = |from: SocketAddr, service: &'static str| async move {
        blocking(move || http_request(from, "GET", service, "/x", &[], ""))
            .await
            .map(|r| r.status)
            .unwrap_or(0)
    };
    let all_up = || async {
        Ok((get(a, "beta").await == 200
            && get(b, "alpha").await == 200
            && get(c, "beta").await == 200
            && get(b, "gamma").await == 200)
            .then_some(()))
    };
    if let Err(e) = wait_for("every pair talks over mTLS", READY, all_up).await {
        bail!("{e:#}\n{}", mesh.logs());
    }

    // a <-> b without pause, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new((0usize, Vec::<String>::new())));
    let traffic = tokio::spawn({
        let (stop, tally) = (stop.clone(), tally.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                for (from, service) in [(a, "beta"), (b, "alpha")] {
                    let r =
                        blocking(move || http_request(from, "GET", service, "/x", &[], "")).await;
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(r) if r.status == 200 => t.0 += 1,
                        Ok(r) => t.1.push(format!("{service}: {} {}", r.status, r.body)),
                        Err(e) => t.1.push(format!("{service}: {e}")),
                    }
                }
            }
        }
    });

    let revoked_at = Instant::now();
    mesh.discovery_cli(&["node", "revoke", "vm-c"])?;
    let cut_off = wait_for(
        "vm-c cut off: c -> b and b -> c refused, its streams closed",
        Duration::from_secs(15),
        || async {
            // Pacing, not synchronisation: longer than the idle timeout, so the pooled
            // connection from before the revocation is gone and this call shakes hands anew.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let c_to_b = get(c, "beta").await;
            let b_to_c = get(b, "gamma").await;
            let closed = mesh
                .discovery_log()
                .lines()
                .any(|l| l.contains("closing the stream of a revoked node") && l.contains("vm-c"));
            Ok((c_to_b != 200 && b_to_c != 200 && closed).then_some((c_to_b, b_to_c)))
        },
    )
    .await;
    let cut_off = match cut_off {
        Ok(v) => v,
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    };
    eprintln!(
        "vm-c cut off {:?} after `node revoke` (c -> b: {}, b -> c: {})",
        revoked_at.elapsed(),
        cut_off.0,
        cut_off.1
    );
    // Its instances are out of rotation at its peers (EDS health), not only refused.
    let (b_admin, c_ip, c_mesh) = (
        mesh.host("vm-b").admin,
        mesh.host("vm-c").ip,
        mesh.host("vm-c").mesh_port,
    );
    wait_for(
        "vm-c's endpoint unhealthy at b",
        Duration::from_secs(10),
        || async move {
            let clusters =
                blocking(move || pilotfish_tests::admin_get(b_admin, "/clusters")).await?;
            let flag = format!("outbound|gamma::{c_ip}:{c_mesh}::health_flags::/failed_eds_health");
            Ok(clusters.lines().any(|l| l == flag).then_some(()))
        },
    )
    .await?;
    // The agent knows why, and discovery refuses it anything new.
    let c_host = mesh.host("vm-c");
    wait_for(
        "vm-c's agent reports the revocation",
        Duration::from_secs(10),
        || async {
            Ok(c_host
                .agent
                .log_text()
                .contains("discovery REVOKED this host")
                .then_some(()))
        },
    )
    .await?;
    let node_list = mesh.discovery_cli(&["node", "list"])?;
    let c_line = node_list
        .lines()
        .find(|l| l.starts_with("vm-c"))
        .unwrap_or("");
    assert!(c_line.contains("revoked"), "{node_list}");
    // Still refused a few seconds on (nothing re-admits it).
    for _ in 0..3 {
        assert_ne!(get(c, "beta").await, 200, "c -> b stays refused");
        assert_ne!(get(b, "gamma").await, 200, "b -> c stays refused");
    }

    // Restore + a new token: vm-c enrols again and talks again.
    let token = mesh.join_token("vm-c")?;
    std::fs::write(c_host.dir.join("token"), token)?;
    mesh.discovery_cli(&["node", "restore", "vm-c"])?;
    let back = wait_for(
        "vm-c back after restore",
        Duration::from_secs(60),
        || async {
            Ok((get(c, "beta").await == 200 && get(b, "gamma").await == 200).then_some(()))
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    traffic.await?;
    if let Err(e) = back {
        bail!("{e:#}\n{}", mesh.logs());
    }
    let (ok, failed) = tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        failed.is_empty(),
        "a <-> b: {} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "a <-> b traffic flowed throughout ({ok} requests)");
    eprintln!("a <-> b: {ok} requests, 0 failures");
    Ok(())
}

fn files_named(dir: &std::path::Path, name: &str, found: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            files_named(&path, name, found);
        } else if e.file_name() == name {
            found.push(path);
        }
    }
}

/// A replica signing with its own intermediate: the key and CSR are made without the root,
/// the root's keeper signs it, and discovery started on it issues certificates that hosts
/// trusting only the root accept, for mTLS between them and for discovery itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_signs_with_its_own_intermediate_under_the_root() -> Result<()> {
    let keeper = tempfile::tempdir()?;
    let (keeper_config, root) = root_keeper(keeper.path())?;

    let replica = tempfile::tempdir()?;
    let (cert, key) = intermediate_for(&keeper_config, replica.path(), "replica-a")?;

    let s = secure_mesh(
        "strict",
        &format!("[ca]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"),
    )
    .await?;
    // Hosts trust the root alone...
    assert_eq!(std::fs::read_to_string(&s.mesh.ca_file)?, root);
    assert!(
        !s.mesh.path("state/ca/root.key").exists(),
        "no root key on the replica"
    );
    // ...and the mTLS hop worked (secure_mesh waited for it), with the caller's identity.
    let r = call(s.mesh.host("vm-a").outbound, "GET", "/reviews/1").await?;
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .contains("URI=spiffe://pilotfish.local/service/productpage"),
        "{}",
        r.body
    );
    // The node certificate the host stored travels with the intermediate.
    let mut stored = Vec::new();
    files_named(&s.mesh.path("vm-b"), "node.pem", &mut stored);
    assert!(!stored.is_empty(), "vm-b stored its node certificate");
    let flat = |s: &str| s.replace(['\r', '\n'], "");
    let (intermediate, root) = (flat(&std::fs::read_to_string(&cert)?), flat(&root));
    let intermediate = intermediate
        .strip_suffix(&root)
        .expect("the signed file is the intermediate, then the root");
    assert!(intermediate.contains("BEGIN CERTIFICATE"));
    for path in stored {
        let chain = flat(&std::fs::read_to_string(&path)?);
        assert_eq!(
            chain.matches("BEGIN CERTIFICATE").count(),
            2,
            "{}",
            path.display()
        );
        assert!(
            chain.ends_with(intermediate),
            "{}: leaf, then intermediate",
            path.display()
        );
    }
    Ok(())
}

/// Two discoveries, each on its own intermediate of the same root: a host enrolled at one calls
/// a host enrolled at the other over mTLS, each side verifying the other against the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_enrolled_at_two_replicas_talk_over_mtls() -> Result<()> {
    let keeper = tempfile::tempdir()?;
    let (keeper_config, root) = root_keeper(keeper.path())?;
    let (a_dir, b_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (a_cert, a_key) = intermediate_for(&keeper_config, a_dir.path(), "replica-a")?;
    let (b_cert, b_key) = intermediate_for(&keeper_config, b_dir.path(), "replica-b")?;
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        discovery_extra: format!("[ca]\ncert_file = \"{a_cert}\"\nkey_file = \"{a_key}\"\n"),
        ..MeshOptions::default()
    })?;
    assert_eq!(std::fs::read_to_string(&mesh.ca_file)?, root);
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-d", 5)?;

    // Replica B: the same registry and trust domain, its own ports, state and intermediate.
    let replica_b = Replica::start(&mesh, "b", &[(&a_cert, &b_cert), (&a_key, &b_key)])?;
    let (grpc_b, config_b) = (replica_b.grpc, replica_b.config.clone());
    let (grpc_a, config_a) = (mesh.grpc, mesh.config.clone());
    (mesh.grpc, mesh.config) = (grpc_b, config_b);
    mesh.add_host("vm-b", 3)?;
    (mesh.grpc, mesh.config) = (grpc_a, config_a);

    let b_ip = mesh.host("vm-b").ip;
    let port = mesh.start_app("reviews", "v1", b_ip, &[])?;
    mesh.write_registry("services.toml", &registry(&mesh, port, "strict"))?;
    mesh.wait_all_ready(READY).await?;
    let out = mesh.host("vm-a").outbound;
    let r = wait_for(
        "vm-a (replica A) reaches reviews on vm-b (replica B)",
        READY,
        || async move {
            Ok(call(out, "GET", "/reviews/1")
                .await
                .ok()
                .filter(|r| r.status == 200))
        },
    )
    .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => bail!("{e:#}\n{}\n{}", mesh.logs(), replica_b.log_text()),
    };
    assert!(
        r.body
            .contains("URI=spiffe://pilotfish.local/service/productpage"),
        "{}",
        r.body
    );
    // Each side's certificate came from its own replica's intermediate.
    let node_chain = |node: &str| -> Result<String> {
        let mut stored = Vec::new();
        files_named(&mesh.path(node), "node.pem", &mut stored);
        let path = stored
            .first()
            .ok_or_else(|| anyhow::anyhow!("{node}: no node.pem"))?;
        Ok(std::fs::read_to_string(path)?)
    };
    let flat = |s: &str| s.replace(['\r', '\n'], "");
    let int_of = |cert: &str| -> Result<String> {
        let chain = flat(&std::fs::read_to_string(cert)?);
        Ok(chain
            .strip_suffix(&flat(&root))
            .unwrap_or_default()
            .to_string())
    };
    assert!(flat(&node_chain("vm-a")?).ends_with(&int_of(&a_cert)?));
    assert!(flat(&node_chain("vm-b")?).ends_with(&int_of(&b_cert)?));
    assert_ne!(int_of(&a_cert)?, int_of(&b_cert)?);
    Ok(())
}
