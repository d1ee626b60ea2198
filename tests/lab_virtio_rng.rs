//! Lab: the stock kernel's own `virtio_mmio` driver finds a virtio-rng device through the ACPI
//! DSDT, and `virtio_rng` serves `/dev/hwrng` from it.

mod common;

use common::lab::{lab_available, run_scenario};
use std::time::Duration;

/// Runs inside the guest (appended to its initramfs as /scenario.sh).
const GUEST: &str = r#"
echo "FV-RNG current=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/r bs=1024 count=64 2>/dev/null
echo "FV-RNG bytes=$(wc -c < /tmp/r) distinct=$(od -An -tx1 -v /tmp/r | tr ' ' '\n' | grep -v '^$' | sort -u | wc -l)"
"#;

const SCENARIO: &str = r#"
lab-guest-initrd /rng-guest.sh /tmp/rng-initrd.cpio.gz
fv rng --kernel "$GUEST_VMLINUX" --initrd /tmp/rng-initrd.cpio.gz --cpus 2 --memory 512M --rng --cmdline "quiet fv.action=script"
"#;

#[test]
fn guest_reads_hwrng_from_virtio_rng() {
    if !lab_available("guest_reads_hwrng_from_virtio_rng") {
        return;
    }
    let dir = common::scratch("rng-guest");
    let guest = dir.join("rng-guest.sh");
    std::fs::write(&guest, GUEST).unwrap();
    let lab = run_scenario(
        "rng",
        SCENARIO,
        &[(guest, "/rng-guest.sh")],
        Duration::from_secs(600),
    );
    let s = lab.section("rng");
    assert_eq!(s.exit, 0, "{}", s.text);
    assert!(s.text.contains("FV-RNG current=virtio_rng.0"), "{}", s.text);
    let line = s
        .text
        .lines()
        .find(|l| l.contains("FV-RNG bytes="))
        .unwrap_or_else(|| panic!("{}", s.text));
    assert!(line.contains("bytes=65536"), "{line}");
    let distinct: u32 = line
        .rsplit("distinct=")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        distinct > 200,
        "64 KiB from /dev/hwrng should use nearly all byte values: {line}"
    );
    eprintln!("VERDICT lab virtio-rng: PASS ({line})");
}
