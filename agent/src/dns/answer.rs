//! Which answer a question gets from the names table: pure, no I/O, so every rule is tested
//! without a socket.

use std::net::Ipv4Addr;

use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_proto::ProtoError;

use super::{Names, NEGATIVE_TTL, TTL};

/// What the mesh zone says about one question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The service's VIP (an `A`, or `ANY`, question for a known name).
    Address(Ipv4Addr),
    /// The zone's SOA record (an `SOA` question for the domain itself).
    Soa,
    /// The name exists but has no record of the asked type (NOERROR, no answers).
    /// `in_zone`: the name is under the domain, so the zone's SOA goes in the authority section
    /// (for negative caching); a bare name is not, and gets none.
    NoData { in_zone: bool },
    /// No such name under the domain.
    NxDomain,
    /// Not a mesh name: ask the upstreams.
    Forward,
}

/// The mesh zone: `<service>.<domain>.`, and `<service>.` too with `bare_names`.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    origin: LowerName,
    bare_names: bool,
    soa: Record,
}

impl Zone {
    /// `domain` without its trailing dot (`mesh`, `svc.example`).
    pub(crate) fn new(domain: &str, bare_names: bool) -> Result<Zone, ProtoError> {
        let mut origin = Name::from_ascii(domain)?;
        origin.set_fqdn(true);
        let origin = origin.to_lowercase();
        // An SOA whose MINIMUM and TTL are short, so a resolver caches a missing name for at
        // most 5 s: a new service resolves within seconds even where a client asked too early.
        let soa = SOA::new(
            origin.clone(),
            Name::from_ascii("hostmaster")?.append_domain(&origin)?,
            1,
            3600,
            600,
            86400,
            NEGATIVE_TTL,
        );
        Ok(Zone {
            soa: Record::from_rdata(origin.clone(), NEGATIVE_TTL, RData::SOA(soa)),
            origin: LowerName::new(&origin),
            bare_names,
        })
    }

    pub(crate) fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// The zone's SOA record, for the authority section of negative answers.
    pub(crate) fn soa(&self) -> &Record {
        &self.soa
    }

    /// The answer to `qname`/`qtype`/`qclass` given the current names table.
    pub(crate) fn answer(
        &self,
        names: &Names,
        qname: &LowerName,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Answer {
        let in_zone = self.origin.zone_of(qname);
        let labels = if in_zone {
            usize::from(qname.num_labels() - self.origin.num_labels())
        } else if self.bare_names {
            usize::from(qname.num_labels())
        } else {
            return Answer::Forward;
        };
        if labels == 0 {
            // The domain itself exists (it holds the services) and has only its SOA. The root
            // (a bare-names query for ".") is not ours.
            return match (in_zone, qtype) {
                (false, _) => Answer::Forward,
                (true, RecordType::SOA | RecordType::ANY) if class_matches(qclass) => Answer::Soa,
                (true, _) => Answer::NoData { in_zone },
            };
        }
        let Some(service) = service_name(qname, labels) else {
            return if in_zone {
                Answer::NxDomain
            } else {
                Answer::Forward
            };
        };
        match lookup(names, &service) {
            Some(vip)
                if class_matches(qclass) && matches!(qtype, RecordType::A | RecordType::ANY) =>
            {
                Answer::Address(vip)
            }
            Some(_) => Answer::NoData { in_zone },
            // `v1.mesh.` when `reviews.v1` is a service: an empty non-terminal, which exists
            // (RFC 8020 resolvers would otherwise take NXDOMAIN to mean nothing below it exists).
            None if in_zone && has_descendant(names, &service) => Answer::NoData { in_zone },
            None if in_zone => Answer::NxDomain,
            None => Answer::Forward,
        }
    }

    /// The `A` record for `qname`.
    pub(crate) fn address_record(qname: &LowerName, vip: Ipv4Addr) -> Record {
        Record::from_rdata(Name::from(qname.clone()), TTL, RData::A(A(vip)))
    }
}

fn class_matches(qclass: DNSClass) -> bool {
    matches!(qclass, DNSClass::IN | DNSClass::ANY)
}

/// The first `labels` labels of `qname` joined with dots: the service name asked for. `None`
/// when a label holds a dot or is not UTF-8, which no service name does.
fn service_name(qname: &LowerName, labels: usize) -> Option<String> {
    let name = Name::from(qname.clone());
    let mut parts = Vec::with_capacity(labels);
    for label in name.iter().take(labels) {
        let label = std::str::from_utf8(label).ok()?;
        if label.contains('.') {
            return None;
        }
        parts.push(label);
    }
    Some(parts.join("."))
}

/// Service names are matched case-insensitively, as DNS names are; `service` is lowercase.
fn lookup(names: &Names, service: &str) -> Option<Ipv4Addr> {
    names.get(service).copied().or_else(|| {
        names
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(service))
            .map(|(_, vip)| *vip)
    })
}

fn has_descendant(names: &Names, service: &str) -> bool {
    names.keys().any(|name| {
        name.len() > service.len() + 1
            && name.as_bytes()[name.len() - service.len() - 1] == b'.'
            && name[name.len() - service.len()..].eq_ignore_ascii_case(service)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::from([
            ("reviews".to_string(), Ipv4Addr::new(240, 240, 0, 7)),
            ("ratings.v1".to_string(), Ipv4Addr::new(240, 240, 0, 8)),
            ("Legacy-App".to_string(), Ipv4Addr::new(240, 240, 0, 9)),
        ])
    }

    fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Answer {
        let qname = LowerName::new(&Name::from_ascii(name).unwrap());
        zone.answer(&names(), &qname, qtype, DNSClass::IN)
    }

    #[test]
    fn names_under_the_domain_are_answered_and_never_forwarded() {
        let zone = Zone::new("mesh", false).unwrap();
        let vip = Answer::Address(Ipv4Addr::new(240, 240, 0, 7));
        assert_eq!(ask(&zone, "reviews.mesh.", RecordType::A), vip);
        assert_eq!(ask(&zone, "ReViews.MESH.", RecordType::A), vip);
        assert_eq!(ask(&zone, "reviews.mesh.", RecordType::ANY), vip);
        assert_eq!(
            ask(&zone, "ratings.v1.mesh.", RecordType::A),
            Answer::Address(Ipv4Addr::new(240, 240, 0, 8))
        );
        // A name in the table with capitals still resolves.
        assert_eq!(
            ask(&zone, "legacy-app.mesh.", RecordType::A),
            Answer::Address(Ipv4Addr::new(240, 240, 0, 9))
        );
        let nodata = Answer::NoData { in_zone: true };
        assert_eq!(ask(&zone, "reviews.mesh.", RecordType::AAAA), nodata);
        assert_eq!(ask(&zone, "reviews.mesh.", RecordType::MX), nodata);
        assert_eq!(ask(&zone, "unknown.mesh.", RecordType::A), Answer::NxDomain);
        assert_eq!(
            ask(&zone, "unknown.mesh.", RecordType::AAAA),
            Answer::NxDomain
        );
        assert_eq!(
            ask(&zone, "x.reviews.mesh.", RecordType::A),
            Answer::NxDomain
        );
        // `v1.mesh.` holds `ratings.v1.mesh.`, so it exists.
        assert_eq!(ask(&zone, "v1.mesh.", RecordType::A), nodata);
        assert_eq!(ask(&zone, "mesh.", RecordType::SOA), Answer::Soa);
        assert_eq!(ask(&zone, "mesh.", RecordType::A), nodata);
        assert_eq!(ask(&zone, "reviews.", RecordType::A), Answer::Forward);
        assert_eq!(ask(&zone, "example.com.", RecordType::A), Answer::Forward);
        assert_eq!(
            ask(&zone, "reviews.mesh.example.", RecordType::A),
            Answer::Forward
        );
    }

    #[test]
    fn bare_names_answer_known_services_and_forward_the_rest() {
        let zone = Zone::new("mesh", true).unwrap();
        let vip = Answer::Address(Ipv4Addr::new(240, 240, 0, 7));
        assert_eq!(ask(&zone, "reviews.", RecordType::A), vip);
        assert_eq!(ask(&zone, "reviews.mesh.", RecordType::A), vip);
        assert_eq!(
            ask(&zone, "reviews.", RecordType::AAAA),
            Answer::NoData { in_zone: false }
        );
        assert_eq!(ask(&zone, "unknown.", RecordType::A), Answer::Forward);
        assert_eq!(ask(&zone, "example.com.", RecordType::A), Answer::Forward);
        assert_eq!(ask(&zone, ".", RecordType::NS), Answer::Forward);
        assert_eq!(ask(&zone, "unknown.mesh.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn a_multi_label_domain_and_its_soa() {
        let zone = Zone::new("svc.Example", false).unwrap();
        assert_eq!(zone.origin().to_string(), "svc.example.");
        assert_eq!(
            ask(&zone, "reviews.svc.example.", RecordType::A),
            Answer::Address(Ipv4Addr::new(240, 240, 0, 7))
        );
        assert_eq!(
            ask(&zone, "reviews.example.", RecordType::A),
            Answer::Forward
        );
        let soa = zone.soa();
        assert_eq!(soa.name.to_string(), "svc.example.");
        assert_eq!(soa.ttl, NEGATIVE_TTL);
        let RData::SOA(soa) = &soa.data else {
            panic!("{soa:?}")
        };
        assert_eq!(soa.minimum, NEGATIVE_TTL);
        assert_eq!(soa.rname.to_string(), "hostmaster.svc.example.");
    }

    #[test]
    fn other_classes_get_no_address() {
        let zone = Zone::new("mesh", false).unwrap();
        let qname = LowerName::new(&Name::from_ascii("reviews.mesh.").unwrap());
        assert_eq!(
            zone.answer(&names(), &qname, RecordType::A, DNSClass::CH),
            Answer::NoData { in_zone: true }
        );
    }
}
