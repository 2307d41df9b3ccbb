//! Issue 5's traffic keys in Envoy terms: route actions, cluster policies, priorities, TCP
//! splits and the gateway listener.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{route::Action, RouteConfiguration};
use pilotfish_registries::model::{Catalog, DEFAULT_MESH_PORT};
use prost::Message;

use super::Shared;
use crate::proxy::Proxy;
use crate::resources::ResourceMap;

const REGISTRY: &str = r#"
[services.reviews]
port = 9080
[[services.reviews.instances]]
node = "vm-b"
address = "10.0.0.2"
port = 9080
labels = { version = "v1" }
locality = "dc2"
[[services.reviews.instances]]
node = "vm-c"
address = "10.0.0.3"
port = 9080
labels = { version = "v2" }
locality = "dc1"

[services.shadow]
port = 9080

[services.db]
protocol = "tcp"
port = 5432
[[services.db.instances]]
address = "10.0.0.4"
port = 5432
labels = { version = "v1" }
[[services.db.instances]]
address = "10.0.0.5"
port = 5432
labels = { version = "v2" }

[[routes.reviews.rules]]
match = { path_regex = "/r/[0-9]+", query = { debug = { present = true } } }
to = [{ subset = "v1" }]
fault = { abort = { status = 503, percent = 5 } }
mirror = { service = "shadow", percent = 50 }
retries = { attempts = 2, backoff = { base = "25ms" } }

[[routes.reviews.rules]]
match = { path_prefix = "/old" }
redirect = { path = "/new", status = 302 }

[policies.reviews]
subsets = { v1 = { version = "v1" } }
load_balancer = "ring_hash"
hash = { header = "x-user" }
connection_pool = { max_connections = 10 }
outlier_detection = { consecutive_5xx = 5 }
health_check = { path = "/health" }
rate_limit = { requests = 10, per = "1s" }
locality = { failover = ["dc1", "dc2"] }

[policies.db]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }
[[routes.db.rules]]
to = [{ subset = "v1", weight = 30 }, { subset = "v2", weight = 70 }]

[gateways.public]
node = "gw-1"
listen = "0.0.0.0:8080"
[[gateways.public.routes]]
service = "reviews"
"#;

fn catalog() -> Catalog {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("r.toml"), REGISTRY).expect("write");
    let (c, problems) = pilotfish_registries::files::check_with(&[dir.path().to_path_buf()], &[]);
    assert!(problems.is_empty(), "{problems:#?}");
    c
}

fn proxy(node: &str) -> Proxy {
    Proxy {
        node: node.to_string(),
        address: "10.0.0.50".parse().expect("ip"),
        mesh_port: DEFAULT_MESH_PORT,
        outbound: "127.0.0.1:15001".parse().expect("addr"),
        app_address: "127.0.0.1".parse().expect("ip"),
        access_log: Default::default(),
        tracing: None,
        intercept: None,
    }
}

fn has(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn decode<M: Message + Default>(map: &ResourceMap, name: &str) -> M {
    let r = map
        .get(name)
        .unwrap_or_else(|| panic!("no resource {name}"));
    M::decode(r.body.value.as_slice()).expect("decode")
}

#[test]
fn routes_carry_actions_hash_and_rate_limit() {
    let shared = Shared::build(Arc::new(catalog()));
    let res = shared.for_proxy(&proxy("vm-x"));
    let rc: RouteConfiguration = decode(&res.routes, "outbound");
    let vh = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "reviews")
        .expect("reviews vhost");
    assert!(vh
        .typed_per_filter_config
        .contains_key("envoy.filters.http.local_ratelimit"));
    let first = &vh.routes[0];
    assert!(first
        .typed_per_filter_config
        .contains_key("envoy.filters.http.fault"));
    let m = first.r#match.as_ref().expect("match");
    assert_eq!(m.query_parameters[0].name, "debug");
    let Some(Action::Route(a)) = &first.action else {
        panic!("route action")
    };
    assert_eq!(a.request_mirror_policies[0].cluster, "outbound|shadow");
    assert_eq!(a.hash_policy.len(), 1);
    assert!(a
        .retry_policy
        .as_ref()
        .and_then(|r| r.retry_back_off.as_ref())
        .is_some());
    assert!(matches!(vh.routes[1].action, Some(Action::Redirect(_))));

    // Filter configs are nested `Any`s: look for the names in the encoded listener.
    let l = &res.listeners["outbound"].body.value;
    assert!(has(l, "envoy.filters.http.fault") && has(l, "envoy.filters.http.local_ratelimit"));
}

#[test]
fn clusters_endpoints_tcp_and_gateway() {
    let shared = Shared::build(Arc::new(catalog()));
    let res = shared.for_proxy(&proxy("vm-x"));
    let c: Cluster = decode(&res.clusters, "outbound|reviews");
    assert!(c.circuit_breakers.is_some() && c.outlier_detection.is_some());
    assert_eq!(c.health_checks.len(), 1);
    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|reviews");
    let prio: Vec<(String, u32)> = cla
        .endpoints
        .iter()
        .map(|e| {
            (
                e.locality
                    .as_ref()
                    .map(|l| l.zone.clone())
                    .unwrap_or_default(),
                e.priority,
            )
        })
        .collect();
    assert_eq!(prio, [("dc1".to_string(), 0), ("dc2".to_string(), 1)]);
    let tcp = &res.listeners["outbound|db"].body.value;
    assert!(has(tcp, "outbound|db|v1") && has(tcp, "outbound|db|v2"));
    assert!(!res.listeners.contains_key("gateway|public"));

    let gw = shared.for_proxy(&proxy("gw-1"));
    let l: Listener = decode(&gw.listeners, "gateway|public");
    assert_eq!(l.name, "gateway|public");
    assert!(has(
        &gw.listeners["gateway|public"].body.value,
        "outbound|reviews"
    ));
    assert!(gw.clusters.contains_key("outbound|reviews"));
}
