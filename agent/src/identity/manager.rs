//! Obtaining and renewing the host's certificates.
//!
//! On start the manager loads what `state_dir` holds and publishes every unexpired certificate
//! at once, so Envoy is served over SDS even while discovery is down. Then one loop runs the
//! jobs a pure [`Schedule`] says are due:
//!
//! - `Enrol` while there is no valid node certificate: read `token_file`, make a key, send a
//!   CSR for `spiffe://<td>/node/<node>` over TLS without a client certificate. A refusal (bad,
//!   used, expired or revoked token, wrong node) is logged and retried with backoff, since the
//!   operator may fix the token file. The token itself is never logged.
//! - `RenewNode` at [`pilotfish_pki::renew_at`] (about half the lifetime, with jitter): `Sign`
//!   with `service = ""`, authenticated by the current node certificate. Should the node
//!   certificate expire anyway (a long outage), the host needs a new join token.
//! - `Service(name)` for each service Envoy asks for over SDS: `Sign(service = name)`, again at
//!   `renew_at`. A refusal (the registry does not place the service on this node) is logged and
//!   retried with backoff; Envoy keeps waiting for the secret meanwhile.
//! - `Bundle` every [`BUNDLE_REFRESH`] (and every issued certificate carries the bundle too),
//!   so a new root reaches Envoy and the relay's TLS settings. Besides, a `WatchBundle` stream
//!   stays open while enrolled ([`bundle_watch`]): discovery pushes the bundle and its CRL
//!   on every change, so a revoked node's certificates are refused by this host's Envoy within
//!   a second or two.
//! - Revoked: when discovery refuses this host as revoked (on that stream or any call), the
//!   manager drops its node and service certificates and goes back to `Enrol`; it enrols again
//!   once an operator has restored the node and put a new join token in `token_file` (checked
//!   every [`TOKEN_RECHECK`] while not enrolled, so a new token is used at once).
//!
//! Every certificate comes with a new key made here. Each change is stored first, then
//! published: a new [`Identities`] snapshot (which the SDS server pushes to Envoy) and new client
//! TLS settings for the xDS relay.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pilotfish_pki::rotation::DEFAULT_JITTER_FRACTION;
use pilotfish_pki::{parse_cert_pem, renew_at, CertInfo, LocalKey, SpiffeId, TrustDomain};
use rand::RngExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;
use tracing::{debug, info, warn};

use super::bundle_watch::{self, Pushed};
use super::enrol::{self, Grant};
use super::store::Store;
use super::tls::{client_config, trusted_roots};
use super::{Credential, Identities, Wanted};
use crate::config::AgentConfig;
use crate::status::AgentStatus;

/// How often the bundle is fetched besides with each certificate.
pub const BUNDLE_REFRESH: Duration = Duration::from_secs(5 * 60);
/// First retry delay after a failed job; doubles up to [`RETRY_CAP`].
pub const RETRY_INITIAL: Duration = Duration::from_secs(1);
pub const RETRY_CAP: Duration = Duration::from_secs(60);
/// The loop wakes at least this often, so a wall-clock jump cannot delay a renewal for long.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// While not enrolled after a refusal, how often `token_file` is checked for a new token.
pub const TOKEN_RECHECK: Duration = Duration::from_secs(2);

/// What the manager does next.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Job {
    Enrol,
    RenewNode,
    Service(String),
    Bundle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    due: SystemTime,
    failures: u32,
}

impl Slot {
    fn at(due: SystemTime) -> Self {
        Slot { due, failures: 0 }
    }
}

/// When each job is due: a pure function of certificate lifetimes, failures and the clock
/// passed in. Services and the bundle need the node certificate (mTLS), so they wait while
/// the host is not enrolled.
#[derive(Debug, Clone)]
pub struct Schedule {
    jitter: f64,
    node: Slot,
    /// Until when the node certificate is valid; `None` before enrolment.
    node_not_after: Option<SystemTime>,
    services: BTreeMap<String, Slot>,
    bundle: Slot,
}

impl Schedule {
    pub fn new(now: SystemTime, jitter: f64) -> Self {
        Schedule {
            jitter,
            node: Slot::at(now),
            node_not_after: None,
            services: BTreeMap::new(),
            bundle: Slot::at(now),
        }
    }

    fn renewal<R: RngExt + ?Sized>(&self, info: &CertInfo, rng: &mut R) -> SystemTime {
        renew_at(info.not_before, info.not_after, self.jitter, rng)
    }

    /// A (new or stored) node certificate: renew it at `renew_at`.
    pub fn node_issued<R: RngExt + ?Sized>(&mut self, info: &CertInfo, rng: &mut R) {
        self.node = Slot::at(self.renewal(info, rng));
        self.node_not_after = Some(info.not_after);
    }

    /// Discovery revoked this host: every certificate is gone; enrol now.
    pub fn revoked(&mut self, now: SystemTime) {
        self.node = Slot::at(now);
        self.node_not_after = None;
        self.services.clear();
    }

    /// A new join token appeared: try to enrol now (the backoff keeps counting).
    pub fn enrol_now(&mut self, now: SystemTime) {
        self.node.due = self.node.due.min(now);
    }

    /// A new certificate for `service`.
    pub fn service_issued<R: RngExt + ?Sized>(
        &mut self,
        service: &str,
        info: &CertInfo,
        rng: &mut R,
    ) {
        let slot = Slot::at(self.renewal(info, rng));
        self.services.insert(service.to_owned(), slot);
    }

    /// Envoy asked for `service`. With a stored certificate, renew it when due; without one,
    /// get one now. Already known names keep their schedule.
    pub fn want<R: RngExt + ?Sized>(
        &mut self,
        service: &str,
        stored: Option<&CertInfo>,
        now: SystemTime,
        rng: &mut R,
    ) {
        if self.services.contains_key(service) {
            return;
        }
        let due = match stored {
            Some(info) if now < info.not_after => self.renewal(info, rng),
            _ => now,
        };
        self.services.insert(service.to_owned(), Slot::at(due));
    }

    pub fn bundle_fetched(&mut self, now: SystemTime) {
        self.bundle = Slot::at(now + BUNDLE_REFRESH);
    }

    /// `job` failed at `now`: retry after a jittered, doubling delay. Returns the delay.
    pub fn failed<R: RngExt + ?Sized>(
        &mut self,
        job: &Job,
        now: SystemTime,
        rng: &mut R,
    ) -> Duration {
        let slot = match job {
            Job::Enrol | Job::RenewNode => &mut self.node,
            Job::Bundle => &mut self.bundle,
            Job::Service(name) => self.services.entry(name.clone()).or_insert(Slot::at(now)),
        };
        let full = RETRY_INITIAL
            .saturating_mul(1 << slot.failures.min(16))
            .min(RETRY_CAP);
        let delay = full / 2 + full.mul_f64(rng.random_range(0.0..=0.5));
        slot.failures = slot.failures.saturating_add(1);
        slot.due = now + delay;
        delay
    }

    fn enrolled(&self, now: SystemTime) -> bool {
        self.node_not_after.is_some_and(|t| now < t)
    }

    /// The jobs due at `now`, node first.
    pub fn due(&self, now: SystemTime) -> Vec<Job> {
        if !self.enrolled(now) {
            return if self.node.due <= now {
                vec![Job::Enrol]
            } else {
                Vec::new()
            };
        }
        let mut jobs = Vec::new();
        if self.node.due <= now {
            jobs.push(Job::RenewNode);
        }
        jobs.extend(
            self.services
                .iter()
                .filter(|(_, s)| s.due <= now)
                .map(|(name, _)| Job::Service(name.clone())),
        );
        if self.bundle.due <= now {
            jobs.push(Job::Bundle);
        }
        jobs
    }

    /// When the next job is due (it may be in the past). While enrolled, also the node
    /// certificate's expiry, after which enrolment is due instead of renewal.
    pub fn next_due(&self, now: SystemTime) -> SystemTime {
        let mut next = self.node.due;
        if self.enrolled(now) {
            next = next.min(self.bundle.due);
            if let Some(t) = self.node_not_after {
                next = next.min(t);
            }
            if let Some(s) = self.services.values().map(|s| s.due).min() {
                next = next.min(s);
            }
        }
        next
    }
}

/// What the manager needs from `agent.toml`.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub node: String,
    pub trust_domain: TrustDomain,
    /// The replicas in the order to try them ([`crate::xds::replicas::order`]).
    pub discovery: Vec<String>,
    /// The contents of `ca_file`.
    pub ca_pem: String,
    pub token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("ca_file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ca_file is required unless insecure = true")]
    NoCaFile,
    #[error("node name: {0}")]
    NodeName(#[source] pilotfish_pki::InvalidSpiffeId),
}

impl IdentitySettings {
    pub fn from_config(config: &AgentConfig) -> Result<Self, IdentityError> {
        let path = config.ca_file.as_ref().ok_or(IdentityError::NoCaFile)?;
        let ca_pem = std::fs::read_to_string(path).map_err(|source| IdentityError::CaFile {
            path: path.clone(),
            source,
        })?;
        Ok(IdentitySettings {
            node: config.node.clone(),
            trust_domain: config.trust_domain.clone(),
            // The relay's order, so enrolment and renewals go where the host's stream goes.
            discovery: crate::xds::replicas::order(&config.node, &config.discovery),
            ca_pem,
            token_file: config.token_file.clone(),
            state_dir: config.state_dir.clone(),
        })
    }
}

pub struct IdentityManager {
    settings: IdentitySettings,
    node_id: SpiffeId,
    store: Store,
    schedule: Schedule,
    current: Identities,
    state: watch::Sender<Arc<Identities>>,
    tls: watch::Sender<Option<ClientTlsConfig>>,
    wanted: Arc<Wanted>,
    status: Arc<AgentStatus>,
    /// The token that enrolment last failed with, so an unchanged file is not retried early.
    failed_token: Option<String>,
}

impl IdentityManager {
    /// Loads and publishes what `state_dir` holds. Unreadable or foreign files are logged and
    /// ignored (they are replaced by the next certificate issued).
    pub fn load(
        settings: IdentitySettings,
        status: Arc<AgentStatus>,
    ) -> Result<Self, IdentityError> {
        let node_id = SpiffeId::node(&settings.trust_domain, &settings.node)
            .map_err(IdentityError::NodeName)?;
        let store = Store::new(&settings.state_dir);
        let now = SystemTime::now();
        let mut rng = rand::rng();
        let mut schedule = Schedule::new(now, DEFAULT_JITTER_FRACTION);
        let mut current = Identities::default();

        match store.load_node() {
            Ok(Some(node)) if node.info.id != node_id => warn!(
                stored = %node.info.id,
                expected = %node_id,
                "the stored node certificate is for another identity; enrolling again"
            ),
            Ok(Some(node)) if node.is_expired_at(now) => warn!(
                id = %node_id,
                expired = ?node.info.not_after,
                token_file = ?settings.token_file,
                "the stored node certificate has EXPIRED; the host needs a new join token in \
                 token_file to enrol again"
            ),
            Ok(Some(node)) => {
                info!(id = %node_id, "using the stored node certificate");
                schedule.node_issued(&node.info, &mut rng);
                current.node = Some(node);
            }
            Ok(None) => info!(
                id = %node_id,
                token_file = ?settings.token_file,
                "no node certificate yet; enrolling with the join token"
            ),
            Err(e) => warn!(error = %e, "cannot use the stored node certificate; enrolling again"),
        }
        match store.load_bundle() {
            Ok(bundle) => current.bundle_pem = bundle,
            Err(e) => warn!(error = %e, "cannot read the stored trust bundle"),
        }
        match store.load_crl() {
            Ok(crl) => current.crl_pem = crl,
            Err(e) => warn!(error = %e, "cannot read the stored CRL"),
        }
        for name in store.service_names().unwrap_or_default() {
            let Ok(id) = SpiffeId::service(&settings.trust_domain, &name) else {
                continue;
            };
            match store.load_service(&name) {
                Ok(Some(c)) if c.info.id == id && !c.is_expired_at(now) => {
                    info!(service = %name, "using the stored service certificate");
                    current.services.insert(name, c);
                }
                Ok(_) => debug!(service = %name, "stored service certificate expired or foreign"),
                Err(e) => {
                    warn!(service = %name, error = %e, "cannot use a stored service certificate")
                }
            }
        }

        let (state, _) = watch::channel(Arc::new(Identities::default()));
        let (tls, _) = watch::channel(None);
        let manager = IdentityManager {
            settings,
            node_id,
            store,
            schedule,
            current,
            state,
            tls,
            wanted: Arc::new(Wanted::default()),
            status,
            failed_token: None,
        };
        manager.publish();
        Ok(manager)
    }

    /// Snapshots of what the host holds, for the SDS server.
    pub fn identities(&self) -> watch::Receiver<Arc<Identities>> {
        self.state.subscribe()
    }

    /// Client TLS settings for dialling discovery; `None` until enrolled.
    pub fn client_tls(&self) -> watch::Receiver<Option<ClientTlsConfig>> {
        self.tls.subscribe()
    }

    /// Where the SDS server records the service names Envoy asks for.
    pub fn wanted(&self) -> Arc<Wanted> {
        self.wanted.clone()
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (tx, mut pushed) = mpsc::channel(4);
        let watcher = tokio::spawn(bundle_watch::run(
            self.settings.discovery.clone(),
            self.state.subscribe(),
            self.tls.subscribe(),
            tx,
            shutdown.clone(),
        ));
        self.run_jobs(&mut pushed, &shutdown).await;
        shutdown.cancel();
        if let Err(e) = watcher.await {
            warn!(error = %e, "the bundle watcher failed");
        }
    }

    async fn run_jobs(
        &mut self,
        pushed: &mut mpsc::Receiver<Pushed>,
        shutdown: &CancellationToken,
    ) {
        let wanted = self.wanted.clone();
        loop {
            self.take_wanted();
            let now = SystemTime::now();
            for job in self.schedule.due(now) {
                tokio::select! {
                    _ = self.execute(job) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            let now = SystemTime::now();
            let wait = self
                .schedule
                .next_due(now)
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .min(MAX_SLEEP);
            let wait = if self.failed_token.is_some() {
                wait.min(TOKEN_RECHECK)
            } else {
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wanted.changed() => {}
                Some(p) = pushed.recv() => self.on_pushed(p),
                _ = shutdown.cancelled() => return,
            }
            self.check_token();
        }
    }

    /// After a failed enrolment: a different token in `token_file` is tried at once.
    fn check_token(&mut self) {
        let (Some(failed), Some(path)) = (&self.failed_token, &self.settings.token_file) else {
            return;
        };
        let now_in_file = std::fs::read_to_string(path).unwrap_or_default();
        if now_in_file.trim() != failed.as_str() {
            info!(token_file = %path.display(), "token_file changed; enrolling now");
            self.failed_token = None;
            self.schedule.enrol_now(SystemTime::now());
        }
    }

    fn on_pushed(&mut self, pushed: Pushed) {
        match pushed {
            Pushed::Bundle {
                bundle_pem,
                crl_pem,
            } => {
                self.schedule.bundle_fetched(SystemTime::now());
                let bundle = self.take_bundle(&bundle_pem);
                let crl = self.take_crl(&crl_pem);
                if bundle || crl {
                    self.publish();
                }
            }
            Pushed::Revoked(message) => self.cut_off(&message),
        }
    }

    /// Discovery refused this host as revoked: stop using every certificate (peers refuse
    /// them anyway) and go back to enrolling, which needs a new join token.
    fn cut_off(&mut self, message: &str) {
        if self.current.node.is_none() {
            return;
        }
        tracing::error!(
            id = %self.node_id,
            reason = %message,
            token_file = ?self.settings.token_file,
            "discovery REVOKED this host: its certificates are refused. To bring it back, an \
             operator runs `pilotfish-discovery node restore {node}` and puts a new join token \
             (`pilotfish-discovery token create --node {node}`) in token_file; the agent then \
             enrols again by itself",
            node = self.settings.node,
        );
        self.current.node = None;
        self.current.services.clear();
        self.schedule.revoked(SystemTime::now());
        self.failed_token = self
            .settings
            .token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().to_owned());
        self.publish();
    }

    /// A failed call's message; a revocation also cuts the host off.
    fn call_failed(&mut self, e: &enrol::CallError) -> String {
        if e.is_revoked() {
            self.cut_off(&e.to_string());
        }
        e.to_string()
    }

    fn take_wanted(&mut self) {
        let now = SystemTime::now();
        let mut rng = rand::rng();
        for name in self.wanted.names() {
            let stored = self.current.services.get(&name).map(|c| &c.info);
            self.schedule.want(&name, stored, now, &mut rng);
        }
    }

    async fn execute(&mut self, job: Job) {
        let result = match &job {
            Job::Enrol => self.enrol().await,
            Job::RenewNode => self.renew_node().await,
            Job::Service(name) => self.service(name).await,
            Job::Bundle => self.refresh_bundle().await,
        };
        if let Err(error) = result {
            if job == Job::Enrol {
                self.failed_token = self
                    .settings
                    .token_file
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|t| t.trim().to_owned());
            }
            let retry_in = self
                .schedule
                .failed(&job, SystemTime::now(), &mut rand::rng());
            match &job {
                Job::Enrol => warn!(
                    %error,
                    token_file = ?self.settings.token_file,
                    ?retry_in,
                    "enrolment failed"
                ),
                Job::RenewNode => warn!(%error, ?retry_in, "node certificate renewal failed"),
                Job::Service(service) => warn!(
                    %service,
                    %error,
                    ?retry_in,
                    "cannot get a certificate for this service (discovery issues one only for \
                     services the registry places on this node); Envoy waits for it"
                ),
                Job::Bundle => warn!(%error, ?retry_in, "trust bundle refresh failed"),
            }
        }
    }

    fn roots(&self) -> String {
        trusted_roots(&self.settings.ca_pem, self.current.bundle_pem.as_deref())
    }

    async fn enrol(&mut self) -> Result<(), String> {
        if let Some(node) = &self.current.node {
            if node.is_expired_at(SystemTime::now()) {
                warn!(
                    id = %self.node_id,
                    expired = ?node.info.not_after,
                    "the node certificate EXPIRED before it could be renewed; the host needs a \
                     new join token in token_file to enrol again"
                );
                self.current.node = None;
                self.publish();
            }
        }
        let path = self.settings.token_file.as_ref().ok_or(
            "no valid node certificate and no token_file configured; set token_file to this \
             host's join token",
        )?;
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token_file {}: {e}", path.display()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(format!("token_file {} is empty", path.display()));
        }
        let key = LocalKey::generate().map_err(|e| e.to_string())?;
        let csr = key.csr_pem(&self.node_id).map_err(|e| e.to_string())?;
        let tls = client_config(&self.roots(), &self.settings.trust_domain, None);
        let grant = enrol::enrol(
            &self.settings.discovery,
            &tls,
            token,
            &self.settings.node,
            csr,
        )
        .await
        .map_err(|e| e.to_string())?;
        self.accept_node(&key, grant)?;
        self.failed_token = None;
        info!(id = %self.node_id, "enrolled: this host now holds its node certificate");
        Ok(())
    }

    async fn renew_node(&mut self) -> Result<(), String> {
        let tls = self.node_tls()?;
        let key = LocalKey::generate().map_err(|e| e.to_string())?;
        let csr = key.csr_pem(&self.node_id).map_err(|e| e.to_string())?;
        let grant = match enrol::sign(&self.settings.discovery, &tls, "", csr).await {
            Ok(g) => g,
            Err(e) => return Err(self.call_failed(&e)),
        };
        self.accept_node(&key, grant)?;
        self.status.certificate_renewed();
        info!(id = %self.node_id, "renewed the node certificate");
        Ok(())
    }

    async fn service(&mut self, name: &str) -> Result<(), String> {
        let id = SpiffeId::service(&self.settings.trust_domain, name).map_err(|e| e.to_string())?;
        let tls = self.node_tls()?;
        let key = LocalKey::generate().map_err(|e| e.to_string())?;
        let csr = key.csr_pem(&id).map_err(|e| e.to_string())?;
        let grant = match enrol::sign(&self.settings.discovery, &tls, name, csr).await {
            Ok(g) => g,
            Err(e) => return Err(self.call_failed(&e)),
        };
        let cred = self.accept(&id, &grant, |store| {
            store.save_service(name, &key, &grant.chain_pem)
        })?;
        self.schedule
            .service_issued(name, &cred.info, &mut rand::rng());
        let renewed = self
            .current
            .services
            .insert(name.to_owned(), cred)
            .is_some();
        self.take_bundle(&grant.bundle_pem);
        self.publish();
        self.status.certificate_renewed();
        info!(id = %id, renewed, "obtained a service certificate");
        Ok(())
    }

    async fn refresh_bundle(&mut self) -> Result<(), String> {
        let tls = self.node_tls()?;
        let bundle = match enrol::bundle(&self.settings.discovery, &tls).await {
            Ok(b) => b,
            Err(e) => return Err(self.call_failed(&e)),
        };
        self.schedule.bundle_fetched(SystemTime::now());
        let took_bundle = self.take_bundle(&bundle.bundle_pem);
        if self.take_crl(&bundle.crl_pem) || took_bundle {
            self.publish();
        }
        Ok(())
    }

    fn node_tls(&self) -> Result<ClientTlsConfig, String> {
        let node = self.current.node.as_ref().ok_or("no node certificate")?;
        Ok(client_config(
            &self.roots(),
            &self.settings.trust_domain,
            Some(node),
        ))
    }

    /// Checks that discovery issued what was asked for, then stores it.
    fn accept(
        &self,
        id: &SpiffeId,
        grant: &Grant,
        save: impl FnOnce(&Store) -> Result<Credential, super::store::StoreError>,
    ) -> Result<Credential, String> {
        let info =
            parse_cert_pem(&grant.chain_pem).map_err(|e| format!("issued certificate: {e}"))?;
        if &info.id != id {
            return Err(format!(
                "discovery issued a certificate for {}, not {id}",
                info.id
            ));
        }
        save(&self.store).map_err(|e| format!("cannot store the certificate: {e}"))
    }

    fn accept_node(&mut self, key: &LocalKey, grant: Grant) -> Result<(), String> {
        let id = self.node_id.clone();
        let cred = self.accept(&id, &grant, |store| store.save_node(key, &grant.chain_pem))?;
        self.schedule.node_issued(&cred.info, &mut rand::rng());
        self.current.node = Some(cred);
        self.take_bundle(&grant.bundle_pem);
        self.publish();
        Ok(())
    }

    /// Stores and adopts a bundle that differs from the current one. Returns whether it did.
    fn take_bundle(&mut self, bundle: &str) -> bool {
        if bundle.trim().is_empty() || self.current.bundle_pem.as_deref() == Some(bundle) {
            return false;
        }
        if let Err(e) = self.store.save_bundle(bundle) {
            warn!(error = %e, "cannot store the trust bundle; using it anyway");
        }
        info!("trust bundle updated");
        self.current.bundle_pem = Some(bundle.to_owned());
        true
    }

    /// Stores and adopts a CRL that differs from the current one (empty: none). Returns
    /// whether it did.
    fn take_crl(&mut self, crl: &str) -> bool {
        let crl = (!crl.trim().is_empty()).then(|| crl.to_owned());
        if self.current.crl_pem == crl {
            return false;
        }
        if let Err(e) = self.store.save_crl(crl.as_deref().unwrap_or_default()) {
            warn!(error = %e, "cannot store the CRL; using it anyway");
        }
        info!(
            revocations = crl.is_some(),
            "certificate revocation list updated"
        );
        self.current.crl_pem = crl;
        true
    }

    /// Publishes the current state: SDS snapshot, relay TLS settings, metrics.
    fn publish(&self) {
        let tls = self
            .current
            .node
            .as_ref()
            .map(|node| client_config(&self.roots(), &self.settings.trust_domain, Some(node)));
        self.tls.send_replace(tls);
        self.state.send_replace(Arc::new(self.current.clone()));
        let expiries = self
            .current
            .node
            .iter()
            .chain(self.current.services.values())
            .map(|c| (c.info.id.uri(), c.info.not_after))
            .collect();
        self.status
            .set_certificates(expiries, self.current.node.is_some());
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
