//! One stream connection between a guest port and a host Unix socket: the state machine, the
//! credit accounting in both directions and the buffers in between.

use super::packet::{Header, HOST_CID, OP_RST, SHUTDOWN_BOTH, SHUTDOWN_RCV, TYPE_STREAM};
use super::packet::{
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN,
};
use crate::sys::send_nosignal;
use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vmm_sys_util::epoll::EventSet;

/// Receive buffer we advertise to the guest for each connection (bytes of guest → host data we
/// hold when the host socket does not take it).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Consumed guest data after which we tell the guest about the freed space unprompted.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: REQUEST queued or sent to the guest, no RESPONSE yet.
    LocalInit,
    /// Data flows.
    Established,
    /// We sent SHUTDOWN with both flags and wait for the guest's RST.
    Closing,
}

/// The next packet a connection has for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Request,
    Response,
    Data(usize),
    CreditUpdate,
    CreditRequest,
    Shutdown(u32),
}

pub(crate) struct Conn {
    pub stream: UnixStream,
    /// Host-side port (ours).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    /// `local_port` came from the ephemeral allocator.
    pub allocated_port: bool,
    pub state: State,
    /// Events the descriptor is registered for; None once removed from epoll (after HUP).
    pub registered: Option<EventSet>,
    /// The guest's receive buffer and consumed count (from every header it sends).
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Guest bytes written to the host socket.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` in the last header we sent.
    pub last_fwd_sent: Wrapping<u32>,
    /// Guest bytes received.
    pub recv_cnt: Wrapping<u32>,
    /// Guest → host bytes the socket has not taken yet.
    pub tx_buf: VecDeque<u8>,
    /// Host → guest bytes read but not yet delivered (`stash[stash_off..]`).
    pub stash: Vec<u8>,
    pub stash_off: usize,
    pub pend_request: bool,
    pub pend_response: bool,
    pub pend_credit_update: bool,
    pub pend_credit_request: bool,
    /// SHUTDOWN flags to send once the stash is delivered (0: none).
    pub pend_shutdown: u32,
    /// SHUTDOWN flags sent so far.
    pub sent_shutdown: u32,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// Reading the host socket returned end of file.
    pub host_eof: bool,
    /// The host side hung up completely.
    pub host_hup: bool,
    /// We shut down the host socket's write side.
    pub shut_wr: bool,
    /// The host socket may have data to read.
    pub rx_wanted: bool,
    /// The connection sits in the muxer's rx queue.
    pub in_rxq: bool,
    /// When the connection is killed unless something happens.
    pub deadline: Option<Instant>,
}

impl Conn {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Conn {
        Conn {
            stream,
            local_port,
            peer_port,
            allocated_port: false,
            state,
            registered: None,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            recv_cnt: Wrapping(0),
            tx_buf: VecDeque::new(),
            stash: Vec::new(),
            stash_off: 0,
            pend_request: false,
            pend_response: false,
            pend_credit_update: false,
            pend_credit_request: false,
            pend_shutdown: 0,
            sent_shutdown: 0,
            peer_shutdown: 0,
            host_eof: false,
            host_hup: false,
            shut_wr: false,
            rx_wanted: false,
            in_rxq: false,
            deadline: None,
        }
    }

    pub fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// Bytes the guest can still take.
    pub fn credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn stashed(&self) -> &[u8] {
        self.stash.get(self.stash_off..).unwrap_or(&[])
    }

    fn receiving(&self) -> bool {
        self.state == State::Established && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// The host socket should be read now (into the empty stash).
    pub fn wants_read(&self) -> bool {
        self.receiving()
            && self.stashed().is_empty()
            && self.rx_wanted
            && !self.host_eof
            && self.credit() > 0
    }

    fn data_ready(&self) -> bool {
        self.receiving() && !self.stashed().is_empty() && self.credit() > 0
    }

    fn shutdown_ready(&self) -> bool {
        self.pend_shutdown != 0 && self.stashed().is_empty()
    }

    /// A packet can be built right now.
    pub fn packet_ready(&self) -> bool {
        self.pend_request
            || self.pend_response
            || self.pend_credit_update
            || self.pend_credit_request
            || self.shutdown_ready()
            || self.data_ready()
    }

    /// Belongs in the rx queue.
    pub fn has_rx_work(&self) -> bool {
        self.packet_ready() || self.wants_read()
    }

    /// What the host socket should be watched for.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.receiving() && !self.rx_wanted && !self.host_eof && self.credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// The next packet for the guest given `data_cap` payload bytes of room.
    pub fn next_packet(&self, data_cap: usize) -> Option<Next> {
        if self.pend_request {
            return Some(Next::Request);
        }
        if self.pend_response {
            return Some(Next::Response);
        }
        if self.data_ready() && data_cap > 0 {
            let n = self
                .stashed()
                .len()
                .min(self.credit() as usize)
                .min(data_cap);
            return Some(Next::Data(n));
        }
        if self.pend_credit_update {
            return Some(Next::CreditUpdate);
        }
        if self.pend_credit_request {
            return Some(Next::CreditRequest);
        }
        if self.shutdown_ready() {
            return Some(Next::Shutdown(self.pend_shutdown));
        }
        None
    }

    /// A header from us to the guest on this connection.
    pub fn header(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Header and payload of `next`.
    pub fn packet(&self, guest_cid: u64, next: Next) -> (Header, &[u8]) {
        let (op, flags, data) = match next {
            Next::Request => (OP_REQUEST, 0, &[][..]),
            Next::Response => (OP_RESPONSE, 0, &[][..]),
            Next::Data(n) => (OP_RW, 0, self.stashed().get(..n).unwrap_or(&[])),
            Next::CreditUpdate => (OP_CREDIT_UPDATE, 0, &[][..]),
            Next::CreditRequest => (OP_CREDIT_REQUEST, 0, &[][..]),
            Next::Shutdown(f) => (OP_SHUTDOWN, f, &[][..]),
        };
        let mut h = self.header(guest_cid, op);
        h.flags = flags;
        h.len = data.len() as u32;
        (h, data)
    }

    /// `next` reached the guest.
    pub fn commit(&mut self, next: Next, now: Instant, timeout: std::time::Duration) {
        match next {
            Next::Request => self.pend_request = false,
            Next::Response => self.pend_response = false,
            Next::Data(n) => {
                self.stash_off = (self.stash_off + n).min(self.stash.len());
                if self.stash_off == self.stash.len() {
                    self.stash.clear();
                    self.stash_off = 0;
                }
                self.rx_cnt += Wrapping(n as u32);
                if self.credit() == 0 {
                    // The host may have more: ask the guest to tell us when it has room.
                    self.pend_credit_request = true;
                }
            }
            Next::CreditUpdate => {}
            Next::CreditRequest => self.pend_credit_request = false,
            Next::Shutdown(f) => {
                self.pend_shutdown = 0;
                self.sent_shutdown |= f;
                if self.sent_shutdown == SHUTDOWN_BOTH {
                    self.state = State::Closing;
                    self.deadline = Some(now + timeout);
                }
            }
        }
        // Every header carries buf_alloc and fwd_cnt.
        self.pend_credit_update = false;
        self.last_fwd_sent = self.fwd_cnt;
    }

    /// Writes as much of `tx_buf` to the host socket as it takes.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n.min(a.len()));
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether we owe the guest a credit update: a good chunk consumed, or the guest's view of
    /// our free space is getting small while we have freed some.
    pub fn check_credit_update(&mut self) {
        let unreported = (self.fwd_cnt - self.last_fwd_sent).0;
        let guest_in_flight = (self.recv_cnt - self.last_fwd_sent).0;
        let guest_free = CONN_BUF_ALLOC.saturating_sub(guest_in_flight);
        if unreported >= CREDIT_UPDATE_THRESHOLD
            || (unreported > 0 && guest_free < CREDIT_UPDATE_THRESHOLD)
        {
            self.pend_credit_update = true;
        }
    }

    /// The RST that ends this connection.
    pub fn rst(&self, guest_cid: u64) -> Header {
        self.header(guest_cid, OP_RST)
    }
}
