//! Fuzzes virtio-blk's request parsing and execution: `data` is the guest memory (64 KiB) holding
//! a split queue of size 16 (descriptor table at 0x1000, available ring at 0x2000, used ring at
//! 0x3000); every available chain is served synchronously against a 1 MiB scratch image.
#![no_main]

use devices::rate_limiter::RateLimit;
use devices::virtio::block::{BlockConfig, IoEngine, RequestProcessor};
use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;

fn processor() -> &'static Mutex<RequestProcessor> {
    static P: OnceLock<Mutex<RequestProcessor>> = OnceLock::new();
    P.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("fv-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("scratch image");
        let p = RequestProcessor::new(BlockConfig {
            path,
            readonly: false,
            id: Some("fuzz".into()),
            rate: RateLimit::default(),
            engine: IoEngine::Sync,
        })
        .expect("scratch image opens");
        Mutex::new(p)
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("inside memory");
    let mut q = Queue::new(16).expect("valid size");
    q.set_size(16);
    q.set_desc_table_address(Some(0x1000), Some(0));
    q.set_avail_ring_address(Some(0x2000), Some(0));
    q.set_used_ring_address(Some(0x3000), Some(0));
    q.set_ready(true);
    if let Ok(mut p) = processor().lock() {
        p.process_queue(&mem, &mut q);
    }
});
