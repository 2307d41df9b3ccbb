//! Operator commands that work on the state directory, with or without discovery running:
//! join tokens (`token create|list|revoke`), hosts (`node list|revoke|restore`) and the CA
//! (`ca bundle|roots|prepare-rotation|switch|retire|intermediate|sign-intermediate`). Each returns what to print; `main.rs` prints it and picks the exit code
//! from [`AdminError::is_usage`].
//!
//! Run them as the user discovery runs as: they create files in `state_dir` (the CA, on first
//! use, and `tokens.json`), and discovery must be able to read them.
//!
//! # Root rotation, with traffic flowing
//!
//! 1. `ca prepare-rotation`, then SIGHUP discovery (`systemctl reload pilotfish-discovery`):
//!    the bundle now holds old + new roots, in every certificate and Bundle response.
//! 2. Wait until every host trusts the new root (agents receive the bundle with every renewal
//!    and Bundle call; also hand the new `ca bundle` output out as hosts' `ca_file`).
//! 3. `ca switch`, SIGHUP: new certificates (and discovery's own) chain to the new root; the
//!    old root stays in the bundle, so certificates it signed keep working.
//! 4. Wait until every certificate from the old root has been renewed: the longer of
//!    `workload_ttl` and `node_ttl` (7 days by default).
//! 5. `ca retire <fingerprint>` (from `ca roots`), SIGHUP.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pilotfish_durable as durable;
use pilotfish_pki::ca::{request_intermediate, sign_intermediate, DEFAULT_INTERMEDIATE_TTL};
use pilotfish_pki::revocation::summarize;
use pilotfish_pki::tokens::DEFAULT_TOKEN_TTL;
use pilotfish_pki::{
    Ca, CaError, IntermediateError, IssuedLog, RevocationError, RevocationStore, TokenStore,
    TokenStoreError,
};
use pilotfish_registries::config_vocab::parse_duration;
use pilotfish_registries::consul::ConsulError;

use crate::config::Config;
use crate::identity::utc;
use crate::store::{SharedStore, REVOCATIONS_KEY, TOKENS_KEY};

/// A command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("--ttl: {0}")]
    BadTtl(String),
    #[error(transparent)]
    Tokens(#[from] TokenStoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Revocations(#[from] RevocationError),
    #[error(transparent)]
    Issued(#[from] pilotfish_pki::FileError),
    #[error(transparent)]
    Intermediate(#[from] IntermediateError),
    #[error("[store.consul]")]
    Store(#[from] ConsulError),
    #[error("{0}")]
    Shared(String),
    #[error("{}: no root key here; run this where the root is kept, or give --root-cert and --root-key", .0.display())]
    NoRoot(PathBuf),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AdminError {
    /// A mistake in the command or the config (exit 64) rather than a failure (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            AdminError::BadTtl(_)
                | AdminError::Tokens(TokenStoreError::InvalidNode(_) | TokenStoreError::BadTtl)
                | AdminError::Ca(CaError::Config(_))
                | AdminError::Revocations(RevocationError::InvalidNode(_))
                | AdminError::Intermediate(
                    IntermediateError::BadName(_)
                        | IntermediateError::KeyExists(_)
                        | IntermediateError::NotRoot(_)
                        | IntermediateError::Rejected(_)
                )
                | AdminError::NoRoot(_)
        )
    }
}

/// What a command prints: `stdout` for scripts (a token, a bundle), `stderr` for people.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// The join tokens: in the replicas' shared store with `[store.consul]`, else in `state_dir`.
fn tokens(config: &Config) -> Result<TokenStore, AdminError> {
    Ok(match &config.store {
        Some(s) => TokenStore::shared(SharedStore::new(s, &config.state_dir)?.document(TOKENS_KEY)),
        None => TokenStore::new(&config.state_dir),
    })
}

/// The node revocations, shared like [`tokens`]. With a shared store, each replica's
/// `state_dir/revocations.json` follows it within moments.
fn revocations(config: &Config) -> Result<RevocationStore, AdminError> {
    Ok(match &config.store {
        Some(s) => RevocationStore::shared(
            SharedStore::new(s, &config.state_dir)?.document(REVOCATIONS_KEY),
        ),
        None => RevocationStore::new(&config.state_dir),
    })
}

fn load_ca(config: &Config) -> Result<Ca, AdminError> {
    Ok(Ca::load_or_create(
        &config.state_dir,
        &config.trust_domain,
        &config.ca.options(),
    )?)
}

/// `token create --node NODE [--ttl 1h]`: the token alone on stdout.
pub fn token_create(config: &Config, node: &str, ttl: Option<&str>) -> Result<Output, AdminError> {
    let ttl = match ttl {
        Some(t) => parse_duration(t).map_err(AdminError::BadTtl)?,
        None => DEFAULT_TOKEN_TTL,
    };
    let token = tokens(config)?.create(node, ttl)?;
    let id = token.split('.').nth(1).unwrap_or_default();
    Ok(Output {
        stdout: format!("{token}\n"),
        stderr: format!(
            "created join token {id} for node {node}, valid until {} (single use).\n\
             Put it in the host's token_file and give it the trust bundle \
             (`pilotfish-discovery ca bundle`) as ca_file.\n",
            utc(SystemTime::now() + ttl)
        ),
    })
}

/// `token list`: one line per token, never the secret.
pub fn token_list(config: &Config) -> Result<Output, AdminError> {
    let now = SystemTime::now();
    let mut out = format!(
        "{:<16}  {:<20}  {:<8}  {:<20}  {}\n",
        "ID", "NODE", "STATE", "CREATED", "EXPIRES"
    );
    for t in tokens(config)?.list()? {
        out.push_str(&format!(
            "{:<16}  {:<20}  {:<8}  {:<20}  {}\n",
            t.id,
            t.node,
            t.state(now),
            utc(t.created),
            utc(t.expires)
        ));
    }
    Ok(Output {
        stdout: out,
        stderr: String::new(),
    })
}

/// `token revoke ID`.
pub fn token_revoke(config: &Config, id: &str) -> Result<Output, AdminError> {
    tokens(config)?.revoke(id)?;
    Ok(Output {
        stdout: String::new(),
        stderr: format!("revoked join token {id}\n"),
    })
}

/// `node revoke NODE`: cuts the host off. The running discovery notices within a second:
/// it refuses and disconnects the node, and pushes the serials of every certificate it issued
/// to the node (a CRL) to every other host's Envoy. Unused join tokens for the node are revoked
/// too, so only a token created after `node restore` brings it back.
pub fn node_revoke(config: &Config, node: &str) -> Result<Output, AdminError> {
    let now = SystemTime::now();
    let newly = revocations(config)?.revoke(node, now)?;
    let store = tokens(config)?;
    let mut spent = Vec::new();
    for t in store.list()? {
        if t.node == node && t.state(now) == "valid" {
            store.revoke(&t.id)?;
            spent.push(t.id);
        }
    }
    let mut stderr = if newly {
        format!(
            "revoked node {node}: discovery refuses its calls and streams, and every peer refuses \
             its certificates, within a few seconds.\n\
             To bring it back: `pilotfish-discovery node restore {node}`, then a new join token \
             (`token create --node {node}`) in the host's token_file.\n"
        )
    } else {
        format!("node {node} was already revoked\n")
    };
    if !spent.is_empty() {
        stderr.push_str(&format!(
            "also revoked its unused join token(s): {}\n",
            spent.join(", ")
        ));
    }
    Ok(Output {
        stdout: String::new(),
        stderr,
    })
}

/// `node restore NODE`: lifts the revocation. The certificates the node held stay refused; the
/// host enrols again with a new join token.
pub fn node_restore(config: &Config, node: &str) -> Result<Output, AdminError> {
    let restored = revocations(config)?.restore(node, SystemTime::now())?;
    let stderr = if restored {
        format!(
            "restored node {node}. Its old certificates stay refused: give the host a new join \
             token (`pilotfish-discovery token create --node {node}`) in its token_file; the \
             agent enrols again by itself.\n"
        )
    } else {
        format!("node {node} was not revoked; nothing changed\n")
    };
    Ok(Output {
        stdout: String::new(),
        stderr,
    })
}

/// `node list`: every node with certificates on record, join tokens or a revocation.
pub fn node_list(config: &Config) -> Result<Output, AdminError> {
    let now = SystemTime::now();
    let certs = IssuedLog::new(&config.state_dir).load(now)?;
    let revocations = revocations(config)?.load()?;
    let mut rows = summarize(&certs, &revocations);
    let tokens = tokens(config)?.list()?;
    for t in &tokens {
        if !rows.iter().any(|r| r.node == t.node) {
            rows.push(pilotfish_pki::revocation::NodeSummary {
                node: t.node.clone(),
                certificates: 0,
                last_issued: None,
                revocation: None,
            });
        }
    }
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    let mut out = format!(
        "{:<20}  {:<8}  {:<20}  {:>5}  {:<20}  {}\n",
        "NODE", "STATE", "SINCE", "CERTS", "LAST ISSUED", "TOKENS"
    );
    for r in rows {
        let (state, since) = match &r.revocation {
            Some(rv) if rv.in_force() => ("revoked", utc(rv.revoked_at())),
            Some(rv) => ("restored", rv.restored_at().map(utc).unwrap_or_default()),
            None => ("active", "-".to_owned()),
        };
        let node_tokens: Vec<&str> = tokens
            .iter()
            .filter(|t| t.node == r.node)
            .map(|t| t.state(now))
            .collect();
        out.push_str(&format!(
            "{:<20}  {:<8}  {:<20}  {:>5}  {:<20}  {}\n",
            r.node,
            state,
            since,
            r.certificates,
            r.last_issued.map(utc).unwrap_or_else(|| "-".into()),
            if node_tokens.is_empty() {
                "-".to_owned()
            } else {
                node_tokens.join(",")
            }
        ));
    }
    Ok(Output {
        stdout: out,
        stderr: String::new(),
    })
}

/// `ca bundle`: the trust bundle PEM (creating the CA on first use), for hosts' `ca_file`.
pub fn ca_bundle(config: &Config) -> Result<Output, AdminError> {
    let ca = load_ca(config)?;
    Ok(Output {
        stdout: ca.bundle_pem().to_string(),
        stderr: format!(
            "trust bundle for {} ({} root(s)); give it to agents as ca_file\n",
            config.trust_domain,
            ca.trusted_roots().len()
        ),
    })
}

/// `ca roots`: the roots in the bundle and which one signs.
pub fn ca_roots(config: &Config) -> Result<Output, AdminError> {
    let ca = load_ca(config)?;
    let mut out = String::new();
    for r in ca.trusted_roots() {
        out.push_str(&format!(
            "{}  {}  expires {}  {}\n    {}\n",
            r.fingerprint,
            if r.signing { "signing" } else { "trusted" },
            utc(r.not_after),
            r.subject,
            r.source.display()
        ));
    }
    Ok(Output {
        stdout: out,
        stderr: String::new(),
    })
}

fn wait_after_switch(config: &Config) -> Duration {
    config.ca.workload_ttl.max(config.ca.node_ttl)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// `ca prepare-rotation`: step 1.
pub fn ca_prepare(config: &Config) -> Result<Output, AdminError> {
    // The current CA must load first, so a broken setup is not made worse.
    load_ca(config)?;
    let path = Ca::prepare_rotation(&config.state_dir, &config.trust_domain)?;
    Ok(Output {
        stdout: String::new(),
        stderr: format!(
            "prepared a new root in {}; it is trusted but does not sign yet.\n\
             Next:\n  \
             1. reload discovery (SIGHUP, e.g. `systemctl reload pilotfish-discovery`): the \
             bundle then holds both roots;\n  \
             2. wait until every host has the new bundle (agents get it with each renewal, \
             within half of workload_ttl, here {}); update hosts' ca_file with \
             `pilotfish-discovery ca bundle`;\n  \
             3. run `pilotfish-discovery ca switch`.\n",
            path.display(),
            human(config.ca.workload_ttl / 2)
        ),
    })
}

/// `ca switch`: step 3.
pub fn ca_switch(config: &Config) -> Result<Output, AdminError> {
    if config.ca.cert_file.is_some() {
        return Err(CaError::Config(
            "ca.cert_file is set: rotate an operator-supplied CA by hand (see the docs)",
        )
        .into());
    }
    let previous = Ca::switch_to_next(&config.state_dir)?;
    let ca = load_ca(config)?;
    let old = ca
        .trusted_roots()
        .iter()
        .find(|r| r.source == previous)
        .map(|r| r.fingerprint.clone())
        .unwrap_or_else(|| "(see `ca roots`)".into());
    Ok(Output {
        stdout: String::new(),
        stderr: format!(
            "the new root now signs; the previous root {old} stays trusted ({}).\n\
             Next:\n  \
             1. reload discovery (SIGHUP) so it signs with the new root;\n  \
             2. wait at least {} (the longer of workload_ttl and node_ttl) so every \
             certificate from the old root is renewed;\n  \
             3. run `pilotfish-discovery ca retire {}` and reload discovery again.\n",
            previous.display(),
            human(wait_after_switch(config)),
            old.get(..16).unwrap_or(&old)
        ),
    })
}

/// `ca retire FINGERPRINT`: step 5.
pub fn ca_retire(config: &Config, fingerprint: &str) -> Result<Output, AdminError> {
    let local = Ca::retire_root(&config.state_dir, fingerprint);
    // With a shared store the root also leaves every replica's bundle: the store's copy goes,
    // and each replica's mirror removes it and reloads its CA.
    let shared = match &config.store {
        Some(s) if fingerprint.len() >= 16 => {
            let store = SharedStore::new(s, &config.state_dir)?;
            let prefix = fingerprint.to_ascii_lowercase();
            store
                .block_on(store.remove_roots(&prefix))
                .map_err(|e| AdminError::Shared(crate::error_chain(&e)))?
        }
        _ => Vec::new(),
    };
    let mut stderr = String::new();
    match local {
        Ok(removed) => stderr.push_str(&format!(
            "removed {}; reload discovery (SIGHUP) to stop trusting it, and hand hosts the new \
             `ca bundle` as ca_file.\n",
            removed.display()
        )),
        Err(e) if shared.is_empty() => return Err(e.into()),
        Err(_) => {}
    }
    for fp in &shared {
        stderr.push_str(&format!(
            "removed root {fp} from the shared store: every replica stops trusting it within \
             seconds.\n"
        ));
    }
    Ok(Output {
        stdout: String::new(),
        stderr,
    })
}

/// This host's name as a replica name: the first label of the kernel's hostname.
fn default_replica_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|h| h.trim().split('.').next().map(str::to_owned))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".to_owned())
}

/// `ca intermediate --out DIR [--name REPLICA]`, on a replica: its signing key and a CSR for
/// the root's keeper. Needs no root.
pub fn ca_intermediate(
    config: &Config,
    out: &Path,
    name: Option<&str>,
) -> Result<Output, AdminError> {
    let name = name.map_or_else(default_replica_name, str::to_owned);
    let req = request_intermediate(out, &config.trust_domain, &name)?;
    let cert = out.join("intermediate.pem");
    Ok(Output {
        stdout: String::new(),
        stderr: format!(
            "made the key {} (keep it on this replica) and the request {} for \"{}\".\n\
             Next:\n  \
             1. copy the request to where the root key is and run\n     \
             pilotfish-discovery ca sign-intermediate {} --out {}\n  \
             2. copy {} back here, and in discovery.toml set\n     \
             [ca]\n     cert_file = \"{}\"\n     key_file = \"{}\"\n  \
             3. restart (or reload) discovery: it signs with the intermediate; agents keep \
             trusting the root alone.\n",
            req.key_file.display(),
            req.csr_file.display(),
            req.common_name,
            req.csr_file.display(),
            cert.display(),
            cert.display(),
            cert.display(),
            req.key_file.display(),
        ),
    })
}

/// Where `ca sign-intermediate` finds the root: `--root-cert/--root-key`, else the operator's
/// `[ca] cert_file/key_file`, else discovery's own `state_dir/ca/root.pem`.
fn root_files(
    config: &Config,
    root: Option<(&Path, &Path)>,
) -> Result<(PathBuf, PathBuf), AdminError> {
    if let Some((cert, key)) = root {
        return Ok((cert.to_owned(), key.to_owned()));
    }
    if let (Some(cert), Some(key)) = (&config.ca.cert_file, &config.ca.key_file) {
        return Ok((cert.clone(), key.clone()));
    }
    let dir = config.state_dir.join("ca");
    let (cert, key) = (dir.join("root.pem"), dir.join("root.key"));
    if !key.exists() {
        return Err(AdminError::NoRoot(key));
    }
    Ok((cert, key))
}

/// `ca sign-intermediate CSR --out CERT [--ttl 365d] [--root-cert F --root-key F]`, where the
/// root key is: checks the replica's CSR and writes CERT, the intermediate followed by the
/// root, which is the whole chain `[ca] cert_file` needs (no `chain_file`).
pub fn ca_sign_intermediate(
    config: &Config,
    csr: &Path,
    out: &Path,
    ttl: Option<&str>,
    root: Option<(&Path, &Path)>,
) -> Result<Output, AdminError> {
    let ttl = match ttl {
        Some(t) => parse_duration(t).map_err(AdminError::BadTtl)?,
        None => DEFAULT_INTERMEDIATE_TTL,
    };
    let (root_cert, root_key) = root_files(config, root)?;
    let csr_pem = std::fs::read_to_string(csr).map_err(|source| AdminError::File {
        path: csr.to_owned(),
        source,
    })?;
    let signed = sign_intermediate(&root_cert, &root_key, &config.trust_domain, &csr_pem, ttl)?;
    durable::write_atomic(out, signed.chain_pem.as_bytes(), durable::PUBLIC_MODE).map_err(
        |source| AdminError::File {
            path: out.to_owned(),
            source,
        },
    )?;
    Ok(Output {
        stdout: String::new(),
        stderr: format!(
            "signed \"{}\" (serial {}), valid until {}, with the root {}.\n\
             {} holds the intermediate, then the root. Copy it to the replica and point \
             [ca] cert_file at it, with key_file = its intermediate.key; no chain_file is needed. \
             Agents keep the same ca_file (the root).\n",
            signed.common_name,
            signed.serial,
            utc(signed.not_after),
            root_cert.display(),
            out.display(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(dir: &Path) -> Config {
        let text = format!(
            "state_dir = \"{}\"\n[registry.files]\npaths = [\"r\"]\n",
            dir.display()
        );
        Config::parse(&text, &dir.join("discovery.toml")).expect("config")
    }

    #[test]
    fn tokens_are_created_listed_and_revoked_without_secrets() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path());
        let out = token_create(&c, "vm-b", Some("2h")).expect("created");
        let token = out.stdout.trim();
        assert!(token.starts_with("pft1."), "{token}");
        assert_eq!(out.stdout.lines().count(), 1, "only the token on stdout");
        let id = token.split('.').nth(1).expect("id");
        assert!(out.stderr.contains(id) && out.stderr.contains("vm-b"));

        let list = token_list(&c).expect("list").stdout;
        assert!(list.contains(id) && list.contains("vm-b") && list.contains("valid"));
        let secret = token.split('.').nth(2).expect("secret");
        assert!(!list.contains(secret));

        token_revoke(&c, id).expect("revoked");
        assert!(token_list(&c).expect("list").stdout.contains("revoked"));
        let e = token_revoke(&c, "0000000000000000").expect_err("unknown");
        assert!(!e.is_usage());

        let e = token_create(&c, "Bad Node", None).expect_err("bad node");
        assert!(e.is_usage());
        let e = token_create(&c, "vm-b", Some("forever")).expect_err("bad ttl");
        assert!(e.is_usage());
    }

    #[test]
    fn nodes_are_revoked_listed_and_restored() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path());
        let token = token_create(&c, "vm-c", None).expect("token").stdout;
        let id = token.split('.').nth(1).expect("id").to_string();
        let now = SystemTime::now();
        IssuedLog::new(dir.path())
            .append(&pilotfish_pki::IssuedCert::new(
                "0a",
                "vm-a",
                "spiffe://pilotfish.local/node/vm-a",
                now,
                now + Duration::from_secs(3600),
            ))
            .expect("append");

        let list = node_list(&c).expect("list").stdout;
        let line = |list: &str, node: &str| {
            list.lines()
                .find(|l| l.starts_with(node))
                .unwrap_or_else(|| panic!("{node} in {list}"))
                .to_string()
        };
        assert!(line(&list, "vm-a").contains("active"), "{list}");
        assert!(line(&list, "vm-c").contains("valid"), "{list}");

        let out = node_revoke(&c, "vm-c").expect("revoked");
        assert!(out.stderr.contains("node restore vm-c"), "{}", out.stderr);
        assert!(out.stderr.contains(&id), "its unused token is revoked too");
        let list = node_list(&c).expect("list").stdout;
        assert!(line(&list, "vm-c").contains("revoked"), "{list}");
        assert!(node_revoke(&c, "vm-c")
            .expect("again")
            .stderr
            .contains("already"));

        node_restore(&c, "vm-c").expect("restored");
        let list = node_list(&c).expect("list").stdout;
        assert!(line(&list, "vm-c").contains("restored"), "{list}");
        assert!(node_restore(&c, "vm-c")
            .expect("again")
            .stderr
            .contains("not revoked"));
        assert!(node_revoke(&c, "Bad Node").expect_err("bad").is_usage());
    }

    #[test]
    fn bundle_creates_the_ca_and_rotation_walks_through() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path());
        let first = ca_bundle(&c).expect("bundle").stdout;
        assert!(first.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ca_bundle(&c).expect("again").stdout, first, "stable");

        ca_prepare(&c).expect("prepared");
        let both = ca_bundle(&c).expect("bundle").stdout;
        assert_eq!(both.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(both.starts_with(&first), "the signing root comes first");

        let switched = ca_switch(&c).expect("switched").stderr;
        assert!(switched.contains("ca retire"), "{switched}");
        let roots = ca_roots(&c).expect("roots").stdout;
        assert!(
            roots.contains("signing") && roots.contains("trusted"),
            "{roots}"
        );
        let old = roots
            .lines()
            .find(|l| l.contains("trusted"))
            .and_then(|l| l.split_whitespace().next())
            .expect("old root line")
            .to_string();

        ca_retire(&c, &old).expect("retired");
        let last = ca_bundle(&c).expect("bundle").stdout;
        assert_eq!(last.matches("BEGIN CERTIFICATE").count(), 1);
        assert_ne!(last, first, "the new root remains");
    }

    #[test]
    fn intermediate_is_requested_and_signed_by_the_root_holder() {
        let root_dir = tempfile::tempdir().expect("tmp");
        let root = config(root_dir.path());
        let replica_dir = tempfile::tempdir().expect("tmp");
        let replica = config(replica_dir.path());
        let out = replica_dir.path().join("int");
        let csr = out.join("intermediate.csr");
        let cert = out.join("intermediate.pem");

        let asked = ca_intermediate(&replica, &out, Some("replica-a")).expect("request");
        assert!(
            asked.stderr.contains("sign-intermediate"),
            "{}",
            asked.stderr
        );
        assert!(
            !replica_dir.path().join("ca").join("root.key").exists(),
            "a replica makes no root"
        );
        let e = ca_sign_intermediate(&replica, &csr, &cert, None, None).expect_err("no root");
        assert!(matches!(e, AdminError::NoRoot(_)) && e.is_usage(), "{e}");

        let bundle = ca_bundle(&root).expect("root").stdout;
        let e = ca_sign_intermediate(&root, &csr, &cert, Some("soon"), None).expect_err("ttl");
        assert!(e.is_usage());
        let signed = ca_sign_intermediate(&root, &csr, &cert, Some("30d"), None).expect("signed");
        assert!(signed.stderr.contains("cert_file"), "{}", signed.stderr);
        let chain = std::fs::read_to_string(&cert).expect("cert");
        assert!(chain.ends_with(&bundle), "intermediate, then the root");

        let text = format!(
            "state_dir = \"{}\"\n[registry.files]\npaths = [\"r\"]\n[ca]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            replica_dir.path().display(),
            cert.display(),
            out.join("intermediate.key").display()
        );
        let on_int =
            Config::parse(&text, &replica_dir.path().join("discovery.toml")).expect("config");
        assert_eq!(ca_bundle(&on_int).expect("bundle").stdout, bundle);
        let e = ca_sign_intermediate(&on_int, &csr, &cert, None, None).expect_err("not a root");
        assert!(e.is_usage(), "{e}");
    }
}
