//! kill -9 of a writer at random moments: the store always reopens whole.
//!
//! The test re-executes its own binary with `FV_STORE_WRITER` set; in that child the
//! `writer_child` test runs a loop of store operations as fast as it can (create, start, pause,
//! crash/restart, stop, delete, free events) until the parent SIGKILLs it. After each kill the
//! parent opens the store (recovering the WAL), runs `PRAGMA integrity_check`, parses every VM
//! (config included) and checks the event log against the VM rows (one `created` event per
//! VM, last state event = state, pid iff live, no listed VM deleted). Then the next child
//! continues on the same files.

mod common;

use common::{check_consistent, config, TempDir};
use daemon::{proc_start_time, DesiredState, EventKind, RestartPolicy, Store, VmState};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DIR_ENV: &str = "FV_STORE_WRITER";
const ROUND_ENV: &str = "FV_STORE_WRITER_ROUND";
const KILLS: usize = 24;
const READY: &str = "FV-STORE-WRITER-READY";

/// Runs only in the child (with `FV_STORE_WRITER` set); a no-op in a normal test run.
#[test]
fn writer_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return;
    };
    let round = std::env::var(ROUND_ENV).unwrap_or_default();
    let store = Store::open(Path::new(&dir)).expect("child open");
    // libtest prints "test writer_child ... " on the same line first.
    println!("{READY}");
    let pid = std::process::id();
    let start = proc_start_time(pid).expect("own start time");
    for n in 0usize.. {
        let name = format!("r{round}-{n}");
        store
            .create(
                &name,
                &config(n),
                RestartPolicy::OnFailure,
                DesiredState::Running,
            )
            .expect("create");
        store.set_state(&name, VmState::Starting).expect("starting");
        store
            .set_running(&name, pid, start, Path::new("/run/fv/ctl.sock"), None)
            .expect("running");
        store
            .append_event(
                None,
                EventKind::Adopted,
                &json!({ "n": n, "pad": "x".repeat(n % 500) }),
            )
            .expect("event");
        if n % 3 == 0 {
            store.set_state(&name, VmState::Paused).expect("pause");
        }
        match n % 4 {
            0 => {
                store.set_state(&name, VmState::Stopping).expect("stopping");
                store
                    .set_exited(&name, "stopped", Some(0), false)
                    .expect("exit");
                store.delete(&name, false).expect("delete");
            }
            1 => {
                store
                    .set_exited(&name, "killed", None, true)
                    .expect("crash");
                store.schedule_restart(&name, 1).expect("restart");
            }
            2 => {
                store.delete(&name, true).expect("force delete");
            }
            _ => {}
        }
    }
}

/// Kills the child if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn store_survives_sigkill_at_random_moments() {
    let dir = TempDir::new("sigkill");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("seed {seed:#x}");
    let mut rng = Rng(seed);
    let exe = std::env::current_exe().expect("test binary");
    let mut last_events = 0;
    let mut writing_kills = 0;
    for round in 0..KILLS {
        let child = Command::new(&exe)
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn writer");
        let mut child = KillOnDrop(child);
        // Read the child's stdout on a thread (draining it to the end) and hear when it is
        // ready.
        let stdout = child.0.stdout.take().expect("stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(READY) {
                    let _ = ready_tx.send(());
                }
            }
        });
        // Every fourth round kills early: during start-up, open, WAL recovery or migration.
        let early = round % 4 == 3;
        if !early {
            ready_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("writer did not become ready");
        }
        let delay = if early {
            rng.below(15)
        } else {
            5 + rng.below(200)
        };
        std::thread::sleep(Duration::from_millis(delay));
        assert!(
            child.0.try_wait().expect("try_wait").is_none(),
            "round {round}: the writer ended before it was killed"
        );
        child.0.kill().expect("SIGKILL");
        let status = child.0.wait().expect("wait");
        assert!(!status.success());

        let t = Instant::now();
        let store = Store::open(dir.path()).expect("reopen after kill");
        let problems = store.integrity_check().expect("integrity_check");
        assert!(problems.is_empty(), "round {round}: {problems:?}");
        let (vms, events) = check_consistent(&store);
        eprintln!(
            "kill {round:2} after {delay:3} ms{}: {vms} VMs, {events} events (+{}), reopened and \
             checked in {:?}",
            if early { " (early)" } else { "" },
            events.saturating_sub(last_events),
            t.elapsed()
        );
        if events > last_events {
            writing_kills += 1;
        }
        assert!(events >= last_events, "round {round}: events lost");
        last_events = events;
    }
    assert!(
        writing_kills >= KILLS / 2,
        "only {writing_kills} of {KILLS} kills interrupted a writer that had written"
    );
}
