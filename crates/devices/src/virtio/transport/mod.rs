//! Transports: how a driver reaches a virtio device (register layout, feature negotiation, queue
//! set-up, notifications, interrupts).
//!
//! A device never sees its transport. It is activated with guest memory, its queues and an
//! `Arc<dyn VirtioInterrupt>`, and signals the driver only through
//! [`VirtioInterrupt::trigger`] with an [`InterruptKind`]: "queue `i` has used buffers" or "the
//! configuration changed". How that reaches the guest is the transport's business: virtio-mmio
//! ([`mmio`]) sets a bit in its InterruptStatus register and raises its one interrupt line; a PCI
//! transport with MSI-X would pick the vector of that queue (or of the configuration) instead,
//! beside `mmio` and without touching any device.

pub mod mmio;

pub use mmio::{MmioInterrupt, MmioTransport, MMIO_LEN, NOTIFY_OFFSET};

use std::io;

/// What a device tells its driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterruptKind {
    /// The device returned buffers on the used ring of queue `n` (its index in the device's
    /// [`super::VirtioDevice::queue_max_sizes`]).
    Queue(u16),
    /// The device's configuration space changed (or the device needs a reset).
    Config,
}

impl InterruptKind {
    /// [`InterruptKind::Queue`] for a queue index as devices keep it (`usize`). Indices beyond
    /// `u16` do not exist (a transport offers at most `u16::MAX` queues); they saturate.
    pub fn queue(index: usize) -> InterruptKind {
        InterruptKind::Queue(u16::try_from(index).unwrap_or(u16::MAX))
    }
}

/// The way a device interrupts its driver, whatever the transport.
///
/// Shared by the device (and its worker thread) and the transport, so `Send + Sync`; calls may
/// come from any thread at any time after activation.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals `kind` to the driver. An error means the signal could not be delivered (the
    /// host side of the interrupt failed); the device goes on, the caller may log it.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

/// An interrupt that goes nowhere: for the synchronous fuzzing entry points, which drive a
/// device's queue processing without any transport.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_indices_saturate() {
        assert_eq!(InterruptKind::queue(3), InterruptKind::Queue(3));
        assert_eq!(
            InterruptKind::queue(usize::MAX),
            InterruptKind::Queue(u16::MAX)
        );
        assert!(NoInterrupt.trigger(InterruptKind::Config).is_ok());
    }
}
