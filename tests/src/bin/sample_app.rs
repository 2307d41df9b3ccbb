//! A small HTTP app for the demo and the end-to-end tests: it answers every request with its
//! service name and version, so a caller can see which instance the mesh picked.
//!
//! `pilotfish-sample-app --listen 127.0.0.3:9080 --name reviews --version v1 [--fail-percent 50]
//! [--fail-spread] [--delay-ms 200] [--h2c]`
//!
//! `GET /__count` answers how many requests it served before (itself not counted), for tests
//! that count copies (mirroring). `--h2c` serves HTTP/2 with prior knowledge only (as Envoy
//! speaks to http2/grpc services).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;

#[derive(Debug)]
struct App {
    name: String,
    version: String,
    fail_percent: u64,
    delay_ms: u64,
    /// Spread failures evenly (with 50%: every other request) instead of the first N of 100.
    spread: bool,
    served: AtomicU64,
}

async fn answer(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> impl IntoResponse {
    let who = format!("{}-{}", app.name, app.version);
    if uri.path() == "/__count" {
        let n = app.served.load(Ordering::Relaxed);
        return (StatusCode::OK, [("x-served-by", who)], format!("{n}\n"));
    }
    let n = app.served.fetch_add(1, Ordering::Relaxed);
    if app.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(app.delay_ms)).await;
    }
    // Deterministic failures: every request whose sequence number falls in the first
    // `fail_percent` of each hundred fails, so a test sees exactly that share.
    let fails = if app.spread {
        (n * app.fail_percent) % 100 < app.fail_percent
    } else {
        n % 100 < app.fail_percent
    };
    if fails {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("x-served-by", who.clone())],
            format!("{who} failing on purpose\n"),
        );
    }
    let caller = headers
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    (
        StatusCode::OK,
        [("x-served-by", who.clone())],
        format!("{who} {method} {uri} xfcc={caller}\n"),
    )
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    if pilotfish_tests::help_or_version(
        "pilotfish-sample-app",
        "pilotfish-sample-app --listen ADDR [--name NAME] [--version APP_VERSION] \
         [--fail-percent N] [--fail-spread] [--delay-ms N] [--h2c]\n\n\
         An HTTP app for tests and the demo: answers every request with `<name>-<version> \
         METHOD URI xfcc=<caller>` and `x-served-by: <name>-<version>`.",
    ) {
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = arg(&args, "--listen")
        .ok_or_else(|| anyhow::anyhow!("--listen ADDR is required"))?
        .parse()?;
    let app = Arc::new(App {
        name: arg(&args, "--name").unwrap_or_else(|| "app".into()),
        version: arg(&args, "--version").unwrap_or_else(|| "v1".into()),
        fail_percent: arg(&args, "--fail-percent")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(0),
        delay_ms: arg(&args, "--delay-ms")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(0),
        spread: args.iter().any(|a| a == "--fail-spread"),
        served: AtomicU64::new(0),
    });
    let h2c = args.iter().any(|a| a == "--h2c");
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("{}-{} listening on {listen}", app.name, app.version);
    let router = axum::Router::new().fallback(answer).with_state(app);
    if !h2c {
        axum::serve(listener, router).await?;
        return Ok(());
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        });
    }
}
