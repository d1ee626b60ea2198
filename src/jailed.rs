//! `ferrovisor run --jail`: the VMM confined by the `jail` crate, in the foreground or as the
//! daemon starts it.
//!
//! The walls need the VMM to be the first process of a PID namespace of its own: the daemon
//! starts it that way; in the foreground, this process forks itself into one ([`front`]) and
//! waits for the child, passing on SIGINT, SIGTERM and SIGHUP and its exit status.

use anyhow::{bail, Context};
use jail::spawn::{self, Ended};
use jail::Wall;
use std::path::{Path, PathBuf};

/// The jail's flags on `run`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct JailArgs {
    /// Confine the VMM: namespaces, pivot_root into its run directory, an unprivileged uid
    /// without capabilities, seccomp filters per thread, Landlock (see docs/security.md). Says
    /// on stderr which walls are up.
    #[arg(long)]
    pub jail: bool,
    /// The uid the confined VMM runs as (default: one of 900000-965535 no process uses).
    #[arg(long, value_name = "UID", requires = "jail")]
    pub jail_uid: Option<u32>,
    /// Its gid (default: the same number as the uid).
    #[arg(long, value_name = "GID", requires = "jail")]
    pub jail_gid: Option<u32>,
    /// The only directory the confined VMM still sees (at the same path): its control socket,
    /// socket consoles, vsock socket and exit report must lie in it. Default: the directory of
    /// --control, or of --exit-report; none when neither is given. It becomes the VM uid's.
    #[arg(long, value_name = "DIR", requires = "jail")]
    pub jail_dir: Option<PathBuf>,
    /// Walls to run without, comma-separated (namespaces, filesystem, identity, seccomp,
    /// landlock).
    #[arg(long, value_name = "WALLS", value_parser = parse_walls, requires = "jail")]
    pub allow_unconfined: Option<Walls>,
    /// Host-dependent walls that must go up (landlock): without them the VMM does not start.
    #[arg(long, value_name = "WALLS", value_parser = parse_walls, requires = "jail")]
    pub require: Option<Walls>,
}

/// A comma-separated list of walls on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walls(pub Vec<Wall>);

/// Parses `--allow-unconfined`/`--require`.
pub fn parse_walls(s: &str) -> Result<Walls, String> {
    Wall::parse_list(s).map(Walls).map_err(|e| e.to_string())
}

/// The directory the confined VMM keeps, after checking that every path it uses at run time
/// lies in it.
pub fn run_dir(
    jail: &JailArgs,
    runtime_paths: &[(&str, &Path)],
) -> anyhow::Result<Option<PathBuf>> {
    let dir = jail.jail_dir.clone().or_else(|| {
        runtime_paths
            .iter()
            .find(|(flag, _)| *flag == "--control" || *flag == "--exit-report")
            .and_then(|(_, p)| p.parent().map(Path::to_path_buf))
            .map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d
                }
            })
    });
    let Some(dir) = dir else {
        if let Some((flag, p)) = runtime_paths.first() {
            bail!(
                "--jail: {flag} {} must lie in the jail's run directory; give --jail-dir",
                p.display()
            );
        }
        return Ok(None);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("--jail-dir {}", dir.display()))?;
    let dir =
        std::fs::canonicalize(&dir).with_context(|| format!("--jail-dir {}", dir.display()))?;
    for (flag, p) in runtime_paths {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let inside = std::fs::canonicalize(parent)
            .map(|d| d.starts_with(&dir))
            .unwrap_or(false);
        if !inside {
            bail!(
                "--jail: {flag} {} is outside the jail's run directory {}: the confined VMM \
                 sees nothing else",
                p.display(),
                dir.display()
            );
        }
    }
    Ok(Some(dir))
}

/// The plan for [`jail::enter`] from the flags.
pub fn plan(jail: &JailArgs, run_dir: Option<PathBuf>) -> anyhow::Result<jail::Plan> {
    let uid = match jail.jail_uid {
        Some(0) => bail!("--jail-uid 0: a confined VMM never runs as root"),
        Some(u) => u,
        None => {
            let busy = jail::running_uids();
            let host = jail::host_ids();
            jail::DEFAULT_UID_RANGE
                .clone()
                .find(|u| !busy.contains(u) && !host.contains(u))
                .context("--jail: every uid of 900000-965535 is in use; give --jail-uid")?
        }
    };
    let gid = match jail.jail_gid {
        Some(0) => bail!("--jail-gid 0: a confined VMM never runs as root's group"),
        Some(g) => g,
        None => uid,
    };
    let skip = jail.allow_unconfined.clone().unwrap_or_default().0;
    for w in &skip {
        if matches!(w, Wall::Cgroups | Wall::Apparmor | Wall::Selinux) {
            bail!("--allow-unconfined {w}: `run` does not set up that wall (the daemon does)");
        }
    }
    let require = jail.require.clone().unwrap_or_default().0;
    for w in &require {
        if *w != Wall::Landlock {
            bail!("--require {w}: `run --jail` can require only landlock (the daemon sets up cgroups, apparmor, selinux; the other walls are always required)");
        }
        if skip.contains(w) {
            bail!("--require {w} and --allow-unconfined {w} contradict each other");
        }
    }
    Ok(jail::Plan {
        uid,
        gid,
        run_dir,
        skip,
        require,
        max_files: jail::MAX_FILES,
    })
}

/// Whether this process must first start itself again in a PID namespace of its own.
pub fn needs_front(jail: &JailArgs) -> bool {
    let skip_ns = jail
        .allow_unconfined
        .as_ref()
        .is_some_and(|s| s.0.contains(&Wall::Namespaces));
    jail.jail && !skip_ns && std::process::id() != 1
}

/// Forks this process into a new PID namespace (the child, pid 1 there, goes on to run the
/// VMM: `Ok(None)`), or, in the parent, waits for that child, passing on SIGINT, SIGTERM and
/// SIGHUP, and returns its exit code (128 + the signal when one ended it).
pub fn front() -> anyhow::Result<Option<u8>> {
    // Nothing but stdio goes into the jail.
    spawn::close_inherited_fds().context("closing inherited descriptors")?;
    let Some(pid) = spawn::fork_into_pid_namespace()
        .context("starting the confined VMM in a PID namespace of its own")?
    else {
        return Ok(None);
    };
    match spawn::wait_forwarding_signals(pid).context("waiting for the confined VMM")? {
        Ended::Exited(code) => Ok(Some(code as u8)),
        Ended::Signaled(sig) => {
            if sig == libc::SIGSYS {
                eprintln!("ferrovisor: the confined VMM was killed by its seccomp filter (a forbidden system call; see the kernel log's audit record type=1326)");
            } else {
                eprintln!("ferrovisor: the confined VMM was killed by signal {sig}");
            }
            Ok(Some((128 + sig) as u8))
        }
    }
}
