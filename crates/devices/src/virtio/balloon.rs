//! virtio-balloon (virtio 1.x §5.5): the host asks the guest to give memory back.
//!
//! The host sets a target ([`BalloonControl::set_target_bytes`]); the guest's driver allocates
//! pages inside itself and hands their frame numbers to the device on the inflate queue, which
//! discards them on the host (`madvise(MADV_DONTNEED)` on the private anonymous guest mapping:
//! the host frees them and they read as zeros on the next touch). Deflating needs nothing from
//! the host (`VIRTIO_BALLOON_F_MUST_TELL_HOST` is not offered): a returned page simply refaults.
//! Optionally the guest reports memory statistics (stats queue) and hands over free page ranges
//! (free page reporting), which are discarded the same way.
//!
//! Queue indices follow Linux's `virtio_balloon`: inflate (0), deflate (1), then the stats queue
//! and the reporting queue only when their features are negotiated, absent ones skipped. The
//! free page hinting queue is never offered, so the device exposes exactly the queues of the
//! features it offers.

use super::transport::NoInterrupt;
use super::worker::{EventHandler, EventOps, Worker};
use super::{
    InterruptKind, Metrics, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// Virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// Feature bit number: the stats queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit number: the guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit number: free page reporting (the reporting queue exists).
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Size of a balloon page (PFNs on the inflate and deflate queues count these).
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// Queue size offered for every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most descriptor chains served per queue per wake-up; the rest are served on a later pass so
/// one queue cannot monopolise the worker.
pub const MAX_CHAINS_PER_EVENT: usize = 256;
/// Most PFN bytes read from one inflate or deflate chain (Linux sends at most 256 PFNs).
pub const MAX_PFN_BYTES: usize = 64 * 1024;
/// Most bytes read from one stats buffer.
pub const MAX_STATS_BYTES: usize = 4096;
/// Size of one stats entry (`struct virtio_balloon_stat`, packed: u16 tag, u64 value).
pub const STAT_ENTRY_SIZE: usize = 10;

const PFN_SHIFT: u32 = 12;
const CONFIG_SIZE: usize = 8;

const TIMER_TOKEN: u64 = 1;
const RESUME_TOKEN: u64 = 2;

/// How the balloon device is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target balloon size (memory the guest should give back), in bytes.
    pub target_bytes: u64,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest may take pages back under memory
    /// pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables the stats queue.
    pub stats_interval_s: u32,
    /// Offer free page reporting: the guest hands free memory ranges back to the host.
    pub free_page_reporting: bool,
}

/// The guest's last memory statistics (every field `None` until the guest reported it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Bytes swapped in (`VIRTIO_BALLOON_S_SWAP_IN`).
    pub swap_in: Option<u64>,
    /// Bytes swapped out (`VIRTIO_BALLOON_S_SWAP_OUT`).
    pub swap_out: Option<u64>,
    /// Major page faults (`VIRTIO_BALLOON_S_MAJFLT`).
    pub major_faults: Option<u64>,
    /// Minor page faults (`VIRTIO_BALLOON_S_MINFLT`).
    pub minor_faults: Option<u64>,
    /// Free memory in bytes (`VIRTIO_BALLOON_S_MEMFREE`).
    pub free_memory: Option<u64>,
    /// Total memory in bytes (`VIRTIO_BALLOON_S_MEMTOT`).
    pub total_memory: Option<u64>,
    /// Available memory in bytes, as the guest estimates it (`VIRTIO_BALLOON_S_AVAIL`).
    pub available_memory: Option<u64>,
    /// Disk caches in bytes (`VIRTIO_BALLOON_S_CACHES`).
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations (`VIRTIO_BALLOON_S_HTLB_PGALLOC`).
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations (`VIRTIO_BALLOON_S_HTLB_PGFAIL`).
    pub hugetlb_failures: Option<u64>,
    /// When the device received these statistics (`None`: never).
    pub received_at: Option<SystemTime>,
}

impl BalloonStats {
    /// Parses a stats buffer: packed little-endian `{u16 tag, u64 value}` entries. A trailing
    /// partial entry is ignored, unknown tags too.
    pub fn parse(bytes: &[u8]) -> BalloonStats {
        let mut s = BalloonStats::default();
        for e in bytes.chunks_exact(STAT_ENTRY_SIZE) {
            let (tag, val) = e.split_at(2);
            let tag = u16::from_le_bytes(<[u8; 2]>::try_from(tag).unwrap_or_default());
            let val = u64::from_le_bytes(<[u8; 8]>::try_from(val).unwrap_or_default());
            let field = match tag {
                0 => &mut s.swap_in,
                1 => &mut s.swap_out,
                2 => &mut s.major_faults,
                3 => &mut s.minor_faults,
                4 => &mut s.free_memory,
                5 => &mut s.total_memory,
                6 => &mut s.available_memory,
                7 => &mut s.disk_caches,
                8 => &mut s.hugetlb_allocations,
                9 => &mut s.hugetlb_failures,
                _ => continue,
            };
            *field = Some(val);
        }
        s
    }
}

/// Counters of one balloon device.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Pages (4 KiB) the guest gave back and the host discarded.
    pub inflated_pages: AtomicU64,
    /// Pages (4 KiB) the guest took back.
    pub deflated_pages: AtomicU64,
    /// Bytes of free memory the guest reported and the host discarded.
    pub reported_bytes: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
    /// Malformed requests (wrong buffer direction, addresses outside guest memory, broken
    /// chains) and failed discards.
    pub errors: AtomicU64,
}

impl Metrics for BalloonMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            (
                "inflated_pages",
                self.inflated_pages.load(Ordering::Relaxed),
            ),
            (
                "deflated_pages",
                self.deflated_pages.load(Ordering::Relaxed),
            ),
            (
                "reported_bytes",
                self.reported_bytes.load(Ordering::Relaxed),
            ),
            ("stats_updates", self.stats_updates.load(Ordering::Relaxed)),
            ("errors", self.errors.load(Ordering::Relaxed)),
        ]
    }
}

impl BalloonMetrics {
    fn error(&self, n: u64) {
        self.errors.fetch_add(n, Ordering::Relaxed);
    }
}

/// State shared between the device, its worker and [`BalloonControl`] handles.
#[derive(Default)]
struct Shared {
    /// Config `num_pages`: the target in 4 KiB pages.
    target_pages: AtomicU32,
    /// Config `actual`: what the driver says the balloon holds, in 4 KiB pages.
    actual_pages: AtomicU32,
    /// The interrupt while the device is active.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    stats: Mutex<BalloonStats>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("target_pages", &self.target_pages)
            .field("actual_pages", &self.actual_pages)
            .field("active", &lock(&self.interrupt).is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bytes_to_pages(bytes: u64) -> u32 {
    u32::try_from(bytes / BALLOON_PAGE_SIZE).unwrap_or(u32::MAX)
}

/// The host's handle on a balloon: set the target, read what the guest did. Cheap to clone;
/// usable from any thread, before and after the guest activates the device.
#[derive(Clone, Debug)]
pub struct BalloonControl {
    shared: Arc<Shared>,
}

impl BalloonControl {
    /// Sets the target balloon size (rounded down to 4 KiB pages, at most `u32::MAX` pages). When
    /// the device is active the driver is told through a configuration change interrupt; before
    /// that the value is simply what the driver will read.
    pub fn set_target_bytes(&self, bytes: u64) {
        self.shared
            .target_pages
            .store(bytes_to_pages(bytes), Ordering::SeqCst);
        if let Some(irq) = lock(&self.shared.interrupt).as_ref() {
            if let Err(e) = irq.trigger(InterruptKind::Config) {
                tracing::warn!("virtio-balloon interrupt: {e}");
            }
        }
    }

    /// The target in effect, in bytes (a whole number of 4 KiB pages).
    pub fn target_bytes(&self) -> u64 {
        u64::from(self.shared.target_pages.load(Ordering::SeqCst)) * BALLOON_PAGE_SIZE
    }

    /// What the guest reports the balloon holds (config field `actual`), in bytes.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.shared.actual_pages.load(Ordering::SeqCst)) * BALLOON_PAGE_SIZE
    }

    /// The guest's last statistics.
    pub fn stats(&self) -> BalloonStats {
        lock(&self.shared.stats).clone()
    }
}

/// The role of one balloon queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalloonQueue {
    /// Pages the guest gives up (device-readable arrays of u32 PFNs).
    Inflate,
    /// Pages the guest takes back.
    Deflate,
    /// The guest's statistics buffer.
    Stats,
    /// Free page ranges (device-writable buffers, one range each).
    Reporting,
}

/// The device.
pub struct Balloon {
    cfg: BalloonConfig,
    shared: Arc<Shared>,
    metrics: Arc<BalloonMetrics>,
    queue_sizes: Vec<u16>,
    worker: Option<Worker<BalloonHandler>>,
}

impl Balloon {
    /// A new, inactive device with `cfg.target_bytes` as its initial target.
    pub fn new(cfg: BalloonConfig) -> Balloon {
        let shared = Arc::new(Shared::default());
        shared
            .target_pages
            .store(bytes_to_pages(cfg.target_bytes), Ordering::SeqCst);
        let mut nq = 2;
        if cfg.stats_interval_s > 0 {
            nq += 1;
        }
        if cfg.free_page_reporting {
            nq += 1;
        }
        Balloon {
            cfg,
            shared,
            metrics: Arc::new(BalloonMetrics::default()),
            queue_sizes: vec![QUEUE_SIZE; nq],
            worker: None,
        }
    }

    /// A handle to control the balloon.
    pub fn control(&self) -> BalloonControl {
        BalloonControl {
            shared: self.shared.clone(),
        }
    }

    /// Its counters.
    pub fn balloon_metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let (n, a) = c.split_at_mut(4);
        n.copy_from_slice(
            &self
                .shared
                .target_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        a.copy_from_slice(
            &self
                .shared
                .actual_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        c
    }
}

/// The roles of the transport's queues, in index order, for the negotiated `features`.
fn queue_roles(features: u64) -> Vec<BalloonQueue> {
    let mut roles = vec![BalloonQueue::Inflate, BalloonQueue::Deflate];
    if features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(BalloonQueue::Stats);
    }
    if features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(BalloonQueue::Reporting);
    }
    roles
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1;
        if self.cfg.stats_interval_s > 0 {
            f |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
        }
        if self.cfg.deflate_on_oom {
            f |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if self.cfg.free_page_reporting {
            f |= 1 << VIRTIO_BALLOON_F_REPORTING;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            if let Some(v) = at.and_then(|o| c.get(o)) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is driver-writable; partial writes update their bytes.
        let mut c = self.config_bytes();
        let mut touched = false;
        for (i, v) in data.iter().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            if let Some(o) = at.filter(|o| (4..CONFIG_SIZE).contains(o)) {
                if let Some(b) = c.get_mut(o) {
                    *b = *v;
                    touched = true;
                }
            }
        }
        if touched {
            let (_, a) = c.split_at(4);
            let actual = u32::from_le_bytes(<[u8; 4]>::try_from(a).unwrap_or_default());
            self.shared.actual_pages.store(actual, Ordering::SeqCst);
        }
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
        let roles = queue_roles(features & self.features());
        let mut slots = Vec::with_capacity(queues.len());
        for (i, q) in queues.into_iter().enumerate() {
            let role = roles.get(i).copied();
            match role {
                Some(BalloonQueue::Inflate | BalloonQueue::Deflate) if !q.ready() => {
                    return Err(VirtioError::InvalidQueue(i))
                }
                Some(r) if q.ready() => slots.push(Some((r, q))),
                _ => slots.push(None),
            }
        }
        if slots.len() < 2 {
            return Err(VirtioError::InvalidQueue(slots.len()));
        }
        let has_stats = slots
            .iter()
            .flatten()
            .any(|(r, _)| *r == BalloonQueue::Stats);
        let stats_timer = if has_stats {
            Some(TimerFd::new().map_err(|e| VirtioError::Host(format!("stats timer: {e}")))?)
        } else {
            None
        };
        let resume = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| VirtioError::Host(format!("balloon eventfd: {e}")))?;
        let nq = slots.len();
        let handler = BalloonHandler {
            mem,
            queues: slots,
            interrupt: interrupt.clone(),
            metrics: self.metrics.clone(),
            shared: self.shared.clone(),
            stats_timer,
            stats_interval: Duration::from_secs(u64::from(self.cfg.stats_interval_s.max(1))),
            stats_held: None,
            resume: Some(resume),
        };
        *lock(&self.shared.interrupt) = Some(interrupt);
        match Worker::spawn("virtio-balloon", nq, handler) {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => {
                *lock(&self.shared.interrupt) = None;
                Err(VirtioError::Host(format!("balloon worker: {e}")))
            }
        }
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
        *lock(&self.shared.interrupt) = None;
        self.shared.actual_pages.store(0, Ordering::SeqCst);
    }

    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        Some(self.metrics.clone())
    }
}

/// The balloon's request processing, run on the device's worker thread.
pub struct BalloonHandler {
    mem: GuestMemoryMmap,
    /// By transport queue index: the role and the queue (`None`: not set up or not negotiated).
    queues: Vec<Option<(BalloonQueue, Queue)>>,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<BalloonMetrics>,
    shared: Arc<Shared>,
    stats_timer: Option<TimerFd>,
    stats_interval: Duration,
    /// The stats buffer the device holds until it wants new statistics: (queue index, head).
    stats_held: Option<(usize, u16)>,
    /// Wakes the worker again when a pass stopped at [`MAX_CHAINS_PER_EVENT`].
    resume: Option<EventFd>,
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
    for desc in chain {
        if desc.is_write_only() {
            g.bad = true;
            continue;
        }
        let room = cap.saturating_sub(g.data.len());
        let len = desc.len() as usize;
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
            .map(|buf| mem.read_slice(buf, desc.addr()).is_ok())
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
    for desc in chain {
        if !desc.is_write_only() {
            metrics.error(1);
            continue;
        }
        // Only whole pages inside the range.
        let start = desc.addr().0;
        let Some(end) = start.checked_add(u64::from(desc.len())) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{ro, wo, TestDriver, DATA, F_NEXT, F_WRITE, MEM_SIZE};
    use crate::virtio::transport::mmio::{INT_CONFIG, INT_VRING};
    use crate::BusDevice;
    use std::time::Instant;

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
}
