//! What a catalog becomes, in resource names, for `pilotfish-discovery validate`: the clusters
//! and outbound routes per service (as a proxy that may call every service sees them), the TCP
//! listeners and each gateway node's listeners. Pure, like the rest of translation.

use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use pilotfish_registries::model::Catalog;
use prost::Message;

use super::{Shared, OUTBOUND};
use crate::proxy::Proxy;

/// One line per service and per gateway, in name order.
pub fn describe(catalog: &Catalog) -> Vec<String> {
    let shared = Shared::build(Arc::new(catalog.clone()));
    let proxy = |node: &str| Proxy {
        node: node.to_string(),
        address: [127, 0, 0, 1].into(),
        mesh_port: pilotfish_registries::model::DEFAULT_MESH_PORT,
        outbound: ([127, 0, 0, 1], 15001).into(),
        app_address: [127, 0, 0, 1].into(),
        access_log: Default::default(),
        tracing: None,
        intercept: None,
    };
    // No node hosts a service named by the empty string: this proxy sees every service.
    let all = shared.for_proxy(&proxy(""));
    let routes = all
        .routes
        .get(OUTBOUND)
        .and_then(|r| RouteConfiguration::decode(r.body.value.as_slice()).ok())
        .unwrap_or_default();
    let mut out = Vec::new();
    for name in catalog.services.keys() {
        let prefix = format!("outbound|{name}");
        let clusters: Vec<&str> = all
            .clusters
            .keys()
            .filter(|c| **c == prefix || c.starts_with(&format!("{prefix}|")))
            .map(String::as_str)
            .collect();
        let mut line = format!("service {name}: clusters [{}]", clusters.join(", "));
        if let Some(vh) = routes.virtual_hosts.iter().find(|v| v.name == *name) {
            line.push_str(&format!("; outbound routes: {}", vh.routes.len()));
        }
        if all.listeners.contains_key(&prefix) {
            line.push_str(&format!("; listener {prefix}"));
        }
        out.push(line);
    }
    for gw in catalog.gateways.values() {
        let res = shared.for_proxy(&proxy(&gw.node));
        let listeners: Vec<&str> = res
            .listeners
            .keys()
            .filter(|l| l.starts_with("gateway|"))
            .map(String::as_str)
            .collect();
        out.push(format!(
            "gateway {} on node {}: listeners [{}] at {}",
            gw.name,
            gw.node,
            listeners.join(", "),
            gw.listen
        ));
    }
    out
}
