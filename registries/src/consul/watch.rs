//! The watcher: per datacenter, two long-polls and targeted re-reads.
//!
//! Connection budget (consul-api.md a.2): one blocking query per service would hold one
//! connection per service and break past Consul's 200 connections per client. Instead each
//! datacenter holds exactly two long-polls, whatever the number of services:
//!
//! - `/v1/catalog/services` — services added or removed, tag changes;
//! - `/v1/health/state/any` — every check in the datacenter. A check whose status, service or
//!   `ModifyIndex` changed names the service to re-read; a node-level check (`serfHealth`,
//!   maintenance) names every service with an instance on that node.
//!
//! and re-reads only the named services with one-shot `/v1/health/service/:name` requests, at
//! most `fetch_concurrency` at a time. A change to one service therefore costs a bounded number
//! of requests (the two woken long-polls, their re-issue, and one read), and the connections in
//! use stay at `2 + fetch_concurrency` per datacenter.
//!
//! A service-list wake-up that neither the list nor any check explains (a re-registration that
//! touched no check, or a spurious wake-up) schedules a sweep: every selected service is re-read,
//! at most once per `sweep_min_interval`. A periodic sweep every `resync_interval` and a sweep
//! after any index regression are the safety nets. Content is compared before publishing, so
//! wake-ups without a real change publish nothing.
//!
//! Each long-poll follows Consul's client rules: first request without `index`; the index is
//! reset when it goes backwards and floored to 1; a token bucket paces the loop; errors back off
//! exponentially with jitter; the last good state stays in force throughout.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::{CheckServiceNode, HealthCheck, ServiceList};
use super::client::{path_segment, Client, RequestObserver, ResponseMeta};
use super::config::ConsulConfig;
use super::mapping::{
    build_catalog, map_service, select_services, MappedService, MappingOptions, RejectedEntry,
};
use super::pacing::{Backoff, TokenBucket};
use super::status::{ConsulStatus, DatacenterStatus};
use super::ConsulError;
use crate::last_good::{LastGoodStore, StoredCatalog};
use crate::model::{Catalog, Instance};

/// How long a service-list wake-up waits for a check change to explain it before a sweep.
const EXPLAIN_GRACE: Duration = Duration::from_millis(1000);

type DcServices = BTreeMap<String, Vec<Instance>>;

/// At most one write of a datacenter's stored catalog per this interval (each is an fsync).
const STORE_EVERY: Duration = Duration::from_secs(1);

/// The Consul registry adapter. See the module docs for how it watches.
pub struct ConsulRegistry {
    config: Arc<ConsulConfig>,
    client: Client,
    store: Option<LastGoodStore>,
}

struct DcUpdate {
    dc: String,
    services: Option<Arc<DcServices>>,
    status: DatacenterStatus,
}

impl ConsulRegistry {
    pub fn new(config: ConsulConfig) -> Result<ConsulRegistry, ConsulError> {
        let config = Arc::new(config);
        let client = Client::new(config.clone())?;
        Ok(ConsulRegistry {
            config,
            client,
            store: None,
        })
    }

    /// Reports how long every Consul request takes to `observer` (for latency metrics).
    pub fn with_request_observer(mut self, observer: RequestObserver) -> ConsulRegistry {
        self.client = self.client.with_observer(observer);
        self
    }

    /// Stores each datacenter's catalog after every change (at most once per second), and at
    /// start serves the stored one until that datacenter is first read in full.
    pub fn with_last_good(mut self, store: LastGoodStore) -> ConsulRegistry {
        self.store = Some(store);
        self
    }

    /// Watches every configured datacenter and publishes the merged Consul catalog and the
    /// status until `shutdown`. Errors from Consul never end it: they are reported in the status
    /// and the last good catalog stays published.
    pub async fn run(
        self,
        catalog: watch::Sender<Arc<Catalog>>,
        status: watch::Sender<Arc<ConsulStatus>>,
        shutdown: CancellationToken,
    ) -> Result<(), ConsulError> {
        let (tx, mut rx) = mpsc::channel::<DcUpdate>(64);
        let mut tasks = JoinSet::new();
        let mut current = ConsulStatus::default();
        for dc in &self.config.datacenters {
            current
                .datacenters
                .insert(dc.clone(), DatacenterStatus::default());
            let w = DcWatcher::new(dc.clone(), self.config.clone(), self.client.clone());
            tasks.spawn(w.run(tx.clone(), shutdown.child_token()));
        }
        drop(tx);
        let mut per_dc: BTreeMap<String, Arc<DcServices>> = BTreeMap::new();
        // Datacenters served from the store, with when it was saved, until their first full read.
        let mut restored: BTreeMap<String, SystemTime> = BTreeMap::new();
        let (fresh_tx, fresh_rx) = watch::channel(BTreeMap::new());
        if let Some(store) = self.store.clone() {
            let dcs = self.config.datacenters.clone();
            let loaded = tokio::task::spawn_blocking(move || load_stored(&store, &dcs))
                .await
                .unwrap_or_default();
            for (dc, stored) in loaded {
                restored.insert(dc.clone(), stored.saved);
                per_dc.insert(dc, Arc::new(stored.services));
            }
            if !per_dc.is_empty() {
                catalog.send_replace(Arc::new(build_catalog(
                    per_dc.iter().map(|(dc, s)| (dc.as_str(), s.as_ref())),
                )));
            }
            let store = self.store.clone();
            tasks.spawn(store_catalogs(store, fresh_rx, shutdown.clone()));
        }
        for (dc, since) in &restored {
            if let Some(d) = current.datacenters.get_mut(dc) {
                mark_restored(d, *since);
            }
        }
        status.send_replace(Arc::new(current.clone()));
        loop {
            let mut update = tokio::select! {
                _ = shutdown.cancelled() => break,
                u = rx.recv() => match u { Some(u) => u, None => break },
            };
            if let Some(services) = update.services {
                if restored.remove(&update.dc).is_some() {
                    tracing::info!(
                        dc = update.dc,
                        "consul read in full; its fresh catalog replaces the stored one"
                    );
                }
                fresh_tx.send_modify(|m| {
                    m.insert(update.dc.clone(), services.clone());
                });
                per_dc.insert(update.dc.clone(), services);
                let next = build_catalog(per_dc.iter().map(|(dc, s)| (dc.as_str(), s.as_ref())));
                catalog.send_if_modified(|c| {
                    if **c == next {
                        return false;
                    }
                    tracing::info!(services = next.services.len(), "consul catalog changed");
                    *c = Arc::new(next);
                    true
                });
            }
            if let Some(since) = restored.get(&update.dc) {
                mark_restored(&mut update.status, *since);
            }
            current.datacenters.insert(update.dc, update.status);
            status.send_if_modified(|s| {
                if **s == current {
                    return false;
                }
                *s = Arc::new(current.clone());
                true
            });
        }
        shutdown.cancel();
        // The store writer sees the channel close and writes what is still pending.
        drop(fresh_tx);
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "consul datacenter watcher panicked");
            }
        }
        Ok(())
    }
}

/// A datacenter served from the store is stale until Consul is read in full.
fn mark_restored(status: &mut DatacenterStatus, since: SystemTime) {
    status.restored_since = Some(since);
    status.stale = true;
}

/// The stored catalog of each of `dcs` that has one (blocking); unreadable copies are logged
/// and skipped.
fn load_stored(store: &LastGoodStore, dcs: &[String]) -> BTreeMap<String, StoredCatalog> {
    let mut out = BTreeMap::new();
    for dc in dcs {
        match store.load_consul(dc) {
            Ok(Some(stored)) => {
                tracing::warn!(
                    dc,
                    copy = %store.consul_copy(dc).display(),
                    saved_unix_s = crate::last_good::unix_secs(stored.saved),
                    services = stored.services.len(),
                    "serving the consul catalog stored by an earlier run until consul is read in full (stale)"
                );
                out.insert(dc.clone(), stored);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(dc, copy = %store.consul_copy(dc).display(), error = %e, "cannot read the stored consul catalog; starting without it");
            }
        }
    }
    out
}

/// Writes each datacenter's fresh catalog to the store when it changes, at most once per
/// [`STORE_EVERY`]; the watch channel keeps only the newest. Writes what is pending when the
/// channel closes, then returns.
async fn store_catalogs(
    store: Option<LastGoodStore>,
    mut fresh: watch::Receiver<BTreeMap<String, Arc<DcServices>>>,
    shutdown: CancellationToken,
) {
    let Some(store) = store else { return };
    let mut written: BTreeMap<String, Arc<DcServices>> = BTreeMap::new();
    loop {
        let open = fresh.changed().await.is_ok();
        let now = fresh.borrow_and_update().clone();
        let due: Vec<(String, Arc<DcServices>)> = now
            .into_iter()
            .filter(|(dc, s)| written.get(dc).is_none_or(|w| !Arc::ptr_eq(w, s)))
            .collect();
        if !due.is_empty() {
            let store = store.clone();
            let list = due.clone();
            let failed = tokio::task::spawn_blocking(move || {
                let mut failed = BTreeSet::new();
                for (dc, services) in &list {
                    if let Err(e) = store.save_consul(dc, services) {
                        tracing::warn!(dc, copy = %store.consul_copy(dc).display(), error = %e, "cannot store the consul catalog");
                        failed.insert(dc.clone());
                    }
                }
                failed
            })
            .await
            .unwrap_or_default();
            written.extend(due.into_iter().filter(|(dc, _)| !failed.contains(dc)));
        }
        if !open {
            return;
        }
        // Between writes; on shutdown, go round once more to write what is pending.
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(STORE_EVERY) => {}
        }
    }
}

enum PollEvent {
    Services(ServiceList, ResponseMeta),
    Checks(Vec<HealthCheck>, ResponseMeta),
    Failed(&'static str, ConsulError),
}

/// What one long-poll reads, and where it reports.
struct LongPoll {
    client: Client,
    config: Arc<ConsulConfig>,
    dc: String,
    path: &'static str,
    kind: &'static str,
    tx: mpsc::Sender<PollEvent>,
}

/// One long-poll loop, following the reference watch loop of consul-api.md a.2.
async fn long_poll<T: DeserializeOwned>(
    poll: LongPoll,
    wrap: fn(T, ResponseMeta) -> PollEvent,
    shutdown: CancellationToken,
) {
    let LongPoll {
        client,
        config,
        dc,
        path,
        kind,
        tx,
    } = poll;
    let mut index = 0u64;
    let mut bucket = TokenBucket::new(config.rate_limit_burst, config.rate_limit_interval);
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = bucket.acquire() => {}
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.get::<T>(&dc, kind, path, index) => r,
        };
        match result {
            Ok((body, meta)) => {
                backoff.reset();
                if meta.index < index {
                    tracing::info!(
                        dc,
                        path,
                        from = index,
                        to = meta.index,
                        "consul index went backwards; resyncing"
                    );
                    index = 0;
                } else {
                    index = meta.index;
                }
                // Never block on 0 (old Consul bugs made that a busy loop).
                index = index.max(1);
                if tx.send(wrap(body, meta)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if matches!(e, ConsulError::UnknownDatacenter { .. }) {
                    backoff.saturate();
                }
                let delay = backoff.next_delay();
                tracing::warn!(dc, path, error = %e, retry_in = ?delay, "consul request failed; keeping last good state");
                if tx.send(PollEvent::Failed(kind, e)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CheckSig {
    status: String,
    service_id: String,
    service_name: String,
    modify_index: u64,
}

struct DcWatcher {
    dc: String,
    config: Arc<ConsulConfig>,
    client: Client,
    opts: MappingOptions,
    services: DcServices,
    rejected: BTreeMap<String, Vec<RejectedEntry>>,
    svc_nodes: BTreeMap<String, BTreeSet<String>>,
    raw_list: Option<ServiceList>,
    listed: Option<BTreeMap<String, BTreeSet<String>>>,
    checks: Option<BTreeMap<(String, String), CheckSig>>,
    fetched_once: BTreeSet<String>,
    queue: BTreeSet<String>,
    inflight: BTreeSet<String>,
    fetch_paused_until: Option<Instant>,
    fetch_backoff: Backoff,
    services_index: u64,
    checks_index: u64,
    explained_index: u64,
    unexplained: Option<(u64, Instant)>,
    last_sweep: Option<Instant>,
    sweep_due: Option<Instant>,
    next_resync: Instant,
    errors: BTreeMap<&'static str, String>,
    status: DatacenterStatus,
    sent_status: Option<DatacenterStatus>,
    dirty: bool,
    /// The services were sent once (after the first full read), even if there are none.
    sent_services: bool,
}

impl DcWatcher {
    fn new(dc: String, config: Arc<ConsulConfig>, client: Client) -> DcWatcher {
        DcWatcher {
            opts: MappingOptions {
                service_tag: config.service_tag.clone(),
                name_filter: config.name_filter.clone(),
                default_mesh_port: config.default_mesh_port,
            },
            fetch_backoff: Backoff::new(config.backoff_min, config.backoff_max),
            next_resync: Instant::now() + config.resync_interval,
            dc,
            config,
            client,
            services: BTreeMap::new(),
            rejected: BTreeMap::new(),
            svc_nodes: BTreeMap::new(),
            raw_list: None,
            listed: None,
            checks: None,
            fetched_once: BTreeSet::new(),
            queue: BTreeSet::new(),
            inflight: BTreeSet::new(),
            fetch_paused_until: None,
            services_index: 0,
            checks_index: 0,
            explained_index: 0,
            unexplained: None,
            last_sweep: None,
            sweep_due: None,
            errors: BTreeMap::new(),
            status: DatacenterStatus {
                known_leader: true,
                ..DatacenterStatus::default()
            },
            sent_status: None,
            dirty: false,
            sent_services: false,
        }
    }

    async fn run(mut self, out: mpsc::Sender<DcUpdate>, shutdown: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<PollEvent>(16);
        let mut pollers = JoinSet::new();
        pollers.spawn(long_poll::<ServiceList>(
            LongPoll {
                client: self.client.clone(),
                config: self.config.clone(),
                dc: self.dc.clone(),
                path: "/v1/catalog/services",
                kind: "services",
                tx: tx.clone(),
            },
            PollEvent::Services,
            shutdown.clone(),
        ));
        pollers.spawn(long_poll::<Vec<HealthCheck>>(
            LongPoll {
                client: self.client.clone(),
                config: self.config.clone(),
                dc: self.dc.clone(),
                path: "/v1/health/state/any",
                kind: "checks",
                tx,
            },
            PollEvent::Checks,
            shutdown.clone(),
        ));
        let mut fetches: JoinSet<(String, Result<MappedService, ConsulError>)> = JoinSet::new();
        loop {
            self.start_fetches(&mut fetches);
            let timer = self.next_timer();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = rx.recv() => match ev {
                    Some(ev) => self.on_poll(ev),
                    None => break,
                },
                Some(done) = fetches.join_next(), if !fetches.is_empty() => match done {
                    Ok((name, result)) => self.on_fetched(name, result),
                    Err(e) => tracing::warn!(error = %e, "consul fetch task failed"),
                },
                _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => self.on_timer(),
            }
            if !self.flush(&out).await {
                break;
            }
        }
        shutdown.cancel();
        fetches.abort_all();
        while fetches.join_next().await.is_some() {}
        while pollers.join_next().await.is_some() {}
    }

    fn start_fetches(
        &mut self,
        fetches: &mut JoinSet<(String, Result<MappedService, ConsulError>)>,
    ) {
        if let Some(until) = self.fetch_paused_until {
            if Instant::now() < until {
                return;
            }
            self.fetch_paused_until = None;
        }
        while self.inflight.len() < self.config.fetch_concurrency {
            let Some(name) = self
                .queue
                .iter()
                .find(|n| !self.inflight.contains(*n))
                .cloned()
            else {
                break;
            };
            self.queue.remove(&name);
            self.inflight.insert(name.clone());
            let client = self.client.clone();
            let dc = self.dc.clone();
            let opts = self.opts.clone();
            self.status.requests_total += 1;
            fetches.spawn(async move {
                let path = format!("/v1/health/service/{}", path_segment(&name));
                let r = client
                    .get::<Vec<CheckServiceNode>>(&dc, "service", &path, 0)
                    .await
                    .map(|(entries, _)| map_service(&dc, &name, &entries, &opts));
                (name, r)
            });
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        [
            self.unexplained.map(|(_, t)| t),
            self.sweep_due,
            Some(self.next_resync),
            self.fetch_paused_until.filter(|_| !self.queue.is_empty()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.unexplained.is_some_and(|(_, t)| t <= now) {
            self.unexplained = None;
            tracing::debug!(
                dc = self.dc,
                "unexplained service-list change; scheduling a sweep"
            );
            self.request_sweep(now);
        }
        if now >= self.next_resync {
            self.next_resync = now + self.config.resync_interval;
            self.sweep_due = Some(now);
        }
        if self.sweep_due.is_some_and(|t| t <= now) {
            self.sweep_due = None;
            self.last_sweep = Some(now);
            if let Some(listed) = &self.listed {
                self.queue.extend(listed.keys().cloned());
            }
        }
    }

    fn request_sweep(&mut self, now: Instant) {
        let earliest = self
            .last_sweep
            .map_or(now, |t| (t + self.config.sweep_min_interval).max(now));
        self.sweep_due = Some(self.sweep_due.map_or(earliest, |d| d.min(earliest)));
    }

    fn ok_response(&mut self, kind: &'static str, meta: &ResponseMeta) {
        self.errors.remove(kind);
        self.status.last_sync = Some(SystemTime::now());
        self.status.known_leader = meta.known_leader;
        self.status.last_contact_ms = meta.last_contact_ms;
        self.status.requests_total += 1;
    }

    fn on_poll(&mut self, ev: PollEvent) {
        let now = Instant::now();
        match ev {
            PollEvent::Failed(kind, e) => {
                self.status.requests_total += 1;
                self.record_error(kind, &e);
            }
            PollEvent::Services(list, meta) => {
                self.ok_response("services", &meta);
                if meta.index < self.services_index {
                    self.explained_index = 0;
                    self.sweep_due = Some(now);
                }
                let advanced = meta.index > self.services_index;
                self.services_index = meta.index;
                self.status.index = meta.index;
                let selected = select_services(&list, &self.opts);
                let raw_changed = self
                    .raw_list
                    .as_ref()
                    .is_some_and(|old| !same_list(old, &list));
                self.raw_list = Some(list);
                let Some(old) = self.listed.replace(selected.clone()) else {
                    self.queue.extend(selected.keys().cloned());
                    return;
                };
                for name in old.keys().filter(|n| !selected.contains_key(*n)) {
                    // Gone from the catalog: drop it (it has no watch of its own to cancel).
                    self.services.remove(name);
                    self.rejected.remove(name);
                    self.svc_nodes.remove(name);
                    self.fetched_once.remove(name);
                    self.queue.remove(name);
                    self.dirty = true;
                }
                for (name, tags) in &selected {
                    if old.get(name) != Some(tags) {
                        self.queue.insert(name.clone());
                    }
                }
                if advanced && !raw_changed && self.explained_index < meta.index {
                    let deadline = now + EXPLAIN_GRACE;
                    self.unexplained = Some(match self.unexplained {
                        Some((i, t)) => (i.max(meta.index), t),
                        None => (meta.index, deadline),
                    });
                }
            }
            PollEvent::Checks(list, meta) => {
                self.ok_response("checks", &meta);
                if meta.index < self.checks_index {
                    self.sweep_due = Some(now);
                }
                self.checks_index = meta.index;
                self.status.checks_index = meta.index;
                let next: BTreeMap<(String, String), CheckSig> = list
                    .into_iter()
                    .map(|c| {
                        (
                            (c.node, c.check_id),
                            CheckSig {
                                status: c.status,
                                service_id: c.service_id,
                                service_name: c.service_name,
                                modify_index: c.modify_index,
                            },
                        )
                    })
                    .collect();
                let Some(prev) = self.checks.replace(next) else {
                    return;
                };
                let Some(next) = &self.checks else { return };
                let mut named: BTreeSet<String> = BTreeSet::new();
                let mut nodes: BTreeSet<&str> = BTreeSet::new();
                let keys: BTreeSet<&(String, String)> = prev.keys().chain(next.keys()).collect();
                for key in keys {
                    let (a, b) = (prev.get(key), next.get(key));
                    if a == b {
                        continue;
                    }
                    for sig in [a, b].into_iter().flatten() {
                        if sig.service_name.is_empty() {
                            nodes.insert(key.0.as_str());
                        } else {
                            named.insert(sig.service_name.clone());
                        }
                    }
                }
                for (svc, on) in &self.svc_nodes {
                    if on.iter().any(|n| nodes.contains(n.as_str())) {
                        named.insert(svc.clone());
                    }
                }
                if !named.is_empty() {
                    self.explained_index = self.explained_index.max(meta.index);
                    if self.unexplained.is_some_and(|(i, _)| i <= meta.index) {
                        self.unexplained = None;
                    }
                }
                if let Some(listed) = &self.listed {
                    self.queue
                        .extend(named.into_iter().filter(|n| listed.contains_key(n)));
                }
            }
        }
    }

    fn on_fetched(&mut self, name: String, result: Result<MappedService, ConsulError>) {
        self.inflight.remove(&name);
        match result {
            Ok(mapped) => {
                self.errors.remove("fetch");
                self.fetch_backoff.reset();
                self.status.last_sync = Some(SystemTime::now());
                if !self.listed.as_ref().is_some_and(|l| l.contains_key(&name)) {
                    return;
                }
                self.fetched_once.insert(name.clone());
                if self.services.get(&name) != Some(&mapped.instances) {
                    self.services.insert(name.clone(), mapped.instances);
                    self.dirty = true;
                }
                self.rejected.insert(name.clone(), mapped.rejected);
                self.svc_nodes.insert(name, mapped.nodes);
            }
            Err(e) => {
                self.record_error("fetch", &e);
                self.queue.insert(name);
                let delay = self.fetch_backoff.next_delay();
                self.fetch_paused_until = Some(Instant::now() + delay);
            }
        }
    }

    fn record_error(&mut self, kind: &'static str, e: &ConsulError) {
        self.status.errors_total += 1;
        let msg = e.to_string();
        self.status.last_error = Some(msg.clone());
        self.errors.insert(kind, msg);
    }

    fn synced(&self) -> bool {
        self.listed
            .as_ref()
            .is_some_and(|l| l.keys().all(|n| self.fetched_once.contains(n)))
    }

    /// Sends what changed; false when the receiver is gone.
    async fn flush(&mut self, out: &mpsc::Sender<DcUpdate>) -> bool {
        let synced = self.synced();
        self.status.synced = self.status.synced || synced;
        self.status.stale = !self.errors.is_empty() || !self.status.known_leader;
        if self.errors.is_empty() {
            self.status.last_error = None;
        }
        self.status.services = self.services.values().filter(|i| !i.is_empty()).count();
        self.status.instances = self.services.values().map(Vec::len).sum();
        self.status.rejected = self.rejected.values().flatten().cloned().collect();
        // The first full read is always sent: it replaces a stored catalog even when it
        // finds the datacenter as empty as it started.
        let services = ((self.dirty || !self.sent_services) && synced).then(|| {
            self.dirty = false;
            self.sent_services = true;
            Arc::new(self.services.clone())
        });
        if services.is_none() && self.sent_status.as_ref() == Some(&self.status) {
            return true;
        }
        self.sent_status = Some(self.status.clone());
        out.send(DcUpdate {
            dc: self.dc.clone(),
            services,
            status: self.status.clone(),
        })
        .await
        .is_ok()
    }
}

/// Service lists compare as sets of tags (Consul gives tags in no order).
fn same_list(a: &ServiceList, b: &ServiceList) -> bool {
    let norm = |l: &ServiceList| -> BTreeMap<String, BTreeSet<String>> {
        l.iter()
            .map(|(k, v)| (k.clone(), v.iter().flatten().cloned().collect()))
            .collect()
    };
    norm(a) == norm(b)
}
