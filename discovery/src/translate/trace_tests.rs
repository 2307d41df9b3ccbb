//! Tracing on a proxy's resources: the collector cluster, the Zipkin config of every connection
//! manager, and proxies without tracing left as they were.

use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::trace::v3::{tracing::http, ZipkinConfig};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as HcmTracing;
use pilotfish_registries::model::{Gateway, GatewayRoute, MtlsMode};

use super::*;
use crate::proxy::Tracing;

/// The demo plus `db` (TCP), a permissive `details` on vm-b (so the mesh port has a plaintext
/// chain too) and a gateway on vm-b: every kind of connection manager.
fn catalog() -> Catalog {
    let mut c = demo_with_db();
    let mut details = service(
        "details",
        9080,
        None,
        vec![instance(Some("vm-b"), "10.0.0.12", 9081, &[])],
    );
    details.mtls = MtlsMode::Permissive;
    c.services.insert(details.name.clone(), details);
    c.gateways.insert(
        "public".into(),
        Gateway {
            name: "public".into(),
            node: "vm-b".into(),
            listen: "0.0.0.0:8080".parse().unwrap(),
            routes: vec![GatewayRoute {
                host: "*".into(),
                path_prefix: "/".into(),
                service: "reviews".into(),
            }],
            origin: Default::default(),
        },
    );
    c
}

fn zipkin(host: &str, sample_hundredths: u32) -> Option<Tracing> {
    Some(Tracing {
        host: host.into(),
        port: 9411,
        sample_hundredths,
    })
}

fn tracing_to(tracing: Option<Tracing>) -> Proxy {
    Proxy {
        tracing,
        ..proxy("vm-b", "10.0.0.12")
    }
}

/// The tracing config of every connection manager (by chain, or listener when the chain has no
/// name), and the TCP proxies' names with `None`.
fn tracing_configs(res: &ProxyResources) -> Vec<(String, Option<HcmTracing>)> {
    let mut out = Vec::new();
    for name in res.listeners.keys() {
        let l: Listener = decode(&res.listeners, name);
        for chain in &l.filter_chains {
            let at = if chain.name.is_empty() {
                l.name.clone()
            } else {
                chain.name.clone()
            };
            for f in &chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                match f.name.as_str() {
                    "envoy.filters.network.http_connection_manager" => {
                        out.push((at.clone(), unpack::<HttpConnectionManager>(any).tracing));
                    }
                    "envoy.filters.network.tcp_proxy" => out.push((at.clone(), None)),
                    _ => {}
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_connection_manager_traces_to_the_zipkin_cluster() {
    let shared = Shared::build_with(Arc::new(catalog()), mtls_settings());
    let res = shared.for_proxy(&tracing_to(zipkin("10.0.0.9", 2550)));
    let configs = tracing_configs(&res);
    let at: Vec<&str> = configs.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(
        at,
        [
            "gateway|public",
            "inbound|db",
            "inbound|details",
            "inbound|plaintext",
            "inbound|reviews",
            "outbound",
            "outbound|db",
        ]
    );
    for (at, tracing) in configs {
        if at.ends_with("|db") {
            assert_eq!(tracing, None, "a TCP proxy has no spans: {at}");
            continue;
        }
        let tracing = tracing.unwrap_or_else(|| panic!("{at} has no tracing"));
        assert_eq!(tracing.random_sampling.unwrap().value, 25.5, "{at}");
        // Client and overall sampling stay at Envoy's 100%: a caller's decision is kept.
        assert_eq!(tracing.client_sampling, None, "{at}");
        assert_eq!(tracing.overall_sampling, None, "{at}");
        let provider = tracing.provider.unwrap();
        assert_eq!(provider.name, "envoy.tracers.zipkin");
        let Some(http::ConfigType::TypedConfig(any)) = provider.config_type else {
            panic!("{at}: no typed config")
        };
        let z: ZipkinConfig = unpack(&any);
        assert_eq!(z.collector_cluster, "pilotfish-zipkin");
        assert_eq!(z.collector_endpoint, "/api/v2/spans");
        assert_eq!(z.collector_hostname, "10.0.0.9");
        assert_eq!(z.collector_endpoint_version, 1, "HTTP_JSON");
        assert_eq!(z.shared_span_context.map(|b| b.value), Some(false));
        assert!(z.trace_id_128bit);
    }

    let c: Cluster = decode(&res.clusters, ZIPKIN_CLUSTER);
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32))
    );
    let la = c.load_assignment.unwrap();
    let ep = &la.endpoints[0].lb_endpoints[0];
    let Some(HostIdentifier::Endpoint(e)) = &ep.host_identifier else {
        panic!("no endpoint")
    };
    assert_eq!(socket(&e.address), ("10.0.0.9".into(), 9411));
}

#[test]
fn a_collector_name_is_resolved_by_dns() {
    let shared = Shared::build(Arc::new(demo()));
    let res = shared.for_proxy(&Proxy {
        tracing: zipkin("zipkin.internal", 10_000),
        ..proxy("vm-a", "10.0.0.11")
    });
    let c: Cluster = decode(&res.clusters, ZIPKIN_CLUSTER);
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
    );
    let l: Listener = decode(&res.listeners, "outbound");
    let tracing = hcm_of(&l).tracing.unwrap();
    assert_eq!(tracing.random_sampling.unwrap().value, 100.0);
}

/// Without `pilotfish.zipkin` a proxy gets exactly what it got before tracing existed: no
/// cluster, no tracing field (so the same bytes), and the scope's shared clusters.
#[test]
fn a_proxy_without_tracing_is_unchanged() {
    let shared = Shared::build_with(Arc::new(catalog()), mtls_settings());
    let res = shared.for_proxy(&tracing_to(None));
    assert!(!res.clusters.contains_key(ZIPKIN_CLUSTER));
    for (at, tracing) in tracing_configs(&res) {
        assert_eq!(tracing, None, "{at}");
    }

    // A node without local services shares the whole scope's clusters.
    let shared = Shared::build(Arc::new(demo()));
    let plain = shared.for_proxy(&proxy("vm-z", "10.0.0.99"));
    assert!(Arc::ptr_eq(&plain.clusters, &shared.all.clusters));
}

#[test]
fn tracing_is_part_of_the_memo_key() {
    let shared = Shared::build_with(Arc::new(catalog()), mtls_settings());
    let off = shared.for_proxy(&tracing_to(None));
    let on = shared.for_proxy(&tracing_to(zipkin("10.0.0.9", 10_000)));
    let other = shared.for_proxy(&tracing_to(zipkin("10.0.0.10", 10_000)));
    assert_ne!(
        off.listeners["outbound"].version,
        on.listeners["outbound"].version
    );
    assert_ne!(
        on.clusters[ZIPKIN_CLUSTER].version,
        other.clusters[ZIPKIN_CLUSTER].version
    );
    // What does not depend on tracing is still shared.
    assert!(Arc::ptr_eq(&off.endpoints, &on.endpoints));
    assert!(Arc::ptr_eq(&off.routes["outbound"], &on.routes["outbound"]));
    for (name, c) in off.clusters.iter() {
        assert_eq!(c.version, on.clusters[name].version, "{name}");
        if name.starts_with("outbound|") {
            assert!(Arc::ptr_eq(c, &on.clusters[name]), "{name}");
        }
    }
    assert_eq!(on.clusters.len(), off.clusters.len() + 1);
    // Two builds (replicas, restarts) agree on the versions.
    let again = Shared::build_with(Arc::new(catalog()), mtls_settings())
        .for_proxy(&tracing_to(zipkin("10.0.0.9", 10_000)));
    for (name, r) in on.listeners.iter() {
        assert_eq!(r.version, again.listeners[name].version, "{name}");
    }
    for (name, r) in on.clusters.iter() {
        assert_eq!(r.version, again.clusters[name].version, "{name}");
    }
}
