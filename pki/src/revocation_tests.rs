use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, SystemTime};

use super::*;
use crate::{Ca, CaOptions, LocalKey, SpiffeId, TrustDomain};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn cert(serial: &str, node: &str, issued: SystemTime) -> IssuedCert {
    IssuedCert::new(
        serial,
        node,
        "spiffe://pilotfish.local/node/x",
        issued,
        issued + Duration::from_secs(3600),
    )
}

#[test]
fn revoke_covers_every_certificate_until_restored_and_older_ones_after() {
    let mut r = Revocations::default();
    let before = cert("01", "vm-c", at(0));
    let other = cert("02", "vm-a", at(0));
    assert!(!r.revokes(&before));

    assert!(r.revoke("vm-c", at(10)));
    assert!(
        !r.revoke("vm-c", at(20)),
        "revoking twice keeps the first time"
    );
    assert_eq!(r.node("vm-c").unwrap().revoked_at(), at(10));
    assert!(r.is_revoked("vm-c"));
    assert_eq!(r.revoked_nodes(), BTreeSet::from(["vm-c".to_owned()]));
    assert!(r.revokes(&before));
    assert!(!r.revokes(&other));
    // Issued after the revocation, before discovery noticed it: revoked as well.
    let racing = cert("03", "vm-c", at(11));
    assert!(r.revokes(&racing));

    assert!(r.restore("vm-c", at(30)));
    assert!(
        !r.restore("vm-c", at(31)),
        "restoring twice changes nothing"
    );
    assert!(!r.is_revoked("vm-c"));
    assert!(r.revoked_nodes().is_empty());
    // A restore never revives what was issued before it.
    assert!(r.revokes(&before));
    assert!(r.revokes(&racing));
    assert!(!r.revokes(&cert("04", "vm-c", at(31))));

    // Revoked again: everything, the new certificates too.
    assert!(r.revoke("vm-c", at(40)));
    assert!(r.revokes(&cert("04", "vm-c", at(31))));
}

#[test]
fn store_survives_reload_and_refuses_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = RevocationStore::new(dir.path());
    assert_eq!(store.load().unwrap(), Revocations::default());
    assert!(store.revoke("vm-c", at(1)).unwrap());
    assert!(!store.revoke("vm-c", at(2)).unwrap());
    // Another process reading the file sees it.
    let again = RevocationStore::new(dir.path()).load().unwrap();
    assert!(again.is_revoked("vm-c"));
    assert!(store.restore("vm-c", at(3)).unwrap());
    assert!(!store.load().unwrap().is_revoked("vm-c"));
    assert!(!store.restore("vm-x", at(3)).unwrap());
    assert!(matches!(
        store.revoke("../etc", at(4)),
        Err(RevocationError::InvalidNode(_))
    ));
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!store.path().with_extension("json.lock").exists());
}

#[test]
fn corrupt_file_is_an_error_not_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    let store = RevocationStore::new(dir.path());
    fs::write(store.path(), b"{not json").unwrap();
    assert!(matches!(store.load(), Err(RevocationError::Corrupt { .. })));
}

#[test]
fn issued_log_appends_skips_torn_lines_and_compacts_expired() {
    let dir = tempfile::tempdir().unwrap();
    let log = IssuedLog::new(dir.path());
    assert!(log.load(at(0)).unwrap().is_empty());
    let a = cert("0A", "vm-a", at(0));
    let b = IssuedCert::new("0b", "vm-b", "id", at(0), at(10_000));
    log.append(&a).unwrap();
    log.append(&b).unwrap();
    assert_eq!(a.serial, "0a", "serials are kept in lower case");
    // A crash mid-append leaves half a line.
    let mut f = OpenOptions::new().append(true).open(log.path()).unwrap();
    f.write_all(b"{\"serial\":\"0c\",\"no").unwrap();
    drop(f);
    assert_eq!(log.load(at(1)).unwrap(), vec![a.clone(), b.clone()]);
    // An hour later `a` has expired: not loaded, and gone after compaction.
    let later = at(3600);
    assert_eq!(log.load(later).unwrap(), vec![b.clone()]);
    log.compact(&[a, b.clone()], later).unwrap();
    let text = fs::read_to_string(log.path()).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert_eq!(log.load(later).unwrap(), vec![b]);
}

#[test]
fn summary_lists_nodes_with_certificates_or_revocations() {
    let mut r = Revocations::default();
    r.revoke("vm-z", at(5));
    let certs = [cert("01", "vm-a", at(1)), cert("02", "vm-a", at(2))];
    let rows = summarize(&certs, &r);
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].node.as_str(), rows[0].certificates), ("vm-a", 2));
    assert_eq!(rows[0].last_issued, Some(at(2)));
    assert!(rows[0].revocation.is_none());
    assert_eq!(rows[1].node, "vm-z");
    assert!(rows[1].revocation.unwrap().in_force());
}

/// The CRL discovery signs lists exactly the revoked serials, verifies under the CA's key, and
/// its serials match the certificates as `serial_of` reads them.
#[test]
fn crl_lists_the_revoked_serials_of_issued_certificates() {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;

    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("pilotfish.local").unwrap();
    let ca = Ca::load_or_create(dir.path(), &td, &CaOptions::default()).unwrap();
    let key = LocalKey::generate().unwrap();
    let id = SpiffeId::node(&td, "vm-c").unwrap();
    let revoked = ca
        .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
        .unwrap();
    let kept = ca
        .sign_workload(&key.csr_pem(&id).unwrap(), &id, None)
        .unwrap();
    let der = crate::keys::pem_certs(&revoked.cert_pem).unwrap().remove(0);
    assert_eq!(
        serial_of(&der).unwrap(),
        revoked.serial.to_ascii_lowercase()
    );

    let now = SystemTime::now();
    let pem = ca
        .sign_crl(&[(revoked.serial.to_ascii_lowercase(), now)], now)
        .unwrap();
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"), "{pem}");
    let crl_der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateRevocationListDer<'_>| d.to_vec())
        .unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial_as_string().replace(':', ""))
        .collect();
    assert_eq!(listed, vec![revoked.serial.to_ascii_lowercase()]);
    assert!(!listed.contains(&kept.serial.to_ascii_lowercase()));
    // Signed by the CA that issued the leaves.
    let root = crate::keys::pem_certs(ca.bundle_pem()).unwrap().remove(0);
    let (_, root) = x509_parser::certificate::X509Certificate::from_der(&root).unwrap();
    assert_eq!(crl.issuer(), root.subject());
    crl.verify_signature(root.public_key()).unwrap();
    assert!(crl.next_update().is_some());

    assert!(matches!(
        ca.sign_crl(&[("zz".into(), now)], now),
        Err(crate::CrlError::BadSerial(_))
    ));
}
