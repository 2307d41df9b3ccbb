//! `discovery.toml`: serde structs that mirror the file, validated into [`Config`].
//!
//! Every problem is collected with its place and key path
//! (`discovery.toml:12:10: registry.files.paths[1]: ...`, see
//! [`pilotfish_registries::config_vocab`]) and reported together, so an operator fixes the file
//! in one pass. Relative paths are resolved against the
//! directory of the config file, so a config works the same from any working directory.
//!
//! Every key, with its default:
//!
//! ```toml
//! trust_domain = "pilotfish.local"    # SPIFFE trust domain: [a-z0-9._-], e.g. "mesh.example"
//! state_dir = "/var/lib/pilotfish/discovery"  # CA keys (ca/), join tokens (tokens.json), rules.d/, last-good/
//! grpc = "0.0.0.0:15012"              # ADS + pilotfish.identity.v1.Identity, TLS (mTLS per call)
//! http = "127.0.0.1:15014"            # status and metrics, plaintext: keep it on loopback
//! insecure = false                    # true: plaintext gRPC, no CA, no authentication.
//!                                     # Local experiments only; logged loudly.
//! debounce = { quiet = "100ms", max = "1s" }
//! node_grace = "15s"                  # a host whose agent has been disconnected this long:
//!                                     # its instances become unhealthy in EDS
//! max_stream_age = "30m"              # ADS streams close after this long, +-10% per stream,
//!                                     # so agents spread over replicas again (Envoy keeps its
//!                                     # config while it reconnects); 1s to 7d
//! vip_range = "240.240.0.0/16"        # services' virtual IPs (mesh DNS, interception), /8 to
//!                                     # /28; every replica must use the same range
//!
//! [registry.files]
//! paths = ["/etc/pilotfish/registry.d"]
//!
//! [registry.consul]                   # optional; see pilotfish_registries::consul::config
//! address = "http://127.0.0.1:8500"   # a Consul agent, http:// only
//! datacenters = ["dc1"]               # at least one
//! token_file = "/etc/pilotfish/consul-token"  # relative paths: against this file's directory
//!
//! [store.consul]                      # optional: state shared by several replicas, in Consul KV
//! address = "http://127.0.0.1:8500"   # default: [registry.consul] address
//! token_file = "/etc/pilotfish/consul-token"  # default: [registry.consul] token_file; needs
//!                                     # key:write on the prefix
//! datacenter = "dc1"                  # default: the Consul agent's own
//! prefix = "pilotfish/"               # every key discovery reads and writes is under it
//!
//! [api]                               # the rules API on the http port (/v1/routes, ...)
//! token_file = "/etc/pilotfish/api-token"  # bearer token: the file's content, trimmed. Unset:
//!                                     # the API answers 503, unless insecure (then it is open)
//! read_requires_token = true          # false: reads (GET) need no token; writes always do
//!
//! [ca]                                # all optional; ignored when insecure = true
//! # An operator-supplied signing CA instead of the root discovery creates in state_dir/ca:
//! # a root, or an intermediate whose chain_file holds the certificates above it up to and
//! # including the root. cert_file and key_file (PKCS#8 PEM, keep it 0600) go together.
//! # cert_file = "/etc/pilotfish/ca/intermediate.pem"
//! # key_file = "/etc/pilotfish/ca/intermediate.key"
//! # chain_file = "/etc/pilotfish/ca/chain.pem"
//! extra_roots = []                    # more root PEM files to trust (and hand out in bundles)
//! workload_ttl = "24h"                # lifetime of service certificates (5s..365d); discovery's
//!                                     # own serving certificate uses it too (at least 1h)
//! node_ttl = "7d"                     # lifetime of node (host) certificates
//! ```
//!
//! Durations everywhere: decimals with `ms`, `s`, `m`, `h` or `d` (`250ms`, `1.5s`, `7d`). Node certificates outlive workload ones on
//! purpose: an agent renews at about half life, so the default survives a three-day
//! control-plane outage without the host needing a new join token, while the identities
//! that carry traffic stay at a day.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pilotfish_pki::TrustDomain;
use pilotfish_registries::config_vocab::{FileProblems, Problem};
use pilotfish_registries::consul::{ConsulConfig, ConsulSection};
use serde::Deserialize;

use crate::liveness::DEFAULT_NODE_GRACE;
use crate::mesh::DebounceTimes;
use crate::translate::VipRange;
use crate::xds::server::DEFAULT_MAX_STREAM_AGE;

pub const DEFAULT_TRUST_DOMAIN: &str = "pilotfish.local";
/// The unit's `StateDirectory=pilotfish/discovery` (the agent's is `/var/lib/pilotfish/agent`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pilotfish/discovery";
pub const DEFAULT_GRPC: &str = "0.0.0.0:15012";
pub const DEFAULT_HTTP: &str = "127.0.0.1:15014";
/// Default lifetime of workload (service) certificates and of discovery's serving certificate.
pub const DEFAULT_WORKLOAD_TTL: Duration = pilotfish_pki::ca::DEFAULT_WORKLOAD_TTL;
/// Default lifetime of node certificates: a week, renewed by the agent at about half life.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest certificate lifetime accepted (seconds-long ones are for tests of rotation).
const MIN_TTL: Duration = pilotfish_pki::ca::MIN_TTL;
/// Longest certificate lifetime accepted.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Longest `max_stream_age`: hosts should rebalance within days, and deadlines stay far from
/// any overflow.
const MAX_STREAM_AGE_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The validated configuration the components see.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    pub trust_domain: TrustDomain,
    pub state_dir: PathBuf,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Plaintext and no authentication: local experiments only.
    pub insecure: bool,
    /// The CA (unused when `insecure`).
    pub ca: CaConfig,
    /// Directories and files the file registry watches.
    pub registry_files: Vec<PathBuf>,
    /// `[registry.consul]`, validated: the Consul adapter runs when set.
    pub consul: Option<ConsulConfig>,
    pub debounce: DebounceTimes,
    /// How long a host's instances stay healthy after its agent's last stream closed.
    pub node_grace: Duration,
    /// ADS streams close after this long (jittered per stream) so agents rebalance.
    pub max_stream_age: Duration,
    /// Where services' virtual IPs come from.
    pub vip_range: VipRange,
    /// `[api]`: the rules API.
    pub api: ApiConfig,
    /// `[store.consul]`: state shared with the other replicas (rules-API objects, join
    /// tokens, revocations, trust roots) lives in Consul KV instead of `state_dir` alone.
    pub store: Option<StoreConfig>,
}

/// `[store.consul]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The connection: address and token (wait: the blocking-query wait of the watch).
    pub consul: ConsulConfig,
    /// `None`: the Consul agent's own datacenter.
    pub datacenter: Option<String>,
    /// Ends with `/`; every key is under it.
    pub prefix: String,
}

/// The default `[store.consul] prefix`.
pub const DEFAULT_STORE_PREFIX: &str = "pilotfish/";

/// `[api]`, validated. The token file is read when discovery starts, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub token_file: Option<PathBuf>,
    pub read_requires_token: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token_file: None,
            read_requires_token: true,
        }
    }
}

/// `[ca]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub chain_file: Option<PathBuf>,
    pub extra_roots: Vec<PathBuf>,
    pub workload_ttl: Duration,
    pub node_ttl: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            cert_file: None,
            key_file: None,
            chain_file: None,
            extra_roots: Vec::new(),
            workload_ttl: DEFAULT_WORKLOAD_TTL,
            node_ttl: DEFAULT_NODE_TTL,
        }
    }
}

impl CaConfig {
    /// What `pilotfish_pki::Ca::load_or_create` takes.
    pub fn options(&self) -> pilotfish_pki::CaOptions {
        pilotfish_pki::CaOptions {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            chain_file: self.chain_file.clone(),
            extra_roots: self.extra_roots.clone(),
            workload_ttl: self.workload_ttl,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem (a TOML syntax or type error is one), one per line as
    /// `file:line:column: key.path: message`.
    #[error("{}", lines(problems))]
    Invalid { problems: Vec<Problem> },
}

fn lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

impl ConfigError {
    /// Every problem, one line each, for printing.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems } => problems.iter().map(ToString::to_string).collect(),
            other => {
                let mut line = other.to_string();
                let mut source = std::error::Error::source(other);
                while let Some(s) = source {
                    line.push_str(&format!(": {s}"));
                    source = s.source();
                }
                vec![line]
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: Option<String>,
    state_dir: Option<PathBuf>,
    grpc: Option<String>,
    http: Option<String>,
    insecure: Option<bool>,
    registry: Option<RawRegistry>,
    debounce: Option<RawDebounce>,
    node_grace: Option<String>,
    max_stream_age: Option<String>,
    vip_range: Option<String>,
    ca: Option<RawCa>,
    api: Option<RawApi>,
    store: Option<RawStore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    consul: Option<RawStoreConsul>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStoreConsul {
    address: Option<String>,
    token_file: Option<PathBuf>,
    datacenter: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    token_file: Option<PathBuf>,
    read_requires_token: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCa {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    chain_file: Option<PathBuf>,
    extra_roots: Option<Vec<PathBuf>>,
    workload_ttl: Option<String>,
    node_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    files: Option<RawFiles>,
    consul: Option<ConsulSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    paths: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebounce {
    quiet: Option<String>,
    max: Option<String>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its directory).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut problems = FileProblems::new(path, text);
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                problems.toml_error(&e);
                return Err(ConfigError::Invalid {
                    problems: problems.into_vec(),
                });
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));

        let trust_domain = raw
            .trust_domain
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
        let trust_domain = match TrustDomain::new(&trust_domain) {
            Ok(td) => Some(td),
            Err(e) => {
                problems.push(
                    "trust_domain",
                    format!(
                        "\"{trust_domain}\": {} (lowercase letters, digits, '.', '-' and '_', \
                         e.g. \"mesh.example\")",
                        e.reason
                    ),
                );
                None
            }
        };
        let state_dir = resolve(
            base,
            &raw.state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        );
        let grpc = socket_addr(
            "grpc",
            raw.grpc.as_deref().unwrap_or(DEFAULT_GRPC),
            &mut problems,
        );
        let http = socket_addr(
            "http",
            raw.http.as_deref().unwrap_or(DEFAULT_HTTP),
            &mut problems,
        );
        if let (Some(g), Some(h)) = (grpc, http) {
            if g == h {
                problems.push("http", format!("{h} is also the grpc address"));
            }
        }

        let insecure = raw.insecure.unwrap_or(false);
        let ca = ca_config(base, raw.ca.unwrap_or_default(), &mut problems);

        let (files, consul) = match raw.registry {
            Some(r) => (r.files, r.consul),
            None => (None, None),
        };
        let registry_files: Vec<PathBuf> = match files {
            Some(f) => {
                if f.paths.is_empty() {
                    problems.push("registry.files.paths", "list at least one directory");
                }
                for (i, p) in f.paths.iter().enumerate() {
                    if p.as_os_str().is_empty() {
                        problems.push(format!("registry.files.paths[{i}]"), "empty path");
                    }
                }
                f.paths.iter().map(|p| resolve(base, p)).collect()
            }
            None => Vec::new(),
        };
        let consul_declared = consul.is_some();
        let consul = consul.and_then(|section| consul_config(base, section, &mut problems));
        if registry_files.is_empty() && !consul_declared {
            problems.push(
                "registry",
                "no registry configured (add [registry.files] paths = [...])",
            );
        }

        let mut debounce = DebounceTimes::default();
        if let Some(d) = raw.debounce {
            if let Some(q) = d.quiet {
                match problems.duration("debounce.quiet", &q) {
                    Some(v) if !v.is_zero() => debounce.quiet = v,
                    Some(_) => problems.push("debounce.quiet", "must be more than 0"),
                    None => {}
                }
            }
            if let Some(m) = d.max {
                if let Some(v) = problems.duration("debounce.max", &m) {
                    debounce.max = v;
                }
            }
            if debounce.max < debounce.quiet {
                problems.push(
                    "debounce.max",
                    format!(
                        "{:?} is shorter than debounce.quiet ({:?})",
                        debounce.max, debounce.quiet
                    ),
                );
            }
        }

        let node_grace = match raw.node_grace.as_deref() {
            None => DEFAULT_NODE_GRACE,
            Some(text) => match problems.duration("node_grace", text) {
                Some(v) if !v.is_zero() => v,
                Some(_) => {
                    problems.push("node_grace", "must be more than 0");
                    DEFAULT_NODE_GRACE
                }
                None => DEFAULT_NODE_GRACE,
            },
        };

        let max_stream_age = match raw.max_stream_age.as_deref() {
            None => DEFAULT_MAX_STREAM_AGE,
            Some(text) => match problems.duration("max_stream_age", text) {
                Some(v) if (Duration::from_secs(1)..=MAX_STREAM_AGE_LIMIT).contains(&v) => v,
                Some(_) => {
                    problems.push("max_stream_age", "must be between 1s and 7d");
                    DEFAULT_MAX_STREAM_AGE
                }
                None => DEFAULT_MAX_STREAM_AGE,
            },
        };

        let vip_range = match raw.vip_range.as_deref() {
            None => VipRange::default(),
            Some(text) => text.parse().unwrap_or_else(|message: String| {
                problems.push("vip_range", message);
                VipRange::default()
            }),
        };

        let raw_api = raw.api.unwrap_or_default();
        let api = ApiConfig {
            token_file: match raw_api.token_file {
                Some(p) if p.as_os_str().is_empty() => {
                    problems.push("api.token_file", "empty path");
                    None
                }
                p => p.map(|p| resolve(base, &p)),
            },
            read_requires_token: raw_api.read_requires_token.unwrap_or(true),
        };

        let store = match raw.store {
            Some(RawStore {
                consul: Some(section),
            }) => store_config(base, section, consul.as_ref(), &mut problems),
            Some(RawStore { consul: None }) => {
                problems.push("store", "name the store: [store.consul]");
                None
            }
            None => None,
        };

        match (grpc, http, trust_domain, problems.is_empty()) {
            (Some(grpc), Some(http), Some(trust_domain), true) => Ok(Config {
                source: path.to_path_buf(),
                trust_domain,
                state_dir,
                grpc,
                http,
                insecure,
                ca,
                registry_files,
                consul,
                debounce,
                node_grace,
                max_stream_age,
                vip_range,
                api,
                store,
            }),
            _ => Err(ConfigError::Invalid {
                problems: problems.into_vec(),
            }),
        }
    }
}

fn ca_config(base: &Path, raw: RawCa, problems: &mut FileProblems<'_>) -> CaConfig {
    let mut ca = CaConfig::default();
    let mut file = |key: &str, p: Option<PathBuf>| match p {
        Some(p) if p.as_os_str().is_empty() => {
            problems.push(format!("ca.{key}"), "empty path");
            None
        }
        Some(p) => Some(resolve(base, &p)),
        None => None,
    };
    ca.cert_file = file("cert_file", raw.cert_file);
    ca.key_file = file("key_file", raw.key_file);
    ca.chain_file = file("chain_file", raw.chain_file);
    for (i, p) in raw.extra_roots.unwrap_or_default().into_iter().enumerate() {
        if let Some(p) = file(&format!("extra_roots[{i}]"), Some(p)) {
            ca.extra_roots.push(p);
        }
    }
    match (&ca.cert_file, &ca.key_file) {
        (Some(_), None) => problems.push("ca.key_file", "needed with ca.cert_file"),
        (None, Some(_)) => problems.push("ca.cert_file", "needed with ca.key_file"),
        (None, None) if ca.chain_file.is_some() => {
            problems.push("ca.chain_file", "needs ca.cert_file and ca.key_file")
        }
        _ => {}
    }
    for (key, raw, slot) in [
        ("workload_ttl", raw.workload_ttl, &mut ca.workload_ttl),
        ("node_ttl", raw.node_ttl, &mut ca.node_ttl),
    ] {
        let Some(text) = raw else { continue };
        let key = format!("ca.{key}");
        match problems.duration(&key, &text) {
            Some(v) if (MIN_TTL..=MAX_TTL).contains(&v) => *slot = v,
            Some(_) => problems.push(
                key,
                format!("must be between {}s and 365d", MIN_TTL.as_secs()),
            ),
            None => {}
        }
    }
    ca
}

/// `[registry.consul]`: the adapter's own validation (every problem, with its key path), with
/// `token_file` and `ca_file` resolved against the config file's directory.
fn consul_config(
    base: &Path,
    mut section: ConsulSection,
    problems: &mut FileProblems<'_>,
) -> Option<ConsulConfig> {
    for (key, slot) in [
        ("token_file", &mut section.token_file),
        ("ca_file", &mut section.ca_file),
    ] {
        match slot.as_deref() {
            Some(p) if p.as_os_str().is_empty() => {
                problems.push(format!("registry.consul.{key}"), "empty path");
                *slot = None;
            }
            Some(p) => *slot = Some(resolve(base, p)),
            None => {}
        }
    }
    section.validate(problems)
}

/// `[store.consul]`: the connection defaults to `[registry.consul]`'s.
fn store_config(
    base: &Path,
    raw: RawStoreConsul,
    registry: Option<&ConsulConfig>,
    problems: &mut FileProblems<'_>,
) -> Option<StoreConfig> {
    const P: &str = "store.consul";
    let before = problems.len();
    let address = match (raw.address, registry) {
        (Some(a), _) => a.trim().to_string(),
        (None, Some(r)) => r.address.clone(),
        (None, None) => {
            problems.push(
                format!("{P}.address"),
                "is required (or set [registry.consul] address, which it then reuses)",
            );
            String::new()
        }
    };
    if !address.is_empty() && (!address.starts_with("http://") || address.len() <= "http://".len())
    {
        problems.push(
            format!("{P}.address"),
            format!("\"{address}\" is not an http:// URL (TLS to Consul is not supported by this build)"),
        );
    }
    let token_file = match raw.token_file {
        Some(p) if p.as_os_str().is_empty() => {
            problems.push(format!("{P}.token_file"), "empty path");
            None
        }
        Some(p) => Some(resolve(base, &p)),
        None => registry.and_then(|r| r.token_file.clone()),
    };
    let datacenter = raw.datacenter.filter(|dc| {
        let ok = !dc.is_empty()
            && dc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            problems.push(
                format!("{P}.datacenter"),
                format!("\"{dc}\" is not a datacenter name"),
            );
        }
        ok
    });
    let prefix = raw
        .prefix
        .unwrap_or_else(|| DEFAULT_STORE_PREFIX.to_string());
    if let Err(why) = check_prefix(&prefix) {
        problems.push(format!("{P}.prefix"), why);
    }
    if problems.len() > before {
        return None;
    }
    let mut consul = ConsulConfig::new(address, datacenter.iter().cloned().collect());
    consul.token_file = token_file;
    consul.stale = false;
    if let Some(r) = registry {
        consul.wait = r.wait;
    }
    Some(StoreConfig {
        consul,
        datacenter,
        prefix,
    })
}

/// A KV prefix: relative, ending with `/`, of the characters Consul keys may hold.
fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || !prefix.ends_with('/') || prefix.starts_with('/') {
        return Err(format!(
            "\"{prefix}\" must be a relative key path ending with / (like \"pilotfish/\")"
        ));
    }
    if prefix.contains("//")
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
    {
        return Err(format!(
            "\"{prefix}\": use letters, digits, '-', '_', '.' and single '/' separators"
        ));
    }
    Ok(())
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn socket_addr(key: &str, value: &str, problems: &mut FileProblems<'_>) -> Option<SocketAddr> {
    match value.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(
                key,
                format!("\"{value}\" is not an ip:port address (e.g. \"127.0.0.1:15014\")"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/pilotfish/discovery.toml"))
    }

    /// `key.path: message` of each problem.
    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems }) => problems
                .iter()
                .map(|p| format!("{}: {}", p.key_path, p.message))
                .collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_relative_paths() {
        let c = parse("insecure = true\n[registry.files]\npaths = [\"registry.d\", \"/abs\"]\n")
            .expect("valid");
        assert_eq!(c.trust_domain.as_str(), "pilotfish.local");
        assert_eq!(c.ca, CaConfig::default());
        assert_eq!(c.ca.workload_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.ca.node_ttl, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.grpc, "0.0.0.0:15012".parse().expect("addr"));
        assert_eq!(c.http, "127.0.0.1:15014".parse().expect("addr"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/pilotfish/discovery"));
        assert_eq!(
            c.registry_files,
            [
                PathBuf::from("/etc/pilotfish/registry.d"),
                PathBuf::from("/abs")
            ]
        );
        assert_eq!(c.debounce, DebounceTimes::default());
        assert!(c.consul.is_none());
    }

    #[test]
    fn full_config_from_design() {
        let c = parse(
            r#"
trust_domain = "mesh.example"
state_dir = "state"
grpc = "127.0.0.2:15012"
http = "127.0.0.2:15014"
insecure = true
debounce = { quiet = "50ms", max = "2s" }

[registry.files]
paths = ["/etc/pilotfish/registry.d"]

[registry.consul]
address = "http://127.0.0.1:8500"
datacenters = ["dc1"]
token_file = "/etc/pilotfish/consul-token"
stale = true
"#,
        )
        .expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/etc/pilotfish/state"));
        assert_eq!(c.debounce.quiet, Duration::from_millis(50));
        assert_eq!(c.debounce.max, Duration::from_secs(2));
        let consul = c.consul.expect("consul configured");
        assert_eq!(consul.datacenters, ["dc1"]);
        assert_eq!(consul.address, "http://127.0.0.1:8500");
        assert_eq!(
            consul.token_file,
            Some(PathBuf::from("/etc/pilotfish/consul-token"))
        );
    }

    #[test]
    fn store_consul_reuses_the_registry_connection_and_checks_its_keys() {
        let c = parse(
            "insecure = true\n[registry.files]\npaths = [\"r\"]\n[registry.consul]\n\
             address = \"http://127.0.0.1:8500\"\ndatacenters = [\"dc1\"]\n\
             token_file = \"consul-token\"\n[store.consul]\n",
        )
        .expect("valid");
        let store = c.store.expect("store configured");
        assert_eq!(store.consul.address, "http://127.0.0.1:8500");
        assert_eq!(
            store.consul.token_file,
            Some(PathBuf::from("/etc/pilotfish/consul-token"))
        );
        assert_eq!(store.prefix, "pilotfish/");
        assert_eq!(store.datacenter, None);
        assert!(
            !store.consul.stale,
            "compare-and-set reads must not be stale"
        );

        let c = parse(
            "insecure = true\n[registry.files]\npaths = [\"r\"]\n[store.consul]\n\
             address = \"http://10.0.0.5:8500\"\ndatacenter = \"dc2\"\nprefix = \"mesh/prod/\"\n",
        )
        .expect("valid");
        let store = c.store.expect("store configured");
        assert_eq!(store.consul.address, "http://10.0.0.5:8500");
        assert_eq!(store.datacenter.as_deref(), Some("dc2"));
        assert_eq!(store.prefix, "mesh/prod/");

        let found = problems(
            "insecure = true\n[registry.files]\npaths = [\"r\"]\n[store.consul]\n\
             datacenter = \"dc 1\"\nprefix = \"/abs\"\ntoken_file = \"\"\n",
        );
        for want in [
            "store.consul.address: is required",
            "store.consul.datacenter:",
            "store.consul.prefix:",
            "store.consul.token_file: empty path",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(want)),
                "{want} in {found:?}"
            );
        }
        let found = problems("insecure = true\n[registry.files]\npaths = [\"r\"]\n[store]\n");
        assert!(
            found.iter().any(|p| p.starts_with("store: name the store")),
            "{found:?}"
        );
    }

    #[test]
    fn consul_section_resolves_the_token_file_and_lists_every_problem() {
        let c = parse(
            "insecure = true\n[registry.consul]\naddress = \"http://127.0.0.1:8500\"\n\
             datacenters = [\"dc1\", \"dc2\"]\ntoken_file = \"consul-token\"\nwait = \"30s\"\n",
        )
        .expect("consul alone is a registry");
        let consul = c.consul.expect("configured");
        assert_eq!(
            consul.token_file,
            Some(PathBuf::from("/etc/pilotfish/consul-token"))
        );
        assert_eq!(consul.wait, Duration::from_secs(30));
        assert!(c.registry_files.is_empty());

        let p = problems(
            "insecure = true\n[registry.consul]\naddress = \"consul:8500\"\n\
             datacenters = [\"dc1\", \"dc1\"]\ntoken_file = \"\"\nwait = \"soon\"\n",
        );
        let joined = p.join("\n");
        for key in [
            "registry.consul.token_file: empty path",
            "registry.consul.address:",
            "registry.consul.datacenters[1]:",
            "registry.consul.wait:",
        ] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
        assert!(!joined.contains("no registry configured"), "{joined}");

        let err = parse("[registry.consul]\naddress = \"http://x:1\"\ndatacenter = \"dc1\"\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("datacenter"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = parse("insecure = true\ngrcp = \"1.2.3.4:5\"\n").expect_err("rejected");
        assert!(
            err.to_string()
                .starts_with("/etc/pilotfish/discovery.toml:2:1: grcp: unknown field `grcp`"),
            "{err}"
        );
        let err = parse("insecure = true\n[registry.files]\npaths = []\npath = []\n")
            .expect_err("rejected");
        assert!(err.to_string().contains("path"), "{err}");
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let p = problems(
            "trust_domain = \"bad domain\"\ngrpc = \"nope\"\nhttp = \"1.2.3.4\"\n\
             debounce = { quiet = \"5 parsecs\", max = \"1x\" }\n",
        );
        let joined = p.join("\n");
        for key in [
            "trust_domain:",
            "grpc:",
            "http:",
            "registry:",
            "debounce.quiet:",
            "debounce.max:",
        ] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
    }

    #[test]
    fn problems_read_file_line_column_key_message() {
        let err = parse("[registry.files]\npaths = [\"r\"]\n\n[ca]\nnode_ttl = \"1y\"\n")
            .expect_err("invalid");
        assert_eq!(
            err.problems(),
            [
                "/etc/pilotfish/discovery.toml:5:12: ca.node_ttl: \"1y\" is not a duration \
              (expected a number and a unit, like \"250ms\", \"1.5s\", \"2m\", \"1.5h\" or \"7d\")"
            ]
        );
        // A missing key is about the whole file.
        let err = parse("insecure = true\n").expect_err("no registry");
        assert_eq!(
            err.problems(),
            [
                "/etc/pilotfish/discovery.toml: registry: no registry configured \
              (add [registry.files] paths = [...])"
            ]
        );
    }

    #[test]
    fn api_section_defaults_to_no_token_and_token_required_for_reads() {
        let c = parse("[registry.files]\npaths = [\"r\"]\n").expect("valid");
        assert_eq!(c.api, ApiConfig::default());
        assert!(c.api.read_requires_token);
        let c = parse(
            "[registry.files]\npaths = [\"r\"]\n[api]\ntoken_file = \"api-token\"\n\
             read_requires_token = false\n",
        )
        .expect("valid");
        assert_eq!(
            c.api,
            ApiConfig {
                token_file: Some(PathBuf::from("/etc/pilotfish/api-token")),
                read_requires_token: false,
            }
        );
        let err = parse("[registry.files]\npaths = [\"r\"]\n[api]\ntoken = \"x\"\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("token"), "{err}");
        let p = problems("[registry.files]\npaths = [\"r\"]\n[api]\ntoken_file = \"\"\n");
        assert_eq!(p, ["api.token_file: empty path"]);
    }

    #[test]
    fn vip_range_defaults_and_problems_name_the_key() {
        let minimal = "insecure = true\n[registry.files]\npaths = [\"r\"]\n";
        assert_eq!(
            parse(minimal).expect("valid").vip_range.to_string(),
            "240.240.0.0/16"
        );
        let set = format!("vip_range = \"10.200.0.0/20\"\n{minimal}");
        assert_eq!(
            parse(&set).expect("valid").vip_range.to_string(),
            "10.200.0.0/20"
        );
        let bad = format!("vip_range = \"10.200.1.0/20\"\n{minimal}");
        let err = parse(&bad).expect_err("host bits").to_string();
        assert!(
            err.contains(":1:") && err.contains("vip_range: \"10.200.1.0/20\" has host bits set"),
            "{err}"
        );
    }

    #[test]
    fn max_stream_age_defaults_to_30m_and_must_be_at_least_a_second() {
        let minimal = "insecure = true\n[registry.files]\npaths = [\"r\"]\n";
        assert_eq!(
            parse(minimal).expect("valid").max_stream_age,
            Duration::from_secs(30 * 60)
        );
        let set = format!("max_stream_age = \"10m\"\n{minimal}");
        assert_eq!(
            parse(&set).expect("valid").max_stream_age,
            Duration::from_secs(600)
        );
        let short = format!("max_stream_age = \"500ms\"\n{minimal}");
        let listed = problems(&short);
        assert!(
            listed
                .iter()
                .any(|p| p.contains("max_stream_age: must be between 1s and 7d")),
            "{listed:?}"
        );
    }

    #[test]
    fn secure_mode_is_the_default() {
        let c = parse("[registry.files]\npaths = [\"r\"]\n").expect("valid");
        assert!(!c.insecure);
    }

    #[test]
    fn ca_section_parses_and_resolves_paths() {
        let c = parse(
            r#"
[registry.files]
paths = ["r"]

[ca]
cert_file = "ca/int.pem"
key_file = "/secure/int.key"
chain_file = "ca/chain.pem"
extra_roots = ["old-root.pem"]
workload_ttl = "1h"
node_ttl = "3d"
"#,
        )
        .expect("valid");
        assert_eq!(
            c.ca,
            CaConfig {
                cert_file: Some(PathBuf::from("/etc/pilotfish/ca/int.pem")),
                key_file: Some(PathBuf::from("/secure/int.key")),
                chain_file: Some(PathBuf::from("/etc/pilotfish/ca/chain.pem")),
                extra_roots: vec![PathBuf::from("/etc/pilotfish/old-root.pem")],
                workload_ttl: Duration::from_secs(3600),
                node_ttl: Duration::from_secs(3 * 86400),
            }
        );
        let opts = c.ca.options();
        assert_eq!(opts.workload_ttl, Duration::from_secs(3600));
        assert_eq!(opts.extra_roots.len(), 1);
    }

    #[test]
    fn ca_section_problems_are_listed_together() {
        let p = problems(
            "[registry.files]\npaths = [\"r\"]\n[ca]\ncert_file = \"c.pem\"\n\
             workload_ttl = \"0s\"\nnode_ttl = \"soon\"\n",
        );
        assert_eq!(
            p,
            [
                "ca.key_file: needed with ca.cert_file",
                "ca.workload_ttl: must be between 5s and 365d",
                "ca.node_ttl: \"soon\" is not a duration (expected a number and a unit, like \
                 \"250ms\", \"1.5s\", \"2m\", \"1.5h\" or \"7d\")",
            ]
        );
        let p = problems("[registry.files]\npaths = [\"r\"]\n[ca]\nchain_file = \"x\"\n");
        assert_eq!(p, ["ca.chain_file: needs ca.cert_file and ca.key_file"]);
        let err = parse("[registry.files]\npaths = [\"r\"]\n[ca]\nttl = \"1h\"\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("ttl"), "{err}");
    }

    #[test]
    fn trust_domain_follows_the_spiffe_rules() {
        let p = problems("trust_domain = \"Mesh.Example\"\n[registry.files]\npaths = [\"r\"]\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("trust_domain: \"Mesh.Example\""), "{p:?}");
    }

    #[test]
    fn example_configs_load() {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    walk(&path, found);
                } else if name.starts_with("discovery") && name.ends_with(".toml") {
                    found.push(path);
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
            &mut found,
        );
        assert!(!found.is_empty(), "no example discovery config found");
        for path in found {
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(c.registry_files.iter().all(|p| p.is_absolute()));
        }
    }
}
