//! Lab: the host daemon with three stock-kernel VMs at once, driven by the CLI (`ferrovisor
//! vm ...` over the daemon's API socket). Each guest answers on its serial console through the
//! daemon; one VMM is killed with kill -9 and the daemon restarts it (policy on-failure); the
//! daemon itself is restarted while the guests keep running and re-adopts them; one VM runs
//! under cgroup v2 limits; a graceful stop goes through the ACPI power button.

mod common;

use common::lab::{field, lab_available, run_scenario};
use std::time::Duration;

/// The guest's /scenario.sh: says it is ready, then echoes every console line back.
const GUEST: &str = r#"
exec 3</dev/ttyS0
echo "FV-DAEMON-GUEST ready"
while read -r line <&3; do echo "GUEST-ECHO $line"; done
"#;

const SCENARIO: &str = r#"
lab-guest-initrd /daemon-guest.sh /tmp/dg.cpio.gz
mkdir -p /var/lib /run/ferrovisor
ferrovisor --log-level info daemon > /tmp/daemon.log 2>&1 &
dpid=$!
wait_for() { _w=0; until eval "$2"; do sleep 0.2; _w=$((_w + 1)); [ $_w -gt "$1" ] && return 1; done; return 0; }
json() { ferrovisor vm info "$1" --json 2>/dev/null | tr -d ' \n'; }
pid_of() { json "$1" | grep -o '"pid":[0-9]*' | head -1 | cut -d: -f2; }
id_of() { json "$1" | grep -o '"id":"[0-9a-f]*"' | head -1 | cut -d'"' -f4; }
state_of() { json "$1" | grep -o '"state":"[a-z-]*"' | head -1 | cut -d'"' -f4; }
restarts_of() { json "$1" | grep -o '"restart_count":[0-9]*' | head -1 | cut -d: -f2; }
reason_of() { ferrovisor vm info "$1" --json 2>/dev/null | tr '\n' ' ' | grep -o '"last_exit_reason": *"[^"]*"' | cut -d'"' -f4 | tr ' ' _; }
log_of() { echo "/var/lib/ferrovisor/vms/$(id_of "$1")/console.log"; }
ready_count() { c=$(grep -c "FV-DAEMON-GUEST ready" "$(log_of "$1")" 2>/dev/null); echo "${c:-0}"; }
console_check() { # VM WORD: send WORD, expect the guest's echo
  (echo "$2"; sleep 4) | timeout 60 ferrovisor vm console "$1" > "/tmp/con-$1-$2.out" 2>&1
  if grep -q "GUEST-ECHO $2" "/tmp/con-$1-$2.out"; then echo ok; else echo fail; fi
}
wait_for 150 'ferrovisor vm list >/dev/null 2>&1' || echo "HOST-DAEMON daemon-never-answered"

t0=$(now_ms)
for n in 1 2 3; do
  extra=""
  [ $n = 3 ] && extra="--cpu-weight 50 --memory-max 512M --pids-max 64"
  ferrovisor vm create "vm$n" --kernel "$GUEST_VMLINUX" --initrd /tmp/dg.cpio.gz \
    --cmdline "quiet fv.action=script" --cpus 1 --memory 256M --restart on-failure --start \
    $extra > "/tmp/create$n.out" 2>&1
  echo "HOST-DAEMON create vm$n rc=$? state=$(state_of vm$n)"
done
for n in 1 2 3; do
  wait_for 1500 "[ \$(ready_count vm$n) -ge 1 ]"
  echo "HOST-DAEMON ready vm$n=$(ready_count vm$n) ms=$(( $(now_ms) - t0 ))"
done
ferrovisor vm list
for n in 1 2 3; do echo "HOST-DAEMON console vm$n=$(console_check vm$n ping$n)"; done

# A VMM killed with kill -9: noticed, crashed with the reason, restarted (on-failure).
old=$(pid_of vm2)
kill -9 "$old"
# The pid that satisfied the wait is the new VMM's (a second read once came back empty right
# after: see the stop note of the change that added this comment).
new=
wait_for 600 'new=$(pid_of vm2); [ -n "$new" ] && [ "$new" != "$old" ]'

wait_for 1500 '[ $(ready_count vm2) -ge 2 ]'
echo "HOST-DAEMON restart vm2 old=$old new=$new ready=$(ready_count vm2) state=$(state_of vm2) restarts=$(restarts_of vm2) reason=$(reason_of vm2)"
echo "HOST-DAEMON console-after-restart vm2=$(console_check vm2 again2)"
echo "HOST-DAEMON events vm2 kinds=$(ferrovisor events --vm vm2 --json | grep -o '"kind":"[a-z]*"' | cut -d'"' -f4 | tr '\n' ,)"

# cgroup v2 limits of vm3 (the lab mounts cgroup2 with every controller).
cg=/sys/fs/cgroup/ferrovisor/vm-$(id_of vm3)
echo "HOST-DAEMON cgroup vm3 weight=$(cat $cg/cpu.weight) memmax=$(cat $cg/memory.max) pidsmax=$(cat $cg/pids.max) procs=$(tr '\n' , < $cg/cgroup.procs) pid=$(pid_of vm3)"

# The daemon restarts; the guests do not.
p1=$(pid_of vm1); p3=$(pid_of vm3)
kill -TERM $dpid; wait $dpid
a1=no; kill -0 "$p1" 2>/dev/null && a1=yes
a3=no; kill -0 "$p3" 2>/dev/null && a3=yes
ferrovisor --log-level info daemon >> /tmp/daemon.log 2>&1 &
dpid=$!
wait_for 150 'ferrovisor vm list >/dev/null 2>&1' || echo "HOST-DAEMON daemon-never-answered-again"
echo "HOST-DAEMON readopt vm1 old=$p1 now=$(pid_of vm1) alive=$a1 state=$(state_of vm1) vm3 old=$p3 now=$(pid_of vm3) alive=$a3 state=$(state_of vm3)"
echo "HOST-DAEMON console-after-readopt vm3=$(console_check vm3 adopted3)"
ferrovisor vm list

# A graceful stop: the power button, the guest's acpid powers off.
t=$(now_ms)
timeout 200 ferrovisor vm stop vm1 --timeout 120 > /tmp/stop1.out 2>&1
echo "HOST-DAEMON stop vm1 rc=$? ms=$(( $(now_ms) - t )) state=$(state_of vm1) reason=$(reason_of vm1)"

# Fail closed: with user namespaces disabled host-wide, no VMM starts (daemon or foreground)
# and the error names the wall; the sysctl is put back at once.
userns=$(cat /proc/sys/user/max_user_namespaces)
echo 0 > /proc/sys/user/max_user_namespaces
ferrovisor vm create vm4 --kernel "$GUEST_VMLINUX" --initrd /tmp/dg.cpio.gz --cpus 1 \
  --memory 128M --start > /tmp/create4.out 2>&1
rc4=$?
ferrovisor host > /tmp/host4.out 2>&1
timeout 60 ferrovisor run --jail --kernel "$GUEST_VMLINUX" --memory 128M < /dev/null > /tmp/fg4.out 2>&1
rcfg=$?
echo "$userns" > /proc/sys/user/max_user_namespaces
echo "HOST-DAEMON closed rc=$rc4 state=$(state_of vm4) named=$(grep -c 'namespaces wall' /tmp/create4.out) fg-rc=$rcfg fg-named=$(grep -c namespaces /tmp/fg4.out) host=$(grep '^ *namespaces' /tmp/host4.out | grep -c max_user_namespaces) restored=$(cat /proc/sys/user/max_user_namespaces)"
sed 's/^/HOST-DAEMON closed-out: /' /tmp/create4.out /tmp/fg4.out | head -n 6
ferrovisor vm delete vm4 --force > /dev/null 2>&1
for n in 2 3; do ferrovisor vm delete "vm$n" --force > /dev/null 2>&1; done
ferrovisor vm delete vm1 > /dev/null 2>&1
echo "HOST-DAEMON left vms=$(ferrovisor vm list --json | grep -o '"id"' | wc -l) vmms=$(pidof ferrovisor | wc -w)"
kill -TERM $dpid; wait $dpid
echo "=== daemon log"
cat /tmp/daemon.log
"#;

#[test]
fn three_stock_vms_under_the_daemon_survive_a_vmm_kill_and_a_daemon_restart() {
    if !lab_available("three_stock_vms_under_the_daemon") {
        return;
    }
    let dir = common::scratch("daemon-guest");
    let guest = dir.join("daemon-guest.sh");
    std::fs::write(&guest, GUEST).unwrap();
    let lab = run_scenario(
        "daemon",
        SCENARIO,
        &[(guest, "/daemon-guest.sh")],
        Duration::from_secs(1500),
    );
    let out = &lab.output.stdout;
    let f = |tag: &str, key: &str| field(out, tag, key).unwrap_or_default().to_string();

    for n in 1..=3 {
        let tag = format!("HOST-DAEMON create vm{n}");
        assert_eq!(f(&tag, "rc"), "0", "{out}");
        assert_eq!(f(&tag, "state"), "running", "{out}");
        assert_eq!(
            f(&format!("HOST-DAEMON ready vm{n}="), &format!("vm{n}")),
            "1",
            "{out}"
        );
        assert_eq!(
            f(&format!("HOST-DAEMON console vm{n}="), &format!("vm{n}")),
            "ok",
            "vm{n} answers on its console: {out}"
        );
    }
    let ready_ms = f("HOST-DAEMON ready vm3", "ms");

    // kill -9 → crashed → restarted by policy, a new VMM, the guest booted again.
    let r = "HOST-DAEMON restart vm2";
    assert_ne!(f(r, "old"), f(r, "new"), "{out}");
    assert!(!f(r, "new").is_empty(), "{out}");
    assert_eq!(f(r, "ready"), "2", "{out}");
    assert_eq!(f(r, "state"), "running", "{out}");
    assert_eq!(f(r, "restarts"), "1", "{out}");
    assert!(f(r, "reason").contains("SIGKILL"), "{out}");
    assert_eq!(f("HOST-DAEMON console-after-restart", "vm2"), "ok", "{out}");
    let kinds = f("HOST-DAEMON events vm2", "kinds");
    assert!(
        kinds.starts_with("created,started,crashed,restarted,started"),
        "{kinds}\n{out}"
    );

    // Limits applied: the values and the VMM in its cgroup.
    let c = "HOST-DAEMON cgroup vm3";
    assert_eq!(f(c, "weight"), "50", "{out}");
    assert_eq!(f(c, "memmax"), (512u64 << 20).to_string(), "{out}");
    assert_eq!(f(c, "pidsmax"), "64", "{out}");
    // The VMM is in it (with the kernel threads KVM attaches to its VM's cgroups, e.g. the NX
    // huge page recovery thread).
    let procs = f(c, "procs");
    assert!(
        procs.split(',').any(|p| p == f(c, "pid")),
        "VMM {} not in its cgroup ({procs}): {out}",
        f(c, "pid")
    );

    // The daemon restart stopped no guest; the new daemon adopted both VMMs.
    let a = "HOST-DAEMON readopt";
    assert_eq!(f(a, "alive"), "yes", "{out}");
    let line = out.lines().find(|l| l.contains(a)).unwrap_or_default();
    assert!(!line.contains("alive=no"), "{line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let pairs: Vec<(&str, &str)> = words.iter().filter_map(|w| w.split_once('=')).collect();
    let olds: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| *k == "old")
        .map(|p| p.1)
        .collect();
    let nows: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| *k == "now")
        .map(|p| p.1)
        .collect();
    assert_eq!(olds, nows, "same VMMs after the daemon restart: {line}");
    assert!(
        !line.contains("state=stopped") && !line.contains("state=crashed"),
        "{line}"
    );
    assert_eq!(f("HOST-DAEMON console-after-readopt", "vm3"), "ok", "{out}");

    // Fail closed: no user namespaces, no VMM, and the wall is named (daemon, `ferrovisor
    // host`, foreground `run --jail`); the sysctl is back as it was.
    let c = "HOST-DAEMON closed ";
    assert_ne!(f(c, "rc"), "0", "{out}");
    assert_ne!(f(c, "state"), "running", "{out}");
    assert_eq!(
        f(c, "named"),
        "1",
        "the error names the namespaces wall: {out}"
    );
    assert_ne!(f(c, "fg-rc"), "0", "{out}");
    assert_ne!(f(c, "fg-named"), "0", "{out}");
    assert_eq!(f(c, "host"), "1", "`ferrovisor host` says why: {out}");
    assert_ne!(f(c, "restored"), "0", "{out}");

    // Graceful stop through the power button.
    let s = "HOST-DAEMON stop vm1";
    assert_eq!(f(s, "rc"), "0", "{out}");
    assert_eq!(f(s, "state"), "stopped", "{out}");
    assert!(f(s, "reason").contains("powered_off"), "{out}");
    assert_eq!(f("HOST-DAEMON left", "vms"), "0", "{out}");
    assert_eq!(f("HOST-DAEMON left", "vmms"), "1", "only the daemon: {out}");
    eprintln!(
        "VERDICT lab daemon: PASS (3 stock VMs via `ferrovisor vm`, all ready {ready_ms} ms after the first create, consoles echo; kill -9 of vm2's VMM -> crashed -> restarted by on-failure; daemon SIGTERM + restart: both other VMMs kept and re-adopted; vm3 cgroup cpu.weight=50 memory.max=512M pids.max=64; graceful stop via ACPI power button in {} ms; with user.max_user_namespaces=0 no VMM started, the namespaces wall named)",
        f(s, "ms")
    );
}
