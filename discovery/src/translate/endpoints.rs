//! Instances -> `ClusterLoadAssignment`: one `LbEndpoint` per instance, grouped by locality,
//! with health, weight and labels (as metadata).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, HealthStatus, Locality, Metadata,
    SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct, UInt32Value, Value};
use pilotfish_registries::model::{Instance, Labels};
use prost::Message;

use super::tls::mark_mesh_endpoint;

/// The `typed_filter_metadata` key our labels live under.
pub const METADATA_KEY: &str = "pilotfish";

/// The assignment for `cluster_name`: every given instance at the address peers reach it by.
/// With `mtls`, mesh instances are marked for the cluster's `transport_socket_matches`.
///
/// `failover` (a policy's `locality.failover`) orders localities into priorities: instances
/// of the first listed locality present get priority 0, the next 1, ..., unlisted ones last;
/// Envoy sends traffic to a lower priority only as the higher ones lose healthy instances.
pub(super) fn load_assignment<'a>(
    cluster_name: &str,
    instances: impl IntoIterator<Item = &'a Instance>,
    mtls: bool,
    failover: &[String],
) -> ClusterLoadAssignment {
    // BTreeMap: localities in a stable order, the unknown locality first.
    let mut by_locality: BTreeMap<Option<&str>, Vec<LbEndpoint>> = BTreeMap::new();
    for instance in instances {
        let (host, port) = instance.target();
        let health = if instance.draining {
            HealthStatus::Draining
        } else if instance.healthy {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        };
        let mut endpoint = lb_endpoint(host, port, instance.weight, health, &instance.labels);
        if mtls {
            mark_mesh_endpoint(&mut endpoint.metadata, instance);
        }
        by_locality
            .entry(instance.locality.as_deref())
            .or_default()
            .push(endpoint);
    }
    let rank = |locality: Option<&str>| {
        locality
            .and_then(|l| failover.iter().position(|f| f == l))
            .unwrap_or(failover.len())
    };
    // Envoy wants priorities 0..N without gaps: rank the localities present, densely.
    let present: std::collections::BTreeSet<usize> = by_locality.keys().map(|l| rank(*l)).collect();
    let priority = |locality: Option<&str>| {
        if failover.is_empty() {
            return 0;
        }
        let r = rank(locality);
        u32::try_from(present.iter().filter(|p| **p < r).count()).unwrap_or(0)
    };
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(|(locality, lb_endpoints)| LocalityLbEndpoints {
                locality: locality.map(|zone| Locality {
                    zone: zone.to_string(),
                    ..Default::default()
                }),
                lb_endpoints,
                priority: priority(locality),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub(super) fn lb_endpoint(
    host: &str,
    port: u16,
    weight: u32,
    health: HealthStatus,
    labels: &Labels,
) -> LbEndpoint {
    LbEndpoint {
        health_status: health as i32,
        metadata: labels_metadata(labels),
        // Envoy requires weights >= 1; a weight of 0 in the registry is read as the minimum.
        load_balancing_weight: Some(UInt32Value {
            value: weight.max(1),
        }),
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(host, port)),
            ..Default::default()
        })),
    }
}

pub(super) fn socket_address(host: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Labels as `typed_filter_metadata["pilotfish"]`, a `google.protobuf.Struct` of strings.
///
/// prost encodes `Struct.fields` (a map) in `HashMap` order, which would make versions random.
/// Protobuf merges repeated map entries, so the encodings of single-entry Structs concatenated
/// in key order decode as the whole Struct, and encode the same way every time.
pub fn labels_metadata(labels: &Labels) -> Option<Metadata> {
    if labels.is_empty() {
        return None;
    }
    let mut value = Vec::new();
    for (k, v) in labels {
        let one = Struct {
            fields: [(
                k.clone(),
                Value {
                    kind: Some(Kind::StringValue(v.clone())),
                },
            )]
            .into(),
        };
        value.extend(one.encode_to_vec());
    }
    let body = Any {
        type_url: <Struct as prost::Name>::type_url(),
        value,
    };
    Some(Metadata {
        typed_filter_metadata: [(METADATA_KEY.to_string(), body)].into(),
        ..Default::default()
    })
}
