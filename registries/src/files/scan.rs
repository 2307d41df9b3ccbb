//! Finding and reading the registry files: every `*.toml` at or below each configured
//! directory, or the configured file itself.
//!
//! Blocking I/O; the registry runs it on tokio's blocking pool. Names starting with `.` are
//! skipped, files and directories alike: editors keep swap and lock files there (Emacs locks
//! `x.toml` with a `.#x.toml` symlink) and tools keep their own state (`.git`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::state::FileRead;

/// Directory symlinks may form loops; no real registry nests this deep.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub files: BTreeMap<PathBuf, FileRead>,
    /// Configured paths that do not exist (treated as empty).
    pub missing: Vec<PathBuf>,
    /// Directories that exist but could not be listed, with why; their files are neither
    /// added nor removed this time.
    pub unlisted: Vec<(PathBuf, String)>,
}

pub(crate) fn scan(paths: &[PathBuf]) -> Scan {
    let mut scan = Scan::default();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => walk(path, 0, &mut scan),
            // A file named explicitly is read whatever its extension.
            Ok(_) => read(path, &mut scan),
            Err(err) if err.kind() == io::ErrorKind::NotFound => scan.missing.push(path.clone()),
            Err(err) => scan.unlisted.push((path.clone(), err.to_string())),
        }
    }
    scan
}

fn walk(dir: &Path, depth: usize, scan: &mut Scan) {
    if depth > MAX_DEPTH {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            scan.unlisted.push((dir.to_path_buf(), err.to_string()));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                scan.unlisted.push((dir.to_path_buf(), err.to_string()));
                continue;
            }
        };
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        // Follows symlinks: configuration management often links files into place.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, depth + 1, scan),
            Ok(meta) if meta.is_file() && path.extension().is_some_and(|e| e == "toml") => {
                read(&path, scan)
            }
            Ok(_) => {}
            // Gone since the listing, or a dangling symlink: not a file now.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) if path.extension().is_some_and(|e| e == "toml") => {
                scan.files.insert(path, Err(format!("cannot read: {err}")));
            }
            Err(_) => {}
        }
    }
}

fn read(path: &Path, scan: &mut Scan) {
    let read = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string()),
        // Deleted between listing and reading: it is not there.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return,
        Err(err) => Err(format!("cannot read: {err}")),
    };
    scan.files.insert(path.to_path_buf(), read);
}
