//! virtio-balloon's request processing on the device's worker thread ([`BalloonHandler`]):
//! inflate (discard pages), deflate (count them), statistics, free page reports.

use super::{
    BalloonMetrics, BalloonQueue, BalloonStats, Shared, BALLOON_PAGE_SIZE, MAX_CHAINS_PER_EVENT,
    MAX_PFN_BYTES, MAX_STATS_BYTES,
};
use crate::sync::lock;
use crate::virtio::chain::{Direction, Rules, Walker};
use crate::virtio::transport::NoInterrupt;
use crate::virtio::worker::{EventHandler, EventOps};
use crate::virtio::{InterruptKind, VirtioInterrupt};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

const PFN_SHIFT: u32 = 12;

const TIMER_TOKEN: u64 = 1;
const RESUME_TOKEN: u64 = 2;

/// The balloon's request processing, run on the device's worker thread.
pub struct BalloonHandler {
    pub(super) mem: GuestMemoryMmap,
    /// By transport queue index: the role and the queue (`None`: not set up or not negotiated).
    pub(super) queues: Vec<Option<(BalloonQueue, Queue)>>,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) metrics: Arc<BalloonMetrics>,
    pub(super) shared: Arc<Shared>,
    pub(super) stats_timer: Option<TimerFd>,
    pub(super) stats_interval: Duration,
    /// The stats buffer the device holds until it wants new statistics: (queue index, head).
    pub(super) stats_held: Option<(usize, u16)>,
    /// Wakes the worker again when a pass stopped at [`MAX_CHAINS_PER_EVENT`].
    pub(super) resume: Option<EventFd>,
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Tells the driver that queue `qi` has used buffers.
fn signal(interrupt: &dyn VirtioInterrupt, qi: usize) {
    if let Err(e) = interrupt.trigger(InterruptKind::queue(qi)) {
        tracing::warn!("virtio-balloon interrupt: {e}");
    }
}

/// What one chain's device-readable buffers held.
struct Gathered {
    data: Vec<u8>,
    /// Malformed: device-writable buffers, memory outside the guest or more data than `cap`.
    bad: bool,
}

/// Reads up to `cap` bytes of `chain`'s device-readable buffers.
fn gather(mem: &GuestMemoryMmap, chain: Chain<'_>, cap: usize) -> Gathered {
    let mut g = Gathered {
        data: Vec::new(),
        bad: false,
    };
    for item in Walker::new(chain, Rules::direction(Direction::Read)) {
        let Ok(region) = item else {
            // A device-writable buffer: skipped.
            g.bad = true;
            continue;
        };
        let room = cap.saturating_sub(g.data.len());
        let len = region.len as usize;
        if len > room {
            g.bad = true;
        }
        let n = len.min(room);
        if n == 0 {
            continue;
        }
        let start = g.data.len();
        g.data.resize(start + n, 0);
        let ok = g
            .data
            .get_mut(start..)
            .map(|buf| mem.read_slice(buf, region.addr).is_ok())
            .unwrap_or(false);
        if !ok {
            g.data.truncate(start);
            g.bad = true;
        }
    }
    g
}

/// Discards `len` bytes of guest memory at `addr` (4 KiB aligned): the host frees the pages and
/// the guest reads zeros on its next access. Fails without discarding anything when any part of
/// the range lies outside guest memory.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), ()> {
    let len = usize::try_from(len).map_err(|_| ())?;
    // Validate the whole range first (it may span regions).
    let mut total = 0usize;
    for s in mem.get_slices(addr, len) {
        total += s.map_err(|_| ())?.len();
    }
    if total != len {
        return Err(());
    }
    let mut ok = true;
    for s in mem.get_slices(addr, len) {
        let Ok(s) = s else {
            ok = false;
            continue;
        };
        let guard = s.ptr_guard_mut();
        // SAFETY: the range [ptr, ptr+len) is a validated slice of a mapping owned by the
        // GuestMemoryMmap we borrow, which stays mapped for the duration of the call. Discarding
        // private anonymous pages only makes them read as zeros on the next access; it cannot
        // violate Rust aliasing rules because guest memory is only ever accessed through
        // volatile accessors and raw pointers, never through Rust references.
        let r = unsafe { libc::madvise(guard.as_ptr().cast(), guard.len(), libc::MADV_DONTNEED) };
        if r != 0 {
            tracing::debug!("balloon madvise: {}", io::Error::last_os_error());
            ok = false;
        }
    }
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

impl BalloonHandler {
    /// Fuzzing entry point: serves every available chain of `queue` in the role `kind`,
    /// synchronously, against `mem` (inflate and free page reporting really discard pages of
    /// `mem`). Returns the counters.
    pub fn fuzz_queue(
        kind: BalloonQueue,
        mem: &GuestMemoryMmap,
        queue: Queue,
    ) -> Arc<BalloonMetrics> {
        let metrics = Arc::new(BalloonMetrics::default());
        let mut h = BalloonHandler {
            mem: mem.clone(),
            queues: vec![Some((kind, queue))],
            interrupt: Arc::new(NoInterrupt),
            metrics: metrics.clone(),
            shared: Arc::new(Shared::default()),
            stats_timer: None,
            stats_interval: Duration::from_secs(1),
            stats_held: None,
            resume: None,
        };
        h.process(0);
        // As if the stats timer fired: give a held stats buffer back.
        h.return_stats();
        metrics
    }

    /// Serves up to [`MAX_CHAINS_PER_EVENT`] chains of queue `qi`.
    fn process(&mut self, qi: usize) {
        let Some(Some((kind, queue))) = self.queues.get_mut(qi) else {
            return;
        };
        let kind = *kind;
        let mem = &self.mem;
        let metrics = &self.metrics;
        let mut used = false;
        let mut served = 0;
        while served < MAX_CHAINS_PER_EVENT {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            match kind {
                BalloonQueue::Inflate => inflate(mem, chain, metrics),
                BalloonQueue::Deflate => deflate(mem, chain, metrics),
                BalloonQueue::Reporting => report(mem, chain, metrics),
                BalloonQueue::Stats => {
                    let g = gather(mem, chain, MAX_STATS_BYTES);
                    if g.bad {
                        metrics.error(1);
                    }
                    let mut s = BalloonStats::parse(&g.data);
                    s.received_at = Some(SystemTime::now());
                    *lock(&self.shared.stats) = s;
                    metrics.stats_updates.fetch_add(1, Ordering::Relaxed);
                    // The device keeps the buffer until it wants new statistics; a driver that
                    // sends another one meanwhile gets the older one back.
                    if let Some((_, old)) = self.stats_held.replace((qi, head)) {
                        if queue.add_used(mem, old, 0).is_err() {
                            metrics.error(1);
                        }
                        used = true;
                    }
                    continue;
                }
            }
            // A bogus head index (refused by add_used) must not stall the chains behind it.
            if queue.add_used(mem, head, 0).is_err() {
                metrics.error(1);
                continue;
            }
            used = true;
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            signal(&*self.interrupt, qi);
        }
        if served == MAX_CHAINS_PER_EVENT {
            if let Some(r) = &self.resume {
                let _ = r.write(1);
            }
        }
    }

    /// Gives the held stats buffer back to the driver: a request for new statistics.
    fn return_stats(&mut self) {
        let Some((qi, head)) = self.stats_held.take() else {
            return;
        };
        if let Some(Some((_, q))) = self.queues.get_mut(qi) {
            if q.add_used(&self.mem, head, 0).is_err() {
                self.metrics.error(1);
                return;
            }
            if q.needs_notification(&self.mem).unwrap_or(true) {
                signal(&*self.interrupt, qi);
            }
        }
    }

    fn process_all(&mut self) {
        for qi in 0..self.queues.len() {
            self.process(qi);
        }
    }
}

/// An inflate request: discard every page whose PFN lies in guest memory.
fn inflate(mem: &GuestMemoryMmap, chain: Chain<'_>, metrics: &BalloonMetrics) {
    let g = gather(mem, chain, MAX_PFN_BYTES);
    if g.bad {
        metrics.error(1);
    }
    let mut pfns: Vec<u64> = g
        .data
        .chunks_exact(4)
        .map(|c| {
            u64::from(u32::from_le_bytes(
                <[u8; 4]>::try_from(c).unwrap_or_default(),
            ))
        })
        .collect();
    pfns.sort_unstable();
    pfns.dedup();
    // Coalesce runs of contiguous pages into one discard each.
    let mut run: Option<(u64, u64)> = None; // (first pfn, pages)
    let flush = |run: Option<(u64, u64)>| {
        if let Some((first, pages)) = run {
            let addr = GuestAddress(first << PFN_SHIFT);
            if discard(mem, addr, pages * BALLOON_PAGE_SIZE).is_ok() {
                metrics.inflated_pages.fetch_add(pages, Ordering::Relaxed);
            } else {
                metrics.error(pages);
            }
        }
    };
    for pfn in pfns {
        let addr = GuestAddress(pfn << PFN_SHIFT);
        if !mem.check_range(addr, BALLOON_PAGE_SIZE as usize) {
            metrics.error(1);
            continue;
        }
        run = match run {
            Some((first, pages)) if first + pages == pfn => Some((first, pages + 1)),
            other => {
                flush(other);
                Some((pfn, 1))
            }
        };
    }
    flush(run);
}

/// A deflate request: the pages refault on their own; only count them.
fn deflate(mem: &GuestMemoryMmap, chain: Chain<'_>, metrics: &BalloonMetrics) {
    let g = gather(mem, chain, MAX_PFN_BYTES);
    if g.bad {
        metrics.error(1);
    }
    metrics
        .deflated_pages
        .fetch_add((g.data.len() / 4) as u64, Ordering::Relaxed);
}

/// A free page report: every device-writable buffer is a free range of guest memory to discard.
fn report(mem: &GuestMemoryMmap, chain: Chain<'_>, metrics: &BalloonMetrics) {
    for item in Walker::new(chain, Rules::direction(Direction::Write)) {
        let Ok(region) = item else {
            // A device-readable buffer: not a free range.
            metrics.error(1);
            continue;
        };
        // Only whole pages inside the range.
        let start = region.addr.0;
        let Some(end) = start.checked_add(u64::from(region.len)) else {
            metrics.error(1);
            continue;
        };
        let Some(first) = start.checked_next_multiple_of(BALLOON_PAGE_SIZE) else {
            metrics.error(1);
            continue;
        };
        let last = end - end % BALLOON_PAGE_SIZE;
        if last <= first {
            continue;
        }
        if discard(mem, GuestAddress(first), last - first).is_ok() {
            metrics
                .reported_bytes
                .fetch_add(last - first, Ordering::Relaxed);
        } else {
            metrics.error(1);
        }
    }
}

impl EventHandler for BalloonHandler {
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        if let Some(t) = self.stats_timer.as_mut() {
            t.reset(self.stats_interval, Some(self.stats_interval))?;
            ops.add(t.as_raw_fd(), TIMER_TOKEN, EventSet::IN)?;
        }
        if let Some(r) = &self.resume {
            ops.add(r.as_raw_fd(), RESUME_TOKEN, EventSet::IN)?;
        }
        self.process_all();
        Ok(())
    }

    fn queue_event(&mut self, queue: usize, _ops: &mut EventOps) {
        self.process(queue);
    }

    fn host_event(&mut self, token: u64, _events: EventSet, _ops: &mut EventOps) {
        match token {
            TIMER_TOKEN => {
                if let Some(t) = self.stats_timer.as_mut() {
                    // Readable: does not block.
                    let _ = t.wait();
                }
                self.return_stats();
            }
            RESUME_TOKEN => {
                if let Some(r) = &self.resume {
                    let _ = r.read();
                }
                self.process_all();
            }
            _ => {}
        }
    }
}
