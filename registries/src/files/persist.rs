//! Keeping the last-good store in line with the versions in force: after every settle, each
//! version in force that the store does not hold yet is written, and each stored copy of a file
//! no longer in force (deleted, or gone from the configured paths) is removed. The plan is a
//! plain function; [`apply`] does the blocking I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::last_good::LastGoodStore;

/// What the store holds: content by the real file's path.
pub(crate) type Stored = BTreeMap<PathBuf, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Write(PathBuf, String),
    Remove(PathBuf),
}

/// The writes and removals that make `stored` equal to `in_force`.
pub(crate) fn plan(stored: &Stored, in_force: &BTreeMap<PathBuf, &str>) -> Vec<StoreOp> {
    let mut ops: Vec<StoreOp> = in_force
        .iter()
        .filter(|(path, content)| stored.get(*path).map(String::as_str) != Some(**content))
        .map(|(path, content)| StoreOp::Write(path.clone(), (*content).to_string()))
        .collect();
    ops.extend(
        stored
            .keys()
            .filter(|path| !in_force.contains_key(*path))
            .map(|path| StoreOp::Remove(path.clone())),
    );
    ops
}

/// Carries out `ops` (blocking) and returns `stored` as it now is on disk: an operation that
/// failed is logged and retried by the next sync.
pub(crate) fn apply(store: &LastGoodStore, mut stored: Stored, ops: Vec<StoreOp>) -> Stored {
    for op in ops {
        match op {
            StoreOp::Write(path, content) => match store.save_file(&path, &content) {
                Ok(()) => {
                    stored.insert(path, content);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), copy = %store.file_copy(&path).display(), error = %e, "cannot store the last good version of a registry file");
                }
            },
            StoreOp::Remove(path) => match store.remove_file(&path) {
                Ok(()) => {
                    stored.remove(&path);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), copy = %store.file_copy(&path).display(), error = %e, "cannot remove the stored copy of a withdrawn registry file");
                }
            },
        }
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_changed_and_removes_what_is_withdrawn() {
        let stored: Stored = BTreeMap::from([
            (PathBuf::from("/r/same.toml"), "a".to_string()),
            (PathBuf::from("/r/edited.toml"), "old".to_string()),
            (PathBuf::from("/r/deleted.toml"), "x".to_string()),
        ]);
        let in_force = BTreeMap::from([
            (PathBuf::from("/r/same.toml"), "a"),
            (PathBuf::from("/r/edited.toml"), "new"),
            (PathBuf::from("/r/added.toml"), "b"),
        ]);
        assert_eq!(
            plan(&stored, &in_force),
            vec![
                StoreOp::Write("/r/added.toml".into(), "b".into()),
                StoreOp::Write("/r/edited.toml".into(), "new".into()),
                StoreOp::Remove("/r/deleted.toml".into()),
            ]
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LastGoodStore::in_state_dir(dir.path());
        let now = apply(&store, Stored::new(), plan(&Stored::new(), &in_force));
        assert_eq!(now.len(), 3, "the plan's writes are recorded");
        assert!(plan(&store_contents(&store), &in_force).is_empty());
    }

    fn store_contents(store: &LastGoodStore) -> Stored {
        store
            .load_files()
            .into_iter()
            .map(|(p, f)| (p, f.content))
            .collect()
    }
}
