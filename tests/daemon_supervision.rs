//! The daemon's process supervision (`daemon::launcher`, `daemon::supervisor`) with real VMMs
//! running tiny guests on this machine's KVM: launch, exits noticed at once with the right
//! status and crash verdict, start-up errors quoting the VMM, and re-adoption after a
//! (simulated) daemon restart.

mod common;

use ::daemon::launcher::{launch, LaunchError, LaunchSpec, Launched};
use ::daemon::process::{proc_start_time, proc_state};
use ::daemon::supervisor::{
    check_adoptable, restart_decision, AdoptError, ExitKind, ExitNotice, ExitStatusKind,
    RestartPolicy, Supervisor,
};
use common::firmware::Program;
use common::*;
use config::DiskConfig;
use config::VmConfig;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, SystemTime};

/// Generous: an exit is noticed at once, but the machine is shared.
const NOTICE_WAIT: Duration = Duration::from_secs(30);

/// A guest that prints and halts (idle: it costs no CPU).
fn idle() -> Program {
    Program::new().print("up\n")
}

fn spec(dir: &Path, program: Program) -> LaunchSpec {
    let fw = write_firmware(dir, "fw.bin", &program.build());
    let config = VmConfig {
        firmware: Some(fw),
        ..VmConfig::default()
    };
    LaunchSpec::new(ferrovisor_path(), dir.join("vm"), config)
}

fn status(l: &Launched) -> serde_json::Value {
    vmm::control::request(&l.paths.control, &serde_json::json!({"cmd": "status"})).unwrap()
}

fn next_notice(rx: &Receiver<ExitNotice>) -> ExitNotice {
    rx.recv_timeout(NOTICE_WAIT)
        .unwrap_or_else(|e| panic!("no exit notice within {NOTICE_WAIT:?}: {e}"))
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

/// Field 6 of /proc/PID/stat: the session id.
fn session_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let tail = &stat[stat.rfind(')').unwrap() + 1..];
    tail.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Kills a launched VMM when a test fails half-way (the VMM leads its own session, so nothing
/// else would), unless it already ended.
struct Cleanup(u32, u64);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if proc_start_time(self.0).ok() == Some(self.1) && proc_state(self.0).ok() != Some('Z') {
            // SAFETY: kill has no memory effects; the pid is still the VMM (start time checked).
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn guard(l: &Launched) -> Cleanup {
    Cleanup(l.pid, l.start_time)
}

/// Reaps a test-process child the supervisor watched as a non-child.
fn reap_zombie(pid: u32) {
    let mut st = 0;
    // SAFETY: `st` is a live c_int.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut st, 0) };
}

#[test]
fn kill_9_is_noticed_as_a_crash() {
    if !kvm_available("kill_9_is_noticed_as_a_crash") {
        return;
    }
    let dir = scratch("sup-kill");
    let l = launch(&spec(&dir, idle())).unwrap();
    let _cleanup = guard(&l);
    let v = status(&l);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pid"], l.pid, "{v}");
    assert_eq!(l.start_time, proc_start_time(l.pid).unwrap());
    assert_eq!(
        session_of(l.pid),
        l.pid,
        "the VMM leads a session of its own"
    );
    let mode = std::fs::metadata(&l.paths.dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let cfg: VmConfig = VmConfig::from_file(&l.paths.config).unwrap();
    assert!(cfg.firmware.is_some());
    assert!(l.paths.console.exists(), "serial console socket");

    let (sup, rx) = Supervisor::new().unwrap();
    sup.watch(
        "vm-kill".into(),
        l.pid,
        l.start_time,
        l.paths.exit_report.clone(),
        true,
    )
    .unwrap();
    assert_eq!(sup.watched(), 1);
    kill(l.pid, libc::SIGKILL);
    let n = next_notice(&rx);
    assert_eq!(n.vm_id, "vm-kill");
    assert_eq!(n.pid, l.pid);
    assert_eq!(n.status, ExitStatusKind::Signaled(9), "{n:?}");
    assert_eq!(n.report, None);
    assert!(n.crashed, "{n:?}");
    assert!(proc_start_time(l.pid).is_err(), "the VMM was reaped");
    assert_eq!(sup.watched(), 0);
    let d = restart_decision(RestartPolicy::OnFailure, &n, false, 0, SystemTime::now());
    assert_eq!(d, Some(Duration::from_secs(1)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_poweroff_is_a_clean_exit() {
    if !kvm_available("a_guest_poweroff_is_a_clean_exit") {
        return;
    }
    let dir = scratch("sup-poweroff");
    // Echoes the serial console until it reads `q`, then powers off.
    let l = launch(&spec(&dir, Program::new().echo_until_q().poweroff())).unwrap();
    let _cleanup = guard(&l);
    let (sup, rx) = Supervisor::new().unwrap();
    sup.watch(
        "vm-off".into(),
        l.pid,
        l.start_time,
        l.paths.exit_report.clone(),
        true,
    )
    .unwrap();
    let mut console = UnixStream::connect(&l.paths.console).unwrap();
    // Until the VMM sees the client connected, input may be dropped: send `q` a few times.
    let begun = std::time::Instant::now();
    let n = loop {
        assert!(begun.elapsed() < NOTICE_WAIT, "the guest did not power off");
        let _ = console.write_all(b"q");
        if let Ok(n) = rx.recv_timeout(Duration::from_millis(500)) {
            break n;
        }
    };
    assert_eq!(n.status, ExitStatusKind::Exited(0), "{n:?}");
    let report = n.report.as_ref().expect("an exit report");
    assert_eq!(report.reason, ExitKind::Poweroff);
    assert_eq!(report.pid, l.pid);
    assert!(!n.crashed, "{n:?}");
    let now = SystemTime::now();
    assert_eq!(
        restart_decision(RestartPolicy::OnFailure, &n, false, 0, now),
        None
    );
    assert_eq!(
        restart_decision(RestartPolicy::Always, &n, false, 0, now),
        Some(Duration::from_secs(1))
    );
    drop(sup);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_config_fails_the_launch_with_the_vmms_message() {
    if !kvm_available("a_bad_config_fails_the_launch_with_the_vmms_message") {
        return;
    }
    let dir = scratch("sup-bad");
    let mut s = spec(&dir, idle());
    let disk: DiskConfig = "path=/nonexistent/disk.img".parse().unwrap();
    s.config.disks.push(disk);
    let err = launch(&s).unwrap_err();
    assert!(matches!(err, LaunchError::Exited { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("disk /nonexistent/disk.img") && text.contains("no such file"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restarted_daemon_adopts_its_running_vmm() {
    if !kvm_available("a_restarted_daemon_adopts_its_running_vmm") {
        return;
    }
    let dir = scratch("sup-adopt");
    let l = launch(&spec(&dir, idle())).unwrap();
    let _cleanup = guard(&l);
    {
        let (sup, _rx) = Supervisor::new().unwrap();
        sup.watch(
            "vm-a".into(),
            l.pid,
            l.start_time,
            l.paths.exit_report.clone(),
            true,
        )
        .unwrap();
        // The daemon goes away.
    }
    assert_ne!(
        proc_state(l.pid).unwrap(),
        'Z',
        "the VMM outlives its supervisor"
    );
    assert_eq!(status(&l)["ok"], true);

    // A second launch on the same directory is refused while the VMM runs.
    let err = launch(&spec(&dir, idle())).unwrap_err();
    assert!(matches!(err, LaunchError::AlreadyRunning(_)), "{err:?}");

    let (sup, rx) = Supervisor::new().unwrap();
    let wrong = sup.adopt(
        "vm-a".into(),
        l.pid,
        l.start_time + 1,
        &l.paths.control,
        l.paths.exit_report.clone(),
    );
    assert!(
        matches!(wrong, Err(AdoptError::PidReused { .. })),
        "{wrong:?}"
    );
    let me = std::process::id();
    let not_vmm = check_adoptable(me, proc_start_time(me).unwrap(), &l.paths.control);
    assert!(
        matches!(not_vmm, Err(AdoptError::NotFerrovisor { .. })),
        "{not_vmm:?}"
    );
    let gone = check_adoptable(u32::MAX / 2, 1, &l.paths.control);
    assert!(matches!(gone, Err(AdoptError::NotRunning(_))), "{gone:?}");
    assert_eq!(sup.watched(), 0);

    sup.adopt(
        "vm-a".into(),
        l.pid,
        l.start_time,
        &l.paths.control,
        l.paths.exit_report.clone(),
    )
    .unwrap();
    assert_eq!(sup.watched(), 1);
    let mut ctl = ferrovisor();
    ctl.arg("ctl").arg(&l.paths.control).arg("stop");
    let out = run(ctl, Duration::from_secs(20));
    assert_eq!(out.code(), 0, "{out:?}");
    let n = next_notice(&rx);
    assert_eq!(n.vm_id, "vm-a");
    assert_eq!(n.status, ExitStatusKind::Unknown, "not our child: {n:?}");
    let report = n.report.as_ref().expect("an exit report");
    assert_eq!(report.reason, ExitKind::Stopped, "{n:?}");
    assert_eq!(report.exit_code, 0);
    assert!(!n.crashed, "{n:?}");
    reap_zombie(l.pid);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_adopted_vmm_killed_without_a_report_is_a_crash_unless_stopped_by_us() {
    if !kvm_available("an_adopted_vmm_killed_without_a_report_is_a_crash_unless_stopped_by_us") {
        return;
    }
    let dir = scratch("sup-adopt-kill");
    let (sup, rx) = Supervisor::new().unwrap();
    for (vm, expected) in [("vm-k", true), ("vm-s", false)] {
        let l = launch(&spec(&dir, idle())).unwrap();
        let _cleanup = guard(&l);
        sup.adopt(
            vm.into(),
            l.pid,
            l.start_time,
            &l.paths.control,
            l.paths.exit_report.clone(),
        )
        .unwrap();
        if !expected {
            // The daemon stops it (here: its stop timed out and it sends SIGKILL).
            sup.expect_exit(vm);
        }
        kill(l.pid, libc::SIGKILL);
        let n = next_notice(&rx);
        assert_eq!(n.vm_id, vm);
        assert_eq!(n.status, ExitStatusKind::Unknown);
        assert_eq!(n.report, None);
        assert_eq!(n.stop_requested, !expected);
        assert_eq!(n.crashed, expected, "{n:?}");
        reap_zombie(l.pid);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
