//! One registry file: TOML text -> [`FileDecls`], the declarations it makes, each with the
//! position it came from.
//!
//! Serde structs mirror the file (`deny_unknown_fields`, so a typo is an error) and keep
//! `toml::Spanned` wherever a later check needs to point at a line. Everything that can be
//! checked by looking at one file alone is checked here, and every problem is collected
//! rather than the first. Checks that need other files (is this service defined? is that
//! subset declared?) are in [`super::validate`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub(crate) use super::authz::AuthzDecl;
use super::authz::RawAuthorization;
pub(crate) use super::gateways::GatewayDecl;
use super::gateways::RawGateway;
pub(crate) use super::rules::{PolicyDecl, RouteDecl};
use super::rules::{RawPolicy, RawRoute};
use super::Problem;
pub(crate) use crate::config_vocab::key_segment as key;
use crate::config_vocab::{parse_duration, FileProblems, LineIndex};
use crate::model::{HealthMode, Instance, Labels, MtlsMode, Origin, Protocol, DEFAULT_MESH_PORT};

/// Bound on an instance's weight and on the weights of one rule's destinations together, so
/// that sums computed downstream stay far from `u32::MAX`.
pub(crate) const MAX_WEIGHT: i64 = 100_000;

/// A 1-based line and column (in characters) in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// What one file declares. Services appear once per `[services.<name>]` table; the table may
/// define the service (it has a port) or only add instances to one defined elsewhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FileDecls {
    pub services: BTreeMap<String, ServiceDecl>,
    pub routes: BTreeMap<String, RouteDecl>,
    pub policies: BTreeMap<String, PolicyDecl>,
    pub authorizations: BTreeMap<String, AuthzDecl>,
    pub gateways: BTreeMap<String, GatewayDecl>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceDecl {
    /// Where `[services.<name>]` names the service.
    pub pos: Pos,
    /// Present when this table defines the service (sets its port).
    pub def: Option<ServiceDef>,
    pub instances: Vec<InstanceDecl>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceDef {
    pub protocol: Protocol,
    pub port: u16,
    pub upstreams: Option<Vec<(String, Pos)>>,
    pub mtls: MtlsMode,
    pub health: HealthMode,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InstanceDecl {
    pub instance: Instance,
    pub pos: Pos,
}

// ---- the file as serde sees it ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
    #[serde(default)]
    routes: BTreeMap<Spanned<String>, RawRoute>,
    #[serde(default)]
    policies: BTreeMap<Spanned<String>, RawPolicy>,
    #[serde(default)]
    authorization: BTreeMap<Spanned<String>, Spanned<RawAuthorization>>,
    /// Ingress gateways (see [`super::gateways`]).
    #[serde(default)]
    gateways: BTreeMap<Spanned<String>, RawGateway>,
}

// Integers are read as i64 so that a port of 0 or 70000 gets our message naming the field,
// not serde's "expected u16".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    protocol: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    upstreams: Option<Vec<Spanned<String>>>,
    mtls: Option<Spanned<String>>,
    health: Option<Spanned<String>>,
    #[serde(default)]
    instances: Vec<Spanned<RawInstance>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    node: Option<Spanned<String>>,
    address: Spanned<String>,
    port: Spanned<i64>,
    #[serde(default)]
    labels: BTreeMap<Spanned<String>, String>,
    mesh_port: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
    locality: Option<Spanned<String>>,
}

/// Parses and checks one file. `Err` carries every problem found, in file order.
pub(crate) fn parse_file(file: &Path, text: &str) -> Result<FileDecls, Vec<Problem>> {
    let mut cx = Context {
        file: file.to_path_buf(),
        lines: LineIndex::new(text),
        problems: Vec::new(),
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            let mut problems = FileProblems::new(file, text);
            problems.toml_error(&err);
            return Err(problems.into_vec());
        }
    };
    let decls = FileDecls {
        services: raw
            .services
            .into_iter()
            .map(|(name, raw)| cx.service(name, raw))
            .collect(),
        routes: raw
            .routes
            .into_iter()
            .map(|(name, raw)| cx.route(name, raw))
            .collect(),
        policies: raw
            .policies
            .into_iter()
            .map(|(name, raw)| cx.policy(name, raw))
            .collect(),
        authorizations: raw
            .authorization
            .into_iter()
            .map(|(name, raw)| cx.authorization(name, raw))
            .collect(),
        gateways: raw
            .gateways
            .into_iter()
            .map(|(name, raw)| cx.gateway(name, raw))
            .collect(),
    };
    if cx.problems.is_empty() {
        Ok(decls)
    } else {
        cx.problems.sort_by_key(|p| (p.line, p.column));
        Err(cx.problems)
    }
}

/// Names of services and subsets: 1 to 63 characters of `a-z`, `0-9`, `-`, `.` and `_`,
/// starting and ending with a letter or digit.
///
/// Names become the HTTP Host apps call (`reviews`, `reviews.mesh`), Envoy cluster and stat
/// names, and Consul service names, so they are held to DNS-label-like names: lower case
/// (Host matching folds case, so `Reviews` and `reviews` would collide), no spaces or `|`
/// (used as a separator in cluster names). `.` and `_` are allowed because Consul service
/// names in the wild use them.
pub fn is_valid_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (1..=63).contains(&name.len())
        && name.chars().all(allowed)
        && edge(name.chars().next())
        && edge(name.chars().last())
}

pub(super) struct Context {
    file: PathBuf,
    lines: LineIndex,
    problems: Vec<Problem>,
}

impl Context {
    pub(super) fn pos(&self, span: Range<usize>) -> Pos {
        let (line, column) = self.lines.position(span.start);
        Pos { line, column }
    }

    pub(super) fn origin(&self, span: Range<usize>) -> Origin {
        Origin {
            file: self.file.clone(),
            line: self.pos(span).line,
        }
    }

    pub(super) fn report(&mut self, span: Range<usize>, field: &str, message: impl Display) {
        let pos = self.pos(span);
        let problem = Problem::new(
            self.file.clone(),
            pos.line,
            pos.column,
            field,
            message.to_string(),
        );
        self.problems.push(problem);
    }

    pub(super) fn name(&mut self, name: &Spanned<String>, field: &str, what: &str) {
        if !is_valid_name(name.get_ref()) {
            self.report(
                name.span(),
                field,
                format!(
                    "\"{}\" is not a valid {what} name (1-63 characters of a-z, 0-9, '-', '.', '_', starting and ending with a letter or digit)",
                    name.get_ref()
                ),
            );
        }
    }

    fn port(&mut self, port: &Spanned<i64>, field: &str) -> u16 {
        match u16::try_from(*port.get_ref()) {
            Ok(p) if p != 0 => p,
            _ => {
                self.report(
                    port.span(),
                    field,
                    format!("{} is not a port (1-65535)", port.get_ref()),
                );
                0
            }
        }
    }

    /// A positive duration; zero would mean "no timeout" to Envoy, which is better said by
    /// leaving the field out.
    pub(super) fn duration(&mut self, text: &Spanned<String>, field: &str) -> Option<Duration> {
        match parse_duration(text.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.report(
                    text.span(),
                    field,
                    "must be more than 0 (omit it for the default)",
                );
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.report(text.span(), field, message);
                None
            }
        }
    }

    fn not_blank(&mut self, text: &Spanned<String>, field: &str) -> String {
        if text.get_ref().trim().is_empty() {
            self.report(text.span(), field, "must not be empty");
        }
        text.get_ref().clone()
    }

    fn service(&mut self, name: Spanned<String>, raw: RawService) -> (String, ServiceDecl) {
        let path = format!("services.{}", key(name.get_ref()));
        self.name(&name, &path, "service");
        let pos = self.pos(name.span());
        let def = match raw.port {
            Some(port) => {
                let protocol = match raw.protocol {
                    Some(p) => p.get_ref().parse().unwrap_or_else(|message| {
                        self.report(p.span(), &format!("{path}.protocol"), message);
                        Protocol::default()
                    }),
                    None => Protocol::default(),
                };
                let mtls = match raw.mtls {
                    Some(m) => m.get_ref().parse().unwrap_or_else(|message| {
                        self.report(m.span(), &format!("{path}.mtls"), message);
                        MtlsMode::default()
                    }),
                    None => MtlsMode::default(),
                };
                let health = match raw.health {
                    Some(h) => h.get_ref().parse().unwrap_or_else(|message| {
                        self.report(h.span(), &format!("{path}.health"), message);
                        HealthMode::default()
                    }),
                    None => HealthMode::default(),
                };
                let upstreams = raw.upstreams.map(|list| {
                    let mut seen = BTreeSet::new();
                    let mut out = Vec::new();
                    for (i, up) in list.iter().enumerate() {
                        let field = format!("{path}.upstreams[{i}]");
                        self.name(up, &field, "service");
                        if !seen.insert(up.get_ref().clone()) {
                            self.report(
                                up.span(),
                                &field,
                                format!("\"{}\" is listed twice", up.get_ref()),
                            );
                        }
                        out.push((up.get_ref().clone(), self.pos(up.span())));
                    }
                    out
                });
                Some(ServiceDef {
                    protocol,
                    port: self.port(&port, &format!("{path}.port")),
                    upstreams,
                    mtls,
                    health,
                    origin: self.origin(name.span()),
                })
            }
            None => {
                // protocol and upstreams belong with the port: a table without a port only
                // adds instances to a service defined elsewhere.
                if let Some(p) = &raw.protocol {
                    self.report(p.span(), &format!("{path}.protocol"), "set without port; a service's protocol, port and upstreams are set together, where it is defined");
                }
                if raw.upstreams.is_some() {
                    self.report(name.span(), &format!("{path}.upstreams"), "set without port; a service's protocol, port and upstreams are set together, where it is defined");
                }
                if let Some(m) = &raw.mtls {
                    self.report(m.span(), &format!("{path}.mtls"), "set without port; a service's protocol, port, upstreams and mtls are set together, where it is defined");
                }
                if let Some(h) = &raw.health {
                    self.report(h.span(), &format!("{path}.health"), "set without port; a service's protocol, port, upstreams, mtls and health are set together, where it is defined");
                }
                if raw.instances.is_empty() {
                    self.report(name.span(), &format!("{path}.port"), "missing (a service table sets the port that defines the service, or only adds instances)");
                }
                None
            }
        };
        let instances = raw
            .instances
            .into_iter()
            .enumerate()
            .map(|(i, inst)| self.instance(&format!("{path}.instances[{i}]"), inst))
            .collect();
        let decl = ServiceDecl {
            pos,
            def,
            instances,
        };
        (name.into_inner(), decl)
    }

    fn instance(&mut self, path: &str, raw: Spanned<RawInstance>) -> InstanceDecl {
        let pos = self.pos(raw.span());
        let raw = raw.into_inner();
        let node = raw
            .node
            .as_ref()
            .map(|n| self.not_blank(n, &format!("{path}.node")));
        let address = raw.address.get_ref().clone();
        if !is_address(&address) {
            self.report(
                raw.address.span(),
                &format!("{path}.address"),
                format!(
                    "\"{address}\" is not an IP address or host name (the port goes in `port`)"
                ),
            );
        }
        let port = self.port(&raw.port, &format!("{path}.port"));
        let mesh_port = raw.mesh_port.as_ref().map_or(DEFAULT_MESH_PORT, |p| {
            self.port(p, &format!("{path}.mesh_port"))
        });
        let weight = match &raw.weight {
            None => 1,
            Some(w) => match u32::try_from(*w.get_ref()) {
                Ok(v) if (1..=MAX_WEIGHT).contains(&i64::from(v)) => v,
                _ => {
                    self.report(
                        w.span(),
                        &format!("{path}.weight"),
                        format!("{} is out of range (1-{MAX_WEIGHT})", w.get_ref()),
                    );
                    1
                }
            },
        };
        let mut labels = Labels::new();
        for (k, v) in raw.labels {
            if k.get_ref().trim().is_empty() {
                self.report(
                    k.span(),
                    &format!("{path}.labels"),
                    "a label name must not be empty",
                );
            }
            labels.insert(k.into_inner(), v);
        }
        let locality = raw
            .locality
            .as_ref()
            .map(|l| self.not_blank(l, &format!("{path}.locality")));
        InstanceDecl {
            instance: Instance {
                node,
                address,
                port,
                mesh_port,
                labels,
                weight,
                // A file cannot know; health is the business of Envoy's outlier detection.
                healthy: true,
                draining: false,
                locality,
            },
            pos,
        }
    }
}

/// An IP address or a DNS host name; `10.0.0.1:80` and `http://x` are not.
fn is_address(address: &str) -> bool {
    if address.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    // A fully qualified name may end with a dot.
    let host = address.strip_suffix('.').unwrap_or(address);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
