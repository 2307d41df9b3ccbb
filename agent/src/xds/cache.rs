//! The last xDS configuration Envoy accepted, kept so a host can boot into a working mesh when
//! discovery is unreachable. Pure data structures; persistence is in `store.rs`.
//!
//! Data flow: the relay records every response it forwards in a per-stream [`AckTracker`];
//! when Envoy's next request ACKs that nonce (no `error_detail`), the tracker hands the
//! response back and it is applied to the shared [`XdsCache`]:
//!
//! - SotW LDS/CDS responses are the complete set, so they replace the type.
//! - SotW EDS/RDS (and anything else) carry subsets, so they merge by resource name.
//! - Delta responses upsert `resources` and delete `removed_resources`.
//!
//! A NACKed response is dropped: the cache only holds what Envoy accepted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// SotW responses may wrap each resource (for TTLs) in a `Resource`.
const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// Written at the start of the cache file; a file without it is not ours (or an old format).
pub const FILE_MAGIC: &[u8] = b"pilotfish-xds-cache/1\n";

/// Responses kept per type while waiting for Envoy's answer. Envoy answers every response, so
/// this only bounds memory against a misbehaving client.
const MAX_PENDING_PER_TYPE: usize = 32;

/// SotW types whose responses carry the complete set (xDS checklist b.5).
pub fn is_full_state(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

#[derive(Debug, Clone, PartialEq)]
pub struct CachedResource {
    pub version: String,
    pub resource: Any,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsCache {
    types: BTreeMap<String, BTreeMap<String, CachedResource>>,
}

/// Every xDS resource type the agent caches names its resources in field 1 (`name`, or
/// `cluster_name` for ClusterLoadAssignment); decoding only that field avoids decoding whole
/// listeners and clusters just to learn their names.
#[derive(Clone, PartialEq, Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

impl XdsCache {
    pub fn is_empty(&self) -> bool {
        self.types.values().all(BTreeMap::is_empty)
    }

    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, CachedResource>> {
        self.types.get(type_url)
    }

    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// Applies an accepted SotW response. Returns whether anything changed.
    pub fn apply_sotw(&mut self, resp: &DiscoveryResponse) -> bool {
        let mut incoming = BTreeMap::new();
        for any in &resp.resources {
            if let Some((name, entry)) = sotw_entry(any, &resp.version_info) {
                incoming.insert(name, entry);
            } else {
                tracing::debug!(type_url = %resp.type_url, "resource without a name not cached");
            }
        }
        let slot = self.types.entry(resp.type_url.clone()).or_default();
        let before = slot.clone();
        if is_full_state(&resp.type_url) {
            *slot = incoming;
        } else {
            slot.extend(incoming);
        }
        *slot != before
    }

    /// Applies an accepted Delta response. Returns whether anything changed.
    pub fn apply_delta(&mut self, resp: &DeltaDiscoveryResponse) -> bool {
        let slot = self.types.entry(resp.type_url.clone()).or_default();
        let mut changed = false;
        for r in &resp.resources {
            // A resource without a body is a TTL heartbeat: the client keeps what it has.
            let Some(body) = &r.resource else { continue };
            let entry = CachedResource {
                version: r.version.clone(),
                resource: body.clone(),
            };
            if slot.get(&r.name) != Some(&entry) {
                slot.insert(r.name.clone(), entry);
                changed = true;
            }
        }
        for name in &resp.removed_resources {
            changed |= slot.remove(name).is_some();
        }
        changed
    }

    /// A version for the whole cached set of a type, stable across agent restarts.
    pub fn type_version(&self, type_url: &str) -> String {
        let mut h = Fnv::new();
        h.write(type_url.as_bytes());
        for (name, r) in self.types.get(type_url).into_iter().flatten() {
            h.write(name.as_bytes());
            h.write(r.version.as_bytes());
            h.write(&r.resource.value);
        }
        format!("cached-{:016x}", h.0)
    }

    /// The file encoding: [`FILE_MAGIC`], then per type one length-delimited
    /// `DeltaDiscoveryResponse` holding that type's resources with their names and versions.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = FILE_MAGIC.to_vec();
        for (type_url, resources) in &self.types {
            if resources.is_empty() {
                continue;
            }
            let msg = DeltaDiscoveryResponse {
                type_url: type_url.clone(),
                resources: resources
                    .iter()
                    .map(|(name, r)| Resource {
                        name: name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.resource.clone()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            // Writing into a Vec cannot run out of space.
            let _ = msg.encode_length_delimited(&mut out);
        }
        out
    }

    pub fn decode(mut bytes: &[u8]) -> Result<XdsCache, CacheDecodeError> {
        bytes = bytes
            .strip_prefix(FILE_MAGIC)
            .ok_or(CacheDecodeError::NotACache)?;
        let mut cache = XdsCache::default();
        while !bytes.is_empty() {
            let msg = DeltaDiscoveryResponse::decode_length_delimited(&mut bytes)?;
            cache.apply_delta(&msg);
        }
        Ok(cache)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheDecodeError {
    #[error("not a pilotfish xDS cache file")]
    NotACache,
    #[error("truncated or corrupt: {0}")]
    Corrupt(#[from] prost::DecodeError),
}

fn sotw_entry(any: &Any, version: &str) -> Option<(String, CachedResource)> {
    if any.type_url == RESOURCE_WRAPPER {
        let r = Resource::decode(any.value.as_slice()).ok()?;
        let version = if r.version.is_empty() {
            version.to_string()
        } else {
            r.version
        };
        let resource = r.resource?;
        return (!r.name.is_empty()).then_some((r.name, CachedResource { version, resource }));
    }
    let named = Named::decode(any.value.as_slice()).ok()?;
    (!named.name.is_empty()).then(|| {
        (
            named.name,
            CachedResource {
                version: version.to_string(),
                resource: any.clone(),
            },
        )
    })
}

/// The name of a resource as it appears in a SotW response (for tests and the fallback).
pub fn resource_name(any: &Any) -> Option<String> {
    sotw_entry(any, "").map(|(name, _)| name)
}

/// FNV-1a, 64 bit: a stable content hash without another dependency.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Responses relayed to Envoy on one stream, waiting for Envoy to ACK or NACK them.
#[derive(Debug)]
pub struct AckTracker<R> {
    pending: HashMap<String, VecDeque<(String, R)>>,
}

impl<R> Default for AckTracker<R> {
    fn default() -> Self {
        AckTracker {
            pending: HashMap::new(),
        }
    }
}

impl<R> AckTracker<R> {
    /// Records a response about to be forwarded to Envoy.
    pub fn sent(&mut self, type_url: &str, nonce: &str, resp: R) {
        let queue = self.pending.entry(type_url.to_string()).or_default();
        if queue.len() == MAX_PENDING_PER_TYPE {
            queue.pop_front();
        }
        queue.push_back((nonce.to_string(), resp));
    }

    /// Envoy answered `nonce` for `type_url`. Returns the responses it accepted, oldest first:
    /// on an ACK, every response up to and including that nonce (Envoy ACKs a burst of CDS
    /// updates received while warming with the latest nonce only); on a NACK, none.
    /// Unknown nonces (stale, or from before this stream) return nothing.
    pub fn answered(&mut self, type_url: &str, nonce: &str, nack: bool) -> Vec<R> {
        let Some(queue) = self.pending.get_mut(type_url) else {
            return Vec::new();
        };
        let Some(pos) = queue.iter().position(|(n, _)| n == nonce) else {
            return Vec::new();
        };
        let answered: Vec<R> = queue.drain(..=pos).map(|(_, r)| r).collect();
        if nack {
            Vec::new()
        } else {
            answered
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    pub(crate) fn cluster(name: &str) -> Any {
        Any {
            type_url: CLUSTER.into(),
            value: Cluster {
                name: name.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }

    pub(crate) fn cla(name: &str, marker: u32) -> Any {
        Any {
            type_url: ENDPOINT.into(),
            value: ClusterLoadAssignment {
                cluster_name: name.into(),
                endpoints: (0..marker).map(|_| Default::default()).collect(),
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }

    pub(crate) fn sotw(type_url: &str, version: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: type_url.into(),
            version_info: version.into(),
            nonce: format!("n-{version}"),
            resources,
            ..Default::default()
        }
    }

    fn names(cache: &XdsCache, type_url: &str) -> Vec<String> {
        cache
            .resources(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    #[test]
    fn sotw_cds_replaces_and_eds_merges() {
        let mut c = XdsCache::default();
        assert!(c.apply_sotw(&sotw(CLUSTER, "1", vec![cluster("a"), cluster("b")])));
        assert!(c.apply_sotw(&sotw(CLUSTER, "2", vec![cluster("b"), cluster("c")])));
        assert_eq!(names(&c, CLUSTER), ["b", "c"]);
        assert!(!c.apply_sotw(&sotw(CLUSTER, "2", vec![cluster("b"), cluster("c")])));

        c.apply_sotw(&sotw(ENDPOINT, "1", vec![cla("a", 1)]));
        c.apply_sotw(&sotw(ENDPOINT, "2", vec![cla("b", 1)]));
        c.apply_sotw(&sotw(ENDPOINT, "3", vec![cla("a", 2)]));
        assert_eq!(names(&c, ENDPOINT), ["a", "b"]);
        let a = &c.resources(ENDPOINT).unwrap()["a"];
        assert_eq!(a.version, "3");
        assert_eq!(a.resource, cla("a", 2));
    }

    #[test]
    fn delta_upserts_and_removes() {
        let mut c = XdsCache::default();
        let resp = |res: Vec<(&str, Any)>, removed: Vec<&str>| DeltaDiscoveryResponse {
            type_url: CLUSTER.into(),
            resources: res
                .into_iter()
                .map(|(n, any)| Resource {
                    name: n.into(),
                    version: format!("v-{n}"),
                    resource: Some(any),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.into_iter().map(String::from).collect(),
            ..Default::default()
        };
        assert!(c.apply_delta(&resp(
            vec![("a", cluster("a")), ("b", cluster("b"))],
            vec![]
        )));
        assert!(c.apply_delta(&resp(vec![("c", cluster("c"))], vec!["a"])));
        assert_eq!(names(&c, CLUSTER), ["b", "c"]);
        assert!(!c.apply_delta(&resp(vec![], vec!["zzz"])));
    }

    #[test]
    fn only_acked_responses_are_returned() {
        let mut t = AckTracker::default();
        t.sent(CLUSTER, "1", "cds-1");
        t.sent(CLUSTER, "2", "cds-2");
        t.sent(ENDPOINT, "3", "eds-3");
        // Envoy ACKs a burst of CDS with the latest nonce.
        assert_eq!(t.answered(CLUSTER, "2", false), ["cds-1", "cds-2"]);
        assert!(t.answered(CLUSTER, "2", false).is_empty(), "answered once");
        // NACK: nothing to apply, and the response is forgotten.
        assert!(t.answered(ENDPOINT, "3", true).is_empty());
        assert!(t.answered(ENDPOINT, "3", false).is_empty());
        // A nonce from another type or stream is ignored.
        t.sent(ROUTE, "4", "rds-4");
        assert!(t.answered(CLUSTER, "4", false).is_empty());
        assert!(t.answered(ROUTE, "", false).is_empty());
        assert_eq!(t.answered(ROUTE, "4", false), ["rds-4"]);
    }

    #[test]
    fn encoding_round_trips_and_rejects_foreign_files() {
        let mut c = XdsCache::default();
        c.apply_sotw(&sotw(CLUSTER, "7", vec![cluster("a"), cluster("b")]));
        c.apply_sotw(&sotw(ENDPOINT, "8", vec![cla("a", 3)]));
        let bytes = c.encode();
        assert_eq!(XdsCache::decode(&bytes).unwrap(), c);
        assert!(XdsCache::decode(b"garbage").is_err());
        let mut truncated = bytes.clone();
        truncated.truncate(bytes.len() - 3);
        assert!(XdsCache::decode(&truncated).is_err());
        assert_eq!(XdsCache::decode(FILE_MAGIC).unwrap(), XdsCache::default());
    }

    #[test]
    fn type_version_follows_content() {
        let mut c = XdsCache::default();
        c.apply_sotw(&sotw(CLUSTER, "1", vec![cluster("a")]));
        let v1 = c.type_version(CLUSTER);
        assert!(v1.starts_with("cached-"));
        assert_eq!(v1, c.clone().type_version(CLUSTER));
        c.apply_sotw(&sotw(CLUSTER, "2", vec![cluster("a"), cluster("b")]));
        assert_ne!(v1, c.type_version(CLUSTER));
    }

    #[test]
    fn wrapped_sotw_resources_are_unwrapped() {
        let wrapped = Any {
            type_url: RESOURCE_WRAPPER.into(),
            value: Resource {
                name: "a".into(),
                version: "r1".into(),
                resource: Some(cluster("a")),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let mut c = XdsCache::default();
        c.apply_sotw(&sotw(CLUSTER, "1", vec![wrapped]));
        let a = &c.resources(CLUSTER).unwrap()["a"];
        assert_eq!(a.version, "r1");
        assert_eq!(a.resource, cluster("a"));
    }
}
