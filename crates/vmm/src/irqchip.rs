//! The in-kernel interrupt controllers, set up for the machine the ACPI tables describe: a
//! hardware-reduced platform whose interrupts all go through the IOAPIC.
//!
//! `KVM_CREATE_IRQCHIP` always makes a pair of 8259 PICs beside the IOAPIC and the local APICs,
//! and its default routing sends GSIs 0–15 to both the PIC and the IOAPIC. A hardware-reduced
//! Linux never touches the PIC (it installs a null legacy PIC), so left alone it keeps KVM's
//! reset state: every line unmasked and vector base 0. Any edge on an ISA GSI (COM1 on 4, the
//! GED on 10) then makes the PIC raise its output, and wherever LINT0 is an unmasked ExtINT the
//! vCPU takes vector `0 + irq` — an exception vector (#OF for IRQ 4, NMI's vector for IRQ 10
//! through the slave). Three walls keep that from ever happening:
//!
//! 1. the GSI routing sends GSIs 0–23 to the IOAPIC only ([`ioapic_routing`]): the PIC sees no
//!    line at all, and the MADT's IOAPIC (GSI base 0, no source overrides) matches it pin for pin;
//! 2. the PIC is programmed as Linux's own `init_8259A` would leave it, with every line masked
//!    and the vector bases at 0x30/0x38 ([`masked_pic`]);
//! 3. LINT0 is masked on every vCPU (`cpu::regs::configure_lint`), so Linux keeps it masked.
//!
//! No PIT is created: a hardware-reduced guest has no timer there to program (its clock events
//! are the local APIC timers, its clock source kvmclock/TSC), and the MADT has no IRQ0 override.
//!
//! That is `--irqchip kernel` ([`config::Irqchip::Kernel`]). The default is `split`
//! (`KVM_CAP_SPLIT_IRQCHIP`): only the local APICs are KVM's; the IOAPIC is the VMM's
//! ([`devices::ioapic::Ioapic`] on the MMIO bus at the same address), there is no PIC at all,
//! and each pin the guest programs becomes an MSI route KVM delivers from the device's irqfd
//! ([`KvmMsiRouter`]). QEMU's microvm works this way by default, and on the lab's nested KVM
//! it is the mode in which concurrent guests do not die: with KVM's in-kernel IOAPIC, guests of
//! QEMU (`kernel-irqchip=on`) and of Ferrovisor alike triple-fault or hang now and then while
//! many boot at once (bench/ab.sh, numbers in docs/architecture.md).

use devices::ioapic::{MsiMessage, MsiRouter};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_irqchip, kvm_pic_state, KvmIrqRouting,
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use std::sync::Arc;

/// Pins of KVM's IOAPIC (= the GSIs the VM has).
pub const IOAPIC_PINS: u32 = 24;

/// Vector base Linux gives the master PIC (ISA IRQ 0 = vector 0x30), and the slave's.
const PIC_MASTER_BASE: u8 = 0x30;
const PIC_SLAVE_BASE: u8 = 0x38;

/// Local APICs in KVM, the IOAPIC left to the VMM: `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)` with
/// [`IOAPIC_PINS`] pins. Call it before creating vCPUs; the routes come from the returned
/// router, which the IOAPIC model drives.
pub fn create_split(
    vm: &Arc<VmFd>,
) -> Result<Arc<KvmMsiRouter>, (&'static str, kvm_ioctls::Error)> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = u64::from(IOAPIC_PINS);
    vm.enable_cap(&cap)
        .map_err(|e| ("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", e))?;
    let router = Arc::new(KvmMsiRouter { vm: vm.clone() });
    // No pin routed until the guest programs one.
    router
        .set_routes(&[None; devices::ioapic::IOAPIC_PINS])
        .map_err(|e| {
            (
                "KVM_SET_GSI_ROUTING",
                kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EINVAL)),
            )
        })?;
    Ok(router)
}

/// Turns the user-space IOAPIC's routing table into KVM's GSI routing (GSI n = pin n, an MSI
/// route per routed pin).
pub struct KvmMsiRouter {
    vm: Arc<VmFd>,
}

/// The KVM routing entries for a user-space IOAPIC's table.
pub fn msi_routing(routes: &[Option<MsiMessage>]) -> Vec<kvm_irq_routing_entry> {
    routes
        .iter()
        .enumerate()
        .filter_map(|(gsi, r)| r.map(|m| (gsi as u32, m)))
        .map(|(gsi, m)| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address;
            e.u.msi.address_hi = 0;
            e.u.msi.data = m.data;
            e
        })
        .collect()
}

impl MsiRouter for KvmMsiRouter {
    fn set_routes(
        &self,
        routes: &[Option<MsiMessage>; devices::ioapic::IOAPIC_PINS],
    ) -> std::io::Result<()> {
        let table = KvmIrqRouting::from_entries(&msi_routing(routes))
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Creates the in-kernel IOAPIC, PIC and local APICs and sets them up as the module doc says.
pub fn create(vm: &VmFd) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    vm.create_irq_chip()
        .map_err(|e| ("KVM_CREATE_IRQCHIP", e))?;
    let routing = KvmIrqRouting::from_entries(&ioapic_routing()).map_err(|_| {
        (
            "building the GSI routing",
            kvm_ioctls::Error::new(libc::E2BIG),
        )
    })?;
    vm.set_gsi_routing(&routing)
        .map_err(|e| ("KVM_SET_GSI_ROUTING", e))?;
    for chip in [masked_pic(true), masked_pic(false)] {
        vm.set_irqchip(&chip)
            .map_err(|e| ("KVM_SET_IRQCHIP (PIC)", e))?;
    }
    Ok(())
}

/// GSI `n` → IOAPIC pin `n` for every pin, and nothing to the PIC.
pub fn ioapic_routing() -> Vec<kvm_irq_routing_entry> {
    (0..IOAPIC_PINS)
        .map(|gsi| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = gsi;
            e
        })
        .collect()
}

/// One 8259 initialised (ICW1–ICW4: edge-triggered, cascaded, 8086 mode, normal EOI) with
/// every line masked; `master` picks the chip.
pub fn masked_pic(master: bool) -> kvm_irqchip {
    let pic = kvm_pic_state {
        imr: 0xff,
        irq_base: if master {
            PIC_MASTER_BASE
        } else {
            PIC_SLAVE_BASE
        },
        init4: 1,
        // The lines whose trigger mode the ELCR may change (what KVM itself allows).
        elcr_mask: if master { 0xf8 } else { 0xde },
        ..Default::default()
    };
    let mut chip = kvm_irqchip {
        chip_id: if master {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        },
        ..Default::default()
    };
    chip.chip.pic = pic;
    chip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_ioapic_only_pin_for_pin() {
        let r = ioapic_routing();
        assert_eq!(r.len(), IOAPIC_PINS as usize);
        for (i, e) in r.iter().enumerate() {
            assert_eq!(e.gsi, i as u32);
            assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
            // SAFETY: the entries are of type IRQCHIP, whose union member is `irqchip`.
            let (chip, pin) = unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) };
            assert_eq!((chip, pin), (KVM_IRQCHIP_IOAPIC, i as u32));
        }
    }

    #[test]
    fn pics_are_masked_with_linux_vector_bases() {
        for (master, id, base) in [
            (true, KVM_IRQCHIP_PIC_MASTER, 0x30),
            (false, KVM_IRQCHIP_PIC_SLAVE, 0x38),
        ] {
            let c = masked_pic(master);
            assert_eq!(c.chip_id, id);
            // SAFETY: PIC chips carry a kvm_pic_state.
            let p = unsafe { c.chip.pic };
            assert_eq!((p.imr, p.irq_base, p.isr, p.irr), (0xff, base, 0, 0));
        }
    }

    #[test]
    fn msi_routes_for_routed_pins_only() {
        let mut routes = [None; devices::ioapic::IOAPIC_PINS];
        routes[4] = Some(MsiMessage {
            address: 0xfee0_1000,
            data: 0x24,
        });
        routes[17] = Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        });
        let e = msi_routing(&routes);
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].gsi, e[0].type_), (4, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the `msi` union member.
        let (lo, data) = unsafe { (e[0].u.msi.address_lo, e[0].u.msi.data) };
        assert_eq!((lo, data), (0xfee0_1000, 0x24));
        assert_eq!(e[1].gsi, 17);
    }

    #[test]
    fn kvm_accepts_the_split_irqchip_and_its_routes() {
        // Needs a KVM (any flavour: nothing runs).
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED kvm_accepts_the_split_irqchip: no usable /dev/kvm");
            return;
        };
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let router = create_split(&vm).expect("split irqchip");
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&efd, 4)
            .expect("KVM_IRQFD on GSI 4 before any route");
        let mut routes = [None; devices::ioapic::IOAPIC_PINS];
        routes[4] = Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x24,
        });
        router.set_routes(&routes).expect("an MSI route");
        vm.create_vcpu(0).expect("a vCPU with its in-kernel LAPIC");
        efd.write(1).unwrap();
    }

    #[test]
    fn kvm_accepts_the_setup_and_the_pic_reads_back_masked() {
        // Needs a KVM (any flavour: nothing runs).
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED kvm_accepts_the_setup: no usable /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        create(&vm).expect("irqchip set-up");
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).expect("KVM_GET_IRQCHIP");
        // SAFETY: PIC chips carry a kvm_pic_state.
        let p = unsafe { chip.chip.pic };
        assert_eq!((p.imr, p.irq_base), (0xff, 0x30));
        // An irqfd on an ISA GSI still works with the IOAPIC-only routing.
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&efd, 4).expect("KVM_IRQFD on GSI 4");
    }
}
