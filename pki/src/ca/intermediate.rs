//! Signing CAs per discovery replica: each replica signs with its own intermediate under the
//! one root, so the root key stays where it is kept and a replica holds only its own key.
//!
//! 1. [`request_intermediate`] (`pilotfish-discovery ca intermediate`, on the replica) makes an
//!    ECDSA P-256 key and a CSR asking for an intermediate of the trust domain.
//! 2. [`sign_intermediate`] (`ca sign-intermediate`, where the root key is) checks the CSR and
//!    signs it: CA=true with path length 0, keyCertSign+cRLSign, the trust domain's URI SAN,
//!    no longer than the root lives. It returns the intermediate followed by the root, which is
//!    what `CaOptions::cert_file` reads as a whole chain.
//!
//! As for leaves, the CSR contributes only its public key and its common name; everything
//! else is set here, and a CSR asking for anything beyond an intermediate of this trust
//! domain is refused rather than trimmed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use pilotfish_durable as durable;

use super::{check_csr, load_signer, random_serial, CaError, CsrRejected, BACKDATE, MIN_TTL};
use crate::keys::{self, cert_pem};
use crate::private_file;
use crate::spiffe::{validate_name, TrustDomain};

/// Default lifetime of a replica's intermediate (capped by the root's).
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// File names `request_intermediate` writes in its directory.
pub const INTERMEDIATE_KEY: &str = "intermediate.key";
pub const INTERMEDIATE_CSR: &str = "intermediate.csr";
/// RFC 5280's upper bound for a common name.
const MAX_COMMON_NAME: usize = 64;
const MAX_REPLICA_NAME: usize = 32;

/// An intermediate could not be requested or signed.
#[derive(Debug, thiserror::Error)]
pub enum IntermediateError {
    #[error("--name: {0}")]
    BadName(String),
    #[error("{}: already exists; a replica's key is never overwritten (remove it or pick another directory)", .0.display())]
    KeyExists(PathBuf),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{}: this is an intermediate, not a root; sign with the root's certificate and key", .0.display())]
    NotRoot(PathBuf),
    #[error("refused the intermediate CSR: {0}")]
    Rejected(#[from] CsrRejected),
}

/// What `request_intermediate` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntermediateRequest {
    pub key_file: PathBuf,
    pub csr_file: PathBuf,
    pub common_name: String,
}

/// A signed intermediate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIntermediate {
    /// The intermediate, then the root that signed it, PEM: usable as `[ca] cert_file` alone.
    pub chain_pem: String,
    pub common_name: String,
    pub not_after: SystemTime,
    /// The intermediate's serial, hex.
    pub serial: String,
}

/// Makes a replica's key and intermediate CSR in `dir` (`intermediate.key`, mode 0600, and
/// `intermediate.csr`). Needs no root; refuses to overwrite an existing key.
pub fn request_intermediate(
    dir: &Path,
    trust_domain: &TrustDomain,
    name: &str,
) -> Result<IntermediateRequest, IntermediateError> {
    validate_name(name).map_err(|e| IntermediateError::BadName(e.to_string()))?;
    if name.len() > MAX_REPLICA_NAME {
        return Err(IntermediateError::BadName(format!(
            "at most {MAX_REPLICA_NAME} characters (it goes into the subject's common name)"
        )));
    }
    let key_file = dir.join(INTERMEDIATE_KEY);
    let csr_file = dir.join(INTERMEDIATE_CSR);
    if key_file.exists() {
        return Err(IntermediateError::KeyExists(key_file));
    }
    durable::create_dir_all(dir, durable::PRIVATE_DIR_MODE)
        .map_err(private_file::at(dir))
        .map_err(CaError::from)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    // A random tag keeps subjects distinct when a replica is re-keyed under the same name.
    let tag = u32::from_be_bytes(rand::random::<[u8; 4]>());
    let common_name = format!("Pilotfish intermediate {name} {tag:08x}");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pilotfish");
    dn.push(DnType::CommonName, common_name.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        trust_domain.uri().try_into().map_err(CaError::Generate)?,
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(CaError::Generate)?;
    // Key first: a CSR on disk always has its key next to it.
    durable::write_atomic(
        &key_file,
        key.serialize_pem().as_bytes(),
        durable::SECRET_MODE,
    )
    .map_err(private_file::at(&key_file))
    .map_err(CaError::from)?;
    durable::write_atomic(&csr_file, csr.as_bytes(), durable::PUBLIC_MODE)
        .map_err(private_file::at(&csr_file))
        .map_err(CaError::from)?;
    Ok(IntermediateRequest {
        key_file,
        csr_file,
        common_name,
    })
}

/// Checks `csr_pem` and signs it as an intermediate with the root in `root_cert`/`root_key`.
/// The lifetime is `ttl`, cut to the root's.
pub fn sign_intermediate(
    root_cert: &Path,
    root_key: &Path,
    trust_domain: &TrustDomain,
    csr_pem: &str,
    ttl: Duration,
) -> Result<SignedIntermediate, IntermediateError> {
    let signer = load_signer(root_cert, root_key, None)?;
    if !signer.chain_pem.is_empty() {
        return Err(IntermediateError::NotRoot(root_cert.to_owned()));
    }
    if ttl < MIN_TTL {
        return Err(CsrRejected::TtlTooShort.into());
    }
    let td_uri = trust_domain.uri();
    let td_san = SanType::URI(td_uri.clone().try_into().map_err(CaError::Generate)?);
    // Size, parse, P-256, self-signature, and no SAN but the trust domain's URI.
    let public_key = check_csr(csr_pem, std::slice::from_ref(&td_san))?;
    let common_name = check_intermediate_request(csr_pem, &td_uri)?;

    let now = SystemTime::now();
    let not_after = (now + ttl).min(signer.not_after);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pilotfish");
    dn.push(DnType::CommonName, common_name.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![td_san];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(not_after);
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&public_key, &signer.issuer)
        .map_err(CsrRejected::Signing)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der())
        .map_err(|_| CsrRejected::Signing(rcgen::Error::CouldNotParseCertificate))?;
    let serial = parsed.raw_serial_as_string().replace(':', "");
    let not_after = keys::unix_to_system(parsed.validity().not_after.timestamp());
    tracing::info!(subject = %common_name, serial, "signed an intermediate");
    Ok(SignedIntermediate {
        chain_pem: format!("{}{}", cert.pem(), cert_pem(&signer.root)),
        common_name,
        not_after,
        serial,
    })
}

/// The intermediate-specific rules, on top of [`check_csr`]: the CSR must ask for a CA with
/// path length 0 (a leaf CSR sent here by mistake is refused, not promoted), name the trust
/// domain, and carry a plain common name. Returns the common name.
fn check_intermediate_request(csr_pem: &str, td_uri: &str) -> Result<String, CsrRejected> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CsrRejected::Unparseable(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrRejected::Unparseable(e.to_string()))?;
    let mut ca = None;
    let mut names_td = false;
    for attr in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &req.extensions {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => {
                    if ca.is_some() {
                        return Err(CsrRejected::MalformedExtension);
                    }
                    ca = Some((bc.ca, bc.path_len_constraint));
                }
                ParsedExtension::SubjectAlternativeName(_) => names_td = true,
                // Name constraints or policies would be the CSR setting rules for the root.
                ParsedExtension::NameConstraints(_)
                | ParsedExtension::PolicyConstraints(_)
                | ParsedExtension::CertificatePolicies(_)
                | ParsedExtension::InhibitAnyPolicy(_)
                | ParsedExtension::PolicyMappings(_) => {
                    return Err(CsrRejected::NotAnIntermediate(format!(
                        "it asks for extension {}, which this CA does not issue",
                        ext.oid
                    )));
                }
                // Key usages and EKUs are set by the CA, as for leaves.
                _ => {}
            }
        }
    }
    match ca {
        Some((true, Some(0))) => {}
        Some((true, None)) => {
            return Err(CsrRejected::NotAnIntermediate(
                "it asks for an unconstrained CA; replicas get path length 0".into(),
            ))
        }
        Some((true, Some(n))) => {
            return Err(CsrRejected::NotAnIntermediate(format!(
                "it asks for path length {n}; replicas get 0"
            )))
        }
        _ => {
            return Err(CsrRejected::NotAnIntermediate(
                "it does not ask for a CA (basicConstraints CA:true); is this a host's CSR?".into(),
            ))
        }
    }
    if !names_td {
        return Err(CsrRejected::NotAnIntermediate(format!(
            "it does not name the trust domain ({td_uri})"
        )));
    }
    let subject = &csr.certification_request_info.subject;
    let mut names = subject.iter_common_name();
    let cn = names
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let plain = !cn.is_empty()
        && cn.len() <= MAX_COMMON_NAME
        && cn
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '_' | '-'));
    if !plain || names.next().is_some() {
        return Err(CsrRejected::NotAnIntermediate(format!(
            "its subject needs exactly one common name of at most {MAX_COMMON_NAME} letters, \
             digits, spaces, '.', '_' or '-'"
        )));
    }
    Ok(cn)
}

#[cfg(test)]
mod tests;
