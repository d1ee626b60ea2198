#!/usr/bin/env bash
# Installs the Debian packages Ferrovisor's build, tests and lab need (idempotent: installs only
# what is missing). The guest kernel and busybox are NOT installed: guest/assets.sh downloads and
# unpacks them into the cache.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
have cpio || need+=(cpio)
have xz || need+=(xz-utils)
have zstd || need+=(zstd)
have setpriv || need+=(util-linux)
have flock || need+=(util-linux)
have strip || need+=(binutils)
have timeout || need+=(coreutils)
have socat || need+=(socat)        # vsock tests: the host and guest ends
have debugfs || need+=(e2fsprogs)  # block tests: files read back from a guest's ext2 image
have ip || need+=(iproute2)        # net tests
have promtool || need+=(prometheus) # daemon tests: /metrics checked with `promtool check metrics`
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)  # schemathesis (scripts/api-fuzz.sh)
have curl || need+=(curl)
# The AppArmor profile and the SELinux module, checked with the distribution's own tools
# (scripts/check-policies.sh).
have apparmor_parser || [ -x /usr/sbin/apparmor_parser ] || [ -x /sbin/apparmor_parser ] || need+=(apparmor)
have checkmodule || need+=(checkpolicy)
have semodule_package || need+=(semodule-utils)
[ -e /usr/share/qemu/bios-microvm.bin ] || need+=(qemu-system-data)
[ -e /usr/share/seabios/bios-256k.bin ] || need+=(seabios)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "install-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >&2 ||
  { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >&2; }
