//! A host leaving the mesh under load: what the drain tests share.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::load::{Load, Tally};
use crate::mesh::Mesh;
use crate::{blocking, http_get, wait_for};

const READY: Duration = Duration::from_secs(30);

/// Waits until the load has answered `more` requests beyond what it had.
pub async fn flowing(load: &Load, more: u64) -> Result<()> {
    let from = load.total();
    wait_for("the load keeps flowing", READY, || async {
        Ok((load.total() >= from + more).then_some(()))
    })
    .await
}

/// Requests of `tally` served by an app whose `x-served-by` contains `tag`.
fn served_by(tally: &std::collections::BTreeMap<String, u64>, tag: &str) -> u64 {
    tally
        .iter()
        .filter(|(who, _)| who.contains(tag))
        .map(|(_, n)| *n)
        .sum()
}

/// Stops `node`'s agent (SIGTERM, as `systemctl stop` does) while `caller` sends `service`
/// requests, which `node` (its app answering as `tag`) and one other host serve. Checks
/// that the agent had discovery drain it and waited for every caller (`pending=0`), that
/// its Envoy stopped, that no request failed and that none reached `node` after it stopped.
/// The load's tally and the agent's "drained" log line.
pub async fn stop_under_load(
    mesh: &mut Mesh,
    caller: &str,
    node: &str,
    service: &'static str,
    tag: &str,
) -> Result<(Tally, String)> {
    let out = mesh.host(caller).outbound;
    wait_for(
        &format!("{caller} reaches both {service} hosts"),
        READY,
        || async {
            let mut seen = BTreeSet::new();
            for _ in 0..20 {
                if let Ok(r) = blocking(move || http_get(out, service, "/")).await {
                    seen.extend(r.header("x-served-by").map(str::to_string));
                }
            }
            Ok((seen.len() == 2).then_some(()))
        },
    )
    .await?;

    const PLAIN: &[(&str, &str)] = &[];
    let load = Load::start(out, service, &[PLAIN, PLAIN, PLAIN, PLAIN]);
    flowing(&load, 300).await?;
    ensure!(
        served_by(&load.served_by(), tag) > 0,
        "{node} serves before it stops"
    );
    let status = mesh.host_mut(node).agent.terminate(Duration::from_secs(20));
    ensure!(
        status.is_some_and(|s| s.success()),
        "{node}'s agent stops cleanly: {status:?}"
    );
    let before = served_by(&load.served_by(), tag);
    flowing(&load, 1000).await?;
    let tally = load.stop().await;
    let log = mesh.host(node).agent.log_text();
    let drained = log
        .lines()
        .find(|l| l.contains("discovery drained this host"))
        .unwrap_or_default()
        .to_string();
    eprintln!("{drained}");
    ensure!(
        drained.contains("pending=0"),
        "the agent told discovery and waited for its callers:\n{}",
        mesh.logs()
    );
    ensure!(
        tally.failed == 0,
        "{} of {} requests failed: {:?}\n{}",
        tally.failed,
        tally.total(),
        tally.failures,
        mesh.logs()
    );
    let after = served_by(&tally.served_by, tag);
    ensure!(
        after == before,
        "no request reached {node} after it stopped ({before} before, {after} in all)"
    );
    ensure!(
        mesh.host(node).envoy_pids().is_empty(),
        "{node}'s Envoy stopped"
    );
    Ok((tally, drained))
}
