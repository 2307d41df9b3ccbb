//! Who is asking: the proxy behind an ADS stream, read from the Envoy `Node` of its first
//! request.
//!
//! The agent writes these fields into Envoy's bootstrap (`node.id` and `node.metadata`), so the
//! metadata keys below are the contract between agent and discovery:
//!
//! | key | meaning |
//! |---|---|
//! | `pilotfish.address` | where peers reach this host (the mesh listener binds it) |
//! | `pilotfish.mesh_port` | the host's mesh (inbound) port |
//! | `pilotfish.outbound` | `ip:port` of the outbound listener for local apps |
//! | `pilotfish.app_address` | where local apps listen |
//! | `pilotfish.access_log` | `"stdout"`, `"off"` or an absolute file path: where Envoy writes its access log (absent: off, so proxies of older agents keep their listeners) |

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use pilotfish_registries::model::DEFAULT_MESH_PORT;

pub const META_ADDRESS: &str = "pilotfish.address";
pub const META_MESH_PORT: &str = "pilotfish.mesh_port";
pub const META_OUTBOUND: &str = "pilotfish.outbound";
pub const META_APP_ADDRESS: &str = "pilotfish.app_address";
pub const META_ACCESS_LOG: &str = "pilotfish.access_log";
/// The version of the Pilotfish agent that runs the proxy (for `proxy-status`).
pub const META_AGENT_VERSION: &str = "pilotfish.agent_version";

/// What a proxy says it runs: the agent's version (node metadata) and Envoy's build version.
pub fn versions(node: Option<&Node>) -> (Option<String>, Option<String>) {
    use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
    let Some(node) = node else {
        return (None, None);
    };
    let agent = match field(node.metadata.as_ref(), META_AGENT_VERSION) {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    };
    let envoy = match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentVersion(v)) => Some(v.clone()),
        Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
            .version
            .as_ref()
            .map(|v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch)),
        None => None,
    };
    (agent, envoy)
}

/// The proxy a stream serves, as translation needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Proxy {
    /// The host's node name (Envoy `node.id`), as used by instances in the registry.
    pub node: String,
    /// Where peers reach this host; the mesh listener binds `address:mesh_port`.
    pub address: IpAddr,
    pub mesh_port: u16,
    pub outbound: SocketAddr,
    pub app_address: IpAddr,
    /// Where this proxy's Envoy writes its access log. Part of the per-proxy memo key, like
    /// every field here: proxies with different choices never share listeners.
    pub access_log: AccessLog,
}

/// Where a proxy's Envoy writes access log lines (`pilotfish.access_log`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum AccessLog {
    /// No access log.
    #[default]
    Off,
    /// Envoy's stdout, which the agent's unit hands to journald.
    Stdout,
    /// An absolute path on the proxy's host.
    File(String),
}

impl AccessLog {
    /// The metadata value: `"stdout"`, `"off"` or an absolute path.
    pub fn parse(s: &str) -> Option<AccessLog> {
        match s {
            "stdout" => Some(AccessLog::Stdout),
            "off" => Some(AccessLog::Off),
            path if path.starts_with('/') && !path.contains(['\0', '\n']) => {
                Some(AccessLog::File(path.to_string()))
            }
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("missing node information")]
    Missing,
    #[error("node.id is empty")]
    EmptyId,
    #[error("node.metadata[\"{key}\"]: {message}")]
    BadMetadata { key: &'static str, message: String },
}

impl Proxy {
    pub fn from_node(node: Option<&Node>) -> Result<Proxy, NodeError> {
        let node = node.ok_or(NodeError::Missing)?;
        if node.id.is_empty() {
            return Err(NodeError::EmptyId);
        }
        let meta = node.metadata.as_ref();
        let mesh_port = match field(meta, META_MESH_PORT) {
            None => DEFAULT_MESH_PORT,
            Some(Kind::NumberValue(n)) if *n >= 1.0 && *n <= 65535.0 && n.fract() == 0.0 => {
                *n as u16
            }
            Some(Kind::StringValue(s)) => s.parse().map_err(|_| NodeError::BadMetadata {
                key: META_MESH_PORT,
                message: format!("\"{s}\" is not a port"),
            })?,
            Some(_) => {
                return Err(NodeError::BadMetadata {
                    key: META_MESH_PORT,
                    message: "expected a port number".into(),
                })
            }
        };
        let outbound = match field(meta, META_OUTBOUND) {
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15001),
            Some(Kind::StringValue(s)) => s.parse().map_err(|_| NodeError::BadMetadata {
                key: META_OUTBOUND,
                message: format!("\"{s}\" is not an ip:port"),
            })?,
            Some(_) => {
                return Err(NodeError::BadMetadata {
                    key: META_OUTBOUND,
                    message: "expected \"ip:port\"".into(),
                })
            }
        };
        let address = ip_field(meta, META_ADDRESS, IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
        let app_address = ip_field(meta, META_APP_ADDRESS, IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        let access_log = match field(meta, META_ACCESS_LOG) {
            None => AccessLog::Off,
            Some(Kind::StringValue(s)) => {
                AccessLog::parse(s).ok_or_else(|| NodeError::BadMetadata {
                    key: META_ACCESS_LOG,
                    message: format!("\"{s}\" is not \"stdout\", \"off\" or an absolute path"),
                })?
            }
            Some(_) => {
                return Err(NodeError::BadMetadata {
                    key: META_ACCESS_LOG,
                    message: "expected \"stdout\", \"off\" or an absolute path".into(),
                })
            }
        };
        Ok(Proxy {
            node: node.id.clone(),
            address,
            mesh_port,
            outbound,
            app_address,
            access_log,
        })
    }
}

fn ip_field(
    meta: Option<&Struct>,
    key: &'static str,
    default: IpAddr,
) -> Result<IpAddr, NodeError> {
    match field(meta, key) {
        None => Ok(default),
        Some(Kind::StringValue(s)) => s.parse().map_err(|_| NodeError::BadMetadata {
            key,
            message: format!("\"{s}\" is not an IP address"),
        }),
        Some(_) => Err(NodeError::BadMetadata {
            key,
            message: "expected an IP address".into(),
        }),
    }
}

fn field<'a>(meta: Option<&'a Struct>, key: &str) -> Option<&'a Kind> {
    meta?.fields.get(key)?.kind.as_ref()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use envoy_types::pb::google::protobuf::Value;

    use super::*;

    fn node(access_log: Option<Kind>) -> Node {
        let mut meta = Struct::default();
        if let Some(kind) = access_log {
            meta.fields
                .insert(META_ACCESS_LOG.to_string(), Value { kind: Some(kind) });
        }
        Node {
            id: "vm-a".into(),
            metadata: Some(meta),
            ..Default::default()
        }
    }

    fn access_log(kind: Option<Kind>) -> Result<AccessLog, NodeError> {
        Proxy::from_node(Some(&node(kind))).map(|p| p.access_log)
    }

    #[test]
    fn access_log_metadata() {
        let s = |v: &str| Some(Kind::StringValue(v.into()));
        assert_eq!(access_log(None), Ok(AccessLog::Off));
        assert_eq!(access_log(s("off")), Ok(AccessLog::Off));
        assert_eq!(access_log(s("stdout")), Ok(AccessLog::Stdout));
        assert_eq!(
            access_log(s("/var/log/pilotfish/access.log")),
            Ok(AccessLog::File("/var/log/pilotfish/access.log".into()))
        );
        for bad in [s("relative.log"), s(""), Some(Kind::BoolValue(true))] {
            let err = access_log(bad).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("node.metadata[\"pilotfish.access_log\"]: "),
                "{err}"
            );
        }
    }
}
