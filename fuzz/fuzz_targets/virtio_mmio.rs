//! The virtio-mmio transport (with the rng device behind it) under arbitrary register traffic
//! and arbitrary guest memory: every register access a guest can make, in any order, with any
//! value, with queues pointing anywhere. Nothing may panic.
#![no_main]

use devices::virtio::rng::Rng;
use devices::virtio::MmioTransport;
use devices::{BusDevice, Interrupt};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // First half: guest memory contents; second half: register operations of 7 bytes each
    // (kind, offset u16, value u32).
    let split = data.len() / 2;
    let (mem_bytes, ops) = data.split_at(split);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&mem_bytes[..mem_bytes.len().min(MEM)], GuestAddress(0));
    let mut t = MmioTransport::new(Box::new(Rng::new()), mem, Interrupt::new().unwrap());
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1100;
        let value = [op[3], op[4], op[5], op[6]];
        let width = [1usize, 2, 4, 8][usize::from(op[0] >> 6)];
        if op[0] & 1 == 0 {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        } else {
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&value);
            t.write(offset, &buf[..width]);
        }
    }
});
