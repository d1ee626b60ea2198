//! A device's own I/O thread.
//!
//! Devices that talk to the host (disk files, TAP devices, sockets) do that work on a thread of
//! their own, started at activation: a slow disk never stalls the network, and no device I/O
//! runs on a vCPU thread or on the thread that forwards queue notifications. The thread waits in
//! epoll on the device's queue notifications, a stop event and whatever host file descriptors the
//! device registers through [`EventOps`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Starts a named thread running a closure and returns its handle; see [`set_spawner`].
pub type Spawner =
    dyn Fn(String, Box<dyn FnOnce() + Send>) -> io::Result<JoinHandle<()>> + Send + Sync;

static SPAWNER: OnceLock<Box<Spawner>> = OnceLock::new();

/// Makes every device worker thread of this process through `spawner` rather than directly.
///
/// Workers start when the driver activates a device, on a vCPU thread; a confined VMM routes
/// them to a thread whose seccomp filter allows what workers do (threads inherit their
/// creator's filter), and each worker then installs its own. Set once; later calls do
/// nothing and return false.
pub fn set_spawner(spawner: Box<Spawner>) -> bool {
    SPAWNER.set(spawner).is_ok()
}

fn spawn_thread(name: &str, f: Box<dyn FnOnce() + Send>) -> io::Result<JoinHandle<()>> {
    match SPAWNER.get() {
        Some(s) => s(name.to_string(), f),
        None => std::thread::Builder::new().name(name.to_string()).spawn(f),
    }
}

/// Tokens at or above this value are the worker's own (queue notifications and stop).
pub const RESERVED_TOKENS: u64 = 1 << 63;
const STOP_TOKEN: u64 = u64::MAX;

/// Registers host file descriptors with the worker's epoll.
pub struct EventOps<'a> {
    epoll: &'a Epoll,
}

impl EventOps<'_> {
    /// Watches `fd` for `events`; [`EventHandler::host_event`] gets `token` (below
    /// [`RESERVED_TOKENS`]) when it is ready.
    pub fn add(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.ctl(ControlOperation::Add, fd, token, events)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.ctl(ControlOperation::Modify, fd, token, events)
    }

    /// Stops watching `fd`.
    pub fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    fn ctl(&mut self, op: ControlOperation, fd: RawFd, token: u64, ev: EventSet) -> io::Result<()> {
        if token >= RESERVED_TOKENS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "device event token in the worker's reserved range",
            ));
        }
        self.epoll.ctl(op, fd, EpollEvent::new(ev, token))
    }
}

/// What a device does on its worker thread.
pub trait EventHandler: Send + 'static {
    /// Runs once on the worker thread before the first event: register host descriptors here,
    /// and serve whatever the queues already hold.
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        let _ = ops;
        Ok(())
    }
    /// The driver notified queue `queue`.
    fn queue_event(&mut self, queue: usize, ops: &mut EventOps);
    /// A registered host descriptor is ready.
    fn host_event(&mut self, token: u64, events: EventSet, ops: &mut EventOps) {
        let _ = (token, events, ops);
    }
}

/// The running worker thread of one activated device, which owns the device's [`EventHandler`]
/// (its queues and whatever is in flight) while it runs.
///
/// [`Worker::stop`] ends the thread and hands the handler back, as a vCPU thread hands back its
/// `Vcpu`: a reset drops it (the queues go with it), a pause for a snapshot will keep it and
/// save its state. Dropping a `Worker` stops it too (and drops the handler).
pub struct Worker<H: EventHandler> {
    stop: EventFd,
    queues: Vec<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// Where the thread leaves the handler as it ends.
    returned: Arc<Mutex<Option<H>>>,
}

impl<H: EventHandler> Worker<H> {
    /// Starts `handler` on a thread named `name` that watches `queues` notification events.
    pub fn spawn(name: &str, queues: usize, mut handler: H) -> io::Result<Worker<H>> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let evts = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let mut thread_evts = Vec::with_capacity(queues);
        for (i, e) in evts.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                e.as_raw_fd(),
                EpollEvent::new(EventSet::IN, RESERVED_TOKENS + i as u64),
            )?;
            thread_evts.push(e.try_clone()?);
        }
        let returned = Arc::new(Mutex::new(None));
        let slot = returned.clone();
        let thread = spawn_thread(
            name,
            Box::new(move || {
                run(&epoll, &thread_evts, &mut handler);
                if let Ok(mut s) = slot.lock() {
                    *s = Some(handler);
                }
            }),
        )?;
        Ok(Worker {
            stop,
            queues: evts,
            thread: Some(thread),
            returned,
        })
    }

    /// Tells the worker that the driver notified `queue`.
    pub fn notify(&self, queue: usize) {
        if let Some(e) = self.queues.get(queue) {
            if let Err(err) = e.write(1) {
                tracing::warn!("device worker notify: {err}");
            }
        }
    }

    /// Stops the thread, waits for it and returns the handler as the thread left it (between
    /// two events: nothing half-done). `None` only when the handler panicked (it is gone then;
    /// the panic is logged).
    pub fn stop(mut self) -> Option<H> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Option<H> {
        let _ = self.stop.write(1);
        match self.thread.take()?.join() {
            Ok(()) => self.returned.lock().ok().and_then(|mut s| s.take()),
            Err(_) => {
                tracing::error!("device worker panicked");
                None
            }
        }
    }
}

impl<H: EventHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        // The handler goes with the worker.
        drop(self.shutdown());
    }
}

/// The worker thread's loop: `init`, then events until the stop event (or a failure, logged).
fn run<H: EventHandler>(epoll: &Epoll, queue_evts: &[EventFd], handler: &mut H) {
    let mut ops = EventOps { epoll };
    if let Err(e) = handler.init(&mut ops) {
        tracing::error!("device worker start-up: {e}");
        return;
    }
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("device worker: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            let mut ops = EventOps { epoll };
            if token == STOP_TOKEN {
                return;
            } else if token >= RESERVED_TOKENS {
                let q = (token - RESERVED_TOKENS) as usize;
                if let Some(e) = queue_evts.get(q) {
                    // Reading resets the counter: several notifications fold into one.
                    let _ = e.read();
                    handler.queue_event(q, &mut ops);
                }
            } else {
                handler.host_event(token, ev.event_set(), &mut ops);
            }
        }
    }
}

/// A device's worker while the device is activated: none before its first activation and after
/// a reset. What every device with a worker does with it — start it at activation (stopping one
/// still running: a second activation without a reset), forward queue notifications, stop it
/// at reset — in one place.
pub struct WorkerSlot<H: EventHandler>(Option<Worker<H>>);

impl<H: EventHandler> Default for WorkerSlot<H> {
    fn default() -> Self {
        WorkerSlot(None)
    }
}

impl<H: EventHandler> WorkerSlot<H> {
    /// Starts `handler` on a thread named `name` watching `queues` notification events, after
    /// stopping the worker still running, if any.
    pub fn start(&mut self, name: &str, queues: usize, handler: H) -> io::Result<()> {
        drop(self.stop());
        self.0 = Some(Worker::spawn(name, queues, handler)?);
        Ok(())
    }

    /// Forwards the driver's notification of `queue` to the worker, if one runs.
    pub fn notify(&self, queue: usize) {
        if let Some(w) = &self.0 {
            w.notify(queue);
        }
    }

    /// Stops the worker, if one runs, and hands its handler back (see [`Worker::stop`]).
    pub fn stop(&mut self) -> Option<H> {
        self.0.take().and_then(Worker::stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo(mpsc::Sender<(char, u64)>, Option<EventFd>);

    impl EventHandler for Echo {
        fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
            if let Some(e) = &self.1 {
                ops.add(e.as_raw_fd(), 7, EventSet::IN)?;
            }
            assert!(ops.add(0, RESERVED_TOKENS, EventSet::IN).is_err());
            Ok(())
        }
        fn queue_event(&mut self, queue: usize, _ops: &mut EventOps) {
            let _ = self.0.send(('q', queue as u64));
        }
        fn host_event(&mut self, token: u64, _ev: EventSet, _ops: &mut EventOps) {
            if let Some(e) = &self.1 {
                let _ = e.read();
            }
            let _ = self.0.send(('h', token));
        }
    }

    #[test]
    fn delivers_queue_and_host_events_then_stops() {
        let (tx, rx) = mpsc::channel();
        let host = EventFd::new(EFD_NONBLOCK).unwrap();
        let w = Worker::spawn("t", 2, Echo(tx, Some(host.try_clone().unwrap()))).unwrap();
        w.notify(1);
        let got = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(got, ('q', 1));
        host.write(1).unwrap();
        let got = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(got, ('h', 7));
        w.notify(99); // out of range: ignored
        let handler = w.stop().expect("the handler comes back");
        assert!(rx.recv_timeout(std::time::Duration::from_secs(1)).is_err());
        // The handler can run again, on another worker (its init registers its descriptors
        // with that one).
        let w = Worker::spawn("t2", 1, handler).unwrap();
        w.notify(0);
        let got = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(got, ('q', 0));
        drop(w);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(1)).is_err());
    }

    /// Counts queue events.
    struct Counter(u32, mpsc::Sender<()>);

    impl EventHandler for Counter {
        fn queue_event(&mut self, _queue: usize, _ops: &mut EventOps) {
            self.0 += 1;
            let _ = self.1.send(());
        }
    }

    #[test]
    fn stop_returns_the_handler_with_its_state() {
        let (tx, rx) = mpsc::channel();
        let w = Worker::spawn("t3", 2, Counter(0, tx)).unwrap();
        for q in [0, 1, 0] {
            w.notify(q);
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        }
        assert_eq!(w.stop().map(|c| c.0), Some(3));
    }
}
