#!/usr/bin/env bash
# Guest I/O throughput, Ferrovisor vs QEMU microvm (userspace virtio, no
# vhost), side by side in one lab session (nested KVM: tests/lab/lab.sh), on
# the same raw image and the same TAP name. See bench/README.md.
#
#   bench/io.sh [--runs N] [--out DIR] [--ferrovisor PATH] [--dd-mib M]
#               [--image-mib M] [--fio-runtime S] [--fio-engine E]
#               [--iperf-time S] [--qemu-cache MODE] [--vm-timeout S]
#               [--lab-timeout S] [--lab-mem MiB] [--vmms "ferrovisor qemu"]
#
#   --runs N          boots per VMM, alternating VMMs (default 3)
#   --out DIR         where the table, plot and raw data go (default target/bench)
#   --ferrovisor PATH the binary to measure (default target/release/ferrovisor;
#                     it is not built here)
#   --dd-mib M        MiB written then read by dd (default 128)
#   --image-mib M     the raw image's size, in the lab's tmpfs (default 256)
#   --fio-runtime S   seconds of 4k random reads (default 10)
#   --fio-engine E    fio's ioengine: libaio or psync (default libaio)
#   --iperf-time S    seconds of TCP guest->host (default 10)
#   --qemu-cache MODE QEMU's -drive cache= (default writeback = Ferrovisor's
#                     buffered I/O; none needs O_DIRECT, which the lab's 6.1
#                     tmpfs refuses)
#   --vm-timeout S    kill a VMM still running after S seconds (default 300)
#   --lab-timeout S   the whole lab session (default 180 + runs x 2 x vm-timeout)
#   --lab-mem MiB     the lab's memory (default 3072)
#   --vmms LIST       which VMMs to boot (default "ferrovisor qemu"; one alone
#                     is for checking the set-up, the table then has no ratio)
#
# Needs fio and iperf3 on this host (bench/deps.sh installs them): they go
# into the guest's initrd with their libraries (iperf3 also into the lab).
# Writes DIR/io.txt (the table), DIR/io.svg (the plot), DIR/io-samples.tsv
# and DIR/io-lab.log (the lab console).
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { sed -n '2,32s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

RUNS=3 OUT="$REPO/target/bench" FV="$REPO/target/release/ferrovisor"
DD_MIB=128 IMG_MIB=256 FIO_RUNTIME=10 FIO_ENGINE=libaio IPERF_TIME=10
QEMU_CACHE=writeback VM_TIMEOUT=300 LAB_TIMEOUT="" LAB_MEM=3072 VMMS="ferrovisor qemu"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs)        RUNS="$2"; shift 2 ;;
    --out)         OUT="$2"; shift 2 ;;
    --ferrovisor)  FV="$2"; shift 2 ;;
    --dd-mib)      DD_MIB="$2"; shift 2 ;;
    --image-mib)   IMG_MIB="$2"; shift 2 ;;
    --fio-runtime) FIO_RUNTIME="$2"; shift 2 ;;
    --fio-engine)  FIO_ENGINE="$2"; shift 2 ;;
    --iperf-time)  IPERF_TIME="$2"; shift 2 ;;
    --qemu-cache)  QEMU_CACHE="$2"; shift 2 ;;
    --vm-timeout)  VM_TIMEOUT="$2"; shift 2 ;;
    --lab-timeout) LAB_TIMEOUT="$2"; shift 2 ;;
    --lab-mem)     LAB_MEM="$2"; shift 2 ;;
    --vmms)        VMMS="$2"; shift 2 ;;
    -h|--help)     usage 0 ;;
    *) echo "io.sh: unknown argument: $1" >&2; usage ;;
  esac
done
for v in RUNS DD_MIB IMG_MIB FIO_RUNTIME IPERF_TIME VM_TIMEOUT LAB_MEM; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "io.sh: --$(tr 'A-Z_' 'a-z-' <<<"$v") must be a positive integer" >&2; exit 2; }
done
[ "$DD_MIB" -le "$IMG_MIB" ] || { echo "io.sh: --dd-mib must not exceed --image-mib" >&2; exit 2; }
case "$FIO_ENGINE" in libaio|psync) ;; *) echo "io.sh: --fio-engine: libaio or psync" >&2; exit 2 ;; esac
case "$QEMU_CACHE" in writeback|none|writethrough|directsync|unsafe) ;; *) echo "io.sh: --qemu-cache: writeback, none, writethrough, directsync or unsafe" >&2; exit 2 ;; esac
for v in $VMMS; do
  case "$v" in ferrovisor|qemu) ;; *) echo "io.sh: --vmms: ferrovisor and/or qemu" >&2; exit 2 ;; esac
done
ADDS=()
if [[ " $VMMS " == *" ferrovisor "* ]]; then
  [ -x "$FV" ] || { echo "io.sh: $FV: no such executable; build it first (cargo build --release)" >&2; exit 1; }
  ADDS+=(--ferrovisor "$FV")
fi
TOOLS=()
for p in fio iperf3; do
  if command -v "$p" >/dev/null; then
    TOOLS+=("$(command -v "$p")")
  else
    echo "io.sh: $p is not installed: its workload will be NA (run bench/deps.sh)" >&2
  fi
done
# The lab runs the iperf3 server.
! command -v iperf3 >/dev/null || ADDS+=(--add "$(command -v iperf3):/usr/bin/iperf3")
[ -n "$LAB_TIMEOUT" ] || LAB_TIMEOUT=$((180 + RUNS * 2 * VM_TIMEOUT))

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/io-run"
rm -rf "$WORK"; mkdir -p "$WORK"
cat > "$WORK/params" <<EOF
RUNS=$RUNS
VMMS="$VMMS"
BENCH_CPUS=2
BENCH_MEM=512M
IMG_MIB=$IMG_MIB
VM_TIMEOUT=$VM_TIMEOUT
TAP=fvbench0
MAC=52:54:00:fb:00:02
HOST_IP=169.254.88.1
CMDLINE="quiet fv.action=script"
BENCH_QEMU_CACHE=$QEMU_CACHE
EOF
{
  echo "DD_MIB=$DD_MIB FIO_RUNTIME=$FIO_RUNTIME FIO_ENGINE=$FIO_ENGINE IPERF_TIME=$IPERF_TIME"
  echo "HOST_IP=169.254.88.1 GUEST_IP=169.254.88.2"
  cat "$BENCH/io-guest.sh"
} > "$WORK/io-guest.sh"

# The guest's tools: fio and iperf3 with every library they load (ldd), as a
# gzip'ed cpio that io-lab.sh appends to the guest initrd. fio links ~80 MB of
# libraries (Ceph, Gluster, RDMA, PMEM engines): uncompressed, the initrd and
# its unpacked copy do not fit together in the 512 MiB guest (the kernel then
# reports "Initramfs unpacking failed: write error" and truncates files).
STAGE="$WORK/tools"
mkdir -p "$STAGE/usr/bin"
for t in "${TOOLS[@]}"; do
  cp -L "$t" "$STAGE/usr/bin/"
  for lib in $(ldd "$t" | sed -n -e 's/^.* => \(\/[^ ]*\) (0x.*$/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (0x.*$/\1/p'); do
    mkdir -p "$STAGE$(dirname "$lib")"
    [ -e "$STAGE$lib" ] || cp -L "$lib" "$STAGE$lib"
  done
done
# Every parent directory gets an entry (the kernel's unpacker creates none).
(cd "$STAGE" && find . -mindepth 1 | sed 's|^\./||' | sort | cpio -o -H newc -R 0:0 --quiet) |
  gzip -1 > "$WORK/tools.cpio.gz"
rm -rf "$STAGE"
ADDS+=(--add "$WORK/tools.cpio.gz:/bench/tools.cpio.gz")

LOG="$OUT/io-lab.log"
echo "io.sh: $RUNS run(s) x {$VMMS} in one lab session (timeout ${LAB_TIMEOUT}s); console in $LOG" >&2
set +e
"$REPO/tests/lab/lab.sh" --with-qemu --timeout "$LAB_TIMEOUT" --mem "$LAB_MEM" \
  --scenario "$BENCH/io-lab.sh" \
  --add "$BENCH/vmms.sh:/bench/vmms.sh" --add "$WORK/params:/bench/params" \
  --add "$WORK/io-guest.sh:/bench/io-guest.sh" "${ADDS[@]}" \
  > "$LOG" 2> "$WORK/lab.stderr" < /dev/null &
LAB_PID=$!
tail -n +1 --pid="$LAB_PID" -F "$LOG" 2>/dev/null | sed -u 's/\r$//' |
  grep --line-buffered -E '^(BENCH-(INFO|IO|RUN|WARN|DONE|ERROR)|LAB-(BOOTED|KVM|VERDICT))' >&2 &
TAIL_PID=$!
wait "$LAB_PID"; LAB_RC=$?
wait "$TAIL_PID" 2>/dev/null
set -e
rm -f "$WORK/tools.cpio.gz"
if [ "$LAB_RC" != 0 ]; then
  echo "io.sh: the lab session failed (lab.sh exit $LAB_RC): see $LOG and $WORK/lab.stderr" >&2
  tail -n 5 "$WORK/lab.stderr" >&2
fi

# Raw lines -> samples (workload, metric, unit, vmm, run, value).
python3 - "$LOG" "$OUT/io-samples.tsv" "$DD_MIB" "$FIO_ENGINE" > "$WORK/guest.txt" <<'EOF'
import sys
log, out, dd_mib, engine = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
tests = {
    "seqwrite": (f"sequential write (dd 1 MiB x {dd_mib}, O_DIRECT + fsync)", "throughput", "MB/s"),
    "seqread": (f"sequential read (dd 1 MiB x {dd_mib}, O_DIRECT)", "throughput", "MB/s"),
    "randread": (f"4k random read (fio {engine}, iodepth 16, O_DIRECT)", "IOPS", "IOPS"),
    "tcp": ("TCP guest -> host (iperf3, 1 stream)", "throughput", "Mbit/s"),
}
rows, runs, guest = {}, set(), {}
for raw in open(log, encoding="utf-8", errors="replace"):
    line = raw.strip().replace("\r", "")
    kind, _, rest = line.partition(" ")
    if kind not in ("BENCH-IO", "BENCH-RUN", "BENCH-GUEST"):
        continue
    f = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    key = (f.get("vmm"), f.get("run"))
    if kind == "BENCH-RUN":
        runs.add(key)
    elif kind == "BENCH-GUEST":
        for k, v in f.items():
            if k not in ("vmm", "run"):
                guest.setdefault((f["vmm"], k), set()).add(v)
    elif f.get("test") in tests:
        v = f.get("value", "NA")
        try:
            float(v)
        except ValueError:
            v = "NA"
        rows[(f["test"], key)] = v if f.get("rc") == "0" else "NA"
with open(out, "w", encoding="utf-8") as o:
    o.write("workload\tmetric\tunit\tvmm\trun\tvalue\n")
    for t, (wl, metric, unit) in tests.items():
        for vmm, run in sorted(runs, key=lambda k: (k[0], int(k[1]))):
            o.write(f"{wl}\t{metric}\t{unit}\t{vmm}\t{run}\t{rows.get((t, (vmm, run)), 'NA')}\n")
for (vmm, k), vals in sorted(guest.items()):
    print(f"guest ({vmm}): {k}={' / '.join(sorted(vals))}")
if not runs:
    sys.exit("io.sh: no BENCH-RUN lines in the lab log")
EOF

{
  echo
  python3 "$BENCH/plot.py" "$OUT/io-samples.tsv" \
    --title "Guest I/O, nested KVM in the lab ($RUNS runs, 2 vCPUs, 512 MiB, ${IMG_MIB} MiB raw image in tmpfs)" \
    --svg "$OUT/io.svg"
  echo
  echo "ratio = Ferrovisor median / QEMU median (higher is better for every row; > 1: Ferrovisor faster)"
  echo "MB = 10^6 bytes; rates measured on the guest's clock"
  cat "$WORK/guest.txt"
  grep -a '^BENCH-CMD ' "$LOG" | tr -d '\r' | sed 's/^BENCH-CMD /command: /'
  grep -a '^BENCH-INFO ' "$LOG" | tr -d '\r' | sed 's/^BENCH-INFO /info: /'
  echo "host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/io.txt"
echo "io.sh: wrote $OUT/io.txt, $OUT/io.svg, $OUT/io-samples.tsv, $LOG" >&2
exit "$LAB_RC"
