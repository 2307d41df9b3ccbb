//! A small client for Envoy's admin interface (plain HTTP/1.1 on loopback): readiness, the
//! graceful drain, and the connection gauges the drain waits on.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("envoy admin {path}: {source}")]
    Request {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("envoy admin {path}: timed out")]
    Timeout { path: String },
    #[error("envoy admin {path}: HTTP {status}")]
    Status { path: String, status: StatusCode },
}

#[derive(Clone, Debug)]
pub struct Admin {
    addr: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Admin {
    pub fn new(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Admin { addr, client }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn call(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), AdminError> {
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| AdminError::Request {
            path: path.to_string(),
            source,
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path))
            .body(Empty::new())
            .map_err(|e| fail(e.into()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| fail(e.into()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.into()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| AdminError::Timeout {
                path: path.to_string(),
            })?
    }

    /// `GET /ready` answered 200: Envoy finished initialising (first xDS fetch done).
    pub async fn ready(&self) -> bool {
        matches!(
            self.call(Method::GET, "/ready").await,
            Ok((StatusCode::OK, _))
        )
    }

    /// Starts Envoy's graceful drain: requests are discouraged (HTTP/1 `Connection: close`,
    /// HTTP/2 GOAWAY) for `--drain-time-s`, then the listeners close.
    pub async fn drain_listeners(&self) -> Result<(), AdminError> {
        let path = "/drain_listeners?graceful";
        match self.call(Method::POST, path).await? {
            (StatusCode::OK, _) => Ok(()),
            (status, _) => Err(AdminError::Status {
                path: path.into(),
                status,
            }),
        }
    }

    /// Envoy's own metrics in Prometheus text format (`/stats/prometheus`, used-only), for
    /// the agent's merged scrape.
    pub async fn prometheus_stats(&self) -> Result<Bytes, AdminError> {
        let path = "/stats/prometheus?usedonly";
        match self.call(Method::GET, path).await? {
            (StatusCode::OK, body) => Ok(body),
            (status, _) => Err(AdminError::Status {
                path: path.into(),
                status,
            }),
        }
    }

    /// Open downstream connections across all listeners, the admin listener excluded.
    pub async fn active_connections(&self) -> Result<u64, AdminError> {
        let path = "/stats?filter=downstream_cx_active";
        match self.call(Method::GET, path).await? {
            (StatusCode::OK, body) => Ok(sum_listener_connections(&String::from_utf8_lossy(&body))),
            (status, _) => Err(AdminError::Status {
                path: path.into(),
                status,
            }),
        }
    }

    /// The `--restart-epoch` of the Envoy answering on the admin port (`/server_info`).
    pub async fn epoch(&self) -> Option<u32> {
        match self.call(Method::GET, "/server_info").await {
            Ok((StatusCode::OK, body)) => {
                let info: serde_json::Value = serde_json::from_slice(&body).ok()?;
                let options = info.get("command_line_options")?;
                // A proto3 default (0) may be left out of the JSON.
                let epoch = options
                    .get("restart_epoch")
                    .map_or(Some(0), |e| e.as_u64())?;
                u32::try_from(epoch).ok()
            }
            _ => None,
        }
    }

    /// `/ready` answered 200 by the Envoy of `epoch` (not by the one it is replacing).
    pub async fn ready_at(&self, epoch: u32) -> bool {
        self.ready().await && self.epoch().await == Some(epoch)
    }

    /// Envoy's config dump (`/config_dump`), with its endpoints when `eds` (they are left out
    /// by default: a large mesh has many).
    pub async fn config_dump(&self, eds: bool) -> Result<Bytes, AdminError> {
        let path = if eds {
            "/config_dump?include_eds"
        } else {
            "/config_dump"
        };
        match self.call(Method::GET, path).await? {
            (StatusCode::OK, body) => Ok(body),
            (status, _) => Err(AdminError::Status {
                path: path.into(),
                status,
            }),
        }
    }
}

/// Sums `listener.<address>.downstream_cx_active` gauges from `/stats` text output. The admin
/// listener (our own poll is one of its connections) and per-worker breakdowns are skipped.
pub fn sum_listener_connections(stats: &str) -> u64 {
    stats
        .lines()
        .filter_map(|line| line.rsplit_once(':'))
        .filter(|(name, _)| {
            name.starts_with("listener.")
                && name.ends_with(".downstream_cx_active")
                && !name.starts_with("listener.admin.")
                && !name.contains(".worker_")
        })
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sums_listener_gauges_without_admin_or_workers() {
        let stats = "\
http.admin.downstream_cx_active: 1
http.inbound.downstream_cx_active: 2
listener.0.0.0.0_15006.downstream_cx_active: 2
listener.127.0.0.1_15001.downstream_cx_active: 3
listener.127.0.0.1_15001.worker_0.downstream_cx_active: 3
listener.admin.downstream_cx_active: 1
";
        assert_eq!(sum_listener_connections(stats), 5);
        assert_eq!(sum_listener_connections(""), 0);
    }
}
