//! Make-before-break (issue 8): a config edit under continuous traffic through real Envoy fails
//! no request. A route must never reach Envoy before the clusters it names are warm, and a
//! cluster must never leave Envoy while a route in force still names it; either mistake shows
//! as `503` with response flag `NC` (no cluster) for the requests routed there meanwhile.
//!
//! Each edit runs under [`Load`]: several workers send requests back to back, on keep-alive
//! connections, through the caller host's outbound listener, and count every answer that is not
//! a 200 and every connection error. After the write the test waits (with a deadline) until the
//! new config is seen in force, lets the load run a few hundred requests more, stops it and
//! checks: nothing failed, the load really ran while the config changed, and the caller Envoy's
//! `http.outbound.no_cluster` counter did not move.
//!
//! Meshes are secure (mTLS, the default deployment) and run once per xDS flavour. Each test
//! collects the verdict of every edit and fails at the end, listing each failed request's status
//! and body with its time relative to the write.
//! Run: `cargo build --workspace --bins && cargo test -p pilotfish-tests --test push`.
//!
//! Topology of the subset scenarios: vm-a calls (productpage), reviews runs on vm-b (version v1),
//! vm-c (v2) and vm-d (v1b); the canary service `reviews-canary` runs on vm-c.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pilotfish_tests::load::{Headers, Load};
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::{admin_get, blocking, envoy_stat, free_port, http_get, wait_for};

const READY: Duration = Duration::from_secs(30);
/// From the write until the edit is seen in traffic: discovery notices a file within about a
/// second; the rest is slack for a loaded 2-core machine.
const APPLY: Duration = Duration::from_secs(15);
/// The load: four concurrent workers, each on its own keep-alive connection, sending these
/// headers. `CANARY` workers send `x-canary: 1`, which a header rule may route elsewhere.
const PLAIN: &[(&str, &str)] = &[];
const CANARY: &[(&str, &str)] = &[("x-canary", "1")];
const FOUR_PLAIN: [&[(&str, &str)]; 4] = [PLAIN, PLAIN, PLAIN, PLAIN];
const WITH_CANARY: [&[(&str, &str)]; 4] = [PLAIN, PLAIN, PLAIN, CANARY];
/// Requests the load completes after the edit is seen in force, before it stops: a cluster
/// removed late (after the new route) still meets traffic.
const AFTER: u64 = 500;
/// Fewest requests that must complete between the write and the edit being seen in force, so
/// that the load demonstrably overlapped the change. Edits are acted on at once (leading
/// edge) and are in force 50-100 ms after the write, in which four workers complete 20-60
/// requests; 10 still proves the overlap, and the AFTER requests cover the late removals.
const MIN_DURING: u64 = 10;
/// The caller Envoy's router counter for requests whose route named a cluster it does not have
/// (response flag NC); the outbound connection manager's stat prefix is `outbound`.
const NO_CLUSTER: &str = "http.outbound.no_cluster";

/// The caller Envoy's NC counter; the stat must exist (a renamed stat would hide the check).
async fn no_cluster(admin: SocketAddr) -> Result<u64> {
    blocking(move || envoy_stat(admin, NO_CLUSTER))
        .await?
        .ok_or_else(|| anyhow!("{NO_CLUSTER} not in the stats of {admin}"))
}

/// Whether Envoy at `admin` has an active cluster named exactly `name`.
async fn has_cluster(admin: SocketAddr, name: &str) -> Result<bool> {
    let prefix = format!("{name}::");
    let body = blocking(move || admin_get(admin, "/clusters")).await?;
    Ok(body.lines().any(|l| l.starts_with(&prefix)))
}

/// Makes one registry edit under load (see the module comment). `Err` when the edit never came
/// into force (the harness or the mesh is broken); otherwise the verdict, `Some(problem)` when
/// requests failed.
async fn edit_under_load<F, Fut>(
    mesh: &Mesh,
    what: &str,
    load_host: &'static str,
    workers: &[Headers],
    file: &str,
    content: &str,
    mut applied: F,
) -> Result<Option<String>>
where
    F: FnMut(BTreeMap<String, u64>) -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let what = format!("[{}] {what}", mesh.xds);
    let what = what.as_str();
    let caller = mesh.host("vm-a");
    let (out, admin) = (caller.outbound, caller.admin);
    // Every NC from here on counts, like every failed request of the load.
    let nc_before = no_cluster(admin).await?;
    let load = Load::start(out, load_host, workers);
    // The load is up and served by the current config before anything changes.
    let warm = wait_for("the load running", READY, || {
        let total = load.total();
        async move { Ok((total >= 100).then_some(())) }
    })
    .await;
    if let Err(e) = warm {
        bail!("{what}: {e:#}\n{}", mesh.logs());
    }

    let before = load.total();
    let written = Instant::now();
    mesh.write_registry(file, content)?;
    let seen = wait_for(&format!("{what}: the edit in force"), APPLY, || {
        let served = load.served_by();
        let check = applied(served);
        async move { Ok(check.await?.then_some(())) }
    })
    .await;
    let took = written.elapsed();
    let at_applied = load.total();
    if let Err(e) = seen {
        let tally = load.stop().await;
        bail!(
            "{e:#}\nload: {} ok, {} failed, served by {:?}\n{}",
            tally.ok,
            tally.failed,
            tally.served_by,
            mesh.logs()
        );
    }
    wait_for(&format!("{what}: {AFTER} more requests"), READY, || {
        let total = load.total();
        async move { Ok((total >= at_applied + AFTER).then_some(())) }
    })
    .await?;
    let tally = load.stop().await;
    let nc_after = no_cluster(admin).await?;

    let during = at_applied - before;
    eprintln!(
        "{what}: in force {took:?} after the write; {during} requests meanwhile, {} in all; {} failed; {NO_CLUSTER} +{}; served by {:?}",
        tally.total(),
        tally.failed,
        nc_after - nc_before,
        tally.served_by
    );
    let mut problems = Vec::new();
    if tally.failed > 0 {
        let first: Vec<String> = tally
            .failures
            .iter()
            .map(|(at, detail)| format!("  {} {detail}", since(written, *at)))
            .collect();
        problems.push(format!(
            "{} of {} requests failed (times relative to the write; in force after {took:?}):\n{}",
            tally.failed,
            tally.total(),
            first.join("\n")
        ));
    }
    if nc_after != nc_before {
        problems.push(format!(
            "{NO_CLUSTER} went from {nc_before} to {nc_after}: routes named clusters Envoy did not have (NC)"
        ));
    }
    if during < MIN_DURING {
        problems.push(format!(
            "only {during} requests completed while the edit was applied (want at least {MIN_DURING}): the load did not overlap the change"
        ));
    }
    Ok((!problems.is_empty()).then(|| format!("{what}: {}", problems.join("; "))))
}

/// `at` relative to `t0`, signed, for failure reports.
fn since(t0: Instant, at: Instant) -> String {
    if at >= t0 {
        format!("+{}ms", (at - t0).as_millis())
    } else {
        format!("-{}ms", (t0 - at).as_millis())
    }
}

/// The ports of the sample apps the subset scenarios use.
struct Apps {
    v1: u16,
    v2: u16,
    v1b: u16,
    canary: u16,
}

fn instance(mesh: &Mesh, service: &str, node: &str, port: u16, version: &str) -> String {
    let h = mesh.host(node);
    format!(
        "[[services.{service}.instances]]\nnode = \"{node}\"\naddress = \"{}\"\nport = {port}\nmesh_port = {}\nlabels = {{ version = \"{version}\" }}\n\n",
        h.ip, h.mesh_port
    )
}

/// productpage (the caller, on vm-a) and every instance of reviews; the subsets they fall in
/// are declared by the rules file the scenarios edit.
fn services_toml(mesh: &Mesh, apps: &Apps) -> String {
    let mut out = String::from("[services.productpage]\nport = 9080\n\n");
    out.push_str(&instance(mesh, "productpage", "vm-a", 9080, "v1"));
    out.push_str("[services.reviews]\nport = 9080\n\n");
    out.push_str(&instance(mesh, "reviews", "vm-b", apps.v1, "v1"));
    out.push_str(&instance(mesh, "reviews", "vm-c", apps.v2, "v2"));
    out.push_str(&instance(mesh, "reviews", "vm-d", apps.v1b, "v1b"));
    out
}

/// What `rules.toml` says about reviews, which the subset scenarios rewrite in one write each.
struct Rules<'a> {
    /// Declared subsets; each selects the instances labelled `version = <its name>`.
    subsets: &'a [&'a str],
    /// The subset `x-canary: 1` requests go to (a first rule), if any.
    canary: Option<&'a str>,
    /// The default rule's weighted split.
    split: &'a [(&'a str, u32)],
    /// The `reviews-canary` service (its instance table), mirrored to by the default rule.
    mirror_to: Option<String>,
}

impl Rules<'_> {
    fn toml(&self) -> String {
        let subsets: Vec<String> = self
            .subsets
            .iter()
            .map(|s| format!("{s} = {{ version = \"{s}\" }}"))
            .collect();
        let mut out = format!(
            "[policies.reviews]\nsubsets = {{ {} }}\n\n",
            subsets.join(", ")
        );
        if let Some(subset) = self.canary {
            out.push_str(&format!(
                "[[routes.reviews.rules]]\nmatch = {{ headers = {{ \"x-canary\" = \"1\" }} }}\nto = [{{ subset = \"{subset}\" }}]\n\n"
            ));
        }
        let to: Vec<String> = self
            .split
            .iter()
            .map(|(s, w)| format!("{{ subset = \"{s}\", weight = {w} }}"))
            .collect();
        out.push_str(&format!(
            "[[routes.reviews.rules]]\nto = [{}]\n",
            to.join(", ")
        ));
        if let Some(instances) = &self.mirror_to {
            out.push_str("mirror = { service = \"reviews-canary\", percent = 100 }\n\n");
            out.push_str("[services.reviews-canary]\nport = 9080\n\n");
            out.push_str(instances);
        }
        out
    }
}

/// Scenarios 1-3 on one secure mesh, in sequence; every edit is one write of `rules.toml`.
async fn subset_edits(xds: &'static str) -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        xds,
        secure: true,
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4), ("vm-d", 5)] {
        mesh.add_host(node, i)?;
    }
    let ip = |mesh: &Mesh, node: &str| mesh.host(node).ip;
    let apps = Apps {
        v1: mesh.start_app("reviews", "v1", ip(&mesh, "vm-b"), &[])?,
        v2: mesh.start_app("reviews", "v2", ip(&mesh, "vm-c"), &[])?,
        v1b: mesh.start_app("reviews", "v1b", ip(&mesh, "vm-d"), &[])?,
        canary: mesh.start_app("reviews-canary", "v1", ip(&mesh, "vm-c"), &[])?,
    };
    mesh.write_registry("services.toml", &services_toml(&mesh, &apps))?;
    let initial = Rules {
        subsets: &["v1"],
        canary: None,
        split: &[("v1", 100)],
        mirror_to: None,
    };
    mesh.write_registry("rules.toml", &initial.toml())?;
    mesh.wait_all_ready(READY).await?;
    let caller = mesh.host("vm-a");
    let (out, admin) = (caller.outbound, caller.admin);
    let first = wait_for("reviews v1 answers through vm-a", READY, || async move {
        Ok(blocking(move || http_get(out, "reviews", "/reviews/1"))
            .await
            .ok()
            .filter(|r| r.status == 200 && r.header("x-served-by") == Some("reviews-v1")))
    })
    .await;
    if let Err(e) = first {
        bail!("{e:#}\n{}", mesh.logs());
    }

    let mut problems = Vec::new();

    // 1. A new subset and routes to it in one write: 1% of all requests, and (the README's
    // canary shape) every `x-canary: 1` request. The 1% alone meets the short window in which
    // the route is in force and the cluster is not only now and then; the canary worker's
    // requests all go there. In force once v2 answers.
    let verdict = edit_under_load(
        &mesh,
        "1. add subset v2, route 1% and x-canary to it",
        "reviews",
        &WITH_CANARY,
        "rules.toml",
        &Rules {
            subsets: &["v1", "v2"],
            canary: Some("v2"),
            split: &[("v1", 99), ("v2", 1)],
            mirror_to: None,
        }
        .toml(),
        |served| async move { Ok(served.contains_key("reviews-v2")) },
    )
    .await?;
    problems.extend(verdict);

    // 2. Subset v1 replaced by v1b (other labels, another instance) and the route moved to it,
    // in one write. In force once v1b answers and the v1 cluster is gone from the caller.
    let verdict = edit_under_load(
        &mesh,
        "2. replace subset v1 by v1b",
        "reviews",
        &FOUR_PLAIN,
        "rules.toml",
        &Rules {
            subsets: &["v1b", "v2"],
            canary: Some("v2"),
            split: &[("v1b", 99), ("v2", 1)],
            mirror_to: None,
        }
        .toml(),
        |served| async move {
            Ok(served.contains_key("reviews-v1b")
                && !has_cluster(admin, "outbound|reviews|v1").await?)
        },
    )
    .await?;
    problems.extend(verdict);

    // 3. Removing a service and what routes to it. A rule's `to` names only subsets of the
    // routed service (the README's `to = [{ subset, weight }]`), so it cannot split between
    // reviews and another service; the closest real equivalent: reviews splits 50/50 between
    // its subsets v1b and v2, sends x-canary to v2, and mirrors every request to the service
    // reviews-canary. One write then removes the reviews-canary service, the mirror, subset v2,
    // its half of the split and the x-canary rule: two clusters leave while the load to
    // reviews goes on. First the canary service arrives (itself an edit under load).
    let canary = instance(&mesh, "reviews-canary", "vm-c", apps.canary, "v1");
    let canary_app = SocketAddr::new(ip(&mesh, "vm-c"), apps.canary);
    let copies = move || async move {
        let r = blocking(move || http_get(canary_app, "reviews-canary", "/__count")).await?;
        r.body
            .trim()
            .parse::<u64>()
            .with_context(|| format!("/__count of reviews-canary: {:?}", r.body))
    };
    let verdict = edit_under_load(
        &mesh,
        "3a. add service reviews-canary, mirror to it, split v1b/v2 50/50",
        "reviews",
        &WITH_CANARY,
        "rules.toml",
        &Rules {
            subsets: &["v1b", "v2"],
            canary: Some("v2"),
            split: &[("v1b", 50), ("v2", 50)],
            mirror_to: Some(canary),
        }
        .toml(),
        |served| async move {
            Ok(served.get("reviews-v2").copied().unwrap_or(0) >= 100 && copies().await? > 0)
        },
    )
    .await?;
    problems.extend(verdict);
    let verdict = edit_under_load(
        &mesh,
        "3. remove service reviews-canary, the mirror, subset v2 and the routes to it",
        "reviews",
        &WITH_CANARY,
        "rules.toml",
        &Rules {
            subsets: &["v1b"],
            canary: None,
            split: &[("v1b", 100)],
            mirror_to: None,
        }
        .toml(),
        |_| async move {
            Ok(!has_cluster(admin, "outbound|reviews-canary").await?
                && !has_cluster(admin, "outbound|reviews|v2").await?)
        },
    )
    .await?;
    problems.extend(verdict);

    assert!(
        problems.is_empty(),
        "requests failed while config changed ({xds}):\n{}",
        problems.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_subset_edits_under_load_fail_no_request() -> Result<()> {
    subset_edits("delta").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_subset_edits_under_load_fail_no_request() -> Result<()> {
    subset_edits("sotw").await
}

/// The `db` service's table: HTTP (routed by Host on the outbound listener) or TCP (its own
/// listener on the caller's address at `port`), on vm-b beside reviews.
fn db_toml(mesh: &Mesh, protocol: &str, port: u16, app_port: u16) -> String {
    format!(
        "[services.db]\nprotocol = \"{protocol}\"\nport = {port}\n\n{}",
        instance(mesh, "db", "vm-b", app_port, "v1")
    )
}

/// Scenario 4: db swaps HTTP -> TCP -> HTTP while load goes to reviews, its neighbour on the
/// caller's outbound listener and on vm-b's mesh listener; db works in each new mode.
async fn protocol_swap(xds: &'static str) -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        xds,
        secure: true,
        ..MeshOptions::default()
    })?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3)] {
        mesh.add_host(node, i)?;
    }
    let (a_ip, b_ip) = (mesh.host("vm-a").ip, mesh.host("vm-b").ip);
    let reviews_port = mesh.start_app("reviews", "v1", b_ip, &[])?;
    let db_port = mesh.start_app("db", "v1", b_ip, &[])?;
    // The port db is addressed by: the Host port over HTTP, the caller's local port over TCP.
    let tcp_port = free_port(a_ip);
    let mut services = String::from("[services.productpage]\nport = 9080\n\n");
    services.push_str(&instance(&mesh, "productpage", "vm-a", 9080, "v1"));
    services.push_str("[services.reviews]\nport = 9080\n\n");
    services.push_str(&instance(&mesh, "reviews", "vm-b", reviews_port, "v1"));
    mesh.write_registry("services.toml", &services)?;
    mesh.write_registry("db.toml", &db_toml(&mesh, "http", tcp_port, db_port))?;
    mesh.wait_all_ready(READY).await?;
    let out = mesh.host("vm-a").outbound;
    let tcp = SocketAddr::new(a_ip, tcp_port);
    // db answers through `addr` with `Host: db`.
    let db_answers = move |addr: SocketAddr| async move {
        let r = blocking(move || http_get(addr, "db", "/")).await;
        Ok::<_, anyhow::Error>(
            matches!(r, Ok(r) if r.status == 200 && r.header("x-served-by") == Some("db-v1")),
        )
    };
    let up = wait_for(
        "reviews and db (HTTP) answer through vm-a",
        READY,
        || async move {
            let reviews = blocking(move || http_get(out, "reviews", "/"))
                .await
                .is_ok_and(|r| r.status == 200);
            Ok((reviews && db_answers(out).await?).then_some(()))
        },
    )
    .await;
    if let Err(e) = up {
        bail!("{e:#}\n{}", mesh.logs());
    }

    let mut problems = Vec::new();
    let verdict = edit_under_load(
        &mesh,
        "4a. db from HTTP to TCP",
        "reviews",
        &FOUR_PLAIN,
        "db.toml",
        &db_toml(&mesh, "tcp", tcp_port, db_port),
        |_| db_answers(tcp),
    )
    .await?;
    problems.extend(verdict);
    let verdict = edit_under_load(
        &mesh,
        "4b. db from TCP back to HTTP",
        "reviews",
        &FOUR_PLAIN,
        "db.toml",
        &db_toml(&mesh, "http", tcp_port, db_port),
        |_| db_answers(out),
    )
    .await?;
    problems.extend(verdict);
    assert!(
        problems.is_empty(),
        "requests to the neighbour failed while db changed protocol ({xds}):\n{}",
        problems.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_protocol_swap_spares_the_neighbour() -> Result<()> {
    protocol_swap("delta").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_protocol_swap_spares_the_neighbour() -> Result<()> {
    protocol_swap("sotw").await
}
