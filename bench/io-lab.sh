#!/bin/sh
# The in-lab half of bench/io.sh (busybox sh, run by tests/lab/lab.sh as the
# scenario). Boots the I/O guest with Ferrovisor and with QEMU microvm on the
# lab's /dev/kvm, alternately, each time on the same raw image and the same
# TAP name, and prints the guest's results:
#
#   BENCH-IO vmm=V run=N test=T rc=RC value=X      (from the guest's BENCH-R lines)
#   BENCH-GUEST vmm=V run=N key=value...           (from the guest's BENCH-G lines)
#   BENCH-RUN vmm=V run=N rc=RC seconds=S          (the VMM's exit)
#
# Per boot: an iperf3 server (-1: one test) listening in the lab, the VMM
# started with its console to a file (the lab's emulated UART console can
# stall under concurrent output), the TAP (created by the VMM) given
# $HOST_IP/24 and set up, the VMM waited for (killed after $VM_TIMEOUT s).
#
# Parameters come from /bench/params (written by bench/io.sh): RUNS VMMS
# BENCH_CPUS BENCH_MEM IMG_MIB VM_TIMEOUT TAP MAC HOST_IP CMDLINE
# BENCH_QEMU_CACHE, and /bench/io-guest.sh is the guest's scenario.
# shellcheck disable=SC3028  # busybox ash: $EPOCHREALTIME
# shellcheck disable=SC2153  # parameters come from params
# shellcheck disable=SC1091  # params and vmms.sh are added by bench/io.sh
BENCH_DIR=${BENCH_DIR:-/bench}
. "$BENCH_DIR/params"
. "$BENCH_DIR/vmms.sh"
FERROVISOR=${FERROVISOR:-ferrovisor}
CR=$(printf '\r')

IMG=/tmp/bench-disk.img
INITRD=/tmp/bench-io-initrd.cpio
# Every page of the image allocated (not a sparse file): both VMMs read and
# write real tmpfs pages.
dd if=/dev/zero of="$IMG" bs=1M count="$IMG_MIB" 2>/dev/null ||
  { echo "BENCH-ERROR cannot create the $IMG_MIB MiB image"; exit 1; }
# The guest initramfs + /scenario.sh, then fio, iperf3 and their libraries
# (a gzip'ed cpio built by bench/io.sh).
[ -x /usr/bin/iperf3 ] || echo "BENCH-WARN iperf3 is not in the lab (bench/deps.sh)"
lab-guest-initrd "$BENCH_DIR/io-guest.sh" "$INITRD.base" ||
  { echo "BENCH-ERROR lab-guest-initrd failed"; exit 1; }
cat "$INITRD.base" "$BENCH_DIR/tools.cpio.gz" > "$INITRD" && rm -f "$INITRD.base"
echo "BENCH-INFO runs=$RUNS cpus=$BENCH_CPUS mem=$BENCH_MEM image=${IMG_MIB}MiB(tmpfs) tap=$TAP initrd_kb=$(( $(wc -c < "$INITRD") / 1024 )) qemu_cache=$BENCH_QEMU_CACHE"
echo "BENCH-INFO $("$FERROVISOR" --version 2>/dev/null || echo ferrovisor) / $(qemu-system-x86_64 --version | head -n1)"
BENCH_DISK=$IMG BENCH_TAP=$TAP BENCH_MAC=$MAC
export BENCH_DISK BENCH_TAP BENCH_MAC
for vmm in $VMMS; do
  vmm_cmd "$vmm" KERNEL INITRD "$CMDLINE" show_cmd BENCH-CMD "$vmm:"
done

failures=0
# boot_one VMM RUN
boot_one() {
  vmm=$1 run=$2
  log=/tmp/bench-io-$vmm-$run.log
  # A TAP left behind (persistent) by the previous VMM would carry its flags.
  [ ! -e "/sys/class/net/$TAP" ] || tunctl -d "$TAP" >/dev/null 2>&1
  iperf3 -s -1 > "/tmp/iperf-server-$vmm-$run.log" 2>&1 &
  srv=$!
  t0=$EPOCHREALTIME
  vmm_cmd "$vmm" "$GUEST_VMLINUX" "$INITRD" "$CMDLINE" timeout -s KILL "$VM_TIMEOUT" \
    > "$log" 2>&1 < /dev/null &
  pid=$!
  n=0
  until [ -e "/sys/class/net/$TAP" ] || [ $n -gt 300 ] || ! kill -0 "$pid" 2>/dev/null; do
    sleep 0.1; n=$((n + 1))
  done
  if [ -e "/sys/class/net/$TAP" ]; then
    ip link set "$TAP" up
    ip addr add "$HOST_IP/24" dev "$TAP" 2>/dev/null
  else
    echo "BENCH-WARN $vmm run $run: no $TAP after 30 s"
  fi
  wait "$pid"; rc=$?
  t1=$EPOCHREALTIME
  [ "$rc" != 137 ] || echo "BENCH-WARN $vmm run $run: killed after ${VM_TIMEOUT}s"
  kill "$srv" 2>/dev/null
  wait "$srv" 2>/dev/null
  tr -d "$CR" < "$log" | sed -n \
    -e "s/^.*BENCH-R /BENCH-IO vmm=$vmm run=$run /p" \
    -e "s/^.*BENCH-G /BENCH-GUEST vmm=$vmm run=$run /p"
  ! grep -q 'Initramfs unpacking failed' "$log" ||
    echo "BENCH-WARN $vmm run $run: the guest could not unpack its initramfs (out of memory?)"
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  echo "BENCH-RUN vmm=$vmm run=$run rc=$rc seconds=$secs"
  if [ "$rc" != 0 ] || ! grep -q 'FV-SCENARIO-EXIT 0' "$log" || grep -q 'BENCH-R .*rc=[1-9]' "$log"; then
    echo "BENCH-WARN $vmm run $run: rc=$rc; console tail:"
    tail -n 20 "$log"
    failures=$((failures + 1))
  fi
}

run=1
while [ "$run" -le "$RUNS" ]; do
  # Alternate which VMM goes first, so a drift over the session does not
  # favour one of them.
  if [ $((run % 2)) = 1 ]; then order="$VMMS"; else order=$(echo "$VMMS" | awk '{ for (i = NF; i > 0; i--) printf "%s ", $i }'); fi
  for vmm in $order; do
    boot_one "$vmm" "$run"
  done
  run=$((run + 1))
done
echo "BENCH-DONE failures=$failures"
exit 0
