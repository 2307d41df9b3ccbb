//! `pilotfish-ctl`: the command-line client of discovery's HTTP API.
//!
//! ```text
//! pilotfish-ctl [--url http://127.0.0.1:15014] [--token-file FILE] routes|policies|authorizations
//!     list | get SVC | put SVC FILE.json|FILE.toml|- [--if-match VERSION | --create]
//!     | delete SVC [--if-match VERSION]
//! pilotfish-ctl proxy-status [--output table|json]
//! pilotfish-ctl proxy-config NODE [clusters|endpoints|listeners|routes|secrets|all]
//!     [--diff] [--output table|json]
//! ```
//!
//! `proxy-status` exits 0 when every connected proxy is synced, 2 when any is stale or NACKing.
//! `proxy-config --diff` exits 0 when the host's Envoy holds what discovery sends it, 2 when not.
//!
//! `put` without `--if-match` reads the current version first, so replacing is one command;
//! `--create` refuses to replace. Defaults come from `PILOTFISH_URL` and `PILOTFISH_TOKEN_FILE`.
//! Exit codes: 0 ok, 1 the call failed (every error the API gave is printed, one per line),
//! 64 bad usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt as _, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pilotfish_discovery::rules_api::toml_to_json;
use serde_json::Value;

const DEFAULT_URL: &str = "http://127.0.0.1:15014";
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "pilotfish-ctl",
    version,
    about = "Read and change Pilotfish routes and policies through discovery's rules API"
)]
struct Cli {
    /// Discovery's HTTP address [env: PILOTFISH_URL; default: http://127.0.0.1:15014].
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// A file holding the API token ([api] token_file on discovery) [env: PILOTFISH_TOKEN_FILE].
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Routes (`[routes.<service>]`).
    Routes {
        #[command(subcommand)]
        command: Command,
    },
    /// Policies (`[policies.<service>]`).
    Policies {
        #[command(subcommand)]
        command: Command,
    },
    /// Authorization rules (`[authorization.<service>]`).
    Authorizations {
        #[command(subcommand)]
        command: Command,
    },
    /// One line per proxy discovery knows (connected, or seen in the last hour): where each
    /// resource type stands. Exit 0 when all connected proxies are synced, 2 when not.
    ProxyStatus {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// What a host's Envoy holds, read through its agent's connection to discovery: one line
    /// per resource, or with `--output json` Envoy's config dump (private keys redacted).
    /// `--diff` compares it with what discovery sends that host (exit 2 when they differ).
    ProxyConfig {
        /// The host's node name.
        node: String,
        #[arg(value_enum, default_value = "all")]
        kind: ConfigKind,
        /// Compare with what discovery sends instead of listing.
        #[arg(long)]
        diff: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ConfigKind {
    Clusters,
    Endpoints,
    Listeners,
    Routes,
    Secrets,
    All,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    Routes,
    Policies,
    Authorizations,
}

impl Kind {
    fn segment(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Policies => "policies",
            Kind::Authorizations => "authorizations",
        }
    }

    /// The table in registry files (`[routes.<svc>]`), to find the object in a TOML file.
    fn table(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Policies => "policies",
            Kind::Authorizations => "authorization",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every object of this kind, with its version and the file that declares it.
    List,
    /// One object as JSON (with its version).
    Get { service: String },
    /// Create or replace an object from a JSON or TOML file ("-": JSON on stdin).
    Put {
        service: String,
        /// The object's table as JSON (also what `get` prints), or a TOML file with
        /// [<kind>.<service>] or just the table's keys.
        file: PathBuf,
        /// Replace only this version (default: whatever version is there now).
        #[arg(long, value_name = "VERSION", conflicts_with = "create")]
        if_match: Option<String>,
        /// Only create; fail if it exists.
        #[arg(long)]
        create: bool,
    },
    /// Delete an object.
    Delete {
        service: String,
        /// Delete only this version (default: whatever version is there now).
        #[arg(long, value_name = "VERSION")]
        if_match: Option<String>,
    },
}

/// A usage problem found after parsing (a bad file, a bad URL): exit 64.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// The API answered with an error: its messages are printed one per line; exit 1.
#[derive(Debug)]
struct ApiFailed {
    status: StatusCode,
    errors: Vec<String>,
}

impl std::fmt::Display for ApiFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)
    }
}

impl std::error::Error for ApiFailed {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pilotfish-ctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(failed) = e.downcast_ref::<ApiFailed>() {
                if failed.errors.is_empty() {
                    eprintln!("pilotfish-ctl: {failed}");
                }
                for line in &failed.errors {
                    eprintln!("{line}");
                }
                return ExitCode::FAILURE;
            }
            eprintln!("pilotfish-ctl: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let url = cli
        .url
        .or_else(|| {
            std::env::var("PILOTFISH_URL")
                .ok()
                .filter(|u| !u.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    if !url.starts_with("http://") {
        bail!(Usage(format!(
            "--url {url}: only http:// URLs are supported (the API is on discovery's local HTTP port)"
        )));
    }
    let token_file = cli.token_file.or_else(|| {
        std::env::var_os("PILOTFISH_TOKEN_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let token = match token_file {
        Some(path) => Some(read_token(&path)?),
        None => None,
    };
    let api = Api {
        base: url.trim_end_matches('/').to_string(),
        token,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let (kind, command) = match cli.command {
        Top::Routes { command } => (Kind::Routes, command),
        Top::Policies { command } => (Kind::Policies, command),
        Top::Authorizations { command } => (Kind::Authorizations, command),
        Top::ProxyStatus { output } => return proxy_status(&api, output).await,
        Top::ProxyConfig {
            node,
            kind,
            diff,
            output,
        } => return proxy_config(&api, &node, kind, diff, output).await,
    };
    let object_path = |service: &str| format!("/v1/{}/{service}", kind.segment());

    match command {
        Command::List => {
            let reply = api
                .call(Method::GET, &format!("/v1/{}", kind.segment()), &[], None)
                .await?
                .ok()?;
            let items = reply.body["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                println!("no {}", kind.segment());
            }
            for item in items {
                let managed = if item["managed"] == true {
                    "api"
                } else {
                    "file"
                };
                println!(
                    "{:<24} {:<16} {:<4} {}",
                    item["service"].as_str().unwrap_or("?"),
                    item["version"].as_str().unwrap_or("?"),
                    managed,
                    item["source"].as_str().unwrap_or("?"),
                );
            }
        }
        Command::Get { service } => {
            let reply = api
                .call(Method::GET, &object_path(&service), &[], None)
                .await?
                .ok()?;
            println!("{}", serde_json::to_string_pretty(&reply.body)?);
        }
        Command::Put {
            service,
            file,
            if_match,
            create,
        } => {
            let spec = read_spec(&file, kind, &service)?;
            let precondition = match (if_match, create) {
                (Some(v), _) => Some((header::IF_MATCH, quoted(&v))),
                (None, true) => Some((header::IF_NONE_MATCH, "*".to_string())),
                (None, false) => api
                    .current_version(&object_path(&service))
                    .await?
                    .map(|v| (header::IF_MATCH, quoted(&v))),
            };
            let headers: Vec<_> = precondition.into_iter().collect();
            let body = Bytes::from(serde_json::to_vec(&spec)?);
            let reply = api
                .call(Method::PUT, &object_path(&service), &headers, Some(body))
                .await?
                .ok()?;
            let what = if reply.status == StatusCode::CREATED {
                "created"
            } else {
                "replaced"
            };
            println!(
                "{what} {}.{service} version {} ({})",
                kind.table(),
                reply.body["version"].as_str().unwrap_or("?"),
                reply.body["source"].as_str().unwrap_or("?"),
            );
        }
        Command::Delete { service, if_match } => {
            let version = match if_match {
                Some(v) => Some(v),
                None => api.current_version(&object_path(&service)).await?,
            };
            let headers: Vec<_> = version
                .map(|v| (header::IF_MATCH, quoted(&v)))
                .into_iter()
                .collect();
            api.call(Method::DELETE, &object_path(&service), &headers, None)
                .await?
                .ok()?;
            println!("deleted {}.{service}", kind.table());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `proxy-status` when a connected proxy is stale or NACKing.
const EXIT_NOT_SYNCED: u8 = 2;

/// `proxy-status`: a table (or the JSON list) of `GET /v1/proxies`.
async fn proxy_status(api: &Api, output: Output) -> Result<ExitCode> {
    let reply = api
        .call(Method::GET, "/v1/proxies", &[], None)
        .await?
        .ok()?;
    let items = reply.body["items"].as_array().cloned().unwrap_or_default();
    let synced = items.iter().filter(|p| p["connected"] == true).all(|p| {
        p["types"].as_object().is_some_and(|t| {
            t.values()
                .all(|t| t["state"] == "synced" || t["state"] == "not_sent")
        })
    });
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&Value::Array(items))?),
        Output::Table => print!("{}", proxy_table(&items, now_unix_ms())),
    }
    Ok(if synced {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_SYNCED)
    })
}

/// `proxy-config`: `GET /v1/proxies/{node}/config`.
async fn proxy_config(
    api: &Api,
    node: &str,
    kind: ConfigKind,
    diff: bool,
    output: Output,
) -> Result<ExitCode> {
    let kind = kind
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| "all".into());
    let path = format!(
        "/v1/proxies/{}/config?type={kind}{}",
        percent_encode(node),
        if diff { "&diff=true" } else { "" }
    );
    let reply = api.call(Method::GET, &path, &[], None).await?.ok()?;
    if matches!(output, Output::Json) {
        println!("{}", serde_json::to_string_pretty(&reply.body)?);
    } else if diff {
        print!("{}", diff_text(&reply.body));
    } else {
        let held = pilotfish_discovery::proxy_config::held(&reply.body);
        let rows: Vec<Vec<String>> = std::iter::once(
            ["TYPE", "NAME", "STATE", "VERSION"]
                .map(String::from)
                .to_vec(),
        )
        .chain(held.into_iter().map(|h| {
            let state = match h.detail {
                Some(detail) => format!("{} ({detail})", h.state),
                None => h.state.to_string(),
            };
            let version = if h.version.is_empty() {
                "-".into()
            } else {
                h.version
            };
            vec![h.kind.to_string(), h.name, state, version]
        }))
        .collect();
        print!("{}", columns(rows));
    }
    Ok(if diff && reply.body["in_sync"] != true {
        ExitCode::from(EXIT_NOT_SYNCED)
    } else {
        ExitCode::SUCCESS
    })
}

/// `proxy-config --diff` as text: one line per difference, or that there is none.
fn diff_text(body: &Value) -> String {
    let mut out = String::new();
    let names = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    for (kind, d) in body["types"].as_object().into_iter().flatten() {
        for (key, label) in [
            ("missing", "sent by discovery, not held by Envoy"),
            ("unexpected", "held by Envoy, no longer sent by discovery"),
        ] {
            if d[key].as_array().is_some_and(|a| !a.is_empty()) {
                out.push_str(&format!("{kind}: {label}: {}\n", names(&d[key])));
            }
        }
        for n in d["not_active"].as_array().into_iter().flatten() {
            let detail = n["detail"]
                .as_str()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{kind}: {} is {}{detail}\n",
                n["name"].as_str().unwrap_or("?"),
                n["state"].as_str().unwrap_or("?"),
            ));
        }
        for o in d["outdated"].as_array().into_iter().flatten() {
            let name = match o["name"].as_str() {
                Some("*") | None => "the set".to_string(),
                Some(name) => name.to_string(),
            };
            out.push_str(&format!(
                "{kind}: {name}: Envoy holds version {}, discovery sends {}\n",
                o["holds"].as_str().unwrap_or("?"),
                o["sent"].as_str().unwrap_or("?"),
            ));
        }
    }
    if body["in_sync"] == true {
        out.push_str(&format!(
            "{}: Envoy holds what discovery sends ({})\n",
            body["node"].as_str().unwrap_or("?"),
            body["flavour"].as_str().unwrap_or("?"),
        ));
    }
    out
}

/// A node name as one path segment.
fn percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// `3s`, `4m`, `2h`: how long ago `then` was.
fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// The proxy-status table, then one line per NACK with its reason.
fn proxy_table(items: &[Value], now_ms: u64) -> String {
    const TYPES: [(&str, &str); 5] = [
        ("clusters", "CDS"),
        ("listeners", "LDS"),
        ("endpoints", "EDS"),
        ("routes", "RDS"),
        ("secrets", "SDS"),
    ];
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut rows = vec![[
        "NODE", "SERVICES", "FLAVOUR", "AGENT", "CDS", "LDS", "EDS", "RDS", "SDS",
    ]
    .map(String::from)
    .to_vec()];
    let mut nacks = Vec::new();
    for p in items {
        let node = text(&p["node"]);
        let services = p["services"]
            .as_array()
            .map(|s| s.iter().map(text).collect::<Vec<_>>().join(","))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into());
        let mut row = vec![
            node.clone(),
            services,
            text(&p["flavour"]),
            text(&p["agent"]),
        ];
        if p["connected"] != true {
            let seen = p["last_seen_unix_ms"].as_u64().unwrap_or(0);
            row.push(format!(
                "DISCONNECTED (last seen {} ago)",
                ago(now_ms, seen)
            ));
            rows.push(row);
            continue;
        }
        for (key, label) in TYPES {
            let t = &p["types"][key];
            row.push(match t["state"].as_str().unwrap_or("not_sent") {
                "synced" => "SYNCED".into(),
                "stale" => {
                    let sent = t["sent_unix_ms"].as_u64().unwrap_or(now_ms);
                    format!("STALE ({})", ago(now_ms, sent))
                }
                "nacked" => {
                    nacks.push(format!(
                        "{node} {label} NACKED: {}",
                        text(&t["nack_reason"])
                    ));
                    "NACKED".into()
                }
                _ => "NOT SENT".into(),
            });
        }
        rows.push(row);
    }
    let mut out = columns(rows);
    for n in nacks {
        out.push_str(&n);
        out.push('\n');
    }
    out
}

/// Rows as left-aligned columns, two spaces apart.
fn columns(rows: Vec<Vec<String>>) -> String {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn quoted(version: &str) -> String {
    format!("\"{}\"", version.trim_matches('"'))
}

fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Usage(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        bail!(Usage(format!("the token file {} is empty", path.display())));
    }
    Ok(token.to_string())
}

/// The object's table as JSON, from a JSON file (the table, or `get`'s output with `spec`),
/// a TOML file (`[<kind>.<service>]`, or the table's keys at top level), or JSON on stdin.
fn read_spec(file: &Path, kind: Kind, service: &str) -> Result<Value> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Usage(format!("cannot read {}: {e}", file.display())))?
    };
    let bad = |e: &dyn std::fmt::Display| anyhow!(Usage(format!("{}: {e}", file.display())));
    if file.extension().is_some_and(|e| e == "toml") {
        let doc: toml::Table = toml::from_str(&text).map_err(|e| bad(&e))?;
        let table = match doc.get(kind.table()) {
            Some(toml::Value::Table(objects)) => objects
                .get(service)
                .cloned()
                .ok_or_else(|| bad(&format!("no [{}.{service}] table", kind.table())))?,
            _ => toml::Value::Table(doc),
        };
        return Ok(toml_to_json(&table));
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| bad(&e))?;
    // `get` prints {"service", "version", "source", "managed", "spec"}: take its spec, so
    // get > file, edit, put works.
    match (&value["spec"], &value["service"]) {
        (Value::Object(_), Value::String(_)) => Ok(value["spec"].clone()),
        _ => Ok(value),
    }
}

struct Api {
    base: String,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

struct Reply {
    status: StatusCode,
    etag: Option<String>,
    body: Value,
}

impl Reply {
    /// The reply, or its errors as an [`ApiFailed`].
    fn ok(self) -> Result<Reply> {
        if self.status.is_success() {
            return Ok(self);
        }
        let errors = self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e.as_str().map_or_else(|| e.to_string(), String::from))
                    .collect()
            })
            .unwrap_or_default();
        Err(ApiFailed {
            status: self.status,
            errors,
        }
        .into())
    }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method.clone()).uri(&url);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            request = request.header(name, HeaderValue::from_str(value)?);
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Usage(format!("{url}: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_string());
        let bytes = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {url}: reading the reply"))?
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                // Not the API (a proxy, or an old discovery): show what came back.
                serde_json::json!({ "errors": [String::from_utf8_lossy(&bytes).trim()] })
            })
        };
        Ok(Reply { status, etag, body })
    }

    /// The object's version, or `None` when it does not exist.
    async fn current_version(&self, path: &str) -> Result<Option<String>> {
        let reply = self.call(Method::GET, path, &[], None).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let reply = reply.ok()?;
        Ok(reply
            .etag
            .or_else(|| reply.body["version"].as_str().map(String::from)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec_of(name: &str, text: &str, kind: Kind) -> Result<Value> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        read_spec(&path, kind, "reviews")
    }

    #[test]
    fn specs_from_json_get_output_and_toml() {
        let spec = json!({"timeout": "3s", "rules": [{"to": [{"subset": "v1"}]}]});
        let plain = spec_of("r.json", &spec.to_string(), Kind::Routes).expect("json");
        assert_eq!(plain, spec);
        let got = json!({"service": "reviews", "version": "x", "source": "f", "managed": true, "spec": spec});
        let from_get = spec_of("r.json", &got.to_string(), Kind::Routes).expect("get output");
        assert_eq!(from_get, spec);
        let file = "[routes.reviews]\ntimeout = \"3s\"\n[[routes.reviews.rules]]\nto = [{ subset = \"v1\" }]\n";
        assert_eq!(
            spec_of("r.toml", file, Kind::Routes).expect("toml file"),
            spec
        );
        let bare = "timeout = \"3s\"\n[[rules]]\nto = [{ subset = \"v1\" }]\n";
        assert_eq!(
            spec_of("r.toml", bare, Kind::Routes).expect("bare toml"),
            spec
        );
        let err = spec_of("r.toml", "[routes.ratings]\n", Kind::Routes).expect_err("other service");
        assert!(err.downcast_ref::<Usage>().is_some(), "{err:#}");
        let err = spec_of("r.json", "{", Kind::Routes).expect_err("bad json");
        assert!(err.downcast_ref::<Usage>().is_some(), "{err:#}");
    }

    #[test]
    fn versions_are_quoted_once() {
        assert_eq!(quoted("abc"), "\"abc\"");
        assert_eq!(quoted("\"abc\""), "\"abc\"");
    }
}
