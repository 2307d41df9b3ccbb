//! Envoy's bootstrap: a pure function of the agent config.
//!
//! Envoy learns who it is (`node`, with the metadata keys discovery reads, see
//! `pilotfish-discovery`'s `proxy.rs`), where its admin listens, and one static cluster,
//! `pilotfish-xds`, that reaches the agent's xDS proxy over a Unix socket with HTTP/2. Everything
//! else (listeners, clusters, routes, endpoints) arrives over ADS through that cluster. A second
//! static cluster, `pilotfish-sds`, reaches the agent's SDS server (`run_dir/sds.sock`) the same
//! way; the TLS contexts discovery sends name their secrets there, so certificates never appear
//! in listeners or clusters.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::{AgentConfig, XdsFlavor};

/// The static cluster through which Envoy reaches the agent's xDS proxy.
pub const XDS_CLUSTER: &str = "pilotfish-xds";
/// The static cluster through which Envoy reaches the agent's SDS server.
pub const SDS_CLUSTER: &str = "pilotfish-sds";
/// Envoy `node.cluster` for every agent-managed proxy.
pub const NODE_CLUSTER: &str = "pilotfish";

// The contract with discovery (`discovery/src/proxy.rs`).
pub const META_ADDRESS: &str = "pilotfish.address";
pub const META_MESH_PORT: &str = "pilotfish.mesh_port";
pub const META_OUTBOUND: &str = "pilotfish.outbound";
pub const META_APP_ADDRESS: &str = "pilotfish.app_address";
/// Where Envoy writes its access log: "stdout", "off" or an absolute path.
pub const META_ACCESS_LOG: &str = "pilotfish.access_log";
/// `[tracing] zipkin`: the collector as `host:port`; absent without tracing.
pub const META_ZIPKIN: &str = "pilotfish.zipkin";
/// `[tracing] sample_percent`, a number; only with `pilotfish.zipkin`.
pub const META_TRACE_SAMPLE_PERCENT: &str = "pilotfish.trace_sample_percent";
/// `[interception]`: where the `intercept` listener binds (`"127.0.0.1:<port>"`); absent
/// without interception.
pub const META_INTERCEPT: &str = "pilotfish.intercept";
/// This agent's version, which discovery shows in `proxy-status`.
pub const META_AGENT_VERSION: &str = "pilotfish.agent_version";

/// Builds the bootstrap for `config`, with the xDS cluster dialling `xds_socket`.
///
/// With `[tracing]`, the collector and sampling go into the metadata for discovery (which adds
/// the collector cluster and the tracing config of every connection manager), and `node.cluster`
/// becomes the node name: Envoy's Zipkin tracer names each span's `localEndpoint.serviceName`
/// after `node.cluster`, and "which host's proxy" is what a trace view should show.
pub fn bootstrap(config: &AgentConfig, xds_socket: &Path) -> Value {
    let api_type = match config.envoy.xds {
        XdsFlavor::Delta => "DELTA_GRPC",
        XdsFlavor::Sotw => "GRPC",
    };
    let admin = config.envoy.admin;
    let mut metadata = json!({
        META_ADDRESS: config.address.to_string(),
        META_MESH_PORT: config.mesh_port,
        META_OUTBOUND: config.outbound.to_string(),
        META_APP_ADDRESS: config.app_address.to_string(),
        META_ACCESS_LOG: config.envoy.access_log.metadata(),
        META_AGENT_VERSION: env!("CARGO_PKG_VERSION"),
    });
    if let Some(interception) = &config.interception {
        metadata[META_INTERCEPT] = json!(interception.listener().to_string());
    }
    let mut cluster = NODE_CLUSTER;
    if let Some(tracing) = &config.tracing {
        metadata[META_ZIPKIN] = json!(tracing.zipkin);
        metadata[META_TRACE_SAMPLE_PERCENT] = json!(tracing.sample_percent());
        cluster = &config.node;
    }
    json!({
        "node": {
            "id": config.node,
            "cluster": cluster,
            "metadata": metadata,
        },
        "admin": {
            "address": {
                "socket_address": {
                    "address": admin.ip().to_string(),
                    "port_value": admin.port(),
                },
            },
        },
        "static_resources": {
            "clusters": [
                uds_cluster(XDS_CLUSTER, xds_socket),
                uds_cluster(SDS_CLUSTER, &config.sds_socket()),
            ],
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": XDS_CLUSTER } }],
                "set_node_on_first_message_only": true,
            },
            "cds_config": { "ads": {}, "resource_api_version": "V3" },
            "lds_config": { "ads": {}, "resource_api_version": "V3" },
        },
    })
}

/// A static cluster that speaks HTTP/2 (gRPC) to one of the agent's Unix sockets.
fn uds_cluster(name: &str, socket: &Path) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{
                "lb_endpoints": [{
                    "endpoint": {
                        "address": { "pipe": { "path": socket.to_string_lossy() } },
                    },
                }],
            }],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        // Detects a dead agent end of the socket (xDS checklist b.7).
                        "connection_keepalive": { "interval": "30s", "timeout": "10s" },
                    },
                },
            },
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::testutil::{envoy_binary, test_config};

    #[test]
    fn node_identity_and_metadata_follow_the_discovery_contract() {
        let dir = tempfile::tempdir().unwrap();
        let config = test_config(dir.path());
        let b = bootstrap(&config, &config.xds_socket());
        assert_eq!(b["node"]["id"], "vm-test");
        assert_eq!(b["node"]["cluster"], "pilotfish");
        let meta = &b["node"]["metadata"];
        assert_eq!(meta["pilotfish.address"], "127.0.0.1");
        assert_eq!(meta["pilotfish.mesh_port"], 15006);
        assert!(meta["pilotfish.mesh_port"].is_number());
        assert_eq!(meta["pilotfish.outbound"], "127.0.0.1:15001");
        assert_eq!(meta["pilotfish.app_address"], "127.0.0.1");
        assert_eq!(meta["pilotfish.agent_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(meta["pilotfish.access_log"], "stdout");
        assert_eq!(meta.as_object().unwrap().len(), 6);
        assert_eq!(
            b["admin"]["address"]["socket_address"]["port_value"],
            config.envoy.admin.port()
        );
        let pipe = &b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
            ["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"];
        assert_eq!(pipe, &json!(config.xds_socket().to_string_lossy()));
        assert_eq!(
            b["dynamic_resources"]["ads_config"]["api_type"],
            "DELTA_GRPC"
        );
    }

    #[test]
    fn tracing_adds_the_collector_to_the_metadata_and_names_the_node_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        config.tracing = Some(crate::config::TracingConfig {
            zipkin: "zipkin.internal:9411".into(),
            sample_hundredths: 250,
        });
        let b = bootstrap(&config, &config.xds_socket());
        let meta = &b["node"]["metadata"];
        assert_eq!(meta["pilotfish.zipkin"], "zipkin.internal:9411");
        assert_eq!(meta["pilotfish.trace_sample_percent"], 2.5);
        assert_eq!(meta.as_object().unwrap().len(), 8);
        assert_eq!(b["node"]["cluster"], "vm-test");
    }

    #[test]
    fn sotw_flavour_selects_grpc_api_type() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        config.envoy.xds = XdsFlavor::Sotw;
        let b = bootstrap(&config, &config.xds_socket());
        assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
    }

    fn sds_secret(name: &str) -> Value {
        json!({
            "name": name,
            "sds_config": {
                "api_config_source": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [{ "envoy_grpc": { "cluster_name": SDS_CLUSTER } }],
                },
                "resource_api_version": "V3",
            },
        })
    }

    fn sds_listener() -> Value {
        json!({
            "name": "mesh",
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": 15006 } },
            "filter_chains": [{
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": [sds_secret("service/reviews")],
                            "validation_context_sds_secret_config": sds_secret("roots"),
                        },
                    },
                },
                "filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "mesh",
                        "cluster": XDS_CLUSTER,
                    },
                }],
            }],
        })
    }

    #[test]
    fn sds_cluster_dials_the_sds_socket_over_http2() {
        let dir = tempfile::tempdir().unwrap();
        let config = test_config(dir.path());
        let b = bootstrap(&config, &config.xds_socket());
        let sds = &b["static_resources"]["clusters"][1];
        assert_eq!(sds["name"], SDS_CLUSTER);
        let pipe = &sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["pipe"]["path"];
        assert_eq!(pipe, &json!(config.sds_socket().to_string_lossy()));
        assert!(sds["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_object());
    }

    /// Real Envoy accepts both flavours of the bootstrap (`--mode validate`).
    #[test]
    fn envoy_validates_the_bootstrap() {
        let Some(envoy) = envoy_binary() else {
            eprintln!("note: no envoy binary found; skipping bootstrap validation");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        for flavour in ["delta", "sotw"] {
            let text = format!(
                "node = \"vm-b\"\naddress = \"10.0.0.12\"\ndiscovery = [\"127.0.0.1:1\"]\n\
                 insecure = true\nrun_dir = \"run\"\nstate_dir = \"state\"\n\
                 [envoy]\nbinary = \"{}\"\nxds = \"{flavour}\"\n",
                envoy.display()
            );
            let config = parse(Path::new("agent.toml"), &text, dir.path(), None).unwrap();
            let file = dir.path().join(format!("bootstrap-{flavour}.json"));
            let mut doc = bootstrap(&config, &config.xds_socket());
            // A listener whose TLS context names its secrets the way translation does, so
            // Envoy checks that the SDS references resolve to the pilotfish-sds cluster.
            doc["static_resources"]["listeners"] = json!([sds_listener()]);
            let json = serde_json::to_vec_pretty(&doc).unwrap();
            std::fs::write(&file, json).unwrap();
            let out = std::process::Command::new(&envoy)
                .args(["--mode", "validate", "--disable-hot-restart", "-c"])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "envoy rejected the {flavour} bootstrap:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
