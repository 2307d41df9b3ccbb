//! Builders shared by the protocol state tests.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

use crate::resources::ProxyResources;
use crate::resources::{Resource, ResourceMap};

pub const NODE: &str = "vm-a";

pub fn node() -> Option<Node> {
    Some(Node {
        id: NODE.to_string(),
        ..Default::default()
    })
}

pub fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Resources for services `svcs`: a cluster and an assignment each (`generation` changes the
/// assignment content), one listener and one route configuration naming them all.
pub fn resources(svcs: &[&str], generation: u32) -> ProxyResources {
    let mut clusters = ResourceMap::new();
    let mut endpoints = ResourceMap::new();
    for s in svcs {
        let c = Cluster {
            name: s.to_string(),
            ..Default::default()
        };
        clusters.insert(s.to_string(), Resource::encode(*s, &c));
        let cla = ClusterLoadAssignment {
            cluster_name: s.to_string(),
            endpoints: (0..generation)
                .map(|_| LocalityLbEndpoints::default())
                .collect(),
            ..Default::default()
        };
        endpoints.insert(s.to_string(), Resource::encode(*s, &cla));
    }
    let listener = Listener {
        name: format!("outbound:{}", svcs.join(",")),
        ..Default::default()
    };
    let route = RouteConfiguration {
        name: "outbound".to_string(),
        virtual_hosts: vec![],
        ..Default::default()
    };
    let mut listeners = ResourceMap::new();
    listeners.insert(
        "outbound".to_string(),
        Resource::encode("outbound", &listener),
    );
    let mut routes = ResourceMap::new();
    routes.insert("outbound".to_string(), Resource::encode("outbound", &route));
    ProxyResources {
        clusters: Arc::new(clusters),
        endpoints: Arc::new(endpoints),
        listeners: Arc::new(listeners),
        routes: Arc::new(routes),
    }
}
