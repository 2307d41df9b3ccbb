//! Tracing: for a proxy whose agent names a Zipkin collector (`pilotfish.zipkin`, see
//! `proxy.rs`), a cluster that reaches the collector and the tracing config of every HTTP
//! connection manager of its listeners. Proxies without it get neither, byte for byte what
//! they got before.
//!
//! # Spans
//!
//! Envoy's Zipkin tracer (`envoy.tracers.zipkin`) reads and writes B3 headers
//! (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, ...). A listener's `traffic_direction` picks
//! the span kind: the `outbound` connection manager opens a CLIENT span (a new trace when the
//! app sent no B3 headers), the mesh port's and gateways' ones a SERVER span.
//! `shared_span_context = false`, as Istio does: the callee's SERVER span gets its own id, with
//! the caller's CLIENT span as its parent, so caller and callee are two hops of one trace.
//! Trace ids are 128 bits, as W3C and OpenTelemetry collectors expect.
//!
//! Sampling (`pilotfish.trace_sample_percent`) is `random_sampling`: the share of requests
//! without a decision that start a trace. A request that arrives with `x-b3-sampled` keeps the
//! caller's decision, so a trace is never cut in half.
//!
//! Envoy buffers spans and posts them as a JSON array to `/api/v2/spans` every 5 seconds or
//! every 5 spans (its runtime keys `tracing.zipkin.flush_interval_ms`, `min_flush_spans`).
//! `localEndpoint.serviceName` is Envoy's `node.cluster`, which the agent sets to the node name
//! when tracing is on.
//!
//! The collector is named with the legacy `collector_cluster` fields rather than
//! `collector_service`, which only recent Envoy releases know.

use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily},
    Cluster,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::trace::v3::{
    tracing::{http, Http},
    zipkin_config::CollectorEndpointVersion,
    ZipkinConfig,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as HcmTracing;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::BoolValue;

use super::endpoints::lb_endpoint;
use super::{any, duration};
use crate::proxy::Tracing;
use crate::resources::Resource;

/// The cluster through which a proxy's Envoy reaches its Zipkin collector.
pub const ZIPKIN_CLUSTER: &str = "pilotfish-zipkin";
const ZIPKIN_TRACER: &str = "envoy.tracers.zipkin";
/// Zipkin's v2 span API, which Jaeger, Tempo and OpenTelemetry collectors also serve.
pub const SPANS_PATH: &str = "/api/v2/spans";
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `pilotfish-zipkin`: STATIC for an IP address, STRICT_DNS for a name (re-resolved, so a
/// collector that moves is followed).
pub(super) fn collector_cluster(tracing: &Tracing) -> Arc<Resource> {
    let discovery = if tracing.host.parse::<IpAddr>().is_ok() {
        DiscoveryType::Static
    } else {
        DiscoveryType::StrictDns
    };
    let mut cluster = Cluster {
        name: ZIPKIN_CLUSTER.to_string(),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(discovery as i32)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: ZIPKIN_CLUSTER.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![lb_endpoint(
                    &tracing.host,
                    tracing.port,
                    1,
                    envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy,
                    &Default::default(),
                )],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if discovery == DiscoveryType::StrictDns {
        cluster.dns_lookup_family = DnsLookupFamily::V4Preferred as i32;
    }
    Resource::encode(ZIPKIN_CLUSTER, &cluster)
}

/// The tracing config of an HTTP connection manager (`None` without tracing).
pub(super) fn http(tracing: Option<&Tracing>) -> Option<HcmTracing> {
    let tracing = tracing?;
    let zipkin = ZipkinConfig {
        collector_cluster: ZIPKIN_CLUSTER.to_string(),
        collector_endpoint: SPANS_PATH.to_string(),
        // The Host header the collector sees: the name it was configured by, not ours.
        collector_hostname: tracing.host.clone(),
        collector_endpoint_version: CollectorEndpointVersion::HttpJson as i32,
        trace_id_128bit: true,
        shared_span_context: Some(BoolValue { value: false }),
        ..Default::default()
    };
    Some(HcmTracing {
        random_sampling: Some(Percent {
            value: tracing.sample_percent(),
        }),
        provider: Some(Http {
            name: ZIPKIN_TRACER.to_string(),
            config_type: Some(http::ConfigType::TypedConfig(any(&zipkin))),
        }),
        ..Default::default()
    })
}
