//! The exit report (`ferrovisor run --exit-report PATH`): a small JSON file the VMM writes
//! atomically as it exits, saying why. A supervisor that is not the VMM's parent (a restarted
//! daemon that re-adopted it) cannot learn its exit status from the kernel; it reads this file.
//!
//! `{"reason":"poweroff","exit_code":0,"at_ms":1764170000000,"pid":1234}`, plus `"signal"`
//! (reason `signal`) and `"message"` (reason `fault` or `error`). A VMM killed by SIGKILL
//! writes nothing: no report means the process did not end on its own terms.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// Exit status: the guest powered off or rebooted, or the host stopped it cleanly.
pub const EXIT_OK: i32 = 0;
/// Exit status: the VMM could not set the VM up (bad input, host problem).
pub const EXIT_SETUP_ERROR: i32 = 1;
/// Exit status: the guest kernel panicked (pvpanic or KVM crash event).
pub const EXIT_GUEST_PANIC: i32 = 3;
/// Exit status: KVM could not run the guest (internal error, triple fault, failed entry).
pub const EXIT_GUEST_FAULT: i32 = 4;

/// Why the VMM exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitKind {
    /// The guest powered off (exit code 0).
    Poweroff,
    /// The guest rebooted; the VM ends and its supervisor may start it again (exit code 0).
    Reset,
    /// The guest kernel panicked (exit code 3).
    Panic,
    /// KVM could not run the guest (exit code 4).
    Fault,
    /// Stopped from the control socket (`stop`) or the console's quit key (exit code 0).
    Stopped,
    /// Stopped by SIGINT, SIGTERM or SIGHUP (exit code 0).
    Signal,
    /// The VM could not be set up or failed while running (exit code 1).
    Error,
}

/// The report's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Why.
    pub reason: ExitKind,
    /// The process's exit status.
    pub exit_code: i32,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The VMM's pid (as the VMM sees it).
    pub pid: u32,
    /// The signal that stopped it (reason `signal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// What went wrong (reasons `fault` and `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

static HOST_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Remembers this process's pid as the host's `/proc` names it, before it moves into a PID
/// namespace's view of itself (a confined VMM is pid 1 inside): what exit reports and status
/// answers give, so that supervisors outside match them to the process they started.
pub fn remember_host_pid() {
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(std::process::id);
    let _ = HOST_PID.set(pid);
}

/// This process's pid in the host's PID namespace (see [`remember_host_pid`]).
pub fn host_pid() -> u32 {
    HOST_PID.get().copied().unwrap_or_else(std::process::id)
}

impl ExitReport {
    /// A report of `reason` with `exit_code`, now, for this process.
    pub fn new(reason: ExitKind, exit_code: i32) -> ExitReport {
        ExitReport {
            reason,
            exit_code,
            at_ms: now_ms(),
            pid: host_pid(),
            signal: None,
            message: None,
        }
    }

    /// The report for a VMM that failed (set-up error, or an error while running).
    pub fn error(message: String) -> ExitReport {
        ExitReport {
            message: Some(message),
            ..ExitReport::new(ExitKind::Error, EXIT_SETUP_ERROR)
        }
    }

    /// Writes the report to `path` atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomic(path, &text)
    }

    /// Reads the report at `path`: `Ok(None)` when there is none.
    pub fn read(path: &Path) -> std::io::Result<Option<ExitReport>> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the new one, never a part:
/// writes `path.tmp` (mode 0600), syncs it, renames it over `path` and syncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_names() {
        let dir = std::env::temp_dir().join(format!("fv-exit-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("exit.json");
        assert_eq!(ExitReport::read(&p).unwrap(), None);
        let r = ExitReport {
            signal: Some(15),
            ..ExitReport::new(ExitKind::Signal, EXIT_OK)
        };
        r.write(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"reason\":\"signal\""), "{text}");
        assert!(text.contains("\"signal\":15"), "{text}");
        assert_eq!(ExitReport::read(&p).unwrap(), Some(r));
        let e = ExitReport::error("disk /x: no such file".into());
        assert_eq!(e.exit_code, 1);
        e.write(&p).unwrap();
        assert_eq!(ExitReport::read(&p).unwrap(), Some(e));
        std::fs::write(&p, b"{nonsense").unwrap();
        assert!(ExitReport::read(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
