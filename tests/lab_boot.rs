//! Tier 3, in the lab: the stock Debian kernel, as a bzImage and as the ELF vmlinux (PVH), boots
//! to the busybox `/init` with 2 vCPUs and 512 MiB; power-off and reboot end `ferrovisor` with
//! status 0, a panic with a distinct non-zero status. One lab session runs all four.

mod common;

use common::lab::{info_field, lab_available, run_scenario};
use std::time::Duration;

const SCENARIO: &str = r#"
fv bzimage --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cpus 2 --memory 512M --cmdline "fv.action=info"
fv vmlinux --kernel "$GUEST_VMLINUX" --initrd "$GUEST_INITRD" --cpus 2 --memory 512M --cmdline "quiet fv.action=info"
fv reboot --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cpus 2 --memory 512M --cmdline "quiet fv.action=reboot"
fv panic --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cpus 1 --memory 256M --cmdline "quiet fv.action=panic"
"#;

#[test]
fn stock_kernel_boots_powers_off_reboots_and_panics() {
    if !lab_available("stock_kernel_boots_powers_off_reboots_and_panics") {
        return;
    }
    let lab = run_scenario("boot", SCENARIO, &[], Duration::from_secs(900));
    let out = &lab.output.stdout;
    assert!(out.contains("LAB-KVM ok"), "the lab has no KVM:\n{out}");
    let mut verdicts = Vec::new();

    for name in ["bzimage", "vmlinux"] {
        let s = lab.section(name);
        assert!(
            s.text.contains("FERROVISOR-INIT-REACHED"),
            "{name} never reached /init:\n{}",
            s.text
        );
        assert_eq!(
            info_field(&s.text, "cpus_online"),
            Some(2),
            "{name}:\n{}",
            s.text
        );
        let mem_kb = info_field(&s.text, "memtotal_kb").unwrap_or(0);
        // 512 MiB minus what the kernel reserves for itself.
        assert!(
            (400 * 1024..=512 * 1024).contains(&mem_kb),
            "{name}: MemTotal {mem_kb} kB"
        );
        assert_eq!(s.exit, 0, "{name}: poweroff must exit 0:\n{}", s.text);
        verdicts.push(format!(
            "{name}: /init reached, 2 CPUs, {} MiB, exit 0, {} ms",
            mem_kb / 1024,
            s.ms
        ));
    }
    // The bzImage boot is not quiet: the kernel names its CPU, from the brand string the VMM
    // passes through (the lab's CPU is QEMU's EPYC model).
    let s = lab.section("bzimage");
    assert!(
        s.text.contains("smpboot: CPU0: AMD EPYC"),
        "CPU brand string missing:\n{}",
        s.text
    );

    let s = lab.section("reboot");
    assert!(s.text.contains("FERROVISOR-INIT-REACHED"), "{}", s.text);
    assert_eq!(s.exit, 0, "reboot must exit 0:\n{}", s.text);
    verdicts.push(format!("reboot: exit 0, {} ms", s.ms));

    let s = lab.section("panic");
    assert!(s.text.contains("FERROVISOR-INIT-REACHED"), "{}", s.text);
    assert_eq!(s.exit, 3, "a guest panic must exit 3:\n{}", s.text);
    assert!(s.text.contains("guest kernel panicked"), "{}", s.text);
    verdicts.push(format!("panic: exit 3, {} ms", s.ms));

    eprintln!("VERDICT lab boot: PASS ({})", verdicts.join("; "));
}
