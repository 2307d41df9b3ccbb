//! One HTTP request to Consul: parameters (never `ns`/`partition` unless Enterprise is
//! configured), the token header (never in the URL), the response headers, and the mapping of
//! failures to [`ConsulError`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::config::ConsulConfig;
use super::ConsulError;

/// What Consul said about an answer besides its body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseMeta {
    /// `X-Consul-Index`; 0 when absent or unparseable.
    pub index: u64,
    pub known_leader: bool,
    pub last_contact_ms: u64,
}

/// Told how long each Consul request took, answered or failed: the datacenter, which request
/// (`services` and `checks`, the two blocking queries, whose answers wait for a change or the
/// `wait` time; `service`, one service's instances) and the time. The program embedding the
/// adapter keeps its metrics with it; this crate picks no metrics library.
pub type RequestObserver = Arc<dyn Fn(&str, &'static str, Duration) + Send + Sync>;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    config: Arc<ConsulConfig>,
    /// Read from `token_file` on first use, and again after a 403 (the file may be rotated).
    token: Arc<Mutex<Option<String>>>,
    observer: Option<RequestObserver>,
}

impl Client {
    pub fn new(config: Arc<ConsulConfig>) -> Result<Client, ConsulError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout())
            .connect_timeout(Duration::from_secs(5))
            // Long-polls hold their connection; idle ones beyond this are closed, which keeps
            // us well under Consul's per-client connection cap.
            .pool_max_idle_per_host(config.fetch_concurrency + 4)
            .build()
            .map_err(ConsulError::Client)?;
        Ok(Client {
            http,
            config,
            token: Arc::new(Mutex::new(None)),
            observer: None,
        })
    }

    /// Reports the time of every request to `observer`.
    pub fn with_observer(mut self, observer: RequestObserver) -> Client {
        self.observer = Some(observer);
        self
    }

    fn token(&self) -> Result<Option<String>, ConsulError> {
        let Some(path) = &self.config.token_file else {
            return Ok(None);
        };
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if cached.is_none() {
            let t = std::fs::read_to_string(path).map_err(|source| ConsulError::TokenFile {
                path: path.clone(),
                source,
            })?;
            *cached = Some(t.trim().to_string());
        }
        Ok(cached.clone())
    }

    fn forget_token(&self) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// GET `path` in datacenter `dc`; a blocking query when `index > 0`. `request` names it
    /// for the [`RequestObserver`].
    pub async fn get<T: DeserializeOwned>(
        &self,
        dc: &str,
        request: &'static str,
        path: &str,
        index: u64,
    ) -> Result<(T, ResponseMeta), ConsulError> {
        let started = std::time::Instant::now();
        let result = self.get_untimed(dc, path, index).await;
        if let Some(observe) = &self.observer {
            observe(dc, request, started.elapsed());
        }
        result
    }

    async fn get_untimed<T: DeserializeOwned>(
        &self,
        dc: &str,
        path: &str,
        index: u64,
    ) -> Result<(T, ResponseMeta), ConsulError> {
        let mut query: Vec<(&str, String)> = vec![("dc", dc.to_string())];
        if self.config.stale {
            query.push(("stale", String::new()));
        }
        if index > 0 {
            query.push(("index", index.to_string()));
            query.push(("wait", format!("{}ms", self.config.wait.as_millis())));
        }
        if let Some(ent) = &self.config.enterprise {
            if let Some(ns) = &ent.namespace {
                query.push(("ns", ns.clone()));
            }
            if let Some(p) = &ent.partition {
                query.push(("partition", p.clone()));
            }
        }
        let url = format!("{}{}?{}", self.config.address, path, query_string(&query));
        let (status, body, meta) = self.send(self.http.get(&url), &url, dc, path).await?;
        if status == 404 {
            return Err(ConsulError::Status {
                code: 404,
                path: path.to_string(),
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        let value = serde_json::from_slice(&body).map_err(|source| ConsulError::Decode {
            path: path.to_string(),
            source,
        })?;
        Ok((value, meta))
    }

    /// Sends `req` (to `url`, for messages) with the token header. A success or a 404 (which
    /// the KV store answers for a missing key) is returned with its body and headers; any
    /// other status becomes the [`ConsulError`] that says what to do about it.
    pub(crate) async fn send(
        &self,
        mut req: reqwest::RequestBuilder,
        url: &str,
        dc: &str,
        path: &str,
    ) -> Result<(u16, bytes::Bytes, ResponseMeta), ConsulError> {
        if let Some(t) = self.token()? {
            req = req.header("X-Consul-Token", t);
        }
        let transport = |source| ConsulError::Transport {
            url: url.to_string(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let meta = ResponseMeta {
            index: header("x-consul-index")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            known_leader: header("x-consul-knownleader").as_deref() != Some("false"),
            last_contact_ms: header("x-consul-lastcontact")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        };
        let body = resp.bytes().await.map_err(transport)?;
        if status.is_success() || status.as_u16() == 404 {
            return Ok((status.as_u16(), body, meta));
        }
        let text = String::from_utf8_lossy(&body).trim().to_string();
        Err(match status.as_u16() {
            403 => {
                self.forget_token();
                ConsulError::Acl {
                    token_file: token_file_name(&self.config.token_file),
                    body: text,
                }
            }
            429 => ConsulError::RateLimited { body: text },
            500 if text.contains("No path to datacenter") => ConsulError::UnknownDatacenter {
                dc: dc.to_string(),
                address: self.config.address.clone(),
            },
            code => ConsulError::Status {
                code,
                path: path.to_string(),
                body: text,
            },
        })
    }

    /// The HTTP client, for requests this module does not build ([`super::kv`]).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub(crate) fn config(&self) -> &ConsulConfig {
        &self.config
    }
}

fn token_file_name(p: &Option<PathBuf>) -> String {
    p.as_ref().map_or_else(
        || "(no token_file configured: the anonymous token was used)".to_string(),
        |p| p.display().to_string(),
    )
}

/// `k=v&flag&...`, values percent-encoded; a parameter with an empty value is a bare flag.
pub fn query_string(query: &[(&str, String)]) -> String {
    query
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                (*k).to_string()
            } else {
                format!("{k}={}", path_segment(v))
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes a service name for a path segment.
pub fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
