use std::fs;
use std::os::unix::fs::PermissionsExt;

use rcgen::ExtendedKeyUsagePurpose;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::X509Certificate;

use super::*;
use crate::ca::{Ca, CaOptions, Issued};
use crate::keys::{pem_block, pem_certs, LocalKey};
use crate::spiffe::SpiffeId;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn td() -> TrustDomain {
    TrustDomain::new("pilotfish.local").unwrap()
}

/// A discovery state dir with its own root, as `ca bundle` would make it.
fn root_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    Ca::load_or_create(dir.path(), &td(), &CaOptions::default()).unwrap();
    let ca = dir.path().join("ca");
    (dir, ca.join("root.pem"), ca.join("root.key"))
}

fn sign(
    root: &(tempfile::TempDir, PathBuf, PathBuf),
    csr: &str,
) -> Result<SignedIntermediate, IntermediateError> {
    sign_intermediate(&root.1, &root.2, &td(), csr, DEFAULT_INTERMEDIATE_TTL)
}

/// A CSR built by hand, the way a careless or hostile requester could.
fn csr_with(is_ca: IsCa, sans: Vec<SanType>, cn: &str) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = is_ca;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn td_san(td: &str) -> SanType {
    SanType::URI(format!("spiffe://{td}").try_into().unwrap())
}

fn rejected(r: Result<SignedIntermediate, IntermediateError>) -> String {
    match r {
        Err(IntermediateError::Rejected(e)) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Verifies a leaf and its chain against `roots` only, as rustls does.
fn verify(issued: &Issued, roots: &[CertificateDer<'static>]) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d).unwrap().to_owned())
        .collect();
    let leaf = pem_certs(&issued.cert_pem).unwrap().remove(0);
    let intermediates = pem_certs(&issued.chain_pem).unwrap();
    webpki::EndEntityCert::try_from(&leaf)
        .unwrap()
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map(|_| ())
}

/// Makes an intermediate in a fresh dir, signs it with `root`, and loads a CA on it.
fn replica(root: &(tempfile::TempDir, PathBuf, PathBuf), name: &str) -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let req = request_intermediate(&dir.path().join("int"), &td(), name).unwrap();
    let signed = sign(root, &fs::read_to_string(&req.csr_file).unwrap()).unwrap();
    let cert = dir.path().join("int").join("intermediate.pem");
    fs::write(&cert, &signed.chain_pem).unwrap();
    let opts = CaOptions {
        cert_file: Some(cert),
        key_file: Some(req.key_file),
        ..CaOptions::default()
    };
    let ca = Ca::load_or_create(&dir.path().join("state"), &td(), &opts).unwrap();
    (dir, ca)
}

#[test]
fn request_writes_a_private_key_and_an_intermediate_csr() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("replica-a");
    let req = request_intermediate(&out, &td(), "replica-a").unwrap();
    assert_eq!(req.key_file, out.join(INTERMEDIATE_KEY));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&req.key_file), 0o600);
    assert_eq!(mode(&req.csr_file), 0o644);
    assert!(req
        .common_name
        .starts_with("Pilotfish intermediate replica-a "));

    let csr = fs::read_to_string(&req.csr_file).unwrap();
    let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
    let (_, parsed) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
    parsed.verify_signature().unwrap();
    assert_eq!(
        check_intermediate_request(&csr, "spiffe://pilotfish.local").unwrap(),
        req.common_name
    );

    let again = request_intermediate(&out, &td(), "replica-a").unwrap_err();
    assert!(matches!(again, IntermediateError::KeyExists(_)), "{again}");
    assert!(matches!(
        request_intermediate(&out, &td(), "Bad Name"),
        Err(IntermediateError::BadName(_))
    ));
}

#[test]
fn signed_intermediate_is_a_pathlen_0_ca_under_the_root() {
    let root = root_dir();
    let dir = tempfile::tempdir().unwrap();
    let req = request_intermediate(dir.path(), &td(), "replica-a").unwrap();
    let signed = sign(&root, &fs::read_to_string(&req.csr_file).unwrap()).unwrap();
    let certs = pem_certs(&signed.chain_pem).unwrap();
    assert_eq!(certs.len(), 2, "intermediate then root");
    let root_der = pem_certs(&fs::read_to_string(&root.1).unwrap())
        .unwrap()
        .remove(0);
    assert_eq!(certs[1], root_der);

    let (_, int) = X509Certificate::from_der(&certs[0]).unwrap();
    let (_, r) = X509Certificate::from_der(&root_der).unwrap();
    int.verify_signature(Some(r.public_key())).unwrap();
    assert_eq!(int.issuer(), r.subject());
    let bc = int.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca && bc.path_len_constraint == Some(0));
    let ku = int.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert!(int.subject().to_string().contains(&req.common_name));
    assert!(int.validity().not_after <= r.validity().not_after);
    let san = int.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names.len(), 1);
    assert_eq!(
        san.general_names[0].to_string(),
        "URI(spiffe://pilotfish.local)"
    );
}

#[test]
fn lifetime_never_outlives_the_root() {
    let root = root_dir();
    let dir = tempfile::tempdir().unwrap();
    let req = request_intermediate(dir.path(), &td(), "replica-a").unwrap();
    let csr = fs::read_to_string(&req.csr_file).unwrap();
    let long = sign_intermediate(&root.1, &root.2, &td(), &csr, 100 * 365 * DAY).unwrap();
    let root_der = pem_certs(&fs::read_to_string(&root.1).unwrap()).unwrap();
    let (_, r) = x509_parser::parse_x509_certificate(&root_der[0]).unwrap();
    assert_eq!(
        long.not_after,
        keys::unix_to_system(r.validity().not_after.timestamp())
    );
    let short = sign_intermediate(&root.1, &root.2, &td(), &csr, 30 * DAY).unwrap();
    assert!(short.not_after <= SystemTime::now() + 30 * DAY);
}

#[test]
fn leaves_from_two_replicas_verify_against_the_root_alone() {
    let root = root_dir();
    let root_ders = pem_certs(&fs::read_to_string(&root.1).unwrap()).unwrap();
    let (_a_dir, a) = replica(&root, "replica-a");
    let (_b_dir, b) = replica(&root, "replica-b");
    for (ca, node) in [(&a, "vm-a"), (&b, "vm-b")] {
        assert_eq!(
            ca.bundle_der(),
            &root_ders[..],
            "the bundle is the root only"
        );
        let id = SpiffeId::node(&td(), node).unwrap();
        let key = LocalKey::generate().unwrap();
        let issued = ca
            .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
            .unwrap();
        assert_eq!(
            pem_certs(&issued.chain_pem).unwrap().len(),
            1,
            "the intermediate"
        );
        verify(&issued, &root_ders).unwrap();
        // Without the intermediate there is no path: it has to travel with the leaf.
        let bare = Issued {
            chain_pem: String::new(),
            ..issued.clone()
        };
        assert!(verify(&bare, &root_ders).is_err());
    }
    // A different root does not accept them.
    let other = root_dir();
    let other_ders = pem_certs(&fs::read_to_string(&other.1).unwrap()).unwrap();
    let id = SpiffeId::node(&td(), "vm-a").unwrap();
    let key = LocalKey::generate().unwrap();
    let issued = a
        .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
        .unwrap();
    assert!(verify(&issued, &other_ders).is_err());
}

#[test]
fn refuses_csrs_that_ask_for_more_than_an_intermediate() {
    let root = root_dir();
    let td_ok = || vec![td_san("pilotfish.local")];
    let pathlen0 = || IsCa::Ca(BasicConstraints::Constrained(0));

    let e = rejected(sign(
        &root,
        &csr_with(pathlen0(), vec![td_san("evil.example")], "x"),
    ));
    assert!(e.contains("spiffe://evil.example"), "{e}");
    let e = rejected(sign(
        &root,
        &csr_with(
            pathlen0(),
            vec![td_san("pilotfish.local"), td_san("evil.example")],
            "x",
        ),
    ));
    assert!(e.contains("spiffe://evil.example"), "{e}");

    let e = rejected(sign(&root, &csr_with(IsCa::NoCa, td_ok(), "x")));
    assert!(e.contains("does not ask for a CA"), "{e}");
    let e = rejected(sign(&root, &csr_with(IsCa::ExplicitNoCa, td_ok(), "x")));
    assert!(e.contains("does not ask for a CA"), "{e}");
    let e = rejected(sign(
        &root,
        &csr_with(IsCa::Ca(BasicConstraints::Unconstrained), td_ok(), "x"),
    ));
    assert!(e.contains("unconstrained"), "{e}");
    let e = rejected(sign(
        &root,
        &csr_with(IsCa::Ca(BasicConstraints::Constrained(1)), td_ok(), "x"),
    ));
    assert!(e.contains("path length 1"), "{e}");
    let e = rejected(sign(&root, &csr_with(pathlen0(), vec![], "x")));
    assert!(e.contains("trust domain"), "{e}");
    let e = rejected(sign(&root, &csr_with(pathlen0(), td_ok(), "bad\u{7f}name")));
    assert!(e.contains("common name"), "{e}");

    // A host's leaf CSR is refused, never promoted to a CA.
    let id = SpiffeId::node(&td(), "vm-a").unwrap();
    let leaf = LocalKey::generate().unwrap().csr_pem(&id).unwrap();
    assert!(matches!(
        sign(&root, &leaf),
        Err(IntermediateError::Rejected(
            CsrRejected::SanNotAllowed { .. }
        ))
    ));

    // A flipped bit in the signature.
    let good = csr_with(pathlen0(), td_ok(), "Pilotfish intermediate r");
    let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    assert!(matches!(
        sign(&root, &pem_block("CERTIFICATE REQUEST", &der)),
        Err(IntermediateError::Rejected(CsrRejected::BadSignature))
    ));
    // The untampered one signs, and EKUs it asked for are not copied.
    let mut params = CertificateParams::default();
    params.is_ca = pathlen0();
    params.subject_alt_names = td_ok();
    params.distinguished_name.push(DnType::CommonName, "r");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let signed = sign(&root, &csr).unwrap();
    let der = pem_certs(&signed.chain_pem).unwrap().remove(0);
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    assert!(c.extended_key_usage().unwrap().is_none());
}

#[test]
fn only_a_root_signs_intermediates() {
    let root = root_dir();
    let dir = tempfile::tempdir().unwrap();
    let req = request_intermediate(dir.path(), &td(), "replica-a").unwrap();
    let signed = sign(&root, &fs::read_to_string(&req.csr_file).unwrap()).unwrap();
    let chain = dir.path().join("chain.pem");
    fs::write(&chain, &signed.chain_pem).unwrap();
    let other = request_intermediate(&dir.path().join("b"), &td(), "replica-b").unwrap();
    let csr = fs::read_to_string(&other.csr_file).unwrap();
    let e = sign_intermediate(&chain, &req.key_file, &td(), &csr, DAY).unwrap_err();
    assert!(matches!(e, IntermediateError::NotRoot(_)), "{e}");
    // The root's certificate with another key.
    let e = sign_intermediate(&root.1, &req.key_file, &td(), &csr, DAY).unwrap_err();
    assert!(
        matches!(e, IntermediateError::Ca(CaError::KeyMismatch { .. })),
        "{e}"
    );
}
