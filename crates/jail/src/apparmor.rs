//! The `apparmor` wall: a profile `ferrovisor-<vm id>` per VM, generated from the VM's files,
//! loaded by the daemon and entered by its VMM at exec.
//!
//! Two layers, as libvirt's sVirt does it. `packaging/apparmor/ferrovisor` is the broad profile
//! attached by path to `/usr/bin/ferrovisor` (daemon, CLI, hand-started VMM). [`vm_profile`]
//! writes the narrow one: the rules every VMM needs (the shipped profile's block between
//! `# BEGIN vmm-rules` and `# END vmm-rules`, embedded here at compile time so the two never
//! drift) plus exactly that VM's files — its binary (`mr`), its read-only files (`r`), its
//! read-write disks (`rwk`), its run directory (`rwk`) and the mounts its jail makes there.
//! Nothing else is named, so every other VM's files are denied. The profile includes only the
//! system's `tunables/global` and `abstractions/base`: it does not need the broad profile to be
//! loaded.
//!
//! The daemon's sequence for one VM:
//! 1. [`enabled`] — is there an AppArmor to use (else the wall is unavailable, and why);
//! 2. [`vm_profile`] → [`load`] (`apparmor_parser -r -K`, the text on stdin);
//! 3. before the clone, [`attr_exec_path`] and [`exec_label_for_child`]: the child writes those
//!    bytes to that path between clone and execve (async-signal-safe: nothing to compute
//!    there), so the VMM starts in `ferrovisor-<vm id>`;
//! 4. when the VM is gone, [`unload`].
//!
//! Paths go into the profile quoted. AppArmor would still read globs (`* ? [ ] { } ^`),
//! variables (`@{`), escapes (`\`) and quotes inside quotes, and a profile cannot name a path
//! with a control character, so paths holding any of them are refused rather than escaped:
//! a path that meant something else to AppArmor than to the kernel would open a hole. Rules
//! match the path as the kernel resolves it, so pass canonical paths (no symlinks, no `.` or
//! `..`): [`vm_profile`] refuses `.`, `..` and `//`, but cannot see symlinks.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The shipped broad profile; its `vmm-rules` block is the common part of every per-VM one.
const SHIPPED_PROFILE: &str = include_str!("../../../packaging/apparmor/ferrovisor");
const BEGIN_VMM_RULES: &str = "# BEGIN vmm-rules";
const END_VMM_RULES: &str = "# END vmm-rules";

/// Every per-VM profile's name starts with this (`ferrovisor-<vm id>`); the broad profile may
/// switch its children to any profile so named and signal them.
pub const PROFILE_PREFIX: &str = "ferrovisor-";

/// The source name of the tmpfs the jail assembles the VMM's new root on (see
/// `enter::pivot_into_run_dir`); the per-VM profile allows that mount only.
pub const JAIL_TMPFS_SOURCE: &str = "ferrovisor-jail";

/// The longest VM id accepted (a profile name is bounded only by memory, but ours need not be).
pub const VM_ID_MAX: usize = 128;

/// The files one VMM may use: everything else is denied by its per-VM profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmFiles {
    /// The VMM's executable (`/usr/bin/ferrovisor`, or what `/proc/self/exe` resolves to).
    pub binary: PathBuf,
    /// The VM's run directory `<state>/vms/<vm id>`: its sockets, logs and exit report. The
    /// jail mounts its new root over it and binds it inside at the same path.
    pub run_dir: PathBuf,
    /// Files it may only read: kernel, initrd, firmware, read-only disks.
    pub read_only: Vec<PathBuf>,
    /// Files it may read, write and lock: its read-write disks.
    pub read_write: Vec<PathBuf>,
}

/// A per-VM profile: its name and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmProfile {
    /// `ferrovisor-<vm id>`.
    pub name: String,
    /// The profile, as [`load`] takes it.
    pub text: String,
}

/// Why a per-VM profile could not be written. Each names the field and the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// The VM id is empty, too long, or has a character outside `[A-Za-z0-9_.-]`.
    #[error(
        "VM id {id:?}: {reason} (an AppArmor profile name is made of it: use 1 to {VM_ID_MAX} \
         characters of A-Z a-z 0-9 _ . -)"
    )]
    VmId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A path is relative: AppArmor rules name absolute paths.
    #[error("{field} {path:?}: not an absolute path (AppArmor rules need absolute paths)")]
    NotAbsolute {
        /// Which field (`binary`, `run_dir`, `read_only[2]`, `read_write[0]`).
        field: String,
        /// The path as given.
        path: PathBuf,
    },
    /// A path is not UTF-8.
    #[error("{field} {path:?}: not valid UTF-8; rename it")]
    NotUtf8 {
        /// Which field.
        field: String,
        /// The path as given.
        path: PathBuf,
    },
    /// A path holds a character AppArmor would read as more than itself.
    #[error(
        "{field} {path:?}: contains {what}, which AppArmor profiles cannot name safely; rename \
         the file or directory"
    )]
    SpecialChar {
        /// Which field.
        field: String,
        /// The path as given.
        path: PathBuf,
        /// The character or sequence, described (e.g. `the glob character '*'`).
        what: String,
    },
    /// A path has `.` or `..` components or an empty one (`//`): the kernel would match the
    /// resolved path, never this spelling of it.
    #[error(
        "{field} {path:?}: not canonical ('.', '..' or '//'); pass the resolved path \
         (std::fs::canonicalize) since AppArmor matches paths as the kernel resolves them"
    )]
    NotCanonical {
        /// Which field.
        field: String,
        /// The path as given.
        path: PathBuf,
    },
    /// The run directory is `/`, which would grant the whole filesystem.
    #[error("run_dir is /: a VM's run directory must be a directory of its own")]
    RootRunDir,
    /// The shipped profile embedded at build time lacks its `vmm-rules` markers.
    #[error(
        "packaging/apparmor/ferrovisor has no '{BEGIN_VMM_RULES}' ... '{END_VMM_RULES}' block \
         (this binary was built from a broken tree)"
    )]
    Template,
}

/// Why a profile could not be loaded, checked or unloaded.
#[derive(Debug, thiserror::Error)]
pub enum AppArmorError {
    /// No `apparmor_parser` in /usr/sbin, /sbin or `PATH`.
    #[error(
        "apparmor_parser not found in /usr/sbin, /sbin or PATH: install AppArmor's user space \
         (Debian and Ubuntu: apt-get install apparmor)"
    )]
    ParserMissing,
    /// `apparmor_parser` ran and failed.
    #[error("apparmor_parser {args} failed ({status}): {stderr}")]
    Parser {
        /// Its arguments.
        args: String,
        /// How it ended.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// A profile name that is not one of ours.
    #[error("{0:?} is not a per-VM profile name (ferrovisor-<vm id>)")]
    BadName(String),
    /// Running the parser or writing to securityfs failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

/// `Ok` when this host's kernel enforces AppArmor and its securityfs interface is mounted, so a
/// per-VM profile can be loaded and entered; else why not, and what to do about it.
pub fn enabled() -> Result<(), String> {
    enabled_in(Path::new("/"))?;
    if parser_path().is_none() {
        return Err(AppArmorError::ParserMissing.to_string());
    }
    Ok(())
}

/// [`enabled`]'s kernel checks against a filesystem rooted at `root` (tests use a fake one).
fn enabled_in(root: &Path) -> Result<(), String> {
    let param = root.join("sys/module/apparmor/parameters/enabled");
    match std::fs::read_to_string(&param) {
        Ok(v) if v.trim() == "Y" => {}
        Ok(v) => {
            return Err(format!(
                "AppArmor is built into the kernel but disabled ({} is {:?}): boot with \
                 apparmor=1 security=apparmor (or add apparmor to the lsm= list)",
                param.display(),
                v.trim()
            ))
        }
        Err(_) => {
            return Err(
                "the kernel has no AppArmor (no /sys/module/apparmor): it needs \
                 CONFIG_SECURITY_APPARMOR and apparmor in the lsm= boot parameter"
                    .into(),
            )
        }
    }
    let fs = root.join("sys/kernel/security/apparmor");
    if !fs.is_dir() {
        return Err(if root.join("sys/kernel/security/lsm").exists() {
            format!(
                "securityfs is mounted but has no apparmor directory ({} is missing): \
                 AppArmor is not among the active LSMs",
                fs.display()
            )
        } else {
            "securityfs is not mounted: mount -t securityfs securityfs /sys/kernel/security".into()
        });
    }
    Ok(())
}

/// The profile name of VM `vm_id`: `ferrovisor-<vm id>`.
pub fn profile_name(vm_id: &str) -> Result<String, ProfileError> {
    let bad = |reason: &str| ProfileError::VmId {
        id: vm_id.to_string(),
        reason: reason.to_string(),
    };
    if vm_id.is_empty() {
        return Err(bad("empty"));
    }
    if vm_id.len() > VM_ID_MAX {
        return Err(bad(&format!("{} characters long", vm_id.len())));
    }
    if let Some(c) = vm_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(bad(&format!("character {c:?} not allowed")));
    }
    Ok(format!("{PROFILE_PREFIX}{vm_id}"))
}

/// Checks one path for a profile and returns it as text (without a trailing `/`).
fn profile_path<'a>(field: &str, path: &'a Path) -> Result<&'a str, ProfileError> {
    let err_field = || field.to_string();
    let s = path.to_str().ok_or_else(|| ProfileError::NotUtf8 {
        field: err_field(),
        path: path.to_path_buf(),
    })?;
    if !s.starts_with('/') {
        return Err(ProfileError::NotAbsolute {
            field: err_field(),
            path: path.to_path_buf(),
        });
    }
    let special = |what: String| ProfileError::SpecialChar {
        field: err_field(),
        path: path.to_path_buf(),
        what,
    };
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(special(format!("the control character {c:?}")));
    }
    if let Some(c) = s.chars().find(|c| "\"\\".contains(*c)) {
        return Err(special(format!("the quoting character {c:?}")));
    }
    if s.contains("@{") {
        return Err(special("'@{', which starts an AppArmor variable".into()));
    }
    if let Some(c) = s.chars().find(|c| "*?[]{}^".contains(*c)) {
        return Err(special(format!("the glob character {c:?}")));
    }
    let trimmed = s.trim_end_matches('/');
    if trimmed
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(ProfileError::NotCanonical {
            field: err_field(),
            path: path.to_path_buf(),
        });
    }
    Ok(trimmed)
}

/// The shipped profile's `vmm-rules` block (the lines between the markers), re-indented by
/// nothing: it is already indented for a profile body.
fn vmm_rules() -> Result<&'static str, ProfileError> {
    let start = SHIPPED_PROFILE
        .find(BEGIN_VMM_RULES)
        .ok_or(ProfileError::Template)?;
    let after = &SHIPPED_PROFILE[start..];
    let body_start = after.find('\n').ok_or(ProfileError::Template)? + 1;
    let end = after.find(END_VMM_RULES).ok_or(ProfileError::Template)?;
    let body = after.get(body_start..end).ok_or(ProfileError::Template)?;
    // Up to the start of the END marker's line.
    Ok(body.rsplit_once('\n').map_or(body, |(b, _)| b))
}

impl VmProfile {
    /// The per-VM profile of VM `vm_id` allowed `files` and nothing else.
    pub fn new(vm_id: &str, files: &VmFiles) -> Result<VmProfile, ProfileError> {
        let name = profile_name(vm_id)?;
        let binary = profile_path("binary", &files.binary)?;
        let run = profile_path("run_dir", &files.run_dir)?;
        if run.is_empty() {
            return Err(ProfileError::RootRunDir);
        }
        let read_only = files
            .read_only
            .iter()
            .enumerate()
            .map(|(i, p)| profile_path(&format!("read_only[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let read_write = files
            .read_write
            .iter()
            .enumerate()
            .map(|(i, p)| profile_path(&format!("read_write[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let common = vmm_rules()?;

        let mut t = String::with_capacity(common.len() + 2048);
        // `write!` into a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            t,
            "# AppArmor profile of Ferrovisor VM {vm_id}, generated by the daemon \
             (crates/jail/src/apparmor.rs).\n\
             # The rules every VMM needs (packaging/apparmor/ferrovisor, vmm-rules) and this \
             VM's files; nothing else.\n\
             \n\
             abi <abi/3.0>,\n\
             \n\
             include <tunables/global>\n\
             \n\
             profile {name} flags=(attach_disconnected) {{"
        );
        t.push_str(common);
        let _ = writeln!(t, "\n  # -- This VM's files.");
        let _ = writeln!(t, "  \"{binary}\" mr,");
        for p in &read_only {
            let _ = writeln!(t, "  \"{p}\" r,");
        }
        for p in &read_write {
            let _ = writeln!(t, "  \"{p}\" rwk,");
        }
        let _ = writeln!(
            t,
            "  # Its run directory: config, sockets, logs, exit report (the directory itself: \
             w, as the\n  \
             # VMM gives it to the VM's uid). The jail assembles its new root (a tmpfs) over \
             it and binds\n  \
             # it inside at the same path, so these rules hold before and after the pivot.\n  \
             \"{run}/\" rw,\n  \
             \"{run}/**\" rwk,\n\
             \n  \
             # -- Its jail (crates/jail/src/enter.rs, pivot_into_run_dir): private \
             propagation; a tmpfs\n  \
             # over the run directory; the run directory's detached copy (open_tree) moved \
             into it at\n  \
             # its own path (move_mount); pivot_root(\".\", \".\") there; the old root, \
             stacked on the new\n  \
             # one at /, detached; the new root read-only.\n  \
             mount options=(rprivate) -> /,\n  \
             mount fstype=tmpfs options in (rw, nosuid, nodev, noexec) {JAIL_TMPFS_SOURCE} -> \
             \"{run}/\",\n  \
             mount options=(move) -> \"{run}/**/\",\n  \
             pivot_root oldroot=\"{run}/\" \"{run}/\",\n  \
             umount /,\n  \
             / r,\n  \
             mount options in (ro, remount, bind, nosuid, nodev, noexec) -> /,\n\
             \n  \
             include if exists <local/ferrovisor-vm>\n\
             }}"
        );
        Ok(VmProfile { name, text: t })
    }
}

/// The text of VM `vm_id`'s per-VM profile (see [`VmProfile::new`]).
pub fn vm_profile(vm_id: &str, files: &VmFiles) -> Result<String, ProfileError> {
    VmProfile::new(vm_id, files).map(|p| p.text)
}

/// Where `apparmor_parser` is: /usr/sbin, /sbin, then `PATH`.
pub fn parser_path() -> Option<PathBuf> {
    let fixed = ["/usr/sbin/apparmor_parser", "/sbin/apparmor_parser"]
        .into_iter()
        .map(PathBuf::from);
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("apparmor_parser"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    fixed.chain(from_path).find(|p| p.is_file())
}

/// Runs `apparmor_parser ARGS` with `stdin_text` on its standard input.
fn run_parser(args: &[&str], stdin_text: &str) -> Result<(), AppArmorError> {
    let parser = parser_path().ok_or(AppArmorError::ParserMissing)?;
    let args_text = args.join(" ");
    let io_err = |what: &str, source| AppArmorError::Io {
        what: format!("apparmor_parser {args_text}: {what}"),
        source,
    };
    let mut child = Command::new(&parser)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io_err("starting it", e))?;
    // Written from a thread of its own, so that a parser which fills its stderr pipe before it
    // has read all of its input cannot dead-lock with us.
    let writer = child.stdin.take().map(|mut stdin| {
        let text = stdin_text.to_string();
        std::thread::spawn(move || stdin.write_all(text.as_bytes()))
    });
    let out = child
        .wait_with_output()
        .map_err(|e| io_err("waiting for it", e))?;
    let written = match writer.map(|w| w.join()) {
        Some(Ok(r)) => r,
        Some(Err(_)) => Err(io::Error::other("the thread writing its input panicked")),
        None => Ok(()),
    };
    if !out.status.success() {
        return Err(AppArmorError::Parser {
            args: args_text,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    written.map_err(|e| io_err("writing the profile to its input", e))
}

/// Loads `profile_text` into the kernel, replacing a loaded profile of the same name
/// (`apparmor_parser --replace --skip-cache`, the text on stdin: a per-VM profile is never
/// worth caching). On failure the error holds the parser's stderr.
pub fn load(profile_text: &str) -> Result<(), AppArmorError> {
    run_parser(&["--replace", "--skip-cache"], profile_text)
}

/// Compiles `profile_text` without loading it or touching any cache
/// (`apparmor_parser --skip-kernel-load --skip-cache`, i.e. `-Q -K`): works where the kernel
/// has no AppArmor. What CI runs on the profiles.
pub fn check(profile_text: &str) -> Result<(), AppArmorError> {
    run_parser(&["--skip-kernel-load", "--skip-cache"], profile_text)
}

/// Removes the loaded profile `name` (one of ours: `ferrovisor-<vm id>`) from the kernel, by
/// writing its name to securityfs's `.remove`. A profile that is not loaded is not an error.
pub fn unload(name: &str) -> Result<(), AppArmorError> {
    let valid = name
        .strip_prefix(PROFILE_PREFIX)
        .is_some_and(|id| profile_name(id).is_ok());
    if !valid {
        return Err(AppArmorError::BadName(name.to_string()));
    }
    let remove = Path::new("/sys/kernel/security/apparmor/.remove");
    match std::fs::OpenOptions::new()
        .write(true)
        .open(remove)
        .and_then(|mut f| f.write_all(name.as_bytes()))
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AppArmorError::Io {
            what: format!("removing profile {name} ({})", remove.display()),
            source: e,
        }),
    }
}

/// What the child writes to [`attr_exec_path`] so that its next `execve` enters profile
/// `name`: `exec <name>`.
pub fn exec_label_for_child(name: &str) -> String {
    format!("exec {name}")
}

/// The file that sets the calling task's AppArmor profile for its next exec:
/// `/proc/self/attr/apparmor/exec` where the kernel has the per-LSM directory (Linux 5.8 and
/// later; right even when another LSM owns the shared files), else `/proc/self/attr/exec`.
/// Opened in the child after the clone, so `self` is the child.
pub fn attr_exec_path() -> PathBuf {
    let own = Path::new("/proc/self/attr/apparmor/exec");
    if own.exists() {
        own.to_path_buf()
    } else {
        PathBuf::from("/proc/self/attr/exec")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    fn sample() -> VmFiles {
        VmFiles {
            binary: "/usr/bin/ferrovisor".into(),
            run_dir: "/var/lib/ferrovisor/vms/0123456789abcdef0123456789abcdef".into(),
            read_only: vec![
                "/var/lib/ferrovisor/images/vmlinuz-6.1".into(),
                "/var/lib/ferrovisor/images/initrd.img".into(),
                "/srv/images/base with space.img".into(),
            ],
            read_write: vec!["/srv/vms/web-1/root.img".into()],
        }
    }

    const SAMPLE_ID: &str = "0123456789abcdef0123456789abcdef";

    /// Whether a profile line is a file rule with an exec permission (`ix`, `Px`, `Cx`, ...).
    fn grants_exec(line: &str) -> bool {
        let l = line.trim();
        let l = l.strip_prefix("owner ").unwrap_or(l);
        let rest = if let Some(quoted) = l.strip_prefix('"') {
            quoted.split_once('"').map_or("", |(_, r)| r)
        } else if l.starts_with('/') || l.starts_with('@') {
            l.split_once(char::is_whitespace).map_or("", |(_, r)| r)
        } else {
            return false;
        };
        let perms = rest.split_whitespace().next().unwrap_or("");
        perms.trim_end_matches(',').contains(['x', 'X'])
    }

    /// `CI` set: a missing prerequisite fails the test instead of skipping it.
    fn skip_or_fail(test: &str, reason: &str) {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {reason} (CI must have it: apt-get install apparmor)");
        }
        eprintln!("SKIPPED {test}: {reason}");
    }

    #[test]
    fn a_sample_vm_gets_its_files_and_nothing_else() {
        let p = VmProfile::new(SAMPLE_ID, &sample()).unwrap();
        assert_eq!(p.name, format!("ferrovisor-{SAMPLE_ID}"));
        let t = &p.text;
        assert!(t.starts_with("# AppArmor profile of Ferrovisor VM"), "{t}");
        assert!(t.contains("abi <abi/3.0>,\n"), "{t}");
        assert!(t.contains("include <tunables/global>\n"), "{t}");
        assert!(
            t.contains(&format!(
                "profile ferrovisor-{SAMPLE_ID} flags=(attach_disconnected) {{\n"
            )),
            "{t}"
        );
        assert!(t.trim_end().ends_with('}'), "{t}");
        for line in [
            "  \"/usr/bin/ferrovisor\" mr,",
            "  \"/var/lib/ferrovisor/images/vmlinuz-6.1\" r,",
            "  \"/var/lib/ferrovisor/images/initrd.img\" r,",
            "  \"/srv/images/base with space.img\" r,",
            "  \"/srv/vms/web-1/root.img\" rwk,",
            "  \"/var/lib/ferrovisor/vms/0123456789abcdef0123456789abcdef/\" rw,",
            "  \"/var/lib/ferrovisor/vms/0123456789abcdef0123456789abcdef/**\" rwk,",
            "  mount fstype=tmpfs options in (rw, nosuid, nodev, noexec) ferrovisor-jail -> \
             \"/var/lib/ferrovisor/vms/0123456789abcdef0123456789abcdef/\",",
            "  mount options=(move) -> \
             \"/var/lib/ferrovisor/vms/0123456789abcdef0123456789abcdef/**/\",",
            "  pivot_root oldroot=\"/var/lib/ferrovisor/vms/0123456789abcdef0123456789abcdef/\" \
             \"/var/lib/ferrovisor/vms/0123456789abcdef0123456789abcdef/\",",
            "  umount /,",
            "  include <abstractions/base>",
            "  capability sys_admin,",
            "  /dev/kvm rw,",
            "  include if exists <local/ferrovisor-vm>",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        // The common block is the shipped one, markers excluded, and names no other VM's
        // files: no state directory, no broad file rule, no exec.
        assert!(t.contains(vmm_rules().unwrap()));
        assert!(!t.contains("# BEGIN") && !t.contains("# END"), "{t}");
        assert!(!t.contains("/** rw") && !t.contains("/vms/**"), "{t}");
        assert!(!t.lines().any(grants_exec), "{t}");
        // Every file rule on a path of this VM, quoted.
        for line in t.lines().map(str::trim).filter(|l| l.starts_with('"')) {
            assert!(
                line.starts_with("\"/usr/bin/ferrovisor\"")
                    || line.starts_with("\"/srv/")
                    || line.starts_with("\"/var/lib/ferrovisor/images/")
                    || line.starts_with(&format!("\"/var/lib/ferrovisor/vms/{SAMPLE_ID}/"))
                    || line.starts_with("\"/memfd:"),
                "{line}"
            );
        }
    }

    #[test]
    fn grants_exec_sees_exec_rules() {
        for yes in [
            "  /usr/bin/ferrovisor mrix,",
            "  \"/a b\" Px,",
            "  owner /x Cx -> y,",
            "  @{PROC}/x ix,",
        ] {
            assert!(grants_exec(yes), "{yes}");
        }
        for no in [
            "  unix,",
            "  \"/a x\" r,",
            "  /dev/kvm rw,",
            "  signal (receive) peer=x,",
        ] {
            assert!(!grants_exec(no), "{no}");
        }
    }

    #[test]
    fn a_trailing_slash_on_the_run_dir_changes_nothing() {
        let mut files = sample();
        let plain = vm_profile(SAMPLE_ID, &files).unwrap();
        files.run_dir = format!("/var/lib/ferrovisor/vms/{SAMPLE_ID}/").into();
        assert_eq!(vm_profile(SAMPLE_ID, &files).unwrap(), plain);
    }

    #[test]
    fn bad_vm_ids_are_refused() {
        for id in ["", "a/b", "a b", "x\n", "é", "a\"b", "a*", "@{HOME}", "a,b"] {
            let e = vm_profile(id, &sample()).unwrap_err();
            assert!(matches!(e, ProfileError::VmId { .. }), "{id:?}: {e}");
            assert!(e.to_string().contains("A-Z a-z 0-9 _ . -"), "{e}");
        }
        let long = "a".repeat(VM_ID_MAX + 1);
        assert!(matches!(
            profile_name(&long),
            Err(ProfileError::VmId { .. })
        ));
        assert_eq!(
            profile_name("web-1.a_b").unwrap(),
            "ferrovisor-web-1.a_b".to_string()
        );
    }

    #[test]
    fn bad_paths_are_refused_naming_the_field() {
        let cases: [(&str, &str); 17] = [
            ("relative/disk.img", "not an absolute path"),
            ("/a\"b", "quoting character '\"'"),
            ("/a\\b", "quoting character '\\\\'"),
            ("/a\nb", "control character '\\n'"),
            ("/a\0b", "control character '\\0'"),
            ("/a\tb", "control character '\\t'"),
            ("/a*", "glob character '*'"),
            ("/a?", "glob character '?'"),
            ("/a[1]", "glob character '['"),
            ("/a{b,c}", "glob character '{'"),
            ("/a^", "glob character '^'"),
            ("/home/@{USER}/x", "AppArmor variable"),
            ("/a/../etc/shadow", "not canonical"),
            ("/a/./b", "not canonical"),
            ("/a//b", "not canonical"),
            ("/a/..", "not canonical"),
            ("", "not an absolute path"),
        ];
        for (path, why) in cases {
            let mut files = sample();
            files.read_write.push(path.into());
            let e = vm_profile(SAMPLE_ID, &files).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("read_write[1] "), "{path:?}: {msg}");
            assert!(msg.contains(why), "{path:?}: {msg}");
        }
        let mut files = sample();
        files.binary = "ferrovisor".into();
        let e = vm_profile(SAMPLE_ID, &files).unwrap_err();
        assert!(e.to_string().starts_with("binary "), "{e}");
        let mut files = sample();
        files.read_only[2] = "/srv/*".into();
        let e = vm_profile(SAMPLE_ID, &files).unwrap_err();
        assert!(e.to_string().starts_with("read_only[2] "), "{e}");
        let mut files = sample();
        files.run_dir = PathBuf::from(OsStr::from_bytes(b"/var/lib/\xff"));
        let e = vm_profile(SAMPLE_ID, &files).unwrap_err();
        assert!(matches!(e, ProfileError::NotUtf8 { ref field, .. } if field == "run_dir"));
        for root in ["/", "//"] {
            let mut files = sample();
            files.run_dir = root.into();
            assert_eq!(vm_profile(SAMPLE_ID, &files), Err(ProfileError::RootRunDir));
        }
    }

    #[test]
    fn the_shipped_profile_has_its_vmm_rules_block() {
        let rules = vmm_rules().unwrap();
        assert!(rules.contains("include <abstractions/base>"), "{rules}");
        assert!(rules.contains("/dev/kvm rw,"), "{rules}");
        assert!(
            !rules.contains("BEGIN") && !rules.contains("END"),
            "{rules}"
        );
        // The block names no file of any VM and grants no broad file access or exec.
        assert!(!rules.contains("/var/lib/ferrovisor"), "{rules}");
        assert!(
            !rules
                .lines()
                .map(str::trim)
                .any(|l| l.starts_with("/** ") || l.starts_with("/**,")),
            "{rules}"
        );
        assert!(!rules.lines().any(grants_exec), "{rules}");
        // The block ends with a complete line.
        assert!(rules.ends_with(",\n") || rules.ends_with('\n'), "{rules:?}");
    }

    #[test]
    fn exec_label_and_attr_path() {
        assert_eq!(exec_label_for_child("ferrovisor-x"), "exec ferrovisor-x");
        let p = attr_exec_path();
        assert!(
            p == Path::new("/proc/self/attr/apparmor/exec")
                || p == Path::new("/proc/self/attr/exec"),
            "{}",
            p.display()
        );
    }

    #[test]
    fn enabled_explains_what_is_missing() {
        let root = std::env::temp_dir().join(format!("fv-apparmor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let param = root.join("sys/module/apparmor/parameters");
        let e = enabled_in(&root).unwrap_err();
        assert!(e.contains("no AppArmor"), "{e}");
        std::fs::create_dir_all(&param).unwrap();
        std::fs::write(param.join("enabled"), "N\n").unwrap();
        let e = enabled_in(&root).unwrap_err();
        assert!(e.contains("disabled") && e.contains("apparmor=1"), "{e}");
        std::fs::write(param.join("enabled"), "Y\n").unwrap();
        let e = enabled_in(&root).unwrap_err();
        assert!(
            e.contains("mount -t securityfs securityfs /sys/kernel/security"),
            "{e}"
        );
        std::fs::create_dir_all(root.join("sys/kernel/security")).unwrap();
        std::fs::write(root.join("sys/kernel/security/lsm"), "lockdown,yama\n").unwrap();
        let e = enabled_in(&root).unwrap_err();
        assert!(e.contains("not among the active LSMs"), "{e}");
        std::fs::create_dir_all(root.join("sys/kernel/security/apparmor")).unwrap();
        assert_eq!(enabled_in(&root), Ok(()));
        let _ = std::fs::remove_dir_all(&root);
        // The real host: either way, a reason when not.
        if let Err(e) = enabled() {
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn unload_takes_only_our_names() {
        for bad in [
            "",
            "ferrovisor",
            "ferrovisor-",
            "other-x",
            "ferrovisor-a b",
            "/usr/bin/x",
        ] {
            assert!(
                matches!(unload(bad), Err(AppArmorError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    /// The generated profile and the shipped one compile with the distribution's parser
    /// (`apparmor_parser -Q -K`, no kernel needed). With `FV_POLICY_OUT` set, the sample
    /// per-VM profile is also written there for scripts/check-policies.sh.
    #[test]
    fn profiles_compile_with_apparmor_parser() {
        let test = "apparmor::profiles_compile_with_apparmor_parser";
        let generated = VmProfile::new(SAMPLE_ID, &sample()).unwrap();
        if let Some(dir) = std::env::var_os("FV_POLICY_OUT") {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(&generated.name), &generated.text).unwrap();
        }
        if parser_path().is_none() {
            return skip_or_fail(test, "apparmor_parser is not installed");
        }
        if let Err(e) = check(&generated.text) {
            panic!(
                "the generated profile does not compile: {e}\n{}",
                generated.text
            );
        }
        if let Err(e) = check(SHIPPED_PROFILE) {
            panic!("packaging/apparmor/ferrovisor does not compile: {e}");
        }
        // And the parser does catch a broken profile, so the two passes above mean something.
        let broken = generated.text.replace("/dev/kvm rw,", "/dev/kvm rw");
        match check(&broken) {
            Err(AppArmorError::Parser { stderr, .. }) => assert!(!stderr.is_empty()),
            other => panic!("a broken profile compiled: {other:?}"),
        }
    }

    #[test]
    fn load_reports_the_parsers_complaint() {
        if parser_path().is_none() {
            return skip_or_fail(
                "apparmor::load_reports_the_parsers_complaint",
                "apparmor_parser is not installed",
            );
        }
        // A syntax error fails before any kernel load, whether or not this host has AppArmor.
        let e = load("profile ferrovisor-test-broken { /x rw }\n").unwrap_err();
        match &e {
            AppArmorError::Parser { args, stderr, .. } => {
                assert_eq!(args, "--replace --skip-cache");
                assert!(!stderr.is_empty(), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}
