//! Fuzzes virtio-vsock's tx packet parsing and handling, then the rx path that answers it:
//! `data` is the guest memory (64 KiB) holding two split queues of size 16: tx (descriptor
//! table at 0x1000, available ring at 0x2000, used ring at 0x3000) and rx (0x4000, 0x5000,
//! 0x6000). Guest connects go to a socket path that does not exist, so they are refused (RST).
#![no_main]

use devices::virtio::vsock::{Muxer, VsockMetrics};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;

fn queue(desc: u32, avail: u32, used: u32) -> Queue {
    let mut q = Queue::new(16).expect("valid size");
    q.set_size(16);
    q.set_desc_table_address(Some(desc), Some(0));
    q.set_avail_ring_address(Some(avail), Some(0));
    q.set_used_ring_address(Some(used), Some(0));
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("inside memory");
    let mut tx = queue(0x1000, 0x2000, 0x3000);
    let mut rx = queue(0x4000, 0x5000, 0x6000);
    let mut m = Muxer::new(
        3,
        PathBuf::from("/nonexistent-ferrovisor-fuzz/v.sock"),
        Arc::new(VsockMetrics::default()),
    );
    m.fuzz_tx(&mem, &mut tx);
    m.fuzz_rx(&mem, &mut rx);
});
