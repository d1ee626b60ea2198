//! The PC reset control register at port 0xcf9 (PIIX/ICH "RST_CNT"). Linux falls back to it when
//! the ACPI reset register is not used: on a hardware-reduced ACPI platform its default reboot
//! path is EFI (absent here), then this port, then a triple fault.

use crate::{BusDevice, VmRequest, VmRequestFn};

/// The port.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// "Reset CPU": writing a value with this bit set resets the machine.
pub const RST_CPU: u8 = 1 << 2;
/// Bits the register keeps (system reset type, full reset).
const KEPT_BITS: u8 = 0x0a;

/// Port 0xcf9.
pub struct ResetControl {
    sink: VmRequestFn,
    value: u8,
}

impl ResetControl {
    /// A register that sends [`VmRequest::Reset`] to `sink`.
    pub fn new(sink: VmRequestFn) -> Self {
        ResetControl { sink, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (0, [b]) => *b = self.value,
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, [value]) = (offset, data) {
            self.value = value & KEPT_BITS;
            if value & RST_CPU != 0 {
                (self.sink)(VmRequest::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::recorder;

    #[test]
    fn linux_cf9_sequence_resets_once() {
        let (sink, log) = recorder();
        let mut dev = ResetControl::new(sink);
        // Linux: cf9 = inb(0xcf9) & ~0x0e; outb(cf9 | 2); outb(cf9 | 0x0e).
        let mut b = [0xffu8];
        dev.read(0, &mut b);
        assert_eq!(b, [0]);
        dev.write(0, &[0x02]);
        assert!(log.lock().unwrap().is_empty());
        dev.read(0, &mut b);
        assert_eq!(b, [0x02]);
        dev.write(0, &[0x0e]);
        assert_eq!(*log.lock().unwrap(), vec![VmRequest::Reset]);
        dev.write(0, &[0x04, 0x04]);
        dev.write(1, &[0x04]);
        assert_eq!(log.lock().unwrap().len(), 1);
    }
}
