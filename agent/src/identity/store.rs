//! Keys and certificates in `state_dir`, every file mode 0600 and written atomically
//! (temporary file, fsync, rename, fsync the directory):
//!
//! | file | what |
//! |---|---|
//! | `node.key`, `node.pem` | the node key and certificate chain (leaf first) |
//! | `service-<name>.key`, `service-<name>.pem` | a service's key and chain |
//! | `roots.pem` | the trust bundle discovery last handed out |
//! | `crl.pem` | the CRL discovery last handed out (revoked certificates peers must refuse) |
//!
//! A new certificate comes with a new key. Key and certificate live in two files, so a crash
//! between the two writes must not leave a pair that does not match: the new key is written as
//! `<slot>.key.new`, then the certificate, then the key is renamed into place. A loader that
//! finds the certificate matching `.key.new` finishes the rename.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use pilotfish_durable as durable;
use pilotfish_pki::{parse_cert_pem, CertUnreadable, KeyError, LocalKey};
use x509_parser::prelude::FromDer;

use super::Credential;

pub const NODE_SLOT: &str = "node";
pub const BUNDLE_FILE: &str = "roots.pem";
pub const CRL_FILE: &str = "crl.pem";
const SERVICE_PREFIX: &str = "service-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("{}: {source}", path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: CertUnreadable,
    },
    #[error("{}: the certificate is not for the stored key", path.display())]
    KeyMismatch { path: PathBuf },
}

/// The identity files in one directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cert_path(&self, slot: &str) -> PathBuf {
        self.dir.join(format!("{slot}.pem"))
    }

    fn key_path(&self, slot: &str) -> PathBuf {
        self.dir.join(format!("{slot}.key"))
    }

    fn next_key_path(&self, slot: &str) -> PathBuf {
        self.dir.join(format!("{slot}.key.new"))
    }

    pub fn service_slot(name: &str) -> String {
        format!("{SERVICE_PREFIX}{name}")
    }

    pub fn load_node(&self) -> Result<Option<Credential>, StoreError> {
        self.load(NODE_SLOT)
    }

    pub fn save_node(&self, key: &LocalKey, chain_pem: &str) -> Result<Credential, StoreError> {
        self.save(NODE_SLOT, key, chain_pem)
    }

    pub fn load_service(&self, name: &str) -> Result<Option<Credential>, StoreError> {
        self.load(&Self::service_slot(name))
    }

    pub fn save_service(
        &self,
        name: &str,
        key: &LocalKey,
        chain_pem: &str,
    ) -> Result<Credential, StoreError> {
        self.save(&Self::service_slot(name), key, chain_pem)
    }

    /// The service names that have a certificate file.
    pub fn service_names(&self) -> Result<Vec<String>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let service = name.strip_prefix(SERVICE_PREFIX)?.strip_suffix(".pem")?;
                (!service.is_empty()).then(|| service.to_owned())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn load_bundle(&self) -> Result<Option<String>, StoreError> {
        let path = self.dir.join(BUNDLE_FILE);
        match fs::read_to_string(&path) {
            Ok(pem) => Ok(Some(pem)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    pub fn save_bundle(&self, pem: &str) -> Result<(), StoreError> {
        let path = self.dir.join(BUNDLE_FILE);
        write_atomic(&path, pem.as_bytes()).map_err(|source| StoreError::Io { path, source })
    }

    /// The stored CRL; `None` when there is none (or it is empty).
    pub fn load_crl(&self) -> Result<Option<String>, StoreError> {
        let path = self.dir.join(CRL_FILE);
        match fs::read_to_string(&path) {
            Ok(pem) if pem.trim().is_empty() => Ok(None),
            Ok(pem) => Ok(Some(pem)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Stores the CRL (empty: no certificate is revoked).
    pub fn save_crl(&self, pem: &str) -> Result<(), StoreError> {
        let path = self.dir.join(CRL_FILE);
        write_atomic(&path, pem.as_bytes()).map_err(|source| StoreError::Io { path, source })
    }

    /// The credential in `slot`, or `None` when it has no certificate file.
    fn load(&self, slot: &str) -> Result<Option<Credential>, StoreError> {
        let cert_path = self.cert_path(slot);
        let chain_pem = match fs::read_to_string(&cert_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: cert_path,
                    source,
                })
            }
        };
        let info = parse_cert_pem(&chain_pem).map_err(|source| StoreError::Cert {
            path: cert_path.clone(),
            source,
        })?;
        let key_path = self.key_path(slot);
        let next_path = self.next_key_path(slot);
        for path in [&key_path, &next_path] {
            if !path.exists() {
                continue;
            }
            let key = LocalKey::load(path).map_err(|source| StoreError::Key {
                path: path.clone(),
                source,
            })?;
            if !key_matches(&chain_pem, &key) {
                continue;
            }
            if path == &next_path {
                // A crash came between the certificate and the key rename; finish it.
                durable::rename(&next_path, &key_path).map_err(|source| StoreError::Io {
                    path: key_path.clone(),
                    source,
                })?;
            }
            return Ok(Some(Credential {
                chain_pem,
                key_pem: key.private_key_pem(),
                info,
            }));
        }
        Err(StoreError::KeyMismatch { path: cert_path })
    }

    /// Stores a new key and its certificate chain; see the module docs for the order.
    fn save(&self, slot: &str, key: &LocalKey, chain_pem: &str) -> Result<Credential, StoreError> {
        let cert_path = self.cert_path(slot);
        let info = parse_cert_pem(chain_pem).map_err(|source| StoreError::Cert {
            path: cert_path.clone(),
            source,
        })?;
        if !key_matches(chain_pem, key) {
            return Err(StoreError::KeyMismatch { path: cert_path });
        }
        let next_path = self.next_key_path(slot);
        key.write(&next_path).map_err(|source| StoreError::Key {
            path: next_path.clone(),
            source,
        })?;
        write_atomic(&cert_path, chain_pem.as_bytes()).map_err(|source| StoreError::Io {
            path: cert_path.clone(),
            source,
        })?;
        let key_path = self.key_path(slot);
        durable::rename(&next_path, &key_path).map_err(|source| StoreError::Io {
            path: key_path,
            source,
        })?;
        Ok(Credential {
            chain_pem: chain_pem.to_owned(),
            key_pem: key.private_key_pem(),
            info,
        })
    }
}

/// Whether the leaf of `chain_pem` certifies `key`'s public key.
pub fn key_matches(chain_pem: &str, key: &LocalKey) -> bool {
    use rustls_pki_types::pem::PemObject;
    let Some(Ok(der)) =
        rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()
    else {
        return false;
    };
    x509_parser::certificate::X509Certificate::from_der(der.as_ref())
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.public_key_der().as_slice())
}

/// Atomically and durably replaces `path` with `contents`, mode 0600 from the first byte.
fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    durable::write_atomic(path, contents, durable::SECRET_MODE)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use pilotfish_pki::{Ca, CaOptions, SpiffeId, TrustDomain};

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trips_with_0600_files_and_no_leftovers() {
        let ca_dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("pilotfish.local").unwrap();
        let ca = Ca::load_or_create(ca_dir.path(), &td, &CaOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert!(store.load_node().unwrap().is_none());
        assert!(store.load_bundle().unwrap().is_none());

        let node_id = SpiffeId::node(&td, "vm-b").unwrap();
        let key = LocalKey::generate().unwrap();
        let issued = ca
            .sign_workload(&key.csr_pem(&node_id).unwrap(), &node_id, None)
            .unwrap();
        let saved = store.save_node(&key, &issued.cert_pem).unwrap();
        let svc_id = SpiffeId::service(&td, "reviews").unwrap();
        let svc_key = LocalKey::generate().unwrap();
        let svc = ca
            .sign_workload(
                &svc_key.csr_pem(&svc_id).unwrap(),
                &svc_id,
                Some(Duration::from_secs(600)),
            )
            .unwrap();
        store
            .save_service("reviews", &svc_key, &svc.cert_pem)
            .unwrap();
        store.save_bundle(ca.bundle_pem()).unwrap();

        let node = store.load_node().unwrap().unwrap();
        assert_eq!(node, saved);
        assert_eq!(node.info.id, node_id);
        assert_eq!(
            store.load_service("reviews").unwrap().unwrap().info.id,
            svc_id
        );
        assert_eq!(store.service_names().unwrap(), vec!["reviews".to_string()]);
        assert_eq!(store.load_bundle().unwrap().unwrap(), ca.bundle_pem());
        let mut files: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "node.key",
                "node.pem",
                "roots.pem",
                "service-reviews.key",
                "service-reviews.pem"
            ]
        );
        for f in files {
            assert_eq!(mode(&dir.path().join(&f)), 0o600, "{f}");
        }
        assert!(!format!("{node:?}").contains("PRIVATE"));

        // A certificate for another key is refused.
        let other = LocalKey::generate().unwrap();
        assert!(matches!(
            store.save_node(&other, &issued.cert_pem),
            Err(StoreError::KeyMismatch { .. })
        ));

        // A crash after the certificate was written but before the key was renamed.
        let key2 = LocalKey::generate().unwrap();
        let issued2 = ca
            .sign_workload(&key2.csr_pem(&node_id).unwrap(), &node_id, None)
            .unwrap();
        key2.write(&dir.path().join("node.key.new")).unwrap();
        write_atomic(&dir.path().join("node.pem"), issued2.cert_pem.as_bytes()).unwrap();
        let node = store.load_node().unwrap().unwrap();
        assert_eq!(node.key_pem, key2.private_key_pem());
        assert!(!dir.path().join("node.key.new").exists());
        assert_eq!(mode(&dir.path().join("node.key")), 0o600);
    }
}
