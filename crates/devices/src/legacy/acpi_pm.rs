//! The ACPI hardware-reduced power controls: the FADT's sleep control/status registers and its
//! reset register, all in one small port-I/O block.
//!
//! Register map (offsets from the block's base):
//! - 0: sleep control — the guest writes `SLP_TYP << 2 | SLP_EN`; `SLP_TYP` 5 (`_S5_`) is off;
//! - 1: sleep status — reads 0 (we never wake);
//! - 2: reset — writing [`RESET_VALUE`] resets the machine.

use crate::{BusDevice, VmRequest, VmRequestFn};

/// Length of the port block.
pub const ACPI_PM_LEN: u64 = 4;
/// Sleep-enable bit of the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// The `SLP_TYP` value the DSDT's `_S5_` package advertises.
pub const S5_SLP_TYP: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;

/// The power/reset block.
pub struct AcpiPm {
    sink: VmRequestFn,
}

impl AcpiPm {
    /// A block that sends power-off and reset requests to `sink`.
    pub fn new(sink: VmRequestFn) -> Self {
        AcpiPm { sink }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            SLEEP_CONTROL | SLEEP_STATUS | RESET => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let slp_typ = (value >> 2) & 0x7;
                if slp_typ == S5_SLP_TYP {
                    (self.sink)(VmRequest::Poweroff);
                } else {
                    tracing::warn!(slp_typ, "guest asked for an unsupported ACPI sleep state");
                }
            }
            RESET if value == RESET_VALUE => (self.sink)(VmRequest::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::recorder;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (sink, log) = recorder();
        let mut dev = AcpiPm::new(sink);
        dev.write(SLEEP_CONTROL, &[S5_SLP_TYP << 2]); // no SLP_EN
        dev.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]); // S3: unsupported
        dev.write(RESET, &[0x42]);
        dev.write(3, &[0xff]);
        assert!(log.lock().unwrap().is_empty());
        dev.write(SLEEP_CONTROL, &[(S5_SLP_TYP << 2) | SLP_EN]);
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(
            *log.lock().unwrap(),
            vec![VmRequest::Poweroff, VmRequest::Reset]
        );
        let mut b = [0xaa];
        dev.read(SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }
}
