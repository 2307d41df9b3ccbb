//! `[store.consul]`: the state several discovery replicas share, kept in Consul KV under one
//! prefix (default `pilotfish/`):
//!
//! | key                        | what                                   | written by            |
//! |----------------------------|----------------------------------------|-----------------------|
//! | `rules/<kind>-<svc>`       | a rules-API object (its `rules.d` file) | the rules API (`?cas=`) |
//! | `tokens`                   | join tokens (hashes only)              | `token ...`, enrolment |
//! | `revocations`              | revoked nodes                          | `node revoke/restore` |
//! | `liveness/<host>-<tag>`    | the hosts connected to a replica, and a beat | that replica, every 2 s ([`liveness`]) |
//! | `seeded`                   | set once a replica copied its own state in | the first replica |
//!
//! Keys carry no file extension: Consul refuses keys ending in `.json` (and other extensions
//! proxies may cache) with 400.
//!
//! Every write is a compare-and-set on the key's `ModifyIndex`, so of two replicas that read
//! the same state only one can write ([`pilotfish_pki::shared`]; the rules API maps `If-Match`
//! onto it). Every replica watches the prefix with a blocking query ([`SharedStore::run`]) and
//! mirrors it into its `state_dir`: `rules.d/` (which its file registry watches, so a write on
//! any replica is pushed like a file edit everywhere), `revocations.json` (which its revoker
//! polls) and `ca/roots.d/shared-<fingerprint>.pem` (roots other replicas trust, which join
//! its bundle on the CA reload the mirror asks for). Join tokens are read and written in Consul directly, never from the mirror: a
//! redemption must see the latest state.
//!
//! When Consul is unavailable each replica keeps serving what it mirrored last; writes are
//! refused with an error that says so.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pilotfish_durable as durable;
use pilotfish_pki::ca::{roots_dir, SHARED_ROOT_PREFIX};
use pilotfish_pki::revocation::REVOCATIONS_FILE;
use pilotfish_pki::{SharedDoc, SharedDocument, SharedError};
use pilotfish_registries::consul::client::Client;
use pilotfish_registries::consul::pacing::{Backoff, TokenBucket};
use pilotfish_registries::consul::{ConsulError, Kv, KvEntry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod liveness;

use crate::config::StoreConfig;
use crate::rules_api::RULES_DIR;

/// The key (under the prefix) of the join tokens.
pub const TOKENS_KEY: &str = "tokens";
/// The key (under the prefix) of the node revocations (`state_dir/revocations.json`).
pub const REVOCATIONS_KEY: &str = "revocations";
/// The folder (under the prefix) of rules-API objects.
pub const RULES_KEY: &str = "rules/";
/// The folder (under the prefix) of the replicas' CRLs, one key per signer fingerprint.
pub const CRLS_KEY: &str = "crls/";
/// The folder (under the prefix) of the replicas' liveness records ([`liveness`]).
pub const LIVENESS_KEY: &str = "liveness/";
/// The folder (under the prefix) of the roots the replicas trust, one key per fingerprint.
pub const ROOTS_KEY: &str = "roots/";
/// Set once the first replica copied its own state in.
pub const SEEDED_KEY: &str = "seeded";
/// How long a write waits for this replica's mirror to show it before answering.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Consul KV as the replicas' shared store; see the module comment.
pub struct SharedStore {
    kv: Kv,
    prefix: String,
    state_dir: PathBuf,
    wait: Duration,
    /// The Consul index the mirror last wrote into `state_dir` (0: not yet).
    applied: watch::Sender<u64>,
    /// Whether the last request to Consul succeeded.
    up: watch::Sender<bool>,
    /// Every replica's CRL (`crls/`), by signer fingerprint, as last mirrored.
    crls: watch::Sender<BTreeMap<String, String>>,
    /// Every replica's liveness record (`liveness/<replica>`, by that key), as last mirrored.
    liveness: watch::Sender<BTreeMap<String, Vec<u8>>>,
    /// Counts the mirrors that changed `ca/roots.d/` (the CA must be reloaded).
    roots_changed: watch::Sender<u64>,
    /// For calls from outside a runtime (the command line).
    runtime: OnceLock<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("kv", &self.kv)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The shared store in `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStatus {
    pub consul: String,
    pub prefix: String,
    /// Whether the last request to Consul succeeded.
    pub up: bool,
    /// The Consul index last mirrored into `state_dir` (0: not yet).
    pub applied_index: u64,
}

/// The shared store failed; the message says where and what to do.
#[derive(Debug, thiserror::Error)]
#[error("the shared store (Consul KV {place} at {address}) is unavailable")]
pub struct StoreError {
    pub place: String,
    pub address: String,
    #[source]
    pub source: ConsulError,
}

impl SharedStore {
    pub fn new(config: &StoreConfig, state_dir: &Path) -> Result<Arc<SharedStore>, ConsulError> {
        let client = Client::new(Arc::new(config.consul.clone()))?;
        Ok(Arc::new(SharedStore {
            kv: Kv::new(client, config.datacenter.clone()),
            prefix: config.prefix.clone(),
            state_dir: state_dir.to_path_buf(),
            wait: config.consul.wait,
            applied: watch::channel(0).0,
            up: watch::channel(false).0,
            crls: watch::channel(BTreeMap::new()).0,
            roots_changed: watch::channel(0).0,
            liveness: watch::channel(BTreeMap::new()).0,
            runtime: OnceLock::new(),
        }))
    }

    /// The full key of `rel` (a key under the prefix).
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    pub fn address(&self) -> &str {
        self.kv.address()
    }

    fn failed(&self, rel: &str, source: ConsulError) -> StoreError {
        self.up.send_replace(false);
        StoreError {
            place: self.key(rel),
            address: self.kv.address().to_string(),
            source,
        }
    }

    /// Runs `f` to completion from blocking code: on the runtime of the calling thread when it
    /// has one (a `spawn_blocking` thread), else on a small runtime of its own.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(f),
            Err(_) => self
                .runtime
                .get_or_init(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap_or_else(|e| panic!("cannot start a runtime for Consul: {e}"))
                })
                .block_on(f),
        }
    }

    /// The key `rel` (under the prefix), or `None` if it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<KvEntry>, StoreError> {
        let got = self.kv.get(&self.key(rel)).await;
        let entry = got.map_err(|e| self.failed(rel, e))?;
        self.up.send_replace(true);
        Ok(entry)
    }

    /// Writes `rel` if it is still at `cas` (0: absent). `Ok(false)`: another writer was first.
    pub async fn put_if(&self, rel: &str, value: &[u8], cas: u64) -> Result<bool, StoreError> {
        let put = self.kv.put(&self.key(rel), value, Some(cas)).await;
        let won = put.map_err(|e| self.failed(rel, e))?;
        self.up.send_replace(true);
        Ok(won)
    }

    /// Deletes `rel` if it is still at `cas`.
    pub async fn delete_if(&self, rel: &str, cas: u64) -> Result<bool, StoreError> {
        let deleted = self.kv.delete(&self.key(rel), Some(cas)).await;
        let won = deleted.map_err(|e| self.failed(rel, e))?;
        self.up.send_replace(true);
        Ok(won)
    }

    /// Waits until this replica's mirror has applied everything up to the latest write under
    /// `rel` (a folder), so that a write answered here is already served here. False when it
    /// did not within `deadline` (the write stands; the mirror catches up).
    pub async fn wait_applied(&self, rel: &str, deadline: Duration) -> bool {
        let index = match self.kv.index(&self.key(rel)).await {
            Ok(index) => index,
            Err(e) => {
                warn!(error = %e, "cannot read the index of the write just made");
                return false;
            }
        };
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(deadline, applied.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every replica's CRL by signer fingerprint, as last mirrored.
    pub fn crls(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.crls.subscribe()
    }

    /// Writes `rel` whatever it holds: for keys only this replica writes.
    pub async fn put(&self, rel: &str, value: &[u8]) -> Result<(), StoreError> {
        let put = self.kv.put(&self.key(rel), value, None).await;
        put.map_err(|e| self.failed(rel, e))?;
        self.up.send_replace(true);
        Ok(())
    }

    /// Every replica's liveness record, by key under the prefix.
    pub fn liveness(&self) -> watch::Receiver<BTreeMap<String, Vec<u8>>> {
        self.liveness.subscribe()
    }

    /// Ticks each time the mirror changed the shared roots in `ca/roots.d/`.
    pub fn roots_changed(&self) -> watch::Receiver<u64> {
        self.roots_changed.subscribe()
    }

    /// Deletes every shared root whose fingerprint starts with `prefix` (`ca retire`); their
    /// fingerprints.
    pub async fn remove_roots(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let listed = self.kv.list(&self.key(ROOTS_KEY), 0, self.wait).await;
        let (entries, _) = listed.map_err(|e| self.failed(ROOTS_KEY, e))?;
        let mut removed = Vec::new();
        for e in entries {
            let Some(fp) = e.key.strip_prefix(&self.key(ROOTS_KEY)) else {
                continue;
            };
            if fp.starts_with(prefix) {
                let rel = format!("{ROOTS_KEY}{fp}");
                if self.delete_if(&rel, e.modify_index).await? {
                    removed.push(fp.to_string());
                }
            }
        }
        Ok(removed)
    }

    /// Whether the last request to Consul succeeded.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// For `/status`.
    pub fn status(&self) -> StoreStatus {
        StoreStatus {
            consul: self.kv.address().to_string(),
            prefix: self.prefix.clone(),
            up: self.is_up(),
            applied_index: *self.applied.borrow(),
        }
    }

    /// `pilotfish_store_up` and `pilotfish_store_applied_index`.
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        use crate::metrics::ScrapeGauge;
        let store = registry.sub_registry_with_prefix("store");
        let up = self.up.subscribe();
        store.register_collector(ScrapeGauge::boxed(
            "up",
            "1 while the last request to the shared store (Consul KV) succeeded.",
            move || i64::from(*up.borrow()),
        ));
        let applied = self.applied.subscribe();
        store.register_collector(ScrapeGauge::boxed(
            "applied_index",
            "The Consul index of the shared store last mirrored into state_dir (0: not yet).",
            move || i64::try_from(*applied.borrow()).unwrap_or(i64::MAX),
        ));
    }

    /// The shared document at `rel`, for the stores of join tokens and revocations.
    pub fn document(self: &Arc<Self>, rel: &str) -> SharedDoc {
        Arc::new(KvDocument {
            store: self.clone(),
            rel: rel.to_string(),
        })
    }

    /// Copies this replica's state into Consul once per prefix, then mirrors the prefix into
    /// `state_dir` until `shutdown`. `synced` is told after the first mirror (or after the first
    /// failure, so that a replica starting while Consul is down serves what it has).
    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        synced: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let mut synced = synced;
        let mut bucket = TokenBucket::new(5, Duration::from_millis(200));
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let mut index = 0u64;
        let mut seeded = false;
        // The (key, ModifyIndex) of every mirrored key last written into state_dir: liveness
        // beats wake the watch every second or two, and most wakes change nothing to mirror.
        let mut mirrored: Option<Vec<(String, u64)>> = None;
        loop {
            bucket.acquire().await;
            let step = async {
                if !seeded {
                    self.seed().await?;
                    seeded = true;
                }
                self.kv
                    .list(&self.prefix, index, self.wait)
                    .await
                    .map_err(|e| self.failed("", e))
            };
            let result = tokio::select! {
                r = step => r,
                _ = shutdown.cancelled() => return,
            };
            match result {
                Ok((entries, meta)) => {
                    self.up.send_replace(true);
                    backoff.reset();
                    // consul-api.md a.2: an index that went backwards (a restored snapshot, a
                    // new cluster) restarts the watch from 0; 0 is never a valid index.
                    index = if meta.index < index || meta.index == 0 {
                        0
                    } else {
                        meta.index
                    };
                    let crls: BTreeMap<String, String> = entries
                        .iter()
                        .filter_map(|e| {
                            let id = e.key.strip_prefix(&self.prefix)?.strip_prefix(CRLS_KEY)?;
                            Some((
                                id.to_string(),
                                String::from_utf8_lossy(&e.value).into_owned(),
                            ))
                        })
                        .collect();
                    self.crls.send_if_modified(|current| {
                        let changed = *current != crls;
                        *current = crls;
                        changed
                    });
                    let records: BTreeMap<String, Vec<u8>> = entries
                        .iter()
                        .filter_map(|e| {
                            let rel = e.key.strip_prefix(&self.prefix)?;
                            rel.starts_with(LIVENESS_KEY)
                                .then(|| (rel.to_string(), e.value.clone()))
                        })
                        .collect();
                    self.liveness.send_if_modified(|current| {
                        let changed = *current != records;
                        *current = records;
                        changed
                    });
                    let wanted: Vec<(String, u64)> = entries
                        .iter()
                        .filter(|e| is_mirrored(&e.key, &self.prefix))
                        .map(|e| (e.key.clone(), e.modify_index))
                        .collect();
                    if mirrored.as_ref() == Some(&wanted) {
                        self.applied.send_replace(meta.index);
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    let dir = self.state_dir.clone();
                    let prefix = self.prefix.clone();
                    let applied =
                        tokio::task::spawn_blocking(move || mirror(&dir, &prefix, &entries)).await;
                    match applied {
                        Ok(Ok(roots_changed)) => {
                            if roots_changed {
                                self.roots_changed.send_modify(|n| *n += 1);
                            }
                            mirrored = Some(wanted);
                            self.applied.send_replace(meta.index);
                        }
                        Ok(Err(e)) => {
                            warn!(error = %e, "cannot mirror the shared store into state_dir")
                        }
                        Err(e) => warn!(error = %e, "the store mirror task failed"),
                    }
                    if let Some(tx) = synced.take() {
                        let _ = tx.send(());
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "shared store: keeping what this replica has");
                    if let Some(tx) = synced.take() {
                        let _ = tx.send(());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// The first replica on a prefix copies in what its `state_dir` holds (rules-API objects,
    /// join tokens, revocations): switching an existing discovery to the store loses nothing.
    /// Later replicas (and later starts) take the store's state instead.
    async fn seed(&self) -> Result<(), StoreError> {
        if self.get(SEEDED_KEY).await?.is_some() {
            return Ok(());
        }
        let dir = self.state_dir.clone();
        let local = tokio::task::spawn_blocking(move || local_state(&dir))
            .await
            .unwrap_or_default();
        for (rel, bytes) in &local {
            // Only where the key is absent: never over another replica's state.
            if self.put_if(rel, bytes, 0).await? {
                info!(key = %self.key(rel), "shared store: copied in this replica's state");
            }
        }
        self.put_if(SEEDED_KEY, b"", 0).await?;
        Ok(())
    }
}

/// Whether [`mirror`] writes `key` (a full key) into `state_dir`.
fn is_mirrored(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix).is_some_and(|rel| {
        rel.starts_with(RULES_KEY) || rel.starts_with(ROOTS_KEY) || rel == REVOCATIONS_KEY
    })
}

/// What a replica's `state_dir` holds that the store shares, as (key under the prefix, bytes).
fn local_state(state_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (file, key) in [
        ("tokens.json", TOKENS_KEY),
        (REVOCATIONS_FILE, REVOCATIONS_KEY),
    ] {
        if let Ok(bytes) = std::fs::read(state_dir.join(file)) {
            out.push((key.to_string(), bytes));
        }
    }
    if let Ok(entries) = std::fs::read_dir(state_dir.join(RULES_DIR)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(key) = rules_key(&name) {
                if let Ok(bytes) = std::fs::read(entry.path()) {
                    out.push((key, bytes));
                }
            }
        }
    }
    out
}

/// A file the rules API writes: `<table>-<service>.toml`, no dot files (temporary ones).
fn is_rules_file(name: &str) -> bool {
    name.ends_with(".toml") && !name.starts_with('.') && !name.contains('/') && name.contains('-')
}

/// The key (under the prefix) of a file in `rules.d`: `rules/<table>-<service>`.
pub fn rules_key(file_name: &str) -> Option<String> {
    is_rules_file(file_name).then(|| format!("{RULES_KEY}{}", file_name.trim_end_matches(".toml")))
}

/// Makes `state_dir` hold what the store holds: `rules.d/` gets exactly the store's rules
/// files (others that the API could have written are removed), `revocations.json` the store's
/// revocations. Files are replaced atomically and only when their bytes differ, so an
/// unchanged prefix touches nothing and the registry sees no event. Returns whether the shared
/// roots in `ca/roots.d/` changed (only where this replica has a CA).
fn mirror(state_dir: &Path, prefix: &str, entries: &[KvEntry]) -> std::io::Result<bool> {
    let rules_dir = state_dir.join(RULES_DIR);
    durable::create_dir_all(&rules_dir, durable::PRIVATE_DIR_MODE)?;
    let mut rules: BTreeMap<String, &[u8]> = BTreeMap::new();
    let mut roots: BTreeMap<String, &[u8]> = BTreeMap::new();
    let mut revocations = None;
    for e in entries {
        let Some(rel) = e.key.strip_prefix(prefix) else {
            continue;
        };
        if let Some(name) = rel.strip_prefix(RULES_KEY) {
            let name = format!("{name}.toml");
            if is_rules_file(&name) {
                rules.insert(name, &e.value);
            }
        } else if rel == REVOCATIONS_KEY {
            revocations = Some(&e.value[..]);
        } else if let Some(fp) = rel.strip_prefix(ROOTS_KEY) {
            if !fp.is_empty() && fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                roots.insert(format!("{SHARED_ROOT_PREFIX}{fp}.pem"), &e.value);
            }
        }
    }
    for (name, bytes) in &rules {
        write_if_changed(&rules_dir.join(name), bytes)?;
    }
    for entry in std::fs::read_dir(&rules_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_rules_file(&name) && !rules.contains_key(&name) {
            info!(file = %entry.path().display(), "shared store: removed (deleted on another replica)");
            durable::remove(&entry.path())?;
        }
    }
    if let Some(bytes) = revocations {
        write_if_changed(&state_dir.join(REVOCATIONS_FILE), bytes)?;
    }
    // Roots only where there is a CA (an insecure discovery has none).
    let mut roots_changed = false;
    if state_dir.join("ca").is_dir() {
        let dir = roots_dir(state_dir);
        durable::create_dir_all(&dir, durable::PRIVATE_DIR_MODE)?;
        for (name, pem) in &roots {
            roots_changed |= write_if_changed(&dir.join(name), pem)?;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(SHARED_ROOT_PREFIX) && !roots.contains_key(&name) {
                info!(file = %entry.path().display(), "shared store: a root was retired");
                durable::remove(&entry.path())?;
                roots_changed = true;
            }
        }
    }
    Ok(roots_changed)
}

/// Whether it wrote.
fn write_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    durable::write_atomic(path, bytes, durable::SECRET_MODE)?;
    Ok(true)
}

/// One key of the store as a [`SharedDocument`]; its version is the key's `ModifyIndex`.
struct KvDocument {
    store: Arc<SharedStore>,
    rel: String,
}

impl SharedDocument for KvDocument {
    fn describe(&self) -> String {
        format!(
            "Consul KV {} at {}",
            self.store.key(&self.rel),
            self.store.address()
        )
    }

    fn load(&self) -> Result<(Option<Vec<u8>>, u64), SharedError> {
        let entry = self
            .store
            .block_on(self.store.get(&self.rel))
            .map_err(|e| self.error(e))?;
        Ok(match entry {
            Some(e) => (Some(e.value), e.modify_index),
            None => (None, 0),
        })
    }

    fn replace(&self, bytes: &[u8], version: u64) -> Result<bool, SharedError> {
        self.store
            .block_on(self.store.put_if(&self.rel, bytes, version))
            .map_err(|e| self.error(e))
    }
}

impl KvDocument {
    fn error(&self, e: StoreError) -> SharedError {
        SharedError {
            place: self.describe(),
            message: crate::error_chain(&e),
        }
    }
}

/// Shares this replica's CRL with the others and serves theirs beside it, until `shutdown`:
/// once a node is revoked, every replica's hosts hold a CRL for every replica's signer (Envoy
/// refuses a certificate whose issuer has none once it has CRLs at all).
pub async fn share_crls(
    store: Arc<SharedStore>,
    authority: Arc<crate::identity::Authority>,
    shutdown: CancellationToken,
) {
    let mut views = authority.revoker().subscribe();
    let mut crls = store.crls();
    let mut published: Option<(String, String)> = None;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        let theirs = crls.borrow_and_update().clone();
        let ca = authority.ca();
        authority.revoker().set_shared_crls(&ca, &theirs);
        let own = views.borrow_and_update().own_crl_pem.clone();
        let key = format!("{CRLS_KEY}{}", ca.signer_fingerprint());
        let wanted = (key, own);
        let mut retry = None;
        if published.as_ref() != Some(&wanted) {
            match store.put(&wanted.0, wanted.1.as_bytes()).await {
                Ok(()) => {
                    backoff.reset();
                    published = Some(wanted);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %crate::error_chain(&e), retry_in = ?delay, "cannot share this replica's CRL");
                    retry = Some(delay);
                }
            }
        }
        let wait = async {
            match retry {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = crls.changed() => {}
            _ = views.changed() => {}
            _ = wait => {}
        }
    }
}

/// Shares the roots this replica trusts of its own (`roots/<fingerprint>`), and reloads the
/// CA whenever the mirror brought roots of other replicas, until `shutdown`. So a root a
/// replica starts to trust (a rotation's new root, under which its new intermediate chains)
/// reaches every replica's bundle, and from there every host.
pub async fn share_roots(
    store: Arc<SharedStore>,
    authority: Arc<crate::identity::Authority>,
    shutdown: CancellationToken,
) {
    /// How often the CA's own roots are compared with what was shared (they change on a
    /// reload, which any operator step may trigger).
    const RECHECK: Duration = Duration::from_secs(10);
    let mut changed = store.roots_changed();
    let mut shared: Vec<(String, String)> = Vec::new();
    loop {
        if changed.has_changed().unwrap_or(false) {
            changed.mark_unchanged();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = authority.request_reload() => {}
            }
        }
        let own = authority.ca().own_roots_pem();
        if own != shared {
            let mut all = true;
            for (fp, pem) in &own {
                // Only where absent: a root is the same bytes whoever shares it.
                if let Err(e) = store
                    .put_if(&format!("{ROOTS_KEY}{fp}"), pem.as_bytes(), 0)
                    .await
                {
                    warn!(error = %crate::error_chain(&e), "cannot share this replica's roots");
                    all = false;
                    break;
                }
            }
            if all {
                shared = own;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed.changed() => {}
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
