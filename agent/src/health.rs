//! The agent's own HTTP endpoint (`health`, default 127.0.0.1:15020): readiness for load
//! balancers and systemd, and Prometheus metrics: the agent's own and, in the same scrape, its
//! Envoy's (`/stats/prometheus`, as Istio merges them), so one scrape job per host is enough
//! and Envoy's admin port stays on loopback.
//!
//! Readiness asks Envoy's admin `/ready` at request time rather than caching it, so it is
//! never staler than the probe that reads it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
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
    /// config), and with `[interception]` the agent's table is in place (so `<service>.mesh`
    /// answers and captured connections reach Envoy). `/healthz/ready` and systemd's `READY=1`
    /// both mean this.
    pub async fn is_ready(&self) -> bool {
        self.status.envoy_up()
            && self.status.envoy_started()
            && self.status.interception_ready()
            && self.admin.ready().await
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
    // Envoy's metric names all start with `envoy_`, so the two sets never clash, and both are
    // the classic text format. While Envoy is down (restarting) the agent's own metrics still
    // answer, with envoy_up 0.
    if h.status.envoy_up() {
        match h.admin.prometheus_stats().await {
            Ok(stats) => append_envoy(&mut body, &stats),
            Err(e) => tracing::debug!(error = %e, "Envoy's metrics are not in this scrape"),
        }
    }
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        body,
    )
}

/// Appends Envoy's `/stats/prometheus` text after ours, on a line of its own.
fn append_envoy(body: &mut String, stats: &[u8]) {
    if !body.is_empty() && !body.ends_with('\n') {
        body.push('\n');
    }
    body.push_str(&String::from_utf8_lossy(stats));
    if !body.ends_with('\n') {
        body.push('\n');
    }
}

/// The agent's own metrics (`pilotfish_agent_*`), read from its status at scrape time, in the
/// Prometheus text format 0.0.4: the format Envoy's `/stats/prometheus` speaks, so the two
/// concatenate into one valid scrape (OpenMetrics would need its `# EOF` last and forbids
/// Envoy's counter names).
pub fn render_metrics(status: &Arc<AgentStatus>) -> String {
    let mut registry = Registry::with_prefix("pilotfish_agent");
    registry.register_collector(Box::new(AgentMetrics(Arc::clone(status))));
    let mut out = String::new();
    // Writing into a String cannot fail, and the collector never returns an error.
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding the agent's metrics failed");
    }
    out
}

/// The agent's status as metrics.
#[derive(Debug)]
struct AgentMetrics(Arc<AgentStatus>);

impl Collector for AgentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let counters = [
            (
                "envoy_restarts",
                "Times the agent restarted Envoy after it exited or failed to start.",
                s.envoy_restarts(),
            ),
            (
                "certificate_renewals",
                "Certificates obtained with the node certificate (node renewals and service \
                 certificates).",
                s.certificate_renewals(),
            ),
            (
                "interception_failures",
                "Times nft could not run or refused the interception table ([interception]).",
                s.interception_failures(),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "envoy_up",
                "1 while an Envoy process is running.",
                s.envoy_up(),
            ),
            (
                "xds_upstream_connected",
                "1 while Envoy's xDS stream is relayed to discovery.",
                s.upstream_connected(),
            ),
            (
                "xds_served_from_cache",
                "1 while Envoy is served from the agent's xDS cache because discovery is \
                 unreachable.",
                s.served_from_cache(),
            ),
            (
                "enrolled",
                "1 while the agent holds a valid node certificate.",
                s.enrolled(),
            ),
        ];
        let installed = (
            "interception_installed",
            "1 while the agent's nftables table (ip pilotfish) is in place.",
            s.interception_installed(),
        );
        for (name, help, value) in gauges.into_iter().chain([installed]) {
            let gauge = ConstGauge::new(i64::from(value));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let names = ConstGauge::new(i64::try_from(s.mesh_names()).unwrap_or(i64::MAX));
        names.encode(encoder.encode_descriptor(
            "dns_mesh_names",
            "Services whose <service>.<domain> name mesh DNS answers with a VIP.",
            None,
            names.metric_type(),
        )?)?;
        let mut expiry = encoder.encode_descriptor(
            "certificate_expiry_seconds",
            "Seconds until each held certificate expires (negative: expired).",
            None,
            MetricType::Gauge,
        )?;
        let now = std::time::SystemTime::now();
        for (identity, not_after) in s.certificates() {
            let secs = match not_after.duration_since(now) {
                Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
            };
            let labels = [("identity", identity.as_str())];
            ConstGauge::new(secs).encode(expiry.encode_family(&labels)?)?;
        }
        Ok(())
    }
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

        let (code, head, body) = crate::testutil::http_get_with_head(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
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

    /// What Envoy's `/stats/prometheus` looks like: classic text, TYPE lines without HELP, a
    /// counter named `_total` and one not, empty braces, a histogram in milliseconds.
    const ENVOY_STATS: &str = "\
# TYPE envoy_cluster_upstream_cx_total counter
envoy_cluster_upstream_cx_total{envoy_cluster_name=\"reviews\"} 3
# TYPE envoy_cluster_upstream_rq_completed counter
envoy_cluster_upstream_rq_completed{envoy_cluster_name=\"reviews\"} 3
# TYPE envoy_server_live gauge
envoy_server_live{} 1
# TYPE envoy_cluster_upstream_cx_connect_ms histogram
envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name=\"reviews\",le=\"0.5\"} 1
envoy_cluster_upstream_cx_connect_ms_bucket{envoy_cluster_name=\"reviews\",le=\"+Inf\"} 3
envoy_cluster_upstream_cx_connect_ms_sum{envoy_cluster_name=\"reviews\"} 4.5
envoy_cluster_upstream_cx_connect_ms_count{envoy_cluster_name=\"reviews\"} 3
";

    #[tokio::test]
    async fn one_scrape_holds_both_and_a_real_parser_accepts_it() {
        // A stand-in for Envoy's admin port.
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let fake_envoy = Router::new().route("/stats/prometheus", get(|| async { ENVOY_STATS }));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let envoy_task = tokio::spawn(async move {
            axum::serve(admin, fake_envoy)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        let status = Arc::new(AgentStatus::default());
        status.set_envoy_pid(Some(4242));
        status.set_certificates(
            [(
                "spiffe://pilotfish.local/ns/\"odd\"/svc".to_string(),
                std::time::SystemTime::now() - std::time::Duration::from_secs(60),
            )]
            .into(),
            false,
        );
        let own = render_metrics(&status);
        // Ours alone: valid, and nothing for the linter (names, units, help).
        assert_eq!(crate::testutil::promtool_check(&own), (0, String::new()));
        assert!(
            own.contains("# TYPE pilotfish_agent_envoy_restarts_total counter\n"),
            "{own}"
        );
        assert!(!own.contains("# EOF") && !own.contains("# UNIT"), "{own}");
        let line = own
            .lines()
            .find(|l| l.starts_with("pilotfish_agent_certificate_expiry_seconds{"))
            .unwrap();
        assert!(
            line.starts_with(
                "pilotfish_agent_certificate_expiry_seconds{identity=\"spiffe://pilotfish.local/ns/\\\"odd\\\"/svc\"} -6"
            ),
            "{line}"
        );

        let health = Health {
            status,
            admin: Admin::new(admin_addr),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(health.run(listener, shutdown.clone()));
        let (code, merged) = crate::testutil::http_get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(merged.starts_with(&own), "{merged}");
        assert!(merged.ends_with(ENVOY_STATS), "{merged}");
        // Merged: it parses; the linter's only findings are Envoy's own names (no help
        // texts, counters without `_total`), which are not ours to change.
        let (exit, said) = crate::testutil::promtool_check(&merged);
        assert!(exit == 0 || exit == 3, "promtool exit {exit}: {said}");
        for finding in said.lines() {
            assert!(finding.starts_with("envoy_"), "{finding}\nin:\n{merged}");
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
        envoy_task.await.unwrap().unwrap();
    }
}
