//! virtio-vsock (virtio 1.x §5.10), stream sockets, with Firecracker's hybrid Unix socket
//! backend: the host side of every guest connection is a Unix stream socket.
//!
//! - The device listens on `socket`. A host process connects there and writes
//!   `CONNECT <port>\n`; the guest gets a connection request to `port`; once the guest accepts,
//!   the host process reads `OK <host port>\n` and the stream carries the connection's bytes.
//!   If nothing listens in the guest the Unix stream is closed.
//! - A guest connect to (CID 2, port P) connects the Unix socket `<socket>_P`; it succeeds or
//!   is refused as that connect does.
//!
//! Flow control is the virtio credit scheme in both directions: the guest is never sent more
//! than its advertised buffer allows, and we advertise [`CONN_BUF_ALLOC`] bytes per connection
//! for data the host socket has not taken yet.

mod connection;
pub mod muxer;
pub mod packet;

pub use connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use muxer::Muxer;

use super::worker::{EventHandler, EventOps, WorkerSlot};
use super::{InterruptKind, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use muxer::{Limits, TOKEN_KICK, TOKEN_LISTENER, TOKEN_TIMER};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// Virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// Feature bit: stream sockets (virtio 1.2; older drivers do not know it and leave it off).
pub const VIRTIO_VSOCK_F_STREAM: u64 = 1 << 0;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue index: device → driver packets.
pub const RX_QUEUE: usize = 0;
/// Queue index: driver → device packets.
pub const TX_QUEUE: usize = 1;
/// Queue index: device events (buffers are kept, no event is sent).
pub const EVENT_QUEUE: usize = 2;
/// Longest socket path (`sun_path` holds 108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How the device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 ..= 0xfffffffe).
    pub cid: u64,
    /// Host Unix socket the device listens on; guest connections to port P go to
    /// `<socket>_P`.
    pub socket: PathBuf,
}

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or out of range.
    #[error(
        "vsock guest CID {0} is invalid: it must be at least 3 and below 4294967295 \
         (0xffffffff is reserved)"
    )]
    InvalidCid(u64),
    /// The socket path does not fit a `sockaddr_un`.
    #[error("vsock socket path {} is too long: {len} bytes, a Unix socket path holds at most {max}", path.display())]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The most that fits.
        max: usize,
    },
    /// Something already exists at the socket path.
    #[error(
        "vsock socket path {} already exists; remove it first (a file the VMM did not \
         create is never deleted)",
        .0.display()
    )]
    SocketExists(PathBuf),
    /// The socket path's directory does not exist.
    #[error("the directory of vsock socket path {} does not exist", .0.display())]
    ParentMissing(PathBuf),
    /// Binding the socket failed (permissions, read-only file system, …).
    #[error("cannot bind vsock socket {}: {source}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// What bind(2) said.
        source: io::Error,
    },
}

/// Counters of one vsock device.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Connections set up (either direction, handshake started).
    pub conns_opened: AtomicU64,
    /// Connections ended.
    pub conns_closed: AtomicU64,
    /// Packets the guest sent (tx queue).
    pub tx_packets: AtomicU64,
    /// Packets delivered to the guest (rx queue).
    pub rx_packets: AtomicU64,
    /// Payload bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// RST packets delivered to the guest.
    pub rst_sent: AtomicU64,
    /// Malformed packets or buffers, protocol violations, rejected host handshakes.
    pub errors: AtomicU64,
}

impl super::Metrics for VsockMetrics {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("conns_opened", l(&self.conns_opened)),
            ("conns_closed", l(&self.conns_closed)),
            ("tx_packets", l(&self.tx_packets)),
            ("rx_packets", l(&self.rx_packets)),
            ("tx_bytes", l(&self.tx_bytes)),
            ("rx_bytes", l(&self.rx_bytes)),
            ("rst_sent", l(&self.rst_sent)),
            ("errors", l(&self.errors)),
        ]
    }
}

/// The device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we created, to remove only that on drop.
    ident: Option<(u64, u64)>,
    worker: WorkerSlot<Handler>,
    metrics: Arc<VsockMetrics>,
    limits: Limits,
}

impl Vsock {
    /// Validates `cfg` and binds the host listening socket at `cfg.socket` right away.
    pub fn new(cfg: VsockConfig) -> Result<Vsock, VsockError> {
        if cfg.cid < 3 || cfg.cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cfg.cid));
        }
        let path = cfg.socket;
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(VsockError::PathTooLong {
                path,
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        if path.symlink_metadata().is_ok() {
            return Err(VsockError::SocketExists(path));
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(VsockError::ParentMissing(path));
        }
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(VsockError::SocketExists(path))
            }
            Err(source) => return Err(VsockError::Bind { path, source }),
        };
        let ident = path.symlink_metadata().ok().map(|m| (m.dev(), m.ino()));
        if let Err(source) = listener.set_nonblocking(true) {
            let v = Vsock::assemble(cfg.cid, path.clone(), listener, ident);
            drop(v); // removes the socket again
            return Err(VsockError::Bind { path, source });
        }
        Ok(Vsock::assemble(cfg.cid, path, listener, ident))
    }

    fn assemble(
        cid: u64,
        path: PathBuf,
        listener: UnixListener,
        ident: Option<(u64, u64)>,
    ) -> Vsock {
        Vsock {
            cid,
            path,
            listener,
            ident,
            worker: WorkerSlot::default(),
            metrics: Arc::new(VsockMetrics::default()),
            limits: Limits::default(),
        }
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The listening socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Its counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    #[cfg(test)]
    pub(crate) fn set_limits(&mut self, max_connections: usize, timeout: Duration) {
        self.limits.max_connections = max_connections;
        self.limits.timeout = timeout;
    }

    fn stop(&mut self) {
        drop(self.worker.stop());
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
        // Remove the socket only if it is still the file we created.
        let same = self
            .path
            .symlink_metadata()
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if same.is_some() && same == self.ident {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("vsock: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// The device's worker-thread side.
struct Handler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// Kept so the driver's event buffers stay with the device; no event is sent.
    _event: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    muxer: Muxer,
    timer: TimerFd,
    armed: Option<Instant>,
    kick: EventFd,
}

impl Handler {
    /// Moves packets both ways until nothing more can be done now.
    fn pump(&mut self, ops: &mut EventOps) {
        let (mut rx_used, mut tx_used, mut more) = (0, 0, false);
        for round in 0.. {
            let (n, m) = self.muxer.process_rx(&self.mem, &mut self.rx, ops);
            rx_used += n;
            more |= m;
            let (n, m) = self.muxer.process_tx(&self.mem, &mut self.tx, ops);
            tx_used += n;
            more |= m;
            if n == 0 {
                break;
            }
            if round == 3 {
                more = true;
                break;
            }
        }
        let (n, m) = self.muxer.process_rx(&self.mem, &mut self.rx, ops);
        rx_used += n;
        more |= m;
        let rx_signal = rx_used > 0 && self.rx.needs_notification(&self.mem).unwrap_or(true);
        let tx_signal = tx_used > 0 && self.tx.needs_notification(&self.mem).unwrap_or(true);
        for (q, signal) in [(RX_QUEUE, rx_signal), (TX_QUEUE, tx_signal)] {
            if signal {
                if let Err(e) = self.interrupt.trigger(InterruptKind::queue(q)) {
                    tracing::warn!("vsock interrupt: {e}");
                }
            }
        }
        if more {
            // Budget used up: come back after the other events.
            let _ = self.kick.write(1);
        }
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let next = self.muxer.next_deadline();
        if next == self.armed {
            return;
        }
        match next {
            Some(d) => {
                let dur = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                if self.timer.reset(dur, None).is_ok() {
                    self.armed = Some(d);
                }
            }
            None => {
                let _ = self.timer.clear();
                self.armed = None;
            }
        }
    }
}

impl EventHandler for Handler {
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        if let Some(fd) = self.muxer.listener_fd() {
            ops.add(fd, TOKEN_LISTENER, EventSet::IN)?;
        }
        ops.add(self.timer.as_raw_fd(), TOKEN_TIMER, EventSet::IN)?;
        ops.add(self.kick.as_raw_fd(), TOKEN_KICK, EventSet::IN)?;
        self.pump(ops);
        Ok(())
    }

    fn queue_event(&mut self, _queue: usize, ops: &mut EventOps) {
        self.pump(ops);
    }

    fn host_event(&mut self, token: u64, events: EventSet, ops: &mut EventOps) {
        match token {
            TOKEN_TIMER => {
                // Re-setting the timer consumes its expiry (no read that could block).
                let _ = self.timer.clear();
                self.armed = None;
                self.muxer.sweep(Instant::now(), ops);
            }
            TOKEN_KICK => {
                let _ = self.kick.read();
            }
            _ => self.muxer.host_event(token, events, ops),
        }
        self.pump(ops);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_VSOCK_F_STREAM
    }

    /// `guest_cid`, a little-endian u64 at offset 0 (read-only).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        self.stop();
        if queues.len() != 3 {
            return Err(VirtioError::InvalidQueue(queues.len().min(3)));
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(VirtioError::InvalidQueue(i));
        }
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (it.next(), it.next(), it.next()) else {
            return Err(VirtioError::InvalidQueue(0));
        };
        let host = |e: io::Error| VirtioError::Host(format!("vsock: {e}"));
        let listener = self.listener.try_clone().map_err(host)?;
        let muxer = Muxer::new(self.cid, self.path.clone(), self.metrics.clone())
            .with_listener(listener, self.limits);
        let handler = Handler {
            mem,
            rx,
            tx,
            _event: event,
            interrupt,
            muxer,
            timer: TimerFd::new().map_err(|e| host(io::Error::from(e)))?,
            armed: None,
            kick: EventFd::new(EFD_NONBLOCK).map_err(host)?,
        };
        self.worker.start("vsock", 3, handler).map_err(host)
    }

    fn queue_notify(&mut self, index: usize) {
        self.worker.notify(index);
    }

    fn reset(&mut self) {
        // Ends every connection (the muxer owns their sockets); the listener stays.
        self.stop();
    }

    fn metrics(&self) -> Option<Arc<dyn super::Metrics>> {
        Some(self.metrics.clone())
    }
}

#[cfg(test)]
mod tests;
