//! An interrupt line: an eventfd that the VMM registers with KVM as an irqfd.

use std::io;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An edge-triggered interrupt line backed by an eventfd.
#[derive(Debug)]
pub struct Interrupt {
    evt: EventFd,
}

impl Interrupt {
    /// Creates a new, unconnected line.
    pub fn new() -> io::Result<Self> {
        Ok(Interrupt {
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Raises the interrupt once.
    pub fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }

    /// The eventfd behind the line, for registration as a KVM irqfd (or for tests to read).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// A second handle to the same line.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Interrupt {
            evt: self.evt.try_clone()?,
        })
    }
}

impl vm_superio::Trigger for Interrupt {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        Interrupt::trigger(self)
    }
}
