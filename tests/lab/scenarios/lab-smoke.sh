#!/bin/sh
# Lab smoke test: the lab itself offers what Ferrovisor's scenarios rely on.
#   tests/lab/lab.sh --scenario tests/lab/scenarios/lab-smoke.sh
fail=0
check() {  # check NAME COMMAND...: run COMMAND, print LAB-CHECK NAME ok|FAIL
  name="$1"; shift
  if "$@" >/tmp/check.out 2>&1; then echo "LAB-CHECK $name ok"
  else echo "LAB-CHECK $name FAIL"; cat /tmp/check.out; fail=1; fi
}
check kvm-device   test -c /dev/kvm
check svm-cpu      grep -qw svm /proc/cpuinfo
check kvm-amd      grep -q '^kvm_amd ' /proc/modules
check cgroup2      test -f /sys/fs/cgroup/cgroup.controllers
check pivot-root   unshare -m sh -c 'mkdir -p /tmp/nr && mount -t tmpfs t /tmp/nr &&
                     mkdir /tmp/nr/old && cd /tmp/nr && pivot_root . old'
check guest-assets test -s "$GUEST_KERNEL" -a -s "$GUEST_VMLINUX" -a -s "$GUEST_INITRD"
check loopback     ping -c1 -W2 127.0.0.1
exit $fail
