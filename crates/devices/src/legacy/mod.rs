//! Legacy PC devices: COM1 serial, the i8042 reset line, the 0xcf9 reset register, pvpanic,
//! the ACPI power controls and the ACPI Generic Event Device's register (the power button).

mod acpi_pm;
mod ged;
mod i8042;
mod pvpanic;
mod reset_control;
mod serial;

pub use acpi_pm::{AcpiPm, ACPI_PM_LEN, RESET_VALUE, S5_SLP_TYP, SLP_EN};
pub use ged::{Ged, GedHandle, GED_LEN, GED_POWER_BUTTON};
pub use i8042::I8042;
pub use pvpanic::{PvPanic, PVPANIC_CAPABILITIES, PVPANIC_CRASH_LOADED, PVPANIC_PANICKED};
pub use reset_control::{ResetControl, RESET_CONTROL_PORT, RST_CPU};
pub use serial::{Serial, SerialOutput};

use crate::{VmRequest, VmRequestFn};

/// A `vm_superio::Trigger` that delivers one fixed [`VmRequest`].
struct RequestTrigger {
    request: VmRequest,
    sink: VmRequestFn,
}

impl vm_superio::Trigger for RequestTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.sink)(self.request);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use crate::{VmRequest, VmRequestFn};
    use std::sync::{Arc, Mutex};

    /// A request sink that records what it was sent.
    pub fn recorder() -> (VmRequestFn, Arc<Mutex<Vec<VmRequest>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (Arc::new(move |r| l.lock().unwrap().push(r)), log)
    }
}
