//! Revoked nodes as the running discovery enforces them.
//!
//! `pilotfish-discovery node revoke|restore` writes `state_dir/revocations.json`
//! ([`pilotfish_pki::RevocationStore`]); [`Revoker::poll`] re-reads it every
//! [`POLL_INTERVAL`] (one small read; parsed only when the bytes changed). Every certificate
//! discovery signs for a node is recorded first ([`Revoker::record`], `state_dir/issued.jsonl`).
//! From the two, the revoker derives one [`RevocationView`] and publishes it on a `watch`:
//!
//! - [`super::PeerAuth`] refuses calls and ADS streams of a revoked node, or with a revoked
//!   certificate, and ends the open ones;
//! - the identity service's `WatchBundle` pushes the view's CRL with the bundle to every agent,
//!   whose SDS hands it to Envoy, so peers refuse the node's certificates on the mesh port;
//! - [`Revoker::revoked_nodes`] is the plain set of cut-off nodes (for EDS).
//!
//! The CRL is signed by the signing CA and lists the serials [`Revocations::revokes`];
//! it is rebuilt when the file changes, when a certificate is issued to a revoked node, and
//! when the CA is reloaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pilotfish_pki::revocation::{self, COMPACT_EVERY};
use pilotfish_pki::{
    Ca, FileError, IssuedCert, IssuedLog, RevocationError, RevocationStore, Revocations,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::metrics::Refusal;
use super::utc;

/// How often discovery re-reads `revocations.json`.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What is revoked right now.
#[derive(Debug, Clone, Default)]
pub struct RevocationView {
    pub revocations: Revocations,
    /// Serials (lower-case hex) of unexpired certificates that are revoked.
    pub serials: BTreeSet<String>,
    /// The CRLs peers check certificates against, PEM: this replica's (listing `serials`)
    /// and, with a shared store, every other replica's, in the order of their signers'
    /// fingerprints (so every replica serves the same bytes). Empty while nothing is revoked.
    pub crl_pem: String,
    /// This replica's own CRL, PEM (what it shares with the others); empty while it has none.
    pub own_crl_pem: String,
}

impl RevocationView {
    /// Why `node` may not call, if it is revoked.
    pub fn node_refusal(&self, node: &str) -> Option<Refusal> {
        let r = self.revocations.node(node).filter(|r| r.in_force())?;
        Some(Refusal::NodeRevoked {
            node: node.to_owned(),
            since: utc(r.revoked_at()),
        })
    }

    /// Why a certificate with this serial may not be used, if it is revoked.
    pub fn serial_refusal(&self, serial: &str) -> Option<Refusal> {
        self.serials
            .contains(serial)
            .then(|| Refusal::CertificateRevoked(serial.to_owned()))
    }
}

struct State {
    /// Unexpired certificates on record.
    issued: Vec<IssuedCert>,
    appended: usize,
    /// The bytes of `revocations.json` last parsed (`Some(None)`: no file; `None`: not read
    /// yet).
    file: Option<Option<Vec<u8>>>,
    /// With a shared store: the other replicas' CRLs by their signers' fingerprints. Then this
    /// replica signs a CRL (empty if need be) whenever a node is revoked, because Envoy
    /// refuses a certificate whose issuer has no CRL once it holds CRLs for others.
    shared: Option<BTreeMap<String, String>>,
}

/// Keeps the [`RevocationView`] current. Blocking file I/O: call it from `spawn_blocking`.
pub struct Revoker {
    store: RevocationStore,
    log: IssuedLog,
    state: Mutex<State>,
    view: watch::Sender<Arc<RevocationView>>,
    nodes: watch::Sender<Arc<BTreeSet<String>>>,
}

impl std::fmt::Debug for Revoker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revoker")
            .field("store", &self.store.path())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RevokerError {
    #[error(transparent)]
    Store(#[from] RevocationError),
    #[error(transparent)]
    Log(#[from] FileError),
}

impl Revoker {
    /// Loads both files from `state_dir` (dropping expired certificates from the log) and
    /// builds the first view.
    pub fn load(state_dir: &std::path::Path, ca: &Ca) -> Result<Revoker, RevokerError> {
        let store = RevocationStore::new(state_dir);
        let log = IssuedLog::new(state_dir);
        let now = SystemTime::now();
        let issued = log.load(now)?;
        if log.path().exists() {
            log.compact(&issued, now)?;
        }
        let revoker = Revoker {
            store,
            log,
            state: Mutex::new(State {
                issued,
                appended: 0,
                file: None,
                shared: None,
            }),
            view: watch::Sender::new(Arc::new(RevocationView::default())),
            nodes: watch::Sender::new(Arc::new(BTreeSet::new())),
        };
        revoker.poll(ca)?;
        Ok(revoker)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RevocationView>> {
        self.view.subscribe()
    }

    /// The nodes cut off now, for EDS.
    pub fn revoked_nodes(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.nodes.subscribe()
    }

    pub fn view(&self) -> Arc<RevocationView> {
        Arc::clone(&self.view.borrow())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `cert` on record (synced to disk) before it is handed out. If its node is revoked
    /// (a request that raced the revocation), the CRL gets it at once.
    pub fn record(&self, ca: &Ca, cert: IssuedCert) -> Result<(), FileError> {
        self.log.append(&cert)?;
        let mut state = self.lock();
        let revoked = self.view.borrow().revocations.revokes(&cert);
        state.issued.push(cert);
        state.appended += 1;
        if state.appended >= COMPACT_EVERY {
            let now = SystemTime::now();
            state.issued.retain(|c| c.not_after() > now);
            state.appended = 0;
            if let Err(e) = self.log.compact(&state.issued, now) {
                warn!(error = %e, "compacting the issued-certificate log failed");
            }
        }
        if revoked {
            let revocations = self.view.borrow().revocations.clone();
            self.publish(ca, &state, revocations);
        }
        Ok(())
    }

    /// Re-reads `revocations.json`; publishes a new view if it changed. A file that does not
    /// parse keeps the revocations in force (and is reported).
    pub fn poll(&self, ca: &Ca) -> Result<bool, RevocationError> {
        let bytes = match std::fs::read(self.store.path()) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(FileError {
                    path: self.store.path().to_owned(),
                    source: e,
                }
                .into())
            }
        };
        let mut state = self.lock();
        if state.file.as_ref() == Some(&bytes) {
            return Ok(false);
        }
        let revocations = match &bytes {
            Some(b) => RevocationStore::parse(self.store.path(), b)?,
            None => Revocations::default(),
        };
        state.file = Some(bytes);
        let before = self.view.borrow().revocations.clone();
        for node in revocations.revoked_nodes() {
            if !before.is_revoked(&node) {
                warn!(node = %node, "node REVOKED: refusing its calls and streams, and pushing its certificates' serials to every peer");
            }
        }
        for node in before.revoked_nodes() {
            if !revocations.is_revoked(&node) {
                info!(node = %node, "node restored: it may enrol again with a new join token");
            }
        }
        self.publish(ca, &state, revocations);
        Ok(true)
    }

    /// The other replicas' CRLs (by signer fingerprint; this replica's own entry is ignored):
    /// from now on this replica works with theirs (see [`State::shared`]).
    pub fn set_shared_crls(&self, ca: &Ca, crls: &BTreeMap<String, String>) {
        let mut others = crls.clone();
        others.remove(ca.signer_fingerprint());
        let mut state = self.lock();
        if state.shared.as_ref() == Some(&others) {
            return;
        }
        let first = state.shared.is_none();
        state.shared = Some(others);
        if first {
            // Shared from now on: this replica may have to sign a CRL it did not need alone.
            let revocations = self.view.borrow().revocations.clone();
            self.publish(ca, &state, revocations);
            return;
        }
        // Only the others' changed: serve them beside this replica's CRL as it is. Re-signing
        // it would change its bytes and wake every other replica, which would re-sign theirs.
        let view = self.view.borrow().clone();
        let crl_pem = combined_crls(
            ca.signer_fingerprint(),
            &view.own_crl_pem,
            state.shared.as_ref(),
        );
        if crl_pem != view.crl_pem {
            self.view.send_replace(Arc::new(RevocationView {
                crl_pem,
                ..RevocationView::clone(&view)
            }));
        }
    }

    /// Re-signs the CRL with a reloaded CA.
    pub fn resign(&self, ca: &Ca) {
        let state = self.lock();
        let revocations = self.view.borrow().revocations.clone();
        self.publish(ca, &state, revocations);
    }

    fn publish(&self, ca: &Ca, state: &State, revocations: Revocations) {
        let now = SystemTime::now();
        let revoked: Vec<(String, SystemTime)> = state
            .issued
            .iter()
            .filter(|c| c.not_after() > now && revocations.revokes(c))
            .map(|c| {
                let at = revocations
                    .node(&c.node)
                    .map_or(now, |r| r.revoked_at().max(c.issued_at()));
                (c.serial.clone(), at)
            })
            .collect();
        let serials: BTreeSet<String> = revoked.iter().map(|(s, _)| s.clone()).collect();
        let needed = !revoked.is_empty()
            || (state.shared.is_some() && !revocations.revoked_nodes().is_empty());
        let own_crl_pem = if !needed {
            String::new()
        } else {
            match ca.sign_crl(&revoked, now) {
                Ok(pem) => pem,
                Err(e) => {
                    error!(error = %crate::error_chain(&e), "cannot sign the CRL: peers will NOT refuse revoked certificates (discovery still refuses revoked nodes)");
                    String::new()
                }
            }
        };
        let nodes = revocations.revoked_nodes();
        info!(
            revoked_nodes = nodes.len(),
            revoked_certificates = serials.len(),
            "revocations in force"
        );
        self.nodes.send_if_modified(|current| {
            if **current == nodes {
                false
            } else {
                *current = Arc::new(nodes);
                true
            }
        });
        let crl_pem = combined_crls(ca.signer_fingerprint(), &own_crl_pem, state.shared.as_ref());
        self.view.send_replace(Arc::new(RevocationView {
            revocations,
            serials,
            crl_pem,
            own_crl_pem,
        }));
    }

    /// Polls every [`POLL_INTERVAL`] until `shutdown`. `ca` gives the CA in force.
    pub async fn run(
        self: Arc<Self>,
        ca: impl Fn() -> Arc<Ca> + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        let ca = Arc::new(ca);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (this, ca) = (Arc::clone(&self), Arc::clone(&ca));
            match tokio::task::spawn_blocking(move || this.poll(&ca())).await {
                Ok(Ok(_)) => failing = false,
                Ok(Err(e)) => {
                    if !failing {
                        error!(error = %crate::error_chain(&e), "cannot read the revocations; the ones in force stay");
                    }
                    failing = true;
                }
                Err(e) => error!(error = %e, "a revocation task failed"),
            }
        }
    }
}

/// Every non-empty CRL of `own` (this signer's, under `own_id`) and `others`, in the order of
/// their ids; empty when none is.
fn combined_crls(own_id: &str, own: &str, others: Option<&BTreeMap<String, String>>) -> String {
    let mut all: BTreeMap<&str, &str> = others
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    all.insert(own_id, own);
    all.values()
        .filter(|pem| !pem.trim().is_empty())
        .map(|pem| {
            let mut pem = pem.to_string();
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem
        })
        .collect()
}

/// The serial of a peer's leaf certificate, as the view spells it.
pub fn serial_of(der: &[u8]) -> Option<String> {
    revocation::serial_of(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotfish_pki::{CaOptions, TrustDomain};

    fn ca(dir: &std::path::Path) -> Ca {
        let td = TrustDomain::new("pilotfish.local").unwrap();
        Ca::load_or_create(dir, &td, &CaOptions::default()).unwrap()
    }

    fn cert(serial: &str, node: &str) -> IssuedCert {
        let now = SystemTime::now();
        IssuedCert::new(serial, node, "id", now, now + Duration::from_secs(3600))
    }

    #[test]
    fn a_revocation_written_by_the_cli_reaches_the_view_with_a_crl() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let revoker = Revoker::load(dir.path(), &ca).unwrap();
        let mut nodes = revoker.revoked_nodes();
        revoker.record(&ca, cert("0a", "vm-c")).unwrap();
        revoker.record(&ca, cert("0b", "vm-a")).unwrap();
        assert!(revoker.view().crl_pem.is_empty());
        assert!(!revoker.poll(&ca).unwrap(), "nothing changed");

        // `node revoke` in another process.
        RevocationStore::new(dir.path())
            .revoke("vm-c", SystemTime::now())
            .unwrap();
        assert!(revoker.poll(&ca).unwrap());
        let view = revoker.view();
        assert!(view.node_refusal("vm-c").is_some());
        assert!(view.node_refusal("vm-a").is_none());
        assert_eq!(view.serials, BTreeSet::from(["0a".to_owned()]));
        assert!(view.crl_pem.contains("BEGIN X509 CRL"));
        assert!(nodes.has_changed().unwrap());
        assert!(nodes.borrow_and_update().contains("vm-c"));

        // A certificate signed for vm-c in the second before discovery noticed: listed too.
        revoker.record(&ca, cert("0c", "vm-c")).unwrap();
        assert!(revoker.view().serials.contains("0c"));

        // Restored: the node may call again, its old certificates stay refused.
        RevocationStore::new(dir.path())
            .restore("vm-c", SystemTime::now())
            .unwrap();
        assert!(revoker.poll(&ca).unwrap());
        let view = revoker.view();
        assert!(view.node_refusal("vm-c").is_none());
        assert!(view.serial_refusal("0a").is_some());
        assert!(view.serial_refusal("0b").is_none());
        assert!(nodes.borrow_and_update().is_empty());

        // A restart reads the same state from disk.
        let again = Revoker::load(dir.path(), &ca).unwrap();
        assert_eq!(again.view().serials, view.serials);
    }

    #[test]
    fn with_a_shared_store_every_replica_signs_a_crl_once_a_node_is_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let revoker = Revoker::load(dir.path(), &ca).unwrap();
        let others = BTreeMap::from([
            (
                "bb".to_owned(),
                "-----BEGIN X509 CRL-----\nB\n-----END X509 CRL-----\n".to_owned(),
            ),
            ("00".to_owned(), String::new()),
        ]);
        revoker.set_shared_crls(&ca, &others);
        // Nothing revoked: no CRL at all, even though another replica's key is there.
        assert!(revoker.view().own_crl_pem.is_empty());
        // vm-c has no certificate from this replica, yet this replica signs an (empty) CRL,
        // served in fingerprint order with the other replica's.
        RevocationStore::new(dir.path())
            .revoke("vm-c", SystemTime::now())
            .unwrap();
        revoker.poll(&ca).unwrap();
        let view = revoker.view();
        assert!(view.serials.is_empty());
        assert!(view.own_crl_pem.contains("BEGIN X509 CRL"));
        assert_eq!(view.crl_pem.matches("BEGIN X509 CRL").count(), 2);
        let own_first = ca.signer_fingerprint() < "bb";
        assert_eq!(view.crl_pem.starts_with(&view.own_crl_pem), own_first);
        // The same inputs give the same bytes, whichever replica combines them.
        let mut mine = others.clone();
        mine.insert(ca.signer_fingerprint().to_owned(), view.own_crl_pem.clone());
        assert_eq!(
            combined_crls("bb", &others["bb"], Some(&mine)),
            view.crl_pem
        );
        // Another replica re-signed its CRL: this one's is served beside it unchanged (a
        // re-signed one would wake every other replica, which would re-sign theirs, and so on).
        let mut newer = others.clone();
        newer.insert(
            "bb".to_owned(),
            "-----BEGIN X509 CRL-----\nB2\n-----END X509 CRL-----\n".to_owned(),
        );
        revoker.set_shared_crls(&ca, &newer);
        let after = revoker.view();
        assert_eq!(after.own_crl_pem, view.own_crl_pem);
        assert!(after.crl_pem.contains("B2") && !after.crl_pem.contains("\nB\n"));
    }

    #[test]
    fn a_corrupt_file_keeps_the_revocations_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let revoker = Revoker::load(dir.path(), &ca).unwrap();
        let store = RevocationStore::new(dir.path());
        store.revoke("vm-c", SystemTime::now()).unwrap();
        revoker.poll(&ca).unwrap();
        std::fs::write(store.path(), b"{").unwrap();
        assert!(revoker.poll(&ca).is_err());
        assert!(revoker.view().node_refusal("vm-c").is_some());
    }
}
