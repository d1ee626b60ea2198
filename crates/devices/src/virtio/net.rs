//! virtio-net (virtio 1.x §5.1) over a TAP interface.
//!
//! Two queues: receive (0) and transmit (1); no control queue, no multiqueue. Every packet on
//! both queues starts with a 12-byte `virtio_net_hdr_v1`; the TAP is opened with the same header
//! (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12), so headers pass through unchanged except
//! `num_buffers`, which the device sets on receive. Checksum and segmentation offloads are
//! offered both ways: the TAP accepts offloaded frames from the guest as they are, and after
//! activation `TUNSETOFFLOAD` lets the kernel hand the guest exactly the offloaded frames its
//! driver accepted (`GUEST_CSUM` → `TUN_F_CSUM`, `GUEST_TSO4` → `TUN_F_TSO4`, …).
//!
//! All I/O runs on the device's [`Worker`] thread. Receive reads one frame from the TAP at a time
//! into a host buffer and copies it into the guest's receive buffers (spread over several with
//! `MRG_RXBUF`). When the guest has no buffers, the frame stays pending, the TAP is taken out of
//! the worker's epoll set and receive resumes on the guest's next receive-queue notification:
//! no busy loop, no needless drop. Transmit gathers each chain into a host buffer and writes it
//! as one frame. A rate limiter per direction stops that direction until its timer fires.
//!
//! The device logic only needs a [`NetBackend`]; [`Tap`] is the real one, tests use a
//! `SOCK_SEQPACKET` socket pair, and [`NetHandler::process_tx`] / [`NetHandler::process_rx`] are
//! the synchronous fuzzing entry points.

use super::worker::{EventHandler, EventOps, Worker};
use super::{
    InterruptKind, Metrics, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Queue size offered (both queues).
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of `virtio_net_hdr_v1` (with `num_buffers`), in front of every packet.
pub const NET_HDR_LEN: usize = crate::tap::VNET_HDR_LEN;
/// Largest packet, header included: a 64 KiB segmentation-offload frame with its Ethernet header
/// plus the virtio-net header.
pub const MAX_PACKET: usize = 65562;
/// Most descriptor chains one call of [`NetHandler::process_tx`] or
/// [`NetHandler::process_rx`] pops (bounds the work one event causes; the rest is resumed on a
/// later turn of the worker loop).
pub const CHAIN_BUDGET: usize = 512;
/// Most descriptors accepted in one chain (indirect descriptors are not offered, so a sane chain
/// is never longer than the queue).
pub const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Every feature the device offers.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX);

/// Length of the config space exposed: mac (6), status (2), max_virtqueue_pairs (2).
const CONFIG_LEN: usize = 10;

// Worker event tokens of the device's own descriptors.
const TAP_TOKEN: u64 = 0;
const RX_TIMER_TOKEN: u64 = 1;
const TX_TIMER_TOKEN: u64 = 2;
const RESUME_TOKEN: u64 = 3;

/// The offloads (`TUN_F_*`) the TAP may hand the guest, from the features its driver accepted.
/// Dependencies the kernel enforces are applied (TSO needs CSUM, ECN needs TSO), so a driver that
/// accepted an inconsistent set gets the consistent subset.
pub fn tap_offload_flags(features: u64) -> u32 {
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        flags |= TUN_F_TSO4;
    }
    if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        flags |= TUN_F_TSO6;
    }
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && features & bit(VIRTIO_NET_F_GUEST_ECN) != 0 {
        flags |= TUN_F_TSO_ECN;
    }
    flags
}

/// The host side of the network card: frames (each with its 12-byte virtio-net header) in and
/// out. Methods take `&self` so the device can keep its backend across resets while a worker
/// thread uses it.
pub trait NetBackend: AsRawFd + Send + Sync {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting, `Ok(0)` when the backend
    /// is gone. The descriptor from [`AsRawFd`] is watched for readability.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
    /// Sets which offloaded frames (`TUN_F_*` flags) the backend may deliver.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

impl NetBackend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, frame)
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
}

/// Configuration of one network card.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the TAP interface (attached if it exists, created otherwise).
    pub tap: String,
    /// The guest's MAC address; by default a locally administered one derived from the TAP name
    /// and the id.
    pub mac: Option<[u8; 6]>,
    /// Identifier of the device (names its thread and log lines).
    pub id: Option<String>,
    /// Limits: `ops_per_sec` is packets per second, each direction limited separately.
    pub rate: RateLimit,
}

/// Why a network card could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP interface could not be opened or set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The MAC address given is not a usable unicast address.
    #[error("TAP {tap}: MAC address {mac} is {reason}")]
    InvalidMac {
        /// Interface name.
        tap: String,
        /// The address.
        mac: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Formats a MAC address as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A locally administered unicast MAC (`52:54:00:xx:xx:xx`) derived from `seed` (FNV-1a), so a
/// VM keeps its address across restarts.
pub fn derived_mac(seed: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in seed.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

/// Counters of one network card.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest (Ethernet frames, header excluded).
    pub rx_bytes: AtomicU64,
    /// Frames sent by the guest onto the TAP.
    pub tx_packets: AtomicU64,
    /// Bytes sent by the guest (Ethernet frames, header excluded).
    pub tx_bytes: AtomicU64,
    /// Frames read from the TAP but not delivered (no buffer big enough, malformed buffers).
    pub rx_dropped: AtomicU64,
    /// Transmit chains not sent (malformed, or the TAP refused the frame).
    pub tx_errors: AtomicU64,
    /// Every error: malformed chains on either queue, used-ring failures, backend failures.
    pub errors: AtomicU64,
    /// Times a direction had to wait for its rate limiter.
    pub rate_limited: AtomicU64,
}

impl NetMetrics {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Metrics for NetMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_packets", l(&self.rx_packets)),
            ("rx_bytes", l(&self.rx_bytes)),
            ("tx_packets", l(&self.tx_packets)),
            ("tx_bytes", l(&self.tx_bytes)),
            ("rx_dropped", l(&self.rx_dropped)),
            ("tx_errors", l(&self.tx_errors)),
            ("errors", l(&self.errors)),
            ("rate_limited", l(&self.rate_limited)),
        ]
    }
}

/// What is wrong with a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChainError {
    WrongDirection,
    OutsideMemory,
    TooLong,
    TooManyDescriptors,
    TooShort,
}

/// Walks `chain`, collecting its buffers into `out`: all must go the direction `writable` says
/// and lie inside guest memory. Returns their total length, at most [`MAX_PACKET`] for a
/// readable chain (writable chains may be longer; the excess is not used).
fn walk_chain<I>(
    chain: I,
    mem: &GuestMemoryMmap,
    writable: bool,
    out: &mut Vec<(GuestAddress, u32)>,
) -> Result<usize, ChainError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut total: usize = 0;
    for (n, desc) in chain.enumerate() {
        if n >= MAX_CHAIN_DESCS {
            return Err(ChainError::TooManyDescriptors);
        }
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len();
        total = total.saturating_add(len as usize);
        if !writable && total > MAX_PACKET {
            return Err(ChainError::TooLong);
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(ChainError::OutsideMemory);
        }
        if len > 0 {
            out.push((desc.addr(), len));
        }
    }
    if total < NET_HDR_LEN {
        return Err(ChainError::TooShort);
    }
    Ok(total)
}

/// How a call of [`NetHandler::process_tx`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// The transmit queue is empty (guest notifications re-enabled).
    Idle,
    /// [`CHAIN_BUDGET`] chains were handled; more may wait.
    Capped,
    /// The rate limiter blocked; resume when its timer fires.
    RateLimited,
}

/// How a call of [`NetHandler::process_rx`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStatus {
    /// The backend has no frame waiting: wait until it is readable.
    BackendEmpty,
    /// A frame is pending but the guest has posted no (or not enough) buffers: wait for a
    /// receive-queue notification.
    NoBuffers,
    /// The rate limiter blocked; resume when its timer fires.
    RateLimited,
    /// [`CHAIN_BUDGET`] chains were handled; more may wait.
    Capped,
    /// The backend failed or closed: receive stops until the device is reset.
    BackendFailed,
}

/// One receive chain planned for the pending frame.
struct RxChain {
    head: u16,
    /// Range in `NetHandler::rx_descs`.
    first: usize,
    end: usize,
}

/// The device's data path: both queues, the backend and the pending receive frame. Runs on the
/// worker thread; its `process_*` methods are also the synchronous fuzzing entry points.
pub struct NetHandler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend: Arc<dyn NetBackend>,
    metrics: Arc<NetMetrics>,
    mergeable: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for guest buffers.
    rx_pending: Option<usize>,
    rx_descs: Vec<(GuestAddress, u32)>,
    rx_chains: Vec<RxChain>,
    tx_buf: Vec<u8>,
    tx_descs: Vec<(GuestAddress, u32)>,
    // Worker-loop state.
    resume: Option<EventFd>,
    resume_rx: bool,
    resume_tx: bool,
    backend_watched: bool,
    rx_dead: bool,
}

impl NetHandler {
    /// A data path over `rx` and `tx` (already validated, ready queues) with the negotiated
    /// `features` (`MRG_RXBUF`, `EVENT_IDX` matter here) and `rate` limits per direction.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemoryMmap,
        mut rx: Queue,
        mut tx: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        backend: Arc<dyn NetBackend>,
        metrics: Arc<NetMetrics>,
        features: u64,
        rate: RateLimit,
    ) -> io::Result<NetHandler> {
        let event_idx = features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        Ok(NetHandler {
            mem,
            rx,
            tx,
            interrupt,
            backend,
            metrics,
            mergeable: features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_limiter: RateLimiter::new(rate)?,
            tx_limiter: RateLimiter::new(rate)?,
            rx_buf: vec![0; MAX_PACKET],
            rx_pending: None,
            rx_descs: Vec::new(),
            rx_chains: Vec::new(),
            tx_buf: vec![0; MAX_PACKET],
            tx_descs: Vec::new(),
            resume: None,
            resume_rx: false,
            resume_tx: false,
            backend_watched: false,
            rx_dead: false,
        })
    }

    fn signal_used(
        queue: &mut Queue,
        index: usize,
        mem: &GuestMemoryMmap,
        interrupt: &dyn VirtioInterrupt,
    ) {
        if queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = interrupt.trigger(InterruptKind::queue(index)) {
                tracing::warn!("virtio-net interrupt: {e}");
            }
        }
    }

    fn return_chain(queue: &mut Queue, mem: &GuestMemoryMmap, m: &NetMetrics, head: u16, len: u32) {
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::debug!("virtio-net: used ring: {e}");
            NetMetrics::inc(&m.errors);
        }
    }

    /// Sends every available transmit chain (up to [`CHAIN_BUDGET`]) to the backend and returns
    /// them to the guest. Malformed chains (device-writable buffers, outside guest memory,
    /// shorter than the header or longer than [`MAX_PACKET`]) are returned unsent and counted.
    ///
    /// Fuzzing entry point (synchronous, no worker needed).
    pub fn process_tx(&mut self) -> TxStatus {
        let m = &*self.metrics;
        let mut budget = CHAIN_BUDGET;
        let mut returned = 0usize;
        let status = 'outer: loop {
            // Ignored errors: suppression is an optimisation; enable_notification decides below.
            let _ = self.tx.disable_notification(&self.mem);
            loop {
                if self.tx_limiter.is_blocked() {
                    break 'outer TxStatus::RateLimited;
                }
                if budget == 0 {
                    break 'outer TxStatus::Capped;
                }
                let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                self.tx_descs.clear();
                let total = match walk_chain(chain, &self.mem, false, &mut self.tx_descs) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(?e, "virtio-net: malformed transmit chain");
                        NetMetrics::inc(&m.tx_errors);
                        NetMetrics::inc(&m.errors);
                        Self::return_chain(&mut self.tx, &self.mem, m, head, 0);
                        returned += 1;
                        continue;
                    }
                };
                let frame_len = total - NET_HDR_LEN;
                if !self.tx_limiter.consume(1, frame_len as u64) {
                    NetMetrics::inc(&m.rate_limited);
                    self.tx.go_to_previous_position();
                    break 'outer TxStatus::RateLimited;
                }
                let mut off = 0usize;
                let mut ok = true;
                for &(addr, len) in &self.tx_descs {
                    let Some(dst) = self.tx_buf.get_mut(off..off + len as usize) else {
                        ok = false;
                        break;
                    };
                    if self.mem.read_slice(dst, addr).is_err() {
                        ok = false;
                        break;
                    }
                    off += len as usize;
                }
                let sent = ok
                    && match self.tx_buf.get(..total) {
                        Some(frame) => match self.backend.write_frame(frame) {
                            Ok(n) if n == total => true,
                            Ok(n) => {
                                tracing::debug!(n, total, "virtio-net: short write to the TAP");
                                false
                            }
                            Err(e) => {
                                tracing::debug!("virtio-net: TAP write: {e}");
                                false
                            }
                        },
                        None => false,
                    };
                if sent {
                    NetMetrics::inc(&m.tx_packets);
                    NetMetrics::add(&m.tx_bytes, frame_len);
                } else {
                    NetMetrics::inc(&m.tx_errors);
                    NetMetrics::inc(&m.errors);
                }
                Self::return_chain(&mut self.tx, &self.mem, m, head, 0);
                returned += 1;
            }
            match self.tx.enable_notification(&self.mem) {
                Ok(true) => {
                    // More chains arrived while notifications were off (counted against the
                    // budget so a ring that never yields a chain cannot spin here).
                    budget = budget.saturating_sub(1);
                    continue;
                }
                _ => break TxStatus::Idle,
            }
        };
        if returned > 0 {
            Self::signal_used(&mut self.tx, TX_QUEUE, &self.mem, &*self.interrupt);
        }
        status
    }

    /// Delivers frames from the backend into the guest's receive buffers until the backend is
    /// empty, the guest runs out of buffers (the frame then stays pending), the rate limiter
    /// blocks or [`CHAIN_BUDGET`] chains were popped. Malformed receive chains are returned with
    /// length 0 and counted.
    ///
    /// Fuzzing entry point (synchronous, no worker needed).
    pub fn process_rx(&mut self) -> RxStatus {
        let mut budget = CHAIN_BUDGET;
        let mut returned = 0usize;
        let status = loop {
            if self.rx_dead {
                break RxStatus::BackendFailed;
            }
            if self.rx_limiter.is_blocked() {
                break RxStatus::RateLimited;
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(0) => {
                        tracing::warn!("virtio-net: backend closed; receive stopped");
                        NetMetrics::inc(&self.metrics.errors);
                        self.rx_dead = true;
                        break RxStatus::BackendFailed;
                    }
                    Ok(n) if n < NET_HDR_LEN || n > self.rx_buf.len() => {
                        NetMetrics::inc(&self.metrics.rx_dropped);
                        if budget == 0 {
                            break RxStatus::Capped;
                        }
                        budget -= 1;
                        continue;
                    }
                    Ok(n) => {
                        self.rx_pending = Some(n);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        break RxStatus::BackendEmpty
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: backend read: {e}; receive stopped");
                        NetMetrics::inc(&self.metrics.errors);
                        self.rx_dead = true;
                        break RxStatus::BackendFailed;
                    }
                },
            };
            match self.deliver_pending(len, &mut budget, &mut returned) {
                Ok(()) => {}
                Err(s) => break s,
            }
        };
        if returned > 0 {
            Self::signal_used(&mut self.rx, RX_QUEUE, &self.mem, &*self.interrupt);
        }
        status
    }

    /// Places the pending frame of `len` bytes, or says why it waits.
    fn deliver_pending(
        &mut self,
        len: usize,
        budget: &mut usize,
        returned: &mut usize,
    ) -> Result<(), RxStatus> {
        let m = &*self.metrics;
        self.rx_descs.clear();
        self.rx_chains.clear();
        let mut capacity = 0usize;
        let size = usize::from(self.rx.size());
        // Plan: pop chains until the frame fits (one chain without MRG_RXBUF).
        let fits = loop {
            if capacity >= len && !self.rx_chains.is_empty() {
                break true;
            }
            if !self.mergeable && !self.rx_chains.is_empty() {
                break false;
            }
            if self.rx_chains.len() >= size {
                // Every buffer the ring can hold would not take it.
                break false;
            }
            if *budget == 0 {
                self.rollback_rx();
                return Err(RxStatus::Capped);
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                // Out of buffers: ask for a notification when the guest adds one past those
                // already popped (with EVENT_IDX this is what makes it notify), retry if one
                // came meanwhile. Only then give back the popped ones: they are not enough.
                let more = self.rx.enable_notification(&self.mem);
                self.rollback_rx();
                return match more {
                    Ok(true) => {
                        *budget = budget.saturating_sub(1);
                        Ok(())
                    }
                    _ => Err(RxStatus::NoBuffers),
                };
            };
            *budget -= 1;
            let head = chain.head_index();
            let first = self.rx_descs.len();
            match walk_chain(chain, &self.mem, true, &mut self.rx_descs) {
                Ok(cap) => {
                    capacity = capacity.saturating_add(cap);
                    self.rx_chains.push(RxChain {
                        head,
                        first,
                        end: self.rx_descs.len(),
                    });
                }
                Err(e) => {
                    tracing::debug!(?e, "virtio-net: malformed receive chain");
                    self.rx_descs.truncate(first);
                    NetMetrics::inc(&m.errors);
                    if self.rx_chains.is_empty() {
                        // Nothing of this frame is planned yet: return it on its own.
                        Self::return_chain(&mut self.rx, &self.mem, m, head, 0);
                        *returned += 1;
                        continue;
                    }
                    // Between buffers of a merged frame: the frame cannot be delivered in
                    // order; return everything popped empty and drop the frame.
                    for c in &self.rx_chains {
                        Self::return_chain(&mut self.rx, &self.mem, m, c.head, 0);
                    }
                    Self::return_chain(&mut self.rx, &self.mem, m, head, 0);
                    *returned += self.rx_chains.len() + 1;
                    self.rx_chains.clear();
                    self.drop_pending();
                    return Ok(());
                }
            }
        };
        if !fits {
            if self.mergeable {
                // The guest's buffers stay its own: only the frame is lost.
                self.rollback_rx();
            } else {
                // One chain too small for the frame: the guest sees an empty buffer.
                for c in &self.rx_chains {
                    Self::return_chain(&mut self.rx, &self.mem, m, c.head, 0);
                }
                *returned += self.rx_chains.len();
                NetMetrics::inc(&m.errors);
            }
            self.rx_chains.clear();
            self.drop_pending();
            return Ok(());
        }
        if !self.rx_limiter.consume(1, (len - NET_HDR_LEN) as u64) {
            NetMetrics::inc(&m.rate_limited);
            self.rollback_rx();
            return Err(RxStatus::RateLimited);
        }
        // num_buffers (bytes 10..12 of the header): the TAP leaves them untouched.
        let nbuf = u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX);
        if let Some(b) = self.rx_buf.get_mut(10..12) {
            b.copy_from_slice(&nbuf.to_le_bytes());
        }
        let mut off = 0usize;
        let mut failed = false;
        for c in &self.rx_chains {
            let mut written = 0usize;
            for &(addr, dlen) in self.rx_descs.get(c.first..c.end).unwrap_or(&[]) {
                if off >= len {
                    break;
                }
                let n = (dlen as usize).min(len - off);
                let ok = match self.rx_buf.get(off..off + n) {
                    Some(src) => self.mem.write_slice(src, addr).is_ok(),
                    None => false,
                };
                if !ok {
                    failed = true;
                    break;
                }
                off += n;
                written += n;
            }
            Self::return_chain(&mut self.rx, &self.mem, m, c.head, written as u32);
        }
        *returned += self.rx_chains.len();
        self.rx_chains.clear();
        self.rx_pending = None;
        if failed || off != len {
            NetMetrics::inc(&m.errors);
            NetMetrics::inc(&m.rx_dropped);
        } else {
            NetMetrics::inc(&m.rx_packets);
            NetMetrics::add(&m.rx_bytes, len - NET_HDR_LEN);
        }
        Ok(())
    }

    /// Puts the planned (popped, not yet used) receive chains back on the available ring.
    fn rollback_rx(&mut self) {
        for _ in 0..self.rx_chains.len() {
            self.rx.go_to_previous_position();
        }
        self.rx_chains.clear();
    }

    fn drop_pending(&mut self) {
        self.rx_pending = None;
        NetMetrics::inc(&self.metrics.rx_dropped);
    }

    /// True while a frame read from the backend waits for guest buffers or the rate limiter.
    pub fn has_pending_frame(&self) -> bool {
        self.rx_pending.is_some()
    }

    fn watch_backend(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.backend_watched {
            return;
        }
        let fd = self.backend.as_raw_fd();
        let r = if want {
            ops.add(fd, TAP_TOKEN, EventSet::IN)
        } else {
            ops.remove(fd)
        };
        match r {
            Ok(()) => self.backend_watched = want,
            Err(e) => {
                tracing::error!("virtio-net: epoll on the TAP: {e}");
                NetMetrics::inc(&self.metrics.errors);
            }
        }
    }

    fn kick_resume(&self) {
        if let Some(e) = &self.resume {
            let _ = e.write(1);
        }
    }

    fn run_rx(&mut self, ops: &mut EventOps) {
        match self.process_rx() {
            RxStatus::BackendEmpty => self.watch_backend(ops, true),
            RxStatus::NoBuffers | RxStatus::RateLimited | RxStatus::BackendFailed => {
                self.watch_backend(ops, false)
            }
            RxStatus::Capped => {
                self.resume_rx = true;
                self.kick_resume();
            }
        }
    }

    fn run_tx(&mut self) {
        if self.process_tx() == TxStatus::Capped {
            self.resume_tx = true;
            self.kick_resume();
        }
    }
}

impl EventHandler for NetHandler {
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        let resume = EventFd::new(EFD_NONBLOCK)?;
        ops.add(resume.as_raw_fd(), RESUME_TOKEN, EventSet::IN)?;
        self.resume = Some(resume);
        if !self.rx_limiter.is_unlimited() {
            ops.add(self.rx_limiter.timer_fd(), RX_TIMER_TOKEN, EventSet::IN)?;
        }
        if !self.tx_limiter.is_unlimited() {
            ops.add(self.tx_limiter.timer_fd(), TX_TIMER_TOKEN, EventSet::IN)?;
        }
        self.run_rx(ops);
        self.run_tx();
        Ok(())
    }

    fn queue_event(&mut self, queue: usize, ops: &mut EventOps) {
        match queue {
            RX_QUEUE => self.run_rx(ops),
            TX_QUEUE => self.run_tx(),
            _ => {}
        }
    }

    fn host_event(&mut self, token: u64, _events: EventSet, ops: &mut EventOps) {
        match token {
            TAP_TOKEN => self.run_rx(ops),
            RX_TIMER_TOKEN => {
                self.rx_limiter.on_timer();
                self.run_rx(ops);
            }
            TX_TIMER_TOKEN => {
                self.tx_limiter.on_timer();
                self.run_tx();
            }
            RESUME_TOKEN => {
                if let Some(e) = &self.resume {
                    let _ = e.read();
                }
                if std::mem::take(&mut self.resume_rx) {
                    self.run_rx(ops);
                }
                if std::mem::take(&mut self.resume_tx) {
                    self.run_tx();
                }
            }
            _ => {}
        }
    }
}

/// The network card.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    tap_name: String,
    id: Option<String>,
    mac: [u8; 6],
    rate: RateLimit,
    metrics: Arc<NetMetrics>,
    worker: Option<Worker<NetHandler>>,
}

impl Net {
    /// Opens (or creates) the TAP interface of `cfg` and makes an inactive device on it.
    pub fn new(cfg: NetConfig) -> Result<Net, NetError> {
        crate::tap::validate_name(&cfg.tap)?;
        let mac = Self::check_mac(&cfg)?;
        let tap = Tap::open(&cfg.tap)?;
        let name = tap.name().to_string();
        Ok(Self::with_backend(
            Arc::new(tap),
            &name,
            mac,
            cfg.id,
            cfg.rate,
        ))
    }

    fn check_mac(cfg: &NetConfig) -> Result<[u8; 6], NetError> {
        let Some(mac) = cfg.mac else {
            let seed = format!("{}/{}", cfg.tap, cfg.id.as_deref().unwrap_or(""));
            return Ok(derived_mac(&seed));
        };
        let reason = if mac[0] & 1 != 0 {
            "multicast (the lowest bit of the first byte is set)"
        } else if mac == [0; 6] {
            "all zeros"
        } else {
            return Ok(mac);
        };
        Err(NetError::InvalidMac {
            tap: cfg.tap.clone(),
            mac: format_mac(&mac),
            reason,
        })
    }

    /// A device over any backend (tests, other host transports); `name` names it in logs.
    pub fn with_backend(
        backend: Arc<dyn NetBackend>,
        name: &str,
        mac: [u8; 6],
        id: Option<String>,
        rate: RateLimit,
    ) -> Net {
        Net {
            backend,
            tap_name: name.to_string(),
            id,
            mac,
            rate,
            metrics: Arc::new(NetMetrics::default()),
            worker: None,
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    /// Its counters.
    pub fn net_metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable: with VIRTIO_NET_F_MAC the driver must not write the MAC.
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-net config write ignored (read-only)"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        if let Some(w) = self.worker.take() {
            drop(w.stop());
        }
        let [rx, tx] = super::ready_queues::<2>(queues)?;
        let features = features & OFFERED_FEATURES;
        let flags = tap_offload_flags(features);
        self.backend.set_offload(flags).map_err(|e| {
            NetMetrics::inc(&self.metrics.errors);
            VirtioError::Host(format!(
                "TAP {}: TUNSETOFFLOAD {flags:#x}: {e}",
                self.tap_name
            ))
        })?;
        let handler = NetHandler::new(
            mem,
            rx,
            tx,
            interrupt,
            self.backend.clone(),
            self.metrics.clone(),
            features,
            self.rate,
        )
        .map_err(|e| VirtioError::Host(format!("TAP {}: rate limiter: {e}", self.tap_name)))?;
        let name = format!("net-{}", self.id.as_deref().unwrap_or(&self.tap_name));
        let worker = Worker::spawn(&name, 2, handler)
            .map_err(|e| VirtioError::Host(format!("TAP {}: worker thread: {e}", self.tap_name)))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        if let Some(w) = &self.worker {
            w.notify(index);
        }
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            drop(w.stop());
        }
        // Until the next driver says what it accepts, the kernel hands over no offloaded frames.
        if let Err(e) = self.backend.set_offload(0) {
            tracing::warn!("TAP {}: clearing offloads at reset: {e}", self.tap_name);
        }
    }

    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        Some(self.metrics.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{rings, ro, wo, TestDriver, DATA, MEM_SIZE};
    use crate::virtio::transport::mmio::INT_VRING;
    use crate::BusDevice;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    /// Everything but mergeable buffers and EVENT_IDX.
    const PLAIN: u64 =
        OFFERED_FEATURES & !bit(VIRTIO_NET_F_MRG_RXBUF) & !bit(VIRTIO_RING_F_EVENT_IDX);
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
        m.snapshot()
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
}
