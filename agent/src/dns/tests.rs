//! The server on a free port of 127.0.0.1, asked by hickory's client over UDP and TCP, with a
//! small hickory-server on another port as its upstream (`example.test.`).

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{DnsResponse, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::server::Server;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::forward::FORWARD_DEADLINE;
use super::*;

/// Longer than the server's own deadline, so a slow answer shows as SERVFAIL, not as a timeout
/// of the test's client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

const REVIEWS: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 7);
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// More `A` records for `big.example.test.` than fit in a 1232-byte UDP answer.
const BIG: u8 = 120;

#[derive(Debug, Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}
use Transport::{Tcp, Udp};

/// A UDP socket and a TCP listener on one free port of 127.0.0.1.
async fn sockets() -> (UdpSocket, TcpListener) {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            return (udp, tcp);
        }
    }
}

/// An authoritative server for `example.test.`: `example.test. A 192.0.2.10`, and `BIG` A
/// records at `big.example.test.`.
async fn upstream() -> (SocketAddr, Server<Catalog>) {
    let origin = Name::from_ascii("example.test.").unwrap();
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let soa = SOA::new(
        Name::from_ascii("ns.example.test.").unwrap(),
        Name::from_ascii("hostmaster.example.test.").unwrap(),
        1,
        3600,
        600,
        86400,
        60,
    );
    zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1);
    zone.upsert_mut(
        Record::from_rdata(origin.clone(), 60, RData::A(A(UPSTREAM_ANSWER))),
        1,
    );
    let big = Name::from_ascii("big.example.test.").unwrap();
    for i in 0..BIG {
        let ip = Ipv4Addr::new(198, 51, 100, i);
        zone.upsert_mut(Record::from_rdata(big.clone(), 60, RData::A(A(ip))), 1);
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
    let (udp, tcp) = sockets().await;
    let addr = udp.local_addr().unwrap();
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(10), 32);
    (addr, server)
}

struct Mesh {
    addr: SocketAddr,
    names: watch::Sender<Arc<Names>>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), DnsError>>,
}

impl Mesh {
    async fn start(bare_names: bool, upstreams: Vec<SocketAddr>) -> Mesh {
        let config = DnsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            domain: "mesh".into(),
            bare_names,
            upstreams,
        };
        let (names, rx) = watch::channel(Arc::new(Names::from([("reviews".to_string(), REVIEWS)])));
        let bound = bind(&config).await.unwrap();
        let addr = bound.local_addr();
        assert_ne!(addr.port(), 0);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(bound.serve(rx, shutdown.clone()));
        Mesh {
            addr,
            names,
            shutdown,
            task,
        }
    }

    async fn ask(&self, transport: Transport, name: &str, qtype: RecordType) -> DnsResponse {
        ask(self.addr, transport, name, qtype).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        stopped.unwrap().unwrap().unwrap();
    }
}

async fn ask(
    server: SocketAddr,
    transport: Transport,
    name: &str,
    qtype: RecordType,
) -> DnsResponse {
    let provider = TokioRuntimeProvider::default();
    let mut client = match transport {
        Udp => {
            let stream = UdpClientStream::builder(server, provider)
                .with_timeout(Some(CLIENT_TIMEOUT))
                .build();
            let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
            tokio::spawn(background);
            client
        }
        Tcp => {
            let (connect, handle) =
                TcpClientStream::new(server, None, Some(CLIENT_TIMEOUT), provider);
            let (client, background) = Client::<TokioRuntimeProvider>::with_timeout(
                connect.await.unwrap(),
                handle,
                CLIENT_TIMEOUT,
            );
            tokio::spawn(background);
            client
        }
    };
    client
        .query(Name::from_ascii(name).unwrap(), DNSClass::IN, qtype)
        .await
        .unwrap_or_else(|e| panic!("{name} {qtype} over {transport:?}: {e}"))
}

fn addresses(response: &DnsResponse) -> Vec<Ipv4Addr> {
    response
        .answers
        .iter()
        .filter_map(|r| match r.data {
            RData::A(A(ip)) => Some(ip),
            _ => None,
        })
        .collect()
}

fn has_soa(response: &DnsResponse, zone: &str) -> bool {
    response
        .authorities
        .iter()
        .any(|r| matches!(r.data, RData::SOA(_)) && r.name.to_string() == zone)
}

#[tokio::test]
async fn mesh_names_are_answered_over_udp_and_tcp() {
    let (upstream, _server) = upstream().await;
    let mesh = Mesh::start(false, vec![upstream]).await;
    for t in [Udp, Tcp] {
        let r = mesh.ask(t, "reviews.mesh.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::NoError, "{t:?}");
        assert_eq!(addresses(&r), [REVIEWS], "{t:?}");
        assert_eq!(r.answers[0].ttl, super::TTL, "{t:?}");
        assert!(r.metadata.authoritative, "{t:?}");

        let r = mesh.ask(t, "REVIEWS.Mesh.", RecordType::A).await;
        assert_eq!(addresses(&r), [REVIEWS], "case-insensitive over {t:?}");

        // NODATA: the name exists, it has no IPv6 address.
        let r = mesh.ask(t, "reviews.mesh.", RecordType::AAAA).await;
        assert_eq!(r.response_code, ResponseCode::NoError, "{t:?}");
        assert!(r.answers.is_empty(), "{t:?}: {r:?}");
        assert!(has_soa(&r, "mesh."), "{t:?}: {r:?}");

        let r = mesh.ask(t, "unknown.mesh.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain, "{t:?}");
        assert!(r.metadata.authoritative, "{t:?}");
        assert!(has_soa(&r, "mesh."), "{t:?}: {r:?}");

        // Without bare names, `reviews.` goes upstream, which serves no such zone.
        let r = mesh.ask(t, "reviews.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::Refused, "{t:?}");
        assert!(addresses(&r).is_empty(), "{t:?}");
    }
    mesh.stop().await;
}

#[tokio::test]
async fn bare_names_only_when_enabled() {
    let (upstream, _server) = upstream().await;
    let mesh = Mesh::start(true, vec![upstream]).await;
    for t in [Udp, Tcp] {
        let r = mesh.ask(t, "reviews.", RecordType::A).await;
        assert_eq!(addresses(&r), [REVIEWS], "{t:?}");
        let r = mesh.ask(t, "reviews.", RecordType::AAAA).await;
        assert_eq!(r.response_code, ResponseCode::NoError, "{t:?}");
        assert!(r.answers.is_empty(), "{t:?}");
        // Not a service: still the upstream's answer.
        let r = mesh.ask(t, "example.test.", RecordType::A).await;
        assert_eq!(addresses(&r), [UPSTREAM_ANSWER], "{t:?}");
    }
    mesh.stop().await;
}

#[tokio::test]
async fn a_table_change_applies_to_the_next_query() {
    let mesh = Mesh::start(false, Vec::new()).await;
    assert_eq!(
        addresses(&mesh.ask(Udp, "reviews.mesh.", RecordType::A).await),
        [REVIEWS]
    );
    let ratings = Ipv4Addr::new(240, 240, 0, 8);
    mesh.names.send_replace(Arc::new(Names::from([
        ("ratings".to_string(), ratings),
        ("reviews".to_string(), Ipv4Addr::new(240, 240, 0, 9)),
    ])));
    assert_eq!(
        addresses(&mesh.ask(Udp, "ratings.mesh.", RecordType::A).await),
        [ratings]
    );
    assert_eq!(
        addresses(&mesh.ask(Tcp, "reviews.mesh.", RecordType::A).await),
        [Ipv4Addr::new(240, 240, 0, 9)]
    );
    mesh.names.send_replace(Arc::new(Names::new()));
    let r = mesh.ask(Udp, "reviews.mesh.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    mesh.stop().await;
}

#[tokio::test]
async fn other_names_get_the_upstreams_answer() {
    let (upstream, _server) = upstream().await;
    let mesh = Mesh::start(false, vec![upstream]).await;
    for t in [Udp, Tcp] {
        let r = mesh.ask(t, "example.test.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::NoError, "{t:?}");
        assert_eq!(addresses(&r), [UPSTREAM_ANSWER], "{t:?}");
        assert!(r.metadata.recursion_available, "{t:?}");

        let r = mesh.ask(t, "missing.example.test.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain, "{t:?}");
        assert!(has_soa(&r, "example.test."), "{t:?}: {r:?}");
    }
    // Too big for UDP: the server asks the upstream again over TCP, and a TCP client gets
    // every record (a UDP one gets a truncated answer and asks again over TCP itself).
    let r = mesh.ask(Tcp, "big.example.test.", RecordType::A).await;
    assert_eq!(addresses(&r).len(), usize::from(BIG), "{r:?}");
    let r = mesh.ask(Udp, "big.example.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    mesh.stop().await;
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_none_left_is_servfail_in_bounded_time() {
    let (upstream, _server) = upstream().await;
    // Ports nobody listens on: UDP gets no answer at all.
    let (dead_udp, dead_tcp) = sockets().await;
    let dead = dead_udp.local_addr().unwrap();
    drop((dead_udp, dead_tcp));

    let mesh = Mesh::start(false, vec![dead, upstream]).await;
    let r = mesh.ask(Udp, "example.test.", RecordType::A).await;
    assert_eq!(addresses(&r), [UPSTREAM_ANSWER]);
    mesh.stop().await;

    let mesh = Mesh::start(false, vec![dead]).await;
    for t in [Udp, Tcp] {
        let started = Instant::now();
        let r = mesh.ask(t, "example.test.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::ServFail, "{t:?}");
        let took = started.elapsed();
        assert!(took < FORWARD_DEADLINE, "{t:?}: {took:?}");
        // Mesh names do not depend on the upstream.
        let r = mesh.ask(t, "reviews.mesh.", RecordType::A).await;
        assert_eq!(addresses(&r), [REVIEWS], "{t:?}");
    }
    mesh.stop().await;
}

#[tokio::test]
async fn no_upstream_means_servfail_for_other_names() {
    let mesh = Mesh::start(false, Vec::new()).await;
    for t in [Udp, Tcp] {
        let r = mesh.ask(t, "example.test.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::ServFail, "{t:?}");
        assert!(!r.metadata.recursion_available, "{t:?}");
        let r = mesh.ask(t, "reviews.mesh.", RecordType::A).await;
        assert_eq!(addresses(&r), [REVIEWS], "{t:?}");
    }
    mesh.stop().await;
}

#[tokio::test]
async fn bind_names_the_address_it_could_not_take() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let config = DnsConfig {
        listen: addr,
        domain: "mesh".into(),
        bare_names: false,
        upstreams: Vec::new(),
    };
    let err = bind(&config).await.unwrap_err().to_string();
    assert!(err.contains(&format!("TCP {addr}")), "{err}");

    let config = DnsConfig {
        domain: "bad..domain".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    let err = bind(&config).await.unwrap_err().to_string();
    assert!(err.contains("\"bad..domain\""), "{err}");
}
