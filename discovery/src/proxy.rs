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
//! | `pilotfish.zipkin` | `"host:port"` of a Zipkin collector: trace HTTP requests there (absent: no tracing) |
//! | `pilotfish.intercept` | `"ip:port"` where the agent's nftables rules send the apps' captured TCP: the `intercept` listener binds it (absent: no interception) |
//! | `pilotfish.trace_sample_percent` | a number from 0 to 100: the share of requests that start a trace (absent: 100; read only with `pilotfish.zipkin`) |

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use pilotfish_registries::model::DEFAULT_MESH_PORT;

pub const META_ADDRESS: &str = "pilotfish.address";
pub const META_MESH_PORT: &str = "pilotfish.mesh_port";
pub const META_OUTBOUND: &str = "pilotfish.outbound";
pub const META_APP_ADDRESS: &str = "pilotfish.app_address";
pub const META_ACCESS_LOG: &str = "pilotfish.access_log";
pub const META_ZIPKIN: &str = "pilotfish.zipkin";
pub const META_TRACE_SAMPLE_PERCENT: &str = "pilotfish.trace_sample_percent";
pub const META_INTERCEPT: &str = "pilotfish.intercept";
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
    /// Where this proxy's Envoy sends spans (`pilotfish.zipkin`); `None`: no tracing.
    pub tracing: Option<Tracing>,
    /// Where the agent redirects the apps' captured connections (`pilotfish.intercept`);
    /// `None`: no interception, no `intercept` listener.
    pub intercept: Option<SocketAddr>,
}

/// A proxy's Zipkin collector and sampling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tracing {
    /// An IP address or a DNS name.
    pub host: String,
    pub port: u16,
    /// The share of requests that start a trace, in hundredths of a percent (10000 = all).
    pub sample_hundredths: u32,
}

impl Tracing {
    pub fn sample_percent(&self) -> f64 {
        f64::from(self.sample_hundredths) / 100.0
    }
}

/// `host:port` with a port in 1..=65535 and a host that is an IP address or could be a name.
fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let name_like = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    name_like.then(|| (host.to_string(), port))
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
        let tracing = tracing(meta)?;
        let intercept = match field(meta, META_INTERCEPT) {
            None => None,
            Some(Kind::StringValue(s)) => Some(s.parse().map_err(|_| NodeError::BadMetadata {
                key: META_INTERCEPT,
                message: format!("\"{s}\" is not an ip:port"),
            })?),
            Some(_) => {
                return Err(NodeError::BadMetadata {
                    key: META_INTERCEPT,
                    message: "expected \"ip:port\"".into(),
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
            tracing,
            intercept,
        })
    }
}

fn tracing(meta: Option<&Struct>) -> Result<Option<Tracing>, NodeError> {
    let (host, port) = match field(meta, META_ZIPKIN) {
        None => return Ok(None),
        Some(Kind::StringValue(s)) => host_port(s).ok_or_else(|| NodeError::BadMetadata {
            key: META_ZIPKIN,
            message: format!("\"{s}\" is not host:port"),
        })?,
        Some(_) => {
            return Err(NodeError::BadMetadata {
                key: META_ZIPKIN,
                message: "expected \"host:port\"".into(),
            })
        }
    };
    let sample_hundredths = match field(meta, META_TRACE_SAMPLE_PERCENT) {
        None => 10_000,
        // Rounded to Envoy's finest sampling step; in 0..=10000 by the guard.
        Some(Kind::NumberValue(n)) if (0.0..=100.0).contains(n) => (n * 100.0).round() as u32,
        Some(_) => {
            return Err(NodeError::BadMetadata {
                key: META_TRACE_SAMPLE_PERCENT,
                message: "expected a number from 0 to 100".into(),
            })
        }
    };
    Ok(Some(Tracing {
        host,
        port,
        sample_hundredths,
    }))
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

    fn tracing_of(fields: &[(&str, Kind)]) -> Result<Option<Tracing>, NodeError> {
        let mut n = node(None);
        for (k, v) in fields {
            n.metadata.as_mut().unwrap().fields.insert(
                k.to_string(),
                Value {
                    kind: Some(v.clone()),
                },
            );
        }
        Proxy::from_node(Some(&n)).map(|p| p.tracing)
    }

    #[test]
    fn tracing_metadata() {
        let s = |v: &str| Kind::StringValue(v.into());
        assert_eq!(tracing_of(&[]), Ok(None));
        // The sampling share alone does not turn tracing on.
        assert_eq!(
            tracing_of(&[(META_TRACE_SAMPLE_PERCENT, Kind::NumberValue(5.0))]),
            Ok(None)
        );
        let t = |host: &str, port, sample_hundredths| {
            Ok(Some(Tracing {
                host: host.into(),
                port,
                sample_hundredths,
            }))
        };
        assert_eq!(
            tracing_of(&[(META_ZIPKIN, s("zipkin.internal:9411"))]),
            t("zipkin.internal", 9411, 10_000)
        );
        assert_eq!(
            tracing_of(&[
                (META_ZIPKIN, s("[fd00::9]:9411")),
                (META_TRACE_SAMPLE_PERCENT, Kind::NumberValue(0.25)),
            ]),
            t("fd00::9", 9411, 25)
        );
        for (key, bad) in [
            (META_ZIPKIN, s("zipkin")),
            (META_ZIPKIN, s("zipkin:0")),
            (META_ZIPKIN, s("http://zipkin:9411")),
            (META_ZIPKIN, Kind::NumberValue(9411.0)),
            (META_TRACE_SAMPLE_PERCENT, Kind::NumberValue(150.0)),
            (META_TRACE_SAMPLE_PERCENT, s("5")),
        ] {
            let mut fields = vec![(META_ZIPKIN, s("10.0.0.9:9411"))];
            fields.retain(|(k, _)| *k != key);
            fields.push((key, bad.clone()));
            let err = tracing_of(&fields).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("node.metadata[\"{key}\"]: ")),
                "{bad:?}: {err}"
            );
        }
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
