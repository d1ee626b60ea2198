//! Turning a descriptor chain into a checked request (virtio 1.x §5.2.6).
//!
//! Everything the guest wrote is validated here, before any I/O: the chain's shape, the
//! direction of every buffer, that every buffer lies in guest memory, the header, the sector
//! range, the discard/write-zeroes segments. The rest of the device only sees [`Request`]s.

use super::SECTOR_SIZE;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Status byte: I/O error.
pub(super) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: request not supported.
pub(super) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Longest chain accepted (descriptors, indirect ones included).
pub(super) const MAX_DESCS: usize = 1024;
/// Size of the request header (type, reserved, sector).
const HEADER: u32 = 16;
/// Size of one discard/write-zeroes segment.
const SEGMENT: u32 = 16;

/// One guest buffer (inside guest memory, checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

/// What the device limits requests to.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Capacity in sectors.
    pub sectors: u64,
    pub readonly: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// A checked operation.
#[derive(Debug)]
pub(super) enum Op {
    /// Read `len` bytes at byte `offset` into `segs`.
    Read {
        offset: u64,
        len: u64,
        segs: Vec<Seg>,
    },
    /// Write `len` bytes at byte `offset` from `segs`.
    Write {
        offset: u64,
        len: u64,
        segs: Vec<Seg>,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the serial into `segs`.
    GetId { segs: Vec<Seg> },
    /// Discard these byte ranges (offset, length).
    Discard(Vec<(u64, u64)>),
    /// Zero these byte ranges (offset, length, may deallocate).
    WriteZeroes(Vec<(u64, u64, bool)>),
    /// Already decided: complete with this status.
    Fail(u8),
}

/// A request whose status byte is known.
#[derive(Debug)]
pub(super) struct Request {
    pub head: u16,
    /// Guest address of the status byte (in guest memory, device-writable).
    pub status: GuestAddress,
    pub op: Op,
}

impl Request {
    /// (operations, bytes) to charge the rate limiter; None for requests that do no I/O.
    pub fn cost(&self) -> Option<(u64, u64)> {
        match &self.op {
            Op::Read { len, .. } | Op::Write { len, .. } => Some((1, *len)),
            Op::Flush | Op::Discard(_) | Op::WriteZeroes(_) => Some((1, 0)),
            Op::GetId { .. } | Op::Fail(_) => None,
        }
    }
}

/// The outcome of parsing one chain.
#[derive(Debug)]
pub(super) enum Parsed {
    /// A request to execute (possibly an already failed one).
    Req(Request),
    /// No usable status byte: return the chain with used length 0.
    NoStatus(u16),
}

fn fail(head: u16, status: GuestAddress, code: u8) -> Parsed {
    Parsed::Req(Request {
        head,
        status,
        op: Op::Fail(code),
    })
}

/// Total length of `segs`.
pub(super) fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Reads up to `buf.len()` bytes from `segs` in order; returns how many.
pub(super) fn read_segs(mem: &GuestMemoryMmap, segs: &[Seg], buf: &mut [u8]) -> Option<usize> {
    let mut done = 0;
    for s in segs {
        let rest = buf.get_mut(done..)?;
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(s.len as usize);
        mem.read_slice(rest.get_mut(..n)?, s.addr).ok()?;
        done += n;
    }
    Some(done)
}

/// Writes up to `data.len()` bytes into `segs` in order; returns how many.
pub(super) fn write_segs(mem: &GuestMemoryMmap, segs: &[Seg], data: &[u8]) -> Option<usize> {
    let mut done = 0;
    for s in segs {
        let rest = data.get(done..)?;
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(s.len as usize);
        mem.write_slice(rest.get(..n)?, s.addr).ok()?;
        done += n;
    }
    Some(done)
}

/// Checks that `len` bytes at sector `sector` are a whole number of sectors inside the disk;
/// returns the byte offset.
fn check_range(sector: u64, len: u64, lim: &Limits) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    let size = lim.sectors.checked_mul(SECTOR_SIZE)?;
    (end <= size).then_some(offset)
}

/// Parses the discard or write-zeroes segments in `segs`.
fn parse_segments(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    discard: bool,
    lim: &Limits,
) -> Result<Vec<(u64, u64, bool)>, u8> {
    let (max_sectors, max_seg) = if discard {
        (lim.max_discard_sectors, lim.max_discard_seg)
    } else {
        (lim.max_write_zeroes_sectors, lim.max_write_zeroes_seg)
    };
    let len = total_len(segs);
    let count = len / u64::from(SEGMENT);
    if len == 0 || !len.is_multiple_of(u64::from(SEGMENT)) || count > u64::from(max_seg) {
        return Err(S_IOERR);
    }
    // `count` <= max_seg, a small number.
    let mut raw = vec![0u8; len as usize];
    if read_segs(mem, segs, &mut raw) != Some(raw.len()) {
        return Err(S_IOERR);
    }
    let mut out = Vec::with_capacity(count as usize);
    for seg in raw.chunks_exact(SEGMENT as usize) {
        let mut sector = [0u8; 8];
        let mut num = [0u8; 4];
        let mut flags = [0u8; 4];
        sector.copy_from_slice(&seg[0..8]);
        num.copy_from_slice(&seg[8..12]);
        flags.copy_from_slice(&seg[12..16]);
        let (sector, num, flags) = (
            u64::from_le_bytes(sector),
            u32::from_le_bytes(num),
            u32::from_le_bytes(flags),
        );
        // Unknown flags, or unmap on a discard: not supported (§5.2.6.2).
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
            || (discard && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
        {
            return Err(S_UNSUPP);
        }
        if num > max_sectors {
            return Err(S_IOERR);
        }
        let bytes = u64::from(num) * SECTOR_SIZE;
        let offset = check_range(sector, bytes, lim).ok_or(S_IOERR)?;
        out.push((
            offset,
            bytes,
            flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        ));
    }
    Ok(out)
}

/// Checks one chain and turns it into a request.
pub(super) fn parse(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    lim: &Limits,
) -> Parsed {
    let head = chain.head_index();
    let mut descs = Vec::new();
    let mut truncated = false;
    for d in chain {
        if descs.len() >= MAX_DESCS {
            return Parsed::NoStatus(head);
        }
        // The iterator stops early (loop, bad index, unreadable descriptor) with NEXT still set.
        truncated = d.has_next();
        descs.push(d);
    }
    let Some(last) = descs.last() else {
        return Parsed::NoStatus(head);
    };
    if truncated || !last.is_write_only() || last.len() == 0 {
        return Parsed::NoStatus(head);
    }
    let Some(status) = last.addr().0.checked_add(u64::from(last.len() - 1)) else {
        return Parsed::NoStatus(head);
    };
    let status = GuestAddress(status);
    if !mem.check_range(status, 1) {
        return Parsed::NoStatus(head);
    }
    // Every buffer except the status byte, empty ones dropped.
    let n = descs.len();
    let mut spans = descs.iter().enumerate().filter_map(|(i, d)| {
        let len = if i + 1 == n { d.len() - 1 } else { d.len() };
        (len > 0).then_some(Seg {
            addr: d.addr(),
            len,
            write: d.is_write_only(),
        })
    });

    // The header: the first 16 bytes, device-readable, possibly over several buffers.
    let mut hdr = [0u8; HEADER as usize];
    let mut got = 0u32;
    let mut data = Vec::new();
    while got < HEADER {
        let Some(s) = spans.next() else {
            return fail(head, status, S_IOERR);
        };
        if s.write {
            return fail(head, status, S_IOERR);
        }
        let take = s.len.min(HEADER - got);
        let Some(dst) = hdr.get_mut(got as usize..(got + take) as usize) else {
            return fail(head, status, S_IOERR);
        };
        if mem.read_slice(dst, s.addr).is_err() {
            return fail(head, status, S_IOERR);
        }
        got += take;
        if take < s.len {
            // The rest of this buffer is data.
            let Some(addr) = s.addr.0.checked_add(u64::from(take)) else {
                return fail(head, status, S_IOERR);
            };
            data.push(Seg {
                addr: GuestAddress(addr),
                len: s.len - take,
                write: false,
            });
        }
    }
    data.extend(spans);
    if data
        .iter()
        .any(|s| !mem.check_range(s.addr, s.len as usize))
    {
        return fail(head, status, S_IOERR);
    }

    let mut ty = [0u8; 4];
    ty.copy_from_slice(&hdr[0..4]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&hdr[8..16]);
    let (ty, sector) = (u32::from_le_bytes(ty), u64::from_le_bytes(sector));
    let all_write = data.iter().all(|s| s.write);
    let all_read = data.iter().all(|s| !s.write);
    let len = total_len(&data);

    let op = match ty {
        VIRTIO_BLK_T_IN => match check_range(sector, len, lim) {
            Some(offset) if all_write => Op::Read {
                offset,
                len,
                segs: data,
            },
            _ => Op::Fail(S_IOERR),
        },
        VIRTIO_BLK_T_OUT => match check_range(sector, len, lim) {
            Some(offset) if all_read && !lim.readonly => Op::Write {
                offset,
                len,
                segs: data,
            },
            _ => Op::Fail(S_IOERR),
        },
        // A flush carries no data; buffers a driver adds anyway are ignored.
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID if all_write => Op::GetId { segs: data },
        VIRTIO_BLK_T_GET_ID => Op::Fail(S_IOERR),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = ty == VIRTIO_BLK_T_DISCARD;
            if lim.readonly || !all_read {
                Op::Fail(S_IOERR)
            } else {
                match parse_segments(mem, &data, discard, lim) {
                    Ok(ranges) if discard => {
                        Op::Discard(ranges.into_iter().map(|(o, l, _)| (o, l)).collect())
                    }
                    Ok(ranges) => Op::WriteZeroes(ranges),
                    Err(code) => Op::Fail(code),
                }
            }
        }
        _ => Op::Fail(S_UNSUPP),
    };
    Parsed::Req(Request { head, status, op })
}
