//! virtio-blk driven through the MMIO transport and real split virtqueues, with both engines,
//! against temporary image files.

use super::engine::Uring;
use super::*;
use crate::virtio::testing::{ro, wo, Buf, TestDriver, DATA, F_NEXT, F_WRITE, MEM_SIZE};
use crate::BusDevice;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

/// Request header.
const HDR: u64 = DATA;
/// Status byte.
const ST: u64 = DATA + 0x800;
/// Discard / write-zeroes segments.
const SEGS: u64 = DATA + 0x1000;
/// Data buffers.
const BUF: u64 = DATA + 0x1_0000;

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

static SEQ: AtomicU64 = AtomicU64::new(0);

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "fv-blk-test-{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ))
}

/// A temporary image file, removed on drop.
struct Image(PathBuf);

impl Image {
    fn with(content: &[u8]) -> Image {
        let p = temp_path("img");
        std::fs::write(&p, content).unwrap();
        Image(p)
    }
    fn new(len: usize) -> Image {
        Image::with(&pattern(len))
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
    fn config(&self, engine: IoEngine) -> BlockConfig {
        BlockConfig {
            path: self.0.clone(),
            readonly: false,
            id: None,
            rate: RateLimit::default(),
            engine,
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 512) as u8 | 1)
        .collect()
}

fn engines() -> Vec<IoEngine> {
    match Uring::available() {
        Ok(()) => vec![IoEngine::Sync, IoEngine::Uring],
        Err(e) => {
            eprintln!("io_uring is not available here ({e}): only the sync engine is tested");
            vec![IoEngine::Sync]
        }
    }
}

/// True (after saying so) if test `name` cannot run here for want of restricted io_uring rings.
fn skip_without_uring(name: &str) -> bool {
    match Uring::available() {
        Ok(()) => false,
        Err(e) => {
            eprintln!("SKIPPED {name}: restricted io_uring rings are not available here: {e}");
            true
        }
    }
}

/// A block device lent to the transport while the test keeps a hand on it (to look at its
/// ring between activations).
struct Shared(Arc<Mutex<Block>>);

impl Shared {
    fn dev(&self) -> std::sync::MutexGuard<'_, Block> {
        self.0.lock().unwrap()
    }
}

impl VirtioDevice for Shared {
    fn device_type(&self) -> u32 {
        self.dev().device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        self.dev().features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.dev().read_config(offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.dev().write_config(offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        self.dev().activate(mem, features, queues, interrupt)
    }
    fn queue_notify(&mut self, index: usize) {
        self.dev().queue_notify(index);
    }
    fn reset(&mut self) {
        self.dev().reset();
    }
}

/// A driven device.
struct Dev {
    d: TestDriver,
    m: Arc<BlockMetrics>,
    done: u16,
}

impl Dev {
    fn new(cfg: BlockConfig) -> Dev {
        Dev::with_features(cfg, u64::MAX)
    }

    /// A device brought up with the offered features that are in `wanted`.
    fn with_features(cfg: BlockConfig, wanted: u64) -> Dev {
        let want = cfg.engine;
        let b = Block::new(cfg).unwrap();
        assert_eq!(b.engine_in_use(), want);
        let m = b.metrics();
        let mut d = TestDriver::new(Box::new(b));
        assert_eq!(
            d.bring_up(wanted),
            1 | 2 | 4 | 8,
            "DRIVER_OK, no NEEDS_RESET"
        );
        Dev { d, m, done: 0 }
    }

    fn hdr(&self, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.d.put(HDR, &h);
    }

    fn submit(&mut self, bufs: &[Buf]) -> u16 {
        self.d.add_chain(0, bufs)
    }

    /// Notifies and waits for `n` more completions.
    fn wait(&mut self, n: u16) {
        self.d.notify(0);
        self.done += n;
        assert!(self.d.wait_used(0, self.done), "requests completed");
    }

    /// Runs one chain; returns (used length, status byte at ST).
    fn run(&mut self, bufs: &[Buf]) -> (u32, u8) {
        self.d.put(ST, &[0xee]);
        let head = self.submit(bufs);
        self.wait(1);
        let (id, len) = self.d.used_elem(0, self.done - 1);
        assert_eq!(id, u32::from(head));
        (len, self.d.get(ST, 1)[0])
    }

    fn metric(&self, name: &str) -> u64 {
        self.m
            .counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }

    fn segment(&self, at: u64, sector: u64, num: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.d.put(at, &s);
    }
}

#[test]
fn config_space_and_features() {
    let img = Image::new(64 * 512 + 100); // not a multiple of 512: rounded down
    let b = Block::new(img.config(IoEngine::Sync)).unwrap();
    assert_eq!(b.capacity(), 64);
    let f = b.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & 1 << bit, 0, "feature {bit}");
    }
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    let mut odd = [0xffu8; 8];
    b.read_config(u64::MAX - 3, &mut odd);
    assert_eq!(odd, [0; 8], "reads past the end (and wrapping) give zeros");

    let mut d = TestDriver::new(Box::new(b));
    let cap = d.config(0, 8);
    assert_eq!(u64::from_le_bytes(cap.try_into().unwrap()), 64);
    assert_eq!(d.config(12, 4), SEG_MAX.to_le_bytes());
    assert_eq!(d.config(20, 4), 512u32.to_le_bytes());
    assert_eq!(d.config(36, 4), MAX_DISCARD_SECTORS.to_le_bytes());
    assert_eq!(d.config(40, 4), MAX_DISCARD_SEG.to_le_bytes());
    assert_eq!(d.config(52, 4), 1u32.to_le_bytes());
    assert_eq!(d.config(56, 1), [1]);
    assert_eq!(d.config(1, 1), [0], "byte-wide read inside capacity");
    assert_eq!(d.config(0x400, 4), [0; 4]);
    d.bring_up(u64::MAX);
    d.t.write(0x100, &[9, 9, 9, 9]);
    assert_eq!(d.config(0, 4), 64u32.to_le_bytes(), "config writes ignored");

    let mut cfg = img.config(IoEngine::Sync);
    cfg.readonly = true;
    let b = Block::new(cfg).unwrap();
    assert_ne!(b.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(b.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
}

#[test]
fn read_write_round_trip() {
    for engine in engines() {
        let img = Image::new(64 * 512);
        let mut dev = Dev::new(img.config(engine));
        // Write sectors 3..5 from two buffers.
        let data: Vec<u8> = (0..1024).map(|i| (i * 13 % 256) as u8).collect();
        dev.d.put(BUF, &data[..512]);
        dev.d.put(BUF + 0x2000, &data[512..]);
        dev.hdr(VIRTIO_BLK_T_OUT, 3);
        let r = dev.run(&[ro(HDR, 16), ro(BUF, 512), ro(BUF + 0x2000, 512), wo(ST, 1)]);
        assert_eq!(r, (1, OK), "{engine:?}");
        let mut want = pattern(64 * 512);
        want[3 * 512..5 * 512].copy_from_slice(&data);
        assert_eq!(img.bytes(), want, "{engine:?}: host file after OUT");

        // Read sectors 2..6 back, the status byte sharing the last buffer.
        dev.hdr(VIRTIO_BLK_T_IN, 2);
        dev.d.put(BUF + 0x1_0000, &[0u8; 2048]);
        dev.d.put(BUF + 0x1_0000 + 2048, &[0xee]);
        let head = dev.submit(&[ro(HDR, 16), wo(BUF + 0x1_0000, 2049)]);
        dev.wait(1);
        assert_eq!(dev.d.used_elem(0, dev.done - 1), (u32::from(head), 2049));
        assert_eq!(dev.d.get(BUF + 0x1_0000 + 2048, 1), [OK]);
        assert_eq!(dev.d.get(BUF + 0x1_0000, 2048), want[1024..3072]);

        // Several reads in flight at once, completed in any order.
        let mut heads = Vec::new();
        for k in 0..4u64 {
            let h = HDR + 0x100 + k * 16;
            let mut hb = [0u8; 16];
            hb[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            hb[8..16].copy_from_slice(&(k * 8).to_le_bytes());
            dev.d.put(h, &hb);
            heads.push(dev.submit(&[
                ro(h, 16),
                wo(BUF + 0x4_0000 + k * 0x1000, 4096),
                wo(ST + 1 + k, 1),
            ]));
        }
        dev.wait(4);
        let mut seen = Vec::new();
        for n in dev.done - 4..dev.done {
            let (id, len) = dev.d.used_elem(0, n);
            assert_eq!(len, 4097);
            seen.push(id as u16);
        }
        seen.sort();
        assert_eq!(seen, heads);
        for k in 0..4u64 {
            assert_eq!(dev.d.get(ST + 1 + k, 1), [OK]);
            let off = (k * 4096) as usize;
            assert_eq!(
                dev.d.get(BUF + 0x4_0000 + k * 0x1000, 4096),
                want[off..off + 4096],
                "{engine:?}: read {k}"
            );
        }
        assert_eq!(dev.metric("write_requests"), 1);
        assert_eq!(dev.metric("write_bytes"), 1024);
        assert_eq!(dev.metric("read_requests"), 5);
        assert_eq!(dev.metric("read_bytes"), 2048 + 4 * 4096);
        assert_eq!(dev.metric("errors"), 0);
        assert_eq!(dev.metric("inflight"), 0);
    }
}

#[test]
fn flush_and_header_over_two_buffers() {
    for engine in engines() {
        let img = Image::new(8 * 512);
        let mut dev = Dev::new(img.config(engine));
        dev.hdr(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(ST, 1)]), (1, OK));
        assert_eq!(dev.metric("flush_requests"), 1);
        // The header split 8 + 8 over two descriptors is fine.
        dev.hdr(VIRTIO_BLK_T_IN, 1);
        let r = dev.run(&[ro(HDR, 8), ro(HDR + 8, 8), wo(BUF, 512), wo(ST, 1)]);
        assert_eq!(r, (513, OK));
        assert_eq!(dev.d.get(BUF, 512), pattern(1024)[512..]);
    }
}

#[test]
fn interrupts_with_and_without_event_idx() {
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
    for engine in engines() {
        let img = Image::new(8 * 512);
        for wanted in [
            u64::MAX,
            !(1u64 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC),
        ] {
            let mut dev = Dev::with_features(img.config(engine), wanted);
            for round in 0..3 {
                dev.d.irq.ack(u32::MAX);
                // used_event (for EVENT_IDX): interrupt once the used index passes `done`.
                let avail = crate::virtio::testing::rings(0).1;
                let used_event = avail + 4 + 2 * u64::from(dev.d.qsize);
                dev.d
                    .mem
                    .write_obj(dev.done, GuestAddress(used_event))
                    .unwrap();
                dev.hdr(VIRTIO_BLK_T_IN, round);
                assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 512), wo(ST, 1)]), (513, OK));
                // The interrupt is raised after the used element is published; give it a moment.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while dev.d.irq.status() & crate::virtio::transport::mmio::INT_VRING == 0
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                assert_ne!(
                    dev.d.irq.status() & crate::virtio::transport::mmio::INT_VRING,
                    0,
                    "{engine:?} features {wanted:#x} round {round}"
                );
            }
        }
    }
}

#[test]
fn get_id_default_and_configured() {
    let img = Image::new(4096);
    let mut dev = Dev::new(img.config(IoEngine::Sync));
    dev.hdr(VIRTIO_BLK_T_GET_ID, 0);
    dev.d.put(BUF, &[0xaa; 20]);
    assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 20), wo(ST, 1)]), (21, OK));
    let id = dev.d.get(BUF, 20);
    assert!(id.starts_with(b"fv-"), "{id:?}");
    assert!(id[3..19].iter().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(id[19], 0);
    // Stable: a second device on the same file reports the same id.
    let mut again = Dev::new(img.config(IoEngine::Sync));
    again.hdr(VIRTIO_BLK_T_GET_ID, 0);
    again.run(&[ro(HDR, 16), wo(BUF, 20), wo(ST, 1)]);
    assert_eq!(again.d.get(BUF, 20), id);

    let mut cfg = img.config(IoEngine::Sync);
    cfg.id = Some("serial-1".into());
    let mut dev = Dev::new(cfg);
    dev.hdr(VIRTIO_BLK_T_GET_ID, 0);
    dev.d.put(BUF, &[0xaa; 32]);
    assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 32), wo(ST, 1)]), (21, OK));
    assert_eq!(
        dev.d.get(BUF, 32),
        [&b"serial-1"[..], &[0; 12], &[0xaa; 12]].concat()
    );
    // A shorter buffer gets a prefix.
    assert_eq!(
        dev.run(&[ro(HDR, 16), wo(BUF + 100, 4), wo(ST, 1)]),
        (5, OK)
    );
    assert_eq!(dev.d.get(BUF + 100, 4), b"seri");
    // GET_ID into a device-readable buffer is refused.
    assert_eq!(dev.run(&[ro(HDR, 16), ro(BUF, 20), wo(ST, 1)]), (1, IOERR));
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    for engine in engines() {
        let img = Image::with(&vec![0xaa; 64 * 512]);
        let mut dev = Dev::new(img.config(engine));
        // Discard two ranges: sectors 8..16 and 32..40.
        dev.hdr(VIRTIO_BLK_T_DISCARD, 0);
        dev.segment(SEGS, 8, 8, 0);
        dev.segment(SEGS + 16, 32, 8, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 32), wo(ST, 1)]), (1, OK));
        // Write zeroes without and with unmap.
        dev.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        dev.segment(SEGS, 1, 2, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 16), wo(ST, 1)]), (1, OK));
        dev.segment(SEGS, 50, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 16), wo(ST, 1)]), (1, OK));
        let got = img.bytes();
        assert_eq!(got.len(), 64 * 512, "size kept");
        for (s, sector) in got.chunks(512).enumerate() {
            let zero = (8..16).contains(&s)
                || (32..40).contains(&s)
                || (1..3).contains(&s)
                || (50..53).contains(&s);
            let want = if zero { 0 } else { 0xaa };
            assert!(sector.iter().all(|&b| b == want), "{engine:?}: sector {s}");
        }
        assert_eq!(dev.metric("discard_requests"), 1);
        assert_eq!(dev.metric("write_zeroes_requests"), 2);

        let before = img.bytes();
        // Unmap on a discard and unknown flags: unsupported.
        dev.hdr(VIRTIO_BLK_T_DISCARD, 0);
        dev.segment(SEGS, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 16), wo(ST, 1)]).1, UNSUPP);
        dev.segment(SEGS, 0, 1, 0x80);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 16), wo(ST, 1)]).1, UNSUPP);
        // Out of range, wrapping, too long, bad segment sizes and counts: I/O errors.
        for (sector, num) in [(60, 8), (u64::MAX, 1), (0, MAX_DISCARD_SECTORS + 1)] {
            dev.segment(SEGS, sector, num, 0);
            assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 16), wo(ST, 1)]).1, IOERR);
        }
        dev.segment(SEGS, 0, 1, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 15), wo(ST, 1)]).1, IOERR);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(ST, 1)]).1, IOERR, "no segment");
        let many = 16 * (MAX_DISCARD_SEG + 1);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, many), wo(ST, 1)]).1, IOERR);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(SEGS, 16), wo(ST, 1)]).1, IOERR);
        dev.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        dev.segment(SEGS, 0, 1, 0);
        dev.segment(SEGS + 16, 4, 1, 0);
        assert_eq!(
            dev.run(&[ro(HDR, 16), ro(SEGS, 32), wo(ST, 1)]).1,
            IOERR,
            "one write-zeroes segment at most"
        );
        assert_eq!(img.bytes(), before, "refused requests changed nothing");
    }
}

#[test]
fn readonly_refuses_changes() {
    for engine in engines() {
        let img = Image::new(16 * 512);
        let mut cfg = img.config(engine);
        cfg.readonly = true;
        let mut dev = Dev::new(cfg);
        dev.d.put(BUF, &[0x55; 512]);
        dev.hdr(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(BUF, 512), wo(ST, 1)]), (1, IOERR));
        dev.hdr(VIRTIO_BLK_T_DISCARD, 0);
        dev.segment(SEGS, 0, 1, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 16), wo(ST, 1)]).1, IOERR);
        dev.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(SEGS, 16), wo(ST, 1)]).1, IOERR);
        assert_eq!(img.bytes(), pattern(16 * 512), "file unchanged");
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 512), wo(ST, 1)]), (513, OK));
        assert_eq!(dev.d.get(BUF, 512), pattern(512));
        dev.hdr(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(ST, 1)]).1, OK);
        assert_eq!(dev.metric("errors"), 3);
    }
}

#[test]
fn bad_ranges_lengths_and_types() {
    for engine in engines() {
        let img = Image::new(16 * 512);
        let mut dev = Dev::new(img.config(engine));
        let cases: &[(u32, u64, u32)] = &[
            (VIRTIO_BLK_T_IN, 16, 512),           // at capacity
            (VIRTIO_BLK_T_IN, 15, 1024),          // across the end
            (VIRTIO_BLK_T_IN, u64::MAX / 2, 512), // sector * 512 overflows
            (VIRTIO_BLK_T_OUT, u64::MAX, 512),
            (VIRTIO_BLK_T_IN, 0, 100), // not whole sectors
            (VIRTIO_BLK_T_OUT, 0, 513),
        ];
        for &(ty, sector, len) in cases {
            dev.hdr(ty, sector);
            let data = if ty == VIRTIO_BLK_T_IN {
                wo(BUF, len)
            } else {
                ro(BUF, len)
            };
            assert_eq!(
                dev.run(&[ro(HDR, 16), data, wo(ST, 1)]),
                (1, IOERR),
                "{engine:?} type {ty} sector {sector} len {len}"
            );
        }
        dev.hdr(99, 0);
        assert_eq!(
            dev.run(&[ro(HDR, 16), wo(ST, 1)]),
            (1, UNSUPP),
            "unknown type"
        );
        dev.hdr(VIRTIO_BLK_T_SCSI_CMD, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(ST, 1)]).1, UNSUPP);
        assert_eq!(img.bytes(), pattern(16 * 512));
        assert_eq!(dev.metric("errors"), cases.len() as u64 + 2);
    }
}

#[test]
fn malformed_chains() {
    for engine in engines() {
        let img = Image::new(16 * 512);
        let mut dev = Dev::new(img.config(engine));
        // Header too short.
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        assert_eq!(dev.run(&[ro(HDR, 8), wo(ST, 1)]), (1, IOERR));
        // Header in a device-writable buffer.
        assert_eq!(dev.run(&[wo(HDR, 16), wo(BUF, 512), wo(ST, 1)]), (1, IOERR));
        // Data in the wrong direction, both ways.
        assert_eq!(dev.run(&[ro(HDR, 16), ro(BUF, 512), wo(ST, 1)]), (1, IOERR));
        dev.hdr(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 512), wo(ST, 1)]), (1, IOERR));
        // A writable buffer before a readable one in a write.
        assert_eq!(
            dev.run(&[ro(HDR, 16), wo(BUF, 512), ro(BUF, 512), wo(ST, 1)]),
            (1, IOERR)
        );
        // Data outside guest memory; a range wrapping the address space.
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        let outside = MEM_SIZE as u64 - 256;
        assert_eq!(
            dev.run(&[ro(HDR, 16), wo(outside, 512), wo(ST, 1)]),
            (1, IOERR)
        );
        assert_eq!(
            dev.run(&[ro(HDR, 16), wo(u64::MAX - 100, 512), wo(ST, 1)]),
            (1, IOERR)
        );
        // Header outside guest memory.
        assert_eq!(dev.run(&[ro(1 << 40, 16), wo(ST, 1)]), (1, IOERR));
        assert_eq!(img.bytes(), pattern(16 * 512));
        let errors = dev.metric("errors");
        assert_eq!(errors, 8);

        // No usable status byte: last buffer device-readable, empty, or outside memory.
        for status in [
            ro(ST, 1),
            wo(ST, 0),
            wo(MEM_SIZE as u64, 1),
            wo(u64::MAX, 1),
        ] {
            dev.d.put(ST, &[0xee]);
            dev.submit(&[ro(HDR, 16), wo(BUF, 512), status]);
            dev.wait(1);
            assert_eq!(dev.d.used_elem(0, dev.done - 1).1, 0, "{status:?}");
            assert_eq!(dev.d.get(ST, 1), [0xee]);
        }
        // A chain that loops: 0 -> 1 -> 0 -> …
        dev.d.desc(0, 0, HDR, 16, F_NEXT, 1);
        dev.d.desc(0, 1, ST, 1, F_NEXT | F_WRITE, 0);
        dev.d.offer(0, 0);
        dev.wait(1);
        assert_eq!(dev.d.used_elem(0, dev.done - 1), (0, 0));
        // A chain whose next index is out of the table.
        dev.d.desc(0, 0, HDR, 16, F_NEXT, 1);
        dev.d.desc(0, 1, ST, 1, F_NEXT | F_WRITE, 999);
        dev.d.offer(0, 0);
        dev.wait(1);
        assert_eq!(dev.d.used_elem(0, dev.done - 1), (0, 0));
        assert_eq!(dev.metric("errors"), errors + 6);

        // The device still works.
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 512), wo(ST, 1)]), (513, OK));
        assert_eq!(dev.d.get(BUF, 512), pattern(512));
    }
}

#[test]
fn broken_available_ring_stops_the_queue_until_reset() {
    for engine in engines() {
        let img = Image::new(16 * 512);
        let mut dev = Dev::new(img.config(engine));
        // The driver claims 1000 new chains in a queue of 16.
        let avail = crate::virtio::testing::rings(0).1;
        dev.d
            .mem
            .write_obj(1000u16, GuestAddress(avail + 2))
            .unwrap();
        dev.d.notify(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while dev.metric("errors") == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(dev.metric("errors"), 1, "{engine:?}: reported once");
        dev.d.notify(0);
        dev.d.notify(0);
        assert_eq!(dev.d.used_idx(0), 0, "nothing served");
        dev.d.reset_device();
        assert_eq!(dev.d.bring_up(u64::MAX), 15);
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 512), wo(ST, 1)]), (513, OK));
        assert_eq!(dev.metric("errors"), 1);
    }
}

#[test]
fn indirect_descriptors() {
    for engine in engines() {
        let img = Image::new(16 * 512);
        let mut dev = Dev::new(img.config(engine));
        let table = DATA + 0x2000;
        let put_desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(table + i * 16);
            dev.d.mem.write_obj(addr, at).unwrap();
            dev.d
                .mem
                .write_obj(len, GuestAddress(table + i * 16 + 8))
                .unwrap();
            dev.d
                .mem
                .write_obj(flags, GuestAddress(table + i * 16 + 12))
                .unwrap();
            dev.d
                .mem
                .write_obj(next, GuestAddress(table + i * 16 + 14))
                .unwrap();
        };
        put_desc(0, HDR, 16, F_NEXT, 1);
        put_desc(1, BUF, 1024, F_NEXT | F_WRITE, 2);
        put_desc(2, ST, 1, F_WRITE, 0);
        dev.hdr(VIRTIO_BLK_T_IN, 4);
        dev.d.desc(0, 0, table, 48, 4 /* INDIRECT */, 0);
        dev.d.offer(0, 0);
        dev.wait(1);
        assert_eq!(dev.d.used_elem(0, dev.done - 1), (0, 1025));
        assert_eq!(dev.d.get(ST, 1), [OK]);
        assert_eq!(dev.d.get(BUF, 1024), pattern(16 * 512)[2048..3072]);
    }
}

#[test]
fn reset_and_reactivate() {
    for engine in engines() {
        let img = Image::new(16 * 512);
        let mut dev = Dev::new(img.config(engine));
        dev.hdr(VIRTIO_BLK_T_OUT, 1);
        dev.d.put(BUF, &[0x11; 512]);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(BUF, 512), wo(ST, 1)]), (1, OK));
        // Queue requests, then reset without waiting for them: the reset waits for in-flight
        // I/O, and nothing is touched afterwards.
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        for k in 0..4 {
            dev.submit(&[ro(HDR, 16), wo(BUF + 0x1000 * k, 4096), wo(ST, 1)]);
        }
        dev.d.notify(0);
        dev.d.reset_device();
        assert_eq!(dev.d.r(0x070), 0);
        assert_eq!(dev.metric("inflight"), 0);
        assert_eq!(dev.d.bring_up(u64::MAX), 15);
        dev.done = 0;
        dev.hdr(VIRTIO_BLK_T_IN, 1);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(BUF, 512), wo(ST, 1)]), (513, OK));
        assert_eq!(dev.d.get(BUF, 512), [0x11; 512]);
        // And a driver that resets right after bring-up, twice.
        dev.d.reset_device();
        dev.d.reset_device();
        assert_eq!(dev.d.bring_up(u64::MAX), 15);
    }
}

#[test]
fn rate_limiter_holds_requests_back() {
    for engine in engines() {
        let img = Image::new(16 * 512);
        let mut cfg = img.config(engine);
        cfg.rate = RateLimit {
            ops_per_sec: Some(10),
            bytes_per_sec: None,
        };
        let mut dev = Dev::new(cfg);
        dev.hdr(VIRTIO_BLK_T_FLUSH, 0);
        // 15 requests against a bucket of 10: some must wait for the timer; all complete.
        for _round in 0..3 {
            for k in 0..5 {
                dev.submit(&[ro(HDR, 16), wo(ST + k, 1)]);
            }
            dev.wait(5);
        }
        assert_eq!(dev.metric("flush_requests"), 15);
        assert!(dev.metric("rate_limited") > 0, "{engine:?}");
        assert_eq!(dev.metric("errors"), 0);

        // A byte limit too.
        let mut cfg = img.config(engine);
        cfg.rate = RateLimit {
            ops_per_sec: None,
            bytes_per_sec: Some(4096),
        };
        let mut dev = Dev::new(cfg);
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        for k in 0..3 {
            dev.submit(&[ro(HDR, 16), wo(BUF + k * 0x2000, 4096), wo(ST + k, 1)]);
        }
        dev.wait(3);
        assert!(dev.metric("rate_limited") > 0, "{engine:?}");
        assert_eq!(dev.metric("read_bytes"), 3 * 4096);
    }
}

#[test]
fn open_errors_name_the_path() {
    let missing = temp_path("missing");
    let e = Block::new(BlockConfig {
        path: missing.clone(),
        readonly: false,
        id: None,
        rate: RateLimit::default(),
        engine: IoEngine::Auto,
    })
    .err()
    .unwrap();
    assert!(matches!(e, BlockError::NotFound { .. }));
    assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");

    let dir = BlockConfig {
        path: std::env::temp_dir(),
        readonly: true,
        id: None,
        rate: RateLimit::default(),
        engine: IoEngine::Auto,
    };
    let e = Block::new(dir).err().unwrap();
    assert!(matches!(e, BlockError::NotADisk { .. }), "{e}");
    assert!(e.to_string().contains("not a regular file"));
    let chr = BlockConfig {
        path: "/dev/null".into(),
        readonly: true,
        id: None,
        rate: RateLimit::default(),
        engine: IoEngine::Auto,
    };
    assert!(matches!(
        Block::new(chr).err().unwrap(),
        BlockError::NotADisk { .. }
    ));

    let img = Image::new(512);
    let mut cfg = img.config(IoEngine::Sync);
    cfg.id = Some("x".repeat(21));
    assert!(matches!(
        Block::new(cfg).err().unwrap(),
        BlockError::IdTooLong { len: 21, .. }
    ));

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("running as root: permission checks do not apply, skipping them");
        return;
    }
    std::fs::set_permissions(&img.0, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let e = Block::new(img.config(IoEngine::Sync)).err().unwrap();
    assert!(matches!(e, BlockError::PermissionDenied { .. }), "{e}");
    let mut cfg = img.config(IoEngine::Sync);
    cfg.readonly = true;
    assert!(
        Block::new(cfg).is_ok(),
        "read-only open of a read-only file"
    );
    std::fs::set_permissions(&img.0, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let mut cfg = img.config(IoEngine::Sync);
    cfg.readonly = true;
    let e = Block::new(cfg).err().unwrap();
    assert!(matches!(e, BlockError::PermissionDenied { .. }), "{e}");
}

#[test]
fn auto_engine_resolves() {
    let img = Image::new(512);
    let b = Block::new(img.config(IoEngine::Auto)).unwrap();
    let want = if Uring::available().is_ok() {
        IoEngine::Uring
    } else {
        IoEngine::Sync
    };
    assert_eq!(b.engine_in_use(), want);
    assert_eq!(
        b.ring.is_some(),
        want == IoEngine::Uring,
        "the ring is made at construction"
    );
    let b = Block::new(img.config(IoEngine::Sync)).unwrap();
    assert!(b.ring.is_none(), "no ring for the sync engine");
    if want == IoEngine::Uring {
        let mut cfg = img.config(IoEngine::Uring);
        cfg.readonly = true;
        let b = Block::new(cfg).unwrap();
        assert_eq!(b.engine_in_use(), IoEngine::Uring, "read-only image");
    }
}

/// Activations lend the device's one ring to the worker and resets take it back: the guest
/// keeps io_uring across driver reloads, and no ring is ever created after construction (the
/// seccomp filter forbids io_uring_setup by then).
#[test]
fn ring_kept_across_resets_and_reactivations() {
    if skip_without_uring("ring_kept_across_resets_and_reactivations") {
        return;
    }
    let img = Image::new(16 * 512);
    let block = Block::new(img.config(IoEngine::Uring)).unwrap();
    let m = block.metrics();
    let block = Arc::new(Mutex::new(block));
    let ring_id = |b: &Block| {
        b.ring
            .as_deref()
            .map(|u| (u.ring_fd(), u.serial(), u.started()))
    };
    let (fd, serial, _) = ring_id(&block.lock().unwrap()).expect("a ring from construction");
    let mut dev = Dev {
        d: TestDriver::new(Box::new(Shared(block.clone()))),
        m,
        done: 0,
    };
    let mut started = 0;
    let mut want = pattern(16 * 512);
    for round in 0..3u64 {
        assert_eq!(dev.d.bring_up(u64::MAX), 15, "round {round}");
        assert!(
            ring_id(&block.lock().unwrap()).is_none(),
            "round {round}: the worker has the ring"
        );
        let data = [0x40 + round as u8; 512];
        dev.d.put(BUF, &data);
        dev.hdr(VIRTIO_BLK_T_OUT, round + 1);
        assert_eq!(dev.run(&[ro(HDR, 16), ro(BUF, 512), wo(ST, 1)]), (1, OK));
        want[(round as usize + 1) * 512..(round as usize + 2) * 512].copy_from_slice(&data);
        dev.hdr(VIRTIO_BLK_T_IN, round + 1);
        dev.d.put(BUF + 0x1000, &[0; 512]);
        let r = dev.run(&[ro(HDR, 16), wo(BUF + 0x1000, 512), wo(ST, 1)]);
        assert_eq!(r, (513, OK), "round {round}");
        assert_eq!(dev.d.get(BUF + 0x1000, 512), data, "round {round}");
        dev.hdr(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(dev.run(&[ro(HDR, 16), wo(ST, 1)]), (1, OK));
        // Leave reads in flight (or queued) at the reset: it waits for them.
        dev.hdr(VIRTIO_BLK_T_IN, 0);
        for k in 0..4 {
            dev.submit(&[
                ro(HDR, 16),
                wo(BUF + 0x2000 + 0x1000 * k, 4096),
                wo(ST + 1, 1),
            ]);
        }
        dev.d.notify(0);
        dev.d.reset_device();
        dev.done = 0;
        let b = block.lock().unwrap();
        assert_eq!(b.engine_in_use(), IoEngine::Uring, "round {round}");
        let (f, s, n) = ring_id(&b).expect("the ring came back at reset");
        assert_eq!((f, s), (fd, serial), "round {round}: the same ring");
        assert!(
            n >= started + 3,
            "round {round}: served through io_uring ({n})"
        );
        started = n;
    }
    assert_eq!(img.bytes(), want);
    assert_eq!(dev.metric("errors"), 0);
    assert_eq!(dev.metric("inflight"), 0);
}

/// The ring runs readv, writev (on a writable image) and fsync on its fixed file 0, and nothing
/// else: other opcodes, other files and io_uring_register after enabling get EACCES.
#[test]
fn restricted_ring_refuses_other_operations() {
    use io_uring::{opcode, types};
    if skip_without_uring("restricted_ring_refuses_other_operations") {
        return;
    }
    let img = Image::new(4096);
    let ro_file = std::fs::File::open(&img.0).unwrap();
    let mut u = Uring::new(ro_file.as_raw_fd(), 8, false).unwrap();
    let mut buf = [0u8; 512];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let disk = types::Fixed(0);
    let eacces = Some(-libc::EACCES);
    let mut run = |e| {
        // SAFETY: the entries below point only into `buf` (directly or through `iov`) and at a
        // static path, all of which outlive every call.
        unsafe { u.run_raw(e) }.ok()
    };

    let readv = opcode::Readv::new(disk, &iov, 1).offset(512).build();
    assert_eq!(run(readv), Some(512), "readv on the fixed file");
    let fsync = opcode::Fsync::new(disk).build();
    assert_eq!(run(fsync), Some(0), "fsync on the fixed file");

    let plain = opcode::Readv::new(types::Fd(ro_file.as_raw_fd()), &iov, 1).build();
    assert_eq!(
        run(plain),
        eacces,
        "readv on a descriptor, not the fixed file"
    );
    let read = opcode::Read::new(disk, buf.as_mut_ptr(), 512).build();
    assert_eq!(run(read), eacces, "IORING_OP_READ is not on the list");
    let writev = opcode::Writev::new(disk, &iov, 1).build();
    assert_eq!(run(writev), eacces, "no writev on a read-only image's ring");
    let path = b"/etc/hostname\0";
    let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr().cast()).build();
    assert_eq!(run(open), eacces, "IORING_OP_OPENAT");
    let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr().cast())
        .build()
        .flags(io_uring::squeue::Flags::FIXED_FILE);
    assert_eq!(
        run(open),
        eacces,
        "IORING_OP_OPENAT, even with the fixed-file flag"
    );
    let nop = opcode::Nop::new().build();
    assert_eq!(run(nop), eacces, "IORING_OP_NOP");

    let sub = u.submitter();
    let no_register = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{what}: {e}");
    };
    no_register(
        sub.register_files_update(0, &[ro_file.as_raw_fd()])
            .map(drop),
        "replacing the fixed file",
    );
    no_register(sub.register_files(&[ro_file.as_raw_fd()]), "more files");
    no_register(sub.unregister_files(), "dropping the fixed file");
    no_register(sub.unregister_eventfd(), "dropping the eventfd");
    no_register(sub.register_enable_rings(), "enabling again");

    // A writable image's ring writes.
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.0)
        .unwrap();
    let mut u = Uring::new(rw.as_raw_fd(), 8, true).unwrap();
    buf = [0x5a; 512];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let writev = opcode::Writev::new(disk, &iov, 1).offset(1024).build();
    // SAFETY: `iov` and `buf` outlive the call.
    assert_eq!(unsafe { u.run_raw(writev) }.ok(), Some(512));
    assert_eq!(img.bytes()[1024..1536], [0x5a; 512]);
}

/// What the fuzz target does, with pseudo-random memory: must neither panic nor hang.
#[test]
fn request_processor_survives_garbage() {
    use virtio_queue::{Queue, QueueT};
    let img = Image::new(64 * 512);
    let mut p = RequestProcessor::new(img.config(IoEngine::Sync)).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
        let mut bytes = vec![0u8; 64 << 10];
        for b in bytes.iter_mut() {
            *b = next() as u8;
        }
        // Keep descriptor addresses and lengths mostly inside memory so parsing goes deep.
        for i in 0..16usize {
            let d = 0x1000 + i * 16;
            let addr = next() % (70 << 10);
            bytes[d..d + 8].copy_from_slice(&addr.to_le_bytes());
            let len = (next() % 2048) as u32;
            bytes[d + 8..d + 12].copy_from_slice(&len.to_le_bytes());
            bytes[d + 12] &= 7;
            bytes[d + 14] &= 31;
            bytes[d + 15] = 0;
        }
        bytes[0x2002..0x2004].copy_from_slice(&((round % 20) as u16).to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(0)).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        p.process_queue(&mem, &mut q);
    }
    assert!(p.metrics().errors.load(Ordering::Relaxed) > 0);
    assert_eq!(img.bytes().len(), 64 * 512);
}
