//! The walls around daemon-started VMMs, seen from the host's `/proc` (tiny guests on this
//! machine's KVM): a uid of each VM's own, no capabilities, no_new_privs, a seccomp filter on
//! every thread, six namespaces apart from the daemon's, a root holding only the VM's run
//! directory; a SIGSYS is recorded as a seccomp violation; bad jail options are refused.

mod common;

use common::daemon::Daemon;
use common::firmware::Program;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn run_ferrovisor(args: &[&str]) -> Output {
    let mut cmd = ferrovisor();
    cmd.args(args);
    run(cmd, std::time::Duration::from_secs(60))
}

fn idle_fw(dir: &Path) -> PathBuf {
    write_firmware(dir, "idle.bin", &Program::new().print("up\n").build())
}

fn start_vm(d: &Daemon, name: &str, fw: &Path) -> (String, u32) {
    let body = json!({
        "name": name,
        "config": { "firmware": fw, "memory": "32M" },
        "start": true,
    });
    d.post_ok("/v1/vms", &body.to_string(), 201);
    let v = d.wait_vm(name, "running", |v| v["state"] == "running");
    let id = v["id"].as_str().expect("id").to_string();
    let pid = v["pid"].as_u64().expect("pid") as u32;
    (id, pid)
}

fn status_field(pid: u32, task: Option<&str>, field: &str) -> String {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{path}: no {field}"))
        .trim()
        .to_string()
}

fn ns(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
        .display()
        .to_string()
}

/// Every path under `/proc/PID/root`, relative to it.
fn jail_tree(pid: u32) -> Vec<String> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(&root).unwrap().display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_daemon_started_vmm_is_behind_every_wall() {
    if !kvm_available("a_daemon_started_vmm_is_behind_every_wall") {
        return;
    }
    let dir = scratch("jail-walls");
    let d = Daemon::start(&dir);
    let fw = idle_fw(&dir);
    let (id_a, a) = start_vm(&d, "ja", &fw);
    let (id_b, b) = start_vm(&d, "jb", &fw);
    let daemon = d.pid();

    let mut uids = Vec::new();
    for pid in [a, b] {
        let uid = status_field(pid, None, "Uid");
        let ids: Vec<&str> = uid.split_whitespace().collect();
        assert_eq!(ids.len(), 4, "{uid}");
        assert!(ids.iter().all(|x| *x == ids[0] && *x != "0"), "uid {uid}");
        let gid = status_field(pid, None, "Gid");
        assert!(gid.split_whitespace().all(|x| x == ids[0]), "gid {gid}");
        assert_eq!(
            status_field(pid, None, "Groups"),
            "",
            "supplementary groups"
        );
        uids.push(ids[0].to_string());
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(pid, None, cap), "0000000000000000", "{cap}");
        }
        assert_eq!(status_field(pid, None, "NoNewPrivs"), "1");
        // Every thread, whatever its kind, runs under a seccomp filter.
        let mut threads = 0;
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let t = t.file_name().to_string_lossy().to_string();
            let comm =
                std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm")).unwrap_or_default();
            assert_eq!(
                status_field(pid, Some(&t), "Seccomp"),
                "2",
                "thread {t} ({})",
                comm.trim()
            );
            threads += 1;
        }
        assert!(threads >= 4, "{threads} threads");
        for kind in ["mnt", "pid", "net", "ipc", "uts", "cgroup", "user"] {
            assert_ne!(ns(pid, kind), ns(daemon, kind), "{kind} namespace of {pid}");
        }
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    }
    assert_ne!(uids[0], uids[1], "two VMs share a uid");
    assert_ne!(ns(a, "net"), ns(b, "net"));

    // The root holds the VM's run directory and the directories leading to it, nothing else:
    // no host file, nothing of the other VM.
    let run_a = d.state.join("vms").join(&id_a);
    let run_a = std::fs::canonicalize(run_a).unwrap();
    let tree = jail_tree(a);
    let rel = run_a.strip_prefix("/").unwrap().display().to_string();
    for p in &tree {
        assert!(
            rel.starts_with(p.as_str()) || p.starts_with(&rel),
            "{p} is visible in VM ja's root: {tree:?}"
        );
    }
    assert!(tree.iter().any(|p| p.ends_with("control.sock")), "{tree:?}");
    assert!(!tree.iter().any(|p| p.contains(&id_b)), "{tree:?}");
    assert!(!Path::new(&format!("/proc/{a}/root/etc/shadow")).exists());
    assert!(!Path::new(&format!("/proc/{a}/root/proc/1")).exists());

    // The VM still works behind the walls: stats (RSS read through a descriptor opened
    // before), pause and resume over the control socket.
    let s = d.get("/v1/vms/ja/stats").json();
    assert!(s["rss_bytes"].as_u64().unwrap_or(0) > 0, "{s}");
    assert_eq!(d.post_ok("/v1/vms/ja/pause", "", 200)["state"], "paused");
    assert_eq!(d.post_ok("/v1/vms/ja/resume", "", 200)["state"], "running");

    // /v1/host names each wall and what it is here.
    let host = d.get("/v1/host").json();
    let walls = host["walls"].as_array().expect("walls");
    let names: Vec<&str> = walls.iter().filter_map(|w| w["name"].as_str()).collect();
    assert_eq!(names, WALL_NAMES);
    for w in walls.iter().take(4) {
        assert_eq!(w["available"], true, "{w}");
        assert_eq!(w["enabled"], true, "{w}");
        assert_eq!(w["required"], true, "{w}");
    }
}

#[test]
fn a_sigsys_is_recorded_as_a_seccomp_violation() {
    if !kvm_available("a_sigsys_is_recorded_as_a_seccomp_violation") {
        return;
    }
    let dir = scratch("jail-sigsys");
    let d = Daemon::start(&dir);
    let fw = idle_fw(&dir);
    let (id, pid) = start_vm(&d, "js", &fw);
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGSYS) }, 0);
    let v = d.wait_vm("js", "crashed", |v| v["state"] == "crashed");
    let reason = v["last_exit_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("seccomp violation"), "{v}");
    let events = d.event_kinds(&id);
    assert!(events.iter().any(|k| k == "crashed"), "{events:?}");
}

#[test]
fn the_foreground_jail_says_which_walls_are_up() {
    if !kvm_available("the_foreground_jail_says_which_walls_are_up") {
        return;
    }
    let dir = scratch("jail-run");
    let fw = write_firmware(
        &dir,
        "fw.bin",
        &Program::new().print("jailed\n").poweroff().build(),
    );
    let run = dir.join("run");
    let out = run_ferrovisor(&[
        "run",
        "--firmware",
        fw.to_str().unwrap(),
        "--memory",
        "32M",
        "--jail",
        "--control",
        run.join("ctl.sock").to_str().unwrap(),
        "--exit-report",
        run.join("exit.json").to_str().unwrap(),
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("jailed"), "{out:?}");
    for wall in [
        "namespaces: up",
        "filesystem: up",
        "identity: up",
        "seccomp: up",
    ] {
        assert!(out.stderr.contains(wall), "{wall}: {}", out.stderr);
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("exit.json")).unwrap()).unwrap();
    assert_eq!(report["reason"], "poweroff");
    // A runtime path outside the jail's directory is refused before anything starts.
    let out = run_ferrovisor(&[
        "run",
        "--firmware",
        fw.to_str().unwrap(),
        "--jail",
        "--jail-dir",
        run.to_str().unwrap(),
        "--control",
        dir.join("elsewhere.sock").to_str().unwrap(),
    ]);
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr.contains("outside the jail's run directory"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_jail_options_are_refused_naming_the_value() {
    let dir = scratch("jail-bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--allow-unconfined", "seccomp,bogus"], "\"bogus\""),
        (&["--require", "landlok"], "\"landlok\""),
        (&["--uid-range", "900000-900003"], "too small"),
        (&["--uid-range", "1-100000"], "overlaps this host's users"),
        (&["--uid-range", "0-100000"], "0 < FIRST"),
        (&["--uid-range", "lots"], "FIRST-LAST"),
        (&["--require", "seccomp"], "always required"),
        (
            &["--require", "landlock", "--allow-unconfined", "landlock"],
            "contradict",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec![
            "daemon",
            "--socket",
            dir.join("api.sock").to_str().unwrap(),
            "--state-dir",
            dir.join("state").to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        all.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = run_ferrovisor(&refs);
        assert_ne!(out.code(), 0, "{args:?} was accepted");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        assert!(!dir.join("api.sock").exists(), "{args:?} started a daemon");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--allow-unconfined` is the operator's choice on the record: an `unconfined` event (no VM)
/// naming the walls, each time a daemon starts with it, and the wall marked in /v1/host.
#[test]
fn allow_unconfined_is_recorded_in_the_event_log() {
    let dir = scratch("jail-unconfined-event");
    let d = Daemon::start_with(&dir, &["--allow-unconfined", "landlock"]);
    let events = d.get("/v1/events?limit=1000").json();
    let unconfined: Vec<&Value> = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "unconfined")
        .collect();
    assert_eq!(unconfined.len(), 1, "{events}");
    assert!(unconfined[0]["vm_id"].is_null(), "{events}");
    assert_eq!(unconfined[0]["detail"]["walls"], json!(["landlock"]));
    let host = d.get("/v1/host").json();
    let landlock = host["walls"]
        .as_array()
        .expect("walls")
        .iter()
        .find(|w| w["name"] == "landlock")
        .cloned()
        .expect("landlock wall");
    assert_eq!(landlock["unconfined_by_operator"], true, "{landlock}");
    assert_eq!(landlock["enabled"], false, "{landlock}");
}
