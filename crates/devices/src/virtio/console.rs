//! virtio-console (virtio 1.x §5.3) with a single port (no multiport): the guest's `/dev/hvc0`.
//!
//! Guest output (transmitq) goes to a [`ConsoleBackend`]: nowhere, a file, or the client of a
//! listening Unix socket. Input from that client goes into the guest's receiveq buffers; when the
//! guest has none, the device stops reading the socket until it adds some. The socket serves one
//! client at a time (others wait in the listen backlog); a new client first gets the last
//! [`SCROLLBACK`] bytes of output. The backend (file, listener, connected client, scrollback)
//! lives as long as the device, so a guest reboot (device reset) does not drop the client.

use super::worker::{EventHandler, EventOps, Worker};
use super::{
    InterruptKind, Metrics, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
pub const SCROLLBACK: usize = 64 * 1024;
/// Most output buffered for a slow socket client; older output beyond it is dropped.
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// Most input read from the socket client before the guest has taken it.
pub const INPUT_CHUNK: usize = 4096;
/// Most chains served per queue per wake-up (the rest on a later pass).
pub const MAX_CHAINS_PER_EVENT: usize = 256;
/// Most output bytes taken from one transmit chain; the rest is dropped as malformed.
pub const MAX_TX_CHAIN: usize = 1 << 20;

const RX: usize = 0;
const TX: usize = 1;

const LISTENER_TOKEN: u64 = 1;
const CLIENT_TOKEN: u64 = 2;
const RESUME_TOKEN: u64 = 3;

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
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("tx_bytes", self.tx_bytes.load(Ordering::Relaxed)),
            ("rx_bytes", self.rx_bytes.load(Ordering::Relaxed)),
            ("errors", self.errors.load(Ordering::Relaxed)),
            ("dropped_bytes", self.dropped_bytes.load(Ordering::Relaxed)),
        ]
    }
}

impl ConsoleMetrics {
    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Appends `data` to `q`, keeping at most `cap` bytes (the newest); returns how many were dropped.
fn push_bounded(q: &mut VecDeque<u8>, data: &[u8], cap: usize) -> usize {
    let data = data.get(data.len().saturating_sub(cap)..).unwrap_or(data);
    let mut dropped = 0;
    let over = (q.len() + data.len()).saturating_sub(cap);
    if over > 0 {
        q.drain(..over.min(q.len()));
        dropped = over;
    }
    q.extend(data);
    dropped
}

/// The socket side of the console.
struct SocketSink {
    listener: UnixListener,
    client: Option<UnixStream>,
    /// The last output, replayed to a new client.
    history: VecDeque<u8>,
    /// Output not yet written to the client.
    pending_out: VecDeque<u8>,
    /// Input read from the client, not yet in guest buffers.
    pending_in: Vec<u8>,
}

impl SocketSink {
    fn disconnect(&mut self) {
        if self.client.take().is_some() {
            tracing::debug!("console client disconnected");
        }
        self.pending_out.clear();
    }

    /// Writes as much pending output as the client takes without blocking.
    fn flush(&mut self, metrics: &ConsoleMetrics) {
        while let Some(client) = &self.client {
            let (chunk, _) = self.pending_out.as_slices();
            if chunk.is_empty() {
                return;
            }
            // SAFETY: send reads at most `chunk.len()` bytes from the valid slice `chunk`;
            // MSG_NOSIGNAL turns a closed peer into EPIPE instead of a process-wide SIGPIPE.
            let r = unsafe {
                libc::send(
                    client.as_raw_fd(),
                    chunk.as_ptr().cast(),
                    chunk.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ => {
                        tracing::debug!("console client write: {e}");
                        if e.kind() != io::ErrorKind::BrokenPipe {
                            metrics.error();
                        }
                        self.disconnect();
                        return;
                    }
                }
            }
            self.pending_out
                .drain(..(r as usize).min(self.pending_out.len()));
        }
    }
}

enum Sink {
    Null,
    File(File),
    Socket(SocketSink),
}

impl Sink {
    fn output(&mut self, data: &[u8], metrics: &ConsoleMetrics) {
        match self {
            Sink::Null => {}
            Sink::File(f) => {
                if let Err(e) = f.write_all(data) {
                    tracing::debug!("console output file: {e}");
                    metrics.error();
                }
            }
            Sink::Socket(s) => {
                push_bounded(&mut s.history, data, SCROLLBACK);
                if s.client.is_some() {
                    let dropped = push_bounded(&mut s.pending_out, data, MAX_PENDING_OUTPUT);
                    metrics
                        .dropped_bytes
                        .fetch_add(dropped as u64, Ordering::Relaxed);
                }
            }
        }
    }
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
    worker: Option<Worker<ConsoleHandler>>,
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
                let listener = bind(&path)?;
                socket_path = Some(SocketPath(path));
                Sink::Socket(SocketSink {
                    listener,
                    client: None,
                    history: VecDeque::new(),
                    pending_out: VecDeque::new(),
                    pending_in: Vec::new(),
                })
            }
        };
        Ok(Console {
            sink: Arc::new(Mutex::new(sink)),
            metrics: Arc::new(ConsoleMetrics::default()),
            worker: None,
            _socket_path: socket_path,
        })
    }

    /// Its counters.
    pub fn console_metrics(&self) -> Arc<ConsoleMetrics> {
        self.metrics.clone()
    }
}

fn bind(path: &Path) -> Result<UnixListener, ConsoleError> {
    if path.symlink_metadata().is_ok() {
        return Err(ConsoleError::SocketExists {
            path: path.to_path_buf(),
        });
    }
    let listener = UnixListener::bind(path).map_err(|source| ConsoleError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    if let Err(source) = listener.set_nonblocking(true) {
        let _ = std::fs::remove_file(path);
        return Err(ConsoleError::Bind {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(listener)
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
        if let Some(w) = self.worker.take() {
            drop(w.stop());
        }
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
        };
        let w = Worker::spawn("virtio-console", 2, handler)
            .map_err(|e| VirtioError::Host(format!("console worker: {e}")))?;
        self.worker = Some(w);
        Ok(())
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
    }

    fn metrics(&self) -> Option<Arc<dyn Metrics>> {
        Some(self.metrics.clone())
    }
}

/// Serves up to [`MAX_CHAINS_PER_EVENT`] transmit chains of `queue`: every device-readable
/// buffer goes to `out` (at most [`MAX_TX_CHAIN`] bytes per chain). Device-writable buffers and
/// memory outside the guest are counted as errors. Returns (chains served, whether the driver
/// should be interrupted).
///
/// This is a fuzzing entry point: synchronous, no threads.
pub fn process_transmit(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    out: &mut dyn FnMut(&[u8]),
    metrics: &ConsoleMetrics,
) -> (usize, bool) {
    let mut buf = [0u8; 4096];
    let mut served = 0;
    while served < MAX_CHAINS_PER_EVENT {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        served += 1;
        let head = chain.head_index();
        let mut total = 0usize;
        let mut bad = false;
        for desc in chain {
            if desc.is_write_only() {
                bad = true;
                continue;
            }
            let mut left = desc.len() as usize;
            let mut addr = desc.addr().0;
            while left > 0 {
                if total >= MAX_TX_CHAIN {
                    bad = true;
                    break;
                }
                let n = left.min(buf.len()).min(MAX_TX_CHAIN - total);
                let Some(chunk) = buf.get_mut(..n) else {
                    bad = true;
                    break;
                };
                if mem.read_slice(chunk, GuestAddress(addr)).is_err() {
                    bad = true;
                    break;
                }
                out(chunk);
                total += n;
                left -= n;
                metrics.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                match addr.checked_add(n as u64) {
                    Some(a) => addr = a,
                    None => {
                        bad = left > 0;
                        break;
                    }
                }
            }
        }
        if bad {
            metrics.error();
        }
        if queue.add_used(mem, head, 0).is_err() {
            // A bogus head index: the chains behind it still get served.
            metrics.error();
            continue;
        }
    }
    let notify = served > 0 && queue.needs_notification(mem).unwrap_or(true);
    (served, notify)
}

/// Moves `input` into up to [`MAX_CHAINS_PER_EVENT`] receive chains of `queue` (device-writable
/// buffers, filled in order); consumed bytes are removed from `input`. A chain without writable
/// room or touching memory outside the guest is returned with what was written and counted as an
/// error. Returns (chains served, whether the driver should be interrupted).
///
/// This is a fuzzing entry point: synchronous, no threads.
pub fn process_receive(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    input: &mut Vec<u8>,
    metrics: &ConsoleMetrics,
) -> (usize, bool) {
    let mut served = 0;
    while !input.is_empty() && served < MAX_CHAINS_PER_EVENT {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        served += 1;
        let head = chain.head_index();
        let mut written = 0usize;
        let mut bad = false;
        for desc in chain {
            if !desc.is_write_only() {
                bad = true;
                continue;
            }
            let Some(data) = input.get(written..) else {
                break;
            };
            let n = data.len().min(desc.len() as usize);
            if n == 0 {
                continue;
            }
            match data.get(..n).map(|d| mem.write_slice(d, desc.addr())) {
                Some(Ok(())) => written += n,
                _ => {
                    bad = true;
                    break;
                }
            }
        }
        if written == 0 {
            bad = true;
        }
        if bad {
            metrics.error();
        }
        input.drain(..written.min(input.len()));
        metrics
            .rx_bytes
            .fetch_add(written as u64, Ordering::Relaxed);
        // written <= INPUT_CHUNK-sized input here, but never trust a conversion.
        let len = u32::try_from(written).unwrap_or(u32::MAX);
        if queue.add_used(mem, head, len).is_err() {
            // A bogus head index: the chains behind it still get served.
            metrics.error();
            continue;
        }
    }
    let notify = served > 0 && queue.needs_notification(mem).unwrap_or(true);
    (served, notify)
}

/// The console's worker: both queues and the backend's descriptors.
struct ConsoleHandler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<ConsoleMetrics>,
    sink: Arc<Mutex<Sink>>,
    resume: EventFd,
    listener_watched: bool,
    /// The client's registered events (`None`: not registered).
    client_watched: Option<EventSet>,
}

impl ConsoleHandler {
    fn signal(&self, queue: usize) {
        if let Err(e) = self.interrupt.trigger(InterruptKind::queue(queue)) {
            tracing::warn!("virtio-console interrupt: {e}");
        }
    }

    fn transmit(&mut self) {
        let sink = self.sink.clone();
        let mut sink = lock(&sink);
        let metrics = self.metrics.clone();
        let (served, notify) = process_transmit(
            &self.mem,
            &mut self.tx,
            &mut |d| sink.output(d, &metrics),
            &self.metrics,
        );
        if let Sink::Socket(s) = &mut *sink {
            s.flush(&self.metrics);
        }
        if notify {
            self.signal(TX);
        }
        if served >= MAX_CHAINS_PER_EVENT {
            let _ = self.resume.write(1);
        }
    }

    fn receive(&mut self) {
        let sink = self.sink.clone();
        let mut sink = lock(&sink);
        let Sink::Socket(s) = &mut *sink else {
            return;
        };
        let (served, notify) =
            process_receive(&self.mem, &mut self.rx, &mut s.pending_in, &self.metrics);
        if notify {
            self.signal(RX);
        }
        if served >= MAX_CHAINS_PER_EVENT && !s.pending_in.is_empty() {
            let _ = self.resume.write(1);
        }
    }

    fn accept(&mut self) {
        let mut sink = lock(&self.sink);
        let Sink::Socket(s) = &mut *sink else {
            return;
        };
        if s.client.is_some() {
            return;
        }
        match s.listener.accept() {
            Ok((c, _)) => {
                if let Err(e) = c.set_nonblocking(true) {
                    tracing::warn!("console client: {e}");
                    self.metrics.error();
                    return;
                }
                tracing::debug!("console client connected");
                s.client = Some(c);
                s.pending_out = s.history.clone();
                s.flush(&self.metrics);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("console socket accept: {e}");
                self.metrics.error();
            }
        }
    }

    fn client_event(&mut self, events: EventSet) {
        {
            let mut sink = lock(&self.sink);
            let Sink::Socket(s) = &mut *sink else {
                return;
            };
            if events.contains(EventSet::ERROR) {
                s.disconnect();
                return;
            }
            if events.contains(EventSet::OUT) {
                s.flush(&self.metrics);
            }
            let readable =
                events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP);
            if readable && s.pending_in.is_empty() {
                let Some(c) = s.client.as_mut() else {
                    return;
                };
                let mut buf = [0u8; INPUT_CHUNK];
                match c.read(&mut buf) {
                    Ok(0) => s.disconnect(),
                    Ok(n) => s
                        .pending_in
                        .extend_from_slice(buf.get(..n).unwrap_or_default()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        tracing::debug!("console client read: {e}");
                        s.disconnect();
                    }
                }
            } else if events.contains(EventSet::HANG_UP) && !events.contains(EventSet::OUT) {
                // Hung up while its input still waits for guest buffers: nothing more to do
                // with it.
                s.disconnect();
            }
        }
        self.receive();
    }

    /// Watches the listener while no client is connected, and the client for what the device
    /// can do with it now: read when the input buffer is empty, write when output is pending.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let sink = lock(&self.sink);
        let Sink::Socket(s) = &*sink else {
            return;
        };
        let want_listener = s.client.is_none();
        if want_listener != self.listener_watched {
            let fd = s.listener.as_raw_fd();
            let r = if want_listener {
                ops.add(fd, LISTENER_TOKEN, EventSet::IN)
            } else {
                ops.remove(fd)
            };
            match r {
                Ok(()) => self.listener_watched = want_listener,
                Err(e) => tracing::warn!("console listener epoll: {e}"),
            }
        }
        let want_client = s.client.as_ref().and_then(|c| {
            let mut ev = EventSet::empty();
            if s.pending_in.is_empty() {
                ev |= EventSet::IN | EventSet::READ_HANG_UP;
            }
            if !s.pending_out.is_empty() {
                ev |= EventSet::OUT;
            }
            (!ev.is_empty()).then_some((c.as_raw_fd(), ev))
        });
        let r = match (self.client_watched, want_client) {
            (None, None) => Ok(()),
            (Some(old), Some((fd, ev))) if old == ev => {
                let _ = fd;
                Ok(())
            }
            (None, Some((fd, ev))) => ops.add(fd, CLIENT_TOKEN, ev),
            (Some(_), Some((fd, ev))) => ops.modify(fd, CLIENT_TOKEN, ev),
            // The client was dropped (closing it left the epoll set) or has nothing to do.
            (Some(_), None) => match s.client.as_ref() {
                Some(c) => ops.remove(c.as_raw_fd()),
                None => Ok(()),
            },
        };
        match r {
            Ok(()) => self.client_watched = want_client.map(|(_, ev)| ev),
            Err(e) => {
                tracing::warn!("console client epoll: {e}");
                self.client_watched = None;
            }
        }
    }
}

impl EventHandler for ConsoleHandler {
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        ops.add(self.resume.as_raw_fd(), RESUME_TOKEN, EventSet::IN)?;
        self.transmit();
        self.receive();
        self.update_interest(ops);
        Ok(())
    }

    fn queue_event(&mut self, queue: usize, ops: &mut EventOps) {
        match queue {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
        self.update_interest(ops);
    }

    fn host_event(&mut self, token: u64, events: EventSet, ops: &mut EventOps) {
        match token {
            LISTENER_TOKEN => self.accept(),
            CLIENT_TOKEN => self.client_event(events),
            RESUME_TOKEN => {
                let _ = self.resume.read();
                self.transmit();
                self.receive();
            }
            _ => {}
        }
        self.update_interest(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{ro, wo, TestDriver, DATA, F_NEXT, F_WRITE};
    use crate::virtio::transport::mmio::INT_VRING;
    use std::time::{Duration, Instant};

    fn temp_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferro-con-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn up(backend: ConsoleBackend) -> (TestDriver, Arc<ConsoleMetrics>) {
        let c = Console::new(backend).unwrap();
        let m = c.console_metrics();
        let mut d = TestDriver::new(Box::new(c));
        assert_eq!(d.bring_up(u64::MAX) & 0x4f, 0xf);
        (d, m)
    }

    /// Guest output: `data` in one transmit chain; waits until it is returned.
    fn send(d: &mut TestDriver, at: u64, data: &[u8], used: u16) {
        d.put(at, data);
        d.add_chain(TX, &[ro(at, data.len() as u32)]);
        d.notify(TX);
        assert!(d.wait_used(TX, used));
    }

    /// Reads from `s` until what was read ends with `want` (5 s at most).
    fn read_until(s: &mut UnixStream, want: &[u8]) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline && !got.ends_with(want) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        got
    }

    /// Collects guest input from receive chains until `len` bytes arrived.
    fn receive(d: &mut TestDriver, len: usize, buf_len: u32) -> Vec<u8> {
        let mut got = Vec::new();
        let mut n = d.used_idx(RX);
        while got.len() < len {
            let at = DATA + 0x10_0000 + u64::from(n) * 0x1_0000;
            let head = d.add_chain(RX, &[wo(at, buf_len)]);
            d.notify(RX);
            assert!(d.wait_used(RX, n + 1), "input arrives");
            let (id, l) = d.used_elem(RX, n);
            assert_eq!(id, u32::from(head));
            assert!(l > 0 && l <= buf_len);
            got.extend(d.get(at, l as usize));
            n += 1;
        }
        got
    }

    #[test]
    fn config_and_features() {
        let c = Console::new(ConsoleBackend::Null).unwrap();
        assert_eq!(c.device_type(), 3);
        assert_eq!(c.features(), VIRTIO_F_VERSION_1 | 1);
        assert_eq!(c.queue_max_sizes().len(), 2);
        let mut b = [0xffu8; 4];
        c.read_config(0, &mut b);
        assert_eq!(b, [80, 0, 25, 0]);
        c.read_config(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn guest_output_reaches_a_file() {
        let path = temp_path("out.log");
        std::fs::write(&path, b"old\n").unwrap();
        let (mut d, m) = up(ConsoleBackend::File(path.clone()));
        send(&mut d, DATA, b"hello", 1);
        d.put(DATA + 0x100, b" wor");
        d.put(DATA + 0x200, b"ld\n");
        let head = d.add_chain(TX, &[ro(DATA + 0x100, 4), ro(DATA + 0x200, 3)]);
        d.notify(TX);
        assert!(d.wait_used(TX, 2));
        assert_eq!(d.used_elem(TX, 1), (u32::from(head), 0));
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nhello world\n");
        assert_eq!(m.tx_bytes.load(Ordering::Relaxed), 12);
        assert_eq!(m.errors.load(Ordering::Relaxed), 0);
        assert_ne!(d.irq.status() & INT_VRING, 0);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn null_backend_completes_output() {
        let (mut d, m) = up(ConsoleBackend::Null);
        send(&mut d, DATA, b"into the void", 1);
        assert_eq!(m.tx_bytes.load(Ordering::Relaxed), 13);
    }

    #[test]
    fn socket_client_gets_output_and_sends_input() {
        let path = temp_path("sock1");
        let (mut d, m) = up(ConsoleBackend::Socket(path.clone()));
        // Output before any client: kept as scrollback.
        send(&mut d, DATA, b"boot log\n", 1);
        let mut client = UnixStream::connect(&path).unwrap();
        assert_eq!(read_until(&mut client, b"boot log\n"), b"boot log\n");
        send(&mut d, DATA, b"login: ", 2);
        assert_eq!(read_until(&mut client, b"login: "), b"login: ");
        client.write_all(b"root\n").unwrap();
        assert_eq!(receive(&mut d, 5, 64), b"root\n");
        assert_eq!(m.rx_bytes.load(Ordering::Relaxed), 5);
        assert_eq!(m.tx_bytes.load(Ordering::Relaxed), 16);
        assert_eq!(m.errors.load(Ordering::Relaxed), 0);
        drop(d);
        assert!(!path.exists(), "the socket file goes with the device");
    }

    #[test]
    fn input_waits_for_guest_buffers() {
        let path = temp_path("sock2");
        let (mut d, m) = up(ConsoleBackend::Socket(path.clone()));
        let mut client = UnixStream::connect(&path).unwrap();
        // No receive buffers yet: the device must hold the input, not lose it.
        let input: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&input).unwrap();
        // Small buffers, added one at a time.
        assert_eq!(receive(&mut d, input.len(), 1000), input);
        assert_eq!(m.rx_bytes.load(Ordering::Relaxed), 10_000);
        // Output still flows meanwhile.
        send(&mut d, DATA, b"ok", 1);
        assert_eq!(read_until(&mut client, b"ok"), b"ok");
    }

    #[test]
    fn a_new_client_after_a_disconnect() {
        let path = temp_path("sock3");
        let (mut d, _m) = up(ConsoleBackend::Socket(path.clone()));
        let mut c1 = UnixStream::connect(&path).unwrap();
        send(&mut d, DATA, b"one ", 1);
        assert_eq!(read_until(&mut c1, b"one "), b"one ");
        drop(c1);
        send(&mut d, DATA, b"two ", 2);
        let mut c2 = UnixStream::connect(&path).unwrap();
        // Replayed scrollback, then live output.
        assert_eq!(read_until(&mut c2, b"one two "), b"one two ");
        send(&mut d, DATA, b"three", 3);
        assert_eq!(read_until(&mut c2, b"three"), b"three");
        c2.write_all(b"hi").unwrap();
        assert_eq!(receive(&mut d, 2, 16), b"hi");
    }

    #[test]
    fn client_survives_a_device_reset() {
        let path = temp_path("sock4");
        let (mut d, _m) = up(ConsoleBackend::Socket(path.clone()));
        let mut c = UnixStream::connect(&path).unwrap();
        send(&mut d, DATA, b"before", 1);
        assert_eq!(read_until(&mut c, b"before"), b"before");
        d.reset_device();
        assert_eq!(d.bring_up(u64::MAX) & 0x4f, 0xf);
        send(&mut d, DATA, b"after", 1);
        assert_eq!(read_until(&mut c, b"after"), b"after");
        c.write_all(b"x").unwrap();
        assert_eq!(receive(&mut d, 1, 16), b"x");
    }

    #[test]
    fn malformed_chains_are_errors_not_crashes() {
        let path = temp_path("sock5");
        let (mut d, m) = up(ConsoleBackend::Socket(path.clone()));
        let mut c = UnixStream::connect(&path).unwrap();
        d.put(DATA, b"abcd");
        // Transmit: a device-writable buffer, a loop, memory outside the guest, a bad next.
        d.desc(TX, 0, DATA, 4, F_WRITE, 0);
        d.offer(TX, 0);
        d.desc(TX, 1, DATA, 4, F_NEXT, 1);
        d.offer(TX, 1);
        d.desc(TX, 2, 0xffff_ffff_0000, 4, 0, 0);
        d.offer(TX, 2);
        d.desc(TX, 3, DATA, 2, F_NEXT, 999);
        d.offer(TX, 3);
        d.offer(TX, 999); // bogus head
        d.desc(TX, 4, DATA + 2, 2, 0, 0);
        d.offer(TX, 4);
        d.notify(TX);
        assert!(d.wait_used(TX, 5));
        // What the loop and the broken chain carried still went out; the rest did not.
        let got = read_until(&mut c, b"abcd");
        assert!(got.ends_with(b"abcd"), "{got:?}");
        assert!(got.len().is_multiple_of(4) && got.len() <= 4 * 16 + 4);
        assert!(!got.contains(&0), "nothing from outside the chains");
        assert!(m.errors.load(Ordering::Relaxed) >= 3);

        // Receive: a device-readable buffer, memory outside the guest.
        let errors = m.errors.load(Ordering::Relaxed);
        d.desc(RX, 0, DATA, 64, 0, 0);
        d.offer(RX, 0);
        d.desc(RX, 1, 0xffff_ffff_0000, 64, F_WRITE, 0);
        d.offer(RX, 1);
        d.desc(RX, 2, DATA + 0x1000, 64, F_WRITE, 0);
        d.offer(RX, 2);
        c.write_all(b"input").unwrap();
        d.notify(RX);
        assert!(d.wait_used(RX, 3));
        assert_eq!(d.used_elem(RX, 0), (0, 0));
        assert_eq!(d.used_elem(RX, 1), (1, 0));
        assert_eq!(d.used_elem(RX, 2), (2, 5));
        assert_eq!(d.get(DATA + 0x1000, 5), b"input");
        assert_eq!(m.errors.load(Ordering::Relaxed), errors + 2);
    }

    #[test]
    fn backend_errors_name_the_path() {
        let path = temp_path("exists");
        std::fs::write(&path, b"").unwrap();
        let e = Console::new(ConsoleBackend::Socket(path.clone()))
            .err()
            .unwrap();
        assert!(matches!(e, ConsoleError::SocketExists { .. }));
        assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
        assert!(
            path.exists(),
            "a path the device did not create is left alone"
        );
        std::fs::remove_file(&path).unwrap();

        let bad = PathBuf::from("/nonexistent-dir-ferro/console.log");
        let e = Console::new(ConsoleBackend::File(bad.clone()))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("/nonexistent-dir-ferro/console.log"),
            "{e}"
        );
        let e = Console::new(ConsoleBackend::Socket(bad.with_extension("sock")))
            .err()
            .unwrap();
        assert!(matches!(e, ConsoleError::Bind { .. }));
        assert!(
            e.to_string()
                .contains("/nonexistent-dir-ferro/console.sock"),
            "{e}"
        );
    }

    #[test]
    fn fuzz_entry_points_run_synchronously() {
        use crate::virtio::testing::rings;
        let d = TestDriver::new(Box::new(Console::new(ConsoleBackend::Null).unwrap()));
        let mut d = d;
        let (desc, avail, used) = rings(0);
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        let m = ConsoleMetrics::default();
        d.put(DATA, b"xyz");
        d.add_chain(0, &[ro(DATA, 3)]);
        let mut out = Vec::new();
        let (n, _) = process_transmit(&d.mem, &mut q, &mut |b| out.extend_from_slice(b), &m);
        assert_eq!((n, out.as_slice()), (1, b"xyz" as &[u8]));
        d.add_chain(0, &[wo(DATA + 0x100, 2), wo(DATA + 0x200, 8)]);
        let mut input = b"hello".to_vec();
        let (n, _) = process_receive(&d.mem, &mut q, &mut input, &m);
        assert_eq!(n, 1);
        assert!(input.is_empty());
        assert_eq!(d.get(DATA + 0x100, 2), b"he");
        assert_eq!(d.get(DATA + 0x200, 3), b"llo");
        assert_eq!(d.used_elem(0, 1).1, 5);
    }
}
