//! The guest's CPUID: the host's (`KVM_GET_SUPPORTED_CPUID`) with the topology of this VM, the
//! hypervisor bit and KVM's paravirt leaves, and the features the VMM does not back hidden.
//!
//! Topology: one socket, one thread per core, `cpus` cores; vCPU `i` has APIC ID `i`.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Per-vCPU inputs of the filter.
#[derive(Clone, Copy, Debug)]
pub struct CpuidParams {
    /// This vCPU's index (= APIC ID).
    pub vcpu_id: u32,
    /// Number of vCPUs in the VM.
    pub vcpu_count: u32,
    /// Whether the guest may use the PMU.
    pub pmu: bool,
    /// Whether KVM emulates the local APIC's TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`);
    /// `KVM_GET_SUPPORTED_CPUID` never reports it, so the VMM offers it (leaf 1 ECX[24]).
    pub tsc_deadline: bool,
}

/// The processor brand string leaves (0x8000_0002..=0x8000_0004).
const BRAND_LEAVES: std::ops::RangeInclusive<u32> = 0x8000_0002..=0x8000_0004;

/// The host CPU's brand string registers (EAX..EDX of leaves 0x8000_0002..=0x8000_0004), as the
/// CPUID instruction reports them to the VMM.
pub fn host_brand() -> Option<[u32; 12]> {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext < *BRAND_LEAVES.end() {
        return None;
    }
    let mut regs = [0u32; 12];
    for (i, leaf) in BRAND_LEAVES.enumerate() {
        let r = std::arch::x86_64::__cpuid(leaf);
        regs[i * 4..i * 4 + 4].copy_from_slice(&[r.eax, r.ebx, r.ecx, r.edx]);
    }
    Some(regs)
}

// Leaf 1.
const L1_ECX_VMX: u32 = 1 << 5;
const L1_ECX_PDCM: u32 = 1 << 15;
const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const L1_ECX_HYPERVISOR: u32 = 1 << 31;
const L1_EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0.
const L7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
// Leaf 0x8000_0001.
const E1_ECX_SVM: u32 = 1 << 2;
const E1_ECX_TOPOEXT: u32 = 1 << 22;
const E1_ECX_PERFCTR_CORE: u32 = 1 << 23;
const E1_ECX_PERFCTR_NB: u32 = 1 << 24;
const E1_ECX_PERFCTR_LLC: u32 = 1 << 28;

// Leaf 0x4000_0001 EAX (KVM_FEATURE_*): paravirt features that need the VMM's help, not only
// KVM's. Everything else KVM reports (kvmclock, async PF, steal time, PV EOI, PV unhalt, PV TLB
// flush, PV IPI, poll control, sched yield) KVM implements in the kernel on its own.
/// 15-bit MSI destination IDs: only for an IOAPIC that emits them (KVM's in-kernel one does not).
const KVM_FEATURE_MSI_EXT_DEST_ID: u32 = 1 << 15;
/// The map-GPA-range hypercall: exits to the VMM, which does not handle it.
const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 1 << 16;
/// Migration control MSR: for a VMM that migrates encrypted guests.
const KVM_FEATURE_MIGRATION_CONTROL: u32 = 1 << 17;
const KVM_FEATURES_NEEDING_THE_VMM: u32 =
    KVM_FEATURE_MSI_EXT_DEST_ID | KVM_FEATURE_HC_MAP_GPA_RANGE | KVM_FEATURE_MIGRATION_CONTROL;

/// KVM's CPUID signature leaf.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d]; // "KVMKVMKVM\0\0\0"

/// Bits needed to hold IDs `0..n`.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        // "AuthenticAMD" (or Hygon's "HygonGenuine", an AMD design): EBX "Auth"/"Hygo".
        .map(|e| e.ebx == 0x6874_7541 || e.ebx == 0x6f67_7948)
        .unwrap_or(false)
}

fn topology_leaf(function: u32, index: u32, count: u32, apic_id: u32) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        // SMT level: one thread per core.
        0 => (0, 1, (1 << 8)),
        // Core level: all vCPUs in one package.
        1 => (id_bits(count), count, (2 << 8) | 1),
        _ => (0, 0, index),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

/// Builds one vCPU's CPUID from the host's supported set. `brand` (see [`host_brand`]) fills the
/// brand-string leaves where KVM leaves them out or empty, so the guest names its CPU.
pub fn filter_cpuid(
    host: &[kvm_cpuid_entry2],
    p: CpuidParams,
    brand: Option<[u32; 12]>,
) -> Vec<kvm_cpuid_entry2> {
    let amd = is_amd(host);
    let count = p.vcpu_count.max(1);
    let id = p.vcpu_id;
    let max_basic = host
        .iter()
        .find(|e| e.function == 0)
        .map(|e| e.eax)
        .unwrap_or(0);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(host.len() + 4);
    for e in host {
        let mut e = *e;
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                e.ecx |= L1_ECX_HYPERVISOR;
                e.ecx &= !L1_ECX_VMX;
                if !p.pmu {
                    e.ecx &= !L1_ECX_PDCM;
                }
                if p.tsc_deadline {
                    e.ecx |= L1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !L1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= L1_EDX_HTT;
                } else {
                    e.edx &= !L1_EDX_HTT;
                }
            }
            0x4 => {
                // Cache topology: cores per package; L1/L2 private, L3 shared by all.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            // IA32_ARCH_CAPABILITIES is an Intel MSR. KVM emulates it on AMD too and reports
            // the bit, but a guest on an AMD CPU reading Intel's vulnerability bits from it
            // learns nothing true about the host (Firecracker clears it on AMD as well).
            0x7 if e.index == 0 && amd => {
                e.edx &= !L7_EDX_ARCH_CAPABILITIES;
            }
            0xa | 0x23 if !p.pmu => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Rebuilt below.
            0xb | 0x1f => continue,
            0x4000_0001 => e.eax &= !KVM_FEATURES_NEEDING_THE_VMM,
            0x8000_0001 => {
                e.ecx &= !E1_ECX_SVM;
                if !p.pmu {
                    e.ecx &= !(E1_ECX_PERFCTR_CORE | E1_ECX_PERFCTR_NB | E1_ECX_PERFCTR_LLC);
                }
            }
            0x8000_0008 if amd => {
                // NC (cores - 1) and the APIC ID size.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (id_bits(count) << 12);
            }
            0x8000_000a => {
                // SVM features: nested virtualization is not offered.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_001e if amd => {
                e.eax = id; // extended APIC ID
                e.ebx = id & 0xff; // core ID; threads per core - 1 = 0
                e.ecx = 0; // node 0, one node
                e.edx = 0;
            }
            0x8000_0022 if !p.pmu => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    if max_basic >= 0xb {
        for index in 0..3 {
            out.push(topology_leaf(0xb, index, count, id));
        }
    }
    if max_basic >= 0x1f && host.iter().any(|e| e.function == 0x1f) {
        for index in 0..3 {
            out.push(topology_leaf(0x1f, index, count, id));
        }
    }
    if !amd {
        // Without TOPOEXT the guest does not read 0x8000_001e; nothing to do on Intel.
    } else if !out
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.ecx & E1_ECX_TOPOEXT != 0)
    {
        out.retain(|e| e.function != 0x8000_001e);
    }
    let max_ext = out
        .iter()
        .find(|e| e.function == 0x8000_0000)
        .map(|e| e.eax)
        .unwrap_or(0);
    if let (Some(brand), true) = (brand, max_ext >= *BRAND_LEAVES.end()) {
        for (i, leaf) in BRAND_LEAVES.enumerate() {
            let regs = &brand[i * 4..i * 4 + 4];
            match out.iter_mut().find(|e| e.function == leaf) {
                Some(e) if e.eax | e.ebx | e.ecx | e.edx != 0 => {}
                Some(e) => (e.eax, e.ebx, e.ecx, e.edx) = (regs[0], regs[1], regs[2], regs[3]),
                None => out.push(kvm_cpuid_entry2 {
                    function: leaf,
                    eax: regs[0],
                    ebx: regs[1],
                    ecx: regs[2],
                    edx: regs[3],
                    ..Default::default()
                }),
            }
        }
    }
    if !out.iter().any(|e| e.function == KVM_SIGNATURE_LEAF) {
        out.push(kvm_cpuid_entry2 {
            function: KVM_SIGNATURE_LEAF,
            eax: KVM_SIGNATURE_LEAF + 1,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn intel_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0, 0x806f8, 0x0010_0800, L1_ECX_VMX | L1_ECX_PDCM | 1, 0),
            leaf(4, 0, (1 << 5) | 0x21, 0, 0, 0),
            leaf(7, 0, 0, 0, 0, L7_EDX_ARCH_CAPABILITIES),
            leaf(4, 3, (3 << 5) | 0x63, 0, 0, 0),
            leaf(0xa, 0, 0x0804_0002, 0, 0, 0x603),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0x1f, 0, 1, 2, 0x100, 7),
            leaf(
                0x4000_0000,
                0,
                0x4000_0001,
                KVM_SIGNATURE[0],
                KVM_SIGNATURE[1],
                KVM_SIGNATURE[2],
            ),
            leaf(0x4000_0001, 0, 0x0100_7afb, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0, 0x121, 0x2c10_0800),
        ]
    }

    #[test]
    fn topology_and_apic_ids() {
        let host = intel_host();
        for id in 0..4 {
            let v = filter_cpuid(
                &host,
                CpuidParams {
                    vcpu_id: id,
                    vcpu_count: 4,
                    pmu: false,
                    tsc_deadline: false,
                },
                None,
            );
            let l1 = find(&v, 1, 0);
            assert_eq!(l1.ebx >> 24, id);
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(l1.edx & L1_EDX_HTT, 0);
            let smt = find(&v, 0xb, 0);
            let core = find(&v, 0xb, 1);
            let end = find(&v, 0xb, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, id));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, id));
            assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
            assert_eq!(find(&v, 0x1f, 1).ebx, 4);
            let l3 = find(&v, 4, 3);
            assert_eq!(l3.eax >> 26, 3);
            assert_eq!((l3.eax >> 14) & 0xfff, 3);
            assert_eq!((find(&v, 4, 0).eax >> 14) & 0xfff, 0);
            assert_eq!(v.iter().filter(|e| e.function == 0xb).count(), 3);
        }
    }

    #[test]
    fn hypervisor_bit_set_and_unbacked_features_hidden() {
        let v = filter_cpuid(
            &intel_host(),
            CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                pmu: false,
                tsc_deadline: false,
            },
            None,
        );
        let l1 = find(&v, 1, 0);
        assert_ne!(l1.ecx & L1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & (L1_ECX_VMX | L1_ECX_PDCM), 0);
        assert_eq!(l1.edx & L1_EDX_HTT, 0);
        let pmu = find(&v, 0xa, 0);
        assert_eq!((pmu.eax, pmu.edx), (0, 0));
        assert_eq!(
            find(&v, 7, 0).edx,
            L7_EDX_ARCH_CAPABILITIES,
            "ARCH_CAPABILITIES kept on Intel"
        );
        let kvm = find(&v, 0x4000_0000, 0);
        assert_eq!([kvm.ebx, kvm.ecx, kvm.edx], KVM_SIGNATURE);
        assert_eq!(
            find(&v, 0x4000_0001, 0).eax,
            0x0100_7afb,
            "paravirt features kept"
        );
    }

    #[test]
    fn tsc_deadline_offered_when_kvm_emulates_it() {
        let p = |tsc_deadline| CpuidParams {
            vcpu_id: 0,
            vcpu_count: 1,
            pmu: false,
            tsc_deadline,
        };
        let on = find(&filter_cpuid(&intel_host(), p(true), None), 1, 0);
        assert_ne!(on.ecx & L1_ECX_TSC_DEADLINE, 0);
        let mut host = intel_host();
        host[1].ecx |= L1_ECX_TSC_DEADLINE;
        let off = find(&filter_cpuid(&host, p(false), None), 1, 0);
        assert_eq!(off.ecx & L1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn kvm_features_the_vmm_does_not_back_are_hidden() {
        let mut host = intel_host();
        let all = 0x0103_ffff;
        host.iter_mut()
            .find(|e| e.function == 0x4000_0001)
            .unwrap()
            .eax = all;
        let v = filter_cpuid(
            &host,
            CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                pmu: false,
                tsc_deadline: true,
            },
            None,
        );
        let eax = find(&v, 0x4000_0001, 0).eax;
        assert_eq!(eax, all & !KVM_FEATURES_NEEDING_THE_VMM);
        // kvmclock, async PF, steal time, PV EOI stay: KVM backs them.
        assert_eq!(eax & 0b111_1001, 0b111_1001);
    }

    #[test]
    fn pmu_kept_when_enabled() {
        let v = filter_cpuid(
            &intel_host(),
            CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                pmu: true,
                tsc_deadline: false,
            },
            None,
        );
        assert_eq!(find(&v, 0xa, 0).eax, 0x0804_0002);
        assert_ne!(find(&v, 1, 0).ecx & L1_ECX_PDCM, 0);
    }

    #[test]
    fn amd_leaves() {
        let host = vec![
            leaf(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            leaf(1, 0, 0, 0, 0, 0),
            leaf(
                0x8000_0001,
                0,
                0,
                0,
                E1_ECX_SVM | E1_ECX_TOPOEXT | E1_ECX_PERFCTR_CORE,
                0,
            ),
            leaf(7, 0, 0, 0, 0, L7_EDX_ARCH_CAPABILITIES | 1),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            leaf(0x8000_000a, 0, 1, 0x8000, 0, 0x1ff),
            leaf(0x8000_001e, 0, 9, 0x100, 0, 0),
        ];
        let v = filter_cpuid(
            &host,
            CpuidParams {
                vcpu_id: 2,
                vcpu_count: 3,
                pmu: false,
                tsc_deadline: false,
            },
            None,
        );
        assert_eq!(
            find(&v, 7, 0).edx,
            1,
            "ARCH_CAPABILITIES hidden on AMD, the rest kept"
        );
        let e1 = find(&v, 0x8000_0001, 0);
        assert_eq!(e1.ecx & (E1_ECX_SVM | E1_ECX_PERFCTR_CORE), 0);
        assert_ne!(e1.ecx & E1_ECX_TOPOEXT, 0);
        let e8 = find(&v, 0x8000_0008, 0);
        assert_eq!(e8.ecx & 0xff, 2);
        assert_eq!((e8.ecx >> 12) & 0xf, 2);
        assert_eq!(find(&v, 0x8000_000a, 0).edx, 0);
        let e1e = find(&v, 0x8000_001e, 0);
        assert_eq!((e1e.eax, e1e.ebx), (2, 2));
        // No 0xb leaves: host max basic leaf is 0x10 >= 0xb, so they are synthesized.
        assert_eq!(find(&v, 0xb, 1).ebx, 3);
        // KVM leaf synthesized when the host list lacks it.
        assert_eq!(find(&v, 0x4000_0000, 0).ebx, KVM_SIGNATURE[0]);
    }

    #[test]
    fn brand_string_filled_when_missing_and_kept_when_present() {
        let mut brand = [0u32; 12];
        for (i, chunk) in b"Ferrovisor Test CPU @ 1.00GHz\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
            .chunks(4)
            .take(12)
            .enumerate()
        {
            brand[i] = u32::from_le_bytes(chunk.try_into().unwrap());
        }
        let mut host = intel_host();
        host.push(leaf(0x8000_0000, 0, 0x8000_0008, 0, 0, 0));
        host.push(leaf(0x8000_0003, 0, 0, 0, 0, 0));
        let p = CpuidParams {
            vcpu_id: 0,
            vcpu_count: 1,
            pmu: false,
            tsc_deadline: false,
        };
        let v = filter_cpuid(&host, p, Some(brand));
        let mut s = Vec::new();
        for f in 0x8000_0002..=0x8000_0004u32 {
            let e = find(&v, f, 0);
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                s.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert!(
            s.starts_with(b"Ferrovisor Test CPU"),
            "{:?}",
            String::from_utf8_lossy(&s)
        );
        assert_eq!(v.iter().filter(|e| e.function == 0x8000_0003).count(), 1);
        // A brand KVM already reports is kept.
        host.retain(|e| e.function != 0x8000_0003);
        host.push(leaf(0x8000_0002, 0, 1, 2, 3, 4));
        let v = filter_cpuid(&host, p, Some(brand));
        assert_eq!(find(&v, 0x8000_0002, 0).eax, 1);
        // No brand leaves below the maximum extended leaf.
        let short: Vec<_> = intel_host();
        assert!(!filter_cpuid(&short, p, Some(brand))
            .iter()
            .any(|e| BRAND_LEAVES.contains(&e.function)));
    }

    #[test]
    fn host_brand_reads_the_cpu() {
        let b = host_brand().expect("every x86-64 CPU since 2004 has a brand string");
        assert!(b.iter().any(|&r| r != 0));
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
    }
}
