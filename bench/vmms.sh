# The two VMM command lines the benchmarks compare, in one place (POSIX sh:
# sourced by bench/startup.sh on the host and by bench/boot-lab.sh in the lab).
# See bench/README.md for why each flag is there.
#
#   vmm_cmd VMM KERNEL INITRD ARGS [PREFIX...]
#
# runs PREFIX... followed by the VMM's command line (VMM: ferrovisor | qemu |
# ferrovisor-kirq | qemu-kirq | firecracker, the last three only without devices; FV_EXTRA,
# QEMU_EXTRA: more flags)
# booting KERNEL + INITRD with $BENCH_CPUS vCPUs and $BENCH_MEM of memory and
# the kernel command line "console=ttyS0 ARGS" on the serial console on
# stdout. PREFIX may be `exec`, `show_cmd` (print the command), a launcher, ...
#
# Firecracker ($FIRECRACKER, built from source by bench/boot.sh) boots only an
# ELF vmlinux; it runs without its API socket from a config file written to
# $BENCH_TMP, and adds pci=off to the command line itself when it has no PCI bus
# (its default), so give pci=off to all three for the same command line. It has
# no ACPI power-off: its guest ends with a reset instead (fv.end=reboot, read by
# the test guest's /init only), which Firecracker takes as the end of the VM.
#
# Ferrovisor prepends console=ttyS0 itself; QEMU is given it explicitly, so
# the guest kernels see the same command line (the guest's fv.action=hold
# prints it as FV-CMDLINE, and bench/boot.sh checks they match).
#
# With BENCH_DISK (a raw image), BENCH_TAP (a TAP name) and BENCH_MAC set, both
# VMMs also get the I/O benchmark's devices (bench/io.sh): a virtio-blk disk on
# the image and a virtio-net NIC on the TAP (guest /dev/vda and eth0). QEMU's
# are userspace virtio (no vhost, no iothread), one request queue of 256 like
# Ferrovisor's, and the image is opened with cache=$BENCH_QEMU_CACHE (default
# writeback: host page cache, guest flushes reach the file with fdatasync,
# what Ferrovisor does).

# shellcheck shell=sh disable=SC2153  # BENCH_MAC: set by the caller with BENCH_DISK
BENCH_CPUS=${BENCH_CPUS:-2}
BENCH_MEM=${BENCH_MEM:-512M}
FERROVISOR=${FERROVISOR:-ferrovisor}
QEMU=${QEMU:-qemu-system-x86_64}
FIRECRACKER=${FIRECRACKER:-firecracker}
BENCH_TMP=${BENCH_TMP:-/tmp}
BENCH_QEMU_CACHE=${BENCH_QEMU_CACHE:-writeback}

# show_cmd ARGS...: print ARGS as a shell command line (quoting those with
# spaces).
show_cmd() {
  _line=
  for _a in "$@"; do
    case "$_a" in
      *[[:space:]]*|'') _line="$_line '$_a'" ;;
      *) _line="$_line $_a" ;;
    esac
  done
  echo "${_line# }"
}

# vmm_boots VMM WORKLOAD: whether VMM boots that kernel (vmlinux or bzimage):
# Firecracker boots only the ELF vmlinux.
vmm_boots() {
  [ "$1" != firecracker ] || [ "$2" = vmlinux ]
}

vmm_cmd() {
  _vmm=$1 _kernel=$2 _initrd=$3 _args=$4
  shift 4
  if [ -n "${BENCH_DISK:-}" ]; then
    case "$_vmm" in
      ferrovisor)
        "$@" "$FERROVISOR" run --kernel "$_kernel" --initrd "$_initrd" \
          --cpus "$BENCH_CPUS" --memory "$BENCH_MEM" \
          --disk "path=$BENCH_DISK" --net "tap=$BENCH_TAP,mac=$BENCH_MAC" \
          --cmdline "$_args" --serial stdio ;;
      qemu)
        "$@" "$QEMU" -M microvm,isa-serial=on,rtc=on -accel kvm -cpu host \
          -smp "$BENCH_CPUS" -m "$BENCH_MEM" \
          -nodefaults -no-user-config -display none -serial stdio \
          -kernel "$_kernel" -initrd "$_initrd" -append "console=ttyS0 $_args" \
          -drive "file=$BENCH_DISK,format=raw,if=none,id=d0,cache=$BENCH_QEMU_CACHE,aio=threads" \
          -device virtio-blk-device,drive=d0,num-queues=1,queue-size=256 \
          -netdev "tap,id=n0,ifname=$BENCH_TAP,script=no,downscript=no,vhost=off" \
          -device "virtio-net-device,netdev=n0,mac=$BENCH_MAC" ;;
      *)
        echo "vmm_cmd: unknown VMM $_vmm" >&2; return 2 ;;
    esac
    return
  fi
  case "$_vmm" in
    ferrovisor|ferrovisor-kirq)
      # ferrovisor-kirq: KVM's in-kernel IOAPIC instead of Ferrovisor's own (--irqchip kernel).
      _irqchip=split
      [ "$_vmm" = ferrovisor-kirq ] && _irqchip=kernel
      # shellcheck disable=SC2086  # FV_EXTRA: extra flags, split on purpose
      "$@" "$FERROVISOR" run --kernel "$_kernel" --initrd "$_initrd" \
        --cpus "$BENCH_CPUS" --memory "$BENCH_MEM" --irqchip "$_irqchip" \
        --cmdline "$_args" --serial stdio ${FV_EXTRA:-} ;;
    qemu|qemu-kirq)
      # qemu: microvm's default, a split irqchip (LAPICs in KVM, IOAPIC/PIC/PIT in QEMU);
      # qemu-kirq: the whole irqchip and the PIT in KVM, as Ferrovisor has it.
      _accel=kvm
      [ "$_vmm" = qemu-kirq ] && _accel=kvm,kernel-irqchip=on
      # shellcheck disable=SC2086  # QEMU_EXTRA: extra flags, split on purpose
      "$@" "$QEMU" -M microvm,isa-serial=on,rtc=on -accel "$_accel" -cpu host \
        -smp "$BENCH_CPUS" -m "$BENCH_MEM" \
        -nodefaults -no-user-config -display none -serial stdio \
        -kernel "$_kernel" -initrd "$_initrd" -append "console=ttyS0 $_args" ${QEMU_EXTRA:-} ;;
    firecracker)
      _mib=${BENCH_MEM%M}
      case "$BENCH_MEM" in *G) _mib=$(( ${BENCH_MEM%G} * 1024 )) ;; esac
      _cfg="$BENCH_TMP/firecracker-$$.json"
      cat > "$_cfg" <<EOF
{"boot-source": {"kernel_image_path": "$_kernel", "initrd_path": "$_initrd",
                 "boot_args": "console=ttyS0 $_args fv.end=reboot"},
 "machine-config": {"vcpu_count": $BENCH_CPUS, "mem_size_mib": $_mib},
 "drives": [], "network-interfaces": []}
EOF
      "$@" "$FIRECRACKER" --no-api --config-file "$_cfg" --level Error ;;
    *)
      echo "vmm_cmd: unknown VMM $_vmm" >&2; return 2 ;;
  esac
}
