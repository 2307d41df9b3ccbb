//! The mesh CA that discovery runs: where its signing key comes from, which roots it asks
//! peers to trust, and the rules for what it signs.
//!
//! # On-disk layout (`<state_dir>/ca/`)
//!
//! ```text
//! ca/
//!   root.pem        the signing root, created on first start (unless the operator supplies one)
//!   root.key        its ECDSA P-256 key, mode 0600
//!   next/root.pem   a successor root, while a rotation is prepared (trusted, not yet signing)
//!   next/root.key
//!   roots.d/*.pem   more trusted roots, bundle only: the previous root after a switch, or
//!                   roots the operator adds by hand
//! ```
//!
//! With `CaOptions::cert_file`/`key_file` the operator's certificate signs instead of
//! `root.pem`: a root, or an intermediate whose `chain_file` holds the rest of the chain up to
//! and including its root. Intermediates go to callers in [`Issued::chain_pem`].
//!
//! The trust bundle is: the signing chain's root, `next/root.pem`, every `roots.d/*.pem`, and
//! `CaOptions::extra_roots`, without duplicates.
//!
//! # Root rotation (no traffic lost)
//!
//! 1. [`Ca::prepare_rotation`] (`pilotfish-discovery ca prepare`) writes `next/`. Discovery,
//!    once it reloads, serves old + new root in every bundle; agents pick the bundle up on their
//!    next renewal or bundle poll.
//! 2. Wait until every host has the new bundle (at most one renewal interval).
//! 3. [`Ca::switch_to_next`] moves the old root to `roots.d/previous-<fingerprint>.pem` (still
//!    trusted) and makes `next/` the signing root. New certificates chain to the new root;
//!    old ones still verify against the old root in the bundle.
//! 4. Wait at least one maximum leaf TTL (24h by default), so every old leaf has been replaced.
//! 5. [`Ca::retire_root`] deletes `roots.d/previous-….pem`; the bundle holds only the new root.
//!
//! Every step is a file change that can be undone by hand, and [`Ca::trusted_roots`] shows the
//! state. Discovery picks changes up by calling [`Ca::load_or_create`] again (on start, SIGHUP
//! or a watch) and swapping its `Arc<Ca>`. For an operator-supplied CA the same steps are done by
//! hand: add the new root to `roots.d/`, point `cert_file`/`key_file` at the new CA, then move
//! the old root out of `roots.d/` a leaf TTL later.
//!
//! # Signing rules
//!
//! The identity in a certificate is the `allowed` ID the caller was authorised for, never what
//! the CSR asks: the CSR contributes only its public key (after its self-signature verifies). A
//! CSR whose SANs are anything but the allowed names is refused (CVE-2022-40716), and so is any
//! key other than ECDSA P-256. Issued leaves have an empty subject, exactly one URI SAN
//! (critical), CA=false, key usage digitalSignature+keyEncipherment, EKU serverAuth+clientAuth,
//! a random 128-bit serial, `not_before` one minute in the past for clock skew, and a short TTL
//! that never outlives the signing CA. Requested key usages, EKUs, CA flags and TTLs are ignored.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use pilotfish_durable as durable;

use crate::keys::{self, cert_pem, pem_certs};
use crate::private_file::{self, FileError};
use crate::spiffe::{Role, SpiffeId, TrustDomain};

/// Default lifetime of workload and node certificates.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a root the CA makes itself.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far `not_before` is set in the past, for hosts whose clocks run behind.
/// The shortest lifetime the CA issues. Seconds-long certificates are for rotation tests;
/// operators should keep hours.
pub const MIN_TTL: Duration = Duration::from_secs(5);
pub const BACKDATE: Duration = Duration::from_secs(60);
/// How long a CRL is valid. Envoy refuses every certificate of a CA whose CRL has expired, so
/// this is long; revocations do not wait for it, since discovery pushes each new CRL at once.
pub const CRL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest CSR accepted, in bytes of PEM (a P-256 CSR is about 500).
const MAX_CSR_PEM: usize = 16 * 1024;

/// Where the CA's key comes from and what else it trusts.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// An operator-supplied signing certificate (root or intermediate), PEM. With `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The key of `cert_file`, PEM (PKCS#8).
    pub key_file: Option<PathBuf>,
    /// For an intermediate: the certificates above it, up to and including the root.
    pub chain_file: Option<PathBuf>,
    /// More roots to put in the bundle, besides `ca/roots.d/*.pem`.
    pub extra_roots: Vec<PathBuf>,
    /// Lifetime of workload and node certificates when the caller does not ask for one.
    pub workload_ttl: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            chain_file: None,
            extra_roots: Vec::new(),
            workload_ttl: DEFAULT_WORKLOAD_TTL,
        }
    }
}

/// The CA could not be set up from its files.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA configuration: {0}")]
    Config(&'static str),
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: not a usable private key", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{}: the key does not belong to the certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("generating the root CA failed")]
    Generate(#[source] rcgen::Error),
    #[error("root rotation: {0}")]
    Rotation(String),
}

/// Why a CSR was refused. The messages are meant for the host's operator.
#[derive(Debug, thiserror::Error)]
pub enum CsrRejected {
    #[error("the CSR is not a PEM CERTIFICATE REQUEST: {0}")]
    Unparseable(String),
    #[error("the CSR is larger than {MAX_CSR_PEM} bytes")]
    TooLarge,
    #[error("the CSR's self-signature does not verify")]
    BadSignature,
    #[error("the CSR's key is not ECDSA P-256")]
    UnsupportedKey,
    #[error("the CSR asks for {requested}, but the caller may only hold {allowed}")]
    SanNotAllowed { requested: String, allowed: String },
    #[error("the CSR names {0} more than once")]
    RepeatedSan(String),
    #[error("the CSR has a malformed extension request")]
    MalformedExtension,
    #[error("{id} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("{0} cannot be issued through this call")]
    RoleNotIssuable(String),
    #[error("the requested lifetime must be at least 5 seconds")]
    TtlTooShort,
    #[error("the CSR is not for a replica's intermediate: {0}")]
    NotAnIntermediate(String),
    #[error("signing the certificate failed")]
    Signing(#[source] rcgen::Error),
}

/// A CRL could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("{0} is not a hex serial number")]
    BadSerial(String),
    #[error("signing the CRL failed (an operator-supplied CA needs the cRLSign key usage)")]
    Signing(#[source] rcgen::Error),
}

/// A signed certificate and what the holder needs to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// Intermediates between the leaf and a root, leaf side first; empty when a root signs.
    /// Serve `cert_pem + chain_pem` as the TLS certificate chain.
    pub chain_pem: String,
    /// Every root to trust, PEM.
    pub bundle_pem: String,
    /// When the leaf expires (second precision, as in the certificate).
    pub not_after: SystemTime,
    /// The leaf's serial number, hex, for logs.
    pub serial: String,
}

/// One trusted root, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRoot {
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    pub subject: String,
    pub not_after: SystemTime,
    /// The file it came from.
    pub source: PathBuf,
    /// Whether new certificates chain to it.
    pub signing: bool,
}

/// The mesh CA. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    signer_not_after: SystemTime,
    /// SHA-256 of the signing certificate, hex: names this signer's CRL among replicas'.
    signer_fingerprint: String,
    chain_pem: String,
    bundle: Vec<CertificateDer<'static>>,
    bundle_pem: String,
    roots: Vec<TrustedRoot>,
    workload_ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots)
            .field("workload_ttl", &self.workload_ttl)
            .finish_non_exhaustive()
    }
}

fn ca_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ca")
}

/// Roots other replicas trust, as discovery's shared store copies them into `ca/roots.d/`:
/// `shared-<fingerprint>.pem`.
pub const SHARED_ROOT_PREFIX: &str = "shared-";

/// `<state_dir>/ca/roots.d`: roots trusted besides the signing one.
pub fn roots_dir(state_dir: &Path) -> PathBuf {
    ca_dir(state_dir).join("roots.d")
}

impl Ca {
    /// Loads the CA from `<state_dir>/ca` (or the operator's files in `opts`), creating a
    /// self-signed root there on first start.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: &TrustDomain,
        opts: &CaOptions,
    ) -> Result<Self, CaError> {
        let dir = ca_dir(state_dir);
        durable::create_dir_all(&dir, durable::PRIVATE_DIR_MODE).map_err(private_file::at(&dir))?;
        let (cert_path, key_path, chain_path) = match (&opts.cert_file, &opts.key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone(), opts.chain_file.clone()),
            (None, None) => {
                if opts.chain_file.is_some() {
                    return Err(CaError::Config("chain_file needs cert_file and key_file"));
                }
                let (cert, key) = (dir.join("root.pem"), dir.join("root.key"));
                finish_interrupted_switch(&dir)?;
                if !cert.exists() && !key.exists() {
                    create_root(&cert, &key, trust_domain)?;
                    tracing::info!(cert = %cert.display(), "created a new mesh root CA");
                }
                (cert, key, None)
            }
            _ => {
                return Err(CaError::Config(
                    "cert_file and key_file must be set together",
                ))
            }
        };
        let signer = load_signer(&cert_path, &key_path, chain_path.as_deref())?;

        let mut sources = vec![(signer.root.clone(), cert_path.clone(), true)];
        let mut extra_files = Vec::new();
        let next = dir.join("next").join("root.pem");
        if next.exists() {
            extra_files.push(next);
        }
        extra_files.extend(pem_files_in(&dir.join("roots.d"))?);
        extra_files.extend(opts.extra_roots.iter().cloned());
        for path in extra_files {
            for der in read_ca_certs(&path)? {
                sources.push((der, path.clone(), false));
            }
        }
        let mut bundle: Vec<CertificateDer<'static>> = Vec::new();
        let mut roots = Vec::new();
        for (der, source, signing) in sources {
            if bundle.iter().any(|d| d.as_ref() == der.as_ref()) {
                continue;
            }
            roots.push(describe_root(&der, source, signing)?);
            bundle.push(der);
        }
        // The signing root first, then the others by fingerprint: replicas that trust the
        // same roots hand out the same bundle, whatever their files are called.
        let mut rest: Vec<_> = roots.drain(1..).zip(bundle.drain(1..)).collect();
        rest.sort_by(|a, b| a.0.fingerprint.cmp(&b.0.fingerprint));
        for (root, der) in rest {
            roots.push(root);
            bundle.push(der);
        }
        let bundle_pem = bundle.iter().map(|d| cert_pem(d)).collect();
        Ok(Self {
            trust_domain: trust_domain.clone(),
            issuer: signer.issuer,
            signer_not_after: signer.not_after,
            signer_fingerprint: signer.fingerprint,
            chain_pem: signer.chain_pem,
            bundle,
            bundle_pem,
            roots,
            workload_ttl: opts.workload_ttl,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Every root to trust, PEM: what agents and Envoy validate peers against.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The same roots as DER, for a rustls root store.
    pub fn bundle_der(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The roots in the bundle, and which one signs.
    pub fn trusted_roots(&self) -> &[TrustedRoot] {
        &self.roots
    }

    /// (fingerprint, PEM) of every root in the bundle that did not come from another replica
    /// (`roots.d/shared-*.pem`, which discovery's shared store writes): what this replica
    /// shares with the others.
    pub fn own_roots_pem(&self) -> Vec<(String, String)> {
        self.roots
            .iter()
            .zip(&self.bundle)
            .filter(|(root, _)| {
                !root
                    .source
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(SHARED_ROOT_PREFIX))
            })
            .map(|(root, der)| (root.fingerprint.clone(), cert_pem(der)))
            .collect()
    }

    /// The SHA-256 fingerprint (hex) of the signing certificate: the root's, or a replica's
    /// intermediate's.
    pub fn signer_fingerprint(&self) -> &str {
        &self.signer_fingerprint
    }

    /// When the signing CA certificate expires; no leaf outlives it.
    pub fn signer_not_after(&self) -> SystemTime {
        self.signer_not_after
    }

    /// Signs a workload or node certificate for `allowed`, which the caller has already
    /// authorised (the node's own ID, or a service placed on that node). `ttl` defaults to
    /// `CaOptions::workload_ttl`.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        allowed: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<Issued, CsrRejected> {
        if *allowed.role() == Role::Discovery {
            // Role separation: a host must never obtain the control plane's identity.
            return Err(CsrRejected::RoleNotIssuable(allowed.uri()));
        }
        self.sign(csr_pem, allowed, ttl)
    }

    /// Signs discovery's own serving certificate: URI `spiffe://<td>/discovery` and DNS
    /// `discovery.<td>` (the name agents verify). The key is made by discovery itself
    /// ([`crate::LocalKey`]); only its CSR comes here.
    pub fn issue_server_cert(
        &self,
        csr_pem: &str,
        ttl: Option<Duration>,
    ) -> Result<Issued, CsrRejected> {
        self.sign(csr_pem, &SpiffeId::discovery(&self.trust_domain), ttl)
    }

    fn sign(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<Issued, CsrRejected> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CsrRejected::ForeignTrustDomain {
                id: id.uri(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        let ttl = ttl.unwrap_or(self.workload_ttl);
        if ttl < MIN_TTL {
            return Err(CsrRejected::TtlTooShort);
        }
        let sans = keys::requested_sans(id).map_err(CsrRejected::Signing)?;
        let public_key = check_csr(csr_pem, &sans)?;

        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.signer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // Backdate for clock skew, but never by more than a quarter of the lifetime: renewal
        // is scheduled from not_before, and a seconds-long test certificate would otherwise be
        // "due" the moment it is issued.
        params.not_before = OffsetDateTime::from(now - BACKDATE.min(ttl / 4));
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(CsrRejected::Signing)?;
        let der = cert.der();
        let info = keys::parse_cert_der(der).map_err(|e| {
            // Our own output failed to parse back: a bug, not the caller's fault.
            tracing::error!(error = %e, "issued certificate does not parse");
            CsrRejected::Signing(rcgen::Error::CouldNotParseCertificate)
        })?;
        let serial = x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
            .unwrap_or_default();
        tracing::info!(id = %id, serial, "issued certificate");
        Ok(Issued {
            cert_pem: cert.pem(),
            chain_pem: self.chain_pem.clone(),
            bundle_pem: self.bundle_pem.clone(),
            not_after: info.not_after,
            serial,
        })
    }

    /// A CRL signed by the signing CA that lists `revoked` (serial as lower-case hex, when it
    /// was revoked), PEM. Peers' Envoys get it with the bundle over SDS and refuse the listed
    /// leaves. It is valid from a minute ago (clock skew) for [`CRL_VALIDITY`], but never past
    /// the signing CA; discovery signs a fresh one whenever the list changes.
    pub fn sign_crl(
        &self,
        revoked: &[(String, SystemTime)],
        now: SystemTime,
    ) -> Result<String, CrlError> {
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for (serial, at) in revoked {
            let bytes = unhex(serial).ok_or_else(|| CrlError::BadSerial(serial.clone()))?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: OffsetDateTime::from(*at),
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            });
        }
        let crl_number = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let this_update = now - BACKDATE;
        let params = CertificateRevocationListParams {
            this_update: OffsetDateTime::from(this_update),
            next_update: OffsetDateTime::from((now + CRL_VALIDITY).min(self.signer_not_after)),
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(CrlError::Signing)?;
        crl.pem().map_err(CrlError::Signing)
    }

    /// Rotation step 1: makes a successor root in `ca/next/`. It joins the bundle on the next
    /// load; the current root keeps signing. Returns the new root's path.
    pub fn prepare_rotation(
        state_dir: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<PathBuf, CaError> {
        let next = ca_dir(state_dir).join("next");
        let (cert, key) = (next.join("root.pem"), next.join("root.key"));
        if cert.exists() || key.exists() {
            return Err(CaError::Rotation(format!(
                "{} already holds a prepared root; switch to it or delete it first",
                next.display()
            )));
        }
        durable::create_dir_all(&next, durable::PRIVATE_DIR_MODE)
            .map_err(private_file::at(&next))?;
        create_root(&cert, &key, trust_domain)?;
        tracing::info!(cert = %cert.display(), "prepared the next mesh root");
        Ok(cert)
    }

    /// Rotation step 3: the prepared root starts signing; the old root moves to
    /// `roots.d/previous-<fingerprint>.pem`, so it stays trusted until
    /// [`Ca::retire_root`]. Returns that file's path.
    pub fn switch_to_next(state_dir: &Path) -> Result<PathBuf, CaError> {
        let dir = ca_dir(state_dir);
        let next = dir.join("next");
        let (next_cert, next_key) = (next.join("root.pem"), next.join("root.key"));
        if !next_cert.exists() || !next_key.exists() {
            return Err(CaError::Rotation(
                "no prepared root in ca/next; prepare a rotation first".into(),
            ));
        }
        // Check the prepared root before touching anything.
        load_signer(&next_cert, &next_key, None)?;
        let (cert, key) = (dir.join("root.pem"), dir.join("root.key"));
        let old = fs::read(&cert).map_err(private_file::at(&cert))?;
        let old_der =
            CertificateDer::from_pem_slice(&old).map_err(|e| CaError::BadCertificate {
                path: cert.clone(),
                reason: e.to_string(),
            })?;
        let roots_d = dir.join("roots.d");
        durable::create_dir_all(&roots_d, durable::PRIVATE_DIR_MODE)
            .map_err(private_file::at(&roots_d))?;
        let previous = roots_d.join(format!("previous-{}.pem", &fingerprint(&old_der)[..16]));
        durable::write_atomic(&previous, &old, durable::PUBLIC_MODE)
            .map_err(private_file::at(&previous))?;
        // Certificate first, then key, each rename durable before the next: a crash in
        // between leaves root.pem with next/root.key still in place, which
        // `finish_interrupted_switch` completes on the next load; never the old certificate
        // with the new key.
        durable::rename(&next_cert, &cert).map_err(private_file::at(&cert))?;
        durable::rename(&next_key, &key).map_err(private_file::at(&key))?;
        durable::remove_dir(&next).map_err(private_file::at(&next))?;
        tracing::info!(previous = %previous.display(), "switched signing to the new root");
        Ok(previous)
    }

    /// Rotation step 5: stops trusting the root with this SHA-256 fingerprint (hex, or a
    /// unique prefix of at least 16 digits) by deleting its file from `roots.d/`. Refuses the
    /// signing root and the prepared one.
    pub fn retire_root(state_dir: &Path, fingerprint_prefix: &str) -> Result<PathBuf, CaError> {
        let prefix = fingerprint_prefix.to_ascii_lowercase();
        if prefix.len() < 16 {
            return Err(CaError::Rotation(
                "give at least 16 hex digits of the fingerprint".into(),
            ));
        }
        let roots_d = ca_dir(state_dir).join("roots.d");
        let mut matches = Vec::new();
        for path in pem_files_in(&roots_d)? {
            let ders = read_ca_certs(&path)?;
            if ders.iter().any(|d| fingerprint(d).starts_with(&prefix)) {
                if ders.len() > 1 {
                    return Err(CaError::Rotation(format!(
                        "{} holds several roots; edit it by hand",
                        path.display()
                    )));
                }
                matches.push(path);
            }
        }
        match matches.as_slice() {
            [one] => {
                durable::remove(one).map_err(private_file::at(one))?;
                tracing::info!(file = %one.display(), "retired a root");
                Ok(one.clone())
            }
            [] => Err(CaError::Rotation(format!(
                "no root in {} has fingerprint {prefix}",
                roots_d.display()
            ))),
            _ => Err(CaError::Rotation(format!(
                "fingerprint {prefix} matches several roots"
            ))),
        }
    }
}

/// The signing certificate and key, checked, with what sits above them.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
    fingerprint: String,
    /// Intermediates, signing certificate first; empty when the signer is a root.
    chain_pem: String,
    root: CertificateDer<'static>,
}

fn bad(path: &Path, reason: impl Into<String>) -> CaError {
    CaError::BadCertificate {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn load_signer(
    cert_path: &Path,
    key_path: &Path,
    chain_path: Option<&Path>,
) -> Result<Signer, CaError> {
    let cert_text = fs::read_to_string(cert_path).map_err(private_file::at(cert_path))?;
    let mut chain = pem_certs(&cert_text).map_err(|e| bad(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert_path, "no CERTIFICATE block"));
    }
    if let Some(path) = chain_path {
        let text = fs::read_to_string(path).map_err(private_file::at(path))?;
        chain.extend(pem_certs(&text).map_err(|e| bad(path, e.to_string()))?);
    }
    let key_text = fs::read_to_string(key_path).map_err(private_file::at(key_path))?;
    let key = KeyPair::from_pem(&key_text).map_err(|source| CaError::BadKey {
        path: key_path.to_owned(),
        source,
    })?;

    let chain_file = chain_path.unwrap_or(cert_path);
    let parsed = chain
        .iter()
        .map(|der| {
            X509Certificate::from_der(der)
                .map(|(_, c)| c)
                .map_err(|e| bad(chain_file, format!("not a valid certificate: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let signing = &parsed[0];
    if !signing.is_ca() {
        return Err(bad(
            cert_path,
            "not a CA certificate (basicConstraints CA is not true)",
        ));
    }
    if let Ok(Some(ku)) = signing.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(bad(cert_path, "its key usage does not allow keyCertSign"));
        }
    }
    if signing.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::KeyMismatch {
            key: key_path.to_owned(),
            cert: cert_path.to_owned(),
        });
    }
    let now = SystemTime::now();
    for cert in &parsed {
        if keys::unix_to_system(cert.validity().not_after.timestamp()) <= now {
            return Err(bad(
                chain_file,
                format!("certificate {} has expired", cert.subject()),
            ));
        }
    }
    // A root signs directly: anything after it in the files is not part of its chain.
    let len = if is_self_signed(signing) {
        1
    } else {
        parsed.len()
    };
    let (parsed, chain) = (&parsed[..len], &chain[..len]);
    // Walk up: each certificate must be signed by the next; the last must be a root.
    for pair in parsed.windows(2) {
        if pair[0].issuer().as_raw() != pair[1].subject().as_raw()
            || pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .is_err()
        {
            return Err(bad(
                chain_file,
                format!(
                    "{} is not signed by {}",
                    pair[0].subject(),
                    pair[1].subject()
                ),
            ));
        }
    }
    if !is_self_signed(&parsed[len - 1]) {
        return Err(bad(
            chain_file,
            "the chain must end with a self-signed root (put the intermediates and the root in chain_file)",
        ));
    }
    let chain_pem = chain[..len - 1].iter().map(|d| cert_pem(d)).collect();
    let not_after = keys::unix_to_system(signing.validity().not_after.timestamp());
    let issuer =
        Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| bad(cert_path, e.to_string()))?;
    let root = chain[len - 1].clone();
    Ok(Signer {
        fingerprint: fingerprint(&chain[0]),
        issuer,
        not_after,
        chain_pem,
        root,
    })
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.issuer().as_raw() == cert.subject().as_raw() && cert.verify_signature(None).is_ok()
}

/// Makes a self-signed ECDSA P-256 root for `trust_domain` and writes it (key 0600).
fn create_root(cert: &Path, key: &Path, trust_domain: &TrustDomain) -> Result<(), CaError> {
    let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pilotfish");
    // A distinct subject per root keeps path building unambiguous while two roots are trusted.
    let tag = u32::from_be_bytes(rand::random::<[u8; 4]>());
    let date = OffsetDateTime::from(now).date();
    dn.push(
        DnType::CommonName,
        format!("Pilotfish root {date} {tag:08x}"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        trust_domain.uri().try_into().map_err(CaError::Generate)?,
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(now + ROOT_TTL);
    params.serial_number = Some(random_serial());
    let root = params.self_signed(&key_pair).map_err(CaError::Generate)?;
    // Key first: a crash before the certificate is written leaves no root.pem, and the next
    // start makes a fresh pair rather than pairing a certificate with a missing key.
    durable::write_atomic(
        key,
        key_pair.serialize_pem().as_bytes(),
        durable::SECRET_MODE,
    )
    .map_err(private_file::at(key))?;
    durable::write_atomic(cert, root.pem().as_bytes(), durable::PUBLIC_MODE)
        .map_err(private_file::at(cert))?;
    Ok(())
}

/// Completes a `switch_to_next` that stopped between its two renames.
fn finish_interrupted_switch(dir: &Path) -> Result<(), CaError> {
    let next_key = dir.join("next").join("root.key");
    let next_cert = dir.join("next").join("root.pem");
    let cert = dir.join("root.pem");
    if next_key.exists() && !next_cert.exists() && cert.exists() {
        tracing::warn!("completing an interrupted root switch");
        let key = dir.join("root.key");
        durable::rename(&next_key, &key).map_err(private_file::at(&key))?;
        let next = dir.join("next");
        durable::remove_dir(&next).map_err(private_file::at(&next))?;
    }
    Ok(())
}

/// Checks a CSR against the names the caller may hold and returns its public key.
fn check_csr(
    csr_pem: &str,
    allowed: &[SanType],
) -> Result<rcgen::SubjectPublicKeyInfo, CsrRejected> {
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(CsrRejected::TooLarge);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CsrRejected::Unparseable(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrRejected::Unparseable(e.to_string()))?;
    let spki = &csr.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == OID_EC_P256);
    if !is_p256 {
        return Err(CsrRejected::UnsupportedKey);
    }
    csr.verify_signature()
        .map_err(|_| CsrRejected::BadSignature)?;

    let allowed_text: Vec<String> = allowed.iter().map(san_text).collect();
    let allowed_list = allowed_text.join(" and ");
    let mut seen: Vec<String> = Vec::new();
    // Every extension request attribute, not just the first, so nothing hides in a second one.
    for attr in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &req.extensions {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        let requested = general_name_text(name);
                        if !allowed_text.contains(&requested) {
                            return Err(CsrRejected::SanNotAllowed {
                                requested,
                                allowed: allowed_list,
                            });
                        }
                        if seen.contains(&requested) {
                            return Err(CsrRejected::RepeatedSan(requested));
                        }
                        seen.push(requested);
                    }
                }
                ParsedExtension::ParseError { .. } => {
                    return Err(CsrRejected::MalformedExtension);
                }
                // Key usages, EKUs, basic constraints and the rest are ignored: the CA sets
                // its own.
                _ => {}
            }
        }
    }
    rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| CsrRejected::UnsupportedKey)
}

/// How a SAN the CA issues is spelled in comparisons and messages.
fn san_text(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI {}", u.as_str()),
        SanType::DnsName(d) => format!("DNS {}", d.as_str()),
        other => format!("{other:?}"),
    }
}

/// How a requested SAN is spelled; byte-exact, no case folding.
fn general_name_text(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI {u}"),
        GeneralName::DNSName(d) => format!("DNS {d}"),
        GeneralName::RFC822Name(m) => format!("email {m}"),
        GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
            Ok(v4) => format!("IP {}", std::net::Ipv4Addr::from(v4)),
            Err(_) => match <[u8; 16]>::try_from(*ip) {
                Ok(v6) => format!("IP {}", std::net::Ipv6Addr::from(v6)),
                Err(_) => "a malformed IP address".to_owned(),
            },
        },
        other => other.to_string(),
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = rand::random::<[u8; 16]>();
    // Positive and a full 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 40 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pem_files_in(dir: &Path) -> Result<Vec<PathBuf>, CaError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(private_file::at(dir)(e).into()),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(private_file::at(dir))?.path();
        if path.extension().is_some_and(|e| e == "pem") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads a PEM file of CA certificates for the bundle.
fn read_ca_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = fs::read_to_string(path).map_err(private_file::at(path))?;
    let ders = pem_certs(&text).map_err(|e| bad(path, e.to_string()))?;
    if ders.is_empty() {
        return Err(bad(path, "no CERTIFICATE block"));
    }
    for der in &ders {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| bad(path, format!("not a valid certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(bad(
                path,
                format!("{} is not a CA certificate", cert.subject()),
            ));
        }
    }
    Ok(ders)
}

fn describe_root(
    der: &CertificateDer<'static>,
    source: PathBuf,
    signing: bool,
) -> Result<TrustedRoot, CaError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| bad(&source, format!("not a valid certificate: {e}")))?;
    Ok(TrustedRoot {
        fingerprint: fingerprint(der),
        subject: cert.subject().to_string(),
        not_after: keys::unix_to_system(cert.validity().not_after.timestamp()),
        source,
        signing,
    })
}

mod intermediate;

pub use intermediate::{
    request_intermediate, sign_intermediate, IntermediateError, IntermediateRequest,
    SignedIntermediate, DEFAULT_INTERMEDIATE_TTL, INTERMEDIATE_CSR, INTERMEDIATE_KEY,
};

#[cfg(test)]
mod tests;
