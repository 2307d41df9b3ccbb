//! `/metrics`: every part's metrics in one [`Registry`] under the `pilotfish_` prefix, encoded
//! in the Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), which every Prometheus
//! and most other scrapers read.
//!
//! The parts register themselves: the ADS server (`pilotfish_xds_*`), the debouncer
//! (`pilotfish_snapshot_*`), the sources (`pilotfish_registry_*`, `pilotfish_consul_*`), the CA
//! (`pilotfish_ca_*`) and the rules API (`pilotfish_rules_api_*`). What is read from state at
//! scrape time (open streams, file problems, Consul per datacenter) is never staler than the
//! scrape.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;

use super::HttpState;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every part's metrics; built once, each scrape encodes it.
pub fn registry(state: &HttpState) -> Registry {
    let mut registry = Registry::with_prefix("pilotfish");
    state
        .xds_metrics
        .register(&mut registry, state.connections.clone());
    state.mesh_metrics.register(&mut registry);
    state
        .sources_metrics
        .register(&mut registry, state.files.clone(), &state.sources);
    state.ca_metrics.register(&mut registry);
    if let Some(api) = &state.api {
        api.metrics().register(&mut registry);
    }
    if let Some(store) = &state.store {
        store.register(&mut registry);
    }
    registry
}

pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail, and our collectors never return an error.
    if let Err(e) = prometheus_text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

/// The text a scrape of `state` returns now.
pub fn render(state: &HttpState) -> String {
    encode(&registry(state))
}
