//! A proxy's listeners: `outbound` for local apps (HTTP, routed by Host), `inbound` on the mesh
//! port for peers, and one `outbound|<svc>` per TCP service.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::BoolValue;

use super::endpoints::socket_address;
use super::{ads, any, outbound_name, INBOUND, OUTBOUND};
use crate::proxy::Proxy;
use crate::xds::resource::Resource;

const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const ROUTER: &str = "envoy.filters.http.router";

/// `outbound`: where local apps send mesh traffic, routed by RDS `outbound`.
pub(super) fn outbound(proxy: &Proxy) -> Arc<Resource> {
    http_listener(OUTBOUND, proxy.outbound, TrafficDirection::Outbound)
}

/// `inbound`: peers' traffic on `address:mesh_port`, routed by RDS `inbound` to local apps.
pub(super) fn inbound(proxy: &Proxy) -> Arc<Resource> {
    let addr = SocketAddr::new(proxy.address, proxy.mesh_port);
    http_listener(INBOUND, addr, TrafficDirection::Inbound)
}

/// `outbound|<svc>`: a TCP service's local port, proxied to its `outbound|<svc>` cluster.
pub(super) fn tcp_outbound(service: &str, addr: SocketAddr) -> Arc<Resource> {
    let name = outbound_name(service);
    let proxy = TcpProxy {
        stat_prefix: name.clone(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(name.clone())),
        ..Default::default()
    };
    let listener = listener(
        &name,
        addr,
        TrafficDirection::Outbound,
        TCP_PROXY,
        any(&proxy),
    );
    Resource::encode(name, &listener)
}

/// A listener whose one filter is an HTTP connection manager with routes from RDS `name`.
fn http_listener(name: &str, addr: SocketAddr, direction: TrafficDirection) -> Arc<Resource> {
    let hcm = HttpConnectionManager {
        codec_type: CodecType::Auto as i32,
        stat_prefix: name.to_string(),
        // Apps and peers are not the edge: keep the client's X-Forwarded-For as it came.
        use_remote_address: Some(BoolValue { value: false }),
        http_filters: vec![HttpFilter {
            name: ROUTER.to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                any(&Router::default()),
            )),
            ..Default::default()
        }],
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_string(),
        })),
        ..Default::default()
    };
    let listener = listener(name, addr, direction, HCM, any(&hcm));
    Resource::encode(name, &listener)
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
        // One chain with no match: nothing for Envoy to find ambiguous (b.8). The mTLS issue
        // adds a transport socket to the inbound chain.
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: filter_name.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(typed_config)),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}
