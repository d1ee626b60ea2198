//! The API socket: mode 0660, the requested group, one daemon per socket, stale sockets
//! replaced.

use daemon::api::bind_socket;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("api-sock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[tokio::test]
async fn mode_group_live_and_stale() {
    let dir = scratch("modes");
    let path = dir.join("api.sock");
    let gid = std::fs::metadata(&dir).expect("stat").gid();
    let listener = bind_socket(&path, Some(gid)).expect("bind");
    let md = std::fs::symlink_metadata(&path).expect("stat");
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    assert_eq!(md.gid(), gid);

    // A live daemon holds it: refused, and the socket is left alone.
    let e = bind_socket(&path, None).expect_err("second daemon");
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    assert!(path.exists());

    // The daemon is gone (its socket file stays): the stale socket is replaced.
    drop(listener);
    let _again = bind_socket(&path, None).expect("rebind over a stale socket");

    // Not a socket: never removed.
    let file = dir.join("file");
    std::fs::write(&file, b"keep").expect("write");
    let e = bind_socket(&file, None).expect_err("a regular file");
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&file).expect("read"), b"keep");
    let _ = std::fs::remove_dir_all(&dir);
}
