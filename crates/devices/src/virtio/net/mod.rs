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
//!
//! Layout: this file is the device (configuration, feature negotiation, activation); the data
//! path on the worker thread is in `handler.rs`, the counters in `metrics.rs`.

mod handler;
mod metrics;
#[cfg(test)]
mod tests;

pub use handler::{NetHandler, RxStatus, TxStatus};
pub use metrics::NetMetrics;

use super::worker::WorkerSlot;
use super::{Metrics, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::rate_limiter::RateLimit;
use crate::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

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

/// The network card.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    tap_name: String,
    id: Option<String>,
    mac: [u8; 6],
    rate: RateLimit,
    metrics: Arc<NetMetrics>,
    worker: WorkerSlot<NetHandler>,
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
            worker: WorkerSlot::default(),
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
        drop(self.worker.stop());
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
        self.worker
            .start(&name, 2, handler)
            .map_err(|e| VirtioError::Host(format!("TAP {}: worker thread: {e}", self.tap_name)))
    }

    fn queue_notify(&mut self, index: usize) {
        self.worker.notify(index);
    }

    fn reset(&mut self) {
        drop(self.worker.stop());
        // Until the next driver says what it accepts, the kernel hands over no offloaded frames.
        if let Err(e) = self.backend.set_offload(0) {
            tracing::warn!("TAP {}: clearing offloads at reset: {e}", self.tap_name);
        }
    }

    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        Some(self.metrics.clone())
    }
}
