#!/usr/bin/env bash
# The virtio-blk model driven in-process (no KVM, no lab) against a temporary
# raw image, vs the same preads/pwrites done directly on the file. See
# bench/README.md and crates/devices/examples/blk_bench.rs.
#
#   bench/blk-micro.sh [--runs N] [--out DIR] [--no-build] [BLK_BENCH ARGS...]
#
#   --runs N     runs per workload and path, alternating model and host (default 5)
#   --out DIR    where the table, plot and samples go (default target/bench)
#   --no-build   use target/release/examples/blk_bench as it is
#   other args   passed to blk_bench: --size-mib M (256), --rand-requests N
#                (65536), --seq-mib M (1024), --batch N (128), --dir DIR (the
#                image's directory, default $TMPDIR or /tmp),
#                --paths processor,sync,uring
#
# Writes DIR/blk-micro.txt (the table), DIR/blk-micro.svg (the plot) and
# DIR/blk-micro-samples.tsv.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { sed -n '2,17s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

RUNS=5 OUT="$REPO/target/bench" BUILD=1 PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs)     RUNS="$2"; shift 2 ;;
    --out)      OUT="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help)  usage 0 ;;
    --size-mib|--rand-requests|--seq-mib|--batch|--dir|--paths)
                PASS+=("$1" "$2"); shift 2 ;;
    *) echo "blk-micro.sh: unknown argument: $1" >&2; usage ;;
  esac
done
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "blk-micro.sh: --runs must be a positive integer" >&2; exit 2; }

BIN="$REPO/target/release/examples/blk_bench"
if [ "$BUILD" = 1 ]; then
  (cd "$REPO" && nice cargo build -q -p devices --release --example blk_bench)
fi
[ -x "$BIN" ] || { echo "blk-micro.sh: $BIN: not built" >&2; exit 1; }

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SAMPLES="$OUT/blk-micro-samples.tsv"
"$BIN" --runs "$RUNS" --tsv "$SAMPLES" "${PASS[@]}" 2> "$OUT/blk-micro.log" ||
  { cat "$OUT/blk-micro.log" >&2; exit 1; }

DIR=${TMPDIR:-/tmp}
for ((i = 0; i < ${#PASS[@]}; i += 2)); do [ "${PASS[i]}" != --dir ] || DIR=${PASS[i+1]}; done
{
  echo
  python3 "$BENCH/plot.py" "$SAMPLES" \
    --title "virtio-blk model in-process vs the host file ($RUNS runs)" \
    --vmms "model=Ferrovisor block model:model,host=host pread/pwrite:host" \
    --svg "$OUT/blk-micro.svg"
  echo
  echo "ratio = model median / host median (1 = the model costs nothing over the bare syscalls)"
  grep '^blk_bench: image' "$OUT/blk-micro.log" | sed 's/^blk_bench: /setup: /'
  grep '^blk_bench: .*skipped' "$OUT/blk-micro.log" | sed 's/^blk_bench: /note: /' || true
  echo "image file system: $(stat -f -c %T "$DIR"); host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $(uname -r)"
} | tee "$OUT/blk-micro.txt"
echo "blk-micro.sh: wrote $OUT/blk-micro.txt, $OUT/blk-micro.svg, $SAMPLES" >&2
