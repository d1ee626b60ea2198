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
//!
//! Layout: this file is the device (configuration space, queues, the host's
//! [`BalloonControl`]); request processing on the worker thread is in `handler.rs`, the guest's
//! statistics in `stats.rs`, the counters in `metrics.rs`.

mod handler;
mod metrics;
mod stats;
#[cfg(test)]
mod tests;

pub use handler::BalloonHandler;
pub use metrics::BalloonMetrics;
pub use stats::BalloonStats;

use super::worker::WorkerSlot;
use super::{
    InterruptKind, Metrics, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::sync::lock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
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

const CONFIG_SIZE: usize = 8;

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
    worker: WorkerSlot<BalloonHandler>,
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
            worker: WorkerSlot::default(),
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
        drop(self.worker.stop());
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
        match self.worker.start("virtio-balloon", nq, handler) {
            Ok(()) => Ok(()),
            Err(e) => {
                *lock(&self.shared.interrupt) = None;
                Err(VirtioError::Host(format!("balloon worker: {e}")))
            }
        }
    }

    fn queue_notify(&mut self, index: usize) {
        self.worker.notify(index);
    }

    fn reset(&mut self) {
        drop(self.worker.stop());
        *lock(&self.shared.interrupt) = None;
        self.shared.actual_pages.store(0, Ordering::SeqCst);
    }

    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        Some(self.metrics.clone())
    }
}
