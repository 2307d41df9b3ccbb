//! Hosts in network namespaces: the harness the interception tests build on, end to end.
//!
//! Topology: a secure mesh whose hosts are namespaces on one bridge; productpage (the client)
//! calls reviews, whose sample app runs inside reviews' namespace. The call starts inside
//! productpage's namespace, on its own 127.0.0.1:15001, as an app on that VM would make it.

use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::netns::Lab;
use pilotfish_tests::{admin_get, blocking, wait_for};

const READY: Duration = Duration::from_secs(30);

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `ip link show` still lists `name` (exactly, not as a prefix of another name).
fn link_exists(name: &str) -> Result<bool> {
    Ok(ip_output(&["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .any(|n| n.split('@').next() == Some(name)))
}

fn netns_exists(name: &str) -> Result<bool> {
    Ok(ip_output(&["netns", "list"])?
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name)))
}

/// The name of the namespace process `pid` runs in.
fn netns_of(pid: u32) -> Result<String> {
    Ok(ip_output(&["netns", "identify", &pid.to_string()])?
        .trim()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_from_inside_a_namespaced_host_crosses_the_mesh() -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        netns: true,
        ..MeshOptions::default()
    })?;
    mesh.add_host("productpage", 1)?;
    mesh.add_host("reviews", 2)?;
    mesh.start_app_in("reviews", "reviews", "v1", 9080, &[])?;
    let registry = mesh.service_toml(
        "productpage",
        "upstreams = [\"reviews\"]",
        &[("productpage", 9080, "")],
    ) + &mesh.service_toml("reviews", "", &[("reviews", 9080, "")]);
    mesh.write_registry("services.toml", &registry)?;
    mesh.wait_all_ready(READY).await?;

    let client = mesh
        .host("productpage")
        .netns
        .clone()
        .context("productpage has a namespace")?;
    let curl = client.command("curl").args([
        "-s",
        "--max-time",
        "5",
        "-H",
        "Host: reviews",
        "http://127.0.0.1:15001/",
    ]);
    let answer = wait_for("reviews through productpage's outbound", READY, || {
        let curl = curl.clone();
        async move {
            let body = blocking(move || curl.run()).await?;
            Ok(body.starts_with("reviews-v1 GET / ").then_some(body))
        }
    })
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", mesh.logs()))?;
    assert!(
        answer.contains("URI=spiffe://pilotfish.local/service/productpage"),
        "the hop was mTLS with productpage's identity: {answer}"
    );

    // `ip netns exec` execs: the agent's handle holds the agent itself, so a restart (as after
    // a crash) starts it in the namespace again, and its Envoy runs there too.
    let before = mesh.host("productpage").agent.pid().context("agent runs")?;
    assert_eq!(netns_of(before)?, client.name);
    let exe = std::fs::read_link(format!("/proc/{before}/exe"))?;
    assert!(exe.ends_with("pilotfish-agent"), "{}", exe.display());
    let old_envoy = mesh.host("productpage").envoy_pid().context("Envoy runs")?;
    mesh.host_mut("productpage").restart_agent()?;
    let after = mesh.host("productpage").agent.pid().context("agent runs")?;
    assert_ne!(before, after);
    let host = mesh.host("productpage");
    let envoy = wait_for("productpage's Envoy replaced, serving", READY, || {
        let curl = curl.clone();
        let envoys = host.envoy_pids();
        async move {
            if envoys.len() != 1 || envoys[0] == old_envoy {
                return Ok(None);
            }
            let body = blocking(move || curl.run()).await?;
            Ok(body.starts_with("reviews-v1 GET / ").then_some(envoys[0]))
        }
    })
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", mesh.logs()))?;
    // Checked once it serves: until `ip` has entered the namespace and exec'd, the new pid is
    // still `ip`'s, in the root namespace.
    assert_eq!(netns_of(after)?, client.name, "the restarted agent");
    assert_eq!(netns_of(envoy)?, client.name, "its Envoy");

    // The test process reaches a host's Envoy admin through the bridge.
    let admin = mesh.host("reviews").admin;
    let ready = blocking(move || admin_get(admin, "/ready")).await?;
    assert_eq!(ready.trim(), "LIVE");
    let reviews = mesh.host("reviews");
    assert!(!reviews.envoy_pids().is_empty(), "Envoy found in /proc");

    let (bridge, namespaces) = {
        let lab = mesh.lab.as_ref().context("the mesh has a lab")?;
        let names: Vec<String> = lab.hosts().iter().map(|h| h.name.clone()).collect();
        (lab.bridge(), names)
    };
    assert_eq!(namespaces.len(), 2);
    drop(mesh);
    for ns in &namespaces {
        assert!(!netns_exists(ns)?, "namespace {ns} is gone");
        assert!(
            !std::path::Path::new("/etc/netns").join(ns).exists(),
            "/etc/netns/{ns} is gone"
        );
    }
    assert!(!link_exists(&bridge)?, "bridge {bridge} is gone");
    Ok(())
}

#[test]
fn a_host_has_its_own_resolver_and_runs_commands_as_another_user() -> Result<()> {
    let mut lab = Lab::new()?;
    let host = lab.add_host(7)?;
    assert_eq!(host.ip, lab.address(7));
    host.set_resolv_conf("nameserver 127.0.0.153\n")?;
    let resolv = host.command("cat").arg("/etc/resolv.conf").run()?;
    assert_eq!(resolv, "nameserver 127.0.0.153\n");

    let who = host.command("id").args(["-u"]).as_user(65534).run()?;
    assert_eq!(who.trim(), "65534");

    // Its own loopback and eth0, and the bridge's address as its gateway.
    let addrs = host.command("ip").args(["-4", "-o", "addr"]).run()?;
    assert!(
        addrs.contains(&format!("eth0    inet {}/24", host.ip)),
        "{addrs}"
    );
    assert!(addrs.contains("lo    inet 127.0.0.1/8"), "{addrs}");
    let routes = host.command("ip").args(["route"]).run()?;
    assert!(
        routes.contains(&format!("default via {} dev eth0", lab.gateway())),
        "{routes}"
    );
    Ok(())
}

#[test]
fn a_lab_left_by_a_crashed_test_is_removed() -> Result<()> {
    // A bridge owned by a process that is gone: its pid, from a child that already exited.
    let mut child = Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let bridge = "pfb255";
    let made = Command::new("ip")
        .args(["link", "add", "name", bridge, "group", &dead.to_string()])
        .args(["type", "bridge"])
        .status()?;
    assert!(made.success(), "make {bridge}");
    let lab = Lab::new()?;
    assert!(!link_exists(bridge)?, "the orphan {bridge} was removed");
    assert!(link_exists(&lab.bridge())?, "the new lab's bridge exists");
    Ok(())
}
