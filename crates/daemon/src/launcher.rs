//! Starting VMM processes. [`launch`] is the one place a VMM process is started from (the
//! confinement layer wraps it): it prepares the VM's run directory, starts `ferrovisor run` in a
//! session of its own and waits until its control socket answers.
//!
//! The run directory (mode 0700) holds:
//! - `config.json`: the VM's [`VmConfig`], written atomically;
//! - `control.sock`: the VMM's control socket (`--control`);
//! - `console.sock`: its serial console (`--serial socket=`);
//! - `exit.json`: its exit report (`--exit-report`), removed before each launch so that a report
//!   found there always belongs to the VMM running from this directory;
//! - `vmm.log`: its stdout and stderr, appended.
//!
//! One directory serves one VMM at a time: [`launch`] refuses a directory whose control socket
//! still answers.

use crate::process::proc_start_time;
use api::control::VmCommand;
use config::VmConfig;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long [`launch`] waits for the control socket by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of the end of `vmm.log` a [`LaunchError`] quotes.
const LOG_TAIL: u64 = 4096;

/// What to start.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The `ferrovisor` binary.
    pub binary: PathBuf,
    /// The VM's run directory; created (mode 0700) when missing.
    pub vm_dir: PathBuf,
    /// The VM. Its serial console is replaced by `vm_dir/console.sock`.
    pub config: VmConfig,
    /// How long to wait for the control socket to answer `status`.
    pub ready_timeout: Duration,
    /// A cgroup v2 `cgroup.procs` file: the VMM joins that cgroup before it execs, so it
    /// never runs outside its limits.
    pub cgroup_procs: Option<PathBuf>,
    /// Confinement (`ferrovisor run --jail`), or `None` for an unconfined VMM.
    pub jail: Option<LaunchJail>,
}

/// How a confined VMM is started.
#[derive(Clone, Debug)]
pub struct LaunchJail {
    /// Its uid and gid.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Walls it runs without (the VMM's own: namespaces, filesystem, identity, seccomp,
    /// landlock).
    pub skip: Vec<jail::Wall>,
    /// Host-dependent walls it must have (landlock).
    pub require: Vec<jail::Wall>,
    /// An LSM label the VMM's process takes at exec: the `/proc/self/attr/...` file and what
    /// to write there.
    pub exec_label: Option<(PathBuf, Vec<u8>)>,
}

impl LaunchSpec {
    /// A spec with the default ready timeout.
    pub fn new(binary: PathBuf, vm_dir: PathBuf, config: VmConfig) -> LaunchSpec {
        LaunchSpec {
            binary,
            vm_dir,
            config,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            cgroup_procs: None,
            jail: None,
        }
    }
}

/// The files of one VM's run directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPaths {
    /// The run directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `control.sock`.
    pub control: PathBuf,
    /// `console.sock`.
    pub console: PathBuf,
    /// `exit.json`.
    pub exit_report: PathBuf,
    /// `vmm.log`.
    pub log: PathBuf,
}

impl VmPaths {
    /// The paths inside `dir`.
    pub fn new(dir: &Path) -> VmPaths {
        VmPaths {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            control: dir.join("control.sock"),
            console: dir.join("console.sock"),
            exit_report: dir.join("exit.json"),
            log: dir.join("vmm.log"),
        }
    }
}

/// A started VMM whose control socket answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launched {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22, clock ticks after boot): with the pid, it
    /// names this process and no later one that reuses the pid.
    pub start_time: u64,
    /// Its files.
    pub paths: VmPaths,
}

/// Why a VMM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The run directory or one of its files could not be prepared.
    #[error("VM directory {path}: {source}")]
    Prepare {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config could not be turned into JSON.
    #[error("VM config: {0}")]
    Config(#[from] serde_json::Error),
    /// A VMM still answers on this directory's control socket.
    #[error("VM directory {0}: a VMM is still running there (its control socket answers)")]
    AlreadyRunning(PathBuf),
    /// The binary could not be started.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM exited before its control socket answered (it failed, or its guest ended at
    /// once: its exit report in the run directory says which).
    #[error("the VMM exited during start-up ({status}): {log_tail}")]
    Exited {
        /// Its pid (reaped).
        pid: u32,
        /// Its start time (see [`Launched::start_time`]).
        start_time: u64,
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of what it wrote to `vmm.log` during this launch.
        log_tail: String,
    },
    /// The control socket did not answer in time; the VMM was killed.
    #[error("the VMM's control socket did not answer within {timeout:?}; it was killed. Its log: {log_tail}")]
    Timeout {
        /// How long we waited.
        timeout: Duration,
        /// The end of what it wrote to `vmm.log` during this launch.
        log_tail: String,
    },
}

fn prep(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError + '_ {
    move |source| LaunchError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether the control socket at `path` answers `status`.
pub fn control_answers(path: &Path) -> bool {
    matches!(
        api::control::send(path, &VmCommand::Status, api::control::DEFAULT_TIMEOUT),
        Ok(Ok(_))
    )
}

fn remove_if_present(path: &Path) -> Result<(), LaunchError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(prep(path)(e)),
    }
}

/// Reads what the log gained after byte `from`, at most its last [`LOG_TAIL`] bytes.
fn log_tail(path: &Path, from: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let start = from.max(len.saturating_sub(LOG_TAIL));
        f.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        f.take(LOG_TAIL).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    };
    match read() {
        Ok(t) if t.is_empty() => format!("(nothing in {})", path.display()),
        Ok(t) => t,
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Starts one VMM as described by `spec` and returns once its control socket answers.
///
/// The VMM runs in a new session (`setsid`): the daemon's death, or a Ctrl-C on the daemon's
/// terminal, does not reach it. Its stdin is `/dev/null`, its stdout and stderr go to
/// `vmm.log`. When it exits before answering, or does not answer within
/// `spec.ready_timeout` (it is then killed), the error quotes the end of its log.
///
/// The returned process is a child of the caller and is not reaped here: hand it to
/// the supervisor (`Supervisor::watch` with `own_child = true`).
pub fn launch(spec: &LaunchSpec) -> Result<Launched, LaunchError> {
    let paths = VmPaths::new(&spec.vm_dir);
    std::fs::create_dir_all(&paths.dir).map_err(prep(&paths.dir))?;
    std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(prep(&paths.dir))?;
    if paths.control.exists() && control_answers(&paths.control) {
        return Err(LaunchError::AlreadyRunning(paths.dir));
    }
    for stale in [&paths.control, &paths.console, &paths.exit_report] {
        remove_if_present(stale)?;
    }
    let json = serde_json::to_vec_pretty(&spec.config)?;
    config::exit_report::write_atomic(&paths.config, &json).map_err(prep(&paths.config))?;

    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.log)
        .map_err(prep(&paths.log))?;
    let log_start = log.metadata().map_err(prep(&paths.log))?.len();
    let log_err = log.try_clone().map_err(prep(&paths.log))?;

    let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into()];
    args.push(paths.config.clone().into());
    args.push("--control".into());
    args.push(paths.control.clone().into());
    args.push("--serial".into());
    args.push(format!("socket={}", paths.console.display()).into());
    args.push("--exit-report".into());
    args.push(paths.exit_report.clone().into());
    if let Some(j) = &spec.jail {
        args.push("--jail".into());
        args.push(format!("--jail-uid={}", j.uid).into());
        args.push(format!("--jail-gid={}", j.gid).into());
        args.push("--jail-dir".into());
        args.push(paths.dir.clone().into());
        let list =
            |walls: &[jail::Wall]| walls.iter().map(|w| w.name()).collect::<Vec<_>>().join(",");
        if !j.skip.is_empty() {
            args.push(format!("--allow-unconfined={}", list(&j.skip)).into());
        }
        if !j.require.is_empty() {
            args.push(format!("--require={}", list(&j.require)).into());
        }
    }
    // Nothing of the daemon's environment but the log filter.
    let rust_log = std::env::var_os("RUST_LOG");
    let mut env = Vec::new();
    if let Some(v) = &rust_log {
        env.push((std::ffi::OsStr::new("RUST_LOG"), v.as_os_str()));
    }
    // Opened here, before the clone: the child may only make async-signal-safe calls.
    let cgroup_procs = match &spec.cgroup_procs {
        Some(path) => Some(
            OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(prep(path))?,
        ),
        None => None,
    };
    let exec_label = spec.jail.as_ref().and_then(|j| j.exec_label.as_ref());
    let spawned = jail::spawn::spawn(&jail::spawn::Spawn {
        program: &spec.binary,
        args: args.iter().map(|a| a.as_os_str()).collect(),
        env,
        stdio: [None, Some(log.as_raw_fd()), Some(log_err.as_raw_fd())],
        new_session: true,
        // A confined VMM is the first process of a PID namespace of its own.
        new_pid_namespace: spec
            .jail
            .as_ref()
            .is_some_and(|j| !j.skip.contains(&jail::Wall::Namespaces)),
        cgroup_procs: cgroup_procs.as_ref().map(|f| f.as_raw_fd()),
        exec_label: exec_label.map(|(p, b)| (p.as_path(), b.as_slice())),
    });
    drop(cgroup_procs);
    drop((log, log_err));
    let pid = spawned.map_err(|source| LaunchError::Spawn {
        binary: spec.binary.clone(),
        source,
    })?;
    let mut child = Child(pid);
    // The child cannot be reaped before we wait for it, so its /proc entry is there.
    let start_time = match proc_start_time(pid) {
        Ok(t) => t,
        Err(source) => {
            child.kill_and_reap();
            return Err(LaunchError::Spawn {
                binary: spec.binary.clone(),
                source,
            });
        }
    };

    let begun = Instant::now();
    loop {
        match jail::spawn::try_wait_raw(pid) {
            Ok(Some(raw)) => {
                let status = std::process::ExitStatus::from_raw(raw);
                return Err(LaunchError::Exited {
                    pid,
                    start_time,
                    status,
                    log_tail: log_tail(&paths.log, log_start),
                });
            }
            Ok(None) => {}
            Err(source) => {
                return Err(LaunchError::Spawn {
                    binary: spec.binary.clone(),
                    source,
                })
            }
        }
        if paths.control.exists() && control_answers(&paths.control) {
            // Not reaped here: the supervisor reaps it.
            let _ = child;
            return Ok(Launched {
                pid,
                start_time,
                paths,
            });
        }
        if begun.elapsed() > spec.ready_timeout {
            child.kill_and_reap();
            return Err(LaunchError::Timeout {
                timeout: spec.ready_timeout,
                log_tail: log_tail(&paths.log, log_start),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A started VMM not yet handed to the supervisor.
struct Child(u32);

impl Child {
    fn kill_and_reap(&mut self) {
        let _ = jail::spawn::signal(self.0, libc::SIGKILL);
        let _ = jail::spawn::wait(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fv-launcher-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_missing_binary_and_a_silent_one_fail_the_launch() {
        let dir = scratch("fail");
        let mut spec = LaunchSpec::new(
            dir.join("no-such-ferrovisor"),
            dir.join("vm"),
            VmConfig::default(),
        );
        let err = launch(&spec).unwrap_err();
        assert!(matches!(err, LaunchError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-ferrovisor"), "{err}");
        let config = std::fs::read_to_string(dir.join("vm/config.json")).unwrap();
        assert!(config.contains("\"cpus\""), "{config}");
        let mode = std::fs::metadata(dir.join("vm"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        // A "VMM" that never opens its control socket: killed after the timeout.
        let fake = dir.join("fake-vmm");
        std::fs::write(&fake, "#!/bin/sh\necho starting up\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        spec.binary = fake;
        spec.ready_timeout = Duration::from_millis(300);
        let err = launch(&spec).unwrap_err();
        assert!(matches!(err, LaunchError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("starting up"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn log_tail_reads_only_this_launch() {
        let dir = std::env::temp_dir().join(format!("fv-launcher-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vmm.log");
        std::fs::write(&p, "old run\nnew run: disk /x: no such file\n").unwrap();
        assert_eq!(log_tail(&p, 8), "new run: disk /x: no such file");
        assert!(log_tail(&p, 1000).starts_with("(nothing"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
