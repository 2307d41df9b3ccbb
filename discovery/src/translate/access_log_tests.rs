//! Access logs on a proxy's listeners: where they go, and how the choice keys the memo.

use envoy_types::pb::envoy::config::accesslog::v3::AccessLog as EnvoyAccessLog;

use super::*;
use crate::proxy::AccessLog;
use crate::translate::access_log::decoded_format;

fn logging(log: AccessLog) -> Proxy {
    Proxy {
        access_log: log,
        ..proxy("vm-b", "10.0.0.12")
    }
}

fn typed<M: Message + Default + prost::Name>(
    f: &envoy_types::pb::envoy::config::listener::v3::Filter,
) -> M {
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!("{} has no typed config", f.name)
    };
    unpack(any)
}

/// Every access logger of a listener, with the chain (or listener) it is on.
fn loggers(l: &Listener) -> Vec<(String, EnvoyAccessLog)> {
    let mut out = Vec::new();
    for chain in &l.filter_chains {
        let at = if chain.name.is_empty() {
            l.name.clone()
        } else {
            chain.name.clone()
        };
        for f in &chain.filters {
            let logs = match f.name.as_str() {
                "envoy.filters.network.http_connection_manager" => {
                    typed::<HttpConnectionManager>(f).access_log
                }
                "envoy.filters.network.tcp_proxy" => typed::<TcpProxy>(f).access_log,
                _ => continue,
            };
            out.extend(logs.into_iter().map(|log| (at.clone(), log)));
        }
    }
    out
}

fn field(log: &EnvoyAccessLog, key: &str) -> Option<String> {
    decoded_format(log)
        .1
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[test]
fn every_connection_manager_and_tcp_proxy_logs_with_its_direction() {
    let shared = Shared::build_with(Arc::new(demo_with_db()), mtls_settings());
    let res = shared.for_proxy(&logging(AccessLog::Stdout));
    let mut seen = Vec::new();
    for name in ["outbound", "inbound", "outbound|db"] {
        let l: Listener = decode(&res.listeners, name);
        for (at, log) in loggers(&l) {
            assert_eq!(log.name, "envoy.access_loggers.stdout");
            let http = field(&log, "method").is_some();
            seen.push((at, field(&log, "direction").unwrap(), http));
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("inbound|db".to_string(), "inbound".to_string(), false),
            ("inbound|reviews".to_string(), "inbound".to_string(), true),
            ("outbound".to_string(), "outbound".to_string(), true),
            ("outbound|db".to_string(), "outbound".to_string(), false),
        ]
    );
}

#[test]
fn a_file_names_its_path_and_off_logs_nothing() {
    let shared = Shared::build_with(Arc::new(demo_with_db()), mtls_settings());
    let res = shared.for_proxy(&logging(AccessLog::File("/var/log/envoy.log".into())));
    let l: Listener = decode(&res.listeners, "inbound");
    for (_, log) in loggers(&l) {
        assert_eq!(log.name, "envoy.access_loggers.file");
        assert_eq!(decoded_format(&log).0, "/var/log/envoy.log");
    }
    let res = shared.for_proxy(&logging(AccessLog::Off));
    for l in res.listeners.keys() {
        let l: Listener = decode(&res.listeners, l);
        assert!(loggers(&l).is_empty(), "{}", l.name);
    }
}

/// Without the metadata key a proxy gets the listeners it got before access logs existed.
#[test]
fn off_is_the_listener_of_a_proxy_that_does_not_ask() {
    let shared = Shared::build(Arc::new(demo()));
    let res = shared.for_proxy(&proxy("vm-a", "10.0.0.11"));
    let l: Listener = decode(&res.listeners, "outbound");
    assert!(loggers(&l).is_empty());
}

#[test]
fn the_choice_is_part_of_the_memo_key() {
    let shared = Shared::build_with(Arc::new(demo_with_db()), mtls_settings());
    let stdout = shared.for_proxy(&logging(AccessLog::Stdout));
    let off = shared.for_proxy(&logging(AccessLog::Off));
    assert_ne!(
        stdout.listeners["outbound"].version,
        off.listeners["outbound"].version
    );
    // Everything that does not depend on the choice is still shared.
    assert!(Arc::ptr_eq(&stdout.endpoints, &off.endpoints));
    assert!(Arc::ptr_eq(
        &stdout.routes["outbound"],
        &off.routes["outbound"]
    ));
    let again = shared.for_proxy(&logging(AccessLog::Stdout));
    assert!(Arc::ptr_eq(&stdout.listeners, &again.listeners));
    // Two builds (replicas, restarts) agree on the versions.
    let other = Shared::build_with(Arc::new(demo_with_db()), mtls_settings());
    let same = other.for_proxy(&logging(AccessLog::Stdout));
    for (name, r) in stdout.listeners.iter() {
        assert_eq!(r.version, same.listeners[name].version, "{name}");
    }
}
