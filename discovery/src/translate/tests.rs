#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, HealthStatus, Metadata,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier, RouteAction, RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::UpstreamProtocolOptions, HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct};
use pilotfish_registries::model::{
    Catalog, Destination, Instance, LoadBalancer, Policy, Protocol, Retries, Route, RouteMatch,
    RouteRule, Service, DEFAULT_MESH_PORT,
};
use prost::Message;

use super::*;
use crate::resources::ResourceMap;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn instance(node: Option<&str>, address: &str, port: u16, l: &[(&str, &str)]) -> Instance {
    Instance {
        node: node.map(str::to_string),
        address: address.to_string(),
        port,
        mesh_port: DEFAULT_MESH_PORT,
        labels: labels(l),
        weight: 1,
        healthy: true,
        draining: false,
        locality: None,
    }
}

fn service(name: &str, port: u16, upstreams: Option<&[&str]>, instances: Vec<Instance>) -> Service {
    Service {
        name: name.to_string(),
        protocol: Protocol::Http,
        port,
        upstreams: upstreams.map(|u| u.iter().map(|s| s.to_string()).collect()),
        instances,
        mtls: Default::default(),
        health: Default::default(),
        origin: Default::default(),
    }
}

fn to(subset: Option<&str>, weight: u32) -> Destination {
    Destination {
        subset: subset.map(str::to_string),
        weight,
    }
}

/// reviews v1 on vm-b, v2 on vm-c; productpage on vm-a calls reviews; ratings on vm-d.
fn demo() -> Catalog {
    let mut c = Catalog::default();
    let reviews = service(
        "reviews",
        9080,
        Some(&["ratings"]),
        vec![
            instance(
                Some("vm-b"),
                "10.0.0.12",
                9080,
                &[("version", "v1"), ("team", "books")],
            ),
            instance(
                Some("vm-c"),
                "10.0.0.13",
                9080,
                &[("version", "v2"), ("team", "books")],
            ),
        ],
    );
    let productpage = service(
        "productpage",
        9080,
        Some(&["reviews"]),
        vec![instance(
            Some("vm-a"),
            "10.0.0.11",
            9081,
            &[("version", "v1")],
        )],
    );
    let ratings = service(
        "ratings",
        9080,
        None,
        vec![instance(Some("vm-d"), "10.0.0.14", 9080, &[])],
    );
    for s in [reviews, productpage, ratings] {
        c.services.insert(s.name.clone(), s);
    }
    c.routes.insert(
        "reviews".into(),
        Route {
            service: "reviews".into(),
            timeout: Some(Duration::from_secs(3)),
            retries: Some(Retries {
                attempts: 2,
                per_try_timeout: Some(Duration::from_secs(1)),
                on: vec!["5xx".into(), "connect-failure".into()],
                backoff: None,
            }),
            rules: vec![
                RouteRule {
                    matches: RouteMatch {
                        headers: labels(&[("x-canary", "1")]),
                        ..Default::default()
                    },
                    to: vec![to(Some("v2"), 1)],
                    actions: Default::default(),
                    origin: Default::default(),
                },
                RouteRule {
                    matches: RouteMatch::default(),
                    to: vec![to(Some("v1"), 80), to(Some("v2"), 20)],
                    actions: Default::default(),
                    origin: Default::default(),
                },
            ],
            origin: Default::default(),
        },
    );
    c.policies.insert(
        "reviews".into(),
        Policy {
            service: "reviews".into(),
            subsets: [
                ("v1".to_string(), labels(&[("version", "v1")])),
                ("v2".to_string(), labels(&[("version", "v2")])),
            ]
            .into(),
            load_balancer: LoadBalancer::LeastRequest,
            connect_timeout: None,
            origin: Default::default(),
            ..Default::default()
        },
    );
    c
}

fn proxy(node: &str, address: &str) -> Proxy {
    Proxy {
        node: node.to_string(),
        address: address.parse().unwrap(),
        mesh_port: DEFAULT_MESH_PORT,
        outbound: "127.0.0.1:15001".parse().unwrap(),
        app_address: "127.0.0.1".parse().unwrap(),
        access_log: Default::default(),
        tracing: None,
        intercept: None,
    }
}

fn decode<M: Message + Default + prost::Name>(map: &ResourceMap, name: &str) -> M {
    let r = map
        .get(name)
        .unwrap_or_else(|| panic!("no resource {name}"));
    assert_eq!(r.body.type_url, M::type_url(), "{name}");
    M::decode(r.body.value.as_slice()).unwrap()
}

fn unpack<M: Message + Default + prost::Name>(any: &Any) -> M {
    assert_eq!(any.type_url, M::type_url());
    M::decode(any.value.as_slice()).unwrap()
}

fn names(map: &ResourceMap) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

fn socket(addr: &Option<Address>) -> (String, u32) {
    match addr.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => match s.port_specifier {
            Some(PortSpecifier::PortValue(p)) => (s.address.clone(), p),
            _ => panic!("no port"),
        },
        _ => panic!("no socket address"),
    }
}

fn label_map(meta: &Option<Metadata>) -> BTreeMap<String, String> {
    let meta = meta.as_ref().unwrap();
    assert_eq!(meta.typed_filter_metadata.len(), 1);
    let s: Struct = unpack(&meta.typed_filter_metadata["pilotfish"]);
    s.fields
        .into_iter()
        .map(|(k, v)| match v.kind {
            Some(Kind::StringValue(v)) => (k, v),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn route_action(r: &envoy_types::pb::envoy::config::route::v3::Route) -> &RouteAction {
    match &r.action {
        Some(Action::Route(a)) => a,
        other => panic!("{other:?}"),
    }
}

fn vhost<'a>(rc: &'a RouteConfiguration, name: &str) -> &'a VirtualHost {
    rc.virtual_hosts.iter().find(|v| v.name == name).unwrap()
}

#[test]
fn shared_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Shared>();
}

#[test]
fn demo_outbound_clusters_and_endpoints() {
    let shared = Shared::build(Arc::new(demo()));
    let res = shared.for_proxy(&proxy("vm-a", "10.0.0.11"));
    assert_eq!(
        names(&res.clusters),
        [
            "inbound|productpage",
            "outbound|reviews",
            "outbound|reviews|v1",
            "outbound|reviews|v2"
        ]
    );
    assert_eq!(
        names(&res.endpoints),
        [
            "outbound|reviews",
            "outbound|reviews|v1",
            "outbound|reviews|v2"
        ]
    );

    let c: Cluster = decode(&res.clusters, "outbound|reviews|v1");
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
    );
    let eds = c.eds_cluster_config.unwrap();
    assert_eq!(eds.service_name, "outbound|reviews|v1");
    assert!(eds.eds_config.unwrap().config_source_specifier.is_some());
    assert_eq!(c.connect_timeout.unwrap().seconds, 5);
    assert_eq!(c.lb_policy, LbPolicy::LeastRequest as i32);
    assert!(c.typed_extension_protocol_options.is_empty(), "HTTP/1.1");
    // Mesh defaults: no panic mode, outlier detection on gateway failures only.
    let panic = c.common_lb_config.as_ref().unwrap().healthy_panic_threshold;
    assert_eq!(panic.unwrap().value, 0.0);
    let od = c
        .outlier_detection
        .as_ref()
        .expect("default outlier detection");
    assert_eq!(od.consecutive_gateway_failure.unwrap().value, 5);
    assert_eq!(od.enforcing_consecutive_5xx.unwrap().value, 0);
    assert_eq!(od.max_ejection_percent.unwrap().value, 50);
    let breakers = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(breakers.max_retries.unwrap().value, u32::MAX);
    assert_eq!(breakers.max_connections, None, "Envoy's default");

    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|reviews|v1");
    assert_eq!(cla.cluster_name, "outbound|reviews|v1");
    let eps: Vec<_> = cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).collect();
    assert_eq!(eps.len(), 1);
    let Some(HostIdentifier::Endpoint(ep)) = &eps[0].host_identifier else {
        panic!()
    };
    assert_eq!(socket(&ep.address), ("10.0.0.12".into(), 15006));
    assert_eq!(eps[0].health_status, HealthStatus::Healthy as i32);
    assert_eq!(eps[0].load_balancing_weight.unwrap().value, 1);
    assert_eq!(
        label_map(&eps[0].metadata),
        labels(&[("team", "books"), ("version", "v1")])
    );

    let all: ClusterLoadAssignment = decode(&res.endpoints, "outbound|reviews");
    assert_eq!(
        all.endpoints
            .iter()
            .map(|l| l.lb_endpoints.len())
            .sum::<usize>(),
        2
    );
}

#[test]
fn endpoints_carry_health_weight_locality_and_direct_address() {
    let mut c = demo();
    let reviews = c.services.get_mut("reviews").unwrap();
    reviews.instances[0].healthy = false;
    reviews.instances[0].weight = 7;
    reviews.instances[0].locality = Some("dc1".into());
    reviews.instances[1].node = None; // not in the mesh: reached at address:port
    let shared = Shared::build(Arc::new(c));
    let res = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));
    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|reviews");
    assert_eq!(cla.endpoints.len(), 2, "grouped by locality");
    assert!(cla.endpoints[0].locality.is_none());
    assert_eq!(cla.endpoints[1].locality.as_ref().unwrap().zone, "dc1");
    let v1 = &cla.endpoints[1].lb_endpoints[0];
    assert_eq!(v1.health_status, HealthStatus::Unhealthy as i32);
    assert_eq!(v1.load_balancing_weight.unwrap().value, 7);
    let Some(HostIdentifier::Endpoint(ep)) = &cla.endpoints[0].lb_endpoints[0].host_identifier
    else {
        panic!()
    };
    assert_eq!(socket(&ep.address), ("10.0.0.13".into(), 9080));
}

#[test]
fn outbound_routes_follow_rules_in_order() {
    let shared = Shared::build(Arc::new(demo()));
    let res = shared.for_proxy(&proxy("vm-a", "10.0.0.11"));
    let rc: RouteConfiguration = decode(&res.routes, "outbound");
    assert_eq!(rc.name, "outbound");
    assert_eq!(rc.virtual_hosts.len(), 1, "scoped to reviews");
    let vh = vhost(&rc, "reviews");
    assert_eq!(
        vh.domains,
        [
            "reviews",
            "reviews:9080",
            "reviews.mesh",
            "reviews.mesh:9080"
        ]
    );
    assert_eq!(vh.routes.len(), 2, "no fallback after a catch-all rule");

    let first = &vh.routes[0];
    let m = first.r#match.as_ref().unwrap();
    assert_eq!(m.path_specifier, Some(PathSpecifier::Prefix("/".into())));
    assert_eq!(m.headers.len(), 1);
    assert_eq!(m.headers[0].name, "x-canary");
    let Some(HeaderMatchSpecifier::StringMatch(sm)) = &m.headers[0].header_match_specifier else {
        panic!()
    };
    assert_eq!(sm.match_pattern, Some(MatchPattern::Exact("1".into())));
    let a = route_action(first);
    assert_eq!(
        a.cluster_specifier,
        Some(ClusterSpecifier::Cluster("outbound|reviews|v2".into()))
    );
    assert_eq!(a.timeout.unwrap().seconds, 3);
    let retry = a.retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "5xx,connect-failure");
    assert_eq!(retry.num_retries.unwrap().value, 2);
    assert_eq!(retry.per_try_timeout.unwrap().seconds, 1);

    let Some(ClusterSpecifier::WeightedClusters(wc)) =
        &route_action(&vh.routes[1]).cluster_specifier
    else {
        panic!()
    };
    let split: Vec<_> = wc
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.unwrap().value))
        .collect();
    assert_eq!(
        split,
        [("outbound|reviews|v1", 80), ("outbound|reviews|v2", 20)]
    );
}

#[test]
fn default_route_fallback_and_undeclared_subsets() {
    let mut c = demo();
    let route = c.routes.get_mut("reviews").unwrap();
    route.timeout = None;
    route.retries = None;
    route.rules[0].matches = RouteMatch {
        path_exact: Some("/health".into()),
        method: Some("GET".into()),
        ..Default::default()
    };
    route.rules[1] = RouteRule {
        matches: RouteMatch {
            path_prefix: Some("/api".into()),
            ..Default::default()
        },
        to: vec![to(Some("nope"), 1)],
        actions: Default::default(),
        origin: Default::default(),
    };
    let shared = Shared::build(Arc::new(c));
    let res = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));
    let rc: RouteConfiguration = decode(&res.routes, "outbound");
    assert_eq!(
        rc.virtual_hosts
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        ["productpage", "ratings", "reviews"],
        "an unscoped proxy sees every service"
    );
    let vh = vhost(&rc, "reviews");
    assert_eq!(
        vh.routes.len(),
        2,
        "rule to an undeclared subset skipped, fallback added"
    );
    let m = vh.routes[0].r#match.as_ref().unwrap();
    assert_eq!(
        m.path_specifier,
        Some(PathSpecifier::Path("/health".into()))
    );
    assert_eq!(m.headers[0].name, ":method");
    let fallback = route_action(&vh.routes[1]);
    assert_eq!(
        fallback.cluster_specifier,
        Some(ClusterSpecifier::Cluster("outbound|reviews".into()))
    );
    assert!(
        fallback.timeout.is_none(),
        "Envoy's default unless configured"
    );
    let retry = fallback
        .retry_policy
        .as_ref()
        .expect("the mesh's default retries");
    assert_eq!(retry.retry_on, "connect-failure,refused-stream,reset");
    assert_eq!(retry.num_retries.as_ref().map(|n| n.value), Some(2));
    assert_eq!(
        retry.retry_host_predicate[0].name,
        "envoy.retry_host_predicates.previous_hosts"
    );

    let pp = vhost(&rc, "productpage");
    assert_eq!(pp.routes.len(), 1);
    assert_eq!(
        route_action(&pp.routes[0]).cluster_specifier,
        Some(ClusterSpecifier::Cluster("outbound|productpage".into()))
    );
}

#[test]
fn scoping_limits_a_proxy_to_its_upstreams() {
    let shared = Shared::build(Arc::new(demo()));
    // vm-a hosts productpage (upstreams = [reviews]).
    let a = shared.for_proxy(&proxy("vm-a", "10.0.0.11"));
    assert!(a
        .clusters
        .keys()
        .all(|n| n.contains("reviews") || n == "inbound|productpage"));
    assert!(!a.endpoints.contains_key("outbound|ratings"));
    assert!(!a.endpoints.contains_key("outbound|productpage"));
    // vm-d hosts ratings (no upstreams declared): everything.
    let d = shared.for_proxy(&proxy("vm-d", "10.0.0.14"));
    for svc in ["productpage", "ratings", "reviews"] {
        assert!(d.clusters.contains_key(&outbound_name(svc)), "{svc}");
    }
    // A host with no services: everything, and the same shared maps as any unscoped proxy.
    let x = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));
    assert!(Arc::ptr_eq(&x.endpoints, &d.endpoints));
    assert!(!x.listeners.contains_key("inbound"));
    assert_eq!(names(&x.routes), ["outbound"]);
    // Same scope, different hosts: one set of shared resources.
    let mut c = demo();
    c.services
        .get_mut("productpage")
        .unwrap()
        .instances
        .push(instance(Some("vm-e"), "10.0.0.15", 9081, &[]));
    let shared = Shared::build(Arc::new(c));
    let a = shared.for_proxy(&proxy("vm-a", "10.0.0.11"));
    let e = shared.for_proxy(&proxy("vm-e", "10.0.0.15"));
    assert!(Arc::ptr_eq(&a.endpoints, &e.endpoints));
    assert!(Arc::ptr_eq(&a.routes["outbound"], &e.routes["outbound"]));
}

#[test]
fn inbound_listener_cluster_and_routes() {
    let shared = Shared::build(Arc::new(demo()));
    let p = proxy("vm-b", "10.0.0.12");
    let res = shared.for_proxy(&p);
    assert_eq!(names(&res.listeners), ["inbound", "outbound"]);
    assert_eq!(names(&res.routes), ["inbound", "outbound"]);

    let l: Listener = decode(&res.listeners, "inbound");
    assert_eq!(socket(&l.address), ("10.0.0.12".into(), 15006));
    let hcm = hcm_of(&l);
    assert_eq!(hcm.stat_prefix, "inbound");
    let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
        panic!()
    };
    assert_eq!(rds.route_config_name, "inbound");

    let c: Cluster = decode(&res.clusters, "inbound|reviews");
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32))
    );
    let cla = c.load_assignment.unwrap();
    let Some(HostIdentifier::Endpoint(ep)) = &cla.endpoints[0].lb_endpoints[0].host_identifier
    else {
        panic!()
    };
    assert_eq!(socket(&ep.address), ("127.0.0.1".into(), 9080));

    let rc: RouteConfiguration = decode(&res.routes, "inbound");
    let vh = vhost(&rc, "reviews");
    assert_eq!(vh.domains.len(), 4);
    assert_eq!(
        route_action(&vh.routes[0]).cluster_specifier,
        Some(ClusterSpecifier::Cluster("inbound|reviews".into()))
    );
}

fn hcm_of(l: &Listener) -> HttpConnectionManager {
    let f = &l.filter_chains[0].filters[0];
    assert_eq!(f.name, "envoy.filters.network.http_connection_manager");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!()
    };
    unpack(any)
}

#[test]
fn outbound_listener_uses_rds_and_router() {
    let shared = Shared::build(Arc::new(demo()));
    let p = proxy("vm-a", "10.0.0.11");
    let res = shared.for_proxy(&p);
    let l: Listener = decode(&res.listeners, "outbound");
    assert_eq!(socket(&l.address), ("127.0.0.1".into(), 15001));
    let hcm = hcm_of(&l);
    assert_eq!(hcm.stat_prefix, "outbound");
    assert!(!hcm.use_remote_address.unwrap().value);
    assert_eq!(hcm.http_filters.len(), 1);
    assert_eq!(hcm.http_filters[0].name, "envoy.filters.http.router");
    let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
        panic!()
    };
    assert_eq!(rds.route_config_name, "outbound");
}

#[test]
fn http2_dns_and_tcp_services() {
    let mut c = demo();
    let mut grpc = service(
        "ledger",
        7000,
        None,
        vec![instance(Some("vm-b"), "10.0.0.12", 7000, &[])],
    );
    grpc.protocol = Protocol::Grpc;
    let ext = service(
        "payments",
        443,
        None,
        vec![instance(None, "pay.example.com", 443, &[])],
    );
    let mut db = service(
        "db",
        5432,
        None,
        vec![instance(None, "10.0.0.50", 5432, &[])],
    );
    db.protocol = Protocol::Tcp;
    for s in [grpc, ext, db] {
        c.services.insert(s.name.clone(), s);
    }
    let shared = Shared::build(Arc::new(c));
    let res = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));

    let ledger: Cluster = decode(&res.clusters, "outbound|ledger");
    let opts: HttpProtocolOptions = unpack(
        &ledger.typed_extension_protocol_options
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"],
    );
    assert!(matches!(
        opts.upstream_protocol_options,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(_))
    ));

    let pay: Cluster = decode(&res.clusters, "outbound|payments");
    assert_eq!(
        pay.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
    );
    assert!(pay.load_assignment.is_some());
    assert!(!res.endpoints.contains_key("outbound|payments"));

    let l: Listener = decode(&res.listeners, "outbound|db");
    assert_eq!(socket(&l.address), ("127.0.0.1".into(), 5432));
    let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type
    else {
        panic!()
    };
    let tcp: TcpProxy = unpack(any);
    assert_eq!(
        tcp.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster("outbound|db".into()))
    );
    let rc: RouteConfiguration = decode(&res.routes, "outbound");
    assert!(
        rc.virtual_hosts.iter().all(|v| v.name != "db"),
        "TCP is not routed by Host"
    );
}

#[test]
fn duplicate_domains_are_dropped() {
    let mut c = Catalog::default();
    for s in [
        service("foo", 80, None, vec![]),
        service("foo.mesh", 80, None, vec![]),
    ] {
        c.services.insert(s.name.clone(), s);
    }
    let shared = Shared::build(Arc::new(c));
    let res = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));
    let rc: RouteConfiguration = decode(&res.routes, "outbound");
    let mut all: Vec<_> = rc
        .virtual_hosts
        .iter()
        .flat_map(|v| v.domains.clone())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n);
    // A service with no instances still gets an (empty) assignment so its cluster warms.
    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|foo");
    assert!(cla.endpoints.is_empty());
}

#[test]
fn translation_is_deterministic() {
    let mut c = demo();
    let many: Vec<(String, String)> = (0..20)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    for svc in c.services.values_mut() {
        for inst in &mut svc.instances {
            inst.labels.extend(many.iter().cloned());
        }
    }
    let c = Arc::new(c);
    let proxies = [
        proxy("vm-a", "10.0.0.11"),
        proxy("vm-b", "10.0.0.12"),
        proxy("vm-x", "10.0.0.99"),
    ];
    let versions = |shared: &Shared, p: &Proxy| {
        let r = shared.for_proxy(p);
        [&r.clusters, &r.endpoints, &r.listeners, &r.routes]
            .iter()
            .flat_map(|m| m.values().map(|r| (r.name.clone(), r.version.clone())))
            .collect::<Vec<_>>()
    };
    let one = Shared::build(c.clone());
    for _ in 0..5 {
        let two = Shared::build(c.clone());
        for p in &proxies {
            assert_eq!(versions(&one, p), versions(&two, p), "{}", p.node);
        }
    }
    // And the labels survive the entry-by-entry encoding.
    let res = one.for_proxy(&proxies[2]);
    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|reviews|v2");
    let got = label_map(&cla.endpoints[0].lb_endpoints[0].metadata);
    assert_eq!(got.len(), 22);
    assert_eq!(got["version"], "v2");
}

#[test]
fn memoized_per_proxy() {
    let shared = Shared::build(Arc::new(demo()));
    let p = proxy("vm-b", "10.0.0.12");
    let a = shared.for_proxy(&p);
    let b = shared.for_proxy(&p);
    assert!(Arc::ptr_eq(&a.listeners, &b.listeners));
    let mut other = p.clone();
    other.outbound = SocketAddr::new(IpAddr::from([127, 0, 0, 2]), 15001);
    let c = shared.for_proxy(&other);
    let l: Listener = decode(&c.listeners, "outbound");
    assert_eq!(socket(&l.address), ("127.0.0.2".into(), 15001));
}

/// Settings with mTLS on, as a secure mesh translates.
fn mtls_settings() -> Arc<Settings> {
    Arc::new(Settings {
        trust_domain: "pilotfish.local".to_string(),
        mtls: true,
        ..Settings::default()
    })
}

/// The demo plus `db`, a strict-mTLS TCP service on vm-b: vm-b then has an HTTP and a TCP
/// inbound chain, and every proxy an `outbound|db` listener.
fn demo_with_db() -> Catalog {
    let mut c = demo();
    let mut db = service(
        "db",
        5432,
        None,
        vec![instance(Some("vm-b"), "10.0.0.12", 5432, &[])],
    );
    db.protocol = Protocol::Tcp;
    db.mtls = pilotfish_registries::model::MtlsMode::Strict;
    c.services.insert(db.name.clone(), db);
    c
}

#[path = "mtls_tests.rs"]
mod mtls;

#[path = "access_log_tests.rs"]
mod access_logs;

#[path = "trace_tests.rs"]
mod traces;

#[path = "intercept_tests.rs"]
mod intercepts;
