//! The API's Unix socket: mode 0660, group configurable, one daemon per socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds the API socket at `path`: refuses when a live daemon answers on it, removes a stale
/// socket left by a dead one, refuses to replace anything that is not a socket. The socket
/// gets mode 0660 and, when `gid` is given, that group (the owner is the daemon's user, root).
/// Must be called inside a Tokio runtime.
///
/// Between `bind` and `chmod` the socket briefly has the umask's mode; the daemon runs with a
/// umask of 077 or keeps the socket's directory private (0750) to close that window.
pub fn bind_socket(path: &Path, gid: Option<u32>) -> io::Result<tokio::net::UnixListener> {
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
    };
    match path.symlink_metadata() {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another ferrovisor daemon is listening on this socket",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path).map_err(|e| ctx("removing the stale socket", e))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{}: exists and is not a socket; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx("stat", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| ctx("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| ctx("chmod 0660", e))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| ctx("chown", e))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| ctx("set_nonblocking", e))?;
    tokio::net::UnixListener::from_std(listener).map_err(|e| ctx("register", e))
}
