//! An I/O APIC in user space (82093AA, version 0x11, 24 pins), for KVM's split irqchip: the
//! local APICs stay in KVM, and each pin the guest programs becomes an MSI route that KVM
//! delivers straight from the device's irqfd — no exit to the VMM per interrupt.
//!
//! The guest writes a pin's redirection entry (vector, delivery mode, destination, mask) through
//! the indirect IOREGSEL/IOWIN registers; every change of an entry hands the whole routing
//! table to the [`MsiRouter`] (the VMM turns it into `KVM_SET_GSI_ROUTING`). A masked pin has
//! no route: an edge on it is dropped, as the chip drops an edge on a masked pin.
//!
//! Every line of this machine is an edge-triggered irqfd (COM1, the GED, virtio-mmio), so pins
//! are delivered as edge MSIs whatever trigger mode the guest writes; the Remote IRR bit stays 0
//! and EOIs (`KVM_EXIT_IOAPIC_EOI`) have nothing to complete.

use crate::bus::BusDevice;
use std::io;
use std::sync::Arc;

/// Pins (and GSIs 0–23).
pub const IOAPIC_PINS: usize = 24;
/// The MMIO window: IOREGSEL at 0x00, IOWIN at 0x10.
pub const IOAPIC_MMIO_LEN: u64 = 0x20;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VER: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_REDTBL: u32 = 0x10;
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);
const MASKED: u64 = 1 << 16;
/// Bits the guest may write in an entry: vector, delivery mode, destination mode, polarity,
/// trigger mode, mask, destination (delivery status and Remote IRR are read-only).
const WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An MSI: what KVM writes to the local APICs for a pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address (0xfee00000 | destination | destination mode).
    pub address: u32,
    /// Data (vector | delivery mode).
    pub data: u32,
}

/// Applies the routing table (`routes[gsi]`, `None` = no route) to KVM.
pub trait MsiRouter: Send + Sync {
    /// Replaces the routes of every pin.
    fn set_routes(&self, routes: &[Option<MsiMessage>; IOAPIC_PINS]) -> io::Result<()>;
}

/// The I/O APIC's state.
pub struct Ioapic {
    id: u32,
    select: u32,
    entries: [u64; IOAPIC_PINS],
    router: Arc<dyn MsiRouter>,
    /// Routing updates KVM refused (counted; the guest sees no error on an MMIO write).
    pub route_errors: u64,
}

impl Ioapic {
    /// An I/O APIC with every pin masked, routing through `router`.
    pub fn new(router: Arc<dyn MsiRouter>) -> Ioapic {
        Ioapic {
            id: 0,
            select: 0,
            entries: [MASKED; IOAPIC_PINS],
            router,
            route_errors: 0,
        }
    }

    /// The MSI pin `entry` raises, or `None` while it is masked.
    pub fn msi(entry: u64) -> Option<MsiMessage> {
        if entry & MASKED != 0 {
            return None;
        }
        let vector = (entry & 0xff) as u32;
        let delivery_mode = ((entry >> 8) & 0x7) as u32;
        let logical = ((entry >> 11) & 1) as u32;
        let dest = ((entry >> 56) & 0xff) as u32;
        Some(MsiMessage {
            address: 0xfee0_0000 | (dest << 12) | (logical << 2),
            // Edge-triggered (bit 15 clear): see the module doc.
            data: vector | (delivery_mode << 8),
        })
    }

    /// The routing table of the current entries.
    pub fn routes(&self) -> [Option<MsiMessage>; IOAPIC_PINS] {
        let mut r = [None; IOAPIC_PINS];
        for (slot, &e) in r.iter_mut().zip(&self.entries) {
            *slot = Self::msi(e);
        }
        r
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id << 24,
            REG_VER => VERSION,
            REG_ARB => self.id << 24,
            r if (REG_REDTBL..REG_REDTBL + 2 * IOAPIC_PINS as u32).contains(&r) => {
                let e = self.entries[((r - REG_REDTBL) / 2) as usize];
                if r % 2 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_register(&mut self, v: u32) {
        match self.select {
            REG_ID => self.id = (v >> 24) & 0xf,
            r if (REG_REDTBL..REG_REDTBL + 2 * IOAPIC_PINS as u32).contains(&r) => {
                let pin = ((r - REG_REDTBL) / 2) as usize;
                let old = self.entries[pin];
                let merged = if r % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(v)
                } else {
                    (old & 0xffff_ffff) | (u64::from(v) << 32)
                };
                let new = (old & !WRITABLE) | (merged & WRITABLE);
                self.entries[pin] = new;
                if Self::msi(old) != Self::msi(new) {
                    if let Err(e) = self.router.set_routes(&self.routes()) {
                        self.route_errors += 1;
                        tracing::warn!("IOAPIC pin {pin}: routing update refused: {e}");
                    }
                }
            }
            // VER and ARB are read-only; other registers do not exist.
            _ => {}
        }
    }

    /// A `KVM_EXIT_IOAPIC_EOI` for `vector`: nothing pending to complete (edge lines only).
    pub fn end_of_interrupt(&mut self, _vector: u8) {}
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            IOREGSEL => self.select,
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        // Registers are 32 bits wide; narrower reads get the low bytes, wider ones zeros.
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only whole 32-bit accesses are defined.
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = v & 0xff,
            IOWIN => self.write_register(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        tables: Mutex<Vec<[Option<MsiMessage>; IOAPIC_PINS]>>,
        fail: bool,
    }

    impl MsiRouter for Recorder {
        fn set_routes(&self, routes: &[Option<MsiMessage>; IOAPIC_PINS]) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.tables.lock().unwrap().push(*routes);
            Ok(())
        }
    }

    fn write32(io: &mut Ioapic, off: u64, v: u32) {
        io.write(off, &v.to_le_bytes());
    }

    fn read32(io: &mut Ioapic, off: u64) -> u32 {
        let mut b = [0u8; 4];
        io.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn reg(io: &mut Ioapic, r: u32) -> u32 {
        write32(io, IOREGSEL, r);
        read32(io, IOWIN)
    }

    fn set_reg(io: &mut Ioapic, r: u32, v: u32) {
        write32(io, IOREGSEL, r);
        write32(io, IOWIN, v);
    }

    #[test]
    fn version_id_and_reset_state() {
        let rec = Arc::new(Recorder::default());
        let mut io = Ioapic::new(rec.clone());
        assert_eq!(reg(&mut io, REG_VER), 0x0017_0011, "24 pins, version 0x11");
        set_reg(&mut io, REG_ID, 0x0300_0000);
        assert_eq!(reg(&mut io, REG_ID), 0x0300_0000);
        set_reg(&mut io, REG_VER, 0);
        assert_eq!(reg(&mut io, REG_VER), 0x0017_0011, "read-only");
        for pin in 0..IOAPIC_PINS as u32 {
            assert_eq!(
                reg(&mut io, REG_REDTBL + 2 * pin),
                1 << 16,
                "masked at reset"
            );
        }
        assert_eq!(reg(&mut io, 0x7f), 0xffff_ffff, "no such register");
        assert!(rec.tables.lock().unwrap().is_empty());
    }

    #[test]
    fn programming_a_pin_routes_it_as_an_msi_and_masking_removes_it() {
        let rec = Arc::new(Recorder::default());
        let mut io = Ioapic::new(rec.clone());
        // Pin 4: destination APIC 1 (physical), fixed delivery, vector 0x24, unmasked.
        set_reg(&mut io, REG_REDTBL + 2 * 4 + 1, 1 << 24);
        set_reg(&mut io, REG_REDTBL + 2 * 4, 0x24);
        let tables = rec.tables.lock().unwrap().clone();
        // The high half alone changed nothing routable (still masked).
        assert_eq!(tables.len(), 1);
        assert_eq!(
            tables[0][4],
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x24
            })
        );
        assert!(tables[0]
            .iter()
            .enumerate()
            .all(|(i, r)| i == 4 || r.is_none()));
        // Logical destination mode, lowest priority, level trigger (delivered as edge).
        set_reg(
            &mut io,
            REG_REDTBL + 2 * 4,
            0x24 | (1 << 8) | (1 << 11) | (1 << 15),
        );
        let last = *rec.tables.lock().unwrap().last().unwrap();
        assert_eq!(
            last[4],
            Some(MsiMessage {
                address: 0xfee0_1004,
                data: 0x124
            })
        );
        // Read-only bits stay 0 whatever is written.
        set_reg(
            &mut io,
            REG_REDTBL + 2 * 4,
            0x24 | (1 << 12) | (1 << 14) | (1 << 16),
        );
        assert_eq!(reg(&mut io, REG_REDTBL + 2 * 4), 0x24 | (1 << 16));
        assert_eq!(rec.tables.lock().unwrap().last().unwrap()[4], None);
    }

    #[test]
    fn odd_accesses_do_nothing_harmful() {
        let rec = Arc::new(Recorder {
            fail: true,
            ..Default::default()
        });
        let mut io = Ioapic::new(rec);
        io.write(IOWIN, &[1, 2]); // not 32 bits: ignored
        io.write(0x08, &[0; 4]); // no register there
        let mut wide = [0xaau8; 8];
        io.read(IOREGSEL, &mut wide);
        assert_eq!(&wide[4..], &[0; 4]);
        // A refused routing update is counted, the entry still changes.
        set_reg(&mut io, REG_REDTBL, 0x30);
        assert_eq!(io.route_errors, 1);
        assert_eq!(reg(&mut io, REG_REDTBL), 0x30);
        // Any IOREGSEL value is accepted (the low byte counts).
        write32(&mut io, IOREGSEL, 0xffff_ff01);
        assert_eq!(read32(&mut io, IOWIN), 0x0017_0011);
    }
}
