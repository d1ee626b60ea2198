//! The virtio-vsock packet: `struct virtio_vsock_hdr` (virtio 1.x §5.10.6) and moving packets
//! between guest descriptor chains and host buffers, validating everything the guest wrote.

use crate::virtio::chain::{ChainError, Direction, Regions, Rules};
use std::ops::Deref;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// Size of `struct virtio_vsock_hdr` in bytes.
pub const HDR_LEN: usize = 44;
/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// Socket type: stream (the only one supported).
pub const TYPE_STREAM: u16 = 1;
/// Most payload bytes in one packet, in either direction.
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// Operation: connection request.
pub const OP_REQUEST: u16 = 1;
/// Operation: connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Operation: connection reset (refused or aborted).
pub const OP_RST: u16 = 3;
/// Operation: the sender will not receive and/or send any more (see the SHUTDOWN flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Operation: payload.
pub const OP_RW: u16 = 5;
/// Operation: the sender's buffer space changed (buf_alloc/fwd_cnt are in every header).
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Operation: asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `struct virtio_vsock_hdr`, little-endian in guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (SHUTDOWN flags).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |o: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(x)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a guest descriptor chain does not hold a usable packet (tx) or buffer (rx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain holds fewer than [`HDR_LEN`] bytes (tx: readable, rx: writable).
    #[error("descriptor chain shorter than the 44-byte header")]
    HeaderTooShort,
    /// A tx descriptor is device-writable, or an rx descriptor device-readable.
    #[error("descriptor with the wrong direction")]
    WrongDirection,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    Memory,
    /// The header's `len` is larger than [`MAX_PKT_DATA`].
    #[error("packet length {0} above the maximum")]
    TooLong(u32),
    /// The header's `len` is larger than the payload the descriptors hold.
    #[error("packet length {len} but only {avail} payload bytes in the descriptors")]
    Truncated {
        /// The header's `len`.
        len: u32,
        /// Payload bytes present.
        avail: u64,
    },
}

/// A tx chain that could not be parsed: the header when it was readable, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPacket {
    /// The decoded header, when the chain held a readable one.
    pub header: Option<Header>,
    /// What was wrong.
    pub error: PacketError,
}

impl From<ChainError> for PacketError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::WrongDirection => PacketError::WrongDirection,
            ChainError::OutsideMemory => PacketError::Memory,
            // The walk sets no length or count limit (the chain iterator stops after the queue
            // size); running out of buffer is a short header (or payload, caught before).
            ChainError::TooShort | ChainError::TooLong | ChainError::TooManyDescriptors => {
                PacketError::HeaderTooShort
            }
        }
    }
}

/// The non-empty buffers of one chain, in order, all of them in the direction `direction`.
/// Memory is checked when they are read or written.
fn regions<I>(
    chain: impl IntoIterator<IntoIter = I>,
    direction: Direction,
) -> Result<Regions, PacketError>
where
    I: Iterator<Item = Descriptor>,
{
    Ok(Regions::new(chain, Rules::direction(direction))?)
}

/// Parses a tx (driver → device) chain: every descriptor device-readable, the header possibly
/// spread over several of them, then `len` payload bytes. `len` is trusted only as far as the
/// descriptors go: it must not exceed the payload present (surplus buffer space is ignored,
/// as Linux and Firecracker do) nor [`MAX_PKT_DATA`].
pub fn read_tx<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> Result<(Header, Vec<u8>), BadPacket>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let bad = |header, error| BadPacket { header, error };
    let regions = regions(chain, Direction::Read).map_err(|e| bad(None, e))?;
    let total = regions.len();
    if total < HDR_LEN as u64 {
        return Err(bad(None, PacketError::HeaderTooShort));
    }
    let mut hb = [0u8; HDR_LEN];
    regions
        .read_at(mem, 0, &mut hb)
        .map_err(|e| bad(None, e.into()))?;
    let hdr = Header::from_bytes(&hb);
    if hdr.len as usize > MAX_PKT_DATA {
        return Err(bad(Some(hdr), PacketError::TooLong(hdr.len)));
    }
    let avail = total - HDR_LEN as u64;
    if u64::from(hdr.len) > avail {
        return Err(bad(
            Some(hdr),
            PacketError::Truncated {
                len: hdr.len,
                avail,
            },
        ));
    }
    let mut data = vec![0u8; hdr.len as usize];
    regions
        .read_at(mem, HDR_LEN as u64, &mut data)
        .map_err(|e| bad(Some(hdr), e.into()))?;
    Ok((hdr, data))
}

/// The writable space of an rx (device → driver) chain.
pub struct RxBuffer {
    regions: Regions,
}

impl RxBuffer {
    /// Checks an rx chain: every descriptor device-writable, room for at least the header.
    pub fn new<M>(chain: DescriptorChain<M>) -> Result<RxBuffer, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let regions = regions(chain, Direction::Write)?;
        if regions.len() < HDR_LEN as u64 {
            return Err(PacketError::HeaderTooShort);
        }
        Ok(RxBuffer { regions })
    }

    /// Payload bytes that fit after the header (at most [`MAX_PKT_DATA`]).
    pub fn data_capacity(&self) -> usize {
        let room = self.regions.len().saturating_sub(HDR_LEN as u64);
        usize::try_from(room)
            .unwrap_or(usize::MAX)
            .min(MAX_PKT_DATA)
    }

    /// Writes `hdr` (whose `len` must be `data.len()`) and `data`; returns the bytes written.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        data: &[u8],
    ) -> Result<u32, PacketError> {
        if data.len() > self.data_capacity() {
            return Err(PacketError::TooLong(data.len() as u32));
        }
        let hb = hdr.to_bytes();
        let mut skip = 0u64;
        for part in [&hb[..], data] {
            self.write_at(mem, skip, part)?;
            skip += part.len() as u64;
        }
        Ok((HDR_LEN + data.len()) as u32)
    }

    fn write_at(&self, mem: &GuestMemoryMmap, skip: u64, buf: &[u8]) -> Result<(), PacketError> {
        Ok(self.regions.write_at(mem, skip, buf)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 5000,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
