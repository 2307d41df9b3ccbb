//! The rules API: the pure parts (JSON -> TOML, versions, preconditions), then the HTTP
//! surface on a registry in a temporary directory.

use axum::body::Body;
use axum::http::{Method, Request};
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::*;

// ---- pure parts ----

#[test]
fn json_becomes_the_toml_an_operator_would_write() {
    let spec = json!({
        "timeout": "3s",
        "retries": {"attempts": 2, "per_try_timeout": "1s", "on": ["5xx", "connect-failure"]},
        "rules": [
            {"match": {"headers": {"x-canary": "1"}}, "to": [{"subset": "v2"}]},
            {"to": [{"subset": "v1", "weight": 99}, {"subset": "v2", "weight": 1}]}
        ]
    });
    let table = json_to_table(Kind::Routes, "reviews", &spec).expect("converts");
    let text = render(Kind::Routes, "reviews", &table);
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        body.trim(),
        r#"[routes.reviews]
retries = { attempts = 2, on = ["5xx", "connect-failure"], per_try_timeout = "1s" }
timeout = "3s"

[[routes.reviews.rules]]
match = { headers = { x-canary = "1" } }
to = [{ subset = "v2" }]

[[routes.reviews.rules]]
to = [{ subset = "v1", weight = 99 }, { subset = "v2", weight = 1 }]"#
    );
    // It reads back as the same table, and as the same JSON.
    let doc: toml::Table = toml::from_str(&text).expect("valid TOML");
    assert_eq!(doc["routes"]["reviews"], toml::Value::Table(table.clone()));
    assert_eq!(toml_to_json(&toml::Value::Table(table)), spec);
}

#[test]
fn odd_keys_are_quoted_and_numbers_kept() {
    let spec =
        json!({"subsets": {"v1": {"app.kubernetes.io/version": "v1", "a\"b": "x"}}, "f": 1.5});
    let table = json_to_table(Kind::Policies, "my.svc", &spec).expect("converts");
    let text = render(Kind::Policies, "my.svc", &table);
    assert!(text.contains("[policies.\"my.svc\"]\n"), "{text}");
    let doc: toml::Table = toml::from_str(&text).expect("valid TOML");
    assert_eq!(doc["policies"]["my.svc"], toml::Value::Table(table));
    assert_eq!(
        doc["policies"]["my.svc"]["subsets"]["v1"]["app.kubernetes.io/version"].as_str(),
        Some("v1")
    );
    assert_eq!(doc["policies"]["my.svc"]["f"].as_float(), Some(1.5));
}

#[test]
fn json_that_toml_cannot_hold_is_refused_with_its_path() {
    let err = json_to_table(
        Kind::Routes,
        "reviews",
        &json!({"rules": [{"to": [{"subset": null}]}]}),
    )
    .expect_err("null");
    assert_eq!(
        err,
        "routes.reviews.rules[0].to[0].subset: null is not allowed (leave the key out instead)"
    );
    let err =
        json_to_table(Kind::Routes, "reviews", &json!({"timeout": u64::MAX})).expect_err("too big");
    assert!(
        err.starts_with("routes.reviews.timeout: 18446744073709551615 is out of range"),
        "{err}"
    );
    let err = json_to_table(Kind::Routes, "reviews", &json!(["a"])).expect_err("not object");
    assert!(err.contains("must be a JSON object"), "{err}");
}

#[test]
fn versions_are_short_content_hashes() {
    let v = version_of("[routes.reviews]\n");
    assert_eq!(v.len(), 16);
    assert!(v.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(v, version_of("[routes.reviews]\n"));
    assert_ne!(v, version_of("[routes.reviews]\ntimeout = \"1s\"\n"));
}

fn status(r: Result<bool, ApiError>) -> Result<bool, StatusCode> {
    r.map_err(|e| e.status)
}

#[test]
fn preconditions() {
    let k = Kind::Routes;
    let m = |v: &str| Precondition::IfMatch(vec![v.to_string()]);
    let cur = || Some("abc".to_string());
    // Create: no header or If-None-Match: *; an If-Match for a missing object is stale.
    assert_eq!(
        status(allowed(k, "r", None, &Precondition::None, false)),
        Ok(true)
    );
    assert_eq!(
        status(allowed(k, "r", None, &Precondition::IfNoneMatchAny, false)),
        Ok(true)
    );
    assert_eq!(
        status(allowed(k, "r", None, &m("abc"), false)),
        Err(StatusCode::CONFLICT)
    );
    // Replace/delete: only with the current version.
    assert_eq!(status(allowed(k, "r", cur(), &m("abc"), false)), Ok(false));
    assert_eq!(
        status(allowed(k, "r", cur(), &m("abd"), false)),
        Err(StatusCode::CONFLICT)
    );
    assert_eq!(
        status(allowed(k, "r", cur(), &Precondition::None, true)),
        Err(StatusCode::CONFLICT)
    );
    assert_eq!(
        status(allowed(k, "r", cur(), &Precondition::IfNoneMatchAny, false)),
        Err(StatusCode::CONFLICT)
    );
    let e = allowed(k, "r", cur(), &Precondition::None, false).expect_err("conflict");
    assert_eq!(
        e.errors,
        ["routes.r exists (version \"abc\"); send If-Match: \"abc\" to replace it"]
    );
}

#[test]
fn precondition_headers() {
    let parse = |pairs: &[(&'static str, &'static str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        Precondition::from_headers(&h).map_err(|e| e.status)
    };
    assert_eq!(parse(&[]), Ok(Precondition::None));
    assert_eq!(
        parse(&[("if-match", "\"a1\", W/\"b2\"")]),
        Ok(Precondition::IfMatch(vec!["a1".into(), "b2".into()]))
    );
    assert_eq!(
        parse(&[("if-match", "a1")]),
        Ok(Precondition::IfMatch(vec!["a1".into()]))
    );
    assert_eq!(
        parse(&[("if-none-match", "*")]),
        Ok(Precondition::IfNoneMatchAny)
    );
    assert_eq!(
        parse(&[("if-none-match", "\"x\"")]),
        Err(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        parse(&[("if-match", "\"a\""), ("if-none-match", "*")]),
        Err(StatusCode::BAD_REQUEST)
    );
}

#[test]
fn token_comparison_and_debug_hides_the_token() {
    assert!(tokens_match("s3cret", "s3cret"));
    assert!(!tokens_match("s3cre", "s3cret"));
    assert!(!tokens_match("", "s3cret"));
    let access = Access::Token {
        token: "s3cret".into(),
        reads_need_token: true,
    };
    assert!(!format!("{access:?}").contains("s3cret"));
}

// ---- HTTP ----

const TOKEN: &str = "t0ken";

pub(crate) const SERVICES: &str = r#"
[services.reviews]
port = 9080

[[services.reviews.instances]]
address = "10.0.0.12"
port = 9080
labels = { version = "v1" }

[[services.reviews.instances]]
address = "10.0.0.13"
port = 9080
labels = { version = "v2" }

[services.ratings]
port = 9081

[services.details]
port = 9082
"#;

pub(crate) const OPERATOR_RULES: &str = r#"
[policies.reviews]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }

[routes.ratings]
timeout = "2s"
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    operator_file: PathBuf,
    rules: PathBuf,
    router: Router,
    api: Arc<RulesApi>,
}

fn fixture(access: Access) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = dir.path().join("registry.d");
    std::fs::create_dir(&registry).expect("mkdir");
    std::fs::write(registry.join("services.toml"), SERVICES).expect("write");
    let operator_file = registry.join("rules.toml");
    std::fs::write(&operator_file, OPERATOR_RULES).expect("write");
    let rules = dir.path().join("state").join(RULES_DIR);
    let api =
        Arc::new(RulesApi::new(rules.clone(), vec![registry, rules.clone()], access).expect("api"));
    Fixture {
        _dir: dir,
        operator_file,
        rules,
        router: Arc::clone(&api).router(),
        api,
    }
}

fn token_access() -> Access {
    Access::Token {
        token: TOKEN.into(),
        reads_need_token: true,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn etag(&self) -> String {
        self.headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .expect("ETag")
            .to_string()
    }

    fn errors(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn call(
    router: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let response = router
        .clone()
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn canary(v2_weight: i64) -> Value {
    json!({
        "timeout": "3s",
        "rules": [
            {"match": {"headers": {"x-canary": "1"}}, "to": [{"subset": "v2"}]},
            {"to": [{"subset": "v1", "weight": 100 - v2_weight}, {"subset": "v2", "weight": v2_weight}]}
        ]
    })
}

#[tokio::test]
async fn create_read_replace_delete_with_versions() {
    let f = fixture(token_access());
    let r = &f.router;
    let t = Some(TOKEN);
    let file = f.rules.join("routes-reviews.toml");

    // Create.
    let created = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[],
        Some(canary(1)),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let v1 = created.body["version"]
        .as_str()
        .expect("version")
        .to_string();
    assert_eq!(created.etag(), format!("\"{v1}\""));
    assert_eq!(created.headers[header::LOCATION], "/v1/routes/reviews");
    assert_eq!(created.body["managed"], true);
    assert_eq!(created.body["spec"], canary(1));
    let text = std::fs::read_to_string(&file).expect("written");
    assert!(
        text.starts_with("# Managed by the Pilotfish rules API"),
        "{text}"
    );
    assert_eq!(version_of(&text), v1);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&f.rules), 0o700);
    assert_eq!(mode(&file), 0o600);
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(&f.rules).expect("ls").count(), 1);

    // Read.
    let got = call(r, Method::GET, "/v1/routes/reviews", t, &[], None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.etag(), format!("\"{v1}\""));
    assert_eq!(
        got.body,
        json!({"service": "reviews", "version": v1, "source": file.display().to_string(),
               "managed": true, "spec": canary(1)})
    );

    // Creating again, or replacing without a version or with a stale one: 409.
    let again = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[("if-none-match", "*")],
        Some(canary(50)),
    )
    .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let blind = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[],
        Some(canary(50)),
    )
    .await;
    assert_eq!(blind.status, StatusCode::CONFLICT);
    assert!(
        blind.errors()[0].contains(&format!("If-Match: \"{v1}\"")),
        "{:?}",
        blind.errors()
    );
    let stale = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[("if-match", "\"0000000000000000\"")],
        Some(canary(50)),
    )
    .await;
    assert_eq!(stale.status, StatusCode::CONFLICT);

    // Replace with the right version.
    let if_match = format!("\"{v1}\"");
    let replaced = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[("if-match", &if_match)],
        Some(canary(50)),
    )
    .await;
    assert_eq!(replaced.status, StatusCode::OK, "{:?}", replaced.body);
    let v2 = replaced.body["version"]
        .as_str()
        .expect("version")
        .to_string();
    assert_ne!(v2, v1);
    // The old version is stale now.
    let late = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[("if-match", &if_match)],
        Some(canary(10)),
    )
    .await;
    assert_eq!(late.status, StatusCode::CONFLICT);

    // A hand edit of the file changes the version too.
    let mut edited = std::fs::read_to_string(&file).expect("read");
    edited.push_str("# edited by hand\n");
    std::fs::write(&file, &edited).expect("write");
    let v3 = version_of(&edited);
    let after_edit = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[("if-match", &format!("\"{v2}\""))],
        Some(canary(10)),
    )
    .await;
    assert_eq!(after_edit.status, StatusCode::CONFLICT);
    assert!(
        after_edit.errors()[0].contains(&v3),
        "{:?}",
        after_edit.errors()
    );

    // Delete: needs the version too.
    let blind = call(r, Method::DELETE, "/v1/routes/reviews", t, &[], None).await;
    assert_eq!(blind.status, StatusCode::CONFLICT);
    let deleted = call(
        r,
        Method::DELETE,
        "/v1/routes/reviews",
        t,
        &[("if-match", &format!("\"{v3}\""))],
        None,
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{:?}", deleted.body);
    assert!(!file.exists());
    let gone = call(r, Method::GET, "/v1/routes/reviews", t, &[], None).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.errors(), ["no routes.reviews"]);
    let gone = call(
        r,
        Method::DELETE,
        "/v1/routes/reviews",
        t,
        &[("if-match", &format!("\"{v3}\""))],
        None,
    )
    .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    // Recreating with the old version: the client thinks it still exists.
    let stale = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[("if-match", &format!("\"{v3}\""))],
        Some(canary(1)),
    )
    .await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn invalid_objects_are_refused_with_file_line_and_column() {
    let f = fixture(token_access());
    let r = &f.router;
    let t = Some(TOKEN);
    let file = f.rules.join("routes-reviews.toml");

    let mut spec = canary(1);
    spec["rules"][1]["to"][1]["subset"] = json!("v3");
    let bad = call(r, Method::PUT, "/v1/routes/reviews", t, &[], Some(spec)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let errors = bad.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let prefix = format!("{}:", file.display());
    assert!(errors[0].starts_with(&prefix), "{errors:?}");
    assert!(
        errors[0].ends_with(
            "routes.reviews.rules[1].to[1].subset: unknown subset \"v3\" of service \"reviews\" (declared subsets: v1, v2)"
        ),
        "{errors:?}"
    );
    // file:line:col, and the line is the second rule's.
    let position: Vec<&str> = errors[0][prefix.len()..].splitn(3, ':').collect();
    assert_eq!(position[0], "13", "{errors:?}");
    assert!(!file.exists(), "nothing is written");

    // Unknown fields, through the registry's own parser.
    let bad = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[],
        Some(json!({"timeout": "3s", "retry": 2})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.errors()[0].contains("unknown field `retry`"),
        "{:?}",
        bad.errors()
    );
    // Null, bad JSON, bad names, unknown services.
    let bad = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[],
        Some(json!({"timeout": null})),
    )
    .await;
    assert_eq!(
        bad.errors(),
        ["routes.reviews.timeout: null is not allowed (leave the key out instead)"]
    );
    let bad = call(
        r,
        Method::PUT,
        "/v1/routes/Reviews",
        t,
        &[],
        Some(json!({})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let bad = call(r, Method::PUT, "/v1/routes/nosuch", t, &[], Some(json!({}))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.errors()[0].contains("routes.nosuch: unknown service \"nosuch\""),
        "{:?}",
        bad.errors()
    );
    assert_eq!(std::fs::read_dir(&f.rules).expect("ls").count(), 0);
}

#[tokio::test]
async fn a_delete_that_breaks_another_object_is_refused() {
    let f = fixture(token_access());
    let r = &f.router;
    let t = Some(TOKEN);
    let policy = json!({"subsets": {"v1": {"version": "v1"}}});
    let p = call(r, Method::PUT, "/v1/policies/details", t, &[], Some(policy)).await;
    assert_eq!(p.status, StatusCode::CREATED, "{:?}", p.body);
    let route = json!({"rules": [{"to": [{"subset": "v1"}]}]});
    let rt = call(r, Method::PUT, "/v1/routes/details", t, &[], Some(route)).await;
    assert_eq!(rt.status, StatusCode::CREATED, "{:?}", rt.body);

    let version = p.body["version"].as_str().expect("version");
    let del = call(
        r,
        Method::DELETE,
        "/v1/policies/details",
        t,
        &[("if-match", &format!("\"{version}\""))],
        None,
    )
    .await;
    assert_eq!(del.status, StatusCode::BAD_REQUEST);
    let routes_file = f.rules.join("routes-details.toml").display().to_string();
    assert!(
        del.errors()[0].starts_with(&routes_file),
        "{:?}",
        del.errors()
    );
    assert!(
        del.errors()[0].contains("no subsets declared"),
        "{:?}",
        del.errors()
    );
    assert!(f.rules.join("policies-details.toml").exists());
}

#[tokio::test]
async fn operators_files_are_listed_but_not_changed() {
    let f = fixture(token_access());
    let r = &f.router;
    let t = Some(TOKEN);
    let operator = f.operator_file.display().to_string();

    let put = call(
        r,
        Method::PUT,
        "/v1/routes/ratings",
        t,
        &[],
        Some(json!({"timeout": "1s"})),
    )
    .await;
    assert_eq!(put.status, StatusCode::CONFLICT);
    assert!(put.errors()[0].contains(&operator), "{:?}", put.errors());
    let del = call(r, Method::DELETE, "/v1/routes/ratings", t, &[], None).await;
    assert_eq!(del.status, StatusCode::CONFLICT);
    assert!(del.errors()[0].contains(&operator), "{:?}", del.errors());
    let put = call(
        r,
        Method::PUT,
        "/v1/policies/reviews",
        t,
        &[],
        Some(json!({})),
    )
    .await;
    assert_eq!(put.status, StatusCode::CONFLICT);

    let got = call(r, Method::GET, "/v1/routes/ratings", t, &[], None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["managed"], false);
    assert_eq!(got.body["source"], operator);
    assert_eq!(got.body["spec"], json!({"timeout": "2s"}));
    assert_eq!(got.body["version"], version_of(OPERATOR_RULES));

    let created = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        t,
        &[],
        Some(canary(1)),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let list = call(r, Method::GET, "/v1/routes", t, &[], None).await;
    assert_eq!(list.status, StatusCode::OK);
    let items: Vec<(String, bool)> = list.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["service"].as_str().unwrap_or("").to_string(),
                i["managed"] == true,
            )
        })
        .collect();
    assert_eq!(
        items,
        [
            ("ratings".to_string(), false),
            ("reviews".to_string(), true)
        ]
    );
    let policies = call(r, Method::GET, "/v1/policies", t, &[], None).await;
    assert_eq!(policies.body["items"][0]["service"], "reviews");

    // Writes are counted by outcome; reads are not writes.
    let anonymous = call(r, Method::DELETE, "/v1/routes/reviews", None, &[], None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let m = f.api.metrics();
    assert_eq!(m.writes(Kind::Routes, "conflict"), 2);
    assert_eq!(m.writes(Kind::Policies, "conflict"), 1);
    assert_eq!(m.writes(Kind::Routes, "applied"), 1);
    assert_eq!(m.writes(Kind::Routes, "refused"), 1);
    assert_eq!(m.writes(Kind::Policies, "applied"), 0);
}

#[tokio::test]
async fn tokens_guard_writes_and_reads() {
    let f = fixture(token_access());
    let r = &f.router;
    let none = call(r, Method::GET, "/v1/routes", None, &[], None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers[header::WWW_AUTHENTICATE], "Bearer");
    let wrong = call(r, Method::GET, "/v1/routes", Some("nope"), &[], None).await;
    assert_eq!(
        wrong.status,
        StatusCode::UNAUTHORIZED,
        "RFC 6750: an invalid token is 401"
    );
    assert_eq!(wrong.headers[header::WWW_AUTHENTICATE], "Bearer");
    let put = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        None,
        &[],
        Some(canary(1)),
    )
    .await;
    assert_eq!(put.status, StatusCode::UNAUTHORIZED);
    let put = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        Some("nope"),
        &[],
        Some(canary(1)),
    )
    .await;
    assert_eq!(put.status, StatusCode::UNAUTHORIZED);
    let del = call(
        r,
        Method::DELETE,
        "/v1/routes/reviews",
        Some("t0ke"),
        &[],
        None,
    )
    .await;
    assert_eq!(del.status, StatusCode::UNAUTHORIZED);
    assert!(!f.rules.join("routes-reviews.toml").exists());

    // Reads may be open; writes never are.
    let f = fixture(Access::Token {
        token: TOKEN.into(),
        reads_need_token: false,
    });
    let r = &f.router;
    assert_eq!(
        call(r, Method::GET, "/v1/routes", None, &[], None)
            .await
            .status,
        StatusCode::OK
    );
    let put = call(
        r,
        Method::PUT,
        "/v1/routes/reviews",
        None,
        &[],
        Some(canary(1)),
    )
    .await;
    assert_eq!(put.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_a_token_the_api_is_disabled_unless_insecure() {
    let f = fixture(Access::Disabled(DISABLED.into()));
    let reply = call(&f.router, Method::GET, "/v1/routes", Some(TOKEN), &[], None).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.errors(), ["rules API disabled: set [api] token_file"]);

    let f = fixture(Access::Open);
    let put = call(
        &f.router,
        Method::PUT,
        "/v1/routes/reviews",
        None,
        &[],
        Some(canary(1)),
    )
    .await;
    assert_eq!(put.status, StatusCode::CREATED);
}

#[tokio::test]
async fn bodies_are_limited() {
    let f = fixture(token_access());
    let big = json!({"timeout": "x".repeat(BODY_LIMIT + 1)});
    let reply = router_status(&f.router, big).await;
    assert_eq!(reply, StatusCode::PAYLOAD_TOO_LARGE);
}

async fn router_status(router: &Router, body: Value) -> StatusCode {
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/v1/routes/reviews")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from(body.to_string()))
        .expect("request");
    router
        .clone()
        .oneshot(request)
        .await
        .expect("infallible")
        .status()
}

#[tokio::test]
async fn from_config_reads_the_token_and_adds_rules_d_to_the_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("api-token"), format!("  {TOKEN}\n")).expect("write");
    let text = "state_dir = \"state\"\n[registry.files]\npaths = [\"registry.d\"]\n\
                [api]\ntoken_file = \"api-token\"\n";
    let config = Config::parse(text, &dir.path().join("discovery.toml")).expect("config");
    let api = RulesApi::from_config(&config).expect("api");
    let rules = dir.path().join("state").join(RULES_DIR);
    assert!(rules.is_dir());
    assert_eq!(api.registry_paths(), [dir.path().join("registry.d"), rules]);
    assert_eq!(
        api.access,
        Access::Token {
            token: TOKEN.into(),
            reads_need_token: true
        }
    );

    std::fs::write(dir.path().join("api-token"), "\n").expect("write");
    assert!(matches!(
        RulesApi::from_config(&config),
        Err(RulesApiError::EmptyToken { .. })
    ));
    let text = "state_dir = \"state\"\n[registry.files]\npaths = [\"registry.d\"]\n";
    let config = Config::parse(text, &dir.path().join("discovery.toml")).expect("config");
    assert_eq!(
        RulesApi::from_config(&config).expect("api").access,
        Access::Disabled(DISABLED.into())
    );
    // Without a token file, an unwritable state_dir turns the API off instead of stopping
    // discovery.
    let unwritable =
        "insecure = true\nstate_dir = \"/proc/nonexistent\"\n[registry.files]\npaths = [\"r\"]\n";
    let config = Config::parse(unwritable, &dir.path().join("discovery.toml")).expect("config");
    let api = RulesApi::from_config(&config).expect("api");
    assert!(
        matches!(&api.access, Access::Disabled(r) if r.contains("cannot create")),
        "{:?}",
        api.access
    );
    let config = Config::parse(
        &format!("insecure = true\n{text}"),
        &dir.path().join("discovery.toml"),
    )
    .expect("config");
    assert_eq!(
        RulesApi::from_config(&config).expect("api").access,
        Access::Open
    );
}

#[tokio::test]
async fn authorizations_use_the_same_mechanics() {
    let f = fixture(token_access());
    let r = &f.router;
    let t = Some(TOKEN);
    let spec = json!({"rules": [{"action": "allow", "from": ["ratings"], "methods": ["GET"]}]});
    let created = call(
        r,
        Method::PUT,
        "/v1/authorizations/reviews",
        t,
        &[],
        Some(spec.clone()),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert!(f.rules.join("authorization-reviews.toml").exists());
    let got = call(r, Method::GET, "/v1/authorizations/reviews", t, &[], None).await;
    assert_eq!(got.body["spec"], spec);
    let bad = json!({"rules": [{"action": "allow", "from": ["nosuch"]}]});
    let v = created.body["version"].as_str().expect("version");
    let refused = call(
        r,
        Method::PUT,
        "/v1/authorizations/reviews",
        t,
        &[("if-match", v)],
        Some(bad),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        refused.body
    );
}
