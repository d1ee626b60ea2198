//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use config::ByteSize;
use config::VmConfig;
use daemon::{EventKind, Store, VmState};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A directory under the target's scratch space, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "store-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config whose JSON size varies with `n` (so rows span pages now and then).
pub fn config(n: usize) -> VmConfig {
    VmConfig {
        kernel: Some(PathBuf::from(format!(
            "/var/lib/ferrovisor/images/vmlinuz-{n}"
        ))),
        cmdline: format!(
            "console=ttyS0 root=/dev/vda rw {}",
            "quiet ".repeat(n % 300)
        ),
        cpus: 1 + (n % 4) as u32,
        memory: ByteSize(((n % 16) as u64 + 1) << 26),
        rng: n.is_multiple_of(2),
        ..VmConfig::default()
    }
}

/// Reads the whole event log.
pub fn all_events(store: &Store) -> Vec<daemon::Event> {
    store.events_since(0, usize::MAX).expect("events")
}

/// Checks what must hold at every commit point:
/// - event ids strictly increase;
/// - every VM has exactly one `created` event, no `deleted` event, and its last state event
///   agrees with its runtime state (and pid presence);
/// - every VM named by a `deleted` event is gone.
///
/// Events about no VM (`vm_id` None) are ignored. Returns (VM count, event count).
pub fn check_consistent(store: &Store) -> (usize, usize) {
    let vms = store.list().expect("list (every config parses)");
    let events = all_events(store);
    for w in events.windows(2) {
        assert!(w[0].id < w[1].id, "event ids not increasing: {w:?}");
    }
    let mut per_vm: HashMap<&str, Vec<&daemon::Event>> = HashMap::new();
    for e in &events {
        if let Some(id) = &e.vm_id {
            per_vm.entry(id.as_str()).or_default().push(e);
        }
    }
    for vm in &vms {
        let evs = per_vm.get(vm.id.as_str()).cloned().unwrap_or_default();
        let created = evs.iter().filter(|e| e.kind == EventKind::Created).count();
        assert_eq!(created, 1, "VM {} has {created} created events", vm.name);
        assert!(
            !evs.iter().any(|e| e.kind == EventKind::Deleted),
            "VM {} listed but has a deleted event",
            vm.name
        );
        let last = evs
            .iter()
            .rev()
            .map(|e| e.kind)
            .find(|k| *k != EventKind::Adopted)
            .expect("at least created");
        use EventKind as K;
        let ok = match vm.runtime.state {
            VmState::Created => last == K::Created,
            VmState::Starting => matches!(
                last,
                K::Created | K::Stopped | K::Crashed | K::Exited | K::Restarted
            ),
            VmState::Running => matches!(last, K::Started | K::Resumed),
            VmState::Paused => last == K::Paused,
            VmState::Stopping => matches!(last, K::Started | K::Resumed | K::Paused),
            VmState::Stopped => last == K::Stopped,
            VmState::Crashed => matches!(last, K::Crashed | K::Restarted),
            VmState::Exited => matches!(last, K::Exited | K::Restarted),
        };
        assert!(
            ok,
            "VM {}: state {} but last event {last}",
            vm.name, vm.runtime.state
        );
        // A pid (and control socket) while running or paused, none once ended or before the
        // VMM is up; `stopping` has one unless the stop came while starting.
        let rt = &vm.runtime;
        assert_eq!(
            rt.pid.is_some(),
            rt.control_socket.is_some(),
            "VM {}",
            vm.name
        );
        assert_eq!(
            rt.pid.is_some(),
            rt.pid_start_time.is_some(),
            "VM {}",
            vm.name
        );
        match rt.state {
            VmState::Running | VmState::Paused => {
                assert!(rt.pid.is_some(), "VM {}: {} without pid", vm.name, rt.state)
            }
            VmState::Stopping => {}
            s => assert!(rt.pid.is_none(), "VM {}: {s} with a pid", vm.name),
        }
    }
    let listed: std::collections::HashSet<&str> = vms.iter().map(|v| v.id.as_str()).collect();
    for e in &events {
        if e.kind == EventKind::Deleted {
            let id = e.vm_id.as_ref().expect("deleted names a VM");
            assert!(
                !listed.contains(id.as_str()),
                "deleted VM {id} still listed"
            );
        }
    }
    (vms.len(), events.len())
}
