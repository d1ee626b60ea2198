//! Bad input: every error is reported before any guest runs, names the offending value, exits
//! non-zero and leaves nothing behind.

mod common;

use common::firmware::Program;
use common::*;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn fails_with(args: &[&str], expect: &[&str]) -> Output {
    let mut cmd = ferrovisor();
    cmd.args(args);
    let out = run(cmd, T);
    assert_ne!(out.code(), 0, "{args:?} should fail: {out:?}");
    assert_eq!(out.stdout, "", "nothing on stdout for {args:?}");
    for e in expect {
        assert!(
            out.stderr.contains(e),
            "{args:?}: expected {e:?} in:\n{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    out
}

fn firmware(name: &str) -> String {
    let dir = scratch(name);
    write_firmware(&dir, "fw.bin", &Program::new().poweroff().build())
        .display()
        .to_string()
}

fn kernel_stub(name: &str) -> String {
    // A file with a bzImage header (enough for validation, which runs before KVM).
    let dir = scratch(name);
    let mut v = vec![0u8; 0x400];
    v[0x1fe] = 0x55;
    v[0x1ff] = 0xaa;
    v[0x202..0x206].copy_from_slice(b"HdrS");
    let p = dir.join("bzImage");
    std::fs::write(&p, v).unwrap();
    p.display().to_string()
}

#[test]
fn missing_kvm_device_says_how_to_fix() {
    let fw = firmware("nokvm");
    fails_with(
        &["run", "--kvm", "/nonexistent/kvm", "--firmware", &fw],
        &[
            "/nonexistent/kvm does not exist",
            "modprobe kvm_intel",
            "kvm_amd",
        ],
    );
}

#[test]
fn kvm_path_that_is_not_a_device() {
    let fw = firmware("notdev");
    fails_with(
        &["run", "--kvm", "/etc/hostname", "--firmware", &fw],
        &["/etc/hostname is not a character device"],
    );
}

#[test]
fn unreadable_kvm_device_says_how_to_fix() {
    // Needs root to switch to an unprivileged user, and a /dev/kvm that user cannot open.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED unreadable_kvm_device_says_how_to_fix: needs root and /dev/kvm");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode();
    if mode & 0o006 != 0 {
        eprintln!("SKIPPED unreadable_kvm_device_says_how_to_fix: /dev/kvm is world-accessible");
        return;
    }
    // The binary and firmware must be reachable by the unprivileged user.
    let dir = std::env::temp_dir().join(format!("fv-it-perm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("ferrovisor");
    std::fs::copy(ferrovisor_path(), &bin).unwrap();
    let fw = write_firmware(&dir, "fw.bin", &Program::new().poweroff().build());
    std::fs::set_permissions(&fw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--firmware"])
        .arg(&fw);
    let out = run(cmd, T);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("/dev/kvm: permission denied"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("usermod -aG kvm"), "{}", out.stderr);
}

#[test]
fn missing_kernel_names_the_path() {
    fails_with(
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        &["kernel /nonexistent/vmlinuz: no such file"],
    );
}

#[test]
fn a_file_that_is_not_a_kernel() {
    let dir = scratch("notkernel");
    let p = dir.join("notes.txt");
    std::fs::write(&p, "just text, not a kernel").unwrap();
    fails_with(
        &["run", "--kernel", &p.display().to_string()],
        &[&format!("kernel {}: not a Linux kernel", p.display())],
    );
}

#[test]
fn a_directory_is_not_a_kernel() {
    fails_with(
        &["run", "--kernel", "/tmp"],
        &["kernel /tmp: not a regular file"],
    );
}

#[test]
fn missing_initrd_names_the_path() {
    let k = kernel_stub("noinitrd");
    fails_with(
        &["run", "--kernel", &k, "--initrd", "/nonexistent/initrd.img"],
        &["initrd /nonexistent/initrd.img: no such file"],
    );
}

#[test]
fn memory_larger_than_the_host() {
    let k = kernel_stub("bigmem");
    fails_with(
        &["run", "--kernel", &k, "--memory", "64T"],
        &["--memory 64T: more than this host's RAM"],
    );
}

#[test]
fn malformed_sizes() {
    let k = kernel_stub("badsize");
    for bad in ["12X", "lots", "1.5G", "-1G", ""] {
        let flag = format!("--memory={bad}");
        fails_with(
            &["run", "--kernel", &k, &flag],
            &["invalid size", &format!("{bad:?}")],
        );
    }
}

#[test]
fn zero_and_too_many_vcpus() {
    let k = kernel_stub("cpus");
    fails_with(&["run", "--kernel", &k, "--cpus", "0"], &["--cpus 0"]);
    fails_with(
        &["run", "--kernel", &k, "--cpus", "100000"],
        &["--cpus 100000", "more than"],
    );
    fails_with(
        &["run", "--kernel", &k, "--cpus", "two"],
        &["invalid value 'two'", "--cpus"],
    );
}

#[test]
fn bad_serial_spec() {
    let k = kernel_stub("serial");
    fails_with(
        &["run", "--kernel", &k, "--serial", "tty9"],
        &["invalid --serial \"tty9\""],
    );
}

#[test]
fn nothing_to_boot() {
    fails_with(&["run"], &["nothing to boot"]);
}

#[test]
fn config_file_errors_name_the_file_and_field() {
    let dir = scratch("badconfig");
    let p = dir.join("vm.json");
    std::fs::write(&p, r#"{"kernel": "/k", "vcpus": 2}"#).unwrap();
    fails_with(
        &["run", "--config", &p.display().to_string()],
        &[
            &format!("config file {}", p.display()),
            "unknown field `vcpus`",
        ],
    );
    std::fs::write(&p, r#"{"kernel": "/k", "cpus": "two"}"#).unwrap();
    fails_with(
        &["run", "--config", &p.display().to_string()],
        &["invalid type"],
    );
    fails_with(
        &["run", "--config", "/nonexistent/vm.json"],
        &["config file /nonexistent/vm.json"],
    );
}

#[test]
fn failed_start_leaves_no_socket_behind() {
    let dir = scratch("nosock");
    let sock = dir.join("console.sock");
    fails_with(
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinuz",
            "--serial",
            &format!("socket={}", sock.display()),
        ],
        &["no such file"],
    );
    assert!(!sock.exists());
}

#[test]
fn serial_socket_path_that_exists_is_refused() {
    let k = kernel_stub("socktaken");
    let dir = scratch("socktaken2");
    let sock = dir.join("taken");
    std::fs::write(&sock, "").unwrap();
    fails_with(
        &[
            "run",
            "--kernel",
            &k,
            "--serial",
            &format!("socket={}", sock.display()),
        ],
        &["already exists"],
    );
    assert!(sock.exists(), "the existing file is untouched");
}

#[test]
fn host_reports_the_kvm_flavour() {
    if !kvm_available("host_reports_the_kvm_flavour") {
        return;
    }
    let mut cmd = ferrovisor();
    cmd.args(["host", "--json"]);
    let out = run(cmd, T);
    assert_eq!(out.code(), 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let flavour = v["flavour"].as_str().unwrap();
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(flavour, "pvm");
        assert_eq!(v["runs_stock_kernels"], false);
        let mut cmd = ferrovisor();
        cmd.arg("host");
        let text = run(cmd, T);
        assert!(text.stdout.contains("PVM-aware"), "{}", text.stdout);
    } else {
        assert!(["hardware", "unknown"].contains(&flavour), "{flavour}");
    }
    assert!(v["max_vcpus"].as_u64().unwrap() >= 1);
    // Every wall, by its name, in the order of the docs and /v1/host.
    let names: Vec<&str> = v["walls"]
        .as_array()
        .expect("walls")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, WALL_NAMES);
}
