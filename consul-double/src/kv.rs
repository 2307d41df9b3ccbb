//! The KV store of one datacenter: entries, the tombstones deletes leave behind, and the indexes
//! blocking KV reads report, as Consul's state store keeps them (`agent/consul/state/kvs.go`,
//! `kvs_ce.go`, `agent/consul/kvs_endpoint.go`).
//!
//! Writes come in as [`KvOp`]s with the Raft index the caller consumed for them; every apply
//! consumes one, even a CAS that fails. An entry's `ModifyIndex` only moves when the entry really
//! changes: Consul skips a set whose key, flags, value and session equal the stored ones. Deletes
//! leave a tombstone, so a prefix listing's index never slides back when its newest key goes away;
//! [`KvStore::reap_tombstones`] drops them, as Consul's periodic reaping does, which is how a KV
//! index can go backwards.
//!
//! Sessions (locks) are not modelled: no session exists, so `acquire` fails as it would for an
//! unknown session and `release` answers false.

use std::collections::BTreeMap;

use serde::Serialize;

/// One stored key (`structs.DirEntry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub flags: u64,
    pub value: Vec<u8>,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A KV write, as `KVS.Apply` receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Set {
        key: String,
        flags: u64,
        value: Vec<u8>,
    },
    /// Check-and-set: `cas == 0` creates only if absent, else writes only at that `ModifyIndex`.
    Cas {
        key: String,
        flags: u64,
        value: Vec<u8>,
        cas: u64,
    },
    /// Lock with a session. No session exists in the double.
    Acquire {
        key: String,
        session: String,
    },
    /// Unlock with a session. No lock is ever held in the double.
    Release {
        key: String,
        session: String,
    },
    Delete {
        key: String,
    },
    DeleteCas {
        key: String,
        cas: u64,
    },
    DeleteTree {
        prefix: String,
    },
}

/// The outcome of an apply: the JSON bool Consul answers, or an FSM error (a 500 in Consul).
pub type KvApplied = Result<bool, String>;

#[derive(Debug, Clone, Default)]
pub struct KvStore {
    entries: BTreeMap<String, KvEntry>,
    /// Key (or deleted prefix) -> index of the delete.
    tombstones: BTreeMap<String, u64>,
    /// Index of the `kvs` and `tombstones` tables: the last write that changed either.
    table_index: u64,
}

impl KvStore {
    /// Applies `op` at Raft index `idx`.
    pub fn apply(&mut self, idx: u64, op: KvOp) -> KvApplied {
        match op {
            KvOp::Set { key, flags, value } => {
                self.set(idx, key, flags, value);
                Ok(true)
            }
            KvOp::Cas {
                key,
                flags,
                value,
                cas,
            } => {
                let ok = match self.entries.get(&key) {
                    None => cas == 0,
                    Some(e) => cas != 0 && e.modify_index == cas,
                };
                if ok {
                    self.set(idx, key, flags, value);
                }
                Ok(ok)
            }
            KvOp::Acquire { session, .. } => Err(if session.is_empty() {
                "missing session".to_string()
            } else {
                format!("invalid session {session:?}")
            }),
            KvOp::Release { session, .. } => {
                if session.is_empty() {
                    Err("missing session".to_string())
                } else {
                    Ok(false)
                }
            }
            KvOp::Delete { key } => {
                self.delete(idx, &key);
                Ok(true)
            }
            KvOp::DeleteCas { key, cas } => match self.entries.get(&key) {
                // Consul answers true for a key that is already gone.
                None => Ok(true),
                Some(e) if e.modify_index != cas => Ok(false),
                Some(_) => {
                    self.delete(idx, &key);
                    Ok(true)
                }
            },
            KvOp::DeleteTree { prefix } => {
                let doomed: Vec<String> = self
                    .entries
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                if !doomed.is_empty() {
                    for k in doomed {
                        self.entries.remove(&k);
                    }
                    // Deleting everything leaves no tombstone: every watcher sees the table index.
                    if !prefix.is_empty() {
                        self.tombstones.insert(prefix, idx);
                    }
                    self.table_index = idx;
                }
                Ok(true)
            }
        }
    }

    fn set(&mut self, idx: u64, key: String, flags: u64, value: Vec<u8>) {
        if let Some(e) = self.entries.get_mut(&key) {
            if e.flags == flags && e.value == value {
                // Unchanged: Consul skips the write, ModifyIndex and table index stay.
                return;
            }
            e.flags = flags;
            e.value = value;
            e.modify_index = idx;
        } else {
            self.entries.insert(
                key.clone(),
                KvEntry {
                    key,
                    flags,
                    value,
                    lock_index: 0,
                    create_index: idx,
                    modify_index: idx,
                },
            );
        }
        self.table_index = idx;
    }

    fn delete(&mut self, idx: u64, key: &str) {
        if self.entries.remove(key).is_some() {
            self.tombstones.insert(key.to_string(), idx);
            self.table_index = idx;
        }
    }

    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.entries.get(key)
    }

    /// The index a single-key read reports: the entry's `ModifyIndex`, or for a missing key the
    /// table index, so that any KV write wakes a watch on it.
    pub fn index_of_key(&self, key: &str) -> u64 {
        self.entries
            .get(key)
            .map_or(self.table_index, |e| e.modify_index)
    }

    /// Entries under `prefix`, sorted by key.
    pub fn list<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
        self.entries
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
    }

    /// The index a prefix read reports (`kvsListTxn`): the highest `ModifyIndex` or tombstone
    /// under the prefix; the table index for the empty prefix or when there is neither.
    pub fn index_of_prefix(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.table_index;
        }
        let entries = self.list(prefix).map(|e| e.modify_index).max();
        let graves = self
            .tombstones
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max();
        match entries.max(graves) {
            Some(i) if i > 0 => i,
            _ => self.table_index,
        }
    }

    /// Forgets every tombstone, as Consul's reaper does once they are old enough: a prefix whose
    /// newest key was deleted then reports a lower index than before.
    pub fn reap_tombstones(&mut self) {
        self.tombstones.clear();
    }

    /// Moves every index back to at most `to`, as restoring an older snapshot does.
    pub fn regress_index(&mut self, to: u64) {
        self.table_index = self.table_index.min(to);
        for e in self.entries.values_mut() {
            e.modify_index = e.modify_index.min(to);
            e.create_index = e.create_index.min(to);
        }
        for i in self.tombstones.values_mut() {
            *i = (*i).min(to);
        }
    }
}

/// A KV entry as Consul renders it: `Value` in base64, `null` when empty; `Session` omitted when
/// no lock is held (always, here).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvEntryOut<'a> {
    pub lock_index: u64,
    pub key: &'a str,
    pub flags: u64,
    pub value: Option<String>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl<'a> From<&'a KvEntry> for KvEntryOut<'a> {
    fn from(e: &'a KvEntry) -> Self {
        KvEntryOut {
            lock_index: e.lock_index,
            key: &e.key,
            flags: e.flags,
            // Go's encoding/json renders a nil []byte as null; Consul stores an empty body as nil.
            value: (!e.value.is_empty()).then(|| base64(&e.value)),
            create_index: e.create_index,
            modify_index: e.modify_index,
        }
    }
}

/// Standard base64 with padding, as Go's encoding/json renders `[]byte`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The key checks of Consul's newest `agent/kvs_endpoint.go` (`validateKVKey`): no leading `/`,
/// only `a-zA-Z0-9,-_./`, no `../`, no file extension a cache might serve. The error text is
/// Consul's; it answers 400 with it.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key cannot be empty".into());
    }
    if key.starts_with('/') {
        return Err("key must not begin with a '/'".into());
    }
    for (i, c) in key.char_indices() {
        if !(c.is_ascii_alphanumeric() || matches!(c, ',' | '-' | '_' | '.' | '/')) {
            return Err(format!(
                "key contains invalid character '{c}' at position {i}. Only alphanumeric characters and ,-_./ are allowed"
            ));
        }
    }
    if key.contains("../") {
        return Err("key contains path traversal sequence".into());
    }
    const SUSPICIOUS: &[&str] = &[
        ".js", ".css", ".html", ".htm", ".xml", ".json", ".txt", ".log", ".php", ".asp", ".jsp",
        ".cgi", ".pl", ".py", ".rb", ".sh", ".exe", ".dll", ".bat", ".cmd", ".com", ".scr", ".vbs",
        ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".zip", ".rar", ".tar", ".gz",
        ".7z", ".bz2", ".jpg", ".jpeg", ".png", ".gif", ".svg", ".ico", ".bmp", ".mp3", ".mp4",
        ".avi", ".mov", ".wmv", ".flv", ".swf", ".woff", ".woff2", ".ttf", ".eot", ".otf",
    ];
    let lower = key.to_ascii_lowercase();
    if let Some(ext) = SUSPICIOUS.iter().find(|e| lower.ends_with(*e)) {
        return Err(format!(
            "key contains suspicious file extension '{ext}' that may be cached by proxies"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(key: &str, value: &str) -> KvOp {
        KvOp::Set {
            key: key.into(),
            flags: 0,
            value: value.into(),
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn indexes_follow_consul() {
        let mut kv = KvStore::default();
        assert_eq!(kv.apply(5, set("a/x", "1")), Ok(true));
        assert_eq!(kv.apply(6, set("a/y", "2")), Ok(true));
        assert_eq!(kv.apply(7, set("b", "3")), Ok(true));
        assert_eq!(kv.index_of_key("a/x"), 5);
        assert_eq!(kv.index_of_key("missing"), 7, "table index");
        assert_eq!(kv.index_of_prefix("a/"), 6);
        assert_eq!(kv.index_of_prefix(""), 7);
        assert_eq!(kv.index_of_prefix("zzz"), 7, "nothing there: table index");
        // An unchanged set keeps ModifyIndex and the table index.
        kv.apply(8, set("a/x", "1")).unwrap();
        assert_eq!(kv.index_of_key("a/x"), 5);
        assert_eq!(kv.index_of_key("missing"), 7);
        // CreateIndex is kept on update.
        kv.apply(9, set("a/x", "changed")).unwrap();
        let e = kv.get("a/x").unwrap();
        assert_eq!((e.create_index, e.modify_index), (5, 9));
        // Deleting the newest key under a prefix leaves a tombstone: the index does not slide back.
        kv.apply(10, KvOp::Delete { key: "a/x".into() }).unwrap();
        assert_eq!(kv.index_of_prefix("a/"), 10);
        kv.reap_tombstones();
        assert_eq!(kv.index_of_prefix("a/"), 6, "after reaping it does");
        kv.apply(
            11,
            KvOp::DeleteTree {
                prefix: "a/".into(),
            },
        )
        .unwrap();
        assert_eq!(kv.list("a/").count(), 0);
        assert_eq!(kv.index_of_prefix("a/"), 11);
    }

    #[test]
    fn cas_and_delete_cas() {
        let mut kv = KvStore::default();
        let cas = |cas, v: &str| KvOp::Cas {
            key: "k".into(),
            flags: 3,
            value: v.into(),
            cas,
        };
        assert_eq!(kv.apply(1, cas(5, "x")), Ok(false), "absent, cas != 0");
        assert_eq!(kv.apply(2, cas(0, "a")), Ok(true));
        assert_eq!(kv.apply(3, cas(0, "b")), Ok(false), "present, cas 0");
        assert_eq!(kv.apply(4, cas(2, "c")), Ok(true));
        assert_eq!(kv.apply(5, cas(2, "d")), Ok(false), "stale index");
        assert_eq!(kv.get("k").unwrap().flags, 3);
        let del = |cas| KvOp::DeleteCas {
            key: "k".into(),
            cas,
        };
        assert_eq!(kv.apply(6, del(2)), Ok(false));
        assert_eq!(kv.apply(7, del(4)), Ok(true));
        assert!(kv.get("k").is_none());
        assert_eq!(kv.apply(8, del(4)), Ok(true), "already gone");
    }

    #[test]
    fn keys_are_validated_as_consul_does() {
        assert!(validate_key("pilotfish/discovery/leader").is_ok());
        assert_eq!(
            validate_key("/a").unwrap_err(),
            "key must not begin with a '/'"
        );
        assert!(validate_key("a b")
            .unwrap_err()
            .contains("invalid character ' '"));
        assert!(validate_key("a/../b").is_err());
        assert!(validate_key("state.json").is_err());
    }
}
