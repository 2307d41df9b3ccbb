//! Transparent interception: the `intercept` listener and the `passthrough` cluster, for proxies
//! whose agent redirects local apps' outbound TCP to Envoy (`pilotfish.intercept`).
//!
//! The agent's nftables rules send every captured connection to `intercept` (on
//! `127.0.0.1:<port>`); the `original_dst` listener filter restores the address the app
//! dialled, and the filter chains match it:
//!
//! - one chain per service in the proxy's scope that has a VIP ([`super::vips`]), named
//!   `intercept|<svc>`, matching `<vip>/32` on any port: HTTP services get a connection
//!   manager with the service's outbound virtual host inline (domains `*`: the address chose
//!   the service, so any `Host` works), TCP services the same `tcp_proxy` as their
//!   `outbound|<svc>` listener;
//! - the default chain, `passthrough`: everything else goes on to where the app dialled,
//!   through the `ORIGINAL_DST` cluster `passthrough` (Envoy's own connections are never
//!   captured, so this does not loop).
//!
//! The agent reads what mesh DNS answers from the chains themselves: the service in the name
//! (`intercept|<svc>`), its VIP in the one prefix range. Nothing at the listener level ever
//! changes (address, listener filter, default chain), so every change is one Envoy applies to
//! the filter chains in place: unchanged chains keep their connections, and no listen socket is
//! replaced (a full listener update would, resetting connections still in its accept queue).
//! Nothing in the listener is the node's own (the agent takes its inbound ports from its
//! `inbound|<svc>` clusters), so proxies with the same scope, access log, tracing and port share
//! one listener.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{CidrRange, TrafficDirection};
use envoy_types::pb::envoy::config::listener::v3::{
    listener_filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::google::protobuf::UInt32Value;
use pilotfish_registries::model::{Catalog, Protocol};

use super::access_log::{self, Direction};
use super::endpoints::socket_address;
use super::{any, duration, listeners, trace};
use crate::proxy::Proxy;
use crate::resources::Resource;

/// The listener's name, and its chains' prefix (`intercept|<svc>`).
pub const INTERCEPT: &str = "intercept";
/// The cluster that connects to where the app dialled.
pub const PASSTHROUGH: &str = "passthrough";
const ORIGINAL_DST: &str = "envoy.filters.listener.original_dst";

/// A service the proxy may call, as the `intercept` listener needs it.
pub(super) struct Target<'a> {
    pub name: &'a str,
    pub vip: Ipv4Addr,
    pub protocol: Protocol,
    /// The outbound virtual host (HTTP services).
    pub vhost: Option<&'a VirtualHost>,
}

/// The `intercept` listener on `addr` (see the module comment). `targets` in name order.
pub(super) fn listener(
    catalog: &Catalog,
    proxy: &Proxy,
    addr: SocketAddr,
    targets: &[Target<'_>],
    mtls: bool,
) -> Arc<Resource> {
    let mut chains = Vec::with_capacity(targets.len());
    for t in targets {
        let name = format!("{INTERCEPT}|{}", t.name);
        let filter = match (t.protocol, t.vhost) {
            (Protocol::Tcp, _) | (_, None) => {
                listeners::tcp_filter(catalog, t.name, &proxy.access_log)
            }
            (_, Some(vhost)) => {
                let config = RouteConfiguration {
                    name: name.clone(),
                    virtual_hosts: vec![VirtualHost {
                        domains: vec!["*".to_string()],
                        ..vhost.clone()
                    }],
                    ..Default::default()
                };
                let mut hcm = listeners::outbound_hcm(
                    &name,
                    RouteSpecifier::RouteConfig(config),
                    catalog,
                    mtls,
                );
                hcm.access_log = access_log::http(&proxy.access_log, Direction::Outbound);
                hcm.tracing = trace::http(proxy.tracing.as_ref());
                listeners::filter(listeners::HCM, any(&hcm))
            }
        };
        chains.push(FilterChain {
            name,
            filter_chain_match: Some(FilterChainMatch {
                prefix_ranges: vec![CidrRange {
                    address_prefix: t.vip.to_string(),
                    prefix_len: Some(UInt32Value { value: 32 }),
                }],
                ..Default::default()
            }),
            filters: vec![filter],
            ..Default::default()
        });
    }
    let passthrough = FilterChain {
        name: PASSTHROUGH.to_string(),
        filters: vec![listeners::tcp_proxy_filter(PASSTHROUGH, &proxy.access_log)],
        ..Default::default()
    };
    let listener = Listener {
        name: INTERCEPT.to_string(),
        address: Some(socket_address(&addr.ip().to_string(), addr.port())),
        traffic_direction: TrafficDirection::Outbound as i32,
        listener_filters: vec![ListenerFilter {
            name: ORIGINAL_DST.to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                &OriginalDst::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: chains,
        default_filter_chain: Some(passthrough),
        ..Default::default()
    };
    Resource::encode(INTERCEPT, &listener)
}

/// `passthrough`: connects to the original destination of the downstream connection.
pub(super) fn passthrough_cluster() -> Arc<Resource> {
    let cluster = Cluster {
        name: PASSTHROUGH.to_string(),
        connect_timeout: Some(duration(std::time::Duration::from_secs(5))),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        ..Default::default()
    };
    Resource::encode(PASSTHROUGH, &cluster)
}

/// The services of `vips` that are in the proxy's scope, as targets.
pub(super) fn targets<'a>(
    vips: &'a BTreeMap<String, Ipv4Addr>,
    in_scope: impl Fn(&str) -> Option<(Protocol, Option<&'a VirtualHost>)>,
) -> Vec<Target<'a>> {
    vips.iter()
        .filter_map(|(name, vip)| {
            let (protocol, vhost) = in_scope(name)?;
            Some(Target {
                name,
                vip: *vip,
                protocol,
                vhost,
            })
        })
        .collect()
}
