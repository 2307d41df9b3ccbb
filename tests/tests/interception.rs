//! Transparent interception and mesh DNS, end to end: every host is a network namespace with
//! its own nftables, its agent writes its own table, and apps run unmodified, as another user
//! than the agent and Envoy (root here), calling services by name.
//!
//! - productpage: `[interception] outbound = true` (mesh DNS on by default, forwarding other
//!   names to a dnsmasq upstream on the bridge);
//! - reviews: `[interception] inbound = true`; it hosts `reviews` (HTTP, port 9080) and `db`
//!   (TCP, clients dial port 5432, the app listens on 7000); later reviews-v2 (a canary host,
//!   no interception) and ratings join.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::netns::NetnsCommand;
use pilotfish_tests::{blocking, ensure_debian_tool, envoy_stat, http_get, wait_for, Process};

const READY: Duration = Duration::from_secs(30);
/// The apps' user: anyone but the agent's (root in these tests).
const APP_UID: u32 = 65534;
/// The `intercept` listener's connection count, in Envoy's stats.
const INTERCEPTED: &str = "listener.127.0.0.1_15002.downstream_cx_total";

/// `curl -s URL` inside a host, as an app runs it (another user than the agent).
fn app_curl(ns: &pilotfish_tests::netns::NetnsHost, url: &str) -> NetnsCommand {
    ns.command("curl")
        .args(["-s", "--max-time", "5", url])
        .as_user(APP_UID)
}

/// `nft list tables` inside a host: the `ip pilotfish` lines.
fn pilotfish_tables(ns: &pilotfish_tests::netns::NetnsHost) -> Result<usize> {
    let out = ns.command("nft").args(["list", "tables"]).run()?;
    Ok(out
        .lines()
        .filter(|l| l.trim() == "table ip pilotfish")
        .count())
}

/// Runs `cmd` until it succeeds and its stdout satisfies `ok`; that stdout.
async fn until(what: &str, cmd: NetnsCommand, ok: fn(&str) -> bool, mesh: &Mesh) -> Result<String> {
    wait_for(what, READY, || {
        let cmd = cmd.clone();
        async move {
            let out = blocking(move || cmd.output()).await?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok((out.status.success() && ok(&stdout)).then_some(stdout))
        }
    })
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", mesh.logs()))
}

/// A load through the mesh, from inside a host: a shell loop of `curl`s (a new connection
/// each, as the app's user) until SIGTERM, writing `ok` per answer, `failed at ...` per failure
/// and `ok=N fail=M` at the end.
struct Load {
    process: Process,
    log: std::path::PathBuf,
}

impl Load {
    /// Starts it and waits until it gets answers.
    async fn start(
        ns: &pilotfish_tests::netns::NetnsHost,
        url: &str,
        log: std::path::PathBuf,
    ) -> Result<Load> {
        let script = format!(
            "ok=0; fail=0; trap 'echo \"ok=$ok fail=$fail\"; exit 0' TERM; \
             while :; do out=$(curl -sSf -o /dev/null --max-time 3 {url} 2>&1); rc=$?; \
             if [ $rc -eq 0 ]; then ok=$((ok+1)); echo ok; \
             else fail=$((fail+1)); echo \"failed at $(date +%T.%N): curl $rc $out\"; fi; done"
        );
        let process = ns
            .command("sh")
            .args(["-c", &script])
            .as_user(APP_UID)
            .spawn("load", log.clone())?;
        let load = Load { process, log };
        load.more(5).await?;
        Ok(load)
    }

    fn answered(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "ok")
            .count()
    }

    /// Waits until `n` more requests were answered.
    async fn more(&self, n: usize) -> Result<()> {
        let target = self.answered() + n;
        wait_for("the load flowing", READY, || async {
            Ok((self.answered() >= target).then_some(()))
        })
        .await
    }

    /// Stops it; asserts that no request failed (`context` goes into the message); the number
    /// answered.
    fn finish(mut self, what: &str, context: impl FnOnce() -> String) -> Result<u64> {
        self.process.terminate(Duration::from_secs(10));
        let log = self.process.log_text();
        let last = log
            .lines()
            .rev()
            .find(|l| l.starts_with("ok="))
            .with_context(|| format!("no result in the load's log:\n{log}"))?;
        let mut nums = last
            .split_whitespace()
            .filter_map(|kv| kv.split_once('=')?.1.parse::<u64>().ok());
        let (Some(ok), Some(fail)) = (nums.next(), nums.next()) else {
            bail!("bad load result {last:?}");
        };
        println!("{what}: {ok} requests, {fail} failed");
        assert_eq!(fail, 0, "{what}:\n{log}\n{}", context());
        Ok(ok)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_apps_reach_mesh_services_by_name_and_nothing_else_changes() -> Result<()> {
    ensure_debian_tool("nft", "nftables")?;
    ensure_debian_tool("curl", "curl")?;
    let dnsmasq = ensure_debian_tool("dnsmasq", "dnsmasq-base")?;
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        netns: true,
        discovery_extra: "[api]\ntoken_file = \"api-token\"\nread_requires_token = false\n".into(),
        ..MeshOptions::default()
    })?;
    let gw = mesh.lab.as_ref().context("a netns mesh")?.gateway();
    // The host's "real" resolver: answers outside.test, on the bridge.
    let _upstream = Process::spawn(
        "dnsmasq",
        &dnsmasq,
        &[
            "--keep-in-foreground",
            "--no-hosts",
            "--no-resolv",
            "--bind-interfaces",
            &format!("--listen-address={gw}"),
            "--except-interface=lo",
            "--port=53",
            "--user=root",
            "--address=/outside.test/192.0.2.10",
            "--log-facility=-",
        ],
        mesh.dir.join("dnsmasq.log"),
    )?;
    pilotfish_tests::mesh::wait_port(SocketAddr::new(gw.into(), 53), READY)?;
    let productpage_log = mesh.dir.join("productpage-access.log");
    mesh.add_host_with(
        "productpage",
        1,
        &format!(
            "access_log = \"{}\"\n\n[interception]\noutbound = true\n\n[dns]\nupstreams = [\"{gw}\"]\n",
            productpage_log.display()
        ),
    )?;
    let reviews_log = mesh.dir.join("reviews-access.log");
    mesh.add_host_with(
        "reviews",
        2,
        &format!(
            "access_log = \"{}\"\n\n[interception]\ninbound = true\n",
            reviews_log.display()
        ),
    )?;
    mesh.start_app_in("reviews", "reviews", "v1", 9080, &[])?;
    mesh.start_app_in("reviews", "db", "v1", 7000, &[])?;
    mesh.start_app_in("productpage", "productpage", "v1", 9080, &[])?;
    let reviews_ip = mesh.host("reviews").ip;
    let mut registry = mesh.service_toml(
        "productpage",
        "upstreams = [\"reviews\", \"db\"]",
        &[("productpage", 9080, "")],
    ) + &mesh.service_toml("reviews", "", &[("reviews", 9080, "")]);
    registry.push_str(&format!(
        "[services.db]\nport = 5432\nprotocol = \"tcp\"\n\n[[services.db.instances]]\n\
         node = \"reviews\"\naddress = \"{reviews_ip}\"\nport = 7000\nmesh_port = 15006\n"
    ));
    mesh.write_registry("services.toml", &registry)?;
    mesh.wait_all_ready(READY).await?;

    let client = mesh
        .host("productpage")
        .netns
        .clone()
        .context("namespace")?;
    // The agent is ready only once its table is in place.
    let health = mesh.host("productpage").health;
    wait_for("productpage's agent ready", READY, || async move {
        let r = blocking(move || http_get(health, "agent", "/healthz/ready")).await;
        Ok(r.ok().filter(|r| r.status == 200).map(|_| ()))
    })
    .await?;
    assert_eq!(pilotfish_tables(&client)?, 1, "ready before its table");
    client.set_resolv_conf("nameserver 127.0.0.153\n")?;
    let admin = mesh.host("productpage").admin;

    // 1. An unmodified HTTP client, by name, over mTLS: the callee sees productpage.
    let curl = app_curl(&client, "http://reviews.mesh:9080/");
    let answer = until(
        "curl http://reviews.mesh:9080/",
        curl,
        |b| b.starts_with("reviews-v1 GET / "),
        &mesh,
    )
    .await?;
    assert!(
        answer.contains("URI=spiffe://pilotfish.local/service/productpage"),
        "the callee sees the caller's identity: {answer}"
    );
    // The name resolves to a virtual IP of the range.
    let vip = client
        .command("getent")
        .args(["ahostsv4", "reviews.mesh"])
        .as_user(APP_UID)
        .run()?;
    assert!(vip.starts_with("240.240."), "{vip}");
    // The VIP discovery lists for the service.
    let http = mesh.http;
    let services = blocking(move || http_get(http, "discovery", "/v1/services")).await?;
    let services: serde_json::Value = serde_json::from_str(&services.body)?;
    let listed = services["items"]
        .as_array()
        .and_then(|items| items.iter().find(|s| s["name"] == "reviews"))
        .and_then(|s| s["vip"].as_str())
        .with_context(|| format!("reviews' vip in {services}"))?
        .to_string();
    assert_eq!(vip.split_whitespace().next(), Some(listed.as_str()));

    // 2. A raw TCP client to a TCP service by name; the callee's proxy saw productpage's
    // certificate.
    let raw = client
        .command("bash")
        .args([
            "-c",
            "exec 3<>/dev/tcp/db.mesh/5432 && printf 'GET /raw HTTP/1.0\\r\\nHost: db\\r\\n\\r\\n' >&3 \
             && timeout 5 cat <&3",
        ])
        .as_user(APP_UID);
    let answer = until(
        "raw TCP to db.mesh:5432",
        raw,
        |b| b.contains("db-v1 GET /raw"),
        &mesh,
    )
    .await?;
    println!("raw TCP: {}", answer.lines().last().unwrap_or_default());
    let log_path = reviews_log.clone();
    let line = wait_for("the TCP connection in reviews' access log", READY, || {
        let path = log_path.clone();
        async move {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            Ok(text
                .lines()
                .find(|l| l.contains("\"upstream_cluster\":\"inbound|db\""))
                .map(str::to_string))
        }
    })
    .await?;
    assert!(
        line.contains("\"peer\":\"spiffe://pilotfish.local/service/productpage\""),
        "{line}"
    );

    // The agent's metrics say so.
    let metrics = blocking(move || http_get(health, "agent", "/metrics"))
        .await?
        .body;
    for line in [
        "pilotfish_agent_interception_installed 1",
        "pilotfish_agent_dns_mesh_names 2",
        "pilotfish_agent_interception_failures_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    // For the record: the agents' memory, with DNS (productpage) and without (reviews).
    for node in ["productpage", "reviews"] {
        let pid = mesh.host(node).agent.pid().context("agent runs")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
                .unwrap_or_default()
        };
        println!(
            "{node}'s agent: VmRSS {} kB, RssAnon {} kB",
            field("VmRSS:"),
            field("RssAnon:")
        );
    }

    // 3. A name outside the mesh still resolves, through the host's resolver.
    let outside = client
        .command("getent")
        .args(["ahostsv4", "outside.test"])
        .as_user(APP_UID)
        .run()?;
    assert!(outside.starts_with("192.0.2.10 "), "{outside}");

    // 4. Envoy's user is never captured (no loop), and other destinations pass through.
    let healthz = format!("http://{}/healthz", mesh.http);
    let direct = |uid: Option<u32>| {
        let mut cmd =
            client
                .command("curl")
                .args(["-sf", "-o", "/dev/null", "--max-time", "5", &healthz]);
        if let Some(uid) = uid {
            cmd = cmd.as_user(uid);
        }
        cmd
    };
    let count = || envoy_stat(admin, INTERCEPTED).map(Option::unwrap_or_default);
    let before = count()?;
    direct(None)
        .run()
        .context("root (Envoy's user) reaches discovery")?;
    assert_eq!(
        count()?,
        before,
        "a connection of Envoy's user was captured"
    );
    direct(Some(APP_UID))
        .run()
        .context("an app reaches discovery")?;
    assert_eq!(
        count()?,
        before + 1,
        "the app's connection passed through Envoy"
    );

    // 5. Inbound capture: plaintext straight to reviews' app port finds the mesh port, which
    // wants mTLS; productpage (no inbound capture) answers the same request.
    let productpage_app = SocketAddr::new(mesh.host("productpage").ip, 9080);
    let r = blocking(move || http_get(productpage_app, "productpage", "/")).await?;
    assert_eq!(r.status, 200, "plaintext to a host without inbound capture");
    let reviews_app = SocketAddr::new(reviews_ip, 9080);
    let refused = blocking(move || http_get(reviews_app, "reviews", "/")).await;
    assert!(
        refused.is_err(),
        "plaintext to reviews' app port got an answer: {:?}",
        refused.map(|r| r.status)
    );
    let reviews_ns = mesh.host("reviews").netns.clone().context("namespace")?;
    assert_eq!(pilotfish_tables(&reviews_ns)?, 1);

    // 6. Config changes under continuous load through interception: a canary that moves all
    // of reviews to v2 (new subset clusters, then the intercept listener's inline routes) and a
    // new service (a new VIP: the listener's chains and metadata, then DNS). Nothing fails.
    let vip = vip
        .split_whitespace()
        .next()
        .context("an address")?
        .to_string();
    mesh.add_host("reviews-v2", 3)?;
    mesh.start_app_in("reviews-v2", "reviews", "v2", 9080, &[])?;
    mesh.start_app_in("reviews", "ratings", "v1", 9090, &[])?;
    mesh.wait_all_ready(READY).await?;
    let load = Load::start(
        &client,
        &format!("http://{vip}:9080/"),
        mesh.dir.join("load-change.log"),
    )
    .await?;
    let mut changed = mesh.service_toml(
        "productpage",
        "upstreams = [\"reviews\", \"db\", \"ratings\"]",
        &[("productpage", 9080, "")],
    ) + &mesh.service_toml(
        "reviews",
        "",
        &[
            ("reviews", 9080, "version = \"v1\""),
            ("reviews-v2", 9080, "version = \"v2\""),
        ],
    ) + &mesh.service_toml("ratings", "", &[("reviews", 9090, "")]);
    changed.push_str(&registry[registry.find("[services.db]").context("db")?..]);
    // As an operator rolls out a canary: v2 deployed at weight 0, then all traffic moved once
    // its host serves (a host's inbound listener warms until its new certificate arrives).
    changed.push_str(
        "\n[policies.reviews]\nsubsets = { v1 = { version = \"v1\" }, v2 = { version = \"v2\" } }\n\n\
         [[routes.reviews.rules]]\nto = [{ subset = \"v1\", weight = 100 }, { subset = \"v2\", weight = 0 }]\n",
    );
    mesh.write_registry("services.toml", &changed)?;
    let v2_admin = mesh.host("reviews-v2").admin;
    wait_for(
        "reviews-v2 serving reviews on its mesh port",
        READY,
        || async move {
            let listeners =
                blocking(move || pilotfish_tests::admin_get(v2_admin, "/listeners")).await?;
            let warming = envoy_stat(v2_admin, "listener_manager.total_listeners_warming")?;
            Ok((listeners.contains("inbound::") && warming == Some(0)).then_some(()))
        },
    )
    .await?;
    let changed = changed.replace(
        "to = [{ subset = \"v1\", weight = 100 }, { subset = \"v2\", weight = 0 }]",
        "to = [{ subset = \"v2\", weight = 100 }]",
    );
    mesh.write_registry("services.toml", &changed)?;
    until(
        "reviews answered by v2 through its VIP",
        app_curl(&client, &format!("http://{vip}:9080/")),
        |b| b.starts_with("reviews-v2 GET / "),
        &mesh,
    )
    .await?;
    until(
        "curl http://ratings.mesh:9080/ (a new service)",
        app_curl(&client, "http://ratings.mesh:9080/"),
        |b| b.starts_with("ratings-v1 GET / "),
        &mesh,
    )
    .await?;
    load.more(10).await?;
    load.finish("through a canary and a new service", || {
        format!(
            "productpage's access log:\n{}\n{}",
            std::fs::read_to_string(&productpage_log).unwrap_or_default(),
            mesh.logs()
        )
    })?;

    // 7. kill -9 of the agent and a restart, under continuous load through interception:
    // no connection fails, and the host has exactly one table. The load dials the address the
    // name resolved to, as an app that resolved it before would: the agent itself answers DNS,
    // so a lookup made while it is down fails (a caching resolver such as systemd-resolved
    // bridges that with the 30 s TTL).
    assert_eq!(pilotfish_tables(&client)?, 1);
    let load = Load::start(
        &client,
        &format!("http://{vip}:9080/"),
        mesh.dir.join("load.log"),
    )
    .await?;
    mesh.host_mut("productpage").restart_agent()?;
    let host = mesh.host("productpage");
    host.wait_ready(READY).await?;
    wait_for("the restarted agent rewrote its table", READY, || async {
        Ok(host
            .agent
            .log_text()
            .matches("interception rules installed")
            .count()
            .ge(&2)
            .then_some(()))
    })
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", host.agent.log_text()))?;
    load.more(20).await?;
    load.finish("through kill -9 and restart of the agent", String::new)?;
    assert_eq!(pilotfish_tables(&client)?, 1);
    // And the names still resolve, from the same (adopted) config.
    until(
        "curl after the restart",
        app_curl(&client, "http://reviews.mesh:9080/"),
        |b| b.starts_with("reviews-v2 GET / "),
        &mesh,
    )
    .await?;

    // 8. A reload (SIGHUP: the agent re-executes itself, as on an upgrade) under load that
    // resolves the name on every request: mesh DNS hands its sockets to the new image, so no
    // lookup is refused meanwhile, and the table is replaced, never removed.
    let load = Load::start(
        &client,
        "http://reviews.mesh:9080/",
        mesh.dir.join("load-reload.log"),
    )
    .await?;
    let host = mesh.host("productpage");
    let envoys = host.envoy_pids();
    host.agent.signal(libc::SIGHUP);
    wait_for(
        "the reloaded agent serving DNS on the old sockets",
        READY,
        || async {
            Ok(host
                .agent
                .log_text()
                .contains("mesh DNS: serving on the sockets of the previous image")
                .then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", host.agent.log_text()))?;
    wait_for("the new Envoy alone", READY, || async {
        let now = host.envoy_pids();
        Ok((now.len() == 1 && !envoys.contains(&now[0])).then_some(()))
    })
    .await?;
    load.more(10).await?;
    load.finish(
        "resolving by name through a reload of the agent",
        String::new,
    )?;
    assert_eq!(pilotfish_tables(&client)?, 1);

    // 9. Stopping the agent removes its table: the host is not left redirecting to nothing.
    let status = mesh
        .host_mut("productpage")
        .agent
        .terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "agent exit: {status:?}"
    );
    assert_eq!(pilotfish_tables(&client)?, 0);

    // 10. A host with no route that covers the VIPs (here: no default route; its peers are all
    // on its own subnet): the agent adds a local route for them, and removes it on stop.
    let our_routes = || {
        client
            .command("ip")
            .args(["-4", "route", "show", "table", "local", "proto", "241"])
            .run()
    };
    client
        .command("ip")
        .args(["route", "del", "default"])
        .run()?;
    let unroutable = app_curl(&client, &format!("http://{vip}:9080/")).output()?;
    assert!(!unroutable.status.success(), "a VIP without a route");
    assert_eq!(our_routes()?.trim(), "");
    mesh.host_mut("productpage").agent.restart()?;
    until(
        "curl http://reviews.mesh:9080/ without a default route",
        app_curl(&client, "http://reviews.mesh:9080/"),
        |b| b.starts_with("reviews-v2 GET / "),
        &mesh,
    )
    .await?;
    let added = our_routes()?;
    assert!(added.starts_with("local 240.240."), "{added}");
    let status = mesh
        .host_mut("productpage")
        .agent
        .terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "agent exit: {status:?}"
    );
    assert_eq!(our_routes()?.trim(), "");
    assert_eq!(pilotfish_tables(&client)?, 0);
    assert_eq!(
        pilotfish_tables(&reviews_ns)?,
        1,
        "reviews' agent still runs"
    );
    Ok(())
}

/// With the interception drop-in the agent holds CAP_NET_ADMIN and CAP_NET_BIND_SERVICE as
/// ambient capabilities (its `nft` runs need them); Envoy, started through the keeper, gets
/// none. Run as the unit runs it: a non-root user with those ambient capabilities.
#[test]
fn envoy_never_inherits_the_agents_capabilities() -> Result<()> {
    let caps = |keeper: bool| -> Result<String> {
        let agent = pilotfish_tests::binary("pilotfish-agent")?;
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+net_admin,+net_bind_service",
            "--ambient-caps=+net_admin,+net_bind_service",
            "--",
        ]);
        if keeper {
            cmd.arg(&agent).arg(pilotfish_agent::envoy::KEEPER_ARG);
        }
        let out = cmd
            .args(["/bin/sh", "-c", "grep -E '^Cap(Eff|Amb)' /proc/self/status"])
            .output()?;
        anyhow::ensure!(out.status.success(), "{out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let agent_like = caps(false)?;
    assert!(
        agent_like.contains("CapAmb:\t0000000000001400"),
        "the agent's own capabilities: {agent_like}"
    );
    let envoy_like = caps(true)?;
    assert_eq!(
        envoy_like,
        "CapEff:\t0000000000000000\nCapAmb:\t0000000000000000\n"
    );
    Ok(())
}
