//! A small HTTP app for the demo and the end-to-end tests: it answers every request with its
//! service name and version, so a caller can see which instance the mesh picked.
//!
//! `pilotfish-sample-app --listen 127.0.0.3:9080 --name reviews --version v1 [--fail-percent 50]`

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
    served: AtomicU64,
}

async fn answer(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> impl IntoResponse {
    let n = app.served.fetch_add(1, Ordering::Relaxed);
    let who = format!("{}-{}", app.name, app.version);
    // Deterministic failures: every request whose sequence number falls in the first
    // `fail_percent` of each hundred fails, so a test sees exactly that share.
    if n % 100 < app.fail_percent {
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
        served: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("{}-{} listening on {listen}", app.name, app.version);
    let router = axum::Router::new().fallback(answer).with_state(app);
    axum::serve(listener, router).await?;
    Ok(())
}
