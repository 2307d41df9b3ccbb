//! The last-good state of a set of registry files, with no I/O: what is on disk now, which
//! version of each file is in force, and the problems that keep the others out.
//!
//! The invariant: the accepted versions of all files merge into a catalog without problems.
//! Each [`FileSet::settle`] tries to bring every file whose on-disk version is not in force
//! (new, edited, deleted, or rejected before) into force without breaking that invariant:
//!
//! 1. all of them together (files that need each other, such as two services naming each
//!    other as upstreams, can only come in together), dropping the files the problems point
//!    to until the rest merges cleanly;
//! 2. then each remaining one alone, repeated while that makes progress, because a problem
//!    may point at a file that did not change (deleting a service breaks a route to it in
//!    another file: the deletion is what must wait).
//!
//! At startup nothing is in force, so the same steps load every good file and leave out the
//! ones that problems point to. With a last-good store, [`FileSet::restore`] first puts the
//! stored versions of the files that exist into force, so a file that is broken at startup keeps
//! the version the previous run had (a deleted file is not brought back).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::parse::{parse_file, FileDecls};
use super::validate::merge;
use super::{FileState, FilesStatus, Problem, Restored};
use crate::last_good::StoredFile;
use crate::model::Catalog;

/// A file's content as read, or why it could not be read.
pub(crate) type FileRead = Result<String, String>;

#[derive(Debug)]
struct OnDisk {
    read: FileRead,
    parsed: Result<Arc<FileDecls>, Vec<Problem>>,
}

#[derive(Debug)]
struct Accepted {
    content: String,
    decls: Arc<FileDecls>,
}

/// What a [`FileSet::settle`] changed, for the caller to log.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Settled {
    /// Files whose on-disk version came into force.
    pub accepted: Vec<PathBuf>,
    /// Deleted files whose declarations were withdrawn.
    pub removed: Vec<PathBuf>,
    /// Problems of files whose problem list changed (so unchanged problems are not logged on
    /// every rescan).
    pub new_problems: Vec<Problem>,
}

#[derive(Debug, Default)]
pub(crate) struct FileSet {
    disk: BTreeMap<PathBuf, OnDisk>,
    accepted: BTreeMap<PathBuf, Accepted>,
    /// The current problems of each file whose on-disk version is not in force.
    problems: BTreeMap<PathBuf, Vec<Problem>>,
    /// Files whose version in force is a stored copy from an earlier run.
    restored: BTreeMap<PathBuf, Restored>,
}

impl FileSet {
    /// Replaces what is known to be on disk with a complete scan. Files missing from `files`
    /// are gone, except those under `unlisted` (directories that could not be read this time,
    /// whose files are assumed unchanged rather than deleted). Returns whether anything
    /// changed.
    pub(crate) fn update(
        &mut self,
        files: BTreeMap<PathBuf, FileRead>,
        unlisted: &[PathBuf],
    ) -> bool {
        let mut changed = false;
        let kept: Vec<PathBuf> = self
            .disk
            .keys()
            .filter(|p| !files.contains_key(*p) && unlisted.iter().any(|d| p.starts_with(d)))
            .cloned()
            .collect();
        let mut old = std::mem::take(&mut self.disk);
        for path in kept {
            if let Some(entry) = old.remove(&path) {
                self.disk.insert(path, entry);
            }
        }
        changed |= !old.keys().all(|p| files.contains_key(p));
        for (path, read) in files {
            match old.remove(&path) {
                Some(entry) if entry.read == read => {
                    self.disk.insert(path, entry);
                }
                _ => {
                    changed = true;
                    let entry = on_disk(&path, read);
                    self.disk.insert(path, entry);
                }
            }
        }
        changed
    }

    /// Records one file's new content (`None`: deleted). For tests and callers that know
    /// exactly what changed.
    #[cfg(test)]
    pub(crate) fn set(&mut self, path: &Path, read: Option<FileRead>) {
        match read {
            Some(read) => {
                let entry = on_disk(path, read);
                self.disk.insert(path.to_path_buf(), entry);
            }
            None => {
                self.disk.remove(path);
            }
        }
    }

    /// Before the first [`FileSet::settle`] (after the first [`FileSet::update`]): puts the
    /// stored last good versions in force, as if this run had accepted them. Only files that
    /// exist now are restored (one deleted on purpose stays deleted), and only as many as merge
    /// cleanly. The next settle then brings in every on-disk version that is good; the stored
    /// version stays in force only where the file on disk is broken.
    pub(crate) fn restore(&mut self, stored: BTreeMap<PathBuf, StoredFile>) {
        let mut keep: BTreeMap<PathBuf, (Accepted, Restored)> = stored
            .into_iter()
            .filter(|(path, _)| self.disk.contains_key(path) && !self.accepted.contains_key(path))
            .filter_map(|(path, s)| {
                let decls = parse_file(&path, &s.content).ok()?;
                let accepted = Accepted {
                    content: s.content,
                    decls: Arc::new(decls),
                };
                let restored = Restored {
                    copy: s.copy,
                    saved: s.saved,
                };
                Some((path, (accepted, restored)))
            })
            .collect();
        loop {
            let all = self
                .accepted
                .iter()
                .map(|(p, a)| (p, a.decls.as_ref()))
                .chain(keep.iter().map(|(p, (a, _))| (p, a.decls.as_ref())));
            let (_, found) = merge(all);
            if found.is_empty() {
                break;
            }
            let before = keep.len();
            keep.retain(|p, _| !found.iter().any(|f| &f.file == p));
            if keep.len() == before {
                keep.clear();
            }
        }
        for (path, (accepted, restored)) in keep {
            // A file whose disk version is the stored one is simply in force.
            let same = self
                .disk
                .get(&path)
                .is_some_and(|d| d.read.as_ref().is_ok_and(|c| *c == accepted.content));
            if !same {
                self.restored.insert(path.clone(), restored);
            }
            self.accepted.insert(path, accepted);
        }
    }

    /// The files whose version in force is a stored copy from an earlier run.
    pub(crate) fn restored(&self) -> &BTreeMap<PathBuf, Restored> {
        &self.restored
    }

    /// The content of every version in force, for the last-good store.
    pub(crate) fn accepted_contents(&self) -> BTreeMap<PathBuf, &str> {
        self.accepted
            .iter()
            .map(|(p, a)| (p.clone(), a.content.as_str()))
            .collect()
    }

    /// Brings into force every on-disk version that can be, keeping the invariant (see the
    /// module comment).
    pub(crate) fn settle(&mut self) -> Settled {
        let mut problems: BTreeMap<PathBuf, Vec<Problem>> = BTreeMap::new();
        let mut candidates = BTreeSet::new();
        for (path, entry) in &self.disk {
            match (&entry.parsed, &entry.read) {
                (Err(parse_problems), _) => {
                    problems.insert(path.clone(), parse_problems.clone());
                }
                (Ok(_), Ok(content)) => {
                    if self
                        .accepted
                        .get(path)
                        .is_none_or(|a| &a.content != content)
                    {
                        candidates.insert(path.clone());
                    }
                }
                // Unreadable files never parse (see `on_disk`).
                (Ok(_), Err(_)) => {}
            }
        }
        for path in self.accepted.keys() {
            if !self.disk.contains_key(path) {
                candidates.insert(path.clone());
            }
        }

        let mut settled = Settled::default();
        // Step 1: everything together, leaving out the files the problems point to until
        // the rest merges cleanly (or nothing is left).
        let mut together = candidates.clone();
        while !together.is_empty() {
            let (_, found) = merge(self.proposal(&together));
            if found.is_empty() {
                for path in &together {
                    self.commit(path, &mut settled);
                }
                break;
            }
            let before = together.len();
            together.retain(|p| !found.iter().any(|f| &f.file == p));
            if together.len() == before {
                break;
            }
        }
        let mut pending: BTreeSet<PathBuf> = candidates
            .into_iter()
            .filter(|p| !settled.accepted.contains(p) && !settled.removed.contains(p))
            .collect();
        // Step 2: one at a time, while that makes progress.
        loop {
            let mut progress = false;
            for path in pending.clone() {
                let (_, found) = merge(self.proposal(&BTreeSet::from([path.clone()])));
                if found.is_empty() {
                    self.commit(&path, &mut settled);
                    pending.remove(&path);
                    problems.remove(&path);
                    progress = true;
                } else {
                    problems.insert(path, found);
                }
            }
            if !progress || pending.is_empty() {
                break;
            }
        }

        for (path, list) in &problems {
            if self.problems.get(path) != Some(list) {
                settled.new_problems.extend(list.iter().cloned());
            }
        }
        self.problems = problems;
        settled
    }

    /// The accepted versions with the on-disk versions of `changed` in their place.
    fn proposal<'a>(
        &'a self,
        changed: &BTreeSet<PathBuf>,
    ) -> impl Iterator<Item = (&'a PathBuf, &'a FileDecls)> + 'a {
        let mut merged: BTreeMap<&PathBuf, &FileDecls> = self
            .accepted
            .iter()
            .map(|(p, a)| (p, a.decls.as_ref()))
            .collect();
        for path in changed {
            match self.disk.get_key_value(path) {
                Some((
                    p,
                    OnDisk {
                        parsed: Ok(decls), ..
                    },
                )) => {
                    merged.insert(p, decls.as_ref());
                }
                _ => {
                    merged.remove(path);
                }
            }
        }
        merged.into_iter()
    }

    fn commit(&mut self, path: &Path, settled: &mut Settled) {
        self.restored.remove(path);
        match self.disk.get(path) {
            Some(OnDisk {
                read: Ok(content),
                parsed: Ok(decls),
            }) => {
                self.accepted.insert(
                    path.to_path_buf(),
                    Accepted {
                        content: content.clone(),
                        decls: decls.clone(),
                    },
                );
                settled.accepted.push(path.to_path_buf());
            }
            _ => {
                self.accepted.remove(path);
                settled.removed.push(path.to_path_buf());
            }
        }
    }

    /// The catalog of the versions in force. By the invariant it merges without problems;
    /// any it had would be a bug here, and are returned rather than hidden.
    pub(crate) fn catalog(&self) -> (Catalog, Vec<Problem>) {
        merge(self.accepted.iter().map(|(p, a)| (p, a.decls.as_ref())))
    }

    pub(crate) fn status(&self) -> FilesStatus {
        let paths: BTreeSet<&PathBuf> = self.disk.keys().chain(self.accepted.keys()).collect();
        FilesStatus {
            files: paths
                .into_iter()
                .map(|p| {
                    let state = FileState {
                        in_force: self.accepted.contains_key(p),
                        problems: self.problems.get(p).cloned().unwrap_or_default(),
                        restored: self.restored.get(p).cloned(),
                    };
                    (p.clone(), state)
                })
                .collect(),
        }
    }

    /// Every current problem, by file, each once.
    pub(crate) fn problems(&self) -> Vec<Problem> {
        let mut all: Vec<Problem> = self.problems.values().flatten().cloned().collect();
        all.sort_by(|a, b| {
            (&a.file, a.line, a.column, &a.message).cmp(&(&b.file, b.line, b.column, &b.message))
        });
        all.dedup();
        all
    }
}

fn on_disk(path: &Path, read: FileRead) -> OnDisk {
    let parsed = match &read {
        Ok(text) => parse_file(path, text).map(Arc::new),
        Err(message) => Err(vec![Problem::whole_file(path, "", message.clone())]),
    };
    OnDisk { read, parsed }
}
