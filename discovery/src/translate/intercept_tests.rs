//! The `intercept` listener and `passthrough` cluster of proxies that capture their apps'
//! traffic (`pilotfish.intercept`).

use envoy_types::pb::envoy::config::listener::v3::FilterChain;

use super::*;

fn intercepting(node: &str, address: &str) -> Proxy {
    Proxy {
        intercept: Some("127.0.0.1:15002".parse().unwrap()),
        ..proxy(node, address)
    }
}

/// What the agent reads: `<svc>=<vip>` per chain, from the chain's name and prefix range.
fn intercept_meta(l: &Listener) -> Vec<String> {
    assert!(
        l.metadata.is_none(),
        "nothing at the listener level changes"
    );
    l.filter_chains
        .iter()
        .map(|c| {
            let svc = c.name.strip_prefix("intercept|").unwrap();
            format!("{svc}={}", chain_vip(c))
        })
        .collect()
}

fn chain<'a>(l: &'a Listener, name: &str) -> &'a FilterChain {
    l.filter_chains
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no chain {name}"))
}

fn chain_vip(c: &FilterChain) -> String {
    let m = c.filter_chain_match.as_ref().unwrap();
    assert_eq!(m.prefix_ranges.len(), 1);
    assert_eq!(m.prefix_ranges[0].prefix_len.as_ref().unwrap().value, 32);
    assert!(m.destination_port.is_none(), "any port");
    m.prefix_ranges[0].address_prefix.clone()
}

#[test]
fn no_intercept_listener_without_the_metadata() {
    let shared = Shared::build(Arc::new(demo()));
    let res = shared.for_proxy(&proxy("vm-a", "10.0.0.11"));
    assert!(!res.listeners.contains_key(INTERCEPT));
    assert!(!res.clusters.contains_key(PASSTHROUGH));
}

#[test]
fn intercept_maps_each_vip_in_scope_to_its_service_and_passes_the_rest_through() {
    let shared = Shared::build_with(Arc::new(demo_with_db()), mtls_settings());
    let vips = shared.vips().clone();
    assert_eq!(vips.len(), 4);
    // vm-a hosts productpage, whose upstreams are reviews only.
    let res = shared.for_proxy(&intercepting("vm-a", "10.0.0.11"));
    let l: Listener = decode(&res.listeners, INTERCEPT);
    assert_eq!(socket(&l.address), ("127.0.0.1".into(), 15002));
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.original_dst"
    );
    let chains: Vec<&str> = l.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(chains, ["intercept|reviews"]);
    let reviews = chain(&l, "intercept|reviews");
    assert_eq!(chain_vip(reviews), vips["reviews"].to_string());
    // The service's own routes (canary header, weights, retries), whatever the Host.
    let hcm: HttpConnectionManager = unpack(match &reviews.filters[0].config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any,
        other => panic!("{other:?}"),
    });
    let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier else {
        panic!("inline routes expected")
    };
    assert_eq!(rc.virtual_hosts.len(), 1);
    assert_eq!(rc.virtual_hosts[0].domains, ["*"]);
    let outbound: RouteConfiguration = decode(&res.routes, OUTBOUND);
    assert_eq!(
        rc.virtual_hosts[0].routes,
        vhost(&outbound, "reviews").routes
    );
    // Everything else goes where the app dialled.
    let default = l.default_filter_chain.as_ref().unwrap();
    let tcp: TcpProxy = unpack(match &default.filters[0].config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any,
        other => panic!("{other:?}"),
    });
    assert_eq!(
        tcp.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster(PASSTHROUGH.into()))
    );
    let c: Cluster = decode(&res.clusters, PASSTHROUGH);
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32
        ))
    );
    assert_eq!(c.lb_policy, LbPolicy::ClusterProvided as i32);
    // The agent's view: the VIPs in scope.
    assert_eq!(intercept_meta(&l), [format!("reviews={}", vips["reviews"])]);
}

#[test]
fn tcp_services_get_their_tcp_proxy_and_unscoped_proxies_see_every_service() {
    let shared = Shared::build_with(Arc::new(demo_with_db()), mtls_settings());
    // vm-x hosts nothing: every service is in scope.
    let res = shared.for_proxy(&intercepting("vm-x", "10.0.0.99"));
    let l: Listener = decode(&res.listeners, INTERCEPT);
    let chains: Vec<&str> = l.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        chains,
        [
            "intercept|db",
            "intercept|productpage",
            "intercept|ratings",
            "intercept|reviews"
        ]
    );
    let db = chain(&l, "intercept|db");
    assert_eq!(
        db.filters.last().unwrap().name,
        "envoy.filters.network.tcp_proxy"
    );
    let tcp: TcpProxy = unpack(match &db.filters.last().unwrap().config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any,
        other => panic!("{other:?}"),
    });
    assert_eq!(
        tcp.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster("outbound|db".into()))
    );
    assert_eq!(intercept_meta(&l).len(), 4);
    // The agent learns vm-b's inbound ports from its inbound clusters: reviews and db.
    let res = shared.for_proxy(&intercepting("vm-b", "10.0.0.12"));
    assert!(
        res.clusters.contains_key("inbound|reviews") && res.clusters.contains_key("inbound|db")
    );
}

#[test]
fn vips_are_the_same_for_the_same_services_and_follow_the_range() {
    let a = Shared::build(Arc::new(demo()));
    let b = Shared::build(Arc::new(demo()));
    assert_eq!(a.vips(), b.vips());
    let range: VipRange = "10.77.0.0/24".parse().unwrap();
    let c = Shared::build_with(
        Arc::new(demo()),
        Arc::new(Settings {
            vip_range: range,
            ..Settings::default()
        }),
    );
    for ip in c.vips().values() {
        assert!(range.contains(*ip), "{ip}");
    }
    // The intercept listener's bytes are deterministic too.
    let p = intercepting("vm-x", "10.0.0.99");
    assert_eq!(
        a.for_proxy(&p).listeners[INTERCEPT].version,
        b.for_proxy(&p).listeners[INTERCEPT].version
    );
}

#[test]
fn proxies_with_the_same_scope_share_one_intercept_listener() {
    let shared = Shared::build_with(Arc::new(demo_with_db()), mtls_settings());
    // vm-x and vm-y host nothing: the same scope (everything), different nodes and addresses.
    let x = shared.for_proxy(&intercepting("vm-x", "10.0.0.98"));
    let y = shared.for_proxy(&intercepting("vm-y", "10.0.0.99"));
    assert!(Arc::ptr_eq(
        &x.listeners[INTERCEPT],
        &y.listeners[INTERCEPT]
    ));
    // Another port is another listener.
    let z = shared.for_proxy(&Proxy {
        intercept: Some("127.0.0.1:15003".parse().unwrap()),
        ..proxy("vm-z", "10.0.0.97")
    });
    assert!(!Arc::ptr_eq(
        &x.listeners[INTERCEPT],
        &z.listeners[INTERCEPT]
    ));
    // An endpoint-only change keeps it.
    let old = demo_with_db();
    let mut new = old.clone();
    new.services.get_mut("reviews").unwrap().instances[1].port = 9999;
    let change = endpoint_change(&old, &new).unwrap();
    let next = shared.with_endpoints(Arc::new(new), &change);
    let x2 = next.for_proxy(&intercepting("vm-x", "10.0.0.98"));
    assert!(Arc::ptr_eq(
        &x.listeners[INTERCEPT],
        &x2.listeners[INTERCEPT]
    ));
}
