//! A proxy's listeners: `outbound` for local apps (HTTP, routed by Host), `inbound` on the mesh
//! port for peers, and one `outbound|<svc>` per TCP service.
//!
//! # The mesh port with mTLS
//!
//! `inbound` has the `tls_inspector` listener filter and one filter chain per local service
//! (named `inbound|<svc>`), matched by `server_names = [<svc>.<trust_domain>]` and
//! `transport_protocol = "tls"`. The chain terminates TLS with the service's certificate and
//! requires a client certificate from the trust domain; then, for HTTP, a connection manager
//! (RBAC deny, RBAC allow, router; inline route configuration `inbound|<svc>` to the
//! `inbound|<svc>` cluster) that sets `x-forwarded-client-cert` with the caller's SPIFFE ID; for
//! TCP, RBAC deny, RBAC allow and tcp_proxy to `inbound|<svc>`.
//!
//! When some local HTTP services are `permissive`, one more chain, `inbound|plaintext`, matches
//! `transport_protocol = "raw_buffer"`: a connection manager routed by Host with RDS `inbound`
//! (only the permissive services), whose RBAC filters enforce each service's rules per virtual
//! host. Without it a plaintext connection matches no chain and is closed: strict services are
//! unreachable in plaintext. Every chain sets `transport_protocol`, and no two chains match the
//! same (b.8). Permissive TCP services accept TLS only: plaintext TCP cannot name its service.
//!
//! Every connection manager and TCP proxy carries the proxy's access log ([`access_log`]):
//! `outbound` for the `outbound` and `outbound|<svc>` listeners, `inbound` for the mesh port's
//! chains and gateways. Every connection manager carries the proxy's tracing config
//! ([`trace`]), when it has one.
//!
//! Connection managers are hardened against path confusion (normalize_path, merge_slashes,
//! escaped slashes unescaped and redirected) whenever mTLS is on, so RBAC path rules see the
//! path the app sees.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{
        CodecType, ForwardClientCertDetails, PathWithEscapedSlashesAction, RouteSpecifier,
        SetCurrentClientCertDetails,
    },
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::BoolValue;
use pilotfish_registries::model::{Catalog, Gateway, MtlsMode, Service};

use super::access_log::{self, Direction};
use super::endpoints::socket_address;
use super::tls::{self, Settings};
use super::trace;
use super::{ads, any, inbound_name, outbound_name, rbac, routes, subset_name, INBOUND, OUTBOUND};
use crate::proxy::{AccessLog, Proxy};
use crate::resources::Resource;

pub(super) const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const ROUTER: &str = "envoy.filters.http.router";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
/// The name of the mesh port's plaintext chain (permissive services).
pub const PLAINTEXT_CHAIN: &str = "inbound|plaintext";

/// `outbound`: where local apps send mesh traffic, routed by RDS `outbound`.
pub(super) fn outbound(proxy: &Proxy, settings: &Settings, catalog: &Catalog) -> Arc<Resource> {
    let route = RouteSpecifier::Rds(Rds {
        config_source: Some(ads()),
        route_config_name: OUTBOUND.to_string(),
    });
    let mut hcm = outbound_hcm(OUTBOUND, route, catalog, settings.mtls);
    hcm.access_log = access_log::http(&proxy.access_log, Direction::Outbound);
    hcm.tracing = trace::http(proxy.tracing.as_ref());
    let listener = listener(
        OUTBOUND,
        proxy.outbound,
        TrafficDirection::Outbound,
        HCM,
        any(&hcm),
    );
    Resource::encode(OUTBOUND, &listener)
}

/// The connection manager of local apps' HTTP calls (`outbound`, and `intercept`'s chains).
/// The fault and local rate limit filters are there only when some rule or policy uses them
/// (they act only through per-route configuration), so meshes without them get the same
/// listener as before.
pub(super) fn outbound_hcm(
    stat_prefix: &str,
    route: RouteSpecifier,
    catalog: &Catalog,
    mtls: bool,
) -> HttpConnectionManager {
    let mut filters = Vec::new();
    let faults = catalog
        .routes
        .values()
        .any(|r| r.rules.iter().any(|rule| rule.actions.fault.is_some()));
    if faults {
        filters.push(http_filter(
            routes::FAULT_FILTER,
            any(&HttpFault::default()),
        ));
    }
    if catalog.policies.values().any(|p| p.rate_limit.is_some()) {
        let config = LocalRateLimit {
            stat_prefix: "outbound_ratelimit".to_string(),
            ..Default::default()
        };
        filters.push(http_filter(routes::RATE_LIMIT_FILTER, any(&config)));
    }
    hcm(stat_prefix, route, filters, mtls)
}

/// `gateway|<name>`: an ingress gateway's listener on its node, routes inline.
pub(super) fn gateway(catalog: &Catalog, gw: &Gateway, proxy: &Proxy) -> Arc<Resource> {
    let name = format!("gateway|{}", gw.name);
    let mut hcm = hcm(
        &name,
        RouteSpecifier::RouteConfig(routes::gateway(catalog, gw, &name)),
        Vec::new(),
        true,
    );
    // The edge: X-Forwarded-For is the real client's address.
    hcm.use_remote_address = Some(BoolValue { value: true });
    hcm.access_log = access_log::http(&proxy.access_log, Direction::Inbound);
    hcm.tracing = trace::http(proxy.tracing.as_ref());
    let listener = listener(&name, gw.listen, TrafficDirection::Inbound, HCM, any(&hcm));
    Resource::encode(name, &listener)
}

fn http_filter(name: &str, config: envoy_types::pb::google::protobuf::Any) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// `inbound` without mTLS: peers' traffic on `address:mesh_port`, routed by RDS `inbound` to
/// local apps.
pub(super) fn inbound(proxy: &Proxy) -> Arc<Resource> {
    let addr = SocketAddr::new(proxy.address, proxy.mesh_port);
    let route = RouteSpecifier::Rds(Rds {
        config_source: Some(ads()),
        route_config_name: INBOUND.to_string(),
    });
    let mut hcm = hcm(INBOUND, route, Vec::new(), false);
    hcm.access_log = access_log::http(&proxy.access_log, Direction::Inbound);
    hcm.tracing = trace::http(proxy.tracing.as_ref());
    let listener = listener(INBOUND, addr, TrafficDirection::Inbound, HCM, any(&hcm));
    Resource::encode(INBOUND, &listener)
}

/// `inbound` with mTLS, and the `inbound` route configuration when some local HTTP service is
/// permissive (see the module comment). `local` are the node's services, in name order.
pub(super) fn inbound_mtls(
    catalog: &Catalog,
    proxy: &Proxy,
    local: &[&Service],
    settings: &Settings,
) -> (Arc<Resource>, Option<Arc<Resource>>) {
    let td = &settings.trust_domain;
    let mut chains = Vec::with_capacity(local.len() + 1);
    let mut plaintext = Vec::new();
    for svc in local {
        let policies = rbac::policies(catalog, svc, td);
        let name = inbound_name(&svc.name);
        let filters = if svc.protocol.is_http() {
            let mut hcm = hcm(
                &name,
                RouteSpecifier::RouteConfig(routes::inbound_chain(svc)),
                rbac::http_filters(&policies),
                true,
            );
            // The app learns who called: the caller's SPIFFE ID, never a client-sent header.
            hcm.forward_client_cert_details = ForwardClientCertDetails::SanitizeSet as i32;
            hcm.set_current_client_cert_details = Some(SetCurrentClientCertDetails {
                uri: true,
                ..Default::default()
            });
            hcm.access_log = access_log::http(&proxy.access_log, Direction::Inbound);
            hcm.tracing = trace::http(proxy.tracing.as_ref());
            vec![filter(HCM, any(&hcm))]
        } else {
            let mut filters = rbac::network_filters(svc, &policies);
            let mut tcp = tcp_proxy(&name);
            tcp.access_log = access_log::tcp(&proxy.access_log, Direction::Inbound);
            filters.push(filter(TCP_PROXY, any(&tcp)));
            filters
        };
        chains.push(FilterChain {
            name: name.clone(),
            filter_chain_match: Some(FilterChainMatch {
                server_names: vec![tls::sni(&svc.name, td)],
                transport_protocol: "tls".to_string(),
                ..Default::default()
            }),
            filters,
            transport_socket: Some(tls::downstream(svc, settings)),
            ..Default::default()
        });
        if svc.mtls == MtlsMode::Permissive && svc.protocol.is_http() {
            plaintext.push((*svc, policies));
        }
    }

    let mut route = None;
    if !plaintext.is_empty() {
        let deny = plaintext.iter().any(|(_, p)| p.deny.is_some());
        let allow = plaintext.iter().any(|(_, p)| p.allow.is_some());
        let mut hcm = hcm(
            INBOUND,
            RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: INBOUND.to_string(),
            }),
            rbac::shared_http_filters(deny, allow),
            true,
        );
        hcm.access_log = access_log::http(&proxy.access_log, Direction::Inbound);
        hcm.tracing = trace::http(proxy.tracing.as_ref());
        chains.push(FilterChain {
            name: PLAINTEXT_CHAIN.to_string(),
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: "raw_buffer".to_string(),
                ..Default::default()
            }),
            filters: vec![filter(HCM, any(&hcm))],
            ..Default::default()
        });
        route = Some(routes::inbound_plaintext(&plaintext));
    }

    let listener = Listener {
        name: INBOUND.to_string(),
        address: Some(socket_address(&proxy.address.to_string(), proxy.mesh_port)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![ListenerFilter {
            name: TLS_INSPECTOR.to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: chains,
        ..Default::default()
    };
    (Resource::encode(INBOUND, &listener), route)
}

pub(super) fn filter(name: &str, typed_config: envoy_types::pb::google::protobuf::Any) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(typed_config)),
    }
}

fn tcp_proxy(cluster: &str) -> TcpProxy {
    TcpProxy {
        stat_prefix: cluster.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    }
}

/// `outbound|<svc>`: a TCP service's local port, proxied by [`tcp_filter`].
pub(super) fn tcp_outbound(
    catalog: &Catalog,
    service: &str,
    addr: SocketAddr,
    log: &AccessLog,
) -> Arc<Resource> {
    let name = outbound_name(service);
    let listener = Listener {
        name: name.clone(),
        address: Some(socket_address(&addr.ip().to_string(), addr.port())),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![tcp_filter(catalog, service, log)],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::encode(name, &listener)
}

/// A TCP proxy to `cluster`, with the outbound access log.
pub(super) fn tcp_proxy_filter(cluster: &str, log: &AccessLog) -> Filter {
    let mut proxy = tcp_proxy(cluster);
    proxy.access_log = access_log::tcp(log, Direction::Outbound);
    filter(TCP_PROXY, any(&proxy))
}

/// A local app's TCP connection to `service`: proxied to its `outbound|<svc>` cluster, or
/// split by weight over subsets when the service's first route rule says so.
pub(super) fn tcp_filter(catalog: &Catalog, service: &str, log: &AccessLog) -> Filter {
    let name = outbound_name(service);
    let mut proxy = tcp_proxy(&name);
    proxy.access_log = access_log::tcp(log, Direction::Outbound);
    let subsets = catalog.subsets(service);
    let to: Vec<(String, u32)> = catalog
        .routes
        .get(service)
        .and_then(|r| r.rules.iter().find(|rule| !rule.to.is_empty()))
        .map(|rule| {
            rule.to
                .iter()
                .filter(|d| d.weight > 0)
                .filter_map(|d| match &d.subset {
                    None => Some((name.clone(), d.weight)),
                    Some(s) if subsets.is_some_and(|m| m.contains_key(s)) => {
                        Some((subset_name(service, s), d.weight))
                    }
                    Some(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match to.len() {
        0 => {}
        1 => {
            proxy.cluster_specifier = to
                .into_iter()
                .next()
                .map(|(c, _)| tcp_proxy::ClusterSpecifier::Cluster(c));
        }
        _ => {
            proxy.cluster_specifier = Some(tcp_proxy::ClusterSpecifier::WeightedClusters(
                tcp_proxy::WeightedCluster {
                    clusters: to
                        .into_iter()
                        .map(
                            |(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                                name,
                                weight,
                                ..Default::default()
                            },
                        )
                        .collect(),
                },
            ));
        }
    }
    filter(TCP_PROXY, any(&proxy))
}

/// An HTTP connection manager: `filters`, then the router. `hardened` normalizes the path
/// before RBAC sees it, so that a path rule checks the path the app gets (security.md c.9:
/// CVE-2020-8595, CVE-2021-39156; escaped slashes, CVE-2021-29492). RBAC `url_path` matches the
/// path without query or fragment.
fn hcm(
    stat_prefix: &str,
    route: RouteSpecifier,
    mut filters: Vec<HttpFilter>,
    hardened: bool,
) -> HttpConnectionManager {
    filters.push(HttpFilter {
        name: ROUTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    });
    let mut hcm = HttpConnectionManager {
        codec_type: CodecType::Auto as i32,
        stat_prefix: stat_prefix.to_string(),
        // Apps and peers are not the edge: keep the client's X-Forwarded-For as it came.
        use_remote_address: Some(BoolValue { value: false }),
        http_filters: filters,
        route_specifier: Some(route),
        ..Default::default()
    };
    if hardened {
        hcm.normalize_path = Some(BoolValue { value: true });
        hcm.merge_slashes = true;
        hcm.path_with_escaped_slashes_action =
            PathWithEscapedSlashesAction::UnescapeAndRedirect as i32;
    }
    hcm
}

fn listener(
    name: &str,
    addr: SocketAddr,
    direction: TrafficDirection,
    filter_name: &str,
    typed_config: envoy_types::pb::google::protobuf::Any,
) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(&addr.ip().to_string(), addr.port())),
        traffic_direction: direction as i32,
        // One chain with no match: nothing for Envoy to find ambiguous (b.8). With mTLS the
        // inbound listener is built by `inbound_mtls` instead.
        filter_chains: vec![FilterChain {
            filters: vec![filter(filter_name, typed_config)],
            ..Default::default()
        }],
        ..Default::default()
    }
}
