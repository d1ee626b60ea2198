//! Fuzzes virtio-balloon request parsing: `data` is the first byte (which queue: inflate,
//! deflate, stats, free page reporting) followed by the contents of 64 KiB of guest memory that
//! hold a size-16 split queue (descriptor table at 0x0, available ring at 0x1000, used ring at
//! 0x2000) and whatever buffers its descriptors point to.
#![no_main]

use devices::virtio::balloon::{BalloonHandler, BalloonQueue};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, contents)) = data.split_first() else {
        return;
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
    let kind = match sel % 4 {
        0 => BalloonQueue::Inflate,
        1 => BalloonQueue::Deflate,
        2 => BalloonQueue::Stats,
        _ => BalloonQueue::Reporting,
    };
    let _ = BalloonHandler::fuzz_queue(kind, &mem, q);
});
