//! `ferrovisor run --exit-report PATH`: the VMM writes why it exited, whatever the way out —
//! guest poweroff, reboot, panic, fault, a stop signal, a set-up error (tiny guests on this
//! machine's KVM).

mod common;

use common::firmware::Program;
use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("exit report {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("exit report {text:?}: {e}"))
}

fn run_guest(
    dir: &Path,
    name: &str,
    program: Program,
    extra: &[&str],
) -> (Output, serde_json::Value) {
    let fw = write_firmware(dir, &format!("{name}.bin"), &program.build());
    let rep = dir.join(format!("{name}.json"));
    let mut cmd = ferrovisor();
    cmd.args(["run", "--serial", "null", "--firmware"])
        .arg(&fw)
        .arg("--exit-report")
        .arg(&rep)
        .args(extra);
    let out = run(cmd, T);
    (out, report(&rep))
}

#[test]
fn every_way_out_is_reported() {
    if !kvm_available("every_way_out_is_reported") {
        return;
    }
    let dir = scratch("exit-report");
    for (name, program, reason, code) in [
        ("poweroff", Program::new().poweroff(), "poweroff", 0),
        ("reset", Program::new().reset(), "reset", 0),
        ("panic", Program::new().panic(), "panic", 3),
        ("fault", Program::new().triple_fault(), "fault", 4),
    ] {
        let (out, r) = run_guest(&dir, name, program, &[]);
        assert_eq!(out.code(), code, "{name}: {out:?}");
        assert_eq!(r["reason"], reason, "{name}: {r}");
        assert_eq!(r["exit_code"], code, "{name}: {r}");
        assert!(r["at_ms"].as_u64().unwrap() > 1_600_000_000_000, "{r}");
        assert!(r["pid"].as_u64().is_some(), "{r}");
    }
    let (out, r) = run_guest(
        &dir,
        "setup",
        Program::new().poweroff(),
        &["--disk", "path=/nonexistent/disk.img"],
    );
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(r["reason"], "error", "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("disk /nonexistent/disk.img") && msg.contains("no such file"),
        "{r}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stop_signal_and_a_control_stop_are_reported() {
    if !kvm_available("a_stop_signal_and_a_control_stop_are_reported") {
        return;
    }
    let dir = scratch("exit-report-signal");
    let fw = write_firmware(&dir, "fw.bin", &Program::new().print("up\n").build());
    for how in ["signal", "stopped"] {
        let rep = dir.join(format!("{how}.json"));
        let sock = dir.join(format!("{how}.sock"));
        let mut cmd = ferrovisor();
        cmd.args(["run", "--serial", "null", "--firmware"])
            .arg(&fw)
            .arg("--control")
            .arg(&sock)
            .arg("--exit-report")
            .arg(&rep)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < T, "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        if how == "signal" {
            // SAFETY: kill has no memory effects; the pid is our live child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        } else {
            let mut ctl = ferrovisor();
            ctl.arg("ctl").arg(&sock).arg("stop");
            assert_eq!(run(ctl, T).code(), 0);
        }
        let out = wait_with_timeout(child, T);
        assert_eq!(out.code(), 0, "{how}: {out:?}");
        let r = report(&rep);
        assert_eq!(r["reason"], how, "{r}");
        assert_eq!(r["exit_code"], 0, "{r}");
        if how == "signal" {
            assert_eq!(r["signal"], libc::SIGTERM, "{r}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
