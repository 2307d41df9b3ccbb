//! The host's identity: its node certificate, the certificates of the services it fronts, and
//! the trust bundle; and the SDS server that hands them to Envoy.
//!
//! Data flow:
//!
//! - [`store`] keeps keys and certificates in `state_dir` (mode 0600, written atomically), so
//!   an agent restarted while discovery is down serves what it has as long as it is unexpired.
//! - [`manager`] enrols the host with its join token (once, over server-authenticated TLS),
//!   then renews the node certificate with itself (mTLS), fetches service certificates for the
//!   names Envoy asks for, and refreshes the bundle. It publishes every change as a new
//!   [`Identities`] snapshot on a `watch` channel, and the client TLS settings for the xDS
//!   relay on another. When to renew is a pure [`manager::Schedule`].
//! - [`enrol`] holds the calls to discovery's `pilotfish.identity.v1.Identity` service;
//!   `WatchBundle` stays open and brings a new bundle or CRL (a revoked node) within a second.
//! - [`tls`] builds the client TLS settings: discovery's certificate must chain to `ca_file`
//!   (or a root of the stored bundle) and name `discovery.<trust_domain>`.
//! - [`sds`] serves the snapshots to Envoy over a Unix socket (SotW SDS); a pure per-stream
//!   state decides what to send; a changed snapshot is pushed on every open stream.

mod bundle_watch;
pub mod enrol;
pub mod manager;
pub mod sds;
pub mod store;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::SystemTime;

use pilotfish_pki::CertInfo;
use tokio::sync::Notify;

/// A certificate chain with its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The leaf first, then any intermediates, PEM.
    pub chain_pem: String,
    /// PKCS#8 PEM. Never logged.
    pub key_pem: String,
    pub info: CertInfo,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("id", &self.info.id.uri())
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// Whether the certificate is within its validity period at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.info.not_before <= now && now < self.info.not_after
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.info.not_after
    }
}

/// Everything the host holds, as one immutable snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identities {
    pub node: Option<Credential>,
    /// Every root to trust, PEM (from discovery; the `roots` SDS secret).
    pub bundle_pem: Option<String>,
    /// Revoked certificates, a CRL of the signing CA, PEM (from discovery; with the bundle in
    /// the `roots` secret). `None` while nothing is revoked.
    pub crl_pem: Option<String>,
    /// By service name.
    pub services: BTreeMap<String, Credential>,
}

/// Service names Envoy has asked for over SDS, shared by the SDS server (which adds) and the
/// manager (which fetches certificates for them).
#[derive(Debug, Default)]
pub struct Wanted {
    names: Mutex<BTreeSet<String>>,
    notify: Notify,
}

impl Wanted {
    /// Adds `name`; wakes the manager when it is new.
    pub fn add(&self, name: &str) {
        let added = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
        if added {
            self.notify.notify_one();
        }
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resolves when a name was added since the last call.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}
