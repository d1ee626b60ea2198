//! Guest physical memory: the layout of a PC and the RAM regions backing it.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA, boot GDT/IDT, PVH start info, zero page, stack, page tables
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (reserved, RSDP first)
//! 0x0010_0000  kernel; RAM up to min(size, 3 GiB); initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices at 0xd000_0000, TSS, IOAPIC, LAPIC, firmware
//! 0x1_0000_0000  the rest of RAM
//! ```
//! A VM's RAM is a [`GuestRam`]: one anonymous, private mapping, 2 MiB-aligned, `MAP_NORESERVE`
//! (the host only pays for what the guest touches) with transparent huge pages where the host
//! has them, or hugetlbfs 2 MiB pages reserved at start (`hugepages=on`).

use config::HugePages;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` (the "zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Extended BIOS data area: reserved, holds the MP table.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (the RSDP is found here by address or by the legacy BIOS-area scan).
pub const ACPI_START: u64 = 0xe0000;
/// The real-mode reset vector (F000:FFF0) inside the legacy BIOS area.
pub const BIOS_RESET_VECTOR: u64 = 0xffff0;
/// End of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where high memory starts: the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Where virtio-mmio devices are placed.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// KVM's identity map page (needed on Intel, harmless elsewhere), inside the gap.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// KVM's TSS (three pages), inside the gap.
pub const KVM_TSS_START: u64 = 0xfeff_d000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// One e820 / PVH memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type: [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// The RAM ranges for a guest of `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// End of RAM below the gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// The e820 map a PC with `size` bytes of RAM reports.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let low_end = low_ram_end(size);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// `hugepages=on`, and the host's hugetlbfs pool cannot back the RAM.
    #[error("--memory {size},hugepages=on: {reason}")]
    HugePages {
        /// The RAM size.
        size: config::ByteSize,
        /// Why, and how to fix it.
        reason: String,
    },
}

/// 2 MiB: a huge page, and the alignment KVM needs to map guest RAM with them.
pub const HUGE_PAGE: u64 = 2 << 20;

/// What backs a VM's RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RamBacking {
    /// Transparent huge pages: 2 MiB-aligned, `MADV_HUGEPAGE`.
    Thp,
    /// 2 MiB hugetlbfs pages, reserved at start.
    Hugetlbfs,
    /// 4 KiB pages; the reason when huge pages were wanted.
    Small(Option<String>),
}

impl std::fmt::Display for RamBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RamBacking::Thp => f.write_str("transparent huge pages (2 MiB-aligned)"),
            RamBacking::Hugetlbfs => f.write_str("2 MiB hugetlbfs pages"),
            RamBacking::Small(None) => f.write_str("4 KiB pages"),
            RamBacking::Small(Some(why)) => write!(f, "4 KiB pages ({why})"),
        }
    }
}

/// A VM's RAM: one host mapping holding every RAM range at a 2 MiB-aligned address (so that a
/// huge page on the host is a huge page in KVM's nested page tables: host address and guest
/// address agree modulo 2 MiB), backed as [`HugePages`] asks.
///
/// It owns the mapping; [`GuestRam::memory`] hands out the guest-memory view devices and vCPUs
/// use. The mapping is unmapped on drop only when no copy of that view is left (checked on the
/// regions' reference counts); otherwise it stays mapped, with a warning, rather than leave a
/// dangling view.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<Arc<GuestRegionMmap>>,
    /// The whole mapping (address, length), unmapped on drop.
    mapping: (usize, usize),
    backing: RamBacking,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("mapping", &self.mapping)
            .field("backing", &self.backing)
            .finish()
    }
}

/// The host's transparent-huge-page mode (`always`, `madvise`, `never`), if it has THP.
pub fn thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    Some(s[start + 1..end].to_string())
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl GuestRam {
    /// Maps `size` bytes of RAM (the ranges of [`ram_ranges`]) backed as `hugepages` says.
    pub fn new(size: u64, hugepages: HugePages) -> Result<GuestRam, MemoryError> {
        let ranges = ram_ranges(size);
        // Each range at a 2 MiB-aligned offset of the mapping.
        let mut layout = Vec::with_capacity(ranges.len());
        let mut used = 0u64;
        for (gpa, len) in &ranges {
            layout.push((*gpa, used, *len));
            used += align_up(*len, HUGE_PAGE);
        }
        let map_err = |reason: String| MemoryError::Map { size, reason };
        let used_len = usize::try_from(used).map_err(|_| map_err("too large".into()))?;
        let (base, backing) = match hugepages {
            HugePages::On => {
                let flags = libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_HUGETLB
                    | libc::MAP_HUGE_2MB;
                // No MAP_NORESERVE: the pages are reserved now, so a short pool fails here and
                // not as a SIGBUS when the guest first touches a page.
                let addr = mmap_anon(used_len, flags).map_err(|e| MemoryError::HugePages {
                    size: config::ByteSize(size),
                    reason: hugetlb_shortage(used, &e),
                })?;
                (addr, RamBacking::Hugetlbfs)
            }
            HugePages::Auto | HugePages::Off => {
                // Reserve 2 MiB more, to start the RAM at a 2 MiB boundary inside it.
                let total = used_len + HUGE_PAGE as usize;
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
                let addr = mmap_anon(total, flags).map_err(|e| map_err(e.to_string()))?;
                let aligned = align_up(addr as u64, HUGE_PAGE) as usize;
                // Give back the slack before and after the aligned part.
                let head = aligned - addr;
                let tail = total - head - used_len;
                // SAFETY: both ranges lie inside the mapping just made, which nothing else
                // uses yet; munmap of a zero length is skipped.
                unsafe {
                    if head > 0 {
                        libc::munmap(addr as *mut libc::c_void, head);
                    }
                    if tail > 0 {
                        libc::munmap((aligned + used_len) as *mut libc::c_void, tail);
                    }
                }
                let backing = if hugepages == HugePages::Off {
                    RamBacking::Small(None)
                } else {
                    advise_huge(aligned, used_len)
                };
                (aligned, backing)
            }
        };
        // From here the mapping is owned by `ram` (unmapped on drop if anything fails).
        let mut ram = GuestRam {
            mem: GuestMemoryMmap::default(),
            regions: Vec::new(),
            mapping: (base, used_len),
            backing,
        };
        for (gpa, offset, len) in layout {
            let ptr = (base + offset as usize) as *mut u8;
            let len = usize::try_from(len).map_err(|_| map_err("too large".into()))?;
            // SAFETY: `ptr..ptr+len` lies inside the mapping `ram` owns, which outlives every
            // region (see Drop); the region does not unmap it (raw pointer: not owned).
            let region = unsafe {
                vm_memory::mmap::MmapRegionBuilder::new(len)
                    .with_raw_mmap_pointer(ptr)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            }
            .build()
            .map_err(|e| map_err(e.to_string()))?;
            let region = GuestRegionMmap::new(region, gpa)
                .ok_or_else(|| map_err(format!("range at {:#x} overflows", gpa.0)))?;
            ram.regions.push(Arc::new(region));
        }
        ram.mem = GuestMemoryMmap::from_arc_regions(ram.regions.clone())
            .map_err(|e| map_err(e.to_string()))?;
        Ok(ram)
    }

    /// The guest-memory view (clones share the mapping).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// What backs it.
    pub fn backing(&self) -> &RamBacking {
        &self.backing
    }

    /// The host address of guest address 0.
    pub fn host_base(&self) -> usize {
        self.mapping.0
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.mem = GuestMemoryMmap::default();
        if self.regions.iter().any(|r| Arc::strong_count(r) > 1) {
            tracing::warn!(
                "guest memory is still referenced as the VM goes: its mapping stays until exit"
            );
            return;
        }
        self.regions.clear();
        // SAFETY: the mapping was made by `GuestRam::new` and no region referring to it is left
        // (the reference counts above were 1: ours, now dropped).
        unsafe { libc::munmap(self.mapping.0 as *mut libc::c_void, self.mapping.1) };
    }
}

/// An anonymous mapping of `len` bytes, read-write, with `flags`.
fn mmap_anon(len: usize, flags: libc::c_int) -> std::io::Result<usize> {
    // SAFETY: a new anonymous mapping at an address the kernel picks: it overlaps nothing.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(addr as usize)
    }
}

/// Advises THP on the aligned RAM; says why not when it cannot.
fn advise_huge(addr: usize, len: usize) -> RamBacking {
    match thp_mode().as_deref() {
        None => {
            return RamBacking::Small(Some(
                "this host's kernel has no transparent huge pages".into(),
            ))
        }
        Some("never") => {
            return RamBacking::Small(Some(
                "transparent huge pages are off on this host: /sys/kernel/mm/transparent_hugepage/enabled is `never`"
                    .into(),
            ))
        }
        Some(_) => {}
    }
    // SAFETY: advice on a mapping this process owns; it changes no contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if r == 0 {
        RamBacking::Thp
    } else {
        RamBacking::Small(Some(format!(
            "madvise(MADV_HUGEPAGE): {}",
            std::io::Error::last_os_error()
        )))
    }
}

/// Why a hugetlbfs mapping of `need` bytes failed, and how to fix it.
fn hugetlb_shortage(need: u64, e: &std::io::Error) -> String {
    let pages = need / HUGE_PAGE;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| crate::kvm::meminfo_field(&meminfo, name);
    let free = field("HugePages_Free:").unwrap_or(0);
    let page_kb = field("Hugepagesize:").unwrap_or(0);
    let mut why =
        format!("{pages} huge pages of 2 MiB needed, {free} free in the host's pool ({e})");
    if page_kb != 0 && page_kb != 2048 {
        why.push_str(&format!(
            "; the host's default huge page size is {page_kb} kB"
        ));
    }
    why.push_str(&format!(
        "; reserve them with `echo {} > /proc/sys/vm/nr_hugepages` (or at boot: hugepages={}), or use hugepages=auto",
        pages + field("HugePages_Total:").unwrap_or(0).saturating_sub(free),
        pages
    ));
    why
}

/// Maps `size` bytes of RAM in 4 KiB pages, each range a mapping of its own (for tests and
/// tools; a VM's RAM is a [`GuestRam`]).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        size,
        reason: e.to_string(),
    })
}

/// Maps `image` as firmware ending at 4 GiB; returns the region (added as its own slot).
pub fn create_firmware_memory(image: &[u8]) -> Result<GuestMemoryMmap, MemoryError> {
    use vm_memory::Bytes;
    let size = image.len() as u64;
    let base = GuestAddress(MMIO_GAP_END - size);
    let mem =
        GuestMemoryMmap::from_ranges(&[(base, image.len())]).map_err(|e| MemoryError::Map {
            size,
            reason: e.to_string(),
        })?;
    mem.write_slice(image, base).map_err(|e| MemoryError::Map {
        size,
        reason: e.to_string(),
    })?;
    Ok(mem)
}

/// Registers every region of `mem` with KVM as a memory slot, numbering from `first_slot`;
/// returns the next free slot.
pub fn register_with_kvm(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    first_slot: u32,
) -> Result<u32, kvm_ioctls::Error> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut slot = first_slot;
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let desc = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points at a mapping of `region.len()` bytes owned by `mem`, which the
        // caller keeps alive for as long as the VM (the Vm struct owns both and drops the VM fd
        // first). KVM only accesses guest memory through this mapping.
        unsafe { vm.set_user_memory_region(desc) }?;
        slot += 1;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START).len(), 1);
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1], (GuestAddress(1 << 32), (4 << 30) - MMIO_GAP_START));
        let total: u64 = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_has_pc_holes_and_covers_ram() {
        let map = e820_map(6 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM but the EBDA/VGA/BIOS hole [0x9fc00, 0x100000).
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
        // Sorted, non-overlapping, nothing RAM in the MMIO gap.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:?}");
        }
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            let end = e.addr + e.size;
            assert!(end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END, "{e:?}");
            assert!(end <= 0xa0000 || e.addr >= HIMEM_START, "{e:?}");
        }
        let small = e820_map(64 << 20);
        assert_eq!(
            small.last().unwrap().addr + small.last().unwrap().size,
            64 << 20
        );
    }

    #[test]
    fn guest_memory_is_lazy_and_sized() {
        let mem = create_guest_memory(4 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beefu32, GuestAddress(MMIO_GAP_END + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(MMIO_GAP_END + 8)).unwrap(),
            0xdead_beef
        );
        assert!(mem.write_obj(1u8, GuestAddress(MMIO_GAP_START)).is_err());
    }

    #[test]
    fn guest_ram_is_2m_aligned_and_unmapped_when_last_dropped() {
        use vm_memory::GuestMemoryRegion;
        for (size, hp) in [
            (64 << 20, HugePages::Auto),
            ((4 << 30) + 4096, HugePages::Off),
        ] {
            let ram = GuestRam::new(size, hp).unwrap();
            assert_eq!(ram.host_base() as u64 % HUGE_PAGE, 0);
            let mem = ram.memory().clone();
            // Every range sits at a host address congruent to its guest address mod 2 MiB.
            for r in mem.iter() {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .unwrap();
                assert_eq!(host as u64 % HUGE_PAGE, r.start_addr().0 % HUGE_PAGE);
            }
            mem.write_obj(0x1234_5678u32, GuestAddress(size - 4))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(size - 4)).unwrap(),
                0x1234_5678
            );
            if hp == HugePages::Off {
                assert_eq!(ram.backing(), &RamBacking::Small(None));
            }
            let base = ram.host_base();
            // A copy still alive: the mapping stays (no dangling view).
            drop(ram);
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(size - 4)).unwrap(),
                0x1234_5678
            );
            drop(mem);
            let _ = base;
        }
        // The last owner unmaps: /proc/self/maps no longer has the range.
        let ram = GuestRam::new(8 << 20, HugePages::Off).unwrap();
        let base = ram.host_base();
        let mapped = || {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .any(|l| l.starts_with(&format!("{base:x}-")))
        };
        assert!(mapped());
        drop(ram);
        assert!(!mapped());
    }

    #[test]
    fn thp_backing_follows_the_host() {
        let ram = GuestRam::new(16 << 20, HugePages::Auto).unwrap();
        match thp_mode().as_deref() {
            Some("always") | Some("madvise") => assert_eq!(ram.backing(), &RamBacking::Thp),
            _ => assert!(matches!(ram.backing(), RamBacking::Small(Some(_)))),
        }
    }

    #[test]
    fn hugetlbfs_shortage_is_explained() {
        // This host reserves no huge pages (unless someone did): asking for more than the pool
        // has fails with how to fix it.
        match GuestRam::new(1 << 40, HugePages::On) {
            Err(e @ MemoryError::HugePages { .. }) => {
                let s = e.to_string();
                assert!(
                    s.contains("nr_hugepages") && s.contains("524288 huge pages"),
                    "{s}"
                );
            }
            other => panic!("expected a huge page shortage, got {other:?}"),
        }
    }

    #[test]
    fn firmware_ends_at_4g() {
        let fw = create_firmware_memory(&[0x90; 4096]).unwrap();
        assert_eq!(fw.read_obj::<u8>(GuestAddress(0xffff_fff0)).unwrap(), 0x90);
    }
}
