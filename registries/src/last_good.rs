//! The last good state on disk, so that a restart never shrinks the mesh: the last good version
//! of every registry file (rules-API objects included, they are files in `rules.d`) and the last
//! good catalog of every Consul datacenter, under `<state_dir>/last-good/`:
//!
//! ```text
//! last-good/files/<file name>-<hash of its path>.toml   first line: "# pilotfish last good copy of <path>"
//! last-good/consul/<datacenter>.json
//! ```
//!
//! A stored file is the original byte for byte after that first comment line, so an operator can
//! read it (or copy it back). Every write is durable (`pilotfish_durable`). This module only
//! reads and writes; which stored copy is used is decided by the registries
//! ([`crate::files`]: only for a file that exists but is broken; [`crate::consul`]: only until
//! the first successful read of that datacenter).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pilotfish_durable as durable;
use serde::{Deserialize, Serialize};

use crate::model::Instance;

/// The directory under `state_dir`.
pub const LAST_GOOD_DIR: &str = "last-good";
const HEADER: &str = "# pilotfish last good copy of ";
const CATALOG_FORMAT: u32 = 1;

/// Where the last good state lives. Cheap to clone; all methods do blocking I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastGoodStore {
    root: PathBuf,
}

/// One registry file's stored last good version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// The copy itself (what a report names besides the real file).
    pub copy: PathBuf,
    pub content: String,
    /// When it was stored.
    pub saved: SystemTime,
}

/// One Consul datacenter's stored last good catalog: instances by service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCatalog {
    pub services: BTreeMap<String, Vec<Instance>>,
    pub saved: SystemTime,
}

impl LastGoodStore {
    /// The store of a discovery whose state directory is `state_dir`.
    pub fn in_state_dir(state_dir: &Path) -> LastGoodStore {
        LastGoodStore {
            root: state_dir.join(LAST_GOOD_DIR),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    fn consul_dir(&self) -> PathBuf {
        self.root.join("consul")
    }

    /// The stored copy of registry file `path`.
    pub fn file_copy(&self, path: &Path) -> PathBuf {
        self.files_dir().join(copy_name(path))
    }

    /// Every stored registry file, by the path of the real file. Copies that cannot be read or
    /// do not start with the header are skipped with a warning (they are overwritten or removed
    /// by the next sync).
    pub fn load_files(&self) -> BTreeMap<PathBuf, StoredFile> {
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(self.files_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
            Err(e) => {
                tracing::warn!(dir = %self.files_dir().display(), error = %e, "cannot list the last good registry files");
                return out;
            }
        };
        for entry in entries.flatten() {
            let copy = entry.path();
            let hidden = copy
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden || copy.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let read = std::fs::read_to_string(&copy).and_then(|text| {
                let saved = std::fs::metadata(&copy)?.modified()?;
                Ok((text, saved))
            });
            match read.map(|(text, saved)| (split_copy(&text), saved)) {
                Ok((Some((path, content)), saved)) => {
                    out.insert(
                        path,
                        StoredFile {
                            copy,
                            content,
                            saved,
                        },
                    );
                }
                Ok((None, _)) => {
                    tracing::warn!(copy = %copy.display(), "not a last good copy (no header line); ignored");
                }
                Err(e) => {
                    tracing::warn!(copy = %copy.display(), error = %e, "cannot read a last good copy; ignored");
                }
            }
        }
        out
    }

    /// Stores `content` as the last good version of registry file `path`.
    pub fn save_file(&self, path: &Path, content: &str) -> io::Result<()> {
        let Some(name) = path.to_str().filter(|p| !p.contains('\n')) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "path is not UTF-8 or contains a newline",
            ));
        };
        let dir = self.files_dir();
        durable::create_dir_all(&dir, durable::PRIVATE_DIR_MODE)?;
        let text = format!("{HEADER}{name}\n{content}");
        durable::write_atomic(
            &dir.join(copy_name(path)),
            text.as_bytes(),
            durable::SECRET_MODE,
        )
    }

    /// Forgets registry file `path` (it was deleted).
    pub fn remove_file(&self, path: &Path) -> io::Result<()> {
        durable::remove(&self.file_copy(path))
    }

    /// The stored catalog of datacenter `dc`, if any. A copy that does not decode is an error
    /// (the caller logs it and starts without).
    pub fn load_consul(&self, dc: &str) -> io::Result<Option<StoredCatalog>> {
        let path = self.consul_dir().join(dc_name(dc));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let stored: CatalogFile = serde_json::from_str(&text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if stored.format != CATALOG_FORMAT || stored.datacenter != dc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "format {} of datacenter {:?}, expected format {CATALOG_FORMAT} of {dc:?}",
                    stored.format, stored.datacenter
                ),
            ));
        }
        Ok(Some(StoredCatalog {
            services: stored
                .services
                .into_iter()
                .map(|(name, list)| (name, list.into_iter().map(Instance::from).collect()))
                .collect(),
            saved: UNIX_EPOCH + Duration::from_millis(stored.saved_unix_ms),
        }))
    }

    /// Stores the catalog of datacenter `dc` as its last good one.
    pub fn save_consul(
        &self,
        dc: &str,
        services: &BTreeMap<String, Vec<Instance>>,
    ) -> io::Result<()> {
        let dir = self.consul_dir();
        durable::create_dir_all(&dir, durable::PRIVATE_DIR_MODE)?;
        let file = CatalogFile {
            format: CATALOG_FORMAT,
            datacenter: dc.to_string(),
            saved_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            services: services
                .iter()
                .map(|(name, list)| {
                    (
                        name.clone(),
                        list.iter().map(StoredInstance::from).collect(),
                    )
                })
                .collect(),
        };
        let text = serde_json::to_vec(&file).map_err(io::Error::other)?;
        durable::write_atomic(&dir.join(dc_name(dc)), &text, durable::SECRET_MODE)
    }

    /// The stored catalog file of `dc` (for reports).
    pub fn consul_copy(&self, dc: &str) -> PathBuf {
        self.consul_dir().join(dc_name(dc))
    }
}

/// Seconds since the Unix epoch (0 before it), for log fields.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A copy's file name: readable (the real file's name) and unique (a hash of its whole path;
/// FNV-1a, stable across builds and Rust versions, unlike `DefaultHasher`).
fn copy_name(path: &Path) -> String {
    let base: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!(
        "{base}-{:016x}.toml",
        fnv1a(path.as_os_str().as_encoded_bytes())
    )
}

fn dc_name(dc: &str) -> String {
    let plain = !dc.is_empty()
        && dc
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain {
        format!("{dc}.json")
    } else {
        format!("dc-{:016x}.json", fnv1a(dc.as_bytes()))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The real file's path and content of a stored copy; `None` without the header line.
fn split_copy(text: &str) -> Option<(PathBuf, String)> {
    let rest = text.strip_prefix(HEADER)?;
    let (path, content) = rest.split_once('\n')?;
    Some((PathBuf::from(path), content.to_string()))
}

#[derive(Serialize, Deserialize)]
struct CatalogFile {
    format: u32,
    datacenter: String,
    saved_unix_ms: u64,
    services: BTreeMap<String, Vec<StoredInstance>>,
}

/// [`Instance`] as stored: the model itself stays free of serde.
#[derive(Serialize, Deserialize)]
struct StoredInstance {
    node: Option<String>,
    address: String,
    port: u16,
    mesh_port: u16,
    labels: BTreeMap<String, String>,
    weight: u32,
    healthy: bool,
    locality: Option<String>,
}

impl From<&Instance> for StoredInstance {
    fn from(i: &Instance) -> StoredInstance {
        StoredInstance {
            node: i.node.clone(),
            address: i.address.clone(),
            port: i.port,
            mesh_port: i.mesh_port,
            labels: i.labels.clone(),
            weight: i.weight,
            healthy: i.healthy,
            locality: i.locality.clone(),
        }
    }
}

impl From<StoredInstance> for Instance {
    fn from(i: StoredInstance) -> Instance {
        Instance {
            node: i.node,
            address: i.address,
            port: i.port,
            mesh_port: i.mesh_port,
            labels: i.labels,
            weight: i.weight,
            healthy: i.healthy,
            draining: false,
            locality: i.locality,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(address: &str) -> Instance {
        Instance {
            node: Some("vm-b".into()),
            address: address.into(),
            port: 9080,
            mesh_port: 15006,
            labels: BTreeMap::from([("version".into(), "v1".into())]),
            weight: 3,
            healthy: false,
            draining: false,
            locality: Some("dc1".into()),
        }
    }

    #[test]
    fn registry_files_round_trip_byte_for_byte() {
        let state = tempfile::tempdir().expect("tempdir");
        let store = LastGoodStore::in_state_dir(state.path());
        assert!(store.load_files().is_empty(), "nothing stored yet");
        let a = PathBuf::from("/etc/pilotfish/registry.d/reviews.toml");
        let b = PathBuf::from("/etc/pilotfish/other.d/reviews.toml");
        let content = "[services.reviews]\nport = 9080\n# no newline at the end";
        store.save_file(&a, content).expect("save a");
        store.save_file(&b, "").expect("save b");
        let loaded = store.load_files();
        assert_eq!(
            loaded.len(),
            2,
            "same file name, different paths: two copies"
        );
        assert_eq!(loaded[&a].content, content);
        assert_eq!(loaded[&b].content, "");
        assert_eq!(loaded[&a].copy, store.file_copy(&a));
        let text = std::fs::read_to_string(store.file_copy(&a)).expect("copy");
        assert!(text
            .starts_with("# pilotfish last good copy of /etc/pilotfish/registry.d/reviews.toml\n"));

        store.save_file(&a, "changed").expect("replace");
        assert_eq!(store.load_files()[&a].content, "changed");
        store.remove_file(&a).expect("remove");
        let loaded = store.load_files();
        assert!(!loaded.contains_key(&a));
        assert!(loaded.contains_key(&b));
    }

    #[test]
    fn stray_files_in_the_store_are_ignored() {
        let state = tempfile::tempdir().expect("tempdir");
        let store = LastGoodStore::in_state_dir(state.path());
        store
            .save_file(Path::new("/r/a.toml"), "x = 1")
            .expect("save");
        let dir = state.path().join("last-good/files");
        std::fs::write(dir.join("junk.toml"), "no header").expect("junk");
        std::fs::write(
            dir.join(".half.tmp"),
            "# pilotfish last good copy of /r/b.toml\n",
        )
        .expect("tmp");
        let loaded = store.load_files();
        assert_eq!(
            loaded.keys().collect::<Vec<_>>(),
            vec![Path::new("/r/a.toml")]
        );
    }

    #[test]
    fn consul_catalogs_round_trip_per_datacenter() {
        let state = tempfile::tempdir().expect("tempdir");
        let store = LastGoodStore::in_state_dir(state.path());
        assert_eq!(store.load_consul("dc1").expect("load"), None);
        let services = BTreeMap::from([
            (
                "reviews".to_string(),
                vec![instance("10.0.0.1"), instance("10.0.0.2")],
            ),
            ("empty".to_string(), vec![]),
        ]);
        let before = SystemTime::now() - Duration::from_secs(1);
        store.save_consul("dc1", &services).expect("save");
        let loaded = store.load_consul("dc1").expect("load").expect("stored");
        assert_eq!(loaded.services, services);
        assert!(loaded.saved >= before);
        assert_eq!(store.load_consul("dc2").expect("load"), None);

        // A copy under another datacenter's name is not taken for it.
        std::fs::copy(store.consul_copy("dc1"), store.consul_copy("dc2")).expect("copy");
        assert!(store.load_consul("dc2").is_err());
        std::fs::write(store.consul_copy("dc3"), "{").expect("write");
        assert!(store.load_consul("dc3").is_err());
        assert!(dc_name("../x").starts_with("dc-"));
    }
}
