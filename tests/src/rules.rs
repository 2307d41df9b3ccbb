//! The rules API from a test: calls with the mesh's token, a canary's body, and who answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Result;

use crate::mesh::API_TOKEN;
use crate::{blocking, http_request, Response};

/// `method path` on discovery's HTTP port with the rules API token, a JSON body and `extra`
/// headers (`If-Match`, say).
pub async fn api(
    http: SocketAddr,
    method: &'static str,
    path: &'static str,
    extra: Vec<(&'static str, String)>,
    body: String,
) -> Result<Response> {
    blocking(move || {
        let auth = format!("Bearer {API_TOKEN}");
        let mut headers: Vec<(&str, &str)> = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        for (k, v) in &extra {
            headers.push((k, v.as_str()));
        }
        http_request(http, method, "discovery", path, &headers, &body)
    })
    .await
}

/// A route's body sending `v2` percent of requests to subset v2, the rest to v1.
pub fn canary(v2: u32) -> String {
    format!(
        r#"{{"rules":[{{"to":[{{"subset":"v1","weight":{}}},{{"subset":"v2","weight":{v2}}}]}}]}}"#,
        100 - v2
    )
}

/// Who served each of `n` calls to `reviews` through `out` (`x-served-by`, or what failed).
pub async fn split(out: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    blocking(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let who = match http_request(out, "GET", "reviews", "/", &[], "") {
                Ok(r) if r.status == 200 => r.header("x-served-by").unwrap_or("?").to_string(),
                Ok(r) => format!("HTTP {}", r.status),
                Err(_) => "error".into(),
            };
            *seen.entry(who).or_insert(0) += 1;
        }
        seen
    })
    .await
}
