#!/usr/bin/env bash
# Concurrent-boot reliability, Ferrovisor vs QEMU microvm (split and in-kernel
# irqchip), on the lab's nested KVM, over several lab sessions. The same
# kernel, initramfs, command line, vCPUs, memory and concurrency for every arm;
# serial output to a file on every side. See bench/README.md.
#
#   bench/ab.sh [--sessions N] [--rounds R] [--conc C] [--arms "ferrovisor qemu qemu-kirq"]
#               [--cpus N] [--mem SIZE] [--kernel vmlinux|bzimage] [--cmdline ARGS]
#               [--guest-timeout S] [--no-trace] [--ferrovisor PATH] [--out DIR]
#               [--lab-mem MiB] [--lab-smp N] [--lab-append ARGS]
#
#   --sessions N       lab sessions, one after the other (default 4)
#   --rounds R         rounds per session; a round boots C guests at once per arm (default 3)
#   --conc C           guests at once (default 10)
#   --arms LIST        ferrovisor (its own IOAPIC: split irqchip), ferrovisor-kirq (--irqchip kernel),
#                      qemu (microvm, split irqchip), qemu-kirq (kernel-irqchip=on)
#   --cpus/--mem       each guest's vCPUs and memory (default 1, 128M)
#   --kernel K         vmlinux (PVH entry, default) or bzimage
#   --cmdline ARGS     after console=ttyS0 (default "quiet fv.action=info")
#   --guest-timeout S  a guest still running after S s is a hang (default 300)
#   --no-trace         no KVM tracepoints (default: every guest has its own trace instance)
#   --out DIR          results (default target/bench/ab)
#   --lab-mem/--lab-smp/--lab-append  the lab machine's size and extra kernel arguments
#                      (e.g. transparent_hugepage=never)
#
# Every lab session's console goes to DIR/session-N.log; every failed guest's
# console tail and KVM trace are in it (AB-FAIL, AB-TRACE lines) and are
# collected in DIR/failures.txt. A session whose lab dies (its kernel panics,
# or it times out) does not count the guests of the round it was in against
# any arm: they are listed as `lab` with the lab's last words. The table
# (DIR/ab.txt) gives each arm's boots, successes, failures by kind and rate,
# and the two-sided Fisher exact p of Ferrovisor against each QEMU arm.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"
usage() { sed -n '2,34s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

SESSIONS=4 ROUNDS=3 CONC=10 ARMS="ferrovisor qemu qemu-kirq" CPUS=1 MEM=128M
KERNEL_KIND=vmlinux CMDLINE="quiet fv.action=info" GUEST_TIMEOUT=300 TRACE=1
FV="$REPO/target/release/ferrovisor" OUT="$REPO/target/bench/ab" LAB_MEM=3072 LAB_SMP=2 LAB_APPEND=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sessions)      SESSIONS="$2"; shift 2 ;;
    --rounds)        ROUNDS="$2"; shift 2 ;;
    --conc)          CONC="$2"; shift 2 ;;
    --arms)          ARMS="$2"; shift 2 ;;
    --cpus)          CPUS="$2"; shift 2 ;;
    --mem)           MEM="$2"; shift 2 ;;
    --kernel)        KERNEL_KIND="$2"; shift 2 ;;
    --cmdline)       CMDLINE="$2"; shift 2 ;;
    --guest-timeout) GUEST_TIMEOUT="$2"; shift 2 ;;
    --no-trace)      TRACE=0; shift ;;
    --ferrovisor)    FV="$2"; shift 2 ;;
    --out)           OUT="$2"; shift 2 ;;
    --lab-mem)       LAB_MEM="$2"; shift 2 ;;
    --lab-smp)       LAB_SMP="$2"; shift 2 ;;
    --lab-append)    LAB_APPEND="$2"; shift 2 ;;
    -h|--help)       usage 0 ;;
    *) echo "ab.sh: unknown argument: $1" >&2; usage ;;
  esac
done
for n in SESSIONS ROUNDS CONC CPUS GUEST_TIMEOUT LAB_MEM LAB_SMP; do
  [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || { echo "ab.sh: --${n,,} must be a positive integer (got '${!n}')" >&2; exit 2; }
done
[[ "$MEM" =~ ^[1-9][0-9]*[MG]$ ]] || { echo "ab.sh: --mem must look like 128M or 1G (got '$MEM')" >&2; exit 2; }
case "$KERNEL_KIND" in vmlinux|bzimage) ;; *) echo "ab.sh: --kernel must be vmlinux or bzimage" >&2; exit 2 ;; esac
for a in $ARMS; do
  case "$a" in ferrovisor|ferrovisor-kirq|qemu|qemu-kirq) ;; *) echo "ab.sh: unknown arm $a (ferrovisor, ferrovisor-kirq, qemu, qemu-kirq)" >&2; exit 2 ;; esac
done
[ -x "$FV" ] || { echo "ab.sh: $FV: no such executable; build it first (cargo build --release)" >&2; exit 1; }

NARMS=$(wc -w <<<"$ARMS")
# Per round and arm: the slowest guest (up to the timeout), plus lab boot and slack.
LAB_TIMEOUT=$((60 + ROUNDS * NARMS * (GUEST_TIMEOUT + 30)))

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SAMPLES="$OUT/ab-samples.tsv"
printf 'session\tround\tarm\ti\tresult\tsecs\n' > "$SAMPLES"
: > "$OUT/failures.txt"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

for s in $(seq 1 "$SESSIONS"); do
  mkdir -p "$WORK/bench"
  cp "$BENCH/vmms.sh" "$BENCH/ktrace.sh" "$WORK/bench/"
  cat > "$WORK/bench/params" <<EOF
SESSION=$s
ROUNDS=$ROUNDS
CONC=$CONC
ARMS="$ARMS"
BENCH_CPUS=$CPUS
BENCH_MEM=$MEM
KERNEL_KIND=$KERNEL_KIND
CMDLINE="$CMDLINE"
GUEST_TIMEOUT=$GUEST_TIMEOUT
TRACE=$TRACE
EOF
  log="$OUT/session-$s.log"
  echo "ab.sh: session $s of $SESSIONS ($ROUNDS rounds x $CONC guests x arms: $ARMS; lab limit ${LAB_TIMEOUT}s)" >&2
  rc=0
  "$REPO/tests/lab/lab.sh" --with-qemu --scenario "$BENCH/ab-lab.sh" --ferrovisor "$FV" \
    --add "$WORK/bench/vmms.sh:/bench/vmms.sh" --add "$WORK/bench/ktrace.sh:/bench/ktrace.sh" --add "$WORK/bench/params:/bench/params" --timeout "$LAB_TIMEOUT" --mem "$LAB_MEM" --smp "$LAB_SMP" \
    ${LAB_APPEND:+--append "$LAB_APPEND"} \
    > "$log" 2>&1 || rc=$?
  tr -d '\r' < "$log" | awk -v OFS='\t' '
    /^AB-BOOT / {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      print v["session"], v["round"], v["arm"], v["i"], v["result"], v["secs"]
    }' >> "$SAMPLES"
  tr -d '\r' < "$log" | grep -E '^AB-(FAIL|TRACE|DMESG|WARN)' | sed "s/^/session=$s /" >> "$OUT/failures.txt" || true
  verdict=$(tr -d '\r' < "$log" | grep -a '^LAB-VERDICT' | tail -n 1 || true)
  if [ "$rc" != 0 ]; then
    # The lab died or timed out: the round in flight is the lab's, not an arm's.
    done_rounds=$(tr -d '\r' < "$log" | grep -c '^AB-ROUND ' || true)
    last_words=$(tr -d '\r' < "$log" | grep -av '^AB-' | grep -aE 'Kernel panic|BUG:|stack guard|Attempted to kill|soft lockup|LAB-VERDICT' | head -n 3 | tr '\t' ' ' | paste -sd '|' -)
    r=$((done_rounds + 1))
    if [ "$r" -le "$ROUNDS" ]; then
      for a in $ARMS; do
        for i in $(seq 1 "$CONC"); do
          if ! awk -F'\t' -v s="$s" -v r="$r" -v a="$a" -v i="$i" \
              '$1 == s && $2 == r && $3 == a && $4 == i { f = 1 } END { exit !f }' "$SAMPLES"; then
            printf '%s\t%s\t%s\t%s\tlab\tNA\n' "$s" "$r" "$a" "$i" >> "$SAMPLES"
          fi
        done
      done
    fi
    echo "ab.sh: session $s: lab ended early (${verdict:-no verdict}; guests of round $r it cut short are counted for no arm): ${last_words:-see $log}" >&2
    echo "session=$s LAB-DIED round=$r ${verdict} ${last_words}" >> "$OUT/failures.txt"
  fi
done

python3 "$BENCH/ab-stats.py" "$SAMPLES" | tee "$OUT/ab.txt"
echo "ab.sh: samples $SAMPLES, failures $OUT/failures.txt, consoles $OUT/session-*.log" >&2
