#!/bin/sh
# The in-lab half of bench/boot.sh (busybox sh, run by tests/lab/lab.sh as the
# scenario). Boots the test guest with Ferrovisor and with QEMU microvm on the
# lab's /dev/kvm, alternately, and prints one line per boot:
#
#   BENCH-BOOT vmm=V workload=W run=N rc=RC t0=T t_marker=T t_exit=T
#              hwm_kb=K rss_kb=K guest_rss_kb=K guest_maps=N guest_thp_kb=K
#              guest_align_kb=K
#   BENCH-CMDLINE vmm=V workload=W <the guest kernel's /proc/cmdline>
#   BENCH-CENSUS vmm=V workload=W level=R|D|T count=N us=T kind=<what>
#
# The exit census (CENSUS=1): after the timed boots, one more boot per VMM and
# workload with KVM's kvm_exit/kvm_entry/kvm_pio/kvm_mmio/kvm_msr/
# kvm_userspace_exit recorded for the VMM's threads only (bench/ktrace.sh,
# the same for every VMM), from exec until /init's marker; bench/census.awk
# counts and times the exits by reason (level=R) and by reason and port, MMIO
# page or MSR (level=D); level=T is the total (count exits, kind = threads).
# Its times include the tracing's own cost, so they compare VMMs, not the timed
# boots. Firecracker boots only the vmlinux workload.
#
# Times are $EPOCHREALTIME (busybox ash: gettimeofday, microseconds, no fork):
#   t0        just before the exec of the VMM (in the forked child, after its
#             stdout, the FIFO below, is open)
#   t_marker  when the line FERROVISOR-INIT-REACHED arrived on the VMM's stdout
#   t_exit    when the VMM's stdout closed (the process exited)
# The console goes through a FIFO that this shell reads line by line with the
# `read` builtin: it sleeps in read(2) until the VMM writes, so the marker is
# seen as soon as it is written, and no polling process competes with the
# VMM for the lab's two vCPUs.
#
# Memory, sampled as soon as the marker arrives (the guest holds for
# fv.hold= seconds before powering off): VmHWM (peak RSS) from
# /proc/PID/status, and the Rss of the guest-memory mapping(s): anonymous
# mappings (no path) of at least half the guest memory size; guest_thp_kb is
# how much of that is in transparent huge pages (AnonHugePages), guest_align_kb
# the alignment of the mapping's start address (KVM maps guest memory with
# 2 MiB nested-paging entries only if it is 2 MiB-aligned).
#
# Parameters come from /bench/params (written by bench/boot.sh):
#   RUNS  HOLD  BOOT_TIMEOUT  WORKLOADS  VMMS  BENCH_CPUS  BENCH_MEM  CMDLINE  CENSUS
# shellcheck disable=SC3028,SC3045  # busybox ash: $EPOCHREALTIME, read -t
# shellcheck disable=SC2153  # CMDLINE comes from params
# shellcheck disable=SC1091  # params and vmms.sh are added by bench/boot.sh
BENCH_DIR=${BENCH_DIR:-/bench}
. "$BENCH_DIR/params"
. "$BENCH_DIR/vmms.sh"
. "$BENCH_DIR/ktrace.sh"
FERROVISOR=${FERROVISOR:-ferrovisor}
[ ! -x "$BENCH_DIR/firecracker" ] || FIRECRACKER=$BENCH_DIR/firecracker
CENSUS=${CENSUS:-0}
CENSUS_EVENTS="kvm_exit kvm_entry kvm_pio kvm_mmio kvm_msr kvm_userspace_exit"

CR=$(printf '\r')
FIFO=/tmp/bench-console.fifo
rm -f "$FIFO"
mkfifo "$FIFO" || { echo "BENCH-ERROR mkfifo failed"; exit 1; }

# Guest memory in kB, from BENCH_MEM (e.g. 512M, 1G).
case "$BENCH_MEM" in
  *G) MEM_KB=$(( ${BENCH_MEM%G} * 1024 * 1024 )) ;;
  *M) MEM_KB=$(( ${BENCH_MEM%M} * 1024 )) ;;
  *)  MEM_KB=$(( BENCH_MEM / 1024 )) ;;
esac

kernel_of() {
  case "$1" in
    vmlinux) echo "$GUEST_VMLINUX" ;;
    bzimage) echo "$GUEST_KERNEL" ;;
  esac
}

# sample_memory PID: sets hwm rss guest guest_maps.
sample_memory() {
  hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB$/\1/p' "/proc/$1/status" 2>/dev/null)
  rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB$/\1/p' "/proc/$1/status" 2>/dev/null)
  # shellcheck disable=SC2046  # four numbers, split on purpose
  set -- $(awk -v min=$((MEM_KB / 2)) '
    # Alignment of a hex address, in KiB (capped at 1 GiB).
    function align_kb(a,   n, d, f) {
      n = 0
      while (n < length(a) && substr(a, length(a) - n, 1) == "0") n++
      d = substr(a, length(a) - n, 1)
      f = index("1248", d) ? d + 0 : (index("26ae", d) ? 2 : (d == "c" ? 4 : 1))
      a = f; while (n-- > 0) a *= 16
      a /= 1024
      return a > 1048576 ? 1048576 : a
    }
    $1 ~ /^[0-9a-f]+-[0-9a-f]+$/ { anon = (NF == 5); start = $1; sub(/-.*/, "", start); size = 0; next }
    $1 == "Size:" { size = $2; next }
    $1 == "Rss:" && anon && size >= min {
      sum += $2; n++
      al = align_kb(start); if (minal == "" || al < minal) minal = al
      next }
    $1 == "AnonHugePages:" && anon && size >= min { thp += $2 }
    END { printf "%d %d %d %s\n", sum, n, thp, (minal == "" ? "NA" : minal) }' "/proc/$1/smaps" 2>/dev/null)
  guest=${1:-NA} guest_maps=${2:-NA} guest_thp=${3:-NA} guest_align=${4:-NA}
  # Run 1: list the big anonymous mappings, to check what counts as guest RAM.
  maps=
  [ "$run" != 1 ] || maps=$(awk '
    $1 ~ /^[0-9a-f]+-[0-9a-f]+$/ { anon = (NF == 5); range = $1; size = 0; next }
    $1 == "Size:" { size = $2; next }
    $1 == "Rss:" { rss = $2; next }
    $1 == "AnonHugePages:" && anon && size >= 4096 {
      printf "anon %s size_kb=%d rss_kb=%d thp_kb=%d\n", range, size, rss, $2 }' \
    "/proc/$pid/smaps" 2>/dev/null)
  [ -n "$hwm" ] || hwm=NA
  [ -n "$rss" ] || rss=NA
}

# census_print VMM WORKLOAD INSTANCE: the census of the trace in INSTANCE.
census_print() {
  for _c in "$3"/per_cpu/cpu*/stats; do
    _o=$(sed -n 's/^overrun: *//p' "$_c" 2>/dev/null)
    [ "${_o:-0}" = 0 ] || echo "BENCH-WARN census $1 $2: $_o events lost on $(basename "$(dirname "$_c")") (buffer full)"
  done
  awk -f "$BENCH_DIR/census.awk" "$3/trace" | sort -t "$(printf '\t')" -k3,3nr |
    while IFS="$(printf '\t')" read -r _lvl _n _us _kind; do
      echo "BENCH-CENSUS vmm=$1 workload=$2 level=$_lvl count=$_n us=$_us kind=$_kind"
    done
}

# boot_one VMM WORKLOAD RUN [census]
boot_one() {
  vmm=$1 wl=$2 run=$3 census=${4:-}
  kernel=$(kernel_of "$wl")
  log=/tmp/bench-$vmm-$wl-$run.log
  : > "$log"
  t0=NA t_marker=NA t_exit=NA hwm=NA rss=NA guest=NA guest_maps=NA guest_thp=NA guest_align=NA cmdline='' maps=''
  killed=0 inst=''
  prefix=exec
  if [ -n "$census" ]; then
    inst=$(ktrace_instance "census-$vmm-$wl" 65536 $CENSUS_EVENTS) || inst=''
    [ -n "$inst" ] && prefix="ktrace_exec $inst"
  fi
  # The child opens the FIFO (blocking until we open it below), stamps t0
  # and becomes the VMM: $! is the VMM's pid.
  { echo "$EPOCHREALTIME" > /tmp/bench-t0
    # shellcheck disable=SC2086  # the prefix is a command and its argument
    vmm_cmd "$vmm" "$kernel" "$GUEST_INITRD" "$CMDLINE" $prefix
  } > "$FIFO" 2> "$log.err" < /dev/null &
  pid=$!
  exec 3< "$FIFO"
  start=${EPOCHREALTIME%.*}
  deadline=$(( start + BOOT_TIMEOUT ))
  while :; do
    left=$(( deadline - ${EPOCHREALTIME%.*} ))
    [ "$left" -gt 0 ] || left=1
    if IFS= read -r -t "$left" line <&3; then
      line=${line%"$CR"}
      case "$line" in
        *FERROVISOR-INIT-REACHED*)
          if [ "$t_marker" = NA ]; then
            t_marker=$EPOCHREALTIME
            [ -z "$inst" ] || echo 0 > "$inst/tracing_on"
            sample_memory "$pid"
          fi ;;
        *FV-CMDLINE\ *) cmdline=${line#*FV-CMDLINE } ;;
      esac
      printf '%s\n' "$line" >> "$log"
    elif [ "${EPOCHREALTIME%.*}" -ge "$deadline" ] && [ "$killed" = 0 ]; then
      echo "BENCH-WARN $vmm $wl run $run: no exit after ${BOOT_TIMEOUT}s, killing it"
      kill -9 "$pid" 2>/dev/null
      killed=1
    elif [ -n "$line" ]; then
      printf '%s\n' "$line" >> "$log"      # a last line without a newline
    else
      break                                 # EOF: the VMM exited
    fi
    line=
  done
  t_exit=$EPOCHREALTIME
  exec 3<&-
  wait "$pid"; rc=$?
  read -r t0 < /tmp/bench-t0
  [ "$killed" = 0 ] || t_exit=NA
  if [ -n "$inst" ]; then
    census_print "$vmm" "$wl" "$inst"
    ktrace_remove "$inst"
    if [ "$t_marker" = NA ] || [ "$rc" != 0 ]; then
      echo "BENCH-WARN census boot $vmm $wl failed (rc=$rc); console and stderr tails:"
      tail -n 15 "$log" "$log.err"
    fi
    return
  fi
  if [ "$run" = 1 ] && [ -n "$maps" ]; then
    printf '%s\n' "$maps" | sed "s/^/BENCH-MAPS vmm=$vmm workload=$wl /"
  fi
  echo "BENCH-BOOT vmm=$vmm workload=$wl run=$run rc=$rc t0=$t0 t_marker=$t_marker t_exit=$t_exit hwm_kb=$hwm rss_kb=$rss guest_rss_kb=$guest guest_maps=$guest_maps guest_thp_kb=$guest_thp guest_align_kb=$guest_align"
  [ -z "$cmdline" ] || echo "BENCH-CMDLINE vmm=$vmm workload=$wl $cmdline"
  if [ "$t_marker" = NA ] || [ "$rc" != 0 ]; then
    echo "BENCH-WARN $vmm $wl run $run failed (rc=$rc); console and stderr tails:"
    tail -n 15 "$log" "$log.err"
    failures=$((failures + 1))
  fi
}

echo "BENCH-INFO runs=$RUNS hold=$HOLD cpus=$BENCH_CPUS mem=$BENCH_MEM timeout=$BOOT_TIMEOUT workloads=$WORKLOADS"
echo "BENCH-INFO $("$FERROVISOR" --version 2>/dev/null || echo ferrovisor) / $(qemu-system-x86_64 --version | head -n1)"
case " $VMMS " in
  *" firecracker "*) echo "BENCH-INFO $("$FIRECRACKER" --version 2>&1 | head -n1)" ;;
esac
for vmm in $VMMS; do
  vmm_cmd "$vmm" KERNEL "$GUEST_INITRD" "$CMDLINE" show_cmd BENCH-CMD "$vmm:"
done
failures=0
run=1
while [ "$run" -le "$RUNS" ]; do
  # Alternate which VMM goes first, so a drift over the session (caches,
  # host load) does not favour one of them.
  if [ $((run % 2)) = 1 ]; then order="$VMMS"; else order=$(echo "$VMMS" | awk '{ for (i = NF; i > 0; i--) printf "%s ", $i }'); fi
  for wl in $WORKLOADS; do
    for vmm in $order; do
      vmm_boots "$vmm" "$wl" && boot_one "$vmm" "$wl" "$run"
    done
  done
  run=$((run + 1))
done
if [ "$CENSUS" = 1 ]; then
  if ktrace_ready; then
    for wl in $WORKLOADS; do
      for vmm in $VMMS; do
        vmm_boots "$vmm" "$wl" && boot_one "$vmm" "$wl" census census
      done
    done
  else
    echo "BENCH-WARN no tracefs with KVM events: no exit census"
  fi
fi
rm -f "$FIFO"
echo "BENCH-DONE failures=$failures"
exit 0
