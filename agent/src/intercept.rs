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
//!   on a port of one of its mesh services (learned from discovery) are sent to the mesh port,
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
//! The `intercept` listener's metadata (`pilotfish.intercept`, see discovery's
//! `translate/intercept.rs`) also carries the services' VIPs, which mesh DNS answers with:
//! [`Interceptor::names`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::status::AgentStatus;
use crate::xds::cache::LISTENER;
use crate::xds::store::SharedCache;

/// The nftables table (family `ip`) the agent owns.
pub const TABLE: &str = "pilotfish";
/// The `intercept` listener's port on 127.0.0.1.
pub const DEFAULT_PORT: u16 = 15002;
/// The listener discovery builds for intercepting proxies, and its metadata key.
const LISTENER_NAME: &str = "intercept";
const METADATA_KEY: &str = "pilotfish.intercept";

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

/// What discovery told this proxy, from the `intercept` listener Envoy accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    pub vips: Names,
    /// The ports of this node's mesh services, sorted.
    pub inbound_ports: Vec<u16>,
}

impl Learned {
    /// Reads the `intercept` listener's metadata; `None` when it has none we understand.
    pub fn from_listener(bytes: &[u8]) -> Option<Learned> {
        let listener = Listener::decode(bytes).ok()?;
        let any = listener
            .metadata?
            .typed_filter_metadata
            .remove(METADATA_KEY)?;
        let meta = Struct::decode(any.value.as_slice()).ok()?;
        let list = |key: &str| match meta.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::ListValue(l)) => l.values.clone(),
            _ => Vec::new(),
        };
        let vips = list("vips")
            .into_iter()
            .filter_map(|v| match v.kind {
                Some(Kind::StringValue(s)) => {
                    let (name, ip) = s.split_once('=')?;
                    Some((name.to_string(), ip.parse().ok()?))
                }
                _ => None,
            })
            .collect();
        let mut inbound_ports: Vec<u16> = list("inbound_ports")
            .into_iter()
            .filter_map(|v| match v.kind {
                Some(Kind::NumberValue(n)) if (1.0..=65535.0).contains(&n) => Some(n as u16),
                _ => None,
            })
            .collect();
        inbound_ports.sort_unstable();
        inbound_ports.dedup();
        Some(Learned {
            vips,
            inbound_ports,
        })
    }
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

/// Runs one `nft -f -` transaction.
pub async fn nft(script: &str) -> Result<(), InterceptError> {
    let mut child = tokio::process::Command::new("nft")
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
            (true, None) => nft(&removal()).await?,
            // Off: a table left by a configuration that had it on would now redirect to a
            // listener Envoy no longer has. Without nft or CAP_NET_ADMIN there is none to
            // remove, so failing is fine.
            (false, _) => match nft(&removal()).await {
                Ok(()) => debug!(table = TABLE, "interception off; no table left"),
                Err(e) => debug!(error = %e, "interception off; no table removed"),
            },
        }
        Ok(me)
    }

    /// The VIPs of the services this proxy may call, as the last accepted config says.
    pub fn names(&self) -> watch::Receiver<Arc<Names>> {
        self.names.subscribe()
    }

    fn learned(&self) -> Option<Learned> {
        let cached = self.cache.resource(LISTENER, LISTENER_NAME)?;
        Learned::from_listener(&cached.resource.value)
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
        loop {
            if let Some(learned) = self.learned() {
                if self.applied.as_ref() != Some(&learned) {
                    if let Err(e) = self.apply(learned).await {
                        warn!(error = %e, "cannot update the interception rules");
                    }
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
        if self.config.is_some() {
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

    #[test]
    fn learned_reads_the_listener_metadata() {
        use envoy_types::pb::envoy::config::core::v3::Metadata;
        use envoy_types::pb::google::protobuf::{Any, ListValue, Value};
        let list = |values: Vec<Kind>| Value {
            kind: Some(Kind::ListValue(ListValue {
                values: values
                    .into_iter()
                    .map(|k| Value { kind: Some(k) })
                    .collect(),
            })),
        };
        let meta = Struct {
            fields: [
                (
                    "vips".to_string(),
                    list(vec![
                        Kind::StringValue("reviews=240.240.0.7".into()),
                        Kind::StringValue("broken".into()),
                    ]),
                ),
                (
                    "inbound_ports".to_string(),
                    list(vec![Kind::NumberValue(9080.0), Kind::NumberValue(0.0)]),
                ),
            ]
            .into(),
        };
        let listener = Listener {
            name: LISTENER_NAME.into(),
            metadata: Some(Metadata {
                typed_filter_metadata: [(
                    METADATA_KEY.to_string(),
                    Any {
                        type_url: "type.googleapis.com/google.protobuf.Struct".into(),
                        value: meta.encode_to_vec(),
                    },
                )]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let learned = Learned::from_listener(&listener.encode_to_vec()).unwrap();
        assert_eq!(
            learned.vips,
            Names::from([("reviews".to_string(), Ipv4Addr::new(240, 240, 0, 7))])
        );
        assert_eq!(learned.inbound_ports, [9080]);
        assert_eq!(
            Learned::from_listener(&Listener::default().encode_to_vec()),
            None
        );
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
    fn removal_declares_then_deletes() {
        assert_eq!(removal(), "table ip pilotfish\ndelete table ip pilotfish\n");
    }
}
