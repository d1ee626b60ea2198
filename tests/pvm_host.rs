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
