//! VM lifecycle: the one place that starts, stops and watches VMM processes for the API.
//!
//! A [`Manager`] ties the [`Store`] (what each VM is and should be), the
//! [`launcher`](crate::launcher) (one VMM process per VM), the [`Supervisor`] (every VMM's exit,
//! noticed at once) and each VMM's control socket together:
//!
//! - **Operations** (start, shutdown, kill, reboot, pause, resume, stats, delete) run with the
//!   VM's lock held ([`Manager::lock_vm`]), so two operations on one VM never interleave; the
//!   blocking work (launching, waiting for an exit) runs on the caller's blocking thread.
//! - **Exits** are recorded by the exit thread as the supervisor reports them, without the VM
//!   lock (a shutdown holding the lock waits for exactly that record): state `crashed`,
//!   `stopped` or `exited` with the reason, then the restart policy decides.
//! - **Restarts** wait on the restart thread until their back-off has passed, then take the VM
//!   lock and start it again if it is still wanted.
//! - **Recovery** ([`Manager::recover`]): a new daemon re-adopts the VMMs the store says are
//!   running (same pid, same start time, control socket answering), records the ones that died
//!   while no daemon watched, and re-schedules pending restarts. Guests keep running across a
//!   daemon restart.

use crate::cgroup::{check_without_cgroups, CgroupRoot, LimitError, Unavailable};
use crate::console_hub::{Attachment, ConsoleHub};
use crate::error::StoreError;
use crate::launcher::{self, control_answers, LaunchError, LaunchSpec, VmPaths};
use crate::process::{self, proc_rss, process_matches, vcpu_cpu_times};
use crate::store::{now_millis, Store, VmRecord};
use crate::supervisor::{
    is_crash, restart_decision, ExitKind, ExitNotice, ExitReport, ExitStatusKind, Supervisor,
};
use crate::sync::lock;
use api::control::{VmCommand, VmResponse, VmmStats};
use api::{DesiredState, VmState};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::OwnedMutexGuard;

/// Default time a guest gets to power off after the ACPI power button.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a VMM gets to exit after `stop` before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Time the kernel gets to end a killed VMM.
const KILL_WAIT: Duration = Duration::from_secs(15);

/// How the manager runs VMMs.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// The `ferrovisor` binary started as `ferrovisor run`.
    pub binary: PathBuf,
    /// Where each VM's run directory (`<id>/`: config, sockets, exit report, log) goes.
    pub run_dir: PathBuf,
    /// How long [`launcher::launch`] waits for a VMM's control socket.
    pub ready_timeout: Duration,
    /// Where each VM's cgroup goes, or why there are none (limits are then refused).
    pub cgroups: Result<CgroupRoot, Unavailable>,
    /// How VMMs are confined.
    pub jail: JailPolicy,
}

/// How the daemon confines VMMs (`ferrovisor daemon --uid-range --allow-unconfined --require`).
#[derive(Clone, Debug)]
pub struct JailPolicy {
    /// The uids (and gids) VMs are given, one each.
    pub uid_range: std::ops::RangeInclusive<u32>,
    /// Walls VMs run without (the operator's explicit choice).
    pub skip: Vec<jail::Wall>,
    /// Host-dependent walls without which a VM must not start.
    pub require: Vec<jail::Wall>,
}

impl Default for JailPolicy {
    fn default() -> Self {
        JailPolicy {
            uid_range: jail::DEFAULT_UID_RANGE,
            skip: Vec::new(),
            require: Vec::new(),
        }
    }
}

impl JailPolicy {
    /// Checks a policy before the daemon starts: the uid range holds at least
    /// [`MIN_UID_RANGE`] ids, none 0 and none an account or group of this host; no wall both
    /// required and skipped.
    pub fn validate(&self) -> Result<(), String> {
        let (lo, hi) = (*self.uid_range.start(), *self.uid_range.end());
        if lo == 0 || hi < lo {
            return Err(format!(
                "--uid-range {lo}-{hi}: must be FIRST-LAST with 0 < FIRST <= LAST"
            ));
        }
        if u64::from(hi) - u64::from(lo) + 1 < MIN_UID_RANGE {
            return Err(format!(
                "--uid-range {lo}-{hi}: too small; give at least {MIN_UID_RANGE} ids (one per VM)"
            ));
        }
        if let Some(id) = jail::host_ids().range(lo..=hi).next() {
            return Err(format!(
                "--uid-range {lo}-{hi}: overlaps this host's users or groups (id {id} is in                  /etc/passwd or /etc/group); choose ids no account uses, e.g. 900000-965535"
            ));
        }
        for w in &self.require {
            if self.skip.contains(w) {
                return Err(format!(
                    "--require {w} and --allow-unconfined {w} contradict each other"
                ));
            }
            if !w.host_dependent() {
                return Err(format!(
                    "--require {w}: {w} is always required (only landlock, cgroups, apparmor and                      selinux depend on the host)"
                ));
            }
        }
        Ok(())
    }
}

/// The fewest uids a `--uid-range` may hold.
pub const MIN_UID_RANGE: u64 = 16;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The store refused or failed (not found, conflict, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VMM could not be started; the VM is left `crashed` with the reason.
    #[error("VM {vm}: the VMM did not start: {reason}")]
    Launch {
        /// The VM's name.
        vm: String,
        /// Why (the VMM's own message when it gave one).
        reason: String,
    },
    /// The VMM's control socket refused or failed.
    #[error("VM {vm}: the VMM refused {action}: {reason}")]
    Control {
        /// The VM's name.
        vm: String,
        /// What was asked.
        action: &'static str,
        /// Its answer.
        reason: String,
    },
    /// The daemon itself failed.
    #[error("{0}")]
    Internal(String),
}

/// The VM lifecycle manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    cfg: ManagerConfig,
    supervisor: Supervisor,
    rt: tokio::runtime::Handle,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped on every recorded exit; waiters re-read the store.
    exits: (Mutex<u64>, Condvar),
    restarts: (Mutex<RestartQueue>, Condvar),
    consoles: Mutex<HashMap<String, ConsoleHub>>,
    changed: Arc<tokio::sync::Notify>,
    /// Who asked for each stop in progress (an API caller), by VM id: the exit it causes is
    /// recorded as theirs (`"by"`), though the exit thread records it.
    stoppers: Mutex<HashMap<String, String>>,
    /// SELinux MCS category pairs held by running VMs (where the host has SELinux).
    mcs: Mutex<(
        jail::selinux::McsAllocator,
        HashMap<String, jail::selinux::McsPair>,
    )>,
}

/// Restarts due, earliest first: (when, VM id).
type RestartQueue = BinaryHeap<Reverse<(Instant, String)>>;

fn conflict(rec: &VmRecord, action: &'static str) -> OpError {
    OpError::Store(StoreError::Conflict {
        vm: rec.name.clone(),
        state: rec.runtime.state,
        action,
    })
}

/// Why a VMM ended, in words, and its exit code when known.
pub fn describe_exit(status: ExitStatusKind, report: Option<&ExitReport>) -> (String, Option<i32>) {
    let code = match status {
        ExitStatusKind::Exited(c) => Some(c),
        _ => report.map(|r| r.exit_code),
    };
    let text = match (status, report) {
        (ExitStatusKind::Signaled(sig), _) => {
            format!("killed by signal {sig} ({})", signal_name(sig))
        }
        (_, Some(r)) => {
            let what = match r.reason {
                ExitKind::Poweroff => "the guest powered off".to_string(),
                ExitKind::Reset => "the guest rebooted".to_string(),
                ExitKind::Panic => "the guest kernel panicked".to_string(),
                ExitKind::Fault => "KVM could not run the guest".to_string(),
                ExitKind::Stopped => "the VMM was stopped".to_string(),
                ExitKind::Signal => format!(
                    "the VMM ended on signal {}",
                    r.signal.map(signal_name).unwrap_or("?")
                ),
                ExitKind::Error => "the VMM failed".to_string(),
            };
            match &r.message {
                Some(m) => format!("{what}: {m}"),
                None => what,
            }
        }
        (ExitStatusKind::Exited(c), None) => format!("the VMM exited with code {c}"),
        (ExitStatusKind::Unknown, None) => {
            "the VMM ended without an exit report (killed: SIGKILL or the OOM killer)".to_string()
        }
    };
    (text, code)
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        _ => "signal",
    }
}

fn millis_to_system(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Manager {
    /// A manager over `store`; `changed` is woken after every change it records (the API's
    /// event streams wait on it). Starts the exit and restart threads; call [`Manager::recover`]
    /// next.
    pub fn new(
        store: Arc<Store>,
        cfg: ManagerConfig,
        rt: tokio::runtime::Handle,
        changed: Arc<tokio::sync::Notify>,
    ) -> std::io::Result<Manager> {
        std::fs::create_dir_all(&cfg.run_dir)?;
        let (supervisor, notices) = Supervisor::new()?;
        let inner = Arc::new(Inner {
            store,
            cfg,
            supervisor,
            rt,
            locks: Mutex::new(HashMap::new()),
            exits: (Mutex::new(0), Condvar::new()),
            restarts: (Mutex::new(BinaryHeap::new()), Condvar::new()),
            consoles: Mutex::new(HashMap::new()),
            changed,
            stoppers: Mutex::new(HashMap::new()),
            mcs: Mutex::new((jail::selinux::McsAllocator::new(), HashMap::new())),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("fv-exits".into())
            .spawn(move || exit_thread(&weak, &notices))?;
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("fv-restarts".into())
            .spawn(move || restart_thread(&weak))?;
        Ok(Manager { inner })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// Whether `resources` can be applied to a VM with `config` on this host.
    pub fn check_resources(
        &self,
        resources: &api::Resources,
        config: &config::VmConfig,
    ) -> Result<(), LimitError> {
        match &self.inner.cfg.cgroups {
            Ok(root) => root.check(resources, config),
            Err(why) => check_without_cgroups(resources, why),
        }
    }

    /// The cgroup set-up: where VM cgroups go, or why there are none.
    pub fn cgroups(&self) -> &Result<CgroupRoot, Unavailable> {
        &self.inner.cfg.cgroups
    }

    /// The cgroup counters of VM `id`, when it has a cgroup.
    pub fn cgroup_stats(&self, id: &str) -> Option<crate::cgroup::CgroupStats> {
        let root = self.inner.cfg.cgroups.as_ref().ok()?;
        root.open_existing(id).ok().flatten().map(|c| c.stats())
    }

    /// The run directory of VM `id`.
    pub fn vm_paths(&self, id: &str) -> VmPaths {
        VmPaths::new(&self.inner.cfg.run_dir.join(id))
    }

    /// Takes the lock of one VM (its id; `name:NAME` while creating one). Operations on a VM
    /// hold it throughout, so they run one after the other in arrival order (tokio's mutex is
    /// fair) while other VMs proceed.
    pub async fn lock_vm(&self, key: &str) -> OwnedMutexGuard<()> {
        self.lock_entry(key).lock_owned().await
    }

    fn lock_vm_blocking(&self, key: &str) -> OwnedMutexGuard<()> {
        self.lock_entry(key).blocking_lock_owned()
    }

    fn lock_entry(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = lock(&self.inner.locks);
        // Drop the entries no one holds or waits for (only the map refers to them).
        map.retain(|_, m| Arc::strong_count(m) > 1);
        Arc::clone(map.entry(key.to_string()).or_default())
    }

    fn changed(&self) {
        self.inner.changed.notify_waiters();
    }

    /// Re-adopts running VMMs after a daemon (re)start, records the ones that ended while no
    /// daemon watched them (and applies their restart policy), re-schedules pending restarts
    /// and starts VMs created with `start` whose start never happened. Returns how many VMMs
    /// were adopted.
    pub fn recover(&self) -> Result<usize, OpError> {
        let mut adopted = 0;
        for rec in self.inner.store.list()? {
            let name = rec.name.clone();
            match self.recover_one(rec) {
                Ok(true) => adopted += 1,
                Ok(false) => {}
                // One VM's trouble must not keep the daemon (and every other VM) down.
                Err(e) => tracing::error!("VM {name}: recovering it: {e}"),
            }
        }
        self.changed();
        Ok(adopted)
    }

    /// An adopted VMM keeps the MCS categories it runs with (SELinux hosts): none is handed
    /// to another VM while it holds them.
    fn hold_mcs(&self, id: &str, pid: u32) {
        let Ok(ctx) = std::fs::read_to_string(format!("/proc/{pid}/attr/current")) else {
            return;
        };
        if let Some(pair) = jail::selinux::parse_categories(ctx.trim_end_matches(['\0', '\n'])) {
            let mut m = lock(&self.inner.mcs);
            if m.0.hold(pair).is_ok() {
                m.1.insert(id.to_string(), pair);
            }
        }
    }

    /// [`Manager::recover`] for one VM; `Ok(true)` when its VMM was adopted.
    fn recover_one(&self, rec: VmRecord) -> Result<bool, OpError> {
        let mut adopted = false;
        {
            let id = rec.id.to_string();
            let _guard = self.lock_vm_blocking(&id);
            let paths = self.vm_paths(&id);
            let rt = &rec.runtime;
            match rt.state {
                VmState::Running | VmState::Paused | VmState::Stopping => {
                    let (Some(pid), Some(start), Some(control)) =
                        (rt.pid, rt.pid_start_time, rt.control_socket.clone())
                    else {
                        self.record_lost(&rec, &paths, "no pid was recorded")?;
                        return Ok(false);
                    };
                    match self.inner.supervisor.adopt(
                        id.clone(),
                        pid,
                        start,
                        &control,
                        paths.exit_report.clone(),
                    ) {
                        Ok(()) => {
                            adopted = true;
                            self.inner.store.record_adopted(&id)?;
                            self.hold_mcs(&id, pid);
                            if let Some(console) = &rt.console_socket {
                                self.spawn_console(&id, console);
                            }
                            if rt.state == VmState::Stopping {
                                // The old daemon died during a stop: finish it.
                                self.inner.supervisor.expect_exit(&id);
                                let _ = send(&control, &VmCommand::Stop);
                            }
                        }
                        Err(e) => self.record_lost(&rec, &paths, &e.to_string())?,
                    }
                }
                VmState::Starting => {
                    // The daemon died while launching: a VMM may have come up unrecorded.
                    if control_answers(&paths.control) {
                        let _ = send(&paths.control, &VmCommand::Stop);
                    }
                    self.inner.store.set_exited(
                        &id,
                        "the daemon stopped while the VM was starting",
                        None,
                        true,
                    )?;
                    if rec.desired_state == DesiredState::Running {
                        let now = now_millis();
                        self.inner.store.schedule_restart(&id, now)?;
                        self.queue_restart(&id, now);
                    }
                }
                VmState::Created | VmState::Crashed | VmState::Exited | VmState::Stopped => {
                    if rec.desired_state == DesiredState::Running {
                        if let Some(at) = rt.next_restart_at {
                            self.queue_restart(&id, at);
                        } else if rt.state == VmState::Created {
                            self.queue_restart(&id, now_millis());
                        }
                    }
                }
            }
        }
        self.changed();
        Ok(adopted)
    }

    /// A VMM the store says runs is gone: record how it ended (from its exit report) and let
    /// the restart policy decide.
    fn record_lost(&self, rec: &VmRecord, paths: &VmPaths, why: &str) -> Result<(), OpError> {
        let report = ExitReport::read(&paths.exit_report).ok().flatten();
        let stop_requested = rec.runtime.state == VmState::Stopping;
        let notice = ExitNotice {
            vm_id: rec.id.to_string(),
            pid: rec.runtime.pid.unwrap_or(0),
            status: ExitStatusKind::Unknown,
            crashed: is_crash(ExitStatusKind::Unknown, report.as_ref(), stop_requested),
            report,
            stop_requested,
        };
        tracing::warn!(
            "VM {}: its VMM is gone ({why}); recording its end",
            rec.name
        );
        handle_exit(
            &self.inner,
            &notice,
            Some("while the daemon was not running"),
        );
        Ok(())
    }

    fn queue_restart(&self, id: &str, at: i64) {
        queue_restart(&self.inner, id, at);
    }

    fn spawn_console(&self, id: &str, socket: &Path) {
        let log = self.vm_paths(id).dir.join("console.log");
        let hub = ConsoleHub::spawn(&self.inner.rt, socket, &log);
        lock(&self.inner.consoles).insert(id.to_string(), hub);
    }

    /// Attaches to VM `id`'s console. The VM must be running.
    pub fn attach_console(&self, vm: &str) -> Result<(VmRecord, Attachment), OpError> {
        let rec = self.inner.store.get(vm)?;
        if !matches!(
            rec.runtime.state,
            VmState::Running | VmState::Paused | VmState::Stopping
        ) {
            return Err(conflict(&rec, "attach to its console (it is not running)"));
        }
        let consoles = lock(&self.inner.consoles);
        let hub = consoles
            .get(rec.id.as_str())
            .ok_or_else(|| conflict(&rec, "attach to its console (not connected yet)"))?;
        let a = hub.attach();
        Ok((rec, a))
    }

    /// How VM `rec`'s VMM is confined, or why it must not start (a wall that is on cannot
    /// go up: fail closed).
    fn jail_for(&self, rec: &VmRecord) -> Result<Option<launcher::LaunchJail>, String> {
        use jail::Wall;
        let policy = &self.inner.cfg.jail;
        let probe = jail::probe();
        let status = |w: Wall| probe.iter().find(|s| s.wall == w);
        for w in [
            Wall::Namespaces,
            Wall::Filesystem,
            Wall::Identity,
            Wall::Seccomp,
        ] {
            if policy.skip.contains(&w) {
                continue;
            }
            if let Some(s) = status(w).filter(|s| !s.available) {
                return Err(format!(
                    "the {w} wall cannot go up: {} (`ferrovisor daemon --allow-unconfined {w}` \
                     runs VMs without it)",
                    s.detail
                ));
            }
        }
        for w in &policy.require {
            let missing = match w {
                Wall::Cgroups => self.inner.cfg.cgroups.as_ref().err().map(|e| e.to_string()),
                w => status(*w)
                    .filter(|s| !s.available)
                    .map(|s| s.detail.clone()),
            };
            if let Some(why) = missing {
                return Err(format!(
                    "the {w} wall is required (--require) but cannot go up: {why}"
                ));
            }
        }
        let exec_label = match self.apparmor_label(rec)? {
            Some(l) => Some(l),
            None => self.selinux_label(rec)?,
        };
        let vmm_skip: Vec<Wall> = policy.skip.iter().copied().filter(|w| w.in_vmm()).collect();
        if Wall::ALL
            .iter()
            .filter(|w| w.in_vmm())
            .all(|w| vmm_skip.contains(w))
        {
            return Ok(None);
        }
        let mut taken = jail::host_ids();
        taken.extend(jail::running_uids());
        let uid = self
            .inner
            .store
            .assign_uid(rec.id.as_str(), policy.uid_range.clone(), &taken)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "the identity wall cannot go up: every uid of --uid-range {}-{} is taken",
                    policy.uid_range.start(),
                    policy.uid_range.end()
                )
            })?;
        Ok(Some(launcher::LaunchJail {
            uid,
            gid: uid,
            skip: vmm_skip,
            require: policy
                .require
                .iter()
                .copied()
                .filter(|w| *w == Wall::Landlock)
                .collect(),
            exec_label,
        }))
    }

    /// Where the host has SELinux with our module (and the operator did not turn it off): a
    /// fresh MCS category pair for VM `rec` (never one a running VM holds), its run directory
    /// and read-write disks labelled with it, and the `ferrovisor_vm_t` context for the VMM's
    /// exec. `None` where SELinux is off (an error when `--require selinux`).
    fn selinux_label(&self, rec: &VmRecord) -> Result<Option<(PathBuf, Vec<u8>)>, String> {
        use jail::selinux;
        let policy = &self.inner.cfg.jail;
        if policy.skip.contains(&jail::Wall::Selinux) {
            return Ok(None);
        }
        if let Err(why) = selinux::enabled() {
            return if policy.require.contains(&jail::Wall::Selinux) {
                Err(format!(
                    "the selinux wall is required (--require) but cannot go up: {why}"
                ))
            } else {
                Ok(None)
            };
        }
        let wall = |e: String| format!("the selinux wall cannot go up: {e}");
        let pair = {
            let mut m = lock(&self.inner.mcs);
            if let Some(old) = m.1.remove(rec.id.as_str()) {
                m.0.release(old);
            }
            let pair = m.0.allocate().map_err(|e| wall(e.to_string()))?;
            m.1.insert(rec.id.to_string(), pair);
            pair
        };
        let dir = self.vm_paths(rec.id.as_str()).dir;
        selinux::set_file_context(&dir, &selinux::run_dir_context(pair))
            .map_err(|e| wall(format!("labelling {}: {e}", dir.display())))?;
        for d in rec.config.disks.iter().filter(|d| !d.readonly) {
            selinux::set_file_context(&d.path, &selinux::image_context(pair))
                .map_err(|e| wall(format!("labelling {}: {e}", d.path.display())))?;
        }
        Ok(Some((
            selinux::attr_exec_path(),
            selinux::exec_label_for_child(pair).into_bytes(),
        )))
    }

    /// Where the host has AppArmor (and the operator did not turn it off): VM `rec`'s own
    /// profile `ferrovisor-<id>`, allowing exactly its files, loaded now; the VMM enters it at
    /// exec. `None` where AppArmor is off (an error when `--require apparmor`).
    fn apparmor_label(&self, rec: &VmRecord) -> Result<Option<(PathBuf, Vec<u8>)>, String> {
        use jail::apparmor;
        let policy = &self.inner.cfg.jail;
        if policy.skip.contains(&jail::Wall::Apparmor) {
            return Ok(None);
        }
        if let Err(why) = apparmor::enabled() {
            return if policy.require.contains(&jail::Wall::Apparmor) {
                Err(format!(
                    "the apparmor wall is required (--require) but cannot go up: {why}"
                ))
            } else {
                Ok(None)
            };
        }
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let c = &rec.config;
        let mut files = apparmor::VmFiles {
            binary: canon(&self.inner.cfg.binary),
            run_dir: canon(&self.vm_paths(rec.id.as_str()).dir),
            ..Default::default()
        };
        for p in [&c.kernel, &c.initrd, &c.firmware].into_iter().flatten() {
            files.read_only.push(canon(p));
        }
        for d in &c.disks {
            if d.readonly {
                files.read_only.push(canon(&d.path));
            } else {
                files.read_write.push(canon(&d.path));
            }
        }
        let wall = |e: String| format!("the apparmor wall cannot go up: {e}");
        let profile =
            apparmor::VmProfile::new(rec.id.as_str(), &files).map_err(|e| wall(e.to_string()))?;
        apparmor::load(&profile.text).map_err(|e| wall(e.to_string()))?;
        tracing::info!("VM {}: AppArmor profile {} loaded", rec.name, profile.name);
        Ok(Some((
            apparmor::attr_exec_path(),
            apparmor::exec_label_for_child(&profile.name).into_bytes(),
        )))
    }

    /// Starts VM `id` (the caller holds its lock). `by_user`: a user's start (sets the desired
    /// state, which a failed start resets to `stopped`); otherwise a restart by policy.
    pub fn start(&self, id: &str, by_user: bool) -> Result<VmRecord, OpError> {
        let store = &self.inner.store;
        let rec = store.get(id)?;
        if rec.runtime.state.is_live() {
            return Err(conflict(&rec, "start it (it is already running)"));
        }
        if by_user {
            store.set_desired(id, DesiredState::Running)?;
        }
        store.set_state(id, VmState::Starting)?;
        self.changed();
        let paths = self.vm_paths(id);
        let mut spec = LaunchSpec::new(
            self.inner.cfg.binary.clone(),
            paths.dir.clone(),
            rec.config.clone(),
        );
        spec.ready_timeout = self.inner.cfg.ready_timeout;
        // Its own cgroup (limits, accounting) whenever the host has cgroups v2; the VMM joins
        // it before it execs.
        let launched = match &self.inner.cfg.cgroups {
            Ok(root) => match root.create(id, &rec.resources) {
                Ok(cg) => {
                    spec.cgroup_procs = Some(cg.procs_path());
                    Ok(())
                }
                Err(e) if rec.resources.is_empty() => {
                    tracing::warn!("VM {}: no cgroup ({e}); running it without", rec.name);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
            Err(why) if !rec.resources.is_empty() => {
                Err(format!("its resource limits cannot be applied: {why}"))
            }
            Err(_) => Ok(()),
        };
        let launched = launched.and_then(|()| {
            spec.jail = self.jail_for(&rec)?;
            Ok(())
        });
        let launched = match launched {
            Ok(()) => launcher::launch(&spec),
            Err(reason) => {
                if by_user {
                    store.set_desired(id, DesiredState::Stopped)?;
                }
                store.set_exited(id, &format!("failed to start: {reason}"), None, true)?;
                self.changed();
                return Err(OpError::Launch {
                    vm: rec.name,
                    reason,
                });
            }
        };
        let l = match launched {
            Ok(l) => l,
            Err(LaunchError::Exited {
                pid,
                start_time,
                status,
                ..
            }) if ExitReport::read(&paths.exit_report)
                .ok()
                .flatten()
                .is_some_and(|r| r.reason != ExitKind::Error) =>
            {
                // The guest ran and ended before the control socket was even polled (a
                // power-off at once, a panic): a start followed by an exit, not a failure.
                let report = ExitReport::read(&paths.exit_report).ok().flatten();
                let status = ExitStatusKind::from(status);
                store.set_running(id, pid, start_time, &paths.control, None)?;
                let notice = ExitNotice {
                    vm_id: id.to_string(),
                    pid,
                    status,
                    crashed: is_crash(status, report.as_ref(), false),
                    report,
                    stop_requested: false,
                };
                handle_exit(&self.inner, &notice, Some("right after it started"));
                return Ok(store.get(id)?);
            }
            Err(e) => {
                let reason = e.to_string();
                if by_user {
                    store.set_desired(id, DesiredState::Stopped)?;
                }
                store.set_exited(id, &format!("failed to start: {reason}"), None, true)?;
                if !by_user {
                    schedule_after_failure(&self.inner, id);
                }
                self.changed();
                return Err(OpError::Launch {
                    vm: rec.name,
                    reason,
                });
            }
        };
        let rec = match store.set_running(
            id,
            l.pid,
            l.start_time,
            &l.paths.control,
            Some(&l.paths.console),
        ) {
            Ok(r) => r,
            Err(e) => {
                // Not recorded means not supervised: it must not run. (Our unreaped child:
                // its pid cannot have been reused.)
                let _ = process::kill(l.pid, libc::SIGKILL);
                let _ = self.inner.supervisor.watch(
                    id.to_string(),
                    l.pid,
                    l.start_time,
                    l.paths.exit_report.clone(),
                    true,
                );
                return Err(e.into());
            }
        };
        if let Err(e) = self.inner.supervisor.watch(
            id.to_string(),
            l.pid,
            l.start_time,
            l.paths.exit_report.clone(),
            true,
        ) {
            // Unwatched VMMs must not exist: end it (it is our child; it will be reaped by
            // the next watch or at daemon exit).
            let _ = process::kill(l.pid, libc::SIGKILL);
            store.set_exited(id, &format!("could not be watched: {e}"), None, true)?;
            self.changed();
            return Err(OpError::Internal(e.to_string()));
        }
        self.spawn_console(id, &l.paths.console);
        self.changed();
        Ok(rec)
    }

    /// Waits until VM `id` is no longer live (its exit recorded), at most `timeout`.
    fn wait_exit(&self, id: &str, timeout: Duration) -> Result<Option<VmRecord>, OpError> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &self.inner.exits;
        loop {
            let seen = *lock(m);
            let rec = self.inner.store.get(id)?;
            if !rec.runtime.state.is_live() {
                return Ok(Some(rec));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(Duration::from_millis(250));
            let g = lock(m);
            if *g == seen {
                let _ = cv.wait_timeout(g, wait);
            }
        }
    }

    /// Sends SIGKILL to the VMM of `rec` if it is still that process.
    fn kill_vmm(rec: &VmRecord) {
        if let (Some(pid), Some(start)) = (rec.runtime.pid, rec.runtime.pid_start_time) {
            // The pid is still the VMM's if its start time is (checked just now).
            if process_matches(pid, start) {
                let _ = process::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Ends the VMM of a VM whose stop is recorded (`stopping`): `stop` on its control socket,
    /// then SIGKILL; returns once its exit is recorded.
    fn finish_stop(&self, rec: &VmRecord) -> Result<VmRecord, OpError> {
        let id = rec.id.as_str();
        if let Some(control) = &rec.runtime.control_socket {
            // Any answer (even a refusal) means the VMM still listens: give it the grace time.
            if send(control, &VmCommand::Stop).is_ok() {
                if let Some(r) = self.wait_exit(id, STOP_GRACE)? {
                    return Ok(r);
                }
            }
        }
        Self::kill_vmm(rec);
        self.wait_exit(id, KILL_WAIT)?.ok_or_else(|| {
            OpError::Internal(format!(
                "VM {}: its VMM (pid {:?}) did not end {} s after SIGKILL",
                rec.name,
                rec.runtime.pid,
                KILL_WAIT.as_secs()
            ))
        })
    }

    /// Records a stop and tells the supervisor it is expected.
    fn begin_stop(&self, rec: &VmRecord, desired: DesiredState) -> Result<VmRecord, OpError> {
        let id = rec.id.as_str();
        self.inner.store.set_desired(id, desired)?;
        self.inner.supervisor.expect_exit(id);
        if let Some(by) = crate::store::current_actor() {
            lock(&self.inner.stoppers).insert(id.to_string(), by);
        }
        match self.inner.store.set_state(id, VmState::Stopping) {
            Ok(r) => {
                self.changed();
                Ok(r)
            }
            Err(e) => {
                self.inner.supervisor.cancel_expect_exit(id);
                lock(&self.inner.stoppers).remove(id);
                Err(e.into())
            }
        }
    }

    /// Shuts VM `id` down: the ACPI power button, up to `timeout` for the guest to power
    /// off, then `stop`, then SIGKILL. Returns the VM once its VMM has ended.
    pub fn shutdown(&self, id: &str, timeout: Duration) -> Result<VmRecord, OpError> {
        let rec = self.inner.store.get(id)?;
        if let Some(r) = self.stop_wanting(&rec, "shut it down (it is not running)")? {
            return Ok(r);
        }
        let rec = self.begin_stop(&rec, DesiredState::Stopped)?;
        if let Some(control) = &rec.runtime.control_socket {
            // A parked guest cannot see the button.
            let _ = send(control, &VmCommand::Resume);
            if matches!(send(control, &VmCommand::Shutdown), Ok(Ok(_))) {
                if let Some(r) = self.wait_exit(id, timeout)? {
                    return Ok(r);
                }
                tracing::info!(
                    "VM {}: no power-off {} s after the power button; stopping it",
                    rec.name,
                    timeout.as_secs()
                );
            }
        }
        self.finish_stop(&rec)
    }

    /// For a stop of a VM that is not running: when it is down but wanted running (a restart
    /// by its policy is pending), the stop means "stop wanting it" and cancels the restart
    /// (`Ok(Some)`); when it is down and wanted down, the stop is refused. `Ok(None)`: it runs.
    fn stop_wanting(
        &self,
        rec: &VmRecord,
        refusal: &'static str,
    ) -> Result<Option<VmRecord>, OpError> {
        match rec.runtime.state {
            VmState::Running | VmState::Paused => Ok(None),
            VmState::Created | VmState::Crashed | VmState::Exited | VmState::Stopped
                if rec.desired_state == DesiredState::Running =>
            {
                let r = self
                    .inner
                    .store
                    .set_desired(rec.id.as_str(), DesiredState::Stopped)?;
                self.changed();
                Ok(Some(r))
            }
            _ => Err(conflict(rec, refusal)),
        }
    }

    /// Kills VM `id`'s VMM (SIGKILL) and returns once its end is recorded.
    pub fn kill(&self, id: &str) -> Result<VmRecord, OpError> {
        let rec = self.inner.store.get(id)?;
        if let Some(r) = self.stop_wanting(&rec, "kill it (it is not running)")? {
            return Ok(r);
        }
        let rec = self.begin_stop(&rec, DesiredState::Stopped)?;
        Self::kill_vmm(&rec);
        self.wait_exit(id, KILL_WAIT)?.ok_or_else(|| {
            OpError::Internal(format!(
                "VM {}: its VMM did not end {} s after SIGKILL",
                rec.name,
                KILL_WAIT.as_secs()
            ))
        })
    }

    /// Reboots VM `id` the hard way: its VMM is stopped (the guest is not asked) and a new one
    /// starts from the same config. The desired state stays `running`.
    pub fn reboot(&self, id: &str) -> Result<VmRecord, OpError> {
        let rec = self.inner.store.get(id)?;
        if !matches!(rec.runtime.state, VmState::Running | VmState::Paused) {
            return Err(conflict(&rec, "reboot it (it is not running)"));
        }
        let rec = self.begin_stop(&rec, DesiredState::Running)?;
        self.finish_stop(&rec)?;
        self.start(id, false)
    }

    /// Sends `command` to the VMM of `rec` and returns its answer; a refusal or no answer is
    /// [`OpError::Control`].
    fn control(&self, rec: &VmRecord, command: VmCommand) -> Result<VmResponse, OpError> {
        let control = rec.runtime.control_socket.as_ref().ok_or_else(|| {
            OpError::Internal(format!("VM {}: no control socket recorded", rec.name))
        })?;
        let refused = |reason: String| OpError::Control {
            vm: rec.name.clone(),
            action: command.name(),
            reason,
        };
        match send(control, &command) {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(reason)) => Err(refused(reason)),
            Err(e) => Err(refused(e.to_string())),
        }
    }

    /// Pauses VM `id` (its vCPUs park; the VMM keeps running).
    pub fn pause(&self, id: &str) -> Result<VmRecord, OpError> {
        let rec = self.inner.store.get(id)?;
        if rec.runtime.state != VmState::Running {
            return Err(conflict(&rec, "pause it (it is not running)"));
        }
        self.control(&rec, VmCommand::Pause)?;
        let r = self.inner.store.set_state(id, VmState::Paused)?;
        self.changed();
        Ok(r)
    }

    /// Resumes paused VM `id`.
    pub fn resume(&self, id: &str) -> Result<VmRecord, OpError> {
        let rec = self.inner.store.get(id)?;
        if rec.runtime.state != VmState::Paused {
            return Err(conflict(&rec, "resume it (it is not paused)"));
        }
        self.control(&rec, VmCommand::Resume)?;
        let r = self.inner.store.set_state(id, VmState::Running)?;
        self.changed();
        Ok(r)
    }

    /// Deletes VM `id`; `force` first kills a running VMM. Its run directory goes too.
    pub fn delete(&self, id: &str, force: bool) -> Result<VmRecord, OpError> {
        let rec = self.inner.store.get(id)?;
        if rec.runtime.state.is_live() && force {
            if rec.runtime.state == VmState::Stopping {
                self.finish_stop(&rec)?;
            } else {
                self.kill(id)?;
            }
        }
        let gone = self.inner.store.delete(id, false)?;
        remove_cgroup(&self.inner, id);
        // Its AppArmor profile goes with it (where one was loaded).
        if jail::apparmor::enabled().is_ok() {
            if let Err(e) = jail::apparmor::unload(&format!(
                "{}{}",
                jail::apparmor::PROFILE_PREFIX,
                gone.id.as_str()
            )) {
                tracing::warn!("VM {}: unloading its AppArmor profile: {e}", gone.name);
            }
        }
        let dir = self.vm_paths(id).dir;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
        self.changed();
        Ok(gone)
    }

    /// VM `id`'s counters: from its VMM (exits, devices, RSS, balloon) and from /proc (vCPU
    /// thread CPU time).
    pub fn stats(&self, vm: &str) -> Result<api::VmStats, OpError> {
        let rec = self.inner.store.get(vm)?;
        let (true, Some(pid)) = (rec.runtime.state.is_live(), rec.runtime.pid) else {
            return Err(conflict(&rec, "report its stats (it is not running)"));
        };
        let VmResponse::Stats(answer) = self.control(&rec, VmCommand::Stats)? else {
            return Err(OpError::Internal(format!(
                "VM {}: its VMM answered stats with something else",
                rec.name
            )));
        };
        let mut stats = stats_from(&rec, pid, *answer);
        stats.cgroup = self
            .cgroup_stats(rec.id.as_str())
            .map(|c| api::CgroupUsage {
                memory_bytes: c.memory_current,
                cpu_usage_usec: c.cpu_usage_usec,
                pids: c.pids_current,
                oom_kills: c.memory_events_oom_kill,
            });
        Ok(stats)
    }
}

/// The API's stats from a VMM's `stats` answer and /proc (vCPU thread CPU times, and the
/// RSS when the VMM could not read its own).
pub fn stats_from(rec: &VmRecord, pid: u32, answer: VmmStats) -> api::VmStats {
    let times = vcpu_cpu_times(pid);
    let vcpus = answer
        .vcpus
        .into_iter()
        .map(|v| api::VcpuStats {
            cpu_time_ms: times.get(&v.vcpu).copied(),
            ..v
        })
        .collect();
    api::VmStats {
        id: rec.id.to_string(),
        name: rec.name.clone(),
        state: rec.runtime.state,
        pid,
        uptime_ms: answer.uptime_ms,
        rss_bytes: answer.rss_bytes.or_else(|| proc_rss(pid)),
        memory_bytes: rec.config.memory.0,
        vcpus,
        devices: answer.devices,
        cgroup: None,
        balloon: answer.balloon,
    }
}

/// Sends `command` to the VMM whose control socket is `path` (the protocol's default timeout).
fn send(
    path: &Path,
    command: &VmCommand,
) -> Result<api::control::VmReply, api::control::ControlError> {
    api::control::send(path, command, api::control::DEFAULT_TIMEOUT)
}

/// Records one VMM exit and applies the restart policy. `context` is added to the reason.
fn handle_exit(inner: &Arc<Inner>, notice: &ExitNotice, context: Option<&str>) {
    let (mut reason, code) = describe_exit(notice.status, notice.report.as_ref());
    if notice.status == ExitStatusKind::Signaled(libc::SIGSYS) {
        // Its seccomp filter killed it (or someone sent it SIGSYS, which a confined VMM turns
        // into the same kill).
        reason = format!(
            "seccomp violation: {}",
            jail::seccomp::violation(notice.pid)
        );
    }
    if let Some(c) = context {
        reason = format!("{reason} ({c})");
    }
    // A notice about a VMM the VM no longer runs (its record holds another pid) changes
    // nothing: not the record, not the running VMM's console hub or cgroup.
    if let Ok(rec) = inner.store.get(&notice.vm_id) {
        if rec.runtime.pid.is_some_and(|p| p != notice.pid) {
            tracing::warn!(
                "VM {}: ignoring the exit of pid {}, which it no longer runs",
                notice.vm_id,
                notice.pid
            );
            return;
        }
    }
    // A stop someone asked for is theirs in the log; any other end is the daemon's own record
    // (even when found during a request, e.g. a guest that powers off as it starts).
    let by = lock(&inner.stoppers).remove(&notice.vm_id);
    crate::store::acting_as(by.as_deref(), || record_exit(inner, notice, &reason, code));
}

/// The part of [`handle_exit`] for a notice about the VMM the VM runs: its console hub,
/// cgroup and MCS pair go, its end is recorded, its restart policy applied.
fn record_exit(inner: &Arc<Inner>, notice: &ExitNotice, reason: &str, code: Option<i32>) {
    lock(&inner.consoles).remove(&notice.vm_id);
    remove_cgroup(inner, &notice.vm_id);
    {
        let mut m = lock(&inner.mcs);
        if let Some(pair) = m.1.remove(&notice.vm_id) {
            m.0.release(pair);
        }
    }
    let rec =
        match inner
            .store
            .set_exited_of(&notice.vm_id, notice.pid, reason, code, notice.crashed)
        {
            Ok(rec) => Some(rec),
            // Deleted, or its end is already recorded.
            Err(StoreError::NotFound(_)) | Err(StoreError::Conflict { .. }) => None,
            Err(e) => {
                tracing::error!("VM {}: recording its exit: {e}", notice.vm_id);
                None
            }
        };
    {
        let (m, cv) = &inner.exits;
        *lock(m) += 1;
        cv.notify_all();
    }
    inner.changed.notify_waiters();
    let Some(rec) = rec else { return };
    tracing::info!("VM {}: {} ({reason})", rec.name, rec.runtime.state);
    if rec.desired_state != DesiredState::Running {
        return;
    }
    let last_start = rec
        .runtime
        .started_at
        .map(millis_to_system)
        .unwrap_or_else(SystemTime::now);
    let Some(delay) = restart_decision(
        rec.restart_policy,
        notice,
        false,
        rec.runtime.restart_count,
        last_start,
    ) else {
        return;
    };
    let up_for = SystemTime::now()
        .duration_since(last_start)
        .unwrap_or_default();
    if up_for >= crate::supervisor::BACKOFF_RESET_AFTER {
        let _ = inner.store.reset_restarts(&notice.vm_id);
    }
    let at = now_millis().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    match inner.store.schedule_restart(&notice.vm_id, at) {
        Ok(_) => queue_restart(inner, &notice.vm_id, at),
        Err(e) => tracing::warn!("VM {}: scheduling its restart: {e}", rec.name),
    }
    inner.changed.notify_waiters();
}

/// Removes VM `id`'s cgroup (its VMM has ended).
fn remove_cgroup(inner: &Inner, id: &str) {
    if let Ok(root) = &inner.cfg.cgroups {
        if let Ok(Some(cg)) = root.open_existing(id) {
            if let Err(e) = cg.remove() {
                tracing::warn!("VM {id}: removing its cgroup: {e}");
            }
        }
    }
}

/// A restart by policy failed to launch: try again after the crash back-off.
fn schedule_after_failure(inner: &Arc<Inner>, id: &str) {
    let Ok(rec) = inner.store.get(id) else { return };
    let n = rec.runtime.restart_count.min(6);
    let delay =
        (crate::supervisor::BACKOFF_START * (1u32 << n)).min(crate::supervisor::BACKOFF_MAX);
    let at = now_millis().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    if inner.store.schedule_restart(id, at).is_ok() {
        queue_restart(inner, id, at);
    }
}

fn queue_restart(inner: &Arc<Inner>, id: &str, at_ms: i64) {
    let in_ms = u64::try_from(at_ms.saturating_sub(now_millis())).unwrap_or(0);
    let due = Instant::now() + Duration::from_millis(in_ms);
    let (m, cv) = &inner.restarts;
    lock(m).push(Reverse((due, id.to_string())));
    cv.notify_all();
}

fn exit_thread(inner: &Weak<Inner>, notices: &Receiver<ExitNotice>) {
    loop {
        match notices.recv_timeout(Duration::from_secs(1)) {
            Ok(notice) => {
                let Some(inner) = inner.upgrade() else { return };
                handle_exit(&inner, &notice, None);
            }
            Err(RecvTimeoutError::Timeout) => {
                if inner.strong_count() == 0 {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn restart_thread(weak: &Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let due: Vec<String> = {
            let (m, cv) = &inner.restarts;
            let mut heap = lock(m);
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(Reverse((at, _))) = heap.peek() {
                if *at > now {
                    break;
                }
                if let Some(Reverse((_, id))) = heap.pop() {
                    due.push(id);
                }
            }
            if due.is_empty() {
                let wait = heap
                    .peek()
                    .map(|Reverse((at, _))| at.saturating_duration_since(now))
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(1));
                let _ = cv.wait_timeout(heap, wait);
            }
            due
        };
        let m = Manager {
            inner: inner.clone(),
        };
        drop(inner);
        for id in due {
            let _guard = m.lock_vm_blocking(&id);
            let Ok(rec) = m.inner.store.get(&id) else {
                continue;
            };
            // Still wanted, still down, still scheduled (a user start or stop since then
            // cleared the schedule)?
            let scheduled =
                rec.runtime.next_restart_at.is_some() || rec.runtime.state == VmState::Created;
            if rec.desired_state != DesiredState::Running
                || rec.runtime.state.is_live()
                || !scheduled
            {
                continue;
            }
            if let Some(at) = rec.runtime.next_restart_at {
                if at > now_millis() + 50 {
                    // Re-scheduled later by someone else; that entry will come.
                    continue;
                }
            }
            match m.start(&id, false) {
                Ok(r) => tracing::info!("VM {}: restarted (pid {:?})", r.name, r.runtime.pid),
                Err(e) => tracing::warn!("restarting VM {id}: {e}"),
            }
        }
    }
}
