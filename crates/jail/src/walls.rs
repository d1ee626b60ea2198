//! The walls' names and what this host offers of each.

use std::fmt;
use std::str::FromStr;

/// One of the walls around a VMM (see the crate documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wall {
    /// New PID, user, mount, network, IPC, UTS and cgroup namespaces.
    Namespaces,
    /// `pivot_root` into the VM's run directory.
    Filesystem,
    /// An unprivileged uid/gid of the VM's own and no capabilities.
    Identity,
    /// seccomp-BPF filters per thread kind.
    Seccomp,
    /// Landlock rules on the filesystem and the network.
    Landlock,
    /// cgroup v2 limits.
    Cgroups,
    /// An AppArmor profile per VM.
    Apparmor,
    /// An SELinux domain and MCS categories per VM.
    Selinux,
}

impl Wall {
    /// Every wall, in the order they are reported.
    pub const ALL: [Wall; 8] = [
        Wall::Namespaces,
        Wall::Filesystem,
        Wall::Identity,
        Wall::Seccomp,
        Wall::Landlock,
        Wall::Cgroups,
        Wall::Apparmor,
        Wall::Selinux,
    ];

    /// The wall's name: `namespaces`, `filesystem`, `identity`, `seccomp`, `landlock`,
    /// `cgroups`, `apparmor`, `selinux`.
    pub fn name(self) -> &'static str {
        match self {
            Wall::Namespaces => "namespaces",
            Wall::Filesystem => "filesystem",
            Wall::Identity => "identity",
            Wall::Seccomp => "seccomp",
            Wall::Landlock => "landlock",
            Wall::Cgroups => "cgroups",
            Wall::Apparmor => "apparmor",
            Wall::Selinux => "selinux",
        }
    }

    /// Walls that go up only where the host has them (and are reported where it has not),
    /// unless the operator requires them: Landlock, cgroups (a VM without resource limits runs
    /// where the host has no cgroup v2, as before) and the LSMs. The others are always on
    /// unless the operator lets a VM run without them.
    pub fn host_dependent(self) -> bool {
        matches!(
            self,
            Wall::Landlock | Wall::Cgroups | Wall::Apparmor | Wall::Selinux
        )
    }

    /// The walls the VMM puts up itself (`ferrovisor run --jail`).
    pub fn in_vmm(self) -> bool {
        matches!(
            self,
            Wall::Namespaces | Wall::Filesystem | Wall::Identity | Wall::Seccomp | Wall::Landlock
        )
    }

    /// Parses a comma-separated list (`landlock,apparmor`); an empty string is no wall.
    pub fn parse_list(s: &str) -> Result<Vec<Wall>, WallError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let w: Wall = part.parse()?;
            if !out.contains(&w) {
                out.push(w);
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Wall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no wall.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown wall {0:?}: the walls are namespaces, filesystem, identity, seccomp, landlock, cgroups, apparmor, selinux")]
pub struct WallError(pub String);

impl FromStr for Wall {
    type Err = WallError;
    fn from_str(s: &str) -> Result<Wall, WallError> {
        Wall::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| WallError(s.to_string()))
    }
}

/// How one wall stands for one VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WallState {
    /// Up; what it amounts to (e.g. "Landlock ABI 7, fully enforced").
    Up(String),
    /// The host has no such thing, and it is not required: the VMM runs without it.
    Unavailable(String),
    /// The operator chose to run without it (`--allow-unconfined`).
    Skipped,
}

/// What the host offers of one wall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WallStatus {
    /// The wall.
    pub wall: Wall,
    /// Whether a VMM can have it here.
    pub available: bool,
    /// What it is here, or why it cannot be.
    pub detail: String,
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// What this host offers of each wall except `cgroups` (which the daemon knows), probed
/// without changing anything.
pub fn probe() -> Vec<WallStatus> {
    let status = |wall, r: Result<String, String>| match r {
        Ok(detail) => WallStatus {
            wall,
            available: true,
            detail,
        },
        Err(detail) => WallStatus {
            wall,
            available: false,
            detail,
        },
    };
    vec![
        status(Wall::Namespaces, probe_namespaces()),
        status(
            Wall::Filesystem,
            probe_namespaces()
                .map(|_| "pivot_root into a tmpfs holding the VM's run directory".to_string())
                .map_err(|e| format!("needs the namespaces wall: {e}")),
        ),
        status(
            Wall::Identity,
            Ok("a uid and gid per VM, no groups, no capabilities, no_new_privs".into()),
        ),
        status(Wall::Seccomp, probe_seccomp()),
        status(
            Wall::Landlock,
            crate::enter::landlock_abi().map(|abi| format!("Landlock ABI {abi}")),
        ),
        status(
            Wall::Apparmor,
            crate::apparmor::enabled().map(|()| "AppArmor enabled".into()),
        ),
        status(
            Wall::Selinux,
            crate::selinux::enabled().map(|()| "SELinux enabled".into()),
        ),
    ]
}

fn probe_namespaces() -> Result<String, String> {
    for ns in ["pid", "user", "mnt", "net", "ipc", "uts", "cgroup"] {
        if !std::path::Path::new("/proc/self/ns").join(ns).exists() {
            return Err(format!(
                "the kernel has no {ns} namespaces (/proc/self/ns/{ns} is missing)"
            ));
        }
    }
    match read_trim("/proc/sys/user/max_user_namespaces").as_deref() {
        Some("0") => {
            return Err(
                "user namespaces are disabled (sysctl user.max_user_namespaces = 0); set it to a \
                 positive number, e.g. sysctl -w user.max_user_namespaces=15000"
                    .into(),
            )
        }
        None => return Err("the kernel has no user namespaces".into()),
        Some(_) => {}
    }
    Ok("pid, user, mount, network, ipc, uts and cgroup namespaces".into())
}

fn probe_seccomp() -> Result<String, String> {
    match read_trim("/proc/sys/kernel/seccomp/actions_avail") {
        Some(a) if a.split_whitespace().any(|x| x == "kill_process") => {
            Ok("seccomp-BPF, one filter per thread kind".into())
        }
        Some(_) => Err("the kernel's seccomp lacks the kill_process action (Linux < 4.14)".into()),
        None => Err("the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)".into()),
    }
}

/// The uids (and gids) an account or group of this host already uses, from `/etc/passwd` and
/// `/etc/group`: a VM's uid must be none of them.
pub fn host_ids() -> std::collections::BTreeSet<u32> {
    let mut ids = std::collections::BTreeSet::new();
    for file in ["/etc/passwd", "/etc/group"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            for line in text.lines() {
                if let Some(id) = line.split(':').nth(2).and_then(|f| f.parse().ok()) {
                    ids.insert(id);
                }
            }
        }
    }
    ids
}

/// The uids running processes have now (real, effective, saved, fs; from `/proc/*/status`).
pub fn running_uids() -> std::collections::BTreeSet<u32> {
    let mut ids = std::collections::BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return ids;
    };
    for e in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                ids.extend(
                    rest.split_whitespace()
                        .filter_map(|x| x.parse::<u32>().ok()),
                );
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for w in Wall::ALL {
            assert_eq!(w.name().parse::<Wall>(), Ok(w));
        }
        assert_eq!(
            Wall::parse_list("landlock, apparmor,landlock,").unwrap(),
            vec![Wall::Landlock, Wall::Apparmor]
        );
        let e = Wall::parse_list("seccomp,selinx").unwrap_err();
        assert!(e.to_string().contains("\"selinx\""), "{e}");
        assert!(e.to_string().contains("namespaces, filesystem"), "{e}");
    }

    #[test]
    fn probe_reports_every_wall_but_cgroups() {
        let p = probe();
        assert_eq!(p.len(), 7);
        assert!(p
            .iter()
            .all(|s| s.wall != Wall::Cgroups && !s.detail.is_empty()));
    }
}
