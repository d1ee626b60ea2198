//! vCPUs: set-up (CPUID, MSRs, registers, FPU, LAPIC) and the run loop that dispatches port-I/O
//! and MMIO exits to the device buses.

pub mod cpuid;
pub mod regs;

use crate::event::{FaultReport, VmEvent};
use devices::sync::lock;
use devices::{Bus, VmRequest};
use kvm_bindings::{
    kvm_run, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use regs::{BootEntry, RegsError};
use serde::Serialize;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use vm_memory::GuestMemoryMmap;

/// Exit counters of one vCPU, updated by its thread and read by anyone.
#[derive(Debug, Default)]
pub struct VcpuStats {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    unhandled_pio: AtomicU64,
    unhandled_mmio: AtomicU64,
    hlt: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
}

/// A snapshot of exit counters (summed over vCPUs when it describes a VM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Port accesses no device claimed (included in `io_in`/`io_out`).
    pub unhandled_pio: u64,
    /// MMIO accesses no device claimed (included in `mmio_read`/`mmio_write`).
    pub unhandled_mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// KVM_RUN interrupted by a signal (pause, stop).
    pub interrupted: u64,
    /// Everything else.
    pub other: u64,
}

impl ExitCounts {
    /// Every exit counted.
    pub fn total(&self) -> u64 {
        self.io_in
            + self.io_out
            + self.mmio_read
            + self.mmio_write
            + self.hlt
            + self.interrupted
            + self.other
    }

    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &ExitCounts) {
        self.io_in += o.io_in;
        self.io_out += o.io_out;
        self.mmio_read += o.mmio_read;
        self.mmio_write += o.mmio_write;
        self.unhandled_pio += o.unhandled_pio;
        self.unhandled_mmio += o.unhandled_mmio;
        self.hlt += o.hlt;
        self.interrupted += o.interrupted;
        self.other += o.other;
    }
}

impl VcpuStats {
    /// Current values.
    pub fn counters(&self) -> ExitCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitCounts {
            io_in: r(&self.io_in),
            io_out: r(&self.io_out),
            mmio_read: r(&self.mmio_read),
            mmio_write: r(&self.mmio_write),
            unhandled_pio: r(&self.unhandled_pio),
            unhandled_mmio: r(&self.unhandled_mmio),
            hlt: r(&self.hlt),
            interrupted: r(&self.interrupted),
            other: r(&self.other),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

/// Shared run state of all vCPUs: running, paused or stopping. Changing it is followed by a
/// kick (a signal) so that vCPUs inside `KVM_RUN` notice.
#[derive(Debug, Default)]
pub struct RunControl {
    state: AtomicU8,
    parked: Mutex<u32>,
    cv: Condvar,
}

impl RunControl {
    /// Asks every vCPU to leave its loop.
    pub fn request_stop(&self) {
        self.state.store(STOP, Ordering::SeqCst);
        let _g = lock(&self.parked);
        self.cv.notify_all();
    }

    /// Asks vCPUs to park (they do so after their current exit).
    pub fn request_pause(&self) {
        let _ = self
            .state
            .compare_exchange(RUN, PAUSE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Lets parked vCPUs go on.
    pub fn resume(&self) {
        let _ = self
            .state
            .compare_exchange(PAUSE, RUN, Ordering::SeqCst, Ordering::SeqCst);
        let _g = lock(&self.parked);
        self.cv.notify_all();
    }

    /// Number of vCPUs currently parked.
    pub fn parked(&self) -> u32 {
        *lock(&self.parked)
    }

    fn stopping(&self) -> bool {
        self.state.load(Ordering::SeqCst) == STOP
    }

    /// Parks while paused; returns `false` when the vCPU must stop.
    fn wait_runnable(&self) -> bool {
        if self.state.load(Ordering::SeqCst) == RUN {
            return true;
        }
        let mut parked = lock(&self.parked);
        *parked += 1;
        while self.state.load(Ordering::SeqCst) == PAUSE {
            parked = self.cv.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
        !self.stopping()
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The `kvm_run` area of the vCPU this thread runs (null on other threads, and outside
    /// [`Vcpu::run`]), for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick: sets `immediate_exit` in this thread's `kvm_run`.
///
/// A signal only interrupts `KVM_RUN` if it arrives while the thread is inside it; one that lands
/// just before (between the run-state check and the ioctl) would be lost, and the vCPU would
/// run on until its next exit — for an idle guest, a long time. With `immediate_exit` set, the
/// next `KVM_RUN` returns `EINTR` at once, whenever the kick came.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: a non-null pointer is this thread's vCPU's kvm_run mapping, set by
            // `Vcpu::run` for as long as it holds the vCPU (which owns the mapping) and cleared
            // before it returns; the handler runs on that same thread, so nothing else writes
            // it meanwhile but KVM, which only reads `immediate_exit`. A volatile byte store.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler; needed once per process before vCPUs run.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// One vCPU, set up and ready to run on its own thread.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stats: Arc<VcpuStats>,
    hint: Option<&'static str>,
}

/// What set-up needs for one vCPU.
pub struct VcpuSetup<'a> {
    /// Host CPUID (`KVM_GET_SUPPORTED_CPUID`).
    pub host_cpuid: &'a CpuId,
    /// vCPU count.
    pub vcpu_count: u32,
    /// Expose the PMU.
    pub pmu: bool,
    /// KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
    /// The host's CPU brand string ([`cpuid::host_brand`]).
    pub brand: Option<[u32; 12]>,
    /// Entry state for the boot vCPU (ignored for the others, which wait for INIT/SIPI).
    pub entry: BootEntry,
    /// Guest memory (for the boot GDT and page tables).
    pub mem: &'a GuestMemoryMmap,
}

impl Vcpu {
    /// Configures `fd` as vCPU `id`.
    pub fn new(
        id: u32,
        fd: VcpuFd,
        setup: &VcpuSetup<'_>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        hint: Option<&'static str>,
    ) -> Result<Vcpu, RegsError> {
        let kvm = |op| {
            move |source| RegsError::Kvm {
                vcpu: id,
                op,
                source,
            }
        };
        let entries = cpuid::filter_cpuid(
            setup.host_cpuid.as_slice(),
            cpuid::CpuidParams {
                vcpu_id: id,
                vcpu_count: setup.vcpu_count,
                pmu: setup.pmu,
                tsc_deadline: setup.tsc_deadline,
            },
            setup.brand,
        );
        let cpuid = CpuId::from_entries(&entries).map_err(|_| RegsError::Kvm {
            vcpu: id,
            op: "building CPUID (too many entries)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

        let msrs = regs::boot_msrs();
        let wanted = msrs.len();
        let msrs = Msrs::from_entries(&msrs).map_err(|_| RegsError::Kvm {
            vcpu: id,
            op: "building MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != wanted {
            let rejected = msrs.as_slice().get(set).map(|m| m.index).unwrap_or(0);
            tracing::warn!(
                vcpu = id,
                "KVM accepted {set} of {wanted} boot MSRs (rejected {rejected:#x})"
            );
        }
        fd.set_fpu(&regs::boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
        let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        fd.set_lapic(&regs::configure_lint(lapic))
            .map_err(kvm("KVM_SET_LAPIC"))?;
        if id == 0 {
            if let Some(r) = regs::boot_regs(setup.entry) {
                let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
                let sregs = regs::boot_sregs(setup.mem, setup.entry, sregs)?;
                fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
                fd.set_regs(&r).map_err(kvm("KVM_SET_REGS"))?;
            }
        }
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            stats: Arc::new(VcpuStats::default()),
            hint,
        })
    }

    /// This vCPU's counters (shared with its thread).
    pub fn stats(&self) -> Arc<VcpuStats> {
        self.stats.clone()
    }

    /// The index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Runs until stopped or until the guest does something that ends the VM; reports that
    /// through `events`.
    pub fn run(mut self, ctl: Arc<RunControl>, events: Sender<VmEvent>) -> Vcpu {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run));
        while ctl.wait_runnable() {
            if let Some(end) = self.run_once() {
                let event = self.resolve(end);
                // The receiver only goes away when the VM is being torn down anyway.
                let _ = events.send(event);
                break;
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        tracing::debug!(vcpu = self.id, "vCPU thread exits");
        self
    }

    /// This vCPU's registers, formatted (after its thread has returned it).
    pub fn registers(&self) -> String {
        dump_registers(&self.fd)
    }

    /// One `KVM_RUN` and the handling of its exit; `Some` when the VM must end.
    fn run_once(&mut self) -> Option<VcpuEnd> {
        let stats = &self.stats;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear it, so the next KVM_RUN (after a pause, say) enters the guest.
                self.fd.set_kvm_immediate_exit(0);
                inc(&stats.interrupted);
                return None;
            }
            Err(e) => return Some(VcpuEnd::RunFailed(e)),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                inc(&stats.io_in);
                if !self.pio.read(u64::from(port), data) {
                    inc(&stats.unhandled_pio);
                    tracing::trace!(vcpu = self.id, "unhandled port read {port:#x}");
                }
                None
            }
            VcpuExit::IoOut(port, data) => {
                inc(&stats.io_out);
                if !self.pio.write(u64::from(port), data) {
                    inc(&stats.unhandled_pio);
                    tracing::trace!(vcpu = self.id, "unhandled port write {port:#x}");
                }
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                inc(&stats.mmio_read);
                if !self.mmio.read(addr, data) {
                    inc(&stats.unhandled_mmio);
                    tracing::debug!(vcpu = self.id, "unhandled MMIO read {addr:#x}");
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                inc(&stats.mmio_write);
                if !self.mmio.write(addr, data) {
                    inc(&stats.unhandled_mmio);
                    tracing::debug!(vcpu = self.id, "unhandled MMIO write {addr:#x}");
                }
                None
            }
            VcpuExit::Hlt => {
                inc(&stats.hlt);
                None
            }
            VcpuExit::Intr => {
                inc(&stats.interrupted);
                None
            }
            // The split irqchip's EOI of a level-triggered vector: every line here is an edge,
            // so there is nothing to complete (devices::ioapic).
            VcpuExit::IoapicEoi(_) => {
                inc(&stats.other);
                None
            }
            other => {
                inc(&stats.other);
                Some(match other {
                    VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
                        VcpuEnd::Request(VmRequest::Poweroff)
                    }
                    VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
                        VcpuEnd::Request(VmRequest::Reset)
                    }
                    VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _) => {
                        VcpuEnd::Request(VmRequest::Panic)
                    }
                    VcpuExit::Shutdown => VcpuEnd::TripleFault,
                    VcpuExit::InternalError => VcpuEnd::Internal,
                    VcpuExit::FailEntry(reason, cpu) => VcpuEnd::FailEntry(reason, cpu),
                    other => VcpuEnd::Unexpected(format!("{other:?}")),
                })
            }
        }
    }

    /// Turns an end of the run loop into the event the VM acts on (reading registers for
    /// faults, which needs the exit's borrow of the vCPU to be over).
    fn resolve(&mut self, end: VcpuEnd) -> VmEvent {
        let triple = matches!(end, VcpuEnd::TripleFault);
        let kind = match end {
            VcpuEnd::Request(r) => return VmEvent::Request(r),
            VcpuEnd::TripleFault => "triple fault (KVM_EXIT_SHUTDOWN): the guest CPU hit an \
exception it could not handle"
                .to_string(),
            VcpuEnd::Internal => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit KVM has filled the `internal`
                // member of the kvm_run union; reading two u32 fields of it is sound.
                let (sub, ndata) = unsafe {
                    let run = self.fd.get_kvm_run();
                    (
                        run.__bindgen_anon_1.internal.suberror,
                        run.__bindgen_anon_1.internal.ndata,
                    )
                };
                let what = match sub {
                    1 => "emulation failure: KVM could not emulate an instruction",
                    2 => "exception during exception delivery",
                    3 => "failed to deliver an event",
                    4 => "unexpected exit reason from hardware",
                    _ => "unknown internal error",
                };
                format!("KVM internal error {sub} ({what}, {ndata} data words)")
            }
            VcpuEnd::FailEntry(reason, cpu) => format!(
                "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason \
{reason:#x}, host cpu {cpu})"
            ),
            VcpuEnd::Unexpected(what) => format!("unexpected vCPU exit: {what}"),
            VcpuEnd::RunFailed(e) => format!("KVM_RUN failed: {e}"),
        };
        let mut registers = String::new();
        if triple && in_reset_state(&self.fd) {
            // KVM on AMD reinitialises the VMCB on a shutdown intercept (it is undefined
            // afterwards), so the vCPU reads back as just reset: say so, or the dump would point
            // at the reset vector as if the guest had faulted there.
            registers.push_str(
                "note: KVM reset this vCPU when it reported the shutdown (KVM on AMD SVM does): \
the registers below are the reset state, not the state at the fault\n",
            );
        }
        registers.push_str(&dump_registers(&self.fd));
        VmEvent::Fault(Box::new(FaultReport {
            vcpu: self.id,
            kind,
            registers,
            hint: self.hint.map(str::to_string),
            trace: String::new(),
        }))
    }
}

/// Why a vCPU's run loop ended.
enum VcpuEnd {
    Request(VmRequest),
    TripleFault,
    Internal,
    FailEntry(u64, u32),
    Unexpected(String),
    RunFailed(kvm_ioctls::Error),
}

/// Whether the vCPU holds the architectural reset state (CS:IP f000:fff0 with CS base
/// 0xffff0000, real mode).
fn in_reset_state(fd: &VcpuFd) -> bool {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => {
            r.rip == 0xfff0 && s.cs.selector == 0xf000 && s.cs.base == 0xffff_0000 && s.cr0 & 1 == 0
        }
        _ => false,
    }
}

/// Registers of a vCPU, formatted for a fault report.
pub fn dump_registers(fd: &VcpuFd) -> String {
    let mut s = String::new();
    match fd.get_regs() {
        Ok(r) => s.push_str(&format!(
            "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
             rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
             rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
             r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n\
             r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15
        )),
        Err(e) => s.push_str(&format!("(registers unavailable: {e})\n")),
    }
    match fd.get_sregs() {
        Ok(r) => s.push_str(&format!(
            "cs={:#06x} base={:#x} (l={} db={}) ss={:#06x}\n\
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.cs.selector,
            r.cs.base,
            r.cs.l,
            r.cs.db,
            r.ss.selector,
            r.cr0,
            r.cr2,
            r.cr3,
            r.cr4,
            r.efer
        )),
        Err(e) => s.push_str(&format!("(special registers unavailable: {e})")),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wait_for(cond: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "condition never became true"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pause_parks_resume_releases_stop_ends() {
        let ctl = Arc::new(RunControl::default());
        assert!(ctl.wait_runnable(), "running: no parking");
        // A paused vCPU parks until resumed, then runs on.
        ctl.request_pause();
        let c = ctl.clone();
        let a = std::thread::spawn(move || c.wait_runnable());
        wait_for(|| ctl.parked() == 1);
        ctl.resume();
        assert!(a.join().unwrap());
        assert_eq!(ctl.parked(), 0);
        // A paused vCPU that is stopped leaves its loop.
        ctl.request_pause();
        let c = ctl.clone();
        let b = std::thread::spawn(move || c.wait_runnable());
        wait_for(|| ctl.parked() == 1);
        ctl.request_stop();
        assert!(!b.join().unwrap());
        assert_eq!(ctl.parked(), 0);
        // Stop is final: neither pause nor resume revives it.
        ctl.request_pause();
        ctl.resume();
        assert!(!ctl.wait_runnable());
    }

    #[test]
    fn reset_state_is_recognised() {
        // Needs a KVM (any flavour: a vCPU is created, never run).
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED reset_state_is_recognised: no usable /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        // A new vCPU holds the reset state, which is what KVM on AMD leaves after a shutdown.
        assert!(in_reset_state(&vcpu));
        let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
        regs.rip = 0x1000;
        vcpu.set_regs(&regs).expect("KVM_SET_REGS");
        assert!(!in_reset_state(&vcpu));
    }

    #[test]
    fn a_kick_before_kvm_run_is_not_lost() {
        // Needs a KVM (any flavour: KVM_RUN returns before entering the guest).
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED a_kick_before_kvm_run_is_not_lost: no usable /dev/kvm");
            return;
        };
        install_kick_handler().unwrap();
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mut fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        // On a thread of its own, like a vCPU thread: the kick lands before KVM_RUN.
        std::thread::spawn(move || {
            let run: *mut kvm_run = fd.get_kvm_run();
            KVM_RUN.with(|r| r.set(run));
            // SAFETY: raise() sends the signal to this thread; its handler is installed.
            assert_eq!(unsafe { libc::raise(kick_signal()) }, 0);
            assert_eq!(fd.get_kvm_run().immediate_exit, 1);
            let e = fd.run().expect_err("KVM_RUN must not enter the guest");
            assert_eq!(e.errno(), libc::EINTR);
            KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
            // On a thread without a vCPU the handler does nothing.
            // SAFETY: as above.
            assert_eq!(unsafe { libc::raise(kick_signal()) }, 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn exit_counts_add_up() {
        let s = VcpuStats::default();
        inc(&s.io_in);
        inc(&s.io_out);
        inc(&s.io_out);
        inc(&s.unhandled_pio);
        inc(&s.interrupted);
        let mut total = ExitCounts::default();
        total.add(&s.counters());
        total.add(&s.counters());
        assert_eq!(total.io_out, 4);
        assert_eq!(total.unhandled_pio, 2);
        assert_eq!(
            total.total(),
            8,
            "unhandled accesses are part of io_in/io_out"
        );
    }
}
