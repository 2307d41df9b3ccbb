//! Join tokens: how a host proves, once, that the operator meant it to join as a given node.
//!
//! A token reads `pft1.<id>.<secret>`: `id` is 16 hex digits that name it in lists and logs,
//! `secret` is 32 random bytes in hex. Only the SHA-256 of the secret is stored, in
//! `<state_dir>/tokens.json` (mode 0600, replaced atomically), with the node it is bound to,
//! when it was created, when it expires and when it was used or revoked. A token enrols its
//! node once; after that the host authenticates with its node certificate.
//!
//! Every call re-reads the file, because `pilotfish-discovery token create` writes it while
//! discovery runs. Writers take `tokens.json.lock` (created exclusively) around their
//! read-modify-write, so a token redeemed by discovery can never be "un-used" by a CLI writing
//! back an older copy. The calls do blocking file I/O; from async code run them in
//! `spawn_blocking`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use pilotfish_durable as durable;

use crate::private_file::{self, FileError};
use crate::shared::{self, SharedDoc, SharedError};
use crate::spiffe::{self, InvalidSpiffeId};

const PREFIX: &str = "pft1";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Lifetime of a token when the operator gives none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime a token may have: tokens are for enrolling now, not for images that boot
/// next year (Kuma's 10-year default is the cautionary tale).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Tokens that expired this long ago are dropped from the file on the next write.
const KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The token store could not be read or written, or the request was invalid.
#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{}: not a valid token file", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: another writer holds the lock", path.display())]
    Locked { path: PathBuf },
    #[error("invalid node for a join token")]
    InvalidNode(#[source] InvalidSpiffeId),
    #[error("a token's lifetime must be between 1s and {}h", MAX_TOKEN_TTL.as_secs() / 3600)]
    BadTtl,
    #[error("no join token with id {0}")]
    UnknownId(String),
    #[error("the shared join token store")]
    Shared(#[from] SharedError),
}

/// Why a join token was refused. The messages never contain the secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenRejected {
    #[error("the join token is malformed (expected pft1.<id>.<secret>)")]
    Malformed,
    #[error("unknown join token {id}")]
    Unknown { id: String },
    #[error("join token {id} was revoked")]
    Revoked { id: String },
    #[error(
        "join token {id} has expired; create a new one with `pilotfish-discovery token create`"
    )]
    Expired { id: String },
    #[error(
        "join token {id} was already used; a host that lost its node certificate needs a new token"
    )]
    AlreadyUsed { id: String },
    #[error("join token {id} is bound to a different node than {presented}")]
    WrongNode {
        id: String,
        presented: String,
        /// The node the token was made for; for discovery's log, not for the caller.
        bound: String,
    },
    #[error("the join token store failed")]
    Store(#[from] TokenStoreError),
}

/// What the store knows about a token (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub node: String,
    pub created: SystemTime,
    pub expires: SystemTime,
    pub used: Option<SystemTime>,
    pub revoked: Option<SystemTime>,
}

impl TokenInfo {
    /// `"revoked"`, `"used"`, `"expired"` or `"valid"`, for `token list`.
    pub fn state(&self, now: SystemTime) -> &'static str {
        if self.revoked.is_some() {
            "revoked"
        } else if self.used.is_some() {
            "used"
        } else if now >= self.expires {
            "expired"
        } else {
            "valid"
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    version: u32,
    tokens: Vec<StoredToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredToken {
    id: String,
    node: String,
    /// SHA-256 of the secret part, hex.
    secret_sha256: String,
    created_unix: u64,
    expires_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_unix: Option<u64>,
}

impl StoredToken {
    fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            node: self.node.clone(),
            created: from_unix(self.created_unix),
            expires: from_unix(self.expires_unix),
            used: self.used_unix.map(from_unix),
            revoked: self.revoked_unix.map(from_unix),
        }
    }
}

/// Join tokens in `<state_dir>/tokens.json`, or in a document the replicas share.
#[derive(Clone)]
pub struct TokenStore {
    path: PathBuf,
    shared: Option<SharedDoc>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("path", &self.path)
            .field("shared", &self.shared.as_ref().map(|d| d.describe()))
            .finish()
    }
}

impl TokenStore {
    /// The store in `state_dir` (created on first write).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("tokens.json"),
            shared: None,
        }
    }

    /// The store in a document several replicas share; redeeming stays single-use across
    /// them (see [`crate::shared`]).
    pub fn shared(doc: SharedDoc) -> Self {
        Self {
            path: PathBuf::from(doc.describe()),
            shared: Some(doc),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes a token for `node`, valid for `ttl`, and returns it. This is the only time the
    /// secret exists outside the operator's hands.
    pub fn create(&self, node: &str, ttl: Duration) -> Result<String, TokenStoreError> {
        self.create_at(node, ttl, SystemTime::now())
    }

    /// [`TokenStore::create`] at a given time.
    pub fn create_at(
        &self,
        node: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, TokenStoreError> {
        spiffe::validate_name(node).map_err(TokenStoreError::InvalidNode)?;
        if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
            return Err(TokenStoreError::BadTtl);
        }
        let id = hex(&rand::random::<[u8; ID_BYTES]>());
        let secret = hex(&rand::random::<[u8; SECRET_BYTES]>());
        self.update(|file| {
            file.tokens.push(StoredToken {
                id: id.clone(),
                node: node.to_owned(),
                secret_sha256: hex(&Sha256::digest(secret.as_bytes())),
                created_unix: to_unix(now),
                expires_unix: to_unix(now + ttl),
                used_unix: None,
                revoked_unix: None,
            });
            prune(file, now);
            Ok(true)
        })?;
        tracing::info!(token = %id, node, "created a join token");
        Ok(format!("{PREFIX}.{id}.{secret}"))
    }

    /// Accepts `token` for `node` once: it must exist, match, be bound to `node`, and be
    /// neither revoked, expired nor used. On success it is marked used.
    pub fn redeem(&self, token: &str, node: &str) -> Result<(), TokenRejected> {
        self.redeem_at(token, node, SystemTime::now())
    }

    /// [`TokenStore::redeem`] at a given time.
    pub fn redeem_at(&self, token: &str, node: &str, now: SystemTime) -> Result<(), TokenRejected> {
        let (id, secret) = split_token(token).ok_or(TokenRejected::Malformed)?;
        let presented = Sha256::digest(secret.as_bytes());
        let mut outcome = Ok(());
        self.update(|file| {
            outcome = check_and_mark(file, id, &presented, node, now);
            Ok(outcome.is_ok())
        })?;
        match &outcome {
            Ok(()) => tracing::info!(token = %id, node, "redeemed a join token"),
            Err(TokenRejected::WrongNode { bound, .. }) => {
                tracing::warn!(token = %id, node, bound = %bound, "join token presented for another node")
            }
            Err(e) => tracing::warn!(token = %id, node, reason = %e, "refused a join token"),
        }
        outcome
    }

    /// Revokes the token with this id; revoking twice is not an error.
    pub fn revoke(&self, id: &str) -> Result<(), TokenStoreError> {
        let now = SystemTime::now();
        self.update(|file| {
            let token = file
                .tokens
                .iter_mut()
                .find(|t| t.id == id)
                .ok_or_else(|| TokenStoreError::UnknownId(id.to_owned()))?;
            token.revoked_unix.get_or_insert(to_unix(now));
            Ok(true)
        })?;
        tracing::info!(token = %id, "revoked a join token");
        Ok(())
    }

    /// Every token in the file, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenStoreError> {
        Ok(self.read()?.tokens.iter().map(StoredToken::info).collect())
    }

    fn read(&self) -> Result<TokenFile, TokenStoreError> {
        if let Some(doc) = &self.shared {
            return self.parse(doc.load()?.0.as_deref());
        }
        match fs::read(&self.path) {
            Ok(bytes) => self.parse(Some(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.parse(None),
            Err(e) => Err(private_file::at(&self.path)(e).into()),
        }
    }

    fn parse(&self, bytes: Option<&[u8]>) -> Result<TokenFile, TokenStoreError> {
        let Some(bytes) = bytes else {
            return Ok(TokenFile {
                version: 1,
                tokens: Vec::new(),
            });
        };
        serde_json::from_slice(bytes).map_err(|source| TokenStoreError::Corrupt {
            path: self.path.clone(),
            source,
        })
    }

    fn render(&self, file: &TokenFile) -> Result<Vec<u8>, TokenStoreError> {
        serde_json::to_vec_pretty(file).map_err(|source| TokenStoreError::Corrupt {
            path: self.path.clone(),
            source,
        })
    }

    /// Read, change, write back, under the lock (a shared document: write if unchanged, else
    /// again). `change` says whether it changed anything; if not, or if it fails, nothing is
    /// written.
    fn update(
        &self,
        mut change: impl FnMut(&mut TokenFile) -> Result<bool, TokenStoreError>,
    ) -> Result<(), TokenStoreError> {
        if let Some(doc) = &self.shared {
            let changed = |file: &mut TokenFile| {
                file.version = 1;
                change(file)
            };
            shared::update(doc.as_ref(), |b| self.parse(b), |f| self.render(f), changed)?;
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            durable::create_dir_all(dir, durable::PRIVATE_DIR_MODE)
                .map_err(private_file::at(dir))?;
        }
        let lock_path = self.path.with_extension("json.lock");
        let _lock = private_file::Lock::acquire(&lock_path).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                TokenStoreError::Locked {
                    path: lock_path.clone(),
                }
            } else {
                private_file::at(&lock_path)(e).into()
            }
        })?;
        let mut file = self.read()?;
        file.version = 1;
        if !change(&mut file)? {
            return Ok(());
        }
        let json = self.render(&file)?;
        durable::write_atomic(&self.path, &json, durable::SECRET_MODE)
            .map_err(private_file::at(&self.path))?;
        Ok(())
    }
}

fn check_and_mark(
    file: &mut TokenFile,
    id: &str,
    presented: &[u8],
    node: &str,
    now: SystemTime,
) -> Result<(), TokenRejected> {
    let unknown = || TokenRejected::Unknown { id: id.to_owned() };
    let token = file
        .tokens
        .iter_mut()
        .find(|t| t.id == id)
        .ok_or_else(unknown)?;
    let stored = unhex(&token.secret_sha256).ok_or_else(unknown)?;
    if !constant_time_eq(&stored, presented) {
        // Same answer as an unknown id: a wrong secret learns nothing.
        return Err(unknown());
    }
    let id = id.to_owned();
    if token.revoked_unix.is_some() {
        return Err(TokenRejected::Revoked { id });
    }
    if token.used_unix.is_some() {
        return Err(TokenRejected::AlreadyUsed { id });
    }
    if to_unix(now) >= token.expires_unix {
        return Err(TokenRejected::Expired { id });
    }
    if token.node != node {
        return Err(TokenRejected::WrongNode {
            id,
            presented: node.to_owned(),
            bound: token.node.clone(),
        });
    }
    token.used_unix = Some(to_unix(now));
    Ok(())
}

/// `pft1.<16 hex>.<64 hex>` -> (id, secret).
fn split_token(token: &str) -> Option<(&str, &str)> {
    let mut parts = token.trim().split('.');
    let (prefix, id, secret) = (parts.next()?, parts.next()?, parts.next()?);
    let is_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if parts.next().is_some()
        || prefix != PREFIX
        || !is_hex(id, 2 * ID_BYTES)
        || !is_hex(secret, 2 * SECRET_BYTES)
    {
        return None;
    }
    Some((id, secret))
}

fn prune(file: &mut TokenFile, now: SystemTime) {
    let horizon = to_unix(now).saturating_sub(KEEP_AFTER_EXPIRY.as_secs());
    file.tokens.retain(|t| t.expires_unix > horizon);
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn store() -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        (dir, store)
    }

    fn id_of(token: &str) -> String {
        token.split('.').nth(1).unwrap().to_owned()
    }

    #[test]
    fn token_shape() {
        let (_dir, store) = store();
        let token = store.create("vm-b", HOUR).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "pft1");
        assert_eq!(parts[1].len(), 16);
        assert_eq!(parts[2].len(), 64);
        assert!(split_token(&token).is_some());
    }

    #[test]
    fn redeems_once_for_its_node() {
        let (_dir, store) = store();
        let token = store.create("vm-b", HOUR).unwrap();
        let id = id_of(&token);

        let err = store.redeem(&token, "vm-c").unwrap_err();
        assert!(matches!(err, TokenRejected::WrongNode { .. }), "{err}");
        assert!(!err.to_string().contains("vm-b"), "{err}");

        store.redeem(&token, "vm-b").unwrap();
        let err = store.redeem(&token, "vm-b").unwrap_err();
        assert!(matches!(err, TokenRejected::AlreadyUsed { .. }), "{err}");

        let info = &store.list().unwrap()[0];
        assert_eq!(info.id, id);
        assert_eq!(info.node, "vm-b");
        assert!(info.used.is_some());
        assert_eq!(info.state(SystemTime::now()), "used");
    }

    #[test]
    fn refuses_unknown_malformed_expired_and_revoked() {
        let (_dir, store) = store();
        let now = SystemTime::now();
        let token = store.create_at("vm-b", HOUR, now).unwrap();

        let err = store
            .redeem_at(&token, "vm-b", now + HOUR + Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, TokenRejected::Expired { .. }), "{err}");

        // Right id, wrong secret: indistinguishable from an unknown token.
        let forged = format!("pft1.{}.{}", id_of(&token), "0".repeat(64));
        let err = store.redeem(&forged, "vm-b").unwrap_err();
        assert!(matches!(err, TokenRejected::Unknown { .. }), "{err}");
        let err = store
            .redeem(
                &format!("pft1.{}.{}", "1".repeat(16), "0".repeat(64)),
                "vm-b",
            )
            .unwrap_err();
        assert!(matches!(err, TokenRejected::Unknown { .. }), "{err}");

        for bad in [
            "",
            "pft1",
            "pft2.0011223344556677.00",
            &token.to_uppercase(),
            &format!("{token}.x"),
        ] {
            let err = store.redeem(bad, "vm-b").unwrap_err();
            assert!(matches!(err, TokenRejected::Malformed), "{bad:?}: {err}");
        }

        store.revoke(&id_of(&token)).unwrap();
        let err = store.redeem(&token, "vm-b").unwrap_err();
        assert!(matches!(err, TokenRejected::Revoked { .. }), "{err}");
        assert!(matches!(
            store.revoke("ffffffffffffffff"),
            Err(TokenStoreError::UnknownId(_))
        ));

        // Every message is distinct and none echoes the secret.
        let secret = token.rsplit('.').next().unwrap();
        let messages = [
            TokenRejected::Malformed.to_string(),
            TokenRejected::Unknown { id: "x".into() }.to_string(),
            TokenRejected::Revoked { id: "x".into() }.to_string(),
            TokenRejected::Expired { id: "x".into() }.to_string(),
            TokenRejected::AlreadyUsed { id: "x".into() }.to_string(),
            err.to_string(),
        ];
        for (i, m) in messages.iter().enumerate() {
            assert!(!m.contains(secret));
            assert!(messages[..i].iter().all(|other| other != m), "{m}");
        }
    }

    #[test]
    fn file_holds_only_hashes_and_is_private() {
        let (_dir, store) = store();
        let token = store.create("vm-b", HOUR).unwrap();
        let secret = token.rsplit('.').next().unwrap();
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(secret));
        assert!(text.contains(&hex(&Sha256::digest(secret.as_bytes()))));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!store.path().with_extension("json.lock").exists());
    }

    #[test]
    fn sees_tokens_written_by_another_process() {
        // The CLI and discovery each hold their own store on the same file.
        let (dir, cli) = store();
        let discovery = TokenStore::new(dir.path());
        assert!(discovery.list().unwrap().is_empty());
        let token = cli.create("vm-b", HOUR).unwrap();
        discovery.redeem(&token, "vm-b").unwrap();
        let again = cli.create("vm-c", HOUR).unwrap();
        assert!(matches!(
            discovery.redeem(&token, "vm-b"),
            Err(TokenRejected::AlreadyUsed { .. })
        ));
        discovery.redeem(&again, "vm-c").unwrap();
    }

    #[test]
    fn refuses_bad_nodes_and_lifetimes() {
        let (_dir, store) = store();
        assert!(matches!(
            store.create("../vm", HOUR),
            Err(TokenStoreError::InvalidNode(_))
        ));
        assert!(matches!(
            store.create("vm-b", Duration::ZERO),
            Err(TokenStoreError::BadTtl)
        ));
        assert!(matches!(
            store.create("vm-b", MAX_TOKEN_TTL + HOUR),
            Err(TokenStoreError::BadTtl)
        ));
    }

    #[test]
    fn concurrent_redeems_succeed_once() {
        let (_dir, store) = store();
        let token = store.create("vm-b", HOUR).unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (store, token) = (store.clone(), token.clone());
                std::thread::spawn(move || store.redeem(&token, "vm-b").is_ok())
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(wins, 1);
    }

    #[test]
    fn prunes_long_expired_tokens() {
        let (_dir, store) = store();
        let long_ago = SystemTime::now() - KEEP_AFTER_EXPIRY - 2 * HOUR;
        store.create_at("vm-old", HOUR, long_ago).unwrap();
        store.create("vm-new", HOUR).unwrap();
        let nodes: Vec<String> = store.list().unwrap().into_iter().map(|t| t.node).collect();
        assert_eq!(nodes, vec!["vm-new"]);
    }

    #[test]
    fn a_shared_token_redeems_once_across_replicas_even_after_a_lost_race() {
        use std::sync::Arc;

        use crate::shared::testing::MemoryDoc;

        let doc = Arc::new(MemoryDoc::default());
        let a = TokenStore::shared(doc.clone());
        let b = TokenStore::shared(doc.clone());
        let token = a.create("vm-b", HOUR).unwrap();
        assert_eq!(b.list().unwrap().len(), 1, "created on A, seen on B");
        // B's first write loses a race with another writer; it reads again and still wins.
        *doc.lose_next.lock().unwrap() = 1;
        b.redeem(&token, "vm-b").unwrap();
        assert!(matches!(
            a.redeem(&token, "vm-b"),
            Err(TokenRejected::AlreadyUsed { .. })
        ));
        assert_eq!(a.list().unwrap()[0].state(SystemTime::now()), "used");
    }
}
