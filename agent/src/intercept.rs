//! Transparent interception (`[interception]`): the host's apps reach the mesh without being
//! changed, through one nftables table of the agent's own, `ip pilotfish`.
//!
//! # The table
//!
//! - `output` (nat, outbound = true): local TCP connections are redirected to the proxy's
//!   `intercept` listener on `127.0.0.1:<port>`, whose `original_dst` filter restores the
//!   address the app dialled (a service's VIP, or anything else, which is passed through).
//!   Never redirected: the agent's own uid (Envoy runs as it too, so its upstream connections
//!   do not loop), loopback destinations (Envoy's admin, the mesh DNS, local databases),
//!   `exclude_cidrs`, `exclude_ports`, and, when `include_cidrs` is set, everything outside it.
//! - `prerouting` (nat, inbound = true): connections from other hosts to this host's address
//!   on a port of one of its mesh services (its `inbound|<svc>` clusters) are sent to the mesh port,
//!   so a service cannot be reached around the mesh (with mTLS, plaintext then finds no filter
//!   chain and is closed). `exclude_ports` apply here too.
//!
//! The table is always written whole, in one `nft -f` transaction that declares it, deletes
//! it and adds it again: an old table is replaced atomically, never merged, and a host never
//! has two. On start the agent repairs whatever a crashed predecessor left: it writes the
//! table from the last config Envoy accepted (`xds-cache.bin`) when that has the `intercept`
//! listener, and deletes it otherwise (until Envoy accepts the listener, redirecting would
//! refuse connections). On stop, once Envoy is gone, the table is deleted. A crash of the agent
//! alone leaves it: Envoy keeps serving (`KillMode=process`) and the next agent adopts both.
//!
//! The `intercept` listener's filter chains (`intercept|<svc>` matching the service's VIP, see
//! discovery's `translate/intercept.rs`) say which VIPs mesh DNS answers with:
//! [`Interceptor::names`]. The inbound ports are those of the `inbound|<svc>` clusters Envoy
//! accepted (the local apps). Both come from the xDS cache, so they always match what Envoy
//! runs, also when the host boots from the cache.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::status::AgentStatus;
use crate::xds::cache::{CachedResource, XdsCache, CLUSTER, LISTENER};
use crate::xds::store::SharedCache;

/// The nftables table (family `ip`) the agent owns.
pub const TABLE: &str = "pilotfish";
/// The `intercept` listener's port on 127.0.0.1.
pub const DEFAULT_PORT: u16 = 15002;
/// The listener discovery builds for intercepting proxies, and its metadata key.
const LISTENER_NAME: &str = "intercept";
/// Its filter chains, one per service: `intercept|<svc>`.
const CHAIN_PREFIX: &str = "intercept|";
/// The protocol number of the routes the agent adds (`ip route ... proto 241`), so it finds and
/// removes its own and nobody else's.
const ROUTE_PROTO: &str = "241";
/// The clusters of this node's own services: their endpoints are the local apps' ports.
const INBOUND_PREFIX: &str = "inbound|";

/// Service name -> virtual IP, as mesh DNS answers.
pub type Names = BTreeMap<String, Ipv4Addr>;

/// An IPv4 range, `a.b.c.d/len` (a bare address is a /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, len)) => (
                ip,
                len.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("\"{s}\": prefix length must be 0 to 32"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("\"{s}\" is not an IPv4 address or range (a.b.c.d/len)"))?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if u32::from(addr) & !mask != 0 {
            return Err(format!(
                "\"{s}\" has host bits set; the range is {}/{prefix}",
                Ipv4Addr::from(u32::from(addr) & mask)
            ));
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `[interception]`, validated. Present when `outbound` or `inbound` is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptionConfig {
    pub outbound: bool,
    pub inbound: bool,
    /// The `intercept` listener binds `127.0.0.1:port`.
    pub port: u16,
    /// Empty: every destination (except the exclusions).
    pub include_cidrs: Vec<Ipv4Net>,
    pub exclude_cidrs: Vec<Ipv4Net>,
    pub exclude_ports: Vec<u16>,
}

impl InterceptionConfig {
    /// Where the `intercept` listener binds (the `pilotfish.intercept` metadata).
    pub fn listener(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
    }
}

/// What discovery told this proxy, from the config Envoy accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    pub vips: Names,
    /// The ports of this node's mesh services, sorted.
    pub inbound_ports: Vec<u16>,
}

impl Learned {
    /// What the cache holds: the VIPs from the `intercept` listener's chains, the inbound
    /// ports from the `inbound|<svc>` clusters (STATIC, at the local apps' ports). `None` until
    /// Envoy has accepted an `intercept` listener.
    pub fn from_cache(cache: &XdsCache) -> Option<Learned> {
        Learned::decode(&Sources::of(cache))
    }

    fn decode(sources: &Sources) -> Option<Learned> {
        let vips = vips_of(&sources.listener.as_ref()?.resource.value)?;
        let mut inbound_ports: Vec<u16> = sources
            .inbound
            .iter()
            .flat_map(|c| ports_of(&c.resource.value))
            .collect();
        inbound_ports.sort_unstable();
        inbound_ports.dedup();
        Some(Learned {
            vips,
            inbound_ports,
        })
    }
}

/// What [`Learned`] is decoded from: the `intercept` listener and the `inbound|<svc>` clusters
/// as Envoy accepted them.
struct Sources {
    listener: Option<CachedResource>,
    inbound: Vec<CachedResource>,
}

impl Sources {
    fn of(cache: &XdsCache) -> Sources {
        Sources {
            listener: cache
                .resources(LISTENER)
                .and_then(|l| l.get(LISTENER_NAME))
                .cloned(),
            inbound: inbound_clusters(cache).map(|(_, c)| c.clone()).collect(),
        }
    }

    /// Their names and versions: cheap to compare on every change of the cache (most are
    /// endpoint updates, which leave them alone), so they are decoded only when they changed.
    fn versions(cache: &XdsCache) -> Vec<(String, String)> {
        let listener = cache
            .resources(LISTENER)
            .and_then(|l| l.get(LISTENER_NAME))
            .map(|c| (LISTENER_NAME.to_string(), c.version.clone()));
        listener
            .into_iter()
            .chain(inbound_clusters(cache).map(|(n, c)| (n.clone(), c.version.clone())))
            .collect()
    }
}

fn inbound_clusters(cache: &XdsCache) -> impl Iterator<Item = (&String, &CachedResource)> {
    cache
        .resources(CLUSTER)
        .into_iter()
        .flat_map(|clusters| clusters.range(INBOUND_PREFIX.to_string()..))
        .take_while(|(name, _)| name.starts_with(INBOUND_PREFIX))
}

/// The VIPs of the `intercept` listener: each chain `intercept|<svc>` matches its service's VIP
/// (one /32 prefix range). `None` when the bytes are not a listener.
fn vips_of(listener: &[u8]) -> Option<Names> {
    let listener = Listener::decode(listener).ok()?;
    Some(
        listener
            .filter_chains
            .iter()
            .filter_map(|chain| {
                let service = chain.name.strip_prefix(CHAIN_PREFIX)?;
                let range = match chain.filter_chain_match.as_ref()?.prefix_ranges.as_slice() {
                    [one] => one,
                    _ => return None,
                };
                if range.prefix_len.as_ref().map(|l| l.value) != Some(32) {
                    return None;
                }
                Some((service.to_string(), range.address_prefix.parse().ok()?))
            })
            .collect(),
    )
}

/// The ports of a cluster's inline endpoints (an `inbound|<svc>` cluster: the local apps).
fn ports_of(cluster: &[u8]) -> Vec<u16> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
    let Ok(cluster) = Cluster::decode(cluster) else {
        return Vec::new();
    };
    cluster
        .load_assignment
        .into_iter()
        .flat_map(|la| la.endpoints)
        .flat_map(|locality| locality.lb_endpoints)
        .filter_map(|lb| match lb.host_identifier? {
            lb_endpoint::HostIdentifier::Endpoint(e) => match e.address?.address? {
                address::Address::SocketAddress(s) => match s.port_specifier? {
                    PortSpecifier::PortValue(p) => u16::try_from(p).ok().filter(|p| *p != 0),
                    PortSpecifier::NamedPort(_) => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Who and where this host is, as the rules need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// The agent's (and Envoy's) uid: never captured.
    pub uid: u32,
    /// Where peers reach this host; the mesh listener binds `address:mesh_port`.
    pub address: IpAddr,
    pub mesh_port: u16,
}

/// The whole table as one `nft -f` script (see the module comment).
pub fn ruleset(config: &InterceptionConfig, host: &Host, learned: &Learned) -> String {
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    let set = |items: Vec<String>| format!("{{ {} }}", items.join(", "));
    let excluded_ports = (!config.exclude_ports.is_empty())
        .then(|| set(config.exclude_ports.iter().map(u16::to_string).collect()));
    if config.outbound {
        s.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n");
        s.push_str("    meta l4proto != tcp return\n");
        s.push_str(&format!("    meta skuid {} return\n", host.uid));
        s.push_str("    ip daddr 127.0.0.0/8 return\n");
        if !config.exclude_cidrs.is_empty() {
            let cidrs = config
                .exclude_cidrs
                .iter()
                .map(Ipv4Net::to_string)
                .collect();
            s.push_str(&format!("    ip daddr {} return\n", set(cidrs)));
        }
        if let Some(ports) = &excluded_ports {
            s.push_str(&format!("    tcp dport {ports} return\n"));
        }
        if !config.include_cidrs.is_empty() {
            let cidrs = config
                .include_cidrs
                .iter()
                .map(Ipv4Net::to_string)
                .collect();
            s.push_str(&format!("    ip daddr != {} return\n", set(cidrs)));
        }
        s.push_str(&format!(
            "    meta l4proto tcp redirect to :{}\n  }}\n",
            config.port
        ));
    }
    if let (true, IpAddr::V4(address)) = (config.inbound, host.address) {
        let ports: Vec<String> = learned
            .inbound_ports
            .iter()
            .filter(|p| !config.exclude_ports.contains(p) && **p != host.mesh_port)
            .map(u16::to_string)
            .collect();
        s.push_str(
            "  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n",
        );
        if !ports.is_empty() {
            s.push_str(&format!(
                "    ip daddr {address} tcp dport {} dnat to {address}:{}\n",
                set(ports),
                host.mesh_port
            ));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// Deletes the table if it exists (declaring it first makes the delete succeed either way).
pub fn removal() -> String {
    format!("table ip {TABLE}\ndelete table ip {TABLE}\n")
}

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(
        "cannot run nft (interception needs Debian's nftables package and CAP_NET_ADMIN): {0}"
    )]
    Spawn(std::io::Error),
    #[error("nft refused the pilotfish table: {0}")]
    Refused(String),
    #[error("cannot tell this process's uid from /proc/self: {0}")]
    Uid(std::io::Error),
}

/// Where Debian installs `nft` and `ip`, for a `PATH` without the sbin directories (a
/// non-root user's).
pub const SBIN: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/bin"];

/// `name` on `path_env`, else in one of `fallback`; `None` when it is nowhere.
pub fn find_tool(
    name: &str,
    path_env: Option<&std::ffi::OsStr>,
    fallback: &[&str],
) -> Option<std::path::PathBuf> {
    let on_path = path_env
        .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(fallback.iter().map(std::path::PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| crate::config::is_executable(p))
}

/// `name` as [`find_tool`] finds it on this process's `PATH`, or the bare name (then the spawn
/// error says it is missing).
fn tool(name: &str) -> std::path::PathBuf {
    find_tool(name, std::env::var_os("PATH").as_deref(), &SBIN).unwrap_or_else(|| name.into())
}

/// Runs one `nft -f -` transaction.
pub async fn nft(script: &str) -> Result<(), InterceptError> {
    let mut child = tokio::process::Command::new(tool("nft"))
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(InterceptError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(InterceptError::Spawn)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(InterceptError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Runs `ip ARGS`; its stdout, or an error with its stderr.
async fn ip(args: &[&str]) -> Result<String, InterceptError> {
    let out = tokio::process::Command::new(tool("ip"))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(InterceptError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(InterceptError::Refused(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The smallest range that holds every address of `vips` (`None` when there are none).
pub fn covering(vips: impl IntoIterator<Item = Ipv4Addr>) -> Option<Ipv4Net> {
    let (lo, hi) = vips
        .into_iter()
        .map(u32::from)
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((v.min(lo), v.max(hi))),
        })?;
    let prefix = (lo ^ hi).leading_zeros() as u8;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Some(Ipv4Net {
        addr: Ipv4Addr::from(lo & mask),
        prefix,
    })
}

/// A connection to a VIP needs a route before nftables can redirect it. A host whose routes do
/// not cover the VIPs (no default route) gets a `local` route for them, tagged [`ROUTE_PROTO`];
/// a host that has one is left as it is.
async fn ensure_route(vips: &Names) -> Result<(), InterceptError> {
    let Some(first) = vips.values().next() else {
        return Ok(());
    };
    if ip(&["-4", "route", "get", &first.to_string()])
        .await
        .is_ok()
    {
        return Ok(());
    }
    let Some(range) = covering(vips.values().copied()) else {
        return Ok(());
    };
    let range = range.to_string();
    ip(&[
        "-4",
        "route",
        "replace",
        "local",
        &range,
        "dev",
        "lo",
        "table",
        "local",
        "proto",
        ROUTE_PROTO,
    ])
    .await?;
    info!(%range, "no route covered the VIPs: added a local one");
    Ok(())
}

/// Removes the routes [`ensure_route`] added (none: nothing happens).
async fn remove_routes() -> Result<(), InterceptError> {
    ip(&[
        "-4",
        "route",
        "flush",
        "table",
        "local",
        "proto",
        ROUTE_PROTO,
    ])
    .await
    .map(drop)
}

/// The uid this process runs as (the owner of `/proc/self`), without `unsafe`.
pub fn own_uid() -> Result<u32, InterceptError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(InterceptError::Uid)
}

/// Keeps the table in line with the config and what Envoy accepted, and publishes the VIPs.
#[derive(Debug)]
pub struct Interceptor {
    config: Option<InterceptionConfig>,
    host: Host,
    cache: SharedCache,
    names: watch::Sender<Arc<Names>>,
    /// What the table was last written from; `None`: no table.
    applied: Option<Learned>,
    status: Arc<AgentStatus>,
}

impl Interceptor {
    /// Repairs the host's table (see the module comment): written from the cached listener,
    /// or deleted. `config = None` (interception off) deletes any table a former
    /// configuration left. An error here means nft cannot run or refused the table.
    pub async fn start(
        config: Option<InterceptionConfig>,
        host: Host,
        cache: SharedCache,
        status: Arc<AgentStatus>,
    ) -> Result<Interceptor, InterceptError> {
        let mut me = Interceptor {
            config,
            host,
            cache,
            names: watch::channel(Arc::new(Names::new())).0,
            applied: None,
            status,
        };
        me.status.set_interception_wanted(me.config.is_some());
        match (me.config.is_some(), me.learned()) {
            (true, Some(learned)) => me.apply(learned).await?,
            (true, None) => {
                nft(&removal()).await?;
                let _ = remove_routes().await;
            }
            // Off: a table left by a configuration that had it on would now redirect to a
            // listener Envoy no longer has. Without nft or CAP_NET_ADMIN there is none to
            // remove, so failing is fine.
            (false, _) => {
                match nft(&removal()).await {
                    Ok(()) => debug!(table = TABLE, "interception off; no table left"),
                    Err(e) => debug!(error = %e, "interception off; no table removed"),
                }
                let _ = remove_routes().await;
            }
        }
        Ok(me)
    }

    /// The VIPs of the services this proxy may call, as the last accepted config says.
    pub fn names(&self) -> watch::Receiver<Arc<Names>> {
        self.names.subscribe()
    }

    /// Copied out under the cache's lock, decoded outside it.
    fn learned(&self) -> Option<Learned> {
        Learned::decode(&self.cache.read(Sources::of))
    }

    async fn apply(&mut self, learned: Learned) -> Result<(), InterceptError> {
        let Some(config) = &self.config else {
            return Ok(());
        };
        if self.applied.as_ref().map(|a| &a.inbound_ports) != Some(&learned.inbound_ports) {
            if let Err(e) = nft(&ruleset(config, &self.host, &learned)).await {
                self.status.interception_failed();
                return Err(e);
            }
            self.status.set_interception_installed(true);
            info!(
                table = TABLE,
                outbound = config.outbound,
                inbound = config.inbound,
                inbound_ports = ?learned.inbound_ports,
                "interception rules installed"
            );
        }
        if self.names.borrow().as_ref() != &learned.vips {
            if config.outbound {
                if let Err(e) = ensure_route(&learned.vips).await {
                    self.status.interception_failed();
                    warn!(error = %e, "cannot add a route for the VIPs");
                }
            }
            self.status.set_mesh_names(learned.vips.len());
            self.names.send_replace(Arc::new(learned.vips.clone()));
        }
        self.applied = Some(learned);
        Ok(())
    }

    /// Follows what Envoy accepts until `shutdown`; then deletes the table (call it once Envoy
    /// is gone). A failed update is logged and retried on the next change.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut changes = self.cache.changes();
        // What the last successful pass read; a failed one is tried again on the next change.
        let mut seen = None;
        loop {
            let versions = self.cache.read(Sources::versions);
            if seen.as_ref() != Some(&versions) {
                let applied = match self.learned() {
                    Some(learned) if self.applied.as_ref() != Some(&learned) => {
                        self.apply(learned).await
                    }
                    _ => Ok(()),
                };
                match applied {
                    Ok(()) => seen = Some(versions),
                    Err(e) => warn!(error = %e, "cannot update the interception rules"),
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
        if self.config.is_some() {
            if let Err(e) = remove_routes().await {
                warn!(error = %e, "cannot remove the VIPs' route");
            }
            match nft(&removal()).await {
                Ok(()) => {
                    self.status.set_interception_installed(false);
                    info!(table = TABLE, "interception rules removed");
                }
                Err(e) => {
                    self.status.interception_failed();
                    warn!(error = %e, "cannot remove the interception rules");
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> InterceptionConfig {
        InterceptionConfig {
            outbound: true,
            inbound: false,
            port: DEFAULT_PORT,
            include_cidrs: Vec::new(),
            exclude_cidrs: Vec::new(),
            exclude_ports: Vec::new(),
        }
    }

    const HOST: Host = Host {
        uid: 998,
        address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12)),
        mesh_port: 15006,
    };

    #[test]
    fn ranges_parse_and_name_what_is_wrong() {
        assert_eq!(
            "10.0.0.0/8".parse::<Ipv4Net>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "192.0.2.7".parse::<Ipv4Net>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        for (bad, says) in [
            ("10.0.0.1/8", "host bits set; the range is 10.0.0.0/8"),
            ("10.0.0.0/33", "prefix length must be 0 to 32"),
            ("fd00::/8", "not an IPv4 address"),
            ("ten", "not an IPv4 address"),
        ] {
            let err = bad.parse::<Ipv4Net>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn outbound_rules_never_capture_the_agent_loopback_or_exclusions() {
        let mut c = config();
        c.exclude_cidrs = vec!["10.9.0.0/16".parse().unwrap()];
        c.exclude_ports = vec![22, 5432];
        c.include_cidrs = vec![
            "240.240.0.0/16".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let s = ruleset(&c, &HOST, &Learned::default());
        let expected = "table ip pilotfish
delete table ip pilotfish
table ip pilotfish {
  chain output {
    type nat hook output priority -100; policy accept;
    meta l4proto != tcp return
    meta skuid 998 return
    ip daddr 127.0.0.0/8 return
    ip daddr { 10.9.0.0/16 } return
    tcp dport { 22, 5432 } return
    ip daddr != { 240.240.0.0/16, 10.0.0.0/8 } return
    meta l4proto tcp redirect to :15002
  }
}
";
        assert_eq!(s, expected);
    }

    #[test]
    fn inbound_rules_send_the_services_ports_to_the_mesh_port() {
        let mut c = config();
        c.outbound = false;
        c.inbound = true;
        c.exclude_ports = vec![22];
        let learned = Learned {
            vips: Names::new(),
            inbound_ports: vec![22, 9080, 15006],
        };
        let s = ruleset(&c, &HOST, &learned);
        assert!(!s.contains("chain output"), "{s}");
        assert!(
            s.contains("    ip daddr 10.0.0.12 tcp dport { 9080 } dnat to 10.0.0.12:15006\n"),
            "{s}"
        );
        // No service ports yet: the chain exists, empty.
        let s = ruleset(&c, &HOST, &Learned::default());
        assert!(s.contains("chain prerouting") && !s.contains("dnat"), "{s}");
    }

    /// An `inbound|<svc>` cluster with the local app at `port`, as discovery sends it.
    fn inbound_cluster(service: &str, ports: &[u32]) -> envoy_types::pb::google::protobuf::Any {
        use envoy_types::pb::envoy::config::core::v3::{
            address, socket_address::PortSpecifier, Address, SocketAddress,
        };
        use envoy_types::pb::envoy::config::endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
        };
        let lb_endpoints = ports
            .iter()
            .map(|p| LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.0.0.12".into(),
                            port_specifier: Some(PortSpecifier::PortValue(*p)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect();
        envoy_types::pb::google::protobuf::Any {
            type_url: CLUSTER.into(),
            value: Cluster {
                name: format!("inbound|{service}"),
                load_assignment: Some(ClusterLoadAssignment {
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }

    #[test]
    fn learned_reads_the_listener_chains_and_the_inbound_clusters() {
        use crate::xds::cache::tests::{cluster, sotw};
        use envoy_types::pb::envoy::config::core::v3::CidrRange;
        use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch};
        use envoy_types::pb::google::protobuf::{Any, UInt32Value};
        let chain = |name: &str, ranges: &[(&str, u32)]| FilterChain {
            name: name.into(),
            filter_chain_match: Some(FilterChainMatch {
                prefix_ranges: ranges
                    .iter()
                    .map(|(ip, len)| CidrRange {
                        address_prefix: ip.to_string(),
                        prefix_len: Some(UInt32Value { value: *len }),
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let listener = Listener {
            name: LISTENER_NAME.into(),
            filter_chains: vec![
                chain("intercept|reviews", &[("240.240.0.7", 32)]),
                chain("intercept|wide", &[("240.240.0.0", 16)]),
                chain("intercept|two", &[("240.240.0.8", 32), ("240.240.0.9", 32)]),
                chain("other", &[("240.240.0.10", 32)]),
            ],
            ..Default::default()
        };
        let mut cache = XdsCache::default();
        cache.apply_sotw(&sotw(
            CLUSTER,
            "1",
            vec![
                inbound_cluster("reviews", &[9080, 9081]),
                inbound_cluster("db", &[5432, 0]),
                cluster("outbound|ratings"),
            ],
        ));
        // No intercept listener yet: nothing learned.
        assert_eq!(Learned::from_cache(&cache), None);
        cache.apply_sotw(&sotw(
            LISTENER,
            "1",
            vec![Any {
                type_url: LISTENER.into(),
                value: listener.encode_to_vec(),
            }],
        ));
        let learned = Learned::from_cache(&cache).unwrap();
        assert_eq!(
            learned.vips,
            Names::from([("reviews".to_string(), Ipv4Addr::new(240, 240, 0, 7))])
        );
        assert_eq!(learned.inbound_ports, [5432, 9080, 9081]);
    }

    /// Every shape of the table passes nft's own check (`nft -c`: parsed and validated by the
    /// kernel, nothing installed).
    #[test]
    fn nft_accepts_every_ruleset() {
        crate::testutil::ensure_tool("nft", "nftables").unwrap();
        let mut all = config();
        all.inbound = true;
        all.exclude_cidrs = vec!["10.9.0.0/16".parse().unwrap(), "192.0.2.1".parse().unwrap()];
        all.exclude_ports = vec![22];
        all.include_cidrs = vec!["240.240.0.0/16".parse().unwrap()];
        let learned = Learned {
            vips: Names::new(),
            inbound_ports: vec![9080, 9090],
        };
        let mut inbound_only = all.clone();
        inbound_only.outbound = false;
        for (c, l) in [
            (config(), Learned::default()),
            (all.clone(), learned.clone()),
            (all, Learned::default()),
            (inbound_only, learned),
        ] {
            let script = ruleset(&c, &HOST, &l);
            let out = std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().unwrap().write_all(script.as_bytes())?;
                    child.wait_with_output()
                })
                .unwrap();
            assert!(
                out.status.success(),
                "{script}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn the_covering_range_holds_every_vip() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(covering([]), None);
        assert_eq!(
            covering([ip("240.240.0.7")]).unwrap().to_string(),
            "240.240.0.7/32"
        );
        assert_eq!(
            covering([ip("240.240.0.7"), ip("240.240.238.179"), ip("240.240.12.1")])
                .unwrap()
                .to_string(),
            "240.240.0.0/16"
        );
        assert_eq!(
            covering([ip("240.240.0.1"), ip("240.241.0.1")])
                .unwrap()
                .to_string(),
            "240.240.0.0/15"
        );
    }

    #[test]
    fn removal_declares_then_deletes() {
        assert_eq!(removal(), "table ip pilotfish\ndelete table ip pilotfish\n");
    }
}
