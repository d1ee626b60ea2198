//! pvpanic: the guest kernel's panic notifier writes here (QEMU's `QEMU0001` I/O-port device,
//! bound by Linux's `pvpanic-mmio` driver through ACPI).

use crate::{BusDevice, VmRequest, VmRequestFn};

/// The guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest loaded a crash kernel (kdump) and is about to run it.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// What the device offers, as read back by the driver.
pub const PVPANIC_CAPABILITIES: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The pvpanic port.
pub struct PvPanic {
    sink: VmRequestFn,
    crash_loaded: bool,
}

impl PvPanic {
    /// A device that sends [`VmRequest::Panic`] to `sink` when the guest reports a panic.
    pub fn new(sink: VmRequestFn) -> Self {
        PvPanic {
            sink,
            crash_loaded: false,
        }
    }

    /// Whether the guest said it is handing over to a crash kernel.
    pub fn crash_loaded(&self) -> bool {
        self.crash_loaded
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_CAPABILITIES;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        if value & PVPANIC_CRASH_LOADED != 0 {
            tracing::warn!("guest reports a crash kernel loaded (pvpanic)");
            self.crash_loaded = true;
        }
        if value & PVPANIC_PANICKED != 0 {
            (self.sink)(VmRequest::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::recorder;

    #[test]
    fn reports_capabilities_and_panics() {
        let (sink, log) = recorder();
        let mut dev = PvPanic::new(sink);
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [PVPANIC_CAPABILITIES, 0]);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        assert!(dev.crash_loaded());
        assert!(log.lock().unwrap().is_empty());
        dev.write(1, &[PVPANIC_PANICKED]);
        dev.write(0, &[]);
        assert!(log.lock().unwrap().is_empty());
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(*log.lock().unwrap(), vec![VmRequest::Panic]);
    }
}
