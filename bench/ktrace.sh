# KVM tracepoints for one VMM process, from the shell (POSIX sh: sourced by
# bench/ab-lab.sh and bench/boot-lab.sh in the lab). Every VMM gets the same
# instance, so Ferrovisor, QEMU and Firecracker pay the same tracing cost.
#
#   ktrace_instance NAME BUFFER_KB EVENTS...   a tracefs instance recording the
#       kvm EVENTS (those the kernel has) of the tasks later written to its
#       set_event_pid and of the threads they create; prints its path
#   ktrace_exec INSTANCE CMD...                this process joins INSTANCE's
#       event filter, marks the trace (`exec`, in its trace_marker), then becomes
#       CMD (a prefix for vmm_cmd)
#   ktrace_remove INSTANCE                     stops and removes it
# shellcheck shell=sh
TRACEFS=${TRACEFS:-/sys/kernel/tracing}

# ktrace_ready: whether tracefs (mounted here if it is not) has KVM's events.
ktrace_ready() {
  [ -d "$TRACEFS/instances" ] || mount -t tracefs nodev "$TRACEFS" 2>/dev/null
  [ -d "$TRACEFS/instances" ] && [ -d "$TRACEFS/events/kvm" ]
}

ktrace_instance() {
  _ki="$TRACEFS/instances/$1" _kb=$2
  shift 2
  rmdir "$_ki" 2>/dev/null
  mkdir "$_ki" || return 1
  echo 0 > "$_ki/tracing_on"
  echo "$_kb" > "$_ki/buffer_size_kb"
  echo 1 > "$_ki/options/event-fork"
  for _e in "$@"; do
    [ -e "$_ki/events/kvm/$_e/enable" ] && echo 1 > "$_ki/events/kvm/$_e/enable"
  done
  echo 1 > "$_ki/tracing_on"
  echo "$_ki"
}

ktrace_exec() {
  _kinst=$1; shift
  # shellcheck disable=SC2016  # $$ and $0 are the inner shell's
  exec sh -c 'echo $$ > "$0/set_event_pid"; echo exec > "$0/trace_marker"; exec "$@"' "$_kinst" "$@"
}

ktrace_remove() {
  [ -n "$1" ] && [ -d "$1" ] || return 0
  echo 0 > "$1/tracing_on" 2>/dev/null
  rmdir "$1" 2>/dev/null
}
