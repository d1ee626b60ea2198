//! Processes as the kernel shows them: what `/proc/PID/...` says about a pid (its start time,
//! state, program, resident memory, per-thread CPU time), pidfds, and reaping. Every system call
//! the daemon makes on a process is here, behind a safe function, but the ones the launcher's
//! `pre_exec` makes in the forked VMM before it execs (`setsid`, joining its cgroup).
//!
//! A pid alone does not name a process for long: once it has ended and been reaped, the kernel
//! may give the pid to a later one. The daemon identifies a VMM by its pid *and* its start time
//! ([`proc_start_time`], [`process_matches`]), and watches it through a [`PidFd`], which names
//! the one process it was opened on.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

fn pid_t(pid: u32) -> io::Result<libc::pid_t> {
    libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))
}

/// Errors reading `/proc/PID/stat`.
fn bad_stat(pid: u32, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("/proc/{pid}/stat: {what}"),
    )
}

/// The fields after the command name of a `stat` file's text: index 0 is field 3 (state).
/// `None` when it has no command name.
fn fields_after_comm(text: &str) -> Option<Vec<&str>> {
    // The command name (field 2) is in parentheses and may itself hold ')' or spaces.
    let close = text.rfind(')')?;
    Some(text[close + 1..].split_whitespace().collect())
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> io::Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    let fields = fields_after_comm(&text).ok_or_else(|| bad_stat(pid, "no command name"))?;
    Ok(fields.into_iter().map(str::to_string).collect())
}

/// The start time of process `pid`: field 22 of `/proc/PID/stat`, in clock ticks after boot.
/// An error when there is no such process. Together with the pid it identifies one process: a
/// pid reused by a later process has a later start time.
pub fn proc_start_time(pid: u32) -> io::Result<u64> {
    let fields = stat_fields(pid)?;
    fields
        .get(22 - 3)
        .ok_or_else(|| bad_stat(pid, "too few fields"))?
        .parse()
        .map_err(|_| bad_stat(pid, "field 22 is not a number"))
}

/// The state letter of process `pid` (field 3 of `/proc/PID/stat`: `R`, `S`, `Z` ...).
pub fn proc_state(pid: u32) -> io::Result<char> {
    stat_fields(pid)?
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| bad_stat(pid, "no state"))
}

/// Whether `pid` is still the process that had `start_time` (see [`proc_start_time`]).
pub fn process_matches(pid: u32, start_time: u64) -> bool {
    proc_start_time(pid).ok() == Some(start_time)
}

/// The program process `pid` runs (`/proc/PID/exe`), when it can be read.
pub fn exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The first word of process `pid`'s command line (`/proc/PID/cmdline`); empty when it cannot
/// be read.
pub fn argv0(pid: u32) -> Vec<u8> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|b| *b == 0)
        .next()
        .unwrap_or_default()
        .to_vec()
}

/// `sysconf(name)`, `None` when the value is not known (-1).
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only returns a value (or -1); no memory is passed.
    u64::try_from(unsafe { libc::sysconf(name) }).ok()
}

/// Resident memory of process `pid` (`/proc/PID/statm`).
pub fn proc_rss(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096);
    Some(pages * page)
}

/// CPU time (user + system, ms) of each vCPU thread (`fv-vcpu-N`) of VMM `pid`, by vCPU index.
pub fn vcpu_cpu_times(pid: u32) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let hz = sysconf(libc::_SC_CLK_TCK).unwrap_or(100).max(1);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(n) = comm
            .trim()
            .strip_prefix("fv-vcpu-")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let Some(f) = fields_after_comm(&stat) else {
            continue;
        };
        // Field 3 is index 0; utime is field 14, stime 15.
        let (Some(u), Some(s)) = (
            f.get(11).and_then(|v| v.parse::<u64>().ok()),
            f.get(12).and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        out.insert(n, (u + s) * 1000 / hz);
    }
    out
}

/// Sends `signal` to process `pid` (`kill(2)`). Only for a pid that cannot have been reused
/// since it was learnt: a child of this process that has not been reaped, or one whose start
/// time was checked ([`process_matches`]) just before.
pub fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = pid_t(pid)?;
    // SAFETY: kill(2) takes two integers and has no memory effects on this process.
    if unsafe { libc::kill(pid, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps child `pid` if it has ended (`waitpid(pid, WNOHANG)`): its exit status, or `None`
/// while it runs. `ECHILD` when it is not a child (or was reaped already); `EINTR`: try again.
pub fn try_wait(pid: u32) -> io::Result<Option<ExitStatus>> {
    let pid = pid_t(pid)?;
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a live c_int the kernel writes the status to; nothing else is passed.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r == pid).then(|| ExitStatus::from_raw(status)))
}

/// A pidfd (`pidfd_open(2)`): names the one process it was opened on, whatever later process
/// reuses its pid. It turns readable (`EPOLLIN`) when that process exits, for any process, child
/// or not.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid`, which must not be reaped yet for the fd to name it. `ESRCH`
    /// (unwrapped, for the caller to look at) when there is no such process.
    pub fn open(pid: u32) -> io::Result<PidFd> {
        let pid = pid_t(pid)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
        // passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "pidfd_open: fd out of range")
        })?;
        // SAFETY: the syscall returned a new fd that nothing else owns.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_and_state() {
        let me = std::process::id();
        let t = proc_start_time(me).unwrap();
        assert_eq!(proc_start_time(me).unwrap(), t);
        assert_ne!(proc_state(me).unwrap(), 'Z');
        assert!(proc_start_time(u32::MAX).is_err());
    }

    #[test]
    fn start_time_of_self_and_of_nothing() {
        let me = std::process::id();
        let t = proc_start_time(me).ok();
        assert!(t.is_some());
        assert!(process_matches(me, t.unwrap_or(0)));
        assert_eq!(proc_start_time(0).ok(), None);
        // Above the kernel's pid_max limit (2^22).
        assert_eq!(proc_start_time(u32::MAX).ok(), None);
    }

    #[test]
    fn command_names_with_parentheses_and_spaces() {
        let f = fields_after_comm("42 (a) b (c)) S 1 2").unwrap();
        assert_eq!(f, ["S", "1", "2"]);
        assert!(fields_after_comm("42 no name").is_none());
    }
}
