//! Minimal ADS servers (SotW and Delta) that answer Envoy from a snapshot of the cache when no
//! discovery replica can be reached. Pure: one request in, at most one response out.
//!
//! The snapshot does not change while it is served, so the servers only follow subscriptions:
//! answer the first request for a type and every subscription change; ignore ACKs, NACKs
//! (logged) and stale nonces. Versions are `cached-<hash>` so Envoy's stats show the config
//! came from the agent's cache.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tracing::warn;

use super::cache::{is_full_state, XdsCache, ENDPOINT};

pub trait FallbackServer: Send {
    type Req;
    type Resp;
    fn handle(&mut self, req: &Self::Req) -> Option<Self::Resp>;
}

/// The cached resources `wildcard` or `names` select, plus the requested names not cached.
fn select(
    cache: &XdsCache,
    type_url: &str,
    wildcard: bool,
    names: &BTreeSet<String>,
) -> (Vec<(String, String, Any)>, Vec<String>) {
    let empty = Default::default();
    let have = cache.resources(type_url).unwrap_or(&empty);
    let mut found = Vec::new();
    let mut missing = Vec::new();
    if wildcard {
        found.extend(
            have.iter()
                .map(|(n, r)| (n.clone(), r.version.clone(), r.resource.clone())),
        );
    }
    for name in names {
        match have.get(name) {
            Some(_) if wildcard => {}
            Some(r) => found.push((name.clone(), r.version.clone(), r.resource.clone())),
            None => missing.push(name.clone()),
        }
    }
    (found, missing)
}

/// An empty assignment for a cluster whose endpoints are not cached, so the cluster finishes
/// warming instead of waiting out Envoy's initial fetch timeout (xDS checklist b.6).
fn empty_assignment(name: &str) -> Any {
    Any {
        type_url: ENDPOINT.into(),
        value: ClusterLoadAssignment {
            cluster_name: name.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

#[derive(Debug)]
pub struct SotwFallback {
    cache: XdsCache,
    /// Per type: the nonce and the names of the last response.
    sent: HashMap<String, (String, Vec<String>)>,
    next_nonce: u64,
}

impl SotwFallback {
    pub fn new(cache: XdsCache) -> Self {
        SotwFallback {
            cache,
            sent: HashMap::new(),
            next_nonce: 0,
        }
    }
}

impl FallbackServer for SotwFallback {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;

    fn handle(&mut self, req: &DiscoveryRequest) -> Option<DiscoveryResponse> {
        if let Some(err) = &req.error_detail {
            warn!(type_url = %req.type_url, error = %err.message, "envoy rejected cached config");
            return None;
        }
        let mut names = req.resource_names.clone();
        names.sort();
        if let Some((nonce, last_names)) = self.sent.get(&req.type_url) {
            if !req.response_nonce.is_empty() && req.response_nonce != *nonce {
                return None; // stale: a newer response is in flight
            }
            if req.response_nonce == *nonce && names == *last_names {
                return None; // ACK
            }
        }
        let wildcard =
            is_full_state(&req.type_url) && (names.is_empty() || names.iter().any(|n| n == "*"));
        let wanted: BTreeSet<String> = names.iter().filter(|n| *n != "*").cloned().collect();
        let (found, missing) = select(&self.cache, &req.type_url, wildcard, &wanted);
        let mut resources: Vec<Any> = found.into_iter().map(|(_, _, any)| any).collect();
        if req.type_url == ENDPOINT {
            resources.extend(missing.iter().map(|n| empty_assignment(n)));
        }
        self.next_nonce += 1;
        let nonce = format!("cached-{}", self.next_nonce);
        self.sent
            .insert(req.type_url.clone(), (nonce.clone(), names.clone()));
        Some(DiscoveryResponse {
            version_info: self.cache.type_version(&req.type_url),
            resources,
            type_url: req.type_url.clone(),
            nonce,
            ..Default::default()
        })
    }
}

#[derive(Debug, Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
}

#[derive(Debug)]
pub struct DeltaFallback {
    cache: XdsCache,
    subs: HashMap<String, DeltaSub>,
    next_nonce: u64,
}

impl DeltaFallback {
    pub fn new(cache: XdsCache) -> Self {
        DeltaFallback {
            cache,
            subs: HashMap::new(),
            next_nonce: 0,
        }
    }
}

impl FallbackServer for DeltaFallback {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;

    fn handle(&mut self, req: &DeltaDiscoveryRequest) -> Option<DeltaDiscoveryResponse> {
        if let Some(err) = &req.error_detail {
            warn!(type_url = %req.type_url, error = %err.message, "envoy rejected cached config");
            return None;
        }
        let first = !self.subs.contains_key(&req.type_url);
        let sub = self.subs.entry(req.type_url.clone()).or_default();
        let mut added = BTreeSet::new();
        let mut newly_wildcard = false;
        if first && req.resource_names_subscribe.is_empty() && is_full_state(&req.type_url) {
            // Legacy wildcard: the first LDS/CDS request naming nothing.
            sub.wildcard = true;
            newly_wildcard = true;
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(name);
            }
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                newly_wildcard |= !sub.wildcard;
                sub.wildcard = true;
            } else if sub.names.insert(name.clone()) {
                added.insert(name.clone());
            }
        }
        if !first && !newly_wildcard && added.is_empty() {
            return None; // ACK, NACK-free unsubscribe, or a no-op
        }
        let (found, missing) = select(&self.cache, &req.type_url, newly_wildcard, &added);
        let resources = found
            .into_iter()
            .filter(|(name, version, _)| req.initial_resource_versions.get(name) != Some(version))
            .map(|(name, version, any)| Resource {
                name,
                version,
                resource: Some(any),
                ..Default::default()
            })
            .collect();
        self.next_nonce += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: self.cache.type_version(&req.type_url),
            resources,
            type_url: req.type_url.clone(),
            removed_resources: missing,
            nonce: format!("cached-{}", self.next_nonce),
            ..Default::default()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::xds::cache::tests::{cla, cluster, sotw};
    use crate::xds::cache::CLUSTER;

    fn cache() -> XdsCache {
        let mut c = XdsCache::default();
        c.apply_sotw(&sotw(CLUSTER, "1", vec![cluster("a"), cluster("b")]));
        c.apply_sotw(&sotw(ENDPOINT, "1", vec![cla("a", 1), cla("b", 2)]));
        c
    }

    fn req(type_url: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn sotw_serves_full_cds_then_requested_eds_and_ignores_acks() {
        let mut s = SotwFallback::new(cache());
        let cds = s.handle(&req(CLUSTER, &[], "")).unwrap();
        assert_eq!(cds.resources, vec![cluster("a"), cluster("b")]);
        assert!(cds.version_info.starts_with("cached-"));
        assert!(s.handle(&req(CLUSTER, &[], &cds.nonce)).is_none(), "ACK");

        let eds = s.handle(&req(ENDPOINT, &["b", "zz"], "")).unwrap();
        assert_eq!(eds.resources[0], cla("b", 2));
        // An uncached cluster gets an empty assignment so it can finish warming.
        assert_eq!(eds.resources[1], empty_assignment("zz"));
        assert!(s.handle(&req(ENDPOINT, &["b", "zz"], &eds.nonce)).is_none());
        assert!(s.handle(&req(ENDPOINT, &["a"], "stale")).is_none());
        let more = s.handle(&req(ENDPOINT, &["a", "b"], &eds.nonce)).unwrap();
        assert_eq!(more.resources, vec![cla("a", 1), cla("b", 2)]);
    }

    #[test]
    fn delta_serves_wildcard_and_subscriptions() {
        let mut s = DeltaFallback::new(cache());
        let cds = s
            .handle(&DeltaDiscoveryRequest {
                type_url: CLUSTER.into(),
                ..Default::default()
            })
            .unwrap();
        let names: Vec<_> = cds.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let ack = DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: cds.nonce.clone(),
            ..Default::default()
        };
        assert!(s.handle(&ack).is_none());

        let eds = s
            .handle(&DeltaDiscoveryRequest {
                type_url: ENDPOINT.into(),
                resource_names_subscribe: vec!["a".into(), "nope".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(eds.resources.len(), 1);
        assert_eq!(eds.resources[0].resource, Some(cla("a", 1)));
        assert_eq!(eds.removed_resources, ["nope"]);

        let more = s
            .handle(&DeltaDiscoveryRequest {
                type_url: ENDPOINT.into(),
                resource_names_subscribe: vec!["b".into()],
                resource_names_unsubscribe: vec!["a".into()],
                response_nonce: eds.nonce,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(more.resources[0].name, "b");
    }

    #[test]
    fn delta_skips_resources_envoy_already_has() {
        let c = cache();
        let version = c.resources(CLUSTER).unwrap()["a"].version.clone();
        let mut s = DeltaFallback::new(c);
        let cds = s
            .handle(&DeltaDiscoveryRequest {
                type_url: CLUSTER.into(),
                initial_resource_versions: [("a".to_string(), version)].into(),
                ..Default::default()
            })
            .unwrap();
        let names: Vec<_> = cds.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["b"]);
    }
}
