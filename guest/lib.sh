# shellcheck shell=bash
# Shared helpers for guest/assets.sh and tests/lab/lab.sh (sourced, not run).
# Expects `set -euo pipefail` in the caller and LOG_TAG set for messages.

CACHE="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor}"

log() { echo "${LOG_TAG:-ferrovisor}: $*" >&2; }
die() { echo "${LOG_TAG:-ferrovisor}: error: $*" >&2; exit 1; }

# Scratch dirs are removed however the script exits.
# scratch VAR [PARENT]: make a scratch dir (in PARENT, default $TMPDIR) and
# store its path in VAR. A PARENT on the cache's filesystem lets results be
# mv'd into place atomically.
_SCRATCH=()
_cleanup() { [ ${#_SCRATCH[@]} = 0 ] || rm -rf "${_SCRATCH[@]}"; }
trap _cleanup EXIT
trap "exit 130" INT
trap "exit 143" TERM
scratch() {
  local d
  d="$(mktemp -d "${2:-${TMPDIR:-/tmp}}/.ferrovisor-tmp.XXXXXX")"
  _SCRATCH+=("$d")
  printf -v "$1" %s "$d"
}

# ------------------------------------------------------------------ modules
# mod_path MODDIR NAME: modules.dep path of module NAME ('-' and '_' are the
# same in module names), empty if absent.
mod_path() {
  local re="${2//[-_]/[-_]}"
  sed -n "s#^\(\(.*/\)\?${re}\.ko\(\.xz\|\.zst\|\.gz\)\?\):.*#\1#p" "$1/modules.dep" | head -n1
}
mod_builtin() {
  local re="${2//[-_]/[-_]}"
  grep -qE "(^|/)${re}\.ko$" "$1/modules.builtin"
}
# mod_order MODDIR NAME...: each module's path with its dependencies first
# (a depth-first walk of modules.dep, so the order is right whatever order
# depmod wrote), each once. Built-in / missing modules are reported, skipped.
mod_order() {
  local dir="$1"; shift
  local -A seen=()
  _visit() {
    local p="$1" d
    [ -n "${seen[$p]:-}" ] && return
    seen[$p]=1
    for d in $(sed -n "s#^${p}:##p" "$dir/modules.dep"); do _visit "$d"; done
    echo "$p"
  }
  local m p
  for m in "$@"; do
    p="$(mod_path "$dir" "$m")"
    if [ -n "$p" ]; then _visit "$p"
    elif mod_builtin "$dir" "$m"; then log "module $m is built in; skipped"
    else log "module $m not in this kernel; skipped"; fi
  done
}
# Module path as written to an image: without compression suffix.
mod_plain() { local p="${1%.xz}"; p="${p%.zst}"; echo "${p%.gz}"; }
# copy_modules MODDIR DESTDIR PATH...: copy modules to DESTDIR/<plain path>,
# decompressed (busybox insmod cannot be relied on to read .ko.xz/.ko.zst).
copy_modules() {
  local dir="$1" dest="$2"; shift 2
  local p dst
  for p in "$@"; do
    dst="$dest/$(mod_plain "$p")"
    mkdir -p "$(dirname "$dst")"
    case "$p" in
      *.ko.xz)  xz -dc "$dir/$p" > "$dst" ;;
      *.ko.zst) zstd -dcq "$dir/$p" > "$dst" ;;
      *.ko.gz)  gzip -dc "$dir/$p" > "$dst" ;;
      *)        cp "$dir/$p" "$dst" ;;
    esac
  done
}

# --------------------------------------------------------------------- cpio
# mkcpio DIR OUT: newc archive of DIR's contents (owned by root) into OUT,
# zero-padded to a multiple of 4 bytes. The kernel accepts several cpio
# archives concatenated into one initrd, but it only recognises an
# uncompressed archive at a 4-byte aligned offset ("invalid magic at start
# of compressed archive" otherwise). Uses the static busybox from the assets
# so the host needs no cpio package. MKCPIO_GZIP=<level> gzips the archive.
mkcpio() {
  local dir="$1" out="$2"
  ( cd "$dir" && find . -mindepth 1 | LC_ALL=C sort |
    "$CACHE/assets/busybox" cpio -o -H newc -R 0:0 2>/dev/null ) |
    if [ -n "${MKCPIO_GZIP:-}" ]; then gzip "-$MKCPIO_GZIP"; else cat; fi > "$out.tmp"
  truncate -s %4 "$out.tmp"
  mv "$out.tmp" "$out"
}
