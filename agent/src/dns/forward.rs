//! Forwarding what is not a mesh name to the upstream resolvers, and finding those upstreams in
//! `/etc/resolv.conf`.
//!
//! Each question is sent as a new query (a fresh UDP socket and ID, hickory's client) to the
//! upstreams in order, over UDP and again over TCP when the answer is truncated. The first
//! answer that arrives is returned whatever its code (NXDOMAIN, REFUSED, ...), with all its
//! sections; only a transport failure (timeout, refused connection, unreadable reply) moves on to
//! the next upstream. No cache: the stub resolver in front of us (glibc, systemd-resolved)
//! keeps one, and the upstream resolver another.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use futures::FutureExt;
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::{DnsExchange, DnsHandle, DnsMultiplexer, DnsRequestSender, FirstAnswer};
use hickory_net::NetError;
use hickory_proto::op::{DnsRequest, DnsRequestOptions, DnsResponse, Edns, Message, Query};
use tokio::time::Instant;
use tracing::{debug, warn};

/// The file the default upstreams are read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// How long one upstream gets to answer (UDP, with hickory's resends inside it, then TCP).
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a question may take in all before the client gets SERVFAIL: less than the 5 s
/// glibc waits for an answer, so the client hears SERVFAIL rather than nothing.
pub(crate) const FORWARD_DEADLINE: Duration = Duration::from_secs(4);
/// The UDP payload we offer upstreams (the DNS flag day 2020 value, safe from fragmentation).
const EDNS_PAYLOAD: u16 = 1232;

/// The upstream resolvers, tried in order.
#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
}

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstreams,
    #[error("no upstream answered within {FORWARD_DEADLINE:?}")]
    Deadline,
    #[error("{upstream}: {source}")]
    Failed {
        upstream: SocketAddr,
        #[source]
        source: NetError,
    },
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>) -> Forwarder {
        Forwarder { upstreams }
    }

    pub(crate) fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Asks the upstreams `query`; `recursion_desired` and `checking_disabled` are the client's.
    pub(crate) async fn forward(
        &self,
        query: &Query,
        recursion_desired: bool,
        checking_disabled: bool,
    ) -> Result<Message, ForwardError> {
        let mut message = Message::query();
        message.add_query(query.clone());
        message.metadata.recursion_desired = recursion_desired;
        message.metadata.checking_disabled = checking_disabled;
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        message.set_edns(edns);
        let mut options = DnsRequestOptions::default();
        options.recursion_desired = recursion_desired;
        options.edns_payload_len = EDNS_PAYLOAD;
        let request = DnsRequest::new(message, options);

        let result = self.ask_in_turn(&request).await;
        if let Err(e) = &result {
            if !matches!(e, ForwardError::NoUpstreams) {
                warn!(name = %query.name(), qtype = %query.query_type(), error = %e, "no DNS upstream answered");
            }
        }
        result
    }

    async fn ask_in_turn(&self, request: &DnsRequest) -> Result<Message, ForwardError> {
        let deadline = Instant::now() + FORWARD_DEADLINE;
        let mut failure = ForwardError::NoUpstreams;
        for &upstream in &self.upstreams {
            // A new ID per upstream: a late answer from the last one cannot be taken for this.
            let mut request = request.clone();
            request.metadata.id = rand::random();
            let Ok(result) = tokio::time::timeout_at(deadline, ask(upstream, request)).await else {
                return Err(ForwardError::Deadline);
            };
            match result {
                Ok(response) => return Ok(response.into_message()),
                Err(source) => {
                    debug!(%upstream, error = %source, "upstream failed; trying the next");
                    failure = ForwardError::Failed { upstream, source };
                }
            }
        }
        Err(failure)
    }
}

/// One upstream: over UDP, then over TCP when the answer did not fit.
async fn ask(upstream: SocketAddr, request: DnsRequest) -> Result<DnsResponse, NetError> {
    let provider = TokioRuntimeProvider::default();
    let udp = UdpClientStream::builder(upstream, provider.clone())
        .with_timeout(Some(UPSTREAM_TIMEOUT))
        .build();
    let response = exchange(udp, request.clone()).await?;
    if !response.metadata.truncation {
        return Ok(response);
    }
    debug!(%upstream, "truncated over UDP; asking over TCP");
    let (connect, handle) = TcpClientStream::new(upstream, None, Some(UPSTREAM_TIMEOUT), provider);
    let tcp = tokio::time::timeout(UPSTREAM_TIMEOUT, connect)
        .await
        .map_err(|_| NetError::Timeout)??;
    exchange(
        DnsMultiplexer::new(tcp, handle).with_timeout(UPSTREAM_TIMEOUT),
        request,
    )
    .await
}

/// Sends `request` on `sender` and waits for the first answer, driving the exchange's
/// background half here rather than in a spawned task, so nothing outlives the question.
async fn exchange<S: DnsRequestSender>(
    sender: S,
    request: DnsRequest,
) -> Result<DnsResponse, NetError> {
    let (exchange, background) = DnsExchange::<TokioRuntimeProvider>::from_stream(sender);
    let answer = exchange.send(request).first_answer();
    futures::pin_mut!(answer);
    let mut background = background.fuse();
    tokio::select! {
        answer = &mut answer => answer,
        // The background half ends only when the connection fails; the answer (an error by
        // then) says why.
        _ = &mut background => answer.await,
    }
}

/// The default upstreams: the name servers of [`RESOLV_CONF`] less this server, or when that
/// names systemd-resolved's stub, those of [`RESOLVED_RESOLV_CONF`]. Empty when neither can be
/// read.
pub fn system_upstreams(listen: SocketAddr) -> Vec<SocketAddr> {
    upstreams_from_files(
        Path::new(RESOLV_CONF),
        Path::new(RESOLVED_RESOLV_CONF),
        listen,
    )
}

/// Where systemd-resolved lists the servers it asks itself, for programs that must not ask its
/// stub (as we must not: see [`upstreams_from_resolv_conf`]).
pub const RESOLVED_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// systemd-resolved's stub listeners: 127.0.0.53, and 127.0.0.54 (its proxy mode).
const RESOLVED_STUBS: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53)),
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 54)),
];

fn upstreams_from_files(
    resolv_conf: &Path,
    resolved_conf: &Path,
    listen: SocketAddr,
) -> Vec<SocketAddr> {
    let read = |path: &Path| match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) => {
            debug!(path = %path.display(), error = %e, "cannot read resolv.conf");
            None
        }
    };
    let Some(text) = read(resolv_conf) else {
        return Vec::new();
    };
    if nameservers(&text).any(|ip| RESOLVED_STUBS.contains(&ip)) {
        if let Some(text) = read(resolved_conf) {
            return upstreams_from_resolv_conf(&text, listen);
        }
    }
    upstreams_from_resolv_conf(&text, listen)
}

/// The `nameserver` addresses of a resolv.conf text, on port 53, in order and without repeats,
/// leaving out the ones that would send questions back to this server, which would loop:
///
/// - the listen IP on any port (a nameserver line is always port 53, and a redirect from 53 to
///   our port is still us), and every loopback address when listening on all addresses of the
///   same port: a host whose resolv.conf already points at the mesh DNS;
/// - systemd-resolved's stubs (127.0.0.53, 127.0.0.54): resolved sends names outside its
///   routing domains to its global DNS servers too, so once the mesh DNS is one of those
///   (`DNS=127.0.0.153` in resolved.conf) a question forwarded to the stub comes back.
///
/// Link-local IPv6 servers with a zone (`fe80::1%eth0`) are skipped.
pub fn upstreams_from_resolv_conf(text: &str, listen: SocketAddr) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for ip in nameservers(text) {
        let upstream = SocketAddr::new(ip, 53);
        if ip == listen.ip()
            || RESOLVED_STUBS.contains(&ip)
            || is_own_address(upstream, listen)
            || upstreams.contains(&upstream)
        {
            continue;
        }
        upstreams.push(upstream);
    }
    upstreams
}

fn nameservers(text: &str) -> impl Iterator<Item = IpAddr> + '_ {
    text.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("nameserver"), Some(ip)) => ip.parse().ok(),
            _ => None,
        }
    })
}

/// Whether queries sent to `upstream` would reach a server listening on `listen`.
pub fn is_own_address(upstream: SocketAddr, listen: SocketAddr) -> bool {
    if upstream.port() != listen.port() {
        return false;
    }
    upstream.ip() == listen.ip()
        || (listen.ip().is_unspecified()
            && (upstream.ip().is_loopback() || upstream.ip().is_unspecified()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn resolv_conf_nameservers_without_this_server() {
        let text = "\
# Generated by NetworkManager
search corp.example
nameserver 127.0.0.153
nameserver 10.0.0.2
; a comment
nameserver   10.0.0.3   # trailing words are ignored
nameserver 10.0.0.2
nameserver fe80::1%eth0
nameserver 2001:db8::53
nameserver not-an-ip
options edns0 trust-ad
";
        let listen = "127.0.0.153:53".parse().unwrap();
        assert_eq!(
            upstreams_from_resolv_conf(text, listen),
            addrs(&["10.0.0.2:53", "10.0.0.3:53", "[2001:db8::53]:53"])
        );
        // Listening elsewhere, 127.0.0.153 is just another server.
        let listen = "127.0.0.1:5353".parse().unwrap();
        assert_eq!(
            upstreams_from_resolv_conf(text, listen)[0],
            addrs(&["127.0.0.153:53"])[0]
        );
        // On the listen IP but another port: still us (a redirect from port 53).
        let listen = "127.0.0.153:5353".parse().unwrap();
        assert_eq!(
            upstreams_from_resolv_conf(text, listen)[0],
            addrs(&["10.0.0.2:53"])[0]
        );
    }

    #[test]
    fn listening_on_every_address_excludes_loopback_servers() {
        let text = "nameserver 127.0.0.1\nnameserver ::1\nnameserver 10.0.0.2\n";
        let listen = "0.0.0.0:53".parse().unwrap();
        assert_eq!(
            upstreams_from_resolv_conf(text, listen),
            addrs(&["10.0.0.2:53"])
        );
        // A local resolver stays an upstream when we are on another port.
        let listen = "0.0.0.0:5353".parse().unwrap();
        assert_eq!(
            upstreams_from_resolv_conf(text, listen),
            addrs(&["127.0.0.1:53", "[::1]:53", "10.0.0.2:53"])
        );
        assert!(upstreams_from_resolv_conf("", listen).is_empty());
    }

    #[test]
    fn systemd_resolveds_stub_is_replaced_by_the_servers_it_asks() {
        let dir = tempfile::tempdir().unwrap();
        let (etc, run) = (dir.path().join("etc"), dir.path().join("run"));
        let listen = "127.0.0.153:53".parse().unwrap();
        let upstreams = || upstreams_from_files(&etc, &run, listen);
        assert!(upstreams().is_empty(), "no file");

        std::fs::write(&etc, "nameserver 10.0.0.2\n").unwrap();
        assert_eq!(upstreams(), addrs(&["10.0.0.2:53"]));

        // The stub, and resolved's own list not readable: never the stub.
        std::fs::write(&etc, "nameserver 127.0.0.53\noptions edns0 trust-ad\n").unwrap();
        assert!(upstreams().is_empty());
        // resolved's list names the mesh DNS too once it is configured there.
        std::fs::write(&run, "nameserver 127.0.0.153\nnameserver 10.0.0.3\n").unwrap();
        assert_eq!(upstreams(), addrs(&["10.0.0.3:53"]));
    }

    #[test]
    fn own_address() {
        let listen: SocketAddr = "127.0.0.153:53".parse().unwrap();
        assert!(is_own_address(listen, listen));
        assert!(!is_own_address("127.0.0.153:54".parse().unwrap(), listen));
        assert!(!is_own_address("127.0.0.1:53".parse().unwrap(), listen));
        let any: SocketAddr = "0.0.0.0:53".parse().unwrap();
        assert!(is_own_address("127.0.0.1:53".parse().unwrap(), any));
        assert!(!is_own_address("10.0.0.2:53".parse().unwrap(), any));
    }
}
