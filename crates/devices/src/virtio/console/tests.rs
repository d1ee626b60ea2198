//! virtio-console driven through real virtqueues (TestDriver) with each backend: file, null,
//! socket clients (replay, input back-pressure, reconnects, resets), malformed chains.

use super::*;
use crate::virtio::testing::{ro, wo, TestDriver, DATA, F_NEXT, F_WRITE};
use crate::virtio::transport::mmio::INT_VRING;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use virtio_queue::QueueT;

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

#[test]
fn a_client_that_stops_reading_is_hung_up_on_while_the_guest_is_quiet() {
    let path = temp_path("sock-stall");
    let (mut d, _m) = up(ConsoleBackend::Socket(path.clone()));
    let mut stalled = UnixStream::connect(&path).unwrap();
    // More output than the client's socket holds, then the guest says nothing more.
    let chunk = vec![b's'; 256 << 10];
    for i in 0..4u16 {
        send(&mut d, DATA, &chunk, i + 1);
    }
    // The next client waits in the listen queue until the stalled one is hung up on.
    let mut next = UnixStream::connect(&path).unwrap();
    let start = Instant::now();
    next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = next.read(&mut buf).expect("the next client is served");
    assert!(n > 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    // The stalled client reads what its socket held, then the end.
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut drained = Vec::new();
    stalled.read_to_end(&mut drained).expect("hung up on");
    assert!(!drained.is_empty());
}
