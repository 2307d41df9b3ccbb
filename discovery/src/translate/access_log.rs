//! Access logs: one JSON line per HTTP request (and per TCP connection) on the listeners of a
//! proxy whose agent asked for them (`pilotfish.access_log`, see `proxy.rs`).
//!
//! Every connection manager of the proxy gets the same logger with the fields of [`HTTP_FIELDS`]
//! and a literal `direction` (`outbound` for what local apps send, `inbound` for what peers and
//! gateway clients send); TCP proxies get [`TCP_FIELDS`], the ones that apply to a connection.
//! `stdout` uses `envoy.access_loggers.stdout` (Envoy's stdout is the agent's, which systemd
//! hands to journald), a path `envoy.access_loggers.file`.
//!
//! # Request ids
//!
//! The outbound connection manager generates `x-request-id` when the app sent none (Envoy's
//! default, `generate_request_id`) and forwards it. Every connection manager here has
//! `use_remote_address = false`, so Envoy treats no request as an edge request and keeps an
//! incoming id: the callee's inbound line carries the caller's id. Gateways set
//! `use_remote_address = true` and are the edge: they replace an id a client sent.
//!
//! # Determinism
//!
//! The format is a `google.protobuf.Struct`, a map, which prost encodes in `HashMap` order. As in
//! `labels_metadata`, the logger's config is encoded one field at a time, in field order, and
//! the pieces concatenated: protobuf merges repeated message fields and map entries, so the
//! bytes decode as the whole format and are the same on every replica and every run.

use envoy_types::pb::envoy::config::accesslog::v3::{access_log, AccessLog as EnvoyAccessLog};
use envoy_types::pb::envoy::config::core::v3::{
    substitution_format_string::Format, SubstitutionFormatString,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    file_access_log, FileAccessLog,
};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    stdout_access_log, StdoutAccessLog,
};
use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct, Value};
use prost::Message;

use crate::proxy::AccessLog;

const STDOUT_LOGGER: &str = "envoy.access_loggers.stdout";
const FILE_LOGGER: &str = "envoy.access_loggers.file";

/// Which way a listener's traffic goes, written as the literal `direction` of each line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// The fields of an HTTP line (besides `direction`), with Envoy's command operators. Numbers
/// come out as JSON numbers; a value Envoy does not have (no upstream, no client certificate)
/// as `null`.
pub const HTTP_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("duration_ms", "%DURATION%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("peer", "%DOWNSTREAM_PEER_URI_SAN%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
];

/// The fields of a TCP connection's line (besides `direction`).
pub const TCP_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("duration_ms", "%DURATION%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("peer", "%DOWNSTREAM_PEER_URI_SAN%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
];

/// The access loggers of an HTTP connection manager (empty when the log is off).
pub(super) fn http(log: &AccessLog, direction: Direction) -> Vec<EnvoyAccessLog> {
    logger(log, direction, HTTP_FIELDS)
}

/// The access loggers of a TCP proxy (empty when the log is off).
pub(super) fn tcp(log: &AccessLog, direction: Direction) -> Vec<EnvoyAccessLog> {
    logger(log, direction, TCP_FIELDS)
}

fn logger(log: &AccessLog, direction: Direction, fields: &[(&str, &str)]) -> Vec<EnvoyAccessLog> {
    let mut format: Vec<(&str, &str)> = fields.to_vec();
    format.push(("direction", direction.as_str()));
    format.sort_unstable_by_key(|(k, _)| *k);
    let pieces = format.into_iter().map(|(k, v)| SubstitutionFormatString {
        format: Some(Format::JsonFormat(Struct {
            fields: [(
                k.to_string(),
                Value {
                    kind: Some(Kind::StringValue(v.to_string())),
                },
            )]
            .into(),
        })),
        ..Default::default()
    });
    let (name, config) = match log {
        AccessLog::Off => return Vec::new(),
        AccessLog::Stdout => {
            let mut value = Vec::new();
            for piece in pieces {
                let one = StdoutAccessLog {
                    access_log_format: Some(stdout_access_log::AccessLogFormat::LogFormat(piece)),
                };
                value.extend(one.encode_to_vec());
            }
            let config = Any {
                type_url: <StdoutAccessLog as prost::Name>::type_url(),
                value,
            };
            (STDOUT_LOGGER, config)
        }
        AccessLog::File(path) => {
            let mut value = FileAccessLog {
                path: path.clone(),
                access_log_format: None,
            }
            .encode_to_vec();
            for piece in pieces {
                let one = FileAccessLog {
                    path: String::new(),
                    access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(piece)),
                };
                value.extend(one.encode_to_vec());
            }
            let config = Any {
                type_url: <FileAccessLog as prost::Name>::type_url(),
                value,
            };
            (FILE_LOGGER, config)
        }
    };
    vec![EnvoyAccessLog {
        name: name.to_string(),
        filter: None,
        config_type: Some(access_log::ConfigType::TypedConfig(config)),
    }]
}

#[cfg(test)]
/// The `json_format` a logger's config decodes to, as (key, value) in key order.
pub(super) fn decoded_format(log: &EnvoyAccessLog) -> (String, Vec<(String, String)>) {
    let Some(access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
        panic!("no typed config");
    };
    let (path, format) = if any.type_url.ends_with("StdoutAccessLog") {
        let decoded = StdoutAccessLog::decode(any.value.as_slice()).expect("decodes");
        let Some(stdout_access_log::AccessLogFormat::LogFormat(f)) = decoded.access_log_format
        else {
            panic!("no log_format");
        };
        (String::new(), f)
    } else {
        let decoded = FileAccessLog::decode(any.value.as_slice()).expect("decodes");
        let Some(file_access_log::AccessLogFormat::LogFormat(f)) = decoded.access_log_format else {
            panic!("no log_format");
        };
        (decoded.path, f)
    };
    let Some(Format::JsonFormat(s)) = format.format else {
        panic!("not json_format");
    };
    let mut fields: Vec<(String, String)> = s
        .fields
        .into_iter()
        .map(|(k, v)| match v.kind {
            Some(Kind::StringValue(v)) => (k, v),
            other => panic!("{k}: {other:?}"),
        })
        .collect();
    fields.sort();
    (path, fields)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn off_adds_no_logger() {
        assert!(http(&AccessLog::Off, Direction::Outbound).is_empty());
        assert!(tcp(&AccessLog::Off, Direction::Inbound).is_empty());
    }

    #[test]
    fn stdout_logs_every_field_as_json_with_a_literal_direction() {
        let loggers = http(&AccessLog::Stdout, Direction::Outbound);
        assert_eq!(loggers.len(), 1);
        assert_eq!(loggers[0].name, "envoy.access_loggers.stdout");
        let (_, fields) = decoded_format(&loggers[0]);
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "bytes_received",
                "bytes_sent",
                "direction",
                "duration_ms",
                "method",
                "path",
                "peer",
                "request_id",
                "response_code",
                "response_flags",
                "start_time",
                "upstream_cluster",
                "upstream_host",
            ]
        );
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).unwrap().1.clone();
        assert_eq!(get("direction"), "outbound");
        assert_eq!(get("request_id"), "%REQ(X-REQUEST-ID)%");
        assert_eq!(get("peer"), "%DOWNSTREAM_PEER_URI_SAN%");
    }

    #[test]
    fn file_logger_names_the_path_and_tcp_has_connection_fields_only() {
        let log = AccessLog::File("/var/log/pilotfish/access.log".into());
        let loggers = tcp(&log, Direction::Inbound);
        assert_eq!(loggers[0].name, "envoy.access_loggers.file");
        let (path, fields) = decoded_format(&loggers[0]);
        assert_eq!(path, "/var/log/pilotfish/access.log");
        assert_eq!(fields.len(), TCP_FIELDS.len() + 1);
        assert!(fields
            .iter()
            .all(|(k, _)| k != "method" && k != "request_id"));
        assert!(fields.contains(&("direction".into(), "inbound".into())));
    }

    /// The encoding does not depend on `HashMap` order: the same bytes every time.
    #[test]
    fn encoding_is_deterministic() {
        let one = http(&AccessLog::Stdout, Direction::Inbound)[0].encode_to_vec();
        for _ in 0..20 {
            assert_eq!(
                http(&AccessLog::Stdout, Direction::Inbound)[0].encode_to_vec(),
                one
            );
        }
    }
}
