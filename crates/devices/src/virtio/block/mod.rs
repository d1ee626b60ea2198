//! virtio-blk (virtio 1.x §5.2): a raw disk image — regular file or block device — as a
//! virtio block device.
//!
//! Requests are served on the device's own [`Worker`] thread, never on a vCPU thread. Reads,
//! writes and flushes go through io_uring when the kernel offers it (several in flight,
//! completed in any order, completions signalled on an eventfd in the worker's epoll), else
//! through `preadv`/`pwritev`/`fdatasync` on the worker thread. Either way the kernel copies
//! straight between the image and guest memory. Discard and write-zeroes (`fallocate`, or the
//! block device ioctls) run synchronously on the worker.
//!
//! A flush completes only once `fdatasync` has returned: a guest `fsync` reaches the host disk.
//!
//! The io_uring ring is created, restricted and enabled in [`Block::new`], before the sandbox
//! goes up (the seccomp filter forbids `io_uring_setup` and `io_uring_register` afterwards). The
//! device keeps that ring for its whole life: an activation lends it to the worker, a reset takes
//! it back once the worker has waited for every operation in flight.

mod disk;
mod engine;
mod handler;
mod request;
#[cfg(test)]
mod tests;

pub use handler::RequestProcessor;

use super::worker::WorkerSlot;
use super::{Metrics, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::rate_limiter::{RateLimit, RateLimiter};
use disk::Disk;
use engine::Uring;
use handler::{BlockWorker, Core, Engine};
use request::Limits;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered (the single request queue).
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol, and the block size reported.
pub const SECTOR_SIZE: u64 = 512;
/// Data buffers per request advertised in `seg_max` (a chain also has header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest discard or write-zeroes segment, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most segments in one discard request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Discard granularity reported to the driver, in sectors (4 KiB).
pub const DISCARD_ALIGNMENT: u32 = 8;
/// Size of the configuration space served (through `write_zeroes_may_unmap` and padding).
const CONFIG_LEN: usize = 60;

/// Which I/O engine serves reads, writes and flushes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring when the kernel has it (and lets the process use it), else [`IoEngine::Sync`].
    #[default]
    Auto,
    /// io_uring: several requests in flight, completed in any order.
    Uring,
    /// Synchronous `preadv`/`pwritev`/`fdatasync` on the device's worker thread.
    Sync,
}

/// How to build a block device.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// The image: a regular file or a block device, raw format.
    pub path: PathBuf,
    /// Opened read-only; the guest sees a read-only disk and its writes fail.
    pub readonly: bool,
    /// The serial returned to GET_ID (at most 20 bytes); default "fv-" and a hash of the
    /// image's device and inode numbers, stable across runs.
    pub id: Option<String>,
    /// Operations and bytes per second.
    pub rate: RateLimit,
    /// The I/O engine.
    pub engine: IoEngine,
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image does not exist.
    #[error("disk image {}: no such file", path.display())]
    NotFound {
        /// The image path.
        path: PathBuf,
    },
    /// The image is a directory, socket, FIFO, character device….
    #[error("disk image {}: not a regular file or block device", path.display())]
    NotADisk {
        /// The image path.
        path: PathBuf,
    },
    /// The image may not be opened the way asked.
    #[error("disk image {}: permission denied (opening it for {access}; use readonly=on for a read-only disk)", path.display())]
    PermissionDenied {
        /// The image path.
        path: PathBuf,
        /// "reading" or "read-write".
        access: &'static str,
    },
    /// The serial is longer than virtio-blk's 20 bytes.
    #[error("disk image {}: id is {len} bytes, at most 20 are allowed", path.display())]
    IdTooLong {
        /// The image path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// io_uring was asked for and the kernel does not provide it, forbids it, or cannot restrict
    /// the ring.
    #[error("disk image {}: io_uring is not available ({source}); use the sync or auto I/O engine", path.display())]
    IoUring {
        /// The image path.
        path: PathBuf,
        /// The setup error.
        source: std::io::Error,
    },
    /// Any other failure opening or examining the image.
    #[error("disk image {}: {source}", path.display())]
    Io {
        /// The image path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Counters of one block device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Read requests completed (successfully or not).
    pub read_requests: AtomicU64,
    /// Write requests completed.
    pub write_requests: AtomicU64,
    /// Flush requests completed.
    pub flush_requests: AtomicU64,
    /// Discard requests completed.
    pub discard_requests: AtomicU64,
    /// Write-zeroes requests completed.
    pub write_zeroes_requests: AtomicU64,
    /// Bytes read successfully.
    pub read_bytes: AtomicU64,
    /// Bytes written successfully.
    pub write_bytes: AtomicU64,
    /// Requests that did not complete with VIRTIO_BLK_S_OK (malformed, refused, failed I/O).
    pub errors: AtomicU64,
    /// Times the rate limiter held a request back.
    pub rate_limited: AtomicU64,
    /// Requests being executed now.
    pub inflight: AtomicU64,
}

impl Metrics for BlockMetrics {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("read_requests", g(&self.read_requests)),
            ("write_requests", g(&self.write_requests)),
            ("flush_requests", g(&self.flush_requests)),
            ("discard_requests", g(&self.discard_requests)),
            ("write_zeroes_requests", g(&self.write_zeroes_requests)),
            ("read_bytes", g(&self.read_bytes)),
            ("write_bytes", g(&self.write_bytes)),
            ("errors", g(&self.errors)),
            ("rate_limited", g(&self.rate_limited)),
            ("inflight", g(&self.inflight)),
        ]
    }
}

fn limits(disk: &Disk) -> Limits {
    Limits {
        sectors: disk.sectors,
        readonly: disk.readonly,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        max_discard_seg: MAX_DISCARD_SEG,
        max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        max_write_zeroes_seg: 1,
    }
}

/// The virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    config: [u8; CONFIG_LEN],
    features: u64,
    rate: RateLimit,
    engine: IoEngine,
    /// The restricted ring while the device is not activated (the worker has it while it
    /// runs); always None with the sync engine.
    ring: Option<Box<Uring>>,
    metrics: Arc<BlockMetrics>,
    worker: WorkerSlot<BlockWorker>,
}

impl Block {
    /// Opens the image and builds an inactive device, with its io_uring ring (restricted to
    /// this image) unless the engine is [`IoEngine::Sync`]. Call it before the sandbox goes up.
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        let disk = Disk::open(&cfg)?;
        let ring = match cfg.engine {
            IoEngine::Sync => None,
            IoEngine::Auto | IoEngine::Uring => {
                match Uring::new(disk.fd(), u32::from(QUEUE_SIZE), !disk.readonly) {
                    Ok(u) => Some(Box::new(u)),
                    Err(e) if cfg.engine == IoEngine::Auto => {
                        tracing::info!(
                            "disk image {}: io_uring unavailable ({e}); synchronous I/O",
                            cfg.path.display()
                        );
                        None
                    }
                    Err(source) => {
                        return Err(BlockError::IoUring {
                            path: cfg.path,
                            source,
                        })
                    }
                }
            }
        };
        let engine = if ring.is_some() {
            IoEngine::Uring
        } else {
            IoEngine::Sync
        };
        let lim = limits(&disk);
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| {
            if let Some(d) = config.get_mut(off..off + bytes.len()) {
                d.copy_from_slice(bytes);
            }
        };
        put(0, &disk.sectors.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        if disk.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            put(36, &lim.max_discard_sectors.to_le_bytes());
            put(40, &lim.max_discard_seg.to_le_bytes());
            put(44, &DISCARD_ALIGNMENT.to_le_bytes());
            put(48, &lim.max_write_zeroes_sectors.to_le_bytes());
            put(52, &lim.max_write_zeroes_seg.to_le_bytes());
            put(56, &[1]); // write_zeroes_may_unmap
        }
        Ok(Block {
            disk: Arc::new(disk),
            config,
            features,
            rate: cfg.rate,
            engine,
            ring,
            metrics: Arc::new(BlockMetrics::default()),
            worker: WorkerSlot::default(),
        })
    }

    /// The engine serving I/O: [`IoEngine::Uring`] or [`IoEngine::Sync`] (never `Auto`). It
    /// falls back to `Sync` for good if the ring is lost: a reset that could not wait for the
    /// ring's operations, or a worker that failed to start or panicked.
    pub fn engine_in_use(&self) -> IoEngine {
        self.engine
    }

    /// Goes on with synchronous I/O after losing the ring (`why`): a new one cannot be created
    /// once the sandbox is up.
    fn ring_lost(&mut self, why: &str) {
        tracing::warn!(
            "disk image {}: io_uring ring lost ({why}); synchronous I/O from now on",
            self.disk.path.display()
        );
        self.engine = IoEngine::Sync;
    }

    /// Its counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only (no CONFIG_WCE).
        tracing::debug!(offset, len = data.len(), "virtio-blk config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        // A second activation without reset: stop the old worker first.
        self.reset();
        let [mut queue] = super::ready_queues::<1>(queues)?;
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let limiter = RateLimiter::new(self.rate)
            .map_err(|e| VirtioError::Host(format!("rate limiter: {e}")))?;
        let core = Core {
            disk: self.disk.clone(),
            limits: limits(&self.disk),
            metrics: self.metrics.clone(),
        };
        let mut handler = BlockWorker::new(core, mem, queue, interrupt, limiter)
            .map_err(|e| VirtioError::Host(format!("virtio-blk: {e}")))?;
        // Everything that can fail before the thread starts has: lend the worker the ring.
        if let Some(u) = self.ring.take() {
            handler.engine = Engine::Uring(u);
        }
        if let Err(e) = self.worker.start("fv-blk", 1, handler) {
            // The handler, and the ring with it, went with the thread that did not start.
            if self.engine == IoEngine::Uring {
                self.ring_lost("the worker thread did not start");
            }
            return Err(VirtioError::Host(format!("virtio-blk worker: {e}")));
        }
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        self.worker.notify(index);
    }

    fn reset(&mut self) {
        // Joins the thread and drops its state (queue, guest memory) once in-flight I/O is done;
        // the ring comes back for the next activation.
        let stopped = self.worker.stop();
        if self.engine == IoEngine::Uring && self.ring.is_none() {
            match stopped {
                Some(w) => match w.into_ring() {
                    Some(u) => self.ring = Some(u),
                    None => self.ring_lost("operations still in flight at reset"),
                },
                // The worker ran with the ring and panicked (the panic is logged).
                None => self.ring_lost("the worker panicked"),
            }
        }
        self.metrics.inflight.store(0, Ordering::Relaxed);
    }

    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        Some(self.metrics.clone())
    }
}
