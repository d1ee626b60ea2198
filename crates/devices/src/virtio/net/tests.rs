//! virtio-net driven through real virtqueues (TestDriver) over a `SOCK_SEQPACKET` pair standing
//! in for the TAP, and its synchronous entry points on garbage rings.

use super::*;
use crate::virtio::testing::{rings, ro, wo, TestDriver, DATA, MEM_SIZE};
use crate::virtio::transport::mmio::INT_VRING;
use crate::BusDevice;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use virtio_queue::QueueT;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
/// Everything but mergeable buffers and EVENT_IDX.
const PLAIN: u64 = OFFERED_FEATURES & !bit(VIRTIO_NET_F_MRG_RXBUF) & !bit(VIRTIO_RING_F_EVENT_IDX);
/// With mergeable buffers.
const MRG: u64 = PLAIN | bit(VIRTIO_NET_F_MRG_RXBUF);

/// One end of a SOCK_SEQPACKET pair standing in for a TAP (frame boundaries are kept).
struct PairBackend {
    file: File,
    offloads: Mutex<Vec<u32>>,
    fail_offload: bool,
}

impl AsRawFd for PairBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for PairBackend {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        if self.fail_offload {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

fn pair(fail_offload: bool) -> (Arc<PairBackend>, File) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array given.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let backend = PairBackend {
        file: File::from(a),
        offloads: Mutex::new(Vec::new()),
        fail_offload,
    };
    (Arc::new(backend), File::from(b))
}

/// Next frame the device sent to the "host network", waiting up to 5 s.
fn recv(peer: &File) -> Option<Vec<u8>> {
    let mut pfd = libc::pollfd {
        fd: peer.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    if unsafe { libc::poll(&mut pfd, 1, 5000) } != 1 {
        return None;
    }
    let mut buf = vec![0u8; MAX_PACKET + 100];
    let n = (&*peer).read(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// True if the device sent nothing more (the caller waited for the used ring first, and the
/// device writes before it returns the chain).
fn nothing_sent(peer: &File) -> bool {
    let mut buf = [0u8; 16];
    matches!((&*peer).read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn send(peer: &File, frame: &[u8]) {
    assert_eq!((&*peer).write(frame).unwrap(), frame.len());
}

fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn get(m: &NetMetrics, name: &str) -> u64 {
    m.counters()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

/// A frame of `len` bytes (header included) with a recognisable pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    f[..NET_HDR_LEN].copy_from_slice(&[1, 0, 14, 0, 0, 0, 34, 0, 16, 0, 0xee, 0xee]);
    f
}

struct Setup {
    td: TestDriver,
    peer: File,
    m: Arc<NetMetrics>,
    backend: Arc<PairBackend>,
}

fn setup(wanted: u64, rate: RateLimit) -> Setup {
    let (backend, peer) = pair(false);
    let net = Net::with_backend(backend.clone(), "pair0", MAC, None, rate);
    let m = net.net_metrics();
    let mut td = TestDriver::new(Box::new(net));
    let status = td.bring_up(wanted);
    assert_eq!(status & (4 | 64), 4, "DRIVER_OK, not NEEDS_RESET");
    Setup {
        td,
        peer,
        m,
        backend,
    }
}

#[test]
fn offload_flags_follow_the_accepted_guest_features() {
    assert_eq!(tap_offload_flags(0), 0);
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)),
        0,
        "TSO needs CSUM"
    );
    assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
    let csum_ecn = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN);
    assert_eq!(tap_offload_flags(csum_ecn), TUN_F_CSUM, "ECN needs TSO");
    assert_eq!(
        tap_offload_flags(OFFERED_FEATURES),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    );
}

#[test]
fn mac_default_is_local_unicast_and_bad_macs_are_refused() {
    let cfg = |mac| NetConfig {
        tap: "tap9".into(),
        mac,
        ..Default::default()
    };
    let mac = Net::check_mac(&cfg(None)).unwrap();
    assert_eq!(mac[0] & 1, 0, "unicast");
    assert_eq!(mac[0] & 2, 2, "locally administered");
    assert_eq!(mac, Net::check_mac(&cfg(None)).unwrap(), "stable");
    assert_ne!(mac, derived_mac("tap8/"));
    assert_eq!(Net::check_mac(&cfg(Some(MAC))).unwrap(), MAC);
    let e = Net::check_mac(&cfg(Some([1, 0, 0, 0, 0, 1]))).unwrap_err();
    assert!(e.to_string().contains("multicast") && e.to_string().contains("tap9"));
    assert!(Net::check_mac(&cfg(Some([0; 6]))).is_err());
    assert_eq!(format_mac(&MAC), "52:54:00:ab:cd:ef");
}

#[test]
fn config_space_reads_at_any_offset_and_ignores_writes() {
    let (backend, _peer) = pair(false);
    let net = Net::with_backend(backend, "pair0", MAC, None, RateLimit::default());
    let mut td = TestDriver::new(Box::new(net));
    assert_eq!(td.device_features(), OFFERED_FEATURES);
    assert_eq!(td.r(0x008), 1, "device type net");
    assert_eq!(td.config(0, 6), MAC);
    assert_eq!(
        td.config(3, 5),
        vec![0xab, 0xcd, 0xef, 1, 0],
        "mac tail + status"
    );
    assert_eq!(td.config(6, 2), vec![1, 0], "LINK_UP");
    assert_eq!(td.config(7, 1), vec![0]);
    assert_eq!(td.config(8, 2), vec![1, 0], "max_virtqueue_pairs");
    assert_eq!(td.config(9, 4), vec![0, 0, 0, 0], "past the end reads zero");
    assert_eq!(td.config(0xeff, 1), vec![0]);
    td.w(0x070, 1);
    td.w(0x070, 1 | 2);
    td.t.write(0x100, &[0xff; 6]);
    td.t.write(0x100 + 6, &[0; 2]);
    assert_eq!(td.config(0, 8), vec![0x52, 0x54, 0, 0xab, 0xcd, 0xef, 1, 0]);
}

#[test]
fn tx_frame_arrives_intact_with_its_header() {
    let mut s = setup(PLAIN, RateLimit::default());
    let f = frame(12 + 100, 1);
    s.td.put(DATA, &f[..12]);
    s.td.put(DATA + 0x1000, &f[12..]);
    let head =
        s.td.add_chain(TX_QUEUE, &[ro(DATA, 12), ro(DATA + 0x1000, 100)]);
    s.td.notify(TX_QUEUE);
    assert!(s.td.wait_used(TX_QUEUE, 1));
    assert_eq!(s.td.used_elem(TX_QUEUE, 0), (u32::from(head), 0));
    assert_eq!(recv(&s.peer).unwrap(), f);
    assert!(nothing_sent(&s.peer));
    assert_eq!(get(&s.m, "tx_packets"), 1);
    assert_eq!(get(&s.m, "tx_bytes"), 100);
    assert_eq!(get(&s.m, "tx_errors"), 0);
    assert_ne!(s.td.irq.status() & INT_VRING, 0);
    let offloads = s.backend.offloads.lock().unwrap().clone();
    assert_eq!(
        offloads,
        vec![TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN]
    );
}

#[test]
fn rx_frame_lands_in_one_buffer_with_num_buffers_1() {
    let mut s = setup(PLAIN, RateLimit::default());
    let head =
        s.td.add_chain(RX_QUEUE, &[wo(DATA, 64), wo(DATA + 0x1000, 2000)]);
    s.td.notify(RX_QUEUE);
    let f = frame(12 + 200, 2);
    send(&s.peer, &f);
    assert!(s.td.wait_used(RX_QUEUE, 1));
    assert_eq!(s.td.used_elem(RX_QUEUE, 0), (u32::from(head), 212));
    let mut got = s.td.get(DATA, 64);
    got.extend(s.td.get(DATA + 0x1000, 212 - 64));
    assert_eq!(got[10..12], [1, 0], "num_buffers");
    assert_eq!(got[..10], f[..10], "header from the TAP");
    assert_eq!(got[12..], f[12..]);
    assert_eq!(get(&s.m, "rx_packets"), 1);
    assert_eq!(get(&s.m, "rx_bytes"), 200);
    assert_ne!(s.td.irq.status() & INT_VRING, 0);
}

#[test]
fn mergeable_rx_spreads_a_frame_over_small_buffers() {
    let mut s = setup(MRG, RateLimit::default());
    let mut heads = vec![s
        .td
        .add_chain(RX_QUEUE, &[wo(DATA, 60), wo(DATA + 0x100, 40)])];
    for i in 1..5u64 {
        heads.push(s.td.add_chain(RX_QUEUE, &[wo(DATA + i * 0x1000, 100)]));
    }
    s.td.notify(RX_QUEUE);
    let f = frame(312, 3);
    send(&s.peer, &f);
    assert!(s.td.wait_used(RX_QUEUE, 4));
    let lens: Vec<(u32, u32)> = (0..4).map(|n| s.td.used_elem(RX_QUEUE, n)).collect();
    let want: Vec<(u32, u32)> = heads[..4]
        .iter()
        .zip([100, 100, 100, 12])
        .map(|(&h, l)| (u32::from(h), l))
        .collect();
    assert_eq!(lens, want);
    let mut got = s.td.get(DATA, 60);
    got.extend(s.td.get(DATA + 0x100, 40));
    got.extend(s.td.get(DATA + 0x1000, 100));
    got.extend(s.td.get(DATA + 0x2000, 100));
    got.extend(s.td.get(DATA + 0x3000, 12));
    assert_eq!(got[10..12], [4, 0], "num_buffers");
    assert_eq!(got[..10], f[..10]);
    assert_eq!(got[12..], f[12..]);
    // The fifth buffer is still the guest's, and takes the next frame.
    let f2 = frame(80, 4);
    send(&s.peer, &f2);
    assert!(s.td.wait_used(RX_QUEUE, 5));
    assert_eq!(s.td.used_elem(RX_QUEUE, 4), (u32::from(heads[4]), 80));
    assert_eq!(s.td.get(DATA + 0x4000 + 12, 68), f2[12..]);
    assert_eq!(get(&s.m, "rx_packets"), 2);
    assert_eq!(get(&s.m, "rx_dropped"), 0);
}

#[test]
fn rx_without_buffers_keeps_frames_until_the_guest_posts_some() {
    let mut s = setup(MRG, RateLimit::default());
    let (f1, f2) = (frame(500, 5), frame(700, 6));
    send(&s.peer, &f1);
    send(&s.peer, &f2);
    std::thread::sleep(Duration::from_millis(20)); // let the worker find no buffers
    assert_eq!(s.td.used_idx(RX_QUEUE), 0);
    s.td.add_chain(RX_QUEUE, &[wo(DATA, 1000)]);
    s.td.add_chain(RX_QUEUE, &[wo(DATA + 0x1000, 1000)]);
    s.td.notify(RX_QUEUE);
    assert!(s.td.wait_used(RX_QUEUE, 2));
    assert_eq!(s.td.used_elem(RX_QUEUE, 0).1, 500);
    assert_eq!(s.td.used_elem(RX_QUEUE, 1).1, 700);
    assert_eq!(s.td.get(DATA + 12, 488), f1[12..]);
    assert_eq!(s.td.get(DATA + 0x1000 + 12, 688), f2[12..]);
    assert_eq!(get(&s.m, "rx_dropped"), 0);
    assert_eq!(get(&s.m, "rx_packets"), 2);
}

/// Queues over a TestDriver's rings, driven synchronously (the fuzzing entry points).
fn sync_handler(features: u64) -> (TestDriver, NetHandler, File) {
    let (backend, peer) = pair(false);
    let td = TestDriver::new(Box::new(Net::with_backend(
        backend.clone(),
        "pair0",
        MAC,
        None,
        RateLimit::default(),
    )));
    let mk = |q: usize| {
        let (d, a, u) = rings(q);
        let mut queue = Queue::new(16).unwrap();
        queue.set_desc_table_address(Some(d as u32), Some(0));
        queue.set_avail_ring_address(Some(a as u32), Some(0));
        queue.set_used_ring_address(Some(u as u32), Some(0));
        queue.set_ready(true);
        queue
    };
    let h = NetHandler::new(
        td.mem.clone(),
        mk(RX_QUEUE),
        mk(TX_QUEUE),
        td.irq.clone(),
        backend,
        Arc::new(NetMetrics::default()),
        features,
        RateLimit::default(),
    )
    .unwrap();
    (td, h, peer)
}

#[test]
fn rx_state_machine_waits_for_buffers_then_for_the_backend() {
    let (mut td, mut h, peer) = sync_handler(MRG);
    assert_eq!(h.process_rx(), RxStatus::BackendEmpty);
    send(&peer, &frame(100, 7));
    assert_eq!(h.process_rx(), RxStatus::NoBuffers);
    assert!(h.has_pending_frame());
    assert_eq!(
        h.process_rx(),
        RxStatus::NoBuffers,
        "still pending, not dropped"
    );
    td.add_chain(RX_QUEUE, &[wo(DATA, 50)]);
    assert_eq!(
        h.process_rx(),
        RxStatus::NoBuffers,
        "50 bytes do not hold 100"
    );
    assert_eq!(td.used_idx(RX_QUEUE), 0, "partial buffers are not consumed");
    td.add_chain(RX_QUEUE, &[wo(DATA + 0x1000, 50)]);
    assert_eq!(h.process_rx(), RxStatus::BackendEmpty);
    assert!(!h.has_pending_frame());
    assert_eq!(td.used_idx(RX_QUEUE), 2);
    assert_eq!(td.used_elem(RX_QUEUE, 0).1, 50);
    assert_eq!(td.used_elem(RX_QUEUE, 1).1, 50);
    assert_eq!(td.get(DATA + 10, 2), vec![2, 0]);
    assert_eq!(h.metrics.rx_packets.load(Ordering::Relaxed), 1);
    // Peer gone: receive stops for good instead of spinning on EOF.
    drop(peer);
    assert_eq!(h.process_rx(), RxStatus::BackendFailed);
    assert_eq!(h.process_rx(), RxStatus::BackendFailed);
}

#[test]
fn random_rings_never_panic_or_hang() {
    // Deterministic xorshift: garbage descriptor tables and available rings on both queues,
    // biased towards addresses near guest memory so that some chains are half valid.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for iter in 0..200u64 {
        let features = [PLAIN, MRG, MRG | bit(VIRTIO_RING_F_EVENT_IDX)][(iter % 3) as usize];
        let (td, mut h, peer) = sync_handler(features);
        for q in [RX_QUEUE, TX_QUEUE] {
            for i in 0..16u16 {
                let addr = match rnd() % 4 {
                    0 => rnd(),
                    _ => DATA + rnd() % (MEM_SIZE as u64 - DATA + 0x2000),
                };
                let len = (rnd() % 0x3000) as u32;
                let flags = (rnd() % 4) as u16;
                td.desc(q, i, addr, len, flags, (rnd() % 20) as u16);
            }
            let (_, avail, _) = rings(q);
            for k in 0..16u64 {
                let head = (rnd() % 20) as u16;
                td.put(avail + 4 + 2 * k, &head.to_le_bytes());
            }
            let idx = (rnd() % 40) as u16;
            td.put(avail + 2, &idx.to_le_bytes());
        }
        for _ in 0..(rnd() % 4) {
            let len = (rnd() % 3000) as usize;
            let _ = (&peer).write(&frame(len.max(NET_HDR_LEN), rnd() as u8));
        }
        for _ in 0..3 {
            h.process_tx();
            h.process_rx();
        }
    }
}

#[test]
fn mergeable_frame_larger_than_the_whole_ring_is_dropped_buffers_kept() {
    let (mut td, mut h, peer) = sync_handler(MRG);
    for i in 0..16u64 {
        td.add_chain(RX_QUEUE, &[wo(DATA + i * 0x100, 12)]);
    }
    send(&peer, &frame(1000, 8));
    assert_eq!(h.process_rx(), RxStatus::BackendEmpty);
    assert_eq!(h.metrics.rx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(td.used_idx(RX_QUEUE), 0);
    send(&peer, &frame(60, 9));
    assert_eq!(h.process_rx(), RxStatus::BackendEmpty);
    assert_eq!(td.used_idx(RX_QUEUE), 5, "60 bytes over 12-byte buffers");
    assert_eq!(td.get(DATA + 10, 2), vec![5, 0]);
}

#[test]
fn malformed_tx_chains_are_returned_and_counted() {
    let mut s = setup(PLAIN, RateLimit::default());
    // Device-writable buffer in a transmit chain.
    s.td.add_chain(TX_QUEUE, &[ro(DATA, 12), wo(DATA + 0x1000, 100)]);
    // Shorter than the header.
    s.td.add_chain(TX_QUEUE, &[ro(DATA, 8)]);
    // Longer than MAX_PACKET.
    s.td.add_chain(TX_QUEUE, &[ro(DATA, 40000), ro(DATA + 40000, 40000)]);
    // Outside guest memory, and wrapping around the address space.
    s.td.add_chain(TX_QUEUE, &[ro(MEM_SIZE as u64 - 16, 100)]);
    s.td.add_chain(TX_QUEUE, &[ro(u64::MAX - 4, 100)]);
    // Head index outside the ring.
    s.td.offer(TX_QUEUE, 999);
    // Then a good one.
    let f = frame(60, 10);
    s.td.put(DATA + 0x8000, &f);
    s.td.add_chain(TX_QUEUE, &[ro(DATA + 0x8000, 60)]);
    s.td.notify(TX_QUEUE);
    // The bad head cannot be put on the used ring: 6 used elements of 7.
    assert!(s.td.wait_used(TX_QUEUE, 6));
    for n in 0..6 {
        assert_eq!(s.td.used_elem(TX_QUEUE, n).1, 0);
    }
    assert_eq!(recv(&s.peer).unwrap(), f);
    assert!(nothing_sent(&s.peer));
    assert_eq!(get(&s.m, "tx_packets"), 1);
    assert_eq!(get(&s.m, "tx_errors"), 6);
    assert!(get(&s.m, "errors") >= 6);
}

#[test]
fn looping_tx_chain_terminates() {
    let mut s = setup(PLAIN, RateLimit::default());
    // Descriptor 0 points to itself.
    s.td.desc(TX_QUEUE, 0, DATA, 64, 1, 0);
    s.td.offer(TX_QUEUE, 0);
    s.td.notify(TX_QUEUE);
    assert!(s.td.wait_used(TX_QUEUE, 1));
    assert_eq!(s.td.used_elem(TX_QUEUE, 0), (0, 0));
    // 16 × 64 bytes of the same buffer at most (ttl = queue size): bounded either way.
    let sent = get(&s.m, "tx_packets") + get(&s.m, "tx_errors");
    assert_eq!(sent, 1);
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_the_frame_goes_to_the_next() {
    let mut s = setup(MRG, RateLimit::default());
    let bad1 = s.td.add_chain(RX_QUEUE, &[ro(DATA, 100)]);
    let bad2 = s.td.add_chain(RX_QUEUE, &[wo(MEM_SIZE as u64 - 8, 100)]);
    let bad3 = s.td.add_chain(RX_QUEUE, &[wo(DATA, 8)]); // smaller than the header
    let good = s.td.add_chain(RX_QUEUE, &[wo(DATA + 0x1000, 1000)]);
    s.td.notify(RX_QUEUE);
    let f = frame(300, 11);
    send(&s.peer, &f);
    assert!(s.td.wait_used(RX_QUEUE, 4));
    assert_eq!(s.td.used_elem(RX_QUEUE, 0), (u32::from(bad1), 0));
    assert_eq!(s.td.used_elem(RX_QUEUE, 1), (u32::from(bad2), 0));
    assert_eq!(s.td.used_elem(RX_QUEUE, 2), (u32::from(bad3), 0));
    assert_eq!(s.td.used_elem(RX_QUEUE, 3), (u32::from(good), 300));
    assert_eq!(s.td.get(DATA + 0x1000 + 12, 288), f[12..]);
    assert_eq!(get(&s.m, "errors"), 3);
    assert_eq!(get(&s.m, "rx_packets"), 1);
    assert_eq!(get(&s.m, "rx_dropped"), 0);
}

#[test]
fn rx_frame_too_big_for_a_plain_buffer_is_dropped() {
    let mut s = setup(PLAIN, RateLimit::default());
    let small = s.td.add_chain(RX_QUEUE, &[wo(DATA, 100)]);
    let big = s.td.add_chain(RX_QUEUE, &[wo(DATA + 0x1000, 2000)]);
    s.td.notify(RX_QUEUE);
    send(&s.peer, &frame(500, 12));
    let f = frame(90, 13);
    send(&s.peer, &f);
    assert!(s.td.wait_used(RX_QUEUE, 2));
    assert_eq!(s.td.used_elem(RX_QUEUE, 0), (u32::from(small), 0));
    assert_eq!(s.td.used_elem(RX_QUEUE, 1), (u32::from(big), 90));
    assert_eq!(s.td.get(DATA + 0x1000 + 12, 78), f[12..]);
    assert_eq!(get(&s.m, "rx_dropped"), 1);
    assert_eq!(get(&s.m, "rx_packets"), 1);
}

#[test]
fn reset_then_activate_again() {
    let mut s = setup(PLAIN, RateLimit::default());
    let f = frame(40, 14);
    s.td.put(DATA, &f);
    s.td.add_chain(TX_QUEUE, &[ro(DATA, 40)]);
    s.td.notify(TX_QUEUE);
    assert!(s.td.wait_used(TX_QUEUE, 1));
    assert_eq!(recv(&s.peer).unwrap(), f);
    s.td.reset_device();
    assert_eq!(s.td.r(0x070), 0);
    assert_eq!(s.td.bring_up(MRG) & (4 | 64), 4);
    let f2 = frame(44, 15);
    s.td.put(DATA, &f2);
    s.td.add_chain(TX_QUEUE, &[ro(DATA, 44)]);
    s.td.notify(TX_QUEUE);
    assert!(s.td.wait_used(TX_QUEUE, 1));
    assert_eq!(recv(&s.peer).unwrap(), f2);
    s.td.add_chain(RX_QUEUE, &[wo(DATA + 0x1000, 1000)]);
    s.td.notify(RX_QUEUE);
    send(&s.peer, &frame(70, 16));
    assert!(s.td.wait_used(RX_QUEUE, 1));
    assert_eq!(s.td.used_elem(RX_QUEUE, 0).1, 70);
    let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    assert_eq!(*s.backend.offloads.lock().unwrap(), vec![all, 0, all]);
}

#[test]
fn offload_failure_means_device_needs_reset() {
    let (backend, _peer) = pair(true);
    let net = Net::with_backend(backend, "pair0", MAC, None, RateLimit::default());
    let mut td = TestDriver::new(Box::new(net));
    assert_ne!(td.bring_up(PLAIN) & 64, 0, "DEVICE_NEEDS_RESET");
}

#[test]
fn tx_rate_limit_delays_but_delivers_everything_in_order() {
    let rate = RateLimit {
        ops_per_sec: Some(10),
        bytes_per_sec: None,
    };
    let mut s = setup(PLAIN, rate);
    let mut frames = Vec::new();
    for i in 0..12u64 {
        let f = frame(30, i as u8);
        s.td.put(DATA + i * 0x100, &f);
        s.td.add_chain(TX_QUEUE, &[ro(DATA + i * 0x100, 30)]);
        frames.push(f);
    }
    s.td.notify(TX_QUEUE);
    assert!(s.td.wait_used(TX_QUEUE, 12));
    for f in &frames {
        assert_eq!(&recv(&s.peer).unwrap(), f);
    }
    assert!(get(&s.m, "rate_limited") >= 1);
    assert_eq!(get(&s.m, "tx_packets"), 12);
}

#[test]
fn rx_rate_limit_delays_but_delivers_everything() {
    let rate = RateLimit {
        ops_per_sec: None,
        bytes_per_sec: Some(1000),
    };
    let mut s = setup(PLAIN, rate);
    for i in 0..3u64 {
        s.td.add_chain(RX_QUEUE, &[wo(DATA + i * 0x1000, 2000)]);
    }
    s.td.notify(RX_QUEUE);
    for i in 0..3 {
        send(&s.peer, &frame(612, i));
    }
    assert!(s.td.wait_used(RX_QUEUE, 3));
    assert!(get(&s.m, "rate_limited") >= 1);
    assert_eq!(get(&s.m, "rx_packets"), 3);
    assert_eq!(get(&s.m, "rx_dropped"), 0);
}

#[test]
fn event_idx_asks_for_notifications() {
    let mut s = setup(MRG | bit(VIRTIO_RING_F_EVENT_IDX), RateLimit::default());
    let f = frame(50, 17);
    s.td.put(DATA, &f);
    s.td.add_chain(TX_QUEUE, &[ro(DATA, 50)]);
    s.td.notify(TX_QUEUE);
    assert!(s.td.wait_used(TX_QUEUE, 1));
    assert_eq!(recv(&s.peer).unwrap(), f);
    // avail_event (after the used ring's 16 elements) = next chain to process.
    let avail_event = |td: &TestDriver, q: usize| {
        let v = td.get(rings(q).2 + 4 + 8 * 16, 2);
        u16::from_le_bytes([v[0], v[1]])
    };
    assert!(wait_for(|| avail_event(&s.td, TX_QUEUE) == 1));
    send(&s.peer, &frame(60, 18));
    // No rx buffers: the device asks to be told about the first one.
    assert!(wait_for(
        || avail_event(&s.td, RX_QUEUE) == 0 && s.td.get(rings(RX_QUEUE).2, 2) == vec![0, 0]
    ));
    s.td.add_chain(RX_QUEUE, &[wo(DATA + 0x1000, 500)]);
    s.td.notify(RX_QUEUE);
    assert!(s.td.wait_used(RX_QUEUE, 1));
    assert_eq!(s.td.used_elem(RX_QUEUE, 0).1, 60);
}

#[test]
fn real_tap_is_created_up_and_removed() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: /dev/net/tun does not exist (modprobe tun)");
        return;
    }
    let name = format!("fvtest{}", std::process::id());
    let cfg = NetConfig {
        tap: name.clone(),
        ..Default::default()
    };
    let net = match Net::new(cfg.clone()) {
        Ok(n) => n,
        Err(NetError::Tap(TapError::PermissionDenied { .. })) => {
            eprintln!("skipped: no permission to create TAP interfaces here");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let sys = std::path::PathBuf::from("/sys/class/net").join(&name);
    assert!(sys.exists());
    assert_eq!(net.tap_name(), name);
    assert_eq!(net.mac()[0] & 3, 2, "local unicast");
    let flags = std::fs::read_to_string(sys.join("flags")).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & libc::IFF_UP as u32, 1, "created TAP is up");
    // Attached already: a second device on it is refused clearly.
    let e = Net::new(cfg).err().unwrap();
    assert!(matches!(e, NetError::Tap(TapError::Busy { .. })), "{e}");
    assert!(e.to_string().contains(&name), "{e}");
    // The real kernel accepts the offloads a Linux guest negotiates.
    let mut td = TestDriver::new(Box::new(net));
    assert_eq!(td.bring_up(OFFERED_FEATURES) & (4 | 64), 4);
    drop(td);
    assert!(wait_for(|| !sys.exists()), "TAP gone with its descriptor");

    // Not a TAP: refused with the reason.
    let e = Net::new(NetConfig {
        tap: "lo".into(),
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(matches!(e, NetError::Tap(TapError::Attach { .. })), "{e}");
    assert!(e.to_string().contains("not a TAP"), "{e}");

    for bad in ["bad/name", "waytoolongname16"] {
        let e = Net::new(NetConfig {
            tap: bad.into(),
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains(bad) && e.contains("invalid interface name"),
            "{e}"
        );
    }
}
