//! Continuous HTTP/1.1 load through a host's outbound listener, for tests that prove a change
//! drops no request: several workers send requests back to back on keep-alive connections and
//! count every answer that is not a 200 and every connection error. Nothing is retried.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use tokio::task::JoinHandle;

/// What the load saw so far.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    /// Who answered the 200s (`x-served-by`).
    pub served_by: BTreeMap<String, u64>,
    /// The first few failures: when, and what came back.
    pub failures: Vec<(Instant, String)>,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 8 {
            self.failures.push((Instant::now(), what));
        }
    }
}

pub type Headers = &'static [(&'static str, &'static str)];

/// Continuous HTTP/1.1 load on `Host: host` through `addr`, until [`Load::stop`].
pub struct Load {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// One worker per entry of `workers`, sending those headers.
    pub fn start(addr: SocketAddr, host: &'static str, workers: &[Headers]) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = workers
            .iter()
            .map(|&headers| tokio::spawn(worker(addr, host, headers, tally.clone(), stop.clone())))
            .collect();
        Load {
            tally,
            stop,
            workers,
        }
    }

    pub fn total(&self) -> u64 {
        self.lock().total()
    }

    /// Requests that failed so far.
    pub fn failed(&self) -> u64 {
        self.lock().failed
    }

    /// Who answered so far, and how often.
    pub fn served_by(&self) -> BTreeMap<String, u64> {
        self.lock().served_by.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        lock(&self.tally)
    }

    /// Stop the workers, wait for them, and return what they saw.
    pub async fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for w in std::mem::take(&mut self.workers) {
            let _ = w.await;
        }
        std::mem::take(&mut *self.lock())
    }
}

/// A worker that panicked mid-update leaves a tally that is still worth reporting.
fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Load {
    fn drop(&mut self) {
        // A test that bails out early must not leave workers running.
        self.stop.store(true, Ordering::Relaxed);
    }
}

type Connection = (SendRequest<Empty<Bytes>>, JoinHandle<()>);

async fn connect(addr: SocketAddr) -> Result<Connection> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, driver))
}

/// Drop a connection and wait until its driver task has ended.
async fn close(conn: Option<Connection>) {
    if let Some((sender, driver)) = conn {
        drop(sender);
        driver.abort();
        let _ = driver.await;
    }
}

/// One load worker: requests back to back on one keep-alive connection, a new connection
/// whenever Envoy closed the previous one. Nothing is retried: every error counts.
async fn worker(
    addr: SocketAddr,
    host: &'static str,
    headers: Headers,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) {
    let fail = |what: String| lock(&tally).fail(what);
    let mut conn: Option<Connection> = None;
    while !stop.load(Ordering::Relaxed) {
        // A connection the server closed after its last answer (`Connection: close`, a
        // drained listener) is replaced; no request was lost on it.
        let reusable = match conn.as_mut() {
            Some((sender, _)) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            close(conn.take()).await;
            match tokio::time::timeout(Duration::from_secs(5), connect(addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => format!("{e:#}"),
                        _ => "timed out".to_string(),
                    };
                    fail(format!("connect to {addr}: {why}"));
                    // Not a readiness wait: keeps a refused listener from spinning a core.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some((sender, _)) = conn.as_mut() else {
            continue;
        };
        let mut request = http::Request::get("/reviews/1").header(http::header::HOST, host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::<Bytes>::new());
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                fail(format!("building the request: {e}"));
                break;
            }
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>((parts, body))
        })
        .await;
        match answer {
            Ok(Ok((parts, _))) if parts.status == 200 => {
                let who = parts
                    .headers
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                let mut t = lock(&tally);
                t.ok += 1;
                *t.served_by.entry(who).or_insert(0) += 1;
            }
            Ok(Ok((parts, body))) => fail(describe(&parts, &body)),
            Ok(Err(e)) => {
                fail(format!("request error: {e}"));
                close(conn.take()).await;
            }
            Err(_) => {
                fail("no answer within 10s".to_string());
                close(conn.take()).await;
            }
        }
    }
    close(conn.take()).await;
}

/// A failed answer for the report: status, who produced it, Envoy's `x-envoy-*` headers and
/// the start of the body (a local reply's body names the reason, e.g. `no healthy upstream`;
/// NC's is empty).
fn describe(parts: &http::response::Parts, body: &Bytes) -> String {
    let mut out = format!("HTTP {}", parts.status.as_u16());
    for (name, value) in &parts.headers {
        let name = name.as_str();
        if name == "server" || name == "x-served-by" || name.starts_with("x-envoy") {
            out.push_str(&format!(" {name}={}", value.to_str().unwrap_or("?")));
        }
    }
    let body = String::from_utf8_lossy(body);
    let body: String = body.trim().chars().take(160).collect();
    out.push_str(&format!(" body={body:?}"));
    out
}
