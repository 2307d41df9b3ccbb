use super::*;
use crate::model::{Destination, LoadBalancer, Retries, Route};

fn parse(text: &str) -> Result<FileDecls, Vec<Problem>> {
    parse_file(Path::new("reg/a.toml"), text)
}

/// The one problem `text` has, as `line:column: key.path: message`.
fn problem(text: &str) -> String {
    let problems = parse(text).expect_err("should be rejected");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let p = &problems[0];
    assert_eq!(p.file, Path::new("reg/a.toml"));
    let shown = p.to_string();
    shown
        .strip_prefix("reg/a.toml:")
        .unwrap_or(&shown)
        .to_string()
}

const FULL: &str = r#"
[services.reviews]
protocol = "grpc"
port = 9080
upstreams = ["ratings", "details"]

[[services.reviews.instances]]
node = "vm-b"
address = "10.0.0.12"
port = 9081
labels = { version = "v1", zone = "a" }
mesh_port = 16006
weight = 3
locality = "dc1"

[[services.reviews.instances]]
address = "db.internal"
port = 5432

[routes.reviews]
timeout = "1.5s"
retries = { attempts = 2, per_try_timeout = "250ms", on = ["5xx", "connect-failure"] }

[[routes.reviews.rules]]
match = { headers = { "X-Canary" = "1" }, path_prefix = "/api", method = "GET" }
to = [{ subset = "v2" }]

[[routes.reviews.rules]]
to = [{ subset = "v1", weight = 99 }, { subset = "v2", weight = 1 }, { weight = 0 }]

[policies.reviews]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }
load_balancer = "least_request"
connect_timeout = "1m"
"#;

#[test]
fn parses_every_field() {
    let decls = parse(FULL).expect("valid");
    let svc = &decls.services["reviews"];
    assert_eq!(
        svc.pos,
        Pos {
            line: 2,
            column: 11
        }
    );
    let def = svc.def.as_ref().expect("defines the service");
    assert_eq!(def.protocol, Protocol::Grpc);
    assert_eq!(def.port, 9080);
    assert_eq!(def.origin.line, 2);
    let ups: Vec<&str> = def
        .upstreams
        .iter()
        .flatten()
        .map(|(u, _)| u.as_str())
        .collect();
    assert_eq!(ups, ["ratings", "details"]);

    let first = &svc.instances[0];
    assert_eq!(first.pos.line, 7);
    assert_eq!(
        first.instance,
        Instance {
            node: Some("vm-b".into()),
            address: "10.0.0.12".into(),
            port: 9081,
            mesh_port: 16006,
            labels: [("version", "v1"), ("zone", "a")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            weight: 3,
            healthy: true,
            draining: false,
            locality: Some("dc1".into()),
        }
    );
    let second = &svc.instances[1].instance;
    assert_eq!(second.node, None);
    assert_eq!(second.mesh_port, DEFAULT_MESH_PORT);
    assert_eq!(second.weight, 1);
    assert!(second.labels.is_empty());

    let route = &decls.routes["reviews"].route;
    assert_eq!(route.origin.line, 20);
    assert_eq!(route.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(
        route.retries,
        Some(Retries {
            attempts: 2,
            per_try_timeout: Some(Duration::from_millis(250)),
            on: vec!["5xx".into(), "connect-failure".into()],
            backoff: None,
        })
    );
    assert_eq!(route.rules.len(), 2);
    assert_eq!(route.rules[0].origin.line, 24);
    let m = &route.rules[0].matches;
    // Header names are folded to lower case, as Envoy sees them.
    assert_eq!(m.headers.get("x-canary").map(String::as_str), Some("1"));
    assert_eq!(m.path_prefix.as_deref(), Some("/api"));
    assert_eq!(m.method.as_deref(), Some("GET"));
    assert_eq!(
        route.rules[0].to,
        [Destination {
            subset: Some("v2".into()),
            weight: 1
        }]
    );
    assert!(route.rules[1].matches.is_empty());
    assert_eq!(route.rules[1].origin.line, 28);
    assert_eq!(
        route.rules[1].to,
        [
            Destination {
                subset: Some("v1".into()),
                weight: 99
            },
            Destination {
                subset: Some("v2".into()),
                weight: 1
            },
            Destination {
                subset: None,
                weight: 0
            },
        ]
    );
    let refs: Vec<&str> = decls.routes["reviews"]
        .subset_refs
        .iter()
        .map(|r| r.field.as_str())
        .collect();
    assert_eq!(
        refs,
        [
            "routes.reviews.rules[0].to[0].subset",
            "routes.reviews.rules[1].to[0].subset",
            "routes.reviews.rules[1].to[1].subset",
        ]
    );

    let policy = &decls.policies["reviews"].policy;
    assert_eq!(policy.origin.line, 31);
    assert_eq!(policy.subsets.len(), 2);
    assert_eq!(
        policy.subsets["v2"].get("version").map(String::as_str),
        Some("v2")
    );
    assert_eq!(policy.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(policy.connect_timeout, Some(Duration::from_secs(60)));
}

#[test]
fn defaults() {
    let decls = parse("[services.a]\nport = 80\n[policies.a]\n[routes.a]\n").expect("valid");
    let def = decls.services["a"].def.as_ref().expect("defined");
    assert_eq!(def.protocol, Protocol::Http);
    assert_eq!(def.upstreams, None);
    assert_eq!(
        decls.policies["a"].policy.load_balancer,
        LoadBalancer::RoundRobin
    );
    assert_eq!(
        decls.routes["a"].route,
        Route {
            service: "a".into(),
            origin: Origin {
                file: "reg/a.toml".into(),
                line: 4
            },
            ..Route::default()
        }
    );
}

#[test]
fn instances_only_table_does_not_define() {
    let decls =
        parse("[[services.a.instances]]\naddress = \"10.0.0.1\"\nport = 80\n").expect("valid");
    assert!(decls.services["a"].def.is_none());
    assert_eq!(decls.services["a"].instances.len(), 1);
    assert_eq!(decls.services["a"].pos.line, 1);
}

#[test]
fn unknown_key_is_rejected_with_its_line() {
    let p = problem("[services.a]\nport = 80\n\n[[services.a.instances]]\naddress = \"10.0.0.1\"\nport = 80\nlabel = { version = \"v1\" }\n");
    assert!(
        p.starts_with("7:1: services.a.instances[0].label: unknown field `label`"),
        "{p}"
    );
    let p = problem("[service.a]\nport = 80\n");
    assert!(
        p.starts_with("1:2: service: unknown field `service`"),
        "{p}"
    );
}

#[test]
fn syntax_error_has_line_and_column_and_one_line() {
    let p = problem("[services.a]\nport = 80\nprotocol = \"http\n");
    assert!(p.starts_with("3:17: "), "{p}");
    assert!(!p.contains('\n'), "{p}");
    let p = problem("[services.a]\nport = = 80\n");
    assert!(p.starts_with("2:8: "), "{p}");
}

#[test]
fn type_error_points_at_the_value() {
    let p = problem("[services.a]\nport = \"80\"\n");
    assert!(p.starts_with("2:8: "), "{p}");
    assert!(!p.contains('\n'), "{p}");
}

#[test]
fn semantic_errors_name_the_field() {
    let cases: &[(&str, &str)] = &[
        ("[services.a]\nport = 0\n", "2:8: services.a.port: 0 is not a port (1-65535)"),
        ("[services.a]\nport = 70000\n", "2:8: services.a.port: 70000 is not a port (1-65535)"),
        ("[services.a]\nport = 80\nprotocol = \"udp\"\n", "3:12: services.a.protocol: unknown protocol \"udp\""),
        ("[services.A]\nport = 80\n", "1:11: services.A: \"A\" is not a valid service name"),
        ("[services.\"a b\"]\nport = 80\n", "1:11: services.\"a b\": \"a b\" is not a valid service name"),
        ("[services.a]\nport = 80\nupstreams = [\"b\", \"b\"]\n", "3:19: services.a.upstreams[1]: \"b\" is listed twice"),
        ("[services.a]\nprotocol = \"tcp\"\n[[services.a.instances]]\naddress = \"h\"\nport = 1\n", "2:12: services.a.protocol: set without port"),
        ("[services.a]\n", "1:11: services.a.port: missing"),
        ("[[services.a.instances]]\naddress = \"\"\nport = 80\n", "2:11: services.a.instances[0].address: \"\" is not an IP address or host name"),
        ("[[services.a.instances]]\naddress = \"10.0.0.1:80\"\nport = 80\n", "2:11: services.a.instances[0].address: \"10.0.0.1:80\" is not"),
        ("[[services.a.instances]]\naddress = \"h\"\nport = 80\nweight = 0\n", "4:10: services.a.instances[0].weight: 0 is out of range (1-100000)"),
        ("[[services.a.instances]]\naddress = \"h\"\nport = 80\nmesh_port = 0\n", "4:13: services.a.instances[0].mesh_port: 0 is not a port"),
        ("[[services.a.instances]]\naddress = \"h\"\nport = 80\nnode = \" \"\n", "4:8: services.a.instances[0].node: must not be empty"),
        ("[routes.a]\ntimeout = \"3\"\n", "2:11: routes.a.timeout: \"3\" is not a duration"),
        ("[routes.a]\ntimeout = \"0s\"\n", "2:11: routes.a.timeout: must be more than 0"),
        ("[routes.a]\nretries = { attempts = 101 }\n", "2:24: routes.a.retries.attempts: 101 is out of range (0-100)"),
        ("[routes.a]\nretries = { attempts = 1, per_try_timeout = \"1x\" }\n", "2:45: routes.a.retries.per_try_timeout: \"1x\" is not a duration"),
        ("[routes.a]\nretries = { attempts = 1, on = [\"5xx\", \"5XX\"] }\n", "2:40: routes.a.retries.on[1]: unknown retry condition \"5XX\""),
        ("[routes.a]\n[[routes.a.rules]]\nto = []\n", "3:6: routes.a.rules[0].to: a rule needs at least one destination"),
        ("[routes.a]\n[[routes.a.rules]]\nto = [{ subset = \"v1\", weight = 0 }]\n", "3:6: routes.a.rules[0].to: every weight is 0"),
        ("[routes.a]\n[[routes.a.rules]]\nto = [{ subset = \"v1\", weight = 60000 }, { weight = 60000 }]\n", "3:6: routes.a.rules[0].to: the weights add up to 120000, more than 100000"),
        ("[routes.a]\n[[routes.a.rules]]\nto = [{ weight = -1 }]\n", "3:18: routes.a.rules[0].to[0].weight: -1 is out of range"),
        ("[routes.a]\n[[routes.a.rules]]\nto = [{ subset = \"v1\" }, { subset = \"v1\" }]\n", "3:26: routes.a.rules[0].to[1]: subset \"v1\" is listed twice"),
        ("[routes.a]\n[[routes.a.rules]]\nmatch = { path_prefix = \"api\" }\nto = [{}]\n", "3:25: routes.a.rules[0].match.path_prefix: \"api\" must start with '/'"),
        ("[routes.a]\n[[routes.a.rules]]\nmatch = { method = \"get\" }\nto = [{}]\n", "3:20: routes.a.rules[0].match.method: \"get\" is not an HTTP method"),
        ("[routes.a]\n[[routes.a.rules]]\nmatch = { headers = { \"a b\" = \"1\" } }\nto = [{}]\n", "3:23: routes.a.rules[0].match.headers: \"a b\" is not a header name"),
        ("[policies.a]\nsubsets = { v1 = {} }\n", "2:13: policies.a.subsets.v1: an empty selector selects every instance"),
        ("[policies.a]\nsubsets = { V1 = { version = \"v1\" } }\n", "2:13: policies.a.subsets.V1: \"V1\" is not a valid subset name"),
        ("[policies.a]\nload_balancer = \"fastest\"\n", "2:17: policies.a.load_balancer: unknown load_balancer \"fastest\""),
        ("[policies.a]\nconnect_timeout = \"1w\"\n", "2:19: policies.a.connect_timeout: \"1w\" is not a duration"),
    ];
    let mut wrong = Vec::new();
    for (text, expected) in cases {
        let got = problem(text);
        if !got.starts_with(expected) {
            wrong.push(format!(
                "for {text:?}\n  expected {expected}\n  got      {got}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_problem_in_a_file_is_reported() {
    let problems =
        parse("[services.a]\nport = 0\n[[services.a.instances]]\naddress = \"\"\nport = 0\n")
            .expect_err("bad");
    let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, [2, 4, 5]);
}

#[test]
fn columns_count_characters() {
    let p = problem("[services.a] # ünïcödé\nport = 0\n");
    assert!(p.starts_with("2:8:"), "{p}");
    let p = problem("# ünïcödé\n[services.a]\nport = 80\nprotocol = \"x\" # é\n");
    assert!(p.starts_with("4:12:"), "{p}");
    let p = problem("x = \"é\" \"\n");
    assert!(p.starts_with("1:"), "{p}");
}

#[test]
fn names() {
    for good in ["a", "reviews", "reviews-v2", "web.frontend", "my_svc", "0"] {
        assert!(is_valid_name(good), "{good}");
    }
    let long = "a".repeat(64);
    for bad in [
        "",
        "A",
        "-a",
        "a-",
        ".a",
        "a.",
        "a b",
        "a|b",
        "ü",
        long.as_str(),
    ] {
        assert!(!is_valid_name(bad), "{bad}");
    }
    assert_eq!(key("reviews"), "reviews");
    assert_eq!(key("a.b"), "\"a.b\"");
}

const AUTHZ: &str = r#"
[services.reviews]
port = 9080
mtls = "permissive"

[[authorization.reviews.rules]]
action = "deny"
paths = ["/admin/*"]

[[authorization.reviews.rules]]
action = "allow"
from = ["productpage", "ratings"]
methods = ["GET", "HEAD"]
paths = ["/reviews/*", "/health", "/*"]

[[authorization.reviews.rules]]
action = "allow"
"#;

#[test]
fn parses_authorization_and_mtls() {
    use crate::model::{AuthzAction, AuthzRule, MtlsMode, PathMatch};
    let decls = parse(AUTHZ).expect("valid");
    let def = decls.services["reviews"].def.as_ref().expect("defined");
    assert_eq!(def.mtls, MtlsMode::Permissive);

    let decl = &decls.authorizations["reviews"];
    assert_eq!(decl.pos.line, 6);
    let a = &decl.authorization;
    assert_eq!(a.service, "reviews");
    assert_eq!(a.origin.line, 6);
    assert_eq!(a.rules.len(), 3);
    assert_eq!(
        a.rules[0],
        AuthzRule {
            action: AuthzAction::Deny,
            from: vec![],
            methods: vec![],
            paths: vec![PathMatch::Prefix("/admin/".into())],
            origin: Origin {
                file: "reg/a.toml".into(),
                line: 6
            },
        }
    );
    let allow = &a.rules[1];
    assert_eq!(allow.action, AuthzAction::Allow);
    assert_eq!(allow.from, ["productpage", "ratings"]);
    assert_eq!(allow.methods, ["GET", "HEAD"]);
    assert_eq!(
        allow.paths,
        [
            PathMatch::Prefix("/reviews/".into()),
            PathMatch::Exact("/health".into()),
            PathMatch::Prefix("/".into()),
        ]
    );
    // An empty rule: any authenticated peer, any request.
    assert!(a.rules[2].from.is_empty() && a.rules[2].methods.is_empty());

    let from: Vec<(&str, &str, usize)> = decl
        .from_refs
        .iter()
        .map(|r| (r.field.as_str(), r.service.as_str(), r.pos.line))
        .collect();
    assert_eq!(
        from,
        [
            ("authorization.reviews.rules[1].from[0]", "productpage", 12),
            ("authorization.reviews.rules[1].from[1]", "ratings", 12),
        ]
    );
    let http_only: Vec<&str> = decl.http_only.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        http_only,
        [
            "authorization.reviews.rules[0].paths",
            "authorization.reviews.rules[1].methods",
            "authorization.reviews.rules[1].paths",
        ]
    );
}

#[test]
fn mtls_defaults_to_strict() {
    let decls = parse("[services.a]\nport = 80\n").expect("valid");
    let def = decls.services["a"].def.as_ref().expect("defined");
    assert_eq!(def.mtls, crate::model::MtlsMode::Strict);
}

#[test]
fn health_is_agent_unless_declared_static() {
    let decls = parse("[services.a]\nport = 80\n").expect("valid");
    let def = decls.services["a"].def.as_ref().expect("defined");
    assert_eq!(def.health, crate::model::HealthMode::Agent);
    let decls = parse("[services.a]\nport = 80\nhealth = \"static\"\n").expect("valid");
    let def = decls.services["a"].def.as_ref().expect("defined");
    assert_eq!(def.health, crate::model::HealthMode::Static);
    let problems = parse("[services.a]\nport = 80\nhealth = \"checked\"\n").unwrap_err();
    assert_eq!(
        problems[0].to_string(),
        "reg/a.toml:3:10: services.a.health: unknown health mode \"checked\" (expected agent or static)"
    );
}

#[test]
fn authorization_errors_name_the_field() {
    let rule = |body: &str| format!("[[authorization.a.rules]]\n{body}\n");
    let cases: Vec<(String, &str)> = vec![
        ("[services.a]\nport = 80\nmtls = \"on\"\n".into(), "3:8: services.a.mtls: unknown mtls mode \"on\" (expected strict or permissive)"),
        ("[services.a]\nmtls = \"strict\"\n[[services.a.instances]]\naddress = \"h\"\nport = 1\n".into(), "2:8: services.a.mtls: set without port"),
        ("[authorization.a]\n".into(), "1:16: authorization.a.rules: missing"),
        ("[authorization.a]\nrules = []\n".into(), "2:9: authorization.a.rules: an authorization needs at least one rule"),
        ("[authorization.A]\nrules = [{ action = \"allow\" }]\n".into(), "1:16: authorization.A: \"A\" is not a valid service name"),
        (rule("from = [\"b\"]"), "1:"),
        (rule("action = \"permit\""), "2:10: authorization.a.rules[0].action: unknown action \"permit\" (expected allow or deny)"),
        (rule("action = \"allow\"\nwho = [\"b\"]"), "3:1: authorization.a.rules[0].who: unknown field `who`"),
        (rule("action = \"allow\"\nfrom = []"), "3:8: authorization.a.rules[0].from: must not be empty (omit it for any authenticated peer)"),
        (rule("action = \"allow\"\nfrom = [\"B\"]"), "3:9: authorization.a.rules[0].from[0]: \"B\" is not a valid service name"),
        (rule("action = \"allow\"\nfrom = [\"b\", \"b\"]"), "3:14: authorization.a.rules[0].from[1]: \"b\" is listed twice"),
        (rule("action = \"allow\"\nmethods = []"), "3:11: authorization.a.rules[0].methods: must not be empty (omit it for any method)"),
        (rule("action = \"allow\"\nmethods = [\"get\"]"), "3:12: authorization.a.rules[0].methods[0]: \"get\" is not an HTTP method"),
        (rule("action = \"allow\"\nmethods = [\"GET\", \"GET\"]"), "3:19: authorization.a.rules[0].methods[1]: \"GET\" is listed twice"),
        (rule("action = \"allow\"\npaths = []"), "3:9: authorization.a.rules[0].paths: must not be empty (omit it for any path)"),
        (rule("action = \"allow\"\npaths = [\"reviews\"]"), "3:10: authorization.a.rules[0].paths[0]: \"reviews\" must start with '/'"),
        (rule("action = \"allow\"\npaths = [\"/a*\"]"), "3:10: authorization.a.rules[0].paths[0]: \"/a*\": '*' is only allowed as a trailing \"/*\""),
        (rule("action = \"allow\"\npaths = [\"/*/b\"]"), "3:10: authorization.a.rules[0].paths[0]: \"/*/b\": '*' is only allowed"),
        (rule("action = \"allow\"\npaths = [\"/a?x=1\"]"), "3:10: authorization.a.rules[0].paths[0]: \"/a?x=1\": a path has no query"),
        (rule("action = \"deny\"\npaths = [\"/a/../admin\"]"), "3:10: authorization.a.rules[0].paths[0]: \"/a/../admin\" is not a normalized path"),
        (rule("action = \"deny\"\npaths = [\"//admin/*\"]"), "3:10: authorization.a.rules[0].paths[0]: \"//admin/*\" is not a normalized path"),
        (rule("action = \"deny\"\npaths = [\"/%61dmin\"]"), "3:10: authorization.a.rules[0].paths[0]: \"/%61dmin\": percent-encoding is not supported"),
        (rule("action = \"deny\"\npaths = [\"/a\", \"/a\"]"), "3:16: authorization.a.rules[0].paths[1]: \"/a\" is listed twice"),
    ];
    let mut wrong = Vec::new();
    for (text, expected) in &cases {
        let got = problem(text);
        if !got.starts_with(expected) {
            wrong.push(format!(
                "for {text:?}\n  expected {expected}\n  got      {got}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
