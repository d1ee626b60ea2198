//! Fuzzes virtio-console request parsing: `data` is the first byte (even: the transmit queue,
//! odd: the receive queue with the next 64 bytes as host input) followed by the contents of
//! 64 KiB of guest memory that hold a size-16 split queue (descriptor table at 0x0, available
//! ring at 0x1000, used ring at 0x2000) and whatever buffers its descriptors point to.
#![no_main]

use devices::virtio::console::{process_receive, process_transmit, ConsoleMetrics};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (mut input, contents) = if sel % 2 == 1 {
        let (i, c) = rest.split_at(rest.len().min(64));
        (i.to_vec(), c)
    } else {
        (Vec::new(), rest)
    };
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = contents.len().min(MEM_SIZE);
    mem.write_slice(&contents[..n], GuestAddress(0)).unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_desc_table_address(Some(0x0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    let metrics = ConsoleMetrics::default();
    if sel % 2 == 0 {
        let mut out = 0usize;
        let _ = process_transmit(&mem, &mut q, &mut |b| out += b.len(), &metrics);
    } else {
        let _ = process_receive(&mem, &mut q, &mut input, &metrics);
    }
});
