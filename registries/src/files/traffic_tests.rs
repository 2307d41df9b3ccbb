//! Issue 5's traffic keys: what a valid file becomes, and how each mistake is reported.

use std::path::PathBuf;
use std::time::Duration;

use super::state::FileSet;
use super::Problem;
use crate::model::{HashOn, StringCondition};

fn settled(files: &[(&str, &str)]) -> FileSet {
    let mut set = FileSet::default();
    for (name, text) in files {
        set.set(
            &PathBuf::from(format!("reg/{name}")),
            Some(Ok(text.to_string())),
        );
    }
    set.settle();
    set
}

/// `got` starts like `want` (`file:line:col: field: message...`), columns aside.
fn same_place(got: &str, want: &str) -> bool {
    let strip = |s: &str| {
        let mut parts = s.splitn(4, ':');
        let (file, line, _col, rest) = (parts.next(), parts.next(), parts.next(), parts.next());
        (
            file.map(str::to_string),
            line.map(str::to_string),
            rest.unwrap_or("").to_string(),
        )
    };
    let (gf, gl, gr) = strip(got);
    let (wf, wl, wr) = strip(want);
    gf == wf && gl == wl && gr.starts_with(&wr)
}

fn messages(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(ToString::to_string).collect()
}

const SERVICES: &str = r#"
[services.reviews]
port = 9080
[[services.reviews.instances]]
address = "10.0.0.12"
port = 9080
labels = { version = "v1" }
locality = "dc1"

[services.shadow]
port = 9080

[services.db]
protocol = "tcp"
port = 5432
"#;

const RULES: &str = r#"
[routes.reviews]
retries = { attempts = 2, on = ["5xx"], backoff = { base = "25ms", max = "250ms" } }

[[routes.reviews.rules]]
match = { path_regex = "/r/[0-9]+", headers = { "X-User" = { prefix = "a" }, "x-exact" = "1", "x-gone" = { present = false } }, query = { debug = { present = true } } }
to = [{ subset = "v1" }]
timeout = "1s"
fault = { delay = { fixed = "2s", percent = 10 }, abort = { status = 503, percent = 5 } }
mirror = { service = "shadow", percent = 50 }
headers = { request = { add = { "x-a" = "1" }, remove = ["x-b"] }, response = { add = { "x-c" = "2" } } }
rewrite = { prefix = "/new" }

[[routes.reviews.rules]]
match = { path_prefix = "/old" }
redirect = { path = "/new", status = 308, https = true }

[policies.reviews]
subsets = { v1 = { version = "v1" } }
load_balancer = "ring_hash"
hash = { cookie = "session", ttl = "1h" }
connection_pool = { max_connections = 10, max_pending_requests = 5, max_requests = 20, max_retries = 3 }
outlier_detection = { consecutive_5xx = 5, interval = "10s", base_ejection_time = "30s", max_ejection_percent = 50 }
health_check = { path = "/health", interval = "5s", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 3 }
idle_timeout = "5m"
rate_limit = { requests = 100, per = "1s" }
locality = { failover = ["dc1", "dc2"] }

[gateways.public]
node = "gw-1"
listen = "0.0.0.0:8080"
[[gateways.public.routes]]
host = "shop.example.com"
service = "reviews"
"#;

#[test]
fn every_key_is_read() {
    let set = settled(&[("services.toml", SERVICES), ("rules.toml", RULES)]);
    assert!(set.problems().is_empty(), "{:#?}", set.problems());
    let (c, _) = set.catalog();
    let route = &c.routes["reviews"];
    let backoff = route.retries.as_ref().and_then(|r| r.backoff);
    assert_eq!(
        backoff,
        Some((Duration::from_millis(25), Some(Duration::from_millis(250))))
    );
    let rule = &route.rules[0];
    assert_eq!(rule.matches.path_regex.as_deref(), Some("/r/[0-9]+"));
    assert_eq!(
        rule.matches.header_conditions["x-user"],
        StringCondition::Prefix("a".into())
    );
    assert_eq!(
        rule.matches.header_conditions["x-gone"],
        StringCondition::Present(false)
    );
    assert_eq!(rule.matches.headers["x-exact"], "1");
    assert_eq!(rule.matches.query["debug"], StringCondition::Present(true));
    assert_eq!(rule.actions.timeout, Some(Duration::from_secs(1)));
    let fault = rule.actions.fault.as_ref().expect("fault");
    assert_eq!(fault.delay, Some((Duration::from_secs(2), 10)));
    assert_eq!(fault.abort, Some((503, 5)));
    assert_eq!(rule.actions.mirror.as_ref().map(|m| m.percent), Some(50));
    assert_eq!(rule.actions.request_headers.remove, ["x-b"]);
    assert_eq!(rule.actions.response_headers.add["x-c"], "2");
    assert_eq!(
        rule.actions
            .rewrite
            .as_ref()
            .and_then(|r| r.prefix.as_deref()),
        Some("/new")
    );
    let redirect = route.rules[1].actions.redirect.as_ref().expect("redirect");
    assert!(redirect.https && redirect.status == 308 && route.rules[1].to.is_empty());
    let p = &c.policies["reviews"];
    assert_eq!(
        p.hash,
        Some(HashOn::Cookie {
            name: "session".into(),
            ttl: Some(Duration::from_secs(3600))
        })
    );
    assert_eq!(
        p.connection_pool.as_ref().and_then(|c| c.max_retries),
        Some(3)
    );
    assert_eq!(
        p.outlier_detection.as_ref().and_then(|o| o.consecutive_5xx),
        Some(5)
    );
    assert_eq!(
        p.health_check.as_ref().and_then(|h| h.path.as_deref()),
        Some("/health")
    );
    assert_eq!(p.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(p.rate_limit.as_ref().map(|r| r.requests), Some(100));
    assert_eq!(p.failover, ["dc1", "dc2"]);
    let gw = &c.gateways["public"];
    assert_eq!(gw.node, "gw-1");
    assert_eq!(gw.routes[0].path_prefix, "/");
}

#[test]
fn mistakes_name_file_line_and_field() {
    let bad = r#"
[[routes.reviews.rules]]
match = { path_regex = "/r/(", headers = { "x" = { prefix = "a", exact = "b" } }, query = { q = { present = false } } }
to = [{}]
fault = { abort = { status = 700, percent = 101 } }
retries = { attempts = 1, backoff = { base = "1x" } }
mirror = { service = "nope" }

[[routes.reviews.rules]]
to = [{}]
redirect = { status = 200 }

[policies.reviews]
hash = { header = "x-user" }
rate_limit = { requests = 0, per = "10ms" }

[policies.db]
rate_limit = { requests = 1, per = "1s" }

[gateways.a]
node = "gw"
listen = "0.0.0.0:8080"
[[gateways.a.routes]]
service = "missing"

[gateways.b]
node = "gw"
listen = "127.0.0.1:8080"
[[gateways.b.routes]]
service = "db"
"#;
    let set = settled(&[("services.toml", SERVICES), ("bad.toml", bad)]);
    let got = messages(&set.problems());
    let want = [
        "reg/bad.toml:3:24: routes.reviews.rules[0].match.path_regex: \"/r/(\" is not a valid regex",
        "reg/bad.toml:3:45: routes.reviews.rules[0].match.headers.x: give exactly one of exact, prefix, regex, present",
        "reg/bad.toml:3:94: routes.reviews.rules[0].match.query.q.present: only `present = true`",
        "reg/bad.toml:5:31: routes.reviews.rules[0].fault.abort.status: 700 is out of range (200-599)",
        "reg/bad.toml:5:46: routes.reviews.rules[0].fault.abort.percent: 101 is out of range (0-100)",
        "reg/bad.toml:6:47: routes.reviews.rules[0].retries.backoff.base: \"1x\" is not a duration",
        "reg/bad.toml:10:1: routes.reviews.rules[1].to: set together with redirect",
        "reg/bad.toml:11:25: routes.reviews.rules[1].redirect.status: 200 is not a redirect status",
        "reg/bad.toml:14:8: policies.reviews.hash: only ring_hash and maglev hash",
        "reg/bad.toml:15:27: policies.reviews.rate_limit.requests: 0 is out of range",
        "reg/bad.toml:15:36: policies.reviews.rate_limit.per: must be at least 50ms",
    ];
    for w in want {
        assert!(
            got.iter().any(|g| same_place(g, w)),
            "missing {w:?} in {got:#?}"
        );
    }
}

#[test]
fn cross_file_checks() {
    let bad = r#"
[[routes.reviews.rules]]
to = [{}]
mirror = { service = "nope" }

[[routes.reviews.rules]]
to = [{}]
mirror = { service = "shadow", subset = "v9" }

[policies.db]
rate_limit = { requests = 1, per = "1s" }

[gateways.a]
node = "gw"
listen = "0.0.0.0:8080"
[[gateways.a.routes]]
service = "missing"

[gateways.b]
node = "gw"
listen = "127.0.0.1:8080"
[[gateways.b.routes]]
service = "db"
"#;
    let set = settled(&[("services.toml", SERVICES), ("bad.toml", bad)]);
    let got = messages(&set.problems());
    let want = [
        "reg/bad.toml:8:21: routes.reviews.rules[1].mirror.subset: unknown subset \"v9\" of service \"shadow\"",
        "reg/bad.toml:11:1: policies.db.rate_limit: \"db\" is a tcp service",
        "reg/bad.toml:21:10: gateways.b.listen: 127.0.0.1:8080 overlaps 0.0.0.0:8080",
        "reg/bad.toml:23:11: gateways.b.routes[0].service: \"db\" is a tcp service",
    ];
    for w in want {
        assert!(
            got.iter().any(|g| same_place(g, w)),
            "missing {w:?} in {got:#?}"
        );
    }
    // The bad file stays out: last good state (nothing) is in force.
    let (c, _) = set.catalog();
    assert!(c.gateways.is_empty() && c.routes.is_empty());
}
