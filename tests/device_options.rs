//! Device options: bad `--disk`/`--net`/`--vsock`/`--balloon`/`--console` values are refused
//! before any guest runs with an error naming the value, and nothing is left behind; good ones
//! build a VM whose control socket reports its devices (tiny guests on this machine's KVM).

mod common;

use common::firmware::Program;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn firmware(dir: &Path, program: Program) -> String {
    write_firmware(dir, "fw.bin", &program.build())
        .display()
        .to_string()
}

fn fails_with(cmd: Command, expect: &[&str]) -> Output {
    let desc = format!("{cmd:?}");
    let out = run(cmd, T);
    assert_ne!(out.code(), 0, "{desc} should fail: {out:?}");
    for e in expect {
        assert!(
            out.stderr.contains(e),
            "{desc}: expected {e:?} in:\n{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    out
}

fn run_args(fw: &str, extra: &[&str]) -> Command {
    let mut cmd = ferrovisor();
    cmd.args(["run", "--serial", "null", "--firmware", fw])
        .args(extra);
    cmd
}

/// The same command as the unprivileged `nobody` (setpriv from util-linux).
fn as_nobody(cmd: &Command) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    c
}

/// Makes the test's own directories (`dir` and its parents below the temporary directory, all
/// made by the test) traversable by an unprivileged user. The temporary directory itself and
/// everything above it are left as they are: tests leave the host as they found it (`/tmp`
/// keeps its 1777).
fn world_readable(dir: &Path) {
    let tmp = std::env::temp_dir();
    let mut p = Some(dir);
    while let Some(d) = p {
        if !d.starts_with(&tmp) || d == tmp {
            break;
        }
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
        p = d.parent();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn malformed_device_strings_are_usage_errors_naming_the_value() {
    for (flag, value, says) in [
        ("--disk", "readonly=on", "path= is required"),
        ("--disk", "path=/x.img,colour=red", "unknown key \"colour\""),
        ("--disk", "path=/x.img,iops=fast", "iops=fast"),
        ("--disk", "path=/x.img,bw=-1", "bw=-1"),
        ("--disk", "path=/x.img,readonly=perhaps", "readonly=perhaps"),
        ("--net", "mac=52:54:00:00:00:01", "tap= is required"),
        ("--net", "tap=t0,mac=52:54:00", "not a MAC address"),
        ("--vsock", "cid=three,socket=/tmp/x", "cid=three"),
        ("--vsock", "cid=3", "socket= is required"),
        ("--balloon", "size=huge", "size=huge"),
    ] {
        let mut cmd = ferrovisor();
        cmd.args(["run", "--firmware", "/nonexistent", flag, value]);
        let out = fails_with(cmd, &[flag, says]);
        assert_eq!(out.code(), 2, "a malformed flag is a usage error: {out:?}");
    }
}

#[test]
fn missing_directory_and_duplicate_disks_are_refused() {
    let dir = scratch("disk-bad");
    let fw = firmware(&dir, Program::new().poweroff());
    fails_with(
        run_args(&fw, &["--disk", "path=/nonexistent/disk.img"]),
        &["disk /nonexistent/disk.img", "no such file"],
    );
    let d = dir.display().to_string();
    fails_with(
        run_args(&fw, &["--disk", &d]),
        &[&format!("disk {d}"), "not a regular file or block device"],
    );
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img = img.display().to_string();
    fails_with(
        run_args(
            &fw,
            &["--disk", &img, "--disk", &format!("path={img},readonly=on")],
        ),
        &[&img, "given twice"],
    );
    fails_with(
        run_args(
            &fw,
            &[
                "--disk",
                &format!("path={img},id=this-id-is-far-too-long-for-virtio"),
            ],
        ),
        &["at most 20 bytes"],
    );
}

#[test]
fn unreadable_and_unwritable_images_name_the_problem() {
    if !is_root() {
        eprintln!("SKIPPED unreadable_and_unwritable_images_name_the_problem: needs root to switch to nobody");
        return;
    }
    let dir = scratch("disk-perm");
    world_readable(&dir);
    let fw = firmware(&dir, Program::new().poweroff());
    std::fs::set_permissions(&fw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret = dir.join("secret.img");
    std::fs::write(&secret, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = secret.display().to_string();
    fails_with(
        as_nobody(&run_args(&fw, &["--disk", &s])),
        &[&format!("disk {s}"), "permission denied"],
    );
    // Readable but not writable: says readonly=on would do.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    fails_with(
        as_nobody(&run_args(&fw, &["--disk", &s])),
        &[&format!("disk {s}"), "readonly=on"],
    );
}

#[test]
fn a_tap_that_cannot_be_created_is_a_clear_error() {
    if !is_root() || !Path::new("/dev/net/tun").exists() {
        eprintln!(
            "SKIPPED a_tap_that_cannot_be_created_is_a_clear_error: needs root and /dev/net/tun"
        );
        return;
    }
    let dir = scratch("tap-perm");
    world_readable(&dir);
    let fw = firmware(&dir, Program::new().poweroff());
    std::fs::set_permissions(&fw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = fails_with(
        as_nobody(&run_args(&fw, &["--net", "tap=fvnoperm0"])),
        &["fvnoperm0"],
    );
    assert!(
        out.stderr.to_lowercase().contains("permission") || out.stderr.contains("CAP_NET_ADMIN"),
        "{}",
        out.stderr
    );
    assert!(!Path::new("/sys/class/net/fvnoperm0").exists());
    // Names the kernel would refuse never reach it.
    fails_with(
        run_args(&fw, &["--net", "tap=name-longer-than-15"]),
        &["tap=name-longer-than-15", "1 to 15 characters"],
    );
    fails_with(
        run_args(&fw, &["--net", "tap=a/b"]),
        &["tap=a/b", "cannot contain"],
    );
}

#[test]
fn vsock_and_console_sockets_refuse_existing_paths_and_keep_them() {
    let dir = scratch("vsock-exists");
    let fw = firmware(&dir, Program::new().poweroff());
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"not ours").unwrap();
    let t = taken.display().to_string();
    fails_with(
        run_args(&fw, &["--vsock", &format!("cid=3,socket={t}")]),
        &[&format!("vsock socket {t}"), "already exists"],
    );
    fails_with(
        run_args(&fw, &["--console", &format!("socket={t}")]),
        &[&t, "already exists"],
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"not ours");
    fails_with(
        run_args(
            &fw,
            &["--vsock", &format!("cid=2,socket={}/v.sock", dir.display())],
        ),
        &["cid=2", "at least 3"],
    );
    fails_with(
        run_args(&fw, &["--vsock", "cid=3,socket=/nonexistent-dir/v.sock"]),
        &["/nonexistent-dir", "does not exist"],
    );
    fails_with(
        run_args(&fw, &["--console", "stdio"]),
        &["--console", "stdio belongs to the serial console"],
    );
    fails_with(
        run_args(&fw, &["--memory", "64M", "--balloon", "size=64M"]),
        &["--balloon", "smaller than the guest's memory"],
    );
}

fn ctl(sock: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let mut cmd = ferrovisor();
    cmd.arg("ctl").arg(sock).args(args);
    let out = run(cmd, T);
    let v =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out:?}"));
    (out.code(), v)
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn control_socket_reports_devices_and_pauses_resumes_shuts_down_and_stops() {
    if !kvm_available("control_socket_reports_devices_and_pauses_resumes_shuts_down_and_stops") {
        return;
    }
    let dir = scratch("control");
    let fw = firmware(&dir, Program::new().print("up\n").spin());
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock: PathBuf = dir.join("ctl.sock");
    let vsock = dir.join("v.sock");
    let mut cmd = run_args(
        &fw,
        &[
            "--rng",
            "--disk",
            &format!("path={},id=data0", img.display()),
            "--vsock",
            &format!("cid=7,socket={}", vsock.display()),
            "--balloon",
            "--control",
            &sock.display().to_string(),
        ],
    );
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    assert!(vsock.exists(), "the vsock socket exists while the VM runs");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (code, v) = ctl(&sock, &["status"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["state"], "running");
    assert_eq!(v["pid"], child.id());

    let (_, v) = ctl(&sock, &["stats"]);
    let devices = v["devices"].as_array().unwrap();
    let kinds: Vec<&str> = devices
        .iter()
        .map(|d| d["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["block", "vsock", "rng", "balloon"], "{v}");
    assert_eq!(devices[0]["id"], "data0");
    assert!(
        devices[0]["counters"]
            .as_object()
            .unwrap()
            .contains_key("errors"),
        "{v}"
    );
    assert!(v["rss_bytes"].as_u64().unwrap() > 0);
    assert!(
        v["vcpus"][0]["exits"]["io_out"].as_u64().unwrap() >= 3,
        "{v}"
    );

    let (code, v) = ctl(&sock, &["pause"]);
    assert_eq!((code, v["state"].as_str()), (0, Some("paused")), "{v}");
    let (_, v) = ctl(&sock, &["status"]);
    assert_eq!(v["state"], "paused");
    let (code, v) = ctl(&sock, &["shutdown"]);
    assert_ne!(code, 0, "a paused guest cannot see the power button: {v}");
    assert!(v["error"].as_str().unwrap().contains("paused"), "{v}");
    let (code, v) = ctl(&sock, &["resume"]);
    assert_eq!((code, v["state"].as_str()), (0, Some("running")), "{v}");

    let (code, v) = ctl(&sock, &["balloon", "1G"]);
    assert_ne!(code, 0);
    assert!(v["error"].as_str().unwrap().contains("size"), "{v}");
    let (code, v) = ctl(&sock, &["balloon", "64M"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["target"], 64u64 << 20);

    // A malformed request gets an error, and the socket goes on answering.
    {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"cmd\":\"explode\"}\nnot json\n{\"cmd\":\"status\"}\n")
            .unwrap();
        let mut r = BufReader::new(s);
        for expect in ["unknown variant", "bad request", "\"ok\":true"] {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains(expect), "{expect}: {line}");
        }
    }

    // The power button: answered at once. This real-mode guest has no ACPI and ignores it,
    // so it keeps running (as a supervisor would see before its timeout) until `stop`.
    let t0 = Instant::now();
    let (code, v) = ctl(&sock, &["shutdown"]);
    assert_eq!(
        (code, v["state"].as_str()),
        (0, Some("shutting-down")),
        "{v}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "shutdown answers at once"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (code, v) = ctl(&sock, &["status"]);
    assert_eq!(
        (code, v["state"].as_str()),
        (0, Some("shutting-down")),
        "{v}"
    );

    let (code, v) = ctl(&sock, &["stop"]);
    assert_eq!(code, 0, "{v}");
    let out = wait_with_timeout(child, T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(!sock.exists(), "control socket removed at exit");
    assert!(!vsock.exists(), "vsock socket removed at exit");
}
