//! Micro-benchmark of the virtio-blk model, in-process, no KVM: a driver in this process fills
//! a split virtqueue in (host-allocated) guest memory with requests against a temporary raw
//! image, the model serves them, and the same reads and writes done directly with
//! `pread`/`pwrite` on the same file give the baseline. See bench/README.md (`blk-micro.sh`).
//!
//! ```text
//! cargo run -p devices --release --example blk_bench -- [--runs N] [--size-mib M]
//!     [--rand-requests N] [--seq-mib M] [--batch N] [--dir DIR]
//!     [--paths processor,sync,uring] [--tsv FILE]
//! ```
//!
//! Workloads: 4 KiB reads at random 4 KiB-aligned offsets, 64 KiB sequential reads and 64 KiB
//! sequential writes (wrapping around the image). Each request is what Linux's virtio-blk driver
//! queues with indirect descriptors: one ring descriptor pointing to an indirect table of three
//! (16-byte header, data buffer, status byte). A batch of `--batch` requests is made available,
//! then served; only the serving is timed (the driver's bookkeeping is not), and the baseline
//! times only its `pread`/`pwrite` calls, into the same buffers (one per request of a batch).
//!
//! Three paths through the model (`--paths`):
//! * `processor`: `RequestProcessor::process_queue` on this thread (parsing, validation, a
//!   synchronous `preadv`/`pwritev` into guest memory, status, used ring) — the model's
//!   per-request CPU cost;
//! * `sync`, `uring`: the whole device (`Block`, activated on the queue): notification, its
//!   worker thread, the engine (synchronous, or io_uring with up to a queue of requests in
//!   flight), used ring and interrupt (an eventfd this thread waits on, as a vCPU would be
//!   woken through KVM's irqfd). `uring` is skipped where io_uring is unavailable.
//!
//! Samples go to `--tsv` (default stdout) as `workload metric unit vmm run value` with
//! vmm = `model` or `host`; `bench/plot.py --vmms model=...,host=...` tabulates them.

use devices::rate_limiter::RateLimit;
use devices::virtio::block::{Block, BlockConfig, IoEngine, RequestProcessor, QUEUE_SIZE};
use devices::virtio::transport::mmio::INT_VRING;
use devices::virtio::{MmioInterrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use devices::Interrupt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory layout.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const INDIRECT: u64 = 0x4000; // 48 bytes per request
const HEADERS: u64 = 0x8000; // 16 bytes per request
const STATUS: u64 = 0x9000; // 1 byte per request
const DATA: u64 = 0x10_0000; // one buffer of the largest request size per request
const MAX_LEN: u64 = 64 << 10;
const MEM: usize = (DATA + QUEUE_SIZE as u64 * MAX_LEN) as usize;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const INDIRECT_DESC_FEATURE: u64 = 1 << 28;

struct Args {
    runs: usize,
    size_mib: u64,
    rand_requests: u64,
    seq_mib: u64,
    batch: u16,
    dir: PathBuf,
    paths: Vec<String>,
    tsv: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: blk_bench [--runs N] [--size-mib M] [--rand-requests N] [--seq-mib M] \
         [--batch N] [--dir DIR] [--paths processor,sync,uring] [--tsv FILE]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        runs: 5,
        size_mib: 256,
        rand_requests: 65536,
        seq_mib: 1024,
        batch: 128,
        dir: std::env::temp_dir(),
        paths: vec!["processor".into(), "sync".into(), "uring".into()],
        tsv: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--runs" => a.runs = num(v()) as usize,
            "--size-mib" => a.size_mib = num(v()),
            "--rand-requests" => a.rand_requests = num(v()),
            "--seq-mib" => a.seq_mib = num(v()),
            "--batch" => a.batch = u16::try_from(num(v())).unwrap_or_else(|_| usage()),
            "--dir" => a.dir = PathBuf::from(v()),
            "--paths" => a.paths = v().split(',').map(str::to_string).collect(),
            "--tsv" => a.tsv = Some(PathBuf::from(v())),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if a.runs == 0 || a.batch == 0 || a.batch > QUEUE_SIZE || a.size_mib == 0 {
        usage();
    }
    for p in &a.paths {
        if !matches!(p.as_str(), "processor" | "sync" | "uring") {
            usage();
        }
    }
    a
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    len: u64,
    write: bool,
    random: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "4k random read",
        len: 4096,
        write: false,
        random: true,
    },
    Workload {
        name: "64k sequential read",
        len: 64 << 10,
        write: false,
        random: false,
    },
    Workload {
        name: "64k sequential write",
        len: 64 << 10,
        write: true,
        random: false,
    },
];

/// The byte offsets of a workload's requests, the same for the model and the baseline.
fn offsets(w: Workload, count: u64, size: u64) -> Vec<u64> {
    let blocks = size / w.len;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15; // xorshift64
    (0..count)
        .map(|i| {
            if w.random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % blocks) * w.len
            } else {
                (i % blocks) * w.len
            }
        })
        .collect()
}

fn desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(at))
        .expect("descriptor in memory");
}

/// The driver side: guest memory with a queue whose every slot `i` holds request `i`
/// (indirect table, header, data buffer, status byte at fixed places).
struct Driver {
    mem: GuestMemoryMmap,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new(w: Workload) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
        for i in 0..u64::from(QUEUE_SIZE) {
            let table = INDIRECT + i * 48;
            desc(&mem, DESC + i * 16, table, 48, F_INDIRECT, 0);
            desc(&mem, table, HEADERS + i * 16, 16, F_NEXT, 1);
            let data_flags = F_NEXT | if w.write { 0 } else { F_WRITE };
            desc(
                &mem,
                table + 16,
                DATA + i * MAX_LEN,
                w.len as u32,
                data_flags,
                2,
            );
            desc(&mem, table + 32, STATUS + i, 1, F_WRITE, 0);
            // Written for reads too: no page faults while timed (the baseline's buffers are
            // touched up front as well).
            let fill = vec![(i as u8) | 1; MAX_LEN as usize];
            mem.write_slice(&fill, GuestAddress(DATA + i * MAX_LEN))
                .expect("buffer in memory");
        }
        Driver {
            mem,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("valid queue size");
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem), "queue set-up");
        q
    }

    /// Makes requests for `offs` (at most a queue) available.
    fn post(&mut self, w: Workload, offs: &[u64]) {
        let ty = if w.write { T_OUT } else { T_IN };
        for (i, &off) in offs.iter().enumerate() {
            let i = i as u64;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&(off / 512).to_le_bytes());
            self.mem
                .write_slice(&h, GuestAddress(HEADERS + i * 16))
                .expect("header");
            self.mem
                .write_obj(0xffu8, GuestAddress(STATUS + i))
                .expect("status");
            let slot = self.avail_idx.wrapping_add(i as u16) % QUEUE_SIZE;
            self.mem
                .write_obj(i as u16, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .expect("avail ring");
        }
        self.avail_idx = self.avail_idx.wrapping_add(offs.len() as u16);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .expect("avail idx");
    }

    fn used_idx(&self) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx")
    }

    /// Checks that `n` more requests completed, all with status OK.
    fn check(&mut self, n: usize) {
        let used = self.used_idx();
        assert_eq!(
            used.wrapping_sub(self.used_seen),
            n as u16,
            "requests completed"
        );
        self.used_seen = used;
        for i in 0..n as u64 {
            let s: u8 = self.mem.read_obj(GuestAddress(STATUS + i)).expect("status");
            assert_eq!(s, 0, "request {i}: status {s}");
        }
    }
}

fn config(path: &std::path::Path, engine: IoEngine) -> BlockConfig {
    BlockConfig {
        path: path.to_path_buf(),
        readonly: false,
        id: Some("blk-bench".into()),
        rate: RateLimit::default(),
        engine,
    }
}

/// Serves `offs` through the model on `path`; returns the time spent serving.
fn run_model(
    path_kind: &str,
    image: &std::path::Path,
    w: Workload,
    offs: &[u64],
    batch: usize,
) -> Duration {
    let mut d = Driver::new(w);
    let mut total = Duration::ZERO;
    match path_kind {
        "processor" => {
            let mut p = RequestProcessor::new(config(image, IoEngine::Sync)).expect("image opens");
            let mut q = d.queue();
            for chunk in offs.chunks(batch) {
                d.post(w, chunk);
                let t = Instant::now();
                let n = p.process_queue(&d.mem, &mut q);
                total += t.elapsed();
                assert_eq!(n, chunk.len(), "process_queue served the batch");
                d.check(n);
            }
        }
        _ => {
            let engine = if path_kind == "uring" {
                IoEngine::Uring
            } else {
                IoEngine::Sync
            };
            let mut b = Block::new(config(image, engine)).expect("image opens");
            let irq = Arc::new(MmioInterrupt::new(Interrupt::new().expect("eventfd")));
            let features = VIRTIO_F_VERSION_1 | INDIRECT_DESC_FEATURE;
            b.activate(d.mem.clone(), features, vec![d.queue()], irq.clone())
                .expect("activation");
            let efd = irq.line().eventfd().as_raw_fd();
            for chunk in offs.chunks(batch) {
                d.post(w, chunk);
                let want = d.used_seen.wrapping_add(chunk.len() as u16);
                let t = Instant::now();
                b.queue_notify(0);
                while d.used_idx() != want {
                    let mut pfd = libc::pollfd {
                        fd: efd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
                    assert!(r > 0, "no interrupt within 10 s");
                    let _ = irq.line().eventfd().read();
                    irq.ack(INT_VRING);
                }
                total += t.elapsed();
                d.check(chunk.len());
            }
            b.reset();
        }
    }
    total
}

/// The same reads/writes with pread/pwrite on the file, into the same buffer layout.
fn run_host(file: &File, w: Workload, offs: &[u64], batch: usize) -> Duration {
    let len = w.len as usize;
    let mut bufs = vec![0x5au8; batch * MAX_LEN as usize];
    let mut total = Duration::ZERO;
    for chunk in offs.chunks(batch) {
        let t = Instant::now();
        for (i, &off) in chunk.iter().enumerate() {
            let b = &mut bufs[i * MAX_LEN as usize..][..len];
            if w.write {
                file.write_all_at(b, off).expect("pwrite");
            } else {
                file.read_exact_at(b, off).expect("pread");
            }
        }
        total += t.elapsed();
        std::hint::black_box(&bufs);
    }
    total
}

fn main() {
    let a = args();
    let size = a.size_mib << 20;
    let image = a
        .dir
        .join(format!("fv-blk-bench-{}.img", std::process::id()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Cleanup(image.clone());
    {
        // Fully written (not sparse): reads hit real page-cache pages, as on a used image.
        let mut f = File::create(&image).expect("create the image");
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
        for _ in 0..a.size_mib {
            f.write_all(&chunk).expect("write the image");
        }
        f.sync_all().expect("sync the image");
    }
    let host = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .expect("open the image");

    let mut paths = a.paths.clone();
    if paths.iter().any(|p| p == "uring") {
        if let Err(e) = Block::new(config(&image, IoEngine::Uring)) {
            eprintln!("blk_bench: io_uring path skipped: {e}");
            paths.retain(|p| p != "uring");
        }
    }
    let label = |p: &str| match p {
        "processor" => "RequestProcessor",
        "sync" => "device, sync engine",
        _ => "device, io_uring",
    };
    let batch = usize::from(a.batch);
    eprintln!(
        "blk_bench: image {} ({} MiB, page cache hot), batch {batch}, runs {}, paths {}",
        image.display(),
        a.size_mib,
        a.runs,
        paths.join(",")
    );

    let mut out: Box<dyn Write> = match &a.tsv {
        Some(p) => Box::new(File::create(p).expect("--tsv file")),
        None => Box::new(std::io::stdout()),
    };
    writeln!(out, "workload\tmetric\tunit\tvmm\trun\tvalue").expect("write");
    for w in WORKLOADS {
        let count = if w.random {
            a.rand_requests
        } else {
            (a.seq_mib << 20) / w.len
        };
        let offs = offsets(w, count, size);
        // Warm-up: page cache, allocator, code.
        let warm = &offs[..offs.len().min(batch * 4)];
        run_host(&host, w, warm, batch);
        for p in &paths {
            run_model(p, &image, w, warm, batch);
        }
        for p in &paths {
            let name = format!("{} ({})", w.name, label(p));
            for run in 1..=a.runs {
                // Alternate who goes first, so a drift does not favour one side.
                let (m, h) = if run % 2 == 1 {
                    let m = run_model(p, &image, w, &offs, batch);
                    (m, run_host(&host, w, &offs, batch))
                } else {
                    let h = run_host(&host, w, &offs, batch);
                    (run_model(p, &image, w, &offs, batch), h)
                };
                for (who, t) in [("model", m), ("host", h)] {
                    let s = t.as_secs_f64();
                    let rps = count as f64 / s;
                    let mbs = (count * w.len) as f64 / s / 1e6;
                    writeln!(out, "{name}\trequests/s\treq/s\t{who}\t{run}\t{rps:.0}")
                        .expect("write");
                    writeln!(out, "{name}\tthroughput\tMB/s\t{who}\t{run}\t{mbs:.1}")
                        .expect("write");
                }
                eprintln!(
                    "blk_bench: {name} run {run}: model {:.3} s, host {:.3} s ({count} requests)",
                    m.as_secs_f64(),
                    h.as_secs_f64()
                );
            }
        }
    }
}
