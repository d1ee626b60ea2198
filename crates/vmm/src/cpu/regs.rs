//! Initial vCPU state: segments, control registers and page tables for the boot protocol in
//! use, FPU, MSRs and the local APIC's LINT pins.

use crate::memory::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, identity paging, `rsi` = boot_params.
    Linux64 {
        /// Entry address (bzImage load address + 0x200, or the ELF entry).
        rip: u64,
        /// The zero page.
        boot_params: u64,
    },
    /// PVH: 32-bit protected mode, paging off, `ebx` = hvm_start_info.
    Pvh {
        /// The PVH entry from the ELF note.
        rip: u64,
        /// The start info.
        start_info: u64,
    },
    /// The architectural reset state (firmware at the reset vector): nothing to set.
    ResetVector,
}

const GDT_NULL: u64 = 0;
// Flat 4 GiB segments: flags/access in the usual packed form.
const GDT_CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
const GDT_CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
const GDT_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
const GDT_TSS: u64 = gdt_entry(0x008b, 0, 0xfffff);

const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Packs a GDT descriptor from `flags` (G/DB/L/AVL in bits 15..12, access byte in 7..0).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The KVM segment a GDT descriptor describes.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Errors writing boot structures into guest memory or programming the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory write failed (the layout does not fit the RAM).
    #[error("writing boot {what} into guest memory: {source}")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {vcpu}: {op}: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|source| RegsError::Memory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| RegsError::Memory {
            what: "IDT",
            source,
        })
}

/// Identity-maps the first GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let err = |source| RegsError::Memory {
        what: "page tables",
        source,
    };
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(err)?;
    mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START))
        .map_err(err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

/// Writes the GDT (and page tables) the entry needs and returns the special registers.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let code = match entry {
        BootEntry::Linux64 { .. } => GDT_CODE64,
        BootEntry::Pvh { .. } => GDT_CODE32,
        BootEntry::ResetVector => return Ok(sregs),
    };
    let gdt = [GDT_NULL, code, GDT_DATA, GDT_TSS];
    write_gdt(mem, &gdt)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment_from_gdt(code, CODE_SEL);
    let data = segment_from_gdt(GDT_DATA, DATA_SEL);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT_TSS, TSS_SEL);
    match entry {
        BootEntry::Linux64 { .. } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::ResetVector => {}
    }
    Ok(sregs)
}

/// General-purpose registers at entry, `None` for the reset vector (keep KVM's reset state).
pub fn boot_regs(entry: BootEntry) -> Option<kvm_regs> {
    match entry {
        BootEntry::Linux64 { rip, boot_params } => Some(kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot_params,
            ..Default::default()
        }),
        BootEntry::Pvh { rip, start_info } => Some(kvm_regs {
            rflags: 0x2,
            rip,
            rbx: start_info,
            ..Default::default()
        }),
        BootEntry::ResetVector => None,
    }
}

/// The x87/SSE state Linux expects.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs set on every vCPU.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        // Fast strings.
        e(MSR_IA32_MISC_ENABLE, 1),
        // MTRRs enabled, default type write-back.
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_LVT_MASKED: u32 = 1 << 16;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *byte as _;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 ExtINT but **masked**, LINT1 NMI.
///
/// A PC BIOS leaves LINT0 an unmasked ExtINT (virtual-wire mode to the 8259). Here the PIC is
/// never used (`crate::irqchip`), and Linux keeps LINT0 unmasked on the boot CPU when it finds
/// it so: a stray PIC output would then arrive as an exception vector. Masked, Linux leaves it
/// masked ("masked ExtINT on CPU#0"), as on QEMU microvm, whose firmware does not touch it.
pub fn configure_lint(mut l: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(
        &mut l,
        APIC_LVT0,
        set_delivery_mode(lvt0, APIC_MODE_EXTINT) | APIC_LVT_MASKED,
    );
    let lvt1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn gdt_entries_decode() {
        assert_eq!(GDT_CODE64, 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_DATA, 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_CODE32, 0x00cf_9b00_0000_ffff);
        let cs = segment_from_gdt(GDT_CODE64, CODE_SEL);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.g, cs.type_, cs.s),
            (0, 0xffff_ffff, 1, 0, 1, 0xb, 1)
        );
        let cs32 = segment_from_gdt(GDT_CODE32, CODE_SEL);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let tss = segment_from_gdt(GDT_TSS, TSS_SEL);
        assert_eq!(
            (tss.s, tss.type_, tss.present, tss.limit),
            (0, 0xb, 1, 0xfffff)
        );
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
        let e = gdt_entry(0xc093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 0);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let entry = BootEntry::Linux64 {
            rip: 0x100200,
            boot_params: 0x7000,
        };
        let s = boot_sregs(&mem, entry, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.gdt.limit, 31);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BOOT_GDT_START + 8))
                .unwrap(),
            GDT_CODE64
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(),
            PDPTE_START | 3
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PDE_START + 8 * 511))
                .unwrap(),
            (511 << 21) | 0x83
        );
        let r = boot_regs(entry).unwrap();
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100200, 0x7000, 2));
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn pvh_sregs() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let entry = BootEntry::Pvh {
            rip: 0x1000,
            start_info: 0x6000,
        };
        let s = boot_sregs(
            &mem,
            entry,
            kvm_sregs {
                cr0: 0x6000_0010,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!((s.cs.db, s.cs.l), (1, 0));
        assert_eq!(boot_regs(entry).unwrap().rbx, 0x6000);
        assert!(boot_regs(BootEntry::ResetVector).is_none());
    }

    #[test]
    fn lint_pins() {
        let l = kvm_lapic_state::default();
        let l = configure_lint(l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700, "ExtINT, masked");
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x400);
    }
}
