//! Putting up the walls around the calling process: [`enter`].

use crate::{JailError, Wall, WallState};
use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What [`enter`] sets up.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The VM's own uid and gid (never 0).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// The directory the VMM keeps using after the walls are up (its sockets, exit report),
    /// visible at the same path inside; `None`: nothing of the host's filesystem at all.
    pub run_dir: Option<PathBuf>,
    /// Walls the operator lets this VMM run without.
    pub skip: Vec<Wall>,
    /// Host-dependent walls (Landlock) that must go up: without them, [`enter`] fails.
    pub require: Vec<Wall>,
    /// `RLIMIT_NOFILE`: the most descriptors the VMM may hold.
    pub max_files: u64,
}

/// How each wall [`enter`] handles stands.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// In [`Wall::ALL`] order.
    pub walls: Vec<(Wall, WallState)>,
    /// How long each step took, in milliseconds, in order.
    pub steps: Vec<(&'static str, f64)>,
}

impl Report {
    fn step(&mut self, name: &'static str, since: &mut std::time::Instant) {
        let now = std::time::Instant::now();
        self.steps
            .push((name, now.duration_since(*since).as_secs_f64() * 1000.0));
        *since = now;
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (wall, state)) in self.walls.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match state {
                WallState::Up(d) => write!(f, "{wall}: up ({d})")?,
                WallState::Unavailable(d) => write!(f, "{wall}: not available ({d})")?,
                WallState::Skipped => write!(f, "{wall}: off (--allow-unconfined)")?,
            }
        }
        Ok(())
    }
}

fn check(wall: Wall, what: &str, r: libc::c_int) -> Result<(), JailError> {
    if r < 0 {
        Err(JailError::os(wall, what))
    } else {
        Ok(())
    }
}

fn c_path(wall: Wall, p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JailError::new(wall, format!("{} contains a NUL byte", p.display())))
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// The Landlock ABI the kernel offers, or why there is none.
pub(crate) fn landlock_abi() -> Result<i32, String> {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag only
    // returns the ABI version; it reads no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v > 0 {
        return Ok(v as i32);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => Err(
            "Landlock is built into the kernel but not enabled: add landlock to the lsm= kernel \
             parameter"
                .into(),
        ),
        _ => Err(
            "the kernel has no Landlock (Linux 5.13 or later with CONFIG_SECURITY_LANDLOCK)".into(),
        ),
    }
}

/// Puts up the `namespaces` (user, mount, network, IPC, UTS, cgroup; the PID namespace is made
/// by [`crate::spawn`]), `filesystem`, `identity` and `landlock` walls around the calling
/// process.
///
/// The caller must be root, the only thread of its process, the first process of its own PID
/// namespace (unless `namespaces` is skipped), and must already hold every file it needs from
/// the host: afterwards it can open nothing outside `plan.run_dir`. Fails, naming the wall,
/// when a wall that is on cannot go up.
///
/// The order:
/// 1. new user, mount, network, IPC, UTS and cgroup namespaces, still as root (kuid 0), so
///    that the host paths to the run directory stay reachable through their owner bits; a
///    helper process forked before (root in the host's user namespace) writes the uid and gid
///    maps (`uid uid 1`: the VM's uid is the only one the namespace knows);
/// 2. the mounts, in the new mount namespace (owned by the new user namespace): a tmpfs as the
///    new root with the run directory bind-mounted at its own path, `pivot_root`, the old root
///    detached;
/// 3. the VM's gid and uid (no groups);
/// 4. Landlock;
/// 5. every capability set emptied, `no_new_privs`, not dumpable, rlimits, no environment.
pub fn enter(plan: &Plan) -> Result<Report, JailError> {
    let on = |w: Wall| !plan.skip.contains(&w);
    let mut report = Report::default();
    let mut t = std::time::Instant::now();
    if plan.uid == 0 || plan.gid == 0 {
        return Err(JailError::new(
            Wall::Identity,
            "the VM's uid and gid must not be 0",
        ));
    }
    // Read while the host's /proc and /sys are still visible.
    let cap_last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    if on(Wall::Namespaces) {
        // SAFETY: getpid has no preconditions.
        if unsafe { libc::getpid() } != 1 {
            return Err(JailError::new(
                Wall::Namespaces,
                "the VMM is not the first process of a PID namespace of its own (start it \
                 through the daemon or `ferrovisor run --jail`)",
            ));
        }
    }
    let run_dir = match &plan.run_dir {
        Some(d) => Some(std::fs::canonicalize(d).map_err(|e| {
            JailError::new(
                Wall::Filesystem,
                format!("run directory {}: {e}", d.display()),
            )
        })?),
        None => None,
    };
    // The VMM makes its sockets and exit report there as its own uid: the directory becomes
    // the VM's, unless everyone may already create files in it (a sticky, world-writable
    // directory such as /tmp, which is left as it is).
    let shared = run_dir.as_ref().is_some_and(|d| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o1002 == 0o1002)
    });
    if let (Some(d), true, false) = (&run_dir, on(Wall::Identity), shared) {
        let c = c_path(Wall::Identity, d)?;
        // SAFETY: chown on a NUL-terminated path we own.
        check(Wall::Identity, "chown of the run directory", unsafe {
            libc::chown(c.as_ptr(), plan.uid, plan.gid)
        })?;
    }
    if on(Wall::Identity) {
        // SAFETY: setgroups with an empty list.
        check(Wall::Identity, "setgroups", unsafe {
            libc::setgroups(0, std::ptr::null())
        })?;
    }

    if on(Wall::Namespaces) {
        unshare_namespaces(plan.uid, plan.gid)?;
        report.step("namespaces", &mut t);
        report.walls.push((
            Wall::Namespaces,
            WallState::Up("pid, user, mount, network, ipc, uts, cgroup".into()),
        ));
    } else {
        report.walls.push((Wall::Namespaces, WallState::Skipped));
    }

    if on(Wall::Filesystem) {
        if !on(Wall::Namespaces) {
            return Err(JailError::new(
                Wall::Filesystem,
                "needs the namespaces wall (a mount namespace of its own)",
            ));
        }
        pivot_into_run_dir(run_dir.as_deref(), plan.uid, plan.gid)?;
        report.step("filesystem", &mut t);
        report.walls.push((
            Wall::Filesystem,
            WallState::Up(match &run_dir {
                Some(d) => format!("root holds only {}", d.display()),
                None => "an empty read-only root".into(),
            }),
        ));
    } else {
        report.walls.push((Wall::Filesystem, WallState::Skipped));
    }

    if on(Wall::Identity) {
        // The bounding set goes while the capability to shrink it (CAP_SETPCAP) is still there:
        // changing to a non-zero uid below empties the permitted and effective sets.
        drop_bounding_set(cap_last)?;
        // SAFETY: plain system calls on values.
        unsafe {
            check(
                Wall::Identity,
                "setresgid",
                libc::setresgid(plan.gid, plan.gid, plan.gid),
            )?;
            check(
                Wall::Identity,
                "setresuid",
                libc::setresuid(plan.uid, plan.uid, plan.uid),
            )?;
        }
    }

    if on(Wall::Landlock) {
        let r = landlock(run_dir.as_deref());
        report.step("landlock", &mut t);
        match r {
            Ok(state) => report.walls.push((Wall::Landlock, state)),
            Err(reason) if plan.require.contains(&Wall::Landlock) => {
                return Err(JailError::new(Wall::Landlock, reason))
            }
            Err(reason) => report
                .walls
                .push((Wall::Landlock, WallState::Unavailable(reason))),
        }
    } else {
        report.walls.push((Wall::Landlock, WallState::Skipped));
    }

    if on(Wall::Identity) {
        drop_everything(cap_last, plan.max_files)?;
        report.step("identity", &mut t);
        report.walls.push((
            Wall::Identity,
            WallState::Up(format!(
                "uid {} gid {}, no capabilities, no_new_privs",
                plan.uid, plan.gid
            )),
        ));
    } else {
        report.walls.push((Wall::Identity, WallState::Skipped));
    }
    report.walls.sort_by_key(|(w, _)| *w);
    Ok(report)
}

/// New user, mount, network, IPC, UTS and cgroup namespaces for the calling (root) process;
/// a helper forked before the unshare, still root in the host's user namespace, writes the
/// maps `uid uid 1` and `gid gid 1` through the caller's own `/proc` directory.
fn unshare_namespaces(uid: u32, gid: u32) -> Result<(), JailError> {
    let w = Wall::Namespaces;
    // SAFETY: open on a NUL-terminated literal.
    let proc_self = unsafe {
        libc::open(
            c"/proc/self".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(w, "opening /proc/self", proc_self)?;
    // Root is mapped too, as itself: so that the VMM sees its supervisor (root) as uid 0 on its
    // control socket (SO_PEERCRED), and not as the overflow uid every unmapped user shares.
    // Nothing in the namespace runs as 0 once the walls are up (and no capability is left to
    // become it).
    let uid_map = format!("0 0 1\n{uid} {uid} 1\n");
    let gid_map = format!("0 0 1\n{gid} {gid} 1\n");
    let mut go = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the array we own.
    check(w, "pipe", unsafe {
        libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC)
    })?;
    // SAFETY: fork of a single-threaded process (the documented precondition of `enter`): the
    // child may run any code; it makes only system calls on memory prepared above and _exits.
    let helper = unsafe { libc::fork() };
    if helper == 0 {
        // SAFETY: the helper: wait for the parent's byte, write the maps, exit.
        unsafe {
            libc::close(go[1]);
            let mut b = 0u8;
            let ok = libc::read(go[0], (&mut b as *mut u8).cast(), 1) == 1
                && write_at(proc_self, c"uid_map", uid_map.as_bytes())
                && write_at(proc_self, c"gid_map", gid_map.as_bytes());
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    // SAFETY: closing the read end, ours.
    unsafe { libc::close(go[0]) };
    if helper < 0 {
        return Err(JailError::os(w, "fork"));
    }
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // SAFETY: unshare on flags.
    let unshared = unsafe { libc::unshare(flags) };
    let e = std::io::Error::last_os_error();
    // Either way the helper gets its byte (or end-of-file) and ends; reap it.
    // SAFETY: write/close/waitpid on our own descriptors and child.
    let status = unsafe {
        libc::write(go[1], b"g".as_ptr().cast(), 1);
        libc::close(go[1]);
        let mut status = 0;
        libc::waitpid(helper, &mut status, 0);
        libc::close(proc_self);
        status
    };
    if unshared != 0 {
        let hint = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EPERM) | Some(libc::EUSERS) => {
                " (are user namespaces disabled? check sysctl user.max_user_namespaces, or an \
                 LSM restricting them)"
            }
            Some(libc::EINVAL) => " (the process has more than one thread)",
            _ => "",
        };
        return Err(JailError::new(
            w,
            format!("unshare(user, mount, net, ipc, uts, cgroup): {e}{hint}"),
        ));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(JailError::new(
            w,
            format!("writing the user namespace's uid/gid maps failed (helper status {status:#x})"),
        ));
    }
    let host = b"ferrovisor-vm";
    // SAFETY: sethostname reads `host.len()` bytes of `host`.
    check(w, "sethostname", unsafe {
        libc::sethostname(host.as_ptr().cast(), host.len())
    })?;
    Ok(())
}

/// Writes `bytes` to `name` under the directory `dir` in one write; true on success.
///
/// # Safety
/// Only async-signal-safe calls; usable in a forked child.
unsafe fn write_at(dir: libc::c_int, name: &std::ffi::CStr, bytes: &[u8]) -> bool {
    let fd = libc::openat(dir, name.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    let ok = libc::write(fd, bytes.as_ptr().cast(), bytes.len()) == bytes.len() as isize;
    libc::close(fd);
    ok
}

/// A tmpfs becomes the root; the run directory is bind-mounted into it at its own path; the
/// old root is detached; the tmpfs is made read-only.
///
/// Runs as kuid 0 in the new user namespace: host paths resolve through their owner bits (the
/// state directory is root's, mode 0700), while files in the tmpfs are made as the VM's uid
/// (`setfsuid`), the only one the namespace maps.
fn pivot_into_run_dir(run_dir: Option<&Path>, uid: u32, gid: u32) -> Result<(), JailError> {
    let w = Wall::Filesystem;
    let none = std::ptr::null::<libc::c_char>();
    // Where the new root is assembled, in this process's own mount namespace: the run
    // directory itself (reached again through an fd opened before), or /proc (no longer
    // needed) when there is none.
    let base = c_path(w, run_dir.unwrap_or(Path::new("/proc")))?;
    // A detached copy of the run directory's mount, taken before the tmpfs covers it.
    let run_tree = match run_dir {
        Some(_) => {
            // SAFETY: open_tree on a NUL-terminated path; it returns a new descriptor.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    base.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
                )
            } as libc::c_int;
            check(w, "taking the run directory (open_tree)", fd)?;
            Some(fd)
        }
        None => None,
    };
    let opts = CString::new(format!(
        "mode=0755,size=64k,nr_inodes=64,uid={uid},gid={gid}"
    ))
    .map_err(|_| JailError::new(w, "tmpfs options"))?;
    // SAFETY: mount/umount/pivot_root/mkdir/chdir with NUL-terminated strings that outlive the
    // calls; they change only this process's own mount namespace.
    unsafe {
        check(
            w,
            "making the mounts private",
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        check(
            w,
            "mounting the new root (tmpfs)",
            libc::mount(
                c"ferrovisor-jail".as_ptr(),
                base.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ),
        )?;
        // The tmpfs's top: the mount just made at `base`.
        let root_fd = libc::open(
            base.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        check(w, "opening the new root", root_fd)?;
        libc::setfsuid(uid);
        libc::setfsgid(gid);
        if let (Some(d), Some(tree)) = (run_dir, run_tree) {
            // mkdir -p of the run directory's path inside the tmpfs, relative to its top.
            let mut at = String::new();
            for part in d.components().skip(1) {
                if !at.is_empty() {
                    at.push('/');
                }
                at.push_str(&part.as_os_str().to_string_lossy());
                let c = CString::new(at.clone()).map_err(|_| JailError::new(w, "path"))?;
                if libc::mkdirat(root_fd, c.as_ptr(), 0o755) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(JailError::os(w, &format!("making /{at} in the new root")));
                }
            }
            let dst = CString::new(at).map_err(|_| JailError::new(w, "path"))?;
            check(
                w,
                "mounting the run directory in the new root (move_mount)",
                libc::syscall(
                    libc::SYS_move_mount,
                    tree,
                    c"".as_ptr(),
                    root_fd,
                    dst.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ) as libc::c_int,
            )?;
            libc::close(tree);
        }
        libc::setfsuid(0);
        libc::setfsgid(0);
        // pivot_root(".", "."): the old root ends up stacked on the new one, and is detached.
        check(w, "entering the new root", libc::fchdir(root_fd))?;
        libc::close(root_fd);
        check(
            w,
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
        )?;
        check(
            w,
            "detaching the old root",
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        )?;
        check(w, "chdir /", libc::chdir(c"/".as_ptr()))?;
        check(
            w,
            "making the root read-only",
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
        )?;
    }
    Ok(())
}

/// Landlock: every filesystem access handled and only the run directory granted (no
/// execution), every TCP bind and connect refused, abstract Unix sockets and signals scoped to
/// the VMM itself; as much of that as the kernel's ABI offers.
pub fn landlock(run_dir: Option<&Path>) -> Result<WallState, String> {
    let abi = landlock_abi()?;
    let target = ABI::V6;
    let all_fs = AccessFs::from_all(target);
    let err = |e: landlock::RulesetError| format!("Landlock: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all_fs)
        .map_err(err)?
        .handle_access(AccessNet::from_all(target))
        .map_err(err)?
        .scope(Scope::from_all(target))
        .map_err(err)?
        .create()
        .map_err(err)?;
    if let Some(d) = run_dir {
        let fd = PathFd::new(d).map_err(|e| format!("Landlock: {}: {e}", d.display()))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, all_fs & !AccessFs::Execute))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    match status.ruleset {
        RulesetStatus::NotEnforced => Err("Landlock is not enforced by this kernel".into()),
        RulesetStatus::FullyEnforced => Ok(WallState::Up(format!(
            "Landlock ABI {abi}, fully enforced (filesystem, TCP, scopes)"
        ))),
        RulesetStatus::PartiallyEnforced => Ok(WallState::Up(format!(
            "Landlock ABI {abi}, partly enforced (this kernel lacks some of ABI 6's rights)"
        ))),
    }
}

/// Capabilities (all five sets), `no_new_privs`, dumpability, rlimits and the environment.
fn drop_everything(cap_last: u32, max_files: u64) -> Result<(), JailError> {
    let w = Wall::Identity;
    drop_bounding_set(cap_last)?;
    // SAFETY: prctl/setrlimit/capset on values and on structs we own.
    unsafe {
        check(
            w,
            "clearing ambient capabilities",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ),
        )?;
        let mut header = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check(
            w,
            "capset (clearing effective, permitted, inheritable)",
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int,
        )?;
        check(
            w,
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
        check(
            w,
            "prctl(PR_SET_DUMPABLE, 0)",
            libc::prctl(libc::PR_SET_DUMPABLE, 0),
        )?;
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(
            w,
            "setrlimit(RLIMIT_CORE)",
            libc::setrlimit(libc::RLIMIT_CORE, &zero),
        )?;
        let files = libc::rlimit {
            rlim_cur: max_files,
            rlim_max: max_files,
        };
        check(
            w,
            "setrlimit(RLIMIT_NOFILE)",
            libc::setrlimit(libc::RLIMIT_NOFILE, &files),
        )?;
    }
    // The process is still single-threaded: nothing reads the environment concurrently.
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    Ok(())
}

/// Empties the capability bounding set (a capability already gone is fine).
fn drop_bounding_set(cap_last: u32) -> Result<(), JailError> {
    for cap in 0..=cap_last {
        // SAFETY: prctl on values.
        let in_set = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if in_set == 1
            // SAFETY: prctl on values.
            && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0
        {
            return Err(JailError::os(
                Wall::Identity,
                "dropping the capability bounding set",
            ));
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
