//! virtio-console's counters, read by the monitoring side while the device runs.

use crate::virtio::Metrics;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one console device.
#[derive(Debug, Default)]
pub struct ConsoleMetrics {
    /// Output bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// Input bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Malformed chains (wrong buffer direction, memory outside the guest) and backend errors.
    pub errors: AtomicU64,
    /// Output bytes dropped because a socket client did not keep up.
    pub dropped_bytes: AtomicU64,
}

impl Metrics for ConsoleMetrics {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("tx_bytes", self.tx_bytes.load(Ordering::Relaxed)),
            ("rx_bytes", self.rx_bytes.load(Ordering::Relaxed)),
            ("errors", self.errors.load(Ordering::Relaxed)),
            ("dropped_bytes", self.dropped_bytes.load(Ordering::Relaxed)),
        ]
    }
}

impl ConsoleMetrics {
    pub(super) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}
