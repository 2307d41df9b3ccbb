//! Merging the declarations of a set of files into one [`Catalog`], and the checks that need
//! more than one file: one definition per service, instances only for defined services, unique
//! instance addresses, one rule table of each kind per service, declared subsets, HTTP-only
//! keys only for HTTP services. A reference to a service no file declares is not checked here:
//! Consul may declare it, so it is checked on the merged catalog ([`crate::references`]) and
//! is a warning, never a reason to refuse a file.
//!
//! Files are visited in path order, so when two files clash the problem is reported on the
//! later one, the same way on every run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::parse::{key, FileDecls, Pos};
use super::Problem;
use crate::model::{Catalog, Origin, Protocol, Service};

/// Merges `files` (by path) into a catalog. The catalog is only meaningful when the problem
/// list is empty; problems are sorted by file and position.
pub(crate) fn merge<'a, I>(files: I) -> (Catalog, Vec<Problem>)
where
    I: IntoIterator<Item = (&'a PathBuf, &'a FileDecls)>,
{
    let files: Vec<(&PathBuf, &FileDecls)> = files.into_iter().collect();
    let mut problems = Vec::new();
    let mut catalog = Catalog::default();
    // Definitions first, so that instances and rules in any file can find their service.
    for (file, decls) in &files {
        for (name, decl) in &decls.services {
            let Some(def) = &decl.def else { continue };
            let path = format!("services.{}", key(name));
            if let Some(existing) = catalog.services.get(name) {
                problems.push(problem(
                    file,
                    decl.pos,
                    &path,
                    format!(
                        "service \"{name}\" is already defined at {}; its port, protocol and upstreams are set in one file (another file may add instances with a table that has only instances)",
                        existing.origin,
                    ),
                ));
                continue;
            }
            catalog.services.insert(
                name.clone(),
                Service {
                    name: name.clone(),
                    protocol: def.protocol,
                    port: def.port,
                    upstreams: def
                        .upstreams
                        .as_ref()
                        .map(|list| list.iter().map(|(u, _)| u.clone()).collect()),
                    instances: Vec::new(),
                    mtls: def.mtls,
                    health: def.health,
                    origin: def.origin.clone(),
                },
            );
        }
    }

    let mut addresses: BTreeMap<(&str, String, u16), Origin> = BTreeMap::new();
    for (file, decls) in &files {
        for (name, decl) in &decls.services {
            if decl.instances.is_empty() {
                continue;
            }
            let path = format!("services.{}", key(name));
            let Some(service) = catalog.services.get_mut(name) else {
                problems.push(problem(
                    file,
                    decl.pos,
                    &format!("{path}.instances"),
                    format!(
                        "service \"{name}\" is not defined in any file (no [services.{}] table with a port)",
                        key(name),
                    ),
                ));
                continue;
            };
            for (i, inst) in decl.instances.iter().enumerate() {
                let here = Origin {
                    file: file.to_path_buf(),
                    line: inst.pos.line,
                };
                let address = (
                    name.as_str(),
                    inst.instance.address.clone(),
                    inst.instance.port,
                );
                if let Some(first) = addresses.get(&address) {
                    problems.push(problem(
                        file,
                        inst.pos,
                        &format!("{path}.instances[{i}]"),
                        format!(
                            "{}:{} is already an instance of \"{name}\" at {first}",
                            inst.instance.address, inst.instance.port
                        ),
                    ));
                    continue;
                }
                addresses.insert(address, here);
                service.instances.push(inst.instance.clone());
            }
        }
    }

    // Policies before routes: routes refer to the policy's subsets.
    for (file, decls) in &files {
        for (name, decl) in &decls.policies {
            let path = format!("policies.{}", key(name));
            let duplicate = catalog.policies.get(name).map(|r| &r.origin);
            if !check_target(
                &mut problems,
                &catalog,
                Target {
                    file,
                    path: &path,
                    name,
                    pos: decl.pos,
                    kind: "policy",
                    duplicate,
                },
                &decl.http_only,
                "header/cookie hashing and request rate limits",
            ) {
                continue;
            }
            catalog.policies.insert(name.clone(), decl.policy.clone());
        }
    }

    for (file, decls) in &files {
        for (name, decl) in &decls.routes {
            let path = format!("routes.{}", key(name));
            let duplicate = catalog.routes.get(name).map(|r| &r.origin);
            if !check_target(
                &mut problems,
                &catalog,
                Target {
                    file,
                    path: &path,
                    name,
                    pos: decl.pos,
                    kind: "route",
                    duplicate,
                },
                &decl.http_only,
                "request matches and retries",
            ) {
                continue;
            }
            let declared: BTreeSet<&String> = catalog
                .policies
                .get(name)
                .map(|p| p.subsets.keys().collect())
                .unwrap_or_default();
            for m in &decl.mirrors {
                // A service no file declares may come from Consul: checked on the merged
                // catalog (`crate::references`), never a reason to refuse this file.
                let Some(target) = catalog.services.get(&m.service) else {
                    continue;
                };
                if !target.protocol.is_http() {
                    problems.push(problem(
                        file,
                        m.pos,
                        &format!("{}.service", m.field),
                        format!(
                            "\"{}\" is a tcp service; only HTTP requests are mirrored",
                            m.service
                        ),
                    ));
                }
                if let Some(subset) = &m.subset {
                    let known = catalog
                        .policies
                        .get(&m.service)
                        .is_some_and(|p| p.subsets.contains_key(subset));
                    if !known {
                        problems.push(problem(
                            file,
                            m.pos,
                            &format!("{}.subset", m.field),
                            format!(
                                "unknown subset \"{subset}\" of service \"{}\" (declare it in [policies.{}] subsets)",
                                m.service,
                                key(&m.service),
                            ),
                        ));
                    }
                }
            }
            for r in &decl.subset_refs {
                if declared.contains(&r.subset) {
                    continue;
                }
                let hint = if declared.is_empty() {
                    format!(
                        "no subsets declared; declare them in [policies.{}] subsets",
                        key(name)
                    )
                } else {
                    let names: Vec<&str> = declared.iter().map(|s| s.as_str()).collect();
                    format!("declared subsets: {}", names.join(", "))
                };
                problems.push(problem(
                    file,
                    r.pos,
                    &r.field,
                    format!(
                        "unknown subset \"{}\" of service \"{name}\" ({hint})",
                        r.subset
                    ),
                ));
            }
            catalog.routes.insert(name.clone(), decl.route.clone());
        }
    }

    for (file, decls) in &files {
        for (name, decl) in &decls.authorizations {
            let path = format!("authorization.{}", key(name));
            let duplicate = catalog.authorizations.get(name).map(|r| &r.origin);
            if !check_target(
                &mut problems,
                &catalog,
                Target {
                    file,
                    path: &path,
                    name,
                    pos: decl.pos,
                    kind: "authorization",
                    duplicate,
                },
                &decl.http_only,
                "methods and paths",
            ) {
                continue;
            }
            catalog
                .authorizations
                .insert(name.clone(), decl.authorization.clone());
        }
    }

    // Gateways: known HTTP services, one gateway per listen address.
    let mut listens: Vec<(std::net::SocketAddr, String, Origin)> = Vec::new();
    for (file, decls) in &files {
        for (name, decl) in &decls.gateways {
            let path = format!("gateways.{}", key(name));
            if let Some(existing) = catalog.gateways.get(name) {
                problems.push(problem(
                    file,
                    decl.pos,
                    &path,
                    format!(
                        "gateway \"{name}\" is already declared at {}",
                        existing.origin
                    ),
                ));
                continue;
            }
            for (field, service, pos) in &decl.service_refs {
                match catalog.services.get(service) {
                    // Perhaps a Consul service: see `crate::references`.
                    None => {}
                    Some(s) if !s.protocol.is_http() => problems.push(problem(
                        file,
                        *pos,
                        field,
                        format!("\"{service}\" is a tcp service; a gateway routes HTTP"),
                    )),
                    Some(_) => {}
                }
            }
            let listen = decl.gateway.listen;
            let clash = listens.iter().find(|(addr, node, _)| {
                *node == decl.gateway.node
                    && addr.port() == listen.port()
                    && (addr.ip() == listen.ip()
                        || addr.ip().is_unspecified()
                        || listen.ip().is_unspecified())
            });
            if let Some((addr, _, origin)) = clash {
                problems.push(problem(
                    file,
                    decl.listen_pos,
                    &format!("{path}.listen"),
                    format!(
                        "{listen} overlaps {addr} of the gateway at {origin} on node \"{}\"",
                        decl.gateway.node
                    ),
                ));
            }
            listens.push((
                listen,
                decl.gateway.node.clone(),
                decl.gateway.origin.clone(),
            ));
            catalog.gateways.insert(name.clone(), decl.gateway.clone());
        }
    }

    problems.sort_by(|a, b| {
        (&a.file, a.line, a.column, &a.message).cmp(&(&b.file, b.line, b.column, &b.message))
    });
    problems.dedup();
    (catalog, problems)
}

/// Where a route, policy or authorization points: the file and table that declare it.
struct Target<'a> {
    file: &'a Path,
    path: &'a str,
    name: &'a str,
    pos: Pos,
    /// "route", "policy" or "authorization".
    kind: &'static str,
    /// Where another file already declared this table, if one did.
    duplicate: Option<&'a Origin>,
}

/// A rule table is declared by one file only, must name a known service, and its HTTP-only
/// fields need an HTTP service. Returns false when the table must be left out (a duplicate).
fn check_target(
    problems: &mut Vec<Problem>,
    catalog: &Catalog,
    target: Target<'_>,
    http_only: &[(String, Pos)],
    what: &str,
) -> bool {
    let Target {
        file,
        path,
        name,
        pos,
        kind,
        duplicate,
    } = target;
    if let Some(existing) = duplicate {
        problems.push(problem(
            file,
            pos,
            path,
            format!(
                "the {kind} for \"{name}\" is already declared at {existing}; one file declares a service's {kind}",
            ),
        ));
        return false;
    }
    match catalog.services.get(name) {
        // Perhaps a Consul service: see `crate::references`.
        None => {}
        Some(service) if service.protocol == Protocol::Tcp => {
            for (field, pos) in http_only {
                problems.push(problem(
                    file,
                    *pos,
                    field,
                    format!("\"{name}\" is a tcp service; only HTTP services have {what}"),
                ));
            }
        }
        Some(_) => {}
    }
    true
}

fn problem(file: &Path, pos: Pos, key_path: &str, message: String) -> Problem {
    Problem::new(file, pos.line, pos.column, key_path, message)
}
