//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with its DSDT) and MADT.
//!
//! The machine is a hardware-reduced ACPI platform: power-off and reset go through the FADT's
//! sleep-control and reset registers (the [`devices::legacy::AcpiPm`] port block). Devices that
//! a stock kernel can only find through firmware (pvpanic, virtio-mmio) are in the DSDT.

use crate::memory::{ACPI_START, BIOS_RESET_VECTOR, IOAPIC_START, LAPIC_START};
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::legacy::{GED_LEN, GED_POWER_BUTTON, RESET_VALUE, S5_SLP_TYP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const OEM_ID: [u8; 6] = *b"FERROV";
const OEM_REVISION: u32 = 1;

/// Port of the COM1 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// Its IRQ.
pub const COM1_IRQ: u32 = 4;
/// pvpanic's port (same as QEMU's, which Linux's driver expects through `QEMU0001`).
pub const PVPANIC_PORT: u16 = 0x505;
/// The ACPI power/reset port block ([`devices::legacy::AcpiPm`]).
pub const ACPI_PM_PORT: u16 = 0x600;
/// The Generic Event Device's event register ([`devices::legacy::Ged`]), right after it.
pub const GED_PORT: u16 = 0x604;
/// The GED's interrupt: an ISA-range GSI nothing else uses (COM1 is 4, virtio 16–23; there is
/// no PIT, and a hardware-reduced platform has no SCI), edge-triggered like every irqfd line
/// here.
pub const GED_GSI: u32 = 10;

/// A device described in the DSDT beyond the fixed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsdtDevice {
    /// A virtio-mmio transport: `LNRO0005`, bound by the stock `virtio_mmio` driver.
    VirtioMmio {
        /// MMIO base.
        base: u64,
        /// MMIO length.
        len: u64,
        /// Its GSI (edge-triggered).
        irq: u32,
    },
}

/// The MADT: one enabled local APIC per vCPU and the IOAPIC (GSI base 0).
///
/// What it leaves out on purpose, to match the interrupt routing (`crate::irqchip`): the
/// `PCAT_COMPAT` flag (the 8259s exist inside KVM but are masked and receive no line) and any
/// interrupt source override (there is no PIT; every GSI is its IOAPIC pin).
pub fn madt(cpus: u32) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"FVMADT  ", OEM_REVISION);
    t.write_u32(36, LAPIC_START as u32);
    t.write_u32(40, 0); // flags: no PCAT_COMPAT.
    for id in 0..cpus {
        // Processor Local APIC: type 0, length 8, ACPI UID, APIC ID, flags (enabled).
        t.append_slice(&[0, 8, id as u8, id as u8, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // Local APIC NMI: all processors (0xff), flags 0, LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t
}

/// The Generic Event Device and the power button it notifies.
fn ged_and_power_button(devs: &mut Vec<RawAml>) {
    let mut ged = Vec::new();
    aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_GSI,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemIO,
                &GED_PORT,
                &(GED_LEN as u8),
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::Preserve,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            // Linux's evged calls _EVT(GSI) from its threaded interrupt handler. Reading GDAT
            // takes (and clears) the pending events.
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")),
                    &aml::And::new(&aml::Local(1), &aml::Local(0), &GED_POWER_BUTTON),
                    &aml::If::new(
                        &aml::Equal::new(&aml::Local(1), &GED_POWER_BUTTON),
                        vec![&aml::Notify::new(
                            &aml::Path::new("\\_SB_.PWRB"),
                            &POWER_BUTTON_PRESSED,
                        )],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut ged);
    devs.push(RawAml(ged));
    let mut pwrb = Vec::new();
    aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut pwrb);
    devs.push(RawAml(pwrb));
}

/// The notification a power button device gets when pressed (ACPI 6.5, 5.6.6: 0x80).
const POWER_BUTTON_PRESSED: u8 = 0x80;

/// The DSDT: `_S5_`, COM1, pvpanic, the GED with the power button, and `extra` devices under
/// `\_SB`.
pub fn dsdt(extra: &[DsdtDevice]) -> Sdt {
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"FVDSDT  ", OEM_REVISION);
    let mut body: Vec<u8> = Vec::new();

    // \_S5_: SLP_TYPa, SLP_TYPb, reserved, reserved.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);

    // Each device is serialized in one statement (the AML builders borrow their children).
    let mut devs: Vec<RawAml> = Vec::new();
    let mut com1 = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut com1);
    devs.push(RawAml(com1));
    let mut pvpanic = Vec::new();
    aml::Device::new(
        "PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1)]),
            ),
        ],
    )
    .to_aml_bytes(&mut pvpanic);
    devs.push(RawAml(pvpanic));
    ged_and_power_button(&mut devs);
    for (i, d) in extra.iter().enumerate() {
        let DsdtDevice::VirtioMmio { base, len, irq } = *d;
        let mut v = Vec::new();
        let name = format!("V{i:03X}");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base as u32, len as u32),
                        &aml::Interrupt::new(true, true, false, false, irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut v);
        devs.push(RawAml(v));
    }
    let children: Vec<&dyn Aml> = devs.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);

    t.append_slice(&body);
    t.update_checksum();
    t
}

/// AML already serialized.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The hardware-reduced FADT pointing at the DSDT.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, *b"FVFACP  ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.reset_reg = io(ACPI_PM_PORT + 2);
    f.reset_value = RESET_VALUE;
    f.sleep_control_reg = io(ACPI_PM_PORT);
    f.sleep_status_reg = io(ACPI_PM_PORT + 1);
    // IA-PC boot architecture: no VGA (bit 2), no CMOS RTC (bit 5); no 8042 is announced, so
    // the guest skips keyboard probing (the reset line at port 0x64 still works).
    f.iapc_boot_arch = (1u16 << 2 | 1 << 5).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERROVSR").into();
    let mut v = Vec::new();
    f.finalize().to_aml_bytes(&mut v);
    v
}

/// Errors placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(u64),
    /// Writing to guest memory failed.
    #[error("writing ACPI tables: {0}")]
    Memory(String),
}

/// Builds all tables into guest memory at [`ACPI_START`]; returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cpus: u32,
    extra: &[DsdtDevice],
) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = next;
        if addr + bytes.len() as u64 > BIOS_RESET_VECTOR {
            return Err(AcpiError::TooLarge(addr + bytes.len() as u64 - ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::Memory(e.to_string()))?;
        next = align(addr + bytes.len() as u64);
        Ok(addr)
    };
    let dsdt_addr = place(dsdt(extra).as_slice())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(madt(cpus).as_slice())?;
    let mut xsdt = XSDT::new(OEM_ID, *b"FVXSDT  ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(|e| AcpiError::Memory(e.to_string()))?;
    Ok(rsdp_addr)
}

fn align(a: u64) -> u64 {
    (a + 15) & !15
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a table at `addr` and checks its length and checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = read(mem, addr, 36);
        assert_eq!(&head[..4], sig);
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let t = read(mem, addr, len);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_parse_back() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let virtio = [DsdtDevice::VirtioMmio {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }];
        let rsdp_addr = create_acpi_tables(&mem, 4, &virtio).unwrap();
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");

        // FADT: hardware-reduced, reset register, sleep registers, X_DSDT.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(fadt[116], 1, "reset register in system I/O space");
        assert_eq!(u64_at(&fadt, 120), u64::from(ACPI_PM_PORT + 2));
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(
            u64_at(&fadt, 244 + 4),
            u64::from(ACPI_PM_PORT),
            "SLEEP_CONTROL_REG"
        );
        assert_eq!(
            u64_at(&fadt, 256 + 4),
            u64::from(ACPI_PM_PORT + 1),
            "SLEEP_STATUS_REG"
        );
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");

        // MADT: 4 enabled LAPICs with IDs 0..3, one IOAPIC, no PCAT_COMPAT, no overrides.
        let mut off = 44;
        let mut lapics = vec![];
        let mut ioapics = 0;
        let mut overrides = 0;
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2);
            match ty {
                0 => {
                    assert_eq!(madt[off + 4] & 1, 1);
                    lapics.push(madt[off + 3]);
                }
                1 => {
                    ioapics += 1;
                    let a = u32::from_le_bytes(madt[off + 4..off + 8].try_into().unwrap());
                    assert_eq!(u64::from(a), IOAPIC_START);
                }
                2 => overrides += 1,
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![0, 1, 2, 3]);
        assert_eq!((ioapics, overrides), (1, 0));
        assert_eq!(
            u32::from_le_bytes(madt[40..44].try_into().unwrap()),
            0,
            "MADT flags"
        );

        // DSDT: the names a stock kernel matches on.
        let has = |s: &[u8]| dsdt.windows(s.len()).any(|w| w == s);
        assert!(has(b"_S5_"));
        assert!(has(b"QEMU0001"));
        assert!(has(b"LNRO0005"));
        assert!(has(b"COM1"));
        ged_and_power_button_are_described(&dsdt);
    }

    /// The GED (`ACPI0013`) with its interrupt, register and `_EVT(GSI)`, and the power button
    /// (`PNP0C0C`) it notifies, as the AML bytes a guest's interpreter reads.
    fn ged_and_power_button_are_described(dsdt: &[u8]) {
        let has = |s: &[u8]| dsdt.windows(s.len()).any(|w| w == s);
        assert!(has(b"GED_"));
        assert!(has(b"ACPI0013"));
        let mut pnp0c0c = Vec::new();
        aml::EISAName::new("PNP0C0C").to_aml_bytes(&mut pnp0c0c);
        assert!(has(&[b"PWRB".as_slice(), b"\x08_HID", &pnp0c0c].concat()));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, one GSI.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&GED_GSI.to_le_bytes());
        assert!(has(&irq), "GED interrupt on GSI {GED_GSI}");
        // OperationRegion (GDST, SystemIO, GED_PORT, 1) and its byte field GDAT.
        let port = GED_PORT.to_le_bytes();
        assert!(has(&[
            0x5b, 0x80, b'G', b'D', b'S', b'T', 1, 0x0b, port[0], port[1], 1
        ]));
        assert!(
            has(b"GDST\x01GDAT\x08"),
            "Field (GDST, ByteAcc) {{ GDAT, 8 }}"
        );
        // Method (_EVT, 1, Serialized): evged passes the GSI as its one argument.
        let evt = dsdt
            .windows(5)
            .position(|w| w == b"_EVT\x09")
            .expect("_EVT with 1 argument, serialized");
        assert!(
            dsdt[evt - 2] == 0x14 || dsdt[evt - 3] == 0x14,
            "MethodOp, then a 1- or 2-byte length"
        );
        // Notify (\_SB_.PWRB, 0x80).
        assert!(has(b"\x86\\\x2e_SB_PWRB\x0a\x80"));
    }

    #[test]
    fn many_cpus_still_fit() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let devs: Vec<DsdtDevice> = (0..32)
            .map(|i| DsdtDevice::VirtioMmio {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 5 + i as u32,
            })
            .collect();
        create_acpi_tables(&mem, 254, &devs).unwrap();
    }
}
