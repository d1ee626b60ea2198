#!/usr/bin/env bash
# Boots the default guest: Debian's stock kernel with a busybox initramfs, 2 vCPUs, 512 MiB.
#
# On a host whose /dev/kvm runs stock kernels (VT-x/AMD-V), the guest runs right here with its
# console on this terminal (a shell; `poweroff -f` or Ctrl-A x to leave). On a host whose KVM
# cannot (PVM: kvm_pvm), it says so and boots the same guest inside the lab instead: a real
# hardware-virtualization KVM inside QEMU-TCG (see tests/lab/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# One cache for the scripts and the tests, even where HOME is unset (some CI runners).
export FERROVISOR_CACHE="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/ferrovisor}"

scripts/install-deps.sh
cargo build --release --quiet
FV=target/release/ferrovisor
A="$(guest/assets.sh)"

if "$FV" host --json | grep -q '"runs_stock_kernels": true'; then
  exec "$FV" run --kernel "$A/vmlinuz" --initrd "$A/initramfs.cpio.gz" --cpus 2 --memory 512M
fi

"$FV" host | sed 's/^/  /'
echo
echo "This host's /dev/kvm cannot boot a stock kernel, so the default guest boots inside the lab"
echo "(QEMU-TCG emulating AMD-V, whose Linux offers a real /dev/kvm). This takes about a minute."
echo
scenario="$(mktemp)"
trap 'rm -f "$scenario"' EXIT
cat > "$scenario" <<'SCEN'
echo "lab: booting the default guest with ferrovisor (2 vCPUs, 512 MiB)"
ferrovisor run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cpus 2 --memory 512M \
  --cmdline "fv.action=info" </dev/null
echo "lab: ferrovisor exited with status $?"
SCEN
exec tests/lab/lab.sh --ferrovisor "$FV" --scenario "$scenario"
