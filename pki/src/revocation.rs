//! Revoking a node: cutting a host off before its certificates expire.
//!
//! Two files in `state_dir`, each with one kind of writer:
//!
//! - `revocations.json` (mode 0600, replaced atomically under `revocations.json.lock`), written
//!   by `pilotfish-discovery node revoke|restore` while discovery runs: per node, when it was
//!   revoked and, once restored, when. Discovery re-reads it every second.
//! - `issued.jsonl`, appended (and fsync-ed) by discovery before it hands out any certificate
//!   it signs for a node, the node certificate or a service certificate: serial, node, identity,
//!   when it was issued, when it expires. Lines of expired certificates are dropped when
//!   discovery compacts the file (on start and every [`COMPACT_EVERY`] appends), so the file is
//!   bounded by the certificates alive at once.
//!
//! The rule ([`Revocations::revokes`]): a certificate issued to a node is revoked when the node
//! has a revocation and the certificate was issued before the node was restored (or the node
//! is still revoked). So a restore never revives a stolen certificate; only a new enrolment
//! (a new join token) after the restore gives the host certificates that peers accept again.
//! Certificates issued while the node was revoked, in the second before discovery noticed,
//! are covered too.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use pilotfish_durable as durable;

use crate::private_file::{self, FileError, Lock};
use crate::shared::{self, SharedDoc, SharedError};
use crate::spiffe::{self, InvalidSpiffeId};

/// The file `node revoke` writes.
pub const REVOCATIONS_FILE: &str = "revocations.json";
/// The file discovery appends every issued node and service certificate to.
pub const ISSUED_FILE: &str = "issued.jsonl";
/// Discovery rewrites `issued.jsonl` without expired lines after this many appends.
pub const COMPACT_EVERY: usize = 1000;

/// The revocation store could not be read or written, or the request was invalid.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{}: not a valid revocation file", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: another writer holds the lock", path.display())]
    Locked { path: PathBuf },
    #[error("invalid node name")]
    InvalidNode(#[source] InvalidSpiffeId),
    #[error("the shared revocation store")]
    Shared(#[from] SharedError),
}

/// One node's revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRevocation {
    pub revoked_unix_ms: u64,
    /// Set by `node restore`; certificates issued before it stay revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_unix_ms: Option<u64>,
}

impl NodeRevocation {
    /// Whether the node is cut off now (revoked and not restored).
    pub fn in_force(&self) -> bool {
        self.restored_unix_ms.is_none()
    }

    pub fn revoked_at(&self) -> SystemTime {
        from_ms(self.revoked_unix_ms)
    }

    pub fn restored_at(&self) -> Option<SystemTime> {
        self.restored_unix_ms.map(from_ms)
    }

    /// Whether a certificate issued at `issued_unix_ms` to this node is revoked.
    fn covers(&self, issued_unix_ms: u64) -> bool {
        self.restored_unix_ms.is_none_or(|r| issued_unix_ms < r)
    }
}

/// The contents of `revocations.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocations {
    #[serde(default)]
    version: u32,
    #[serde(default)]
    nodes: BTreeMap<String, NodeRevocation>,
}

impl Revocations {
    /// Every node that was ever revoked, restored or not.
    pub fn nodes(&self) -> &BTreeMap<String, NodeRevocation> {
        &self.nodes
    }

    pub fn node(&self, node: &str) -> Option<&NodeRevocation> {
        self.nodes.get(node)
    }

    /// Whether `node` is cut off now.
    pub fn is_revoked(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(NodeRevocation::in_force)
    }

    /// The nodes cut off now.
    pub fn revoked_nodes(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|(_, r)| r.in_force())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether `cert` is revoked (see the module comment for the rule).
    pub fn revokes(&self, cert: &IssuedCert) -> bool {
        self.nodes
            .get(&cert.node)
            .is_some_and(|r| r.covers(cert.issued_unix_ms))
    }

    /// Marks `node` revoked at `now`. Returns false if it already was (the first time stays).
    pub fn revoke(&mut self, node: &str, now: SystemTime) -> bool {
        if self.is_revoked(node) {
            return false;
        }
        self.nodes.insert(
            node.to_owned(),
            NodeRevocation {
                revoked_unix_ms: to_ms(now),
                restored_unix_ms: None,
            },
        );
        true
    }

    /// Marks `node` restored at `now`. Returns false if it was not revoked.
    pub fn restore(&mut self, node: &str, now: SystemTime) -> bool {
        match self.nodes.get_mut(node) {
            Some(r) if r.in_force() => {
                // Strictly after every certificate issued so far, even with a coarse clock.
                r.restored_unix_ms = Some(to_ms(now).max(r.revoked_unix_ms + 1));
                true
            }
            _ => false,
        }
    }

    /// Drops restored entries older than `keep` (every certificate they covered has expired).
    fn prune(&mut self, now: SystemTime, keep: Duration) {
        let horizon = to_ms(now).saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(0));
        self.nodes
            .retain(|_, r| r.restored_unix_ms.is_none_or(|t| t >= horizon));
    }
}

/// Restored entries are kept this long: longer than any certificate they could cover.
pub const KEEP_RESTORED: Duration = Duration::from_secs(400 * 24 * 3600);

/// `revocations.json` in `state_dir`, or a document the replicas share.
#[derive(Clone)]
pub struct RevocationStore {
    path: PathBuf,
    shared: Option<SharedDoc>,
}

impl std::fmt::Debug for RevocationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationStore")
            .field("path", &self.path)
            .field("shared", &self.shared.as_ref().map(|d| d.describe()))
            .finish()
    }
}

impl RevocationStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(REVOCATIONS_FILE),
            shared: None,
        }
    }

    /// The revocations in a document several replicas share. Each replica's copy in its
    /// `state_dir` follows it (discovery's store watch writes it), and the running discovery
    /// enforces that copy.
    pub fn shared(doc: SharedDoc) -> Self {
        Self {
            path: PathBuf::from(doc.describe()),
            shared: Some(doc),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's contents; empty when it does not exist.
    pub fn load(&self) -> Result<Revocations, RevocationError> {
        if let Some(doc) = &self.shared {
            return match doc.load()?.0 {
                Some(bytes) => Self::parse(&self.path, &bytes),
                None => Ok(Revocations::default()),
            };
        }
        match fs::read(&self.path) {
            Ok(bytes) => Self::parse(&self.path, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Revocations::default()),
            Err(e) => Err(private_file::at(&self.path)(e).into()),
        }
    }

    /// Parses the file's bytes (discovery compares bytes before parsing).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Revocations, RevocationError> {
        serde_json::from_slice(bytes).map_err(|source| RevocationError::Corrupt {
            path: path.to_owned(),
            source,
        })
    }

    /// Cuts `node` off. Returns false if it already was.
    pub fn revoke(&self, node: &str, now: SystemTime) -> Result<bool, RevocationError> {
        spiffe::validate_name(node).map_err(RevocationError::InvalidNode)?;
        self.update(|r| r.revoke(node, now), now)
    }

    /// Lifts the revocation of `node`. Returns false if it was not revoked.
    pub fn restore(&self, node: &str, now: SystemTime) -> Result<bool, RevocationError> {
        spiffe::validate_name(node).map_err(RevocationError::InvalidNode)?;
        self.update(|r| r.restore(node, now), now)
    }

    fn update(
        &self,
        mut change: impl FnMut(&mut Revocations) -> bool,
        now: SystemTime,
    ) -> Result<bool, RevocationError> {
        let render = |r: &Revocations| {
            serde_json::to_vec_pretty(r).map_err(|source| RevocationError::Corrupt {
                path: self.path.clone(),
                source,
            })
        };
        if let Some(doc) = &self.shared {
            let parse = |bytes: Option<&[u8]>| match bytes {
                Some(b) => Self::parse(&self.path, b),
                None => Ok(Revocations::default()),
            };
            let changed = |r: &mut Revocations| {
                r.version = 1;
                let changed = change(r);
                r.prune(now, KEEP_RESTORED);
                Ok(changed)
            };
            return shared::update(doc.as_ref(), parse, render, changed);
        }
        if let Some(dir) = self.path.parent() {
            durable::create_dir_all(dir, durable::PRIVATE_DIR_MODE)
                .map_err(private_file::at(dir))?;
        }
        let lock_path = self.path.with_extension("json.lock");
        let _lock = Lock::acquire(&lock_path).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                RevocationError::Locked {
                    path: lock_path.clone(),
                }
            } else {
                private_file::at(&lock_path)(e).into()
            }
        })?;
        let mut revocations = self.load()?;
        revocations.version = 1;
        if !change(&mut revocations) {
            return Ok(false);
        }
        revocations.prune(now, KEEP_RESTORED);
        let json = render(&revocations)?;
        durable::write_atomic(&self.path, &json, durable::SECRET_MODE)
            .map_err(private_file::at(&self.path))?;
        Ok(true)
    }
}

/// One certificate discovery signed for a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Hex, lower case, no separators (as [`crate::Issued::serial`] and [`serial_of`]).
    pub serial: String,
    pub node: String,
    /// The SPIFFE ID it carries.
    pub id: String,
    pub issued_unix_ms: u64,
    pub not_after_unix: u64,
}

impl IssuedCert {
    pub fn new(
        serial: &str,
        node: &str,
        id: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) -> Self {
        IssuedCert {
            serial: serial.to_ascii_lowercase(),
            node: node.to_owned(),
            id: id.to_owned(),
            issued_unix_ms: to_ms(issued),
            not_after_unix: to_ms(not_after) / 1000,
        }
    }

    pub fn not_after(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.not_after_unix)
    }

    pub fn issued_at(&self) -> SystemTime {
        from_ms(self.issued_unix_ms)
    }

    fn expired_at(&self, now: SystemTime) -> bool {
        self.not_after() <= now
    }
}

/// `issued.jsonl` in `state_dir`.
#[derive(Debug, Clone)]
pub struct IssuedLog {
    path: PathBuf,
}

impl IssuedLog {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(ISSUED_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line and syncs it to disk, so a certificate is on record before anyone
    /// holds it.
    pub fn append(&self, cert: &IssuedCert) -> Result<(), FileError> {
        let mut line = serde_json::to_vec(cert).map_err(|e| FileError {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        durable::append(&self.path, &line, durable::SECRET_MODE)
            .map_err(private_file::at(&self.path))
    }

    /// The unexpired certificates on record. A line that does not parse (a write cut short by
    /// a crash) is skipped and logged.
    pub fn load(&self, now: SystemTime) -> Result<Vec<IssuedCert>, FileError> {
        let file = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(private_file::at(&self.path)(e)),
        };
        let mut certs = Vec::new();
        for (n, line) in io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(private_file::at(&self.path))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<IssuedCert>(&line) {
                Ok(cert) if !cert.expired_at(now) => certs.push(cert),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    file = %self.path.display(),
                    line = n + 1,
                    error = %e,
                    "skipping an unreadable line of the issued-certificate log"
                ),
            }
        }
        Ok(certs)
    }

    /// Replaces the file with `certs` minus the expired ones (atomically).
    pub fn compact(&self, certs: &[IssuedCert], now: SystemTime) -> Result<(), FileError> {
        let mut out = Vec::new();
        for cert in certs.iter().filter(|c| !c.expired_at(now)) {
            if let Ok(line) = serde_json::to_vec(cert) {
                out.extend_from_slice(&line);
                out.push(b'\n');
            }
        }
        durable::write_atomic(&self.path, &out, durable::SECRET_MODE)
            .map_err(private_file::at(&self.path))
    }
}

/// What `node list` shows for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: String,
    /// Unexpired certificates on record.
    pub certificates: usize,
    pub last_issued: Option<SystemTime>,
    pub revocation: Option<NodeRevocation>,
}

/// One row per node that has unexpired certificates on record or a revocation, by name.
/// (The CLI adds nodes that only have join tokens.)
pub fn summarize(certs: &[IssuedCert], revocations: &Revocations) -> Vec<NodeSummary> {
    let mut rows: BTreeMap<&str, NodeSummary> = BTreeMap::new();
    let row = |node: &str| NodeSummary {
        node: node.to_owned(),
        certificates: 0,
        last_issued: None,
        revocation: None,
    };
    for cert in certs {
        let r = rows.entry(&cert.node).or_insert_with(|| row(&cert.node));
        r.certificates += 1;
        r.last_issued = r.last_issued.max(Some(cert.issued_at()));
    }
    for (node, revocation) in revocations.nodes() {
        rows.entry(node).or_insert_with(|| row(node)).revocation = Some(*revocation);
    }
    rows.into_values().collect()
}

/// The serial of a DER certificate as [`IssuedCert::serial`] spells it.
pub fn serial_of(der: &[u8]) -> Option<String> {
    x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| {
        c.raw_serial_as_string()
            .replace(':', "")
            .to_ascii_lowercase()
    })
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
#[path = "revocation_tests.rs"]
mod tests;
