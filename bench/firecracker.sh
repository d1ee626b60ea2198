#!/usr/bin/env bash
# Builds Firecracker and its jailer from source for the side-by-side benchmarks
# (bench/boot.sh, bench/startup.sh, bench/jail.sh); nothing of it is committed. The binaries go
# to the cache, where the benchmarks find them.
#
#   bench/firecracker.sh [--jailer-only] FIRECRACKER_GIT MICRO_HTTP_GIT [OUT_DIR]
#
#   --jailer-only    build only the jailer (Firecracker itself is already in OUT_DIR)
#   FIRECRACKER_GIT  a clone (bare or not) of github.com/firecracker-microvm/firecracker
#   MICRO_HTTP_GIT   a clone of github.com/firecracker-microvm/micro-http: Firecracker takes
#                    it as a git dependency, which cargo cannot fetch without network, so it is
#                    patched in from here at the revision Firecracker's Cargo.lock names
#   OUT_DIR          default ${FERROVISOR_CACHE:-~/.cache/ferrovisor}/peers
#
# Builds HEAD with the installed stable toolchain (`cargo build --release -p firecracker -p jailer`;
# the repository pins a newer one), in a scratch directory under /var/tmp that is removed
# afterwards. Needs libclang-dev and libseccomp-dev (installed if missing). With the glibc
# target Firecracker has no default seccomp filter (it warns so while building); its
# benchmark numbers are therefore without seccomp, which only favours it.
set -euo pipefail
BINS="firecracker jailer"
if [ "${1:-}" = --jailer-only ]; then BINS=jailer; shift; fi
FC_GIT=${1:?usage: bench/firecracker.sh FIRECRACKER_GIT MICRO_HTTP_GIT [OUT_DIR]}
MH_GIT=${2:?usage: bench/firecracker.sh FIRECRACKER_GIT MICRO_HTTP_GIT [OUT_DIR]}
OUT=${3:-${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor}/peers}
for g in "$FC_GIT" "$MH_GIT"; do
  git -C "$g" rev-parse --verify -q HEAD >/dev/null || { echo "firecracker.sh: $g: not a git repository" >&2; exit 1; }
done
dpkg -s libclang-dev libseccomp-dev >/dev/null 2>&1 ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libclang-dev libseccomp-dev >/dev/null
SRC=$(mktemp -d /var/tmp/firecracker-build.XXXXXX)
trap 'rm -rf "$SRC"' EXIT
mkdir -p "$SRC/fc" "$SRC/micro-http"
# File by file: a partial clone may lack some large test blobs, where `git archive` would stop.
git -C "$FC_GIT" ls-tree -r HEAD | while read -r mode type obj path; do
  [ "$type" = blob ] || continue
  mkdir -p "$SRC/fc/$(dirname "$path")"
  if git -C "$FC_GIT" cat-file blob "$obj" > "$SRC/fc/$path" 2>/dev/null; then
    [ "$mode" != 100755 ] || chmod +x "$SRC/fc/$path"
  else
    rm -f "$SRC/fc/$path"
  fi
done
rev=$(grep -A3 '^name = "micro_http"' "$SRC/fc/Cargo.lock" | grep -o '#[0-9a-f]\{40\}' | tr -d '#' | head -n1 || true)
git -C "$MH_GIT" archive "${rev:-HEAD}" | tar -x -C "$SRC/micro-http"
printf '\n[patch."https://github.com/firecracker-microvm/micro-http"]\nmicro_http = { path = "%s" }\n' \
  "$SRC/micro-http" >> "$SRC/fc/Cargo.toml"
pkgs=(); for b in $BINS; do pkgs+=(-p "$b" --bin "$b"); done
(cd "$SRC/fc" && RUSTUP_TOOLCHAIN=stable cargo build --release "${pkgs[@]}")
mkdir -p "$OUT"
for b in $BINS; do
  install -m 0755 "$(find "$SRC/fc" -path "*/release/$b" -type f | head -n1)" "$OUT/$b"
  echo "firecracker.sh: $b $("$OUT/$b" --version 2>&1 | head -n1) (source $(git -C "$FC_GIT" rev-parse --short HEAD)) -> $OUT/$b"
done
