#!/usr/bin/env bash
# Boot time to the guest's /init and the VMM's own memory, Ferrovisor vs QEMU
# microvm, side by side in one lab session (nested KVM: tests/lab/lab.sh).
# See bench/README.md.
#
#   bench/boot.sh [--runs N] [--out DIR] [--ferrovisor PATH] [--hold S]
#                 [--boot-timeout S] [--lab-timeout S] [--workloads "vmlinux bzimage"]
#                 [--firecracker PATH | --no-firecracker] [--census] [--lab-append ARGS]
#
#   --runs N          boots per VMM and workload, alternating VMMs (default 5)
#   --out DIR         where the table, plot and raw data go (default target/bench)
#   --ferrovisor PATH the binary to measure (default target/release/ferrovisor;
#                     it is not built here)
#   --hold S          seconds the guest stays up after /init (fv.hold=, default 2)
#   --boot-timeout S  kill a VMM that has not exited after S seconds (default 120)
#   --lab-timeout S   the whole lab session (default 120 + runs x workloads x 2 x 60)
#   --workloads LIST  vmlinux (ELF, PVH entry) and/or bzimage (default both)
#   --firecracker PATH  also boot Firecracker (vmlinux only); default: the one
#                     bench/firecracker.sh built, if it did (~/.cache/ferrovisor/peers)
#   --no-firecracker  Ferrovisor and QEMU only
#   --census          then one traced boot per VMM and workload: the exit
#                     census (bench/census.awk) in DIR/boot-census.txt
#   --lab-append ARGS more for the lab kernel's command line (tests/lab/lab.sh
#                     --append), e.g. transparent_hugepage=madvise
#
# Writes DIR/boot.txt (the tables), DIR/boot.svg (the plot, FV vs QEMU),
# DIR/boot-fc.svg (FV vs Firecracker), DIR/boot-samples.tsv and DIR/boot-lab.log
# (the lab console).
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { sed -n '2,32s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

RUNS=5 OUT="$REPO/target/bench" FV="$REPO/target/release/ferrovisor" HOLD=2
BOOT_TIMEOUT=120 LAB_TIMEOUT="" WORKLOADS="vmlinux bzimage" CENSUS=0 LAB_APPEND=""
FC_BUILT="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor}/peers/firecracker"
FC="$FC_BUILT"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs)         RUNS="$2"; shift 2 ;;
    --out)          OUT="$2"; shift 2 ;;
    --ferrovisor)   FV="$2"; shift 2 ;;
    --hold)         HOLD="$2"; shift 2 ;;
    --boot-timeout) BOOT_TIMEOUT="$2"; shift 2 ;;
    --lab-timeout)  LAB_TIMEOUT="$2"; shift 2 ;;
    --workloads)    WORKLOADS="$2"; shift 2 ;;
    --firecracker)  FC="$2"; shift 2 ;;
    --no-firecracker) FC=""; shift ;;
    --census)       CENSUS=1; shift ;;
    --lab-append)   LAB_APPEND="$2"; shift 2 ;;
    -h|--help)      usage 0 ;;
    *) echo "boot.sh: unknown argument: $1" >&2; usage ;;
  esac
done
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "boot.sh: --runs must be a positive integer" >&2; exit 2; }
[[ "$HOLD" =~ ^[0-9]+$ ]] || { echo "boot.sh: --hold must be whole seconds" >&2; exit 2; }
[[ "$BOOT_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || { echo "boot.sh: --boot-timeout must be a positive integer" >&2; exit 2; }
for w in $WORKLOADS; do
  case "$w" in vmlinux|bzimage) ;; *) echo "boot.sh: unknown workload $w (vmlinux, bzimage)" >&2; exit 2 ;; esac
done
[ -x "$FV" ] || { echo "boot.sh: $FV: no such executable; build it first (cargo build --release)" >&2; exit 1; }
VMMS="ferrovisor qemu"
FC_ADD=()
if [ -n "$FC" ]; then
  if [ -x "$FC" ]; then
    VMMS="ferrovisor qemu firecracker"
    FC_ADD=(--add "$FC:/bench/firecracker")
  elif [ "$FC" != "$FC_BUILT" ]; then
    echo "boot.sh: --firecracker $FC: no such executable" >&2; exit 1
  else
    echo "boot.sh: no Firecracker built (bench/firecracker.sh builds it): Ferrovisor and QEMU only" >&2
  fi
fi
NW=$(wc -w <<<"$WORKLOADS") NV=$(wc -w <<<"$VMMS")
[ -n "$LAB_TIMEOUT" ] || LAB_TIMEOUT=$((120 + (RUNS + CENSUS) * NW * NV * 60))

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/boot-run"
rm -rf "$WORK"; mkdir -p "$WORK"
cat > "$WORK/params" <<EOF
RUNS=$RUNS
HOLD=$HOLD
BOOT_TIMEOUT=$BOOT_TIMEOUT
WORKLOADS="$WORKLOADS"
VMMS="$VMMS"
BENCH_CPUS=2
BENCH_MEM=512M
CMDLINE="reboot=k panic=-1 quiet pci=off fv.action=hold fv.hold=$HOLD"
CENSUS=$CENSUS
EOF

LOG="$OUT/boot-lab.log"
echo "boot.sh: $RUNS run(s) x {$WORKLOADS} x {$VMMS} in one lab session (timeout ${LAB_TIMEOUT}s); console in $LOG" >&2
set +e
"$REPO/tests/lab/lab.sh" --with-qemu --ferrovisor "$FV" --timeout "$LAB_TIMEOUT" \
  ${LAB_APPEND:+--append "$LAB_APPEND"} \
  --scenario "$BENCH/boot-lab.sh" \
  --add "$BENCH/vmms.sh:/bench/vmms.sh" --add "$WORK/params:/bench/params" \
  --add "$BENCH/ktrace.sh:/bench/ktrace.sh" --add "$BENCH/census.awk:/bench/census.awk" "${FC_ADD[@]}" \
  > "$LOG" 2> "$WORK/lab.stderr" < /dev/null &
LAB_PID=$!
# Progress: the benchmark's own lines, as they come.
tail -n +1 --pid="$LAB_PID" -F "$LOG" 2>/dev/null | sed -u 's/\r$//' |
  grep --line-buffered -E '^(BENCH-(INFO|BOOT|WARN|DONE|ERROR)|LAB-(BOOTED|KVM|VERDICT))' >&2 &
TAIL_PID=$!
wait "$LAB_PID"; LAB_RC=$?
wait "$TAIL_PID" 2>/dev/null
set -e
if [ "$LAB_RC" != 0 ]; then
  echo "boot.sh: the lab session failed (lab.sh exit $LAB_RC): see $LOG and $WORK/lab.stderr" >&2
  tail -n 5 "$WORK/lab.stderr" >&2
fi

# Raw lines -> samples (workload, metric, unit, vmm, run, value).
python3 - "$LOG" "$OUT/boot-samples.tsv" > "$WORK/cmdlines.txt" <<'EOF'
import sys
log, out = sys.argv[1], sys.argv[2]
names = {"vmlinux": "vmlinux (PVH)", "bzimage": "bzImage"}
rows, cmdlines, thp, align = [], {}, {}, {}
for raw in open(log, encoding="utf-8", errors="replace"):
    line = raw.strip().replace("\r", "")
    if line.startswith("BENCH-CMDLINE "):
        _, vmm, wl, cmd = line.split(" ", 3)
        # Firecracker adds pci=off itself, after the one it was given: compare without repeats;
        # and its guest ends with a reset (fv.end=reboot, bench/vmms.sh), the others power off.
        cmd = " ".join(t for t in dict.fromkeys(cmd.split()) if t != "fv.end=reboot")
        cmdlines.setdefault(wl.split("=", 1)[1], {}).setdefault(vmm.split("=", 1)[1], set()).add(cmd)
        continue
    if not line.startswith("BENCH-BOOT "):
        continue
    f = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    def num(k):
        try:
            return float(f[k])
        except (KeyError, ValueError):
            return None
    ok = f.get("rc") == "0"
    t0, tm, te = num("t0"), num("t_marker"), num("t_exit")
    hwm, guest = num("hwm_kb"), num("guest_rss_kb")
    boot = tm - t0 if ok and t0 is not None and tm is not None else None
    exit_ = te - t0 if ok and t0 is not None and te is not None else None
    own = (hwm - guest) / 1024 if ok and hwm is not None and guest is not None else None
    wl = names.get(f.get("workload"), f.get("workload"))
    if ok and guest and num("guest_thp_kb") is not None:
        thp.setdefault((wl, f["vmm"]), []).append(100 * num("guest_thp_kb") / guest)
    if ok and num("guest_align_kb") is not None:
        align.setdefault(f["vmm"], []).append(int(num("guest_align_kb")))
    for metric, unit, v, nd in (("boot to /init", "s", boot, 3),
                                ("VMM memory (peak RSS - guest RAM)", "MiB", own, 2),
                                ("exec to exit (incl. hold)", "s", exit_, 3)):
        rows.append((wl, metric, unit, f["vmm"], f["run"], "NA" if v is None else f"{v:.{nd}f}"))
# Metrics first, then workloads: the table reads by metric.
order = {m: i for i, m in enumerate(["boot to /init", "VMM memory (peak RSS - guest RAM)",
                                     "exec to exit (incl. hold)"])}
rows.sort(key=lambda r: (order[r[1]], list(names.values()).index(r[0]) if r[0] in names.values() else 9))
with open(out, "w", encoding="utf-8") as o:
    o.write("workload\tmetric\tunit\tvmm\trun\tvalue\n")
    for r in rows:
        o.write("\t".join(r) + "\n")
bad = False
for wl, per in sorted(cmdlines.items()):
    seen = set().union(*per.values())
    if len(seen) != 1 or len(per) < 2:
        bad = True
        print(f"boot.sh: WARNING: guest command lines for {wl} differ between VMMs:", file=sys.stderr)
        for vmm, s in sorted(per.items()):
            for c in sorted(s):
                print(f"  {vmm}: {c}", file=sys.stderr)
    else:
        print(f"guest /proc/cmdline ({names.get(wl, wl)}, every VMM): {seen.pop()}")
# How much of the guest's RAM the host backs with transparent huge pages:
# a guest whose memory is not 2 MiB-aligned in the VMM cannot get 2 MiB
# nested-paging mappings, and every TLB miss costs more.
for (wl, vmm), v in sorted(thp.items()):
    v.sort()
    print(f"guest RAM in host huge pages (AnonHugePages/Rss), {wl}, {vmm}: median {v[len(v) // 2]:.0f}%")
for vmm, v in sorted(align.items()):
    small = sum(1 for a in v if a < 2048)
    print(f"guest RAM mapping alignment, {vmm}: {small} of {len(v)} boots below 2 MiB "
          f"(KiB: {' '.join(str(a) for a in v)})")
if not rows:
    sys.exit("boot.sh: no BENCH-BOOT lines in the lab log")
EOF

{
  echo
  python3 "$BENCH/plot.py" "$OUT/boot-samples.tsv" \
    --title "Boot to /init and VMM memory, nested KVM in the lab ($RUNS runs, 2 vCPUs, 512 MiB)" \
    --svg "$OUT/boot.svg"
  echo
  echo "ratio = QEMU median / Ferrovisor median (> 1: Ferrovisor faster or leaner)"
  if [[ " $VMMS " == *" firecracker "* ]]; then
    echo
    python3 "$BENCH/plot.py" "$OUT/boot-samples.tsv" --vmms ferrovisor=Ferrovisor:FV,firecracker=Firecracker:FC \
      --title "Boot to /init and VMM memory, Ferrovisor vs Firecracker ($RUNS runs, 2 vCPUs, 512 MiB)" \
      --svg "$OUT/boot-fc.svg"
    echo
    echo "ratio = Firecracker median / Ferrovisor median (> 1: Ferrovisor faster or leaner)"
  fi
  cat "$WORK/cmdlines.txt"
  grep -a '^BENCH-CMD ' "$LOG" | tr -d '\r' | sed 's/^BENCH-CMD /command: /'
  grep -a '^BENCH-INFO ' "$LOG" | tr -d '\r' | sed 's/^BENCH-INFO /info: /'
} | tee "$OUT/boot.txt"
if [ "$CENSUS" = 1 ]; then
  python3 "$BENCH/census-table.py" "$LOG" | tee "$OUT/boot-census.txt"
fi
echo "boot.sh: wrote $OUT/boot.txt, $OUT/boot.svg, $OUT/boot-samples.tsv, $LOG" >&2
exit "$LAB_RC"
