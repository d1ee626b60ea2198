#!/usr/bin/env bash
# Checks the confinement policies with the distributions' own tools, without loading anything
# into the kernel (no AppArmor or SELinux needs to be enabled here):
#
#   1. packaging/apparmor/ferrovisor                 apparmor_parser -Q -K
#   2. a per-VM AppArmor profile, as the daemon      apparmor_parser -Q -K
#      generates it (crates/jail/src/apparmor.rs)
#   3. packaging/selinux/ferrovisor.{te,fc}          checkmodule -M -m, semodule_package
#   4. that module linked into Debian's whole        secilc, on selinux-policy-default's
#      reference policy (its requires resolve, no    modules converted to CIL
#      neverallow is broken)
#
#   scripts/check-policies.sh            everything
#   FV_POLICY_OUT=DIR scripts/...        per-VM profiles already written to DIR by
#                                        `FV_POLICY_OUT=DIR cargo test -p jail --lib apparmor`
#                                        (else this script runs that test itself)
#   FV_POLICY_NO_REFPOLICY=1 scripts/... skip step 4 (it downloads three Debian packages with
#                                        `apt-get download`, unpacked in a cache, never installed)
#
# Tools: apt-get install apparmor checkpolicy semodule-utils. A missing tool skips its step
# with the reason, except under CI=true, where it fails. Ends with one verdict line,
# "policies: N passed, N failed, N skipped"; exits non-zero when a check failed.
set -eu
cd "$(dirname "$0")/.."

passed=0
failed=0
skipped=0
pass() { passed=$((passed + 1)); echo "PASS $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1" >&2; }
skip() {
  if [ -n "${CI:-}" ]; then
    failed=$((failed + 1))
    echo "FAIL $1 (CI must have it)" >&2
  else
    skipped=$((skipped + 1))
    echo "SKIPPED $1"
  fi
}
# A step that may not be possible here (no network to the package registry): never fails CI.
skip_soft() { skipped=$((skipped + 1)); echo "SKIPPED $1"; }

tool() {
  # The tool's path: PATH, then the sbin directories a non-root PATH may lack.
  command -v "$1" 2>/dev/null || { for d in /usr/sbin /sbin; do
    [ -x "$d/$1" ] && { echo "$d/$1"; return 0; }
  done; return 1; }
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fv-policies.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- AppArmor ------------------------------------------------------------------------------
if parser=$(tool apparmor_parser); then
  # -Q: compile, do not load; -K: no cache. The kernel's lack of AppArmor only makes it say
  # "Cache read/write disabled", which is filtered out.
  aa_check() {
    if "$parser" -Q -K "$1" >"$tmp/aa.out" 2>&1; then
      pass "apparmor_parser -Q -K $2"
    else
      grep -v '^Cache read/write disabled' "$tmp/aa.out" >&2 || true
      fail "apparmor_parser -Q -K $2"
    fi
  }
  aa_check packaging/apparmor/ferrovisor packaging/apparmor/ferrovisor

  out="${FV_POLICY_OUT:-}"
  if [ -z "$out" ] || ! ls "$out"/ferrovisor-* >/dev/null 2>&1; then
    out="$tmp/generated"
    mkdir -p "$out"
    echo "generating a sample per-VM profile (cargo test -p jail --lib apparmor) ..."
    if ! FV_POLICY_OUT="$out" cargo test -q --release -p jail --lib \
      apparmor::tests::profiles_compile_with_apparmor_parser >"$tmp/cargo.out" 2>&1; then
      tail -n 30 "$tmp/cargo.out" >&2
      fail "generating a per-VM profile (cargo test -p jail --lib apparmor)"
    fi
  fi
  n=0
  for p in "$out"/ferrovisor-*; do
    [ -f "$p" ] || continue
    n=$((n + 1))
    aa_check "$p" "per-VM profile $(basename "$p")"
  done
  [ "$n" -gt 0 ] || fail "no per-VM profile was generated into $out"
else
  skip "AppArmor profiles: apparmor_parser is not installed (apt-get install apparmor)"
fi

# --- SELinux -------------------------------------------------------------------------------
if checkmodule=$(tool checkmodule) && semodule_package=$(tool semodule_package); then
  if "$checkmodule" -M -m -o "$tmp/ferrovisor.mod" packaging/selinux/ferrovisor.te >"$tmp/cm.out" 2>&1 &&
    "$semodule_package" -o "$tmp/ferrovisor.pp" -m "$tmp/ferrovisor.mod" \
      -f packaging/selinux/ferrovisor.fc >>"$tmp/cm.out" 2>&1; then
    pass "checkmodule -M -m + semodule_package packaging/selinux/ferrovisor.{te,fc}"
  else
    cat "$tmp/cm.out" >&2
    fail "checkmodule -M -m + semodule_package packaging/selinux/ferrovisor.{te,fc}"
  fi
else
  skip "SELinux module: checkmodule or semodule_package is not installed (apt-get install checkpolicy semodule-utils)"
fi

# --- SELinux, linked into Debian's reference policy -----------------------------------------
refpolicy() {
  local cache="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/ferrovisor}/selinux-refpolicy"
  mkdir -p "$cache"
  if ! ls "$cache"/debs/selinux-policy-default_*.deb "$cache"/debs/secilc_*.deb \
    "$cache"/debs/policycoreutils_*.deb >/dev/null 2>&1; then
    mkdir -p "$cache/debs"
    (cd "$cache/debs" && apt-get download -q selinux-policy-default secilc policycoreutils) \
      >"$tmp/dl.out" 2>&1 || { cat "$tmp/dl.out"; return 2; }
  fi
  local stamp
  stamp=$(cd "$cache/debs" && ls selinux-policy-default_*.deb secilc_*.deb policycoreutils_*.deb)
  if [ "$(cat "$cache/stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$cache/root" "$cache/cil"
    for d in "$cache"/debs/*.deb; do dpkg-deb -x "$d" "$cache/root"; done
    mkdir -p "$cache/cil"
    for m in "$cache"/root/usr/share/selinux/default/*.pp.bz2; do
      bzip2 -dc "$m" | "$cache/root/usr/libexec/selinux/hll/pp" >"$cache/cil/$(basename "$m" .pp.bz2).cil"
    done
    echo "$stamp" >"$cache/stamp"
  fi
  "$cache/root/usr/libexec/selinux/hll/pp" "$tmp/ferrovisor.pp" "$tmp/ferrovisor.cil" &&
    "$cache/root/usr/bin/secilc" -o "$tmp/policy.bin" -f "$tmp/file_contexts" \
      "$cache"/cil/*.cil "$tmp/ferrovisor.cil" &&
    grep -q ferrovisor_exec_t "$tmp/file_contexts"
}
if [ -n "${FV_POLICY_NO_REFPOLICY:-}" ]; then
  skip_soft "SELinux module in Debian's reference policy: FV_POLICY_NO_REFPOLICY is set"
elif [ ! -f "$tmp/ferrovisor.pp" ]; then
  skip_soft "SELinux module in Debian's reference policy: no module was built"
elif ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  skip_soft "SELinux module in Debian's reference policy: needs apt-get and dpkg-deb"
else
  rc=0
  refpolicy >"$tmp/ref.out" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    pass "secilc: the module linked into Debian's reference policy (selinux-policy-default)"
  elif [ "$rc" = 2 ]; then
    skip_soft "SELinux module in Debian's reference policy: apt-get download failed: $(tail -n 1 "$tmp/ref.out")"
  else
    head -n 40 "$tmp/ref.out" >&2
    fail "secilc: the module linked into Debian's reference policy (selinux-policy-default)"
  fi
fi

echo "policies: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
