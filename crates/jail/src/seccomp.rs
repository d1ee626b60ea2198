//! seccomp-BPF: one filter per kind of VMM thread, each allowing only what that thread does;
//! anything else kills the whole process (`SECCOMP_RET_KILL_PROCESS`), which the daemon
//! records as a seccomp violation.
//!
//! [`prepare`] compiles every filter once, before the walls go up; each thread then calls
//! [`apply`] with its kind as its first act (a thread inherits its creator's filters, and
//! filters only ever narrow, so a thread that creates others must allow what they need: device
//! workers are therefore made by a `spawner` thread, never by a vCPU). Before [`prepare`] (an
//! unconfined VMM), [`apply`] does nothing.
//!
//! Beyond the syscall numbers, arguments are checked where it matters: `ioctl` only with KVM's
//! (type `0xAE`), TUN/terminal (`0x54`) and block-device (`0x12`) request types, and only the
//! kinds that need each; `mmap`/`mprotect` never with `PROT_EXEC_BIT`; `clone` only for threads
//! and never with `CLONE_NEW*`; `socket` only `AF_UNIX`; `tgkill` only within the VMM;
//! `prctl` only to name a thread. `clone3` (whose flags live in memory a filter cannot read)
//! fails with `ENOSYS`, so the C library falls back to `clone`. `io_uring_setup` is in no
//! filter: rings are made before the walls (see the block device).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The kinds of thread a VMM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: builds the VM, then waits for events and writes the exit report.
    Main,
    /// A vCPU: `KVM_RUN` and the device models' register accesses.
    Vcpu,
    /// A device's I/O worker (disk, TAP, vsock sockets, balloon).
    Device,
    /// Creates device workers on behalf of vCPU threads.
    Spawner,
    /// Forwards queue notifications, serial input and signals.
    EventLoop,
    /// Serves the control socket.
    Control,
    /// Copies the kernel image into guest memory.
    Loader,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Spawner,
        ThreadKind::EventLoop,
        ThreadKind::Control,
        ThreadKind::Loader,
    ];

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Spawner => "spawner",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Control => "control",
            ThreadKind::Loader => "loader",
        }
    }
}

/// A filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Compiling a filter failed (a bug in the rules).
    #[error("seccomp filter for {kind} threads: {reason}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("installing the seccomp filter for {kind} threads: {reason}")]
    Apply {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// [`prepare`] ran twice.
    #[error("seccomp filters are already prepared")]
    Prepared,
}

/// The compiled filters: the `clone3` → `ENOSYS` filter and one per kind.
pub struct Filters {
    clone3: BpfProgram,
    by_kind: BTreeMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

const PROT_EXEC_BIT: u64 = libc::PROT_EXEC as u64;
const CLONE_NEW_ANY: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;
const CLONE_THREAD_BIT: u64 = libc::CLONE_THREAD as u64;

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<Cond, String> {
    Cond::new(arg, len, op, value).map_err(|e| e.to_string())
}

fn rule(conds: Vec<Cond>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| e.to_string())
}

/// The rules of one kind: syscall number → rules (an empty list allows every call).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for c in calls {
        rules.entry(*c).or_default();
    }
}

/// `ioctl` with a request whose type byte is one of `types`.
fn ioctl_types(rules: &mut Rules, types: &[u64]) -> Result<(), String> {
    let list = rules.entry(libc::SYS_ioctl).or_default();
    for t in types {
        list.push(rule(vec![cond(
            1,
            Len::Dword,
            Op::MaskedEq(0xff00),
            t << 8,
        )?])?);
    }
    Ok(())
}

/// What every thread does: memory (never executable), futexes, time, signals returning, its
/// own end, reading and writing descriptors it holds, waiting on them.
fn base(pid: u32) -> Result<Rules, String> {
    use libc::*;
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            SYS_read,
            SYS_write,
            SYS_readv,
            SYS_writev,
            SYS_pread64,
            SYS_pwrite64,
            SYS_close,
            SYS_lseek,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_fcntl,
            SYS_futex,
            SYS_rt_sigreturn,
            SYS_rt_sigprocmask,
            SYS_sigaltstack,
            SYS_munmap,
            SYS_madvise,
            SYS_brk,
            SYS_mremap,
            SYS_exit,
            SYS_exit_group,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_gettid,
            SYS_getpid,
            SYS_getrandom,
            SYS_restart_syscall,
            SYS_rseq,
            SYS_set_robust_list,
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_ctl,
            SYS_poll,
            SYS_ppoll,
            SYS_eventfd2,
            SYS_timerfd_settime,
            SYS_timerfd_gettime,
        ],
    );
    for call in [SYS_mmap, SYS_mprotect] {
        r.insert(
            call,
            vec![rule(vec![cond(
                2,
                Len::Qword,
                Op::MaskedEq(PROT_EXEC_BIT),
                0,
            )?])?],
        );
    }
    // Naming a thread (PR_SET_NAME) and reading the name back; no_new_privs and adding a
    // filter, so that a new thread can narrow what it inherited (never widen it).
    r.insert(
        SYS_prctl,
        vec![
            rule(vec![cond(0, Len::Dword, Op::Eq, PR_SET_NAME as u64)?])?,
            rule(vec![cond(0, Len::Dword, Op::Eq, PR_GET_NAME as u64)?])?,
            rule(vec![
                cond(0, Len::Dword, Op::Eq, PR_SET_NO_NEW_PRIVS as u64)?,
                cond(1, Len::Qword, Op::Eq, 1)?,
            ])?,
        ],
    );
    r.insert(
        SYS_seccomp,
        vec![rule(vec![
            cond(0, Len::Dword, Op::Eq, 1)?, // SECCOMP_SET_MODE_FILTER
            cond(1, Len::Dword, Op::Eq, 0)?, // no flags
        ])?],
    );
    // Signals only to its own threads (the vCPU kick).
    r.insert(
        SYS_tgkill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, u64::from(pid))?])?],
    );
    Ok(r)
}

/// Making threads: `clone` for a thread, never a new namespace or process.
fn threads(r: &mut Rules) -> Result<(), String> {
    r.insert(
        libc::SYS_clone,
        vec![rule(vec![
            cond(
                0,
                Len::Qword,
                Op::MaskedEq(CLONE_THREAD_BIT),
                CLONE_THREAD_BIT,
            )?,
            cond(0, Len::Qword, Op::MaskedEq(CLONE_NEW_ANY), 0)?,
        ])?],
    );
    // Its flags are out of a filter's reach: the pre-filter makes it fail with ENOSYS.
    allow(r, &[libc::SYS_clone3]);
    Ok(())
}

/// Serving connected Unix sockets (consoles, vsock, the control socket): accept, send,
/// receive, shut down, read an option (`SO_PEERCRED`, `SO_ERROR`).
const SOCKET_SERVING: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
];

/// Host I/O of device workers: disk images, TAPs, vsock's Unix sockets, the balloon.
fn device_io(r: &mut Rules) -> Result<(), String> {
    use libc::*;
    allow(
        r,
        &[
            SYS_preadv,
            SYS_pwritev,
            SYS_preadv2,
            SYS_pwritev2,
            SYS_fsync,
            SYS_fdatasync,
            SYS_fallocate,
            SYS_io_uring_enter,
            SYS_connect,
            SYS_setsockopt,
            SYS_epoll_create1,
            SYS_timerfd_create,
        ],
    );
    r.insert(
        SYS_socket,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, AF_UNIX as u64)?])?],
    );
    // FIONREAD/FIONBIO and TUN requests (type 'T'), block-device discard (0x12).
    allow(r, SOCKET_SERVING);
    ioctl_types(r, &[0x54, 0x12])
}

fn rules_for(kind: ThreadKind, pid: u32) -> Result<Rules, String> {
    use libc::*;
    let mut r = base(pid)?;
    match kind {
        ThreadKind::Main => {
            threads(&mut r)?;
            // KVM (pause, state), the terminal (raw mode restored at exit).
            ioctl_types(&mut r, &[0xAE, 0x54])?;
            // The exit report and the sockets it removes, in the run directory.
            allow(
                &mut r,
                &[
                    SYS_openat,
                    SYS_rename,
                    SYS_renameat,
                    SYS_renameat2,
                    SYS_unlink,
                    SYS_unlinkat,
                    SYS_fsync,
                    SYS_fdatasync,
                    SYS_fchmod,
                    SYS_ftruncate,
                    SYS_getdents64,
                    SYS_epoll_create1,
                    SYS_timerfd_create,
                    SYS_memfd_create,
                    SYS_wait4,
                    SYS_kill,
                    SYS_rt_sigaction,
                    SYS_getuid,
                    SYS_geteuid,
                    SYS_socketpair,
                    SYS_recvfrom,
                    SYS_sendto,
                    SYS_getsockopt,
                    SYS_setsockopt,
                    SYS_shutdown,
                    SYS_accept4,
                    SYS_bind,
                    SYS_listen,
                    SYS_dup,
                    SYS_dup3,
                ],
            );
            r.insert(
                SYS_socket,
                vec![rule(vec![cond(0, Len::Dword, Op::Eq, AF_UNIX as u64)?])?],
            );
        }
        ThreadKind::Vcpu => {
            // KVM_RUN and friends; TUN offloads set when a network device activates.
            ioctl_types(&mut r, &[0xAE, 0x54])?;
            // A device activating on this thread makes its worker's eventfds and epoll (the
            // thread itself is made by the spawner).
            allow(&mut r, &[SYS_epoll_create1, SYS_timerfd_create, SYS_dup]);
            // Serial output to a socket console's client.
            allow(&mut r, &[SYS_sendto, SYS_sendmsg, SYS_shutdown]);
        }
        ThreadKind::Device => device_io(&mut r)?,
        ThreadKind::Spawner => {
            threads(&mut r)?;
            device_io(&mut r)?;
        }
        ThreadKind::EventLoop => {
            // Serial input from a terminal or a socket console, signal-hook's self-pipe.
            allow(&mut r, SOCKET_SERVING);
            allow(
                &mut r,
                &[
                    SYS_epoll_create1,
                    // fv-virtio owns the devices and drops them as the VM ends: the vsock
                    // device then removes its socket (in the run directory, Landlock's only).
                    SYS_unlink,
                    SYS_unlinkat,
                ],
            );
            ioctl_types(&mut r, &[0x54])?;
        }
        ThreadKind::Control => {
            threads(&mut r)?;
            allow(&mut r, SOCKET_SERVING);
            allow(&mut r, &[SYS_setsockopt]);
            ioctl_types(&mut r, &[0xAE])?;
        }
        ThreadKind::Loader => {}
    }
    Ok(r)
}

fn compile(kind: ThreadKind, pid: u32) -> Result<BpfProgram, SeccompError> {
    let err = |reason: String| SeccompError::Build {
        kind: kind.name(),
        reason,
    };
    let rules = rules_for(kind, pid).map_err(err)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| err(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))
}

/// Compiles every kind's filter for a process whose pid (as it sees itself) is `pid`.
pub fn compile_all(pid: u32) -> Result<Filters, SeccompError> {
    let mut by_kind = BTreeMap::new();
    for kind in ThreadKind::ALL {
        by_kind.insert(kind, compile(kind, pid)?);
    }
    let mut c3 = BTreeMap::new();
    c3.insert(libc::SYS_clone3, vec![]);
    let clone3 = SeccompFilter::new(
        c3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .map_err(|e| SeccompError::Build {
        kind: "clone3",
        reason: e.to_string(),
    })?;
    Ok(Filters { clone3, by_kind })
}

/// Compiles the filters and turns [`apply`] on for this process.
pub fn prepare() -> Result<(), SeccompError> {
    let filters = compile_all(std::process::id())?;
    FILTERS.set(filters).map_err(|_| SeccompError::Prepared)
}

/// Whether [`prepare`] ran (the VMM is confined by seccomp).
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs `kind`'s filter on the calling thread (nothing when [`prepare`] did not run).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    match FILTERS.get() {
        Some(f) => install(f, kind),
        None => Ok(()),
    }
}

/// Installs `kind`'s filter from `filters` on the calling thread.
pub fn install(filters: &Filters, kind: ThreadKind) -> Result<(), SeccompError> {
    let err = |e: seccompiler::Error| SeccompError::Apply {
        kind: kind.name(),
        reason: e.to_string(),
    };
    let prog = filters.by_kind.get(&kind).ok_or(SeccompError::Apply {
        kind: kind.name(),
        reason: "no filter compiled".into(),
    })?;
    // The clone3 pre-filter first: the kernel runs the most recent filter first and takes the
    // most restrictive answer, so clone3 gets ENOSYS rather than the kind's allow.
    seccompiler::apply_filter(prog).map_err(err)?;
    seccompiler::apply_filter(&filters.clone3).map_err(err)
}

/// Installs `kind`'s filter, or ends the process: a thread that cannot be confined must not
/// run.
pub fn apply_or_abort(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("ferrovisor: {e}; stopping");
        std::process::abort();
    }
}

/// Names of the system calls this module refers to, for reading a kill's audit record.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    use libc::*;
    const NAMES: &[(i64, &str)] = &[
        (SYS_read, "read"),
        (SYS_write, "write"),
        (SYS_open, "open"),
        (SYS_openat, "openat"),
        (SYS_execve, "execve"),
        (SYS_execveat, "execveat"),
        (SYS_ptrace, "ptrace"),
        (SYS_mount, "mount"),
        (SYS_umount2, "umount2"),
        (SYS_unshare, "unshare"),
        (SYS_setns, "setns"),
        (SYS_bpf, "bpf"),
        (SYS_perf_event_open, "perf_event_open"),
        (SYS_keyctl, "keyctl"),
        (SYS_add_key, "add_key"),
        (SYS_userfaultfd, "userfaultfd"),
        (SYS_process_vm_writev, "process_vm_writev"),
        (SYS_process_vm_readv, "process_vm_readv"),
        (SYS_open_by_handle_at, "open_by_handle_at"),
        (SYS_init_module, "init_module"),
        (SYS_finit_module, "finit_module"),
        (SYS_kexec_load, "kexec_load"),
        (SYS_io_uring_setup, "io_uring_setup"),
        (SYS_socket, "socket"),
        (SYS_clone, "clone"),
        (SYS_fork, "fork"),
        (SYS_vfork, "vfork"),
        (SYS_kill, "kill"),
        (SYS_ioctl, "ioctl"),
        (SYS_mmap, "mmap"),
        (SYS_mprotect, "mprotect"),
        (SYS_connect, "connect"),
        (SYS_bind, "bind"),
        (SYS_setuid, "setuid"),
        (SYS_setresuid, "setresuid"),
        (SYS_chroot, "chroot"),
        (SYS_pivot_root, "pivot_root"),
        (SYS_prctl, "prctl"),
        (SYS_memfd_create, "memfd_create"),
        (SYS_reboot, "reboot"),
        (SYS_getuid, "getuid"),
    ];
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s)
}

/// The system call number a SIGSYS sent to a confined VMM from outside ends it with (see
/// [`install_sigsys_handler`]); no kernel has a system call of that number.
pub const SIGSYS_MARKER: i64 = 0x3fff;

/// A filter that kills the process at its next system call.
static KILL_ALL: [libc::sock_filter; 1] = [libc::sock_filter {
    code: 0x06, // BPF_RET | BPF_K
    jt: 0,
    jf: 0,
    k: 0x8000_0000, // SECCOMP_RET_KILL_PROCESS
}];

extern "C" fn on_sigsys(_: libc::c_int) {
    let prog = libc::sock_fprog {
        len: 1,
        filter: KILL_ALL.as_ptr().cast_mut(),
    };
    // SAFETY: async-signal-safe system calls; the filter program is a static the kernel only
    // reads. The last call never returns: the filter kills the process there.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const libc::sock_fprog);
        libc::syscall(SIGSYS_MARKER);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Makes a SIGSYS sent from outside end the process as a seccomp kill does (killed by SIGSYS,
/// with an audit record naming [`SIGSYS_MARKER`]).
///
/// A confined VMM is the first process of its PID namespace, and the kernel discards signals
/// such a process has no handler for when they come from an ancestor namespace (SIGKILL and
/// SIGSTOP aside): without this handler, `kill -SYS` of a VMM would do nothing. A real seccomp
/// kill does not go through a handler.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we set a handler that makes only async-signal-safe
    // calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What killed process `pid` (its host pid) by seccomp, from the kernel's audit record of the
/// kill (`type=1326 ... pid=<pid> ... syscall=<nr>`, in the kernel log): the system call's
/// name and number, or why it is not known.
pub fn violation(pid: u32) -> String {
    match audit_syscall(pid) {
        Some(SIGSYS_MARKER) => "SIGSYS sent to the VMM from outside".into(),
        Some(nr) => match syscall_name(nr) {
            Some(name) => format!("{name} (system call {nr})"),
            None => format!("system call {nr}"),
        },
        None => "unknown system call (no audit record of the kill in the kernel log)".into(),
    }
}

/// The `syscall=` of the last seccomp audit record about `pid` in `/dev/kmsg`.
fn audit_syscall(pid: u32) -> Option<i64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let needle = format!(" pid={pid} ");
    let mut found = None;
    let mut buf = vec![0u8; 8192];
    // One record per read; EAGAIN at the end of the buffer, EPIPE when records were
    // overwritten meanwhile (then go on).
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                if rec.contains("type=1326") && rec.contains(&needle) {
                    found = rec
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("syscall="))
                        .and_then(|v| v.parse().ok());
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    found
}
