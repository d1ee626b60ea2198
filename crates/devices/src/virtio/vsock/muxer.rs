//! The vsock backend: multiplexes guest stream connections onto host Unix sockets the way
//! Firecracker's hybrid vsock does.
//!
//! - Host → guest: a host process connects to the listening socket and writes
//!   `CONNECT <port>\n`; the guest gets a REQUEST from (host CID, an ephemeral port); on its
//!   RESPONSE the host process reads `OK <ephemeral port>\n`, then bytes flow.
//! - Guest → host: a guest connect to (host CID, P) connects to the Unix socket `<path>_P`.
//!
//! All host sockets are nonblocking and watched in the device worker's epoll, one token each.

use super::connection::{Conn, State, CONN_BUF_ALLOC};
use super::packet::*;
use super::VsockMetrics;
use crate::virtio::worker::EventOps;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

/// Most connections at once (both directions); guest REQUESTs beyond it get an RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most accepted host connections still waiting for their `CONNECT` line.
pub const MAX_PENDING_ACCEPTS: usize = 64;
/// Longest `CONNECT <port>\n` line accepted, newline included.
pub const MAX_CONNECT_LINE: usize = 32;
/// First host-side ephemeral port of host-initiated connections.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;
/// How long a host connection may take to send its `CONNECT` line, the guest to answer a
/// REQUEST, or to send its RST after our SHUTDOWN.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Tx chains handled per run (the rest after other events).
pub const TX_BUDGET: usize = 256;
/// Rx buffers filled per run.
pub const RX_BUDGET: usize = 256;
/// Connection-less packets (RST replies) queued for the guest before tx processing pauses.
const MAX_RAW_PENDING: usize = 256;
const ACCEPT_BUDGET: usize = 32;

/// Token of the listening socket in the worker's epoll.
pub(crate) const TOKEN_LISTENER: u64 = 0;
/// Token of the device's timer.
pub(crate) const TOKEN_TIMER: u64 = 1;
/// Token of the device's "more work" event.
pub(crate) const TOKEN_KICK: u64 = 2;
const FIRST_TOKEN: u64 = 16;

/// Where host descriptors get registered (the worker's epoll, or nothing when fuzzing).
pub(crate) trait Registry {
    fn add(&mut self, fd: RawFd, token: u64, ev: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, token: u64, ev: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd) -> io::Result<()>;
}

impl Registry for EventOps<'_> {
    fn add(&mut self, fd: RawFd, token: u64, ev: EventSet) -> io::Result<()> {
        EventOps::add(self, fd, token, ev)
    }
    fn modify(&mut self, fd: RawFd, token: u64, ev: EventSet) -> io::Result<()> {
        EventOps::modify(self, fd, token, ev)
    }
    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        EventOps::remove(self, fd)
    }
}

struct NullRegistry;

impl Registry for NullRegistry {
    fn add(&mut self, _: RawFd, _: u64, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: RawFd, _: u64, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: RawFd) -> io::Result<()> {
        Ok(())
    }
}

/// Tunables (tests lower them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub max_pending_accepts: usize,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            max_pending_accepts: MAX_PENDING_ACCEPTS,
            timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// An accepted host connection that has not finished its `CONNECT` line.
struct Accept {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What to put in the next rx buffer.
enum Item {
    Raw(Header),
    Conn(u64),
}

/// The connection multiplexer (the device's backend, run on its worker thread).
pub struct Muxer {
    cid: u64,
    socket: PathBuf,
    listener: Option<UnixListener>,
    limits: Limits,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) → token.
    keys: HashMap<(u32, u32), u64>,
    accepts: HashMap<u64, Accept>,
    allocated: HashSet<u32>,
    next_port: u32,
    next_token: u64,
    /// Connections with something for the guest, in turn.
    rxq: VecDeque<u64>,
    /// Connection-less packets for the guest (RSTs).
    raw: VecDeque<Header>,
    scratch: Vec<u8>,
    metrics: Arc<VsockMetrics>,
}

impl Muxer {
    /// A muxer for guest `cid` whose guest-initiated connections go to `<socket>_<port>`, with
    /// no listening socket (host-initiated connections come only through the device's). This
    /// is what the fuzz target builds.
    pub fn new(cid: u64, socket: PathBuf, metrics: Arc<VsockMetrics>) -> Muxer {
        Muxer {
            cid,
            socket,
            listener: None,
            limits: Limits::default(),
            conns: HashMap::new(),
            keys: HashMap::new(),
            accepts: HashMap::new(),
            allocated: HashSet::new(),
            next_port: LOCAL_PORT_BASE,
            next_token: FIRST_TOKEN,
            rxq: VecDeque::new(),
            raw: VecDeque::new(),
            scratch: vec![0u8; MAX_PKT_DATA],
            metrics,
        }
    }

    pub(crate) fn with_listener(mut self, listener: UnixListener, limits: Limits) -> Muxer {
        self.listener = Some(listener);
        self.limits = limits;
        self
    }

    pub(crate) fn listener_fd(&self) -> Option<RawFd> {
        self.listener.as_ref().map(|l| l.as_raw_fd())
    }

    /// Fuzzing entry point: handles every available packet of the tx queue `tx` synchronously
    /// (no worker, no epoll), as the device would on a tx notification. Returns the chains
    /// consumed. Guest connects go to `<socket>_<port>`, so give a path that does not exist.
    pub fn fuzz_tx(&mut self, mem: &GuestMemoryMmap, tx: &mut Queue) -> usize {
        let mut n = 0;
        loop {
            let (done, more) = self.process_tx(mem, tx, &mut NullRegistry);
            n += done;
            if done == 0 || !more {
                return n;
            }
        }
    }

    /// Fuzzing entry point: writes what is pending for the guest into the rx queue `rx`
    /// synchronously. Returns the chains consumed.
    pub fn fuzz_rx(&mut self, mem: &GuestMemoryMmap, rx: &mut Queue) -> usize {
        self.process_rx(mem, rx, &mut NullRegistry).0
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn err(&self) {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues an RST answering `h` (mirroring its addresses).
    fn rst_reply(&mut self, h: &Header) {
        self.raw.push_back(Header {
            src_cid: h.dst_cid,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// Ends a connection, with an RST to the guest when `rst`.
    fn kill(&mut self, token: u64, rst: bool, reg: &mut dyn Registry) {
        let Some(c) = self.conns.remove(&token) else {
            return;
        };
        if c.registered.is_some() {
            let _ = reg.remove(c.fd());
        }
        self.keys.remove(&(c.local_port, c.peer_port));
        if c.allocated_port {
            self.allocated.remove(&c.local_port);
        }
        if rst {
            self.raw.push_back(c.rst(self.cid));
        }
        self.metrics.conns_closed.fetch_add(1, Ordering::Relaxed);
    }

    fn close_accept(&mut self, token: u64, reg: &mut dyn Registry) {
        if let Some(a) = self.accepts.remove(&token) {
            let _ = reg.remove(a.stream.as_raw_fd());
        }
    }

    /// Puts the connection in the rx queue when it has work and updates its epoll interest.
    fn refresh(&mut self, token: u64, reg: &mut dyn Registry) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.has_rx_work() && !c.in_rxq {
            c.in_rxq = true;
            self.rxq.push_back(token);
        }
        if let Some(cur) = c.registered {
            let want = c.interest();
            if want != cur {
                if reg.modify(c.fd(), token, want).is_err() {
                    self.kill(token, true, reg);
                    return;
                }
                c.registered = Some(want);
            }
        }
    }

    // ---- host side -------------------------------------------------------------------

    /// A registered host descriptor is ready.
    pub(crate) fn host_event(&mut self, token: u64, ev: EventSet, reg: &mut dyn Registry) {
        if token == TOKEN_LISTENER {
            self.accept(reg);
        } else if self.accepts.contains_key(&token) {
            self.accept_read(token, reg);
        } else if self.conns.contains_key(&token) {
            self.conn_event(token, ev, reg);
        }
    }

    fn accept(&mut self, reg: &mut dyn Registry) {
        for _ in 0..ACCEPT_BUDGET {
            let Some(l) = &self.listener else {
                return;
            };
            let stream = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            };
            if self.accepts.len() >= self.limits.max_pending_accepts
                || self.conns.len() + self.accepts.len() >= self.limits.max_connections
            {
                tracing::debug!("vsock: too many host connections; closing a new one");
                continue; // dropping it closes it
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.token();
            if reg.add(stream.as_raw_fd(), token, EventSet::IN).is_err() {
                continue;
            }
            let deadline = Instant::now() + self.limits.timeout;
            self.accepts.insert(
                token,
                Accept {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline,
                },
            );
        }
    }

    /// Reads the `CONNECT <port>\n` line; never more than [`MAX_CONNECT_LINE`] bytes, so
    /// what follows the line stays in the socket or in the leftover we keep.
    fn accept_read(&mut self, token: u64, reg: &mut dyn Registry) {
        let Some(a) = self.accepts.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE.saturating_sub(a.line.len());
        let n = match (&a.stream).read(&mut buf[..room]) {
            Ok(0) => return self.close_accept(token, reg),
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return
            }
            Err(_) => return self.close_accept(token, reg),
        };
        a.line.extend_from_slice(&buf[..n]);
        let Some(pos) = a.line.iter().position(|&b| b == b'\n') else {
            if a.line.len() >= MAX_CONNECT_LINE {
                tracing::debug!("vsock: CONNECT line too long; closing");
                self.err();
                self.close_accept(token, reg);
            }
            return;
        };
        let Some(a) = self.accepts.remove(&token) else {
            return;
        };
        let port = a.line.get(..pos).and_then(parse_connect);
        let leftover = a.line.get(pos + 1..).unwrap_or(&[]).to_vec();
        match port {
            Some(port) => self.host_connect(token, a.stream, port, leftover, reg),
            None => {
                tracing::debug!("vsock: malformed CONNECT line; closing");
                self.err();
                let _ = reg.remove(a.stream.as_raw_fd());
            }
        }
    }

    /// Starts a host-initiated connection to guest `port` on the accepted `stream` (already
    /// registered under `token`).
    fn host_connect(
        &mut self,
        token: u64,
        stream: UnixStream,
        port: u32,
        leftover: Vec<u8>,
        reg: &mut dyn Registry,
    ) {
        let fd = stream.as_raw_fd();
        if self.conns.len() >= self.limits.max_connections {
            let _ = reg.remove(fd);
            return;
        }
        let Some(local) = self.alloc_port(port) else {
            let _ = reg.remove(fd);
            return;
        };
        if reg.modify(fd, token, EventSet::empty()).is_err() {
            self.allocated.remove(&local);
            let _ = reg.remove(fd);
            return;
        }
        let mut c = Conn::new(stream, local, port, State::LocalInit);
        c.allocated_port = true;
        c.registered = Some(EventSet::empty());
        c.pend_request = true;
        c.stash = leftover;
        c.deadline = Some(Instant::now() + self.limits.timeout);
        self.keys.insert((local, port), token);
        self.conns.insert(token, c);
        self.metrics.conns_opened.fetch_add(1, Ordering::Relaxed);
        self.refresh(token, reg);
    }

    fn alloc_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=self.limits.max_connections {
            let p = self.next_port;
            self.next_port = if p >= u32::MAX - 1 {
                LOCAL_PORT_BASE
            } else {
                p + 1
            };
            if !self.allocated.contains(&p) && !self.keys.contains_key(&(p, peer)) {
                self.allocated.insert(p);
                return Some(p);
            }
        }
        None
    }

    fn conn_event(&mut self, token: u64, ev: EventSet, reg: &mut dyn Registry) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if ev.contains(EventSet::ERROR) {
            return self.kill(token, true, reg);
        }
        if ev.contains(EventSet::IN) {
            c.rx_wanted = true;
        }
        if ev.contains(EventSet::OUT) {
            if c.flush().is_err() {
                return self.kill(token, true, reg);
            }
            if !self.after_flush(token, reg) {
                return;
            }
        }
        if ev.contains(EventSet::HANG_UP) {
            let Some(c) = self.conns.get_mut(&token) else {
                return;
            };
            // The peer closed both ways: nothing more to watch, nobody to write to.
            c.host_hup = true;
            c.tx_buf.clear();
            if c.registered.take().is_some() {
                let _ = reg.remove(c.fd());
            }
            match c.state {
                State::LocalInit | State::Closing => return self.kill(token, true, reg),
                State::Established => {
                    if c.host_eof || c.peer_shutdown & SHUTDOWN_RCV != 0 {
                        if c.sent_shutdown != SHUTDOWN_BOTH {
                            c.pend_shutdown = SHUTDOWN_BOTH;
                        }
                    } else {
                        c.rx_wanted = true; // drain what is left, then EOF
                    }
                }
            }
        }
        self.refresh(token, reg);
    }

    /// After guest data went to the host socket: finish a guest shutdown once everything is
    /// written, and see whether the guest needs a credit update. False if the connection ended.
    fn after_flush(&mut self, token: u64, reg: &mut dyn Registry) -> bool {
        let Some(c) = self.conns.get_mut(&token) else {
            return false;
        };
        if c.tx_buf.is_empty() {
            if c.peer_shutdown == SHUTDOWN_BOTH {
                // The guest closed and all it sent is delivered: the RST completes its close.
                self.kill(token, true, reg);
                return false;
            }
            if c.peer_shutdown & SHUTDOWN_SEND != 0 && !c.shut_wr {
                let _ = c.stream.shutdown(Shutdown::Write);
                c.shut_wr = true;
            }
        }
        c.check_credit_update();
        true
    }

    /// Reads the host socket into the connection's stash when it should; false if the
    /// connection ended.
    fn fill(&mut self, token: u64, reg: &mut dyn Registry) -> bool {
        let Some(c) = self.conns.get_mut(&token) else {
            return false;
        };
        if !c.wants_read() {
            return true;
        }
        let n = (c.credit() as usize).min(self.scratch.len());
        let buf = &mut self.scratch[..n];
        match (&c.stream).read(buf) {
            Ok(0) => {
                c.host_eof = true;
                c.rx_wanted = false;
                // A half-close (shutdown(SHUT_WR)) keeps the guest → host direction open; a
                // full close ends both.
                c.pend_shutdown = if c.host_hup {
                    SHUTDOWN_BOTH
                } else {
                    SHUTDOWN_SEND
                };
            }
            Ok(k) => {
                c.stash.clear();
                c.stash_off = 0;
                c.stash.extend_from_slice(buf.get(..k).unwrap_or(&[]));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.rx_wanted = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                self.kill(token, true, reg);
                return false;
            }
        }
        true
    }

    /// Kills connections and host handshakes whose deadline passed.
    pub(crate) fn sweep(&mut self, now: Instant, reg: &mut dyn Registry) {
        let accepts: Vec<u64> = self
            .accepts
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in accepts {
            tracing::debug!("vsock: no CONNECT line in time; closing");
            self.close_accept(t, reg);
        }
        let conns: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        for t in conns {
            self.kill(t, true, reg);
        }
    }

    /// The earliest deadline, for the timer.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let a = self.accepts.values().map(|a| a.deadline);
        let c = self.conns.values().filter_map(|c| c.deadline);
        a.chain(c).min()
    }

    // ---- guest side ------------------------------------------------------------------

    /// Handles the tx queue's packets (at most [`TX_BUDGET`]); pauses while too many replies
    /// wait for rx buffers. Returns (chains consumed, more may be waiting).
    pub(crate) fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        reg: &mut dyn Registry,
    ) -> (usize, bool) {
        let mut n = 0;
        while n < TX_BUDGET {
            if self.raw.len() >= MAX_RAW_PENDING {
                return (n, false);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (n, false);
            };
            let head = chain.head_index();
            let parsed = read_tx(mem, chain);
            if q.add_used(mem, head, 0).is_err() {
                self.err();
                return (n, false);
            }
            n += 1;
            match parsed {
                Ok((hdr, data)) => self.guest_packet(hdr, &data, reg),
                Err(bad) => {
                    tracing::debug!("vsock: bad tx packet: {}", bad.error);
                    self.err();
                    if let Some(h) = bad.header {
                        self.metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
                        self.reject(&h, reg);
                    }
                }
            }
        }
        (n, true)
    }

    /// Answers an invalid packet: kills its connection (if it names one of ours) with an RST,
    /// or replies an RST; never answers an RST.
    fn reject(&mut self, h: &Header, reg: &mut dyn Registry) {
        if h.src_cid == self.cid && h.dst_cid == HOST_CID {
            if let Some(&t) = self.keys.get(&(h.dst_port, h.src_port)) {
                return self.kill(t, true, reg);
            }
        }
        if h.op != OP_RST {
            self.rst_reply(h);
        }
    }

    fn guest_packet(&mut self, hdr: Header, data: &[u8], reg: &mut dyn Registry) {
        self.metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .tx_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!(?hdr, "vsock: packet with bad addresses or type");
            self.err();
            if hdr.op != OP_RST {
                self.rst_reply(&hdr);
            }
            return;
        }
        let token = self.keys.get(&(hdr.dst_port, hdr.src_port)).copied();
        match (hdr.op, token) {
            (OP_REQUEST, None) => self.guest_connect(&hdr, reg),
            (OP_RST, Some(t)) => self.kill(t, false, reg),
            (OP_RST, None) => {}
            (OP_RESPONSE | OP_SHUTDOWN | OP_RW | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST, None) => {
                self.rst_reply(&hdr)
            }
            (OP_RW | OP_RESPONSE | OP_SHUTDOWN | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST, Some(t)) => {
                self.conn_packet(t, &hdr, data, reg)
            }
            (_, Some(t)) => {
                // A second REQUEST on a live connection, or an unknown op: the stream's state
                // is no longer known.
                self.err();
                self.kill(t, true, reg);
            }
            (_, None) => {
                self.err();
                self.rst_reply(&hdr);
            }
        }
    }

    fn guest_connect(&mut self, hdr: &Header, reg: &mut dyn Registry) {
        if self.conns.len() >= self.limits.max_connections {
            tracing::debug!("vsock: connection limit reached; refusing a guest connect");
            return self.rst_reply(hdr);
        }
        let mut path: OsString = self.socket.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: connect to {}: {e}", Path::new(&path).display());
                return self.rst_reply(hdr);
            }
        };
        let token = self.token();
        let mut c = Conn::new(stream, hdr.dst_port, hdr.src_port, State::Established);
        if reg.add(c.fd(), token, c.interest()).is_err() {
            return self.rst_reply(hdr);
        }
        c.registered = Some(c.interest());
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pend_response = true;
        self.keys.insert((hdr.dst_port, hdr.src_port), token);
        self.conns.insert(token, c);
        self.metrics.conns_opened.fetch_add(1, Ordering::Relaxed);
        self.refresh(token, reg);
    }

    fn conn_packet(&mut self, token: u64, hdr: &Header, data: &[u8], reg: &mut dyn Registry) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            OP_RESPONSE => {
                if c.state != State::LocalInit || c.pend_request {
                    self.err();
                    return self.kill(token, true, reg);
                }
                let ok = format!("OK {}\n", c.local_port);
                match send_all_now(&c.stream, ok.as_bytes()) {
                    Ok(()) => {
                        c.state = State::Established;
                        c.deadline = None;
                    }
                    Err(_) => return self.kill(token, true, reg),
                }
            }
            OP_RW => {
                if c.state != State::Established
                    || c.peer_shutdown & SHUTDOWN_SEND != 0
                    || c.host_hup
                {
                    return self.kill(token, true, reg);
                }
                if c.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
                    tracing::debug!("vsock: guest sent beyond its credit");
                    self.err();
                    return self.kill(token, true, reg);
                }
                c.recv_cnt += Wrapping(data.len() as u32);
                c.tx_buf.extend(data);
                if c.flush().is_err() {
                    return self.kill(token, true, reg);
                }
                if !self.after_flush(token, reg) {
                    return;
                }
            }
            OP_SHUTDOWN => {
                if c.state == State::LocalInit {
                    return self.kill(token, true, reg);
                }
                c.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                if c.peer_shutdown & SHUTDOWN_RCV != 0 {
                    c.stash.clear();
                    c.stash_off = 0;
                    c.rx_wanted = false;
                }
                if c.peer_shutdown == SHUTDOWN_BOTH && !c.tx_buf.is_empty() && c.deadline.is_none()
                {
                    c.deadline = Some(Instant::now() + self.limits.timeout);
                }
                if !self.after_flush(token, reg) {
                    return;
                }
            }
            OP_CREDIT_REQUEST => c.pend_credit_update = true,
            _ => {} // OP_CREDIT_UPDATE: the header fields above are the update
        }
        self.refresh(token, reg);
    }

    /// Fills rx buffers with pending packets (at most [`RX_BUDGET`]): connection-less RSTs
    /// first, then connections in turn. Stops when the guest has no rx buffer; the next rx
    /// notification resumes. A malformed rx chain is returned empty, the packet stays pending.
    /// Returns (chains consumed, more may be waiting).
    pub(crate) fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        reg: &mut dyn Registry,
    ) -> (usize, bool) {
        let mut used = 0;
        let mut spins = 0;
        loop {
            spins += 1;
            if used >= RX_BUDGET || spins > 4 * RX_BUDGET {
                return (used, true);
            }
            let item = if let Some(h) = self.raw.front() {
                Item::Raw(*h)
            } else if let Some(&t) = self.rxq.front() {
                if !self.fill(t, reg) {
                    self.rxq.pop_front();
                    continue;
                }
                let Some(c) = self.conns.get_mut(&t) else {
                    self.rxq.pop_front();
                    continue;
                };
                if !c.packet_ready() {
                    self.rxq.pop_front();
                    c.in_rxq = false;
                    self.refresh(t, reg);
                    continue;
                }
                Item::Conn(t)
            } else {
                return (used, false);
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (used, false);
            };
            let head = chain.head_index();
            let written = match RxBuffer::new(chain) {
                Ok(buf) => self.write_item(mem, &buf, item, reg),
                Err(e) => {
                    tracing::debug!("vsock: bad rx buffer: {e}");
                    self.err();
                    0
                }
            };
            if q.add_used(mem, head, written).is_err() {
                self.err();
                return (used, false);
            }
            used += 1;
        }
    }

    /// Writes `item` into `buf`; on success retires it and returns the length written, else
    /// 0 (the packet stays pending).
    fn write_item(
        &mut self,
        mem: &GuestMemoryMmap,
        buf: &RxBuffer,
        item: Item,
        reg: &mut dyn Registry,
    ) -> u32 {
        let (res, op, data_len, token, next) = match item {
            Item::Raw(h) => (buf.write(mem, &h, &[]), h.op, 0, None, None),
            Item::Conn(t) => {
                let Some(c) = self.conns.get(&t) else {
                    return 0;
                };
                let Some(next) = c.next_packet(buf.data_capacity()) else {
                    // Only data is pending and the buffer has no room past the header.
                    self.err();
                    return 0;
                };
                let (h, data) = c.packet(self.cid, next);
                (
                    buf.write(mem, &h, data),
                    h.op,
                    data.len(),
                    Some(t),
                    Some(next),
                )
            }
        };
        let written = match res {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("vsock: bad rx buffer: {e}");
                self.err();
                return 0;
            }
        };
        self.metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .rx_bytes
            .fetch_add(data_len as u64, Ordering::Relaxed);
        if op == OP_RST {
            self.metrics.rst_sent.fetch_add(1, Ordering::Relaxed);
        }
        match (token, next) {
            (Some(t), Some(next)) => {
                self.rxq.pop_front();
                let timeout = self.limits.timeout;
                if let Some(c) = self.conns.get_mut(&t) {
                    c.in_rxq = false;
                    c.commit(next, Instant::now(), timeout);
                }
                self.refresh(t, reg);
            }
            _ => {
                self.raw.pop_front();
            }
        }
        written
    }
}

/// Parses `CONNECT <port>` (the newline already stripped); like Firecracker, the keyword is
/// case-insensitive and surrounding whitespace (a `\r`) is ignored.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let mut words = s.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    let port = words.next()?.parse::<u32>().ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(port)
}

/// Writes a short message on a fresh nonblocking stream whose send buffer is empty; fails
/// rather than blocks if it does not all go at once.
fn send_all_now(stream: &UnixStream, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match crate::sys::send_nosignal(stream, buf.get(off..).unwrap_or(&[])) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects a nonblocking Unix stream socket to `path` without ever waiting: a listener
/// whose backlog is full refuses (EAGAIN) instead of stalling the worker.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or with a NUL byte",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by socket(2) and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` does not exceed
    // its size (checked above).
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"connect 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"CONNECT 1 2"), None);
        assert_eq!(parse_connect(b"HELLO 1"), None);
        assert_eq!(parse_connect(b"\xff\xfe"), None);
    }
}
