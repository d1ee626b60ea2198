//! Lab: guests larger than the 32-bit MMIO gap (RAM continues above 4 GiB) and odd vCPU counts,
//! with both boot protocols. The lab gets 6 GiB so a 4 GiB guest fits in it.

mod common;

use common::lab::{info_field, lab_available, run_scenario_with};
use std::time::Duration;

const SCENARIO: &str = r#"
fv high --kernel "$GUEST_VMLINUX" --initrd "$GUEST_INITRD" --cpus 2 --memory 4G --cmdline "quiet fv.action=info"
fv three --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cpus 3 --memory 3200M --cmdline "quiet fv.action=info"
"#;

#[test]
fn memory_above_the_gap_and_three_vcpus() {
    if !lab_available("memory_above_the_gap_and_three_vcpus") {
        return;
    }
    let lab = run_scenario_with(
        "mem",
        SCENARIO,
        &[],
        &["--mem", "6144"],
        Duration::from_secs(600),
    );
    let s = lab.section("high");
    assert_eq!(s.exit, 0, "{}", s.text);
    let kb = info_field(&s.text, "memtotal_kb").unwrap_or(0);
    // 4 GiB minus what the kernel keeps; well above the 3 GiB below the gap.
    assert!(
        (3_700_000..=4_194_304).contains(&kb),
        "MemTotal {kb} kB:\n{}",
        s.text
    );
    assert_eq!(info_field(&s.text, "cpus_online"), Some(2));
    let t = lab.section("three");
    assert_eq!(t.exit, 0, "{}", t.text);
    assert_eq!(info_field(&t.text, "cpus_online"), Some(3), "{}", t.text);
    let kb3 = info_field(&t.text, "memtotal_kb").unwrap_or(0);
    assert!((2_900_000..=3_276_800).contains(&kb3), "MemTotal {kb3} kB");
    eprintln!(
        "VERDICT lab memory/smp: PASS (4G guest sees {} MiB, 3 vCPUs + 3200M sees {} MiB)",
        kb / 1024,
        kb3 / 1024
    );
}
