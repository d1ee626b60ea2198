//! Several threads on one store: every answer is consistent.

mod common;

use common::{check_consistent, config, TempDir};
use daemon::{DesiredState, RestartPolicy, Store, StoreError, VmState};
use std::path::Path;
use std::sync::Arc;

#[test]
fn threads_see_consistent_answers() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 40;
    let dir = TempDir::new("threads");
    let store = Arc::new(Store::open(dir.path()).expect("open"));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut contested_wins = 0;
                for i in 0..PER_THREAD {
                    let name = format!("t{t}-{i}");
                    let rec = store
                        .create(
                            &name,
                            &config(i),
                            RestartPolicy::Always,
                            DesiredState::Running,
                        )
                        .expect("create");
                    assert_eq!(store.get(&name).expect("get").id, rec.id);
                    // Every thread races for the same name: one wins, the others get NameTaken.
                    match store.create(
                        &format!("contested-{i}"),
                        &config(i),
                        RestartPolicy::Never,
                        DesiredState::Stopped,
                    ) {
                        Ok(_) => contested_wins += 1,
                        Err(StoreError::NameTaken(_)) => {}
                        Err(e) => panic!("contested create: {e}"),
                    }
                    store.set_state(&name, VmState::Starting).expect("starting");
                    store
                        .set_running(&name, 1000 + i as u32, 7, Path::new("/run/c"), None)
                        .expect("running");
                    if i % 2 == 0 {
                        store.set_state(&name, VmState::Paused).expect("pause");
                    }
                    // Every listed record is whole: running or paused always comes with its
                    // pid and socket, an ended VM has neither.
                    for vm in store.list().expect("list") {
                        let rt = &vm.runtime;
                        if matches!(rt.state, VmState::Running | VmState::Paused) {
                            assert!(rt.pid.is_some() && rt.control_socket.is_some());
                        }
                        if !rt.state.is_live() {
                            assert!(rt.pid.is_none() && rt.control_socket.is_none());
                        }
                    }
                    if i % 3 == 0 {
                        store
                            .set_exited(&name, "test", Some(1), true)
                            .expect("crash");
                        store.schedule_restart(&name, 1).expect("restart");
                    }
                    if i % 5 == 0 {
                        store.delete(&name, true).expect("delete");
                    }
                }
                contested_wins
            })
        })
        .collect();
    let wins: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(wins, PER_THREAD);
    let deleted = (0..PER_THREAD).filter(|i| i % 5 == 0).count() * THREADS;
    let (vms, events) = check_consistent(&store);
    assert_eq!(vms, THREADS * PER_THREAD - deleted + PER_THREAD);
    // created + started per VM, paused on evens, crashed + restarted every third, deleted
    // every fifth, and one created per contested name.
    let per_thread: usize = (0..PER_THREAD)
        .map(|i| {
            2 + usize::from(i % 2 == 0) + 2 * usize::from(i % 3 == 0) + usize::from(i % 5 == 0)
        })
        .sum();
    assert_eq!(events, THREADS * per_thread + PER_THREAD);
}
