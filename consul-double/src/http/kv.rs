//! `/v1/kv/<key>`: Consul's KV endpoints (`agent/kvs_endpoint.go` for the HTTP side,
//! `agent/consul/kvs_endpoint.go` for ACLs and indexes). Reads go through the same blocking
//! loop, fault switches and headers as the catalog ([`super::read`]); writes are applied to the
//! datacenter's [`crate::kv::KvStore`] under the store lock, so two CAS writes racing on one
//! index are serialized and exactly one of them wins.
//!
//! ACLs follow the double's model: a known token may do anything; without a token (default
//! deny) a single-key read or any write is refused with Consul's anonymous `Permission denied`,
//! and listings come back empty.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::{json_response, read, text, Fail, Params, ReadResult};
use crate::kv::{validate_key, KvEntryOut, KvOp};
use crate::{ErrorFault, Faults, Shared};

/// Consul's default `kv_max_value_size` (`raft.SuggestedMaxDataSize`, 512 KiB).
pub const MAX_VALUE_SIZE: u64 = 512 * 1024;

pub(super) struct KvRequest {
    pub method: Method,
    pub raw_path: String,
    /// The path after `/v1/kv/`, still percent-encoded.
    pub raw_key: String,
    pub query: Vec<(String, String)>,
    pub content_length: Option<u64>,
}

impl KvRequest {
    fn has(&self, k: &str) -> bool {
        self.query.iter().any(|(n, _)| n == k)
    }

    fn get(&self, k: &str) -> &str {
        self.query
            .iter()
            .find(|(n, _)| n == k)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Consul's 400 for flags that do not compose, naming the whole query as Go encodes it.
    fn conflicting(&self, flags: &[&str]) -> Option<Response> {
        if flags.iter().filter(|f| self.has(f)).count() < 2 {
            return None;
        }
        let mut pairs: Vec<_> = self.query.clone();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let encoded = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
            .collect::<Vec<_>>()
            .join("&");
        Some(text(
            StatusCode::BAD_REQUEST,
            format!("Conflicting flags: {encoded}\n"),
        ))
    }
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Consul's message for a request without a token when the default policy is deny.
fn anonymous_denied(permission: &str, key: &str) -> Response {
    text(
        StatusCode::FORBIDDEN,
        format!(
            "Permission denied: anonymous token lacks permission '{permission}' on {key:?}. \
             The anonymous token is used implicitly when a request does not specify a token."
        ),
    )
}

/// Go's `strconv.ParseUint` error, which Consul passes on as a 500.
fn parse_u64(s: &str) -> Result<u64, Fail> {
    s.parse().map_err(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("strconv.ParseUint: parsing {s:?}: invalid syntax"),
        )
    })
}

pub(super) async fn handle(
    shared: &Arc<Shared>,
    req: KvRequest,
    p: Params,
    faults: Faults,
    body: Body,
) -> Response {
    // Consul refuses traversal in the raw path before it looks at the key.
    let raw = req.raw_path.to_ascii_lowercase();
    if raw.contains("../") || raw.contains("..\\") {
        return text(
            StatusCode::BAD_REQUEST,
            "URL path contains invalid traversal sequence",
        );
    }
    if [
        "%2e%2e%2f",
        "%2e%2e/",
        "..%2f",
        "%2e%2e%5c",
        "%252e%252e%252f",
    ]
    .iter()
    .any(|s| raw.contains(s))
    {
        return text(
            StatusCode::BAD_REQUEST,
            "URL path contains encoded traversal sequence",
        );
    }
    let key = super::percent_decode(&req.raw_key);
    if !key.is_empty() {
        if let Err(e) = validate_key(&key) {
            return text(StatusCode::BAD_REQUEST, e);
        }
    }
    match req.method {
        Method::GET => get(shared, req, key, p, faults).await,
        Method::PUT => put(shared, req, key, p, faults, body).await,
        _ => delete(shared, req, key, p, faults),
    }
}

/// What a KV read asks for.
#[derive(Clone)]
enum Read {
    /// `GET /v1/kv/<key>`, `?raw` for the bare value.
    Key { key: String, raw: bool },
    /// `?recurse`: every entry under the prefix.
    Tree { prefix: String },
    /// `?keys`: key names under the prefix, cut after `separator` when one is given.
    Keys { prefix: String, separator: String },
}

async fn get(
    shared: &Arc<Shared>,
    req: KvRequest,
    key: String,
    p: Params,
    faults: Faults,
) -> Response {
    let what = if req.has("keys") {
        // The historic misspelling is still accepted; the right one wins.
        let separator = if req.has("separator") {
            req.get("separator")
        } else {
            req.get("seperator")
        };
        Read::Keys {
            prefix: key,
            separator: separator.to_string(),
        }
    } else if req.has("recurse") {
        Read::Tree { prefix: key }
    } else if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    } else {
        Read::Key {
            key,
            raw: req.has("raw"),
        }
    };
    if let Read::Key { key, .. } = &what {
        if p.acl_enabled && p.token_known.is_none() {
            return anonymous_denied("key:read", key);
        }
    }
    let params = p.clone();
    read(shared, &p, faults, move |shared, faults| {
        compute(shared, &what, &params, faults)
    })
    .await
}

fn compute(shared: &Shared, what: &Read, p: &Params, faults: &Faults) -> Result<ReadResult, Fail> {
    let dcs = crate::lock(&shared.dcs);
    let store = dcs.get(&p.dc).ok_or((
        StatusCode::INTERNAL_SERVER_ERROR,
        "No path to datacenter".to_string(),
    ))?;
    let kv = &store.kv;
    // Listings are filtered, never refused: without a token (default deny) or with the
    // filtering fault on, nothing is left.
    let hide = (p.acl_enabled && p.token_known.is_none()) || faults.filter_results;
    let (index, body, found) = match what {
        Read::Key { key, raw } => {
            let index = kv.index_of_key(key);
            match kv.get(key) {
                None => (index, None, false),
                Some(e) if *raw => {
                    let mut r = ReadResult::json(index, Value::Null);
                    r.raw = Some(e.value.clone());
                    r.headers = raw_headers();
                    return Ok(r);
                }
                Some(e) => (
                    index,
                    Some(serde_json::to_vec(&[KvEntryOut::from(e)]).unwrap_or_default()),
                    true,
                ),
            }
        }
        Read::Tree { prefix } => {
            let entries: Vec<KvEntryOut<'_>> = if hide {
                Vec::new()
            } else {
                kv.list(prefix).map(KvEntryOut::from).collect()
            };
            let found = !entries.is_empty();
            let body = serde_json::to_vec(&entries).unwrap_or_default();
            (kv.index_of_prefix(prefix), Some(body), found)
        }
        Read::Keys { prefix, separator } => {
            let mut keys: Vec<&str> = Vec::new();
            if !hide {
                for e in kv.list(prefix) {
                    let after = &e.key[prefix.len()..];
                    let k = match after.find(separator.as_str()) {
                        Some(i) if !separator.is_empty() => {
                            &e.key[..prefix.len() + i + separator.len()]
                        }
                        _ => e.key.as_str(),
                    };
                    if keys.last() != Some(&k) {
                        keys.push(k);
                    }
                }
            }
            // The root lists as `[]`; any other prefix with nothing under it is a 404.
            let found = !keys.is_empty() || prefix.is_empty();
            let body = serde_json::to_vec(&keys).unwrap_or_default();
            (kv.index_of_prefix(prefix), Some(body), found)
        }
    };
    let mut r = ReadResult::json(index, Value::Null);
    r.filtered = faults.filter_results && !matches!(what, Read::Key { .. });
    if found {
        r.raw = body;
    } else {
        // A bare 404: Consul writes the status and no body.
        r.status = StatusCode::NOT_FOUND;
        r.raw = Some(Vec::new());
        r.headers = HeaderMap::new();
    }
    Ok(r)
}

/// `?raw` answers the stored bytes with the headers Consul sets against content sniffing.
fn raw_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("sandbox"),
    );
    h
}

/// The error switches apply to writes as they would on a cluster in trouble: a write needs a
/// leader, so `?stale` does not help it.
fn write_fault(faults: &Faults) -> Option<Response> {
    Some(match faults.error? {
        ErrorFault::NoLeader => text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader"),
        ErrorFault::RateLimited => text(StatusCode::TOO_MANY_REQUESTS, "Too many requests"),
        ErrorFault::AclNotFound => text(StatusCode::FORBIDDEN, "ACL not found"),
        ErrorFault::Internal => text(StatusCode::INTERNAL_SERVER_ERROR, "No known Consul servers"),
    })
}

fn apply(shared: &Shared, p: &Params, op: KvOp) -> Response {
    match shared.write(&p.dc, |s| Ok(s.kv_apply(op))) {
        Ok(Ok(b)) => json_response(if b {
            b"true".to_vec()
        } else {
            b"false".to_vec()
        }),
        Ok(Err(fsm)) => text(StatusCode::INTERNAL_SERVER_ERROR, fsm),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter"),
    }
}

async fn put(
    shared: &Arc<Shared>,
    req: KvRequest,
    key: String,
    p: Params,
    faults: Faults,
    body: Body,
) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if let Some(r) = req.conflicting(&["cas", "acquire", "release"]) {
        return r;
    }
    let flags = if req.has("flags") {
        match parse_u64(req.get("flags")) {
            Ok(f) => f,
            Err((code, msg)) => return text(code, msg),
        }
    } else {
        0
    };
    let cas = if req.has("cas") {
        match parse_u64(req.get("cas")) {
            Ok(c) => Some(c),
            Err((code, msg)) => return text(code, msg),
        }
    } else {
        None
    };
    let too_large = |len: u64| {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({len} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. \
                 See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            ),
        )
    };
    if let Some(len) = req.content_length.filter(|l| *l > MAX_VALUE_SIZE) {
        return too_large(len);
    }
    // A chunked body has no length to check up front: cut it off at the limit instead.
    let value = match axum::body::to_bytes(body, MAX_VALUE_SIZE as usize + 1).await {
        Ok(b) if b.len() as u64 > MAX_VALUE_SIZE => return too_large(b.len() as u64),
        Ok(b) => b.to_vec(),
        Err(_) => return too_large(MAX_VALUE_SIZE + 1),
    };
    if p.acl_enabled && p.token_known.is_none() {
        return anonymous_denied("key:write", &key);
    }
    if let Some(r) = write_fault(&faults) {
        return r;
    }
    let op = if req.has("acquire") {
        KvOp::Acquire {
            key,
            session: req.get("acquire").to_string(),
        }
    } else if req.has("release") {
        KvOp::Release {
            key,
            session: req.get("release").to_string(),
        }
    } else if let Some(cas) = cas {
        KvOp::Cas {
            key,
            flags,
            value,
            cas,
        }
    } else {
        KvOp::Set { key, flags, value }
    };
    apply(shared, &p, op)
}

fn delete(shared: &Shared, req: KvRequest, key: String, p: Params, faults: Faults) -> Response {
    if let Some(r) = req.conflicting(&["recurse", "cas"]) {
        return r;
    }
    let op = if req.has("recurse") {
        KvOp::DeleteTree {
            prefix: key.clone(),
        }
    } else if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    } else if req.has("cas") {
        match parse_u64(req.get("cas")) {
            Ok(cas) => KvOp::DeleteCas {
                key: key.clone(),
                cas,
            },
            Err((code, msg)) => return text(code, msg),
        }
    } else {
        KvOp::Delete { key: key.clone() }
    };
    if p.acl_enabled && p.token_known.is_none() {
        return anonymous_denied("key:write", &key);
    }
    if let Some(r) = write_fault(&faults) {
        return r;
    }
    apply(shared, &p, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escape_is_gos() {
        assert_eq!(query_escape("a b/c"), "a+b%2Fc");
        assert_eq!(query_escape("x-_.~"), "x-_.~");
    }
}
