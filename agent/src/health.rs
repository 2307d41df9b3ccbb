//! The agent's own HTTP endpoint (`health`, default 127.0.0.1:15020): readiness for load
//! balancers and systemd, and Prometheus metrics: the agent's own and, in the same scrape, its
//! Envoy's (`/stats/prometheus`, as Istio merges them), so one scrape job per host is enough
//! and Envoy's admin port stays on loopback.
//!
//! Readiness asks Envoy's admin `/ready` at request time rather than caching it, so it is
//! never staler than the probe that reads it.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::envoy::admin::Admin;
use crate::status::AgentStatus;

#[derive(Clone)]
pub struct Health {
    pub status: Arc<AgentStatus>,
    pub admin: Admin,
}

impl Health {
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let app = Router::new()
            .route("/healthz/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(self);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    /// Ready for traffic: an Envoy runs and its admin `/ready` answers 200 (it has its first
    /// config). `/healthz/ready` and systemd's `READY=1` both mean this.
    pub async fn is_ready(&self) -> bool {
        self.status.envoy_up() && self.admin.ready().await
    }
}

async fn ready(State(h): State<Health>) -> impl IntoResponse {
    if h.is_ready().await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "envoy not ready\n")
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    let mut body = render_metrics(&h.status);
    // Envoy's metric names all start with `envoy_`, so the two sets never clash. While Envoy
    // is down (restarting) the agent's own metrics still answer, with envoy_up 0.
    if h.status.envoy_up() {
        match h.admin.prometheus_stats().await {
            Ok(stats) => body.push_str(&String::from_utf8_lossy(&stats)),
            Err(e) => tracing::debug!(error = %e, "Envoy's metrics are not in this scrape"),
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

pub fn render_metrics(s: &AgentStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "pilotfish_agent_envoy_restarts_total",
        "counter",
        "Times the agent restarted Envoy after it exited or failed to start.",
        s.envoy_restarts(),
    );
    metric(
        "pilotfish_agent_envoy_up",
        "gauge",
        "1 while an Envoy process is running.",
        u64::from(s.envoy_up()),
    );
    metric(
        "pilotfish_agent_xds_upstream_connected",
        "gauge",
        "1 while Envoy's xDS stream is relayed to discovery.",
        u64::from(s.upstream_connected()),
    );
    metric(
        "pilotfish_agent_xds_served_from_cache",
        "gauge",
        "1 while Envoy is served from the agent's xDS cache because discovery is unreachable.",
        u64::from(s.served_from_cache()),
    );
    metric(
        "pilotfish_agent_enrolled",
        "gauge",
        "1 while the agent holds a valid node certificate.",
        u64::from(s.enrolled()),
    );
    metric(
        "pilotfish_agent_certificate_renewals_total",
        "counter",
        "Certificates obtained with the node certificate (node renewals and service certificates).",
        s.certificate_renewals(),
    );
    let name = "pilotfish_agent_certificate_expiry_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Seconds until each held certificate expires (negative: expired).\n\
         # TYPE {name} gauge"
    );
    let now = std::time::SystemTime::now();
    for (identity, not_after) in s.certificates() {
        let secs = match not_after.duration_since(now) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        let _ = writeln!(out, "{name}{{identity=\"{identity}\"}} {secs}");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_and_readiness() {
        let status = Arc::new(AgentStatus::default());
        status.envoy_restarted();
        let admin_port = crate::testutil::free_port();
        let health = Health {
            status: status.clone(),
            admin: Admin::new(([127, 0, 0, 1], admin_port).into()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(health.run(listener, shutdown.clone()));

        let (code, body) = crate::testutil::http_get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("pilotfish_agent_envoy_restarts_total 1"),
            "{body}"
        );
        assert!(body.contains("pilotfish_agent_envoy_up 0"));
        assert!(body.contains("pilotfish_agent_xds_upstream_connected 0"));
        assert!(body.contains("pilotfish_agent_xds_served_from_cache 0"));
        assert!(body.contains("pilotfish_agent_enrolled 0"));
        assert!(body.contains("pilotfish_agent_certificate_renewals_total 0"));
        status.set_certificates(
            [(
                "spiffe://pilotfish.local/node/vm-b".to_string(),
                std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
            )]
            .into(),
            true,
        );
        let (_, body) = crate::testutil::http_get(addr, "/metrics").await;
        assert!(body.contains("pilotfish_agent_enrolled 1"), "{body}");
        let line = body
            .lines()
            .find(|l| l.starts_with("pilotfish_agent_certificate_expiry_seconds{"))
            .unwrap();
        assert!(
            line.starts_with(
                "pilotfish_agent_certificate_expiry_seconds{identity=\"spiffe://pilotfish.local/node/vm-b\"} 35"
            ),
            "{line}"
        );
        // No Envoy behind the admin address: not ready.
        let (code, _) = crate::testutil::http_get(addr, "/healthz/ready").await;
        assert_eq!(code, 503);

        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
