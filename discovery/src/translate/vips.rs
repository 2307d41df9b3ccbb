//! Virtual IPs for mesh DNS: each service gets one address from a range (`vip_range`, default
//! 240.240.0.0/16), which the agent answers for `<service>.mesh` and which the proxy's
//! `intercept` listener maps back to the service.
//!
//! The allocation is a pure function of the set of service names and the range, so every
//! replica and every restart computes the same table with nothing stored. A service's home
//! address is the SHA-256 of its name, modulo the range's usable addresses (the network and
//! broadcast addresses are skipped); names are placed in name order and a taken home moves to
//! the next free address. So a VIP changes only when a new service whose name sorts before an
//! existing one lands on that one's address (about `services / range size` per new service:
//! 1.5% with 1000 services in a /16). A range too small for every service leaves the last ones
//! (by name) without a VIP, which is logged.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// An IPv4 range in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VipRange {
    network: u32,
    prefix: u8,
}

/// The default range: reserved (240.0.0.0/4, "future use"), so it never collides with a real
/// destination.
pub const DEFAULT_VIP_RANGE: VipRange = VipRange {
    network: u32::from_be_bytes([240, 240, 0, 0]),
    prefix: 16,
};

/// The narrowest range accepted: 14 usable addresses.
pub const MAX_PREFIX: u8 = 28;
/// The widest range accepted.
pub const MIN_PREFIX: u8 = 8;

impl Default for VipRange {
    fn default() -> Self {
        DEFAULT_VIP_RANGE
    }
}

impl VipRange {
    /// Usable addresses: all but the network and broadcast ones.
    fn usable(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 2
    }

    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1 + n)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from(ip) & mask == self.network
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

impl FromStr for VipRange {
    type Err = String;

    /// `a.b.c.d/len` with `len` from 8 to 28 and no host bits set.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("\"{s}\" is not an IPv4 range like \"240.240.0.0/16\""))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("\"{ip}\" is not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| (MIN_PREFIX..=MAX_PREFIX).contains(p))
            .ok_or_else(|| {
                format!("prefix length \"{len}\" must be from {MIN_PREFIX} to {MAX_PREFIX}")
            })?;
        let mask = u32::MAX << (32 - u32::from(prefix));
        let network = u32::from(ip);
        if network & !mask != 0 {
            return Err(format!(
                "\"{s}\" has host bits set; the range starts at {}/{prefix}",
                Ipv4Addr::from(network & mask)
            ));
        }
        Ok(VipRange { network, prefix })
    }
}

/// Each name's VIP (see the module comment). `names` may come in any order.
pub fn allocate<'a>(
    names: impl IntoIterator<Item = &'a str>,
    range: VipRange,
) -> BTreeMap<String, Ipv4Addr> {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    let usable = range.usable();
    let mut taken = std::collections::HashSet::with_capacity(names.len());
    let mut out = BTreeMap::new();
    for name in names {
        if taken.len() as u64 >= u64::from(usable) {
            tracing::warn!(%range, service = name, "vip_range is full; this service gets no VIP");
            continue;
        }
        let digest = Sha256::digest(name.as_bytes());
        let home = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % usable;
        let mut slot = home;
        while !taken.insert(slot) {
            slot = (slot + 1) % usable;
        }
        out.insert(name.to_string(), range.nth(slot));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_with_reasons() {
        assert_eq!(
            "240.240.0.0/16".parse::<VipRange>().unwrap(),
            DEFAULT_VIP_RANGE
        );
        assert_eq!(DEFAULT_VIP_RANGE.to_string(), "240.240.0.0/16");
        for (bad, says) in [
            ("240.240.0.0", "not an IPv4 range"),
            ("240.240.0/16", "not an IPv4 address"),
            ("240.240.0.0/4", "must be from 8 to 28"),
            ("240.240.0.0/31", "must be from 8 to 28"),
            (
                "240.240.1.0/16",
                "host bits set; the range starts at 240.240.0.0/16",
            ),
        ] {
            let err = bad.parse::<VipRange>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_same_names_get_the_same_addresses_in_any_order() {
        let a = allocate(["reviews", "ratings", "details"], DEFAULT_VIP_RANGE);
        let b = allocate(["details", "reviews", "ratings"], DEFAULT_VIP_RANGE);
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        for ip in a.values() {
            assert!(DEFAULT_VIP_RANGE.contains(*ip), "{ip}");
        }
        // Adding a service leaves the others where they were (no collision here).
        let c = allocate(
            ["details", "reviews", "ratings", "productpage"],
            DEFAULT_VIP_RANGE,
        );
        for (name, ip) in &a {
            assert_eq!(c[name], *ip, "{name}");
        }
    }

    #[test]
    fn collisions_probe_to_distinct_addresses_and_a_full_range_stops() {
        // A /28 has 14 usable addresses: 40 names must collide.
        let range: VipRange = "10.9.0.16/28".parse().unwrap();
        let names: Vec<String> = (0..40).map(|i| format!("svc-{i:02}")).collect();
        let got = allocate(names.iter().map(String::as_str), range);
        assert_eq!(got.len(), 14);
        let distinct: std::collections::BTreeSet<_> = got.values().collect();
        assert_eq!(distinct.len(), 14);
        for ip in got.values() {
            assert!(range.contains(*ip));
            assert_ne!(*ip, Ipv4Addr::new(10, 9, 0, 16), "network address");
            assert_ne!(*ip, Ipv4Addr::new(10, 9, 0, 31), "broadcast address");
        }
        // The first names by order are the ones placed.
        assert!(got.contains_key("svc-00") && !got.contains_key("svc-39"));
    }

    #[test]
    fn a_thousand_services_fit_the_default_range_deterministically() {
        let names: Vec<String> = (0..1000).map(|i| format!("service-{i}")).collect();
        let one = allocate(names.iter().map(String::as_str), DEFAULT_VIP_RANGE);
        let two = allocate(names.iter().rev().map(String::as_str), DEFAULT_VIP_RANGE);
        assert_eq!(one.len(), 1000);
        assert_eq!(one, two);
    }
}
