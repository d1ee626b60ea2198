//! virtio-console (virtio 1.x §5.3) with a single port (no multiport): the guest's `/dev/hvc0`.
//!
//! Guest output (transmitq) goes to a [`ConsoleBackend`]: nowhere, a file, or the client of a
//! listening Unix socket. Input from that client goes into the guest's receiveq buffers; when the
//! guest has none, the device stops reading the socket until it adds some. The socket is a
//! [`SocketConsole`](crate::console_socket::SocketConsole), as COM1's: one client at a time, a
//! new client first gets the last [`SCROLLBACK`] bytes of output, output never blocks and a
//! client that stops reading is hung up on (see [`crate::console_socket`]). The backend (file,
//! listener, connected client, scrollback) lives as long as the device, so a guest reboot
//! (device reset) does not drop the client.
//!
//! Layout: this file is the device (backend set-up, configuration space, activation); the
//! queue processing and the socket's events on the worker thread are in `handler.rs`, the
//! backends' output side in `sink.rs`, the counters in `metrics.rs`.

mod handler;
mod metrics;
mod sink;
#[cfg(test)]
mod tests;

pub use handler::{process_receive, process_transmit};
pub use metrics::ConsoleMetrics;

use super::worker::WorkerSlot;
use super::{Metrics, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::console_socket::{self, SocketConsole};
use handler::ConsoleHandler;
use sink::{Sink, SocketSink};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// Virtio device ID of a console.
pub const VIRTIO_ID_CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
/// Feature bit number: `cols` and `rows` in the config space are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Console width reported to the guest.
pub const COLS: u16 = 80;
/// Console height reported to the guest.
pub const ROWS: u16 = 25;
/// Queue size offered (both queues).
pub const QUEUE_SIZE: u16 = 256;
/// Output kept for (and replayed to) a newly connected socket client.
pub const SCROLLBACK: usize = console_socket::BACKLOG;
/// Most output buffered for a slow socket client; older output beyond it is dropped.
pub const MAX_PENDING_OUTPUT: usize = console_socket::MAX_PENDING;
/// Most input read from the socket client before the guest has taken it.
pub const INPUT_CHUNK: usize = 4096;
/// Most chains served per queue per wake-up (the rest on a later pass).
pub const MAX_CHAINS_PER_EVENT: usize = 256;
/// Most output bytes taken from one transmit chain; the rest is dropped as malformed.
pub const MAX_TX_CHAIN: usize = 1 << 20;

const RX: usize = 0;
const TX: usize = 1;

/// Where the console's output goes and its input comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// Output discarded, no input.
    Null,
    /// Output appended to this file (created if missing); no input.
    File(PathBuf),
    /// A Unix socket created (and listened on) at this path, which must not exist; one client
    /// at a time, bidirectional. The socket file is removed when the device is dropped.
    Socket(PathBuf),
}

/// Why a console backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file could not be opened or created.
    #[error("console output file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Something already exists at the socket path.
    #[error("console socket {}: the path already exists", path.display())]
    SocketExists {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket could not be created or bound.
    #[error("console socket {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Removes the socket file the device created when it goes away.
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!("console socket {}: remove: {e}", self.0.display());
        }
    }
}

/// The device.
pub struct Console {
    sink: Arc<Mutex<Sink>>,
    metrics: Arc<ConsoleMetrics>,
    worker: WorkerSlot<ConsoleHandler>,
    // Dropped after the worker (fields drop in declaration order).
    _socket_path: Option<SocketPath>,
}

impl Console {
    /// A new, inactive console writing to (and reading from) `backend`. A socket backend is
    /// bound and listening when this returns.
    pub fn new(backend: ConsoleBackend) -> Result<Console, ConsoleError> {
        let mut socket_path = None;
        let sink = match backend {
            ConsoleBackend::Null => Sink::Null,
            ConsoleBackend::File(path) => {
                match File::options().create(true).append(true).open(&path) {
                    Ok(f) => Sink::File(f),
                    Err(source) => return Err(ConsoleError::File { path, source }),
                }
            }
            ConsoleBackend::Socket(path) => {
                let console = bind(&path)?;
                socket_path = Some(SocketPath(path));
                Sink::Socket(SocketSink {
                    console,
                    pending_in: Vec::new(),
                })
            }
        };
        Ok(Console {
            sink: Arc::new(Mutex::new(sink)),
            metrics: Arc::new(ConsoleMetrics::default()),
            worker: WorkerSlot::default(),
            _socket_path: socket_path,
        })
    }

    /// Its counters.
    pub fn console_metrics(&self) -> Arc<ConsoleMetrics> {
        self.metrics.clone()
    }
}

fn bind(path: &Path) -> Result<SocketConsole, ConsoleError> {
    if path.symlink_metadata().is_ok() {
        return Err(ConsoleError::SocketExists {
            path: path.to_path_buf(),
        });
    }
    SocketConsole::bind(path).map_err(|source| ConsoleError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_CONSOLE_F_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config { u16 cols; u16 rows; u32 max_nr_ports; u32 emerg_wr; }
        let mut c = [0u8; 12];
        let (cols, rest) = c.split_at_mut(2);
        cols.copy_from_slice(&COLS.to_le_bytes());
        if let Some(rows) = rest.get_mut(..2) {
            rows.copy_from_slice(&ROWS.to_le_bytes());
        }
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            if let Some(v) = at.and_then(|o| c.get(o)) {
                *b = *v;
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        drop(self.worker.stop());
        let [rx, tx] = super::ready_queues::<2>(queues)?;
        let resume = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| VirtioError::Host(format!("console eventfd: {e}")))?;
        let handler = ConsoleHandler {
            mem,
            rx,
            tx,
            interrupt,
            metrics: self.metrics.clone(),
            sink: self.sink.clone(),
            resume,
            listener_watched: false,
            client_watched: None,
            stall_timer: TimerFd::new()
                .map_err(|e| VirtioError::Host(format!("console stall timer: {e}")))?,
            stall_armed: false,
        };
        self.worker
            .start("virtio-console", 2, handler)
            .map_err(|e| VirtioError::Host(format!("console worker: {e}")))
    }

    fn queue_notify(&mut self, index: usize) {
        self.worker.notify(index);
    }

    fn reset(&mut self) {
        drop(self.worker.stop());
    }

    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        Some(self.metrics.clone())
    }
}
