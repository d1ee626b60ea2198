//! The vsock device driven through real virtqueues (TestDriver) with real Unix sockets.

use super::packet::*;
use super::*;
use crate::virtio::testing::{ro, wo, Buf, TestDriver, DATA, F_NEXT, MEM_SIZE};
use crate::BusDevice;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

const CID: u64 = 3;
/// Tx packets: header at slot base, payload at base + 0x1000.
const TXBUF: u64 = DATA;
/// Rx buffers: one per descriptor index.
const RXBUF: u64 = DATA + 0x80_0000;
const RX_STRIDE: u64 = 0x2000;
const RX_LEN: u32 = (HDR_LEN + 4096) as u32;
const GUEST_BUF: u32 = 256 * 1024;

struct TmpDir(PathBuf);

impl TmpDir {
    fn new() -> TmpDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("fvvs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_for(f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

/// The test plays the guest's vsock driver.
struct Guest {
    d: TestDriver,
    m: Arc<VsockMetrics>,
    tx_count: u16,
    rx_seen: u16,
    rx_offered: u16,
    path: PathBuf,
    _dir: TmpDir,
}

impl Guest {
    fn new() -> Guest {
        Guest::build(None, 8)
    }

    fn build(limits: Option<(usize, Duration)>, rx_buffers: u16) -> Guest {
        let dir = TmpDir::new();
        let path = dir.0.join("v.sock");
        let mut v = Vsock::new(VsockConfig {
            cid: CID,
            socket: path.clone(),
        })
        .unwrap();
        if let Some((max, timeout)) = limits {
            v.set_limits(max, timeout);
        }
        let m = v.metrics();
        let d = TestDriver::new(Box::new(v));
        let mut g = Guest {
            d,
            m,
            tx_count: 0,
            rx_seen: 0,
            rx_offered: 0,
            path,
            _dir: dir,
        };
        g.up(rx_buffers);
        g
    }

    fn up(&mut self, rx_buffers: u16) {
        let st = self.d.bring_up(VIRTIO_F_VERSION_1);
        assert_eq!(st & 0x4, 0x4, "DRIVER_OK");
        assert_eq!(st & 0x40, 0, "no DEVICE_NEEDS_RESET");
        self.offer_rx(rx_buffers);
    }

    fn offer_rx(&mut self, n: u16) {
        for _ in 0..n {
            let head = self.rx_offered % self.d.qsize;
            self.d
                .add_chain(RX_QUEUE, &[wo(RXBUF + u64::from(head) * RX_STRIDE, RX_LEN)]);
            self.rx_offered = self.rx_offered.wrapping_add(1);
        }
        self.d.notify(RX_QUEUE);
    }

    fn send_chain(&mut self, bufs: &[Buf]) {
        self.d.add_chain(TX_QUEUE, bufs);
        self.kick_tx();
    }

    fn kick_tx(&mut self) {
        self.d.notify(TX_QUEUE);
        self.tx_count += 1;
        assert!(self.d.wait_used(TX_QUEUE, self.tx_count), "tx completed");
        let (_, len) = self.d.used_elem(TX_QUEUE, self.tx_count - 1);
        assert_eq!(len, 0, "tx used length");
    }

    fn slot(&self) -> u64 {
        TXBUF + u64::from(self.tx_count % 8) * 0x2_0000
    }

    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        let base = self.slot();
        self.d.put(base, &h.to_bytes());
        if data.is_empty() {
            self.send_chain(&[ro(base, HDR_LEN as u32)]);
        } else {
            self.d.put(base + 0x1000, data);
            self.send_chain(&[
                ro(base, HDR_LEN as u32),
                ro(base + 0x1000, data.len() as u32),
            ]);
        }
    }

    /// The next packet the device put in an rx buffer (the buffer is offered again).
    fn recv(&mut self) -> (Header, Vec<u8>) {
        assert!(
            self.d.wait_used(RX_QUEUE, self.rx_seen.wrapping_add(1)),
            "a packet for the guest"
        );
        let (head, len) = self.d.used_elem(RX_QUEUE, self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        assert!(len as usize >= HDR_LEN, "rx used length {len}");
        let b = self
            .d
            .get(RXBUF + u64::from(head) * RX_STRIDE, len as usize);
        let h = Header::from_bytes(b[..HDR_LEN].try_into().unwrap());
        assert_eq!(h.len as usize, b.len() - HDR_LEN);
        assert_eq!((h.dst_cid, h.type_), (CID, TYPE_STREAM));
        self.offer_rx(1);
        (h, b[HDR_LEN..].to_vec())
    }

    /// Receives `n` payload bytes of connection (`host`, `guest`) port, skipping credit
    /// updates.
    fn recv_data(&mut self, host: u32, guest: u32, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let (h, d) = self.recv();
            assert_eq!((h.src_cid, h.src_port, h.dst_port), (HOST_CID, host, guest));
            match h.op {
                OP_RW => out.extend_from_slice(&d),
                OP_CREDIT_UPDATE => {}
                op => panic!("unexpected op {op} while receiving data"),
            }
        }
        assert_eq!(out.len(), n);
        out
    }

    /// Sends a REQUEST to a host port nobody listens on and expects its RST next: proves
    /// that nothing else was queued for the guest before it.
    fn probe(&mut self) {
        self.send(hdr(OP_REQUEST, 4242, 4343), &[]);
        let (h, _) = self.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 4343, 4242));
    }

    fn errors(&self) -> u64 {
        self.m.errors.load(Ordering::Relaxed)
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn host_listener(g: &Guest, port: u32) -> UnixListener {
    let mut p = g.path.clone().into_os_string();
    p.push(format!("_{port}"));
    UnixListener::bind(PathBuf::from(p)).unwrap()
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).unwrap();
        assert_eq!(
            n,
            1,
            "line ended early: {:?}",
            String::from_utf8_lossy(&out)
        );
        if b[0] == b'\n' {
            return String::from_utf8(out).unwrap();
        }
        out.push(b[0]);
    }
}

/// The device closed the host stream (a reset if it left our bytes unread).
fn assert_closed(s: &mut UnixStream, what: &str) {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected the stream closed, got {other:?}"),
    }
}

fn host_connect(g: &Guest) -> UnixStream {
    let s = UnixStream::connect(&g.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Host-initiated handshake to guest port `port`; returns the stream and the host port.
fn handshake(g: &mut Guest, connect: &[u8], port: u32, guest_buf: u32) -> (UnixStream, u32) {
    let mut s = host_connect(g);
    s.write_all(connect).unwrap();
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_REQUEST);
    assert_eq!(h.dst_port, port);
    assert!(h.src_port >= muxer::LOCAL_PORT_BASE);
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    let hp = h.src_port;
    let mut r = hdr(OP_RESPONSE, port, hp);
    r.buf_alloc = guest_buf;
    g.send(r, &[]);
    assert_eq!(read_line(&mut s), format!("OK {hp}"));
    (s, hp)
}

#[test]
fn config_space_and_identity() {
    let mut g = Guest::new();
    assert_eq!(g.d.r(0x008), 19, "device id");
    assert_eq!(g.d.config(0, 8), CID.to_le_bytes());
    assert_eq!(g.d.config(4, 8), [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(g.d.config(0, 4), [3, 0, 0, 0]);
    g.d.t.write(0x100, &[9, 9, 9, 9]); // read-only
    assert_eq!(g.d.config(0, 8), CID.to_le_bytes());
    assert_ne!(g.d.device_features() & VIRTIO_F_VERSION_1, 0);
}

#[test]
fn guest_to_host_echo_and_close() {
    let mut g = Guest::new();
    let l = host_listener(&g, 5000);
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut total = 0;
        let mut b = vec![0u8; 8192];
        loop {
            let n = s.read(&mut b).unwrap();
            if n == 0 {
                return total;
            }
            s.write_all(&b[..n]).unwrap();
            total += n;
        }
    });
    g.send(hdr(OP_REQUEST, 40000, 5000), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 40000));
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);

    g.send(hdr(OP_RW, 40000, 5000), b"hello vsock");
    assert_eq!(g.recv_data(5000, 40000, 11), b"hello vsock");

    // Bigger payloads, several packets each way, content checked.
    let big = pattern(150_000, 7);
    for chunk in big.chunks(60_000) {
        g.send(hdr(OP_RW, 40000, 5000), chunk);
    }
    assert_eq!(g.recv_data(5000, 40000, big.len()), big);

    // A credit request is answered with our consumed count.
    g.send(hdr(OP_CREDIT_REQUEST, 40000, 5000), &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt as usize, 11 + big.len());

    // The guest closes: the device closes the host socket and answers RST.
    let mut sh = hdr(OP_SHUTDOWN, 40000, 5000);
    sh.flags = SHUTDOWN_BOTH;
    g.send(sh, &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 5000, 40000));
    assert_eq!(echo.join().unwrap(), 11 + big.len());
    let m = &g.m;
    assert_eq!(m.conns_opened.load(Ordering::Relaxed), 1);
    assert_eq!(m.conns_closed.load(Ordering::Relaxed), 1);
    assert_eq!(m.tx_bytes.load(Ordering::Relaxed), 11 + big.len() as u64);
    assert_eq!(m.rx_bytes.load(Ordering::Relaxed), 11 + big.len() as u64);
    assert_eq!(m.rst_sent.load(Ordering::Relaxed), 1);
    assert_eq!(g.errors(), 0);
}

#[test]
fn guest_half_close_shuts_host_write_side() {
    let mut g = Guest::new();
    let l = host_listener(&g, 5001);
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap(); // ends when the guest shuts down its sending side
        s.write_all(b"reply").unwrap();
        req
    });
    g.send(hdr(OP_REQUEST, 40001, 5001), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    g.send(hdr(OP_RW, 40001, 5001), b"request");
    let mut sh = hdr(OP_SHUTDOWN, 40001, 5001);
    sh.flags = SHUTDOWN_SEND;
    g.send(sh, &[]);
    assert_eq!(g.recv_data(5001, 40001, 5), b"reply");
    assert_eq!(srv.join().unwrap(), b"request");
    // The server closed: the guest hears SHUTDOWN (both flags in the end).
    let mut flags = 0;
    while flags != SHUTDOWN_BOTH {
        let (h, _) = g.recv();
        assert_eq!(h.op, OP_SHUTDOWN);
        flags |= h.flags;
    }
    g.send(hdr(OP_RST, 40001, 5001), &[]);
    assert!(wait_for(|| g.m.conns_closed.load(Ordering::Relaxed) == 1));
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut g = Guest::new();
    g.send(hdr(OP_REQUEST, 40000, 6123), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6123, 40000));
    assert_eq!(g.m.conns_opened.load(Ordering::Relaxed), 0);
    assert_eq!(g.m.rst_sent.load(Ordering::Relaxed), 1);
}

#[test]
fn host_to_guest_connect_and_data() {
    let mut g = Guest::new();
    // Data written right behind the CONNECT line must not be lost.
    let (mut s, hp) = handshake(&mut g, b"CONNECT 1234\nearly bytes", 1234, GUEST_BUF);
    assert_eq!(g.recv_data(hp, 1234, 11), b"early bytes");

    s.write_all(b"from host").unwrap();
    assert_eq!(g.recv_data(hp, 1234, 9), b"from host");

    g.send(hdr(OP_RW, 1234, hp), b"from guest");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"from guest");

    // A second connection gets another host port.
    let (_s2, hp2) = handshake(&mut g, b"connect 1234\r\n", 1234, GUEST_BUF);
    assert_ne!(hp, hp2);

    // The host closes: SHUTDOWN to the guest, whose RST ends the connection.
    drop(s);
    let mut flags = 0;
    while flags != SHUTDOWN_BOTH {
        let (h, _) = g.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_SHUTDOWN, hp, 1234));
        flags |= h.flags;
    }
    g.send(hdr(OP_RST, 1234, hp), &[]);
    assert!(wait_for(|| g.m.conns_closed.load(Ordering::Relaxed) == 1));
    assert_eq!(g.m.conns_opened.load(Ordering::Relaxed), 2);
    assert_eq!(g.errors(), 0);
}

#[test]
fn host_connect_refused_by_guest_closes_stream() {
    let mut g = Guest::new();
    let mut s = host_connect(&g);
    s.write_all(b"CONNECT 99\n").unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_REQUEST, 99));
    g.send(hdr(OP_RST, 99, h.src_port), &[]);
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap(), 0, "closed without OK");
}

#[test]
fn host_connect_garbage_is_closed() {
    let mut g = Guest::build(
        Some((muxer::MAX_CONNECTIONS, Duration::from_millis(100))),
        8,
    );
    let lines: [&[u8]; 5] = [
        b"HELLO 1\n",
        b"CONNECT\n",
        b"CONNECT notaport\n",
        b"CONNECT 1 2\n",
        &[b'C'; 40], // overlong, no newline
    ];
    for line in lines {
        let mut s = host_connect(&g);
        s.write_all(line).unwrap();
        assert_closed(&mut s, &String::from_utf8_lossy(line));
    }
    // No newline at all: closed after the handshake timeout.
    let mut s = host_connect(&g);
    s.write_all(b"CONNECT 5").unwrap();
    assert_closed(&mut s, "no newline");
    // Nothing reached the guest.
    g.probe();
    assert_eq!(g.m.conns_opened.load(Ordering::Relaxed), 0);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut g = Guest::new();
    let (mut s, hp) = handshake(&mut g, b"CONNECT 77\n", 77, 8192);
    let data = pattern(50_000, 3);
    s.write_all(&data).unwrap();
    let mut got = Vec::new();
    let mut fwd = 0u32;
    for (alloc, credit_window) in [(8192u32, 8192usize), (8192, 8192)] {
        // Exactly the advertised window arrives, then the device asks for credit.
        let mut window = 0;
        loop {
            let (h, d) = g.recv();
            assert_eq!((h.src_port, h.dst_port), (hp, 77));
            if h.op == OP_CREDIT_REQUEST {
                break;
            }
            assert_eq!(h.op, OP_RW);
            window += d.len();
            assert!(
                window <= credit_window,
                "device exceeded the guest's credit"
            );
            got.extend_from_slice(&d);
        }
        assert_eq!(window, credit_window);
        fwd += window as u32;
        let mut cu = hdr(OP_CREDIT_UPDATE, 77, hp);
        cu.buf_alloc = alloc;
        cu.fwd_cnt = fwd;
        // The last update opens a window larger than what is left.
        if fwd == 16384 {
            cu.buf_alloc = 64 * 1024;
        }
        g.send(cu, &[]);
    }
    let rest = g.recv_data(hp, 77, data.len() - got.len());
    got.extend_from_slice(&rest);
    assert_eq!(got, data);
}

#[test]
fn malformed_tx_packets() {
    let mut g = Guest::new();
    let expect_rst = |g: &mut Guest, h: Header, errors_before: u64| {
        g.send(h, &[]);
        let (r, _) = g.recv();
        assert_eq!(r.op, OP_RST, "for {h:?}");
        assert_eq!(
            (r.src_cid, r.src_port, r.dst_port),
            (h.dst_cid, h.dst_port, h.src_port)
        );
        assert_eq!(g.errors(), errors_before + 1);
    };
    let mut h = hdr(OP_REQUEST, 1, 5000);
    h.src_cid = 4;
    expect_rst(&mut g, h, 0);
    let mut h = hdr(OP_REQUEST, 2, 5000);
    h.dst_cid = 5;
    expect_rst(&mut g, h, 1);
    let mut h = hdr(OP_REQUEST, 3, 5000);
    h.type_ = 2;
    expect_rst(&mut g, h, 2);
    expect_rst(&mut g, hdr(99, 4, 5000), 3);

    // len larger than the descriptors hold: RST, never a read beyond them.
    let base = g.slot();
    let mut h = hdr(OP_RW, 5, 5000);
    h.len = 100;
    g.d.put(base, &h.to_bytes());
    g.send_chain(&[ro(base, 44), ro(base + 0x1000, 10)]);
    let (r, _) = g.recv();
    assert_eq!((r.op, r.dst_port), (OP_RST, 5));
    assert_eq!(g.errors(), 5);

    // len above the maximum packet size.
    let base = g.slot();
    let mut h = hdr(OP_RW, 6, 5000);
    h.len = (MAX_PKT_DATA + 1) as u32;
    g.d.put(base, &h.to_bytes());
    g.send_chain(&[ro(base, 44), ro(base + 0x1000, 0x1_1000)]);
    assert_eq!(g.recv().0.op, OP_RST);
    assert_eq!(g.errors(), 6);

    // Header too short: dropped.
    let base = g.slot();
    g.d.put(base, &hdr(OP_REQUEST, 7, 5000).to_bytes());
    g.send_chain(&[ro(base, 20)]);
    assert_eq!(g.errors(), 7);
    // Header in a device-writable descriptor: dropped.
    g.send_chain(&[wo(base, 44)]);
    assert_eq!(g.errors(), 8);
    // Buffers outside guest memory (fully, and straddling the end): dropped.
    g.send_chain(&[ro(MEM_SIZE as u64 + 0x1000, 44)]);
    g.send_chain(&[ro(MEM_SIZE as u64 - 20, 44)]);
    g.send_chain(&[ro(u64::MAX - 10, 44)]);
    assert_eq!(g.errors(), 11);
    let base = g.slot();
    let mut h = hdr(OP_RW, 8, 5000);
    h.len = 16;
    g.d.put(base, &h.to_bytes());
    g.send_chain(&[ro(base, 44), ro(MEM_SIZE as u64 - 8, 16)]);
    let (r, _) = g.recv();
    assert_eq!((r.op, r.dst_port), (OP_RST, 8));
    assert_eq!(g.errors(), 12);

    // A looping chain ends (the iterator gives up after the queue size).
    let base = g.slot();
    g.d.put(base, &hdr(OP_REQUEST, 9, 5999).to_bytes());
    g.d.desc(TX_QUEUE, 15, base, 44, F_NEXT, 15);
    g.d.offer(TX_QUEUE, 15);
    g.kick_tx();
    let _ = g.recv(); // whatever was read, it was answered (RST: nobody listens on 5999)

    // A header split over two descriptors is fine (and no listener: RST).
    let base = g.slot();
    g.d.put(base, &hdr(OP_REQUEST, 10, 5998).to_bytes());
    g.send_chain(&[ro(base, 10), ro(base + 10, 34)]);
    let (r, _) = g.recv();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 5998, 10));

    // Packets for no connection get RSTs, RSTs get nothing.
    g.send(hdr(OP_RST, 11, 5000), &[]);
    g.send(hdr(OP_RW, 12, 5000), b"data");
    let (r, _) = g.recv();
    assert_eq!((r.op, r.dst_port), (OP_RST, 12));
    g.probe();
    assert_eq!(g.m.conns_opened.load(Ordering::Relaxed), 0);
}

#[test]
fn malformed_rx_buffers_keep_the_packet() {
    let mut g = Guest::build(None, 0);
    // No rx buffer: the RST waits in the device.
    g.send(hdr(OP_REQUEST, 20, 5000), &[]);
    // Bad buffers: device-readable, too small, outside memory; then a good one.
    g.d.add_chain(RX_QUEUE, &[ro(RXBUF, RX_LEN)]);
    g.d.add_chain(RX_QUEUE, &[wo(RXBUF, 20)]);
    g.d.add_chain(RX_QUEUE, &[wo(MEM_SIZE as u64 - 10, RX_LEN)]);
    g.d.add_chain(
        RX_QUEUE,
        &[
            wo(RXBUF + 10 * RX_STRIDE, 30),
            wo(RXBUF + 11 * RX_STRIDE, 30),
        ],
    );
    g.d.notify(RX_QUEUE);
    assert!(g.d.wait_used(RX_QUEUE, 4));
    for n in 0..3 {
        assert_eq!(
            g.d.used_elem(RX_QUEUE, n).1,
            0,
            "bad rx buffer {n} returned empty"
        );
    }
    // The good one spans two descriptors: header split 30 + 14.
    assert_eq!(g.d.used_elem(RX_QUEUE, 3).1, HDR_LEN as u32);
    let mut b = g.d.get(RXBUF + 10 * RX_STRIDE, 30);
    b.extend(g.d.get(RXBUF + 11 * RX_STRIDE, 14));
    let h = Header::from_bytes(b[..].try_into().unwrap());
    assert_eq!((h.op, h.dst_port, h.src_port), (OP_RST, 20, 5000));
    assert_eq!(g.errors(), 3);
}

#[test]
fn connection_limit_resets_the_excess() {
    let mut g = Guest::build(Some((2, muxer::HANDSHAKE_TIMEOUT)), 8);
    let l = host_listener(&g, 6000);
    let keep = std::thread::spawn(move || {
        let a = l.accept().unwrap();
        let b = l.accept().unwrap();
        (a, b)
    });
    for port in [100, 101, 102] {
        g.send(hdr(OP_REQUEST, port, 6000), &[]);
    }
    let ops: Vec<(u16, u32)> = (0..3)
        .map(|_| g.recv().0)
        .map(|h| (h.op, h.dst_port))
        .collect();
    assert_eq!(ops, [(OP_RESPONSE, 100), (OP_RESPONSE, 101), (OP_RST, 102)]);
    let _streams = keep.join().unwrap();
    // A duplicate REQUEST on a live connection resets it.
    g.send(hdr(OP_REQUEST, 100, 6000), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 100));
    assert_eq!(g.m.conns_closed.load(Ordering::Relaxed), 1);
}

#[test]
fn reset_and_reactivate() {
    let mut g = Guest::new();
    let l = host_listener(&g, 5000);
    g.send(hdr(OP_REQUEST, 40000, 5000), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut hs, _) = l.accept().unwrap();
    hs.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    g.d.w(0x070, 0); // driver reset
    assert_eq!(g.d.r(0x070), 0);
    let mut b = [0u8; 4];
    assert_eq!(hs.read(&mut b).unwrap(), 0, "reset closed the connection");
    assert!(g.path.exists(), "the listening socket survives a reset");

    g.d.reset_device();
    g.tx_count = 0;
    g.rx_seen = 0;
    g.rx_offered = 0;
    g.up(8);
    g.probe();
    let (mut s, hp) = handshake(&mut g, b"CONNECT 1\n", 1, GUEST_BUF);
    s.write_all(b"again").unwrap();
    assert_eq!(g.recv_data(hp, 1, 5), b"again");
}

#[test]
fn constructor_errors_name_the_problem() {
    let dir = TmpDir::new();
    let taken = dir.0.join("taken");
    std::fs::write(&taken, b"keep me").unwrap();
    let e = Vsock::new(VsockConfig {
        cid: 3,
        socket: taken.clone(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, VsockError::SocketExists(_)));
    assert!(e.to_string().contains(taken.to_str().unwrap()), "{e}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");

    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(VsockConfig {
            cid,
            socket: dir.0.join("c.sock"),
        })
        .err()
        .unwrap();
        assert!(matches!(e, VsockError::InvalidCid(c) if c == cid));
        assert!(e.to_string().contains(&cid.to_string()));
    }
    let missing = dir.0.join("no/such/dir/v.sock");
    let e = Vsock::new(VsockConfig {
        cid: 3,
        socket: missing.clone(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, VsockError::ParentMissing(_)));
    assert!(e.to_string().contains(missing.to_str().unwrap()));
    let long = dir.0.join("x".repeat(120));
    let e = Vsock::new(VsockConfig {
        cid: 3,
        socket: long,
    })
    .err()
    .unwrap();
    assert!(matches!(e, VsockError::PathTooLong { .. }), "{e}");

    // Bound at once, removed on drop; a second device on the same path is refused.
    let p = dir.0.join("v.sock");
    let v = Vsock::new(VsockConfig {
        cid: 3,
        socket: p.clone(),
    })
    .unwrap();
    assert!(UnixStream::connect(&p).is_ok());
    assert!(matches!(
        Vsock::new(VsockConfig {
            cid: 4,
            socket: p.clone()
        }),
        Err(VsockError::SocketExists(_))
    ));
    drop(v);
    assert!(!p.exists());

    // A file that replaced our socket is not ours to delete.
    let v = Vsock::new(VsockConfig {
        cid: 3,
        socket: p.clone(),
    })
    .unwrap();
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, b"someone else's").unwrap();
    drop(v);
    assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
}

/// What the fuzz target does (fuzz/fuzz_targets/vsock.rs), on a few fixed inputs.
#[test]
fn fuzz_entry_point_survives_junk() {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let run = |data: &[u8]| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mem.write_slice(&data[..data.len().min(0x1_0000)], GuestAddress(0))
            .unwrap();
        let mk = |d: u32, a: u32, u: u32| {
            let mut q = Queue::new(16).unwrap();
            q.set_size(16);
            q.set_desc_table_address(Some(d), Some(0));
            q.set_avail_ring_address(Some(a), Some(0));
            q.set_used_ring_address(Some(u), Some(0));
            q.set_ready(true);
            q
        };
        let mut tx = mk(0x1000, 0x2000, 0x3000);
        let mut rx = mk(0x4000, 0x5000, 0x6000);
        let mut m = Muxer::new(
            3,
            PathBuf::from("/nonexistent-ferrovisor-fuzz/v.sock"),
            Arc::new(VsockMetrics::default()),
        );
        let t = m.fuzz_tx(&mem, &mut tx);
        let r = m.fuzz_rx(&mem, &mut rx);
        (t, r, mem)
    };
    run(&[]);
    run(&[0xff; 0x8000]);
    let mut seed = 0x1234_5678u32;
    for _ in 0..64 {
        let junk: Vec<u8> = (0..0x7000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        run(&junk);
    }
    // A well-formed REQUEST and rx buffer: refused with an RST (no such socket).
    let mut mem = vec![0u8; 0x8000];
    let put = |mem: &mut Vec<u8>, at: usize, b: &[u8]| mem[at..at + b.len()].copy_from_slice(b);
    put(&mut mem, 0x7000, &hdr(OP_REQUEST, 1, 2).to_bytes());
    put(&mut mem, 0x1000, &0x7000u64.to_le_bytes()); // tx desc 0: addr
    put(&mut mem, 0x1008, &44u32.to_le_bytes()); // len, flags 0
    put(&mut mem, 0x2002, &1u16.to_le_bytes()); // tx avail idx (ring[0] = 0)
    put(&mut mem, 0x4000, &0x7800u64.to_le_bytes()); // rx desc 0
    put(&mut mem, 0x4008, &44u32.to_le_bytes());
    put(&mut mem, 0x400c, &2u16.to_le_bytes()); // device-writable
    put(&mut mem, 0x5002, &1u16.to_le_bytes());
    let (t, r, gm) = run(&mem);
    assert_eq!((t, r), (1, 1));
    let mut b = [0u8; 44];
    gm.read_slice(&mut b, GuestAddress(0x7800)).unwrap();
    let h = Header::from_bytes(&b);
    assert_eq!((h.op, h.src_port, h.dst_port, h.dst_cid), (OP_RST, 2, 1, 3));
}

#[test]
fn replies_wait_for_rx_buffers_without_loss() {
    let mut g = Guest::build(None, 0);
    for port in 0..20 {
        g.send(hdr(OP_REQUEST, 300 + port, 7000), &[]);
    }
    g.offer_rx(8);
    for port in 0..20 {
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 300 + port));
    }
    assert_eq!(g.m.rst_sent.load(Ordering::Relaxed), 20);
}

#[test]
fn guest_exceeding_our_credit_is_reset() {
    let mut g = Guest::new();
    let l = host_listener(&g, 5002);
    g.send(hdr(OP_REQUEST, 40002, 5002), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (_s, _) = l.accept().unwrap(); // never reads
    let chunk = pattern(MAX_PKT_DATA, 1);
    // Far more than our buffer plus what the host socket can hold.
    for _ in 0..16 {
        g.send(hdr(OP_RW, 40002, 5002), &chunk);
    }
    loop {
        let (h, _) = g.recv();
        assert_eq!((h.src_port, h.dst_port), (5002, 40002));
        if h.op == OP_RST {
            break;
        }
        assert_eq!(h.op, OP_CREDIT_UPDATE);
    }
    assert!(g.errors() >= 1);
    assert_eq!(g.m.conns_closed.load(Ordering::Relaxed), 1);
}
