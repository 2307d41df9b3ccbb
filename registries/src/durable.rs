//! Writing state files durably: a temporary file in the same directory, fsync, rename over the
//! target, fsync the directory. A reader (or discovery after a crash or power loss) sees the old
//! file or the new one, never half of one. The temporary file's name starts with a dot, so the
//! file registry (which skips dot files) never reads it.
//!
//! The one copy of this helper for registries and discovery (the rules API's `rules.d`, the
//! last-good store).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Atomically and durably replaces `path` with `contents`; a new file gets `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.{:016x}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes `path` and makes the removal durable. A file that is already gone is not an error.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.toml");
        write_atomic(&file, b"one", 0o600).expect("first write");
        write_atomic(&file, b"two", 0o600).expect("second write");
        assert_eq!(fs::read_to_string(&file).expect("read"), "two");
        let mode = fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a.toml".to_string()]);
        remove(&file).expect("remove");
        remove(&file).expect("removing again is fine");
        assert!(!file.exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.toml");
        write_atomic(&file, b"one", 0o600).expect("write");
        // The target is a directory now: the rename fails, the temporary is cleaned up.
        let target = dir.path().join("sub");
        fs::create_dir(&target).expect("mkdir");
        fs::write(target.join("x"), "x").expect("fill");
        assert!(write_atomic(&target, b"two", 0o600).is_err());
        assert_eq!(fs::read_to_string(&file).expect("read"), "one");
        let count = fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(count, 2, "no temporary left behind");
    }
}
