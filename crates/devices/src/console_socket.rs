//! A console on a Unix socket: a backlog of output and one client at a time. The one
//! implementation behind COM1's socket backend (`--serial socket=PATH`, driven by a thread of the
//! VMM's) and virtio-console's (`--console socket=PATH`, driven by the device's worker).
//!
//! # Behaviour
//!
//! - **Backlog.** The last [`BACKLOG`] (64 KiB) bytes of output are always kept, whether or not
//!   a client is connected, and every new client gets them first, then live output. Whoever
//!   connects (a user, the host daemon's console hub, the same client again after a hang-up)
//!   sees the recent past: the boot messages, the login prompt.
//! - **One client at a time.** Others wait in the listen backlog until it goes.
//! - **Output never blocks.** The thread producing output (a vCPU writing the UART, the
//!   console's worker) hands it over and goes on: it is sent to the client without blocking,
//!   and what the client's socket does not take waits in a queue of at most [`MAX_PENDING`]
//!   bytes (the oldest beyond are dropped, and counted).
//! - **A client that stops reading is hung up on.** When output has waited [`STALL_TIMEOUT`]
//!   (1 s) without the client taking a byte, it is hung up on: it reads what its socket still
//!   holds, then the end (and may connect again, getting the backlog), and the next client is
//!   served. A client that reads slowly but steadily stays and loses what overflows the queue.
//! - **Hang-up shuts the socket both ways** (`shutdown(SHUT_RDWR)`, then close), whether the
//!   console hangs up (stall, socket error) or the client ended its input (EOF).
//!
//! Why: the guest must never wait for a host-side reader, whoever it is (a vCPU blocked in a
//! UART write stops the guest; the old COM1 backend blocked up to a second per write); a stuck
//! client must not keep the console from the next one; and a client connecting at any time,
//! including one reconnecting after being hung up on, should see what the guest printed last
//! rather than nothing (the old COM1 backend only replayed output produced while no client was
//! connected, the old virtio-console one never hung up). A reconnecting client may thus see
//! again up to 64 KiB it already had.
//!
//! The type does no waiting of its own: a driver with an event loop (virtio-console's worker)
//! watches [`SocketConsole::listener_fd`] and [`SocketConsole::client_fd`] and calls the methods
//! when they are ready; a driver with a thread of its own (COM1's) uses [`wait`].

use crate::sync::lock;
use crate::sys::{poll, send_nosignal, PollFd};
use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Output kept, and replayed to every new client.
pub const BACKLOG: usize = 64 * 1024;
/// Most output queued for a client that does not keep up; older output beyond it is dropped.
pub const MAX_PENDING: usize = 64 * 1024;
/// How long queued output may wait without the client taking a byte before it is hung up on.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(1);

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

/// What went wrong since the counters were last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Socket failures: accepting, setting up or writing to a client (a client that simply
    /// went away is not one).
    pub errors: u64,
    /// Output bytes dropped because the client did not keep up.
    pub dropped_bytes: u64,
}

/// The listening socket, the backlog and the client (see the module documentation).
pub struct SocketConsole {
    listener: UnixListener,
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
    /// Output not yet written to the client.
    pending: VecDeque<u8>,
    /// Since when output has waited without the client taking any.
    stalled_since: Option<Instant>,
    /// Written when output starts waiting for the client (see [`SocketConsole::set_wake`]).
    wake: Option<EventFd>,
    counters: Counters,
}

impl SocketConsole {
    /// Creates the socket at `path` and listens (non-blocking). The caller owns the path: it
    /// decides whether something there may be replaced, and removes the socket when done. If
    /// the listener cannot be set up after binding, the socket file is removed again.
    pub fn bind(path: &Path) -> io::Result<SocketConsole> {
        let listener = UnixListener::bind(path)?;
        if let Err(e) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(SocketConsole {
            listener,
            client: None,
            backlog: VecDeque::new(),
            pending: VecDeque::new(),
            stalled_since: None,
            wake: None,
            counters: Counters::default(),
        })
    }

    /// `wake` is written whenever a [`SocketConsole::flush`] leaves output waiting for a client
    /// that had none waiting: for a driver whose thread waits in [`wait`] while other threads
    /// produce output.
    pub fn set_wake(&mut self, wake: EventFd) {
        self.wake = Some(wake);
    }

    /// Takes `data` as output: kept in the backlog, and queued for the client if there is one.
    /// Nothing is sent yet: call [`SocketConsole::flush`] (once after several outputs is fine).
    pub fn output(&mut self, data: &[u8]) {
        push_bounded(&mut self.backlog, data, BACKLOG);
        if self.client.is_some() {
            let dropped = push_bounded(&mut self.pending, data, MAX_PENDING);
            self.counters.dropped_bytes += dropped as u64;
        }
    }

    /// Sends queued output, as much as the client's socket takes without blocking. Hangs up on
    /// the client when its socket fails, or when output has waited [`STALL_TIMEOUT`] without it
    /// taking a byte.
    pub fn flush(&mut self) {
        let was_waiting = self.stalled_since.is_some();
        let mut progress = false;
        while let Some(client) = &self.client {
            let (chunk, _) = self.pending.as_slices();
            if chunk.is_empty() {
                break;
            }
            match send_nosignal(client, chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n.min(self.pending.len()));
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("console client write: {e}");
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        self.counters.errors += 1;
                    }
                    self.hang_up();
                    return;
                }
            }
        }
        if self.client.is_none() || self.pending.is_empty() {
            self.stalled_since = None;
            return;
        }
        let now = Instant::now();
        match self.stalled_since {
            Some(since) if !progress && now.duration_since(since) >= STALL_TIMEOUT => {
                tracing::debug!(
                    "console client took no output for {STALL_TIMEOUT:?}; hanging up on it"
                );
                self.hang_up();
            }
            Some(_) if !progress => {}
            _ => self.stalled_since = Some(now),
        }
        if !was_waiting && self.stalled_since.is_some() {
            if let Some(w) = &self.wake {
                let _ = w.write(1);
            }
        }
    }

    /// When the connected client will be hung up on if it still takes no output: `Some` while
    /// output waits for it. A driver calls [`SocketConsole::flush`] at that time even when the
    /// guest writes nothing more, so a stalled client is noticed while the guest is quiet too.
    pub fn stall_deadline(&self) -> Option<Instant> {
        match (&self.client, self.pending.is_empty()) {
            (Some(_), false) => self.stalled_since.map(|t| t + STALL_TIMEOUT),
            _ => None,
        }
    }

    /// Accepts a waiting client if none is connected; it gets the backlog first. True when a
    /// client was accepted.
    pub fn accept(&mut self) -> bool {
        if self.client.is_some() {
            return false;
        }
        match self.listener.accept() {
            Ok((c, _)) => {
                if let Err(e) = c.set_nonblocking(true) {
                    tracing::warn!("console client: {e}");
                    self.counters.errors += 1;
                    return false;
                }
                tracing::debug!("console client connected");
                self.client = Some(c);
                self.pending = self.backlog.clone();
                self.stalled_since = None;
                self.flush();
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
            Err(e) => {
                tracing::warn!("console socket accept: {e}");
                self.counters.errors += 1;
                false
            }
        }
    }

    /// Reads the client's input into `buf` without blocking; returns the bytes read (0: none
    /// waiting, or no client). The end of its input, or a read error, hangs up on it.
    pub fn read_input(&mut self, buf: &mut [u8]) -> usize {
        if buf.is_empty() {
            return 0;
        }
        let Some(c) = self.client.as_mut() else {
            return 0;
        };
        match c.read(buf) {
            Ok(0) => {
                self.hang_up();
                0
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => {
                tracing::debug!("console client read: {e}");
                self.hang_up();
                0
            }
        }
    }

    /// Ends the client's connection both ways (it reads what its socket holds, then the end);
    /// its queued output is dropped (the backlog keeps it for the next client).
    pub fn hang_up(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
            tracing::debug!("console client disconnected");
        }
        self.pending.clear();
        self.stalled_since = None;
    }

    /// True while a client is connected.
    pub fn has_client(&self) -> bool {
        self.client.is_some()
    }

    /// True while output waits for the client's socket to take it.
    pub fn has_pending_output(&self) -> bool {
        self.client.is_some() && !self.pending.is_empty()
    }

    /// The listening socket (readable: a client is waiting to be accepted).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The connected client's socket, if any.
    pub fn client_fd(&self) -> Option<RawFd> {
        self.client.as_ref().map(|c| c.as_raw_fd())
    }

    /// The counters since they were last taken (and resets them).
    pub fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }
}

/// For a console driven by a thread of its own: waits until `console` has something to do (a
/// client to accept; with `want_input`, input or the end of it from the client; room for queued
/// output; a hang-up; its stall deadline) or `wake` is written (see
/// [`SocketConsole::set_wake`]), at most `timeout`.
/// The caller then does what is due (accept, flush, read) under the lock. The lock is not held
/// while waiting.
pub fn wait(
    console: &Mutex<SocketConsole>,
    wake: &EventFd,
    want_input: bool,
    timeout: Option<Duration>,
) -> io::Result<()> {
    // Duplicates (closed when this returns): the console may drop its client meanwhile, and a
    // descriptor number must not be waited on after its owner closed it.
    let mut timeout = timeout;
    let fd: Option<(OwnedFd, libc::c_short)> = {
        let c = lock(console);
        if let Some(deadline) = c.stall_deadline() {
            let left = deadline.saturating_duration_since(Instant::now());
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }
        match &c.client {
            None => Some((OwnedFd::from(c.listener.try_clone()?), libc::POLLIN)),
            Some(s) => {
                let mut ev = 0;
                if want_input {
                    ev |= libc::POLLIN | libc::POLLRDHUP;
                }
                if !c.pending.is_empty() {
                    ev |= libc::POLLOUT;
                }
                // Without interest in it, the client is not watched (a client that hung up
                // would make every wait return at once).
                match ev {
                    0 => None,
                    ev => Some((OwnedFd::from(s.try_clone()?), ev)),
                }
            }
        }
    };
    let mut fds = vec![PollFd::new(wake.as_raw_fd(), libc::POLLIN)];
    if let Some((fd, ev)) = &fd {
        fds.push(PollFd::new(fd.as_raw_fd(), *ev));
    }
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    if fds.first().is_some_and(|w| w.revents() & libc::POLLIN != 0) {
        let _ = wake.read();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    struct Sock(PathBuf);

    impl Sock {
        fn new(name: &str) -> Sock {
            let p = std::env::temp_dir().join(format!("fv-cs-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            Sock(p)
        }
    }

    impl Drop for Sock {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn read_some(c: &mut UnixStream) -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = vec![0u8; 256 * 1024];
        let n = c.read(&mut b).unwrap();
        b.truncate(n);
        b
    }

    #[test]
    fn backlog_is_replayed_to_every_new_client() {
        let p = Sock::new("replay");
        let mut con = SocketConsole::bind(&p.0).unwrap();
        assert!(!con.accept(), "nobody waiting");
        con.output(b"boot ");
        con.flush();
        let mut c1 = UnixStream::connect(&p.0).unwrap();
        assert!(con.accept());
        assert_eq!(read_some(&mut c1), b"boot ");
        con.output(b"login: ");
        con.flush();
        assert_eq!(read_some(&mut c1), b"login: ");
        // One at a time: a second one waits.
        let mut c2 = UnixStream::connect(&p.0).unwrap();
        assert!(!con.accept());
        // Input, then its end: hung up, both ways.
        c1.write_all(b"root\n").unwrap();
        c1.shutdown(std::net::Shutdown::Write).unwrap();
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while con.has_client() && Instant::now() < deadline {
            let n = con.read_input(&mut buf);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"root\n");
        assert!(!con.has_client());
        let mut rest = Vec::new();
        c1.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // The next client gets everything again, then live output.
        assert!(con.accept());
        con.output(b"x");
        con.flush();
        let mut all = Vec::new();
        while !all.ends_with(b"x") {
            all.extend(read_some(&mut c2));
        }
        assert_eq!(all, b"boot login: x");
        assert_eq!(con.take_counters(), Counters::default());
    }

    #[test]
    fn the_backlog_keeps_the_last_64_kib() {
        let p = Sock::new("bounded");
        let mut con = SocketConsole::bind(&p.0).unwrap();
        let big: Vec<u8> = (0..BACKLOG + 1000).map(|i| (i % 251) as u8).collect();
        con.output(&big[..1000]);
        con.output(&big[1000..]);
        assert_eq!(con.backlog.len(), BACKLOG);
        assert!(con.backlog.iter().eq(big[1000..].iter()));
        assert!(!con.has_pending_output(), "no client, nothing queued");
    }

    #[test]
    fn a_client_that_stops_reading_is_hung_up_on_and_output_never_blocks() {
        let p = Sock::new("stall");
        let mut con = SocketConsole::bind(&p.0).unwrap();
        let wake = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        con.set_wake(wake.try_clone().unwrap());
        let mut c = UnixStream::connect(&p.0).unwrap();
        assert!(con.accept());
        let chunk = vec![b'a'; 4096];
        let start = Instant::now();
        // Fill the client's socket, then the queue: every call returns at once.
        while !con.has_pending_output() {
            con.output(&chunk);
            con.flush();
            assert!(start.elapsed() < Duration::from_secs(5));
        }
        assert_eq!(wake.read().unwrap(), 1, "the waiting thread is woken once");
        for _ in 0..100 {
            con.output(&chunk);
            con.flush();
        }
        assert!(start.elapsed() < STALL_TIMEOUT);
        assert!(con.has_client(), "not hung up before the timeout");
        assert!(
            con.take_counters().dropped_bytes > 0,
            "the queue is bounded"
        );
        std::thread::sleep(STALL_TIMEOUT);
        con.output(b"more");
        con.flush();
        assert!(!con.has_client(), "hung up after a second without progress");
        // It reads what was in its socket, then the end.
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut drained = Vec::new();
        c.read_to_end(&mut drained).unwrap();
        assert!(!drained.is_empty());
        // The next client is served: the backlog, then live output.
        let mut next = UnixStream::connect(&p.0).unwrap();
        assert!(con.accept());
        let got = read_some(&mut next);
        assert!(!got.is_empty());
        assert_eq!(con.take_counters().errors, 0);
    }

    #[test]
    fn a_stalled_client_is_hung_up_on_while_the_guest_is_quiet() {
        let p = Sock::new("quiet");
        let con = Mutex::new(SocketConsole::bind(&p.0).unwrap());
        let wake = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let _c = UnixStream::connect(&p.0).unwrap();
        assert!(lock(&con).accept());
        let chunk = vec![b'q'; 4096];
        while !lock(&con).has_pending_output() {
            let mut c = lock(&con);
            c.output(&chunk);
            c.flush();
        }
        assert!(lock(&con).stall_deadline().is_some());
        // No more output: the driver's wait still ends at the stall deadline, and the flush
        // after it hangs up on the client that took nothing.
        let start = Instant::now();
        while lock(&con).has_client() {
            wait(&con, &wake, false, None).unwrap();
            lock(&con).flush();
            assert!(start.elapsed() < STALL_TIMEOUT * 5, "never hung up");
        }
        assert!(start.elapsed() >= STALL_TIMEOUT / 2);
        assert_eq!(lock(&con).stall_deadline(), None);
    }

    #[test]
    fn wait_returns_for_a_client_input_output_room_and_wake() {
        let p = Sock::new("wait");
        let con = Mutex::new(SocketConsole::bind(&p.0).unwrap());
        let wake = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let short = Some(Duration::from_millis(10));
        wait(&con, &wake, true, short).unwrap(); // times out
        let mut c = UnixStream::connect(&p.0).unwrap();
        wait(&con, &wake, true, None).unwrap();
        assert!(lock(&con).accept());
        c.write_all(b"hi").unwrap();
        wait(&con, &wake, true, None).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(lock(&con).read_input(&mut b), 2);
        wake.write(1).unwrap();
        wait(&con, &wake, false, None).unwrap();
        assert!(wake.read().is_err(), "consumed");
        // The client goes: with input wanted, the end wakes the waiter and hangs up.
        drop(c);
        wait(&con, &wake, true, None).unwrap();
        assert_eq!(lock(&con).read_input(&mut b), 0);
        assert!(!lock(&con).has_client());
    }
}
