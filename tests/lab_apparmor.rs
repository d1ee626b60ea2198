//! Lab: AppArmor enforcement for real. The lab's Debian kernel has AppArmor built in; the
//! scenario mounts securityfs, runs the daemon with `--require apparmor` and two stock guests,
//! each VMM in its own generated profile `ferrovisor-<vm id>`; then a VMM started in VM va's
//! profile is refused VM vb's disk, and the kernel's audit line says so.

mod common;

use common::lab::{field, lab_available, run_scenario_with};
use std::path::PathBuf;
use std::time::Duration;

const GUEST: &str = r#"
dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; echo "FV-AA disk-write rc=$?"
echo "FV-AA ready"
exec 3</dev/ttyS0
while read -r line <&3; do echo "GUEST-ECHO $line"; done
"#;

const SCENARIO: &str = r#"
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
echo "HOST-AA enabled=$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null) securityfs=$(test -e /sys/kernel/security/apparmor/profiles && echo yes || echo no)"
lab-guest-initrd /aa-guest.sh /tmp/aa.cpio.gz
truncate -s 16M /tmp/a.img
truncate -s 16M /tmp/b.img
mkdir -p /var/lib /run/ferrovisor
ferrovisor --log-level info daemon --require apparmor > /tmp/daemon.log 2>&1 &
wait_for() { _w=0; until eval "$2"; do sleep 0.2; _w=$((_w + 1)); [ $_w -gt "$1" ] && return 1; done; return 0; }
json() { ferrovisor vm info "$1" --json 2>/dev/null | tr -d ' \n'; }
pid_of() { json "$1" | grep -o '"pid":[0-9]*' | head -1 | cut -d: -f2; }
id_of() { json "$1" | grep -o '"id":"[0-9a-f]*"' | head -1 | cut -d'"' -f4; }
wait_for 150 'ferrovisor vm list >/dev/null 2>&1' || echo "HOST-AA daemon-never-answered"
for v in a b; do
  ferrovisor vm create "v$v" --kernel "$GUEST_VMLINUX" --initrd /tmp/aa.cpio.gz \
    --cmdline "quiet fv.action=script" --cpus 1 --memory 256M --disk "/tmp/$v.img" --start \
    > "/tmp/create-$v.out" 2>&1
  echo "HOST-AA create v$v rc=$?"
done
ida=$(id_of va); idb=$(id_of vb); pa=$(pid_of va)
ready() { grep -c "FV-AA ready" "/var/lib/ferrovisor/vms/$1/console.log" 2>/dev/null; }
# Bounded by the clock, not by a number of polls (each poll costs seconds under TCG); a line of
# progress every 30 s so a run that never ends still says where it stood.
t0=$(date +%s); last=$t0
until [ "$(ready $ida)" = 1 ] && [ "$(ready $idb)" = 1 ]; do
  now=$(date +%s)
  [ $((now - t0)) -gt 420 ] && break
  if [ $((now - last)) -ge 30 ]; then
    last=$now
    echo "HOST-AA waiting t=$((now - t0))s va-lines=$(wc -l < /var/lib/ferrovisor/vms/$ida/console.log 2>/dev/null) vb-lines=$(wc -l < /var/lib/ferrovisor/vms/$idb/console.log 2>/dev/null)"
    dmesg | grep -E 'apparmor="(DENIED|ALLOWED)"' | tail -n 5 | sed 's/^/HOST-AA dmesg: /'
    # A VMM that failed under its profile will not come back by waiting.
    for v in va vb; do
      case "$(json $v | grep -o '"state":"[a-z]*"' | head -1)" in
        *crashed*|*exited*) echo "HOST-AA $v ended: $(json $v | grep -o '"last_exit_reason":"[^"]*"')"; break 2 ;;
      esac
    done
  fi
  sleep 1
done
echo "HOST-AA ready va=$(ready $ida) vb=$(ready $idb) after=$(( $(date +%s) - t0 ))s"
ferrovisor vm list
if [ "$(ready $ida)" != 1 ] || [ "$(ready $idb)" != 1 ]; then
  for id in $ida $idb; do tail -n 20 "/var/lib/ferrovisor/vms/$id/console.log"; tail -n 20 "/var/lib/ferrovisor/vms/$id/vmm.log"; done
  dmesg | grep -E 'apparmor|type=1326' | tail -n 20
fi
echo "HOST-AA va-label=$(tr ' ' _ < /proc/$pa/attr/current) expected=ferrovisor-$ida"
echo "HOST-AA loaded=$(grep -c '^ferrovisor-' /sys/kernel/security/apparmor/profiles)"
grep -h "disk-write" /var/lib/ferrovisor/vms/*/console.log | sed 's/^/HOST-AA guest: /'
# A VMM in va's profile asked to use vb's disk.
dmesg | grep 'apparmor="DENIED"' | head -n 10 | sed 's/^/HOST-AA denied-before: /'
dmesg -C 2>/dev/null
sh -c "echo exec ferrovisor-$ida > /proc/self/attr/apparmor/exec 2>/dev/null || echo exec ferrovisor-$ida > /proc/self/attr/exec; exec ferrovisor run --kernel $GUEST_VMLINUX --memory 64M --disk /tmp/b.img" > /tmp/cross.out 2>&1
rc=$?
echo "HOST-AA cross rc=$rc"
sed 's/^/HOST-AA cross-out: /' /tmp/cross.out | head -5
dmesg | grep 'apparmor="DENIED"' | grep 'b.img' | head -3 | sed 's/^/HOST-AA audit: /'
ferrovisor vm delete va --force >/dev/null 2>&1
ferrovisor vm delete vb --force >/dev/null 2>&1
echo "HOST-AA loaded-after-delete=$(grep -c '^ferrovisor-' /sys/kernel/security/apparmor/profiles)"
echo "=== daemon log"
cat /tmp/daemon.log
"#;

#[test]
fn a_vmm_in_one_vms_apparmor_profile_is_refused_another_vms_disk() {
    if !lab_available("a_vmm_in_one_vms_apparmor_profile_is_refused_another_vms_disk") {
        return;
    }
    let dir = common::scratch("aa-guest");
    let guest = dir.join("aa-guest.sh");
    std::fs::write(&guest, GUEST).unwrap();
    let mut adds = vec![(guest, "/aa-guest.sh")];
    // The parser and its includes (abi, tunables, abstractions), from the host's `apparmor`
    // package (scripts/install-deps.sh installs it).
    for (src, dest) in [
        ("/usr/sbin/apparmor_parser", "/usr/sbin/apparmor_parser"),
        ("/etc/apparmor.d", "/etc/apparmor.d"),
    ] {
        assert!(
            std::path::Path::new(src).exists(),
            "{src} is missing: apt-get install apparmor"
        );
        adds.push((PathBuf::from(src), dest));
    }
    let lab = run_scenario_with(
        "apparmor",
        SCENARIO,
        &adds,
        &["--timeout", "900"],
        Duration::from_secs(1000),
    );
    let out = &lab.output.stdout;
    assert_eq!(field(out, "HOST-AA enabled", "enabled"), Some("Y"), "{out}");
    for v in ["va", "vb"] {
        assert_eq!(
            field(out, &format!("HOST-AA create {v}"), "rc"),
            Some("0"),
            "{out}"
        );
    }
    assert_eq!(field(out, "HOST-AA ready", "va"), Some("1"), "{out}");
    assert_eq!(field(out, "HOST-AA ready", "vb"), Some("1"), "{out}");
    let label = field(out, "HOST-AA va-label", "va-label").unwrap_or_default();
    let expected = field(out, "HOST-AA va-label", "expected").unwrap_or_default();
    assert!(
        label.starts_with(expected) && label.contains("enforce"),
        "the VMM is not in its profile: {out}"
    );
    assert_eq!(field(out, "HOST-AA loaded", "loaded"), Some("2"), "{out}");
    // The per-VM profiles allowed everything two working VMMs (jailed, their guests writing
    // to their disks) did: nothing was denied before the cross attempt.
    assert!(
        !out.contains("HOST-AA denied-before:"),
        "a VMM was denied something under its own profile: {out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("HOST-AA guest: FV-AA disk-write rc=0"))
            .count(),
        2,
        "both guests wrote to their own disks: {out}"
    );
    assert_ne!(field(out, "HOST-AA cross", "rc"), Some("0"), "{out}");
    let audit = out
        .lines()
        .find(|l| l.starts_with("HOST-AA audit:"))
        .unwrap_or_else(|| panic!("no AppArmor audit line for b.img: {out}"));
    assert!(
        audit.contains(&format!("profile=\"{expected}\"")),
        "{audit}"
    );
    assert!(audit.contains("name=\"/tmp/b.img\""), "{audit}");
    assert_eq!(
        field(out, "HOST-AA loaded-after-delete", "loaded-after-delete"),
        Some("0"),
        "{out}"
    );
    eprintln!("VERDICT lab apparmor: PASS (two VMMs in their own profiles; va's profile refused vb's disk: {audit})");
}
