//! mTLS between proxies: the translation [`Settings`], the names identities and secrets go by,
//! and the TLS contexts of outbound clusters and of the mesh port's filter chains.
//!
//! # Names
//!
//! | what | value |
//! |---|---|
//! | identity of service S | `spiffe://<trust_domain>/service/S` |
//! | identity of a host | `spiffe://<trust_domain>/node/<node>` |
//! | SNI of a mesh hop to S | `S.<trust_domain>` (`reviews.pilotfish.local`), for every cluster of S, subsets included |
//! | SDS secret: a local service's cert and key | `service/S` |
//! | SDS secret: the host's cert and key | `node` |
//! | SDS secret: the trust bundle (validation context) | `roots` |
//! | SDS config source | API gRPC v3 to the static cluster `pilotfish-sds` (the agent's UDS) |
//!
//! A proxy presents, as a client, the certificate of the first service (by name) its node
//! hosts, or the node's certificate when it hosts none. Clients check the server's exact SPIFFE
//! ID; servers require a client certificate with a URI SAN in the trust domain.
//!
//! Certificates only ever come from SDS, so a rotation changes no cluster or listener.
//!
//! # Which upstreams get TLS
//!
//! Instances with a `node` (fronted by a Pilotfish agent) are reached with TLS; instances
//! without one (a database, a legacy service) stay plaintext. A cluster whose instances are all
//! in the mesh sets `transport_socket`; one with both kinds sets `transport_socket_matches`
//! with one match (`{"mesh": true}`, which mesh endpoints carry in
//! `filter_metadata["envoy.transport_socket_match"]`) and no default socket, so the rest is
//! plaintext. A cluster never sets both.

use envoy_types::pb::envoy::config::cluster::v3::{cluster::TransportSocketMatch, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    api_config_source::ApiType, config_source::ConfigSourceSpecifier, grpc_service,
    transport_socket, ApiConfigSource, ApiVersion, ConfigSource, GrpcService, Metadata,
    TransportSocket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::{value::Kind, BoolValue, Struct, Value};
use pilotfish_registries::model::{Catalog, Instance, Service};

use super::any;

/// How translation secures the mesh port. The default is plaintext (insecure mode), which
/// produces exactly the configuration of a mesh without mTLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Settings {
    pub trust_domain: String,
    pub mtls: bool,
    /// Where services' virtual IPs come from (mesh DNS and interception).
    pub vip_range: super::VipRange,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            trust_domain: "pilotfish.local".to_string(),
            mtls: false,
            vip_range: super::VipRange::default(),
        }
    }
}

/// The static cluster (in the agent's bootstrap) that reaches the agent's SDS server.
pub const SDS_CLUSTER: &str = "pilotfish-sds";
/// The SDS secret with the trust bundle.
pub const ROOTS_SECRET: &str = "roots";
/// The SDS secret with the host's own certificate and key.
pub const NODE_SECRET: &str = "node";

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
/// The endpoint metadata key Envoy matches `transport_socket_matches` against.
const SOCKET_MATCH_KEY: &str = "envoy.transport_socket_match";
const MESH_MATCH_FIELD: &str = "mesh";

/// The SDS secret with a local service's certificate and key: `service/<name>`.
pub fn service_secret(service: &str) -> String {
    format!("service/{service}")
}

/// `spiffe://<td>/service/<name>`.
pub fn service_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/service/{service}")
}

/// `spiffe://<td>/node/<node>`.
pub fn node_id(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/node/{node}")
}

/// The SNI a client sends for a mesh hop to `service`, and the inbound chain matches on.
pub fn sni(service: &str, trust_domain: &str) -> String {
    format!("{service}.{trust_domain}")
}

/// The SDS secret a proxy on `node` presents as a client (see the module comment).
pub fn client_secret(catalog: &Catalog, node: &str) -> String {
    catalog
        .services_on_node(node)
        .next()
        .map_or_else(|| NODE_SECRET.to_string(), |s| service_secret(&s.name))
}

/// Which of a service's instances are in the mesh; decides the shape of its clusters, so an
/// endpoint-only change must keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MeshKind {
    /// No instance has a node: plaintext.
    None,
    /// Every instance has a node: `transport_socket`.
    All,
    /// Some have: `transport_socket_matches`.
    Mixed,
}

pub(super) fn mesh_kind(svc: &Service) -> MeshKind {
    let mesh = svc.instances.iter().filter(|i| i.node.is_some()).count();
    match mesh {
        0 => MeshKind::None,
        n if n == svc.instances.len() => MeshKind::All,
        _ => MeshKind::Mixed,
    }
}

/// What an outbound cluster needs to speak mTLS: the settings and the client's secret.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientTls<'a> {
    pub settings: &'a Settings,
    pub secret: &'a str,
}

/// Sets the transport of an outbound cluster of `svc` (see the module comment).
pub(super) fn secure_cluster(cluster: &mut Cluster, svc: &Service, tls: &ClientTls<'_>) {
    match mesh_kind(svc) {
        MeshKind::None => {}
        MeshKind::All => cluster.transport_socket = Some(upstream(svc, tls)),
        MeshKind::Mixed => {
            cluster.transport_socket_matches = vec![TransportSocketMatch {
                name: MESH_MATCH_FIELD.to_string(),
                r#match: Some(mesh_struct()),
                transport_socket: Some(upstream(svc, tls)),
            }]
        }
    }
}

/// Marks a mesh instance's endpoint so that `transport_socket_matches` picks TLS for it.
pub(super) fn mark_mesh_endpoint(metadata: &mut Option<Metadata>, instance: &Instance) {
    if instance.node.is_none() {
        return;
    }
    // One entry: prost encodes maps in HashMap order (see the module comment of `translate`).
    metadata
        .get_or_insert_with(Metadata::default)
        .filter_metadata = [(SOCKET_MATCH_KEY.to_string(), mesh_struct())].into();
}

fn mesh_struct() -> Struct {
    Struct {
        fields: [(
            MESH_MATCH_FIELD.to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        )]
        .into(),
    }
}

/// The client side of a hop to `svc`: its SNI, the client certificate, and the server's exact
/// SPIFFE ID checked against the trust bundle.
fn upstream(svc: &Service, tls: &ClientTls<'_>) -> TransportSocket {
    let td = &tls.settings.trust_domain;
    let context = UpstreamTlsContext {
        sni: sni(&svc.name, td),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(tls.secret)],
            validation_context_type: Some(validation(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(service_id(td, &svc.name))),
                ignore_case: false,
            })),
            alpn_protocols: alpn(svc),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&context))),
    }
}

/// The server side of the mesh port's chain for `svc`: its own certificate, and a client
/// certificate required from anyone in the trust domain (authorization narrows it further).
pub(super) fn downstream(svc: &Service, settings: &Settings) -> TransportSocket {
    let context = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(&service_secret(&svc.name))],
            validation_context_type: Some(validation(StringMatcher {
                match_pattern: Some(MatchPattern::Prefix(format!(
                    "spiffe://{}/",
                    settings.trust_domain
                ))),
                ignore_case: false,
            })),
            alpn_protocols: alpn(svc),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&context))),
    }
}

fn alpn(svc: &Service) -> Vec<String> {
    if svc.protocol.is_http2() {
        vec!["h2".to_string()]
    } else {
        Vec::new()
    }
}

/// The peer's URI SAN must match `san`; the roots come from SDS.
fn validation(san: StringMatcher) -> ValidationContextType {
    ValidationContextType::CombinedValidationContext(CombinedCertificateValidationContext {
        default_validation_context: Some(CertificateValidationContext {
            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                san_type: SanType::Uri as i32,
                matcher: Some(san),
                ..Default::default()
            }],
            ..Default::default()
        }),
        validation_context_sds_secret_config: Some(sds(ROOTS_SECRET)),
        ..Default::default()
    })
}

/// A secret by name from the agent's SDS server.
fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.to_string(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}
