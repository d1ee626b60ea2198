#!/bin/sh
# Boot the test guest under nested KVM with QEMU inside the lab: proves the
# lab's /dev/kvm runs stock Debian guests, and times the boots.
#   tests/lab/lab.sh --with-qemu --scenario tests/lab/scenarios/qemu-guest-boot.sh
now() { cut -d' ' -f1 /proc/uptime; }
fail=0
boot() {  # boot NAME QEMU-ARGS...: expects FERROVISOR-INIT-REACHED and 2 CPUs
  name="$1"; shift
  t0=$(now)
  timeout 300 qemu-system-x86_64 -accel kvm -cpu host -smp 2 -m 512 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -initrd "$GUEST_INITRD" "$@" </dev/null >"/tmp/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  if grep -q FERROVISOR-INIT-REACHED "/tmp/$name.log" &&
     grep -q 'FV-INFO cpus_online=2 ' "/tmp/$name.log"; then
    echo "NESTED-BOOT $name ok qemu_exit=$rc seconds=$secs"
    grep FV-INFO "/tmp/$name.log"
  else
    echo "NESTED-BOOT $name FAIL qemu_exit=$rc seconds=$secs"
    tail -n 40 "/tmp/$name.log"; fail=1
  fi
}
APPEND="console=ttyS0 quiet fv.action=info"
# microvm needs isa-serial for a console; rtc=on spares the guest a ~9 s
# rtc_cmos probe timeout.
boot microvm-bzimage -M microvm,isa-serial=on,rtc=on -kernel "$GUEST_KERNEL" -append "$APPEND"
boot microvm-pvh     -M microvm,isa-serial=on,rtc=on -kernel "$GUEST_VMLINUX" -append "$APPEND"
boot q35-bzimage     -M q35 -kernel "$GUEST_KERNEL" -append "$APPEND"
exit $fail
