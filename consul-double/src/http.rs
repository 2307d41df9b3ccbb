//! The HTTP surface: routing with Consul's 404/405/OPTIONS behaviour, the common parameters
//! (token, `dc`, consistency, `index`/`wait`, `filter`, Enterprise strictness), blocking reads,
//! the response headers, and the fault switches. Error bodies are plain text, as in Consul.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::seq::SliceRandom;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::json::{self, Filter};
use crate::store::{DcStore, DeregisterRequest, RegisterRequest, StoreError};
use crate::{lock, CutFault, ErrorFault, Faults, Shared};

mod kv;

const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(dispatch).with_state(shared)
}

#[derive(Debug, Clone, PartialEq)]
enum Endpoint {
    Register,
    Deregister,
    Services,
    CatalogService(String),
    HealthService(String),
    HealthState(String),
    Datacenters,
    Leader,
    /// `/v1/kv/<key>`, the key still percent-encoded.
    Kv(String),
}

fn route(path: &str) -> Option<(Endpoint, &'static [Method])> {
    const GET: &[Method] = &[Method::GET];
    const PUT: &[Method] = &[Method::PUT];
    const KV: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];
    if let Some(key) = path.strip_prefix("/v1/kv/") {
        return Some((Endpoint::Kv(key.to_string()), KV));
    }
    let ep = match path {
        "/v1/catalog/register" => return Some((Endpoint::Register, PUT)),
        "/v1/catalog/deregister" => return Some((Endpoint::Deregister, PUT)),
        "/v1/catalog/services" => Endpoint::Services,
        "/v1/catalog/datacenters" => Endpoint::Datacenters,
        "/v1/status/leader" => Endpoint::Leader,
        _ => {
            if let Some(n) = path.strip_prefix("/v1/catalog/service/") {
                Endpoint::CatalogService(percent_decode(n))
            } else if let Some(n) = path.strip_prefix("/v1/health/service/") {
                Endpoint::HealthService(percent_decode(n))
            } else if let Some(s) = path.strip_prefix("/v1/health/state/") {
                Endpoint::HealthState(percent_decode(s))
            } else if path == "/v1/catalog/service" || path == "/v1/health/service" {
                Endpoint::CatalogService(String::new())
            } else {
                return None;
            }
        }
    };
    Some((ep, GET))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(code: StatusCode, body: impl Into<String>) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

type Fail = (StatusCode, String);

fn bad(body: impl Into<String>) -> Fail {
    (StatusCode::BAD_REQUEST, body.into())
}

async fn dispatch(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if let Some(admin_path) = path.strip_prefix("/_double/") {
        let body = axum::body::to_bytes(body, 16 << 20)
            .await
            .unwrap_or_default();
        return admin(&shared, admin_path, &parts.method, &parts.uri, body);
    }
    {
        let mut r = lock(&shared.requests);
        *r.0.entry(path.clone()).or_insert(0) += 1;
        r.1 += 1;
    }
    let faults = shared.faults();
    if faults.refuse_connections {
        return cut_response(Bytes::new());
    }
    let Some((endpoint, allowed)) = route(&path) else {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    };
    let allow = std::iter::once("OPTIONS")
        .chain(allowed.iter().map(Method::as_str))
        .collect::<Vec<_>>()
        .join(",");
    if parts.method == Method::OPTIONS {
        return (StatusCode::OK, [(header::ALLOW, allow)]).into_response();
    }
    if !allowed.contains(&parts.method) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, allow)],
            format!("method {} not allowed", parts.method),
        )
            .into_response();
    }
    let query: Vec<(String, String)> = Query::try_from_uri(&parts.uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let params = match Params::parse(&shared, &query, &parts.headers) {
        Ok(p) => p,
        Err((code, msg)) => return text(code, msg),
    };
    if faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
    }
    match endpoint {
        Endpoint::Register | Endpoint::Deregister => {
            let body = match axum::body::to_bytes(body, 64 << 20).await {
                Ok(b) => b,
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("Request decode failed: {e}"),
                    )
                }
            };
            write(&shared, &endpoint, &params, &body)
        }
        Endpoint::Datacenters => {
            let dcs = lock(&shared.config).datacenters.clone();
            json_response(serde_json::to_vec(&dcs).unwrap_or_default())
        }
        Endpoint::Leader => {
            let leader = if faults.error == Some(ErrorFault::NoLeader) {
                ""
            } else {
                "127.0.0.1:8300"
            };
            json_response(serde_json::to_vec(leader).unwrap_or_default())
        }
        Endpoint::Kv(key) => {
            let req = kv::KvRequest {
                method: parts.method,
                raw_path: path.clone(),
                raw_key: key,
                query,
                content_length: parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
            };
            kv::handle(&shared, req, params, faults, body).await
        }
        _ => {
            let ep = endpoint;
            let p = params.clone();
            read(&shared, &params, faults, move |shared, faults| {
                compute(shared, &ep, &p, faults)
            })
            .await
        }
    }
}

fn json_response(body: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Sends the first part of a body, then fails the stream so hyper aborts the connection.
fn cut_response(partial: Bytes) -> Response {
    let full_len = partial.len() * 2 + 1;
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(partial),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "consul double: cut",
        )),
    ];
    let mut resp = Response::new(Body::from_stream(futures::stream::iter(chunks)));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(full_len));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn write(shared: &Shared, ep: &Endpoint, params: &Params, body: &[u8]) -> Response {
    let dc_of = |d: &str| {
        if !d.is_empty() {
            d.to_string()
        } else if !params.dc.is_empty() {
            params.dc.clone()
        } else {
            String::new()
        }
    };
    let result = match ep {
        Endpoint::Register => match serde_json::from_slice::<RegisterRequest>(body) {
            Ok(req) => {
                if req.namespace.as_deref().is_some_and(|n| !n.is_empty())
                    || req.partition.as_deref().is_some_and(|n| !n.is_empty())
                {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "Namespaces and partitions are a Consul Enterprise feature",
                    );
                }
                let dc = dc_of(&req.datacenter);
                shared.write(&dc, |s| s.register(req))
            }
            Err(e) => Err(StoreError::BadRequest(format!(
                "Request decode failed: {e}"
            ))),
        },
        _ => match serde_json::from_slice::<DeregisterRequest>(body) {
            Ok(req) => {
                let dc = dc_of(&req.datacenter);
                shared.write(&dc, |s| s.deregister(req))
            }
            Err(e) => Err(StoreError::BadRequest(format!(
                "Request decode failed: {e}"
            ))),
        },
    };
    match result {
        Ok(()) => json_response(b"true".to_vec()),
        Err(StoreError::NoPathToDatacenter) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter")
        }
        Err(StoreError::BadRequest(m)) => text(StatusCode::BAD_REQUEST, m),
    }
}

#[derive(Debug, Clone, Default)]
struct Params {
    dc: String,
    index: u64,
    wait: Duration,
    stale: bool,
    consistent: bool,
    filter: Option<Filter>,
    passing: bool,
    tags: Vec<String>,
    /// `None`: anonymous. `Some(false)`: unknown token.
    token_known: Option<bool>,
    acl_enabled: bool,
}

impl Params {
    fn parse(shared: &Shared, q: &[(String, String)], headers: &HeaderMap) -> Result<Params, Fail> {
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let has = |k: &str| q.iter().any(|(n, _)| n == k);
        if has("ns") {
            return Err(bad(
                "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature",
            ));
        }
        if has("partition") {
            return Err(bad("Invalid query parameter: \"partition\" - Partitions are a Consul Enterprise feature"));
        }
        if headers.contains_key("x-consul-namespace") {
            return Err(bad("Invalid header: \"X-Consul-Namespace\" - Namespaces are a Consul Enterprise feature"));
        }
        if headers.contains_key("x-consul-partition") {
            return Err(bad("Invalid header: \"X-Consul-Partition\" - Partitions are a Consul Enterprise feature"));
        }
        let mut p = Params {
            wait: DEFAULT_WAIT,
            ..Params::default()
        };
        // Token precedence: ?token=, X-Consul-Token, Authorization: Bearer.
        let token = get("token").map(str::to_string).or_else(|| {
            headers
                .get("x-consul-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| {
                    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
                    let (scheme, rest) = v.trim().split_once(char::is_whitespace)?;
                    scheme
                        .eq_ignore_ascii_case("bearer")
                        .then(|| rest.split_whitespace().next().unwrap_or("").to_string())
                })
        });
        let config = lock(&shared.config).clone();
        if let Some(tokens) = &config.tokens {
            p.acl_enabled = true;
            p.token_known = token.filter(|t| !t.is_empty()).map(|t| tokens.contains(&t));
            if p.token_known == Some(false) {
                return Err((StatusCode::FORBIDDEN, "ACL not found".into()));
            }
        }
        p.dc = get("dc").unwrap_or("").to_string();
        if p.dc.is_empty() {
            p.dc = config.datacenters.first().cloned().unwrap_or_default();
        }
        if !config.datacenters.contains(&p.dc) {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "No path to datacenter".into(),
            ));
        }
        p.stale = has("stale");
        p.consistent = has("consistent");
        if p.stale && p.consistent {
            return Err(bad(
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        if has("cached") && p.consistent {
            return Err(bad(
                "Cannot specify ?cached with ?consistent, conflicting semantics.",
            ));
        }
        if let Some(ms) = get("max_stale") {
            match parse_go_duration(ms) {
                Some(d) if d > Duration::ZERO => p.stale = true,
                Some(_) => {}
                None => return Err(bad(format!("Invalid max_stale value \"{ms}\""))),
            }
        }
        if let Some(i) = get("index") {
            p.index = i.parse().map_err(|_| bad("Invalid index"))?;
        }
        if let Some(w) = get("wait") {
            p.wait = parse_go_duration(w).ok_or_else(|| bad("Invalid wait time"))?;
            if p.wait.is_zero() {
                p.wait = DEFAULT_WAIT;
            }
            p.wait = p.wait.min(MAX_WAIT);
        }
        if let Some(f) = get("filter") {
            p.filter = Some(Filter::parse(f).map_err(bad)?);
        }
        if let Some(v) = get("passing") {
            p.passing = match v {
                "" | "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(bad("Invalid value for ?passing")),
            };
        }
        p.tags = q
            .iter()
            .filter(|(n, _)| n == "tag")
            .map(|(_, v)| v.clone())
            .collect();
        Ok(p)
    }
}

/// Go's `time.ParseDuration`, for the units Consul users write.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    Some(Duration::from_secs_f64(total))
}

/// The result of a read: its index and its JSON.
struct ReadResult {
    index: u64,
    body: Value,
    /// Already-serialized body: the fast path for large unfiltered reads.
    raw: Option<Vec<u8>>,
    /// 200, or 404 for a KV read that found nothing (Consul still sends the index headers).
    status: StatusCode,
    /// Headers that replace the defaults: KV `?raw` is `text/plain`, a KV 404 has no type.
    headers: HeaderMap,
    /// Entries were left out for the token: `X-Consul-Results-Filtered-By-ACLs` (named tokens).
    filtered: bool,
}

impl ReadResult {
    fn json(index: u64, body: Value) -> ReadResult {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        ReadResult {
            index,
            body,
            raw: None,
            status: StatusCode::OK,
            headers,
            filtered: false,
        }
    }
}

fn compute(
    shared: &Shared,
    ep: &Endpoint,
    p: &Params,
    faults: &Faults,
) -> Result<ReadResult, Fail> {
    let list_consul = lock(&shared.config).list_consul_service;
    let dcs = lock(&shared.dcs);
    let store = dcs.get(&p.dc).ok_or((
        StatusCode::INTERNAL_SERVER_ERROR,
        "No path to datacenter".to_string(),
    ))?;
    // Default deny with no token: everything is filtered out (anonymous: no header).
    let hide_all = p.acl_enabled && p.token_known.is_none();
    let mut r = match ep {
        Endpoint::Services => services(store, &p.dc, p, list_consul && !hide_all)?,
        Endpoint::CatalogService(name) | Endpoint::HealthService(name) if name.is_empty() => {
            return Err(bad("Missing service name"))
        }
        Endpoint::CatalogService(name) => {
            let mut out = Vec::new();
            for s in store.services.values().filter(|s| &s.name == name) {
                if !p.tags.iter().all(|t| s.tags.contains(t)) {
                    continue;
                }
                let Some(n) = store.nodes.get(&s.node) else {
                    continue;
                };
                let v = to_value(&json::service_node(n, s, &p.dc));
                if keep(&p.filter, &v)? {
                    out.push(v);
                }
            }
            ReadResult::json(store.index_of_service(name), Value::Array(out))
        }
        Endpoint::HealthService(name) => ReadResult::json(
            store.index_of_service(name),
            Value::Array(health_service(store, name, &p.dc, p)?),
        ),
        Endpoint::HealthState(state) => {
            if state.is_empty() {
                return Err(bad("Missing check state"));
            }
            if !matches!(state.as_str(), "any" | "passing" | "warning" | "critical") {
                return Err(bad(format!("Invalid check state: \"{state}\"")));
            }
            let selected = store
                .checks
                .values()
                .filter(|c| state == "any" || &c.status == state);
            if p.filter.is_none() && !faults.reorder && !hide_all && !faults.filter_results {
                // Serialize straight from the store: /v1/health/state/any carries every check.
                let checks: Vec<_> = selected.map(json::check).collect();
                let mut r = ReadResult::json(store.checks_index, Value::Null);
                r.raw = Some(serde_json::to_vec(&checks).unwrap_or_default());
                return Ok(r);
            }
            let mut out = Vec::new();
            for c in selected {
                let v = to_value(&json::check(c));
                if keep(&p.filter, &v)? {
                    out.push(v);
                }
            }
            ReadResult::json(store.checks_index, Value::Array(out))
        }
        _ => return Err(bad("not a read")),
    };
    if hide_all || faults.filter_results {
        r.filtered = faults.filter_results;
        r.body = match r.body {
            Value::Object(_) => Value::Object(Map::new()),
            _ => Value::Array(Vec::new()),
        };
    }
    if faults.reorder {
        shuffle(&mut r.body);
    }
    Ok(r)
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn keep(filter: &Option<Filter>, v: &Value) -> Result<bool, Fail> {
    match filter {
        None => Ok(true),
        Some(f) => f.matches(v).map_err(bad),
    }
}

fn shuffle(v: &mut Value) {
    let mut rng = rand::rng();
    match v {
        Value::Array(a) => {
            a.shuffle(&mut rng);
            for e in a {
                if let Some(Value::Array(checks)) = e.get_mut("Checks") {
                    checks.shuffle(&mut rng);
                }
            }
        }
        Value::Object(m) => {
            for tags in m.values_mut() {
                if let Value::Array(t) = tags {
                    t.shuffle(&mut rng);
                }
            }
        }
        _ => {}
    }
}

fn services(store: &DcStore, dc: &str, p: &Params, list_consul: bool) -> Result<ReadResult, Fail> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    if list_consul {
        out.insert("consul".into(), Vec::new());
    }
    for s in store.services.values() {
        if let Some(f) = &p.filter {
            let Some(n) = store.nodes.get(&s.node) else {
                continue;
            };
            if !f
                .matches(&to_value(&json::service_node(n, s, dc)))
                .map_err(bad)?
            {
                continue;
            }
        }
        let tags = out.entry(s.name.clone()).or_default();
        for t in &s.tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
    }
    Ok(ReadResult::json(store.services_index, to_value(&out)))
}

fn health_service(store: &DcStore, name: &str, dc: &str, p: &Params) -> Result<Vec<Value>, Fail> {
    let mut out = Vec::new();
    for s in store.services.values().filter(|s| s.name == name) {
        let Some(n) = store.nodes.get(&s.node) else {
            continue;
        };
        if !p.tags.iter().all(|t| s.tags.contains(t)) {
            continue;
        }
        let checks: Vec<_> = store
            .checks_on_node(&s.node)
            .filter(|c| c.service_id.is_empty() || c.service_id == s.id)
            .collect();
        if p.passing && checks.iter().any(|c| c.status != "passing") {
            continue;
        }
        let entry = json::CheckServiceNodeOut {
            node: json::node(n, dc),
            service: json::node_service(s),
            checks: checks.iter().map(|c| json::check(c)).collect(),
        };
        let v = to_value(&entry);
        if keep(&p.filter, &v)? {
            out.push(v);
        }
    }
    Ok(out)
}

/// Runs a read with Consul's blocking semantics (consul-api.md a.2): `compute` evaluates the
/// query against the current state and is re-run on every write until its index passes
/// `?index=` or the wait runs out. Every blocking endpoint, catalog, health and KV, goes through
/// here, and so through the same fault switches and response headers.
async fn read(
    shared: &Arc<Shared>,
    p: &Params,
    faults: Faults,
    compute: impl Fn(&Shared, &Faults) -> Result<ReadResult, Fail>,
) -> Response {
    let no_leader = faults.error == Some(ErrorFault::NoLeader);
    match faults.error {
        Some(ErrorFault::NoLeader) if !p.stale => {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader")
        }
        Some(ErrorFault::RateLimited) => {
            return text(StatusCode::TOO_MANY_REQUESTS, "Too many requests")
        }
        Some(ErrorFault::AclNotFound) => return text(StatusCode::FORBIDDEN, "ACL not found"),
        Some(ErrorFault::Internal) => {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No known Consul servers")
        }
        _ => {}
    }
    let jitter_max = p.wait.as_millis() as u64 / 16;
    let jitter = Duration::from_millis(if jitter_max > 0 {
        rand::random_range(0..=jitter_max)
    } else {
        0
    });
    let deadline = Instant::now() + p.wait + jitter;
    let mut rx = shared.generation.subscribe();
    let blocking = p.index > 0;
    let mut counted = false;
    let result = loop {
        rx.borrow_and_update();
        let r = match compute(shared, &faults) {
            Ok(r) => r,
            Err((code, msg)) => break Err((code, msg)),
        };
        let hold = blocking && faults.hold;
        if !blocking || (!hold && r.index.max(1) > p.index) {
            break Ok(r);
        }
        if !counted {
            shared.blocked.fetch_add(1, Ordering::Relaxed);
            counted = true;
        }
        let timed_out = tokio::select! {
            changed = rx.changed(), if !hold => changed.is_err(),
            _ = tokio::time::sleep_until(deadline) => true,
            _ = shared.shutdown.cancelled() => true,
        };
        if timed_out {
            // On timeout Consul answers 200 with the current body and index.
            break compute(shared, &shared.faults());
        }
    };
    if counted {
        shared.blocked.fetch_sub(1, Ordering::Relaxed);
    }
    let r = match result {
        Ok(r) => r,
        Err((code, msg)) => return text(code, msg),
    };
    // Faults may have been switched while this query was blocked.
    let faults = shared.faults();
    if faults.refuse_connections {
        return cut_response(Bytes::new());
    }
    let body = match r.raw {
        Some(raw) => raw,
        None => serde_json::to_vec(&r.body).unwrap_or_default(),
    };
    let mut headers = r.headers;
    if !faults.missing_index {
        // Consul rewrites index 0 to 1.
        headers.insert("x-consul-index", HeaderValue::from(r.index.max(1)));
    }
    let leaderless = no_leader || faults.error == Some(ErrorFault::NoLeader);
    headers.insert(
        "x-consul-knownleader",
        HeaderValue::from_static(if leaderless { "false" } else { "true" }),
    );
    headers.insert(
        "x-consul-lastcontact",
        HeaderValue::from(if leaderless { 60_000u64 } else { 0 }),
    );
    headers.insert(
        "x-consul-effective-consistency",
        HeaderValue::from_static(if p.stale {
            "stale"
        } else if p.consistent {
            "consistent"
        } else {
            "leader"
        }),
    );
    headers.insert(
        "x-consul-default-acl-policy",
        HeaderValue::from_static(if p.acl_enabled { "deny" } else { "allow" }),
    );
    if r.filtered && p.token_known == Some(true) {
        headers.insert(
            "x-consul-results-filtered-by-acls",
            HeaderValue::from_static("true"),
        );
    }
    match faults.cut {
        Some(CutFault::MidBody) => {
            let half = Bytes::copy_from_slice(&body[..body.len() / 2]);
            let mut resp = cut_response(half);
            *resp.status_mut() = r.status;
            resp.headers_mut().extend(headers);
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            resp
        }
        Some(CutFault::TruncatedJson) => {
            let half = body[..body.len() / 2].to_vec();
            (r.status, headers, half).into_response()
        }
        None => (r.status, headers, body).into_response(),
    }
}

fn admin(
    shared: &Shared,
    path: &str,
    method: &Method,
    uri: &axum::http::Uri,
    body: Bytes,
) -> Response {
    let q: Vec<(String, String)> = Query::try_from_uri(uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (method.as_str(), path) {
        ("GET", "faults") => {
            json_response(serde_json::to_vec(&shared.faults()).unwrap_or_default())
        }
        ("PUT", "faults") => match serde_json::from_slice::<Faults>(&body) {
            Ok(f) => {
                *lock(&shared.faults) = f;
                shared.wake();
                json_response(b"true".to_vec())
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad faults: {e}")),
        },
        ("GET", "stats") => {
            json_response(serde_json::to_vec(&crate::stats(shared)).unwrap_or_default())
        }
        ("PUT", "spurious") => {
            for s in lock(&shared.dcs).values_mut() {
                s.spurious_write();
            }
            shared.wake();
            json_response(b"true".to_vec())
        }
        ("PUT", "reap") => {
            for s in lock(&shared.dcs).values_mut() {
                s.kv.reap_tombstones();
            }
            shared.wake();
            json_response(b"true".to_vec())
        }
        ("PUT", "regress") => match get("to").and_then(|t| t.parse::<u64>().ok()) {
            Some(to) => {
                for s in lock(&shared.dcs).values_mut() {
                    s.regress_index(to);
                }
                shared.wake();
                json_response(b"true".to_vec())
            }
            None => text(StatusCode::BAD_REQUEST, "regress needs ?to=<index>"),
        },
        ("PUT", "tokens") => {
            match serde_json::from_slice::<Option<std::collections::BTreeSet<String>>>(&body) {
                Ok(t) => {
                    lock(&shared.config).tokens = t;
                    shared.wake();
                    json_response(b"true".to_vec())
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("bad tokens: {e}")),
            }
        }
        ("PUT", "check") => {
            let (Some(node), Some(check), Some(status)) =
                (get("node"), get("check"), get("status"))
            else {
                return text(StatusCode::BAD_REQUEST, "check needs ?node=&check=&status=");
            };
            let dc = get("dc").unwrap_or_default();
            match shared.write(&dc, |s| Ok(s.set_check_status(&node, &check, &status))) {
                Ok(true) => json_response(b"true".to_vec()),
                _ => text(StatusCode::NOT_FOUND, "no such check"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("x"), None);
    }

    #[test]
    fn paths_decode() {
        assert_eq!(percent_decode("my%20svc"), "my svc");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(
            route("/v1/health/service/web").map(|r| r.0),
            Some(Endpoint::HealthService("web".into()))
        );
        assert!(route("/v1/nope").is_none());
    }
}
