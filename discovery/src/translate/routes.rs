//! Traffic rules -> route configurations: one virtual host per HTTP service, its routes from the
//! service's `[routes.<svc>]` rules, in order (first match wins).

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier, weighted_cluster::ClusterWeight, HeaderMatcher, RetryPolicy, Route,
    RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::UInt32Value;
use pilotfish_registries::model::{self, Catalog, Service};

use super::rbac::{self, Policies};
use super::{duration, inbound_name, outbound_name, subset_name, INBOUND};
use crate::xds::resource::Resource;

/// Retry conditions when a route asks for retries without naming any: failures where the
/// request did not reach the app, so that retrying is safe for any method.
const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,reset";

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
        let Some(specifier) = cluster_specifier(to) else {
            continue;
        };
        routes.push(Route {
            r#match: Some(route_match(&r.matches)),
            action: Some(Action::Route(action(rule, specifier))),
            ..Default::default()
        });
        if r.matches.is_empty() {
            catch_all = true;
            break; // nothing after a catch-all can match
        }
    }
    // Requests no rule matches go to the whole service rather than a 404.
    if !catch_all {
        routes.push(Route {
            r#match: Some(prefix("/")),
            action: Some(Action::Route(action(
                rule,
                ClusterSpecifier::Cluster(whole),
            ))),
            ..Default::default()
        });
    }
    VirtualHost {
        name: svc.name.clone(),
        domains: domains(svc),
        routes,
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
        retry_policy: rule.and_then(|r| r.retries.as_ref()).map(retry_policy),
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
        ..Default::default()
    }
}

fn route_match(m: &model::RouteMatch) -> RouteMatch {
    let mut out = match (&m.path_exact, &m.path_prefix) {
        (Some(exact), _) => RouteMatch {
            path_specifier: Some(PathSpecifier::Path(exact.clone())),
            ..Default::default()
        },
        (None, Some(p)) => prefix(p),
        (None, None) => prefix("/"),
    };
    if let Some(method) = &m.method {
        out.headers.push(exact_header(":method", method));
    }
    out.headers.extend(
        m.headers
            .iter()
            .map(|(name, value)| exact_header(name, value)),
    );
    out
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
