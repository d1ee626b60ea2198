//! virtio-balloon driven through real virtqueues (TestDriver): inflate, deflate, statistics,
//! free page reporting, malformed chains, reset.

use super::*;
use crate::virtio::testing::{ro, wo, TestDriver, DATA, F_NEXT, F_WRITE, MEM_SIZE};
use crate::virtio::transport::mmio::{INT_CONFIG, INT_VRING};
use crate::BusDevice;
use std::sync::atomic::Ordering;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

fn up(cfg: BalloonConfig) -> (TestDriver, BalloonControl, Arc<BalloonMetrics>) {
    let b = Balloon::new(cfg);
    let c = b.control();
    let m = b.balloon_metrics();
    let mut d = TestDriver::new(Box::new(b));
    assert_eq!(d.bring_up(u64::MAX) & 0x4f, 0xf);
    (d, c, m)
}

fn wait_for(f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn num_pages(d: &mut TestDriver) -> u32 {
    u32::from_le_bytes(d.config(0, 4).try_into().unwrap())
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

const PAGE: u64 = BALLOON_PAGE_SIZE;
const PFNS_AT: u64 = DATA + 0x80_0000;

#[test]
fn features_and_queues_follow_the_config() {
    let b = Balloon::new(BalloonConfig::default());
    assert_eq!(b.features(), VIRTIO_F_VERSION_1);
    assert_eq!(b.queue_max_sizes().len(), 2);
    let b = Balloon::new(BalloonConfig {
        target_bytes: 0,
        deflate_on_oom: true,
        stats_interval_s: 5,
        free_page_reporting: true,
    });
    assert_eq!(
        b.features(),
        VIRTIO_F_VERSION_1 | 1 << 1 | 1 << 2 | 1 << 5,
        "stats, deflate-on-oom, reporting; never MUST_TELL_HOST or FREE_PAGE_HINT"
    );
    assert_eq!(b.queue_max_sizes(), &[QUEUE_SIZE; 4]);
    assert_eq!(b.device_type(), 5);
}

#[test]
fn config_reflects_target_and_actual() {
    let b = Balloon::new(BalloonConfig {
        target_bytes: (10 << 20) + 100,
        ..Default::default()
    });
    let c = b.control();
    // Out-of-range and overflowing config accesses are harmless.
    let mut buf = [0xffu8; 4];
    b.read_config(u64::MAX - 1, &mut buf);
    assert_eq!(buf, [0; 4]);
    let mut d = TestDriver::new(Box::new(b));
    assert_eq!(num_pages(&mut d), 2560, "rounded down to 4 KiB pages");
    c.set_target_bytes(4097);
    assert_eq!(num_pages(&mut d), 1);
    assert_eq!(c.target_bytes(), 4096);
    assert_eq!(d.irq.status(), 0, "no interrupt before activation");
    assert_eq!(d.config(8, 8), vec![0; 8]);

    assert_eq!(d.bring_up(u64::MAX) & 0x4f, 0xf);
    c.set_target_bytes(64 << 20);
    assert_eq!(num_pages(&mut d), 16384);
    assert_ne!(d.irq.status() & INT_CONFIG, 0, "config change interrupt");
    assert!(d.irq.line().eventfd().read().unwrap() >= 1);

    // The driver reports what the balloon holds; num_pages is not driver-writable.
    d.t.write(0x100 + 4, &300u32.to_le_bytes());
    assert_eq!(c.actual_bytes(), 300 * PAGE);
    d.t.write(0x100 + 4, &[0x02]); // partial write: low byte only
    assert_eq!(c.actual_bytes(), 0x102 * PAGE);
    d.t.write(0x100, &7u32.to_le_bytes());
    d.t.write(0x100 + 0x200, &7u32.to_le_bytes());
    assert_eq!(num_pages(&mut d), 16384);
    assert_eq!(
        u32::from_le_bytes(d.config(4, 4).try_into().unwrap()),
        0x102
    );
    // Huge targets saturate instead of wrapping.
    c.set_target_bytes(u64::MAX);
    assert_eq!(num_pages(&mut d), u32::MAX);
}

#[test]
fn inflate_discards_the_pages() {
    let (mut d, _c, m) = up(BalloonConfig::default());
    let pattern = vec![0xabu8; 4 * PAGE as usize];
    d.put(DATA, &pattern);
    let first = (DATA / PAGE) as u32;
    // Out of order and duplicated: still pages 0, 1 and 3.
    d.put(PFNS_AT, &pfn_bytes(&[first + 3, first, first + 1, first]));
    let head = d.add_chain(0, &[ro(PFNS_AT, 16)]);
    d.notify(0);
    assert!(d.wait_used(0, 1));
    assert_eq!(d.used_elem(0, 0), (u32::from(head), 0));
    assert_eq!(d.get(DATA, 2 * PAGE as usize), vec![0; 2 * PAGE as usize]);
    assert_eq!(
        d.get(DATA + 2 * PAGE, PAGE as usize),
        vec![0xab; PAGE as usize]
    );
    assert_eq!(
        d.get(DATA + 3 * PAGE, PAGE as usize),
        vec![0; PAGE as usize]
    );
    assert_eq!(m.inflated_pages.load(Ordering::Relaxed), 3);
    assert_eq!(m.errors.load(Ordering::Relaxed), 0);
    assert_ne!(d.irq.status() & INT_VRING, 0);
}

#[test]
fn pfns_outside_guest_memory_are_errors() {
    let (mut d, _c, m) = up(BalloonConfig::default());
    let last = (MEM_SIZE as u64 / PAGE) as u32; // first page past the end
    d.put(DATA, &[0x5a; PAGE as usize]);
    d.put(
        PFNS_AT,
        &pfn_bytes(&[u32::MAX, last, last - 1 + 0x10_0000, (DATA / PAGE) as u32]),
    );
    // 17 bytes: the trailing partial PFN is ignored.
    d.add_chain(0, &[ro(PFNS_AT, 17)]);
    d.notify(0);
    assert!(d.wait_used(0, 1));
    assert_eq!(m.inflated_pages.load(Ordering::Relaxed), 1);
    assert_eq!(m.errors.load(Ordering::Relaxed), 3);
    assert_eq!(d.get(DATA, 8), vec![0; 8]);
}

#[test]
fn deflate_is_counted() {
    let (mut d, _c, m) = up(BalloonConfig::default());
    d.put(DATA, &[0x77; 8]);
    d.put(PFNS_AT, &pfn_bytes(&[(DATA / PAGE) as u32; 5]));
    d.add_chain(1, &[ro(PFNS_AT, 12), ro(PFNS_AT + 12, 8)]);
    d.notify(1);
    assert!(d.wait_used(1, 1));
    assert_eq!(m.deflated_pages.load(Ordering::Relaxed), 5);
    assert_eq!(d.get(DATA, 8), vec![0x77; 8], "deflate discards nothing");
}

fn stat(tag: u16, val: u64) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend_from_slice(&val.to_le_bytes());
    v
}

#[test]
fn stats_are_parsed_and_the_buffer_returned_on_the_timer() {
    let (mut d, c, m) = up(BalloonConfig {
        stats_interval_s: 1,
        ..Default::default()
    });
    assert_eq!(c.stats(), BalloonStats::default());
    let mut buf = stat(4, 1000);
    buf.extend(stat(5, 2000));
    buf.extend(stat(99, 5)); // unknown tag
    buf.extend(stat(9, 3));
    buf.extend([1, 2, 3]); // partial entry
    d.put(DATA, &buf);
    let head = d.add_chain(2, &[ro(DATA, 15), ro(DATA + 15, buf.len() as u32 - 15)]);
    d.notify(2);
    assert!(wait_for(|| m.stats_updates.load(Ordering::Relaxed) == 1));
    let s = c.stats();
    assert_eq!(s.free_memory, Some(1000));
    assert_eq!(s.total_memory, Some(2000));
    assert_eq!(s.hugetlb_failures, Some(3));
    assert_eq!(s.swap_in, None);
    assert!(s.received_at.is_some());
    // The device holds the buffer until the timer asks for fresh statistics.
    assert!(d.wait_used(2, 1));
    assert_eq!(d.used_elem(2, 0), (u32::from(head), 0));
    // The driver refills it.
    d.put(DATA, &stat(0, 42));
    d.add_chain(2, &[ro(DATA, 10)]);
    d.notify(2);
    assert!(wait_for(|| m.stats_updates.load(Ordering::Relaxed) == 2));
    assert_eq!(c.stats().swap_in, Some(42));
    assert_eq!(c.stats().free_memory, None);
    assert_eq!(m.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn stats_parse_is_defensive() {
    assert_eq!(BalloonStats::parse(&[]), BalloonStats::default());
    assert_eq!(BalloonStats::parse(&[4, 0, 1]), BalloonStats::default());
    let s = BalloonStats::parse(&[&stat(7, u64::MAX)[..], &[0xff; 9]].concat());
    assert_eq!(s.disk_caches, Some(u64::MAX));
}

#[test]
fn free_page_reports_are_discarded() {
    let (mut d, _c, m) = up(BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    });
    d.put(DATA, &vec![0xcd; 8 * PAGE as usize]);
    // Pages 0-1 whole; 5-6 inside an unaligned range (the partial pages 4 and 7 stay).
    d.add_chain(
        2,
        &[
            wo(DATA, 2 * PAGE as u32),
            wo(DATA + 5 * PAGE - 100, 2 * PAGE as u32 + 200),
        ],
    );
    d.notify(2);
    assert!(d.wait_used(2, 1));
    assert_eq!(d.used_elem(2, 0).1, 0);
    let mem = d.mem.clone();
    let zero = |p: u64| {
        let mut b = vec![1u8; PAGE as usize];
        mem.read_slice(&mut b, GuestAddress(DATA + p * PAGE))
            .unwrap();
        b.iter().all(|&x| x == 0)
    };
    assert!(zero(0) && zero(1) && zero(5) && zero(6));
    assert!(!zero(2) && !zero(3) && !zero(4) && !zero(7));
    assert_eq!(m.reported_bytes.load(Ordering::Relaxed), 4 * PAGE);
    // Device-readable ranges, ranges past the end of memory or wrapping: errors.
    d.add_chain(
        2,
        &[
            ro(DATA + 2 * PAGE, PAGE as u32),
            wo(MEM_SIZE as u64 - PAGE, 2 * PAGE as u32),
            wo(u64::MAX - 100, 200),
        ],
    );
    d.notify(2);
    assert!(d.wait_used(2, 2));
    assert_eq!(m.errors.load(Ordering::Relaxed), 3);
    assert!(!zero(2));
    assert_eq!(m.reported_bytes.load(Ordering::Relaxed), 4 * PAGE);
}

#[test]
fn queue_indices_follow_negotiated_features() {
    let cfg = BalloonConfig {
        stats_interval_s: 100,
        free_page_reporting: true,
        ..Default::default()
    };
    // Both negotiated: reporting is queue 3.
    let (mut d, _c, m) = up(cfg.clone());
    d.put(DATA, &[1; PAGE as usize]);
    d.add_chain(3, &[wo(DATA, PAGE as u32)]);
    d.notify(3);
    assert!(d.wait_used(3, 1));
    assert_eq!(m.reported_bytes.load(Ordering::Relaxed), PAGE);
    // Without the stats queue negotiated, reporting moves to queue 2.
    let b = Balloon::new(cfg);
    let m = b.balloon_metrics();
    let mut d = TestDriver::new(Box::new(b));
    d.bring_up(!(1u64 << VIRTIO_BALLOON_F_STATS_VQ));
    d.put(DATA, &[1; PAGE as usize]);
    d.add_chain(2, &[wo(DATA, PAGE as u32)]);
    d.notify(2);
    assert!(d.wait_used(2, 1));
    assert_eq!(m.reported_bytes.load(Ordering::Relaxed), PAGE);
    assert_eq!(m.stats_updates.load(Ordering::Relaxed), 0);
}

#[test]
fn malformed_inflate_chains_are_errors_not_crashes() {
    let (mut d, _c, m) = up(BalloonConfig::default());
    d.put(DATA, &[0x11; PAGE as usize]);
    d.put(PFNS_AT, &pfn_bytes(&[(DATA / PAGE) as u32]));
    // A device-writable PFN buffer: ignored.
    d.desc(0, 0, PFNS_AT, 4, F_WRITE, 0);
    d.offer(0, 0);
    // A chain that loops on itself.
    d.desc(0, 1, PFNS_AT + 0x100, 4, F_NEXT, 1);
    d.offer(0, 1);
    // A buffer outside guest memory.
    d.desc(0, 2, 0xffff_ffff_0000, 64, 0, 0);
    d.offer(0, 2);
    // A next index past the table.
    d.desc(0, 3, PFNS_AT + 0x100, 4, F_NEXT, 300);
    d.offer(0, 3);
    // A huge PFN buffer: capped.
    d.desc(0, 4, DATA, u32::MAX, 0, 0);
    d.offer(0, 4);
    d.notify(0);
    assert!(d.wait_used(0, 5));
    assert_eq!(
        d.get(DATA, 4),
        vec![0x11; 4],
        "the write-only PFN was not used"
    );
    assert!(m.errors.load(Ordering::Relaxed) >= 3);
    // A bogus head index: refused by the queue, nothing crashes.
    d.offer(0, 500);
    d.notify(0);
    // Deflate and stats-less devices ignore notifications of absent queues.
    d.notify(7);
    // Still serving (descriptor 5 onwards is free for the driver).
    let before = m.inflated_pages.load(Ordering::Relaxed);
    d.desc(0, 5, PFNS_AT, 4, 0, 0);
    d.offer(0, 5);
    d.notify(0);
    assert!(d.wait_used(0, 6));
    assert_eq!(m.inflated_pages.load(Ordering::Relaxed), before + 1);
}

#[test]
fn reset_then_reactivate() {
    let (mut d, c, m) = up(BalloonConfig {
        stats_interval_s: 1,
        ..Default::default()
    });
    d.t.write(0x100 + 4, &10u32.to_le_bytes());
    d.put(DATA, &[0x22; PAGE as usize]);
    d.put(PFNS_AT, &pfn_bytes(&[(DATA / PAGE) as u32]));
    d.add_chain(0, &[ro(PFNS_AT, 4)]);
    d.notify(0);
    assert!(d.wait_used(0, 1));
    d.put(DATA + 0x100, &stat(4, 1));
    d.add_chain(2, &[ro(DATA + 0x100, 10)]);
    d.notify(2);
    assert!(wait_for(|| m.stats_updates.load(Ordering::Relaxed) == 1));

    d.reset_device();
    assert_eq!(c.actual_bytes(), 0);
    c.set_target_bytes(PAGE);
    assert_eq!(d.irq.status(), 0, "no config interrupt while reset");

    assert_eq!(d.bring_up(u64::MAX) & 0x4f, 0xf);
    assert_eq!(num_pages(&mut d), 1);
    d.put(DATA, &[0x22; PAGE as usize]);
    d.add_chain(0, &[ro(PFNS_AT, 4)]);
    d.notify(0);
    assert!(d.wait_used(0, 1));
    assert_eq!(d.get(DATA, 8), vec![0; 8]);
    assert_eq!(m.inflated_pages.load(Ordering::Relaxed), 2);
    c.set_target_bytes(2 * PAGE);
    assert_ne!(d.irq.status() & INT_CONFIG, 0);
}

#[test]
fn fuzz_entry_point_runs_synchronously() {
    use crate::virtio::testing::rings;
    let (d, _c, _m) = up(BalloonConfig::default());
    d.put(DATA, &[0x33; PAGE as usize]);
    d.put(PFNS_AT, &pfn_bytes(&[(DATA / PAGE) as u32]));
    d.desc(0, 0, PFNS_AT, 4, 0, 0);
    let (desc, avail, used) = rings(0);
    let mut q = Queue::new(16).unwrap();
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    // Queue 0 of the transport has not been touched by the driver yet: offer on its ring.
    let mut d = d;
    d.offer(0, 0);
    // Reset the device first so its worker does not race the synchronous call.
    d.w(0x070, 0);
    let m = BalloonHandler::fuzz_queue(BalloonQueue::Inflate, &d.mem, q);
    assert_eq!(m.inflated_pages.load(Ordering::Relaxed), 1);
    assert_eq!(d.get(DATA, 4), vec![0; 4]);
}
