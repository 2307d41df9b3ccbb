//! Merging the TOML registry with the Consul catalog into one mesh model. Pure.
//!
//! The rule:
//! - A service only one source declares is taken as that source has it.
//! - A service both declare is one service: its fields (`protocol`, `port`, `upstreams`, the
//!   origin) come from TOML, which operators edit on purpose; its instances are TOML's plus
//!   Consul's.
//! - An instance both sources declare at the same `address:port` is kept once, TOML's version,
//!   and reported as a [`MergeConflict`].
//! - Routes and policies come from TOML only (Consul carries none).
//! - Instances of every service are put in a canonical order (locality, address, port, node), so
//!   the result depends only on the two catalogs' content, not on the order of their entries.

use std::collections::BTreeSet;

use crate::consul::mapping::instance_order;
use crate::model::{Catalog, Origin};

/// The same instance declared by TOML and Consul; TOML's was kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MergeConflict {
    pub service: String,
    pub address: String,
    pub port: u16,
    /// Where the TOML service is declared.
    pub toml: Origin,
    /// The Consul datacenter of the dropped instance, when known.
    pub consul_datacenter: Option<String>,
}

impl std::fmt::Display for MergeConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services[{}]: instance {}:{} is declared in {} and in Consul{}; the TOML one is used",
            self.service,
            self.address,
            self.port,
            self.toml,
            self.consul_datacenter
                .as_deref()
                .map(|dc| format!(" ({dc})"))
                .unwrap_or_default()
        )
    }
}

/// Merges `files` (TOML) and `consul` by the rule in the module docs.
pub fn merge(files: &Catalog, consul: &Catalog) -> (Catalog, Vec<MergeConflict>) {
    let mut out = files.clone();
    for s in out.services.values_mut() {
        s.instances.sort_by(instance_order);
    }
    let mut conflicts = Vec::new();
    for (name, from_consul) in &consul.services {
        let Some(svc) = out.services.get_mut(name) else {
            let mut s = from_consul.clone();
            s.instances.sort_by(instance_order);
            out.services.insert(name.clone(), s);
            continue;
        };
        let taken: BTreeSet<(String, u16)> = svc
            .instances
            .iter()
            .map(|i| (i.address.clone(), i.port))
            .collect();
        for inst in &from_consul.instances {
            if taken.contains(&(inst.address.clone(), inst.port)) {
                conflicts.push(MergeConflict {
                    service: name.clone(),
                    address: inst.address.clone(),
                    port: inst.port,
                    toml: svc.origin.clone(),
                    consul_datacenter: inst.locality.clone(),
                });
            } else {
                svc.instances.push(inst.clone());
            }
        }
        svc.instances.sort_by(instance_order);
        svc.instances.dedup();
    }
    conflicts.sort();
    conflicts.dedup();
    (out, conflicts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{Instance, Protocol, Service};
    use rand::seq::SliceRandom;
    use rand::{RngExt, SeedableRng};

    fn inst(addr: &str, port: u16, dc: Option<&str>) -> Instance {
        Instance {
            node: None,
            address: addr.into(),
            port,
            mesh_port: 15006,
            labels: Default::default(),
            weight: 1,
            healthy: true,
            draining: false,
            locality: dc.map(str::to_string),
        }
    }

    fn svc(
        name: &str,
        protocol: Protocol,
        port: u16,
        file: &str,
        instances: Vec<Instance>,
    ) -> Service {
        Service {
            name: name.into(),
            protocol,
            port,
            upstreams: if file.ends_with(".toml") {
                Some(vec!["db".into()])
            } else {
                None
            },
            instances,
            mtls: Default::default(),
            health: Default::default(),
            origin: Origin {
                file: file.into(),
                line: 3,
            },
        }
    }

    #[test]
    fn merge_toml_fields_win_and_duplicates_conflict() {
        let mut files = Catalog::default();
        files.services.insert(
            "web".into(),
            svc(
                "web",
                Protocol::Grpc,
                9090,
                "reg/web.toml",
                vec![inst("10.0.0.1", 80, None)],
            ),
        );
        files.routes.insert("web".into(), Default::default());
        let mut consul = Catalog::default();
        consul.services.insert(
            "web".into(),
            svc(
                "web",
                Protocol::Http,
                80,
                "consul://dc1/web",
                vec![
                    inst("10.0.0.1", 80, Some("dc1")),
                    inst("10.0.0.2", 80, Some("dc1")),
                ],
            ),
        );
        consul.services.insert(
            "db".into(),
            svc(
                "db",
                Protocol::Tcp,
                5432,
                "consul://dc1/db",
                vec![inst("10.0.0.9", 5432, Some("dc1"))],
            ),
        );
        let (m, conflicts) = merge(&files, &consul);
        let web = &m.services["web"];
        assert_eq!((web.protocol, web.port), (Protocol::Grpc, 9090));
        assert_eq!(web.upstreams, Some(vec!["db".to_string()]));
        assert_eq!(web.instances.len(), 2);
        assert_eq!(web.instances[0].locality, None, "the TOML instance is kept");
        assert_eq!(m.services["db"].port, 5432);
        assert_eq!(m.routes.len(), 1);
        assert_eq!(conflicts.len(), 1);
        assert!(
            conflicts[0].to_string().contains("reg/web.toml:3"),
            "{}",
            conflicts[0]
        );
        assert!(conflicts[0].to_string().contains("10.0.0.1:80"));
    }

    #[test]
    fn merge_with_empty_sources_is_identity() {
        let mut files = Catalog::default();
        files.services.insert(
            "a".into(),
            svc(
                "a",
                Protocol::Http,
                1,
                "a.toml",
                vec![inst("1.1.1.1", 1, None)],
            ),
        );
        assert_eq!(merge(&files, &Catalog::default()), (files.clone(), vec![]));
        let (m, c) = merge(&Catalog::default(), &files);
        assert_eq!(m, files);
        assert!(c.is_empty());
    }

    fn random_catalogs(rng: &mut rand::rngs::StdRng) -> (Catalog, Catalog) {
        let mut files = Catalog::default();
        let mut consul = Catalog::default();
        for s in 0..rng.random_range(1..6) {
            let name = format!("s{s}");
            let mk = |rng: &mut rand::rngs::StdRng, dc: Option<&str>| -> Vec<Instance> {
                (0..rng.random_range(0..6))
                    .map(|_| {
                        inst(
                            &format!("10.0.0.{}", rng.random_range(1..5)),
                            rng.random_range(80..83),
                            dc,
                        )
                    })
                    .collect()
            };
            if rng.random_bool(0.6) {
                let mut v = mk(rng, None);
                v.sort_by(instance_order);
                v.dedup_by(|a, b| a.address == b.address && a.port == b.port);
                files
                    .services
                    .insert(name.clone(), svc(&name, Protocol::Http, 80, "f.toml", v));
            }
            if rng.random_bool(0.6) {
                let dc = if rng.random_bool(0.5) { "dc1" } else { "dc2" };
                let mut v = mk(rng, Some(dc));
                v.sort_by(instance_order);
                v.dedup_by(|a, b| a.address == b.address && a.port == b.port);
                consul
                    .services
                    .insert(name.clone(), svc(&name, Protocol::Tcp, 81, "consul://x", v));
            }
        }
        (files, consul)
    }

    #[test]
    fn merge_result_does_not_depend_on_entry_order() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let (files, consul) = random_catalogs(&mut rng);
            let expected = merge(&files, &consul);
            for _ in 0..4 {
                let (mut f2, mut c2) = (files.clone(), consul.clone());
                for s in f2.services.values_mut().chain(c2.services.values_mut()) {
                    s.instances.shuffle(&mut rng);
                }
                assert_eq!(merge(&f2, &c2), expected);
            }
            // Every address:port appears once per service; every TOML instance survives.
            let (m, conflicts) = &expected;
            for (name, s) in &m.services {
                let keys: BTreeSet<_> = s.instances.iter().map(|i| (&i.address, i.port)).collect();
                assert_eq!(keys.len(), s.instances.len(), "{name}");
                if let Some(f) = files.services.get(name) {
                    assert!(f.instances.iter().all(|i| s.instances.contains(i)));
                }
            }
            for c in conflicts {
                assert!(files.services.contains_key(&c.service));
            }
        }
    }
}
