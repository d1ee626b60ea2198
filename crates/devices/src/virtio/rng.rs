//! virtio-rng: an entropy source fed from the host's `getrandom`.

use super::chain::{Direction, Rules, Walker};
use super::{InterruptKind, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

/// Virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request (bounds the work one notification can cause).
pub const MAX_REQUEST: usize = 64 * 1024;

/// Counters of one rng device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Bytes of entropy delivered.
    pub bytes: AtomicU64,
    /// Malformed requests (no writable buffer, memory outside the guest, broken chains).
    pub errors: AtomicU64,
}

impl super::Metrics for RngMetrics {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("requests", self.requests.load(Ordering::Relaxed)),
            ("bytes", self.bytes.load(Ordering::Relaxed)),
            ("errors", self.errors.load(Ordering::Relaxed)),
        ]
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The device.
pub struct Rng {
    active: Option<Active>,
    metrics: Arc<RngMetrics>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Rng {
            active: None,
            metrics: Arc::new(RngMetrics::default()),
        }
    }

    /// Its counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Serves every available request; returns how many were completed.
    fn process(&mut self) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        let mut done = 0;
        let mut buf = vec![0u8; 4096];
        while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            let mut bad = false;
            let mut writable = 0;
            for item in Walker::new(chain, Rules::direction(Direction::Write)) {
                // Device-readable buffers have nothing to fill.
                let Ok(region) = item else {
                    continue;
                };
                writable += 1;
                let mut left = (region.len as usize).min(MAX_REQUEST - written as usize);
                let mut addr = region.addr;
                while left > 0 {
                    let n = left.min(buf.len());
                    if fill_random(&mut buf[..n]).is_err() {
                        bad = true;
                        break;
                    }
                    if a.mem.write_slice(&buf[..n], addr).is_err() {
                        bad = true;
                        break;
                    }
                    written += n as u32;
                    left -= n;
                    addr = match addr.0.checked_add(n as u64) {
                        Some(x) => vm_memory::GuestAddress(x),
                        None => {
                            bad = true;
                            break;
                        }
                    };
                }
                if bad || written as usize >= MAX_REQUEST {
                    break;
                }
            }
            if bad || writable == 0 {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
            if a.queue.add_used(&a.mem, head, written).is_err() {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            self.metrics.requests.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .bytes
                .fetch_add(u64::from(written), Ordering::Relaxed);
            done += 1;
        }
        if done > 0 && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            if let Err(e) = a.interrupt.trigger(InterruptKind::Queue(0)) {
                tracing::warn!("virtio-rng interrupt: {e}");
            }
        }
        done
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the valid buffer slice given.
        let r = unsafe { libc::getrandom(buf[off..].as_mut_ptr().cast(), buf.len() - off, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += r as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        let [queue] = super::ready_queues::<1>(queues)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, _index: usize) {
        self.process();
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn metrics(&self) -> Option<Arc<dyn super::Metrics>> {
        Some(self.metrics.clone())
    }
}
