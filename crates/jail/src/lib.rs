//! Confinement of one VMM process: the walls a subverted VMM finds around it.
//!
//! The walls and their names (the same everywhere: flags, `/v1/host`, errors, docs):
//!
//! | wall | what it does | where |
//! |------|--------------|-------|
//! | `namespaces` | new PID (made by [`spawn`]), user, mount, network, IPC, UTS and cgroup namespaces | [`enter`] |
//! | `filesystem` | `pivot_root` into a tmpfs holding only the VM's run directory | [`enter`] |
//! | `identity` | a uid/gid of the VM's own, no groups, no capabilities, `no_new_privs`, not dumpable, bounded rlimits, no environment | [`enter`] |
//! | `landlock` | the run directory is the only path it may open; no TCP; no abstract sockets, no signals out | [`enter`] |
//! | `seccomp` | one filter per thread kind, default action: kill the process | [`seccomp`] |
//! | `cgroups` | cgroup v2 limits, joined before exec | [`cgroup`], [`spawn`] |
//! | `apparmor` | a per-VM profile `ferrovisor-<vm id>` entered at exec | [`apparmor`] |
//! | `selinux` | the `ferrovisor_vm_t` domain with a per-VM MCS category pair | [`selinux`] |
//!
//! The order of [`enter`] matters and is the whole design: everything the VMM needs from the
//! host is opened first (by the VMM, as root, while it is one thread); then the walls go up,
//! innermost last (identity, user namespace, mounts, Landlock, capabilities); threads are made
//! after that and each installs its seccomp filter as its first act.
#![deny(missing_docs)]

pub mod apparmor;
pub mod cgroup;
mod enter;
pub mod seccomp;
pub mod selinux;
pub mod spawn;
mod walls;

pub use enter::{enter, landlock, Plan, Report};
pub use walls::{host_ids, probe, running_uids, Wall, WallError, WallState, WallStatus};

/// A wall that could not go up: the VMM must not start.
#[derive(Debug, thiserror::Error)]
#[error("{wall} wall: {reason}")]
pub struct JailError {
    /// Which wall.
    pub wall: Wall,
    /// Why, and where possible what to do about it.
    pub reason: String,
}

impl JailError {
    pub(crate) fn new(wall: Wall, reason: impl Into<String>) -> JailError {
        JailError {
            wall,
            reason: reason.into(),
        }
    }

    pub(crate) fn os(wall: Wall, what: &str) -> JailError {
        JailError::new(wall, format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

/// The uid of the process at the other end of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_uid(sock: &impl std::os::fd::AsRawFd) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// The uids (and gids) VMs get by default: far above any account's, below the 2^31 limit
/// some tools assume.
pub const DEFAULT_UID_RANGE: std::ops::RangeInclusive<u32> = 900_000..=965_535;

/// The most descriptors a confined VMM may hold (`RLIMIT_NOFILE`).
pub const MAX_FILES: u64 = 4096;

/// Makes every thread allocate from the C library's main heap (`M_ARENA_MAX` 1).
///
/// glibc gives threads heaps of their own and, when one shrinks, reads
/// `/proc/sys/vm/overcommit_memory` — an `openat` from whatever thread freed memory, which a
/// confined thread's seccomp filter forbids (seen killing the control thread in the lab). The
/// main heap grows and shrinks with `brk` and `mmap` only. Call before any thread exists.
pub fn single_malloc_arena() {
    // SAFETY: mallopt changes an allocator parameter; no memory is passed.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
