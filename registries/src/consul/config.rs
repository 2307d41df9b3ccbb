//! `[registry.consul]` in discovery.toml: the serde mirror ([`ConsulSection`]) and the runtime
//! struct the watcher sees ([`ConsulConfig`]). `validate()` lists every problem at once.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config_vocab::FileProblems;
use crate::model::DEFAULT_MESH_PORT;

/// The `[registry.consul]` table as written. Durations are strings like `"5m"`, `"30s"`, `"250ms"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSection {
    /// `http://host:port` of a Consul agent or server.
    pub address: String,
    /// Datacenters to read; the first one is usually the agent's own. At least one.
    #[serde(default)]
    pub datacenters: Vec<String>,
    /// A file holding the ACL token (sent as `X-Consul-Token`, never in a URL).
    pub token_file: Option<PathBuf>,
    /// CA bundle for an `https://` address.
    pub ca_file: Option<PathBuf>,
    /// Let any Consul server answer (`?stale`): works without quorum. Default true.
    #[serde(default = "yes")]
    pub stale: bool,
    /// Send Enterprise-only parameters (`ns`, `partition`). Consul CE answers them with 400.
    #[serde(default)]
    pub enterprise: bool,
    pub namespace: Option<String>,
    pub partition: Option<String>,
    /// Only services carrying this Consul tag (and, within them, only instances carrying it).
    pub service_tag: Option<String>,
    /// Only services whose name matches this glob (`*` matches any run of characters).
    pub name_filter: Option<String>,
    /// Blocking-query wait. Default `"5m"`, at most `"10m"`.
    pub wait: Option<String>,
    /// Token bucket per long-poll: burst, and one more request per `rate_limit_interval`.
    pub rate_limit_burst: Option<u32>,
    pub rate_limit_interval: Option<String>,
    /// Cap of the jittered exponential backoff after errors. Default `"30s"`.
    pub backoff_max: Option<String>,
    /// Concurrent one-shot service reads. Default 8.
    pub fetch_concurrency: Option<usize>,
    /// Full re-read of every selected service, as a safety net. Default `"10m"`.
    pub resync_interval: Option<String>,
    /// Mesh port of agent nodes without `pilotfish-mesh-port` node meta. Default 15006.
    pub default_mesh_port: Option<u16>,
}

fn yes() -> bool {
    true
}

/// Enterprise scoping, sent only when `enterprise = true`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enterprise {
    pub namespace: Option<String>,
    pub partition: Option<String>,
}

/// Runtime configuration of the Consul adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    /// Base URL without a trailing slash.
    pub address: String,
    pub datacenters: Vec<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub stale: bool,
    /// `None` on Consul CE: `ns`/`partition` are never sent.
    pub enterprise: Option<Enterprise>,
    pub service_tag: Option<String>,
    pub name_filter: Option<String>,
    pub wait: Duration,
    pub rate_limit_burst: u32,
    pub rate_limit_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub fetch_concurrency: usize,
    pub resync_interval: Duration,
    /// A full sweep triggered by a change no check explains runs at most this often.
    pub sweep_min_interval: Duration,
    pub default_mesh_port: u16,
}

impl ConsulConfig {
    /// Defaults for everything but the address and datacenters.
    pub fn new(address: impl Into<String>, datacenters: Vec<String>) -> ConsulConfig {
        ConsulConfig {
            address: address.into().trim_end_matches('/').to_string(),
            datacenters,
            token_file: None,
            ca_file: None,
            stale: true,
            enterprise: None,
            service_tag: None,
            name_filter: None,
            wait: Duration::from_secs(300),
            rate_limit_burst: 5,
            rate_limit_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            fetch_concurrency: 8,
            resync_interval: Duration::from_secs(600),
            sweep_min_interval: Duration::from_secs(10),
            default_mesh_port: DEFAULT_MESH_PORT,
        }
    }

    /// The HTTP client's per-request timeout: longer than Consul's own budget for a blocking
    /// query (`wait + wait/16 + 7s`, consul-api.md a.2), so healthy long-polls are never cut.
    pub fn request_timeout(&self) -> Duration {
        self.wait + self.wait / 16 + Duration::from_secs(8)
    }
}

impl ConsulSection {
    /// Checks every field and builds the runtime config, or reports every problem into
    /// `problems` (the problems of the discovery.toml this section is in), each under its key
    /// path (`registry.consul.wait`).
    pub fn validate(&self, problems: &mut FileProblems<'_>) -> Option<ConsulConfig> {
        const P: &str = "registry.consul";
        let before = problems.len();
        let mut cfg = ConsulConfig::new(self.address.trim(), self.datacenters.clone());

        if self.address.starts_with("https://") {
            problems.push(
                format!("{P}.address"),
                "https is not supported by this build (no TLS client compiled in); \
                 point it at a local Consul agent over http",
            );
        } else if !self.address.starts_with("http://") || self.address.len() <= "http://".len() {
            problems.push(
                format!("{P}.address"),
                format!("\"{}\" is not an http:// URL", self.address),
            );
        }
        if self.ca_file.is_some() {
            problems.push(
                format!("{P}.ca_file"),
                "TLS to Consul is not supported by this build",
            );
        }
        if self.datacenters.is_empty() {
            problems.push(format!("{P}.datacenters"), "name at least one datacenter");
        }
        for (i, dc) in self.datacenters.iter().enumerate() {
            if dc.is_empty()
                || !dc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(
                    format!("{P}.datacenters[{i}]"),
                    format!("\"{dc}\" is not a datacenter name"),
                );
            }
            if self.datacenters[..i].contains(dc) {
                problems.push(
                    format!("{P}.datacenters[{i}]"),
                    format!("\"{dc}\" is listed twice"),
                );
            }
        }
        if !self.enterprise && (self.namespace.is_some() || self.partition.is_some()) {
            let key = if self.namespace.is_some() {
                "namespace"
            } else {
                "partition"
            };
            problems.push(
                format!("{P}.{key}"),
                "Enterprise-only; set enterprise = true (Consul CE rejects it with 400)",
            );
        }
        if self.enterprise {
            cfg.enterprise = Some(Enterprise {
                namespace: self.namespace.clone(),
                partition: self.partition.clone(),
            });
        }
        if let Some(t) = &self.service_tag {
            if t.is_empty() {
                problems.push(format!("{P}.service_tag"), "empty");
            }
        }
        if let Some(f) = &self.name_filter {
            if f.is_empty() {
                problems.push(format!("{P}.name_filter"), "empty");
            }
        }
        let mut dur =
            |field: &str, v: &Option<String>, min: Duration, max: Duration, out: &mut Duration| {
                let Some(text) = v else { return };
                let key = format!("{P}.{field}");
                match problems.duration(&key, text) {
                    Some(d) if d >= min && d <= max => *out = d,
                    Some(_) => problems.push(
                        key,
                        format!("\"{text}\" is out of range ({min:?} to {max:?})"),
                    ),
                    None => {}
                }
            };
        let s = Duration::from_secs;
        dur("wait", &self.wait, s(1), s(600), &mut cfg.wait);
        dur(
            "rate_limit_interval",
            &self.rate_limit_interval,
            Duration::from_millis(10),
            s(300),
            &mut cfg.rate_limit_interval,
        );
        dur(
            "backoff_max",
            &self.backoff_max,
            s(1),
            s(600),
            &mut cfg.backoff_max,
        );
        dur(
            "resync_interval",
            &self.resync_interval,
            s(10),
            s(86400),
            &mut cfg.resync_interval,
        );
        match self.rate_limit_burst {
            Some(0) => problems.push(format!("{P}.rate_limit_burst"), "must be at least 1"),
            Some(b) => cfg.rate_limit_burst = b,
            None => {}
        }
        match self.fetch_concurrency {
            Some(n) if n == 0 || n > 64 => problems.push(
                format!("{P}.fetch_concurrency"),
                format!("{n} is out of range (1 to 64)"),
            ),
            Some(n) => cfg.fetch_concurrency = n,
            None => {}
        }
        match self.default_mesh_port {
            Some(0) => problems.push(format!("{P}.default_mesh_port"), "0 is not a port"),
            Some(p) => cfg.default_mesh_port = p,
            None => {}
        }
        cfg.token_file = self.token_file.clone();
        cfg.ca_file = self.ca_file.clone();
        cfg.stale = self.stale;
        cfg.service_tag = self.service_tag.clone();
        cfg.name_filter = self.name_filter.clone();
        (problems.len() == before).then_some(cfg)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn consul_section_parses_and_validates() {
        let s: ConsulSection = toml::from_str(
            r#"
            address = "http://127.0.0.1:8500"
            datacenters = ["dc1", "dc2"]
            token_file = "/etc/pilotfish/consul-token"
            wait = "2m"
            service_tag = "mesh"
            "#,
        )
        .unwrap();
        let mut problems = FileProblems::new("discovery.toml", "");
        let c = s.validate(&mut problems).unwrap();
        assert!(problems.is_empty());
        assert_eq!(c.wait, Duration::from_secs(120));
        assert!(c.stale);
        assert!(c.enterprise.is_none());
        assert!(c.request_timeout() > c.wait + c.wait / 16 + Duration::from_secs(7));
    }

    #[test]
    fn consul_section_rejects_unknown_keys() {
        let e = toml::from_str::<ConsulSection>("address = \"http://x\"\ndatacenter = \"dc1\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn consul_section_lists_every_error() {
        let text = r#"
[registry.consul]
address = "ftp://x"
datacenters = ["dc1", "dc1", ""]
namespace = "team-a"
wait = "forever"
rate_limit_burst = 0
fetch_concurrency = 500
"#;
        #[derive(Deserialize)]
        struct File {
            registry: Registry,
        }
        #[derive(Deserialize)]
        struct Registry {
            consul: ConsulSection,
        }
        let file: File = toml::from_str(text).unwrap();
        let mut problems = FileProblems::new("discovery.toml", text);
        assert!(file.registry.consul.validate(&mut problems).is_none());
        let errs: Vec<String> = problems.into_vec().iter().map(|p| p.to_string()).collect();
        for needle in [
            "discovery.toml:3:11: registry.consul.address: \"ftp://x\" is not an http:// URL",
            "discovery.toml:4:23: registry.consul.datacenters[1]: \"dc1\" is listed twice",
            "registry.consul.datacenters[2]: \"\" is not a datacenter name",
            "discovery.toml:5:13: registry.consul.namespace: Enterprise-only",
            "discovery.toml:6:8: registry.consul.wait: \"forever\" is not a duration",
            "registry.consul.rate_limit_burst: must be at least 1",
            "registry.consul.fetch_concurrency: 500 is out of range",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle} missing in {errs:?}"
            );
        }
    }
}
