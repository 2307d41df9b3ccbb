//! Tracing, end to end, on a secure mesh with real Envoy and a Zipkin collector in the test.
//!
//! productpage on vm-a and reviews on vm-b have `[tracing] zipkin` pointing at the collector;
//! ratings on vm-d has no `[tracing]`. A request from productpage to reviews leaves a CLIENT
//! span from vm-a's Envoy and a SERVER span from vm-b's Envoy in one trace, the server's parent
//! being the client's span (Envoy's Zipkin tracer with `shared_span_context = false`). vm-d's
//! Envoy sends nothing, and reviews' span for its request starts a trace of its own.
//!
//! The collector is a small HTTP server that accepts what Envoy posts to Zipkin's
//! `POST /api/v2/spans` (a JSON array of v2 spans) and answers 202 like Zipkin does.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Json;
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::{blocking, envoy_stat, http_request, wait_for, Response};
use serde_json::Value;
use tokio::time::Instant;

const READY: Duration = Duration::from_secs(30);
/// Envoy's Zipkin reporter posts its buffer every 5 s (or once 5 spans wait).
const FLUSH: Duration = Duration::from_secs(5);
const REPORTED: Duration = Duration::from_secs(20);

/// What the collector received: every span, and any request that was not a span post.
#[derive(Debug, Default)]
struct Received {
    spans: Vec<Value>,
    unexpected: Vec<String>,
}

type Shared = Arc<Mutex<Received>>;

async fn spans(State(got): State<Shared>, Json(batch): Json<Vec<Value>>) -> StatusCode {
    got.lock()
        .unwrap_or_else(|e| e.into_inner())
        .spans
        .extend(batch);
    StatusCode::ACCEPTED
}

async fn elsewhere(State(got): State<Shared>, uri: Uri) -> StatusCode {
    got.lock()
        .unwrap_or_else(|e| e.into_inner())
        .unexpected
        .push(uri.to_string());
    StatusCode::NOT_FOUND
}

/// A Zipkin stand-in on `ip`, served until `stop` fires.
struct Collector {
    addr: SocketAddr,
    got: Shared,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Collector {
    async fn start(ip: IpAddr) -> Result<Collector> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let got = Shared::default();
        let router = axum::Router::new()
            .route("/api/v2/spans", axum::routing::post(spans))
            .fallback(elsewhere)
            .with_state(got.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Collector {
            addr,
            got,
            stop,
            task,
        })
    }

    fn spans(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spans
            .clone()
    }

    async fn shutdown(self) -> Result<Vec<String>> {
        let _ = self.stop.send(());
        self.task.await??;
        let got = self.got.lock().unwrap_or_else(|e| e.into_inner());
        Ok(got.unexpected.clone())
    }
}

fn registry(mesh: &Mesh, reviews_port: u16) -> String {
    let calls = "upstreams = [\"reviews\"]";
    mesh.service_toml("productpage", calls, &[("vm-a", 9080, "")])
        + &mesh.service_toml("ratings", calls, &[("vm-d", 9080, "")])
        + &mesh.service_toml("reviews", "", &[("vm-b", reviews_port, "")])
}

async fn get(outbound: SocketAddr, path: &str) -> Result<Response> {
    let path = path.to_string();
    blocking(move || http_request(outbound, "GET", "reviews", &path, &[], "")).await
}

/// The span of `kind` that `node`'s Envoy reported for a request to `path`.
fn span_for(spans: &[Value], node: &str, kind: &str, path: &str) -> Option<Value> {
    spans
        .iter()
        .find(|s| {
            s["kind"] == kind
                && s["localEndpoint"]["serviceName"] == node
                && s["tags"]["http.url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(path))
        })
        .cloned()
}

async fn reported(collector: &Collector, node: &str, kind: &str, path: &str) -> Result<Value> {
    wait_for(
        &format!("{kind} span from {node} for {path}"),
        REPORTED,
        || async move { Ok(span_for(&collector.spans(), node, kind, path)) },
    )
    .await
    .with_context(|| format!("spans received: {:#}", Value::from(collector.spans())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_and_callee_spans_form_one_trace() -> Result<()> {
    let mut mesh = Mesh::start_opts(MeshOptions {
        secure: true,
        ..MeshOptions::default()
    })?;
    let collector = Collector::start(mesh.net.host(9)).await?;
    // `add_host_with` appends to the end of agent.toml, so a table can follow [envoy].
    let tracing = format!("\n[tracing]\nzipkin = \"{}\"\n", collector.addr);
    mesh.add_host_with("vm-a", 2, &tracing)?;
    mesh.add_host_with("vm-b", 3, &tracing)?;
    mesh.add_host("vm-d", 5)?;
    let b_ip = mesh.host("vm-b").ip;
    let port = mesh.start_app("reviews", "v1", b_ip, &[])?;
    mesh.write_registry("services.toml", &registry(&mesh, port))?;
    mesh.wait_all_ready(READY).await?;
    let a_out = mesh.host("vm-a").outbound;
    let d_out = mesh.host("vm-d").outbound;
    for out in [a_out, d_out] {
        let up = wait_for("reviews reachable over mTLS", READY, || async move {
            Ok(get(out, "/warmup").await.ok().filter(|r| r.status == 200))
        })
        .await;
        if let Err(e) = up {
            bail!("{e:#}\n{}", mesh.logs());
        }
    }

    // vm-d first: by the time vm-a's spans are in, a span of vm-d's would have been flushed.
    let r = get(d_out, "/reviews/from-ratings").await?;
    assert_eq!(r.status, 200);
    let d_done = Instant::now();
    let r = get(a_out, "/reviews/from-productpage").await?;
    assert_eq!(r.status, 200);

    let path = "/reviews/from-productpage";
    let client = match reported(&collector, "vm-a", "CLIENT", path).await {
        Ok(s) => s,
        Err(e) => bail!("{e:#}\n{}", mesh.logs()),
    };
    let server = reported(&collector, "vm-b", "SERVER", path).await?;

    // One trace, two hops: the callee's span is a child of the caller's.
    let trace_id = client["traceId"].as_str().unwrap_or_default();
    assert_eq!(trace_id.len(), 32, "a 128-bit trace id: {client}");
    assert_eq!(
        server["traceId"], trace_id,
        "caller {client}\ncallee {server}"
    );
    assert_eq!(
        server["parentId"], client["id"],
        "caller {client}\ncallee {server}"
    );
    assert_ne!(server["id"], client["id"], "separate spans: {server}");
    // The app sent no trace headers: vm-a's Envoy started the trace.
    assert!(client.get("parentId").is_none(), "a root span: {client}");
    // The x-request-id of the access log ties the two spans to the log lines.
    let request_id = &client["tags"]["guid:x-request-id"];
    assert!(request_id.is_string(), "{client}");
    assert_eq!(&server["tags"]["guid:x-request-id"], request_id);
    assert_eq!(client["tags"]["upstream_cluster"], "outbound|reviews");
    assert_eq!(server["tags"]["upstream_cluster"], "inbound|reviews");
    for span in [&client, &server] {
        assert_eq!(span["tags"]["http.status_code"], "200", "{span}");
        assert!(span["duration"].as_u64().is_some(), "{span}");
    }

    // vm-d has no [tracing]: reviews' span for its request starts a trace of its own.
    let from_d = reported(&collector, "vm-b", "SERVER", "/reviews/from-ratings").await?;
    assert!(from_d.get("parentId").is_none(), "no caller span: {from_d}");
    // A span vm-d's Envoy had made would have been posted within one flush interval: a bound
    // on how long to look for something that must not come, not a wait for readiness.
    tokio::time::sleep_until(d_done + FLUSH + Duration::from_secs(1)).await;
    let spans = collector.spans();
    let from_vm_d: Vec<&Value> = spans
        .iter()
        .filter(|s| s["localEndpoint"]["serviceName"] == "vm-d")
        .collect();
    assert!(from_vm_d.is_empty(), "vm-d has no [tracing]: {from_vm_d:?}");
    assert!(
        spans
            .iter()
            .all(|s| s["traceId"] != from_d["traceId"]
                || s["localEndpoint"]["serviceName"] == "vm-b"),
        "only vm-b is in the trace of vm-d's request"
    );

    // The stats the README's troubleshooting points to: vm-a's posts were accepted, vm-d
    // has no Zipkin tracer at all.
    let a_admin = mesh.host("vm-a").admin;
    wait_for("vm-a's reports_sent", READY, || async move {
        let sent = blocking(move || envoy_stat(a_admin, "tracing.zipkin.reports_sent")).await?;
        Ok(sent.filter(|n| *n >= 1))
    })
    .await?;
    let d_admin = mesh.host("vm-d").admin;
    let d_spans = blocking(move || envoy_stat(d_admin, "tracing.zipkin.spans_sent")).await?;
    assert_eq!(d_spans, None, "vm-d has no tracer");

    let unexpected = collector.shutdown().await?;
    assert_eq!(
        unexpected,
        Vec::<String>::new(),
        "posts elsewhere than /api/v2/spans"
    );
    Ok(())
}
