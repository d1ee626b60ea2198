# The cost of confinement, side by side in one run. See bench/README.md.
#
#  1. The same tiny guest on this host's /dev/kvm, launched unconfined (`ferrovisor run`) and
#     confined (`ferrovisor run --jail`: every wall up), alternating.
#  2. With Firecracker and its jailer built (bench/firecracker.sh): the same stock vmlinux
#     launched by Ferrovisor unconfined and confined, Firecracker alone and Firecracker under
#     its jailer (chroot, new pid namespace, its uid), alternating; time to the first KVM_RUN.
#
#   bench/jail.sh [--runs N] [--out DIR] [--ferrovisor PATH] [--no-firecracker]
#
#   --runs N          launches per arm (default 20)
#   --out DIR         where the table, plot and raw data go (default target/bench)
#   --ferrovisor PATH the binary to measure (default target/release/ferrovisor; not built here)
#   --no-firecracker  skip part 2
#
# Metrics per launch:
#   launch->guest output  (1) from just before the exec to the first byte the guest writes to
#                         its serial port (its first instructions), read on the VMM's stdout
#   VMM RSS               (1) the VMM's resident memory with the guest idle (control socket)
#   walls up              (1, confined only) how long `jail::enter` took, from the VMM's report
#   launch->first KVM_RUN (2) from a trace marker written just before the exec to the first
#                         KVM_RUN ioctl of any task the launch made (a tracefs instance following
#                         forks, CLOCK_MONOTONIC; a syscall tracepoint, so every VMM and every
#                         KVM flavour, PVM included, is measured the same way)
# Writes DIR/jail.txt (the tables), DIR/jail.svg, DIR/jail-peers.svg, DIR/jail-samples.tsv,
# DIR/jail-peers-samples.tsv. Needs root.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { sed -n '2,28s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

RUNS=20 OUT="$REPO/target/bench" FV="$REPO/target/release/ferrovisor" PEERS=1
PEER_DIR="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrovisor}/peers"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs)       RUNS="$2"; shift 2 ;;
    --out)        OUT="$2"; shift 2 ;;
    --ferrovisor) FV="$2"; shift 2 ;;
    --no-firecracker) PEERS=0; shift ;;
    -h|--help)    usage 0 ;;
    *) echo "jail.sh: unknown argument: $1" >&2; usage ;;
  esac
done
die() { echo "jail.sh: $*" >&2; exit 1; }
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
[ -x "$FV" ] || die "$FV: no such executable; build it first (cargo build --release)"
[ "$(id -u)" = 0 ] || die "needs root (the jail does)"
[ -w /dev/kvm ] || die "/dev/kvm is missing or not writable"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/fv-bench-jail.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

python3 - "$FV" "$RUNS" "$WORK" "$OUT/jail-samples.tsv" <<'PY'
import json, os, re, socket, subprocess, sys, time
fv, runs, work, samples = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# Real mode at the reset vector: print "X" on COM1, then halt forever (idle).
code = bytes([0xba, 0xf8, 0x03, 0xb0, ord("X"), 0xee, 0xfa, 0xf4, 0xeb, 0xfd])
img = bytearray(4096); img[:len(code)] = code; img[0xff0:0xff3] = bytes([0xe9, 0x0d, 0xf0])
fw = os.path.join(work, "fw.bin"); open(fw, "wb").write(img)

def stats(ctl):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(ctl)
    s.sendall(b'{"cmd":"stats"}\n'); buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk: break
        buf += chunk
    s.close(); return json.loads(buf)

def stop(ctl):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(ctl)
    s.sendall(b'{"cmd":"stop"}\n'); s.recv(4096); s.close()

out = open(samples, "w"); out.write("workload\tmetric\tunit\tvmm\trun\tvalue\n")
for i in range(runs):
    for arm in (["host", "jailed"] if i % 2 == 0 else ["jailed", "host"]):
        run = os.path.join(work, f"{arm}-{i}"); os.mkdir(run)
        ctl = os.path.join(run, "ctl.sock")
        args = [fv, "--log-level", "info", "run", "--firmware", fw, "--memory", "32M",
                "--control", ctl]
        if arm == "jailed":
            # A uid given, as the daemon gives one (without, `run` looks for a free one in /proc).
            args += ["--jail", "--jail-uid", "900077", "--jail-dir", run]
        err = open(os.path.join(run, "stderr"), "w+")
        t0 = time.monotonic()
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        first = p.stdout.read(1)
        t1 = time.monotonic()
        ms = (t1 - t0) * 1000 if first == b"X" else "NA"
        rss = "NA"
        for _ in range(100):
            if os.path.exists(ctl):
                try:
                    rss = stats(ctl)["rss_bytes"] / 1048576; break
                except OSError:
                    pass
            time.sleep(0.02)
        try:
            stop(ctl)
        except OSError:
            p.kill()
        p.wait(timeout=30)
        err.seek(0); text = err.read()
        out.write(f"tiny guest\tlaunch->guest output\tms\t{arm}\t{i}\t{ms}\n")
        out.write(f"tiny guest\tVMM RSS\tMiB\t{arm}\t{i}\t{rss}\n")
        m = re.search(r"walls up in ([0-9.]+) ms", text)
        if arm == "jailed":
            print(f"run {i}: walls up in {m.group(1) if m else '?'} ms", file=sys.stderr)
out.close()
PY
python3 "$BENCH/plot.py" "$OUT/jail-samples.tsv" --title "Ferrovisor: the cost of confinement" \
  --vmms "jailed=confined (run --jail):jail,host=unconfined:host" \
  --table "$OUT/jail.txt" --svg "$OUT/jail.svg"

if [ "$PEERS" = 1 ] && { [ ! -x "$PEER_DIR/firecracker" ] || [ ! -x "$PEER_DIR/jailer" ]; }; then
  echo "jail.sh: part 2 skipped: no $PEER_DIR/firecracker and jailer (bench/firecracker.sh builds them)" >&2
  PEERS=0
fi
if [ "$PEERS" = 1 ]; then
  TRACEFS=/sys/kernel/tracing
  [ -d "$TRACEFS/instances" ] || mount -t tracefs nodev "$TRACEFS" 2>/dev/null || true
  [ -e "$TRACEFS/events/syscalls/sys_enter_ioctl" ] || die "part 2 needs tracefs with syscall events ($TRACEFS/events/syscalls/sys_enter_ioctl); --no-firecracker skips it"
  ASSETS="$("$REPO/guest/assets.sh")"
  python3 - "$FV" "$RUNS" "$WORK" "$OUT/jail-peers-samples.tsv" "$PEER_DIR" "$ASSETS/vmlinux" "$TRACEFS" <<'PY'
import os, shutil, signal, subprocess, sys, time
fv, runs, work, samples, peers, vmlinux, tracefs = sys.argv[1:8]
runs = int(runs)
inst = os.path.join(tracefs, "instances", f"fv-bench-jail-{os.getpid()}")
KVM_RUN = 0xAE80
SETTLE = float(os.environ.get("JAIL_BENCH_SETTLE", "0.5"))
def w(path, text):
    with open(path, "w") as f: f.write(text)
os.mkdir(inst)
try:
    w(f"{inst}/tracing_on", "0")
    w(f"{inst}/trace_clock", "mono")
    w(f"{inst}/buffer_size_kb", "2048")
    w(f"{inst}/options/event-fork", "1")
    w(f"{inst}/events/syscalls/sys_enter_ioctl/filter", f"cmd == {KVM_RUN:#x}")
    w(f"{inst}/events/syscalls/sys_enter_ioctl/enable", "1")
    w(f"{inst}/tracing_on", "1")
    # Firecracker's jail: its kernel and config inside the chroot, as its docs ask.
    fc_stripped = os.path.join(work, "firecracker")
    shutil.copy(os.path.join(peers, "firecracker"), fc_stripped)
    subprocess.run(["strip", fc_stripped], check=False)
    cfg = ('{"boot-source": {"kernel_image_path": "%s", "boot_args": "console=ttyS0 reboot=k panic=1"},'
           ' "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}, "drives": [], "network-interfaces": []}')
    # One copy of the kernel for every arm (same page cache state), hard-linked into each
    # Firecracker chroot: no 60 MiB copy (and its writeback) between two launches.
    kernel = os.path.join(work, "vmlinux")
    shutil.copy(vmlinux, kernel)
    w(os.path.join(work, "fc.json"), cfg % kernel)
    # The jailer's docs ask for a static (musl) Firecracker; the one built here is glibc's (the
    # musl target cannot be installed offline), so its shared libraries go into the chroot.
    libs = []
    for line in subprocess.run(["ldd", fc_stripped], capture_output=True, text=True).stdout.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            libs.append(path)
    lib_tree = os.path.join(work, "libs")
    for lib in libs:
        dest = lib_tree + lib
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(lib, dest)
    def arm_args(arm, i):
        run = os.path.join(work, f"p-{arm}-{i}"); os.mkdir(run)
        if arm == "fv-host":
            return run, [fv, "run", "--kernel", kernel, "--memory", "128M"]
        if arm == "fv-jail":
            return run, [fv, "run", "--kernel", kernel, "--memory", "128M",
                         "--jail", "--jail-uid", "900078", "--jail-dir", run]
        if arm == "fc-host":
            return run, [fc_stripped, "--no-api", "--config-file", os.path.join(work, "fc.json"),
                         "--level", "Error"]
        vm_id = f"bench-{i}"
        root = os.path.join(run, "firecracker", vm_id, "root"); os.makedirs(root)
        os.link(kernel, os.path.join(root, "vmlinux"))
        subprocess.run(["cp", "-al", lib_tree + "/.", root], check=True)
        w(os.path.join(root, "fc.json"), cfg % "vmlinux")
        for f in ("vmlinux", "fc.json"):
            os.chmod(os.path.join(root, f), 0o644)
        return run, [os.path.join(peers, "jailer"), "--id", vm_id, "--exec-file", fc_stripped,
                     "--uid", "900078", "--gid", "900078", "--chroot-base-dir", run,
                     "--cgroup-version", "2", "--new-pid-ns", "--",
                     "--no-api", "--config-file", "fc.json", "--level", "Error"]
    def first_run_ms():
        t_exec = None
        with open(f"{inst}/trace") as f:
            for line in f:
                if line.startswith("#") or ":" not in line: continue
                head, _, rest = line.partition(": ")
                try: ts = float(head.split()[-1])
                except ValueError: continue
                if "tracing_mark_write: fv-bench-exec" in line: t_exec = ts
                elif "sys_ioctl" in rest or "sys_enter_ioctl" in rest or "cmd: 0x0000ae80" in rest:
                    if t_exec is not None: return (ts - t_exec) * 1000
        return None
    arms = ["fv-host", "fv-jail", "fc-host", "fc-jail"]
    out = open(samples, "w"); out.write("workload\tmetric\tunit\tvmm\trun\tvalue\n")
    for i in range(runs):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            run, args = arm_args(arm, i)
            w(f"{inst}/trace", "")
            err = open(os.path.join(run, "stderr"), "w+")
            pid = os.fork()
            if pid == 0:
                try:
                    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
                    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                    os.dup2(err.fileno(), 2)
                    w(f"{inst}/set_event_pid", str(os.getpid()))
                    w(f"{inst}/trace_marker", "fv-bench-exec")
                    os.execv(args[0], args)
                finally:
                    os._exit(127)
            ms = None
            deadline = time.monotonic() + 10
            while ms is None and time.monotonic() < deadline:
                time.sleep(0.02)
                ms = first_run_ms()
            # Everything the launch made: the traced pids (the VMM, its pid namespace's child).
            pids = set()
            for p in open(f"{inst}/set_event_pid").read().split():
                try: pids.add(int(p))
                except ValueError: pass
            for p in pids:
                try: os.kill(p, signal.SIGKILL)
                except OSError: pass
            os.waitpid(pid, 0)
            for p in pids:
                for _ in range(100):
                    if not os.path.exists(f"/proc/{p}"): break
                    time.sleep(0.01)
            err.seek(0)
            if ms is None:
                print(f"{arm} run {i}: no KVM_RUN within 10 s; stderr: {err.read()[-400:]}", file=sys.stderr)
            vmm, key = arm.split("-")
            workload = {"fv": "Ferrovisor", "fc": "Firecracker"}[vmm]
            out.write(f"{workload}\tlaunch->first KVM_RUN\tms\t{key}\t{i}\t{'NA' if ms is None else f'{ms:.3f}'}\n")
            shutil.rmtree(run, ignore_errors=True)
            # The killed VM's teardown (its RAM, KVM's VM) finishes in the background; the
            # next launch must not pay for it.
            time.sleep(SETTLE)
    out.close()
finally:
    try: w(f"{inst}/tracing_on", "0")
    except OSError: pass
    os.rmdir(inst)
PY
  python3 "$BENCH/plot.py" "$OUT/jail-peers-samples.tsv" \
    --title "The cost of confinement: Ferrovisor --jail vs Firecracker's jailer (stock vmlinux, 1 vCPU, 128 MiB)" \
    --vmms "jail=confined:jail,host=unconfined:host" \
    --table "$OUT/jail-peers.txt" --svg "$OUT/jail-peers.svg"
fi
cat "$OUT/jail.txt"
echo "plot: $OUT/jail.svg"
if [ "$PEERS" = 1 ]; then
  cat "$OUT/jail-peers.txt"
  echo "plot: $OUT/jail-peers.svg"
fi
