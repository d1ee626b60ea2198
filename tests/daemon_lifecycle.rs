//! The host daemon end to end with tiny real-mode guests on this machine's KVM: a real
//! `ferrovisor daemon` process, its API on a temporary socket, one VMM process per VM.
//! Lifecycle (start, console, stats, pause, resume, shutdown, kill, reboot, delete), events,
//! supervision and restart policies, re-adoption across daemon restarts (SIGTERM and SIGKILL),
//! and `/metrics` (checked with `promtool check metrics` when it is installed; CI installs it).

mod common;

use common::daemon::{read_until, Daemon};
use common::firmware::Program;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

fn create_body(name: &str, fw: &Path, policy: &str, start: bool) -> String {
    json!({
        "name": name,
        "config": { "firmware": fw, "memory": "32M" },
        "restart_policy": policy,
        "start": start,
    })
    .to_string()
}

fn idle_fw(dir: &Path) -> std::path::PathBuf {
    write_firmware(dir, "idle.bin", &Program::new().print("up\n").build())
}

fn pid_of(v: &Value) -> u32 {
    v["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no pid: {v}"))
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks; no memory effects.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn kill9(pid: u32) {
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
}

#[test]
fn lifecycle_console_stats_pause_shutdown_kill_reboot_delete() {
    if !kvm_available("lifecycle") {
        return;
    }
    let dir = scratch("dlife");
    let d = Daemon::start(&dir);
    let echo = write_firmware(
        &dir,
        "echo.bin",
        &Program::new().print("ready\n").echo_until_q().build(),
    );

    let v = d.post_ok("/v1/vms", &create_body("t1", &echo, "never", false), 201);
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(v["state"], "created");
    // Not running: actions that need a VMM are refused, naming the state.
    for action in ["pause", "resume", "kill", "shutdown", "reboot"] {
        let r = d.post(&format!("/v1/vms/t1/{action}"), "");
        assert_eq!(r.status, 409, "{action}: {}", r.text());
        assert_eq!(r.json()["field"], "state", "{action}");
    }
    assert_eq!(d.get("/v1/vms/t1/stats").status, 409);

    let v = d.post_ok("/v1/vms/t1/start", "", 200);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["desired_state"], "running");
    let pid = pid_of(&v);
    assert!(alive(pid));
    assert!(v["uptime_ms"].is_u64());
    assert_eq!(
        d.post("/v1/vms/t1/start", "").status,
        409,
        "already running"
    );

    // The console: history first ("ready"), then an echo through the guest's UART.
    let mut con = d.console("t1");
    read_until(&mut con, b"ready\n");
    con.write_all(b"hello").expect("write");
    read_until(&mut con, b"hello");
    // Without the upgrade headers: 426 naming the header.
    let r = d.get("/v1/vms/t1/console");
    assert_eq!(r.status, 426, "{}", r.text());

    let s = d.get("/v1/vms/t1/stats");
    assert_eq!(s.status, 200, "{}", s.text());
    let s = s.json();
    assert_eq!(s["pid"], pid);
    assert!(s["rss_bytes"].as_u64().unwrap_or(0) > 0, "{s}");
    let exits = &s["vcpus"][0]["exits"];
    assert!(exits["io_out"].as_u64().unwrap_or(0) >= 6, "{s}");
    assert!(s["vcpus"][0]["cpu_time_ms"].is_u64(), "{s}");

    let v = d.post_ok("/v1/vms/t1/pause", "", 200);
    assert_eq!(v["state"], "paused");
    assert_eq!(d.post("/v1/vms/t1/pause", "").status, 409);
    let v = d.post_ok("/v1/vms/t1/resume", "", 200);
    assert_eq!(v["state"], "running");

    // This guest ignores the power button: after the timeout it is stopped.
    let r = d.post("/v1/vms/t1/shutdown", r#"{"timeout_s": 0}"#);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["field"], "timeout_s");
    let r = d.post("/v1/vms/t1/shutdown", r#"{"timeout":1}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let t = Instant::now();
    let v = d.post_ok("/v1/vms/t1/shutdown", r#"{"timeout_s": 1}"#, 200);
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["desired_state"], "stopped");
    assert!(v.get("pid").is_none());
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(!alive(pid), "VMM {pid} still there");
    // The console stream ended with the VMM.
    drop(con);

    // Start, kill, start, reboot (a new VMM), delete refused while running, forced.
    let v = d.post_ok("/v1/vms/t1/start", "", 200);
    let pid = pid_of(&v);
    let v = d.post_ok("/v1/vms/t1/kill", "", 200);
    assert_eq!(v["state"], "stopped");
    assert!(!alive(pid));
    let v = d.post_ok("/v1/vms/t1/start", "", 200);
    let pid = pid_of(&v);
    let v = d.post_ok("/v1/vms/t1/reboot", "", 200);
    assert_eq!(v["state"], "running");
    let pid2 = pid_of(&v);
    assert_ne!(pid, pid2);
    assert!(!alive(pid) && alive(pid2));
    let r = d.delete("/v1/vms/t1");
    assert_eq!(r.status, 409, "{}", r.text());
    let r = d.delete("/v1/vms/t1?force=true");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!alive(pid2), "forced delete stops the VMM");
    assert_eq!(d.get("/v1/vms/t1").status, 404);
    assert!(!d.state.join("vms").join(&id).exists(), "run dir removed");

    let kinds = d.event_kinds(&id);
    let want = [
        "created", "started", "paused", "resumed", "stopped", "started", "stopped", "started",
        "stopped", "started", "stopped", "deleted",
    ];
    assert_eq!(kinds, want, "{:?}", d.events(&id));
}

#[test]
fn supervision_restart_policies_and_guest_exits() {
    if !kvm_available("supervision") {
        return;
    }
    let dir = scratch("dsup");
    let d = Daemon::start(&dir);
    let idle = idle_fw(&dir);
    let off = write_firmware(
        &dir,
        "off.bin",
        &Program::new().print("bye\n").poweroff().build(),
    );
    let panic = write_firmware(&dir, "panic.bin", &Program::new().panic().build());

    // on-failure: a VMM killed with SIGKILL is noticed, marked crashed with the reason, and
    // started again.
    let v = d.post_ok(
        "/v1/vms",
        &create_body("onf", &idle, "on-failure", true),
        201,
    );
    assert_eq!(v["state"], "running", "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let pid = pid_of(&v);
    kill9(pid);
    let v = d.wait_vm("onf", "restarted", |v| {
        v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p != u64::from(pid))
    });
    assert_eq!(v["restart_count"], 1, "{v}");
    assert!(
        v["last_exit_reason"]
            .as_str()
            .is_some_and(|r| r.contains("SIGKILL")),
        "{v}"
    );
    let ev = d.events(&id);
    let crashed = ev
        .iter()
        .find(|e| e["kind"] == "crashed")
        .expect("crashed event");
    assert!(
        crashed["detail"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("signal 9"),
        "{crashed}"
    );
    assert!(ev.iter().any(|e| e["kind"] == "restarted"));

    // never: stays crashed.
    let v = d.post_ok("/v1/vms", &create_body("nev", &idle, "never", true), 201);
    kill9(pid_of(&v));
    let v = d.wait_vm("nev", "crashed", |v| v["state"] == "crashed");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.vm("nev")["state"], "crashed", "{v}");
    assert_eq!(d.vm("nev")["restart_count"], 0);

    // A guest power-off is an exit, not a crash: on-failure leaves it, always restarts it.
    d.post_ok(
        "/v1/vms",
        &create_body("off1", &off, "on-failure", true),
        201,
    );
    let v = d.wait_vm("off1", "exited", |v| v["state"] == "exited");
    assert_eq!(v["last_exit_code"], 0, "{v}");
    assert!(
        v["last_exit_reason"]
            .as_str()
            .is_some_and(|r| r.contains("powered off")),
        "{v}"
    );
    d.post_ok("/v1/vms", &create_body("off2", &off, "always", true), 201);
    d.wait_vm("off2", "restarted twice", |v| {
        v["restart_count"].as_u64() >= Some(2)
    });
    // Down between two restarts: a stop means "stop wanting it" and cancels the restart.
    d.post_ok("/v1/vms/off2/kill", "", 200);
    // A stopped VM is not restarted even by `always` (the user stopped it).
    let v = d.wait_vm("off2", "down", |v| {
        !["running", "starting", "stopping", "paused"].contains(&v["state"].as_str().unwrap_or(""))
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.vm("off2")["desired_state"], "stopped", "{v}");
    assert!(
        !["running", "starting"].contains(&d.vm("off2")["state"].as_str().unwrap_or("")),
        "restarted after a user stop"
    );

    // A guest panic is a crash with its reason.
    d.post_ok("/v1/vms", &create_body("pan", &panic, "never", true), 201);
    let v = d.wait_vm("pan", "crashed", |v| v["state"] == "crashed");
    assert!(
        v["last_exit_reason"]
            .as_str()
            .is_some_and(|r| r.contains("panicked")),
        "{v}"
    );
    assert_eq!(v["last_exit_code"], 3);
}

#[test]
fn daemon_restart_readopts_running_vms() {
    if !kvm_available("readopt") {
        return;
    }
    let dir = scratch("dadopt");
    let mut d = Daemon::start(&dir);
    let idle = idle_fw(&dir);
    let a = d.post_ok("/v1/vms", &create_body("a", &idle, "on-failure", true), 201);
    let b = d.post_ok("/v1/vms", &create_body("b", &idle, "on-failure", true), 201);
    let c = d.post_ok("/v1/vms", &create_body("c", &idle, "on-failure", true), 201);
    let (pa, pb, pc) = (pid_of(&a), pid_of(&b), pid_of(&c));
    let a_id = a["id"].as_str().expect("id").to_string();

    // SIGTERM: the daemon goes, the guests stay.
    d.signal_and_wait(libc::SIGTERM);
    assert!(alive(pa) && alive(pb) && alive(pc));
    d.restart();
    for (name, pid) in [("a", pa), ("b", pb), ("c", pc)] {
        let v = d.vm(name);
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(pid_of(&v), pid, "{name} keeps its VMM");
    }
    assert!(d.event_kinds(&a_id).contains(&"adopted".to_string()));
    // The adopted VMMs are supervised: a kill -9 is noticed and restarted by policy.
    kill9(pa);
    d.wait_vm("a", "restarted", |v| {
        v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p != u64::from(pa))
    });
    let crashed = d.events(&a_id);
    let reason = crashed
        .iter()
        .rev()
        .find(|e| e["kind"] == "crashed")
        .and_then(|e| e["detail"]["reason"].as_str().map(str::to_string))
        .expect("crashed event");
    // Not its child: the kernel gives no status; no exit report means it was killed.
    assert!(reason.contains("without an exit report"), "{reason}");
    // The adopted consoles work.
    let mut con = d.console("b");
    read_until(&mut con, b"up\n");
    drop(con);

    // SIGKILL of the daemon, and a VMM that dies while no daemon runs.
    d.signal_and_wait(libc::SIGKILL);
    assert!(alive(pb) && alive(pc));
    kill9(pc);
    std::thread::sleep(Duration::from_millis(200));
    d.restart();
    assert_eq!(pid_of(&d.vm("b")), pb);
    let v = d.wait_vm("c", "restarted after dying unwatched", |v| {
        v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p != u64::from(pc))
    });
    assert!(
        v["last_exit_reason"]
            .as_str()
            .is_some_and(|r| r.contains("while the daemon was not running")),
        "{v}"
    );

    // A second daemon on the same state directory is refused.
    let out = run(
        {
            let mut c = ferrovisor();
            c.arg("daemon")
                .arg("--socket")
                .arg(dir.join("other.sock"))
                .arg("--state-dir")
                .arg(&d.state);
            c
        },
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("in use by another ferrovisor daemon"),
        "{}",
        out.stderr
    );
}

#[test]
fn metrics_are_valid_prometheus_text() {
    if !kvm_available("metrics") {
        return;
    }
    let dir = scratch("dmetrics");
    let d = Daemon::start(&dir);
    let idle = idle_fw(&dir);
    d.post_ok("/v1/vms", &create_body("m1", &idle, "never", true), 201);
    d.post_ok("/v1/vms", &create_body("m2", &idle, "never", false), 201);
    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    let text = r.text();
    for needle in [
        "ferrovisor_vm_state{vm=\"m1\"",
        "state=\"running\"} 1",
        "ferrovisor_vm_vcpu_exits_total{vm=\"m1\"",
        "reason=\"io_out\"}",
        "ferrovisor_vm_vcpu_seconds_total{vm=\"m1\"",
        "ferrovisor_vm_rss_bytes{vm=\"m1\"",
        "ferrovisor_vms{state=\"created\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let file = dir.join("metrics.txt");
    std::fs::write(&file, &text).expect("write");
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open"))
        .output()
    {
        Ok(out) => {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "promtool: {all}\n{text}");
        }
        Err(e) => {
            assert!(
                std::env::var("CI").is_err(),
                "promtool is required in CI (Debian package prometheus): {e}"
            );
            eprintln!("SKIPPED promtool check: {e}");
        }
    }
}

#[test]
fn fifty_clients_query_while_vms_start_and_stop_and_the_stream_sees_it_all() {
    if !kvm_available("concurrent clients") {
        return;
    }
    let dir = scratch("dconc");
    let d = Daemon::start(&dir);
    let idle = idle_fw(&dir);
    for n in 0..4 {
        d.post_ok(
            "/v1/vms",
            &create_body(&format!("c{n}"), &idle, "never", false),
            201,
        );
    }
    // The event stream, from now on.
    let after = d
        .get("/v1/events?limit=1000")
        .json()
        .as_array()
        .map_or(0, |a| a.last().and_then(|e| e["id"].as_i64()).unwrap_or(0));
    let sock = d.sock.clone();
    let stream = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        write!(
            s,
            "GET /v1/events/stream?after={after} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // 4 VMs x 3 rounds x (started, stopped).
        let want = 4 * 3 * 2;
        while String::from_utf8_lossy(&got).matches("\nevent: ").count() < want {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..50)
        .map(|i| {
            let sock = d.sock.clone();
            let stop = stop.clone();
            let checks = checks.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let path = if i % 2 == 0 {
                        "/v1/vms".to_string()
                    } else {
                        format!("/v1/vms/c{}", i % 4)
                    };
                    let r = common::http::request(&sock, "GET", &path, None);
                    assert_eq!(r.status, 200, "{path}: {}", r.text());
                    let v = r.json();
                    let vms = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
                    if i % 2 == 0 {
                        assert_eq!(vms.len(), 4, "{v}");
                    }
                    for vm in &vms {
                        // A consistent record: a pid exactly while a VMM may run.
                        let state = vm["state"].as_str().unwrap_or("");
                        let live = ["running", "paused", "stopping"].contains(&state);
                        assert_eq!(vm["pid"].is_u64(), live, "{vm}");
                        assert_eq!(vm["uptime_ms"].is_u64(), live, "{vm}");
                        assert!(
                            ["created", "running", "stopped", "starting", "stopping"]
                                .contains(&state),
                            "{vm}"
                        );
                    }
                    checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    for _round in 0..3 {
        let starters: Vec<_> = (0..4)
            .map(|n| {
                let sock = d.sock.clone();
                std::thread::spawn(move || {
                    let r = common::http::request(
                        &sock,
                        "POST",
                        &format!("/v1/vms/c{n}/start"),
                        Some(b""),
                    );
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert_eq!(r.json()["state"], "running");
                    // The same VM twice at once: serialised, the second is refused cleanly.
                    let again = common::http::request(
                        &sock,
                        "POST",
                        &format!("/v1/vms/c{n}/kill"),
                        Some(b""),
                    );
                    assert_eq!(again.status, 200, "{}", again.text());
                    assert_eq!(again.json()["state"], "stopped");
                })
            })
            .collect();
        for s in starters {
            s.join().expect("start/stop");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().expect("a reader saw a wrong answer");
    }
    assert!(checks.load(std::sync::atomic::Ordering::Relaxed) >= 50);
    let events = stream.join().expect("stream");
    assert_eq!(events.matches("event: started").count(), 12, "{events}");
    assert_eq!(events.matches("event: stopped").count(), 12, "{events}");
}

#[test]
fn daemon_refuses_bad_options_with_clear_messages() {
    let dir = scratch("dbad");
    let daemon = |args: &[&str]| {
        let mut c = ferrovisor();
        c.arg("daemon")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args)
            .env_remove("FERROVISOR_SOCKET");
        run(c, Duration::from_secs(20))
    };
    let sock = dir.join("api.sock").display().to_string();
    let out = daemon(&["--socket", &sock, "--group", "no-such-group-fv"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("no such group"), "{}", out.stderr);
    // Something that is not a socket is never replaced.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "keep me").expect("write");
    let out = daemon(&["--socket", &file.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("is not a socket"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
    // A state directory too deep for the VMs' socket paths is refused up front.
    let deep = dir.join("d".repeat(80));
    let mut c = ferrovisor();
    c.args(["daemon", "--socket", &sock, "--state-dir"])
        .arg(&deep);
    let out = run(c, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("too long"), "{}", out.stderr);
    let out = daemon(&["--socket", &sock, "--ready-timeout", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_start_cut_short_by_a_daemon_death_is_recorded_and_retried() {
    if !kvm_available("start cut short") {
        return;
    }
    let dir = scratch("dcut");
    let mut d = Daemon::start(&dir);
    let idle = idle_fw(&dir);
    d.post_ok("/v1/vms", &create_body("cut", &idle, "never", false), 201);
    d.post_ok("/v1/vms", &create_body("late", &idle, "never", false), 201);
    d.signal_and_wait(libc::SIGKILL);
    // What a daemon killed in the middle of a launch leaves: `starting`, wanted running; and a
    // VM created with `start` whose start never began.
    {
        let store = ::daemon::Store::open(&d.state).expect("store");
        store
            .set_desired("cut", ::daemon::DesiredState::Running)
            .expect("desired");
        store
            .set_state("cut", ::daemon::VmState::Starting)
            .expect("starting");
        store
            .set_desired("late", ::daemon::DesiredState::Running)
            .expect("desired");
    }
    d.restart();
    let v = d.wait_vm("cut", "started again", |v| v["state"] == "running");
    assert_eq!(v["restart_count"], 1, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let kinds = d.event_kinds(&id);
    assert!(
        kinds.ends_with(&["crashed".into(), "restarted".into(), "started".into()]),
        "{kinds:?}"
    );
    let crashed = d.events(&id);
    assert!(crashed.iter().any(|e| e["detail"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("daemon stopped while the VM was starting"))));
    d.wait_vm("late", "started", |v| v["state"] == "running");
}

#[test]
fn console_survives_a_stalled_daemon() {
    if !kvm_available("console_survives_a_stalled_daemon") {
        return;
    }
    let dir = scratch("dflood");
    let d = Daemon::start(&dir);
    let fw = write_firmware(
        &dir,
        "flood.bin",
        &Program::new().print_forever("0123456789abcdef\n").build(),
    );
    let v = d.post_ok("/v1/vms", &create_body("f1", &fw, "never", true), 201);
    assert_eq!(v["state"], "running", "{v}");
    let mut con = d.console("f1");
    read_at_least(&mut con, 256 * 1024, Duration::from_secs(30));
    drop(con);
    // The daemon stops reading for 3 s (as when it is starved of CPU): its connection to the
    // VMM's console fills up and the VMM, which never lets a client stall the guest, drops it
    // after a second, keeping what it could not send.
    let pid = d.pid() as libc::pid_t;
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // The console goes on: a client attached now gets live output far beyond what was
    // buffered when the daemon stopped (the history, the socket's buffer and the VMM's
    // backlog hold well under 1 MiB).
    let mut con = d.console("f1");
    read_at_least(&mut con, 2 * 1024 * 1024, Duration::from_secs(60));
    drop(con);
    let r = d.delete("/v1/vms/f1?force=true");
    assert!(r.status < 300, "{}", r.text());
}
