//! Virtio devices and their transports (virtio 1.x only).
//!
//! A [`VirtioDevice`] knows its type, features, queues and config space; a transport (in
//! [`transport`]: today the [`MmioTransport`]) drives it the way its specification says a
//! driver-facing register block behaves. Devices never see KVM nor their transport: they get
//! guest memory, their queues and an `Arc<dyn VirtioInterrupt>`.

pub mod balloon;
pub mod block;
pub mod chain;
pub mod console;
pub mod net;
pub mod rng;
pub mod transport;
pub mod vsock;
pub mod worker;

pub use transport::{
    InterruptKind, MmioInterrupt, MmioTransport, VirtioInterrupt, MMIO_LEN, NOTIFY_OFFSET,
};

use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Feature bit: a virtio 1.x device (the only kind offered).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Why a device could not handle a request or activation.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The driver set up a queue the device cannot use.
    #[error("queue {0} is not valid (size, alignment or addresses outside guest memory)")]
    InvalidQueue(usize),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A host-side failure.
    #[error("{0}")]
    Host(String),
}

/// The `N` queues a device was activated with, in order, each ready (the transport checks that
/// too; a device does not rely on it). The first missing or not-ready one is the error.
pub fn ready_queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], VirtioError> {
    let mut it = queues.into_iter();
    let mut out = Vec::with_capacity(N);
    for i in 0..N {
        out.push(
            it.next()
                .filter(|q| q.ready())
                .ok_or(VirtioError::InvalidQueue(i))?,
        );
    }
    out.try_into().map_err(|_| VirtioError::InvalidQueue(0))
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy source, …).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// The driver is ready (DRIVER_OK) with `features` negotiated and these queues, all valid.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError>;
    /// The driver notified queue `index` (only after a successful activation).
    fn queue_notify(&mut self, index: usize);
    /// The driver reset the device; it must drop its queues and go back to its initial state.
    fn reset(&mut self);
    /// The device's counters, for the monitoring API.
    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        None
    }
}

/// A device's counters, read by the monitoring side while the device runs.
pub trait Metrics: Send + Sync {
    /// Every counter, by name (`requests`, `read_bytes`, `errors`, `rate_limited`, …).
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
