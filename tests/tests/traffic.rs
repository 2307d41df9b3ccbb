//! Traffic management end to end (issue 5): route actions, connection policies, protocols,
//! external services and the ingress gateway, each against real Envoy.
//!
//! Topology: vm-a runs only clients and calls through its outbound listener; vm-b and vm-c run
//! the apps (one service per feature, so that one mesh serves several checks); gw-1 is the
//! ingress gateway. Every wait has a deadline; tolerances are wide on purpose.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pilotfish_tests::mesh::Mesh;
use pilotfish_tests::{
    blocking, envoy_stat, free_port, http_get, http_request, wait_for, Response,
};

const READY: Duration = Duration::from_secs(30);

/// An instance line of a registry: `(node, ip, port, mesh_port, version)`; no node = outside
/// the mesh, reached directly.
struct Inst {
    node: Option<String>,
    address: String,
    port: u16,
    mesh_port: u16,
    version: &'static str,
}

fn service(name: &str, protocol: &str, port: u16, instances: &[Inst]) -> String {
    let mut out = format!("[services.{name}]\nprotocol = \"{protocol}\"\nport = {port}\n");
    for i in instances {
        out.push_str(&format!("\n[[services.{name}.instances]]\n"));
        if let Some(node) = &i.node {
            out.push_str(&format!("node = \"{node}\"\nmesh_port = {}\n", i.mesh_port));
        }
        out.push_str(&format!(
            "address = \"{}\"\nport = {}\nlabels = {{ version = \"{}\" }}\n",
            i.address, i.port, i.version
        ));
    }
    out.push('\n');
    out
}

/// A mesh with vm-a (client), vm-b and vm-c (apps).
fn three_hosts() -> Result<Mesh> {
    let mut mesh = Mesh::start()?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    Ok(mesh)
}

/// Start app `name`/`version` on `node`'s address; the registry instance for it.
fn app(
    mesh: &mut Mesh,
    node: &str,
    name: &str,
    version: &'static str,
    extra: &[&str],
) -> Result<Inst> {
    let (ip, mesh_port) = {
        let h = mesh.host(node);
        (h.ip, h.mesh_port)
    };
    let port = mesh.start_app(name, version, ip, extra)?;
    Ok(Inst {
        node: Some(node.to_string()),
        address: ip.to_string(),
        port,
        mesh_port,
        version,
    })
}

async fn ready(mesh: &Mesh) -> Result<()> {
    mesh.wait_all_ready(READY).await?;
    Ok(())
}

/// Wait until `host` answers `path` through `outbound` with `status`.
async fn reachable(
    mesh: &Mesh,
    outbound: SocketAddr,
    host: &'static str,
    status: u16,
) -> Result<()> {
    let r = wait_for(&format!("{host} reachable"), READY, || async move {
        Ok(get(outbound, host, "/", &[])
            .await
            .ok()
            .filter(|r| r.status == status))
    })
    .await;
    if let Err(e) = r {
        bail!("{e:#}\n{}", mesh.logs());
    }
    Ok(())
}

async fn get(
    addr: SocketAddr,
    host: &'static str,
    path: &'static str,
    headers: &[(&'static str, &'static str)],
) -> Result<Response> {
    let headers = headers.to_vec();
    blocking(move || http_request(addr, "GET", host, path, &headers, "")).await
}

/// Status codes of `n` sequential calls.
async fn statuses(
    addr: SocketAddr,
    host: &'static str,
    path: &'static str,
    n: usize,
) -> BTreeMap<u16, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let status = get(addr, host, path, &[]).await.map_or(0, |r| r.status);
        *seen.entry(status).or_insert(0) += 1;
    }
    seen
}

fn count<K: Ord>(seen: &BTreeMap<K, usize>, k: K) -> usize {
    seen.get(&k).copied().unwrap_or(0)
}

/// Retries, timeout, fault injection (abort and delay), mirroring and the local rate limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_actions() -> Result<()> {
    let mut mesh = three_hosts()?;
    let flaky = app(
        &mut mesh,
        "vm-b",
        "flaky",
        "v1",
        &["--fail-percent", "50", "--fail-spread"],
    )?;
    let slow = app(&mut mesh, "vm-c", "slow", "v1", &["--delay-ms", "3000"])?;
    let faulty = app(&mut mesh, "vm-b", "faulty", "v1", &[])?;
    let mirrored = app(&mut mesh, "vm-b", "mirrored", "v1", &[])?;
    let shadow = app(&mut mesh, "vm-c", "shadow", "v1", &[])?;
    let limited = app(&mut mesh, "vm-c", "limited", "v1", &[])?;
    let shadow_addr = SocketAddr::new(shadow.address.parse()?, shadow.port);
    let mut reg = String::new();
    reg.push_str(&service("flaky", "http", 9080, &[flaky]));
    reg.push_str(&service("slow", "http", 9080, &[slow]));
    reg.push_str(&service("faulty", "http", 9080, &[faulty]));
    reg.push_str(&service("mirrored", "http", 9080, &[mirrored]));
    reg.push_str(&service("shadow", "http", 9080, &[shadow]));
    reg.push_str(&service("limited", "http", 9080, &[limited]));
    mesh.write_registry("services.toml", &reg)?;
    mesh.write_registry(
        "rules.toml",
        r#"[routes.flaky]
retries = { attempts = 3, on = ["5xx"], backoff = { base = "5ms", max = "20ms" } }

[routes.slow]
timeout = "500ms"

[[routes.faulty.rules]]
match = { path_prefix = "/delay" }
to = [{}]
fault = { delay = { fixed = "300ms", percent = 100 } }

[[routes.faulty.rules]]
to = [{}]
fault = { abort = { status = 418, percent = 50 } }

[[routes.mirrored.rules]]
to = [{}]
mirror = { service = "shadow", percent = 100 }

[policies.limited]
rate_limit = { requests = 5, per = "1m" }
"#,
    )?;
    ready(&mesh).await?;
    let out = mesh.host("vm-a").outbound;
    reachable(&mesh, out, "mirrored", 200).await?;

    // Retries: every other request fails at the app; callers see (nearly) none of it.
    let seen = statuses(out, "flaky", "/", 100).await;
    println!("flaky with retries: {seen:?}");
    assert!(
        count(&seen, 200) >= 98,
        "retries hide a 50% failing backend: {seen:?}"
    );

    // Timeout: a 3s backend behind a 500ms route timeout answers 504 after about 500ms.
    let start = Instant::now();
    let r = get(out, "slow", "/", &[]).await?;
    let took = start.elapsed();
    println!("slow: {} after {took:?}", r.status);
    assert_eq!(r.status, 504, "timeout: {r:?}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2000),
        "504 after {took:?}, want ~500ms"
    );

    // Abort: 50% of requests get 418 from Envoy.
    let seen = statuses(out, "faulty", "/", 200).await;
    println!("faulty abort 50%: {seen:?}");
    let aborted = count(&seen, 418);
    assert!(
        (60..=140).contains(&aborted),
        "~100 of 200 aborted: {seen:?}"
    );
    assert_eq!(aborted + count(&seen, 200), 200, "{seen:?}");
    // Delay: every /delay request waits ~300ms, then reaches the app.
    for _ in 0..3 {
        let start = Instant::now();
        let r = get(out, "faulty", "/delay", &[]).await?;
        let took = start.elapsed();
        println!("faulty /delay: {} after {took:?}", r.status);
        assert_eq!(r.status, 200);
        assert!(took >= Duration::from_millis(280), "delayed only {took:?}");
    }

    // Mirroring: callers only see mirrored; the shadow gets a copy of each request.
    let before: u64 = blocking(move || http_get(shadow_addr, "shadow", "/__count"))
        .await?
        .body
        .trim()
        .parse()?;
    for _ in 0..20 {
        let r = get(out, "mirrored", "/", &[]).await?;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-served-by"), Some("mirrored-v1"));
    }
    let copies = wait_for(
        "20 copies at the shadow",
        Duration::from_secs(10),
        || async move {
            let n: u64 = blocking(move || http_get(shadow_addr, "shadow", "/__count"))
                .await?
                .body
                .trim()
                .parse()?;
            Ok((n >= before + 20).then_some(n - before))
        },
    )
    .await?;
    println!("shadow received {copies} copies of 20 requests");

    // Local rate limit: 5 per minute; the rest get 429 with the header.
    let mut ok = 0;
    let mut limited_with_header = 0;
    for _ in 0..15 {
        let r = get(out, "limited", "/", &[]).await?;
        match r.status {
            200 => ok += 1,
            429 if r.header("x-pilotfish-ratelimited") == Some("true") => limited_with_header += 1,
            other => bail!("unexpected {other}: {r:?}"),
        }
    }
    println!("rate limit 5/min: {ok} ok, {limited_with_header} x 429");
    assert!((1..=6).contains(&ok), "{ok} passed the limit of 5");
    assert!(limited_with_header >= 9, "{limited_with_header} refused");
    Ok(())
}

/// Circuit breaking, outlier detection and ring hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_policies() -> Result<()> {
    let mut mesh = three_hosts()?;
    let pool = app(&mut mesh, "vm-b", "pool", "v1", &["--delay-ms", "1000"])?;
    let good = app(&mut mesh, "vm-b", "outlier", "v1", &[])?;
    let bad = app(
        &mut mesh,
        "vm-c",
        "outlier",
        "v2",
        &["--fail-percent", "100"],
    )?;
    let h1 = app(&mut mesh, "vm-b", "hashed", "v1", &[])?;
    let h2 = app(&mut mesh, "vm-c", "hashed", "v2", &[])?;
    let mut reg = String::new();
    reg.push_str(&service("pool", "http", 9080, &[pool]));
    reg.push_str(&service("outlier", "http", 9080, &[good, bad]));
    reg.push_str(&service("hashed", "http", 9080, &[h1, h2]));
    mesh.write_registry("services.toml", &reg)?;
    mesh.write_registry(
        "policies.toml",
        r#"[policies.pool]
connection_pool = { max_connections = 1, max_pending_requests = 1, max_requests = 1 }

[policies.outlier]
outlier_detection = { consecutive_5xx = 2, interval = "1s", base_ejection_time = "1m", max_ejection_percent = 100 }

[policies.hashed]
load_balancer = "ring_hash"
hash = { header = "x-user" }
"#,
    )?;
    ready(&mesh).await?;
    let out = mesh.host("vm-a").outbound;
    reachable(&mesh, out, "hashed", 200).await?;

    // Circuit breaking: 10 concurrent calls to a 1s backend with room for 1 active + 1 pending.
    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(get(out, "pool", "/", &[])))
        .collect();
    let mut seen = BTreeMap::new();
    for c in calls {
        let r = c.await??;
        let overflow = r.header("x-envoy-overloaded").is_some();
        *seen.entry((r.status, overflow)).or_insert(0) += 1;
    }
    println!("circuit breaking, 10 concurrent: {seen:?}");
    let refused = count(&seen, (503, true));
    assert!(refused >= 5, "most calls refused by the breaker: {seen:?}");
    assert!(
        count(&seen, (200, false)) >= 1,
        "some calls served: {seen:?}"
    );

    // Outlier detection: the always-failing instance is ejected after 2 consecutive 5xx.
    let start = Instant::now();
    wait_for(
        "failing instance ejected",
        Duration::from_secs(15),
        || async move {
            let seen = statuses(out, "outlier", "/", 20).await;
            Ok((count(&seen, 200) == 20).then_some(()))
        },
    )
    .await?;
    let admin = mesh.host("vm-a").admin;
    let ejected = blocking(move || {
        envoy_stat(
            admin,
            "cluster.outbound|outlier.outlier_detection.ejections_enforced_total",
        )
    })
    .await?
    .unwrap_or(0);
    println!(
        "outlier: all 20 calls ok {:?} after start, ejections {ejected}",
        start.elapsed()
    );
    assert!(ejected >= 1, "an ejection was enforced");

    // Ring hash on x-user: each user sticks to one instance.
    let mut spread = BTreeMap::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut who = BTreeMap::new();
        for _ in 0..10 {
            let r = get(out, "hashed", "/", &[("x-user", user)]).await?;
            assert_eq!(r.status, 200);
            *who.entry(r.header("x-served-by").unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
        assert_eq!(who.len(), 1, "{user} went to one instance: {who:?}");
        *spread
            .entry(who.into_keys().next().unwrap_or_default())
            .or_insert(0) += 1;
    }
    println!("ring hash: users per instance {spread:?}");
    Ok(())
}

/// HTTP/2 (gRPC-style) balancing per request, a weighted TCP service on its local port, an
/// external service by DNS name, and the ingress gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_external_and_gateway() -> Result<()> {
    let mut mesh = three_hosts()?;
    mesh.add_host("gw-1", 5)?;
    let g1 = app(&mut mesh, "vm-b", "greeter", "v1", &["--h2c"])?;
    let g2 = app(&mut mesh, "vm-c", "greeter", "v2", &["--h2c"])?;
    // TCP instances outside the mesh (plaintext mesh ports carry HTTP only).
    let mut t1 = app(&mut mesh, "vm-b", "db", "v1", &[])?;
    let mut t2 = app(&mut mesh, "vm-c", "db", "v2", &[])?;
    t1.node = None;
    t2.node = None;
    let a_ip = mesh.host("vm-a").ip;
    let tcp_port = free_port(a_ip);
    let localhost: IpAddr = "127.0.0.1".parse()?;
    let ext_port = mesh.start_app("ext", "v1", localhost, &[])?;
    let ext = Inst {
        node: None,
        address: "localhost".into(),
        port: ext_port,
        mesh_port: 0,
        version: "v1",
    };
    let web = app(&mut mesh, "vm-b", "web", "v1", &[])?;
    let gw_ip = mesh.host("gw-1").ip;
    let gw_addr = SocketAddr::new(gw_ip, free_port(gw_ip));
    let mut reg = String::new();
    reg.push_str(&service("greeter", "grpc", 9090, &[g1, g2]));
    reg.push_str(&service("db", "tcp", tcp_port, &[t1, t2]));
    reg.push_str(&service("ext", "http", 9080, &[ext]));
    reg.push_str(&service("web", "http", 9080, &[web]));
    reg.push_str(&format!(
        r#"[policies.db]
subsets = {{ v1 = {{ version = "v1" }}, v2 = {{ version = "v2" }} }}

[[routes.db.rules]]
to = [{{ subset = "v1", weight = 50 }}, {{ subset = "v2", weight = 50 }}]

[gateways.public]
node = "gw-1"
listen = "{gw_addr}"

[[gateways.public.routes]]
host = "shop.example.com"
path_prefix = "/"
service = "web"
"#
    ));
    mesh.write_registry("services.toml", &reg)?;
    ready(&mesh).await?;
    let out = mesh.host("vm-a").outbound;
    reachable(&mesh, out, "web", 200).await?;

    // HTTP/2: 40 requests on ONE connection spread over both instances.
    let seen = h2_calls(out, "greeter:9090", 40).await?;
    println!("grpc over one h2 connection: {seen:?}");
    assert!(
        count(&seen, "greeter-v1".to_string()) >= 5 && count(&seen, "greeter-v2".to_string()) >= 5,
        "per-request balancing: {seen:?}"
    );

    // TCP: the service's port on vm-a's outbound address, split 50/50 by connection.
    let tcp = SocketAddr::new(a_ip, tcp_port);
    wait_for("tcp listener", READY, || async move {
        Ok(blocking(move || http_get(tcp, "db", "/"))
            .await
            .ok()
            .filter(|r| r.status == 200))
    })
    .await?;
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let r = blocking(move || http_get(tcp, "db", "/")).await?;
        *seen
            .entry(r.header("x-served-by").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    println!("tcp 50/50: {seen:?}");
    assert!(
        count(&seen, "db-v1".to_string()) >= 8 && count(&seen, "db-v2".to_string()) >= 8,
        "{seen:?}"
    );

    // External service by DNS name.
    reachable(&mesh, out, "ext", 200).await?;
    let r = get(out, "ext", "/", &[]).await?;
    println!(
        "external by DNS: {} {:?}",
        r.status,
        r.header("x-served-by")
    );
    assert_eq!(r.header("x-served-by"), Some("ext-v1"));

    // Ingress gateway: an outside request with the gateway's Host reaches web; others 404.
    let r = wait_for("gateway routes into the mesh", READY, || async move {
        Ok(
            blocking(move || http_get(gw_addr, "shop.example.com", "/products"))
                .await
                .ok()
                .filter(|r| r.status == 200),
        )
    })
    .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let status = blocking({
                let http = mesh.http;
                move || pilotfish_tests::admin_get(http, "/status")
            })
            .await
            .unwrap_or_default();
            bail!("{e:#}\nstatus: {status}\n{}", mesh.logs())
        }
    };
    println!("gateway: {} {:?}", r.status, r.header("x-served-by"));
    assert_eq!(r.header("x-served-by"), Some("web-v1"));
    let other = blocking(move || http_get(gw_addr, "elsewhere.example.com", "/")).await?;
    assert_eq!(other.status, 404, "unknown Host at the gateway");
    Ok(())
}

/// `n` HTTP/2 (prior knowledge) POSTs with `content-type: application/grpc` over one
/// connection; who answered each.
async fn h2_calls(addr: SocketAddr, authority: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    let driver = tokio::spawn(conn);
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let req = http::Request::post(format!("http://{authority}/greeter.Greeter/SayHello"))
            .header("content-type", "application/grpc")
            .body(Full::new(bytes::Bytes::from_static(b"\0\0\0\0\0")))?;
        let resp = sender.send_request(req).await?;
        let who = resp
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string();
        let _ = resp.into_body().collect().await?;
        *seen.entry(who).or_insert(0) += 1;
    }
    drop(sender);
    driver.abort();
    Ok(seen)
}
