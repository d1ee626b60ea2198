//! Wiring virtio devices into a VM: an MMIO window and a GSI each, an irqfd for the interrupt,
//! an ioeventfd per queue for notifications, a DSDT entry so the stock `virtio_mmio` driver
//! finds them, and one event-loop thread that turns ioeventfd signals into queue notifications.

use crate::boot::acpi::DsdtDevice;
use crate::memory::VIRTIO_MMIO_START;
use devices::sync::lock;
use devices::virtio::{MmioTransport, VirtioDevice, MMIO_LEN, NOTIFY_OFFSET};
use devices::{Bus, Interrupt};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First GSI given to virtio devices (above the ISA range, on the IOAPIC's PCI pins).
pub const VIRTIO_GSI_START: u32 = 16;
pub use config::MAX_VIRTIO_DEVICES;

/// A virtio device as the monitoring side sees it.
pub struct DeviceEntry {
    /// `block`, `net`, `vsock`, `rng`, `balloon`, `console`.
    pub kind: &'static str,
    /// Its id (`--disk id=`), or kind + index.
    pub id: String,
    /// Its counters.
    pub metrics: Option<Arc<dyn devices::virtio::Metrics>>,
}

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

/// The devices a [`crate::VmConfig`] asks for, with what the monitoring side keeps of them.
pub struct BuiltDevices {
    /// In slot order.
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// Kind, id and counters of each.
    pub entries: Vec<DeviceEntry>,
    /// The balloon's handle.
    pub balloon: Option<devices::virtio::balloon::BalloonControl>,
}

fn limit(iops: Option<u64>, bw: Option<config::ByteSize>) -> devices::rate_limiter::RateLimit {
    devices::rate_limiter::RateLimit {
        ops_per_sec: iops,
        bytes_per_sec: bw.map(|b| b.0),
    }
}

/// Creates the virtio devices of `config` (opening images, TAPs and sockets); every error
/// names the option and value at fault.
pub fn build_devices(config: &crate::VmConfig) -> Result<BuiltDevices, crate::VmError> {
    use devices::virtio::{balloon, block, console, net, rng, vsock};
    let dev_err = |e: String| crate::VmError::Device(e);
    let mut out = BuiltDevices {
        devices: Vec::new(),
        entries: Vec::new(),
        balloon: None,
    };
    let push =
        |out: &mut BuiltDevices, kind: &'static str, id: String, d: Box<dyn VirtioDevice>| {
            out.entries.push(DeviceEntry {
                kind,
                id,
                metrics: d.metrics(),
            });
            out.devices.push(d);
        };
    for (i, d) in config.disks.iter().enumerate() {
        let dev = block::Block::new(block::BlockConfig {
            path: d.path.clone(),
            readonly: d.readonly,
            id: d.id.clone(),
            rate: limit(d.iops, d.bw),
            engine: block::IoEngine::Auto,
        })
        .map_err(|e| dev_err(format!("--disk {}: {e}", d.path.display())))?;
        let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
        tracing::info!(
            "disk {id} ({}): {} sectors, {:?} I/O{}",
            d.path.display(),
            dev.capacity(),
            dev.engine_in_use(),
            if d.readonly { ", read-only" } else { "" }
        );
        push(&mut out, "block", id, Box::new(dev));
    }
    for (i, n) in config.nets.iter().enumerate() {
        let dev = net::Net::new(net::NetConfig {
            tap: n.tap.clone(),
            mac: n.mac.map(|m| m.0),
            id: n.id.clone(),
            rate: limit(n.iops, n.bw),
        })
        .map_err(|e| dev_err(format!("--net tap={}: {e}", n.tap)))?;
        let id = n.id.clone().unwrap_or_else(|| format!("net{i}"));
        push(&mut out, "net", id, Box::new(dev));
    }
    if let Some(v) = &config.vsock {
        let dev = vsock::Vsock::new(vsock::VsockConfig {
            cid: v.cid,
            socket: v.socket.clone(),
        })
        .map_err(|e| dev_err(format!("--vsock: {e}")))?;
        push(&mut out, "vsock", "vsock0".into(), Box::new(dev));
    }
    if config.rng {
        push(&mut out, "rng", "rng0".into(), Box::new(rng::Rng::new()));
    }
    if let Some(b) = &config.balloon {
        let dev = balloon::Balloon::new(balloon::BalloonConfig {
            target_bytes: b.size.0,
            deflate_on_oom: b.deflate_on_oom,
            stats_interval_s: b.stats_interval,
            free_page_reporting: b.free_page_reporting,
        });
        out.balloon = Some(dev.control());
        push(&mut out, "balloon", "balloon0".into(), Box::new(dev));
    }
    if let Some(c) = &config.console {
        let backend = match c {
            config::SerialConfig::Null | config::SerialConfig::Stdio => {
                console::ConsoleBackend::Null
            }
            config::SerialConfig::File(p) => console::ConsoleBackend::File(p.clone()),
            config::SerialConfig::Socket(p) => console::ConsoleBackend::Socket(p.clone()),
        };
        let dev = console::Console::new(backend).map_err(|e| dev_err(format!("--console: {e}")))?;
        push(&mut out, "console", "console0".into(), Box::new(dev));
    }
    Ok(out)
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
        let transport = MmioTransport::new(device, mem.clone(), line);
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

/// The running event loop; stopping it drops the transports and with them the devices (their
/// workers stop, sockets they created are removed).
pub struct VirtioLoop {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VirtioLoop {
    /// Stops the event-loop thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VirtioLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl VirtioDevices {
    /// Starts the event loop thread.
    pub fn start(self) -> std::io::Result<VirtioLoop> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let stop_token = self.notifiers.len() as u64;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, stop_token),
        )?;
        for (i, n) in self.notifiers.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                n.evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let thread = std::thread::Builder::new()
            .name("fv-virtio".into())
            .spawn(move || {
                jail::seccomp::apply_or_abort(jail::seccomp::ThreadKind::EventLoop);
                let mut events = vec![EpollEvent::default(); self.notifiers.len() + 1];
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
                        if ev.data() == stop_token {
                            return;
                        }
                        let Some(notifier) = self.notifiers.get(ev.data() as usize) else {
                            continue;
                        };
                        // Reading resets the counter; several notifications fold into one.
                        let _ = notifier.evt.read();
                        lock(&notifier.transport).notify(notifier.queue);
                    }
                }
            })?;
        Ok(VirtioLoop {
            stop,
            thread: Some(thread),
        })
    }
}
