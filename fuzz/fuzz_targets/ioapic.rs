//! Fuzzes the user-space IOAPIC's register interface: `data` is a sequence of guest accesses,
//! each an operation byte (bit 0: read or write, bit 1: IOREGSEL or IOWIN, bits 2-4: the access
//! width 1..8, bit 5: an offset outside the two registers) followed by 4 value bytes. Every
//! routing table handed to the router must match the entries the guest can read back.
#![no_main]

use devices::ioapic::{Ioapic, MsiMessage, MsiRouter, IOAPIC_PINS};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Last(Mutex<Option<[Option<MsiMessage>; IOAPIC_PINS]>>);

impl MsiRouter for Last {
    fn set_routes(&self, routes: &[Option<MsiMessage>; IOAPIC_PINS]) -> std::io::Result<()> {
        *self.0.lock().unwrap() = Some(*routes);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let router = Arc::new(Last::default());
    let mut io = Ioapic::new(router.clone());
    for op in data.chunks(5) {
        let Some((&kind, value)) = op.split_first() else {
            break;
        };
        let width = (((kind >> 2) & 7) as usize) + 1;
        let offset = match (kind >> 5) & 1 {
            0 => u64::from((kind >> 1) & 1) * 0x10,
            _ => u64::from(kind) & 0x1f,
        };
        let mut buf = [0u8; 8];
        buf[..value.len()].copy_from_slice(value);
        if kind & 1 == 0 {
            io.read(offset, &mut buf[..width]);
        } else {
            io.write(offset, &buf[..width]);
        }
    }
    let last = *router.0.lock().unwrap();
    if let Some(last) = last {
        assert_eq!(last, io.routes(), "the router saw the entries' routes");
    }
});
