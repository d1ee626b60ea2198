//! The store's operations, one scenario per test.

mod common;

use common::{all_events, check_consistent, config, TempDir};
use daemon::{
    proc_start_time, DesiredState, EventKind, RestartPolicy, Store, StoreError, VmState,
    SCHEMA_VERSION,
};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn open(dir: &TempDir) -> Store {
    Store::open(dir.path()).expect("open store")
}

fn start(store: &Store, vm: &str) {
    let pid = std::process::id();
    let t = proc_start_time(pid).expect("own start time");
    store.set_state(vm, VmState::Starting).expect("starting");
    store
        .set_running(vm, pid, t, Path::new("/run/fv/ctl.sock"), None)
        .expect("running");
}

#[test]
fn create_get_list_and_reopen() {
    let dir = TempDir::new("reopen");
    let store = open(&dir);
    let a = store
        .create(
            "alpha",
            &config(1),
            RestartPolicy::OnFailure,
            DesiredState::Running,
        )
        .expect("create");
    let b = store
        .create(
            "beta",
            &config(2),
            RestartPolicy::Never,
            DesiredState::Stopped,
        )
        .expect("create");
    assert_eq!(a.runtime.state, VmState::Created);
    assert_eq!(a.config, config(1));
    assert_eq!(a.restart_policy, RestartPolicy::OnFailure);
    assert_eq!(b.desired_state, DesiredState::Stopped);
    assert_ne!(a.id, b.id);
    assert_eq!(store.get("alpha").expect("by name"), a);
    assert_eq!(store.get(a.id.as_str()).expect("by id"), a);
    assert!(matches!(store.get("gamma"), Err(StoreError::NotFound(n)) if n == "gamma"));
    start(&store, "beta");
    let list = store.list().expect("list");
    assert_eq!(
        list.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "beta"]
    );
    let events = all_events(&store);
    drop(store);

    let store = open(&dir);
    assert_eq!(store.list().expect("list"), list);
    assert_eq!(all_events(&store), events);
    assert_eq!(store.running_vmms().expect("running")[0].name, "beta");
    check_consistent(&store);
}

#[test]
fn files_are_private() {
    let dir = TempDir::new("modes");
    let store = open(&dir);
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700);
    assert_eq!(mode(store.path()), 0o600);
    assert_eq!(mode(&dir.path().join("state.db-wal")), 0o600);
}

#[test]
fn duplicate_and_invalid_names_change_nothing() {
    let dir = TempDir::new("dup");
    let store = open(&dir);
    store
        .create(
            "web",
            &config(1),
            RestartPolicy::Always,
            DesiredState::Running,
        )
        .expect("create");
    let before = (
        store.list().expect("list"),
        store.last_event_id().expect("last"),
    );
    let err = store
        .create(
            "web",
            &config(2),
            RestartPolicy::Never,
            DesiredState::Stopped,
        )
        .expect_err("duplicate");
    assert!(
        matches!(&err, StoreError::NameTaken(n) if n == "web"),
        "{err}"
    );
    assert_eq!(err.to_string(), "a VM named \"web\" already exists");
    for bad in [
        "",
        "-web",
        ".web",
        "web 2",
        "web/2",
        &"w".repeat(64),
        "00112233445566778899aabbccddeeff",
    ] {
        let err = store
            .create(bad, &config(3), RestartPolicy::Never, DesiredState::Stopped)
            .expect_err("invalid name");
        assert!(
            matches!(err, StoreError::Invalid { field: "name", .. }),
            "{bad:?}: {err}"
        );
    }
    let after = (
        store.list().expect("list"),
        store.last_event_id().expect("last"),
    );
    assert_eq!(before, after);
    assert_eq!(all_events(&store).len(), 1);
}

#[test]
fn delete_is_refused_while_a_vmm_may_live() {
    let dir = TempDir::new("delete");
    let store = open(&dir);
    store
        .create(
            "db",
            &config(1),
            RestartPolicy::Never,
            DesiredState::Running,
        )
        .expect("create");
    start(&store, "db");
    let last = store.last_event_id().expect("last");
    let err = store.delete("db", false).expect_err("running");
    assert!(
        matches!(err, StoreError::Conflict { state: VmState::Running, action, .. } if action.starts_with("delete")),
        "{err}"
    );
    store.set_state("db", VmState::Paused).expect("pause");
    assert!(matches!(
        store.delete("db", false),
        Err(StoreError::Conflict {
            state: VmState::Paused,
            ..
        })
    ));
    store.set_state("db", VmState::Stopping).expect("stopping");
    assert!(store.delete("db", false).is_err());
    assert_eq!(store.last_event_id().expect("last"), last + 1); // only `paused`
    let rec = store
        .set_exited("db", "stopped", Some(0), false)
        .expect("exit");
    assert_eq!(rec.runtime.state, VmState::Stopped);
    let gone = store.delete("db", false).expect("delete stopped");
    assert!(matches!(store.get("db"), Err(StoreError::NotFound(_))));
    let ev = all_events(&store).pop().expect("event");
    assert_eq!(ev.kind, EventKind::Deleted);
    assert_eq!(ev.vm_id.as_ref(), Some(&gone.id));
    assert_eq!(ev.detail["name"], "db");

    // Force deletes a running one; the name is free again.
    store
        .create(
            "db",
            &config(1),
            RestartPolicy::Never,
            DesiredState::Running,
        )
        .expect("re-create");
    start(&store, "db");
    store.delete("db", true).expect("forced");
    assert_eq!(
        all_events(&store).pop().expect("event").detail["forced"],
        true
    );
    assert!(store.list().expect("list").is_empty());
    check_consistent(&store);
}

#[test]
fn runtime_transitions_and_their_events() {
    let dir = TempDir::new("transitions");
    let store = open(&dir);
    let vm = store
        .create(
            "t",
            &config(1),
            RestartPolicy::OnFailure,
            DesiredState::Running,
        )
        .expect("create");
    let id = vm.id.as_str();
    // Not running: no pause, resume, stop, exit.
    for (s, _) in [
        (VmState::Paused, "pause"),
        (VmState::Running, "resume"),
        (VmState::Stopping, "stop"),
    ] {
        assert!(matches!(
            store.set_state(id, s),
            Err(StoreError::Conflict {
                state: VmState::Created,
                ..
            })
        ));
    }
    assert!(matches!(
        store.set_exited(id, "x", None, true),
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.set_state(id, VmState::Crashed),
        Err(StoreError::Invalid { field: "state", .. })
    ));
    start(&store, id);
    assert!(matches!(
        store.set_state(id, VmState::Starting),
        Err(StoreError::Conflict { .. })
    ));
    assert!(store.set_running(id, 1, 1, Path::new("/x"), None).is_err());
    store.set_state(id, VmState::Paused).expect("pause");
    assert!(matches!(
        store.set_state(id, VmState::Paused),
        Err(StoreError::Conflict { .. })
    ));
    store.set_state(id, VmState::Running).expect("resume");
    assert_eq!(
        store.record_adopted(id).expect("adopt"),
        store.last_event_id().expect("last")
    );

    // The exit of a VMM the VM no longer runs changes nothing.
    let own = std::process::id();
    assert!(matches!(
        store.set_exited_of(id, own + 1, "late notice", None, true),
        Err(StoreError::Conflict {
            state: VmState::Running,
            ..
        })
    ));
    assert_eq!(store.get(id).expect("get").runtime.pid, Some(own));

    // A crash keeps the reason; the policy restarts it after a back-off.
    let rec = store
        .set_exited_of(id, own, "VMM killed by signal 9", None, true)
        .expect("crash");
    assert_eq!(rec.runtime.state, VmState::Crashed);
    assert_eq!(rec.runtime.pid, None);
    assert_eq!(rec.runtime.control_socket, None);
    assert_eq!(
        rec.runtime.last_exit_reason.as_deref(),
        Some("VMM killed by signal 9")
    );
    assert!(rec.restart_policy.wants_restart(rec.runtime.state));
    assert!(store.running_vmms().expect("running").is_empty());
    assert!(matches!(
        store.record_adopted(id),
        Err(StoreError::Conflict { .. })
    ));
    let rec = store.schedule_restart(id, 12345).expect("schedule");
    assert_eq!(
        (rec.runtime.restart_count, rec.runtime.next_restart_at),
        (1, Some(12345))
    );
    let rec = store.schedule_restart(id, 23456).expect("schedule again");
    assert_eq!(rec.runtime.restart_count, 2);
    start(&store, id);
    let rec = store.get(id).expect("get");
    assert_eq!(
        (rec.runtime.restart_count, rec.runtime.next_restart_at),
        (2, None)
    );
    assert!(matches!(
        store.schedule_restart(id, 1),
        Err(StoreError::Conflict { .. })
    ));

    // The guest powers off by itself: exited.
    let rec = store
        .set_exited(id, "guest power-off", Some(0), false)
        .expect("exit");
    assert_eq!(
        (rec.runtime.state, rec.runtime.last_exit_code),
        (VmState::Exited, Some(0))
    );
    // Desired stopped: no restart can be scheduled, and a pending one is cancelled.
    store.schedule_restart(id, 99).expect("schedule");
    let rec = store
        .set_desired(id, DesiredState::Stopped)
        .expect("desired");
    assert_eq!(rec.runtime.next_restart_at, None);
    assert!(matches!(
        store.schedule_restart(id, 1),
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(
        store
            .reset_restarts(id)
            .expect("reset")
            .runtime
            .restart_count,
        0
    );
    // An exit while desired stopped is a stop.
    start(&store, id);
    assert_eq!(
        store
            .set_exited(id, "asked", Some(0), false)
            .expect("exit")
            .runtime
            .state,
        VmState::Stopped
    );

    let kinds: Vec<EventKind> = all_events(&store).iter().map(|e| e.kind).collect();
    use EventKind::*;
    assert_eq!(
        kinds,
        [
            Created, Started, Paused, Resumed, Adopted, Crashed, Restarted, Restarted, Started,
            Exited, Restarted, Started, Stopped
        ]
    );
    check_consistent(&store);
}

#[test]
fn event_log_is_monotonic_and_pages() {
    let dir = TempDir::new("events");
    let store = open(&dir);
    store
        .create("e", &config(1), RestartPolicy::Never, DesiredState::Stopped)
        .expect("create");
    let mut last = 0;
    for i in 0..50 {
        let id = store
            .append_event(
                if i % 2 == 0 { Some("e") } else { None },
                EventKind::Adopted,
                &json!({ "i": i }),
            )
            .expect("append");
        assert!(id > last);
        last = id;
    }
    assert!(matches!(
        store.append_event(Some("nope"), EventKind::Started, &json!({})),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.last_event_id().expect("last"), last);
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.events_since(after, 7).expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        after = page.last().map(|e| e.id).unwrap_or(after);
        seen.extend(page);
    }
    assert_eq!(seen, all_events(&store));
    assert_eq!(seen.len(), 51);
    assert_eq!(seen[5].detail, json!({ "i": 4 }));
    assert!(store.events_since(last, 0).expect("empty").is_empty());
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new("schema");
    drop(open(&dir));
    let db = dir.path().join("state.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("raw open");
        let v: i64 = conn
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION);
        conn.execute(
            "INSERT INTO schema_migrations VALUES (?1, 0)",
            [SCHEMA_VERSION + 1],
        )
        .expect("bump");
    }
    let err = Store::open(dir.path()).expect_err("newer schema");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("newer than this Ferrovisor supports"),
        "{err}"
    );
}

#[test]
fn a_foreign_database_is_refused() {
    let dir = TempDir::new("foreign");
    std::fs::create_dir_all(dir.path()).expect("mkdir");
    {
        let conn = rusqlite::Connection::open(dir.path().join("state.db")).expect("raw open");
        conn.execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
            .expect("table");
    }
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::NotOurs(_))
    ));
}

#[test]
fn one_daemon_per_state_dir() {
    let dir = TempDir::new("lock");
    let store = open(&dir);
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Locked(_))
    ));
    drop(store);
    drop(open(&dir));
}

#[test]
fn bad_runtime_inputs_are_invalid() {
    let dir = TempDir::new("inputs");
    let store = open(&dir);
    store
        .create("v", &config(1), RestartPolicy::Never, DesiredState::Stopped)
        .expect("create");
    assert!(matches!(
        store.set_running("v", 0, 1, Path::new("/x"), None),
        Err(StoreError::Invalid { field: "pid", .. })
    ));
    assert!(matches!(
        store.set_running("v", 1, u64::MAX, Path::new("/x"), None),
        Err(StoreError::Invalid {
            field: "pid_start_time",
            ..
        })
    ));
    use std::os::unix::ffi::OsStrExt;
    let non_utf8 = Path::new(std::ffi::OsStr::from_bytes(b"/run/\xff.sock"));
    assert!(matches!(
        store.set_running("v", 1, 1, non_utf8, None),
        Err(StoreError::Invalid {
            field: "control_socket",
            ..
        })
    ));
    assert_eq!(store.get("v").expect("get").runtime.state, VmState::Created);
    assert_eq!(store.last_event_id().expect("last"), 1);
}
