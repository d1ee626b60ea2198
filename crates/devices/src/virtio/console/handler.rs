//! virtio-console's worker: both queues and the backend's descriptors ([`ConsoleHandler`]),
//! and the synchronous queue processing it uses ([`process_transmit`], [`process_receive`], also
//! the fuzzing entry points).

use super::sink::Sink;
use super::{ConsoleMetrics, INPUT_CHUNK, MAX_CHAINS_PER_EVENT, MAX_TX_CHAIN, RX, TX};
use crate::sync::lock;
use crate::virtio::chain::{Direction, Rules, Walker};
use crate::virtio::worker::{EventHandler, EventOps};
use crate::virtio::{InterruptKind, VirtioInterrupt};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

const LISTENER_TOKEN: u64 = 1;
const CLIENT_TOKEN: u64 = 2;
const RESUME_TOKEN: u64 = 3;
const STALL_TOKEN: u64 = 4;

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
        for item in Walker::new(chain, Rules::direction(Direction::Read)) {
            let Ok(region) = item else {
                // A device-writable buffer: skipped.
                bad = true;
                continue;
            };
            let len = u64::from(region.len);
            let mut offset = 0u64;
            while offset < len {
                if total >= MAX_TX_CHAIN {
                    bad = true;
                    break;
                }
                let left = usize::try_from(len - offset).unwrap_or(usize::MAX);
                let n = left.min(buf.len()).min(MAX_TX_CHAIN - total);
                let (Some(at), Some(chunk)) = (region.at(offset), buf.get_mut(..n)) else {
                    // The buffer wraps around the address space.
                    bad = true;
                    break;
                };
                if mem.read_slice(chunk, at).is_err() {
                    bad = true;
                    break;
                }
                out(chunk);
                total += n;
                offset += n as u64;
                metrics.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
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
        for item in Walker::new(chain, Rules::direction(Direction::Write)) {
            let Ok(region) = item else {
                // A device-readable buffer: skipped.
                bad = true;
                continue;
            };
            let Some(data) = input.get(written..) else {
                break;
            };
            let n = data.len().min(region.len as usize);
            if n == 0 {
                continue;
            }
            match data.get(..n).map(|d| mem.write_slice(d, region.addr)) {
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
pub(super) struct ConsoleHandler {
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) metrics: Arc<ConsoleMetrics>,
    pub(super) sink: Arc<Mutex<Sink>>,
    pub(super) resume: EventFd,
    pub(super) listener_watched: bool,
    /// The client's registered events (`None`: not registered).
    pub(super) client_watched: Option<EventSet>,
    /// Fires at the socket console's stall deadline, so a client that stops reading is hung up
    /// on while the guest writes nothing more.
    pub(super) stall_timer: TimerFd,
    pub(super) stall_armed: bool,
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
            s.console.flush();
            s.count(&self.metrics);
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
        s.console.accept();
        s.count(&self.metrics);
    }

    fn client_event(&mut self, events: EventSet) {
        {
            let mut sink = lock(&self.sink);
            let Sink::Socket(s) = &mut *sink else {
                return;
            };
            if events.contains(EventSet::ERROR) {
                s.console.hang_up();
                return;
            }
            if events.contains(EventSet::OUT) {
                s.console.flush();
            }
            let readable =
                events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP);
            if readable && s.pending_in.is_empty() {
                let mut buf = [0u8; INPUT_CHUNK];
                let n = s.console.read_input(&mut buf);
                s.pending_in
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
            } else if events.contains(EventSet::HANG_UP) && !events.contains(EventSet::OUT) {
                // Hung up while its input still waits for guest buffers: nothing more to do
                // with it.
                s.console.hang_up();
            }
            s.count(&self.metrics);
        }
        self.receive();
    }

    /// The stall deadline passed: a flush hangs up on a client that still took nothing.
    fn stall(&mut self) {
        // Disarming also clears the expiry (no read: the timer may have been re-armed by an
        // earlier event of the same epoll batch, and a read would then block until it fires).
        let _ = self.stall_timer.clear();
        self.stall_armed = false;
        let mut sink = lock(&self.sink);
        if let Sink::Socket(s) = &mut *sink {
            s.console.flush();
            s.count(&self.metrics);
        }
    }

    /// Watches the listener while no client is connected, and the client for what the device
    /// can do with it now: read when the input buffer is empty, write when output is pending;
    /// arms the stall timer while output waits.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let sink = lock(&self.sink);
        let Sink::Socket(s) = &*sink else {
            return;
        };
        match s.console.stall_deadline() {
            Some(deadline) => {
                let left = deadline
                    .saturating_duration_since(std::time::Instant::now())
                    .max(std::time::Duration::from_millis(1));
                match self.stall_timer.reset(left, None) {
                    Ok(()) => self.stall_armed = true,
                    Err(e) => tracing::warn!("console stall timer: {e}"),
                }
            }
            None if self.stall_armed => {
                let _ = self.stall_timer.clear();
                self.stall_armed = false;
            }
            None => {}
        }
        let want_listener = !s.console.has_client();
        if want_listener != self.listener_watched {
            let fd = s.console.listener_fd();
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
        let want_client = s.console.client_fd().and_then(|fd| {
            let mut ev = EventSet::empty();
            if s.pending_in.is_empty() {
                ev |= EventSet::IN | EventSet::READ_HANG_UP;
            }
            if s.console.has_pending_output() {
                ev |= EventSet::OUT;
            }
            (!ev.is_empty()).then_some((fd, ev))
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
            (Some(_), None) => match s.console.client_fd() {
                Some(fd) => ops.remove(fd),
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
        ops.add(self.stall_timer.as_raw_fd(), STALL_TOKEN, EventSet::IN)?;
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
            STALL_TOKEN => self.stall(),
            _ => {}
        }
        self.update_interest(ops);
    }
}
