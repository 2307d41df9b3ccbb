//! The Consul registry adapter: reads the Consul catalog of one or more datacenters and
//! publishes it as a whole [`Catalog`](crate::model::Catalog) snapshot, plus a
//! [`ConsulStatus`] saying how fresh it is.
//!
//! - [`config`]: `[registry.consul]` (serde mirror + validation) and the runtime config.
//! - [`api`]: the Consul JSON the adapter reads (tolerant: unknown fields, `null` maps).
//! - [`mapping`]: pure Consul JSON -> model rules (labels, health, weights, agent nodes).
//! - [`watch`]: the long-poll loops; [`client`] one request; [`pacing`] rate limit and backoff.
//!
//! Failure behaviour: errors (unreachable, 5xx, 429, 403, cut or truncated responses) back off
//! with jitter and are reported in the status; the last good catalog stays published and is
//! marked stale. Nothing is removed from the mesh because Consul blinked. With a
//! [`LastGoodStore`](crate::last_good::LastGoodStore) each datacenter's catalog is also kept on
//! disk, and a registry that starts while Consul does not answer serves it (stale, restored)
//! until the first full read of that datacenter.

pub mod api;
pub mod client;
pub mod config;
pub mod kv;
pub mod mapping;
pub mod pacing;
pub mod status;
pub mod watch;

use std::path::PathBuf;

pub use client::RequestObserver;
pub use config::{ConsulConfig, ConsulSection, Enterprise};
pub use kv::{Kv, KvEntry};
pub use mapping::RejectedEntry;
pub use status::{ConsulStatus, DatacenterStatus};
pub use watch::ConsulRegistry;

/// What went wrong talking to Consul.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("invalid [registry.consul]: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("building the Consul HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("reading the Consul token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Consul at {url} unreachable or the answer was cut: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Consul refused the ACL token from {token_file} (403 {body}); keeping the last good catalog")]
    Acl { token_file: String, body: String },
    #[error("Consul is rate limiting (429 {body})")]
    RateLimited { body: String },
    #[error("datacenter {dc} is unknown to Consul at {address} (500 No path to datacenter): check registry.consul.datacenters")]
    UnknownDatacenter { dc: String, address: String },
    #[error("Consul answered {code} to {path}: {body}")]
    Status {
        code: u16,
        path: String,
        body: String,
    },
    #[error("Consul's answer to {path} is not the JSON expected: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

#[cfg(test)]
mod tests;
