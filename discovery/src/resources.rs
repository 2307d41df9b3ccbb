//! Encoded xDS resources, shared by every proxy that receives them. The bottom floor of
//! discovery: `translate` produces these and `xds` serves them; neither imports the other.
//!
//! A resource is encoded to an `Any` once, when a snapshot is translated, and handed to every
//! stream as an `Arc`. Its version is a content hash of the encoded bytes, so replicas and a
//! restarted discovery give the same versions for the same input. Translation must therefore
//! encode deterministically: prost encodes `map` fields in `HashMap` order, so no map we build
//! holds more than one entry (see `translate::labels_metadata`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sha2::{Digest, Sha256};

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The resource kinds discovery serves, in the order additions are pushed (make-before-break).
pub const PUSH_ORDER: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// Whether an empty subscription of this type means "everything" (LDS and CDS only).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

/// One named, encoded resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    /// Hex content hash of `body.value`.
    pub version: String,
    pub body: Any,
}

impl Resource {
    pub fn encode<M: Message + prost::Name>(name: impl Into<String>, message: &M) -> Arc<Resource> {
        let value = message.encode_to_vec();
        let version = content_hash(&[&value]);
        Arc::new(Resource {
            name: name.into(),
            version,
            body: Any {
                type_url: M::type_url(),
                value,
            },
        })
    }
}

/// Resources of one type, by name.
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// Names whose resource differs between two maps of one type (changed, added or removed), in
/// name order. Unchanged means the same `Arc` or the same version.
///
/// Every stream asks this for the same pair of maps after a snapshot change, so the answer is
/// memoized for the last few pairs: 2000 streams then walk one 1000-entry diff once, not 2000
/// times. The memo holds `Weak`s, which keep the maps' allocations (not their contents)
/// alive, so an address in it can never be reused by another map while it is there.
pub fn changed_names(old: &Arc<ResourceMap>, new: &Arc<ResourceMap>) -> Arc<[String]> {
    static MEMO: MapMemo<(MapKey, MapKey), Arc<[String]>> = MapMemo::new(8);
    if Arc::ptr_eq(old, new) {
        return Arc::from([]);
    }
    MEMO.get_or_make(
        (MapKey::of(old), MapKey::of(new)),
        large(&[old, new]),
        || diff(old, new).into(),
    )
}

fn diff(old: &ResourceMap, new: &ResourceMap) -> Vec<String> {
    let mut out = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((name, _)), None) => {
                out.push((*name).clone());
                a.next();
            }
            (None, Some((name, _))) => {
                out.push((*name).clone());
                b.next();
            }
            (Some((na, ra)), Some((nb, rb))) => match na.cmp(nb) {
                std::cmp::Ordering::Less => {
                    out.push((*na).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*nb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(ra, rb) && ra.version != rb.version {
                        out.push((*na).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// The resources present in `new` among those that differ from `old`, and the names `new`
/// no longer has, in name order.
#[derive(Debug, Default)]
pub struct Changes {
    pub present: Vec<Arc<Resource>>,
    pub absent: Vec<String>,
}

/// [`changed_names`] split into what to send and what went away, memoized the same way.
pub fn classified_changes(old: &Arc<ResourceMap>, new: &Arc<ResourceMap>) -> Arc<Changes> {
    static MEMO: MapMemo<(MapKey, MapKey), Arc<Changes>> = MapMemo::new(8);
    MEMO.get_or_make(
        (MapKey::of(old), MapKey::of(new)),
        large(&[old, new]),
        || {
            let mut c = Changes::default();
            for name in changed_names(old, new).iter() {
                match new.get(name) {
                    Some(r) => c.present.push(r.clone()),
                    None => c.absent.push(name.clone()),
                }
            }
            Arc::new(c)
        },
    )
}

/// `new`, plus the resources of `old` that `new` no longer has: what a proxy may hold while
/// something it runs may still name them (make-before-break). Returns `new` itself (the same
/// `Arc`) when nothing was removed, and `old` itself when it already holds every resource of
/// `new` at the same version, so streams keep sharing maps and a repeated call changes nothing.
///
/// Memoized like [`changed_names`]: every stream of a scope asks for the same pair.
pub fn keep_removed(old: &Arc<ResourceMap>, new: &Arc<ResourceMap>) -> Arc<ResourceMap> {
    static MEMO: MapMemo<(MapKey, MapKey), Arc<ResourceMap>> = MapMemo::new(8);
    if Arc::ptr_eq(old, new) {
        return new.clone();
    }
    MEMO.get_or_make(
        (MapKey::of(old), MapKey::of(new)),
        large(&[old, new]),
        || {
            if old.keys().all(|k| new.contains_key(k)) {
                new.clone()
            } else if new
                .iter()
                .all(|(k, r)| old.get(k).is_some_and(|o| o.version == r.version))
            {
                old.clone()
            } else {
                let mut union = ResourceMap::clone(new);
                for (name, r) in old.iter() {
                    union.entry(name.clone()).or_insert_with(|| r.clone());
                }
                Arc::new(union)
            }
        },
    )
}

/// A map's identity for a memo: its address, with a `Weak` that keeps the allocation (not
/// the contents) alive, so the address cannot be reused by another map while the entry lives.
#[derive(Debug)]
pub struct MapKey(Weak<ResourceMap>);

impl MapKey {
    pub fn of(map: &Arc<ResourceMap>) -> MapKey {
        MapKey(Arc::downgrade(map))
    }
}

/// What a memo key must say: whether it names the same maps, and whether they still exist.
pub trait MemoKey {
    fn same(&self, other: &Self) -> bool;
    fn alive(&self) -> bool;
}

impl MemoKey for MapKey {
    fn same(&self, other: &Self) -> bool {
        self.0.ptr_eq(&other.0)
    }
    fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl<A: MemoKey, B: MemoKey> MemoKey for (A, B) {
    fn same(&self, other: &Self) -> bool {
        self.0.same(&other.0) && self.1.same(&other.1)
    }
    fn alive(&self) -> bool {
        self.0.alive() && self.1.alive()
    }
}

/// Maps smaller than this are computed directly rather than memoized (per-proxy maps would
/// only crowd the shared ones out).
const MEMO_MIN_LEN: usize = 32;

/// Whether any of these maps is worth a memo entry.
pub fn large(maps: &[&Arc<ResourceMap>]) -> bool {
    maps.iter().any(|m| m.len() >= MEMO_MIN_LEN)
}

/// A few values derived from shared maps, newest last. Every stream of a scope asks for the
/// same value after a snapshot change; the memo makes that one computation, not thousands.
/// It only caches derived values, so a panic elsewhere cannot leave it wrong.
pub struct MapMemo<K, V> {
    entries: Mutex<VecDeque<(K, V)>>,
    capacity: usize,
}

impl<K: MemoKey, V: Clone> MapMemo<K, V> {
    pub const fn new(capacity: usize) -> MapMemo<K, V> {
        MapMemo {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// The value for `key`, made by `make` (outside the lock) when not there. `memoize` false
    /// just makes it.
    pub fn get_or_make(&self, key: K, memoize: bool, make: impl FnOnce() -> V) -> V {
        if !memoize {
            return make();
        }
        if let Some((_, v)) = self.lock().iter().find(|(k, _)| k.same(&key)) {
            return v.clone();
        }
        let value = make();
        let mut entries = self.lock();
        entries.retain(|(k, _)| k.alive());
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back((key, value.clone()));
        value
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(K, V)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A short hex SHA-256 over the given byte strings.
pub fn content_hash(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The version of a whole set of resources of one type (SotW `version_info`).
pub fn set_version(resources: &ResourceMap) -> String {
    let mut hasher = Sha256::new();
    for (name, r) in resources {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(r.version.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// [`set_version`] of a shared map, computed once per map for large ones (every stream of a
/// scope asks for the same map's version).
pub fn map_version(map: &Arc<ResourceMap>) -> String {
    static MEMO: MapMemo<MapKey, String> = MapMemo::new(16);
    MEMO.get_or_make(MapKey::of(map), large(&[map]), || set_version(map))
}

/// A version over `(name, version)` pairs: Delta's `system_version_info`, which only helps
/// debugging.
pub fn versions_hash<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut hasher = Sha256::new();
    for (name, version) in pairs {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(version.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// An empty ClusterLoadAssignment for `cluster`: the answer to an EDS request for a name
/// discovery does not know, so a warming cluster completes instead of waiting for
/// `initial_fetch_timeout` (Envoy #9934).
pub fn empty_assignment(cluster: &str) -> Arc<Resource> {
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    Resource::encode(
        cluster,
        &ClusterLoadAssignment {
            cluster_name: cluster.to_string(),
            ..Default::default()
        },
    )
}

/// A short name for a type URL, for logs and metric labels.
pub fn short_name(type_url: &str) -> &'static str {
    match type_url {
        LISTENER => "lds",
        ROUTE => "rds",
        CLUSTER => "cds",
        ENDPOINT => "eds",
        SECRET => "sds",
        _ => "other",
    }
}

/// What one proxy receives, by type.
#[derive(Debug, Clone, Default)]
pub struct ProxyResources {
    pub clusters: Arc<ResourceMap>,
    pub endpoints: Arc<ResourceMap>,
    pub listeners: Arc<ResourceMap>,
    pub routes: Arc<ResourceMap>,
}

impl ProxyResources {
    pub fn of_type(&self, type_url: &str) -> Option<&Arc<ResourceMap>> {
        match type_url {
            CLUSTER => Some(&self.clusters),
            ENDPOINT => Some(&self.endpoints),
            LISTENER => Some(&self.listeners),
            ROUTE => Some(&self.routes),
            _ => None,
        }
    }
}
