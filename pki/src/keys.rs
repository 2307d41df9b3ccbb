//! Keys and certificates on the host side: the agent (and discovery, for its own serving
//! certificate) makes an ECDSA P-256 key locally, keeps it in a 0600 file, and sends only a CSR.
//! Also the read side of certificates: which SPIFFE ID a certificate carries and until when,
//! and which identity a TLS peer presented.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use pilotfish_durable as durable;

use crate::private_file::{self, FileError};
use crate::spiffe::{Role, SpiffeId};

/// Failure to make, load or store a local key, or to build a CSR with it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating an ECDSA P-256 key failed")]
    Generate(#[source] rcgen::Error),
    #[error("reading the private key")]
    Read(#[source] FileError),
    #[error("writing the private key")]
    Write(#[source] FileError),
    #[error("the private key is not a PEM ECDSA P-256 key")]
    Parse(#[source] rcgen::Error),
    #[error("building the certificate signing request failed")]
    Csr(#[source] rcgen::Error),
}

/// A private key made on this host. It is written to disk with mode 0600 and never sent
/// anywhere: only [`LocalKey::csr_pem`] leaves the host.
pub struct LocalKey {
    key: KeyPair,
}

impl std::fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalKey(ECDSA P-256, private)")
    }
}

impl LocalKey {
    /// Makes a new ECDSA P-256 key.
    pub fn generate() -> Result<Self, KeyError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(KeyError::Generate)?;
        Ok(Self { key })
    }

    /// Parses a PKCS#8 PEM key; only ECDSA P-256 is accepted.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key = KeyPair::from_pem_and_sign_algo(pem, &PKCS_ECDSA_P256_SHA256)
            .map_err(KeyError::Parse)?;
        Ok(Self { key })
    }

    /// Loads a key written by [`LocalKey::write`].
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path)
            .map_err(private_file::at(path))
            .map_err(KeyError::Read)?;
        Self::from_pem(&pem)
    }

    /// Loads the key at `path`, or makes one and writes it there if there is none.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Self::load(path);
        }
        let key = Self::generate()?;
        key.write(path)?;
        Ok(key)
    }

    /// Writes the key as PKCS#8 PEM, atomically, mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        durable::write_atomic(
            path,
            self.private_key_pem().as_bytes(),
            durable::SECRET_MODE,
        )
        .map_err(private_file::at(path))
        .map_err(KeyError::Write)
    }

    /// The private key as PKCS#8 PEM, for Envoy's SDS secret. Never log or send it.
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key)
    }

    /// A CSR asking for `id`: its only SAN is the URI, and the subject is empty. For the
    /// discovery ID the CSR also names `discovery.<trust-domain>`, which is what
    /// [`crate::Ca::issue_server_cert`] issues. The CA takes only the public key from a CSR; the
    /// names are there so that it can refuse a CSR that asks for something else.
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, KeyError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = requested_sans(id).map_err(KeyError::Csr)?;
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(KeyError::Csr)
    }
}

/// The SANs a certificate for `id` carries: the URI, plus the DNS name for discovery.
pub(crate) fn requested_sans(id: &SpiffeId) -> Result<Vec<SanType>, rcgen::Error> {
    let mut sans = vec![SanType::URI(id.uri().try_into()?)];
    if *id.role() == Role::Discovery {
        sans.push(SanType::DnsName(
            id.trust_domain().discovery_dns_name().try_into()?,
        ));
    }
    Ok(sans)
}

/// A certificate that could not be read as a Pilotfish identity certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertUnreadable {
    #[error("no PEM CERTIFICATE block found")]
    NoCertificate,
    #[error("PEM decoding failed: {0}")]
    Pem(String),
    #[error("not a valid X.509 certificate: {0}")]
    Der(String),
    #[error("certificate identity: {0}")]
    Identity(&'static str),
    #[error("certificate identity")]
    SpiffeId(#[source] crate::spiffe::InvalidSpiffeId),
}

/// What the agent needs to know about a certificate it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Reads the first certificate of a PEM file (the leaf of a chain).
pub fn parse_cert_pem(pem: &str) -> Result<CertInfo, CertUnreadable> {
    let der = pem_certs(pem)?
        .into_iter()
        .next()
        .ok_or(CertUnreadable::NoCertificate)?;
    parse_cert_der(&der)
}

/// Reads a DER certificate: its single URI SAN as a SPIFFE ID, and its validity.
pub fn parse_cert_der(der: &[u8]) -> Result<CertInfo, CertUnreadable> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertUnreadable::Der(e.to_string()))?;
    let id = spiffe_id_of(&cert)?;
    let validity = cert.validity();
    Ok(CertInfo {
        id,
        not_before: unix_to_system(validity.not_before.timestamp()),
        not_after: unix_to_system(validity.not_after.timestamp()),
    })
}

/// The SPIFFE ID a TLS peer presented, from its leaf certificate (DER), for discovery's
/// authorization. `None` unless the certificate has exactly one URI SAN and it is a valid
/// Pilotfish SPIFFE ID. This reads the certificate only: the TLS stack must already have
/// verified the chain against the bundle.
pub fn peer_spiffe_id(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    spiffe_id_of(&cert).ok()
}

/// Exactly one URI SAN, parsed as a SPIFFE ID (X509-SVID: validators must reject more).
pub(crate) fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, CertUnreadable> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| CertUnreadable::Identity("malformed or repeated subjectAltName"))?
        .ok_or(CertUnreadable::Identity("no subjectAltName"))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or(CertUnreadable::Identity("no URI SAN"))?;
    if uris.next().is_some() {
        return Err(CertUnreadable::Identity("more than one URI SAN"));
    }
    SpiffeId::parse(uri).map_err(CertUnreadable::SpiffeId)
}

/// Every CERTIFICATE block of a PEM string, in order.
pub(crate) fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertUnreadable> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertUnreadable::Pem(e.to_string()))
}

/// Encodes one DER certificate as a PEM block.
pub(crate) fn cert_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// Encodes DER as a PEM block (64-column base64, as OpenSSL writes it).
pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&c| char::from(c)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub(crate) fn unix_to_system(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::spiffe::TrustDomain;

    #[test]
    fn pem_encoding_round_trips_every_padding() {
        for len in 0..70 {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = cert_pem(&der);
            if len == 0 {
                continue;
            }
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), der.as_slice(), "len {len}");
            assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
        }
    }

    #[test]
    fn key_is_written_0600_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = LocalKey::load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = LocalKey::load_or_generate(&path).unwrap();
        assert_eq!(key.public_key_der(), again.public_key_der());
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn csr_names_exactly_the_id() {
        let td = TrustDomain::new("pilotfish.local").unwrap();
        let key = LocalKey::generate().unwrap();
        let id = SpiffeId::node(&td, "vm-b").unwrap();
        let pem = key.csr_pem(&id).unwrap();
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .unwrap();
        csr.verify_signature().unwrap();
        let sans: Vec<String> = csr
            .requested_extensions()
            .unwrap()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) => Some(
                    s.general_names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(sans, vec!["URI(spiffe://pilotfish.local/node/vm-b)"]);
    }
}
