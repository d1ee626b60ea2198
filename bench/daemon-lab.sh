#!/bin/sh
# The in-lab half of bench/daemon.sh --lab (busybox sh, run by tests/lab/lab.sh
# as the scenario). For each run and N: a fresh `ferrovisor daemon` gets N
# POST /v1/vms {"start": true} requests (curl), $PARALLEL at a time, for N stock
# Debian guests (the lab's kernel and the test initramfs, fv.action=hold: the
# guest prints FERROVISOR-INIT-REACHED and idles); then N QEMU microvm
# processes of the same guest are started the same way (qemu -daemonize).
# Which VMM goes first alternates from run to run. Prints per VM and per set
# (the format bench/daemon.sh's host driver writes too):
#
#   BENCH-VM part=lab vmm=V n=N run=R i=I ok=0|1 t_launch=T t_started=T t_up=T
#            rss_kb=K pss_kb=K hwm_kb=K guest_kb=K cpu_ms=MS
#   BENCH-SET part=lab vmm=V n=N run=R t0=T ok=K load0=L load1=L
#            [daemon_start_ms= daemon_rss0_kb= daemon_rss_kb= daemon_hwm_kb=
#             daemon_pss_kb= daemon_cpu_ms=]          (Ferrovisor only)
#
# Times are busybox ash's $EPOCHREALTIME (microseconds, no fork): t0 before the
# first launch; per VM t_launch before its launch command (curl, qemu),
# t_started when that returned (the API answered "running"; QEMU's -daemonize
# parent exited, which it does once the VM runs), t_up when this shell found
# the marker in the VM's console file (Ferrovisor: the daemon's
# <state-dir>/vms/<id>/console.log; QEMU: -serial file:), polled every $POLL s
# with builtins only (no process competes with the guests for the lab's CPUs).
# Memory and CPU are sampled after every guest is up and $IDLE s idle:
# VmRSS/VmHWM (/proc/PID/status), Pss (smaps_rollup), the Rss of the
# guest-RAM mapping(s) (anonymous, at least half the guest's RAM), CPU time =
# max(utime + stime in ticks, sum of the live threads' schedstat run time).
#
#   sh daemon-lab.sh --one VMM DIR I     (internal: one launch, run by xargs)
#
# Parameters come from /bench/params (written by bench/daemon.sh):
#   RUNS NS PARALLEL IDLE UP_TIMEOUT MEM CPUS CMDLINE MARKER POLL
# shellcheck disable=SC3028,SC3045  # busybox ash: $EPOCHREALTIME, read -t
# shellcheck disable=SC2153  # parameters come from params
# shellcheck disable=SC1091  # params is added by bench/daemon.sh
BENCH_DIR=${BENCH_DIR:-/bench}
. "$BENCH_DIR/params"
FERROVISOR=${FERROVISOR:-ferrovisor}
SELF=$0

# qemu_cmd DIR I PREFIX...: bench/vmms.sh's QEMU machine and flags for this
# guest (1 vCPU, $MEM), the console in DIR/vmI.out, and -daemonize.
qemu_cmd() {
  _d=$1 _i=$2
  shift 2
  "$@" qemu-system-x86_64 -M microvm,isa-serial=on,rtc=on -accel kvm -cpu host \
    -smp "$CPUS" -m "$MEM" -nodefaults -no-user-config -display none \
    -serial "file:$_d/vm$_i.out" -kernel "$GUEST_VMLINUX" -initrd "$GUEST_INITRD" \
    -append "console=ttyS0 $CMDLINE" -daemonize -pidfile "$_d/vm$_i.pid"
}
fv_body() {
  printf '{"name":"vm%s","start":true,"config":{"kernel":"%s","initrd":"%s","cmdline":"%s","memory":"%s","cpus":%s}}' \
    "$1" "$GUEST_VMLINUX" "$GUEST_INITRD" "$CMDLINE" "$MEM" "$CPUS"
}

if [ "${1:-}" = --one ]; then
  vmm=$2 dir=$3 i=$4
  t_launch=$EPOCHREALTIME
  if [ "$vmm" = ferrovisor ]; then
    rc=$(curl -s -m 900 -o "$dir/resp$i" -w '%{http_code}' --unix-socket "$dir/api.sock" \
      -H 'Content-Type: application/json' --data-binary "$(fv_body "$i")" http://localhost/v1/vms)
  else
    qemu_cmd "$dir" "$i" > "$dir/vm$i.err" 2>&1 < /dev/null
    rc=$?
  fi
  t_started=$EPOCHREALTIME
  echo "$i $t_launch $t_started $rc" >> "$dir/launch.txt"
  exit 0
fi

W=/tmp/bench-daemon
rm -rf "$W"; mkdir -p "$W"
mkfifo "$W/tick" || { echo "BENCH-ERROR mkfifo failed"; exit 1; }
exec 9<> "$W/tick"
nap() { read -r -t "$1" _ <&9; }       # sleep without a fork
case "$MEM" in
  *G) MEM_KB=$(( ${MEM%G} * 1024 * 1024 )) ;;
  *M) MEM_KB=$(( ${MEM%M} * 1024 )) ;;
  *)  MEM_KB=$(( MEM / 1024 )) ;;
esac
loadavg() { read -r _a _b _c _ < /proc/loadavg; echo "$_a/$_b/$_c"; }
kb() { sed -n "s/^$2:[[:space:]]*\([0-9]*\) kB\$/\1/p" "/proc/$1/$3" 2>/dev/null; }
alive() { [ -r "/proc/$1/stat" ] && ! sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | grep -q '^Z'; }
cpu_ms() {
  _t=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print ($12 + $13) * 10 }')  # USER_HZ = 100
  _s=$(cat "/proc/$1/task/"*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.3f", s / 1e6 }')
  awk -v a="${_t:-0}" -v b="${_s:-0}" 'BEGIN { printf "%.3f", (a > b ? a : b) }'
}
guest_kb() {
  awk -v min=$((MEM_KB / 2)) '
    $1 ~ /^[0-9a-f]+-[0-9a-f]+$/ { anon = (NF == 5); size = 0; next }
    $1 == "Size:" { size = $2; next }
    $1 == "Rss:" && anon && size >= min { sum += $2 }
    END { print sum + 0 }' "/proc/$1/smaps" 2>/dev/null
}
# has_marker FILE: the marker is in FILE (builtins only).
has_marker() {
  while IFS= read -r _l; do
    case "$_l" in *"$MARKER"*) return 0 ;; esac
  done < "$1"
  return 1
}
# wait_gone PID... : until none runs (at most 30 s), then SIGKILL.
wait_gone() {
  _n=0
  for _p in "$@"; do
    while alive "$_p" && [ $_n -lt 300 ]; do nap 0.1; _n=$((_n + 1)); done
    alive "$_p" && { echo "BENCH-WARN process $_p still there: SIGKILL"; kill -9 "$_p" 2>/dev/null; }
  done
}

# run_set VMM N RUN
run_set() {
  vmm=$1 n=$2 run=$3
  dir=$W/$vmm-n$n-r$run
  mkdir -p "$dir"
  : > "$dir/launch.txt"; : > "$dir/up.txt"
  load0=$(loadavg)
  dset=""
  if [ "$vmm" = ferrovisor ]; then
    t_exec=$EPOCHREALTIME
    "$FERROVISOR" daemon --socket "$dir/api.sock" --state-dir "$dir/state" --ready-timeout 600 \
      > "$dir/daemon.log" 2>&1 < /dev/null &
    dpid=$!
    k=0
    until curl -s -o /dev/null -f --unix-socket "$dir/api.sock" http://localhost/v1/host 2>/dev/null; do
      k=$((k + 1))
      if [ $k -gt 600 ] || ! kill -0 "$dpid" 2>/dev/null; then
        echo "BENCH-ERROR the daemon did not answer:"; tail -n 20 "$dir/daemon.log"; return 1
      fi
      nap 0.05
    done
    t_ready=$EPOCHREALTIME
    nap 0.5
    drss0=$(kb "$dpid" VmRSS status)
    dcpu0=$(cpu_ms "$dpid")
  fi
  i=0; while [ $i -lt "$n" ]; do echo $i; i=$((i + 1)); done > "$dir/list"
  t0=$EPOCHREALTIME
  xargs -P "$PARALLEL" -n 1 sh "$SELF" --one "$vmm" "$dir" < "$dir/list" &
  xpid=$!
  seen=" " nup=0 last=${t0%.*} deadline=$(( ${t0%.*} + UP_TIMEOUT ))
  while :; do
    if [ "$vmm" = ferrovisor ]; then
      for f in "$dir"/state/vms/*/console.log; do
        [ -f "$f" ] || continue
        key=${f%/console.log}; key=${key##*/}
        case "$seen" in *" $key "*) continue ;; esac
        if has_marker "$f"; then
          echo "$key $EPOCHREALTIME" >> "$dir/up.txt"; seen="$seen$key "; nup=$((nup + 1))
        fi
      done
    else
      i=0
      while [ $i -lt "$n" ]; do
        case "$seen" in *" $i "*) ;; *)
          if [ -f "$dir/vm$i.out" ] && has_marker "$dir/vm$i.out"; then
            echo "$i $EPOCHREALTIME" >> "$dir/up.txt"; seen="$seen$i "; nup=$((nup + 1))
          fi ;;
        esac
        i=$((i + 1))
      done
    fi
    [ "$nup" -lt "$n" ] || break
    now=${EPOCHREALTIME%.*}
    if [ "$now" -ge "$deadline" ]; then
      echo "BENCH-WARN $vmm N=$n run $run: only $nup of $n guests up after ${UP_TIMEOUT}s"; break
    fi
    # All launches answered and some failed: those never come up.
    if ! kill -0 "$xpid" 2>/dev/null; then
      nfail=$(awk '$4 != 0 && $4 != 200 && $4 != 201' "$dir/launch.txt" | wc -l)
      [ $((nup + nfail)) -lt "$n" ] || { echo "BENCH-WARN $vmm N=$n run $run: $nfail launch(es) failed"; break; }
    fi
    if [ $((now - last)) -ge 15 ]; then
      echo "BENCH-PROGRESS $vmm N=$n run $run: $nup of $n up, $(wc -l < "$dir/launch.txt") launched, $((now - ${t0%.*}))s"
      last=$now
    fi
    nap "$POLL"
  done
  wait "$xpid"
  echo "BENCH-PROGRESS $vmm N=$n run $run: $nup of $n up after $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')s"
  nap "$IDLE"
  ok=0 pids=""
  while read -r i tl ts rc; do
    pid="" key=$i tup=NA
    if [ "$vmm" = ferrovisor ]; then
      key=$(sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' "$dir/resp$i" 2>/dev/null)
      pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$dir/resp$i" 2>/dev/null)
      grep -q '"state":"running"' "$dir/resp$i" 2>/dev/null || pid=""
    elif [ "$rc" = 0 ]; then
      read -r pid < "$dir/vm$i.pid" 2>/dev/null
    fi
    [ -z "$key" ] || tup=$(awk -v k="$key" '$1 == k { print $2; exit }' "$dir/up.txt")
    [ -n "$tup" ] || tup=NA
    good=0 rss=NA pss=NA hwm=NA gkb=NA cpu=NA
    if [ -n "$pid" ]; then
      pids="$pids $pid"
      if [ "$tup" != NA ] && alive "$pid"; then
        good=1
        rss=$(kb "$pid" VmRSS status); hwm=$(kb "$pid" VmHWM status); pss=$(kb "$pid" Pss smaps_rollup)
        gkb=$(guest_kb "$pid"); cpu=$(cpu_ms "$pid")
      fi
    fi
    if [ "$good" = 0 ]; then
      echo "BENCH-WARN $vmm N=$n run $run: VM $i did not come up (launch status $rc)"
      if [ "$vmm" = ferrovisor ]; then head -c 600 "$dir/resp$i" 2>/dev/null; echo
      else tail -n 5 "$dir/vm$i.err" "$dir/vm$i.out" 2>/dev/null; fi
    fi
    ok=$((ok + good))
    echo "BENCH-VM part=lab vmm=$vmm n=$n run=$run i=$i ok=$good t_launch=$tl t_started=$ts t_up=$tup rss_kb=${rss:-NA} pss_kb=${pss:-NA} hwm_kb=${hwm:-NA} guest_kb=${gkb:-NA} cpu_ms=${cpu:-NA}"
  done < "$dir/launch.txt"
  if [ "$vmm" = ferrovisor ]; then
    dcpu1=$(cpu_ms "$dpid")
    dset="daemon_start_ms=$(awk -v a="$t_exec" -v b="$t_ready" 'BEGIN { printf "%.1f", (b - a) * 1000 }') daemon_rss0_kb=${drss0:-NA} daemon_rss_kb=$(kb "$dpid" VmRSS status) daemon_hwm_kb=$(kb "$dpid" VmHWM status) daemon_pss_kb=$(kb "$dpid" Pss smaps_rollup) daemon_cpu_ms=$(awk -v a="$dcpu0" -v b="$dcpu1" 'BEGIN { printf "%.1f", b - a }')"
  fi
  echo "BENCH-SET part=lab vmm=$vmm n=$n run=$run t0=$t0 ok=$ok load0=$load0 load1=$(loadavg) $dset"
  # Tear down.
  if [ "$vmm" = ferrovisor ]; then
    i=0
    while [ $i -lt "$n" ]; do
      curl -s -o /dev/null -X DELETE --unix-socket "$dir/api.sock" "http://localhost/v1/vms/vm$i?force=true"
      i=$((i + 1))
    done
    # shellcheck disable=SC2086  # a list of pids
    wait_gone $pids
    kill -TERM "$dpid" 2>/dev/null
    wait "$dpid" 2>/dev/null
  else
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null
    # shellcheck disable=SC2086
    wait_gone $pids
  fi
  rm -rf "$dir"
}

echo "BENCH-INFO runs=$RUNS n=\"$NS\" parallel=$PARALLEL idle=$IDLE cpus=$CPUS mem=$MEM poll=$POLL marker=$MARKER cmdline=\"$CMDLINE\""
echo "BENCH-INFO $("$FERROVISOR" --version 2>/dev/null || echo ferrovisor) / $(qemu-system-x86_64 --version | head -n1) / lab $(nproc) CPUs, $(awk '/MemTotal/ { printf "%d MiB", $2 / 1024 }' /proc/meminfo)"
echo "BENCH-CMD ferrovisor: ferrovisor daemon --socket S --state-dir D --ready-timeout 600; curl --unix-socket S --data-binary '$(fv_body I)' http://localhost/v1/vms"
echo "BENCH-CMD qemu: $(qemu_cmd DIR I echo)"
run=1
while [ "$run" -le "$RUNS" ]; do
  if [ $((run % 2)) = 1 ]; then order="ferrovisor qemu"; else order="qemu ferrovisor"; fi
  for n in $NS; do
    for vmm in $order; do
      echo "BENCH-PROGRESS run $run/$RUNS N=$n $vmm: starting (lab load $(loadavg), MemAvailable $(awk '/MemAvailable/ { printf "%d MiB", $2 / 1024 }' /proc/meminfo))"
      run_set "$vmm" "$n" "$run"
    done
  done
  run=$((run + 1))
done
echo "BENCH-DONE"
exit 0
