#!/usr/bin/env bash
# Build the guest assets Ferrovisor's tests boot, from Debian packages only.
#
#   guest/assets.sh            build (or reuse) everything, print the asset dir
#
# Outputs, in "$CACHE/assets/" (CACHE = $FERROVISOR_CACHE, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor):
#   vmlinuz            -> the Debian bzImage (symlink)
#   vmlinux            -> the ELF kernel extracted from it (PVH-bootable)
#   modules            -> lib/modules/<ver> of the same kernel package
#   kernel-version        file holding <ver>, e.g. 6.1.0-48-amd64
#   initramfs.cpio.gz  -> busybox + /init + the virtio/ext4/pvpanic modules, and
#                         the ACPI power button (button, evdev) with an acpid handler
#   busybox            -> the static busybox binary
#   kernel-<ver>/         the unpacked linux-image package (+ vmlinux, initramfs)
#
# Environment:
#   FERROVISOR_CACHE           cache root (see above)
#   FERROVISOR_KERNEL_VERSION  pin a kernel ABI (e.g. 6.1.0-48-amd64) instead
#                              of following the linux-image-amd64 metapackage
#
# Idempotent: every step is skipped when its output exists (kernel pieces are
# keyed by kernel version, the initramfs by a hash of its inputs), so a warm
# run costs one `apt-cache depends` and a few stats.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
LOG_TAG=assets
# shellcheck source=guest/lib.sh
. "$(dirname "$SELF")/lib.sh"          # CACHE, log, die, scratch, mod_*, mkcpio
ASSETS="$CACHE/assets"

# Modules the guest initramfs loads (their dependencies are added from
# modules.dep). Built-in or absent ones are skipped. crc32c_generic backs the
# "crypto-crc32c" softdep of ext4/jbd2 (metadata checksums). button (the ACPI
# power button, PNP0C0C) and evdev (/dev/input/event*) let busybox acpid see
# the host's `ferrovisor ctl SOCKET shutdown`.
GUEST_MODULES=(pvpanic pvpanic-mmio virtio_mmio virtio_blk virtio_net
  vmw_vsock_virtio_transport virtio-rng virtio_balloon virtio_console
  crc32c_generic ext4 button evdev)

mkdir -p "$ASSETS"
# One builder at a time (parallel test runs share the cache).
exec 9>"$ASSETS/.lock"
flock 9

# ---------------------------------------------------------------- apt helpers
# apt-get download as root warns that the _apt sandbox user cannot write the
# target dir; download as root explicitly instead.
APT_OPTS=()
[ "$(id -u)" = 0 ] && APT_OPTS=(-o APT::Sandbox::User=root)

# apt_download DIR PKG: fetch PKG's .deb into DIR (retrying after an
# `apt-get update` when the package lists are missing or stale); prints path.
apt_download() {
  local dir="$1" pkg="$2"
  ( cd "$dir" && apt-get "${APT_OPTS[@]}" download -q "$pkg" >&2 ) ||
    { log "apt-get download $pkg failed; running apt-get update";
      apt-get update -q >&2;
      ( cd "$dir" && apt-get "${APT_OPTS[@]}" download -q "$pkg" >&2 ); }
  ls "$dir"/"${pkg}"_*.deb | head -n1
}

# extract_pkg PKG DEST: apt-get download + dpkg -x into DEST (atomically:
# DEST appears only once complete). The package is never installed.
extract_pkg() {
  local pkg="$1" dest="$2" tmp
  scratch tmp "$ASSETS"
  log "downloading $pkg"
  local deb; deb="$(apt_download "$tmp" "$pkg")"
  dpkg -x "$deb" "$tmp/root"
  rm -f "$deb"
  rm -rf "$dest"
  mv "$tmp/root" "$dest"
}

# ------------------------------------------------------------ kernel version
kernel_version() {
  if [ -n "${FERROVISOR_KERNEL_VERSION:-}" ]; then
    echo "$FERROVISOR_KERNEL_VERSION"; return
  fi
  # apt-cache takes ~1 s; the answer only changes with the package lists, so
  # reuse the last one while no list is newer than it.
  local stamp="$ASSETS/.metapackage-kernel" dep
  if [ -s "$stamp" ] &&
     [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -newer "$stamp" 2>/dev/null | head -n1)" ]; then
    cat "$stamp"; return
  fi
  # The metapackage's candidate depends on exactly one linux-image-<abi>-amd64.
  dep="$(apt-cache depends linux-image-amd64 2>/dev/null |
         sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -n1)"
  if [ -z "$dep" ]; then
    log "linux-image-amd64 unknown to apt; running apt-get update"
    apt-get update -q >&2
    dep="$(apt-cache depends linux-image-amd64 |
           sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -n1)"
  fi
  [ -n "$dep" ] || die "cannot resolve linux-image-amd64's kernel package"
  echo "$dep" > "$stamp"
  echo "$dep"
}

# ------------------------------------------------------------ vmlinux extract
# extract_vmlinux BZIMAGE OUT: our own extract-vmlinux. The x86 boot header
# says where the compressed kernel is: setup_sects at 0x1f1 (512-byte sectors
# after the boot sector), payload_offset/payload_length at 0x248/0x24c
# (relative to the protected-mode code). Kbuild appends the 4-byte
# uncompressed size after xz/zstd/lz4 payloads, so decoders must ignore it.
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
extract_vmlinux() {
  local bz="$1" out="$2" ss po pl off magic
  [ "$(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' ')" = HdrS ] ||
    die "$bz: not a bzImage (no HdrS signature)"
  ss="$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')"
  [ "$ss" = 0 ] && ss=4
  po="$(u32 "$bz" $((0x248)))"
  pl="$(u32 "$bz" $((0x24c)))"
  off=$(( (ss + 1) * 512 + po ))
  magic="$(od -An -tx1 -j "$off" -N6 "$bz" | tr -d ' ')"
  # Cut the payload out to a file first: decoders stop at the end of their
  # stream, which would SIGPIPE a feeding pipeline under pipefail.
  dd if="$bz" of="$out.payload" bs=1M iflag=skip_bytes,count_bytes \
     skip="$off" count="$pl" status=none
  case "$magic" in
    fd377a585a00) log "vmlinux: payload is xz";   xz -dc --single-stream "$out.payload" > "$out.tmp" ;;
    28b52ffd*)    log "vmlinux: payload is zstd"; truncate -s -4 "$out.payload"
                  zstd -dcq "$out.payload" > "$out.tmp" ;;
    1f8b*)        log "vmlinux: payload is gzip"; gzip -dcq "$out.payload" > "$out.tmp" || [ $? = 2 ] ;;
    02214c18*)    log "vmlinux: payload is lz4";  lz4 -dcq "$out.payload" > "$out.tmp" ;;
    *) rm -f "$out.payload"; die "$bz: unsupported kernel compression (payload magic $magic)" ;;
  esac
  rm -f "$out.payload"
  [ "$(head -c4 "$out.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
    die "$bz: decompressed payload is not an ELF image"
  mv "$out.tmp" "$out"
}

# ================================================================== busybox
if [ ! -x "$ASSETS/busybox" ]; then
  extract_pkg busybox-static "$ASSETS/busybox-static"
  ln -sfn busybox-static/bin/busybox "$ASSETS/busybox"
fi

# =================================================================== kernel
VER="$(kernel_version)"
KDIR="$ASSETS/kernel-$VER"
MODDIR="$KDIR/lib/modules/$VER"
if [ ! -f "$KDIR/boot/vmlinuz-$VER" ]; then
  extract_pkg "linux-image-$VER" "$KDIR"
fi
# The .deb ships no modules.dep (postinst runs depmod); generate it.
if [ ! -s "$MODDIR/modules.dep" ]; then
  log "depmod $VER"
  if command -v depmod >/dev/null; then depmod -b "$KDIR" "$VER"
  else "$ASSETS/busybox" depmod -b "$KDIR" "$VER"; fi
fi
if [ ! -f "$KDIR/vmlinux" ]; then
  extract_vmlinux "$KDIR/boot/vmlinuz-$VER" "$KDIR/vmlinux"
fi
ln -sfn "kernel-$VER/boot/vmlinuz-$VER" "$ASSETS/vmlinuz"
ln -sfn "kernel-$VER/vmlinux" "$ASSETS/vmlinux"
ln -sfn "kernel-$VER/lib/modules/$VER" "$ASSETS/modules"
[ "$(cat "$ASSETS/kernel-version" 2>/dev/null)" = "$VER" ] ||
  echo "$VER" > "$ASSETS/kernel-version"

# ================================================================ initramfs
# acpid's handler for the power button (KEY_POWER -> "PWRF/00000080", relative
# to its config dir). /init is not busybox init, so plain `poweroff` (a signal
# to PID 1) would do nothing: sync and power off directly (ACPI S5).
read -r -d '' POWER_BUTTON_HANDLER <<'EOF' || true
#!/bin/sh
# Ferrovisor test guest: the ACPI power button powers off (guest/assets.sh).
echo FV-POWER-BUTTON > /dev/console
sync
poweroff -f
EOF

# The guest /init. Console markers (tests grep for them):
#   FERROVISOR-INIT-REACHED
#   FV-INFO cpus_online=N memtotal_kb=N kernel=VER
#   FV-WARN ...                  (a module failed to load, unknown action)
#   FV-SCENARIO-EXIT N           (fv.action=script: /scenario.sh's status)
#   FV-CMDLINE <cmdline>         (fv.action=hold: the kernel command line)
#   FV-POWER-BUTTON              (the ACPI power button was pressed; powering off)
read -r -d '' GUEST_INIT <<'EOF' || true
#!/bin/busybox sh
# Ferrovisor test guest init (generated by guest/assets.sh).
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1

# Modules, dependencies first (order computed on the host from modules.dep).
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$(uname -r)/$m" 2>/dev/null ||
    echo "FV-WARN insmod ${m##*/} failed"
done < /etc/modules.order

echo FERROVISOR-INIT-REACHED

# The ACPI power button (the host's `ferrovisor ctl SOCKET shutdown`): the
# `button` driver reports it as KEY_POWER on an input device, and busybox acpid
# runs /etc/acpi/PWRF/00000080 for it, which powers off. acpid opens the event
# devices when it starts: wait (at most 5 s) until it has, so that a press right
# after the markers below is not missed.
if [ -d /sys/bus/acpi/drivers/button ] && [ -e /dev/input/event0 ]; then
  acpid -d -c /etc/acpi &
  n=0
  until ls -l /proc/$!/fd 2>/dev/null | grep -q /dev/input/ || [ $n -ge 50 ]; do
    sleep 0.1; n=$((n + 1))
  done
fi

cpus_online() {
  n=0
  if [ -r /sys/devices/system/cpu/online ]; then
    for r in $(tr ',' ' ' < /sys/devices/system/cpu/online); do
      case "$r" in
        *-*) n=$((n + ${r#*-} - ${r%-*} + 1)) ;;
        *)   n=$((n + 1)) ;;
      esac
    done
  else
    n=$(nproc)
  fi
  echo "$n"
}
memtotal=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
echo "FV-INFO cpus_online=$(cpus_online) memtotal_kb=$memtotal kernel=$(uname -r)"

action=shell hold=3 end=poweroff
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    fv.action=*) action="${arg#fv.action=}" ;;
    fv.hold=*)   hold="${arg#fv.hold=}" ;;
    fv.end=*)    end="${arg#fv.end=}" ;;
  esac
done

case "$action" in
  info|poweroff) ;;
  hold)
    # Benchmarks: stay up fv.hold= seconds (default 3) after the markers, so
    # the host can sample the VMM's memory, then power off.
    echo "FV-CMDLINE $(cat /proc/cmdline)"
    sleep "$hold" ;;
  reboot) reboot -f ;;
  panic)
    echo 1 > /proc/sys/kernel/sysrq
    echo c > /proc/sysrq-trigger ;;
  script)
    if [ -f /scenario.sh ]; then
      (cd / && sh /scenario.sh); rc=$?
    else
      echo "FV-WARN fv.action=script but no /scenario.sh"; rc=127
    fi
    echo "FV-SCENARIO-EXIT $rc" ;;
  shell)
    setsid cttyhack sh -l ;;
  *) echo "FV-WARN unknown fv.action=$action" ;;
esac
sync
# fv.end=reboot: end with a reset instead (a VMM with no ACPI power-off, such as
# Firecracker, stops on the guest's keyboard-controller reset).
case "$end" in
  reboot) reboot -f ;;
  *) poweroff -f ;;
esac
EOF

mapfile -t ORDER < <(mod_order "$MODDIR" "${GUEST_MODULES[@]}")
# Rebuild when this script (init, module list, format), the resolved module
# set, busybox or the kernel change.
KEY="$( { echo "$VER"; printf '%s\n' "${ORDER[@]}";
          cat "$SELF" "$(dirname "$SELF")/lib.sh" "$ASSETS/busybox" | sha256sum; } | sha256sum | cut -c1-16)"
INITRD="$KDIR/initramfs-$KEY.cpio.gz"
if [ ! -f "$INITRD" ]; then
  log "building guest initramfs ($VER, ${#ORDER[@]} modules)"
  scratch STAGE "$ASSETS"
  mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root}
  cp "$ASSETS/busybox" "$STAGE/bin/busybox"
  printf '%s\n' "$GUEST_INIT" > "$STAGE/init"
  chmod 755 "$STAGE/init"
  mkdir -p "$STAGE/etc/acpi/PWRF"
  printf '%s\n' "$POWER_BUTTON_HANDLER" > "$STAGE/etc/acpi/PWRF/00000080"
  chmod 755 "$STAGE/etc/acpi/PWRF/00000080"
  copy_modules "$MODDIR" "$STAGE/lib/modules/$VER" "${ORDER[@]}"
  for m in "${ORDER[@]}"; do mod_plain "$m"; done > "$STAGE/etc/modules.order"
  # A modules.dep for the subset, so `modprobe` works inside the guest too.
  cp "$MODDIR"/modules.{order,builtin,builtin.modinfo} "$STAGE/lib/modules/$VER/"
  "$ASSETS/busybox" depmod -b "$STAGE" "$VER" 2>/dev/null || true
  # /dev/console for the kernel to open before /init runs (Debian's built-in
  # initramfs has one too; this is belt and braces, needs root).
  mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || true
  # gzip'd, zero-padded to 4 bytes so a test can append a cpio with
  # /scenario.sh (see mkcpio in lib.sh).
  MKCPIO_GZIP=9 mkcpio "$STAGE" "$INITRD"
  # Drop initramfs images of older inputs.
  find "$KDIR" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "${INITRD##*/}" -delete
fi
ln -sfn "kernel-$VER/${INITRD##*/}" "$ASSETS/initramfs.cpio.gz"

echo "$ASSETS"
