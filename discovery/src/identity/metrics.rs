//! What the CA did: certificates issued by kind, calls refused by reason. Rendered by
//! [`crate::http`] as `pilotfish_ca_certificates_issued_total{kind}` and
//! `pilotfish_ca_refusals_total{call, reason}`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Why a call was refused. The `Display` text goes to the caller and the log; it never holds
/// a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("a node client certificate is required")]
    NoCertificate,
    #[error("the client certificate carries no Pilotfish SPIFFE ID")]
    NoIdentity,
    #[error("{0} is not a node identity of this mesh")]
    WrongRole(String),
    #[error("node.id {claimed} is not the node in the client certificate ({certificate})")]
    NodeMismatch {
        certificate: String,
        claimed: String,
    },
    #[error("service {service} has no instance on node {node}")]
    NotPlaced { service: String, node: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("node {node} {mark} (since {since}): it can be brought back with `pilotfish-discovery node restore {node}` and a new join token", mark = pilotfish_pki::wire::REVOKED_MARK)]
    NodeRevoked { node: String, since: String },
    #[error("this client certificate (serial {0}) {mark}: the host must enrol again with a new join token", mark = pilotfish_pki::wire::REVOKED_MARK)]
    CertificateRevoked(String),
}

impl Refusal {
    /// The `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::NoIdentity | Refusal::WrongRole(_) => "wrong_role",
            Refusal::NodeMismatch { .. } => "node_mismatch",
            Refusal::NotPlaced { .. } => "not_placed",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::NodeRevoked { .. } => "node_revoked",
            Refusal::CertificateRevoked(_) => "certificate_revoked",
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> tonic::Status {
        match r {
            Refusal::NoCertificate | Refusal::NoIdentity | Refusal::WrongRole(_) => {
                tonic::Status::unauthenticated(r.to_string())
            }
            Refusal::NodeMismatch { .. }
            | Refusal::NotPlaced { .. }
            | Refusal::NodeRevoked { .. }
            | Refusal::CertificateRevoked(_) => tonic::Status::permission_denied(r.to_string()),
            Refusal::BadRequest(_) => tonic::Status::invalid_argument(r.to_string()),
        }
    }
}

/// Which kind of certificate was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Service,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Service => "service",
        }
    }
}

#[derive(Debug, Default)]
pub struct CaMetrics {
    issued_node: AtomicU64,
    issued_service: AtomicU64,
    refusals: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl CaMetrics {
    pub fn issued(&self, kind: Kind) {
        match kind {
            Kind::Node => &self.issued_node,
            Kind::Service => &self.issued_service,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn issued_count(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Node => &self.issued_node,
            Kind::Service => &self.issued_service,
        }
        .load(Ordering::Relaxed)
    }

    /// Counts a refused `call` (`ads`, `enrol`, `sign`, `bundle`) by `reason`.
    pub fn refused(&self, call: &'static str, reason: &'static str) {
        let mut map = match self.refusals.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        *map.entry((call, reason)).or_default() += 1;
    }

    /// Every (call, reason) refused so far, with its count.
    pub fn refusals(&self) -> Vec<((&'static str, &'static str), u64)> {
        let map = match self.refusals.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}
