#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, tiny guests on this machine's KVM,
# bad input, and the lab scenarios (stock Debian guests on a real hardware-virtualization KVM
# inside QEMU-TCG). Installs what the tests need first.
#
#   scripts/test.sh                 everything (and both fuzzers, briefly)
#   scripts/test.sh -- FILTER       pass FILTER (and more cargo test args) through (no fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."
# One cache for the scripts and the tests, even where HOME is unset (some CI runners).
export FERROVISOR_CACHE="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/ferrovisor}"

scripts/install-deps.sh
guest/assets.sh >/dev/null

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# No circle of imports between the modules of any crate (the crates' own arrows Cargo checks).
python3 scripts/module-graph.py crates/*/src >/dev/null || python3 scripts/module-graph.py crates/*/src
# One build (release) serves the tests, the lab (smaller binary, faster to boot under TCG) and
# the README's main command.
cargo test --workspace --release "$@" -- --nocapture
# The guest-facing parsers under libFuzzer, briefly (longer by hand: scripts/fuzz.sh 3600).
# The daemon's HTTP API under schemathesis, from its OpenAPI document (the release binary the
# tests built; longer by hand: scripts/api-fuzz.sh --examples 1000 --seed random).
if [ $# -eq 0 ]; then
  # The AppArmor profiles (shipped and per-VM) and the SELinux module, through the
  # distributions' own tools.
  scripts/check-policies.sh
  (cd fuzz && cargo fmt -- --check)
  scripts/fuzz.sh "${FUZZ_SECS:-15}"
  FERROVISOR_BIN="${CARGO_TARGET_DIR:-target}/release/ferrovisor" scripts/api-fuzz.sh
fi
