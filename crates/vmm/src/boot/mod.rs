//! Linux boot: load a bzImage (64-bit boot protocol) or an ELF vmlinux (PVH entry when the
//! kernel has one), the initrd and the command line, and describe the machine (e820, ACPI).

pub mod acpi;

use crate::cpu::regs::BootEntry;
use crate::memory::{
    e820_map, low_ram_end, E820Entry, BIOS_RESET_VECTOR, CMDLINE_START, HIMEM_START,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use config::{KernelFormat, CMDLINE_MAX};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use std::fs::File;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The kernel loader refused the image.
    #[error("kernel {path}: {reason}")]
    Kernel {
        /// The kernel.
        path: PathBuf,
        /// The loader's explanation.
        reason: String,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (ends at {kernel_end:#x}); give the VM more memory")]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest usable address.
        limit: u64,
        /// End of the kernel image.
        kernel_end: u64,
    },
    /// The command line is not acceptable.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error("writing {what} into guest memory: {reason}")]
    Memory {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// A kernel loaded into guest memory by [`load_kernel`].
#[derive(Debug)]
pub struct LoadedKernel {
    result: KernelLoaderResult,
}

/// Everything needed to boot Linux, once its kernel is loaded.
pub struct LinuxBoot<'a> {
    /// The kernel image's format (from validation).
    pub format: KernelFormat,
    /// What [`load_kernel`] made of it.
    pub loaded: LoadedKernel,
    /// Optional initrd: its path (for messages) and the file, opened with [`open`].
    pub initrd: Option<(&'a Path, &'a File)>,
    /// The complete command line.
    pub cmdline: &'a str,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Where the ACPI RSDP is.
    pub rsdp: u64,
}

/// Opens a boot file (kernel, initrd) for reading, with the error naming it.
pub fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|e| BootError::File {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// What sits at the real-mode reset vector: pulse the reset line through the i8042
/// (`mov al, 0xfe; out 0x64, al`), then `cli; hlt` in a loop.
///
/// There is no BIOS, but Linux may still jump to F000:FFF0 to reboot: on a hardware-reduced ACPI
/// machine its default reboot order is EFI, then "BIOS" (a real-mode jump to the reset vector),
/// and only then port 0xcf9. This stub makes that jump a reset, as a real BIOS would.
pub const RESET_VECTOR_STUB: [u8; 8] = [0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfd];

/// Loads the kernel image `kf` (opened from `path` with [`open`]) into `mem`. Touches nothing
/// but `mem`'s kernel range, so it can run on a thread of its own while the rest of the VM is
/// built.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut kf: File,
    format: KernelFormat,
) -> Result<LoadedKernel, BootError> {
    let kernel_err = |e: linux_loader::loader::Error| BootError::Kernel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let highmem = GuestAddress(HIMEM_START);
    let result = match format {
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kf, Some(highmem)),
        KernelFormat::Elf => Elf::load(mem, None, &mut kf, Some(highmem)),
    }
    .map_err(kernel_err)?;
    Ok(LoadedKernel { result })
}

/// With the kernel loaded ([`load_kernel`]), loads the initrd and command line into `mem` and
/// writes the boot parameters; returns how the boot vCPU enters the kernel.
pub fn load_linux(mem: &GuestMemoryMmap, b: &LinuxBoot<'_>) -> Result<BootEntry, BootError> {
    mem.write_slice(&RESET_VECTOR_STUB, GuestAddress(BIOS_RESET_VECTOR))
        .map_err(|e| BootError::Memory {
            what: "reset vector stub",
            reason: e.to_string(),
        })?;
    let result = &b.loaded.result;

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(b.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = b.cmdline.len() as u32 + 1;

    let initrd_max = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x7fff_ffff);
    let initrd = match b.initrd {
        Some((p, f)) => Some(load_initrd(
            mem,
            p,
            f,
            result.kernel_end,
            initrd_max,
            b.mem_size,
        )?),
        None => None,
    };
    let e820 = e820_map(b.mem_size);

    match (b.format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh(mem, b.rsdp, cmdline_len, initrd, &e820)?;
            Ok(BootEntry::Pvh {
                rip: entry.0,
                start_info: PVH_INFO_START,
            })
        }
        (format, _) => {
            let hdr = result.setup_header.unwrap_or_else(elf_setup_header);
            write_zero_page(mem, hdr, b.rsdp, cmdline_len, initrd, &e820)?;
            let rip = match format {
                // The 64-bit entry is 0x200 into the protected-mode kernel.
                KernelFormat::BzImage => result.kernel_load.0 + 0x200,
                KernelFormat::Elf => result.kernel_load.0,
            };
            Ok(BootEntry::Linux64 {
                rip,
                boot_params: ZERO_PAGE_START,
            })
        }
    }
}

/// A setup header for an ELF kernel entered through the 64-bit protocol.
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: 0xaa55,
        header: 0x5372_6448, // "HdrS"
        kernel_alignment: 0x0100_0000,
        ..Default::default()
    }
}

/// Places the initrd page-aligned at the top of low RAM (below `initrd_max`); returns
/// (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut f: &File,
    kernel_end: u64,
    initrd_max: u64,
    mem_size: u64,
) -> Result<(u64, u64), BootError> {
    let size = f
        .metadata()
        .map_err(|e| BootError::File {
            what: "initrd",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .len();
    let limit = low_ram_end(mem_size).min(initrd_max.saturating_add(1));
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    let count = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, count)
        .map_err(|e| BootError::File {
            what: "initrd",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    rsdp: u64,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = rsdp;
    if e820.len() > params.e820_table.len() {
        return Err(BootError::Memory {
            what: "e820 map",
            reason: "too many entries".into(),
        });
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Memory {
        what: "boot_params",
        reason: e.to_string(),
    })
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    rsdp: u64,
    _cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|e| {
        BootError::Memory {
            what: "PVH start info",
            reason: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, E820_RAM};

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_e820() {
        let mem = create_guest_memory(256 << 20).unwrap();
        let e820 = e820_map(256 << 20);
        write_zero_page(
            &mem,
            elf_setup_header(),
            0xe0000,
            20,
            Some((0x800_0000, 0x1234)),
            &e820,
        )
        .unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, e820.len());
        let last = p.e820_table[e820.len() - 1];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn pvh_start_info() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let e820 = e820_map(64 << 20);
        write_pvh(&mem, 0xe0000, 10, Some((0x200_0000, 4096)), &e820).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x200_0000, 4096));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START)).unwrap();
        assert_eq!((e.addr, e.type_), (0, E820_RAM));
    }

    #[test]
    fn initrd_goes_to_top_of_low_memory_and_must_fit() {
        let dir = std::env::temp_dir().join(format!("fv-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("initrd");
        std::fs::write(&p, vec![0xabu8; 10_000]).unwrap();
        let mem = create_guest_memory(64 << 20).unwrap();
        let f = File::open(&p).unwrap();
        let (addr, size) = load_initrd(&mem, &p, &f, 0x200_0000, 0x7fff_ffff, 64 << 20).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + size + 4096 > 64 << 20);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(addr + 9_999)).unwrap(),
            0xab
        );
        let e = load_initrd(&mem, &p, &f, (64 << 20) - 4096, 0x7fff_ffff, 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
    }
}
