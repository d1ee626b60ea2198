//! Wiring virtio devices into a VM: an MMIO window and a GSI each, an irqfd for the interrupt,
//! an ioeventfd per queue for notifications, a DSDT entry so the stock `virtio_mmio` driver
//! finds them, and one event-loop thread that turns ioeventfd signals into queue notifications.

use crate::boot::acpi::DsdtDevice;
use crate::memory::VIRTIO_MMIO_START;
use devices::virtio::{MmioTransport, VirtioDevice, VirtioInterrupt, MMIO_LEN, NOTIFY_OFFSET};
use devices::{Bus, Interrupt};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First GSI given to virtio devices (above the ISA range, on the IOAPIC's PCI pins).
pub const VIRTIO_GSI_START: u32 = 16;
/// How many virtio devices fit on the IOAPIC's remaining pins (GSIs 16–23).
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    /// More devices than interrupt pins.
    #[error("too many virtio devices ({0}); at most {MAX_VIRTIO_DEVICES} are supported")]
    TooMany(usize),
    /// A KVM or OS call failed.
    #[error("virtio device set-up: {0}")]
    Setup(String),
}

struct Notifier {
    evt: EventFd,
    transport: Arc<Mutex<MmioTransport>>,
    queue: u32,
}

/// Attached devices: their DSDT entries and what the event loop watches.
pub struct VirtioDevices {
    /// DSDT descriptions, in slot order.
    pub dsdt: Vec<DsdtDevice>,
    notifiers: Vec<Notifier>,
}

fn err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> VirtioSetupError + '_ {
    move |e| VirtioSetupError::Setup(format!("{what}: {e}"))
}

/// Puts each device behind a virtio-mmio window at `VIRTIO_MMIO_START + i * MMIO_LEN`.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<VirtioDevices, VirtioSetupError> {
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(VirtioSetupError::TooMany(devices.len()));
    }
    let mut out = VirtioDevices {
        dsdt: Vec::new(),
        notifiers: Vec::new(),
    };
    for (i, device) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + i as u64 * MMIO_LEN;
        let gsi = VIRTIO_GSI_START + i as u32;
        let line = Interrupt::new().map_err(|e| VirtioSetupError::Setup(e.to_string()))?;
        vm.register_irqfd(line.eventfd(), gsi)
            .map_err(err("KVM_IRQFD"))?;
        let interrupt = Arc::new(VirtioInterrupt::new(line));
        let transport = MmioTransport::new(device, mem.clone(), interrupt);
        let queues = transport.num_queues() as u32;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_LEN)
            .map_err(|e| VirtioSetupError::Setup(e.to_string()))?;
        for queue in 0..queues {
            let evt =
                EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioSetupError::Setup(e.to_string()))?;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), queue)
                .map_err(err("KVM_IOEVENTFD"))?;
            out.notifiers.push(Notifier {
                evt,
                transport: transport.clone(),
                queue,
            });
        }
        out.dsdt.push(DsdtDevice::VirtioMmio {
            base,
            len: MMIO_LEN,
            irq: gsi,
        });
    }
    Ok(out)
}

impl VirtioDevices {
    /// Starts the event loop thread (nothing to do without devices).
    pub fn start(self) -> std::io::Result<()> {
        if self.notifiers.is_empty() {
            return Ok(());
        }
        let epoll = Epoll::new()?;
        for (i, n) in self.notifiers.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                n.evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        std::thread::Builder::new()
            .name("fv-virtio".into())
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); self.notifiers.len()];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!("virtio event loop: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        let Some(notifier) = self.notifiers.get(ev.data() as usize) else {
                            continue;
                        };
                        // Reading resets the counter; several notifications fold into one.
                        let _ = notifier.evt.read();
                        notifier
                            .transport
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .notify(notifier.queue);
                    }
                }
            })?;
        Ok(())
    }
}
