#!/bin/sh
# The in-lab half of bench/ab.sh (busybox sh, run by tests/lab/lab.sh as the
# scenario): concurrent-boot reliability, Ferrovisor vs QEMU microvm, on the
# lab's /dev/kvm. Each round starts CONC guests at once per arm (the arms'
# order rotates from round to round), waits for all of them, and prints one
# line per guest:
#
#   AB-BOOT session=S round=R arm=A i=I result=ok|hang|fault|panic|reset|died|exit-N secs=T
#   AB-FAIL arm=A round=R i=I <a line of the failed guest's console or VMM output>
#   AB-TRACE arm=A round=R i=I <a KVM trace event of the failed guest (oldest first)>
#   AB-DMESG round=R <a lab kernel line worth seeing (BUG, WARNING, lockups, kvm)>
#   AB-ROUND session=S round=R done
#
# A guest is ok when its /init printed FV-INFO, its kernel printed
# "reboot: Power down" and its VMM exited by itself with status 0. QEMU gets
# -no-reboot, so a guest reset (a triple fault) ends it too: with status 0 but
# without "Power down", counted as `reset`. A guest still running after
# GUEST_TIMEOUT seconds is a `hang`: its trace is read first, then it is killed.
#
# Traces (TRACE=1): every guest runs with a tracefs instance of its own
# recording KVM's events for its threads only (Ferrovisor: --fault-trace, which
# also puts the last events into its fault report; QEMU: the same instance set
# up from the shell before exec), so both arms pay the same tracing cost.
#
# Parameters (/bench/params, written by bench/ab.sh):
#   SESSION ROUNDS CONC ARMS BENCH_CPUS BENCH_MEM KERNEL_KIND CMDLINE GUEST_TIMEOUT TRACE
# shellcheck disable=SC1091,SC2153  # params and vmms.sh come from bench/ab.sh
BENCH_DIR=${BENCH_DIR:-/bench}
. "$BENCH_DIR/params"
. "$BENCH_DIR/vmms.sh"
. "$BENCH_DIR/ktrace.sh"
export BENCH_CPUS BENCH_MEM
QEMU_EXTRA=-no-reboot
export QEMU_EXTRA

case "$KERNEL_KIND" in
  vmlinux) KERNEL=$GUEST_VMLINUX ;;
  bzimage) KERNEL=$GUEST_KERNEL ;;
  *) echo "AB-ERROR unknown kernel kind $KERNEL_KIND"; exit 2 ;;
esac

KVM_EVENTS="kvm_exit kvm_entry kvm_inj_exception kvm_inj_virq kvm_page_fault kvm_userspace_exit kvm_async_pf_not_present kvm_async_pf_ready kvm_async_pf_completed kvm_async_pf_repeated_fault kvm_emulate_insn"
if [ "$TRACE" = 1 ]; then
  if ktrace_ready; then
    FV_EXTRA=--fault-trace
    export FV_EXTRA
  else
    echo "AB-WARN no tracefs with kvm events: running without traces"
    TRACE=0
  fi
fi

W=/tmp/ab
rm -rf "$W"; mkdir -p "$W"
dmesg -c >/dev/null 2>&1

# start ARM I: launches guest I of ARM in the background; sets pid_I, inst_I.
start() {
  _arm=$1 _n=$2 _inst=
  _log="$W/$_arm-$_n.log"
  if [ "$TRACE" = 1 ] && [ "${_arm%-kirq}" != ferrovisor ]; then
    _inst=$(ktrace_instance "ab-$_arm-$_n" 512 $KVM_EVENTS)
  fi
  if [ -n "$_inst" ]; then
    vmm_cmd "$_arm" "$KERNEL" "$GUEST_INITRD" "$CMDLINE" ktrace_exec "$_inst" </dev/null >"$_log" 2>&1 &
  else
    vmm_cmd "$_arm" "$KERNEL" "$GUEST_INITRD" "$CMDLINE" exec </dev/null >"$_log" 2>&1 &
  fi
  _pid=$!
  eval "pid_$_n=$_pid inst_$_n=\$_inst"
  if [ "${_arm%-kirq}" = ferrovisor ] && [ "$TRACE" = 1 ]; then
    eval "inst_$_n=$TRACEFS/instances/ferrovisor-$_pid"
  fi
}

# print_trace ARM ROUND I INSTANCE: the last KVM events of that guest.
print_trace() {
  [ -n "$4" ] && [ -r "$4/trace" ] || return 0
  echo 0 > "$4/tracing_on" 2>/dev/null
  grep -v '^#' "$4/trace" | tail -n 60 | sed "s/^/AB-TRACE arm=$1 round=$2 i=$3 /"
}

classify() {  # LOG RC KILLED ARM -> result word
  if [ "$3" = 1 ]; then echo hang; return; fi
  if grep -q 'Kernel panic' "$1"; then echo panic; return; fi
  if [ "$2" = 0 ] && grep -q '^FV-INFO' "$1" && grep -q 'reboot: Power down' "$1"; then
    echo ok; return
  fi
  case "$4" in
    ferrovisor*) [ "$2" = 4 ] && { echo fault; return; } ;;
    *) [ "$2" = 0 ] && { echo reset; return; } ;;
  esac
  if grep -q '^FV-INFO' "$1"; then echo died; return; fi
  echo "exit-$2"
}

now() { read -r _up _ < /proc/uptime; echo "${_up%.*}"; }

run_arm() {  # ROUND ARM
  _r=$1 _arm=$2
  _t0=$(now)
  _i=1
  while [ "$_i" -le "$CONC" ]; do start "$_arm" "$_i"; _i=$((_i + 1)); done
  # Wait for all, killing those past the deadline (after reading their trace).
  _deadline=$((_t0 + GUEST_TIMEOUT))
  _left=$CONC
  _i=1; while [ "$_i" -le "$CONC" ]; do eval "done_$_i=0 killed_$_i=0"; _i=$((_i + 1)); done
  while [ "$_left" -gt 0 ]; do
    sleep 1
    _now=$(now)
    _i=1
    while [ "$_i" -le "$CONC" ]; do
      eval "_p=\$pid_$_i _d=\$done_$_i"
      if [ "$_d" = 0 ]; then
        if ! kill -0 "$_p" 2>/dev/null; then
          wait "$_p"; _rc=$?
          eval "done_$_i=1 rc_$_i=$_rc secs_$_i=$((_now - _t0))"
          _left=$((_left - 1))
        elif [ "$_now" -ge "$_deadline" ]; then
          eval "_in=\$inst_$_i"
          print_trace "$_arm" "$_r" "$_i" "$_in"
          kill -9 "$_p" 2>/dev/null
          wait "$_p" 2>/dev/null
          eval "done_$_i=1 killed_$_i=1 rc_$_i=137 secs_$_i=$((_now - _t0)) traced_$_i=1"
          _left=$((_left - 1))
        fi
      fi
      _i=$((_i + 1))
    done
  done
  _i=1
  while [ "$_i" -le "$CONC" ]; do
    eval "_rc=\$rc_$_i _k=\$killed_$_i _s=\$secs_$_i _in=\$inst_$_i _tr=\${traced_$_i:-0}"
    _log="$W/$_arm-$_i.log"
    _res=$(classify "$_log" "$_rc" "$_k" "$_arm")
    echo "AB-BOOT session=$SESSION round=$_r arm=$_arm i=$_i result=$_res secs=$_s"
    if [ "$_res" != ok ]; then
      # The first oops (where it began) and the end of the log.
      _first=$(grep -n -m 1 -E 'BUG:|Oops|general protection|traps:|invalid opcode|double fault|Kernel panic|WARNING:|triple fault|could not run' "$_log" | cut -d: -f1)
      if [ -n "$_first" ]; then
        sed -n "$((_first > 5 ? _first - 5 : 1)),$((_first + 40))p" "$_log" | tr -d '\r' | sed "s/^/AB-FAIL arm=$_arm round=$_r i=$_i first: /"
      fi
      tail -n 40 "$_log" | tr -d '\r' | sed "s/^/AB-FAIL arm=$_arm round=$_r i=$_i /"
      # Ferrovisor's fault report carries its trace; QEMU's is read here.
      if [ "${_arm%-kirq}" != ferrovisor ] && [ "$_tr" = 0 ]; then
        print_trace "$_arm" "$_r" "$_i" "$_in"
      fi
    fi
    if [ "${_arm%-kirq}" != ferrovisor ]; then ktrace_remove "$_in"; fi
    eval "traced_$_i=0"
    _i=$((_i + 1))
  done
}

r=1
while [ "$r" -le "$ROUNDS" ]; do
  # Rotate the arms' order: a lab that degrades over a session hits each arm alike.
  set -- $ARMS
  k=$(( (r - 1 + SESSION) % $# ))
  while [ "$k" -gt 0 ]; do _a=$1; shift; set -- "$@" "$_a"; k=$((k - 1)); done
  for arm in "$@"; do
    run_arm "$r" "$arm"
  done
  dmesg -c 2>/dev/null | grep -v 'Unhandled WRMSR(0xc0010007)' \
    | grep -Ei 'BUG|WARNING|lockup|rcu.*stall|kvm|Call Trace|segfault|general protection' \
    | head -n 40 | sed "s/^/AB-DMESG round=$r /"
  echo "AB-ROUND session=$SESSION round=$r done"
  r=$((r + 1))
done
exit 0
