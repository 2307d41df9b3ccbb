//! What a client subscribed to for one resource type, with the xDS wildcard rules.
//!
//! LDS and CDS have a legacy wildcard: a client that never named a resource of the type gets
//! everything. Once it names anything (including `"*"`), an empty subscription means nothing.
//! EDS and RDS have no wildcard: an empty subscription always means nothing. Both protocol
//! variants share this struct; SotW replaces the whole set per request, Delta adds and removes.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

use crate::resources::is_wildcard_type;

/// A set of subscribed names. Thousands of streams subscribe to the same names (every EDS
/// cluster of their scope), so sets are interned: equal sets share one allocation.
pub type Names = Arc<BTreeSet<String>>;

/// Sets smaller than this are not worth interning.
const INTERN_MIN_LEN: usize = 16;

/// The shared copy of `set` (interned when large).
fn intern(set: BTreeSet<String>) -> Names {
    type Table = HashMap<u64, Vec<Weak<BTreeSet<String>>>>;
    static TABLE: Mutex<Option<Table>> = Mutex::new(None);
    if set.len() < INTERN_MIN_LEN {
        return Arc::new(set);
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    set.hash(&mut hasher);
    let key = hasher.finish();
    let mut table = TABLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let table = table.get_or_insert_with(HashMap::new);
    let bucket = table.entry(key).or_default();
    bucket.retain(|w| w.strong_count() > 0);
    if let Some(found) = bucket.iter().filter_map(Weak::upgrade).find(|s| **s == set) {
        return found;
    }
    let shared = Arc::new(set);
    bucket.push(Arc::downgrade(&shared));
    if table.len() > 1024 {
        table.retain(|_, b| {
            b.retain(|w| w.strong_count() > 0);
            !b.is_empty()
        });
    }
    shared
}

/// The explicit wildcard name.
pub const WILDCARD: &str = "*";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Subscribed to every resource of the type (explicit `"*"` or the legacy empty request).
    pub wildcard: bool,
    /// Names subscribed explicitly (never contains `"*"`), interned.
    pub names: Names,
    /// The client has named something (`"*"` included), so the legacy wildcard is gone.
    explicit: bool,
}

impl Subscription {
    /// Applies a SotW request's `resource_names`, which replace the previous subscription.
    pub fn set_sotw(&mut self, type_url: &str, names: &[String]) {
        if names.is_empty() {
            self.wildcard = is_wildcard_type(type_url) && !self.explicit;
            self.names = Names::default();
            return;
        }
        self.explicit = true;
        self.wildcard = is_wildcard_type(type_url) && names.iter().any(|n| n == WILDCARD);
        self.names = intern(
            names
                .iter()
                .filter(|n| n.as_str() != WILDCARD)
                .cloned()
                .collect(),
        );
    }

    /// Whether [`Subscription::set_sotw`] with these names would leave the subscription as it
    /// is (the usual ACK), checked without allocating.
    pub fn same_sotw(&self, type_url: &str, names: &[String]) -> bool {
        if names.is_empty() {
            return self.names.is_empty()
                && self.wildcard == (is_wildcard_type(type_url) && !self.explicit);
        }
        let wildcard = is_wildcard_type(type_url) && names.iter().any(|n| n == WILDCARD);
        if !self.explicit || self.wildcard != wildcard {
            return false;
        }
        // Envoy names resources in the same sorted order every time: one pass of string
        // compares, not a tree lookup per name (2000 SotW ACKs of 1000 names per push).
        if !wildcard
            && names.len() == self.names.len()
            && names.iter().zip(self.names.iter()).all(|(a, b)| a == b)
        {
            return true;
        }
        let mut count = 0;
        for n in names.iter().filter(|n| n.as_str() != WILDCARD) {
            if !self.names.contains(n) {
                return false;
            }
            count += 1;
        }
        // A repeated name makes the count differ: then the slow path decides.
        self.explicit && self.wildcard == wildcard && count == self.names.len()
    }

    /// Applies a Delta request's subscribe and unsubscribe lists. `first` is true for the first
    /// request of the type on the stream, the only one that can start the legacy wildcard.
    pub fn apply_delta(
        &mut self,
        type_url: &str,
        first: bool,
        subscribe: &[String],
        unsubscribe: &[String],
    ) {
        let wildcard_type = is_wildcard_type(type_url);
        if first && subscribe.is_empty() && !self.explicit {
            self.wildcard = wildcard_type;
        }
        let changes = subscribe.iter().chain(unsubscribe).any(|n| n != WILDCARD);
        let mut names = if changes {
            // Copied once per request that changes names, then interned again.
            BTreeSet::clone(&self.names)
        } else {
            BTreeSet::new()
        };
        for name in subscribe {
            self.explicit = true;
            if name == WILDCARD {
                self.wildcard = wildcard_type;
            } else {
                names.insert(name.clone());
            }
        }
        for name in unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                names.remove(name);
            }
        }
        if changes {
            self.names = intern(names);
        }
    }

    /// Whether a resource of this name is wanted.
    pub fn covers(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Whether exactly the names of `map` are covered: then the shared map itself is the
    /// answer, with no per-stream copy. (A wildcard covers every map.)
    pub fn covers_exactly(&self, map: &crate::resources::ResourceMap) -> bool {
        self.wildcard
            || (self.names.len() == map.len()
                && self.names.iter().zip(map.keys()).all(|(a, b)| a == b))
    }

    /// Subscribed to nothing at all.
    pub fn is_empty(&self) -> bool {
        !self.wildcard && self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{CLUSTER, ENDPOINT};

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sotw_wildcard_four_steps() {
        let mut s = Subscription::default();
        // 1. Empty, never named: wildcard.
        s.set_sotw(CLUSTER, &[]);
        assert!(s.wildcard && s.names.is_empty());
        // 2. "*" and "A": wildcard plus A.
        s.set_sotw(CLUSTER, &names(&["*", "A"]));
        assert!(s.wildcard && s.names.contains("A"));
        // 3. "A": wildcard dropped, A kept.
        s.set_sotw(CLUSTER, &names(&["A"]));
        assert!(!s.wildcard && s.covers("A") && !s.covers("B"));
        // 4. Empty again: unsubscribe from everything, not a wildcard.
        s.set_sotw(CLUSTER, &[]);
        assert!(s.is_empty());
    }

    #[test]
    fn delta_wildcard_four_steps() {
        let mut s = Subscription::default();
        s.apply_delta(CLUSTER, true, &[], &[]);
        assert!(s.wildcard);
        s.apply_delta(CLUSTER, false, &names(&["A"]), &[]);
        assert!(s.wildcard && s.names.contains("A"));
        s.apply_delta(CLUSTER, false, &[], &names(&["*"]));
        assert!(!s.wildcard && s.covers("A"));
        s.apply_delta(CLUSTER, false, &[], &names(&["A"]));
        assert!(s.is_empty());
    }

    #[test]
    fn eds_empty_is_unsubscribe() {
        let mut s = Subscription::default();
        s.set_sotw(ENDPOINT, &[]);
        assert!(s.is_empty());
        s.set_sotw(ENDPOINT, &names(&["a"]));
        assert!(s.covers("a"));
        s.set_sotw(ENDPOINT, &[]);
        assert!(s.is_empty());
        let mut d = Subscription::default();
        d.apply_delta(ENDPOINT, true, &[], &[]);
        assert!(d.is_empty());
        d.apply_delta(ENDPOINT, false, &names(&["*"]), &[]);
        assert!(!d.wildcard, "no wildcard for EDS");
    }
}
