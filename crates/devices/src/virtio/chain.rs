//! Walking a descriptor chain: where the descriptors a guest wrote (address, length, direction,
//! next index) become buffers a device uses — for net, vsock, console, balloon and rng, whose
//! chains run one way. virtio-blk's requests mix directions in one chain (a readable header,
//! data either way, a writable status byte at the very end) and are parsed by
//! `block/request.rs` against the same rules (descriptor cap, a truncated chain refused, every
//! range checked against guest memory).
//!
//! Everything here is guest-controlled and checked: a descriptor's direction against the one the
//! device expects, the number of descriptors, the total length (summed without overflow), that a
//! buffer lies inside guest memory (an address range that wraps around the address space does
//! not), and every address computed inside a buffer. Nothing panics on any input. A chain that
//! loops, or whose next index points outside the descriptor table, ends: `virtio-queue`'s
//! iterator gives up after the queue size in descriptors (or at a bad index), and a device may
//! cap the count lower still with [`Rules::max_descriptors`].
//!
//! Two ways to use it:
//! - [`Walker`]: descriptor by descriptor, each one a [`Region`] or the [`ChainError`] that is
//!   wrong with it, so a device may use the good buffers of a partly bad chain (console output,
//!   balloon page lists);
//! - [`collect`] (and [`Regions`]): the whole chain or an error (a network frame, a vsock
//!   packet), then [`read_at`]/[`write_at`] move bytes at any offset of the chain's buffers, as
//!   if they were one.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Which way the device uses a chain's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device-readable: the driver's data for the device (transmit queues, requests).
    Read,
    /// Device-writable: room for the device's data (receive queues, responses).
    Write,
}

/// What is wrong with a descriptor, or with a chain as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A device-writable descriptor where the device reads, or the other way round.
    #[error("descriptor with the wrong direction")]
    WrongDirection,
    /// A buffer (or a part of one) outside guest memory, or whose range wraps.
    #[error("descriptor outside guest memory")]
    OutsideMemory,
    /// The chain's buffers hold more bytes than the device accepts.
    #[error("descriptor chain longer than accepted")]
    TooLong,
    /// The chain has more descriptors than the device accepts.
    #[error("descriptor chain has too many descriptors")]
    TooManyDescriptors,
    /// The chain's buffers end before the bytes asked for.
    #[error("descriptor chain shorter than needed")]
    TooShort,
}

/// One buffer of a chain: `len` bytes of guest memory at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

impl Region {
    /// The guest address `offset` bytes into the buffer; `None` at or past its end, or when the
    /// address would wrap.
    pub fn at(&self, offset: u64) -> Option<GuestAddress> {
        if offset >= u64::from(self.len) {
            return None;
        }
        self.addr.0.checked_add(offset).map(GuestAddress)
    }

    /// True when the whole buffer lies in `mem` (an empty one always does).
    pub fn in_memory(&self, mem: &GuestMemoryMmap) -> bool {
        self.len == 0 || GuestMemoryBackend::check_range(mem, self.addr, self.len as usize)
    }
}

/// What a device accepts of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'m> {
    /// The direction every descriptor must have.
    pub direction: Direction,
    /// Most descriptors (the iterator already stops after the queue size).
    pub max_descriptors: usize,
    /// Most bytes in all buffers together.
    pub max_len: u64,
    /// Checks that every buffer lies in this memory (else only the reads and writes find out).
    pub memory: Option<&'m GuestMemoryMmap>,
}

impl Rules<'_> {
    /// Only the direction is checked (count and length limited by the queue alone).
    pub fn direction(direction: Direction) -> Rules<'static> {
        Rules {
            direction,
            max_descriptors: usize::MAX,
            max_len: u64::MAX,
            memory: None,
        }
    }
}

/// Walks a chain descriptor by descriptor: each item is the next buffer or what is wrong with
/// that descriptor. A wrong direction or a buffer outside memory spoils only its own item;
/// once the descriptor count or the total length is exceeded, that error is the last item.
pub struct Walker<'m, I> {
    descs: I,
    rules: Rules<'m>,
    seen: usize,
    total: u64,
    done: bool,
}

impl<'m, I: Iterator<Item = Descriptor>> Walker<'m, I> {
    /// Walks `chain` (a `virtio_queue::DescriptorChain`, or any descriptors) by `rules`.
    pub fn new(chain: impl IntoIterator<IntoIter = I>, rules: Rules<'m>) -> Self {
        Walker {
            descs: chain.into_iter(),
            rules,
            seen: 0,
            total: 0,
            done: false,
        }
    }

    /// Bytes in the buffers of the right direction walked so far (saturating).
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl<I: Iterator<Item = Descriptor>> Iterator for Walker<'_, I> {
    type Item = Result<Region, ChainError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let Some(d) = self.descs.next() else {
            self.done = true;
            return None;
        };
        self.seen = self.seen.saturating_add(1);
        if self.seen > self.rules.max_descriptors {
            self.done = true;
            return Some(Err(ChainError::TooManyDescriptors));
        }
        let writable = self.rules.direction == Direction::Write;
        if d.is_write_only() != writable {
            return Some(Err(ChainError::WrongDirection));
        }
        let region = Region {
            addr: d.addr(),
            len: d.len(),
        };
        self.total = self.total.saturating_add(u64::from(region.len));
        if self.total > self.rules.max_len {
            self.done = true;
            return Some(Err(ChainError::TooLong));
        }
        if let Some(mem) = self.rules.memory {
            if !region.in_memory(mem) {
                return Some(Err(ChainError::OutsideMemory));
            }
        }
        Some(Ok(region))
    }
}

/// Walks all of `chain` by `rules`, appending its non-empty buffers to `out`; the first
/// problem is the error (`out` may then hold some of the chain's buffers: truncate it). Returns
/// the chain's total length.
pub fn collect<I>(
    chain: impl IntoIterator<IntoIter = I>,
    rules: Rules<'_>,
    out: &mut Vec<Region>,
) -> Result<u64, ChainError>
where
    I: Iterator<Item = Descriptor>,
{
    let mut w = Walker::new(chain, rules);
    for r in w.by_ref() {
        let r = r?;
        if r.len > 0 {
            out.push(r);
        }
    }
    Ok(w.total())
}

/// The buffers of a whole chain, in order, and their total length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Regions {
    regions: Vec<Region>,
    len: u64,
}

impl Regions {
    /// All of `chain`'s buffers by `rules` (see [`collect`]).
    pub fn new<I>(
        chain: impl IntoIterator<IntoIter = I>,
        rules: Rules<'_>,
    ) -> Result<Self, ChainError>
    where
        I: Iterator<Item = Descriptor>,
    {
        let mut regions = Vec::new();
        let len = collect(chain, rules, &mut regions)?;
        Ok(Regions { regions, len })
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the chain holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The non-empty buffers, in order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Reads `buf.len()` bytes starting `offset` bytes into the chain.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        read_at(mem, &self.regions, offset, buf)
    }

    /// Writes `buf` starting `offset` bytes into the chain.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        write_at(mem, &self.regions, offset, buf)
    }
}

/// Walks `len` bytes starting `skip` bytes into `regions`, calling `f(guest address, range of
/// the caller's buffer)` for each contiguous piece. `TooShort` when the regions end first,
/// `OutsideMemory` when an address would wrap.
fn for_each_span(
    regions: &[Region],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    let mut done = 0usize;
    for r in regions {
        if done == len {
            break;
        }
        let rlen = u64::from(r.len);
        if skip >= rlen {
            skip -= rlen;
            continue;
        }
        let avail = rlen - skip;
        let n = (len - done).min(usize::try_from(avail).unwrap_or(usize::MAX));
        let at = r
            .addr
            .0
            .checked_add(skip)
            .ok_or(ChainError::OutsideMemory)?;
        f(GuestAddress(at), done..done + n)?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(ChainError::TooShort)
    }
}

/// Copies `buf.len()` bytes out of guest memory, starting `skip` bytes into `regions` (the
/// buffers of one chain, as if they were one).
pub fn read_at(
    mem: &GuestMemoryMmap,
    regions: &[Region],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), ChainError> {
    let len = buf.len();
    for_each_span(regions, skip, len, |at, range| {
        let dst = buf.get_mut(range).ok_or(ChainError::OutsideMemory)?;
        mem.read_slice(dst, at)
            .map_err(|_| ChainError::OutsideMemory)
    })
}

/// Copies `buf` into guest memory, starting `skip` bytes into `regions`.
pub fn write_at(
    mem: &GuestMemoryMmap,
    regions: &[Region],
    skip: u64,
    buf: &[u8],
) -> Result<(), ChainError> {
    for_each_span(regions, skip, buf.len(), |at, range| {
        let src = buf.get(range).ok_or(ChainError::OutsideMemory)?;
        mem.write_slice(src, at)
            .map_err(|_| ChainError::OutsideMemory)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM: usize = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn rules(direction: Direction, m: &GuestMemoryMmap) -> Rules<'_> {
        Rules {
            direction,
            max_descriptors: 4,
            max_len: 1000,
            memory: Some(m),
        }
    }

    #[test]
    fn a_good_chain_gives_its_non_empty_buffers_and_length() {
        let m = mem();
        let chain = [d(0x1000, 10, 0), d(0x2000, 0, 0), d(0x3000, 20, 0)];
        let r = Regions::new(chain, rules(Direction::Read, &m)).unwrap();
        assert_eq!(r.len(), 30);
        assert_eq!(
            r.regions(),
            &[
                Region {
                    addr: GuestAddress(0x1000),
                    len: 10
                },
                Region {
                    addr: GuestAddress(0x3000),
                    len: 20
                }
            ]
        );
        // Reads and writes span buffers as if they were one.
        r.write_at(&m, 5, b"0123456789").unwrap();
        let mut b = [0u8; 5];
        m.read_slice(&mut b, GuestAddress(0x1005)).unwrap();
        assert_eq!(&b, b"01234");
        m.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!(&b, b"56789");
        let mut all = [0u8; 10];
        r.read_at(&m, 5, &mut all).unwrap();
        assert_eq!(&all, b"0123456789");
        // Past the end: too short, nothing half-done on the caller's side matters.
        assert_eq!(r.read_at(&m, 25, &mut all), Err(ChainError::TooShort));
        assert_eq!(r.read_at(&m, u64::MAX, &mut all), Err(ChainError::TooShort));
        assert!(r.read_at(&m, 30, &mut []).is_ok());
    }

    #[test]
    fn wrong_direction_is_refused_either_way() {
        let m = mem();
        let e = Regions::new([d(0x1000, 10, F_WRITE)], rules(Direction::Read, &m));
        assert_eq!(e, Err(ChainError::WrongDirection));
        let e = Regions::new(
            [d(0x1000, 10, F_WRITE), d(0x2000, 1, 0)],
            rules(Direction::Write, &m),
        );
        assert_eq!(e, Err(ChainError::WrongDirection));
        // Descriptor by descriptor, the good ones are still there.
        let items: Vec<_> = Walker::new(
            [d(0x1000, 10, 0), d(0x2000, 4, F_WRITE), d(0x3000, 6, 0)],
            Rules::direction(Direction::Read),
        )
        .collect();
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok() && items[2].is_ok());
        assert_eq!(items[1], Err(ChainError::WrongDirection));
    }

    #[test]
    fn too_long_and_too_many_descriptors() {
        let m = mem();
        let e = Regions::new(
            [d(0x1000, 600, 0), d(0x2000, 401, 0)],
            rules(Direction::Read, &m),
        );
        assert_eq!(e, Err(ChainError::TooLong));
        assert!(Regions::new(
            [d(0x1000, 600, 0), d(0x2000, 400, 0)],
            rules(Direction::Read, &m)
        )
        .is_ok());
        // Lengths near u32::MAX add up without overflow.
        let huge = [d(0, u32::MAX, 0), d(0, u32::MAX, 0), d(0, u32::MAX, 0)];
        let mut w = Walker::new(huge, Rules::direction(Direction::Read));
        assert!(w.by_ref().all(|r| r.is_ok()));
        assert_eq!(w.total(), 3 * u64::from(u32::MAX));
        let five = [d(0x1000, 1, 0); 5];
        assert_eq!(
            Regions::new(five, rules(Direction::Read, &m)),
            Err(ChainError::TooManyDescriptors)
        );
        // The count error ends the walk.
        let items: Vec<_> = Walker::new(five, rules(Direction::Read, &m)).collect();
        assert_eq!(items.len(), 5);
        assert_eq!(items[4], Err(ChainError::TooManyDescriptors));
    }

    #[test]
    fn buffers_outside_memory_or_wrapping_are_refused() {
        let m = mem();
        for bad in [
            d(MEM as u64, 1, F_WRITE),
            d(MEM as u64 - 8, 16, F_WRITE),
            d(u64::MAX - 4, 100, F_WRITE),
            d(u64::MAX, 1, F_WRITE),
        ] {
            let e = Regions::new([d(0x1000, 8, F_WRITE), bad], rules(Direction::Write, &m));
            assert_eq!(e, Err(ChainError::OutsideMemory), "{bad:?}");
        }
        // An empty buffer anywhere is harmless; without a memory check the copy finds out.
        assert!(Regions::new([d(u64::MAX, 0, 0)], rules(Direction::Read, &m)).is_ok());
        let r = Regions::new(
            [d(MEM as u64 - 8, 16, 0)],
            Rules::direction(Direction::Read),
        )
        .unwrap();
        let mut b = [0u8; 16];
        assert_eq!(r.read_at(&m, 0, &mut b), Err(ChainError::OutsideMemory));
        assert!(r.read_at(&m, 0, &mut b[..8]).is_ok());
        let r = Regions::new([d(u64::MAX - 4, 100, 0)], Rules::direction(Direction::Read)).unwrap();
        assert_eq!(r.read_at(&m, 10, &mut b), Err(ChainError::OutsideMemory));
        assert_eq!(r.write_at(&m, 0, &b), Err(ChainError::OutsideMemory));
        // Region arithmetic.
        let reg = Region {
            addr: GuestAddress(u64::MAX - 1),
            len: 4,
        };
        assert_eq!(reg.at(1), Some(GuestAddress(u64::MAX)));
        assert_eq!(reg.at(2), None);
        assert_eq!(reg.at(4), None);
        assert!(!reg.in_memory(&m));
    }

    /// A size-8 queue in `m` whose descriptors are `descs` (addr, len, flags, next) and whose
    /// available ring offers `head`.
    fn queue_with(m: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)], head: u16) -> Queue {
        let (table, avail, used) = (0x1_0000u64, 0x2_0000u64, 0x3_0000u64);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = table + 16 * i as u64;
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        m.write_obj(head, GuestAddress(avail + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let mut q = Queue::new(8).unwrap();
        q.set_desc_table_address(Some(table as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        q
    }

    #[test]
    fn looping_chains_end() {
        let m = mem();
        // Descriptor 0 points at itself: the queue's iterator gives up after 8 (its size).
        let mut q = queue_with(&m, &[(0x8000, 16, F_NEXT, 0)], 0);
        let chain = q.pop_descriptor_chain(&m).unwrap();
        let r = Regions::new(chain, Rules::direction(Direction::Read)).unwrap();
        assert_eq!(r.regions().len(), 8);
        assert_eq!(r.len(), 8 * 16);
        // A device cap below the queue size makes the loop an error.
        let mut q = queue_with(&m, &[(0x8000, 16, F_NEXT, 1), (0x9000, 16, F_NEXT, 0)], 0);
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(
            Regions::new(chain, rules(Direction::Read, &m)),
            Err(ChainError::TooManyDescriptors)
        );
        // A next index past the table ends the chain there.
        let mut q = queue_with(&m, &[(0x8000, 16, F_NEXT, 200)], 0);
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(
            Regions::new(chain, rules(Direction::Read, &m))
                .unwrap()
                .len(),
            16
        );
        // A head past the table: no descriptor at all.
        let mut q = queue_with(&m, &[], 100);
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert!(Regions::new(chain, rules(Direction::Read, &m))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn collect_appends_and_reports_the_first_problem() {
        let m = mem();
        let mut out = vec![Region {
            addr: GuestAddress(1),
            len: 1,
        }];
        let n = collect([d(0x1000, 5, 0)], rules(Direction::Read, &m), &mut out).unwrap();
        assert_eq!((n, out.len()), (5, 2));
        let e = collect(
            [d(0x1000, 5, 0), d(0x2000, 5, F_WRITE), d(0x3000, 5, 0)],
            rules(Direction::Read, &m),
            &mut out,
        );
        assert_eq!(e, Err(ChainError::WrongDirection));
    }
}
