//! Turns a validated [`VmConfig`] into a built, not yet running [`Vm`]: host back-ends first
//! (their errors are the user's), then KVM, guest memory, legacy devices, virtio devices, the
//! boot image and the vCPUs. Nothing half-built is ever visible: an error drops what was made.
//!
//! [`build_for_boot`] boots a kernel or firmware image; a `build_from_snapshot` restoring saved
//! state will sit beside it.

use crate::boot::acpi::{self, ACPI_PM_PORT, COM1_IRQ, COM1_PORT, GED_GSI, GED_PORT, PVPANIC_PORT};
use crate::boot::{self, LinuxBoot};
use crate::console::Console;
use crate::cpu::regs::BootEntry;
use crate::cpu::{self, RunControl, Vcpu, VcpuSetup};
use crate::event::VmEvent;
use crate::kvm::{self, KvmError, KvmFlavour, PVM_HINT};
use crate::memory::{self, KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::vm::{base_cmdline, probe_host_limits, Vm, VmError};
use config::{ConfigError, VmConfig};
use devices::legacy::{
    AcpiPm, Ged, PvPanic, ResetControl, Serial, ACPI_PM_LEN, GED_LEN, I8042, RESET_CONTROL_PORT,
};
use devices::{Bus, Interrupt, VmRequestFn};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

impl Vm {
    /// Builds a VM to boot `config`'s kernel or firmware: [`build_for_boot`], unconfined.
    pub fn build(config: &VmConfig, kvm_path: &Path, started: Instant) -> Result<Vm, VmError> {
        build_for_boot(config, kvm_path, started, &mut || Ok(()))
    }
}

/// A kernel being loaded by [`boot::load_kernel`] on a thread of its own; dropping it waits
/// for the thread, so that no error path leaves a thread writing guest RAM behind.
struct KernelLoad(Option<std::thread::JoinHandle<Result<boot::LoadedKernel, boot::BootError>>>);

impl KernelLoad {
    fn start(
        mem: &vm_memory::GuestMemoryMmap,
        kernel: &Path,
        file: std::fs::File,
        format: config::KernelFormat,
    ) -> Result<KernelLoad, VmError> {
        let (mem, path) = (mem.clone(), kernel.to_path_buf());
        std::thread::Builder::new()
            .name("fv-kernel-load".into())
            .spawn(move || {
                jail::seccomp::apply_or_abort(jail::seccomp::ThreadKind::Loader);
                boot::load_kernel(&mem, &path, file, format)
            })
            .map(|h| KernelLoad(Some(h)))
            .map_err(|source| VmError::Io {
                what: "starting the kernel loader thread",
                source,
            })
    }

    fn finish(mut self, kernel: &Path) -> Result<boot::LoadedKernel, VmError> {
        let handle = self.0.take().ok_or_else(|| loader_died(kernel))?;
        Ok(handle.join().map_err(|_| loader_died(kernel))??)
    }
}

fn loader_died(kernel: &Path) -> VmError {
    VmError::Boot(boot::BootError::Kernel {
        path: kernel.to_path_buf(),
        reason: "the loader thread panicked".into(),
    })
}

impl Drop for KernelLoad {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm(KvmError::Ioctl { op, source })
}

/// Validates `config`, opens KVM and builds the VM (memory, devices, boot image, vCPUs) to boot
/// its kernel or firmware. `started` is when the process started, for start-up timing.
///
/// `confine` runs once everything the VM needs from the host is open (KVM and the VM, guest
/// RAM, images, TAPs, sockets, the kernel, initrd and firmware) and before the first thread is
/// made: the place for the jail's walls ([`jail::enter`]), which need a single-threaded process
/// and leave it unable to open anything outside its run directory.
pub fn build_for_boot(
    config: &VmConfig,
    kvm_path: &Path,
    started: Instant,
    confine: &mut dyn FnMut() -> Result<(), VmError>,
) -> Result<Vm, VmError> {
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
    // The interrupt controllers (see irqchip.rs): LAPICs in KVM; the IOAPIC in the VMM (split,
    // the default) or in KVM with a masked PIC the guest never sees; no PIT either way.
    let vm_fd = Arc::new(vm_fd);
    let msi_router = match config.irqchip {
        config::Irqchip::Split => {
            if !kvm.check_extension(kvm_ioctls::Cap::SplitIrqchip) {
                return Err(VmError::Kvm(KvmError::MissingCapability {
                    path: kvm_path.display().to_string(),
                    cap: "KVM_CAP_SPLIT_IRQCHIP",
                    what: "the VMM's own IOAPIC; run with --irqchip kernel to use KVM's",
                }));
            }
            Some(crate::irqchip::create_split(&vm_fd).map_err(|(op, source)| kvm_err(op)(source))?)
        }
        config::Irqchip::Kernel => {
            crate::irqchip::create(&vm_fd).map_err(|(op, source)| kvm_err(op)(source))?;
            None
        }
    };

    let ram = memory::GuestRam::new(config.memory.0, config.hugepages)?;
    match (config.hugepages, ram.backing()) {
        (config::HugePages::Auto, memory::RamBacking::Small(Some(why))) => {
            tracing::warn!("guest RAM falls back to 4 KiB pages: {why}")
        }
        (_, backing) => tracing::info!("guest RAM: {} in {backing}", config.memory),
    }
    let mem = ram.memory().clone();
    // The rest of what comes from the host's filesystem, before the walls go up.
    let kernel_file = match &config.kernel {
        Some(k) => Some(boot::open("kernel", k)?),
        None => None,
    };
    let initrd_file = match &config.initrd {
        Some(p) => Some(boot::open("initrd", p)?),
        None => None,
    };
    let firmware_image = match &config.firmware {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            VmError::Config(ConfigError::File {
                field: "firmware".into(),
                what: "firmware",
                path: path.clone(),
                reason: e.to_string(),
            })
        })?),
        None => None,
    };
    let mut console = Console::open(&config.serial)?;
    crate::control::preopen_proc();
    confine()?;

    // The kernel loads on a thread of its own while KVM, the devices and the vCPUs are set up
    // (it writes only its own range of guest RAM).
    let kernel_load = match (&config.kernel, kernel_file, kernel_format) {
        (Some(kernel), Some(file), Some(format)) => {
            Some(KernelLoad::start(&mem, kernel, file, format)?)
        }
        _ => None,
    };
    let mut next_slot = memory::register_with_kvm(&vm_fd, &mem, 0)
        .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    let firmware = match firmware_image {
        Some(image) => {
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
    if let Some(router) = msi_router {
        let ioapic = devices::ioapic::Ioapic::new(router);
        mmio.insert(
            Arc::new(Mutex::new(ioapic)),
            memory::IOAPIC_START,
            devices::ioapic::IOAPIC_MMIO_LEN,
        )
        .map_err(dev_err)?;
    }
    let virtio = crate::virtio::attach(&vm_fd, &mem, &mut mmio, built.devices)
        .map_err(|e| VmError::Device(e.to_string()))?;
    let mmio = Arc::new(mmio);

    // Boot image.
    let entry = match (&config.kernel, kernel_format, kernel_load) {
        (Some(kernel), Some(format), Some(load)) => {
            let loaded = load.finish(kernel)?;
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
                    format,
                    loaded,
                    initrd: config.initrd.as_deref().zip(initrd_file.as_ref()),
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
        tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
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
        fault_trace: false,
        cpus: config.cpus,
        memory_size: config.memory.0,
        started,
        _ram: ram,
    })
}
