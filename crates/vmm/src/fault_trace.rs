//! `--fault-trace`: KVM's own tracepoints for this VMM's vCPUs, kept in a small ring buffer and
//! put into the fault report when the guest dies.
//!
//! On AMD, KVM reinitialises a vCPU when it reports a shutdown (triple fault), so the registers
//! at the fault are lost; the only record of the exception chain that led there is what KVM
//! traced on the way: `kvm_exit` (why the guest left), `kvm_inj_exception` (what KVM injected),
//! `kvm_page_fault`, `kvm_inj_virq`, `kvm_async_pf_*`, `kvm_entry`.
//!
//! A tracefs instance of its own (`instances/ferrovisor-<pid>`) keeps this VMM's events apart
//! from other VMs' and from the host's tracing: its event filter follows this process and the
//! threads it creates after [`FaultTrace::start`] (`set_event_pid` + `event-fork`), its buffer
//! is small (the last few thousand events per CPU), and it is removed when the VMM exits. A
//! guest that hangs can be read while it runs: `cat <tracefs>/instances/ferrovisor-<pid>/trace`.
//! Needs root (or tracefs rights) and a mounted tracefs; it is a diagnostic, so where it cannot
//! be set up the VMM says why and runs without it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The KVM events recorded (those the running kernel has).
pub const EVENTS: [&str; 11] = [
    "kvm_exit",
    "kvm_entry",
    "kvm_inj_exception",
    "kvm_inj_virq",
    "kvm_page_fault",
    "kvm_userspace_exit",
    "kvm_async_pf_not_present",
    "kvm_async_pf_ready",
    "kvm_async_pf_completed",
    "kvm_async_pf_repeated_fault",
    "kvm_emulate_insn",
];

/// Per-CPU ring buffer size, KiB.
const BUFFER_KB: u32 = 512;

/// Lines of the faulting vCPU's trace put into a fault report.
pub const REPORT_LINES: usize = 80;

/// A tracefs instance recording this VMM's KVM events; removed on drop.
#[derive(Debug)]
pub struct FaultTrace {
    dir: PathBuf,
    /// The events enabled.
    pub events: Vec<&'static str>,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl FaultTrace {
    /// Creates the instance and starts recording. Call it on the thread that will create the
    /// vCPU threads, before it does: they inherit the event filter.
    pub fn start() -> io::Result<FaultTrace> {
        let root = TRACEFS
            .iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)",
                )
            })?;
        Self::start_in(root, &format!("ferrovisor-{}", std::process::id()))
    }

    /// Same, under tracefs at `root`, instance `name`.
    pub fn start_in(root: &Path, name: &str) -> io::Result<FaultTrace> {
        let kvm_events = root.join("events/kvm");
        if !kvm_events.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} does not exist: the kvm module is not loaded",
                    kvm_events.display()
                ),
            ));
        }
        let dir = root.join("instances").join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // Left by an earlier process with this pid: take it over.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", dir.display()),
                ))
            }
        }
        let mut trace = FaultTrace {
            dir,
            events: Vec::new(),
        };
        trace.configure()?;
        Ok(trace)
    }

    fn configure(&mut self) -> io::Result<()> {
        let d = &self.dir;
        write(&d.join("tracing_on"), "0")?;
        write(&d.join("buffer_size_kb"), &BUFFER_KB.to_string())?;
        write(&d.join("trace"), "")?;
        // This thread group, and every thread created from now on.
        write(&d.join("options/event-fork"), "1")?;
        write(&d.join("set_event_pid"), &traced_tasks())?;
        for event in EVENTS {
            let enable = d.join("events/kvm").join(event).join("enable");
            if enable.exists() {
                write(&enable, "1")?;
                self.events.push(event);
            }
        }
        write(&d.join("tracing_on"), "1")
    }

    /// The instance's directory (its `trace` file can be read while the VM runs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops recording and returns the last `lines` events of the thread named `thread`
    /// (oldest first), or of every thread if it has none.
    pub fn freeze_and_read(&self, thread: &str, lines: usize) -> io::Result<String> {
        write(&self.dir.join("tracing_on"), "0")?;
        let text = fs::read_to_string(self.dir.join("trace"))?;
        Ok(last_events(&text, thread, lines))
    }
}

/// This process and the calling thread (the one that goes on to create the vCPU threads).
fn traced_tasks() -> String {
    let pid = std::process::id().to_string();
    // /proc/thread-self -> "<pid>/task/<tid>"
    let tid = fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
    match tid {
        Some(tid) if tid != pid => format!("{pid} {tid}"),
        _ => pid,
    }
}

impl Drop for FaultTrace {
    fn drop(&mut self) {
        let _ = write(&self.dir.join("tracing_on"), "0");
        if let Err(e) = fs::remove_dir(&self.dir) {
            tracing::warn!("removing the trace instance {}: {e}", self.dir.display());
        }
    }
}

/// The last `n` event lines of `trace` (tracefs's text format) from the task named `thread`;
/// all tasks' if that one has none.
pub fn last_events(trace: &str, thread: &str, n: usize) -> String {
    let events: Vec<&str> = trace
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    // Lines start with "<comm>-<tid> [cpu] ...": match the comm.
    let prefix = format!("{thread}-");
    let own: Vec<&str> = events
        .iter()
        .copied()
        .filter(|l| l.trim_start().starts_with(&prefix))
        .collect();
    let chosen = if own.is_empty() { events } else { own };
    let skip = chosen.len().saturating_sub(n);
    chosen[skip..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# tracer: nop
#
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
        fv-vcpu-0-812     [001] d..1.   100.000001: kvm_entry: vcpu 0, rip 0xffffffff81000000
        fv-vcpu-1-813     [000] d..1.   100.000002: kvm_entry: vcpu 1, rip 0xffffffff81000010
        fv-vcpu-0-812     [001] d..1.   100.000003: kvm_exit: vcpu 0 reason npf rip 0xffffffff81000004
        fv-vcpu-0-812     [001] d..1.   100.000004: kvm_inj_exception: #PF (0x2)
        fv-vcpu-0-812     [001] d..1.   100.000005: kvm_exit: vcpu 0 reason shutdown
";

    #[test]
    fn picks_the_threads_last_events() {
        let t = last_events(SAMPLE, "fv-vcpu-0", 2);
        assert_eq!(t.lines().count(), 2);
        assert!(t.contains("kvm_inj_exception: #PF"));
        assert!(t.ends_with("reason shutdown"));
        assert!(!t.contains("vcpu 1"));
        // A thread with no events: everyone's.
        assert_eq!(last_events(SAMPLE, "fv-vcpu-7", 100).lines().count(), 5);
        assert_eq!(last_events("# only comments\n", "x", 5), "");
    }

    #[test]
    fn a_fake_tracefs_is_configured_and_removed() {
        // tracefs creates an instance's files itself; a plain directory stands in for one whose
        // files already exist.
        let root = std::env::temp_dir().join(format!("fv-tracefs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let inst = root.join("instances/t");
        fs::create_dir_all(inst.join("options")).unwrap();
        fs::create_dir_all(inst.join("events/kvm/kvm_exit")).unwrap();
        fs::write(inst.join("events/kvm/kvm_exit/enable"), "0").unwrap();
        fs::create_dir_all(root.join("events/kvm")).unwrap();
        let t = FaultTrace::start_in(&root, "t").unwrap();
        assert_eq!(t.events, vec!["kvm_exit"]);
        assert_eq!(fs::read_to_string(inst.join("tracing_on")).unwrap(), "1");
        let pids = fs::read_to_string(inst.join("set_event_pid")).unwrap();
        assert!(pids.starts_with(&std::process::id().to_string()), "{pids}");
        assert_eq!(
            fs::read_to_string(inst.join("events/kvm/kvm_exit/enable")).unwrap(),
            "1"
        );
        fs::write(inst.join("trace"), SAMPLE).unwrap();
        let text = t.freeze_and_read("fv-vcpu-0", 3).unwrap();
        assert!(text.ends_with("reason shutdown"), "{text}");
        assert_eq!(fs::read_to_string(inst.join("tracing_on")).unwrap(), "0");
        // A real instance directory can be removed with files in it; this one cannot, so the
        // drop only warns: clean up by hand.
        drop(t);
        fs::remove_dir_all(&root).unwrap();
        // No kvm events: a clear error.
        let bare = std::env::temp_dir().join(format!("fv-tracefs-bare-{}", std::process::id()));
        fs::create_dir_all(bare.join("instances")).unwrap();
        let e = FaultTrace::start_in(&bare, "t").unwrap_err();
        assert!(e.to_string().contains("kvm module"), "{e}");
        fs::remove_dir_all(&bare).unwrap();
    }
}
