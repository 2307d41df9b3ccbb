//! Services -> clusters: outbound ones (per service and per subset, with their endpoint
//! assignments) and the inbound one that leads to a local app. With mTLS, outbound clusters
//! reach mesh instances over TLS (see [`super::tls`]); inbound ones stay plaintext (the app is
//! local).

use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers::Thresholds,
    cluster::{
        ClusterDiscoveryType, CommonLbConfig, DiscoveryType, DnsLookupFamily, EdsClusterConfig,
        LbPolicy,
    },
    CircuitBreakers, Cluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{
    health_check::{HealthChecker, HttpHealthCheck, TcpHealthCheck},
    HealthCheck, Http1ProtocolOptions, Http2ProtocolOptions,
    HttpProtocolOptions as CommonHttpProtocolOptions,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::v3::{CodecClientType, Percent};
use envoy_types::pb::google::protobuf::UInt32Value;
use pilotfish_registries::model::{Catalog, Instance, LoadBalancer, Policy, Protocol, Service};

use super::endpoints::{lb_endpoint, load_assignment};
use super::tls::{secure_cluster, ClientTls};
use super::{ads, any, duration, inbound_name, outbound_name, subset_name};
use crate::proxy::Proxy;
use crate::resources::Resource;

const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The outbound clusters of `svc` (whole service, then each subset) and the endpoint
/// assignments of those that use EDS. `tls` is set when the mesh runs with mTLS: mesh
/// instances are then reached over TLS as its client identity. The assignments do not depend
/// on the client identity, only on whether there is one.
pub(super) fn outbound(
    catalog: &Catalog,
    svc: &Service,
    tls: Option<&ClientTls<'_>>,
) -> (Vec<Arc<Resource>>, Vec<Arc<Resource>>) {
    build_outbound(catalog, svc, tls, true)
}

/// The outbound clusters of `svc` alone, as `tls`'s client identity reaches them.
pub(super) fn outbound_clusters(
    catalog: &Catalog,
    svc: &Service,
    tls: &ClientTls<'_>,
) -> Vec<Arc<Resource>> {
    build_outbound(catalog, svc, Some(tls), false).0
}

fn build_outbound(
    catalog: &Catalog,
    svc: &Service,
    tls: Option<&ClientTls<'_>>,
    with_endpoints: bool,
) -> (Vec<Arc<Resource>>, Vec<Arc<Resource>>) {
    // EDS carries IP addresses only; a DNS name needs a cluster that resolves it.
    let dns = svc
        .instances
        .iter()
        .any(|i| i.address.parse::<IpAddr>().is_err());
    let mut targets: Vec<(String, Vec<&Instance>)> =
        vec![(outbound_name(&svc.name), svc.instances.iter().collect())];
    for (subset, selector) in catalog.subsets(&svc.name).into_iter().flatten() {
        let members = svc
            .instances
            .iter()
            .filter(|i| i.matches(selector))
            .collect();
        targets.push((subset_name(&svc.name, subset), members));
    }

    let policy = catalog.policies.get(&svc.name);
    let failover = policy.map(|p| p.failover.as_slice()).unwrap_or_default();
    let mut clusters = Vec::with_capacity(targets.len());
    let mut endpoints = Vec::new();
    for (name, members) in targets {
        let assignment = load_assignment(&name, members, tls.is_some(), failover);
        let mut cluster = base(catalog, svc, &name, policy.and_then(|p| p.idle_timeout));
        if let Some(policy) = policy {
            resilience(&mut cluster, svc, policy);
        }
        if !dns {
            mesh_defaults(&mut cluster, svc);
        }
        if let Some(tls) = tls {
            secure_cluster(&mut cluster, svc, tls);
        }
        if dns {
            cluster.cluster_discovery_type =
                Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
            cluster.dns_lookup_family = DnsLookupFamily::V4Preferred as i32;
            cluster.load_assignment = Some(assignment);
        } else {
            cluster.cluster_discovery_type =
                Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
            cluster.eds_cluster_config = Some(EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: name.clone(),
            });
            if with_endpoints {
                endpoints.push(Resource::encode(name.clone(), &assignment));
            }
        }
        clusters.push(Resource::encode(name, &cluster));
    }
    (clusters, endpoints)
}

/// `inbound|<svc>`: the instances of `svc` on the proxy's own host, at `app_address:port`.
pub(super) fn inbound(catalog: &Catalog, svc: &Service, proxy: &Proxy) -> Arc<Resource> {
    let name = inbound_name(&svc.name);
    let app = proxy.app_address.to_string();
    let lb_endpoints = svc
        .instances
        .iter()
        .filter(|i| i.node.as_deref() == Some(proxy.node.as_str()))
        // Peers already steer around unhealthy instances; locally the app gets what arrives.
        .map(|i| {
            lb_endpoint(
                &app,
                i.port,
                i.weight,
                envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy,
                &Default::default(),
            )
        })
        .collect();
    let mut cluster = base(catalog, svc, &name, None);
    cluster.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
    cluster.load_assignment = Some(ClusterLoadAssignment {
        cluster_name: name.clone(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    });
    Resource::encode(name, &cluster)
}

/// What every EDS cluster gets unless its policy says otherwise:
///
/// - no limit on concurrent retries (routes retry connect failures and resets by default);
/// - no panic mode (Envoy's default sends to every host once fewer than half are healthy):
///   an instance discovery marks unhealthy (its host is dead, Consul says critical) gets no
///   traffic, however many others share its fate;
/// - for services with mesh instances, outlier detection on gateway failures (connect
///   failures, resets, 502/503/504: failures of the path, not of the app), which ejects a host
///   that died before discovery noticed (at most half the hosts).
fn mesh_defaults(cluster: &mut Cluster, svc: &Service) {
    cluster.common_lb_config = Some(CommonLbConfig {
        healthy_panic_threshold: Some(Percent { value: 0.0 }),
        ..Default::default()
    });
    // Envoy allows 3 concurrent retries per cluster by default: when a host dies with more
    // requests in flight, the rest fail without a retry. Istio lifts the limit the same way.
    let breakers = cluster
        .circuit_breakers
        .get_or_insert_with(|| CircuitBreakers {
            thresholds: vec![Thresholds::default()],
            ..Default::default()
        });
    for t in &mut breakers.thresholds {
        t.max_retries.get_or_insert(UInt32Value { value: u32::MAX });
    }
    let mesh = svc.instances.iter().any(|i| i.node.is_some());
    if mesh && cluster.outlier_detection.is_none() {
        let count = |value| Some(UInt32Value { value });
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_gateway_failure: count(5),
            enforcing_consecutive_gateway_failure: count(100),
            // An app's own 500s are not a reason to eject its host.
            enforcing_consecutive_5xx: count(0),
            enforcing_success_rate: count(0),
            interval: Some(duration(std::time::Duration::from_secs(5))),
            base_ejection_time: Some(duration(std::time::Duration::from_secs(10))),
            // Never the last healthy half: a lone host that fails stays in (it is all there is).
            max_ejection_percent: count(50),
            ..Default::default()
        });
    }
}

/// A policy's circuit breakers, outlier detection and active health check, on an outbound
/// cluster (the inbound cluster leads to the local app and keeps Envoy's defaults).
fn resilience(cluster: &mut Cluster, svc: &Service, policy: &Policy) {
    let count = |v: Option<u32>| v.map(|value| UInt32Value { value });
    if let Some(pool) = &policy.connection_pool {
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: count(pool.max_connections),
                max_pending_requests: count(pool.max_pending_requests),
                max_requests: count(pool.max_requests),
                max_retries: count(pool.max_retries),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(o) = &policy.outlier_detection {
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: count(o.consecutive_5xx),
            interval: o.interval.map(duration),
            base_ejection_time: o.base_ejection_time.map(duration),
            max_ejection_percent: count(o.max_ejection_percent),
            ..Default::default()
        });
    }
    if let Some(h) = &policy.health_check {
        let checker = match (&h.path, svc.protocol) {
            (Some(path), p) if p != Protocol::Tcp => {
                HealthChecker::HttpHealthCheck(HttpHealthCheck {
                    // The peer's mesh port routes by Host: the service name reaches its app.
                    host: svc.name.clone(),
                    path: path.clone(),
                    codec_client_type: if p.is_http2() {
                        CodecClientType::Http2
                    } else {
                        CodecClientType::Http1
                    } as i32,
                    ..Default::default()
                })
            }
            _ => HealthChecker::TcpHealthCheck(TcpHealthCheck::default()),
        };
        cluster.health_checks = vec![HealthCheck {
            timeout: Some(duration(h.timeout)),
            interval: Some(duration(h.interval)),
            healthy_threshold: count(Some(h.healthy_threshold)),
            unhealthy_threshold: count(Some(h.unhealthy_threshold)),
            health_checker: Some(checker),
            ..Default::default()
        }];
    }
}

/// What every cluster of `svc` shares: timeouts, balancing, upstream protocol.
fn base(
    catalog: &Catalog,
    svc: &Service,
    name: &str,
    idle_timeout: Option<std::time::Duration>,
) -> Cluster {
    let policy = catalog.policies.get(&svc.name);
    let connect_timeout = policy
        .and_then(|p| p.connect_timeout)
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let lb_policy = match policy.map(|p| p.load_balancer).unwrap_or_default() {
        LoadBalancer::RoundRobin => LbPolicy::RoundRobin,
        LoadBalancer::LeastRequest => LbPolicy::LeastRequest,
        LoadBalancer::Random => LbPolicy::Random,
        // Without a hash policy on the route these pick hosts at random (a later issue).
        LoadBalancer::RingHash => LbPolicy::RingHash,
        LoadBalancer::Maglev => LbPolicy::Maglev,
    };
    let mut cluster = Cluster {
        name: name.to_string(),
        connect_timeout: Some(duration(connect_timeout)),
        lb_policy: lb_policy as i32,
        ..Default::default()
    };
    let http_idle = idle_timeout.filter(|_| svc.protocol.is_http());
    if svc.protocol.is_http2() || http_idle.is_some() {
        let protocol = if svc.protocol.is_http2() {
            ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
        } else {
            ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
        };
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(protocol),
                },
            )),
            common_http_protocol_options: http_idle.map(|d| CommonHttpProtocolOptions {
                idle_timeout: Some(duration(d)),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A single entry: prost encodes maps in HashMap order (see the module comment).
        cluster.typed_extension_protocol_options =
            [(HTTP_PROTOCOL_OPTIONS.to_string(), any(&options))].into();
    }
    cluster
}
