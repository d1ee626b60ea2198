//! Starting a VMM process: `clone(2)` with `CLONE_NEWPID` (so the VMM is the first process of
//! a PID namespace of its own and sees no other), then, in the child, only async-signal-safe
//! system calls until `execve`: a new session, joining its cgroup, its AppArmor/SELinux exec
//! label, its stdio, closing every other descriptor.
//!
//! `std::process::Command` cannot clone into a new PID namespace, hence this small spawner. The
//! parent may be multi-threaded (the daemon is): the child runs no allocator, no lock, no Rust
//! runtime code — everything it needs was prepared before the clone.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What to start and how.
pub struct Spawn<'a> {
    /// The program (an absolute path, or `/proc/self/exe`).
    pub program: &'a Path,
    /// Its arguments, `argv[0]` excluded.
    pub args: Vec<&'a OsStr>,
    /// Its whole environment (nothing else is passed on).
    pub env: Vec<(&'a OsStr, &'a OsStr)>,
    /// Its stdin, stdout and stderr (`None`: `/dev/null` for stdin, inherited for the others).
    pub stdio: [Option<RawFd>; 3],
    /// A new session (`setsid`), so that the caller's terminal and signals do not reach it.
    pub new_session: bool,
    /// A new PID namespace (the child is its first process, pid 1 inside).
    pub new_pid_namespace: bool,
    /// An open `cgroup.procs` file: the child moves itself into that cgroup before exec.
    pub cgroup_procs: Option<RawFd>,
    /// An open `/proc/self/attr/.../exec` of the caller's thread is useless in the child, so
    /// this is the path the child opens and the bytes it writes there (an AppArmor
    /// `exec <profile>` or an SELinux context) before exec.
    pub exec_label: Option<(&'a Path, &'a [u8])>,
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

/// Which step of the child's set-up failed (reported to the parent with its errno).
const STEPS: [&str; 7] = [
    "setsid",
    "joining the cgroup",
    "setting the exec label",
    "redirecting stdio",
    "closing descriptors",
    "execve",
    "opening /dev/null",
];

/// Starts `spec`; returns the child's pid (in the caller's PID namespace) once it has executed
/// the program, or the step that failed with its error.
pub fn spawn(spec: &Spawn) -> io::Result<u32> {
    let program = cstr(spec.program.as_os_str())?;
    let mut argv_c = vec![program.clone()];
    for a in &spec.args {
        argv_c.push(cstr(a)?);
    }
    let envp_c = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "environment with a NUL byte")
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let label = match spec.exec_label {
        Some((path, bytes)) => Some((cstr(path.as_os_str())?, bytes)),
        None => None,
    };
    let devnull = c"/dev/null";

    // The child reports a failure as (step, errno) on this close-on-exec pipe; a successful
    // execve closes it, so the parent reads end-of-file.
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (rd, wr) = (pipe[0], pipe[1]);
    let mut flags = libc::SIGCHLD as libc::c_long;
    if spec.new_pid_namespace {
        flags |= libc::CLONE_NEWPID as libc::c_long;
    }
    // SAFETY: a clone without CLONE_VM is a fork: the child gets a copy of the address space.
    // In the child we only make raw system calls on memory prepared above (no allocation, no
    // locks) and end in execve or _exit, as after fork in a multi-threaded process.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid == 0 {
        // SAFETY: the child side, described above: async-signal-safe calls only.
        unsafe { child(spec, &argv, &envp, label.as_ref(), devnull.as_ptr(), wr) }
    }
    // SAFETY: closing our copy of the write end, which we own.
    unsafe { libc::close(wr) };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: closing the read end we own.
        unsafe { libc::close(rd) };
        return Err(io::Error::new(e.kind(), format!("clone: {e}")));
    }
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reading into the part of `report` not yet filled.
        let n = unsafe { libc::read(rd, report[got..].as_mut_ptr().cast(), report.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    // SAFETY: closing the read end we own.
    unsafe { libc::close(rd) };
    if got == 0 {
        return Ok(pid as u32);
    }
    // The child failed before exec and has exited: reap it.
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    let e = io::Error::from_raw_os_error(errno);
    Err(io::Error::new(
        e.kind(),
        format!(
            "{}: {e}",
            STEPS.get(step).copied().unwrap_or("setting up the child")
        ),
    ))
}

/// The child after the clone. Never returns.
///
/// # Safety
/// Only to be called in the child of a fork-like clone, with pointers into memory prepared
/// before it.
unsafe fn child(
    spec: &Spawn,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    label: Option<&(CString, &[u8])>,
    devnull: *const libc::c_char,
    report: RawFd,
) -> ! {
    let fail = |step: u32| -> ! {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(report, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    };
    // The parent may have blocked signals in this thread; the program starts with none blocked.
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    if spec.new_session && libc::setsid() == -1 {
        fail(0);
    }
    if let Some(fd) = spec.cgroup_procs {
        // "0" moves the writing process into the cgroup.
        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            fail(1);
        }
    }
    if let Some((path, bytes)) = label {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 || libc::write(fd, bytes.as_ptr().cast(), bytes.len()) != bytes.len() as isize {
            fail(2);
        }
        libc::close(fd);
    }
    for (target, src) in spec.stdio.iter().enumerate() {
        let src = match (target, src) {
            (_, Some(fd)) => *fd,
            (0, None) => {
                let fd = libc::open(devnull, libc::O_RDWR);
                if fd < 0 {
                    fail(6);
                }
                fd
            }
            (_, None) => continue,
        };
        if src != target as RawFd && libc::dup2(src, target as RawFd) < 0 {
            fail(3);
        }
    }
    // Nothing of the parent's but stdio and the report pipe (close-on-exec) survives exec.
    let max = libc::c_uint::MAX;
    let r = report as libc::c_uint;
    if r > 3 && libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, r - 1, 0) != 0 {
        fail(4);
    }
    if libc::syscall(libc::SYS_close_range, r + 1, max, 0) != 0 {
        fail(4);
    }
    libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
    fail(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        status
    }

    #[test]
    fn a_child_runs_with_only_the_given_environment_and_stdio() {
        let dir = std::env::temp_dir().join(format!("fv-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::fs::File::create(dir.join("out")).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&out);
        let script = "echo \"$FOO $$\"; ls /proc/self/fd | wc -l";
        let pid = spawn(&Spawn {
            program: Path::new("/bin/sh"),
            args: vec![OsStr::new("-c"), OsStr::new(script)],
            env: vec![(OsStr::new("FOO"), OsStr::new("bar"))],
            stdio: [None, Some(fd), Some(fd)],
            new_session: true,
            new_pid_namespace: false,
            cgroup_procs: None,
            exec_label: None,
        })
        .unwrap();
        assert_eq!(wait(pid), 0);
        let text = std::fs::read_to_string(dir.join("out")).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(format!("bar {pid}").as_str()), "{text}");
        // 0, 1, 2 and the one `ls` opens for /proc/self/fd.
        assert_eq!(lines.next().map(str::trim), Some("4"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_program_names_execve() {
        let e = spawn(&Spawn {
            program: Path::new("/nonexistent/ferrovisor"),
            args: vec![],
            env: vec![],
            stdio: [None, None, None],
            new_session: false,
            new_pid_namespace: false,
            cgroup_procs: None,
            exec_label: None,
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("execve:"), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_new_pid_namespace_makes_the_child_pid_1() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED a_new_pid_namespace_makes_the_child_pid_1: needs root");
            return;
        }
        let pid = spawn(&Spawn {
            program: Path::new("/bin/sh"),
            args: vec![OsStr::new("-c"), OsStr::new("test $$ = 1")],
            env: vec![],
            stdio: [None, None, None],
            new_session: true,
            new_pid_namespace: true,
            cgroup_procs: None,
            exec_label: None,
        })
        .unwrap();
        assert_eq!(wait(pid), 0);
    }
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
}

/// Waits for the child `pid` to end (retrying on EINTR).
pub fn wait(pid: u32) -> io::Result<Ended> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) {
            return Ok(Ended::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Ended::Signaled(libc::WTERMSIG(status)));
        }
    }
}

/// The raw wait status of child `pid` if it has ended (reaping it), `None` if it runs.
pub fn try_wait_raw(pid: u32) -> io::Result<Option<i32>> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into our local.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r > 0 => Ok(Some(status)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The uid the calling process runs as.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// Closes every descriptor from 3 up: what a confined process was handed but did not ask for.
pub fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range on a range of descriptor numbers; the caller holds none it needs there.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The signals a foreground front passes on to its confined child, and SIGCHLD.
fn front_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Makes the caller's next child the first process of a new PID namespace and forks it:
/// `Some(child pid)` in the caller, `None` in the child (pid 1 of that namespace), which goes
/// on with the caller's state — no second exec. The caller must be single-threaded (the child
/// gets only the calling thread), and after it cannot make threads (the kernel refuses them to
/// a process whose children go to another PID namespace): it waits with
/// [`wait_forwarding_signals`], which needs none.
pub fn fork_into_pid_namespace() -> io::Result<Option<u32>> {
    let set = front_signals();
    // SAFETY: sigprocmask/unshare/fork on values and sets we own; the process is
    // single-threaded (the documented precondition), so the child may run any code.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        // Blocked from before the fork, so that none is lost before the parent waits.
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            let e = io::Error::last_os_error();
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            return Err(io::Error::new(
                e.kind(),
                format!("unshare(CLONE_NEWPID): {e}"),
            ));
        }
        match libc::fork() {
            -1 => {
                let e = io::Error::last_os_error();
                libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                Err(io::Error::new(e.kind(), format!("fork: {e}")))
            }
            0 => {
                libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                Ok(None)
            }
            pid => Ok(Some(pid as u32)),
        }
    }
}

/// In the parent of [`fork_into_pid_namespace`]: passes SIGINT, SIGTERM and SIGHUP on to
/// child `pid` until it ends, and says how.
pub fn wait_forwarding_signals(pid: u32) -> io::Result<Ended> {
    let set = front_signals();
    loop {
        if let Some(raw) = try_wait_raw(pid)? {
            if libc::WIFEXITED(raw) {
                return Ok(Ended::Exited(libc::WEXITSTATUS(raw)));
            }
            if libc::WIFSIGNALED(raw) {
                return Ok(Ended::Signaled(libc::WTERMSIG(raw)));
            }
        }
        // SAFETY: sigwaitinfo on a set of signals this thread blocks; a null info pointer.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            let _ = signal(pid, sig);
        }
    }
}
