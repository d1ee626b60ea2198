//! The guest's memory statistics (the stats queue's buffer).

use super::STAT_ENTRY_SIZE;
use std::time::SystemTime;

/// The guest's last memory statistics (every field `None` until the guest reported it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Bytes swapped in (`VIRTIO_BALLOON_S_SWAP_IN`).
    pub swap_in: Option<u64>,
    /// Bytes swapped out (`VIRTIO_BALLOON_S_SWAP_OUT`).
    pub swap_out: Option<u64>,
    /// Major page faults (`VIRTIO_BALLOON_S_MAJFLT`).
    pub major_faults: Option<u64>,
    /// Minor page faults (`VIRTIO_BALLOON_S_MINFLT`).
    pub minor_faults: Option<u64>,
    /// Free memory in bytes (`VIRTIO_BALLOON_S_MEMFREE`).
    pub free_memory: Option<u64>,
    /// Total memory in bytes (`VIRTIO_BALLOON_S_MEMTOT`).
    pub total_memory: Option<u64>,
    /// Available memory in bytes, as the guest estimates it (`VIRTIO_BALLOON_S_AVAIL`).
    pub available_memory: Option<u64>,
    /// Disk caches in bytes (`VIRTIO_BALLOON_S_CACHES`).
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations (`VIRTIO_BALLOON_S_HTLB_PGALLOC`).
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations (`VIRTIO_BALLOON_S_HTLB_PGFAIL`).
    pub hugetlb_failures: Option<u64>,
    /// When the device received these statistics (`None`: never).
    pub received_at: Option<SystemTime>,
}

impl BalloonStats {
    /// Parses a stats buffer: packed little-endian `{u16 tag, u64 value}` entries. A trailing
    /// partial entry is ignored, unknown tags too.
    pub fn parse(bytes: &[u8]) -> BalloonStats {
        let mut s = BalloonStats::default();
        for e in bytes.chunks_exact(STAT_ENTRY_SIZE) {
            let (tag, val) = e.split_at(2);
            let tag = u16::from_le_bytes(<[u8; 2]>::try_from(tag).unwrap_or_default());
            let val = u64::from_le_bytes(<[u8; 8]>::try_from(val).unwrap_or_default());
            let field = match tag {
                0 => &mut s.swap_in,
                1 => &mut s.swap_out,
                2 => &mut s.major_faults,
                3 => &mut s.minor_faults,
                4 => &mut s.free_memory,
                5 => &mut s.total_memory,
                6 => &mut s.available_memory,
                7 => &mut s.disk_caches,
                8 => &mut s.hugetlb_allocations,
                9 => &mut s.hugetlb_failures,
                _ => continue,
            };
            *field = Some(val);
        }
        s
    }
}
