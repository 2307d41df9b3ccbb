//! The SPIFFE ID scheme: every identity Pilotfish issues or checks is one of three shapes.
//!
//! | who | SPIFFE ID |
//! |---|---|
//! | a workload (service) | `spiffe://<trust-domain>/service/<name>` |
//! | a host's agent | `spiffe://<trust-domain>/node/<node>` |
//! | discovery (control plane) | `spiffe://<trust-domain>/discovery` |
//!
//! Hosts and services live in separate path classes so that a node certificate can never be
//! mistaken for a workload one or for the control plane's (the role confusion of
//! CVE-2021-37219): code decides on [`Role`], never on a string prefix.
//!
//! The rules are stricter than the SPIFFE spec so that one identity has exactly one spelling
//! and comparisons can be exact byte equality (no normalisation, no regexes):
//! - trust domain: 1..=255 bytes of `[a-z0-9._-]`, starting and ending with a letter or digit,
//!   no `..`; so no userinfo, port, uppercase or percent-encoding;
//! - service and node names: 1..=63 bytes of `[a-z0-9._-]`, starting and ending with a letter or
//!   digit, no `..` (so never `.` or `..` as a segment, never a `/`);
//! - the URI is exactly `spiffe://` + trust domain + one of the three paths: no trailing `/`,
//!   no query or fragment, no extra segments. Uppercase is rejected, never folded, so
//!   `spiffe://TD/...` and `spiffe://td/...` cannot both name the same thing.

use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix, lowercase only.
const SCHEME: &str = "spiffe://";
/// Longest trust domain the SPIFFE spec allows.
const MAX_TRUST_DOMAIN: usize = 255;
/// Longest service or node name: one DNS label, so it also fits a certificate CN.
const MAX_NAME: usize = 63;

/// Why a SPIFFE ID, trust domain or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct InvalidSpiffeId {
    /// What was being parsed: "SPIFFE ID", "trust domain", "service name" or "node name".
    pub what: &'static str,
    /// The input as given.
    pub input: String,
    /// Why it was refused.
    pub reason: &'static str,
}

fn invalid(what: &'static str, input: &str, reason: &'static str) -> InvalidSpiffeId {
    InvalidSpiffeId {
        what,
        input: input.to_owned(),
        reason,
    }
}

/// A validated trust domain, such as `pilotfish.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain (see the module docs for the rules).
    pub fn new(s: &str) -> Result<Self, InvalidSpiffeId> {
        check_label(s, MAX_TRUST_DOMAIN, "trust domain")?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The DNS name discovery's serving certificate carries: `discovery.<trust-domain>`.
    /// Agents verify discovery's certificate against this name (and the root from `ca_file`).
    pub fn discovery_dns_name(&self) -> String {
        format!("discovery.{}", self.0)
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<td>`), carried by CA certificates.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// What an identity is allowed to be.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A workload: `/service/<name>`.
    Service(String),
    /// A host's agent: `/node/<node>`.
    Node(String),
    /// The control plane: `/discovery`.
    Discovery,
}

/// A Pilotfish SPIFFE ID. Construct with [`SpiffeId::service`], [`SpiffeId::node`],
/// [`SpiffeId::discovery`] or parse one with [`SpiffeId::parse`]; every value is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    role: Role,
}

impl SpiffeId {
    /// `spiffe://<td>/service/<name>`.
    pub fn service(trust_domain: &TrustDomain, name: &str) -> Result<Self, InvalidSpiffeId> {
        check_label(name, MAX_NAME, "service name")?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            role: Role::Service(name.to_owned()),
        })
    }

    /// `spiffe://<td>/node/<node>`.
    pub fn node(trust_domain: &TrustDomain, node: &str) -> Result<Self, InvalidSpiffeId> {
        check_label(node, MAX_NAME, "node name")?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            role: Role::Node(node.to_owned()),
        })
    }

    /// `spiffe://<td>/discovery`.
    pub fn discovery(trust_domain: &TrustDomain) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            role: Role::Discovery,
        }
    }

    /// Parses one of the three shapes exactly; anything else is refused.
    pub fn parse(s: &str) -> Result<Self, InvalidSpiffeId> {
        const WHAT: &str = "SPIFFE ID";
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid(WHAT, s, "must start with spiffe:// (lowercase)"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid(WHAT, s, "has no path"))?;
        let trust_domain = TrustDomain::new(td).map_err(|e| invalid(WHAT, s, e.reason))?;
        let role = if path == "discovery" {
            Role::Discovery
        } else if let Some(name) = path.strip_prefix("service/") {
            check_label(name, MAX_NAME, "service name").map_err(|e| invalid(WHAT, s, e.reason))?;
            Role::Service(name.to_owned())
        } else if let Some(name) = path.strip_prefix("node/") {
            check_label(name, MAX_NAME, "node name").map_err(|e| invalid(WHAT, s, e.reason))?;
            Role::Node(name.to_owned())
        } else {
            return Err(invalid(
                WHAT,
                s,
                "path must be /service/<name>, /node/<node> or /discovery",
            ));
        };
        Ok(Self { trust_domain, role })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    /// The URI form, as it appears in a certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.role {
            Role::Service(name) => write!(f, "{SCHEME}{}/service/{name}", self.trust_domain),
            Role::Node(node) => write!(f, "{SCHEME}{}/node/{node}", self.trust_domain),
            Role::Discovery => write!(f, "{SCHEME}{}/discovery", self.trust_domain),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Shared rule for trust domains and names: lowercase letters, digits, `.`, `_`, `-`; starts
/// and ends with a letter or digit; no `..`.
fn check_label(s: &str, max: usize, what: &'static str) -> Result<(), InvalidSpiffeId> {
    if s.is_empty() {
        return Err(invalid(what, s, "is empty"));
    }
    if s.len() > max {
        return Err(invalid(what, s, "is too long"));
    }
    if let Some(c) = s
        .bytes()
        .find(|&c| !matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            what,
            s,
            if c.is_ascii_uppercase() {
                "must be lowercase"
            } else if c == b'/' {
                "must not contain '/'"
            } else {
                "may contain only a-z, 0-9, '.', '_' and '-'"
            },
        ));
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = s.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(invalid(
            what,
            s,
            "must start and end with a letter or digit",
        ));
    }
    if s.contains("..") {
        return Err(invalid(what, s, "must not contain '..'"));
    }
    Ok(())
}

/// Checks a service or node name without building an ID (for config validation).
pub fn validate_name(name: &str) -> Result<(), InvalidSpiffeId> {
    check_label(name, MAX_NAME, "name")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("pilotfish.local").unwrap()
    }

    #[test]
    fn formats_the_three_shapes() {
        let td = td();
        assert_eq!(
            SpiffeId::service(&td, "reviews").unwrap().uri(),
            "spiffe://pilotfish.local/service/reviews"
        );
        assert_eq!(
            SpiffeId::node(&td, "vm-b").unwrap().uri(),
            "spiffe://pilotfish.local/node/vm-b"
        );
        assert_eq!(
            SpiffeId::discovery(&td).uri(),
            "spiffe://pilotfish.local/discovery"
        );
        assert_eq!(td.discovery_dns_name(), "discovery.pilotfish.local");
    }

    #[test]
    fn parse_round_trips() {
        for s in [
            "spiffe://pilotfish.local/service/reviews",
            "spiffe://pilotfish.local/service/reviews_v2.api",
            "spiffe://td/node/vm-b",
            "spiffe://td/discovery",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
            assert_eq!(s.parse::<SpiffeId>().unwrap(), id);
        }
        let id = SpiffeId::parse("spiffe://td/node/vm-b").unwrap();
        assert_eq!(id.role(), &Role::Node("vm-b".into()));
        assert_eq!(id.trust_domain().as_str(), "td");
    }

    #[test]
    fn refuses_everything_that_is_not_exactly_one_shape() {
        for s in [
            "",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "SPIFFE://td/discovery",
            "spiffe://TD/discovery",
            "spiffe://td/service/Reviews",
            "spiffe://td/service/",
            "spiffe://td/service/reviews/",
            "spiffe://td/service/reviews/extra",
            "spiffe://td/service/..",
            "spiffe://td/service/.",
            "spiffe://td/service/a..b",
            "spiffe://td/service/-x",
            "spiffe://td/service/re%2fviews",
            "spiffe://td/service/reviews?x=1",
            "spiffe://td/service/reviews#frag",
            "spiffe://td//service/reviews",
            "spiffe://td/./service/reviews",
            "spiffe://td/node/../service/reviews",
            "spiffe://user@td/discovery",
            "spiffe://td:443/discovery",
            "spiffe://td/discovery/",
            "spiffe://td/discoveryx",
            "spiffe://td/services/reviews",
            "spiffe://td/ns/default/sa/reviews",
            "https://td/service/reviews",
            " spiffe://td/discovery",
            "spiffe://td/service/reviews ",
        ] {
            assert!(SpiffeId::parse(s).is_err(), "{s:?} should be refused");
        }
    }

    #[test]
    fn validates_names_and_trust_domains() {
        let td = td();
        assert!(SpiffeId::service(&td, "a/b").is_err());
        assert!(SpiffeId::node(&td, "..").is_err());
        assert!(SpiffeId::node(&td, "VM-B").is_err());
        assert!(SpiffeId::node(&td, &"a".repeat(64)).is_err());
        assert!(SpiffeId::node(&td, &"a".repeat(63)).is_ok());
        assert!(TrustDomain::new("Pilotfish.local").is_err());
        assert!(TrustDomain::new("pilotfish.local.").is_err());
        assert!(TrustDomain::new("example.org:8443").is_err());
        assert!(TrustDomain::new(&"a".repeat(256)).is_err());
        let err = SpiffeId::service(&td, "Reviews").unwrap_err();
        assert_eq!(err.reason, "must be lowercase");
        assert!(validate_name("reviews").is_ok());
    }
}
