//! Host resource limits through cgroups v2: one child cgroup per VM, holding its VMM process.
//!
//! [`CgroupRoot::detect`] finds the cgroup2 mount and the parent directory the VMs' cgroups go
//! under, and enables the `cpu`, `memory` and `pids` controllers down to it:
//!
//! - with an explicit parent (which must lie inside a cgroup2 mount), that directory;
//! - when the daemon runs in the root cgroup, `<mount>/ferrovisor`;
//! - otherwise (a systemd service with `Delegate=yes`, say) the daemon moves itself into
//!   `<own>/daemon` (a cgroup with processes cannot hand controllers to children: the
//!   "no internal processes" rule) and the VMs go under `<own>/vms`. A daemon already in a
//!   cgroup named `daemon` (detected twice, or re-executed) counts its parent as `<own>`.
//!
//! Each VM then gets `<parent>/vm-<id>` ([`CgroupRoot::create`]) with `cpu.weight`, `cpu.max`,
//! `memory.max` and `pids.max` written from its [`Resources`]; the launcher puts the VMM into
//! it between fork and exec by writing `0` to [`VmCgroup::procs_path`].
//!
//! Hosts where this cannot work (cgroups v1 only; a hybrid hierarchy whose cgroup2 has none of
//! these controllers, like systemd's `unified` mount; no permission) get an [`Unavailable`]
//! that says why and what to do; the daemon still runs VMs without limits there and refuses only
//! VMs that ask for limits ([`check_without_cgroups`]).

use api::Resources;
use config::VmConfig;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// Highest `cpu.weight` (the lowest is 1; the kernel's default is 100).
pub const CPU_WEIGHT_MAX: u32 = 10_000;
/// The `cpu.max` period written with every quota, in microseconds.
pub const CPU_MAX_PERIOD_USEC: u64 = 100_000;
/// What a VMM needs beyond its guest's RAM: `memory.max` must be at least guest memory + this.
pub const MEMORY_OVERHEAD: u64 = 16 << 20;
/// Tasks a VMM needs beyond its vCPU threads: `pids.max` must be at least vCPUs + this.
pub const PIDS_OVERHEAD: u32 = 16;
/// Highest `pids.max` the kernel accepts (`PID_MAX_LIMIT` on 64-bit hosts).
pub const PIDS_MAX_LIMIT: u32 = 4 * 1024 * 1024;
/// How long [`VmCgroup::remove`] retries while the kernel still counts a process as inside.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One of the cgroup v2 controllers the daemon uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Controller {
    /// `cpu`: `cpu.weight`, `cpu.max`.
    Cpu,
    /// `memory`: `memory.max`.
    Memory,
    /// `pids`: `pids.max`.
    Pids,
}

impl Controller {
    /// All three, in the order they are reported.
    pub const ALL: [Controller; 3] = [Controller::Cpu, Controller::Memory, Controller::Pids];

    /// The kernel's name for it (`cpu`, `memory`, `pids`).
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Controller`]s (those available, or those missing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Controllers {
    /// `cpu`.
    pub cpu: bool,
    /// `memory`.
    pub memory: bool,
    /// `pids`.
    pub pids: bool,
}

impl Controllers {
    /// None of them.
    pub const NONE: Controllers = Controllers {
        cpu: false,
        memory: false,
        pids: false,
    };
    /// All three.
    pub const ALL: Controllers = Controllers {
        cpu: true,
        memory: true,
        pids: true,
    };

    /// Whether `c` is in the set.
    pub fn contains(self, c: Controller) -> bool {
        match c {
            Controller::Cpu => self.cpu,
            Controller::Memory => self.memory,
            Controller::Pids => self.pids,
        }
    }

    /// Adds `c`.
    pub fn insert(&mut self, c: Controller) {
        match c {
            Controller::Cpu => self.cpu = true,
            Controller::Memory => self.memory = true,
            Controller::Pids => self.pids = true,
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self == Controllers::NONE
    }

    /// The controllers of `self` that are not in `other`.
    pub fn without(self, other: Controllers) -> Controllers {
        Controllers {
            cpu: self.cpu && !other.cpu,
            memory: self.memory && !other.memory,
            pids: self.pids && !other.pids,
        }
    }

    /// The members, in [`Controller::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Controller> {
        Controller::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }

    /// The ones we use among a `cgroup.controllers` or `cgroup.subtree_control` list
    /// (`"cpuset cpu io memory pids"`; other controllers are ignored).
    fn parse(list: &str) -> Controllers {
        let mut set = Controllers::NONE;
        for word in list.split_whitespace() {
            if let Some(c) = Controller::ALL.into_iter().find(|c| c.name() == word) {
                set.insert(c);
            }
        }
        set
    }
}

impl fmt::Display for Controllers {
    /// `cpu, memory, pids`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.iter().map(Controller::name).collect();
        f.write_str(&names.join(", "))
    }
}

/// Why resource limits cannot be applied on this host (or not all of them). The message says
/// what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No cgroup2 filesystem is mounted.
    NoCgroup2,
    /// cgroup2 is mounted but does not offer some of the controllers (on a hybrid hierarchy
    /// they are bound to cgroups v1).
    MissingControllers {
        /// The cgroup2 mount point.
        mount: PathBuf,
        /// The controllers it lacks.
        missing: Controllers,
    },
    /// The configured parent directory is not inside a cgroup2 mount.
    NotInCgroup2 {
        /// The directory given.
        path: PathBuf,
    },
    /// The daemon's own cgroup could not be found or is not visible through the cgroup2 mount.
    OwnCgroup {
        /// What is wrong.
        detail: String,
    },
    /// A file or directory of the hierarchy could not be read, created or written.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`read`, `create`, `write "+cpu +memory"`).
        action: String,
        /// The error number, when the kernel gave one.
        errno: Option<i32>,
        /// The error's text.
        message: String,
    },
}

impl Unavailable {
    fn io(path: &Path, action: impl Into<String>, e: &io::Error) -> Unavailable {
        Unavailable::Io {
            path: path.to_path_buf(),
            action: action.into(),
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoCgroup2 => f.write_str(
                "no cgroup2 filesystem is mounted: this host uses cgroups v1 only; boot with \
                 systemd.unified_cgroup_hierarchy=1 or mount cgroup2 \
                 (mount -t cgroup2 none /sys/fs/cgroup)",
            ),
            Unavailable::MissingControllers { mount, missing } => write!(
                f,
                "the cgroup2 hierarchy at {} does not offer the {missing} controller(s) (on a \
                 hybrid cgroup v1/v2 host they are bound to cgroups v1); boot with \
                 systemd.unified_cgroup_hierarchy=1 so that cgroup2 gets them",
                mount.display()
            ),
            Unavailable::NotInCgroup2 { path } => write!(
                f,
                "cgroup parent {} is not a directory inside a cgroup2 mount; give an absolute \
                 path under the cgroup2 mount (see /proc/self/mountinfo)",
                path.display()
            ),
            Unavailable::OwnCgroup { detail } => {
                write!(f, "cannot place the daemon's cgroup: {detail}")
            }
            Unavailable::Io {
                path,
                action,
                errno,
                message,
            } => {
                write!(f, "cgroup {}: {action}: {message}", path.display())?;
                if let Some(name) = errno.and_then(errno_name) {
                    write!(f, " [{name}]")?;
                }
                match *errno {
                    Some(libc::EACCES | libc::EPERM | libc::EROFS) => f.write_str(
                        "; the daemon needs root, or a cgroup delegated to it (a systemd service \
                         with Delegate=yes), or a writable cgroup parent",
                    ),
                    Some(libc::EBUSY) => f.write_str(
                        "; the cgroup still holds processes, so it cannot pass controllers to \
                         children (move them into a child cgroup, or use another parent)",
                    ),
                    _ => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for Unavailable {}

/// The symbolic name of the error numbers these files give.
fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAGAIN => "EAGAIN",
        libc::ESRCH => "ESRCH",
        _ => return None,
    })
}

/// A VM's [`Resources`] that cannot be applied: a value out of range, or its controller
/// missing. [`LimitError::field`] names the input (`resources.cpu_weight`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitError {
    /// A number outside its range.
    OutOfRange {
        /// The field (`resources.cpu_max_percent`).
        field: &'static str,
        /// The value given.
        value: u64,
        /// Lowest allowed.
        min: u64,
        /// Highest allowed.
        max: u64,
        /// Where the bound comes from, when it depends on the VM or the host.
        why: String,
    },
    /// `memory_max` below the guest's memory plus the VMM's own.
    MemoryTooSmall {
        /// The value given, bytes.
        value: u64,
        /// The guest's memory, bytes.
        guest: u64,
    },
    /// The field's controller is not available.
    Unavailable {
        /// The field.
        field: &'static str,
        /// The controller it needs.
        controller: Controller,
        /// Why it is not available.
        why: Unavailable,
    },
}

impl LimitError {
    /// The input at fault, as a path into the request (`resources.memory_max`).
    pub fn field(&self) -> &'static str {
        match self {
            LimitError::OutOfRange { field, .. } | LimitError::Unavailable { field, .. } => field,
            LimitError::MemoryTooSmall { .. } => FIELD_MEMORY_MAX,
        }
    }
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::OutOfRange {
                field,
                value,
                min,
                max,
                why,
            } => {
                write!(f, "invalid {field}: {value} is outside {min}..={max}")?;
                if !why.is_empty() {
                    write!(f, " ({why})")?;
                }
                Ok(())
            }
            LimitError::MemoryTooSmall { value, guest } => write!(
                f,
                "invalid {FIELD_MEMORY_MAX}: {} ({value} bytes) is less than the guest's memory \
                 {} plus {} for the VMM itself ({} bytes in all)",
                config::ByteSize(*value),
                config::ByteSize(*guest),
                config::ByteSize(MEMORY_OVERHEAD),
                guest.saturating_add(MEMORY_OVERHEAD)
            ),
            LimitError::Unavailable {
                field,
                controller,
                why,
            } => write!(
                f,
                "cannot apply {field} (it needs the cgroup {controller} controller): {why}"
            ),
        }
    }
}

impl std::error::Error for LimitError {}

const FIELD_CPU_WEIGHT: &str = "resources.cpu_weight";
const FIELD_CPU_MAX: &str = "resources.cpu_max_percent";
const FIELD_MEMORY_MAX: &str = "resources.memory_max";
const FIELD_PIDS_MAX: &str = "resources.pids_max";

/// The fields of `r` that are set, with the controller each needs.
fn requested(r: &Resources) -> Vec<(&'static str, Controller)> {
    let mut v = Vec::new();
    if r.cpu_weight.is_some() {
        v.push((FIELD_CPU_WEIGHT, Controller::Cpu));
    }
    if r.cpu_max_percent.is_some() {
        v.push((FIELD_CPU_MAX, Controller::Cpu));
    }
    if r.memory_max.is_some() {
        v.push((FIELD_MEMORY_MAX, Controller::Memory));
    }
    if r.pids_max.is_some() {
        v.push((FIELD_PIDS_MAX, Controller::Pids));
    }
    v
}

/// For a daemon without cgroups: `Ok` when `r` asks for no limit, else the first field set,
/// refused with `why`.
pub fn check_without_cgroups(r: &Resources, why: &Unavailable) -> Result<(), LimitError> {
    match requested(r).first() {
        None => Ok(()),
        Some(&(field, controller)) => Err(LimitError::Unavailable {
            field,
            controller,
            why: why.clone(),
        }),
    }
}

/// Errors of a VM's cgroup ([`CgroupRoot::create`], [`VmCgroup`]).
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The VM id cannot name a directory.
    #[error("VM id {0:?} cannot name a cgroup (letters, digits, '-', '_' and '.' only)")]
    BadId(String),
    /// A cgroup file or directory could not be created, written, read or removed.
    #[error("cgroup {}: {action}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The VM's cgroup exists and still holds processes.
    #[error(
        "cgroup {} still holds processes {pids:?}: another VMM of this VM seems to be running",
        path.display()
    )]
    Busy {
        /// The cgroup.
        path: PathBuf,
        /// The pids inside.
        pids: Vec<u32>,
    },
}

impl CgroupError {
    fn io(path: &Path, action: impl Into<String>, source: io::Error) -> CgroupError {
        CgroupError::Io {
            path: path.to_path_buf(),
            action: action.into(),
            source,
        }
    }
}

/// Where the VMs' cgroups go and what they can limit. Made by [`CgroupRoot::detect`], or by
/// hand with [`CgroupRoot::new`] (tests, a prepared hierarchy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRoot {
    mount: PathBuf,
    parent: PathBuf,
    controllers: Controllers,
    host_cpus: u32,
}

impl CgroupRoot {
    /// Finds the cgroup2 mount (in `/proc/self/mountinfo`), chooses the parent of the VMs'
    /// cgroups (`parent` when given, else from the daemon's own cgroup, see the module
    /// documentation), creates it and enables `cpu`, `memory` and `pids` in the
    /// `cgroup.subtree_control` of each level from the mount down to it where they are not yet
    /// enabled. The daemon may move itself into `<own>/daemon` on the way.
    ///
    /// `Ok` when at least one of the three controllers is usable; the others are reported by
    /// [`CgroupRoot::missing_controllers`].
    pub fn detect(parent: Option<&Path>) -> Result<CgroupRoot, Unavailable> {
        let mountinfo_path = Path::new("/proc/self/mountinfo");
        let mountinfo = fs::read_to_string(mountinfo_path)
            .map_err(|e| Unavailable::io(mountinfo_path, "read", &e))?;
        let mounts = parse_mountinfo(&mountinfo);
        let own = match parent {
            Some(_) => None,
            None => {
                let p = Path::new("/proc/self/cgroup");
                let text = fs::read_to_string(p).map_err(|e| Unavailable::io(p, "read", &e))?;
                Some(
                    parse_proc_cgroup(&text).ok_or_else(|| Unavailable::OwnCgroup {
                        detail: "/proc/self/cgroup has no cgroup2 (\"0::\") line".to_string(),
                    })?,
                )
            }
        };
        setup(
            &Host {
                mounts: &mounts,
                own: own.as_deref(),
                pid: std::process::id(),
                host_cpus: host_cpus(),
            },
            parent,
        )
    }

    /// A root over an existing parent directory, without looking at the system: `controllers`
    /// are taken as enabled in `parent`'s `cgroup.subtree_control` and `host_cpus` bounds
    /// `cpu_max_percent`.
    pub fn new(
        mount: PathBuf,
        parent: PathBuf,
        controllers: Controllers,
        host_cpus: u32,
    ) -> CgroupRoot {
        CgroupRoot {
            mount,
            parent,
            controllers,
            host_cpus: host_cpus.max(1),
        }
    }

    /// The cgroup2 mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The directory the VMs' cgroups are created in.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// The controllers VM cgroups get.
    pub fn controllers(&self) -> Controllers {
        self.controllers
    }

    /// Host CPUs, the unit of `cpu_max_percent`'s upper bound (100 per CPU).
    pub fn host_cpus(&self) -> u32 {
        self.host_cpus
    }

    /// Why some limits cannot be applied, when one of the three controllers is missing.
    pub fn missing_controllers(&self) -> Option<Unavailable> {
        let missing = Controllers::ALL.without(self.controllers);
        (!missing.is_empty()).then(|| Unavailable::MissingControllers {
            mount: self.mount.clone(),
            missing,
        })
    }

    /// Whether `r` can be applied to a VM with config `cfg`: each set value in range and its
    /// controller available. Looks at nothing but its arguments and `self`.
    pub fn check(&self, r: &Resources, cfg: &VmConfig) -> Result<(), LimitError> {
        let need = |field: &'static str, controller: Controller| {
            if self.controllers.contains(controller) {
                Ok(())
            } else {
                Err(LimitError::Unavailable {
                    field,
                    controller,
                    why: Unavailable::MissingControllers {
                        mount: self.mount.clone(),
                        missing: Controllers::ALL.without(self.controllers),
                    },
                })
            }
        };
        let range = |field, value: u32, min: u64, max: u64, why: String| {
            let value = u64::from(value);
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(LimitError::OutOfRange {
                    field,
                    value,
                    min,
                    max,
                    why,
                })
            }
        };
        if let Some(w) = r.cpu_weight {
            range(
                FIELD_CPU_WEIGHT,
                w,
                1,
                u64::from(CPU_WEIGHT_MAX),
                String::new(),
            )?;
            need(FIELD_CPU_WEIGHT, Controller::Cpu)?;
        }
        if let Some(p) = r.cpu_max_percent {
            let cpus = self.host_cpus.max(1);
            let why = format!("100 per host CPU, {cpus} host CPU(s)");
            range(FIELD_CPU_MAX, p, 1, 100 * u64::from(cpus), why)?;
            need(FIELD_CPU_MAX, Controller::Cpu)?;
        }
        if let Some(m) = r.memory_max {
            let guest = cfg.memory.0;
            if m.0 < guest.saturating_add(MEMORY_OVERHEAD) {
                return Err(LimitError::MemoryTooSmall { value: m.0, guest });
            }
            need(FIELD_MEMORY_MAX, Controller::Memory)?;
        }
        if let Some(n) = r.pids_max {
            let min = u64::from(cfg.cpus) + u64::from(PIDS_OVERHEAD);
            let why = format!(
                "at least the VM's {} vCPU(s) + {PIDS_OVERHEAD}, at most the kernel's limit",
                cfg.cpus
            );
            range(FIELD_PIDS_MAX, n, min, u64::from(PIDS_MAX_LIMIT), why)?;
            need(FIELD_PIDS_MAX, Controller::Pids)?;
        }
        Ok(())
    }

    /// The cgroup directory of VM `vm_id`: `<parent>/vm-<id>`.
    pub fn vm_path(&self, vm_id: &str) -> Result<PathBuf, CgroupError> {
        let ok = !vm_id.is_empty()
            && vm_id.len() <= 128
            && !vm_id.starts_with('.')
            && vm_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(CgroupError::BadId(vm_id.to_string()));
        }
        Ok(self.parent.join(format!("vm-{vm_id}")))
    }

    /// Creates VM `vm_id`'s cgroup and writes the limits set in `r` (check them first with
    /// [`CgroupRoot::check`]). An existing cgroup without processes (left by a VMM that died)
    /// is reused; its limits that `r` leaves unset are reset to the kernel's defaults. A
    /// failed write names the file; a cgroup created by this call is then removed again.
    pub fn create(&self, vm_id: &str, r: &Resources) -> Result<VmCgroup, CgroupError> {
        let path = self.vm_path(vm_id)?;
        let reused = match fs::create_dir(&path) {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => true,
            Err(e) => return Err(CgroupError::io(&path, "create", e)),
        };
        let cg = VmCgroup { path };
        if reused {
            let pids = cg.pids()?;
            if !pids.is_empty() {
                return Err(CgroupError::Busy {
                    path: cg.path,
                    pids,
                });
            }
        }
        let settings: [(&str, Option<String>, &str); 4] = [
            ("cpu.weight", r.cpu_weight.map(|w| w.to_string()), "100"),
            (
                "cpu.max",
                r.cpu_max_percent.map(|p| {
                    let quota = u64::from(p) * CPU_MAX_PERIOD_USEC / 100;
                    format!("{quota} {CPU_MAX_PERIOD_USEC}")
                }),
                "max",
            ),
            ("memory.max", r.memory_max.map(|m| m.0.to_string()), "max"),
            ("pids.max", r.pids_max.map(|n| n.to_string()), "max"),
        ];
        for (file, value, default) in settings {
            let file = cg.path.join(file);
            let value = match value {
                Some(v) => v,
                // A reused cgroup may still carry an earlier run's limit.
                None if reused && file.exists() => default.to_string(),
                None => continue,
            };
            if let Err(e) = write_value(&file, &value) {
                if !reused {
                    // Best effort: the kernel removes an empty cgroup with its files.
                    let _ = fs::remove_dir(&cg.path);
                }
                return Err(CgroupError::io(&file, format!("writing {value:?}"), e));
            }
        }
        Ok(cg)
    }

    /// VM `vm_id`'s cgroup if it exists (for a VM re-adopted after a daemon restart), `None`
    /// if it does not.
    pub fn open_existing(&self, vm_id: &str) -> Result<Option<VmCgroup>, CgroupError> {
        let path = self.vm_path(vm_id)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => Ok(Some(VmCgroup { path })),
            Ok(_) => Err(CgroupError::io(
                &path,
                "open",
                io::Error::from_raw_os_error(libc::ENOTDIR),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CgroupError::io(&path, "open", e)),
        }
    }
}

/// Counters of a VM's cgroup; each is `None` when its file is missing (controller not enabled)
/// or unreadable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// `memory.current`: bytes charged to the VMM (guest RAM it touched included).
    pub memory_current: Option<u64>,
    /// `cpu.stat` `usage_usec`: CPU time of all its threads, microseconds.
    pub cpu_usage_usec: Option<u64>,
    /// `pids.current`: its tasks (threads).
    pub pids_current: Option<u64>,
    /// `memory.events` `oom_kill`: processes the OOM killer killed in it.
    pub memory_events_oom_kill: Option<u64>,
}

/// One VM's cgroup, `<parent>/vm-<id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmCgroup {
    path: PathBuf,
}

impl VmCgroup {
    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `cgroup.procs`: writing a pid moves that process in; writing `0` moves the writer
    /// (the launcher's child, before exec).
    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.procs_path();
        write_value(&procs, &pid.to_string())
            .map_err(|e| CgroupError::io(&procs, format!("adding pid {pid}"), e))
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let procs = self.procs_path();
        let text = fs::read_to_string(&procs).map_err(|e| CgroupError::io(&procs, "read", e))?;
        text.split_whitespace()
            .map(|w| {
                w.parse().map_err(|_| {
                    CgroupError::io(
                        &procs,
                        "read",
                        io::Error::new(io::ErrorKind::InvalidData, format!("bad pid {w:?}")),
                    )
                })
            })
            .collect()
    }

    /// Reads its counters (those whose files exist).
    pub fn stats(&self) -> CgroupStats {
        let read = |file: &str| fs::read_to_string(self.path.join(file)).ok();
        let single = |file: &str| read(file).and_then(|t| t.trim().parse().ok());
        let keyed = |file: &str, key: &str| read(file).and_then(|t| keyed_value(&t, key));
        CgroupStats {
            memory_current: single("memory.current"),
            cpu_usage_usec: keyed("cpu.stat", "usage_usec"),
            pids_current: single("pids.current"),
            memory_events_oom_kill: keyed("memory.events", "oom_kill"),
        }
    }

    /// Removes the cgroup (its VMM must have exited). While the kernel still counts the last
    /// process as inside (`EBUSY`, shortly after it was reaped) it retries for up to two
    /// seconds. A cgroup that is already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        rmdir_retrying(&self.path, REMOVE_TIMEOUT, |p| fs::remove_dir(p))
    }
}

/// `rmdir(path)`, retried on `EBUSY` until `timeout`; `ENOENT` counts as done.
fn rmdir_retrying(
    path: &Path,
    timeout: Duration,
    mut rmdir: impl FnMut(&Path) -> io::Result<()>,
) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    loop {
        match rmdir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                let action = if e.raw_os_error() == Some(libc::EBUSY) {
                    format!("remove (still busy after {} ms)", timeout.as_millis())
                } else {
                    "remove".to_string()
                };
                return Err(CgroupError::io(path, action, e));
            }
        }
    }
}

/// Writes `value` to an existing cgroup interface file in one `write`.
fn write_value(path: &Path, value: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).truncate(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// The value of `key` in a flat-keyed file (`usage_usec 123\nuser_usec 45\n`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(key))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// The host's CPUs: `/sys/devices/system/cpu/online`, else the CPUs this process may use.
pub fn host_cpus() -> u32 {
    fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|t| parse_cpu_list(&t))
        .or_else(|| {
            std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
        })
        .unwrap_or(1)
}

/// Counts the CPUs of a list like `0-3,6,8-9`.
fn parse_cpu_list(text: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in text.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let c = part.parse::<u32>().ok()?;
                (c, c)
            }
        };
        n = n.checked_add(hi.checked_sub(lo)?.checked_add(1)?)?;
    }
    (n > 0).then_some(n)
}

/// A cgroup2 mount from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cgroup2Mount {
    /// The cgroup its mount point shows (`/` unless a subtree was bind-mounted).
    root: PathBuf,
    /// Where it is mounted.
    mount_point: PathBuf,
}

/// The cgroup2 mounts in a `/proc/self/mountinfo` text, in order.
fn parse_mountinfo(text: &str) -> Vec<Cgroup2Mount> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            let sep = words.iter().position(|w| *w == "-")?;
            // id parent major:minor root mount-point options [optional...] - fstype ...
            if sep < 6 || words.get(sep + 1) != Some(&"cgroup2") {
                return None;
            }
            Some(Cgroup2Mount {
                root: PathBuf::from(unescape_mountinfo(words[3])),
                mount_point: PathBuf::from(unescape_mountinfo(words[4])),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 path of a `/proc/<pid>/cgroup` text (its `0::PATH` line).
fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let p = l.strip_prefix("0::")?;
        Some(p.strip_suffix(" (deleted)").unwrap_or(p).to_string())
    })
}

/// What [`setup`] knows about the running system.
struct Host<'a> {
    mounts: &'a [Cgroup2Mount],
    /// The daemon's cgroup2 path, as `/proc/self/cgroup` shows it (needed without a parent).
    own: Option<&'a str>,
    pid: u32,
    host_cpus: u32,
}

/// [`CgroupRoot::detect`] after reading `/proc`: picks the mount and parent, moves the daemon
/// when needed, creates the parent and enables the controllers.
fn setup(host: &Host<'_>, parent: Option<&Path>) -> Result<CgroupRoot, Unavailable> {
    if host.mounts.is_empty() {
        return Err(Unavailable::NoCgroup2);
    }
    let (mount, parent, daemon_dir) = match parent {
        Some(p) => {
            let not_inside = || Unavailable::NotInCgroup2 {
                path: p.to_path_buf(),
            };
            if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
                return Err(not_inside());
            }
            let m = host
                .mounts
                .iter()
                .filter(|m| p.starts_with(&m.mount_point))
                .max_by_key(|m| m.mount_point.components().count())
                .ok_or_else(not_inside)?;
            (m.mount_point.clone(), p.to_path_buf(), None)
        }
        None => {
            let own = host.own.ok_or_else(|| Unavailable::OwnCgroup {
                detail: "the daemon's own cgroup is unknown".to_string(),
            })?;
            let (m, rel) = host
                .mounts
                .iter()
                .find_map(|m| Some((m, Path::new(own).strip_prefix(&m.root).ok()?)))
                .ok_or_else(|| Unavailable::OwnCgroup {
                    detail: format!(
                        "its cgroup {own} is not visible under any cgroup2 mount; give a cgroup \
                         parent explicitly"
                    ),
                })?;
            let own_dir = join_rel(&m.mount_point, rel);
            // Only the real root cgroup has no cgroup.type (a cgroup namespace's root has one,
            // and like any other cgroup it cannot hold processes and enable controllers).
            if !own_dir.join("cgroup.type").exists() {
                (m.mount_point.clone(), own_dir.join("ferrovisor"), None)
            } else {
                let base = match own_dir.file_name() {
                    Some(n) if n == "daemon" => own_dir
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| own_dir.clone()),
                    _ => own_dir,
                };
                (
                    m.mount_point.clone(),
                    base.join("vms"),
                    Some(base.join("daemon")),
                )
            }
        }
    };

    // Nothing is changed on a host whose cgroup2 offers none of the controllers.
    let offered = read_controllers(&mount)?;
    if offered.is_empty() {
        return Err(Unavailable::MissingControllers {
            mount,
            missing: Controllers::ALL,
        });
    }

    if let Some(dir) = &daemon_dir {
        create_dir(dir)?;
        let procs = dir.join("cgroup.procs");
        write_value(&procs, &host.pid.to_string()).map_err(|e| {
            Unavailable::io(&procs, format!("move the daemon (pid {})", host.pid), &e)
        })?;
    }
    create_dir(&parent)?;

    let mut enabled = Controllers::NONE;
    let rel = parent.strip_prefix(&mount).unwrap_or(Path::new(""));
    let mut level = mount.clone();
    let mut levels = vec![level.clone()];
    for c in rel.components() {
        level.push(c);
        levels.push(level.clone());
    }
    for level in &levels {
        let offered = read_controllers(level)?;
        let file = level.join("cgroup.subtree_control");
        let on = fs::read_to_string(&file)
            .map(|t| Controllers::parse(&t))
            .map_err(|e| Unavailable::io(&file, "read", &e))?;
        let need = offered.without(on);
        if !need.is_empty() {
            let words: Vec<String> = need.iter().map(|c| format!("+{c}")).collect();
            let value = words.join(" ");
            write_value(&file, &value)
                .map_err(|e| Unavailable::io(&file, format!("write {value:?}"), &e))?;
        }
        enabled = offered;
    }
    if enabled.is_empty() {
        return Err(Unavailable::MissingControllers {
            mount,
            missing: Controllers::ALL,
        });
    }
    Ok(CgroupRoot::new(mount, parent, enabled, host.host_cpus))
}

/// `base/rel` without a trailing separator when `rel` is empty.
fn join_rel(base: &Path, rel: &Path) -> PathBuf {
    let mut p = base.to_path_buf();
    for c in rel.components() {
        p.push(c);
    }
    p
}

/// What a daemon's [`CgroupRoot::detect`] would find, without creating or moving anything (for
/// `ferrovisor host`): the cgroup2 mount and the controllers its root offers; `Err` when there
/// is no cgroup2 mount or it offers none of the three.
pub fn probe() -> Result<String, Unavailable> {
    let mountinfo_path = Path::new("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(mountinfo_path)
        .map_err(|e| Unavailable::io(mountinfo_path, "read", &e))?;
    let mounts = parse_mountinfo(&mountinfo);
    let mount = mounts.first().ok_or(Unavailable::NoCgroup2)?;
    let offered = read_controllers(&mount.mount_point)?;
    if offered.is_empty() {
        return Err(Unavailable::MissingControllers {
            mount: mount.mount_point.clone(),
            missing: Controllers::ALL,
        });
    }
    let names: Vec<String> = offered.iter().map(|c| c.to_string()).collect();
    let mut detail = format!(
        "a cgroup per VM under {} ({})",
        mount.mount_point.display(),
        names.join(", ")
    );
    let missing = Controllers::ALL.without(offered);
    if !missing.is_empty() {
        detail.push_str(&format!("; no {missing} controller"));
    }
    Ok(detail)
}

fn create_dir(dir: &Path) -> Result<(), Unavailable> {
    fs::create_dir_all(dir).map_err(|e| Unavailable::io(dir, "create", &e))
}

/// The controllers of ours a cgroup offers its children (its `cgroup.controllers`).
fn read_controllers(dir: &Path) -> Result<Controllers, Unavailable> {
    let file = dir.join("cgroup.controllers");
    fs::read_to_string(&file)
        .map(|t| Controllers::parse(&t))
        .map_err(|e| Unavailable::io(&file, "read", &e))
}

#[cfg(test)]
mod tests;
