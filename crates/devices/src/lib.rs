//! Ferrovisor's device models.
//!
//! A device sees guest memory and an interrupt line, never KVM or the VM: that keeps this crate
//! testable (and fuzzable) without `/dev/kvm`. Devices are attached to a [`Bus`] (port I/O or
//! MMIO) and the vCPU threads dispatch guest accesses to them.
#![deny(missing_docs)]

pub mod bus;
pub mod console_socket;
pub mod interrupt;
pub mod ioapic;
pub mod legacy;
pub mod rate_limiter;
pub mod sync;
mod sys;
pub mod tap;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use interrupt::Interrupt;

use std::sync::Arc;

/// Something a device asks of the VM as a whole (rather than of its own state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// The guest powered itself off (ACPI S5).
    Poweroff,
    /// The guest asked for a reset (i8042 pulse or ACPI reset register).
    Reset,
    /// The guest reported a kernel panic through pvpanic.
    Panic,
}

/// The channel devices use to deliver a [`VmRequest`]; the VMM decides what it means.
pub type VmRequestFn = Arc<dyn Fn(VmRequest) + Send + Sync>;
