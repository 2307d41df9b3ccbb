//! Traffic rules -> route configurations: one virtual host per HTTP service, its routes from the
//! service's `[routes.<svc>]` rules, in order (first match wins).
//!
//! Per rule: the match (path exact/prefix/regex, headers, query, method), the destination
//! (one cluster or a weighted split) or a redirect, timeout and retries (the rule's, else the
//! route's), mirroring, header edits, rewrites, and fault injection as the fault filter's
//! per-route config. Per virtual host: the service's local rate limit as the local_ratelimit
//! filter's per-route config, and the policy's hash (ring_hash/maglev) on every route. Each
//! `typed_per_filter_config` map holds one entry (fault on routes, rate limit on the virtual
//! host), for determinism.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
    RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    retry_policy::{retry_host_predicate, RetryBackOff, RetryHostPredicate},
    route::Action,
    route_action::{
        hash_policy::{self, PolicySpecifier},
        ClusterSpecifier, HashPolicy, HostRewriteSpecifier, RequestMirrorPolicy,
    },
    route_match::PathSpecifier,
    weighted_cluster::ClusterWeight,
    HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    fault_delay::FaultDelaySecifier, FaultDelay,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    fault_abort::ErrorType, FaultAbort, HttpFault,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::{
    fractional_percent::DenominatorType, FractionalPercent, TokenBucket,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use pilotfish_registries::model::{self, Catalog, HashOn, Service, StringCondition};

use super::rbac::{self, Policies};
use super::{any, duration, inbound_name, outbound_name, subset_name, INBOUND};

/// The HTTP filters that take per-route configuration, in the outbound connection manager.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
/// The response header set on a request refused by a service's rate limit.
pub const RATE_LIMITED_HEADER: &str = "x-pilotfish-ratelimited";
use crate::resources::Resource;

/// Retry conditions when a route asks for retries without naming any: failures where the
/// request did not reach the app, so that retrying is safe for any method.
const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,reset";

/// Retries of a route that sets none: twice, on those same failures, as Istio does, so a
/// host that died a moment ago costs a retry rather than a failed request.
const DEFAULT_RETRIES: model::Retries = model::Retries {
    attempts: 2,
    per_try_timeout: None,
    on: Vec::new(),
    backoff: None,
};

/// The Host values that reach `svc`: `svc`, `svc:port`, `svc.mesh`, `svc.mesh:port`.
pub(super) fn domains(svc: &Service) -> Vec<String> {
    let name = &svc.name;
    let port = svc.port;
    vec![
        name.clone(),
        format!("{name}:{port}"),
        format!("{name}.mesh"),
        format!("{name}.mesh:{port}"),
    ]
}

/// The outbound virtual host of an HTTP service.
pub(super) fn outbound_vhost(catalog: &Catalog, svc: &Service) -> VirtualHost {
    let rule = catalog.routes.get(&svc.name);
    let subsets = catalog.subsets(&svc.name);
    let whole = outbound_name(&svc.name);
    let mut routes = Vec::new();
    let mut catch_all = false;
    for r in rule.map(|r| r.rules.as_slice()).unwrap_or_default() {
        // A destination naming an undeclared subset would point at a cluster that does not
        // exist (503 NC); it is left out, and a rule left with nowhere to go is skipped.
        let to: Vec<(String, u32)> = r
            .to
            .iter()
            .filter_map(|d| match &d.subset {
                None => Some((whole.clone(), d.weight)),
                Some(s) if subsets.is_some_and(|m| m.contains_key(s)) => {
                    Some((subset_name(&svc.name, s), d.weight))
                }
                Some(s) => {
                    tracing::warn!(service = %svc.name, subset = %s, origin = %r.origin, "route to an undeclared subset ignored");
                    None
                }
            })
            .collect();
        let action = if let Some(redirect) = &r.actions.redirect {
            Action::Redirect(redirect_action(redirect))
        } else {
            let Some(specifier) = cluster_specifier(to) else {
                continue;
            };
            let mut a = action(rule, specifier);
            rule_action(catalog, svc, r, &mut a);
            Action::Route(a)
        };
        let mut route = Route {
            r#match: Some(route_match(&r.matches)),
            action: Some(action),
            request_headers_to_add: header_options(&r.actions.request_headers.add),
            request_headers_to_remove: r.actions.request_headers.remove.clone(),
            response_headers_to_add: header_options(&r.actions.response_headers.add),
            response_headers_to_remove: r.actions.response_headers.remove.clone(),
            ..Default::default()
        };
        if let Some(fault) = &r.actions.fault {
            route.typed_per_filter_config =
                [(FAULT_FILTER.to_string(), any(&http_fault(fault)))].into();
        }
        routes.push(route);
        if r.matches.is_empty() {
            catch_all = true;
            break; // nothing after a catch-all can match
        }
    }
    // Requests no rule matches go to the whole service rather than a 404.
    if !catch_all {
        let mut a = action(rule, ClusterSpecifier::Cluster(whole));
        a.hash_policy = hash_policy(catalog, svc);
        routes.push(Route {
            r#match: Some(prefix("/")),
            action: Some(Action::Route(a)),
            ..Default::default()
        });
    }
    let mut vhost = VirtualHost {
        name: svc.name.clone(),
        domains: domains(svc),
        routes,
        ..Default::default()
    };
    if let Some(limit) = catalog
        .policies
        .get(&svc.name)
        .and_then(|p| p.rate_limit.as_ref())
    {
        vhost.typed_per_filter_config = [(
            RATE_LIMIT_FILTER.to_string(),
            any(&local_rate_limit(&svc.name, limit)),
        )]
        .into();
    }
    vhost
}

/// What a rule adds to the route action: its own timeout and retries, mirroring, rewrites, and
/// the service's hash policy.
fn rule_action(catalog: &Catalog, svc: &Service, r: &model::RouteRule, a: &mut RouteAction) {
    if let Some(t) = r.actions.timeout {
        a.timeout = Some(duration(t));
    }
    if let Some(retries) = &r.actions.retries {
        a.retry_policy = Some(retry_policy(retries));
    }
    // A mirror to a service no source declares (yet) is left out: it is reported as an
    // unresolved reference, and would only name a cluster the proxy does not have.
    if let Some(m) = r
        .actions
        .mirror
        .as_ref()
        .filter(|m| catalog.services.contains_key(&m.service))
    {
        let cluster = match &m.subset {
            Some(s) => subset_name(&m.service, s),
            None => outbound_name(&m.service),
        };
        a.request_mirror_policies = vec![RequestMirrorPolicy {
            cluster,
            // The copy must reach the mirror service's app: peers' mesh ports route by Host.
            host_rewrite_literal: m.service.clone(),
            disable_shadow_host_suffix_append: true,
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(hundredths(m.percent)),
                ..Default::default()
            }),
            ..Default::default()
        }];
    }
    if let Some(rw) = &r.actions.rewrite {
        if let Some(p) = &rw.prefix {
            a.prefix_rewrite = p.clone();
        }
        if let Some(h) = &rw.host {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(h.clone()));
        }
    }
    a.hash_policy = hash_policy(catalog, svc);
}

/// The policy's hash for ring_hash/maglev, as a route's hash policy.
fn hash_policy(catalog: &Catalog, svc: &Service) -> Vec<HashPolicy> {
    let Some(hash) = catalog
        .policies
        .get(&svc.name)
        .and_then(|p| p.hash.as_ref())
    else {
        return Vec::new();
    };
    let specifier = match hash {
        HashOn::Header(name) => PolicySpecifier::Header(hash_policy::Header {
            header_name: name.clone(),
            ..Default::default()
        }),
        HashOn::Cookie { name, ttl } => PolicySpecifier::Cookie(hash_policy::Cookie {
            name: name.clone(),
            ttl: ttl.map(duration),
            path: "/".to_string(),
            ..Default::default()
        }),
        HashOn::SourceIp => {
            PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties {
                source_ip: true,
            })
        }
    };
    vec![HashPolicy {
        policy_specifier: Some(specifier),
        ..Default::default()
    }]
}

fn hundredths(percent: u32) -> FractionalPercent {
    FractionalPercent {
        numerator: percent.min(100),
        denominator: DenominatorType::Hundred as i32,
    }
}

fn http_fault(f: &model::Fault) -> HttpFault {
    HttpFault {
        delay: f.delay.map(|(fixed, percent)| FaultDelay {
            percentage: Some(hundredths(percent)),
            fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(duration(fixed))),
        }),
        abort: f.abort.map(|(status, percent)| FaultAbort {
            percentage: Some(hundredths(percent)),
            error_type: Some(ErrorType::HttpStatus(status)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The per-route config of the local_ratelimit filter: `requests` tokens refilled every `per`,
/// enforced on every request; refused requests get 429 and `x-pilotfish-ratelimited: true`.
pub(super) fn local_rate_limit(service: &str, limit: &model::RateLimit) -> LocalRateLimit {
    let all = Some(RuntimeFractionalPercent {
        default_value: Some(hundredths(100)),
        ..Default::default()
    });
    LocalRateLimit {
        stat_prefix: format!("ratelimit_{service}"),
        token_bucket: Some(TokenBucket {
            max_tokens: limit.requests,
            tokens_per_fill: Some(UInt32Value {
                value: limit.requests,
            }),
            fill_interval: Some(duration(limit.per)),
        }),
        filter_enabled: all.clone(),
        filter_enforced: all,
        response_headers_to_add: header_options(
            &[(RATE_LIMITED_HEADER.to_string(), "true".to_string())].into(),
        ),
        ..Default::default()
    }
}

fn header_options(add: &std::collections::BTreeMap<String, String>) -> Vec<HeaderValueOption> {
    add.iter()
        .map(|(k, v)| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        })
        .collect()
}

fn redirect_action(r: &model::Redirect) -> RedirectAction {
    let code = match r.status {
        302 => RedirectResponseCode::Found,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::MovedPermanently,
    };
    RedirectAction {
        host_redirect: r.host.clone().unwrap_or_default(),
        response_code: code as i32,
        scheme_rewrite_specifier: r
            .https
            .then_some(SchemeRewriteSpecifier::HttpsRedirect(true)),
        path_rewrite_specifier: r.path.clone().map(PathRewriteSpecifier::PathRedirect),
        ..Default::default()
    }
}

/// The inline route configuration of gateway listener `name`: one virtual host per distinct
/// `host` (in the order first named), each route to the service's whole cluster with the
/// service's timeout, retries and hash policy.
pub(super) fn gateway(catalog: &Catalog, gw: &model::Gateway, name: &str) -> RouteConfiguration {
    let mut vhosts: Vec<VirtualHost> = Vec::new();
    for r in &gw.routes {
        let Some(svc) = catalog.services.get(&r.service) else {
            continue;
        };
        let mut a = action(
            catalog.routes.get(&r.service),
            ClusterSpecifier::Cluster(outbound_name(&r.service)),
        );
        a.hash_policy = hash_policy(catalog, svc);
        // Peers' mesh ports route by Host: the request must name the service, not the site.
        a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(svc.name.clone()));
        let route = Route {
            r#match: Some(prefix(&r.path_prefix)),
            action: Some(Action::Route(a)),
            ..Default::default()
        };
        match vhosts.iter_mut().find(|v| v.domains == [r.host.clone()]) {
            Some(v) => v.routes.push(route),
            None => vhosts.push(VirtualHost {
                name: format!("{}|{}", gw.name, vhosts.len()),
                domains: vec![r.host.clone()],
                routes: vec![route],
                ..Default::default()
            }),
        }
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vhosts,
        ..Default::default()
    }
}

/// The `inbound` route configuration: each local HTTP service to its `inbound|<svc>` cluster.
pub(super) fn inbound(local: &[&Service]) -> Arc<Resource> {
    let vhosts = local
        .iter()
        .map(|svc| inbound_vhost(svc, domains(svc)))
        .collect();
    route_config(INBOUND, vhosts)
}

/// The `inbound` route configuration of the mesh port's plaintext chain (mTLS on; permissive
/// services only), with each service's RBAC rules: the deny rules on the virtual host and the
/// allow rules on its route, so that each `typed_per_filter_config` map holds one entry.
pub(super) fn inbound_plaintext(local: &[(&Service, Policies)]) -> Arc<Resource> {
    let vhosts = local
        .iter()
        .map(|(svc, policies)| {
            let mut vh = inbound_vhost(svc, domains(svc));
            if let Some(deny) = &policies.deny {
                vh.typed_per_filter_config =
                    [(rbac::DENY_FILTER.to_string(), rbac::per_route(deny))].into();
            }
            if let Some(allow) = &policies.allow {
                for route in &mut vh.routes {
                    route.typed_per_filter_config =
                        [(rbac::ALLOW_FILTER.to_string(), rbac::per_route(allow))].into();
                }
            }
            vh
        })
        .collect();
    route_config(INBOUND, vhosts)
}

/// The inline route configuration `inbound|<svc>` of the service's TLS chain on the mesh port:
/// SNI already chose the service, so every Host goes to its `inbound|<svc>` cluster.
pub(super) fn inbound_chain(svc: &Service) -> RouteConfiguration {
    RouteConfiguration {
        name: inbound_name(&svc.name),
        virtual_hosts: vec![inbound_vhost(svc, vec!["*".to_string()])],
        ..Default::default()
    }
}

fn inbound_vhost(svc: &Service, domains: Vec<String>) -> VirtualHost {
    VirtualHost {
        name: svc.name.clone(),
        domains,
        routes: vec![Route {
            r#match: Some(prefix("/")),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(inbound_name(&svc.name))),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A route configuration. Envoy rejects a domain that appears in two virtual hosts (`foo.mesh`
/// of service `foo` and a service named `foo.mesh`): the first virtual host keeps it.
pub(super) fn route_config(name: &str, vhosts: Vec<VirtualHost>) -> Arc<Resource> {
    let mut seen = BTreeSet::new();
    let virtual_hosts = vhosts
        .into_iter()
        .filter_map(|mut vh| {
            vh.domains.retain(|d| seen.insert(d.to_ascii_lowercase()));
            (!vh.domains.is_empty()).then_some(vh)
        })
        .collect();
    let config = RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        ..Default::default()
    };
    Resource::encode(name, &config)
}

/// One cluster, or a weighted split; `None` when there is nowhere to go.
fn cluster_specifier(mut to: Vec<(String, u32)>) -> Option<ClusterSpecifier> {
    if to.len() > 1 {
        to.retain(|(_, weight)| *weight > 0);
    }
    match to.len() {
        0 => None,
        1 => to
            .pop()
            .map(|(cluster, _)| ClusterSpecifier::Cluster(cluster)),
        _ => Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: to
                .into_iter()
                .map(|(name, weight)| ClusterWeight {
                    name,
                    weight: Some(UInt32Value { value: weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
    }
}

fn action(rule: Option<&model::Route>, specifier: ClusterSpecifier) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(specifier),
        // Unset: Envoy's default of 15s.
        timeout: rule.and_then(|r| r.timeout).map(duration),
        retry_policy: Some(retry_policy(
            rule.and_then(|r| r.retries.as_ref())
                .unwrap_or(&DEFAULT_RETRIES),
        )),
        ..Default::default()
    }
}

fn retry_policy(retries: &model::Retries) -> RetryPolicy {
    let retry_on = if retries.on.is_empty() {
        DEFAULT_RETRY_ON.to_string()
    } else {
        retries.on.join(",")
    };
    RetryPolicy {
        retry_on,
        num_retries: Some(UInt32Value {
            value: retries.attempts,
        }),
        per_try_timeout: retries.per_try_timeout.map(duration),
        retry_back_off: retries.backoff.map(|(base, max)| RetryBackOff {
            base_interval: Some(duration(base)),
            max_interval: max.map(duration),
        }),
        // A retry goes to another host when there is one.
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_host_predicate::ConfigType::TypedConfig(any(
                &PreviousHostsPredicate {},
            ))),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}

fn route_match(m: &model::RouteMatch) -> RouteMatch {
    let mut out = match (&m.path_exact, &m.path_prefix, &m.path_regex) {
        (Some(exact), _, _) => RouteMatch {
            path_specifier: Some(PathSpecifier::Path(exact.clone())),
            ..Default::default()
        },
        (None, Some(p), _) => prefix(p),
        (None, None, Some(re)) => RouteMatch {
            path_specifier: Some(PathSpecifier::SafeRegex(regex(re))),
            ..Default::default()
        },
        (None, None, None) => prefix("/"),
    };
    if let Some(method) = &m.method {
        out.headers.push(exact_header(":method", method));
    }
    out.headers.extend(
        m.headers
            .iter()
            .map(|(name, value)| exact_header(name, value)),
    );
    for (name, cond) in &m.header_conditions {
        // `present = false` means absent (Envoy's present_match semantics).
        let specifier = match cond {
            StringCondition::Present(present) => HeaderMatchSpecifier::PresentMatch(*present),
            other => HeaderMatchSpecifier::StringMatch(string_matcher(other)),
        };
        out.headers.push(HeaderMatcher {
            name: name.clone(),
            header_match_specifier: Some(specifier),
            ..Default::default()
        });
    }
    for (name, cond) in &m.query {
        let specifier = match cond {
            // `present = false` is refused for query parameters when the file is read.
            StringCondition::Present(p) => QueryParameterMatchSpecifier::PresentMatch(*p),
            other => QueryParameterMatchSpecifier::StringMatch(string_matcher(other)),
        };
        out.query_parameters.push(QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(specifier),
        });
    }
    out
}

fn regex(re: &str) -> RegexMatcher {
    RegexMatcher {
        regex: re.to_string(),
        ..Default::default()
    }
}

fn string_matcher(cond: &StringCondition) -> StringMatcher {
    let pattern = match cond {
        StringCondition::Exact(v) => MatchPattern::Exact(v.clone()),
        StringCondition::Prefix(v) => MatchPattern::Prefix(v.clone()),
        StringCondition::Regex(v) => MatchPattern::SafeRegex(regex(v)),
        // Callers handle presence; an empty prefix matches any value.
        StringCondition::Present(_) => MatchPattern::Prefix(String::new()),
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    }
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix(p.to_string())),
        ..Default::default()
    }
}

fn exact_header(name: &str, value: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(value.to_string())),
            ignore_case: false,
        })),
        ..Default::default()
    }
}
