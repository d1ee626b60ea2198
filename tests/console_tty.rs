//! The serial console on a terminal: raw mode while the guest runs, keys reach the guest,
//! Ctrl-C and `Ctrl-A x` stop the VM cleanly, and the terminal's settings are restored on every
//! exit path (stop, guest power-off, guest panic).

mod common;

use common::firmware::Program;
use common::pty::{openpty, Pty};
use common::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and struct.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

/// Reads from the pty master until `needle` shows up.
fn read_until(master: &mut File, needle: &str) -> String {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while start.elapsed() < Duration::from_secs(20) {
        let n = master.read(&mut buf).unwrap_or(0);
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(needle) {
            return String::from_utf8_lossy(&seen).into_owned();
        }
    }
    panic!(
        "never saw {needle:?}; got {:?}",
        String::from_utf8_lossy(&seen)
    );
}

fn start_on_pty(name: &str, program: Program) -> (Pty, std::process::Child, libc::tcflag_t) {
    let dir = scratch(name);
    let fw = write_firmware(&dir, "fw.bin", &program.build());
    let pty = openpty();
    let before = lflag(&pty.slave);
    assert_ne!(before & libc::ICANON, 0, "a fresh pty is in canonical mode");
    let child = ferrovisor()
        .args([
            "--log-level",
            "info",
            "run",
            "--memory",
            "16M",
            "--serial",
            "stdio",
            "--firmware",
        ])
        .arg(&fw)
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (pty, child, before)
}

fn raw_then_restored(
    name: &str,
    program: Program,
    ready: &str,
    keys: &[u8],
    code: i32,
    expect: &str,
) {
    if !kvm_available(name) {
        return;
    }
    let (mut pty, child, before) = start_on_pty(name, program);
    read_until(&mut pty.master, ready);
    assert_eq!(
        lflag(&pty.slave) & (libc::ICANON | libc::ECHO),
        0,
        "raw while the guest runs"
    );
    pty.master.write_all(keys).unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(20));
    assert_eq!(out.code(), code, "{out:?}");
    assert!(out.stderr.contains(expect), "{}", out.stderr);
    assert_eq!(lflag(&pty.slave), before, "terminal settings restored");
}

#[test]
fn ctrl_c_on_the_terminal_stops_the_vm_and_restores_the_terminal() {
    raw_then_restored(
        "ctrl_c_on_the_terminal_stops_the_vm_and_restores_the_terminal",
        Program::new().print("ready\n").spin(),
        "ready",
        &[0x03],
        0,
        "stopped from the console",
    );
}

#[test]
fn ctrl_a_x_stops_the_vm() {
    raw_then_restored(
        "ctrl_a_x_stops_the_vm",
        Program::new().print("ready\n").spin(),
        "ready",
        &[0x01, b'x'],
        0,
        "stopped from the console",
    );
}

#[test]
fn keys_reach_the_guest_and_ctrl_a_c_sends_ctrl_c() {
    // The guest echoes until 'q', then panics: the panic path must restore the terminal too.
    raw_then_restored(
        "keys_reach_the_guest_and_ctrl_a_c_sends_ctrl_c",
        Program::new().print("ready\n").echo_until_q().panic(),
        "ready",
        &[b'a', 0x01, b'c', 0x01, 0x01, b'q'],
        3,
        "panicked",
    );
}

#[test]
fn echoed_keys_arrive_in_order() {
    let name = "echoed_keys_arrive_in_order";
    if !kvm_available(name) {
        return;
    }
    let (mut pty, child, before) = start_on_pty(
        name,
        Program::new().print("ready\n").echo_until_q().poweroff(),
    );
    read_until(&mut pty.master, "ready");
    pty.master
        .write_all(&[b'a', 0x01, b'c', 0x01, 0x01, b'z'])
        .unwrap();
    // Output processing (OPOST) is kept, so the bytes come back as the guest sent them.
    let seen = read_until(&mut pty.master, "z");
    assert!(seen.ends_with("a\u{3}\u{1}z"), "{seen:?}");
    pty.master.write_all(b"q").unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(20));
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(lflag(&pty.slave), before);
}
