//! The I/O engines: reads, writes and flushes straight between the image and guest memory.
//!
//! Both engines hand the kernel `iovec`s that point into guest memory (no copies). Those host
//! addresses come from vm-memory for ranges the request parser checked to lie in guest memory,
//! and the worker owning the engine keeps the `GuestMemoryMmap` (hence the mappings) alive until
//! every submitted operation has completed ([`Uring::drain`]).
//!
//! io_uring operations run in the kernel on the ring's behalf, out of reach of the seccomp
//! filter, so the ring is confined instead: it is created (disabled) when the device is built,
//! before the sandbox goes up, with the image as its only (fixed) file, and locked down with
//! `IORING_REGISTER_RESTRICTIONS` before it is enabled — only `readv`, `writev` (not for a
//! read-only image) and `fsync`, only on that fixed file, and no further `io_uring_register`
//! operation at all. The device keeps that one ring for its lifetime, across resets: no ring is
//! ever created once the guest runs.

use super::request::{Op, Request, Seg};
use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The ring's only registered file, the image: every operation names it by this index.
const DISK: types::Fixed = types::Fixed(0);

/// Most iovecs in one readv/writev (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// The `iovec`s of one request, pointing into guest memory.
pub(super) struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to guest memory (shared, mapped for the VM's lifetime and kept
// mapped by the owner of the engine while an operation is in flight); an IoVecs is only used by
// the one thread that owns it and by the kernel.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// The host buffers of `segs` (already checked to lie in guest memory). None if a range is
    /// not (any more) in guest memory or there are too many pieces.
    pub fn new(mem: &GuestMemoryMmap, segs: &[Seg]) -> Option<IoVecs> {
        let mut v = Vec::with_capacity(segs.len());
        for s in segs {
            for slice in mem.get_slices(s.addr, s.len as usize) {
                let slice = slice.ok()?;
                v.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        (v.len() <= IOV_MAX).then_some(IoVecs(v))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Drops the first `n` bytes (a partial transfer).
    fn advance(&mut self, mut n: usize) {
        let mut whole = 0;
        for iov in &mut self.0 {
            if n >= iov.iov_len {
                n -= iov.iov_len;
                whole += 1;
            } else {
                // SAFETY: `n` < iov_len: the new base stays inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                break;
            }
        }
        self.0.drain(..whole);
    }
}

/// Reads (or writes) all of `iov` at byte `offset` of `fd`, synchronously.
pub(super) fn rw_sync(fd: RawFd, mut iov: IoVecs, mut offset: u64, write: bool) -> io::Result<()> {
    while !iov.is_empty() {
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // `iov` has at most IOV_MAX entries.
        let cnt = iov.0.len() as libc::c_int;
        // SAFETY: every iovec describes guest memory checked by `IoVecs::new`, kept mapped by
        // the caller for the duration of the call; the kernel reads/writes only those bytes.
        let r = unsafe {
            if write {
                libc::pwritev(fd, iov.0.as_ptr(), cnt, off)
            } else {
                libc::preadv(fd, iov.0.as_ptr(), cnt, off)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            // The image shrank under us.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        iov.advance(r as usize);
        offset += r as u64;
    }
    Ok(())
}

/// One operation in flight.
struct Slot {
    req: Request,
    iov: IoVecs,
    offset: u64,
}

/// The io_uring engine: up to `capacity` operations in flight, completions signalled on an
/// eventfd the worker watches. The ring is restricted (see the module documentation).
pub(super) struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    inflight: usize,
    /// Tells this ring from any other the process ever created.
    #[cfg(test)]
    serial: u64,
    /// Operations handed to the ring (first submissions, not continuations).
    #[cfg(test)]
    started: u64,
}

/// Adds which set-up step failed (and, for "invalid argument", the kernel it needs) to `e`,
/// keeping its kind.
fn setup_error(step: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e| {
        let hint = if e.raw_os_error() == Some(libc::EINVAL) {
            " (restricted io_uring rings need Linux 5.10 or later)"
        } else {
            ""
        };
        io::Error::new(e.kind(), format!("{step}: {e}{hint}"))
    }
}

impl Uring {
    /// A restricted ring for operations on `fd`, `capacity` in flight; writes only if
    /// `writable`. The ring keeps its own reference to the file. Call it before the sandbox goes
    /// up: it needs `io_uring_setup` and `io_uring_register`, which the seccomp filter forbids.
    pub fn new(fd: RawFd, capacity: u32, writable: bool) -> io::Result<Uring> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(capacity)
            .map_err(setup_error("io_uring_setup"))?;
        let sub = ring.submitter();
        sub.register_files(&[fd])
            .map_err(setup_error("registering the disk image with io_uring"))?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        sub.register_eventfd(eventfd.as_raw_fd())
            .map_err(setup_error("registering the io_uring completion eventfd"))?;
        let mut allowed = vec![
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        if writable {
            allowed.push(Restriction::sqe_op(opcode::Writev::CODE));
        }
        // No `Restriction::register_op`: once enabled, the ring accepts no io_uring_register
        // operation (no other file, buffer or eventfd can be added).
        sub.register_restrictions(&mut allowed)
            .map_err(setup_error("IORING_REGISTER_RESTRICTIONS"))?;
        sub.register_enable_rings()
            .map_err(setup_error("IORING_REGISTER_ENABLE_RINGS"))?;
        let n = capacity as usize;
        #[cfg(test)]
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(Uring {
            ring,
            eventfd,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            inflight: 0,
            #[cfg(test)]
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            #[cfg(test)]
            started: 0,
        })
    }

    /// Whether the system has restricted io_uring rings (and lets this process use them); the
    /// reason if not. Creates a ring: only where [`Uring::new`] may run too.
    #[cfg(test)]
    pub fn available() -> io::Result<()> {
        let f = std::fs::File::open("/dev/null")?;
        Uring::new(f.as_raw_fd(), 4, false).map(drop)
    }

    /// The completion eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// True when no more operations can be started.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    fn entry(&self, idx: usize) -> Option<io_uring::squeue::Entry> {
        let slot = self.slots.get(idx)?.as_ref()?;
        let e = match &slot.req.op {
            Op::Read { .. } => {
                opcode::Readv::new(DISK, slot.iov.0.as_ptr(), slot.iov.0.len() as u32)
                    .offset(slot.offset)
                    .build()
            }
            Op::Write { .. } => {
                opcode::Writev::new(DISK, slot.iov.0.as_ptr(), slot.iov.0.len() as u32)
                    .offset(slot.offset)
                    .build()
            }
            Op::Flush => opcode::Fsync::new(DISK)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            _ => return None,
        };
        Some(e.user_data(idx as u64))
    }

    fn push(&mut self, idx: usize) -> bool {
        let Some(e) = self.entry(idx) else {
            return false;
        };
        // SAFETY: the iovec array and the guest buffers it points to stay valid until this
        // operation's completion is reaped: the slot owns the array, and the engine's owner keeps
        // guest memory mapped until `drain` has seen every completion.
        unsafe { self.ring.submission().push(&e).is_ok() }
    }

    /// Starts a read, write or flush. Gives the request back (with the reason) if it cannot.
    pub fn start(&mut self, req: Request, iov: IoVecs) -> Result<(), (Request, io::Error)> {
        let offset = match &req.op {
            Op::Read { offset, .. } | Op::Write { offset, .. } => *offset,
            Op::Flush => 0,
            _ => return Err((req, io::ErrorKind::Unsupported.into())),
        };
        let Some(idx) = self.free.pop() else {
            return Err((req, io::ErrorKind::WouldBlock.into()));
        };
        let Some(slot) = self.slots.get_mut(idx) else {
            return Err((req, io::ErrorKind::Other.into()));
        };
        *slot = Some(Slot { req, iov, offset });
        if self.push(idx) {
            self.inflight += 1;
            #[cfg(test)]
            {
                self.started += 1;
            }
            return Ok(());
        }
        // The submission queue is never fuller than the slots in use; this is a bug guard.
        self.free.push(idx);
        match self.slots.get_mut(idx).and_then(Option::take) {
            Some(s) => Err((s.req, io::ErrorKind::WouldBlock.into())),
            None => Ok(()),
        }
    }

    /// Hands the queued submissions to the kernel.
    pub fn submit(&mut self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EBUSY/EAGAIN: the next completion or notification submits again.
                    tracing::debug!("io_uring submit: {e}");
                    return;
                }
            }
        }
    }

    fn finish(
        &mut self,
        idx: usize,
        res: io::Result<()>,
        out: &mut Vec<(Request, io::Result<()>)>,
    ) {
        if let Some(s) = self.slots.get_mut(idx).and_then(Option::take) {
            self.free.push(idx);
            self.inflight -= 1;
            out.push((s.req, res));
        }
    }

    /// Collects finished operations into `out` (continuing partial transfers).
    pub fn reap(&mut self, out: &mut Vec<(Request, io::Result<()>)>) {
        let _ = self.eventfd.read();
        let mut resubmit = false;
        loop {
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            if cqes.is_empty() {
                break;
            }
            for (ud, res) in cqes {
                let idx = ud as usize;
                let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                    continue;
                };
                let rw = matches!(slot.req.op, Op::Read { .. } | Op::Write { .. });
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    resubmit |= self.push(idx);
                } else if res < 0 {
                    self.finish(idx, Err(io::Error::from_raw_os_error(-res)), out);
                } else if !rw {
                    self.finish(idx, Ok(()), out);
                } else if res == 0 && !slot.iov.is_empty() {
                    self.finish(idx, Err(io::ErrorKind::UnexpectedEof.into()), out);
                } else {
                    slot.iov.advance(res as usize);
                    slot.offset += res as u64;
                    if slot.iov.is_empty() {
                        self.finish(idx, Ok(()), out);
                    } else if self.push(idx) {
                        resubmit = true;
                    } else {
                        self.finish(idx, Err(io::ErrorKind::WouldBlock.into()), out);
                    }
                }
            }
        }
        if resubmit {
            self.submit();
        }
    }

    /// Waits until nothing is in flight (before guest memory may go away). False if the ring
    /// failed and operations may still be running.
    pub fn drain(&mut self) -> bool {
        let mut out = Vec::new();
        while self.inflight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("io_uring wait while draining: {e}");
                    return false;
                }
            }
            self.reap(&mut out);
            out.clear();
        }
        true
    }
}

#[cfg(test)]
impl Uring {
    /// The number that tells this ring from every other one the process created.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Reads, writes and flushes started on this ring so far.
    pub fn started(&self) -> u64 {
        self.started
    }

    /// The ring's file descriptor.
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// The ring's `io_uring_register` operations.
    pub fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }

    /// Submits `e` alone (nothing else may be in flight) and returns its completion's result:
    /// what the kernel makes of an arbitrary operation on this ring.
    ///
    /// # Safety
    ///
    /// Whatever memory `e` points to must stay valid (and writable where the operation writes)
    /// until this returns.
    pub unsafe fn run_raw(&mut self, e: squeue::Entry) -> io::Result<i32> {
        const RAW: u64 = u64::MAX;
        assert_eq!(self.inflight, 0, "run_raw with operations in flight");
        // SAFETY: the caller keeps what `e` points to valid until this returns, and this waits
        // for the operation's completion.
        unsafe { self.ring.submission().push(&e.user_data(RAW)) }
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        self.ring.submit_and_wait(1)?;
        let _ = self.eventfd.read();
        let cqe = self.ring.completion().next();
        match cqe {
            Some(c) if c.user_data() == RAW => Ok(c.result()),
            _ => Err(io::ErrorKind::NotFound.into()),
        }
    }
}
