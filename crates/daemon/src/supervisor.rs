//! Watching VMM processes. A [`Supervisor`] learns of every VMM's exit at once, whether the VMM
//! is its own child (started by [`crate::launcher::launch`]) or one a restarted daemon
//! re-adopted ([`Supervisor::adopt`]), and sends an [`ExitNotice`] on its channel. The daemon
//! records it and asks [`restart_decision`] what to do next.
//!
//! One thread waits with epoll on a pidfd per process (a pidfd turns readable when the process
//! exits, for any process, child or not) and on an eventfd that tells it to quit. Own children
//! are reaped for their exit status; for adopted ones the kernel does not give the status to a
//! non-parent, so the VMM's exit report (`exit.json`) says how it ended.
//!
//! Dropping the supervisor stops watching; it never stops a VMM.

use crate::process::{self, proc_start_time, proc_state, PidFd};
use crate::sync::lock;
use api::control::{VmCommand, VmResponse};
pub use config::exit_report::{ExitKind, ExitReport};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// How a VMM process ended, as far as the kernel told us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatusKind {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// Not known: it was not our child (see the notice's report).
    Unknown,
}

impl From<std::process::ExitStatus> for ExitStatusKind {
    fn from(status: std::process::ExitStatus) -> ExitStatusKind {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => ExitStatusKind::Exited(c),
            (None, Some(s)) => ExitStatusKind::Signaled(s),
            _ => ExitStatusKind::Unknown,
        }
    }
}

/// A watched VMM process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitNotice {
    /// The VM.
    pub vm_id: String,
    /// The process.
    pub pid: u32,
    /// Its exit status (own children only).
    pub status: ExitStatusKind,
    /// Its exit report, when it wrote one.
    pub report: Option<ExitReport>,
    /// Whether the daemon had asked it to stop ([`Supervisor::expect_exit`]).
    pub stop_requested: bool,
    /// Whether the VM failed rather than ended as asked. See [`is_crash`].
    pub crashed: bool,
}

/// Whether an exit is a crash:
/// - the guest panicked or faulted (exit code 3 or 4, or report reason `panic`/`fault`): always;
/// - otherwise, when the daemon had asked the VMM to stop (`stop_requested`): never (a stop that
///   ends in SIGKILL after a timeout included);
/// - killed by a signal: yes; exited with another non-zero code (set-up or run-time error): yes;
///   exited 0 (poweroff, reboot, `stop`, SIGTERM/SIGINT/SIGHUP): no;
/// - status unknown (adopted process): its report decides (non-zero code: crash); no report means
///   it did not end on its own terms (SIGKILL, OOM killer, a VMM panic): a crash.
pub fn is_crash(status: ExitStatusKind, report: Option<&ExitReport>, stop_requested: bool) -> bool {
    let guest_failed = matches!(
        status,
        ExitStatusKind::Exited(3) | ExitStatusKind::Exited(4)
    ) || report
        .is_some_and(|r| matches!(r.reason, ExitKind::Panic | ExitKind::Fault));
    if guest_failed {
        return true;
    }
    if stop_requested {
        return false;
    }
    match status {
        ExitStatusKind::Signaled(_) => true,
        ExitStatusKind::Exited(code) => code != 0,
        ExitStatusKind::Unknown => report.is_none_or(|r| r.exit_code != 0),
    }
}

/// Why a process could not be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// `pidfd_open` or epoll failed.
    #[error("watching VM {vm_id} (pid {pid}): {source}")]
    Os {
        /// The VM.
        vm_id: String,
        /// The process.
        pid: u32,
        /// Why.
        source: std::io::Error,
    },
    /// The pid now belongs to another process (its start time differs).
    #[error("watching VM {vm_id}: pid {pid} started at {found}, not {expected}: another process reuses the pid")]
    NotSameProcess {
        /// The VM.
        vm_id: String,
        /// The process.
        pid: u32,
        /// The start time we were given.
        expected: u64,
        /// The start time in /proc.
        found: u64,
    },
    /// The supervisor's thread is gone.
    #[error("the supervisor has stopped")]
    Stopped,
}

/// Why a running VMM cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// No such process (or only its zombie).
    #[error("pid {0} is not running")]
    NotRunning(u32),
    /// The pid belongs to a later process.
    #[error("pid {pid} started at {found}, not {expected}: the VMM is gone and its pid reused")]
    PidReused {
        /// The process.
        pid: u32,
        /// The recorded start time.
        expected: u64,
        /// The start time in /proc.
        found: u64,
    },
    /// The process is not a `ferrovisor` VMM.
    #[error("pid {pid} is not a ferrovisor VMM (it runs {what})")]
    NotFerrovisor {
        /// The process.
        pid: u32,
        /// What it runs instead.
        what: String,
    },
    /// The control socket does not answer, or answers for another process.
    #[error("control socket {path} of pid {pid}: {why}")]
    Control {
        /// The process.
        pid: u32,
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// It could not be watched.
    #[error(transparent)]
    Watch(#[from] WatchError),
}

struct Watch {
    vm_id: String,
    pid: u32,
    exit_report: PathBuf,
    own_child: bool,
    pidfd: PidFd,
}

struct Shared {
    epoll: Epoll,
    wake: EventFd,
    watches: Mutex<HashMap<u64, Watch>>,
    stopping: Mutex<HashSet<String>>,
    next: AtomicU64,
    notices: Sender<ExitNotice>,
}

/// Watches VMM processes and reports their exits on a channel.
pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The eventfd's token in the epoll set; watches use 1, 2, ...
const WAKE_TOKEN: u64 = 0;

/// Puts `what` (the call that failed) in front of an error's message.
fn context(what: &'static str) -> impl Fn(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn epoll_add(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(context("epoll_ctl"))
}

impl Supervisor {
    /// Starts the watcher thread; exits arrive on the receiver.
    pub fn new() -> std::io::Result<(Supervisor, Receiver<ExitNotice>)> {
        let epoll = Epoll::new().map_err(context("epoll_create1"))?;
        let wake =
            EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map_err(context("eventfd"))?;
        epoll_add(&epoll, wake.as_raw_fd(), WAKE_TOKEN)?;
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            epoll,
            wake,
            watches: Mutex::new(HashMap::new()),
            stopping: Mutex::new(HashSet::new()),
            next: AtomicU64::new(WAKE_TOKEN + 1),
            notices: tx,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fv-supervisor".into())
            .spawn(move || run(&s))?;
        Ok((
            Supervisor {
                shared,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Watches process `pid` of VM `vm_id`, started at `start_time` (`/proc/PID/stat` field 22).
    /// `exit_report` is where it writes its exit report; `own_child` says whether this process
    /// is its parent (then it is reaped and its exit status known).
    ///
    /// A process that already exited is reported at once.
    pub fn watch(
        &self,
        vm_id: String,
        pid: u32,
        start_time: u64,
        exit_report: PathBuf,
        own_child: bool,
    ) -> Result<(), WatchError> {
        let os = |vm_id: &str, source| WatchError::Os {
            vm_id: vm_id.to_string(),
            pid,
            source,
        };
        let pidfd = match PidFd::open(pid) {
            Ok(fd) => Some(fd),
            // Gone and reaped (by someone else): report it now.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => None,
            Err(e) => return Err(os(&vm_id, e)),
        };
        // The pidfd names whatever process had the pid when it was opened: make sure that is
        // ours. (A zombie still has its /proc entry; an unreadable one means it is gone.)
        if let Ok(found) = proc_start_time(pid) {
            if found != start_time {
                return Err(WatchError::NotSameProcess {
                    vm_id,
                    pid,
                    expected: start_time,
                    found,
                });
            }
        }
        let Some(pidfd) = pidfd else {
            let notice = self.shared.notice(&vm_id, pid, &exit_report, false);
            return self
                .shared
                .notices
                .send(notice)
                .map_err(|_| WatchError::Stopped);
        };
        let watch = Watch {
            vm_id,
            pid,
            exit_report,
            own_child,
            pidfd,
        };
        let token = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let fd = watch.pidfd.as_raw_fd();
        lock(&self.shared.watches).insert(token, watch);
        if let Err(e) = epoll_add(&self.shared.epoll, fd, token) {
            let vm_id = lock(&self.shared.watches)
                .remove(&token)
                .map(|w| w.vm_id)
                .unwrap_or_default();
            return Err(os(&vm_id, e));
        }
        Ok(())
    }

    /// Re-adopts a running VMM (after a daemon restart): checks with [`check_adoptable`] that
    /// `pid` is still the VMM that was recorded, then watches it as a non-child.
    pub fn adopt(
        &self,
        vm_id: String,
        pid: u32,
        start_time: u64,
        control_socket: &Path,
        exit_report: PathBuf,
    ) -> Result<(), AdoptError> {
        check_adoptable(pid, start_time, control_socket)?;
        self.watch(vm_id, pid, start_time, exit_report, false)?;
        Ok(())
    }

    /// Notes that the daemon asked VM `vm_id` to stop: its next exit is not a crash (unless the
    /// guest panicked or faulted first). Call it before sending `stop`.
    pub fn expect_exit(&self, vm_id: &str) {
        lock(&self.shared.stopping).insert(vm_id.to_string());
    }

    /// Takes back [`Supervisor::expect_exit`] (the stop request failed).
    pub fn cancel_expect_exit(&self, vm_id: &str) {
        lock(&self.shared.stopping).remove(vm_id);
    }

    /// How many processes are watched.
    pub fn watched(&self) -> usize {
        lock(&self.shared.watches).len()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Fails only when the counter is full: the thread has been told already.
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// Builds the notice for a process that ended.
    fn notice(&self, vm_id: &str, pid: u32, exit_report: &Path, own_child: bool) -> ExitNotice {
        let status = if own_child {
            reap(pid)
        } else {
            ExitStatusKind::Unknown
        };
        let report = match ExitReport::read(exit_report) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("VM {vm_id}: exit report {}: {e}", exit_report.display());
                None
            }
        };
        let stop_requested = lock(&self.stopping).remove(vm_id);
        let crashed = is_crash(status, report.as_ref(), stop_requested);
        ExitNotice {
            vm_id: vm_id.to_string(),
            pid,
            status,
            report,
            stop_requested,
            crashed,
        }
    }
}

/// Reaps own child `pid`, which has exited (its pidfd is readable).
fn reap(pid: u32) -> ExitStatusKind {
    for _ in 0..100 {
        match process::try_wait(pid) {
            Ok(Some(status)) => return ExitStatusKind::from(status),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // ECHILD: not our child after all, or reaped elsewhere.
            Err(_) => return ExitStatusKind::Unknown,
        }
        // The pidfd turns readable as the process exits; the zombie may lag a moment.
        std::thread::sleep(Duration::from_millis(10));
    }
    ExitStatusKind::Unknown
}

/// The watcher thread.
fn run(shared: &Shared) {
    let mut events = [EpollEvent::default(); 16];
    loop {
        let n = match shared.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                tracing::error!("supervisor epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == WAKE_TOKEN {
                return;
            }
            let Some(w) = lock(&shared.watches).remove(&token) else {
                continue;
            };
            let _ = shared.epoll.ctl(
                ControlOperation::Delete,
                w.pidfd.as_raw_fd(),
                EpollEvent::default(),
            );
            let notice = shared.notice(&w.vm_id, w.pid, &w.exit_report, w.own_child);
            drop(w);
            // The receiver may be gone (the daemon is shutting down): nothing to do then.
            let _ = shared.notices.send(notice);
        }
    }
}

/// Checks that `pid` is the VMM recorded with `start_time` and `control_socket`: it runs (not a
/// zombie), its start time matches (the pid was not reused), it runs `ferrovisor`, and its
/// control socket answers `status` with its pid.
pub fn check_adoptable(pid: u32, start_time: u64, control_socket: &Path) -> Result<(), AdoptError> {
    let found = proc_start_time(pid).map_err(|_| AdoptError::NotRunning(pid))?;
    if found != start_time {
        return Err(AdoptError::PidReused {
            pid,
            expected: start_time,
            found,
        });
    }
    if proc_state(pid).map_err(|_| AdoptError::NotRunning(pid))? == 'Z' {
        return Err(AdoptError::NotRunning(pid));
    }
    let exe = process::exe(pid);
    let argv0 = process::argv0(pid);
    let is_ferrovisor = |name: &[u8]| {
        let base = name.rsplit(|b| *b == b'/').next().unwrap_or_default();
        base.starts_with(b"ferrovisor")
    };
    let exe_ok = exe
        .as_ref()
        .is_some_and(|e| is_ferrovisor(e.as_os_str().as_encoded_bytes()));
    if !exe_ok && !is_ferrovisor(&argv0) {
        let what = exe
            .map(|e| e.display().to_string())
            .unwrap_or_else(|| String::from_utf8_lossy(&argv0).into_owned());
        return Err(AdoptError::NotFerrovisor { pid, what });
    }
    let control = |why: String| AdoptError::Control {
        pid,
        path: control_socket.to_path_buf(),
        why,
    };
    let status = match api::control::send(
        control_socket,
        &VmCommand::Status,
        api::control::DEFAULT_TIMEOUT,
    ) {
        Ok(Ok(VmResponse::Status(s))) => s,
        Ok(Ok(other)) => return Err(control(format!("status answered {other:?}"))),
        Ok(Err(refused)) => return Err(control(format!("status refused: {refused}"))),
        Err(e) => return Err(control(e.to_string())),
    };
    // Without a pid namespace the VMM reports the same pid we see.
    if status.pid != pid {
        return Err(control(format!("it belongs to pid {}", status.pid)));
    }
    Ok(())
}

pub use api::RestartPolicy;

/// The first back-off delay.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// The longest back-off delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A VM that stayed up this long restarts with the first delay again.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(300);

/// Whether and when to restart a VM whose VMM ended (`notice`): `None` to leave it down, or
/// the delay before starting it again.
///
/// - `user_stopped` (the user asked for the stop) or `notice.stop_requested`: never.
/// - A guest reboot (report reason `reset`): at once, under every policy.
/// - `Never`: never. `OnFailure`: only when `notice.crashed`. `Always`: any exit.
/// - Delay: 1 s, 2 s, 4 s ... doubling with `restart_count` (restarts since the VM last ran
///   [`BACKOFF_RESET_AFTER`]), capped at 60 s; 1 s again when the VM ran that long since
///   `last_start`. The caller counts restarts and resets its count in that case.
pub fn restart_decision(
    policy: RestartPolicy,
    notice: &ExitNotice,
    user_stopped: bool,
    restart_count: u32,
    last_start: SystemTime,
) -> Option<Duration> {
    let up_for = SystemTime::now()
        .duration_since(last_start)
        .unwrap_or_default();
    restart_delay(policy, notice, user_stopped, restart_count, up_for)
}

/// [`restart_decision`] with the VM's uptime given instead of its start time.
pub fn restart_delay(
    policy: RestartPolicy,
    notice: &ExitNotice,
    user_stopped: bool,
    restart_count: u32,
    up_for: Duration,
) -> Option<Duration> {
    if user_stopped || notice.stop_requested {
        return None;
    }
    // A guest reboot is not an end: the VM comes back whatever its policy (a machine that
    // stays off after `reboot` would surprise everyone).
    let rebooted = !notice.crashed
        && notice
            .report
            .as_ref()
            .is_some_and(|r| r.reason == ExitKind::Reset);
    if rebooted {
        return Some(Duration::ZERO);
    }
    if policy == RestartPolicy::Never {
        return None;
    }
    if policy == RestartPolicy::OnFailure && !notice.crashed {
        return None;
    }
    let count = if up_for >= BACKOFF_RESET_AFTER {
        0
    } else {
        restart_count
    };
    let delay = BACKOFF_START
        .checked_mul(1u32.checked_shl(count).unwrap_or(u32::MAX))
        .unwrap_or(BACKOFF_MAX);
    Some(delay.min(BACKOFF_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(reason: ExitKind, exit_code: i32) -> ExitReport {
        ExitReport {
            reason,
            exit_code,
            at_ms: 0,
            pid: 1,
            signal: None,
            message: None,
        }
    }

    fn notice(status: ExitStatusKind, report: Option<ExitReport>, stop: bool) -> ExitNotice {
        let crashed = is_crash(status, report.as_ref(), stop);
        ExitNotice {
            vm_id: "vm".into(),
            pid: 1,
            status,
            report,
            stop_requested: stop,
            crashed,
        }
    }

    #[test]
    fn crash_rules() {
        use ExitStatusKind::*;
        assert!(is_crash(Signaled(9), None, false));
        assert!(!is_crash(Signaled(9), None, true));
        assert!(is_crash(Exited(3), None, true));
        assert!(is_crash(Exited(4), None, false));
        assert!(is_crash(Exited(1), None, false));
        assert!(!is_crash(
            Exited(0),
            Some(&report(ExitKind::Poweroff, 0)),
            false
        ));
        assert!(is_crash(Unknown, None, false));
        assert!(!is_crash(Unknown, None, true));
        assert!(!is_crash(
            Unknown,
            Some(&report(ExitKind::Stopped, 0)),
            false
        ));
        assert!(is_crash(Unknown, Some(&report(ExitKind::Panic, 3)), true));
        assert!(is_crash(Unknown, Some(&report(ExitKind::Error, 1)), false));
    }

    #[test]
    fn restart_rules_and_backoff() {
        use ExitStatusKind::*;
        let crash = notice(Signaled(9), None, false);
        let clean = notice(Exited(0), Some(report(ExitKind::Poweroff, 0)), false);
        let reboot = notice(Exited(0), Some(report(ExitKind::Reset, 0)), false);
        let stopped = notice(Exited(0), Some(report(ExitKind::Stopped, 0)), true);
        let short = Duration::from_secs(10);
        let d = |p, n: &ExitNotice, count| restart_delay(p, n, false, count, short);
        assert_eq!(d(RestartPolicy::Never, &crash, 0), None);
        assert_eq!(d(RestartPolicy::OnFailure, &clean, 0), None);
        assert_eq!(d(RestartPolicy::Always, &clean, 0), Some(BACKOFF_START));
        assert_eq!(
            d(RestartPolicy::OnFailure, &reboot, 5),
            Some(Duration::ZERO)
        );
        assert_eq!(d(RestartPolicy::Never, &reboot, 0), Some(Duration::ZERO));
        assert_eq!(d(RestartPolicy::Always, &stopped, 0), None);
        assert_eq!(
            restart_delay(RestartPolicy::Always, &crash, true, 0, short),
            None
        );
        let secs: Vec<u64> = (0..9)
            .map(|c| d(RestartPolicy::OnFailure, &crash, c).unwrap().as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(d(RestartPolicy::OnFailure, &crash, 40), Some(BACKOFF_MAX));
        assert_eq!(
            restart_delay(
                RestartPolicy::OnFailure,
                &crash,
                false,
                7,
                BACKOFF_RESET_AFTER
            ),
            Some(BACKOFF_START)
        );
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(
            restart_decision(RestartPolicy::Always, &crash, false, 7, long_ago),
            Some(BACKOFF_START)
        );
    }

    // The supervisor reaps it.
    #[allow(clippy::zombie_processes)]
    fn spawn(script: &str) -> (u32, u64) {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .spawn()
            .unwrap();
        let pid = child.id();
        (pid, proc_start_time(pid).unwrap())
    }

    #[test]
    fn own_children_exit_codes_signals_and_identity() {
        let (sup, rx) = Supervisor::new().unwrap();
        let none = PathBuf::from("/nonexistent/exit.json");
        let wait = Duration::from_secs(30);

        let (pid, start) = spawn("exec sleep 30");
        let err = sup
            .watch("a".into(), pid, start + 1, none.clone(), true)
            .unwrap_err();
        assert!(matches!(err, WatchError::NotSameProcess { .. }), "{err:?}");
        sup.watch("a".into(), pid, start, none.clone(), true)
            .unwrap();
        process::kill(pid, libc::SIGKILL).unwrap();
        let n = rx.recv_timeout(wait).unwrap();
        assert_eq!((n.vm_id.as_str(), n.pid), ("a", pid));
        assert_eq!(n.status, ExitStatusKind::Signaled(libc::SIGKILL));
        assert!(n.crashed);

        for (code, crashed) in [(0, false), (1, true), (3, true)] {
            let (pid, start) = spawn(&format!("sleep 0.2; exit {code}"));
            sup.watch("b".into(), pid, start, none.clone(), true)
                .unwrap();
            let n = rx.recv_timeout(wait).unwrap();
            assert_eq!(n.status, ExitStatusKind::Exited(code));
            assert_eq!(n.crashed, crashed, "exit {code}");
        }

        // Already exited and reaped: reported at once, status unknown, no report: a crash.
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        let start = proc_start_time(pid).unwrap();
        child.wait().unwrap();
        sup.watch("c".into(), pid, start, none, true).unwrap();
        let n = rx.recv_timeout(wait).unwrap();
        assert_eq!(n.status, ExitStatusKind::Unknown);
        assert!(n.crashed);
        assert_eq!(sup.watched(), 0);
    }

    #[test]
    fn the_supervisor_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Supervisor>();
        let (sup, rx) = Supervisor::new().unwrap();
        assert_eq!(sup.watched(), 0);
        drop(sup);
        // The thread ended and dropped its sender.
        assert!(rx.recv().is_err());
    }

    #[test]
    fn policy_names() {
        for (p, name) in [
            (RestartPolicy::Never, "\"never\""),
            (RestartPolicy::OnFailure, "\"on-failure\""),
            (RestartPolicy::Always, "\"always\""),
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), name);
            assert_eq!(serde_json::from_str::<RestartPolicy>(name).unwrap(), p);
        }
    }
}
