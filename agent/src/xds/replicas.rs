//! Which discovery replica this host talks to.
//!
//! Every host orders the configured replicas its own way, by rendezvous (highest random weight)
//! hashing of its node name with each address: hosts spread evenly over the replicas, a host
//! comes back to the same replica every time, and removing a replica moves only the hosts that
//! were on it. The hash is SHA-256, not std's per-process randomized one, so the order is the
//! same across restarts and builds.
//!
//! [`Replicas`] adds a short memory of replicas that just failed (a refused or timed-out
//! connection, a stream that broke): they are tried after the others, so a failover does not
//! wait on a dead replica's connect timeout again. A replica that closed a stream for its age
//! is not a failure; the next dial follows the usual order, which is how hosts return to a
//! replica that came back.

use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// How long a failed replica is tried last. Long enough to cover a failover and Envoy's
/// reconnects; short enough that a blip does not keep a host off its replica for long (the
/// next aged-out stream brings it back anyway).
pub const REMEMBER_FAILURE: Duration = Duration::from_secs(60);

/// `addrs` in `node`'s own order: highest score first (ties, which SHA-256 makes
/// theoretical, by address). Duplicates are kept where they fall.
pub fn order(node: &str, addrs: &[String]) -> Vec<String> {
    let mut scored: Vec<(u64, &String)> = addrs.iter().map(|a| (score(node, a), a)).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, a)| a.clone()).collect()
}

/// The rendezvous weight of `addr` for `node`. The node's length goes first so that no
/// (node, addr) pair can collide with another by moving bytes across the boundary.
fn score(node: &str, addr: &str) -> u64 {
    let mut h = Sha256::new();
    h.update((node.len() as u64).to_be_bytes());
    h.update(node.as_bytes());
    h.update(addr.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The replicas in this host's order, with the recent failures.
#[derive(Debug)]
pub struct Replicas {
    order: Vec<String>,
    /// Replicas that failed lately, with when (at most one entry each).
    failed: Mutex<Vec<(String, Instant)>>,
}

impl Replicas {
    /// `order`: the replicas as they should be tried when all are well (see [`order`]).
    pub fn new(order: Vec<String>) -> Self {
        Replicas {
            order,
            failed: Mutex::new(Vec::new()),
        }
    }

    /// Who to try, in turn: the replicas that have not failed lately in the host's order,
    /// then those that have, the longest-failed first.
    pub fn dial_order(&self, now: Instant) -> Vec<String> {
        let mut failed = self.lock();
        failed.retain(|(_, at)| now.saturating_duration_since(*at) < REMEMBER_FAILURE);
        let mut out: Vec<String> = self
            .order
            .iter()
            .filter(|a| !failed.iter().any(|(f, _)| f == *a))
            .cloned()
            .collect();
        let mut late: Vec<&(String, Instant)> = failed.iter().collect();
        late.sort_by_key(|(_, at)| *at);
        out.extend(late.into_iter().map(|(a, _)| a.clone()));
        out
    }

    /// `addr` could not be reached, or its stream broke.
    pub fn failed(&self, addr: &str, now: Instant) {
        let mut failed = self.lock();
        failed.retain(|(a, _)| a != addr);
        failed.push((addr.to_string(), now));
    }

    /// `addr` accepted a connection.
    pub fn reached(&self, addr: &str) {
        self.lock().retain(|(a, _)| a != addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Instant)>> {
        // Plain data: a panic elsewhere while holding it leaves nothing half-done.
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const PINNED: u64 = 0x5477_327c_1024_3672;

    fn three() -> Vec<String> {
        ["10.0.0.1:15012", "10.0.0.2:15012", "10.0.0.3:15012"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn the_order_is_stable_and_differs_between_nodes() {
        let addrs = three();
        let a = order("vm-a", &addrs);
        assert_eq!(a, order("vm-a", &addrs), "same node, same order");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, addrs, "a permutation of the list");
        let mut reversed = addrs.clone();
        reversed.reverse();
        assert_eq!(
            order("vm-a", &reversed),
            a,
            "independent of the configured order"
        );
        let firsts: std::collections::BTreeSet<String> = (0..20)
            .map(|i| order(&format!("vm-{i}"), &addrs)[0].clone())
            .collect();
        assert!(
            firsts.len() > 1,
            "different nodes start on different replicas"
        );
        // Pinned: the hash must not change between builds, or every host would move.
        assert_eq!(score("vm-a", "10.0.0.1:15012"), PINNED);
    }

    #[test]
    fn nodes_spread_evenly_and_removing_a_replica_moves_only_its_nodes() {
        let addrs = three();
        let nodes: Vec<String> = (0..3000).map(|i| format!("host-{i:04}.dc1")).collect();
        let first: BTreeMap<&String, String> = nodes
            .iter()
            .map(|n| (n, order(n, &addrs)[0].clone()))
            .collect();
        let mut per_replica: BTreeMap<&str, usize> = BTreeMap::new();
        for r in first.values() {
            *per_replica.entry(r.as_str()).or_default() += 1;
        }
        for (replica, count) in &per_replica {
            // 1000 expected; a fair split stays well within +-15%.
            assert!((850..=1150).contains(count), "{replica}: {count} of 3000");
        }
        let gone = &addrs[1];
        let rest: Vec<String> = addrs.iter().filter(|a| *a != gone).cloned().collect();
        for n in &nodes {
            let now = order(n, &rest)[0].clone();
            if &first[n] != gone {
                assert_eq!(now, first[n], "{n} moved although its replica stayed");
            } else {
                // It goes to its second choice, the same replica its failover would pick.
                assert_eq!(now, order(n, &addrs)[1]);
            }
        }
    }

    #[test]
    fn failed_replicas_are_tried_last_until_they_are_forgotten() {
        let replicas = Replicas::new(three());
        let t0 = Instant::now();
        assert_eq!(replicas.dial_order(t0), three());
        replicas.failed("10.0.0.1:15012", t0);
        assert_eq!(
            replicas.dial_order(t0),
            ["10.0.0.2:15012", "10.0.0.3:15012", "10.0.0.1:15012"]
        );
        replicas.failed("10.0.0.2:15012", t0 + Duration::from_secs(1));
        assert_eq!(
            replicas.dial_order(t0 + Duration::from_secs(1)),
            ["10.0.0.3:15012", "10.0.0.1:15012", "10.0.0.2:15012"],
            "the longest-failed is retried first"
        );
        replicas.reached("10.0.0.1:15012");
        assert_eq!(
            replicas.dial_order(t0 + Duration::from_secs(1)),
            ["10.0.0.1:15012", "10.0.0.3:15012", "10.0.0.2:15012"]
        );
        assert_eq!(
            replicas.dial_order(t0 + Duration::from_secs(1) + REMEMBER_FAILURE),
            three(),
            "failures are forgotten"
        );
    }
}
