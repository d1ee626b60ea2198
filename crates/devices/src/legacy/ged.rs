//! The event register of an ACPI Generic Event Device (`ACPI0013`): how a hardware-reduced
//! platform, which has no GPE blocks, tells the guest that something happened — here, that the
//! power button was pressed.
//!
//! The host sets event bits and raises the GED's interrupt (edge-triggered, through an irqfd).
//! The guest's GED driver (Linux `drivers/acpi/evged.c`) runs the DSDT's `_EVT` method, which
//! reads this one-byte register and notifies the devices whose bits are set (the power button:
//! `Notify(PWRB, 0x80)`). Reading returns the pending bits and clears them, so each press is
//! seen once; a press that arrives after the read raises the interrupt again. Writes are ignored.

use crate::{BusDevice, Interrupt};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Length of the register block.
pub const GED_LEN: u64 = 1;
/// Event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1 << 0;

struct Shared {
    pending: AtomicU8,
    irq: Interrupt,
}

/// The GED's event register, as the guest sees it on the bus.
pub struct Ged {
    shared: Arc<Shared>,
}

/// The host's side of the GED: raises events.
#[derive(Clone)]
pub struct GedHandle {
    shared: Arc<Shared>,
}

impl Ged {
    /// A GED that raises `irq` when an event is pending.
    pub fn new(irq: Interrupt) -> Self {
        Ged {
            shared: Arc::new(Shared {
                pending: AtomicU8::new(0),
                irq,
            }),
        }
    }

    /// A handle the VMM keeps to raise events.
    pub fn handle(&self) -> GedHandle {
        GedHandle {
            shared: self.shared.clone(),
        }
    }
}

impl GedHandle {
    /// Presses the ACPI power button: the guest sees a power-button notification.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.raise(GED_POWER_BUTTON)
    }

    /// Sets `events` pending and raises the interrupt.
    pub fn raise(&self, events: u8) -> std::io::Result<()> {
        self.shared.pending.fetch_or(events, Ordering::SeqCst);
        self.shared.irq.trigger()
    }

    /// The events not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.shared.pending.load(Ordering::SeqCst)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 0 {
            data.fill(0xff);
            return;
        }
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.shared.pending.swap(0, Ordering::SeqCst);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ged() -> (Ged, GedHandle, Interrupt) {
        let irq = Interrupt::new().unwrap();
        let probe = irq.try_clone().unwrap();
        let ged = Ged::new(irq);
        let handle = ged.handle();
        (ged, handle, probe)
    }

    fn read(ged: &mut Ged, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0xaa; len];
        ged.read(offset, &mut b);
        b
    }

    #[test]
    fn power_button_sets_the_bit_raises_the_line_and_reads_once() {
        let (mut ged, handle, probe) = ged();
        assert_eq!(read(&mut ged, 0, 1), [0], "nothing pending at start");
        assert!(probe.eventfd().read().is_err(), "no interrupt yet");

        handle.press_power_button().unwrap();
        assert_eq!(handle.pending(), GED_POWER_BUTTON);
        assert_eq!(probe.eventfd().read().unwrap(), 1, "one edge per press");
        assert_eq!(read(&mut ged, 0, 1), [GED_POWER_BUTTON]);
        assert_eq!(read(&mut ged, 0, 1), [0], "reading clears");
        assert_eq!(handle.pending(), 0);
    }

    #[test]
    fn presses_before_the_read_fold_into_one_bit() {
        let (mut ged, handle, probe) = ged();
        handle.press_power_button().unwrap();
        handle.press_power_button().unwrap();
        assert_eq!(
            probe.eventfd().read().unwrap(),
            2,
            "each press raises the line"
        );
        assert_eq!(read(&mut ged, 0, 4), [GED_POWER_BUTTON, 0, 0, 0]);
        assert_eq!(read(&mut ged, 0, 1), [0]);
    }

    #[test]
    fn writes_and_other_offsets_change_nothing() {
        let (mut ged, handle, _probe) = ged();
        handle.press_power_button().unwrap();
        ged.write(0, &[0xff]);
        ged.write(0, &[]);
        ged.write(7, &[0]);
        assert_eq!(read(&mut ged, 1, 1), [0xff]);
        assert_eq!(read(&mut ged, 0, 0), Vec::<u8>::new());
        // An empty read takes nothing: the press is still pending.
        assert_eq!(read(&mut ged, 0, 1), [GED_POWER_BUTTON]);
    }
}
