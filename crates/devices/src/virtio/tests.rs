//! The transport and devices driven through real split virtqueues in guest memory, the way a
//! driver would — including the malformed cases a hostile guest can produce.

use super::rng::{Rng, RngMetrics};
use super::transport::mmio::{INT_CONFIG, INT_VRING};
use super::*;
use crate::BusDevice;
use crate::Interrupt;
use std::sync::atomic::Ordering;
use vm_memory::{Address, Bytes, GuestAddress};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

struct Driver {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    irq: Arc<MmioInterrupt>,
    metrics: Arc<RngMetrics>,
    avail_idx: u16,
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    fn new() -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rng = Rng::new();
        let metrics = rng.metrics();
        let t = MmioTransport::new(Box::new(rng), mem.clone(), Interrupt::new().unwrap());
        let irq = t.interrupt().clone();
        Driver {
            mem,
            t,
            irq,
            metrics,
            avail_idx: 0,
        }
    }

    /// The Linux virtio_mmio probe + virtio core sequence, with `desc` as the descriptor table.
    fn bring_up(&mut self, desc: u64) -> u32 {
        let t = &mut self.t;
        assert_eq!(r(t, 0x000), 0x7472_6976);
        assert_eq!(r(t, 0x004), 2);
        assert_eq!(r(t, 0x008), 4);
        w(t, 0x070, 0);
        w(t, 0x070, 1);
        w(t, 0x070, 1 | 2);
        w(t, 0x014, 1);
        assert_eq!(r(t, 0x010), 1, "VERSION_1 offered");
        w(t, 0x024, 0);
        w(t, 0x020, 0);
        w(t, 0x024, 1);
        w(t, 0x020, 1);
        w(t, 0x070, 1 | 2 | 8);
        assert_eq!(r(t, 0x070) & 8, 8, "FEATURES_OK accepted");
        w(t, 0x030, 0);
        assert_eq!(r(t, 0x034), 256);
        w(t, 0x038, u32::from(QSIZE));
        w(t, 0x080, desc as u32);
        w(t, 0x084, (desc >> 32) as u32);
        w(t, 0x090, AVAIL as u32);
        w(t, 0x094, 0);
        w(t, 0x0a0, USED as u32);
        w(t, 0x0a4, 0);
        w(t, 0x044, 1);
        w(t, 0x070, 1 | 2 | 8 | 4);
        r(t, 0x070)
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(DESC + u64::from(i) * 16);
        self.mem.write_obj(addr, base).unwrap();
        self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
    }

    fn offer(&mut self, head: u16) {
        let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE));
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used_elem(&self, n: u16) -> (u32, u32) {
        let e = GuestAddress(USED + 4 + 8 * u64::from(n % QSIZE));
        (
            self.mem.read_obj(e).unwrap(),
            self.mem.read_obj(e.unchecked_add(4)).unwrap(),
        )
    }

    fn notify(&mut self) {
        w(&mut self.t, 0x050, 0);
    }
}

#[test]
fn rng_fills_a_driver_buffer_and_interrupts() {
    let mut d = Driver::new();
    assert_eq!(d.bring_up(DESC) & 0x4f, 0xf);
    d.desc(0, 0x10000, 64, VRING_DESC_F_WRITE, 0);
    d.offer(0);
    d.notify();
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used_elem(0), (0, 64));
    let mut data = [0u8; 64];
    d.mem.read_slice(&mut data, GuestAddress(0x10000)).unwrap();
    assert!(data.iter().any(|&b| b != 0));
    assert_eq!(d.irq.status() & INT_VRING, INT_VRING);
    assert!(d.irq.line().eventfd().read().unwrap() >= 1);
    w(&mut d.t, 0x064, INT_VRING);
    assert_eq!(d.irq.status(), 0);
    assert_eq!(d.metrics.bytes.load(Ordering::Relaxed), 64);
    // A chained request: two writable buffers.
    d.desc(1, 0x20000, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
    d.desc(2, 0x30000, 28, VRING_DESC_F_WRITE, 0);
    d.offer(1);
    d.notify();
    assert_eq!(d.used_elem(1), (1, 128));
}

#[test]
fn requests_are_capped() {
    let mut d = Driver::new();
    d.bring_up(DESC);
    d.desc(0, 0x10000, 0x80000, VRING_DESC_F_WRITE, 0);
    d.offer(0);
    d.notify();
    assert_eq!(d.used_elem(0).1 as usize, rng::MAX_REQUEST);
}

#[test]
fn buffers_outside_guest_memory_are_an_error_not_a_crash() {
    let mut d = Driver::new();
    d.bring_up(DESC);
    d.desc(0, 0xffff_ffff_0000, 64, VRING_DESC_F_WRITE, 0);
    d.offer(0);
    // Straddles the end of guest memory.
    d.desc(1, (1 << 20) - 8, 64, VRING_DESC_F_WRITE, 0);
    d.offer(1);
    d.notify();
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used_elem(0), (0, 0));
    assert_eq!(d.metrics.errors.load(Ordering::Relaxed), 2);
}

#[test]
fn read_only_and_looping_chains_end() {
    let mut d = Driver::new();
    d.bring_up(DESC);
    d.desc(0, 0x10000, 64, 0, 0); // device-readable: nothing to fill
    d.offer(0);
    d.desc(1, 0x10000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1); // points at itself
    d.offer(1);
    d.desc(2, 0x10000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 200); // next out of range
    d.offer(2);
    d.notify();
    assert_eq!(d.used_idx(), 3);
    assert_eq!(d.used_elem(0), (0, 0));
    assert!(d.metrics.errors.load(Ordering::Relaxed) >= 1);
}

#[test]
fn head_index_out_of_range_does_not_panic() {
    let mut d = Driver::new();
    d.bring_up(DESC);
    d.offer(500);
    d.notify();
    // The queue refuses the bogus head; nothing is returned, nothing crashes.
    assert!(d.used_idx() <= 1);
}

#[test]
fn notifications_before_driver_ok_are_ignored() {
    let mut d = Driver::new();
    d.desc(0, 0x10000, 64, VRING_DESC_F_WRITE, 0);
    d.offer(0);
    d.notify();
    assert_eq!(d.used_idx(), 0);
    assert_eq!(d.metrics.requests.load(Ordering::Relaxed), 0);
}

#[test]
fn queue_outside_memory_needs_reset() {
    let mut d = Driver::new();
    let status = d.bring_up(0x7fff_0000_0000);
    assert_ne!(status & 64, 0, "DEVICE_NEEDS_RESET");
    assert_ne!(d.irq.status() & INT_CONFIG, 0);
    d.notify();
    // A reset clears it and the device can be brought up properly.
    w(&mut d.t, 0x070, 0);
    assert_eq!(r(&mut d.t, 0x070), 0);
    assert_eq!(d.bring_up(DESC) & 0x4f, 0xf);
}

#[test]
fn unoffered_features_fail_negotiation() {
    let mut d = Driver::new();
    let t = &mut d.t;
    w(t, 0x070, 1 | 2);
    w(t, 0x024, 0);
    w(t, 0x020, 1 << 5); // not offered
    w(t, 0x024, 1);
    w(t, 0x020, 1);
    w(t, 0x070, 1 | 2 | 8);
    assert_eq!(r(t, 0x070) & 8, 0);
    // Without VERSION_1 too.
    w(t, 0x070, 0);
    w(t, 0x070, 1 | 2);
    w(t, 0x070, 1 | 2 | 8);
    assert_eq!(r(t, 0x070) & 8, 0);
    // DRIVER_OK without FEATURES_OK does not activate.
    w(t, 0x070, 1 | 2 | 4);
    assert_eq!(r(t, 0x070) & 4, 0);
}

#[test]
fn arbitrary_register_accesses_never_panic() {
    let mut d = Driver::new();
    let mut x: u64 = 0x1234_5678_9abc_def0;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % 0x1100;
        let len = [1usize, 2, 3, 4, 8][(x >> 20) as usize % 5];
        let mut buf = vec![(x >> 32) as u8; len];
        if x & 1 == 0 {
            d.t.read(off, &mut buf);
        } else {
            d.t.write(off, &buf);
        }
    }
    // Still a working device after a reset.
    w(&mut d.t, 0x070, 0);
    assert_eq!(d.bring_up(DESC) & 0x4f, 0xf);
}

#[test]
fn test_driver_drives_rng_on_its_own_rings() {
    use super::testing::{wo, TestDriver, DATA};
    let mut d = TestDriver::new(Box::new(Rng::new()));
    assert_eq!(d.bring_up(VIRTIO_F_VERSION_1) & 0x4f, 0xf);
    let head = d.add_chain(0, &[wo(DATA, 10), wo(DATA + 100, 6)]);
    d.notify(0);
    assert!(d.wait_used(0, 1));
    assert_eq!(d.used_elem(0, 0), (u32::from(head), 16));
}
