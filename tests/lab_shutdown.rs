//! Lab: graceful shutdown. `ferrovisor ctl SOCKET shutdown` presses the ACPI power button (the
//! GED's event, `Notify(PWRB, 0x80)`); the stock kernel's `evged` and `button` drivers turn it
//! into a `KEY_POWER` input event, the test guest's busybox acpid powers off through ACPI S5,
//! and the VMM exits 0 on its own — the guest was not killed.

mod common;

use common::lab::{field, lab_available, run_scenario};
use std::time::Duration;

/// Runs inside the guest (appended to its initramfs as /scenario.sh): reports what the power
/// button needs, then waits far longer than the test allows.
const GUEST: &str = r#"
echo "FV-SHUTDOWN acpid=$(pidof acpid || echo none) button=$(ls /sys/bus/acpi/drivers/button 2>/dev/null | grep -c PNP0C0C) ged=$(ls /sys/bus/platform/drivers/acpi-ged 2>/dev/null | grep -c ACPI0013) ged_irq=$(grep -c 'ACPI:Ged' /proc/interrupts) input=$(cat /sys/class/input/input*/name 2>/dev/null | tr ' \n' '_,')"
echo "FV-SHUTDOWN ready"
n=0; while [ $n -lt 300 ]; do sleep 1; n=$((n + 1)); done
echo "FV-SHUTDOWN still-running"
"#;

const SCENARIO: &str = r#"
lab-guest-initrd /shutdown-guest.sh /tmp/shutdown-initrd.cpio.gz
# A guest that ignored the button would run into this timeout and be killed (exit 137).
FV_TIMEOUT=200 fv shutdown --log-level info --kernel "$GUEST_VMLINUX" \
  --initrd /tmp/shutdown-initrd.cpio.gz --cpus 2 --memory 512M --control /tmp/fv.ctl \
  --cmdline "quiet fv.action=script" &
fvjob=$!
n=0
until grep -q "FV-SHUTDOWN ready" /tmp/fv-shutdown.out 2>/dev/null || [ $n -gt 1500 ]; do sleep 0.1; n=$((n + 1)); done
t0=$(now_ms)
ferrovisor ctl /tmp/fv.ctl shutdown > /tmp/shutdown-answer.out 2>&1; ctlrc=$?
t1=$(now_ms)
wait $fvjob
t2=$(now_ms)
echo "HOST-SHUTDOWN ctl-rc=$ctlrc answer=$(tr -d ' \n' < /tmp/shutdown-answer.out) answer-ms=$((t1 - t0)) exit-ms=$((t2 - t0)) socket-left=$(ls /tmp/fv.ctl 2>/dev/null | wc -l)"
"#;

#[test]
fn ctl_shutdown_presses_the_power_button_and_the_guest_powers_off() {
    if !lab_available("ctl_shutdown_presses_the_power_button_and_the_guest_powers_off") {
        return;
    }
    let dir = common::scratch("shutdown-guest");
    let guest = dir.join("shutdown-guest.sh");
    std::fs::write(&guest, GUEST).unwrap();
    let run = || {
        run_scenario(
            "shutdown",
            SCENARIO,
            &[(guest.clone(), "/shutdown-guest.sh")],
            Duration::from_secs(900),
        )
    };
    let mut lab = run();
    if !lab.section("shutdown").text.contains("FV-SHUTDOWN ready") {
        // Seen once in CI: the guest printed nothing after FV-INFO for 200 s, before the
        // button was ever pressed (a guest or lab stall, under investigation). That is not what
        // this test checks, so it gets one more run, which must pass; the stall stays visible.
        eprintln!(
            "WARNING lab acpi-shutdown: the guest never reported ready (stall before the press); \
running the scenario once more. First log:\n{}",
            lab.section("shutdown").text
        );
        lab = run();
    }
    let s = lab.section("shutdown");
    let t = &s.text;
    let out = &lab.output.stdout;

    // The guest saw the devices: evged bound the GED and requested its interrupt, the button
    // driver bound PWRB, and acpid listens.
    assert!(t.contains("FV-SHUTDOWN ready"), "{t}");
    assert_eq!(field(t, "FV-SHUTDOWN acpid", "ged"), Some("1"), "{t}");
    assert_eq!(field(t, "FV-SHUTDOWN acpid", "ged_irq"), Some("1"), "{t}");
    assert_eq!(field(t, "FV-SHUTDOWN acpid", "button"), Some("1"), "{t}");
    assert_ne!(field(t, "FV-SHUTDOWN acpid", "acpid"), Some("none"), "{t}");

    // The request was answered at once.
    assert_eq!(field(out, "HOST-SHUTDOWN", "ctl-rc"), Some("0"), "{out}");
    let answer = field(out, "HOST-SHUTDOWN", "answer").unwrap_or_default();
    assert!(
        answer.contains("\"ok\":true") && answer.contains("\"state\":\"shutting-down\""),
        "{out}"
    );
    let ms = |k: &str| -> u64 {
        field(out, "HOST-SHUTDOWN", k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in:\n{out}"))
    };
    let (answer_ms, exit_ms) = (ms("answer-ms"), ms("exit-ms"));

    // The guest powered itself off: acpid's handler ran, the kernel wrote S5, the VMM exited 0
    // by itself (not the lab's kill, not a stop), and cleaned up its socket.
    assert_eq!(s.exit, 0, "{t}");
    assert!(t.contains("ACPI power button pressed"), "{t}");
    assert!(t.contains("PWRF/00000080"), "acpid saw KEY_POWER: {t}");
    assert!(
        t.contains("FV-POWER-BUTTON"),
        "the guest's handler ran: {t}"
    );
    assert!(t.contains("guest powered off"), "{t}");
    assert!(!t.contains("FV-SHUTDOWN still-running"), "{t}");
    assert!(
        !t.contains("FV-SCENARIO-EXIT"),
        "the scenario never ended: {t}"
    );
    assert!(!t.contains("stopped from the console"), "{t}");
    assert_eq!(
        field(out, "HOST-SHUTDOWN", "socket-left"),
        Some("0"),
        "{out}"
    );
    assert!(
        exit_ms < 60_000,
        "the guest should power off well within a minute of the press: {exit_ms} ms\n{t}"
    );
    eprintln!(
        "VERDICT lab acpi-shutdown: PASS (ctl shutdown answered shutting-down in {answer_ms} ms; GED ACPI0013 -> PWRB PNP0C0C -> KEY_POWER -> acpid -> ACPI S5; VMM exited 0 {exit_ms} ms after the press)"
    );
}
