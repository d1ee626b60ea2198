//! On a PVM host (`kvm_pvm`), a stock kernel cannot run: Ferrovisor says so plainly, with the
//! vCPU state, and exits non-zero instead of spinning forever.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

#[test]
fn stock_kernel_on_pvm_is_reported_plainly() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("SKIPPED stock_kernel_on_pvm_is_reported_plainly: this host's KVM is not PVM");
        return;
    }
    if !kvm_available("stock_kernel_on_pvm_is_reported_plainly") {
        return;
    }
    let Some(assets) = guest_assets("stock_kernel_on_pvm_is_reported_plainly") else {
        return;
    };
    let mut cmd = ferrovisor();
    cmd.args([
        "run", "--cpus", "2", "--memory", "512M", "--serial", "null", "--kernel",
    ])
    .arg(assets.join("vmlinuz"))
    .arg("--initrd")
    .arg(assets.join("initramfs.cpio.gz"));
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.code(), 4, "{out:?}");
    assert!(out.stderr.contains("PVM"), "{}", out.stderr);
    assert!(out.stderr.contains("PVM-aware"), "{}", out.stderr);
    assert!(out.stderr.contains("rip="), "{}", out.stderr);
}

/// The same under a supervisor: control commands (the daemon's readiness `status`, `stats` for
/// metrics) answered by the VM loop do not disarm the no-progress watchdog.
#[test]
fn stock_kernel_on_pvm_is_reported_while_a_supervisor_polls() {
    let test = "stock_kernel_on_pvm_is_reported_while_a_supervisor_polls";
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("SKIPPED {test}: this host's KVM is not PVM");
        return;
    }
    if !kvm_available(test) {
        return;
    }
    let Some(assets) = guest_assets(test) else {
        return;
    };
    let dir = scratch("pvm-poll");
    let control = dir.join("control.sock");
    let mut cmd = ferrovisor();
    cmd.args(["run", "--memory", "256M", "--serial", "null", "--control"])
        .arg(&control)
        .arg("--kernel")
        .arg(assets.join("vmlinuz"))
        .arg("--initrd")
        .arg(assets.join("initramfs.cpio.gz"));
    let poll = control.clone();
    let poller = std::thread::spawn(move || {
        let mut answered = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let cmd = if answered % 2 == 0 { "status" } else { "stats" };
            match vmm::control::request(&poll, &serde_json::json!({ "cmd": cmd })) {
                Ok(v) if v["ok"] == true => answered += 1,
                Ok(_) => {}
                Err(_) if answered > 0 => break,
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        answered
    });
    let out = run(cmd, Duration::from_secs(60));
    let answered = poller.join().expect("poller");
    assert_eq!(out.code(), 4, "{out:?}");
    assert!(out.stderr.contains("PVM-aware"), "{}", out.stderr);
    assert!(
        answered >= 5,
        "the control socket answered {answered} commands"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
