#!/usr/bin/env bash
# Fuzzes the guest-facing parsers (virtio-mmio transport, each device's request handling) with
# cargo-fuzz / libFuzzer.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 20 s, every target)
#
# CI runs it briefly; run it longer by hand (e.g. scripts/fuzz.sh 3600 virtio_blk). Corpora
# live in fuzz/corpus/<target> (not committed), crashes in fuzz/artifacts/<target>. Prints one
# "FUZZ <target> runs=N secs=S" line per target; fails on any crash.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS="${1:-20}"
shift || true
cd "$ROOT/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --version 0.13.2 >&2
fi
# cargo-fuzz needs nightly flags (-Zsanitizer); use the nightly toolchain when there is one,
# else let the stable compiler accept them.
TOOLCHAIN=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  TOOLCHAIN=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

mapfile -t ALL < <(cargo "${TOOLCHAIN[@]}" fuzz list)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")
cargo "${TOOLCHAIN[@]}" fuzz build -O >&2
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  log="$(mktemp)"
  if ! cargo "${TOOLCHAIN[@]}" fuzz run -O "$t" "corpus/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "FUZZ $t FAILED (artifacts in fuzz/artifacts/$t)" >&2
    exit 1
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  echo "FUZZ $t runs=${runs:-?} secs=$SECS"
  rm -f "$log"
done
