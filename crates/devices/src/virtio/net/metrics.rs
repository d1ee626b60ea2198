//! virtio-net's counters, read by the monitoring side while the device runs.

use crate::virtio::Metrics;
use std::sync::atomic::{AtomicU64, Ordering};

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
    pub(super) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Metrics for NetMetrics {
    fn counters(&self) -> Vec<(&'static str, u64)> {
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
