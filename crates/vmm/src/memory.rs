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
//! RAM is anonymous, private, `MAP_NORESERVE` memory: the host only pays for pages the guest
//! touches.

use vm_memory::{GuestAddress, GuestMemoryMmap};

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
}

/// Maps the guest's RAM (lazily backed; pages are allocated when first touched).
///
/// Not 2 MiB-aligned on purpose, for now: aligning it (so KVM can use 2 MiB mappings) made lab
/// boots ~22% faster, but twice in ~35 lab runs the lab's kernel then spun in the VMM's exit
/// path (a soft lockup under QEMU-TCG's emulated SVM); without it, no lockup was ever seen.
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
    fn firmware_ends_at_4g() {
        let fw = create_firmware_memory(&[0x90; 4096]).unwrap();
        assert_eq!(fw.read_obj::<u8>(GuestAddress(0xffff_fff0)).unwrap(), 0x90);
    }
}
