//! virtio-balloon's counters, read by the monitoring side while the device runs.

use crate::virtio::Metrics;
use std::sync::atomic::{AtomicU64, Ordering};

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
    fn counters(&self) -> Vec<(&'static str, u64)> {
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
    pub(super) fn error(&self, n: u64) {
        self.errors.fetch_add(n, Ordering::Relaxed);
    }
}
