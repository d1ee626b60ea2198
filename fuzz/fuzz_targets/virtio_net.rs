//! virtio-net's data path under arbitrary guest memory: both queues (16 entries, rings at fixed
//! addresses) hold whatever the fuzzer wrote, and the backend hands the device frames cut from
//! the input. Transmit and receive are driven synchronously through `NetHandler::process_tx` and
//! `NetHandler::process_rx`, with and without mergeable buffers and EVENT_IDX. Nothing may panic
//! or hang, and nothing outside guest memory may be touched.
#![no_main]

use devices::rate_limiter::RateLimit;
use devices::virtio::net::{NetBackend, NetHandler, NetMetrics, OFFERED_FEATURES};
use devices::virtio::transport::NoInterrupt;
use libfuzzer_sys::fuzz_target;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;
// Ring layout: queue q at 0x1000 + q * 0x1000 (descriptors), + 0x400 (avail), + 0x800 (used).
const RINGS: u64 = 0x1000;

/// Frames to deliver (cut from the input), and a sink for transmitted ones.
struct FuzzBackend {
    frames: Mutex<Vec<Vec<u8>>>,
}

impl AsRawFd for FuzzBackend {
    fn as_raw_fd(&self) -> RawFd {
        -1 // never watched: the synchronous entry points do not use epoll
    }
}

impl NetBackend for FuzzBackend {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut f = self.frames.lock().unwrap();
        match f.pop() {
            Some(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        Ok(frame.len())
    }
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fn queue(q: u64) -> Queue {
    let base = RINGS + q * 0x1000;
    let mut queue = Queue::new(16).unwrap();
    queue.set_desc_table_address(Some(base as u32), Some(0));
    queue.set_avail_ring_address(Some((base + 0x400) as u32), Some(0));
    queue.set_used_ring_address(Some((base + 0x800) as u32), Some(0));
    queue.set_ready(true);
    queue
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: feature selection; then guest memory (up to 64 KiB); the rest: frames, each a
    // 2-byte length (modulo 66000) followed by that many bytes.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let split = rest.len().min(MEM);
    let (mem_bytes, frame_bytes) = rest.split_at(split);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(mem_bytes, GuestAddress(0));

    let mut frames = Vec::new();
    let mut fb = frame_bytes;
    while fb.len() >= 2 && frames.len() < 64 {
        let len = usize::from(u16::from_le_bytes([fb[0], fb[1]])) % 66000;
        fb = &fb[2..];
        let take = len.min(fb.len());
        frames.push(fb[..take].to_vec());
        fb = &fb[take..];
    }
    frames.reverse();

    let mut features = OFFERED_FEATURES;
    if sel & 1 == 0 {
        features &= !(1 << 15); // VIRTIO_NET_F_MRG_RXBUF
    }
    if sel & 2 == 0 {
        features &= !(1 << 29); // VIRTIO_RING_F_EVENT_IDX
    }
    let backend = Arc::new(FuzzBackend {
        frames: Mutex::new(frames),
    });
    let irq = Arc::new(NoInterrupt);
    let mut h = NetHandler::new(
        mem,
        queue(0),
        queue(1),
        irq,
        backend,
        Arc::new(NetMetrics::default()),
        features,
        RateLimit::default(),
    )
    .unwrap();
    for _ in 0..4 {
        h.process_tx();
        h.process_rx();
    }
});
