//! Writing Pilotfish's state files so that a crash or a power loss leaves the old version or
//! the new one, never half of one, and a secret is never readable by others, not even for a
//! moment. Every state file of every part goes through here: discovery's CA keys and
//! certificates, join tokens, revocations, the issued-certificate log, the rules API's
//! `rules.d` and the registries' last-good copies; the agent's keys, certificates, bundle, CRL,
//! xDS cache and Envoy bootstrap.
//!
//! [`write_atomic`] replaces a whole file:
//!
//! 1. create a temporary file in the target's directory (so the rename cannot cross a file
//!    system), with a unique dot name (the file registry skips dot files), `O_EXCL`, and the
//!    final mode passed to `open`; the umask can only narrow that mode, so a secret is never
//!    briefly readable by others;
//! 2. `fchmod` it to exactly the mode (the umask may have cleared bits of a public file);
//! 3. write everything and `fsync` the file: its data is on disk before any name points at it;
//! 4. `rename` it over the target: readers (and Envoy, which watches only moves) see the old
//!    file or the new one;
//! 5. `fsync` the directory, so the rename itself survives a power loss.
//!
//! On error the temporary file is removed and the target still holds one whole version.
//!
//! [`rename`] and [`remove`] make a move or a removal durable; a sequence of them is durable in
//! order, which is how a pair of files is replaced (see [`rename`]). [`append`] is for logs,
//! [`create_dir_all`] for the directories the state lives in.
//!
//! Everything here blocks, and `fsync` can take tens of milliseconds: from async code run it
//! in `tokio::task::spawn_blocking` (the agent's xDS cache does).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of files holding private keys, token hashes and other state only the owner reads.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of files anyone on the host may read (certificates, bundles, Envoy's bootstrap).
pub const PUBLIC_MODE: u32 = 0o644;
/// Mode of directories holding state only the owner reads.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Atomically and durably replaces `path` with `contents`, with file mode `mode` (exactly,
/// whatever the umask). See the module docs for the steps.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let (tmp, mut file) = create_temp(dir, path, mode)?;
    let result = (|| {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Already gone when only the directory sync failed; then the new file is in place.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` to `to` and makes the rename durable (both directories are synced) before
/// returning.
///
/// Two files that must match (a key and its certificate) cannot be replaced in one atomic
/// step. What this gives instead is order: after a crash the disk shows a prefix of a
/// sequence of `write_atomic`/`rename`/`remove` calls, never a later step without an earlier
/// one. Write the new pair under other names, then rename them into place one by one; the
/// loader recognises each possible prefix and finishes the sequence (the CA's root switch and
/// the agent's identity store work this way).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    let (from_dir, to_dir) = (parent(from), parent(to));
    sync_dir(to_dir)?;
    if from_dir != to_dir {
        sync_dir(from_dir)?;
    }
    Ok(())
}

/// Removes file `path` and makes the removal durable. A file that is already gone is not an
/// error.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the empty directory `path` and makes the removal durable.
pub fn remove_dir(path: &Path) -> io::Result<()> {
    fs::remove_dir(path)?;
    sync_dir(parent(path))
}

/// Appends `bytes` to the log at `path` and syncs them: they are on disk when this returns.
/// A new log is created with `mode` (exactly) and its directory entry synced too. A record
/// cut short by a crash is possible; readers of a log skip a last line that does not parse.
pub fn append(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let opened = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(mode)
        .open(path);
    let (mut file, created) = match opened {
        Ok(file) => {
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            (file, true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            (OpenOptions::new().append(true).open(path)?, false)
        }
        Err(e) => return Err(e),
    };
    file.write_all(bytes)?;
    file.sync_data()?;
    if created {
        sync_dir(parent(path))?;
    }
    Ok(())
}

/// Creates `dir` and any missing parents with `mode` (narrowed by the umask, like `mkdir`),
/// syncing each parent a directory was created in, so files written into `dir` afterwards
/// are not lost with it. An existing directory is left as it is.
pub fn create_dir_all(dir: &Path, mode: u32) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .take_while(|p| !p.is_dir())
        .collect();
    let mut builder = fs::DirBuilder::new();
    builder.mode(mode);
    for path in missing.into_iter().rev() {
        match builder.create(path) {
            Ok(()) => sync_dir(parent(path))?,
            // Another process made it in the meantime.
            Err(_) if path.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes renames, creations and removals of entries in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Makes a new temporary file for `target` in `dir`: `.<name>.<pid>.<n>.tmp`. The name is
/// unique among live processes; one left by a crashed process with a reused pid is skipped.
fn create_temp(dir: &Path, target: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut last = None;
    for _ in 0..16 {
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary file name")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
