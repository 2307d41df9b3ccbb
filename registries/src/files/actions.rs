//! The richer parts of traffic rules, as serde sees them and as checked one file at a time:
//! header and query conditions and regexes in `match`, the per-rule actions (retries, timeout,
//! fault, mirror, header edits, rewrite, redirect), and the resilience keys of a policy
//! (hash, connection pool, outlier detection, health check, idle timeout, rate limit,
//! locality failover). Part of [`super::rules`]; checks against other files (does the mirror
//! service exist?) are in [`super::validate`].
//!
//! ```toml
//! [[routes.reviews.rules]]
//! match = { path_regex = "/r/[0-9]+", headers = { "x-user" = { prefix = "a" } }, query = { debug = { present = true } } }
//! to = [{ subset = "v1" }]
//! timeout = "1s"                                          # overrides the route's
//! retries = { attempts = 3, on = ["5xx"], backoff = { base = "25ms", max = "250ms" } }
//! fault = { delay = { fixed = "2s", percent = 10 }, abort = { status = 503, percent = 5 } }
//! mirror = { service = "reviews-shadow", subset = "v2", percent = 100 }
//! headers = { request = { add = { "x-a" = "1" }, remove = ["x-b"] }, response = { add = { "x-c" = "1" } } }
//! rewrite = { prefix = "/new", host = "reviews.internal" }
//! # redirect = { path = "/moved", host = "example.com", status = 301, https = true }   # instead of `to`
//!
//! [policies.reviews]
//! load_balancer = "ring_hash"
//! hash = { header = "x-user" }                           # or { cookie = "session", ttl = "1h" } or { source_ip = true }
//! connection_pool = { max_connections = 100, max_pending_requests = 10, max_requests = 100, max_retries = 3 }
//! outlier_detection = { consecutive_5xx = 5, interval = "10s", base_ejection_time = "30s", max_ejection_percent = 50 }
//! health_check = { path = "/health", interval = "5s", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 3 }
//! idle_timeout = "5m"
//! rate_limit = { requests = 100, per = "1s" }
//! locality = { failover = ["dc1", "dc2"] }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::parse::Context;
use crate::model::{
    ConnectionPool, Fault, HashOn, HeaderOps, HealthCheck, Mirror, OutlierDetection, RateLimit,
    Redirect, Rewrite, StringCondition,
};

/// Bound on counts (thresholds, connection limits) so that nothing silly reaches Envoy.
const MAX_COUNT: i64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    base: Spanned<String>,
    max: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFault {
    delay: Option<Spanned<RawDelay>>,
    abort: Option<Spanned<RawAbort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelay {
    fixed: Spanned<String>,
    percent: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAbort {
    status: Spanned<i64>,
    percent: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMirror {
    pub service: Spanned<String>,
    pub subset: Option<Spanned<String>>,
    percent: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaderEdits {
    request: Option<RawHeaderOps>,
    response: Option<RawHeaderOps>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderOps {
    #[serde(default)]
    add: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    remove: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRewrite {
    prefix: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedirect {
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    status: Option<Spanned<i64>>,
    https: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHash {
    header: Option<Spanned<String>>,
    cookie: Option<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    source_ip: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    max_connections: Option<Spanned<i64>>,
    max_pending_requests: Option<Spanned<i64>>,
    max_requests: Option<Spanned<i64>>,
    max_retries: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlier {
    consecutive_5xx: Option<Spanned<i64>>,
    interval: Option<Spanned<String>>,
    base_ejection_time: Option<Spanned<String>>,
    max_ejection_percent: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    healthy_threshold: Option<Spanned<i64>>,
    unhealthy_threshold: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    requests: Spanned<i64>,
    per: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocality {
    #[serde(default)]
    failover: Vec<Spanned<String>>,
}

impl Context {
    /// An integer in `lo..=hi`, or a problem naming `field`.
    pub(super) fn bounded(&mut self, v: &Spanned<i64>, field: &str, lo: i64, hi: i64) -> u32 {
        let n = *v.get_ref();
        if n < lo || n > hi {
            self.report(v.span(), field, format!("{n} is out of range ({lo}-{hi})"));
            return lo.max(0) as u32;
        }
        // In range 0..=MAX_COUNT, which fits in u32.
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn opt_count(&mut self, v: &Option<Spanned<i64>>, field: &str) -> Option<u32> {
        v.as_ref().map(|v| self.bounded(v, field, 1, MAX_COUNT))
    }

    fn opt_duration(&mut self, v: &Option<Spanned<String>>, field: &str) -> Option<Duration> {
        v.as_ref().and_then(|v| self.duration(v, field))
    }

    pub(super) fn backoff(
        &mut self,
        path: &str,
        raw: RawBackoff,
    ) -> Option<(Duration, Option<Duration>)> {
        let base = self.duration(&raw.base, &format!("{path}.base"))?;
        let max = self.opt_duration(&raw.max, &format!("{path}.max"));
        if let (Some(m), Some(span)) = (max, raw.max.as_ref().map(Spanned::span)) {
            if m < base {
                self.report(span, &format!("{path}.max"), "is less than base");
            }
        }
        Some((base, max))
    }

    /// A regex in the syntax Envoy's RE2 accepts; checked with regex-syntax, whose syntax is a
    /// superset for the common forms (RE2 has no look-around or backreferences, and neither
    /// does regex-syntax).
    pub(super) fn regex(&mut self, re: &Spanned<String>, field: &str) {
        if re.get_ref().is_empty() {
            self.report(
                re.span(),
                field,
                "an empty regex matches everything; omit it",
            );
            return;
        }
        if let Err(e) = regex_syntax::Parser::new().parse(re.get_ref()) {
            let first = e.to_string();
            let reason = first.lines().last().unwrap_or("invalid").trim().to_string();
            self.report(
                re.span(),
                field,
                format!("\"{}\" is not a valid regex: {reason}", re.get_ref()),
            );
        }
    }

    /// `"v"` (exact) or `{ exact | prefix | regex = "..." }` or `{ present = bool }`, for a
    /// header (`allow_exact_string`) or a query parameter.
    pub(super) fn condition(
        &mut self,
        name: &Spanned<String>,
        value: &toml::Value,
        field: &str,
    ) -> Option<StringCondition> {
        if let toml::Value::String(s) = value {
            return Some(StringCondition::Exact(s.clone()));
        }
        let Some(table) = value.as_table() else {
            self.report(
                name.span(),
                field,
                "expected a string (exact value) or a table with one of exact, prefix, regex, present",
            );
            return None;
        };
        if table.len() != 1 {
            self.report(
                name.span(),
                field,
                "give exactly one of exact, prefix, regex, present",
            );
            return None;
        }
        let (kind, v) = table.iter().next()?;
        match (kind.as_str(), v) {
            ("exact", toml::Value::String(s)) => Some(StringCondition::Exact(s.clone())),
            ("prefix", toml::Value::String(s)) => Some(StringCondition::Prefix(s.clone())),
            ("regex", toml::Value::String(s)) => {
                self.regex(
                    &Spanned::new(name.span(), s.clone()),
                    &format!("{field}.regex"),
                );
                Some(StringCondition::Regex(s.clone()))
            }
            ("present", toml::Value::Boolean(b)) => Some(StringCondition::Present(*b)),
            ("exact" | "prefix" | "regex", _) => {
                self.report(name.span(), &format!("{field}.{kind}"), "expected a string");
                None
            }
            ("present", _) => {
                self.report(
                    name.span(),
                    &format!("{field}.present"),
                    "expected true or false",
                );
                None
            }
            (other, _) => {
                self.report(
                    name.span(),
                    field,
                    format!(
                        "unknown condition \"{other}\" (expected exact, prefix, regex or present)"
                    ),
                );
                None
            }
        }
    }

    pub(super) fn fault(&mut self, path: &str, raw: Spanned<RawFault>) -> Fault {
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.delay.is_none() && raw.abort.is_none() {
            self.report(span, path, "give a delay, an abort or both");
        }
        let delay = raw.delay.and_then(|d| {
            let d = d.into_inner();
            let fixed = self.duration(&d.fixed, &format!("{path}.delay.fixed"))?;
            let percent = self.percent(&d.percent, &format!("{path}.delay.percent"));
            Some((fixed, percent))
        });
        let abort = raw.abort.map(|a| {
            let a = a.into_inner();
            let status = self.bounded(&a.status, &format!("{path}.abort.status"), 200, 599);
            let percent = self.percent(&a.percent, &format!("{path}.abort.percent"));
            (status, percent)
        });
        Fault { delay, abort }
    }

    /// A percentage, 100 when unset.
    fn percent(&mut self, v: &Option<Spanned<i64>>, field: &str) -> u32 {
        v.as_ref().map_or(100, |v| self.bounded(v, field, 0, 100))
    }

    pub(super) fn mirror(&mut self, path: &str, raw: &RawMirror) -> Mirror {
        self.name(&raw.service, &format!("{path}.service"), "service");
        if let Some(s) = &raw.subset {
            self.name(s, &format!("{path}.subset"), "subset");
        }
        Mirror {
            service: raw.service.get_ref().clone(),
            subset: raw.subset.as_ref().map(|s| s.get_ref().clone()),
            percent: self.percent(&raw.percent, &format!("{path}.percent")),
        }
    }

    pub(super) fn header_edits(
        &mut self,
        path: &str,
        raw: RawHeaderEdits,
    ) -> (HeaderOps, HeaderOps) {
        let ops = |cx: &mut Context, side: &str, raw: Option<RawHeaderOps>| {
            let mut out = HeaderOps::default();
            for (name, value) in raw.into_iter().flat_map(|r| {
                let remove = r.remove;
                r.add
                    .into_iter()
                    .map(|(k, v)| (k, Some(v)))
                    .chain(remove.into_iter().map(|k| (k, None)))
                    .collect::<Vec<_>>()
            }) {
                let field = format!(
                    "{path}.{side}.{}",
                    if value.is_some() { "add" } else { "remove" }
                );
                cx.header_name(&name, &field);
                let lower = name.get_ref().to_ascii_lowercase();
                if lower.starts_with(':') || lower == "host" {
                    cx.report(
                        name.span(),
                        &field,
                        format!("\"{lower}\" cannot be edited (use rewrite)"),
                    );
                }
                match value {
                    Some(v) => {
                        out.add.insert(lower, v);
                    }
                    None => out.remove.push(lower),
                }
            }
            out
        };
        let request = ops(self, "request", raw.request);
        let response = ops(self, "response", raw.response);
        (request, response)
    }

    pub(super) fn header_name(&mut self, name: &Spanned<String>, field: &str) {
        let valid = !name.get_ref().is_empty()
            && name
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
        if !valid {
            self.report(
                name.span(),
                field,
                format!("\"{}\" is not a header name", name.get_ref()),
            );
        }
    }

    pub(super) fn rewrite(&mut self, path: &str, raw: Spanned<RawRewrite>) -> Rewrite {
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.prefix.is_none() && raw.host.is_none() {
            self.report(span, path, "give prefix, host or both");
        }
        if let Some(p) = &raw.prefix {
            if !p.get_ref().starts_with('/') {
                self.report(
                    p.span(),
                    &format!("{path}.prefix"),
                    format!("\"{}\" must start with '/'", p.get_ref()),
                );
            }
        }
        if let Some(h) = &raw.host {
            self.host_name(h, &format!("{path}.host"));
        }
        Rewrite {
            prefix: raw.prefix.map(Spanned::into_inner),
            host: raw.host.map(Spanned::into_inner),
        }
    }

    fn host_name(&mut self, h: &Spanned<String>, field: &str) {
        let ok = !h.get_ref().is_empty()
            && h.get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:_".contains(c));
        if !ok {
            self.report(
                h.span(),
                field,
                format!("\"{}\" is not a host name", h.get_ref()),
            );
        }
    }

    pub(super) fn redirect(&mut self, path: &str, raw: Spanned<RawRedirect>) -> Redirect {
        let raw = raw.into_inner();
        if let Some(p) = &raw.path {
            if !p.get_ref().starts_with('/') {
                self.report(
                    p.span(),
                    &format!("{path}.path"),
                    format!("\"{}\" must start with '/'", p.get_ref()),
                );
            }
        }
        if let Some(h) = &raw.host {
            self.host_name(h, &format!("{path}.host"));
        }
        let status = match &raw.status {
            None => 301,
            Some(s) if [301, 302, 303, 307, 308].contains(s.get_ref()) => *s.get_ref() as u32,
            Some(s) => {
                self.report(
                    s.span(),
                    &format!("{path}.status"),
                    format!(
                        "{} is not a redirect status (301, 302, 303, 307 or 308)",
                        s.get_ref()
                    ),
                );
                301
            }
        };
        Redirect {
            path: raw.path.map(Spanned::into_inner),
            host: raw.host.map(Spanned::into_inner),
            status,
            https: raw.https.unwrap_or(false),
        }
    }

    pub(super) fn hash(&mut self, path: &str, raw: Spanned<RawHash>) -> Option<HashOn> {
        let span = raw.span();
        let raw = raw.into_inner();
        let given = usize::from(raw.header.is_some())
            + usize::from(raw.cookie.is_some())
            + usize::from(raw.source_ip == Some(true));
        if given != 1 {
            self.report(
                span,
                path,
                "give exactly one of header, cookie, source_ip = true",
            );
            return None;
        }
        if let (Some(ttl), None) = (&raw.ttl, &raw.cookie) {
            self.report(
                ttl.span(),
                &format!("{path}.ttl"),
                "only a cookie has a ttl",
            );
        }
        if let Some(h) = raw.header {
            self.header_name(&h, &format!("{path}.header"));
            return Some(HashOn::Header(h.into_inner().to_ascii_lowercase()));
        }
        if let Some(c) = raw.cookie {
            let ttl = self.opt_duration(&raw.ttl, &format!("{path}.ttl"));
            if c.get_ref().is_empty() {
                self.report(c.span(), &format!("{path}.cookie"), "must not be empty");
            }
            return Some(HashOn::Cookie {
                name: c.into_inner(),
                ttl,
            });
        }
        Some(HashOn::SourceIp)
    }

    pub(super) fn pool(&mut self, path: &str, raw: RawPool) -> ConnectionPool {
        ConnectionPool {
            max_connections: self
                .opt_count(&raw.max_connections, &format!("{path}.max_connections")),
            max_pending_requests: self.opt_count(
                &raw.max_pending_requests,
                &format!("{path}.max_pending_requests"),
            ),
            max_requests: self.opt_count(&raw.max_requests, &format!("{path}.max_requests")),
            max_retries: raw
                .max_retries
                .as_ref()
                .map(|v| self.bounded(v, &format!("{path}.max_retries"), 0, MAX_COUNT)),
        }
    }

    pub(super) fn outlier(&mut self, path: &str, raw: RawOutlier) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: self
                .opt_count(&raw.consecutive_5xx, &format!("{path}.consecutive_5xx")),
            interval: self.opt_duration(&raw.interval, &format!("{path}.interval")),
            base_ejection_time: self.opt_duration(
                &raw.base_ejection_time,
                &format!("{path}.base_ejection_time"),
            ),
            max_ejection_percent: raw
                .max_ejection_percent
                .as_ref()
                .map(|v| self.bounded(v, &format!("{path}.max_ejection_percent"), 0, 100)),
        }
    }

    pub(super) fn health_check(&mut self, path: &str, raw: RawHealthCheck) -> HealthCheck {
        if let Some(p) = &raw.path {
            if !p.get_ref().starts_with('/') {
                self.report(
                    p.span(),
                    &format!("{path}.path"),
                    format!("\"{}\" must start with '/'", p.get_ref()),
                );
            }
        }
        let interval = self
            .opt_duration(&raw.interval, &format!("{path}.interval"))
            .unwrap_or(Duration::from_secs(5));
        let timeout = self
            .opt_duration(&raw.timeout, &format!("{path}.timeout"))
            .unwrap_or(Duration::from_secs(1));
        HealthCheck {
            path: raw.path.map(Spanned::into_inner),
            interval,
            timeout,
            healthy_threshold: self
                .opt_count(&raw.healthy_threshold, &format!("{path}.healthy_threshold"))
                .unwrap_or(1),
            unhealthy_threshold: self
                .opt_count(
                    &raw.unhealthy_threshold,
                    &format!("{path}.unhealthy_threshold"),
                )
                .unwrap_or(3),
        }
    }

    pub(super) fn rate_limit(&mut self, path: &str, raw: RawRateLimit) -> Option<RateLimit> {
        let requests = self.bounded(&raw.requests, &format!("{path}.requests"), 1, MAX_COUNT);
        let per = self.duration(&raw.per, &format!("{path}.per"))?;
        if per < Duration::from_millis(50) {
            // Envoy's token bucket refills at most every 50ms.
            self.report(
                raw.per.span(),
                &format!("{path}.per"),
                "must be at least 50ms",
            );
        }
        Some(RateLimit { requests, per })
    }

    pub(super) fn failover(&mut self, path: &str, raw: RawLocality) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (i, l) in raw.failover.into_iter().enumerate() {
            let field = format!("{path}.failover[{i}]");
            if l.get_ref().trim().is_empty() {
                self.report(l.span(), &field, "must not be empty");
            } else if out.contains(l.get_ref()) {
                self.report(
                    l.span(),
                    &field,
                    format!("\"{}\" is listed twice", l.get_ref()),
                );
            }
            out.push(l.into_inner());
        }
        out
    }
}
