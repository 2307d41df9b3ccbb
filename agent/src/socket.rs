//! The Unix sockets the agent serves Envoy on (xDS and SDS).

use std::path::Path;

use tokio::net::UnixListener;

/// Binds a Unix socket for Envoy: removes a stale socket file left by a previous run (but never
/// anything else at that path) and restricts it to the agent's user, mode 0600 (Envoy runs as
/// the same user).
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
