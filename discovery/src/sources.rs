//! Where discovery's catalog comes from: the TOML file registry always, the Consul adapter when
//! `[registry.consul]` is set.
//!
//! Each registry publishes whole catalogs on its own watch channel. The [`Combiner`] watches both
//! and publishes `merge(files, consul)` (the rule is documented in
//! `pilotfish_registries::merge`) on the one channel the debouncer and the CA read. The sources
//! fail independently: a TOML edit is merged with Consul's last good catalog while Consul is
//! down (the adapter keeps publishing it), and a bad TOML file leaves Consul's changes flowing.
//!
//! The merged catalog is published only when its content changed, so a Consul wake-up that
//! changed nothing reaches neither the debouncer nor any proxy. Merge conflicts are logged once
//! when they appear (with the TOML file and line) and kept on a channel for `/status`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pilotfish_registries::consul::ConsulStatus;
use pilotfish_registries::merge::{merge, MergeConflict};
use pilotfish_registries::model::Catalog;
use pilotfish_registries::references::{unresolved, Unresolved};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod metrics;

/// How long discovery waits at start for Consul's first full read before it builds the first
/// snapshot without it. Proxies keep the config they have meanwhile; building early would make
/// a restarted discovery withdraw every Consul instance until the read completes.
pub const CONSUL_FIRST_SYNC_WAIT: Duration = Duration::from_secs(10);

/// The conflicts of the latest merge, as published.
pub type Conflicts = watch::Receiver<Arc<Vec<MergeConflict>>>;

/// References to services that no source declares, in the latest merged catalog.
pub type UnresolvedView = watch::Receiver<Arc<Vec<Unresolved>>>;

/// What `/status` and `/metrics` read about the sources, besides the file registry's status.
#[derive(Clone)]
pub struct SourcesView {
    /// `None` when Consul is not configured.
    pub consul: Option<ConsulView>,
    /// The conflicts of the last merge (empty without Consul).
    pub conflicts: Conflicts,
    /// See [`report_unresolved`].
    pub unresolved: UnresolvedView,
}

#[derive(Clone)]
pub struct ConsulView {
    pub address: String,
    pub token_file: Option<PathBuf>,
    pub status: watch::Receiver<Arc<ConsulStatus>>,
}

impl SourcesView {
    /// The TOML files are the only source.
    pub fn files_only() -> SourcesView {
        SourcesView {
            consul: None,
            conflicts: watch::channel(Arc::new(Vec::new())).1,
            unresolved: watch::channel(Arc::new(Vec::new())).1,
        }
    }
}

/// Publishes the merge of the file and Consul catalogs. See the module docs.
pub struct Combiner {
    files: watch::Receiver<Arc<Catalog>>,
    consul: watch::Receiver<Arc<Catalog>>,
    merged: watch::Sender<Arc<Catalog>>,
    conflicts: watch::Sender<Arc<Vec<MergeConflict>>>,
}

impl Combiner {
    /// Merges the catalogs the two channels hold now; the returned receivers start with that
    /// merge and its conflicts.
    pub fn new(
        files: watch::Receiver<Arc<Catalog>>,
        consul: watch::Receiver<Arc<Catalog>>,
    ) -> (Combiner, watch::Receiver<Arc<Catalog>>, Conflicts) {
        let (merged_tx, mut merged_rx) = watch::channel(Arc::new(Catalog::default()));
        let (conflicts_tx, mut conflicts_rx) = watch::channel(Arc::new(Vec::new()));
        let mut combiner = Combiner {
            files,
            consul,
            merged: merged_tx,
            conflicts: conflicts_tx,
        };
        let first = combiner.combine();
        combiner.merged.send_replace(Arc::new(first));
        // The first merge is where the receivers start, not a change they have to see.
        merged_rx.borrow_and_update();
        conflicts_rx.borrow_and_update();
        (combiner, merged_rx, conflicts_rx)
    }

    /// Runs until `shutdown` or until the file registry is gone. If the Consul adapter goes
    /// away first, its last catalog stays merged in.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut consul_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.files.changed() => if r.is_err() { return },
                r = self.consul.changed(), if consul_open => if r.is_err() {
                    consul_open = false;
                    continue;
                },
            }
            let merged = self.combine();
            self.merged.send_if_modified(|current| {
                if **current == merged {
                    return false;
                }
                *current = Arc::new(merged);
                true
            });
        }
    }

    /// The merge of the latest catalogs; publishes (and logs) the conflicts when they changed.
    fn combine(&mut self) -> Catalog {
        let files = Arc::clone(&self.files.borrow_and_update());
        let consul = Arc::clone(&self.consul.borrow_and_update());
        let (merged, conflicts) = merge(&files, &consul);
        let before: BTreeSet<MergeConflict> = self.conflicts.borrow().iter().cloned().collect();
        let now: BTreeSet<&MergeConflict> = conflicts.iter().collect();
        for c in conflicts.iter().filter(|c| !before.contains(*c)) {
            warn!(service = %c.service, toml = %c.toml, "{c}");
        }
        for c in before.iter().filter(|c| !now.contains(c)) {
            info!(service = %c.service, address = %c.address, port = c.port, "merge conflict resolved");
        }
        self.conflicts.send_if_modified(|current| {
            if **current == conflicts {
                return false;
            }
            *current = Arc::new(conflicts);
            true
        });
        merged
    }
}

/// Waits until every configured datacenter has been read in full once, or serves the catalog
/// an earlier run stored while Consul does not answer ([`ConsulStatus::ready`]), at most
/// `within`. True when they all were.
pub async fn wait_first_sync(
    status: &mut watch::Receiver<Arc<ConsulStatus>>,
    within: Duration,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        r = tokio::time::timeout(within, status.wait_for(|s| s.ready())) => matches!(r, Ok(Ok(_))),
    }
}

/// Checks the references of every merged catalog (files and Consul together): a reference to a
/// service no source declares is published for `/status` and logged once as a warning with its
/// file and line, and logged again when it resolves. Never a reason to refuse anything.
pub async fn report_unresolved(
    mut catalogs: watch::Receiver<Arc<Catalog>>,
    out: watch::Sender<Arc<Vec<Unresolved>>>,
    shutdown: CancellationToken,
) {
    let mut last: Vec<Unresolved> = Vec::new();
    loop {
        let now = unresolved(&catalogs.borrow_and_update());
        for u in now.iter().filter(|u| !last.contains(u)) {
            warn!(reference = %u, "a reference names a service that no source declares yet");
        }
        for u in last.iter().filter(|u| !now.contains(u)) {
            info!(origin = %u.origin, field = %u.field, service = %u.service, "reference resolved");
        }
        if now != last {
            out.send_replace(Arc::new(now.clone()));
            last = now;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = catalogs.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use pilotfish_registries::model::{Instance, Origin, Service};

    use super::*;

    fn service(name: &str, origin: &str, instances: &[(&str, u16, Option<&str>)]) -> Service {
        Service {
            name: name.into(),
            protocol: Default::default(),
            port: 80,
            upstreams: None,
            instances: instances
                .iter()
                .map(|(address, port, dc)| Instance {
                    node: None,
                    address: (*address).into(),
                    port: *port,
                    mesh_port: 15006,
                    labels: Default::default(),
                    weight: 1,
                    healthy: true,
                    draining: false,
                    locality: dc.map(str::to_string),
                })
                .collect(),
            mtls: Default::default(),
            health: Default::default(),
            origin: Origin {
                file: origin.into(),
                line: 2,
            },
        }
    }

    fn catalog(services: Vec<Service>) -> Arc<Catalog> {
        let mut c = Catalog::default();
        for s in services {
            c.services.insert(s.name.clone(), s);
        }
        Arc::new(c)
    }

    #[tokio::test]
    async fn merges_both_sources_and_publishes_only_real_changes() {
        let (files_tx, files_rx) = watch::channel(catalog(vec![service(
            "web",
            "/r/web.toml",
            &[("10.0.0.1", 80, None)],
        )]));
        let consul_catalog = || {
            catalog(vec![service(
                "web",
                "consul://dc1/web",
                &[("10.0.0.1", 80, Some("dc1")), ("10.0.0.2", 80, Some("dc1"))],
            )])
        };
        let (consul_tx, consul_rx) = watch::channel(consul_catalog());
        let (combiner, mut merged, mut conflicts) = Combiner::new(files_rx, consul_rx);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(combiner.run(shutdown.clone()));

        let first = Arc::clone(&merged.borrow_and_update());
        assert_eq!(first.services["web"].instances.len(), 2);
        let c = Arc::clone(&conflicts.borrow_and_update());
        assert_eq!(c.len(), 1);
        assert!(c[0].to_string().contains("/r/web.toml:2"), "{}", c[0]);

        // A Consul wake-up with the same content (a new Arc): nothing is published.
        consul_tx.send_replace(consul_catalog());
        // A TOML change while Consul holds still: merged with Consul's catalog.
        files_tx.send_replace(catalog(vec![service(
            "web",
            "/r/web.toml",
            &[("10.0.0.3", 80, None)],
        )]));
        tokio::time::timeout(Duration::from_secs(5), merged.changed())
            .await
            .expect("published")
            .expect("open");
        let now = Arc::clone(&merged.borrow_and_update());
        let addrs: Vec<&str> = now.services["web"]
            .instances
            .iter()
            .map(|i| i.address.as_str())
            .collect();
        assert_eq!(addrs.len(), 3, "{addrs:?}");
        assert!(conflicts.has_changed().expect("open"));
        assert!(conflicts.borrow_and_update().is_empty());

        // Same content again from both sides: no publish.
        consul_tx.send_replace(consul_catalog());
        files_tx.send_replace(catalog(vec![service(
            "web",
            "/r/web.toml",
            &[("10.0.0.3", 80, None)],
        )]));
        let waited = tokio::time::timeout(Duration::from_millis(200), merged.changed()).await;
        assert!(waited.is_err(), "an unchanged merge was published");

        shutdown.cancel();
        task.await.expect("joins");
    }

    #[tokio::test]
    async fn the_file_source_keeps_flowing_after_consul_goes_away() {
        let (files_tx, files_rx) = watch::channel(catalog(vec![]));
        let (consul_tx, consul_rx) = watch::channel(catalog(vec![service(
            "db",
            "consul://dc1/db",
            &[("10.0.0.9", 5432, Some("dc1"))],
        )]));
        let (combiner, mut merged, _conflicts) = Combiner::new(files_rx, consul_rx);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(combiner.run(shutdown.clone()));
        drop(consul_tx);
        files_tx.send_replace(catalog(vec![service(
            "web",
            "/r/web.toml",
            &[("10.0.0.1", 80, None)],
        )]));
        tokio::time::timeout(Duration::from_secs(5), merged.changed())
            .await
            .expect("published")
            .expect("open");
        let now = Arc::clone(&merged.borrow_and_update());
        assert!(now.services.contains_key("web"));
        assert!(
            now.services.contains_key("db"),
            "Consul's last catalog stays"
        );
        shutdown.cancel();
        task.await.expect("joins");
    }
}
