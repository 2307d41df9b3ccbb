//! `agent.toml`: the file layer (serde structs that mirror the file, unknown keys rejected) and
//! the runtime layer ([`AgentConfig`], real types) that every other module sees.
//!
//! Validation collects every problem before failing, so `pilotfish-agent --check` lists them all
//! at once, each as `agent.toml:line:column: key.path: message` (the shared
//! [`pilotfish_registries::config_vocab`]). Durations everywhere: decimals with `ms`, `s`, `m`,
//! `h` or `d`. Relative paths are resolved against the directory of the config file, so an
//! agent started from any working directory reads the same files.

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::intercept::InterceptionConfig;
use crate::intercept::Ipv4Net;
use pilotfish_pki::TrustDomain;

pub use crate::dns::DnsConfig;
use pilotfish_registries::config_vocab::{FileProblems, Problem};
use serde::Deserialize;

pub const DEFAULT_OUTBOUND: &str = "127.0.0.1:15001";
pub const DEFAULT_MESH_PORT: u16 = 15006;
/// The unit's `StateDirectory=pilotfish/agent`; discovery's is `/var/lib/pilotfish/discovery`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pilotfish/agent";
/// The unit's `RuntimeDirectory=pilotfish/agent`.
pub const DEFAULT_RUN_DIR: &str = "/run/pilotfish/agent";
pub const DEFAULT_HEALTH: &str = "127.0.0.1:15020";
pub const DEFAULT_ENVOY_BINARY: &str = "envoy";
pub const DEFAULT_ENVOY_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(5);
pub const DEFAULT_LOG_LEVEL: &str = "warning";
pub const DEFAULT_TRUST_DOMAIN: &str = "pilotfish.local";
/// `[tracing] sample_percent`: every request, since `[tracing]` is an explicit opt-in and an
/// operator who turns it on expects to see the request just made (Istio's 1% suits clusters
/// that trace by default).
pub const DEFAULT_SAMPLE_PERCENT: f64 = 100.0;

/// `[dns] listen`: a loopback address of its own, so the mesh DNS can have port 53 beside
/// systemd-resolved (127.0.0.53) and anything on 127.0.0.1.
pub const DEFAULT_DNS_LISTEN: &str = "127.0.0.153:53";
/// `[dns] domain`: services answer as `<service>.mesh`.
pub const DEFAULT_DNS_DOMAIN: &str = "mesh";

/// The socket Envoy's `pilotfish-xds` cluster dials, inside `run_dir`.
pub const XDS_SOCKET: &str = "xds.sock";
/// The socket Envoy's `pilotfish-sds` cluster dials, inside `run_dir`.
pub const SDS_SOCKET: &str = "sds.sock";
/// The bootstrap the agent writes for Envoy, inside `run_dir`.
pub const BOOTSTRAP_FILE: &str = "envoy-bootstrap.json";
/// The last accepted xDS resources, inside `state_dir`.
pub const CACHE_FILE: &str = "xds-cache.bin";

/// Envoy's log levels, as its `--log-level` flag accepts them.
const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

// ---- file layer -------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    node: Option<String>,
    address: Option<String>,
    discovery: Option<Vec<String>>,
    token_file: Option<String>,
    ca_file: Option<String>,
    trust_domain: Option<String>,
    insecure: Option<bool>,
    outbound: Option<String>,
    app_address: Option<String>,
    mesh_port: Option<i64>,
    state_dir: Option<String>,
    run_dir: Option<String>,
    health: Option<String>,
    envoy: Option<EnvoyFile>,
    tracing: Option<TracingFile>,
    interception: Option<InterceptionFile>,
    dns: Option<DnsFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvoyFile {
    binary: Option<String>,
    admin: Option<String>,
    concurrency: Option<i64>,
    drain_time: Option<String>,
    log_level: Option<String>,
    xds: Option<String>,
    access_log: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InterceptionFile {
    outbound: Option<bool>,
    inbound: Option<bool>,
    port: Option<i64>,
    include_cidrs: Option<Vec<String>>,
    exclude_cidrs: Option<Vec<String>>,
    exclude_ports: Option<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TracingFile {
    zipkin: Option<String>,
    sample_percent: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsFile {
    enabled: Option<bool>,
    listen: Option<String>,
    domain: Option<String>,
    bare_names: Option<bool>,
    upstreams: Option<Vec<String>>,
}

// ---- runtime layer ----------------------------------------------------------------------------

/// Which ADS flavour Envoy speaks to the agent (and the agent, in turn, to discovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdsFlavor {
    Delta,
    Sotw,
}

/// Where Envoy writes its access log (one JSON line per request), `[envoy] access_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    /// Envoy's stdout, which is the agent's: journald under systemd.
    Stdout,
    Off,
    /// An absolute path (relative ones in the file are resolved against its directory).
    File(PathBuf),
}

impl AccessLog {
    /// The `pilotfish.access_log` node metadata value discovery reads.
    pub fn metadata(&self) -> String {
        match self {
            AccessLog::Stdout => "stdout".to_string(),
            AccessLog::Off => "off".to_string(),
            AccessLog::File(p) => p.to_string_lossy().into_owned(),
        }
    }
}

/// `[tracing]`: Envoy reports a span per request to a Zipkin collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingConfig {
    /// The collector as `host:port` (a name is resolved by Envoy, like a DNS instance).
    pub zipkin: String,
    /// The share of requests that start a trace, in hundredths of a percent (10000 = all).
    /// A request that arrives with a sampling decision (B3 headers) keeps it.
    pub sample_hundredths: u32,
}

impl TracingConfig {
    /// The sampling share as a percentage, the `pilotfish.trace_sample_percent` metadata value.
    pub fn sample_percent(&self) -> f64 {
        f64::from(self.sample_hundredths) / 100.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// This host's node name (Envoy `node.id`).
    pub node: String,
    /// Where peers reach this host.
    pub address: IpAddr,
    /// Discovery replicas as `host:port`, tried in order.
    pub discovery: Vec<String>,
    /// The join token, read (only) to enrol when no valid node certificate is stored.
    pub token_file: Option<PathBuf>,
    /// The mesh root(s), PEM, to verify discovery. Always set unless `insecure`.
    pub ca_file: Option<PathBuf>,
    pub trust_domain: TrustDomain,
    pub insecure: bool,
    pub outbound: SocketAddr,
    pub app_address: IpAddr,
    pub mesh_port: u16,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Agent health and metrics HTTP.
    pub health: SocketAddr,
    pub envoy: EnvoyConfig,
    /// `None`: no tracing (no `[tracing]` table).
    pub tracing: Option<TracingConfig>,
    /// `None`: no interception (`[interception]` absent, or neither direction on).
    pub interception: Option<InterceptionConfig>,
    /// `None`: no mesh DNS server (`[dns] enabled` is not true).
    pub dns: Option<DnsConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyConfig {
    /// Resolved to an existing file (PATH searched when the config gives a bare name).
    pub binary: PathBuf,
    pub admin: SocketAddr,
    pub concurrency: Option<u32>,
    pub drain_time: Duration,
    pub log_level: String,
    pub xds: XdsFlavor,
    pub access_log: AccessLog,
}

impl AgentConfig {
    pub fn xds_socket(&self) -> PathBuf {
        self.run_dir.join(XDS_SOCKET)
    }

    pub fn sds_socket(&self) -> PathBuf {
        self.run_dir.join(SDS_SOCKET)
    }

    pub fn bootstrap_path(&self) -> PathBuf {
        self.run_dir.join(BOOTSTRAP_FILE)
    }

    pub fn cache_path(&self) -> PathBuf {
        self.state_dir.join(CACHE_FILE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
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

/// Reads and validates `path`. Bare binary names are looked up on the process's `PATH`.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    let path_env = std::env::var_os("PATH");
    let config = parse(path, &text, &base, path_env.as_deref())
        .map_err(|problems| ConfigError::Invalid { problems })?;
    let mut problems = FileProblems::new(path, &text);
    check_ca_file(&config, &mut problems);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            problems: problems.into_vec(),
        });
    }
    Ok(config)
}

/// `ca_file` must hold at least one PEM certificate: without it discovery cannot be verified,
/// and the agent never dials discovery unverified.
pub fn check_ca_file(config: &AgentConfig, problems: &mut FileProblems<'_>) {
    let Some(ca_file) = &config.ca_file else {
        return;
    };
    let message = match std::fs::read_to_string(ca_file) {
        Ok(pem) => match crate::identity::tls::pem_cert_count(&pem) {
            Ok(n) if n > 0 => return,
            Ok(_) => format!("{} holds no PEM certificate", ca_file.display()),
            Err(e) => format!("{}: {e}", ca_file.display()),
        },
        Err(e) => format!("{}: cannot read: {e}", ca_file.display()),
    };
    problems.push("ca_file", message);
}

/// For `--check`: the host can obtain or already holds its identity, that is `token_file`
/// exists or `state_dir` holds an unexpired node certificate for this node (in insecure mode,
/// nothing is needed). `file` is the config file, for the problem.
pub fn check_enrolment(config: &AgentConfig, file: &Path) -> Vec<Problem> {
    if config.insecure {
        return Vec::new();
    }
    let store = crate::identity::store::Store::new(&config.state_dir);
    if let Ok(Some(node)) = store.load_node() {
        if node.is_valid_at(std::time::SystemTime::now()) {
            return Vec::new();
        }
    }
    let message = match &config.token_file {
        Some(t) if t.is_file() => return Vec::new(),
        Some(t) => format!(
            "{} does not exist and {} holds no valid node certificate: write this host's join \
             token there (pilotfish-discovery token create --node {})",
            t.display(),
            config.state_dir.display(),
            config.node
        ),
        None => format!(
            "is required: {} holds no valid node certificate, so the host must enrol with a \
             join token",
            config.state_dir.display()
        ),
    };
    // About the state of the host rather than a place in the file.
    vec![Problem::whole_file(file, "token_file", message)]
}

/// For `--check`: with `[interception]`, `nft` must be on `path_env` or in an sbin directory
/// (the agent runs it to write its table). `file` is the config file, for the problem.
pub fn check_interception(
    config: &AgentConfig,
    file: &Path,
    path_env: Option<&OsStr>,
) -> Vec<Problem> {
    interception_problems(config, file, path_env, &crate::intercept::SBIN)
}

fn interception_problems(
    config: &AgentConfig,
    file: &Path,
    path_env: Option<&OsStr>,
    fallback: &[&str],
) -> Vec<Problem> {
    if config.interception.is_none()
        || crate::intercept::find_tool("nft", path_env, fallback).is_some()
    {
        return Vec::new();
    }
    vec![Problem::whole_file(
        file,
        "interception",
        "needs nft (Debian's nftables package: not on PATH, /usr/sbin or /sbin), and \
         CAP_NET_ADMIN to run it (the interception drop-in, \
         /usr/share/doc/pilotfish-agent/interception.conf)",
    )]
}

/// Parses and validates config text read from `path` (for messages); no I/O except checking
/// that the Envoy binary exists. `base` resolves relative paths; `path_env` is the `PATH`
/// searched for a bare binary name. `Err` lists every problem.
pub fn parse(
    path: &Path,
    text: &str,
    base: &Path,
    path_env: Option<&OsStr>,
) -> Result<AgentConfig, Vec<Problem>> {
    let mut v = Validator {
        problems: FileProblems::new(path, text),
    };
    let file: AgentFile = match toml::from_str(text) {
        Ok(file) => file,
        Err(e) => {
            v.problems.toml_error(&e);
            return Err(v.problems.into_vec());
        }
    };

    let node = match file.node {
        Some(n) if !n.trim().is_empty() => n,
        Some(_) => v.fail("node", "must not be empty"),
        None => v.fail("node", "is required (this host's name in the registry)"),
    };
    let address = match file.address {
        Some(a) => v.parse_ip("address", &a),
        None => v.fail("address", "is required (where peers reach this host)"),
    };
    let discovery = match file.discovery {
        Some(list) if list.is_empty() => v.fail("discovery", "needs at least one host:port"),
        Some(list) => {
            for (i, d) in list.iter().enumerate() {
                if let Err(m) = check_host_port(d) {
                    v.problem(format!("discovery[{i}]"), m);
                }
            }
            list
        }
        None => v.fail("discovery", "is required (one or more host:port)"),
    };
    let insecure = file.insecure.unwrap_or(false);
    let token_file = file.token_file.map(|p| resolve(base, &p));
    let ca_file = file.ca_file.map(|p| resolve(base, &p));
    if ca_file.is_none() && !insecure {
        v.problem(
            "ca_file",
            "is required (the mesh root that discovery's certificate must chain to), unless \
             insecure = true",
        );
    }
    let trust_domain =
        match TrustDomain::new(file.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN)) {
            Ok(td) => Some(td),
            Err(e) => v.fail("trust_domain", e.to_string()),
        };
    let outbound = v.parse_socket(
        "outbound",
        file.outbound.as_deref().unwrap_or(DEFAULT_OUTBOUND),
    );
    let app_address = match file.app_address {
        Some(a) => v.parse_ip("app_address", &a),
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let mesh_port = match file.mesh_port {
        None => DEFAULT_MESH_PORT,
        Some(p) => match u16::try_from(p) {
            Ok(p) if p != 0 => p,
            _ => v.fail("mesh_port", format!("{p} is not a port (1-65535)")),
        },
    };
    let state_dir = resolve(base, file.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
    let run_dir = resolve(base, file.run_dir.as_deref().unwrap_or(DEFAULT_RUN_DIR));
    // sds.sock is no longer than xds.sock.
    let socket = run_dir.join(XDS_SOCKET);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        v.problem(
            "run_dir",
            format!(
                "{} is too long for a Unix socket path ({} bytes max)",
                socket.display(),
                MAX_SOCKET_PATH
            ),
        );
    }
    let health = v.parse_socket("health", file.health.as_deref().unwrap_or(DEFAULT_HEALTH));

    let envoy = file.envoy.unwrap_or_default();
    let binary_name = envoy.binary.as_deref().unwrap_or(DEFAULT_ENVOY_BINARY);
    let binary = match resolve_binary(base, binary_name, path_env) {
        Ok(b) => b,
        Err(m) => v.fail("envoy.binary", m),
    };
    let admin = v.parse_socket(
        "envoy.admin",
        envoy.admin.as_deref().unwrap_or(DEFAULT_ENVOY_ADMIN),
    );
    let concurrency = match envoy.concurrency {
        None => None,
        Some(n) => match u32::try_from(n) {
            Ok(n) if n >= 1 => Some(n),
            _ => v.fail(
                "envoy.concurrency",
                format!("{n} is not a positive integer"),
            ),
        },
    };
    let drain_time = match envoy.drain_time.as_deref() {
        None => DEFAULT_DRAIN_TIME,
        Some(s) => v
            .problems
            .duration("envoy.drain_time", s)
            .unwrap_or(Duration::ZERO),
    };
    let log_level = envoy
        .log_level
        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    if !LOG_LEVELS.contains(&log_level.as_str()) {
        v.problem(
            "envoy.log_level",
            format!("\"{log_level}\" is not one of {}", LOG_LEVELS.join(", ")),
        );
    }
    let xds = match envoy.xds.as_deref() {
        None | Some("delta") => XdsFlavor::Delta,
        Some("sotw") => XdsFlavor::Sotw,
        Some(other) => v.fail(
            "envoy.xds",
            format!("\"{other}\" is not \"delta\" or \"sotw\""),
        ),
    };
    let access_log = match envoy.access_log.as_deref() {
        None | Some("stdout") => AccessLog::Stdout,
        Some("off") => AccessLog::Off,
        Some(p) => match check_log_path(base, p) {
            Ok(p) => AccessLog::File(p),
            Err(m) => {
                v.problem("envoy.access_log", m);
                AccessLog::Off
            }
        },
    };
    let tracing = file.tracing.and_then(|t| tracing(&mut v, t));
    let interception = file.interception.and_then(|i| interception(&mut v, i));
    let intercepts = interception.as_ref().is_some_and(|i| i.outbound);
    let dns = dns(&mut v, file.dns.unwrap_or_default(), intercepts);

    let mut used = vec![("health", health), ("envoy.admin", admin)];
    if !v.failed() {
        used.push(("outbound", outbound));
        if let Some(i) = &interception {
            used.push(("interception.port", i.listener()));
        }
        // Its TCP half would clash with the HTTP listeners.
        if let Some(dns) = &dns {
            used.push(("dns.listen", dns.listen));
        }
        if let Some((a, b)) = first_clash(&used) {
            v.problem(b, format!("uses the same address as {a}"));
        }
    }

    let (true, Some(trust_domain)) = (v.problems.is_empty(), trust_domain) else {
        return Err(v.problems.into_vec());
    };
    Ok(AgentConfig {
        node,
        address,
        discovery,
        token_file,
        ca_file,
        trust_domain,
        insecure,
        outbound,
        app_address,
        mesh_port,
        state_dir,
        run_dir,
        health,
        envoy: EnvoyConfig {
            binary,
            admin,
            concurrency,
            drain_time,
            log_level,
            xds,
            access_log,
        },
        tracing,
        interception,
        dns,
    })
}

/// `[interception]`: `None` unless `outbound` or `inbound` is on.
fn interception(v: &mut Validator<'_>, file: InterceptionFile) -> Option<InterceptionConfig> {
    let port = match file.port {
        None => crate::intercept::DEFAULT_PORT,
        Some(p) => match u16::try_from(p) {
            Ok(p) if p != 0 => p,
            _ => v.fail("interception.port", format!("{p} is not a port (1-65535)")),
        },
    };
    let mut cidrs = |key: &str, list: Option<Vec<String>>| -> Vec<Ipv4Net> {
        let mut out = Vec::new();
        for (i, text) in list.unwrap_or_default().iter().enumerate() {
            match text.parse() {
                Ok(net) => out.push(net),
                Err(m) => v.problem(format!("interception.{key}[{i}]"), m),
            }
        }
        out
    };
    let include_cidrs = cidrs("include_cidrs", file.include_cidrs);
    let exclude_cidrs = cidrs("exclude_cidrs", file.exclude_cidrs);
    let mut exclude_ports = Vec::new();
    for (i, p) in file
        .exclude_ports
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        match u16::try_from(p) {
            Ok(p) if p != 0 => exclude_ports.push(p),
            _ => v.problem(
                format!("interception.exclude_ports[{i}]"),
                format!("{p} is not a port (1-65535)"),
            ),
        }
    }
    let config = InterceptionConfig {
        outbound: file.outbound.unwrap_or(false),
        inbound: file.inbound.unwrap_or(false),
        port,
        include_cidrs,
        exclude_cidrs,
        exclude_ports,
    };
    (config.outbound || config.inbound).then_some(config)
}

/// `[tracing]`: `zipkin` is required once the table is written; `sample_percent` is a number
/// from 0 to 100 with at most two decimals (Envoy's sampling works on 1/10000 steps).
fn tracing(v: &mut Validator<'_>, file: TracingFile) -> Option<TracingConfig> {
    let zipkin = match file.zipkin {
        Some(z) => match check_host_port(&z) {
            Ok(()) => Some(z),
            Err(m) => v.fail("tracing.zipkin", m),
        },
        None => v.fail(
            "tracing.zipkin",
            "is required in [tracing] (the Zipkin collector as host:port)",
        ),
    };
    let percent = file.sample_percent.unwrap_or(DEFAULT_SAMPLE_PERCENT);
    let hundredths = percent * 100.0;
    let sample_hundredths = if !(0.0..=100.0).contains(&percent) {
        v.fail(
            "tracing.sample_percent",
            format!("{percent} is not a percentage (0 to 100)"),
        )
    } else if (hundredths - hundredths.round()).abs() > 1e-6 {
        v.fail(
            "tracing.sample_percent",
            format!("{percent} has more than two decimals (the finest step is 0.01)"),
        )
    } else {
        // In 0..=10000 by the checks above.
        Some(hundredths.round() as u32)
    };
    Some(TracingConfig {
        zipkin: zipkin?,
        sample_hundredths: sample_hundredths?,
    })
}

/// Whether the mesh DNS server runs: `[dns] enabled` when written, else `default_on`, which
/// is `[interception] outbound` (apps resolve `<service>.mesh` to reach the VIPs it
/// intercepts). `enabled = false` still turns it off.
fn dns_enabled(file_enabled: Option<bool>, default_on: bool) -> bool {
    file_enabled.unwrap_or(default_on)
}

/// `[dns]`: every key is checked even when the server is off, so a typo shows before the day it
/// is turned on. `upstreams` not written: the host's name servers (read only when enabled, see
/// [`crate::dns::system_upstreams`]).
fn dns(v: &mut Validator<'_>, file: DnsFile, intercepts: bool) -> Option<DnsConfig> {
    let enabled = dns_enabled(file.enabled, intercepts);
    if enabled && !intercepts {
        v.problem(
            "dns.enabled",
            "needs [interception] outbound = true: the virtual IPs it answers with reach Envoy \
             only through interception",
        );
    }
    let listen_text = file.listen.as_deref().unwrap_or(DEFAULT_DNS_LISTEN);
    let listen = match listen_text.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => a,
        Ok(_) => v.fail(
            "dns.listen",
            format!("\"{listen_text}\" has port 0 (DNS clients ask port 53)"),
        ),
        Err(_) => v.fail("dns.listen", format!("\"{listen_text}\" is not an ip:port")),
    };
    let domain = file
        .domain
        .unwrap_or_else(|| DEFAULT_DNS_DOMAIN.to_string());
    if let Err(m) = check_domain(&domain) {
        v.problem("dns.domain", m);
    }
    let upstreams = match file.upstreams {
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let key = format!("dns.upstreams[{i}]");
                match parse_upstream(s) {
                    Ok(a) if crate::dns::is_own_address(a, listen) => {
                        v.problem(
                            key,
                            format!("{a} is dns.listen itself: queries would loop back to it"),
                        );
                        None
                    }
                    Ok(a) => Some(a),
                    Err(m) => {
                        v.problem(key, m);
                        None
                    }
                }
            })
            .collect(),
        None if enabled => crate::dns::system_upstreams(listen),
        None => Vec::new(),
    };
    enabled.then(|| DnsConfig {
        listen,
        domain,
        bare_names: file.bare_names.unwrap_or(false),
        upstreams,
    })
}

/// A DNS name written without its trailing dot: labels of 1-63 lowercase letters, digits and
/// '-' (not at either end), joined by single dots.
fn check_domain(domain: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "\"{}\" is not a DNS domain: {why}",
            domain.escape_debug()
        ))
    };
    if domain.is_empty() {
        return bad("it is empty");
    }
    if domain.starts_with('.') || domain.ends_with('.') {
        return bad("write it without a leading or trailing dot");
    }
    if domain.len() > 253 {
        return bad("longer than 253 characters");
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return bad("two dots in a row");
        }
        if label.len() > 63 {
            return bad("a label longer than 63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad("only lowercase letters, digits, '-' and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    Ok(())
}

/// `"ip"` (port 53) or `"ip:port"` (`"[v6]:port"`).
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let addr = match (s.parse::<SocketAddr>(), s.parse::<IpAddr>()) {
        (Ok(a), _) => a,
        (_, Ok(ip)) => SocketAddr::new(ip, 53),
        _ => return Err(format!("\"{}\" is not an ip or ip:port", s.escape_debug())),
    };
    if addr.port() == 0 {
        return Err(format!("\"{s}\" has port 0"));
    }
    Ok(addr)
}

fn first_clash(used: &[(&'static str, SocketAddr)]) -> Option<(&'static str, &'static str)> {
    for (i, (a, addr_a)) in used.iter().enumerate() {
        for (b, addr_b) in &used[i + 1..] {
            if addr_a == addr_b {
                return Some((a, b));
            }
        }
    }
    None
}

/// Collects problems; the placeholder values it returns on failure are never used because
/// `parse` returns the problem list instead.
struct Validator<'t> {
    problems: FileProblems<'t>,
}

impl Validator<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(key, message);
    }

    fn failed(&self) -> bool {
        !self.problems.is_empty()
    }

    fn fail<T: Placeholder>(&mut self, key: &str, message: impl Into<String>) -> T {
        self.problem(key, message);
        T::placeholder()
    }

    fn parse_ip(&mut self, key: &str, s: &str) -> IpAddr {
        match s.parse() {
            Ok(ip) => ip,
            Err(_) => self.fail(key, format!("\"{s}\" is not an IP address")),
        }
    }

    fn parse_socket(&mut self, key: &str, s: &str) -> SocketAddr {
        match s.parse() {
            Ok(a) => a,
            Err(_) => self.fail(key, format!("\"{s}\" is not an ip:port")),
        }
    }
}

trait Placeholder {
    fn placeholder() -> Self;
}
impl Placeholder for String {
    fn placeholder() -> Self {
        String::new()
    }
}
impl<T> Placeholder for Vec<T> {
    fn placeholder() -> Self {
        Vec::new()
    }
}
impl<T> Placeholder for Option<T> {
    fn placeholder() -> Self {
        None
    }
}
impl Placeholder for IpAddr {
    fn placeholder() -> Self {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}
impl Placeholder for SocketAddr {
    fn placeholder() -> Self {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}
impl Placeholder for u16 {
    fn placeholder() -> Self {
        0
    }
}
impl Placeholder for PathBuf {
    fn placeholder() -> Self {
        PathBuf::new()
    }
}
impl Placeholder for XdsFlavor {
    fn placeholder() -> Self {
        XdsFlavor::Delta
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// An access log file: a path (resolved like every path here) whose directory exists, since
/// Envoy would otherwise reject every listener that logs to it.
fn check_log_path(base: &Path, p: &str) -> Result<PathBuf, String> {
    if p.trim().is_empty() {
        return Err("is not \"stdout\", \"off\" or a file path".to_string());
    }
    if p.contains(['\0', '\n']) || p.ends_with('/') {
        return Err(format!(
            "\"{}\" is not \"stdout\", \"off\" or a file path",
            p.escape_debug()
        ));
    }
    let path = resolve(base, p);
    match path.parent() {
        Some(dir) if dir.is_dir() => Ok(path),
        _ => Err(format!("{}: its directory does not exist", path.display())),
    }
}

fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("\"{s}\" is not host:port"));
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err(format!("\"{s}\" has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("\"{s}\" has no valid port")),
    }
}

/// A name containing '/' is a path (relative to the config's directory); a bare name is looked
/// up on `PATH` like a shell would.
fn resolve_binary(base: &Path, name: &str, path_env: Option<&OsStr>) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.contains('/') {
        let p = resolve(base, name);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "{} does not exist or is not executable",
                p.display()
            ))
        };
    }
    let path_env = path_env.map(OsString::from).unwrap_or_default();
    std::env::split_paths(&path_env)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            format!(
                "\"{name}\" was not found on PATH; install Envoy or give its full path in \
                 [envoy] binary"
            )
        })
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The agent config from DESIGN.md, with `insecure` switched on.
    const DESIGN_EXAMPLE: &str = r#"
node = "vm-b"                          # this host's name in the registry
address = "10.0.0.12"                  # where peers reach this host
discovery = ["10.0.0.2:15012"]         # one or more discovery replicas
token_file = "/etc/pilotfish/token"    # this host's join token (used once, to enrol)
ca_file = "/etc/pilotfish/root.pem"    # the mesh root, to verify discovery
insecure = true                        # must match discovery's; local experiments only
outbound = "127.0.0.1:15001"           # local apps send mesh traffic here (Host: reviews)
app_address = "127.0.0.1"              # where local apps listen
mesh_port = 15006
state_dir = "/var/lib/pilotfish/agent" # keys, certs, last accepted config
run_dir = "/run/pilotfish/agent"       # UDS sockets for Envoy
[envoy]
binary = "envoy"                       # found on PATH unless given
admin = "127.0.0.1:15000"
"#;

    /// A directory holding an executable named `envoy`, to stand in for PATH.
    /// A minimal insecure agent.toml (four lines), then `tail`; `bin` is the PATH.
    fn parse_tail(bin: &tempfile::TempDir, tail: &str) -> Result<AgentConfig, Vec<Problem>> {
        let text = format!(
            "node = \"a\"\naddress = \"127.0.0.2\"\ndiscovery = [\"127.0.0.1:1\"]\n\
             insecure = true\n{tail}"
        );
        parse(
            Path::new("agent.toml"),
            &text,
            Path::new("/etc/pilotfish"),
            Some(bin.path().as_os_str()),
        )
    }

    /// Each `(text, expected)`: exactly one problem, whose message starts with `expected`.
    fn assert_one_problem_each(
        parse: impl Fn(&str) -> Result<AgentConfig, Vec<Problem>>,
        cases: &[(&str, &str)],
    ) {
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.len(), 1, "{text}: {err:?}");
            let shown = err[0].to_string();
            assert!(shown.starts_with(expected), "{text}: {shown}");
        }
    }

    fn fake_path() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("envoy");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn problems(text: &str, path: &Path) -> Vec<Problem> {
        match parse(
            Path::new("agent.toml"),
            text,
            Path::new("/etc/pilotfish"),
            Some(path.as_os_str()),
        ) {
            Err(p) => p,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    fn ca_file_problems(config: &AgentConfig) -> Vec<Problem> {
        let mut problems = FileProblems::new("agent.toml", "");
        check_ca_file(config, &mut problems);
        problems.into_vec()
    }

    #[test]
    fn design_example_parses_with_defaults() {
        let bin = fake_path();
        let c = parse(
            Path::new("agent.toml"),
            DESIGN_EXAMPLE,
            Path::new("/etc/pilotfish"),
            Some(bin.path().as_os_str()),
        )
        .unwrap();
        assert_eq!(c.node, "vm-b");
        assert_eq!(c.address, "10.0.0.12".parse::<IpAddr>().unwrap());
        assert_eq!(c.discovery, vec!["10.0.0.2:15012".to_string()]);
        assert_eq!(c.mesh_port, 15006);
        assert!(c.insecure);
        assert_eq!(c.run_dir, PathBuf::from("/run/pilotfish/agent"));
        assert_eq!(
            c.xds_socket(),
            PathBuf::from("/run/pilotfish/agent/xds.sock")
        );
        assert_eq!(c.health, "127.0.0.1:15020".parse().unwrap());
        assert_eq!(c.envoy.binary, bin.path().join("envoy"));
        assert_eq!(c.envoy.admin, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.envoy.drain_time, Duration::from_secs(5));
        assert_eq!(c.envoy.log_level, "warning");
        assert_eq!(c.envoy.xds, XdsFlavor::Delta);
        assert_eq!(c.envoy.concurrency, None);
        assert_eq!(c.envoy.access_log, AccessLog::Stdout);
    }

    #[test]
    fn access_log_is_stdout_off_or_a_file_in_an_existing_directory() {
        let bin = fake_path();
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir(base.path().join("logs")).unwrap();
        let parse_with = |value: &str| {
            let text = format!(
                "node = \"a\"\naddress = \"127.0.0.2\"\ndiscovery = [\"127.0.0.1:1\"]\n\
                 insecure = true\n[envoy]\naccess_log = \"{value}\"\n"
            );
            parse(
                Path::new("agent.toml"),
                &text,
                base.path(),
                Some(bin.path().as_os_str()),
            )
        };
        assert_eq!(parse_with("off").unwrap().envoy.access_log, AccessLog::Off);
        assert_eq!(
            parse_with("stdout").unwrap().envoy.access_log,
            AccessLog::Stdout
        );
        let relative = parse_with("logs/access.log").unwrap();
        let expected = base.path().join("logs/access.log");
        assert_eq!(relative.envoy.access_log, AccessLog::File(expected.clone()));
        assert_eq!(
            relative.envoy.access_log.metadata(),
            expected.to_string_lossy()
        );
        let absolute = base.path().join("logs/a.log").display().to_string();
        assert_eq!(
            parse_with(&absolute).unwrap().envoy.access_log,
            AccessLog::File(absolute.into())
        );
        for bad in ["", "nowhere/access.log", "logs/"] {
            let err = parse_with(bad).unwrap_err();
            assert_eq!(err.len(), 1, "{bad}: {err:?}");
            let shown = err[0].to_string();
            assert!(
                shown.starts_with("agent.toml:6:14: envoy.access_log: "),
                "{bad}: {shown}"
            );
        }
    }

    #[test]
    fn tracing_is_off_unless_the_table_names_a_zipkin_collector() {
        let bin = fake_path();
        let parse_with = |tracing: &str| parse_tail(&bin, tracing);
        assert_eq!(parse_with("").unwrap().tracing, None);
        let on = parse_with("[tracing]\nzipkin = \"zipkin.internal:9411\"\n").unwrap();
        let on = on.tracing.unwrap();
        assert_eq!(on.zipkin, "zipkin.internal:9411");
        assert_eq!(on.sample_percent(), 100.0);
        for (value, hundredths) in [("0", 0), ("1", 100), ("0.25", 25), ("12.5", 1250)] {
            let text = format!("[tracing]\nzipkin = \"10.0.0.9:9411\"\nsample_percent = {value}\n");
            let t = parse_with(&text).unwrap().tracing.unwrap();
            assert_eq!(t.sample_hundredths, hundredths, "{value}");
        }

        // Each problem at its key, with what is wrong.
        let cases = [
            (
                "[tracing]\n",
                "agent.toml:5:1: tracing.zipkin: is required in [tracing]",
            ),
            (
                "[tracing]\nzipkin = \"zipkin\"\n",
                "agent.toml:6:10: tracing.zipkin: \"zipkin\" is not host:port",
            ),
            (
                "[tracing]\nzipkin = \"zipkin:0\"\n",
                "agent.toml:6:10: tracing.zipkin: \"zipkin:0\" has no valid port",
            ),
            (
                "[tracing]\nzipkin = \"z:9411\"\nsample_percent = 101\n",
                "agent.toml:7:18: tracing.sample_percent: 101 is not a percentage (0 to 100)",
            ),
            (
                "[tracing]\nzipkin = \"z:9411\"\nsample_percent = 0.001\n",
                "agent.toml:7:18: tracing.sample_percent: 0.001 has more than two decimals",
            ),
            (
                "[tracing]\nzipkin = \"z:9411\"\nsample_percent = \"5%\"\n",
                "agent.toml:7:18: tracing.sample_percent: invalid type: string",
            ),
            (
                "[tracing]\nzipkn = \"z:9411\"\n",
                "agent.toml:6:1: tracing.zipkn: unknown field `zipkn`",
            ),
        ];
        assert_one_problem_each(parse_with, &cases);
    }

    #[test]
    fn interception_is_off_unless_a_direction_is_on_and_problems_name_their_key() {
        let bin = fake_path();
        let parse_with = |table: &str| parse_tail(&bin, table);
        assert_eq!(parse_with("").unwrap().interception, None);
        assert_eq!(
            parse_with("[interception]\nexclude_ports = [22]\n")
                .unwrap()
                .interception,
            None
        );
        let on = parse_with(
            "[interception]\noutbound = true\nexclude_cidrs = [\"10.9.0.0/16\"]\n\
             exclude_ports = [22]\ninclude_cidrs = [\"240.240.0.0/16\", \"10.0.0.0/8\"]\n",
        )
        .unwrap()
        .interception
        .unwrap();
        assert!(on.outbound && !on.inbound);
        assert_eq!(on.listener().to_string(), "127.0.0.1:15002");
        assert_eq!(on.exclude_ports, [22]);
        assert_eq!(on.include_cidrs.len(), 2);

        let cases = [
            (
                "[interception]\noutbound = true\nport = 0\n",
                "agent.toml:7:8: interception.port: 0 is not a port",
            ),
            (
                "[interception]\noutbound = true\nexclude_cidrs = [\"10.0.0.1/8\"]\n",
                "agent.toml:7:18: interception.exclude_cidrs[0]: \"10.0.0.1/8\" has host bits set",
            ),
            (
                "[interception]\ninbound = true\nexclude_ports = [22, 70000]\n",
                "agent.toml:7:22: interception.exclude_ports[1]: 70000 is not a port",
            ),
            (
                "[interception]\noutbound = true\nport = 15020\n",
                "agent.toml:7:8: interception.port: uses the same address as health",
            ),
            (
                "[interception]\noutbund = true\n",
                "agent.toml:6:1: interception.outbund: unknown field `outbund`",
            ),
        ];
        assert_one_problem_each(parse_with, &cases);
    }

    #[test]
    fn dns_is_off_unless_enabled_and_every_key_is_checked() {
        let bin = fake_path();
        let parse_plain = |dns: &str| parse_tail(&bin, dns);
        // With outbound interception (which turns DNS on unless `enabled = false`).
        let parse_with =
            |dns: &str| parse_plain(&format!("{dns}\n[interception]\noutbound = true\n"));
        assert_eq!(parse_plain("").unwrap().dns, None);
        assert!(parse_with("").unwrap().dns.is_some());
        assert_eq!(parse_with("[dns]\nenabled = false\n").unwrap().dns, None);
        let alone = parse_plain("[dns]\nenabled = true\n").unwrap_err();
        assert!(
            alone[0]
                .to_string()
                .starts_with("agent.toml:6:11: dns.enabled: needs [interception] outbound = true"),
            "{alone:?}"
        );
        let listen: SocketAddr = "127.0.0.153:53".parse().unwrap();
        let on = parse_with(
            "[dns]\nenabled = true\nupstreams = [\"10.0.0.2\", \"10.0.0.3:5353\", \"2001:db8::53\", \
             \"[2001:db8::54]:53\"]\n",
        )
        .unwrap();
        assert_eq!(
            on.dns,
            Some(DnsConfig {
                listen,
                domain: "mesh".into(),
                bare_names: false,
                upstreams: [
                    "10.0.0.2:53",
                    "10.0.0.3:5353",
                    "[2001:db8::53]:53",
                    "[2001:db8::54]:53"
                ]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            })
        );
        let custom = parse_with(
            "[dns]\nenabled = true\nlisten = \"127.0.0.2:5353\"\ndomain = \"svc.corp-1\"\n\
             bare_names = true\nupstreams = []\n",
        )
        .unwrap()
        .dns
        .unwrap();
        assert_eq!(custom.listen, "127.0.0.2:5353".parse().unwrap());
        assert_eq!(custom.domain, "svc.corp-1");
        assert!(custom.bare_names);
        assert!(custom.upstreams.is_empty());
        // Not written: the host's resolv.conf, less the listen address.
        let default = parse_with("[dns]\nenabled = true\n").unwrap().dns.unwrap();
        assert_eq!(default.upstreams, crate::dns::system_upstreams(listen));
        assert!(!default.upstreams.contains(&listen));

        // Each problem at its key, with what is wrong; checked even with the server off.
        let cases = [
            (
                "[dns]\nlisten = \"127.0.0.153\"\n",
                "agent.toml:6:10: dns.listen: \"127.0.0.153\" is not an ip:port",
            ),
            (
                "[dns]\nlisten = \"127.0.0.153:0\"\n",
                "agent.toml:6:10: dns.listen: \"127.0.0.153:0\" has port 0",
            ),
            (
                "[dns]\ndomain = \"Mesh\"\n",
                "agent.toml:6:10: dns.domain: \"Mesh\" is not a DNS domain: only lowercase",
            ),
            (
                "[dns]\ndomain = \"mesh.\"\n",
                "agent.toml:6:10: dns.domain: \"mesh.\" is not a DNS domain: write it without a \
                 leading or trailing dot",
            ),
            (
                "[dns]\ndomain = \".mesh\"\n",
                "agent.toml:6:10: dns.domain: \".mesh\" is not a DNS domain: write it without",
            ),
            (
                "[dns]\ndomain = \"svc..mesh\"\n",
                "agent.toml:6:10: dns.domain: \"svc..mesh\" is not a DNS domain: two dots in a row",
            ),
            (
                "[dns]\ndomain = \"-mesh\"\n",
                "agent.toml:6:10: dns.domain: \"-mesh\" is not a DNS domain: a label starts or \
                 ends with '-'",
            ),
            (
                "[dns]\ndomain = \"svc_1\"\n",
                "agent.toml:6:10: dns.domain: \"svc_1\" is not a DNS domain: only lowercase",
            ),
            (
                "[dns]\ndomain = \"\"\n",
                "agent.toml:6:10: dns.domain: \"\" is not a DNS domain: it is empty",
            ),
            (
                "[dns]\nupstreams = [\"10.0.0.2\", \"10.0.0.300\"]\n",
                "agent.toml:6:26: dns.upstreams[1]: \"10.0.0.300\" is not an ip or ip:port",
            ),
            (
                "[dns]\nupstreams = [\"10.0.0.2:0\"]\n",
                "agent.toml:6:14: dns.upstreams[0]: \"10.0.0.2:0\" has port 0",
            ),
            (
                "[dns]\nupstreams = [\"127.0.0.153\"]\n",
                "agent.toml:6:14: dns.upstreams[0]: 127.0.0.153:53 is dns.listen itself: \
                 queries would loop back to it",
            ),
            (
                "[dns]\nenabled = true\nlisten = \"127.0.0.1:15020\"\nupstreams = []\n",
                "agent.toml:7:10: dns.listen: uses the same address as health",
            ),
            (
                "[dns]\nenabled = \"yes\"\n",
                "agent.toml:6:11: dns.enabled: invalid type: string",
            ),
            (
                "[dns]\nupstream = [\"10.0.0.2\"]\n",
                "agent.toml:6:1: dns.upstream: unknown field `upstream`",
            ),
        ];
        assert_one_problem_each(parse_with, &cases);
    }

    #[test]
    fn dns_enabled_follows_the_file_then_the_default() {
        assert!(!dns_enabled(None, false));
        assert!(dns_enabled(None, true));
        assert!(dns_enabled(Some(true), false));
        assert!(!dns_enabled(Some(false), true));
    }

    #[test]
    fn check_wants_nft_on_path_only_with_interception() {
        let bin = fake_path();
        let text = "node = \"a\"\naddress = \"127.0.0.2\"\ndiscovery = [\"127.0.0.1:1\"]\n\
                    insecure = true\n[interception]\noutbound = true\n";
        let file = Path::new("agent.toml");
        let path = Some(bin.path().as_os_str());
        let config = parse(file, text, Path::new("/etc/pilotfish"), path).unwrap();
        let problems = interception_problems(&config, file, path, &[]);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .to_string()
                .starts_with("agent.toml: interception: needs nft (Debian's nftables package"),
            "{problems:?}"
        );
        // In a fallback directory (a PATH without /usr/sbin), or on PATH.
        let sbin = tempfile::tempdir().unwrap();
        let in_sbin = sbin.path().join("nft");
        std::fs::copy(bin.path().join("envoy"), &in_sbin).unwrap();
        let fallback = [sbin.path().to_str().unwrap()];
        assert!(interception_problems(&config, file, path, &fallback).is_empty());
        let nft = bin.path().join("nft");
        std::fs::copy(bin.path().join("envoy"), &nft).unwrap();
        assert!(interception_problems(&config, file, path, &[]).is_empty());
        // Without interception nothing is needed.
        let off = parse(
            file,
            &text.replace("outbound = true", ""),
            Path::new("/"),
            path,
        )
        .unwrap();
        std::fs::remove_file(&nft).unwrap();
        assert!(interception_problems(&off, file, path, &[]).is_empty());
    }

    #[test]
    fn envoy_options_and_relative_paths() {
        let dir = fake_path();
        let text = r#"
node = "a"
address = "127.0.0.2"
discovery = ["localhost:15012", "[::1]:15012"]
insecure = true
state_dir = "state"
run_dir = "run"
token_file = "token"
health = "127.0.0.2:15020"
[envoy]
binary = "./bin/envoy"
admin = "127.0.0.2:15000"
concurrency = 2
drain_time = "1500ms"
log_level = "debug"
xds = "sotw"
"#;
        let base = dir.path().join("conf");
        std::fs::create_dir_all(base.join("bin")).unwrap();
        std::fs::rename(dir.path().join("envoy"), base.join("bin/envoy")).unwrap();
        let c = parse(Path::new("agent.toml"), text, &base, None).unwrap();
        assert_eq!(c.state_dir, base.join("state"));
        assert_eq!(c.run_dir, base.join("run"));
        assert_eq!(c.token_file, Some(base.join("token")));
        assert_eq!(c.envoy.binary, base.join("./bin/envoy"));
        assert_eq!(c.envoy.concurrency, Some(2));
        assert_eq!(c.envoy.drain_time, Duration::from_millis(1500));
        assert_eq!(c.envoy.xds, XdsFlavor::Sotw);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let bin = fake_path();
        let text = format!("{DESIGN_EXAMPLE}\nadmn = \"x\"\n");
        let err = parse(
            Path::new("agent.toml"),
            &text,
            Path::new("/"),
            Some(bin.path().as_os_str()),
        )
        .unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(
            (err[0].line, err[0].key_path.as_str()),
            (17, "envoy.admn"),
            "{err:?}"
        );
        assert!(err[0].message.contains("unknown field `admn`"), "{err:?}");

        let text = DESIGN_EXAMPLE.replace("node =", "nodes =");
        let err = parse(
            Path::new("agent.toml"),
            &text,
            Path::new("/"),
            Some(bin.path().as_os_str()),
        )
        .unwrap_err();
        assert!(
            err[0]
                .to_string()
                .starts_with("agent.toml:2:1: nodes: unknown field `nodes`"),
            "{err:?}"
        );
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let empty = tempfile::tempdir().unwrap();
        let text = r#"
address = "10.0.0.300"
discovery = ["nope", "10.0.0.2:0"]
outbound = "127.0.0.1"
mesh_port = 70000
[envoy]
drain_time = "5"
log_level = "loud"
xds = "rest"
concurrency = 0
"#;
        let p = problems(text, empty.path());
        let keys: Vec<&str> = p.iter().map(|p| p.key_path.as_str()).collect();
        for key in [
            "node",
            "address",
            "discovery[0]",
            "discovery[1]",
            "ca_file",
            "outbound",
            "mesh_port",
            "envoy.binary",
            "envoy.drain_time",
            "envoy.log_level",
            "envoy.xds",
            "envoy.concurrency",
        ] {
            assert!(keys.contains(&key), "missing {key} in {keys:?}");
        }
        let err = ConfigError::Invalid { problems: p };
        let shown = err.to_string();
        assert!(
            shown.contains("agent.toml:5:13: mesh_port: 70000 is not a port"),
            "{shown}"
        );
        assert!(
            shown.contains("agent.toml:7:14: envoy.drain_time: \"5\" is not a duration"),
            "{shown}"
        );
        // Not written in the file (the default was not found): placed at its table.
        assert!(
            shown.contains("agent.toml:6:1: envoy.binary: \"envoy\" was not found on PATH"),
            "{shown}"
        );
        assert!(shown.contains("agent.toml: node: is required"), "{shown}");
    }

    #[test]
    fn secure_mode_needs_ca_file_and_takes_a_trust_domain() {
        let bin = fake_path();
        let text = DESIGN_EXAMPLE.replace("insecure = true", "");
        let c = parse(
            Path::new("agent.toml"),
            &text,
            Path::new("/etc/pilotfish"),
            Some(bin.path().as_os_str()),
        )
        .unwrap();
        assert!(!c.insecure);
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/pilotfish/root.pem")));
        assert_eq!(c.trust_domain.as_str(), "pilotfish.local");
        assert_eq!(
            c.sds_socket(),
            PathBuf::from("/run/pilotfish/agent/sds.sock")
        );

        let text = format!("trust_domain = \"corp.example\"\n{text}");
        let c = parse(
            Path::new("agent.toml"),
            &text,
            Path::new("/"),
            Some(bin.path().as_os_str()),
        )
        .unwrap();
        assert_eq!(c.trust_domain.as_str(), "corp.example");

        let text = DESIGN_EXAMPLE
            .replace("insecure = true", "trust_domain = \"Not A Domain\"")
            .replace("ca_file =", "# ca_file =");
        let p = problems(&text, bin.path());
        let keys: Vec<&str> = p.iter().map(|p| p.key_path.as_str()).collect();
        assert_eq!(keys, ["ca_file", "trust_domain"], "{p:?}");
    }

    #[test]
    fn default_directories_are_the_units_own() {
        // systemd creates these for the unit (StateDirectory=pilotfish/agent,
        // RuntimeDirectory=pilotfish/agent), apart from discovery's on the same host.
        let bin = fake_path();
        let text = DESIGN_EXAMPLE
            .lines()
            .filter(|l| !l.starts_with("state_dir") && !l.starts_with("run_dir"))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(
            Path::new("agent.toml"),
            &text,
            Path::new("/etc/pilotfish"),
            Some(bin.path().as_os_str()),
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/pilotfish/agent"));
        assert_eq!(c.run_dir, PathBuf::from("/run/pilotfish/agent"));
    }

    #[test]
    fn check_reads_ca_file_and_wants_a_token_or_a_node_certificate() {
        let bin = fake_path();
        let dir = tempfile::tempdir().unwrap();
        let text = DESIGN_EXAMPLE
            .replace("insecure = true", "")
            .replace("/etc/pilotfish/", "")
            .replace("/var/lib/pilotfish/agent", "state");
        let c = parse(
            Path::new("agent.toml"),
            &text,
            dir.path(),
            Some(bin.path().as_os_str()),
        )
        .unwrap();
        let p = ca_file_problems(&c);
        assert!(p[0].message.contains("cannot read"), "{p:?}");
        std::fs::write(dir.path().join("root.pem"), "not pem").unwrap();
        assert!(ca_file_problems(&c)[0]
            .message
            .contains("no PEM certificate"));
        let ca_dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("pilotfish.local").unwrap();
        let ca =
            pilotfish_pki::Ca::load_or_create(ca_dir.path(), &td, &Default::default()).unwrap();
        std::fs::write(dir.path().join("root.pem"), ca.bundle_pem()).unwrap();
        assert!(ca_file_problems(&c).is_empty());

        let p = check_enrolment(&c, Path::new("agent.toml"));
        assert_eq!(p[0].key_path, "token_file");
        assert!(p[0].message.contains("does not exist"), "{p:?}");
        std::fs::write(dir.path().join("token"), "pft1.x.y").unwrap();
        assert!(check_enrolment(&c, Path::new("agent.toml")).is_empty());

        // A stored node certificate is enough without the token.
        std::fs::remove_file(dir.path().join("token")).unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let key = pilotfish_pki::LocalKey::generate().unwrap();
        let id = pilotfish_pki::SpiffeId::node(&td, "vm-b").unwrap();
        let issued = ca
            .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
            .unwrap();
        crate::identity::store::Store::new(&dir.path().join("state"))
            .save_node(&key, &issued.cert_pem)
            .unwrap();
        assert!(check_enrolment(&c, Path::new("agent.toml")).is_empty());
    }

    #[test]
    fn clashing_addresses_are_reported() {
        let bin = fake_path();
        let text = format!("health = \"127.0.0.1:15000\"\n{DESIGN_EXAMPLE}");
        let p = problems(&text, bin.path());
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key_path, "envoy.admin");
    }
}
