//! virtio-net's data path: both queues, the backend and the pending receive frame, on the
//! device's worker thread ([`NetHandler`]; its `process_*` methods are also the synchronous
//! fuzzing entry points).

use super::{
    bit, NetBackend, NetMetrics, CHAIN_BUDGET, MAX_CHAIN_DESCS, MAX_PACKET, NET_HDR_LEN, RX_QUEUE,
    TX_QUEUE,
};
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::virtio::chain::{self, ChainError, Direction, Region, Rules};
use crate::virtio::worker::{EventHandler, EventOps};
use crate::virtio::{InterruptKind, VirtioInterrupt};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// Worker event tokens of the device's own descriptors.
const TAP_TOKEN: u64 = 0;
const RX_TIMER_TOKEN: u64 = 1;
const TX_TIMER_TOKEN: u64 = 2;
const RESUME_TOKEN: u64 = 3;

/// Collects `chain`'s buffers into `out` (the walker's rules for virtio-net): all in the
/// direction `direction`, at most [`MAX_CHAIN_DESCS`] descriptors, inside guest memory, at most
/// [`MAX_PACKET`] bytes for a transmit chain (receive chains may be longer; the excess is not
/// used) and at least the header. Returns their total length.
fn walk_chain<I>(
    chain: impl IntoIterator<IntoIter = I>,
    mem: &GuestMemoryMmap,
    direction: Direction,
    out: &mut Vec<Region>,
) -> Result<usize, ChainError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let rules = Rules {
        direction,
        max_descriptors: MAX_CHAIN_DESCS,
        max_len: match direction {
            Direction::Read => MAX_PACKET as u64,
            Direction::Write => u64::MAX,
        },
        memory: Some(mem),
    };
    let total = chain::collect(chain, rules, out)?;
    if total < NET_HDR_LEN as u64 {
        return Err(ChainError::TooShort);
    }
    Ok(usize::try_from(total).unwrap_or(usize::MAX))
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
    pub(super) metrics: Arc<NetMetrics>,
    mergeable: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for guest buffers.
    rx_pending: Option<usize>,
    rx_descs: Vec<Region>,
    rx_chains: Vec<RxChain>,
    tx_buf: Vec<u8>,
    tx_descs: Vec<Region>,
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
                let total = match walk_chain(chain, &self.mem, Direction::Read, &mut self.tx_descs)
                {
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
                let ok = match self.tx_buf.get_mut(..total) {
                    Some(frame) => chain::read_at(&self.mem, &self.tx_descs, 0, frame).is_ok(),
                    None => false,
                };
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
            match walk_chain(chain, &self.mem, Direction::Write, &mut self.rx_descs) {
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
            for r in self.rx_descs.get(c.first..c.end).unwrap_or(&[]) {
                if off >= len {
                    break;
                }
                let n = (r.len as usize).min(len - off);
                let ok = match self.rx_buf.get(off..off + n) {
                    Some(src) => self.mem.write_slice(src, r.addr).is_ok(),
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
