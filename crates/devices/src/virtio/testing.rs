#![allow(dead_code)] // each device's tests use a different part of it
//! A test-only virtio driver: brings a device up through the real MMIO transport and feeds its
//! split virtqueues in guest memory the way Linux's driver would. Shared by every device's tests.

use super::transport::{MmioInterrupt, MmioTransport};
use super::VirtioDevice;
use crate::{BusDevice, Interrupt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Guest memory size of a test driver.
pub const MEM_SIZE: usize = 32 << 20;
/// Where test data buffers may go (above the rings).
pub const DATA: u64 = 0x100_0000;

/// Ring addresses of queue `q`: (descriptor table, available ring, used ring).
pub fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x10_0000 + q as u64 * 0x1_0000;
    (base, base + 0x4000, base + 0x8000)
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

/// A device-readable buffer.
pub fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// A device-writable buffer.
pub fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// The driver.
pub struct TestDriver {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The transport under test.
    pub t: MmioTransport,
    /// Its interrupt (line and InterruptStatus register).
    pub irq: Arc<MmioInterrupt>,
    /// Queue size used for every queue.
    pub qsize: u16,
    avail_idx: Vec<u16>,
    next_desc: Vec<u16>,
}

impl TestDriver {
    /// A driver for `device` in fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> TestDriver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let n = device.queue_max_sizes().len();
        let t = MmioTransport::new(device, mem.clone(), Interrupt::new().unwrap());
        let irq = t.interrupt().clone();
        TestDriver {
            mem,
            t,
            irq,
            qsize: 16,
            avail_idx: vec![0; n],
            next_desc: vec![0; n],
        }
    }

    /// Writes a transport register.
    pub fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// Reads a transport register.
    pub fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Reads `len` bytes of the device config space at `off`.
    pub fn config(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.t.read(0x100 + off, &mut b);
        b
    }

    /// Device feature bits (both words).
    pub fn device_features(&mut self) -> u64 {
        self.w(0x014, 0);
        let lo = u64::from(self.r(0x010));
        self.w(0x014, 1);
        let hi = u64::from(self.r(0x010));
        lo | hi << 32
    }

    /// The Linux probe sequence: acknowledges, accepts `wanted` ∩ offered features, sets up every
    /// queue with `qsize` entries, DRIVER_OK. Returns the final status register.
    pub fn bring_up(&mut self, wanted: u64) -> u32 {
        assert_eq!(self.r(0x000), 0x7472_6976);
        self.w(0x070, 0);
        self.w(0x070, 1);
        self.w(0x070, 1 | 2);
        let feats = self.device_features() & wanted;
        self.w(0x024, 0);
        self.w(0x020, feats as u32);
        self.w(0x024, 1);
        self.w(0x020, (feats >> 32) as u32);
        self.w(0x070, 1 | 2 | 8);
        assert_eq!(self.r(0x070) & 8, 8, "FEATURES_OK accepted");
        for q in 0..self.avail_idx.len() {
            let (d, a, u) = rings(q);
            self.w(0x030, q as u32);
            assert!(self.r(0x034) >= u32::from(self.qsize));
            self.w(0x038, u32::from(self.qsize));
            self.w(0x080, d as u32);
            self.w(0x084, (d >> 32) as u32);
            self.w(0x090, a as u32);
            self.w(0x094, (a >> 32) as u32);
            self.w(0x0a0, u as u32);
            self.w(0x0a4, (u >> 32) as u32);
            self.w(0x044, 1);
        }
        self.w(0x070, 1 | 2 | 8 | 4);
        self.r(0x070)
    }

    /// Resets the device (status 0) and forgets the driver's queue state: ring memory zeroed,
    /// indices back to 0. `bring_up` may follow, as after a driver reload.
    pub fn reset_device(&mut self) {
        self.w(0x070, 0);
        for q in 0..self.avail_idx.len() {
            let (d, _, _) = rings(q);
            self.mem
                .write_slice(&[0u8; 0x1_0000], GuestAddress(d))
                .unwrap();
            self.avail_idx[q] = 0;
            self.next_desc[q] = 0;
        }
    }

    /// Writes raw descriptor `i` of queue `q`.
    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(rings(q).0 + u64::from(i) * 16);
        self.mem.write_obj(addr, base).unwrap();
        self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
    }

    /// Puts `head` on queue `q`'s available ring (without notifying).
    pub fn offer(&mut self, q: usize, head: u16) {
        let (_, avail, _) = rings(q);
        let idx = self.avail_idx[q];
        let slot = GuestAddress(avail + 4 + 2 * u64::from(idx % self.qsize));
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    /// Writes `bufs` as one chain in queue `q`'s next free descriptors and offers it; returns
    /// the head index.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let head = self.next_desc[q];
        for (k, b) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.qsize;
            let last = k + 1 == bufs.len();
            let flags = if b.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.desc(q, i, b.addr, b.len, flags, (i + 1) % self.qsize);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % self.qsize;
        self.offer(q, head);
        head
    }

    /// Notifies queue `q` (the QueueNotify register; a worker-threaded device handles it later).
    pub fn notify(&mut self, q: usize) {
        self.w(0x050, q as u32);
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// Used element `n` of queue `q`: (head id, length written).
    pub fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let e = GuestAddress(rings(q).2 + 4 + 8 * u64::from(n % self.qsize));
        (
            self.mem.read_obj(e).unwrap(),
            self.mem.read_obj(e.unchecked_add(4)).unwrap(),
        )
    }

    /// Waits (up to 5 s) until queue `q` has `count` used elements; false on timeout. For devices
    /// that complete requests on their own worker thread.
    pub fn wait_used(&self, q: usize, count: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.used_idx(q) >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Writes `data` into guest memory at `addr`.
    pub fn put(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
}
