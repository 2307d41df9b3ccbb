use std::os::unix::fs::PermissionsExt;

use rcgen::{CertifiedIssuer, PKCS_ECDSA_P384_SHA384};
use rustls_pki_types::UnixTime;

use super::*;
use crate::keys::LocalKey;

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("pilotfish.local").unwrap()
}

fn svc(name: &str) -> SpiffeId {
    SpiffeId::service(&td(), name).unwrap()
}

fn new_ca(dir: &Path) -> Ca {
    Ca::load_or_create(dir, &td(), &CaOptions::default()).unwrap()
}

/// A CSR with exactly these SANs, signed by `key` (the way a hostile host could build one).
fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Verifies `issued` the way rustls will (path building, validity, EKU) against `bundle`.
fn verify(issued: &Issued, bundle: &[CertificateDer<'static>]) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = bundle
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d).unwrap().to_owned())
        .collect();
    let leaf = der_of(&issued.cert_pem);
    let intermediates = pem_certs(&issued.chain_pem).unwrap();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn creates_a_root_on_first_start_and_loads_it_after() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let (cert, key) = (
        dir.path().join("ca/root.pem"),
        dir.path().join("ca/root.key"),
    );
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir.path().join("ca")), 0o700);
    assert!(cert.exists());

    let der = der_of(&fs::read_to_string(&cert).unwrap());
    let (_, root) = X509Certificate::from_der(&der).unwrap();
    assert!(root.is_ca());
    assert!(is_self_signed(&root));
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
    let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
    assert!(life >= (ROOT_TTL.as_secs() as i64), "{life}");
    // A root carries the trust domain's ID, which is no leaf's.
    assert!(crate::keys::spiffe_id_of(&root).is_err());

    assert_eq!(ca.bundle_der(), std::slice::from_ref(&der));
    assert_eq!(ca.trusted_roots().len(), 1);
    assert!(ca.trusted_roots()[0].signing);

    // The second start loads the same root rather than making a new one.
    let again = new_ca(dir.path());
    assert_eq!(again.bundle_pem(), ca.bundle_pem());
    assert_eq!(again.bundle_pem(), fs::read_to_string(&cert).unwrap());
}

#[test]
fn signs_a_good_csr_with_one_uri_san_and_a_short_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let key = LocalKey::generate().unwrap();
    let id = svc("reviews");
    let before = SystemTime::now();
    let issued = ca
        .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
        .unwrap();

    let der = der_of(&issued.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>(),
        vec!["URI(spiffe://pilotfish.local/service/reviews)"]
    );
    // Empty subject, so the SAN must be critical (X509-SVID).
    assert!(cert.subject().as_raw().len() <= 2);
    assert!(san.critical);
    assert!(!cert.is_ca());
    assert!(cert.basic_constraints().unwrap().is_some());
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature() && ku.value.key_encipherment());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    assert_eq!(cert.public_key().raw, key.public_key_der().as_slice());
    assert_eq!(cert.raw_serial().len(), 16);
    assert_eq!(issued.serial.len(), 32);

    // 24h by default, backdated a minute.
    let v = cert.validity();
    let life = v.not_after.timestamp() - v.not_before.timestamp();
    assert!((86_400 + 59..=86_400 + 61).contains(&life), "{life}");
    let skew = keys::unix_to_system(v.not_before.timestamp());
    assert!(skew <= before - Duration::from_secs(59));
    assert_eq!(
        issued.not_after,
        keys::unix_to_system(v.not_after.timestamp())
    );
    assert!(issued.chain_pem.is_empty());
    assert_eq!(issued.bundle_pem, ca.bundle_pem());
    verify(&issued, ca.bundle_der()).unwrap();

    let info = crate::parse_cert_pem(&issued.cert_pem).unwrap();
    assert_eq!(info.id, id);
    assert_eq!(crate::peer_spiffe_id(&der), Some(id.clone()));

    // A configured TTL, and a per-call one.
    let opts = CaOptions {
        workload_ttl: HOUR,
        ..CaOptions::default()
    };
    let ca = Ca::load_or_create(dir.path(), &td(), &opts).unwrap();
    let short = ca
        .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
        .unwrap();
    let life = short.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(life <= HOUR && life > HOUR - Duration::from_secs(60));
    let shorter = ca
        .sign_workload(
            &key.csr_pem(&id).unwrap(),
            &id,
            Some(Duration::from_secs(600)),
        )
        .unwrap();
    assert!(shorter.not_after < short.not_after);
    assert!(matches!(
        ca.sign_workload(
            &key.csr_pem(&id).unwrap(),
            &id,
            Some(Duration::from_secs(4))
        ),
        Err(CsrRejected::TtlTooShort)
    ));
}

#[test]
fn identity_comes_from_allowed_never_from_the_csr() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let key = p256();
    let allowed = svc("reviews");

    // Asking for another service, a node, discovery, or another trust domain: refused.
    for asked in [
        "spiffe://pilotfish.local/service/ratings",
        "spiffe://pilotfish.local/node/vm-b",
        "spiffe://pilotfish.local/discovery",
        "spiffe://other.domain/service/reviews",
        "spiffe://pilotfish.local/service/Reviews",
        "spiffe://pilotfish.local/service/reviews/",
    ] {
        let err = ca
            .sign_workload(&csr_with(&key, vec![uri(asked)]), &allowed, None)
            .unwrap_err();
        assert!(
            matches!(&err, CsrRejected::SanNotAllowed { requested, .. } if requested.contains(asked)),
            "{asked}: {err}"
        );
        assert!(err.to_string().contains(&allowed.uri()), "{err}");
    }

    // A CSR that names nothing gets exactly the allowed identity.
    let issued = ca
        .sign_workload(&csr_with(&key, vec![]), &allowed, None)
        .unwrap();
    assert_eq!(crate::parse_cert_pem(&issued.cert_pem).unwrap().id, allowed);
}

#[test]
fn refuses_extra_or_other_sans() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let key = p256();
    let allowed = svc("reviews");
    let me = uri(&allowed.uri());

    let cases = [
        (vec![me.clone(), dns("reviews")], "DNS reviews"),
        (
            vec![me.clone(), uri("spiffe://pilotfish.local/service/ratings")],
            "URI spiffe://pilotfish.local/service/ratings",
        ),
        (
            vec![uri("spiffe://pilotfish.local/service/ratings"), me.clone()],
            "URI spiffe://pilotfish.local/service/ratings",
        ),
        (
            vec![me.clone(), dns("discovery.pilotfish.local")],
            "DNS discovery.pilotfish.local",
        ),
        (
            vec![me.clone(), SanType::IpAddress("10.0.0.1".parse().unwrap())],
            "IP 10.0.0.1",
        ),
        (
            vec![me.clone(), SanType::Rfc822Name("a@b.c".try_into().unwrap())],
            "email a@b.c",
        ),
    ];
    for (sans, named) in cases {
        let err = ca
            .sign_workload(&csr_with(&key, sans), &allowed, None)
            .unwrap_err();
        assert!(
            matches!(&err, CsrRejected::SanNotAllowed { requested, .. } if requested.contains(named)),
            "{named}: {err}"
        );
    }
    // The allowed URI twice is refused too: a certificate has exactly one URI SAN.
    let err = ca
        .sign_workload(&csr_with(&key, vec![me.clone(), me]), &allowed, None)
        .unwrap_err();
    assert!(matches!(err, CsrRejected::RepeatedSan(_)), "{err}");
}

#[test]
fn refuses_bad_signatures_keys_and_input() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let allowed = svc("reviews");

    // Flip a bit inside the signature.
    let pem = csr_with(&p256(), vec![uri(&allowed.uri())]);
    let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let tampered = keys::pem_block("CERTIFICATE REQUEST", &der);
    assert!(matches!(
        ca.sign_workload(&tampered, &allowed, None),
        Err(CsrRejected::BadSignature)
    ));

    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    assert!(matches!(
        ca.sign_workload(&csr_with(&p384, vec![]), &allowed, None),
        Err(CsrRejected::UnsupportedKey)
    ));
    assert!(matches!(
        ca.sign_workload("not a csr", &allowed, None),
        Err(CsrRejected::Unparseable(_))
    ));
    assert!(matches!(
        ca.sign_workload(&"A".repeat(MAX_CSR_PEM + 1), &allowed, None),
        Err(CsrRejected::TooLarge)
    ));
    // A certificate is not a CSR.
    assert!(matches!(
        ca.sign_workload(ca.bundle_pem(), &allowed, None),
        Err(CsrRejected::Unparseable(_))
    ));
}

#[test]
fn requested_ca_flag_and_usages_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let key = p256();
    let allowed = svc("reviews");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(&allowed.uri())];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let issued = ca.sign_workload(&csr, &allowed, None).unwrap();
    let der = der_of(&issued.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(!cert.is_ca());
    assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert!(
        !cert
            .extended_key_usage()
            .unwrap()
            .unwrap()
            .value
            .code_signing
    );
}

#[test]
fn roles_and_trust_domains_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let key = LocalKey::generate().unwrap();

    let discovery = SpiffeId::discovery(&td());
    let err = ca
        .sign_workload(&key.csr_pem(&discovery).unwrap(), &discovery, None)
        .unwrap_err();
    assert!(matches!(err, CsrRejected::RoleNotIssuable(_)), "{err}");

    let other = SpiffeId::service(&TrustDomain::new("other.domain").unwrap(), "reviews").unwrap();
    let err = ca
        .sign_workload(&key.csr_pem(&other).unwrap(), &other, None)
        .unwrap_err();
    assert!(
        matches!(err, CsrRejected::ForeignTrustDomain { .. }),
        "{err}"
    );

    let node = SpiffeId::node(&td(), "vm-b").unwrap();
    let issued = ca
        .sign_workload(&key.csr_pem(&node).unwrap(), &node, None)
        .unwrap();
    assert_eq!(crate::parse_cert_pem(&issued.cert_pem).unwrap().id, node);
}

#[test]
fn issues_discoverys_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let key = LocalKey::generate().unwrap();
    let id = SpiffeId::discovery(&td());
    let issued = ca
        .issue_server_cert(&key.csr_pem(&id).unwrap(), None)
        .unwrap();
    verify(&issued, ca.bundle_der()).unwrap();
    let der = der_of(&issued.cert_pem);
    let ee = webpki::EndEntityCert::try_from(&der).unwrap();
    let name = rustls_pki_types::ServerName::try_from("discovery.pilotfish.local").unwrap();
    ee.verify_is_valid_for_subject_name(&name).unwrap();
    let wrong = rustls_pki_types::ServerName::try_from("evil.pilotfish.local").unwrap();
    assert!(ee.verify_is_valid_for_subject_name(&wrong).is_err());
    assert_eq!(crate::peer_spiffe_id(&der), Some(id));

    // A CSR that also asks for another DNS name is refused.
    let csr = csr_with(
        &p256(),
        vec![uri("spiffe://pilotfish.local/discovery"), dns("localhost")],
    );
    assert!(matches!(
        ca.issue_server_cert(&csr, None),
        Err(CsrRejected::SanNotAllowed { .. })
    ));
}

/// A root and an intermediate made elsewhere (by the operator's PKI).
struct OperatorPki {
    root_pem: String,
    intermediate_pem: String,
    intermediate_key_pem: String,
}

fn operator_pki(intermediate_ttl: Duration) -> OperatorPki {
    let now = SystemTime::now();
    let mut root_params = CertificateParams::default();
    root_params
        .distinguished_name
        .push(DnType::CommonName, "Corp Root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = CertifiedIssuer::self_signed(root_params, p256()).unwrap();

    let mut int_params = CertificateParams::default();
    int_params
        .distinguished_name
        .push(DnType::CommonName, "Corp Mesh Intermediate");
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    int_params.not_before = OffsetDateTime::from(now - HOUR);
    int_params.not_after = OffsetDateTime::from(now + intermediate_ttl);
    int_params.use_authority_key_identifier_extension = true;
    let int_key = p256();
    let int_key_pem = int_key.serialize_pem();
    let intermediate = CertifiedIssuer::signed_by(int_params, int_key, &root).unwrap();
    OperatorPki {
        root_pem: root.pem(),
        intermediate_pem: intermediate.pem(),
        intermediate_key_pem: int_key_pem,
    }
}

#[test]
fn signs_with_an_operator_intermediate_and_its_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let pki = operator_pki(2 * HOUR);
    let (cert_file, key_file, chain_file) = (
        etc.path().join("int.pem"),
        etc.path().join("int.key"),
        etc.path().join("chain.pem"),
    );
    fs::write(&cert_file, &pki.intermediate_pem).unwrap();
    fs::write(&key_file, &pki.intermediate_key_pem).unwrap();
    fs::write(&chain_file, &pki.root_pem).unwrap();
    let opts = CaOptions {
        cert_file: Some(cert_file.clone()),
        key_file: Some(key_file.clone()),
        chain_file: Some(chain_file.clone()),
        ..CaOptions::default()
    };
    let ca = Ca::load_or_create(dir.path(), &td(), &opts).unwrap();
    // No root of our own was made; the bundle is the operator's root.
    assert!(!dir.path().join("ca/root.pem").exists());
    assert_eq!(ca.bundle_der(), &[der_of(&pki.root_pem)]);

    let key = LocalKey::generate().unwrap();
    let id = svc("reviews");
    let issued = ca
        .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
        .unwrap();
    assert_eq!(
        pem_certs(&issued.chain_pem).unwrap(),
        vec![der_of(&pki.intermediate_pem)]
    );
    verify(&issued, ca.bundle_der()).unwrap();
    // Without the intermediate the leaf does not verify: the chain is needed.
    let bare = Issued {
        chain_pem: String::new(),
        ..issued.clone()
    };
    assert!(verify(&bare, ca.bundle_der()).is_err());
    // A 24h leaf from a CA with 2h left is cut to the CA's expiry.
    assert!(issued.not_after <= ca.signer_not_after());
    assert!(issued.not_after < SystemTime::now() + 3 * HOUR);

    // cert_file may hold the chain itself.
    let bundled = etc.path().join("int-and-root.pem");
    fs::write(
        &bundled,
        format!("{}{}", pki.intermediate_pem, pki.root_pem),
    )
    .unwrap();
    let opts2 = CaOptions {
        cert_file: Some(bundled),
        chain_file: None,
        ..opts.clone()
    };
    Ca::load_or_create(dir.path(), &td(), &opts2).unwrap();

    // An intermediate without its chain, a chain ending in the wrong root, a key that does not
    // match, and half a configuration are all refused.
    let no_chain = CaOptions {
        chain_file: None,
        ..opts.clone()
    };
    let err = Ca::load_or_create(dir.path(), &td(), &no_chain).unwrap_err();
    assert!(err.to_string().contains("self-signed root"), "{err}");
    let other = operator_pki(HOUR);
    let wrong_root = etc.path().join("wrong.pem");
    fs::write(&wrong_root, &other.root_pem).unwrap();
    let err = Ca::load_or_create(
        dir.path(),
        &td(),
        &CaOptions {
            chain_file: Some(wrong_root),
            ..opts.clone()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("is not signed by"), "{err}");
    let wrong_key = etc.path().join("wrong.key");
    fs::write(&wrong_key, &other.intermediate_key_pem).unwrap();
    let err = Ca::load_or_create(
        dir.path(),
        &td(),
        &CaOptions {
            key_file: Some(wrong_key),
            ..opts.clone()
        },
    )
    .unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    let err = Ca::load_or_create(
        dir.path(),
        &td(),
        &CaOptions {
            key_file: None,
            ..opts
        },
    )
    .unwrap_err();
    assert!(matches!(err, CaError::Config(_)), "{err}");
}

#[test]
fn refuses_a_leaf_certificate_as_the_signing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let key = p256();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri("spiffe://pilotfish.local/service/reviews")];
    let leaf = params.self_signed(&key).unwrap();
    fs::write(etc.path().join("c.pem"), leaf.pem()).unwrap();
    fs::write(etc.path().join("c.key"), key.serialize_pem()).unwrap();
    let err = Ca::load_or_create(
        dir.path(),
        &td(),
        &CaOptions {
            cert_file: Some(etc.path().join("c.pem")),
            key_file: Some(etc.path().join("c.key")),
            ..CaOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
}

#[test]
fn bundle_carries_extra_roots_from_roots_d_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let own = new_ca(dir.path());
    let a = operator_pki(HOUR);
    let b = operator_pki(HOUR);
    fs::create_dir_all(dir.path().join("ca/roots.d")).unwrap();
    fs::write(dir.path().join("ca/roots.d/corp.pem"), &a.root_pem).unwrap();
    fs::write(dir.path().join("ca/roots.d/README"), "not a pem").unwrap();
    fs::write(etc.path().join("b.pem"), &b.root_pem).unwrap();
    // The signing root listed again is not duplicated.
    let opts = CaOptions {
        extra_roots: vec![etc.path().join("b.pem"), dir.path().join("ca/root.pem")],
        ..CaOptions::default()
    };
    let ca = Ca::load_or_create(dir.path(), &td(), &opts).unwrap();
    // The signing root first, then the others by fingerprint (whatever their files).
    let mut others = [der_of(&a.root_pem), der_of(&b.root_pem)];
    others.sort_by_key(|d| hex_sha256(d));
    assert_eq!(
        ca.bundle_der(),
        &[
            own.bundle_der()[0].clone(),
            others[0].clone(),
            others[1].clone()
        ]
    );
    let fingerprints: Vec<&str> = ca.trusted_roots()[1..]
        .iter()
        .map(|r| r.fingerprint.as_str())
        .collect();
    assert!(
        fingerprints.windows(2).all(|w| w[0] < w[1]),
        "{fingerprints:?}"
    );
    assert_eq!(pem_certs(ca.bundle_pem()).unwrap(), ca.bundle_der());
    let signing: Vec<bool> = ca.trusted_roots().iter().map(|r| r.signing).collect();
    assert_eq!(signing, vec![true, false, false]);

    // A leaf dropped into roots.d is refused rather than trusted.
    let key = p256();
    let leaf = CertificateParams::default().self_signed(&key).unwrap();
    fs::write(dir.path().join("ca/roots.d/leaf.pem"), leaf.pem()).unwrap();
    let err = Ca::load_or_create(dir.path(), &td(), &CaOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not a CA certificate"), "{err}");
}

#[test]
fn root_rotation_keeps_old_and_new_leaves_valid() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let key = LocalKey::generate().unwrap();
    let id = svc("reviews");
    let csr = key.csr_pem(&id).unwrap();

    let ca = new_ca(state);
    let old_root = ca.bundle_der()[0].clone();
    let old_leaf = ca.sign_workload(&csr, &id, None).unwrap();

    // 1. Prepare: both roots in the bundle, the old one still signs.
    let next = Ca::prepare_rotation(state, &td()).unwrap();
    assert_eq!(mode(&next.with_file_name("root.key")), 0o600);
    assert!(Ca::prepare_rotation(state, &td()).is_err());
    let ca = new_ca(state);
    assert_eq!(ca.bundle_der().len(), 2);
    let new_root = ca.bundle_der()[1].clone();
    assert_ne!(old_root, new_root);
    let leaf = ca.sign_workload(&csr, &id, None).unwrap();
    verify(&leaf, std::slice::from_ref(&old_root)).unwrap();
    assert!(verify(&leaf, std::slice::from_ref(&new_root)).is_err());

    // 3. Switch: the new root signs; the old stays trusted.
    let previous = Ca::switch_to_next(state).unwrap();
    assert!(!state.join("ca/next").exists());
    let ca = new_ca(state);
    assert_eq!(ca.bundle_der()[0], new_root);
    assert!(ca.bundle_der().contains(&old_root));
    assert_eq!(ca.bundle_der().len(), 2);
    let new_leaf = ca.sign_workload(&csr, &id, None).unwrap();
    verify(&new_leaf, std::slice::from_ref(&new_root)).unwrap();
    assert!(verify(&new_leaf, std::slice::from_ref(&old_root)).is_err());
    // Peers holding the two-root bundle accept both generations.
    verify(&old_leaf, ca.bundle_der()).unwrap();
    verify(&new_leaf, ca.bundle_der()).unwrap();
    assert!(Ca::switch_to_next(state).is_err());

    // 5. Retire the old root: only the new one is left.
    let old_fp = ca
        .trusted_roots()
        .iter()
        .find(|r| !r.signing)
        .unwrap()
        .fingerprint
        .clone();
    assert!(
        Ca::retire_root(state, &old_fp[..8]).is_err(),
        "too short a prefix"
    );
    let new_fp = ca.trusted_roots()[0].fingerprint.clone();
    assert!(
        Ca::retire_root(state, &new_fp).is_err(),
        "the signing root is not in roots.d"
    );
    assert_eq!(Ca::retire_root(state, &old_fp[..16]).unwrap(), previous);
    let ca = new_ca(state);
    assert_eq!(ca.bundle_der(), std::slice::from_ref(&new_root));
    verify(&new_leaf, ca.bundle_der()).unwrap();
    assert!(verify(&old_leaf, ca.bundle_der()).is_err());
}

#[test]
fn an_interrupted_switch_is_completed_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    new_ca(state);
    Ca::prepare_rotation(state, &td()).unwrap();
    // Simulate a crash after the certificate moved but before the key did.
    let ca_d = state.join("ca");
    fs::create_dir_all(ca_d.join("roots.d")).unwrap();
    fs::copy(ca_d.join("root.pem"), ca_d.join("roots.d/previous.pem")).unwrap();
    fs::rename(ca_d.join("next/root.pem"), ca_d.join("root.pem")).unwrap();
    let ca = new_ca(state);
    assert_eq!(ca.bundle_der().len(), 2);
    let key = LocalKey::generate().unwrap();
    let id = svc("reviews");
    let issued = ca
        .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
        .unwrap();
    verify(&issued, &ca.bundle_der()[..1]).unwrap();
}

#[test]
fn ca_is_shareable_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Ca>();
}

fn hex_sha256(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
