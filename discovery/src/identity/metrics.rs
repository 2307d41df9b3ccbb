//! What the CA did: certificates issued by kind, calls refused by reason, how long signing
//! takes: `pilotfish_ca_certificates_issued_total{kind}`,
//! `pilotfish_ca_refusals_total{call, reason}` and `pilotfish_ca_sign_seconds{kind}`.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::{latencies, Latencies, StaticLabels};

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

/// `{kind="node"}`.
type KindLabel = StaticLabels<1>;
/// `{call="ads",reason="no_certificate"}`.
type RefusalLabels = StaticLabels<2>;

#[derive(Debug)]
pub struct CaMetrics {
    issued: Family<KindLabel, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    sign_seconds: Latencies<KindLabel>,
}

impl Default for CaMetrics {
    fn default() -> Self {
        let issued = Family::default();
        let sign_seconds = latencies();
        // Both kinds are shown from the start, at 0.
        for kind in [Kind::Node, Kind::Service] {
            issued.get_or_create_owned(&[("kind", kind.as_str())]);
            sign_seconds.get_or_create_owned(&[("kind", kind.as_str())]);
        }
        CaMetrics {
            issued,
            refusals: Family::default(),
            sign_seconds,
        }
    }
}

impl CaMetrics {
    /// Registers under `pilotfish_ca_`.
    pub fn register(&self, registry: &mut Registry) {
        let ca = registry.sub_registry_with_prefix("ca");
        ca.register(
            "certificates_issued",
            "Certificates issued to hosts, by kind",
            self.issued.clone(),
        );
        ca.register(
            "refusals",
            "Identity and ADS calls refused, by call and reason",
            self.refusals.clone(),
        );
        ca.register(
            "sign_seconds",
            "Time to check a CSR and sign its certificate, by kind",
            self.sign_seconds.clone(),
        );
    }

    pub fn issued(&self, kind: Kind) {
        self.issued.get_or_create(&[("kind", kind.as_str())]).inc();
    }

    pub fn issued_count(&self, kind: Kind) -> u64 {
        self.issued.get_or_create(&[("kind", kind.as_str())]).get()
    }

    /// A CSR of this kind was checked and signed in `took`.
    pub fn signed(&self, kind: Kind, took: Duration) {
        self.sign_seconds
            .get_or_create(&[("kind", kind.as_str())])
            .observe(took.as_secs_f64());
    }

    /// Counts a refused `call` (`ads`, `enrol`, `sign`, `bundle`) by `reason`.
    pub fn refused(&self, call: &'static str, reason: &'static str) {
        self.refusals
            .get_or_create(&[("call", call), ("reason", reason)])
            .inc();
    }

    /// The count of refusals of `call` for `reason`.
    pub fn refusal_count(&self, call: &'static str, reason: &'static str) -> u64 {
        self.refusals
            .get(&[("call", call), ("reason", reason)])
            .map_or(0, |c| c.get())
    }

    /// These metrics alone, as `/metrics` shows them.
    #[cfg(test)]
    pub fn encoded(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("encodes into a String");
        out
    }
}
