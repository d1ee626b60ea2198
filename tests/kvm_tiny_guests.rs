//! Tier 2: tiny real-mode guests on this machine's own `/dev/kvm` (any KVM, PVM included)
//! exercise the vCPU loop, the port-I/O bus, the legacy devices and the exit paths.

mod common;

use common::firmware::Program;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn run_fw(name: &str, image: Vec<u8>, extra: &[&str]) -> Output {
    let dir = scratch(name);
    let fw = write_firmware(&dir, "fw.bin", &image);
    let mut cmd = ferrovisor();
    cmd.args([
        "--log-level",
        "info",
        "run",
        "--memory",
        "16M",
        "--firmware",
    ])
    .arg(&fw)
    .args(extra);
    run(cmd, T)
}

#[test]
fn serial_output_arrives_and_poweroff_exits_zero() {
    if !kvm_available("serial_output_arrives_and_poweroff_exits_zero") {
        return;
    }
    let out = run_fw(
        "serial",
        Program::new()
            .print("hello from a tiny guest\n")
            .poweroff()
            .build(),
        &["--serial", "stdio"],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "hello from a tiny guest\n");
    assert!(out.stderr.contains("guest powered off"), "{}", out.stderr);
}

#[test]
fn unknown_ports_do_not_crash_and_exits_are_counted() {
    if !kvm_available("unknown_ports_do_not_crash_and_exits_are_counted") {
        return;
    }
    let out = run_fw(
        "unknown-port",
        Program::new()
            .out8(0x1234, 0x55)
            .in8(0x1234)
            .in8(0xcfc)
            .print("ok")
            .poweroff()
            .build(),
        &["--serial", "stdio"],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "ok");
    let c = exit_counts(&out.stderr);
    assert_eq!(c["unhandled_pio"], 3, "{c:?}");
    assert_eq!(c["io_in"], 2, "{c:?}");
    // 1 unknown out + 2 serial bytes + the power-off write.
    assert_eq!(c["io_out"], 4, "{c:?}");
    assert!(c["total"] >= 6, "{c:?}");
}

/// Runs `program` and checks the VMM reports a guest reboot with status 0.
fn assert_reboots(name: &str, program: Program) {
    if !kvm_available(name) {
        return;
    }
    let out = run_fw(name, program.build(), &["--serial", "null"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("guest rebooted"), "{}", out.stderr);
}

#[test]
fn i8042_reset_ends_with_zero() {
    assert_reboots("i8042_reset_ends_with_zero", Program::new().reset());
}

#[test]
fn acpi_reset_register_ends_with_zero() {
    assert_reboots(
        "acpi_reset_register_ends_with_zero",
        Program::new().out8(0x602, 1),
    );
}

#[test]
fn cf9_reset_control_ends_with_zero() {
    // Linux's sequence on a hardware-reduced ACPI machine: request a hard reset, then reset.
    assert_reboots(
        "cf9_reset_control_ends_with_zero",
        Program::new()
            .in8(0xcf9)
            .out8(0xcf9, 0x02)
            .out8(0xcf9, 0x0e),
    );
}

#[test]
fn pvpanic_ends_with_distinct_status() {
    if !kvm_available("pvpanic_ends_with_distinct_status") {
        return;
    }
    let out = run_fw(
        "panic",
        Program::new().panic().build(),
        &["--serial", "null"],
    );
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn triple_fault_is_reported_with_registers() {
    if !kvm_available("triple_fault_is_reported_with_registers") {
        return;
    }
    let out = run_fw(
        "triple",
        Program::new().triple_fault().build(),
        &["--serial", "null"],
    );
    assert_eq!(out.code(), 4, "{out:?}");
    // Hardware KVM reports the triple fault; PVM emulates real mode and gives up earlier with
    // an internal (emulation) error. Both are faults with registers and a hint.
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(out.stderr.contains("KVM internal error"), "{}", out.stderr);
        assert!(out.stderr.contains("PVM"), "{}", out.stderr);
    } else {
        assert!(out.stderr.contains("triple fault"), "{}", out.stderr);
    }
    assert!(out.stderr.contains("rip="), "{}", out.stderr);
    assert!(out.stderr.contains("hint:"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked at"), "{}", out.stderr);
}

fn stop_with_signal(sig: i32, name: &str) {
    let dir = scratch(name);
    let fw = write_firmware(
        &dir,
        "fw.bin",
        &Program::new().print("spinning\n").spin().build(),
    );
    let mut cmd = ferrovisor();
    cmd.args([
        "--log-level",
        "info",
        "run",
        "--cpus",
        "2",
        "--memory",
        "16M",
        "--serial",
        "stdio",
        "--firmware",
    ])
    .arg(&fw)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Wait for the guest to be running.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 9];
    stdout.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"spinning\n");
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    child.stdout = Some(stdout);
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains(&format!("stopped by signal {sig}")),
        "{}",
        out.stderr
    );
}

#[test]
fn sigterm_stops_a_busy_smp_guest_cleanly() {
    if !kvm_available("sigterm_stops_a_busy_smp_guest_cleanly") {
        return;
    }
    stop_with_signal(libc::SIGTERM, "sigterm");
}

#[test]
fn sigint_stops_a_busy_guest_cleanly() {
    if !kvm_available("sigint_stops_a_busy_guest_cleanly") {
        return;
    }
    stop_with_signal(libc::SIGINT, "sigint");
}

#[test]
fn waiting_application_processors_do_not_block_exit() {
    if !kvm_available("waiting_application_processors_do_not_block_exit") {
        return;
    }
    // APs sit in wait-for-SIPI inside KVM; power-off from the BSP must still end the VM.
    let out = run_fw(
        "smp",
        Program::new().print("bsp\n").poweroff().build(),
        &["--cpus", "4", "--serial", "stdio"],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "bsp\n");
}

#[test]
fn serial_file_backend_collects_output() {
    if !kvm_available("serial_file_backend_collects_output") {
        return;
    }
    let dir = scratch("serial-file");
    let log = dir.join("console.log");
    let out = run_fw(
        "serial-file",
        Program::new().print("to the file\n").poweroff().build(),
        &["--serial", &format!("file={}", log.display())],
    );
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to the file\n");
}

#[test]
fn serial_input_from_a_pipe_reaches_the_guest() {
    if !kvm_available("serial_input_from_a_pipe_reaches_the_guest") {
        return;
    }
    let dir = scratch("serial-in");
    let fw = write_firmware(
        &dir,
        "fw.bin",
        &Program::new().echo_until_q().poweroff().build(),
    );
    let mut cmd = ferrovisor();
    cmd.args(["run", "--memory", "16M", "--serial", "stdio", "--firmware"])
        .arg(&fw)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"echo me q").unwrap();
    let out = wait_with_timeout(child, T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "echo me q");
}

#[test]
fn serial_socket_backend_is_interactive_and_removed_at_exit() {
    if !kvm_available("serial_socket_backend_is_interactive_and_removed_at_exit") {
        return;
    }
    let dir = scratch("serial-sock");
    let sock = dir.join("console.sock");
    let fw = write_firmware(
        &dir,
        "fw.bin",
        &Program::new().echo_until_q().poweroff().build(),
    );
    let mut cmd = ferrovisor();
    cmd.args(["run", "--memory", "16M", "--firmware"])
        .arg(&fw)
        .arg("--serial")
        .arg(format!("socket={}", sock.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let mut stream = connect_console(&sock);
    stream.write_all(b"hi q").unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let out = wait_with_timeout(child, T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(String::from_utf8_lossy(&got), "hi q");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn serial_socket_client_that_stops_reading_is_hung_up_on_and_the_next_one_served() {
    let name = "serial_socket_client_that_stops_reading_is_hung_up_on_and_the_next_one_served";
    if !kvm_available(name) {
        return;
    }
    let dir = scratch("serial-sock-stall");
    let sock = dir.join("console.sock");
    let fw = write_firmware(
        &dir,
        "fw.bin",
        &Program::new().print_forever("0123456789abcdef\n").build(),
    );
    let mut cmd = ferrovisor();
    cmd.args(["run", "--memory", "16M", "--firmware"])
        .arg(&fw)
        .arg("--serial")
        .arg(format!("socket={}", sock.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // A client that reads nothing: its socket fills, and a second later the VMM hangs up on it
    // (the guest goes on). Reading it now drains what was buffered, then the end.
    let mut stalled = connect_console(&sock);
    std::thread::sleep(Duration::from_secs(4));
    let mut drained = Vec::new();
    let r = stalled.read_to_end(&mut drained);
    assert!(r.is_ok(), "no end for the stalled client: {r:?}");
    assert!(!drained.is_empty());
    // The next client is served: the backlog, then live output.
    let mut next = connect_console(&sock);
    read_at_least(&mut next, 1024 * 1024, Duration::from_secs(30));
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn config_file_drives_the_same_vm_and_flags_override_it() {
    if !kvm_available("config_file_drives_the_same_vm_and_flags_override_it") {
        return;
    }
    let dir = scratch("config");
    let fw = write_firmware(
        &dir,
        "fw.bin",
        &Program::new().print("from config\n").poweroff().build(),
    );
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"firmware": "{}", "cpus": 2, "memory": "32M", "serial": "null"}}"#,
            fw.display()
        ),
    )
    .unwrap();
    let mut cmd = ferrovisor();
    cmd.args(["run", "--config"]).arg(&cfg);
    let out = run(cmd, T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "", "serial null from the file");
    let mut cmd = ferrovisor();
    cmd.args(["run", "--serial", "stdio", "--config"]).arg(&cfg);
    let out = run(cmd, T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "from config\n", "flag overrides the file");
}

#[test]
fn large_lazily_backed_memory_is_cheap() {
    if !kvm_available("large_lazily_backed_memory_is_cheap") {
        return;
    }
    // 8 GiB of guest RAM (above the MMIO gap too) must not be allocated up front; the process
    // would not start on a small host otherwise. The guest touches almost none of it.
    let host_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap()))
        .unwrap();
    if host_kb < 9 << 20 {
        eprintln!("SKIPPED large_lazily_backed_memory_is_cheap: host has less than 9 GiB");
        return;
    }
    let dir = scratch("bigmem");
    let fw = write_firmware(
        &dir,
        "fw.bin",
        &Program::new().print("big\n").spin().build(),
    );
    let mut cmd = ferrovisor();
    cmd.args(["run", "--memory", "8G", "--serial", "stdio", "--firmware"])
        .arg(&fw)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 4];
    stdout.read_exact(&mut buf).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap()))
        .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.stdout = Some(stdout);
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        rss_kb < 256 * 1024,
        "VMM RSS {rss_kb} KiB for an idle 8 GiB guest"
    );
}
