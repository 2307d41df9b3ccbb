//! Several discovery replicas with the same inputs (issue 12, items 3 and 4): hosts spread over
//! them, a host whose replica dies is on another one within 2 s under continuous traffic with
//! no failed request and no resource sent again, and two replicas answer the same node with
//! byte-identical resources and versions.
//! Run: `cargo build --workspace --bins && cargo test -p pilotfish-tests --test replicas`.
//!
//! The replicas share their state over `[store.consul]` (the Consul double's KV store), which
//! also tells each replica which hosts are connected to the others: every replica sees every
//! host live, whichever replica it is connected to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use pilotfish_consul_double::{ConsulDouble, DoubleHandle};
use pilotfish_tests::leaving::{flowing, stop_under_load};
use pilotfish_tests::load::Load;
use pilotfish_tests::mesh::{Mesh, MeshOptions};
use pilotfish_tests::{blocking, http_get, wait_for};
use prost::Message;
use serde_json::Value as Json;

const READY: Duration = Duration::from_secs(30);
const PLAIN: &[(&str, &str)] = &[];
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The types whose per-stream counters `/status` shows.
const TYPES: [&str; 4] = ["cds", "eds", "lds", "rds"];

/// A mesh of `replicas` discovery replicas sharing their state through `consul`'s KV store.
fn replicated(xds: &'static str, replicas: usize, consul: &DoubleHandle) -> MeshOptions {
    MeshOptions {
        xds,
        replicas,
        discovery_extra: format!("[store.consul]\naddress = \"{}\"\n", consul.url()),
        ..MeshOptions::default()
    }
}

async fn consul() -> Result<DoubleHandle> {
    Ok(ConsulDouble::start(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0))).await?)
}

/// Each node's liveness state as replica `i`'s `/status` shows it.
async fn node_states(mesh: &Mesh, i: usize) -> Result<BTreeMap<String, String>> {
    let http = mesh.replica_http(i);
    let status = blocking(move || http_get(http, "discovery", "/status")).await?;
    let json: Json = serde_json::from_str(&status.body)?;
    Ok(json["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or_default().to_string(),
                n["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Every replica in `replicas` sees each of `nodes` live, wherever it is connected.
async fn all_live(mesh: &Mesh, replicas: &[usize], nodes: &[&str]) -> Result<()> {
    for i in replicas {
        wait_for(
            &format!("replica {i} sees {nodes:?} live"),
            READY,
            || async {
                let states = node_states(mesh, *i).await?;
                Ok(nodes
                    .iter()
                    .all(|n| states.get(*n).is_some_and(|s| s == "live"))
                    .then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// A stream's entry in `/status` has accepted what it was sent of clusters and listeners.
fn synced(stream: &Json) -> bool {
    ["cds", "lds"].iter().all(|t| {
        let ty = &stream["types"][*t];
        !ty["acked_version"].is_null() && ty["acked_version"] == ty["sent_version"]
    })
}

/// The replica holding `node`'s one open, synced stream, and that stream's `/status` entry.
async fn synced_replica(mesh: &Mesh, node: &str) -> Result<Option<(usize, Json)>> {
    let streams = mesh.replicas_of(node).await;
    Ok(match streams.as_slice() {
        [(i, stream)] if synced(stream) => Some((*i, stream.clone())),
        _ => None,
    })
}

/// Resources and bytes the stream's `/status` entry says were sent, summed over types.
fn sent(stream: &Json) -> (u64, u64) {
    TYPES.iter().fold((0, 0), |(r, b), t| {
        let ty = &stream["types"][*t];
        (
            r + ty["resources_sent"].as_u64().unwrap_or(0),
            b + ty["bytes_sent"].as_u64().unwrap_or(0),
        )
    })
}

/// `pilotfish_xds_resources_sent_total` and `pilotfish_xds_sent_bytes_total`, summed over
/// types, on the replica at `http`.
async fn sent_totals(http: SocketAddr) -> Result<(u64, u64)> {
    let text = blocking(move || pilotfish_tests::admin_get(http, "/metrics")).await?;
    let sum = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    Ok((
        sum("pilotfish_xds_resources_sent_total{"),
        sum("pilotfish_xds_sent_bytes_total{"),
    ))
}

/// Three replicas, three hosts; the replica the caller is on is killed (SIGKILL) under
/// continuous load through the caller.
async fn a_killed_replica(xds: &'static str) -> Result<()> {
    let consul = consul().await?;
    let mut mesh = Mesh::start_opts(replicated(xds, 3, &consul))?;
    for (node, i) in [("vm-a", 2), ("vm-b", 3), ("vm-c", 4)] {
        mesh.add_host(node, i)?;
    }
    let (b_ip, c_ip) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let on_b = mesh.start_app("ratings", "v1", b_ip, &[])?;
    let on_c = mesh.start_app("ratings", "v1", c_ip, &[])?;
    let services = mesh.service_toml("ratings", "", &[("vm-b", on_b, ""), ("vm-c", on_c, "")]);
    mesh.write_registry("services.toml", &services)?;
    mesh.wait_all_ready(READY).await?;
    let out = mesh.host("vm-a").outbound;
    wait_for("vm-a reaches ratings", READY, || async move {
        let answer = blocking(move || http_get(out, "ratings", "/")).await;
        Ok(answer.is_ok_and(|r| r.status == 200).then_some(()))
    })
    .await?;
    // Every host settled on one replica: nothing is still being sent anywhere.
    let mut placed = BTreeMap::new();
    for node in ["vm-a", "vm-b", "vm-c"] {
        let (i, _) = wait_for(&format!("{node} synced on one replica"), READY, || {
            synced_replica(&mesh, node)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
        placed.insert(node, i);
    }
    println!("{xds}: hosts on replicas {placed:?}");
    // Each replica counts the hosts connected to the others as live (not merely within their
    // grace, after which their instances would be marked unhealthy).
    all_live(&mesh, &[0, 1, 2], &["vm-a", "vm-b", "vm-c"]).await?;
    let victim = placed["vm-a"];
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let mut before = Vec::new();
    for i in &survivors {
        before.push(sent_totals(mesh.replica_http(*i)).await?);
    }

    let load = Load::start(out, "ratings", &[PLAIN, PLAIN]);
    flowing(&load, 200).await?;
    let killed_at = Instant::now();
    mesh.replica_process(victim).kill();
    let (now_on, _) = wait_for("vm-a on another replica", READY, || async {
        Ok(mesh
            .replicas_of("vm-a")
            .await
            .into_iter()
            .find(|(i, _)| *i != victim))
    })
    .await?;
    let failover = killed_at.elapsed();
    println!("{xds}: vm-a moved from replica {victim} to {now_on} in {failover:?}");
    ensure!(
        failover < Duration::from_secs(2),
        "vm-a took {failover:?} to reach another replica"
    );
    // The new stream settles (SotW: versions found current; Delta: empty answers ACKed).
    let (_, stream) = wait_for("vm-a synced on its new replica", READY, || {
        synced_replica(&mesh, "vm-a")
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
    flowing(&load, 200).await?;
    let tally = load.stop().await;
    ensure!(
        tally.failed == 0,
        "{} of {} requests failed: {:?}",
        tally.failed,
        tally.total(),
        tally.failures
    );

    let (resources, bytes) = sent(&stream);
    println!("{xds}: vm-a's new stream: {resources} resources, {bytes} bytes sent");
    ensure!(
        resources == 0,
        "resources sent again on reconnect: {}",
        stream["types"]
    );
    for (i, (r0, b0)) in survivors.iter().zip(before) {
        let (r1, b1) = sent_totals(mesh.replica_http(*i)).await?;
        println!(
            "{xds}: replica {i} sent {} resources, {} bytes during the failover",
            r1 - r0,
            b1 - b0
        );
        ensure!(r1 == r0, "replica {i} sent {} resources", r1 - r0);
    }
    println!("{xds}: {} requests, 0 failed", tally.total());
    all_live(&mesh, &survivors, &["vm-a", "vm-b", "vm-c"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_moves_its_hosts_in_2s_without_failures_or_resending_delta() -> Result<()>
{
    a_killed_replica("delta").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_moves_its_hosts_in_2s_without_failures_or_resending_sotw() -> Result<()> {
    a_killed_replica("sotw").await
}

/// The node a proxy of host `ip` announces (what the agent's bootstrap puts in).
fn node(id: &str, ip: &str) -> Node {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    Node {
        id: id.into(),
        cluster: id.into(),
        metadata: Some(Struct {
            fields: [
                (
                    "pilotfish.outbound".to_string(),
                    string(&format!("{ip}:15001")),
                ),
                ("pilotfish.address".to_string(), string(ip)),
                ("pilotfish.app_address".to_string(), string(ip)),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// What `grpc` answers a fresh SotW stream of `node` for each type: (version, resources).
async fn answers(
    grpc: SocketAddr,
    node: &Node,
) -> Result<BTreeMap<String, (String, Vec<Vec<u8>>)>> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{grpc}")).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let ask = |type_url: &str, names: Vec<String>, first: bool| DiscoveryRequest {
        node: first.then(|| node.clone()),
        type_url: type_url.into(),
        resource_names: names,
        ..Default::default()
    };
    let mut next = async || -> Result<DiscoveryResponse> {
        tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .context("no answer in time")??
            .context("stream ended")
    };
    let mut out = BTreeMap::new();
    tx.send(ask(CLUSTER, vec![], true))?;
    let cds = next().await?;
    let names: Vec<String> = cds
        .resources
        .iter()
        .map(|a| Cluster::decode(a.value.as_slice()).map(|c| c.name))
        .collect::<Result<_, _>>()?;
    let mut keep = |r: DiscoveryResponse| {
        out.insert(
            r.type_url.clone(),
            (
                r.version_info,
                r.resources.into_iter().map(|a| a.value).collect(),
            ),
        );
    };
    keep(cds);
    tx.send(ask(ENDPOINT, names, false))?;
    keep(next().await?);
    tx.send(ask(LISTENER, vec![], false))?;
    keep(next().await?);
    Ok(out)
}

/// Two replicas reading the same registry answer the same node with the same bytes and the
/// same versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_the_same_inputs_serve_identical_resources_and_versions() -> Result<()> {
    let consul = consul().await?;
    let mut mesh = Mesh::start_opts(replicated("sotw", 2, &consul))?;
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-b", 3)?;
    let b_ip = mesh.host("vm-b").ip;
    let port = mesh.start_app("ratings", "v1", b_ip, &[])?;
    let services = mesh.service_toml("ratings", "", &[("vm-b", port, "")]);
    mesh.write_registry("services.toml", &services)?;
    mesh.wait_all_ready(READY).await?;

    let ip = mesh.host("vm-a").ip.to_string();
    let probe = node("vm-probe", &ip);
    let (first, second) = (mesh.replica_grpc(0), mesh.replica_grpc(1));
    // Both replicas have read the registry once the probe sees the ratings cluster in both.
    let (a, b) = wait_for("both replicas serve ratings", READY, || {
        let probe = probe.clone();
        async move {
            let a = answers(first, &probe).await?;
            let b = answers(second, &probe).await?;
            let has = |m: &BTreeMap<String, (String, Vec<Vec<u8>>)>| {
                m.get(ENDPOINT).is_some_and(|(_, r)| !r.is_empty())
            };
            Ok((has(&a) && has(&b)).then_some((a, b)))
        }
    })
    .await?;
    for (type_url, (version, resources)) in &a {
        let (other_version, other) = &b[type_url];
        ensure!(
            version == other_version,
            "{type_url}: {version} vs {other_version}"
        );
        ensure!(
            resources == other,
            "{type_url}: resources differ between replicas"
        );
        println!(
            "{type_url}: version {version}, {} resources, {} bytes, identical",
            resources.len(),
            resources.iter().map(Vec::len).sum::<usize>()
        );
    }
    Ok(())
}

/// A host leaving through one replica (`systemctl stop`: `Host.Leave`) is drained at callers
/// connected to another: its instances turn `DRAINING` there too, the leave waits for that
/// replica's proxies, and no request fails or reaches the host after it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_leaving_through_one_replica_is_drained_at_callers_of_another() -> Result<()> {
    let consul = consul().await?;
    let mut mesh = Mesh::start_opts(replicated("delta", 2, &consul))?;
    // vm-b and vm-c (the callees) know only replica 0, vm-a (the caller) only replica 1.
    let replicas = std::mem::take(&mut mesh.replicas);
    mesh.add_host("vm-b", 3)?;
    mesh.add_host("vm-c", 4)?;
    let first = mesh.grpc;
    mesh.grpc = replicas[0].grpc;
    mesh.add_host("vm-a", 2)?;
    mesh.grpc = first;
    mesh.replicas = replicas;
    let (b_ip, c_ip) = (mesh.host("vm-b").ip, mesh.host("vm-c").ip);
    let v1 = mesh.start_app("reviews", "v1", b_ip, &[])?;
    let v2 = mesh.start_app("reviews", "v2", c_ip, &[])?;
    let services = mesh.service_toml("reviews", "", &[("vm-b", v1, ""), ("vm-c", v2, "")]);
    mesh.write_registry("services.toml", &services)?;
    mesh.wait_all_ready(READY).await?;
    ensure!(
        mesh.replicas_of("vm-a").await.iter().all(|(i, _)| *i == 1)
            && mesh.replicas_of("vm-b").await.iter().all(|(i, _)| *i == 0),
        "the caller and the callee use different replicas"
    );
    all_live(&mesh, &[0, 1], &["vm-a", "vm-b", "vm-c"]).await?;
    let (tally, _) = stop_under_load(&mut mesh, "vm-a", "vm-b", "reviews", "v1").await?;
    println!(
        "leave across replicas: {} requests, 0 failed",
        tally.total()
    );
    Ok(())
}

/// Streams closed at their (jittered) maximum age, over and over, under continuous load: each
/// host reconnects while its Envoy keeps serving what it has, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_closed_for_their_age_under_load_drop_no_request() -> Result<()> {
    let consul = consul().await?;
    let mut opts = replicated("delta", 2, &consul);
    opts.discovery_top = "max_stream_age = \"1s\"".into();
    let mut mesh = Mesh::start_opts(opts)?;
    mesh.add_host("vm-a", 2)?;
    mesh.add_host("vm-b", 3)?;
    let b_ip = mesh.host("vm-b").ip;
    let port = mesh.start_app("ratings", "v1", b_ip, &[])?;
    let services = mesh.service_toml("ratings", "", &[("vm-b", port, "")]);
    mesh.write_registry("services.toml", &services)?;
    mesh.wait_all_ready(READY).await?;
    let out = mesh.host("vm-a").outbound;
    wait_for("vm-a reaches ratings", READY, || async move {
        let answer = blocking(move || http_get(out, "ratings", "/")).await;
        Ok(answer.is_ok_and(|r| r.status == 200).then_some(()))
    })
    .await?;

    let aged = |mesh: &Mesh| {
        let https: Vec<SocketAddr> = (0..2).map(|i| mesh.replica_http(i)).collect();
        async move {
            let mut total = 0u64;
            for http in https {
                let text = blocking(move || http_get(http, "discovery", "/metrics")).await?;
                total += text
                    .body
                    .lines()
                    .find(|l| l.starts_with("pilotfish_xds_streams_aged_out_total "))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0) as u64;
            }
            anyhow::Ok(total)
        }
    };
    let load = Load::start(out, "ratings", &[PLAIN, PLAIN]);
    let from = aged(&mesh).await?;
    // Both hosts' streams, several times over.
    let closed = wait_for("eight streams closed for their age", READY, || async {
        let now = aged(&mesh).await?;
        Ok((now >= from + 8).then_some(now - from))
    })
    .await?;
    flowing(&load, 200).await?;
    let tally = load.stop().await;
    ensure!(
        tally.failed == 0,
        "{} of {} requests failed: {:?}",
        tally.failed,
        tally.total(),
        tally.failures
    );
    println!(
        "{closed} streams aged out under load: {} requests, 0 failed",
        tally.total()
    );
    all_live(&mesh, &[0, 1], &["vm-a", "vm-b"]).await?;
    Ok(())
}
