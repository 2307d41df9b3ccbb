//! The mesh DNS server: local apps resolve `<service>.mesh` to the service's virtual IP (VIP),
//! and every other name through the host's usual resolvers.
//!
//! Discovery gives each mesh service a VIP (`240.240.0.7`); the agent learns the table
//! service name -> VIP ([`Names`]) on a `watch` channel and hands it to [`Bound::serve`], which
//! reads it afresh for every question, so a change applies to the next query. The server
//! listens on UDP and TCP at one address ([`DnsConfig::listen`], `127.0.0.153:53` by default)
//! and answers each question in one of three ways (`answer.rs` decides, without I/O):
//!
//! - `A <service>.<domain>.` (any letter case; `<service>.` as well with `bare_names`): the VIP,
//!   TTL 30 s, authoritative. Any other type for a known name (`AAAA` above all): NOERROR with no
//!   answer (NODATA), so a resolver takes the `A` and does not go looking elsewhere.
//! - Any other name under the domain: NXDOMAIN, never forwarded. Negative answers under the
//!   domain carry the zone's SOA, whose 5 s minimum bounds how long a resolver remembers that a
//!   service did not exist.
//! - Everything else (`forward.rs`): asked of the upstream resolvers in order, and their answer
//!   returned as it came, NXDOMAIN included. The upstreams default to the `nameserver` lines of
//!   `/etc/resolv.conf` (read once, when the config is loaded), less this server's own address,
//!   so a host that already points at the mesh DNS does not forward to itself; in place of
//!   systemd-resolved's stub, the servers resolved itself asks (it may be asking us). With no
//!   upstream, or none answering within 4 s, the client gets SERVFAIL (not REFUSED: the name
//!   may well exist, this server just cannot find out).
//!
//! [`bind`] takes both sockets up front, so a taken port or a missing `CAP_NET_BIND_SERVICE`
//! fails the agent at start with the address in the message; [`Bound::serve`] then runs
//! hickory-server's loops until `shutdown`.

mod answer;
mod forward;
pub mod handover;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_net::runtime::Time;
use hickory_net::NetError;
use hickory_proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Message, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use answer::{Answer, Zone};
use forward::Forwarder;
pub use forward::{
    is_own_address, system_upstreams, upstreams_from_resolv_conf, RESOLVED_RESOLV_CONF, RESOLV_CONF,
};

/// Service name -> VIP, as discovery allocates them (the table [`crate::intercept`] learns).
pub use crate::intercept::Names;

/// The TTL of every mesh address, in seconds. VIPs are stable (a function of the service
/// names), so resolvers that cache (systemd-resolved, nscd) may keep them a while, and keep
/// answering while the agent restarts.
pub const TTL: u32 = 30;
/// The SOA minimum, how long a missing name is remembered, in seconds: short, so a new
/// service resolves within seconds even where a client asked for it too early.
pub const NEGATIVE_TTL: u32 = 5;

/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// When `listen` has port 0, binding UDP picks a port that TCP may find taken: try again.
const EPHEMERAL_BIND_ATTEMPTS: usize = 8;

/// `[dns]` in agent.toml, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP, the same address. Default `127.0.0.153:53`.
    pub listen: SocketAddr,
    /// The mesh domain without a trailing dot, lowercase. Default `mesh`.
    pub domain: String,
    /// Also answer `<service>.` (names that are not in the table are forwarded). Default off:
    /// a service named like a top-level domain would shadow it.
    pub bare_names: bool,
    /// Asked in order for everything that is not a mesh name. Empty: such questions get
    /// SERVFAIL. Default: `/etc/resolv.conf`'s name servers less this server.
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("mesh DNS: cannot listen on {transport} {addr}: {source}{}", bind_hint(*addr, source))]
    Bind {
        addr: SocketAddr,
        transport: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("mesh DNS: domain \"{domain}\" is not a DNS name: {message}")]
    Domain { domain: String, message: String },
    #[error("mesh DNS on {addr} stopped: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: NetError,
    },
}

fn bind_hint(addr: SocketAddr, source: &io::Error) -> &'static str {
    match source.kind() {
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
        }
        io::ErrorKind::AddrInUse => " (another DNS server, e.g. systemd-resolved or dnsmasq?)",
        _ => "",
    }
}

/// Binds UDP and TCP on `config.listen` (with port 0: one free port for both).
pub async fn bind(config: &DnsConfig) -> Result<Bound, DnsError> {
    let zone = Zone::new(&config.domain, config.bare_names).map_err(|e| DnsError::Domain {
        domain: config.domain.clone(),
        message: e.to_string(),
    })?;
    if let Some((udp, tcp)) = handover::claim(config.listen) {
        return bound(config, zone, udp, tcp);
    }
    let attempts = if config.listen.port() == 0 {
        EPHEMERAL_BIND_ATTEMPTS
    } else {
        1
    };
    let mut attempt = 0;
    let (udp, tcp) = loop {
        attempt += 1;
        let udp = UdpSocket::bind(config.listen)
            .await
            .map_err(|source| DnsError::Bind {
                addr: config.listen,
                transport: "UDP",
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: config.listen,
            transport: "UDP",
            source,
        })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => break (udp, tcp),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < attempts => continue,
            Err(source) => {
                return Err(DnsError::Bind {
                    addr,
                    transport: "TCP",
                    source,
                })
            }
        }
    };
    bound(config, zone, udp, tcp)
}

/// The server on these sockets, whose duplicates are kept for a reload ([`handover`]).
fn bound(
    config: &DnsConfig,
    zone: Zone,
    udp: UdpSocket,
    tcp: TcpListener,
) -> Result<Bound, DnsError> {
    let local_addr = tcp.local_addr().map_err(|source| DnsError::Bind {
        addr: config.listen,
        transport: "TCP",
        source,
    })?;
    handover::keep(&udp, &tcp);
    Ok(Bound {
        udp,
        tcp,
        local_addr,
        zone,
        forwarder: Forwarder::new(config.upstreams.clone()),
    })
}

/// [`bind`], then [`Bound::serve`].
pub async fn serve(
    config: DnsConfig,
    names: watch::Receiver<Arc<Names>>,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    bind(&config).await?.serve(names, shutdown).await
}

/// The mesh DNS server with its sockets bound, not yet answering.
#[derive(Debug)]
pub struct Bound {
    udp: UdpSocket,
    tcp: TcpListener,
    local_addr: SocketAddr,
    zone: Zone,
    forwarder: Forwarder,
}

impl Bound {
    /// Where it listens (UDP and TCP), with the port chosen when `listen` had port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Answers until `shutdown` is cancelled (then `Ok`), or until both sockets fail.
    pub async fn serve(
        self,
        names: watch::Receiver<Arc<Names>>,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        let addr = self.local_addr;
        if self.forwarder.upstreams().is_empty() {
            warn!(
                listen = %addr,
                "mesh DNS has no upstream resolver: names outside .{} get SERVFAIL",
                self.zone.origin()
            );
        }
        info!(
            listen = %addr,
            domain = %self.zone.origin(),
            upstreams = ?self.forwarder.upstreams(),
            "mesh DNS serving"
        );
        let mut server = Server::new(MeshDns {
            zone: self.zone,
            names,
            forwarder: self.forwarder,
        });
        server.register_socket(self.udp);
        server.register_listener(self.tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        let failed = tokio::select! {
            // Only returns once every socket loop has ended, which without a shutdown is an error.
            result = server.block_until_done() => Some(result),
            () = shutdown.cancelled() => None,
        };
        let result = match failed {
            Some(result) => result.and(Err(NetError::from("the listeners stopped"))),
            None => server.shutdown_gracefully().await,
        };
        result.map_err(|source| DnsError::Serve { addr, source })?;
        info!(listen = %addr, "mesh DNS stopped");
        Ok(())
    }
}

/// hickory-server's request handler: one question in, one answer out.
struct MeshDns {
    zone: Zone,
    names: watch::Receiver<Arc<Names>>,
    forwarder: Forwarder,
}

#[async_trait::async_trait]
impl RequestHandler for MeshDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let edns = request.edns.as_ref().map(|asked| {
            let mut ours = Edns::new();
            ours.set_max_payload(asked.max_payload().max(512));
            ours
        });
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = !self.forwarder.upstreams().is_empty();

        let reply = if request.metadata.op_code != OpCode::Query {
            Reply::Error(ResponseCode::NotImp)
        } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Reply::Error(ResponseCode::BADVERS)
        } else {
            match request.request_info() {
                Err(_) => Reply::Error(ResponseCode::FormErr),
                Ok(info) => self.reply(info.query, info.metadata).await,
            }
        };

        let empty = Vec::new();
        let (answers, authorities, additionals) = match &reply {
            Reply::Error(code) => {
                metadata.response_code = *code;
                (&empty, &empty, &empty)
            }
            Reply::Mesh {
                code,
                answers,
                authorities,
            } => {
                metadata.authoritative = true;
                metadata.response_code = *code;
                (answers, authorities, &empty)
            }
            Reply::Forwarded(upstream) => {
                metadata.response_code = upstream.metadata.response_code;
                metadata.authoritative = upstream.metadata.authoritative;
                (
                    &upstream.answers,
                    &upstream.authorities,
                    &upstream.additionals,
                )
            }
        };
        let message = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answers.iter(),
            authorities.iter(),
            std::iter::empty(),
            additionals.iter(),
        );
        match response.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                debug!(client = %request.src(), error = %e, "cannot send DNS response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// What goes into the response, before the header is filled in.
enum Reply {
    Error(ResponseCode),
    Mesh {
        code: ResponseCode,
        answers: Vec<Record>,
        authorities: Vec<Record>,
    },
    Forwarded(Message),
}

impl MeshDns {
    async fn reply(&self, query: &LowerQuery, asked: &Metadata) -> Reply {
        // The table as of this question; the borrow ends before any await.
        let names = Arc::clone(&self.names.borrow());
        let answer = self.zone.answer(
            &names,
            query.name(),
            query.query_type(),
            query.query_class(),
        );
        let negative = |code, in_zone: bool| Reply::Mesh {
            code,
            answers: Vec::new(),
            authorities: if in_zone {
                vec![self.zone.soa().clone()]
            } else {
                Vec::new()
            },
        };
        match answer {
            Answer::Address(vip) => Reply::Mesh {
                code: ResponseCode::NoError,
                answers: vec![Zone::address_record(query.name(), vip)],
                authorities: Vec::new(),
            },
            Answer::Soa => Reply::Mesh {
                code: ResponseCode::NoError,
                answers: vec![self.zone.soa().clone()],
                authorities: Vec::new(),
            },
            Answer::NoData { in_zone } => negative(ResponseCode::NoError, in_zone),
            Answer::NxDomain => negative(ResponseCode::NXDomain, true),
            Answer::Forward => {
                // The question as asked (letter case included), with the client's RD and CD.
                let forwarded = self.forwarder.forward(
                    query.original(),
                    asked.recursion_desired,
                    asked.checking_disabled,
                );
                match forwarded.await {
                    Ok(message) => Reply::Forwarded(message),
                    Err(_) => Reply::Error(ResponseCode::ServFail),
                }
            }
        }
    }
}
