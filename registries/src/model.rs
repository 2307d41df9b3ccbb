//! The mesh model operators declare: services with their instances, and the traffic rules
//! (routes and policies) that shape calls to them.
//!
//! Authorizations (`[[authorization.<svc>.rules]]`) say which peers may call a service; they
//! come from TOML only.
//!
//! Every registry adapter (TOML files, Consul, memory) produces a whole [`Catalog`]; discovery
//! turns one into Envoy configuration. Collections are `BTreeMap`s so that iteration, and hence
//! every resource derived from a catalog, is deterministic.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Labels attached to an instance (`version = "v1"`), and the selectors of subsets.
pub type Labels = BTreeMap<String, String>;

/// The mesh port a host's Envoy listens on for traffic from peers, unless configured otherwise.
pub const DEFAULT_MESH_PORT: u16 = 15006;

/// Everything the registries know, merged: services, routes and policies by service name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub services: BTreeMap<String, Service>,
    pub routes: BTreeMap<String, Route>,
    pub policies: BTreeMap<String, Policy>,
    /// Who may call a service, by service name (TOML only).
    pub authorizations: BTreeMap<String, Authorization>,
    /// Ingress gateways: hosts whose Envoy is the mesh's entry point, by gateway name.
    pub gateways: BTreeMap<String, Gateway>,
}

impl Catalog {
    /// Services whose instances are placed on `node` (fronted by that host's agent).
    pub fn services_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Service> + 'a {
        self.services
            .values()
            .filter(move |s| s.instances.iter().any(|i| i.node.as_deref() == Some(node)))
    }

    /// The subsets declared for `service` (empty when it has no policy).
    pub fn subsets(&self, service: &str) -> Option<&BTreeMap<String, Labels>> {
        self.policies.get(service).map(|p| &p.subsets)
    }
}

/// Where a declaration came from, so that errors found later can name it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }

    /// HTTP/2 between proxies and to the app (h2 and gRPC services).
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http" => Ok(Protocol::Http),
            "http2" => Ok(Protocol::Http2),
            "grpc" => Ok(Protocol::Grpc),
            "tcp" => Ok(Protocol::Tcp),
            other => Err(format!(
                "unknown protocol \"{other}\" (expected http, http2, grpc or tcp)"
            )),
        }
    }
}

/// A named service: the port clients address it by, and where its instances run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    /// The port clients address the service by (`Host: reviews:9080`).
    pub port: u16,
    /// Services this one calls. `None` means every service (no scoping).
    pub upstreams: Option<Vec<String>>,
    pub instances: Vec<Instance>,
    /// Whether the service's mesh port also accepts plaintext (when discovery runs with mTLS).
    pub mtls: MtlsMode,
    /// What makes its mesh instances healthy: their host's agent being connected, or nothing.
    pub health: HealthMode,
    pub origin: Origin,
}

/// Where the health of a service's mesh instances (those with a `node`) comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HealthMode {
    /// Healthy while the host's agent is connected to discovery, and for `node_grace` after it
    /// disconnects (plus Consul's own checks for Consul instances).
    #[default]
    Agent,
    /// As declared: for instances reached without a Pilotfish agent.
    Static,
}

impl HealthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthMode::Agent => "agent",
            HealthMode::Static => "static",
        }
    }
}

impl std::str::FromStr for HealthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(HealthMode::Agent),
            "static" => Ok(HealthMode::Static),
            other => Err(format!(
                "unknown health mode \"{other}\" (expected agent or static)"
            )),
        }
    }
}

/// What a host's mesh port accepts for a service, when the mesh runs with mTLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MtlsMode {
    /// mTLS only: a plaintext connection is closed.
    #[default]
    Strict,
    /// mTLS, and plaintext too (routed by Host), for moving a service into the mesh.
    Permissive,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
    }
}

impl std::str::FromStr for MtlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(MtlsMode::Strict),
            "permissive" => Ok(MtlsMode::Permissive),
            other => Err(format!(
                "unknown mtls mode \"{other}\" (expected strict or permissive)"
            )),
        }
    }
}

/// One running copy of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The host whose Pilotfish agent fronts this instance; `None` = not in the mesh, reached
    /// directly at `address:port`.
    pub node: Option<String>,
    /// The host's address (an IP address; a DNS name for external services).
    pub address: String,
    /// The app's port on that host.
    pub port: u16,
    /// The host's mesh (inbound) port, used when `node` is set.
    pub mesh_port: u16,
    pub labels: Labels,
    /// Relative load-balancing weight (1 when not declared).
    pub weight: u32,
    pub healthy: bool,
    /// Its host is leaving the mesh (the agent is stopping): callers finish what they sent
    /// and send nothing new (EDS `DRAINING`). Set by discovery's liveness stage, never read
    /// from a registry.
    pub draining: bool,
    /// Where it runs (a datacenter or zone), when known.
    pub locality: Option<String>,
}

impl Instance {
    /// The address and port a peer proxy sends traffic to for this instance.
    pub fn target(&self) -> (&str, u16) {
        if self.node.is_some() {
            (&self.address, self.mesh_port)
        } else {
            (&self.address, self.port)
        }
    }

    /// Whether the instance carries every label of `selector`.
    pub fn matches(&self, selector: &Labels) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// How calls to a service are routed: rules tried in order, first match wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub rules: Vec<RouteRule>,
    pub origin: Origin,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry-on conditions (`5xx`, `connect-failure`, `reset`, ...).
    pub on: Vec<String>,
    /// Exponential backoff between attempts: (base, max); Envoy's default (25ms, 250ms) if unset.
    pub backoff: Option<(Duration, Option<Duration>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRule {
    pub matches: RouteMatch,
    /// Where matching requests go; weights are relative. Empty with a `redirect`.
    pub to: Vec<Destination>,
    /// What else happens to matching requests (retries, faults, mirroring, ...).
    pub actions: RuleActions,
    pub origin: Origin,
}

/// Per-rule behaviour beyond choosing a destination. Unset fields fall back to the route's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleActions {
    /// Overrides the route-level `retries`.
    pub retries: Option<Retries>,
    /// Overrides the route-level `timeout`.
    pub timeout: Option<Duration>,
    pub fault: Option<Fault>,
    pub mirror: Option<Mirror>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    /// Answer with a redirect instead of routing (`to` is then empty).
    pub redirect: Option<Redirect>,
}

/// Fault injection (Envoy's fault filter): a delay and/or an abort, each for a share of requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fault {
    /// (fixed delay, percent of requests).
    pub delay: Option<(Duration, u32)>,
    /// (HTTP status, percent of requests).
    pub abort: Option<(u32, u32)>,
}

/// Copies of matching requests sent to another service (or a subset of it); answers ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub service: String,
    pub subset: Option<String>,
    /// Percent of requests copied (0-100).
    pub percent: u32,
}

/// Headers added (replacing any value already there) and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Replaces the matched path prefix (or the whole path for `path_exact`/`path_regex`).
    pub prefix: Option<String>,
    /// Replaces the Host/authority header.
    pub host: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redirect {
    pub path: Option<String>,
    pub host: Option<String>,
    /// 301, 302, 307 or 308 (301 when unset).
    pub status: u32,
    /// Redirect to https.
    pub https: bool,
}

/// Conditions a request must meet; an empty match matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Exact header values, by lower-case header name (`headers = { name = "v" }`).
    pub headers: BTreeMap<String, String>,
    /// The richer header conditions (`headers = { name = { prefix = "a" } }`), by lower-case name.
    pub header_conditions: BTreeMap<String, StringCondition>,
    /// Query parameters, by name.
    pub query: BTreeMap<String, StringCondition>,
    pub path_prefix: Option<String>,
    pub path_exact: Option<String>,
    /// An RE2 regex the whole path must match.
    pub path_regex: Option<String>,
    pub method: Option<String>,
}

impl RouteMatch {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.header_conditions.is_empty()
            && self.query.is_empty()
            && self.path_prefix.is_none()
            && self.path_exact.is_none()
            && self.path_regex.is_none()
            && self.method.is_none()
    }
}

/// A condition on a header or query parameter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringCondition {
    Exact(String),
    Prefix(String),
    /// RE2 syntax; the whole value must match.
    Regex(String),
    /// `true`: present with any value; `false`: absent.
    Present(bool),
}

/// A traffic target: a subset of the routed service (or all of it), with a relative weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// `None` = every instance of the service.
    pub subset: Option<String>,
    pub weight: u32,
}

/// How connections to a service behave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub service: String,
    /// Named subsets of instances, by label selector.
    pub subsets: BTreeMap<String, Labels>,
    pub load_balancer: LoadBalancer,
    pub connect_timeout: Option<Duration>,
    /// What ring_hash/maglev hash on (set on the routes to the service).
    pub hash: Option<HashOn>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub health_check: Option<HealthCheck>,
    /// How long an upstream connection may stay idle before Envoy closes it.
    pub idle_timeout: Option<Duration>,
    pub rate_limit: Option<RateLimit>,
    /// Localities (`Instance::locality`) in failover order: the first one with healthy
    /// instances takes the traffic; instances elsewhere come last.
    pub failover: Vec<String>,
    pub origin: Origin,
}

/// The request property ring_hash and maglev hash on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(String),
    /// A cookie; with a ttl, Envoy sets it when the request has none.
    Cookie {
        name: String,
        ttl: Option<Duration>,
    },
    SourceIp,
}

/// Circuit-breaker thresholds (Envoy's default priority); unset = Envoy's default (1024).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
}

/// Active health checks by the callers' Envoys: HTTP GET `path` (HTTP services), or a TCP
/// connect when `path` is unset or the service is TCP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// Local rate limit: `requests` per `per`, enforced by each calling host's Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

/// An ingress gateway: `node`'s Envoy listens on `listen` and routes outside requests into
/// the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub name: String,
    pub node: String,
    pub listen: std::net::SocketAddr,
    pub routes: Vec<GatewayRoute>,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRoute {
    /// The Host this route answers (`*` = any).
    pub host: String,
    pub path_prefix: String,
    pub service: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

impl std::str::FromStr for LoadBalancer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" => Ok(LoadBalancer::RoundRobin),
            "least_request" => Ok(LoadBalancer::LeastRequest),
            "random" => Ok(LoadBalancer::Random),
            "ring_hash" => Ok(LoadBalancer::RingHash),
            "maglev" => Ok(LoadBalancer::Maglev),
            other => Err(format!(
                "unknown load_balancer \"{other}\" (expected round_robin, least_request, random, ring_hash or maglev)"
            )),
        }
    }
}

/// Who may call a service: rules checked on the inbound side of the service's hosts.
///
/// Deny rules are checked first: a request that matches one is refused. Then, when there is
/// at least one allow rule, a request must match one of them; otherwise it is refused (403 for
/// HTTP, the connection closed for TCP). With only deny rules, everything else is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorization {
    pub service: String,
    pub rules: Vec<AuthzRule>,
    pub origin: Origin,
}

/// One rule: a request matches when it matches every condition given; an omitted condition
/// (an empty list) matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthzRule {
    pub action: AuthzAction,
    /// Source services, by name: the caller's certificate must carry the SPIFFE identity of
    /// one of them. Empty = any authenticated peer (for `allow`), any peer (for `deny`).
    pub from: Vec<String>,
    /// HTTP methods, upper case (HTTP services only).
    pub methods: Vec<String>,
    /// Request paths (HTTP services only).
    pub paths: Vec<PathMatch>,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
}

impl std::str::FromStr for AuthzAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(AuthzAction::Allow),
            "deny" => Ok(AuthzAction::Deny),
            other => Err(format!(
                "unknown action \"{other}\" (expected allow or deny)"
            )),
        }
    }
}

/// A request path condition: `"/x/*"` in TOML is a prefix (`/x/`), anything else exact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}
