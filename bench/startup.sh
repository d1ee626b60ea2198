#!/usr/bin/env bash
# Host-side start-up cost: time from the exec of the VMM to its first KVM_RUN
# ioctl, Ferrovisor vs QEMU microvm, on this host's /dev/kvm (no lab).
# See bench/README.md.
#
#   bench/startup.sh [--runs N] [--out DIR] [--ferrovisor PATH] [--qemu PATH]
#                    [--firecracker PATH] [--workloads "vmlinux bzimage"]
#
#   --runs N          launches per VMM and workload, alternating VMMs (default 20)
#   --out DIR         where the table, plot and raw data go (default target/bench)
#   --ferrovisor PATH the binary to measure (default target/release/ferrovisor;
#                     it is not built here)
#   --qemu PATH       default: qemu-system-x86_64 on PATH
#   --firecracker PATH  also Firecracker (vmlinux only); default: the one
#                     bench/firecracker.sh built, if it did
#   --workloads LIST  vmlinux (ELF, PVH entry) and/or bzimage (default both)
#
# An LD_PRELOAD shim (bench/kvm_run_probe.c, compiled into DIR) stamps
# CLOCK_MONOTONIC at the first KVM_RUN and SIGKILLs the VMM; a Python
# launcher stamps CLOCK_MONOTONIC just before the execve. Writes
# DIR/startup.txt (the table), DIR/startup.svg, DIR/startup-samples.tsv.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { sed -n '2,22s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

RUNS=20 OUT="$REPO/target/bench" FV="$REPO/target/release/ferrovisor"
QEMU_BIN="$(command -v qemu-system-x86_64 || true)" WORKLOADS="vmlinux bzimage"
FC_BIN="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor}/peers/firecracker"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs)       RUNS="$2"; shift 2 ;;
    --out)        OUT="$2"; shift 2 ;;
    --ferrovisor) FV="$2"; shift 2 ;;
    --qemu)       QEMU_BIN="$2"; shift 2 ;;
    --firecracker) FC_BIN="$2"; [ -x "$FC_BIN" ] || { echo "startup.sh: $FC_BIN: no such executable" >&2; exit 1; }; shift 2 ;;
    --workloads)  WORKLOADS="$2"; shift 2 ;;
    -h|--help)    usage 0 ;;
    *) echo "startup.sh: unknown argument: $1" >&2; usage ;;
  esac
done
die() { echo "startup.sh: $*" >&2; exit 1; }
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
for w in $WORKLOADS; do
  case "$w" in vmlinux|bzimage) ;; *) die "unknown workload $w (vmlinux, bzimage)" ;; esac
done
[ -x "$FV" ] || die "$FV: no such executable; build it first (cargo build --release)"
if [ -z "$QEMU_BIN" ] || [ ! -x "$QEMU_BIN" ]; then
  die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  die "/dev/kvm is missing or not accessible to $(id -un)"
fi
command -v gcc >/dev/null || die "gcc not found (apt-get install gcc)"
VMMS="ferrovisor qemu" FC=
if [ -x "$FC_BIN" ]; then VMMS="ferrovisor qemu firecracker" FC=1; fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/startup-run"
rm -rf "$WORK"; mkdir -p "$WORK"
ASSETS="$("$REPO/guest/assets.sh")"

# The shim. It must see the VMMs' KVM_RUN: both call libc's ioctl() through
# the dynamic symbol table (Ferrovisor via the libc crate: kvm-ioctls ->
# vmm-sys-util -> libc::ioctl), which LD_PRELOAD interposes.
SHIM="$OUT/kvm_run_probe.so"
gcc -O2 -Wall -Wextra -shared -fPIC -o "$SHIM" "$BENCH/kvm_run_probe.c" -ldl
if command -v nm >/dev/null; then
  for b in "$FV" "$QEMU_BIN" ${FC:+"$FC_BIN"}; do
    nm -D --undefined-only "$b" 2>/dev/null | grep -w ioctl >/dev/null ||
      echo "startup.sh: WARNING: $b imports no ioctl symbol; the shim may not see its KVM_RUN" >&2
  done
fi

# shellcheck source=bench/vmms.sh disable=SC1091
. "$BENCH/vmms.sh"
# shellcheck disable=SC2034  # read by vmm_cmd (bench/vmms.sh)
FERROVISOR="$FV" QEMU="$QEMU_BIN" FIRECRACKER="$FC_BIN" BENCH_TMP="$WORK"
# shellcheck disable=SC2034  # read by vmm_cmd
BENCH_CPUS=2 BENCH_MEM=512M
CMDLINE="quiet fv.action=hold"
export PROBE_SHIM="$SHIM"

# The launcher: stamp CLOCK_MONOTONIC (Python's time.monotonic_ns) into a
# file, then execve the VMM with the shim preloaded (only the VMM gets it).
LAUNCH='
import os, sys, time
stamp, argv = sys.argv[1], sys.argv[2:]
env = dict(os.environ, LD_PRELOAD=os.environ["PROBE_SHIM"],
           KVM_RUN_PROBE_OUT=stamp + ".run", KVM_RUN_PROBE_KILL="1")
fd = os.open(stamp + ".exec", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
t0 = time.monotonic_ns()
os.write(fd, b"%d\n" % t0)
os.close(fd)
os.execve(argv[0], argv, env)
'

kernel_of() { case "$1" in vmlinux) echo "$ASSETS/vmlinux" ;; bzimage) echo "$ASSETS/vmlinuz" ;; esac; }
label_of() { case "$1" in vmlinux) echo "vmlinux (PVH)" ;; bzimage) echo "bzImage" ;; esac; }

SAMPLES="$OUT/startup-samples.tsv"
printf 'workload\tmetric\tunit\tvmm\trun\tvalue\n' > "$SAMPLES"
FAILS=0
# run_one VMM WORKLOAD RUN: one launch, one sample.
run_one() {
  local vmm="$1" wl="$2" run="$3" stamp="$WORK/stamp" rc v
  rm -f "$stamp.exec" "$stamp.run"
  set +e
  vmm_cmd "$vmm" "$(kernel_of "$wl")" "$ASSETS/initramfs.cpio.gz" "$CMDLINE" \
    timeout -s KILL 30 python3 -c "$LAUNCH" "$stamp" \
    > "$WORK/$vmm-$wl.out" 2> "$WORK/$vmm-$wl.err" < /dev/null
  rc=$?
  set -e
  if [ -s "$stamp.exec" ] && [ -s "$stamp.run" ]; then
    v=$(awk -v a="$(cat "$stamp.exec")" -v b="$(cat "$stamp.run")" 'BEGIN { printf "%.3f", (b - a) / 1e6 }')
  else
    v=NA FAILS=$((FAILS + 1))
    echo "startup.sh: $vmm $wl run $run: no KVM_RUN seen (exit $rc); stderr:" >&2
    tail -n 5 "$WORK/$vmm-$wl.err" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(label_of "$wl")" "exec to first KVM_RUN" ms "$vmm" "$run" "$v" >> "$SAMPLES"
}

FLAVOUR="$("$FV" host 2>/dev/null | sed -n 's/^KVM flavour: *//p')"
echo "startup.sh: $RUNS run(s) x {$WORKLOADS} x {$VMMS} on /dev/kvm (${FLAVOUR:-unknown flavour})" >&2
for ((run = 1; run <= RUNS; run++)); do
  if ((run % 2)); then order="$VMMS"; else order=$(tr ' ' '\n' <<<"$VMMS" | tac | tr '\n' ' '); fi
  for wl in $WORKLOADS; do
    for vmm in $order; do
      vmm_boots "$vmm" "$wl" && run_one "$vmm" "$wl" "$run"
    done
  done
done

{
  echo
  python3 "$BENCH/plot.py" "$SAMPLES" \
    --title "Host start-up: exec to first KVM_RUN ($RUNS runs, 2 vCPUs, 512 MiB, KVM: ${FLAVOUR:-?})" \
    --svg "$OUT/startup.svg"
  echo
  echo "ratio = QEMU median / Ferrovisor median (> 1: Ferrovisor starts faster)"
  if [ -n "$FC" ]; then
    echo
    python3 "$BENCH/plot.py" "$SAMPLES" --vmms ferrovisor=Ferrovisor:FV,firecracker=Firecracker:FC \
      --title "Host start-up: exec to first KVM_RUN, Ferrovisor vs Firecracker ($RUNS runs)" \
      --svg "$OUT/startup-fc.svg"
    echo
    echo "ratio = Firecracker median / Ferrovisor median (> 1: Ferrovisor starts faster)"
  fi
  for vmm in $VMMS; do
    echo "command: $(vmm_cmd "$vmm" KERNEL "$ASSETS/initramfs.cpio.gz" "$CMDLINE" show_cmd)"
  done
  echo "info: $("$QEMU_BIN" --version | head -n1); host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/startup.txt"
echo "startup.sh: wrote $OUT/startup.txt, $OUT/startup.svg, $SAMPLES" >&2
[ "$FAILS" = 0 ] || { echo "startup.sh: $FAILS launch(es) failed" >&2; exit 1; }
