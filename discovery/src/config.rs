//! `discovery.toml`: serde structs that mirror the file, validated into [`Config`].
//!
//! Every problem is collected with its key path (`registry.files.paths[1]: ...`) and reported
//! together, so an operator fixes the file in one pass. Relative paths are resolved against the
//! directory of the config file, so a config works the same from any working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::mesh::DebounceTimes;

pub const DEFAULT_TRUST_DOMAIN: &str = "pilotfish.local";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pilotfish";
pub const DEFAULT_GRPC: &str = "0.0.0.0:15012";
pub const DEFAULT_HTTP: &str = "127.0.0.1:15014";

/// The validated configuration the components see.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    pub trust_domain: String,
    pub state_dir: PathBuf,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Plaintext and no authentication (the only mode of this build).
    pub insecure: bool,
    /// Directories and files the file registry watches.
    pub registry_files: Vec<PathBuf>,
    /// Accepted and kept for the Consul adapter; not used yet.
    pub consul: Option<ConsulSection>,
    pub debounce: DebounceTimes,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {} problem(s):\n  {}", path.display(), problems.len(), problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl ConfigError {
    /// Every problem, one line each, for printing.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { path, problems } => problems
                .iter()
                .map(|p| format!("{}: {p}", path.display()))
                .collect(),
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

/// `[registry.consul]`, kept as written until the Consul adapter lands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSection {
    pub address: Option<String>,
    pub datacenters: Option<Vec<String>>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub stale: Option<bool>,
    pub service_tag: Option<String>,
    pub name_filter: Option<String>,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();

        let trust_domain = raw
            .trust_domain
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
        if !is_dns_name(&trust_domain) {
            problems.push(format!(
                "trust_domain: \"{trust_domain}\" is not a DNS name (letters, digits, '-' and '.')"
            ));
        }
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
                problems.push(format!("http: {h} is also the grpc address"));
            }
        }

        let insecure = raw.insecure.unwrap_or(false);
        if !insecure {
            problems.push(
                "insecure: mTLS is not available in this build; set insecure = true for local \
                 experiments"
                    .to_string(),
            );
        }

        let (files, consul) = match raw.registry {
            Some(r) => (r.files, r.consul),
            None => (None, None),
        };
        let registry_files: Vec<PathBuf> = match files {
            Some(f) => {
                if f.paths.is_empty() {
                    problems.push("registry.files.paths: list at least one directory".into());
                }
                for (i, p) in f.paths.iter().enumerate() {
                    if p.as_os_str().is_empty() {
                        problems.push(format!("registry.files.paths[{i}]: empty path"));
                    }
                }
                f.paths.iter().map(|p| resolve(base, p)).collect()
            }
            None => Vec::new(),
        };
        if registry_files.is_empty() && consul.is_none() {
            problems.push(
                "registry: no registry configured (add [registry.files] paths = [...])".into(),
            );
        }

        let mut debounce = DebounceTimes::default();
        if let Some(d) = raw.debounce {
            if let Some(q) = d.quiet {
                match parse_duration(&q) {
                    Ok(v) if !v.is_zero() => debounce.quiet = v,
                    Ok(_) => problems.push("debounce.quiet: must be more than 0".into()),
                    Err(e) => problems.push(format!("debounce.quiet: {e}")),
                }
            }
            if let Some(m) = d.max {
                match parse_duration(&m) {
                    Ok(v) => debounce.max = v,
                    Err(e) => problems.push(format!("debounce.max: {e}")),
                }
            }
            if debounce.max < debounce.quiet {
                problems.push(format!(
                    "debounce.max: {:?} is shorter than debounce.quiet ({:?})",
                    debounce.max, debounce.quiet
                ));
            }
        }

        match (grpc, http, problems.is_empty()) {
            (Some(grpc), Some(http), true) => Ok(Config {
                source: path.to_path_buf(),
                trust_domain,
                state_dir,
                grpc,
                http,
                insecure,
                registry_files,
                consul,
                debounce,
            }),
            _ => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            }),
        }
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn socket_addr(key: &str, value: &str, problems: &mut Vec<String>) -> Option<SocketAddr> {
    match value.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(format!(
                "{key}: \"{value}\" is not an ip:port address (e.g. \"127.0.0.1:15014\")"
            ));
            None
        }
    }
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `"100ms"`, `"1s"`, `"1.5s"`, `"2m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("\"{s}\" is not a duration (e.g. \"100ms\", \"1s\", \"2m\")"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "\"{s}\" has no known unit (use ms, s, m or h, e.g. \"100ms\")"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("\"{s}\" is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/pilotfish/discovery.toml"))
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_relative_paths() {
        let c = parse("insecure = true\n[registry.files]\npaths = [\"registry.d\", \"/abs\"]\n")
            .expect("valid");
        assert_eq!(c.trust_domain, "pilotfish.local");
        assert_eq!(c.grpc, "0.0.0.0:15012".parse().expect("addr"));
        assert_eq!(c.http, "127.0.0.1:15014".parse().expect("addr"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/pilotfish"));
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
        let consul = c.consul.expect("consul kept");
        assert_eq!(consul.datacenters, Some(vec!["dc1".to_string()]));
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = parse("insecure = true\ngrcp = \"1.2.3.4:5\"\n").expect_err("rejected");
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains("grcp"), "{err}");
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
            "insecure: mTLS is not available in this build; set insecure = true",
            "registry:",
            "debounce.quiet:",
            "debounce.max:",
        ] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
    }

    #[test]
    fn secure_mode_is_refused_until_tls_exists() {
        let p = problems("[registry.files]\npaths = [\"r\"]\n");
        assert_eq!(
            p,
            ["insecure: mTLS is not available in this build; set insecure = true for local experiments"]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
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
