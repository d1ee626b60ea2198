//! One VM: built from a validated [`config::VmConfig`], run until the guest or the host ends it.
//!
//! States: Created (built, nothing running) → Running ⇄ Paused → Stopped. [`Vm::build`] (in
//! [`crate::builder`]) gives a Created VM; [`Vm::run`] runs it to Stopped and returns why it stopped.
//!
//! While it runs, one loop on the thread that called [`Vm::run`] receives every [`VmEvent`]:
//! device requests (power-off, reset, panic), vCPU faults, signals, and every
//! [`VmCommand`] — from the control socket ([`crate::control`]) or a [`VmHandle`] — which it
//! carries out in one place ([`Running::command`]) and answers.

use crate::boot::{self, acpi};
use crate::console::{Console, ConsoleError};
use crate::cpu::regs::RegsError;
use crate::cpu::{self, ExitCounts, RunControl, Vcpu, VcpuStats};
use crate::event::{CommandRequest, FaultReport, VmEvent};
use crate::fault_trace::{FaultTrace, REPORT_LINES};
use crate::kvm::{self, KvmError, KvmFlavour, PVM_HINT};
use crate::memory;
use crate::virtio::DeviceEntry;
use api::control::{
    BalloonGuestStats, BalloonStats, BalloonTarget, RunState, VmCommand, VmReply, VmResponse,
    VmStatus, VmmStats,
};
use config::exit_report::{ExitKind, ExitReport};
use config::{ByteSize, ConfigError, HostLimits, MAX_VCPUS_GUEST};
use devices::legacy::{GedHandle, Serial};
use devices::VmRequest;
use kvm_ioctls::{Kvm, VmFd};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

pub use config::exit_report::{EXIT_GUEST_FAULT, EXIT_GUEST_PANIC, EXIT_OK, EXIT_SETUP_ERROR};

/// Why the VM stopped.
#[derive(Debug, Clone)]
pub enum ExitReason {
    /// The guest powered off.
    Poweroff,
    /// The guest rebooted (the VM ends; a supervisor may start it again).
    Reset,
    /// The guest kernel panicked.
    Panic,
    /// KVM could not run the guest.
    Fault(Box<FaultReport>),
    /// The host stopped it (signal number, or `None` for the console's quit key).
    Stopped(Option<i32>),
}

impl ExitReason {
    /// The process exit status this reason maps to.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Poweroff | ExitReason::Reset | ExitReason::Stopped(_) => EXIT_OK,
            ExitReason::Panic => EXIT_GUEST_PANIC,
            ExitReason::Fault(_) => EXIT_GUEST_FAULT,
        }
    }

    /// Short description.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::Poweroff => "guest powered off".into(),
            ExitReason::Reset => "guest rebooted".into(),
            ExitReason::Panic => "guest kernel panicked".into(),
            ExitReason::Fault(f) => format!("guest fault on vCPU {}: {}", f.vcpu, f.kind),
            ExitReason::Stopped(Some(sig)) => format!("stopped by signal {sig}"),
            ExitReason::Stopped(None) => "stopped from the console or the control socket".into(),
        }
    }

    /// The exit report (`--exit-report`) for a VM that stopped for this reason.
    pub fn exit_report(&self) -> ExitReport {
        let code = self.exit_code();
        match self {
            ExitReason::Poweroff => ExitReport::new(ExitKind::Poweroff, code),
            ExitReason::Reset => ExitReport::new(ExitKind::Reset, code),
            ExitReason::Panic => ExitReport::new(ExitKind::Panic, code),
            ExitReason::Fault(f) => ExitReport {
                message: Some(format!("vCPU {}: {}", f.vcpu, f.kind)),
                ..ExitReport::new(ExitKind::Fault, code)
            },
            ExitReason::Stopped(None) => ExitReport::new(ExitKind::Stopped, code),
            ExitReason::Stopped(Some(sig)) => ExitReport {
                signal: Some(*sig),
                ..ExitReport::new(ExitKind::Signal, code)
            },
        }
    }
}

/// What [`Vm::run`] returns.
#[derive(Debug)]
pub struct VmOutcome {
    /// Why it stopped.
    pub reason: ExitReason,
    /// vCPU exits, summed over vCPUs.
    pub exits: ExitCounts,
    /// How long the guest ran.
    pub run_time: Duration,
}

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Host KVM problem.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel/initrd loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] RegsError),
    /// Console backend.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A device could not be wired.
    #[error("device set-up: {0}")]
    Device(String),
    /// A wall of the jail could not go up.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// An OS-level failure (threads, signals, files).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// What the host can give, probed without failing: KVM's vCPU limit when `/dev/kvm` opens.
pub fn probe_host_limits(kvm_path: &Path) -> HostLimits {
    let max_vcpus = Kvm::new_with_path(kvm::c_path(kvm_path))
        .map(|k| k.get_max_vcpus() as u32)
        .unwrap_or(MAX_VCPUS_GUEST);
    HostLimits {
        max_vcpus,
        host_memory: kvm::host_memory(),
    }
}

/// A built VM, not yet running.
pub struct Vm {
    // Field order matters for drop: vCPUs and the VM fd go before guest memory.
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) _vm_fd: Arc<VmFd>,
    pub(crate) _kvm: Kvm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) _firmware: Option<GuestMemoryMmap>,
    pub(crate) console: Console,
    pub(crate) virtio: Option<crate::virtio::VirtioDevices>,
    pub(crate) device_entries: Vec<DeviceEntry>,
    pub(crate) balloon: Option<devices::virtio::balloon::BalloonControl>,
    pub(crate) control_path: Option<std::path::PathBuf>,
    pub(crate) fault_trace: bool,
    pub(crate) cpus: u32,
    pub(crate) memory_size: u64,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) power_button: GedHandle,
    pub(crate) events_tx: Sender<VmEvent>,
    pub(crate) events_rx: Receiver<VmEvent>,
    pub(crate) control: Arc<RunControl>,
    pub(crate) flavour: KvmFlavour,
    pub(crate) kernel_boot: bool,
    pub(crate) started: Instant,
    /// Owns the RAM mapping `mem` views; last, so that it goes after every view of it.
    pub(crate) _ram: memory::GuestRam,
}

/// On PVM, a kernel that is not PVM-aware spins inside KVM forever without a single exit; a
/// kernel that makes no device access for this long is stopped and reported.
pub const PVM_PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

/// The command line the VMM puts before the user's.
pub fn base_cmdline(kernel_console: bool) -> &'static str {
    if kernel_console {
        "console=ttyS0"
    } else {
        ""
    }
}

impl Vm {
    /// Serves a control socket at `path` while the VM runs (see [`crate::control`]).
    pub fn set_control_socket(&mut self, path: &Path) {
        self.control_path = Some(path.to_path_buf());
    }

    /// Records KVM's trace events for the vCPUs while the VM runs and puts the last ones into
    /// a fault report (see [`crate::fault_trace`]).
    pub fn enable_fault_trace(&mut self) {
        self.fault_trace = true;
    }

    /// A handle that sends [`VmCommand`]s to this VM once it runs, without any socket.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            events: self.events_tx.clone(),
        }
    }

    /// The KVM flavour the VM runs on.
    pub fn flavour(&self) -> KvmFlavour {
        self.flavour
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Runs the VM until the guest powers off, reboots, panics or faults, or the host stops it
    /// (SIGINT, SIGTERM, SIGHUP, the console's `Ctrl-A x`, a `stop` command).
    pub fn run(mut self) -> Result<VmOutcome, VmError> {
        let io_err = |what| move |source| VmError::Io { what, source };
        cpu::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])
        .map_err(io_err("installing signal handlers"))?;
        let signal_handle = signals.handle();
        let tx = self.events_tx.clone();
        std::thread::Builder::new()
            .name("fv-signals".into())
            .spawn(move || {
                jail::seccomp::apply_or_abort(jail::seccomp::ThreadKind::EventLoop);
                if let Some(sig) = signals.forever().next() {
                    let _ = tx.send(VmEvent::Signal(sig));
                }
            })
            .map_err(io_err("starting the signal thread"))?;

        if jail::seccomp::enabled() {
            crate::spawner::start().map_err(io_err("starting the worker spawner thread"))?;
        }
        let virtio_loop = match self.virtio.take() {
            Some(v) => Some(
                v.start()
                    .map_err(io_err("starting the virtio event loop"))?,
            ),
            None => None,
        };
        self.console
            .start_input(self.serial.clone(), self.events_tx.clone())
            .map_err(io_err("starting serial input"))?;

        // Before the vCPU threads exist: they inherit its event filter.
        let fault_trace = if self.fault_trace {
            match FaultTrace::start() {
                Ok(t) => {
                    tracing::info!(
                        "fault trace: {} KVM events recorded in {}",
                        t.events.len(),
                        t.dir().display()
                    );
                    Some(t)
                }
                Err(e) => {
                    tracing::warn!("fault trace not available, running without: {e}");
                    None
                }
            }
        } else {
            None
        };
        let run_start = Instant::now();
        let mut threads: Vec<VcpuThread> = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let stats = vcpu.stats();
            let ctl = self.control.clone();
            let tx = self.events_tx.clone();
            let name = format!("fv-vcpu-{}", vcpu.id());
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    jail::seccomp::apply_or_abort(jail::seccomp::ThreadKind::Vcpu);
                    vcpu.run(ctl, tx)
                })
                .map_err(io_err("starting a vCPU thread"))?;
            threads.push((handle, stats));
        }
        tracing::info!(
            "vCPUs started {:.1} ms after process start",
            self.started.elapsed().as_secs_f64() * 1000.0
        );
        let mut running = Running {
            threads,
            control: self.control.clone(),
            power_button: self.power_button.clone(),
            devices: std::mem::take(&mut self.device_entries),
            balloon: self.balloon.clone(),
            cpus: self.cpus,
            memory: self.memory_size,
            started: run_start,
            paused: false,
            shutting_down: false,
        };
        let _control_socket = match self.control_path.clone() {
            Some(path) => match crate::control::serve(&path, self.events_tx.clone()) {
                Ok(sock) => Some(sock),
                Err(source) => {
                    running.stop_vcpus();
                    return Err(VmError::Io {
                        what: "serving the control socket",
                        source,
                    });
                }
            },
            None => None,
        };
        // Every thread of the VM is made: the main thread narrows itself last.
        jail::seccomp::apply_or_abort(jail::seccomp::ThreadKind::Main);

        // The PVM watchdog: armed until the first event that is not a command (a supervisor's
        // `status` must not disarm it), it ends a VM whose kernel never touches a device.
        let mut watchdog = (self.kernel_boot && self.flavour == KvmFlavour::Pvm)
            .then(|| Instant::now() + PVM_PROGRESS_TIMEOUT);
        let event = loop {
            let event = self.next_event(watchdog, &running);
            match event {
                Some(VmEvent::Command(CommandRequest { command, reply })) => {
                    let stop = command == VmCommand::Stop;
                    let _ = reply.send(running.command(command));
                    if stop {
                        break Some(VmEvent::UserQuit);
                    }
                }
                other => break other,
            }
            if watchdog.is_some_and(|deadline| Instant::now() >= deadline) {
                watchdog = None;
                if running.exits() == 0 {
                    break None;
                }
            }
        };
        let run_time = run_start.elapsed();
        signal_handle.close();
        running.stop_vcpus();
        let mut exits = ExitCounts::default();
        let mut vcpus = Vec::new();
        for (handle, stats) in running.threads {
            exits.add(&stats.counters());
            if let Ok(v) = handle.join() {
                tracing::debug!("vCPU {} at exit:\n{}", v.id(), v.registers());
                vcpus.push(v);
            }
        }
        // The devices go with the event loop (and the vCPUs' bus references, dropped above):
        // their workers stop and the sockets they created are removed.
        let first_registers = if event.is_none() {
            vcpus.first().map(Vcpu::registers).unwrap_or_default()
        } else {
            String::new()
        };
        drop(vcpus);
        if let Some(l) = virtio_loop {
            l.stop();
        }
        let event = match (event, &fault_trace) {
            (Some(VmEvent::Fault(mut f)), Some(trace)) => {
                match trace.freeze_and_read(&format!("fv-vcpu-{}", f.vcpu), REPORT_LINES) {
                    Ok(t) => f.trace = t,
                    Err(e) => tracing::warn!("reading the fault trace: {e}"),
                }
                Some(VmEvent::Fault(f))
            }
            (event, _) => event,
        };
        drop(fault_trace);
        let reason = match event {
            Some(VmEvent::Request(VmRequest::Poweroff)) => ExitReason::Poweroff,
            Some(VmEvent::Request(VmRequest::Reset)) => ExitReason::Reset,
            Some(VmEvent::Request(VmRequest::Panic)) => ExitReason::Panic,
            Some(VmEvent::Fault(f)) => ExitReason::Fault(f),
            Some(VmEvent::Signal(sig)) => ExitReason::Stopped(Some(sig)),
            Some(VmEvent::UserQuit) | Some(VmEvent::Command(_)) => ExitReason::Stopped(None),
            // The PVM watchdog fired: the kernel never touched a device.
            None => ExitReason::Fault(Box::new(FaultReport {
                vcpu: 0,
                kind: format!(
                    "no progress: the guest kernel made no device access in {} s; this host's \
KVM is PVM and the kernel is not PVM-aware",
                    PVM_PROGRESS_TIMEOUT.as_secs()
                ),
                registers: first_registers,
                hint: Some(PVM_HINT.to_string()),
                trace: String::new(),
            })),
        };
        Ok(VmOutcome {
            reason,
            exits,
            run_time,
        })
    }

    /// Waits for the next event. With a `watchdog` deadline, gives up (`None`) when it passes
    /// and no vCPU has exited to the VMM by then.
    fn next_event(&self, watchdog: Option<Instant>, running: &Running) -> Option<VmEvent> {
        if let Some(deadline) = watchdog {
            let limit = deadline.saturating_duration_since(Instant::now());
            match self.events_rx.recv_timeout(limit) {
                Ok(ev) => return Some(ev),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if running.exits() == 0 => {
                    return None;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Some(VmEvent::UserQuit)
                }
            }
        }
        // Every sender gone cannot happen (the VM holds one); treat it as a stop.
        Some(self.events_rx.recv().unwrap_or(VmEvent::UserQuit))
    }
}

/// Sends commands to a VM's loop from any thread (tests, an embedding program); the control
/// socket does the same for other processes.
#[derive(Clone)]
pub struct VmHandle {
    events: Sender<VmEvent>,
}

impl VmHandle {
    /// Sends `command` and waits up to `timeout` for the VM loop's reply.
    pub fn send(&self, command: VmCommand, timeout: Duration) -> VmReply {
        crate::control::submit(&self.events, command, timeout)
    }
}

/// A vCPU thread (it hands its [`Vcpu`] back when it ends) and its counters.
type VcpuThread = (JoinHandle<Vcpu>, Arc<VcpuStats>);

/// What the VM loop knows while the VM runs: everything a command needs.
struct Running {
    threads: Vec<VcpuThread>,
    control: Arc<RunControl>,
    power_button: GedHandle,
    devices: Vec<DeviceEntry>,
    balloon: Option<devices::virtio::balloon::BalloonControl>,
    cpus: u32,
    memory: u64,
    started: Instant,
    paused: bool,
    shutting_down: bool,
}

impl Running {
    /// Carries out one command: the only place any [`VmCommand`] is handled. `stop` is
    /// answered here; the loop then ends the VM.
    fn command(&mut self, command: VmCommand) -> VmReply {
        match command {
            VmCommand::Status => Ok(VmResponse::Status(VmStatus {
                state: self.state(),
                pid: config::exit_report::host_pid(),
                uptime_ms: self.uptime_ms(),
                cpus: self.cpus,
                memory: self.memory,
            })),
            VmCommand::Stats => Ok(VmResponse::Stats(Box::new(self.stats()))),
            VmCommand::Pause => {
                self.pause_vcpus();
                self.paused = true;
                Ok(VmResponse::State(RunState::Paused))
            }
            VmCommand::Resume => {
                self.control.resume();
                self.paused = false;
                Ok(VmResponse::State(RunState::Running))
            }
            VmCommand::Shutdown => {
                if self.paused {
                    return Err("the VM is paused and cannot react to the power button; \
resume it first, or stop it"
                        .into());
                }
                self.power_button
                    .press_power_button()
                    .map_err(|e| format!("pressing the power button: {e}"))?;
                tracing::info!("ACPI power button pressed");
                self.shutting_down = true;
                Ok(VmResponse::State(RunState::ShuttingDown))
            }
            VmCommand::Stop => Ok(VmResponse::State(RunState::Stopped)),
            VmCommand::Balloon { size } => {
                let Some(b) = &self.balloon else {
                    return Err("this VM has no balloon (start it with --balloon)".into());
                };
                if size.0 >= self.memory {
                    return Err(format!(
                        "size: {size} is not smaller than the guest's memory ({})",
                        ByteSize(self.memory)
                    ));
                }
                b.set_target_bytes(size.0);
                Ok(VmResponse::Balloon(BalloonTarget {
                    target: size.0,
                    actual: b.actual_bytes(),
                }))
            }
        }
    }

    fn state(&self) -> RunState {
        if self.paused {
            RunState::Paused
        } else if self.shutting_down {
            RunState::ShuttingDown
        } else {
            RunState::Running
        }
    }

    /// vCPU exits so far, summed.
    fn exits(&self) -> u64 {
        self.threads.iter().map(|(_, s)| s.counters().total()).sum()
    }

    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn stats(&self) -> VmmStats {
        let vcpus = self
            .threads
            .iter()
            .zip(0u32..)
            .map(|((_, s), vcpu)| api::VcpuStats {
                vcpu,
                exits: exit_counters(&s.counters()),
                cpu_time_ms: None,
            })
            .collect();
        let devices = self
            .devices
            .iter()
            .map(|d| api::DeviceStats {
                kind: d.kind.to_string(),
                id: d.id.clone(),
                counters: d
                    .metrics
                    .as_ref()
                    .map(|m| {
                        m.counters()
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        let balloon = self.balloon.as_ref().map(|b| {
            let s = b.stats();
            BalloonStats {
                target: b.target_bytes(),
                actual: b.actual_bytes(),
                guest: BalloonGuestStats {
                    swap_in: s.swap_in,
                    swap_out: s.swap_out,
                    major_faults: s.major_faults,
                    minor_faults: s.minor_faults,
                    free_memory: s.free_memory,
                    total_memory: s.total_memory,
                    available_memory: s.available_memory,
                    disk_caches: s.disk_caches,
                },
            }
        });
        VmmStats {
            state: self.state(),
            uptime_ms: self.uptime_ms(),
            rss_bytes: crate::control::rss_bytes(),
            vcpus,
            devices,
            balloon,
        }
    }

    /// Parks every vCPU: sets the pause flag and kicks the threads until all are parked.
    fn pause_vcpus(&self) {
        self.control.request_pause();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (self.control.parked() as usize) < self.threads.len() && Instant::now() < deadline {
            for (h, _) in &self.threads {
                if !h.is_finished() {
                    let _ = h.kill(cpu::kick_signal());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops every vCPU thread: sets the stop flag, then kicks the threads until they have
    /// left `KVM_RUN` (a kick can race with a thread entering it, so it is repeated).
    fn stop_vcpus(&self) {
        self.control.request_stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut alive = 0;
            for (h, _) in &self.threads {
                if !h.is_finished() {
                    alive += 1;
                    let _ = h.kill(cpu::kick_signal());
                }
            }
            if alive == 0 {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!("{alive} vCPU thread(s) did not stop within 5 s");
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Exit counters by name, as the control protocol reports them.
pub fn exit_counters(e: &ExitCounts) -> BTreeMap<String, u64> {
    [
        ("total", e.total()),
        ("io_in", e.io_in),
        ("io_out", e.io_out),
        ("mmio_read", e.mmio_read),
        ("mmio_write", e.mmio_write),
        ("unhandled_pio", e.unhandled_pio),
        ("unhandled_mmio", e.unhandled_mmio),
        ("hlt", e.hlt),
        ("interrupted", e.interrupted),
        ("other", e.other),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reports_name_their_reason() {
        let r = ExitReason::Stopped(Some(15)).exit_report();
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"reason\":\"signal\""), "{text}");
        assert!(text.contains("\"signal\":15"), "{text}");
        assert_eq!(r.exit_code, EXIT_OK);
        let f = ExitReason::Fault(Box::new(FaultReport {
            vcpu: 1,
            kind: "triple fault".into(),
            registers: String::new(),
            hint: None,
            trace: String::new(),
        }))
        .exit_report();
        assert_eq!(f.reason, ExitKind::Fault);
        assert_eq!(f.exit_code, EXIT_GUEST_FAULT);
        assert_eq!(f.message.as_deref(), Some("vCPU 1: triple fault"));
        assert_eq!(ExitReason::Panic.exit_report().exit_code, EXIT_GUEST_PANIC);
        assert_eq!(
            ExitReason::Poweroff.exit_report().reason,
            ExitKind::Poweroff
        );
    }

    #[test]
    fn exit_counters_cover_every_kind() {
        let e = ExitCounts {
            io_in: 1,
            hlt: 2,
            ..Default::default()
        };
        let m = exit_counters(&e);
        assert_eq!(m["total"], 3);
        assert_eq!(m["io_in"], 1);
        assert_eq!(m.len(), 10);
    }
}
