//! Serving the request queue: on the device's worker thread ([`BlockWorker`]) or synchronously
//! ([`RequestProcessor`], the fuzzing entry point).

use super::disk::{Disk, ID_BYTES};
use super::engine::{rw_sync, IoVecs, Uring};
use super::request::{
    parse, total_len, write_segs, Limits, Op, Parsed, Request, S_IOERR, S_UNSUPP,
};
use super::{BlockConfig, BlockError, BlockMetrics};
use crate::rate_limiter::RateLimiter;
use crate::virtio::worker::{EventHandler, EventOps};
use crate::virtio::{InterruptKind, VirtioInterrupt};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Requests taken from the queue per turn before the worker lets other events through.
const BATCH: usize = 256;

const TOKEN_TIMER: u64 = 1;
const TOKEN_COMPLETION: u64 = 2;
const TOKEN_KICK: u64 = 3;

/// What every request path shares: the image, the limits, the counters.
pub(super) struct Core {
    pub disk: Arc<Disk>,
    pub limits: Limits,
    pub metrics: Arc<BlockMetrics>,
}

impl Core {
    /// Executes `req` on the calling thread; Ok(bytes written into guest buffers) or a status.
    fn execute_sync(&self, mem: &GuestMemoryMmap, req: &Request) -> Result<u32, u8> {
        let io = |e: io::Error| {
            tracing::debug!("disk image {}: {e}", self.disk.path.display());
            S_IOERR
        };
        match &req.op {
            Op::Read { offset, len, segs } => {
                let iov = IoVecs::new(mem, segs).ok_or(S_IOERR)?;
                rw_sync(self.disk.fd(), iov, *offset, false).map_err(io)?;
                // `len` is the length of a chain, which is below 2^32.
                Ok(u32::try_from(*len).unwrap_or(u32::MAX))
            }
            Op::Write { offset, segs, .. } => {
                let iov = IoVecs::new(mem, segs).ok_or(S_IOERR)?;
                rw_sync(self.disk.fd(), iov, *offset, true).map_err(io)?;
                Ok(0)
            }
            Op::Flush => self.disk.file.sync_data().map(|_| 0).map_err(io),
            Op::GetId { segs } => {
                let n = (total_len(segs).min(ID_BYTES as u64)) as usize;
                let id = self.disk.id.get(..n).ok_or(S_IOERR)?;
                let done = write_segs(mem, segs, id).ok_or(S_IOERR)?;
                Ok(done as u32)
            }
            Op::Discard(ranges) => {
                for &(off, len) in ranges {
                    if let Err(e) = self.disk.discard(off, len) {
                        tracing::debug!("disk image {}: discard: {e}", self.disk.path.display());
                        return Err(S_UNSUPP);
                    }
                }
                Ok(0)
            }
            Op::WriteZeroes(ranges) => {
                for &(off, len, unmap) in ranges {
                    self.disk.write_zeroes(off, len, unmap).map_err(io)?;
                }
                Ok(0)
            }
            Op::Fail(code) => Err(*code),
        }
    }

    /// Completes `req` with `result`: status byte, used element, counters. False if the used
    /// ring could not be written.
    fn finish(
        &self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        req: Request,
        result: Result<u32, u8>,
    ) -> bool {
        let m = &self.metrics;
        match &req.op {
            Op::Read { .. } => m.read_requests.fetch_add(1, Ordering::Relaxed),
            Op::Write { .. } => m.write_requests.fetch_add(1, Ordering::Relaxed),
            Op::Flush => m.flush_requests.fetch_add(1, Ordering::Relaxed),
            Op::Discard(_) => m.discard_requests.fetch_add(1, Ordering::Relaxed),
            Op::WriteZeroes(_) => m.write_zeroes_requests.fetch_add(1, Ordering::Relaxed),
            Op::GetId { .. } | Op::Fail(_) => 0,
        };
        let (status, data) = match result {
            Ok(n) => {
                match &req.op {
                    Op::Read { len, .. } => m.read_bytes.fetch_add(*len, Ordering::Relaxed),
                    Op::Write { len, .. } => m.write_bytes.fetch_add(*len, Ordering::Relaxed),
                    _ => 0,
                };
                (0u8, n)
            }
            Err(code) => {
                m.errors.fetch_add(1, Ordering::Relaxed);
                (code, 0)
            }
        };
        let used = if mem.write_obj(status, req.status).is_ok() {
            data.saturating_add(1)
        } else {
            m.errors.fetch_add(1, Ordering::Relaxed);
            0
        };
        self.add_used(mem, queue, req.head, used)
    }

    /// Returns a chain without a usable status byte.
    fn no_status(&self, mem: &GuestMemoryMmap, queue: &mut Queue, head: u16) -> bool {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        self.add_used(mem, queue, head, 0)
    }

    fn add_used(&self, mem: &GuestMemoryMmap, queue: &mut Queue, head: u16, len: u32) -> bool {
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::warn!("virtio-blk: used ring: {e}");
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// Serves a queue synchronously on the calling thread, without rate limiting: the entry point
/// for fuzzing the request parser and executor (and for benchmarks of the parsing path).
pub struct RequestProcessor {
    core: Core,
}

impl RequestProcessor {
    /// A processor for the image `cfg` names (opened as [`super::Block::new`] does).
    pub fn new(cfg: BlockConfig) -> Result<RequestProcessor, BlockError> {
        let disk = Arc::new(Disk::open(&cfg)?);
        Ok(RequestProcessor {
            core: Core {
                limits: super::limits(&disk),
                disk,
                metrics: Arc::new(BlockMetrics::default()),
            },
        })
    }

    /// Its counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.core.metrics.clone()
    }

    /// Fuzzing entry point: serves every available chain of `queue` (which lives in `mem`) with
    /// synchronous I/O on the image, writing statuses and used elements. Returns how many chains
    /// were completed. Never panics, whatever guest memory holds.
    pub fn process_queue(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> usize {
        let mut done = 0;
        // The available ring yields at most `size` chains per pass; the bound is a second guard.
        for _ in 0..=usize::from(queue.size()) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let ok = match parse(mem, chain, &self.core.limits) {
                Parsed::NoStatus(head) => self.core.no_status(mem, queue, head),
                Parsed::Req(req) => {
                    let res = self.core.execute_sync(mem, &req);
                    self.core.finish(mem, queue, req, res)
                }
            };
            if !ok {
                break;
            }
            done += 1;
        }
        done
    }
}

/// How requests are executed.
pub(super) enum Engine {
    Sync,
    Uring(Box<Uring>),
}

/// The device's state on its worker thread.
pub(super) struct BlockWorker {
    pub core: Core,
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub engine: Engine,
    pub limiter: RateLimiter,
    /// A request the rate limiter held back; it goes first when the timer fires.
    pub pending: Option<Request>,
    /// Written to continue after a full batch, once other events had their turn.
    pub kick: EventFd,
    /// Used elements added since the last interrupt decision.
    pub added: usize,
    pub completions: Vec<(Request, io::Result<()>)>,
    /// The driver corrupted the queue; nothing more is served until a reset.
    pub broken: bool,
}

impl BlockWorker {
    /// A worker state for an activated device, with the sync engine until the device sets
    /// [`BlockWorker::engine`].
    pub fn new(
        core: Core,
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        limiter: RateLimiter,
    ) -> io::Result<BlockWorker> {
        Ok(BlockWorker {
            core,
            mem,
            queue,
            interrupt,
            engine: Engine::Sync,
            limiter,
            pending: None,
            kick: EventFd::new(EFD_NONBLOCK)?,
            added: 0,
            completions: Vec::new(),
            broken: false,
        })
    }

    fn engine_full(&self) -> bool {
        match &self.engine {
            Engine::Sync => false,
            Engine::Uring(u) => u.is_full(),
        }
    }

    fn finish(&mut self, req: Request, result: Result<u32, u8>) {
        self.core.metrics.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.core.finish(&self.mem, &mut self.queue, req, result) {
            self.added += 1;
        }
    }

    /// Starts (or, synchronously, executes) one request.
    fn start(&mut self, req: Request) {
        self.core.metrics.inflight.fetch_add(1, Ordering::Relaxed);
        if let Engine::Uring(u) = &mut self.engine {
            let iov = match &req.op {
                Op::Read { segs, .. } | Op::Write { segs, .. } => IoVecs::new(&self.mem, segs),
                Op::Flush => IoVecs::new(&self.mem, &[]),
                _ => None,
            };
            if let Some(iov) = iov {
                match u.start(req, iov) {
                    Ok(()) => return,
                    Err((req, e)) => {
                        tracing::debug!("virtio-blk: io_uring start: {e}");
                        return self.finish(req, Err(S_IOERR));
                    }
                }
            }
        }
        let res = self.core.execute_sync(&self.mem, &req);
        self.finish(req, res);
    }

    /// Takes requests from the queue while the engine and the rate limiter allow.
    fn process(&mut self) {
        if self.limiter.is_blocked() || self.broken {
            return;
        }
        // Drivers need not notify while the device is working through the queue.
        let _ = self.queue.disable_notification(&self.mem);
        let mut budget = BATCH;
        loop {
            if self.engine_full() {
                break; // a completion brings us back
            }
            let req = match self.pending.take() {
                Some(r) => r,
                None => {
                    if budget == 0 {
                        // Let the other events (stop, completions) in, then go on.
                        let _ = self.kick.write(1);
                        break;
                    }
                    budget -= 1;
                    let next = match self.queue.iter(&self.mem) {
                        Ok(mut it) => it.next(),
                        Err(e) => {
                            // The driver broke its available ring (e.g. an index more than a
                            // queue ahead): stop serving this queue until the device is reset.
                            tracing::warn!("virtio-blk: {e}; queue stopped until reset");
                            self.core.metrics.errors.fetch_add(1, Ordering::Relaxed);
                            self.broken = true;
                            break;
                        }
                    };
                    let Some(chain) = next else {
                        match self.queue.enable_notification(&self.mem) {
                            Ok(true) => {
                                let _ = self.queue.disable_notification(&self.mem);
                                continue;
                            }
                            _ => break,
                        }
                    };
                    match parse(&self.mem, chain, &self.core.limits) {
                        Parsed::NoStatus(head) => {
                            if self.core.no_status(&self.mem, &mut self.queue, head) {
                                self.added += 1;
                            }
                            continue;
                        }
                        Parsed::Req(r) => r,
                    }
                }
            };
            if let Some((ops, bytes)) = req.cost() {
                if !self.limiter.consume(ops, bytes) {
                    self.core
                        .metrics
                        .rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                    self.pending = Some(req);
                    break;
                }
            }
            self.start(req);
        }
        if let Engine::Uring(u) = &mut self.engine {
            u.submit();
        }
        self.signal();
    }

    fn reap(&mut self) {
        let Engine::Uring(u) = &mut self.engine else {
            return;
        };
        let mut done = std::mem::take(&mut self.completions);
        u.reap(&mut done);
        for (req, res) in done.drain(..) {
            let res = match res {
                Ok(()) => match &req.op {
                    Op::Read { len, .. } => Ok(u32::try_from(*len).unwrap_or(u32::MAX)),
                    _ => Ok(0),
                },
                Err(e) => {
                    tracing::debug!("disk image {}: {e}", self.core.disk.path.display());
                    Err(S_IOERR)
                }
            };
            self.finish(req, res);
        }
        self.completions = done;
    }

    fn signal(&mut self) {
        if self.added == 0 {
            return;
        }
        self.added = 0;
        if self.queue.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(0)) {
                tracing::warn!("virtio-blk interrupt: {e}");
            }
        }
    }
}

impl EventHandler for BlockWorker {
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        if !self.limiter.is_unlimited() {
            ops.add(self.limiter.timer_fd(), TOKEN_TIMER, EventSet::IN)?;
        }
        if let Engine::Uring(u) = &self.engine {
            ops.add(u.eventfd().as_raw_fd(), TOKEN_COMPLETION, EventSet::IN)?;
        }
        ops.add(self.kick.as_raw_fd(), TOKEN_KICK, EventSet::IN)?;
        // Serve whatever the driver queued before the thread started.
        self.process();
        Ok(())
    }

    fn queue_event(&mut self, _queue: usize, _ops: &mut EventOps) {
        self.process();
    }

    fn host_event(&mut self, token: u64, _events: EventSet, _ops: &mut EventOps) {
        match token {
            TOKEN_TIMER => self.limiter.on_timer(),
            TOKEN_COMPLETION => self.reap(),
            TOKEN_KICK => {
                let _ = self.kick.read();
            }
            _ => return,
        }
        self.process();
    }
}

impl BlockWorker {
    /// Waits for the ring's operations in flight, then hands the ring back for the next
    /// activation (its pending requests are dropped: the device is being reset). None with the
    /// sync engine, or when the ring failed while draining: then it is dropped and guest memory
    /// stays mapped for good, as when the worker is dropped.
    pub fn into_ring(mut self) -> Option<Box<Uring>> {
        let Engine::Uring(mut u) = std::mem::replace(&mut self.engine, Engine::Sync) else {
            return None;
        };
        if u.drain() {
            Some(u)
        } else {
            self.keep_memory_mapped();
            None
        }
    }

    /// Operations may still be writing into guest memory: keeps it mapped for good rather than
    /// risk the kernel writing into whatever is mapped there next.
    fn keep_memory_mapped(&self) {
        std::mem::forget(self.mem.clone());
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        if let Engine::Uring(u) = &mut self.engine {
            if !u.drain() {
                self.keep_memory_mapped();
            }
        }
    }
}
