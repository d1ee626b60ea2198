//! The virtio-mmio transport (version 2, "modern"): the register block a driver programs, and
//! its interrupt: one line plus the InterruptStatus register ([`MmioInterrupt`]).

use super::{InterruptKind, VirtioInterrupt};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::{BusDevice, Interrupt};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify (where ioeventfds are registered).
pub const NOTIFY_OFFSET: u64 = 0x50;

/// InterruptStatus bit: a used buffer was returned (on any queue).
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4656_5352; // "RSVF"
const CONFIG_SPACE: u64 = 0x100;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DEVICE_NEEDS_RESET: u32 = 64;
const FAILED: u32 = 128;

/// The interrupt of one virtio-mmio device: its line and its InterruptStatus register.
///
/// The transport hands it to the device as its [`VirtioInterrupt`]: a trigger sets the status
/// bit of its kind ([`INT_VRING`] for any queue, [`INT_CONFIG`]) and raises the line; the driver
/// reads the register (InterruptStatus, 0x060) and clears bits through InterruptACK (0x064).
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    line: Interrupt,
}

impl MmioInterrupt {
    /// Wraps `line`, with no status bit set.
    pub fn new(line: Interrupt) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    fn raise(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.trigger()
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The line itself (to register as an irqfd).
    pub fn line(&self) -> &Interrupt {
        &self.line
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        match kind {
            // One line and one bit for every queue: the driver looks at all of them.
            InterruptKind::Queue(_) => self.raise(INT_VRING),
            InterruptKind::Config => self.raise(INT_CONFIG),
        }
    }
}

/// One virtio device behind its register block.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Puts `device` behind a register block; `mem` is the guest memory its queues live in,
    /// `line` the device's interrupt line (already wired to the guest, e.g. as an irqfd).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, line: Interrupt) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new(line)),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            // A max size of 0 or not a power of two is a device bug; fall back to 256.
            .map(|&m| Queue::new(m).unwrap_or_else(|_| Queue::new(256).expect("256 is valid")))
            .collect()
    }

    /// The interrupt: its line and InterruptStatus register.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// Number of queues (for ioeventfd registration).
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Delivers a queue notification (from a QueueNotify write or its ioeventfd). Ignored until
    /// the device is activated, and for queues that do not exist.
    pub fn notify(&mut self, index: u32) {
        if self.activated && (index as usize) < self.queues.len() {
            self.device.queue_notify(index as usize);
        } else {
            tracing::debug!(
                index,
                "virtio notification before DRIVER_OK or for no queue; ignored"
            );
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    /// Marks the device broken and tells the driver (it must reset it).
    fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            "virtio device {}: {why}; DEVICE_NEEDS_RESET",
            self.device.device_type()
        );
        self.status |= DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupt.raise(INT_CONFIG) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            tracing::debug!(
                value,
                status = self.status,
                "virtio driver cleared status bits; ignored"
            );
            return;
        }
        let new = value & !self.status;
        let mut accepted = new & (ACKNOWLEDGE | DRIVER | FAILED);
        if new & FEATURES_OK != 0 {
            let offered = self.device.features();
            // FEATURES_OK stays clear when the driver asked for features not offered, or not
            // for virtio 1.x: the driver reads it back and sees negotiation failed.
            if self.status & DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0
            {
                accepted |= FEATURES_OK;
            }
        }
        if new & DRIVER_OK != 0 && (self.status | accepted) & FEATURES_OK != 0 {
            accepted |= DRIVER_OK;
        }
        self.status |= accepted;
        if accepted & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return self.needs_reset(&format!("queue {i} is not valid"));
            }
        }
        // The device gets its own copies; the transport keeps its registers readable.
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(_) => return self.needs_reset(&format!("queue {i} is not valid")),
            }
        }
        match self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.activated = true,
            Err(e) => self.needs_reset(&e.to_string()),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => q.map(|q| u32::from(q.max_size())).unwrap_or(0),
            0x044 => q.map(|q| u32::from(q.ready())).unwrap_or(0),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        // Queue set-up is only allowed between FEATURES_OK and DRIVER_OK.
        let configuring = self.status & FEATURES_OK != 0 && self.status & DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_sel = value,
            0x020 => match self.driver_features_sel {
                0 if self.status & FEATURES_OK == 0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 if self.status & FEATURES_OK == 0 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x050 => self.notify(value),
            0x064 => self.interrupt.ack(value),
            0x070 => self.set_status(value),
            _ if !configuring => {
                tracing::debug!(
                    offset,
                    "virtio queue register written outside set-up; ignored"
                )
            }
            0x038 => {
                if let Some(q) = self.selected() {
                    // Queue::set_size ignores sizes that are not powers of two or too large;
                    // activation then refuses the queue.
                    q.set_size(value.min(u32::from(u16::MAX)) as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected() {
                    q.set_ready(value == 1);
                }
            }
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                data.copy_from_slice(&self.read_reg(offset).to_le_bytes())
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & FEATURES_OK != 0 || self.status & DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        if let (4, true) = (data.len(), offset.is_multiple_of(4)) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        }
    }
}
