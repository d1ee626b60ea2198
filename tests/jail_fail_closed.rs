//! Fail closed: with user namespaces disabled on the host (`sysctl user.max_user_namespaces=0`,
//! restored afterwards) a VM does not start, and the error names the `namespaces` wall; an
//! explicit `--allow-unconfined` runs it without. Its own test binary: the sysctl is host-wide
//! and must not race other tests' VMMs.

mod common;

use common::daemon::Daemon;
use common::firmware::Program;
use common::*;
use serde_json::json;

const SYSCTL: &str = "/proc/sys/user/max_user_namespaces";

/// Puts the sysctl back as it was, even when the test fails.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

#[test]
fn without_user_namespaces_a_vm_does_not_start_and_the_wall_is_named() {
    if !kvm_available("without_user_namespaces_a_vm_does_not_start_and_the_wall_is_named") {
        return;
    }
    let Ok(before) = std::fs::read_to_string(SYSCTL) else {
        eprintln!("SKIPPED without_user_namespaces...: no {SYSCTL}");
        return;
    };
    let dir = scratch("jail-closed");
    let fw = write_firmware(&dir, "idle.bin", &Program::new().print("up\n").build());
    let body =
        |name: &str| json!({"name": name, "config": {"firmware": fw, "memory": "32M"}}).to_string();
    let d = Daemon::start(&dir);
    d.post_ok("/v1/vms", &body("closed"), 201);
    {
        let _restore = Restore(before.trim().to_string());
        if let Err(e) = std::fs::write(SYSCTL, "0") {
            drop(d);
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!(
                "SKIPPED without_user_namespaces_a_vm_does_not_start_and_the_wall_is_named: \
                 cannot set user.max_user_namespaces on this host ({e})"
            );
            return;
        }
        let r = d.post("/v1/vms/closed/start", "");
        assert!(r.status >= 400, "{} {}", r.status, r.text());
        assert!(r.text().contains("namespaces wall"), "{}", r.text());
        let v = d.vm("closed");
        assert_ne!(v["state"], "running", "{v}");
        // The host report says why.
        let host = d.get("/v1/host").json();
        let ns = &host["walls"][0];
        assert_eq!(ns["name"], "namespaces");
        assert_eq!(ns["available"], false, "{ns}");
        assert!(
            ns["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("max_user_namespaces"),
            "{ns}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(SYSCTL).unwrap().trim(),
        before.trim()
    );
    // With the namespaces back, the same VM starts.
    let v = d.post_ok("/v1/vms/closed/start", "", 200);
    assert_eq!(v["state"], "running", "{v}");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
