//! One duration grammar for every file: the same durations go to every duration key of
//! discovery.toml, `[registry.consul]`, agent.toml and registry files. Each is either accepted
//! as exactly that duration or rejected by the key's own documented range, with a problem that
//! names the key and points at its value.
//!
//! A key the README documents with a duration but without a row here fails the test, so a new
//! duration key cannot skip the shared grammar unnoticed.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pilotfish_discovery::config::{Config, ConfigError};
use pilotfish_registries::config_vocab::{parse_duration, Problem};
use pilotfish_registries::files::check_with;
use pilotfish_registries::model::{Catalog, HashOn, Policy, Route, RouteRule};

/// What every key is fed, with what it means.
const SAMPLES: [(&str, Duration); 5] = [
    ("1.5s", Duration::from_millis(1500)),
    ("250ms", Duration::from_millis(250)),
    ("2m", Duration::from_secs(120)),
    ("1.5h", Duration::from_secs(5400)),
    ("7d", Duration::from_secs(7 * 86_400)),
];

/// Where a template takes the duration.
const D: &str = "DURATION";

/// `None`: the loader accepted the file but the key came out unset (a bug this test shows).
type Load = fn(&str) -> Result<Option<Duration>, Vec<Problem>>;

struct Row {
    /// The key path problems are reported under.
    key: &'static str,
    /// A whole valid file with [`D`] where the duration goes.
    template: &'static str,
    /// The key's documented range.
    range: RangeInclusive<Duration>,
    /// Loads the file as its loader does and picks the key's value.
    load: Load,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const ANY: RangeInclusive<Duration> = Duration::from_nanos(1)..=Duration::MAX;
const DAY: u64 = 86_400;

fn rows() -> Vec<Row> {
    let row = |key, template, range, load: Load| Row {
        key,
        template,
        range,
        load,
    };
    vec![
        // discovery.toml
        row(
            "debounce.quiet",
            "debounce = { quiet = \"DURATION\", max = \"30d\" }\n[registry.files]\npaths = [\"r\"]\n",
            ANY,
            |t| discovery(t).map(|c| Some(c.debounce.quiet)),
        ),
        row(
            "debounce.max",
            "debounce = { quiet = \"1ms\", max = \"DURATION\" }\n[registry.files]\npaths = [\"r\"]\n",
            ANY,
            |t| discovery(t).map(|c| Some(c.debounce.max)),
        ),
        row(
            "node_grace",
            "node_grace = \"DURATION\"\n[registry.files]\npaths = [\"r\"]\n",
            ANY,
            |t| discovery(t).map(|c| Some(c.node_grace)),
        ),
        row(
            "max_stream_age",
            "max_stream_age = \"DURATION\"\n[registry.files]\npaths = [\"r\"]\n",
            secs(1)..=secs(7 * DAY),
            |t| discovery(t).map(|c| Some(c.max_stream_age)),
        ),
        row(
            "ca.workload_ttl",
            "[registry.files]\npaths = [\"r\"]\n[ca]\nworkload_ttl = \"DURATION\"\n",
            secs(5)..=secs(365 * DAY),
            |t| discovery(t).map(|c| Some(c.ca.workload_ttl)),
        ),
        row(
            "ca.node_ttl",
            "[registry.files]\npaths = [\"r\"]\n[ca]\nnode_ttl = \"DURATION\"\n",
            secs(5)..=secs(365 * DAY),
            |t| discovery(t).map(|c| Some(c.ca.node_ttl)),
        ),
        // [registry.consul] in discovery.toml
        row(
            "registry.consul.wait",
            "[registry.consul]\naddress = \"http://127.0.0.1:8500\"\ndatacenters = [\"dc1\"]\nwait = \"DURATION\"\n",
            secs(1)..=secs(600),
            |t| consul(t).map(|c| Some(c.wait)),
        ),
        row(
            "registry.consul.rate_limit_interval",
            "[registry.consul]\naddress = \"http://127.0.0.1:8500\"\ndatacenters = [\"dc1\"]\nrate_limit_interval = \"DURATION\"\n",
            Duration::from_millis(10)..=secs(300),
            |t| consul(t).map(|c| Some(c.rate_limit_interval)),
        ),
        row(
            "registry.consul.backoff_max",
            "[registry.consul]\naddress = \"http://127.0.0.1:8500\"\ndatacenters = [\"dc1\"]\nbackoff_max = \"DURATION\"\n",
            secs(1)..=secs(600),
            |t| consul(t).map(|c| Some(c.backoff_max)),
        ),
        row(
            "registry.consul.resync_interval",
            "[registry.consul]\naddress = \"http://127.0.0.1:8500\"\ndatacenters = [\"dc1\"]\nresync_interval = \"DURATION\"\n",
            secs(10)..=secs(DAY),
            |t| consul(t).map(|c| Some(c.resync_interval)),
        ),
        // agent.toml
        row(
            "envoy.drain_time",
            "node = \"a\"\naddress = \"127.0.0.1\"\ndiscovery = [\"127.0.0.1:15012\"]\ninsecure = true\n\
             [envoy]\nbinary = \"/bin/sh\"\ndrain_time = \"DURATION\"\n",
            Duration::ZERO..=Duration::MAX,
            |t| agent(t).map(|c| Some(c.envoy.drain_time)),
        ),
        // registry files
        row(
            "routes.web.timeout",
            "[services.web]\nport = 80\n[routes.web]\ntimeout = \"DURATION\"\n",
            ANY,
            |t| route(t).map(|r| r.timeout),
        ),
        row(
            "routes.web.retries.per_try_timeout",
            "[services.web]\nport = 80\n[routes.web]\nretries = { attempts = 2, per_try_timeout = \"DURATION\" }\n",
            ANY,
            |t| route(t).map(|r| r.retries.and_then(|r| r.per_try_timeout)),
        ),
        row(
            "routes.web.rules[0].timeout",
            "[services.web]\nport = 80\n[[routes.web.rules]]\nto = [{ weight = 1 }]\ntimeout = \"DURATION\"\n",
            ANY,
            |t| rule(t).map(|r| r.actions.timeout),
        ),
        row(
            "routes.web.rules[0].retries.backoff.base",
            "[services.web]\nport = 80\n[[routes.web.rules]]\nto = [{ weight = 1 }]\n\
             retries = { attempts = 2, backoff = { base = \"DURATION\" } }\n",
            ANY,
            |t| rule(t).map(|r| r.actions.retries.and_then(|r| r.backoff).map(|b| b.0)),
        ),
        row(
            "routes.web.rules[0].retries.backoff.max",
            "[services.web]\nport = 80\n[[routes.web.rules]]\nto = [{ weight = 1 }]\n\
             retries = { attempts = 2, backoff = { base = \"1ms\", max = \"DURATION\" } }\n",
            ANY,
            |t| rule(t).map(|r| r.actions.retries.and_then(|r| r.backoff).and_then(|b| b.1)),
        ),
        row(
            "routes.web.rules[0].fault.delay.fixed",
            "[services.web]\nport = 80\n[[routes.web.rules]]\nto = [{ weight = 1 }]\n\
             fault = { delay = { fixed = \"DURATION\", percent = 10 } }\n",
            ANY,
            |t| rule(t).map(|r| r.actions.fault.and_then(|f| f.delay).map(|d| d.0)),
        ),
        row(
            "policies.web.connect_timeout",
            "[services.web]\nport = 80\n[policies.web]\nconnect_timeout = \"DURATION\"\n",
            ANY,
            |t| policy(t).map(|p| p.connect_timeout),
        ),
        row(
            "policies.web.idle_timeout",
            "[services.web]\nport = 80\n[policies.web]\nidle_timeout = \"DURATION\"\n",
            ANY,
            |t| policy(t).map(|p| p.idle_timeout),
        ),
        row(
            "policies.web.hash.ttl",
            "[services.web]\nport = 80\n[policies.web]\nload_balancer = \"ring_hash\"\n\
             hash = { cookie = \"s\", ttl = \"DURATION\" }\n",
            ANY,
            |t| {
                policy(t).map(|p| match p.hash {
                    Some(HashOn::Cookie { ttl, .. }) => ttl,
                    _ => None,
                })
            },
        ),
        row(
            "policies.web.outlier_detection.interval",
            "[services.web]\nport = 80\n[policies.web]\noutlier_detection = { interval = \"DURATION\" }\n",
            ANY,
            |t| policy(t).map(|p| p.outlier_detection.and_then(|o| o.interval)),
        ),
        row(
            "policies.web.outlier_detection.base_ejection_time",
            "[services.web]\nport = 80\n[policies.web]\noutlier_detection = { base_ejection_time = \"DURATION\" }\n",
            ANY,
            |t| policy(t).map(|p| p.outlier_detection.and_then(|o| o.base_ejection_time)),
        ),
        row(
            "policies.web.health_check.interval",
            "[services.web]\nport = 80\n[policies.web]\nhealth_check = { interval = \"DURATION\" }\n",
            ANY,
            |t| policy(t).map(|p| p.health_check.map(|h| h.interval)),
        ),
        row(
            "policies.web.health_check.timeout",
            "[services.web]\nport = 80\n[policies.web]\nhealth_check = { timeout = \"DURATION\" }\n",
            ANY,
            |t| policy(t).map(|p| p.health_check.map(|h| h.timeout)),
        ),
        row(
            "policies.web.rate_limit.per",
            "[services.web]\nport = 80\n[policies.web]\nrate_limit = { requests = 10, per = \"DURATION\" }\n",
            Duration::from_millis(50)..=Duration::MAX,
            |t| policy(t).map(|p| p.rate_limit.map(|r| r.per)),
        ),
    ]
}

#[test]
fn every_duration_key_takes_the_same_durations() {
    for row in rows() {
        for (text, expected) in SAMPLES {
            let file = row.template.replace(D, text);
            let got = (row.load)(&file);
            if row.range.contains(&expected) {
                assert_eq!(got, Ok(Some(expected)), "{} = \"{text}\"", row.key);
                continue;
            }
            let problems = got.expect_err(&format!("{} = \"{text}\" is out of range", row.key));
            assert_eq!(problems.len(), 1, "{} = \"{text}\": {problems:#?}", row.key);
            let p = &problems[0];
            assert_eq!(p.key_path, row.key, "{p}");
            assert!(p.line > 0, "points at the value: {p}");
            assert!(
                !p.message.contains("is not a duration"),
                "the grammar accepts it, the range does not: {p}"
            );
        }
    }
}

#[test]
fn malformed_and_huge_durations_are_problems_of_every_key() {
    for row in rows() {
        for text in ["", "5", "1.5", "5 s", "-5s", "1w", "99999999999999999999d"] {
            let file = row.template.replace(D, text);
            let problems = (row.load)(&file).expect_err(&format!("{} = \"{text}\"", row.key));
            assert_eq!(problems.len(), 1, "{} = \"{text}\": {problems:#?}", row.key);
            let p = &problems[0];
            assert_eq!(p.key_path, row.key, "{p}");
            assert!(p.line > 0, "points at the value: {p}");
            assert!(
                p.message.contains("is not a duration") || p.message.contains("too long"),
                "{p}"
            );
        }
    }
}

/// Every key the README shows with a duration value has a row, and every row's key is
/// documented there.
#[test]
fn the_table_covers_every_documented_duration_key() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README");
    let mut documented = BTreeSet::new();
    for line in readme.lines() {
        let mut rest = line;
        while let Some(at) = rest.find(" = \"") {
            let name: String = rest[..at]
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let value_start = at + 4;
            let value_end = rest[value_start..]
                .find('"')
                .map_or(rest.len(), |e| value_start + e);
            if parse_duration(&rest[value_start..value_end]).is_ok() {
                documented.insert(name);
            }
            rest = &rest[value_end.min(rest.len())..];
        }
    }
    let last = |key: &str| key.rsplit('.').next().unwrap_or(key).to_string();
    let tabled: BTreeSet<String> = rows().iter().map(|r| last(r.key)).collect();
    let missing: Vec<&String> = documented.difference(&tabled).collect();
    assert!(
        missing.is_empty(),
        "duration keys without a row: {missing:?}"
    );
    let undocumented: Vec<&String> = tabled.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "duration keys the README does not show: {undocumented:?}"
    );
}

fn discovery(text: &str) -> Result<Config, Vec<Problem>> {
    Config::parse(text, Path::new("/etc/pilotfish/discovery.toml")).map_err(|e| match e {
        ConfigError::Invalid { problems } => problems,
        other => panic!("{other}"),
    })
}

fn consul(text: &str) -> Result<pilotfish_registries::consul::ConsulConfig, Vec<Problem>> {
    discovery(text).map(|c| c.consul.expect("consul configured"))
}

fn agent(text: &str) -> Result<pilotfish_agent::config::AgentConfig, Vec<Problem>> {
    pilotfish_agent::config::parse(
        Path::new("/etc/pilotfish/agent.toml"),
        text,
        Path::new("/etc/pilotfish"),
        None,
    )
}

fn registry(text: &str) -> Result<Catalog, Vec<Problem>> {
    let (catalog, problems) = check_with(&[], &[(PathBuf::from("/r/a.toml"), Some(text.into()))]);
    if problems.is_empty() {
        Ok(catalog)
    } else {
        Err(problems)
    }
}

fn route(text: &str) -> Result<Route, Vec<Problem>> {
    registry(text).map(|mut c| c.routes.remove("web").expect("route web"))
}

fn rule(text: &str) -> Result<RouteRule, Vec<Problem>> {
    route(text).map(|mut r| r.rules.remove(0))
}

fn policy(text: &str) -> Result<Policy, Vec<Problem>> {
    registry(text).map(|mut c| c.policies.remove("web").expect("policy web"))
}
