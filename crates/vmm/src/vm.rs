//! One VM: built from a validated [`VmConfig`], run until the guest or the host ends it.
//!
//! States: Created (built, nothing running) → Running ⇄ Paused → Stopped. [`Vm::build`] gives a
//! Created VM; [`Vm::run`] runs it to Stopped and returns why it stopped.

use crate::boot::acpi::{self, ACPI_PM_PORT, COM1_IRQ, COM1_PORT, GED_GSI, GED_PORT, PVPANIC_PORT};
use crate::boot::{self, LinuxBoot};
use crate::config::{ConfigError, HostLimits, VmConfig, MAX_VCPUS_GUEST};
use crate::console::{Console, ConsoleError};
use crate::cpu::regs::{BootEntry, RegsError};
use crate::cpu::{self, ExitCounts, RunControl, Vcpu, VcpuSetup, VcpuStats};
use crate::kvm::{self, KvmError, KvmFlavour, PVM_HINT};
use crate::memory::{self, KVM_IDENTITY_MAP_START, KVM_TSS_START};
use devices::legacy::{
    AcpiPm, Ged, GedHandle, PvPanic, ResetControl, Serial, ACPI_PM_LEN, GED_LEN, I8042,
    RESET_CONTROL_PORT,
};
use devices::{Bus, Interrupt, VmRequest, VmRequestFn};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

/// Exit status: the guest powered off or rebooted, or the host stopped it cleanly.
pub const EXIT_OK: i32 = 0;
/// Exit status: the VMM could not set the VM up (bad input, host problem).
pub const EXIT_SETUP_ERROR: i32 = 1;
/// Exit status: the guest kernel panicked (pvpanic or KVM crash event).
pub const EXIT_GUEST_PANIC: i32 = 3;
/// Exit status: KVM could not run the guest (internal error, triple fault, failed entry).
pub const EXIT_GUEST_FAULT: i32 = 4;

/// Something that ends (or changes) the running VM, from a device, a vCPU or the host.
#[derive(Debug)]
pub enum VmEvent {
    /// A device or KVM system event.
    Request(VmRequest),
    /// A vCPU could not go on.
    Fault(Box<FaultReport>),
    /// The host asked us to stop (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
    /// The user typed the console's quit escape.
    UserQuit,
    /// A run-state change asked for on the control socket.
    Control(crate::control::ActionRequest),
}

/// Why a vCPU stopped the VM, with what the user needs to understand it.
#[derive(Debug, Clone)]
pub struct FaultReport {
    /// Which vCPU.
    pub vcpu: u32,
    /// What happened.
    pub kind: String,
    /// Its registers at that point.
    pub registers: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "vCPU {}: {}", self.vcpu, self.kind)?;
        writeln!(f, "{}", self.registers)?;
        if let Some(h) = &self.hint {
            write!(f, "hint: {h}")?;
        }
        Ok(())
    }
}

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
    /// An OS-level failure (threads, signals, files).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm(KvmError::Ioctl { op, source })
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
    vcpus: Vec<Vcpu>,
    _vm_fd: VmFd,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
    _firmware: Option<GuestMemoryMmap>,
    console: Console,
    virtio: Option<crate::virtio::VirtioDevices>,
    device_entries: Vec<crate::control::DeviceEntry>,
    balloon: Option<devices::virtio::balloon::BalloonControl>,
    control_path: Option<std::path::PathBuf>,
    cpus: u32,
    memory_size: u64,
    serial: Arc<Mutex<Serial>>,
    power_button: GedHandle,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    control: Arc<RunControl>,
    flavour: KvmFlavour,
    kernel_boot: bool,
    started: Instant,
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
    /// Validates `config`, opens KVM and builds the VM (memory, devices, boot image, vCPUs).
    /// `started` is when the process started, for start-up timing.
    pub fn build(config: &VmConfig, kvm_path: &Path, started: Instant) -> Result<Vm, VmError> {
        let limits = probe_host_limits(kvm_path);
        let kernel_format = config.validate(&limits)?;
        // Device back-ends (images, TAPs, sockets) open before KVM: their errors are the user's
        // to fix and come first, like the configuration's.
        let built = crate::virtio::build_devices(config)?;
        let kvm = kvm::open_kvm(kvm_path)?;
        let flavour = KvmFlavour::detect();
        if config.kernel.is_some() && !flavour.runs_stock_kernels() {
            tracing::warn!("{PVM_HINT}");
        }

        // KVM_CREATE_VM can fail with EINTR when a signal arrives while KVM sets the VM up
        // (seen in the lab): try again, a bounded number of times.
        let mut attempts = 0;
        let vm_fd = loop {
            match kvm.create_vm() {
                Err(e) if e.errno() == libc::EINTR && attempts < 100 => attempts += 1,
                other => break other.map_err(kvm_err("KVM_CREATE_VM"))?,
            }
        };
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = memory::create_guest_memory(config.memory.0)?;
        let mut next_slot = memory::register_with_kvm(&vm_fd, &mem, 0)
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let firmware = match &config.firmware {
            Some(path) => {
                let image = std::fs::read(path).map_err(|e| {
                    VmError::Config(ConfigError::File {
                        what: "firmware",
                        path: path.clone(),
                        reason: e.to_string(),
                    })
                })?;
                let fw = memory::create_firmware_memory(&image)?;
                next_slot = memory::register_with_kvm(&vm_fd, &fw, next_slot)
                    .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (firmware)"))?;
                Some(fw)
            }
            None => None,
        };
        let _ = next_slot;

        // Devices.
        let (events_tx, events_rx) = channel();
        // mpsc::Sender is Sync: devices on any vCPU thread can send through the same one.
        let tx = events_tx.clone();
        let sink: VmRequestFn = Arc::new(move |r| {
            let _ = tx.send(VmEvent::Request(r));
        });
        let mut console = Console::open(&config.serial)?;
        let serial_irq = Interrupt::new().map_err(|source| VmError::Io {
            what: "creating the serial interrupt eventfd",
            source,
        })?;
        vm_fd
            .register_irqfd(serial_irq.eventfd(), COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, console.take_output())));
        let mut pio = Bus::new();
        let dev_err = |e: devices::BusError| VmError::Device(e.to_string());
        pio.insert(serial.clone(), u64::from(COM1_PORT), 8)
            .map_err(dev_err)?;
        pio.insert(Arc::new(Mutex::new(I8042::new(sink.clone()))), 0x60, 5)
            .map_err(dev_err)?;
        pio.insert(
            Arc::new(Mutex::new(PvPanic::new(sink.clone()))),
            u64::from(PVPANIC_PORT),
            1,
        )
        .map_err(dev_err)?;
        pio.insert(
            Arc::new(Mutex::new(ResetControl::new(sink.clone()))),
            u64::from(RESET_CONTROL_PORT),
            1,
        )
        .map_err(dev_err)?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPm::new(sink))),
            u64::from(ACPI_PM_PORT),
            ACPI_PM_LEN,
        )
        .map_err(dev_err)?;
        // The ACPI power button: the GED's event register and its edge-triggered GSI.
        let ged_irq = Interrupt::new().map_err(|source| VmError::Io {
            what: "creating the GED interrupt eventfd",
            source,
        })?;
        vm_fd
            .register_irqfd(ged_irq.eventfd(), GED_GSI)
            .map_err(kvm_err("KVM_IRQFD (GED)"))?;
        let ged = Ged::new(ged_irq);
        let power_button = ged.handle();
        pio.insert(Arc::new(Mutex::new(ged)), u64::from(GED_PORT), GED_LEN)
            .map_err(dev_err)?;
        let pio = Arc::new(pio);
        let mut mmio = Bus::new();
        let virtio = crate::virtio::attach(&vm_fd, &mem, &mut mmio, built.devices)
            .map_err(|e| VmError::Device(e.to_string()))?;
        let mmio = Arc::new(mmio);

        // Boot image.
        let entry = match (&config.kernel, kernel_format) {
            (Some(kernel), Some(format)) => {
                let rsdp = acpi::create_acpi_tables(&mem, config.cpus, &virtio.dsdt)?;
                let base = base_cmdline(console.wants_kernel_console());
                let cmdline = match (base.is_empty(), config.cmdline.trim().is_empty()) {
                    (_, true) => base.to_string(),
                    (true, false) => config.cmdline.trim().to_string(),
                    (false, false) => format!("{base} {}", config.cmdline.trim()),
                };
                boot::load_linux(
                    &mem,
                    &LinuxBoot {
                        kernel,
                        format,
                        initrd: config.initrd.as_deref(),
                        cmdline: &cmdline,
                        mem_size: config.memory.0,
                        rsdp,
                    },
                )?
            }
            _ => BootEntry::ResetVector,
        };

        // vCPUs.
        let host_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let hint = if flavour.runs_stock_kernels() {
            Some("the guest stopped before it could report a panic; add `earlyprintk=ttyS0` to --cmdline to see how far it got, and check the kernel is an x86-64 Linux kernel")
        } else {
            Some(PVM_HINT)
        };
        let setup = VcpuSetup {
            host_cpuid: &host_cpuid,
            vcpu_count: config.cpus,
            pmu: config.pmu,
            brand: cpu::cpuid::host_brand(),
            entry,
            mem: &mem,
        };
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for id in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpus.push(Vcpu::new(id, fd, &setup, pio.clone(), mmio.clone(), hint)?);
        }

        Ok(Vm {
            vcpus,
            _vm_fd: vm_fd,
            _kvm: kvm,
            mem,
            _firmware: firmware,
            console,
            serial,
            power_button,
            events_tx,
            events_rx,
            control: Arc::new(RunControl::default()),
            flavour,
            kernel_boot: config.kernel.is_some(),
            virtio: Some(virtio),
            device_entries: built.entries,
            balloon: built.balloon,
            control_path: None,
            cpus: config.cpus,
            memory_size: config.memory.0,
            started,
        })
    }

    /// Serves a control socket at `path` while the VM runs (see [`crate::control`]).
    pub fn set_control_socket(&mut self, path: &Path) {
        self.control_path = Some(path.to_path_buf());
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
    /// (SIGINT, SIGTERM, SIGHUP, the console's `Ctrl-A x`).
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
                if let Some(sig) = signals.forever().next() {
                    let _ = tx.send(VmEvent::Signal(sig));
                }
            })
            .map_err(io_err("starting the signal thread"))?;

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

        let run_start = Instant::now();
        let mut threads: Vec<(JoinHandle<Vcpu>, Arc<VcpuStats>)> = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let stats = vcpu.stats();
            let ctl = self.control.clone();
            let tx = self.events_tx.clone();
            let name = format!("fv-vcpu-{}", vcpu.id());
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run(ctl, tx))
                .map_err(io_err("starting a vCPU thread"))?;
            threads.push((handle, stats));
        }
        tracing::info!(
            "vCPUs started {:.1} ms after process start",
            self.started.elapsed().as_secs_f64() * 1000.0
        );
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shutting_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _control_socket = match self.control_path.clone() {
            Some(path) => {
                let state = crate::control::ControlState {
                    started: run_start,
                    cpus: self.cpus,
                    memory: self.memory_size,
                    vcpu_stats: threads.iter().map(|(_, s)| s.clone()).collect(),
                    devices: std::mem::take(&mut self.device_entries),
                    balloon: self.balloon.clone(),
                    events: self.events_tx.clone(),
                    paused: paused.clone(),
                    shutting_down: shutting_down.clone(),
                };
                match crate::control::serve(&path, state) {
                    Ok(sock) => Some(sock),
                    Err(source) => {
                        self.stop_vcpus(&threads);
                        return Err(VmError::Io {
                            what: "serving the control socket",
                            source,
                        });
                    }
                }
            }
            None => None,
        };

        let mut watchdog =
            (self.kernel_boot && self.flavour == KvmFlavour::Pvm).then_some(PVM_PROGRESS_TIMEOUT);
        let event = loop {
            let event = self.next_event(watchdog, &threads);
            watchdog = None;
            match event {
                Some(VmEvent::Control(req)) => {
                    let result = match req.action {
                        crate::control::Action::Pause => {
                            self.pause_vcpus(&threads);
                            paused.store(true, std::sync::atomic::Ordering::SeqCst);
                            Ok("paused")
                        }
                        crate::control::Action::Resume => {
                            self.control.resume();
                            paused.store(false, std::sync::atomic::Ordering::SeqCst);
                            Ok("running")
                        }
                        crate::control::Action::Shutdown => {
                            if paused.load(std::sync::atomic::Ordering::SeqCst) {
                                Err("the VM is paused and cannot react to the power button; \
resume it first, or stop it"
                                    .to_string())
                            } else {
                                match self.power_button.press_power_button() {
                                    Ok(()) => {
                                        tracing::info!("ACPI power button pressed");
                                        shutting_down
                                            .store(true, std::sync::atomic::Ordering::SeqCst);
                                        Ok("shutting-down")
                                    }
                                    Err(e) => Err(format!("pressing the power button: {e}")),
                                }
                            }
                        }
                        crate::control::Action::Stop => {
                            let _ = req.reply.send(Ok("stopped"));
                            break Some(VmEvent::UserQuit);
                        }
                    };
                    let _ = req.reply.send(result);
                }
                other => break other,
            }
        };
        let run_time = run_start.elapsed();
        signal_handle.close();
        self.stop_vcpus(&threads);
        let mut exits = ExitCounts::default();
        let mut vcpus = Vec::new();
        for (handle, stats) in threads {
            exits.add(&stats.snapshot());
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
        let reason = match event {
            Some(VmEvent::Request(VmRequest::Poweroff)) => ExitReason::Poweroff,
            Some(VmEvent::Request(VmRequest::Reset)) => ExitReason::Reset,
            Some(VmEvent::Request(VmRequest::Panic)) => ExitReason::Panic,
            Some(VmEvent::Fault(f)) => ExitReason::Fault(f),
            Some(VmEvent::Signal(sig)) => ExitReason::Stopped(Some(sig)),
            Some(VmEvent::UserQuit) | Some(VmEvent::Control(_)) => ExitReason::Stopped(None),
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
            })),
        };
        Ok(VmOutcome {
            reason,
            exits,
            run_time,
        })
    }

    /// Waits for the event that ends the VM. With `watchdog`, gives up (`None`) when no vCPU
    /// has exited to the VMM by then.
    fn next_event(
        &self,
        watchdog: Option<Duration>,
        threads: &[(JoinHandle<Vcpu>, Arc<VcpuStats>)],
    ) -> Option<VmEvent> {
        if let Some(limit) = watchdog {
            match self.events_rx.recv_timeout(limit) {
                Ok(ev) => return Some(ev),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let exits: u64 = threads.iter().map(|(_, s)| s.snapshot().total()).sum();
                    if exits == 0 {
                        return None;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Some(VmEvent::UserQuit)
                }
            }
        }
        // Every sender gone cannot happen (the VM holds one); treat it as a stop.
        Some(self.events_rx.recv().unwrap_or(VmEvent::UserQuit))
    }
    /// Parks every vCPU: sets the pause flag and kicks the threads until all are parked.
    fn pause_vcpus(&self, threads: &[(JoinHandle<Vcpu>, Arc<VcpuStats>)]) {
        self.control.request_pause();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (self.control.parked() as usize) < threads.len() && Instant::now() < deadline {
            for (h, _) in threads {
                if !h.is_finished() {
                    let _ = h.kill(cpu::kick_signal());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops every vCPU thread: sets the stop flag, then kicks the threads until they have
    /// left `KVM_RUN` (a kick can race with a thread entering it, so it is repeated).
    fn stop_vcpus(&self, threads: &[(JoinHandle<Vcpu>, Arc<VcpuStats>)]) {
        self.control.request_stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut alive = 0;
            for (h, _) in threads {
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
