//! Every thread kind's seccomp filter, in a child process of its own: each forbidden system
//! call kills the child with SIGSYS; the allowed ones do not.

use jail::seccomp::{compile_all, install, ThreadKind};

/// (name, number, arguments): harmless arguments — without a filter each would fail or do
/// nothing lasting.
fn forbidden() -> Vec<(&'static str, libc::c_long, [usize; 6])> {
    use libc::*;
    vec![
        ("execve", SYS_execve, [0; 6]),
        (
            "ptrace",
            SYS_ptrace,
            [PTRACE_TRACEME as usize, 0, 0, 0, 0, 0],
        ),
        ("mount", SYS_mount, [0; 6]),
        ("unshare", SYS_unshare, [0; 6]),
        ("setns", SYS_setns, [usize::MAX, 0, 0, 0, 0, 0]),
        ("bpf", SYS_bpf, [usize::MAX, 0, 0, 0, 0, 0]),
        ("perf_event_open", SYS_perf_event_open, [0; 6]),
        ("keyctl", SYS_keyctl, [usize::MAX, 0, 0, 0, 0, 0]),
        ("userfaultfd", SYS_userfaultfd, [0; 6]),
        ("process_vm_writev", SYS_process_vm_writev, [0; 6]),
        (
            "open_by_handle_at",
            SYS_open_by_handle_at,
            [usize::MAX, 0, 0, 0, 0, 0],
        ),
        ("init_module", SYS_init_module, [0; 6]),
        ("kexec_load", SYS_kexec_load, [0; 6]),
        ("io_uring_setup", SYS_io_uring_setup, [0; 6]),
        ("fork", SYS_fork, [0; 6]),
        (
            "socket(AF_INET)",
            SYS_socket,
            [AF_INET as usize, SOCK_STREAM as usize, 0, 0, 0, 0],
        ),
        (
            "mmap(PROT_EXEC)",
            SYS_mmap,
            [
                0,
                4096,
                (PROT_READ | PROT_EXEC) as usize,
                (MAP_PRIVATE | MAP_ANONYMOUS) as usize,
                usize::MAX,
                0,
            ],
        ),
        (
            "ioctl(TIOCSTI)",
            SYS_ioctl,
            [0, 0x5412_0000_0000, 0, 0, 0, 0],
        ),
        ("ioctl(SIOCGIFCONF)", SYS_ioctl, [0, 0x8912, 0, 0, 0, 0]),
    ]
}

fn allowed() -> Vec<(&'static str, libc::c_long, [usize; 6])> {
    use libc::*;
    vec![
        ("getpid", SYS_getpid, [0; 6]),
        ("write(-1)", SYS_write, [usize::MAX, 0, 0, 0, 0, 0]),
        (
            "mmap(PROT_READ|PROT_WRITE)",
            SYS_mmap,
            [
                0,
                4096,
                (PROT_READ | PROT_WRITE) as usize,
                (MAP_PRIVATE | MAP_ANONYMOUS) as usize,
                usize::MAX,
                0,
            ],
        ),
        (
            "clock_gettime",
            SYS_clock_gettime,
            [CLOCK_MONOTONIC as usize, 0, 0, 0, 0, 0],
        ),
        ("futex", SYS_futex, [0; 6]),
    ]
}

/// Runs `nr` in a child under `kind`'s filter; returns the child's wait status.
fn run_in_child(kind: ThreadKind, nr: libc::c_long, args: [usize; 6]) -> i32 {
    // SAFETY: fork; the child only installs a pre-compiled filter (no allocation: compile_all
    // ran in the parent), makes raw system calls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // The filters were compiled for the parent's pid: tgkill rules do not matter here.
        let filters = FILTERS.with(|f| f as *const _);
        // SAFETY: the thread-local outlives this call; the child is single-threaded.
        let filters = unsafe { &*filters };
        if install(filters, kind).is_err() {
            // SAFETY: ending the child.
            unsafe { libc::_exit(3) };
        }
        // SAFETY: a raw system call with harmless arguments, then _exit.
        unsafe {
            libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}

thread_local! {
    static FILTERS: jail::seccomp::Filters = compile_all(std::process::id()).expect("filters compile");
}

#[test]
fn each_kind_kills_forbidden_calls_and_allows_its_own() {
    FILTERS.with(|_| ());
    let mut failures = Vec::new();
    for kind in ThreadKind::ALL {
        for (name, nr, args) in forbidden() {
            let s = run_in_child(kind, nr, args);
            if !(libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGSYS) {
                failures.push(format!(
                    "{}: {name} was not killed (status {s:#x})",
                    kind.name()
                ));
            }
        }
        for (name, nr, args) in allowed() {
            let s = run_in_child(kind, nr, args);
            if !(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0) {
                failures.push(format!(
                    "{}: {name} did not pass (status {s:#x})",
                    kind.name()
                ));
            }
        }
    }
    // clone3 is never allowed through: it fails with ENOSYS so that threads use clone.
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
