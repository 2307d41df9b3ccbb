//! Consul's KV store (`/v1/kv/<key>`), for state several discovery replicas share: reads of one
//! key or a prefix (blocking when given an index), and writes and deletes that may be made
//! conditional on the key's `ModifyIndex` (`?cas=`), which is how two writers cannot both win.
//!
//! Values are opaque bytes. Reads are in Consul's default consistency mode (never `?stale`):
//! a read that decides a compare-and-set must see the leader's data.

use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use super::client::{path_segment, query_string, Client, ResponseMeta};
use super::ConsulError;

/// One key as Consul returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    /// The index of the key's last write: what `?cas=` compares against.
    pub modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawEntry {
    key: String,
    /// Base64; `null` for an empty value.
    value: Option<String>,
    modify_index: u64,
}

/// A KV client in one datacenter, over the adapter's [`Client`] (token, timeouts, errors).
#[derive(Clone)]
pub struct Kv {
    client: Client,
    datacenter: Option<String>,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("address", &self.client.config().address)
            .field("datacenter", &self.datacenter)
            .finish()
    }
}

impl Kv {
    /// `datacenter`: `None` for the agent's own.
    pub fn new(client: Client, datacenter: Option<String>) -> Kv {
        Kv { client, datacenter }
    }

    /// The Consul address, for messages.
    pub fn address(&self) -> &str {
        &self.client.config().address
    }

    fn url(&self, key: &str, query: &[(&str, String)]) -> String {
        let path: Vec<String> = key.split('/').map(path_segment).collect();
        let mut query = query.to_vec();
        if let Some(dc) = &self.datacenter {
            query.push(("dc", dc.clone()));
        }
        let mut url = format!("{}/v1/kv/{}", self.address(), path.join("/"));
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query_string(&query));
        }
        url
    }

    fn dc(&self) -> &str {
        self.datacenter.as_deref().unwrap_or("")
    }

    /// The key, or `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<KvEntry>, ConsulError> {
        let url = self.url(key, &[]);
        let (status, body, _) = self
            .client
            .send(self.client.http().get(&url), &url, self.dc(), key)
            .await?;
        if status == 404 {
            return Ok(None);
        }
        Ok(decode(key, &body)?.into_iter().find(|e| e.key == key))
    }

    /// Every key under `prefix`, and the index to block on for the next change. With
    /// `index > 0` the call waits (up to `wait`) until something under the prefix changes.
    pub async fn list(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<KvEntry>, ResponseMeta), ConsulError> {
        let mut query = vec![("recurse", String::new())];
        if index > 0 {
            query.push(("index", index.to_string()));
            query.push(("wait", format!("{}ms", wait.as_millis())));
        }
        let url = self.url(prefix, &query);
        let request = self
            .client
            .http()
            .get(&url)
            // A blocking query is held up to `wait` (+ Consul's jitter of wait/16).
            .timeout(wait + wait / 16 + Duration::from_secs(8));
        let (status, body, meta) = self.client.send(request, &url, self.dc(), prefix).await?;
        if status == 404 {
            return Ok((Vec::new(), meta));
        }
        Ok((decode(prefix, &body)?, meta))
    }

    /// The index of the latest write under `prefix` (deletes included): `X-Consul-Index` of a
    /// keys-only listing, which carries no values.
    pub async fn index(&self, prefix: &str) -> Result<u64, ConsulError> {
        let url = self.url(prefix, &[("keys", String::new())]);
        let (_, _, meta) = self
            .client
            .send(self.client.http().get(&url), &url, self.dc(), prefix)
            .await?;
        Ok(meta.index)
    }

    /// Writes `value`. With `cas = Some(i)` only if the key's `ModifyIndex` is still `i`
    /// (0: only if the key does not exist). `Ok(false)`: the condition did not hold.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u64>,
    ) -> Result<bool, ConsulError> {
        let query: Vec<(&str, String)> = cas.map(|i| ("cas", i.to_string())).into_iter().collect();
        let url = self.url(key, &query);
        let request = self.client.http().put(&url).body(value.to_vec());
        let (status, body, _) = self.client.send(request, &url, self.dc(), key).await?;
        outcome(status, key, &body)
    }

    /// Deletes the key (with `cas`, only if it is still at that index).
    pub async fn delete(&self, key: &str, cas: Option<u64>) -> Result<bool, ConsulError> {
        let query: Vec<(&str, String)> = cas.map(|i| ("cas", i.to_string())).into_iter().collect();
        let url = self.url(key, &query);
        let request = self.client.http().delete(&url);
        let (status, body, _) = self.client.send(request, &url, self.dc(), key).await?;
        outcome(status, key, &body)
    }
}

/// A write's `true`/`false` body.
fn outcome(status: u16, key: &str, body: &[u8]) -> Result<bool, ConsulError> {
    match (status, body.trim_ascii()) {
        (200, b"true") => Ok(true),
        (200, b"false") => Ok(false),
        (code, other) => Err(ConsulError::Status {
            code,
            path: format!("/v1/kv/{key}"),
            body: String::from_utf8_lossy(other).into_owned(),
        }),
    }
}

fn decode(path: &str, body: &[u8]) -> Result<Vec<KvEntry>, ConsulError> {
    let raw: Vec<RawEntry> =
        serde_json::from_slice(body).map_err(|source| ConsulError::Decode {
            path: format!("/v1/kv/{path}"),
            source,
        })?;
    raw.into_iter()
        .map(|e| {
            let value = match &e.value {
                None => Vec::new(),
                Some(v) => base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|err| ConsulError::Status {
                        code: 200,
                        path: format!("/v1/kv/{}", e.key),
                        body: format!("the value is not base64: {err}"),
                    })?,
            };
            Ok(KvEntry {
                key: e.key,
                value,
                modify_index: e.modify_index,
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "kv_tests.rs"]
mod tests;
