#!/usr/bin/env bash
# Density and start-up of many idle VMs: N VMs started concurrently through
# the host daemon's API vs N QEMU processes started concurrently, time until
# every guest has printed its marker, and the memory and CPU the VMMs (and the
# daemon) use. See bench/README.md.
#
#   bench/daemon.sh [--runs R] [--n "10 50"] [--parallel P] [--idle S]
#                   [--out DIR] [--ferrovisor PATH] [--qemu PATH]
#                   [--lab] [--no-host] [--lab-n "10"] [--lab-runs R]
#                   [--lab-memory SIZE] [--lab-mem MiB] [--lab-timeout S]
#                   [--up-timeout S]
#
#   --runs R          host part: sets per VMM and N, alternating which VMM goes
#                     first (default 1)
#   --n LIST          host part: how many tiny guests at once (default "10 50")
#   --parallel P      launches in flight at once, both VMMs (default 8)
#   --idle S          seconds all guests idle before memory is sampled (default 2)
#   --up-timeout S    give up on guests not up S seconds after the first launch
#                     (default 60 on the host, 600 in the lab)
#   --out DIR         where the tables, plots and raw data go (default target/bench)
#   --ferrovisor PATH the binary to measure (default target/release/ferrovisor;
#                     it is not built here)
#   --qemu PATH       default: qemu-system-x86_64 on PATH
#   --lab             also run the lab part: stock Debian guests on the lab's
#                     nested KVM (tests/lab/lab.sh), in one lab session
#   --no-host         skip the host part (with --lab: the lab part only)
#   --lab-n LIST      lab part: how many guests at once (default "10")
#   --lab-runs R      lab part: sets per VMM and N (default 1)
#   --lab-memory SIZE each lab guest's RAM (default 96M; 1 vCPU)
#   --lab-mem MiB     the lab VM's own RAM (default: max(3072, 1024 + N x (guest + 24 MiB)))
#   --lab-timeout S   the whole lab session (default 180 + lab-runs x sum(N) x 2 x 20)
#
# Host part (this machine's /dev/kvm; tiny real-mode guests that print "up" on
# COM1 and halt): per N, a fresh `ferrovisor daemon` gets N POST /v1/vms
# {"start": true} requests, P at a time; QEMU gets N `qemu-system-x86_64 ...
# -daemonize` launches, P at a time. Both guests run the same 64 KiB firmware
# image with 32 MiB of RAM. Writes DIR/daemon.txt (the table), DIR/daemon.svg,
# DIR/daemon-samples.tsv and DIR/daemon-raw.log (one line per VM and per set);
# the lab part DIR/daemon-lab.txt, .svg, -samples.tsv and DIR/daemon-lab.log.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$SELF"; exit "${1:-2}"; }

RUNS=1 NS="10 50" PARALLEL=8 IDLE=2 UP_TIMEOUT="" OUT="$REPO/target/bench"
FV="$REPO/target/release/ferrovisor" QEMU_BIN="$(command -v qemu-system-x86_64 || true)"
LAB=0 HOST=1 LAB_NS="10" LAB_RUNS=1 LAB_MEMORY=96M LAB_MEM="" LAB_TIMEOUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs)        RUNS="$2"; shift 2 ;;
    --n)           NS="$2"; shift 2 ;;
    --parallel)    PARALLEL="$2"; shift 2 ;;
    --idle)        IDLE="$2"; shift 2 ;;
    --up-timeout)  UP_TIMEOUT="$2"; shift 2 ;;
    --out)         OUT="$2"; shift 2 ;;
    --ferrovisor)  FV="$2"; shift 2 ;;
    --qemu)        QEMU_BIN="$2"; shift 2 ;;
    --lab)         LAB=1; shift ;;
    --no-host)     HOST=0; shift ;;
    --lab-n)       LAB_NS="$2"; shift 2 ;;
    --lab-runs)    LAB_RUNS="$2"; shift 2 ;;
    --lab-memory)  LAB_MEMORY="$2"; shift 2 ;;
    --lab-mem)     LAB_MEM="$2"; shift 2 ;;
    --lab-timeout) LAB_TIMEOUT="$2"; shift 2 ;;
    -h|--help)     usage 0 ;;
    *) echo "daemon.sh: unknown argument: $1" >&2; usage ;;
  esac
done
die() { echo "daemon.sh: $*" >&2; exit 1; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"; }
posint --runs "$RUNS"; posint --lab-runs "$LAB_RUNS"; posint --parallel "$PARALLEL"
[[ "$IDLE" =~ ^[0-9]+$ ]] || die "--idle must be whole seconds"
[ -z "$UP_TIMEOUT" ] || posint --up-timeout "$UP_TIMEOUT"
for n in $NS $LAB_NS; do posint "--n/--lab-n" "$n"; done
[[ "$LAB_MEMORY" =~ ^[1-9][0-9]*M$ ]] || die "--lab-memory must be in MiB, e.g. 96M"
[ -z "$LAB_MEM" ] || posint --lab-mem "$LAB_MEM"
[ -z "$LAB_TIMEOUT" ] || posint --lab-timeout "$LAB_TIMEOUT"
[ "$HOST" = 1 ] || [ "$LAB" = 1 ] || die "--no-host without --lab: nothing to do"
[ -x "$FV" ] || die "$FV: no such executable; build it first (cargo build --release)"
if [ -z "$QEMU_BIN" ] || [ ! -x "$QEMU_BIN" ]; then
  die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
fi
command -v python3 >/dev/null || die "python3 not found"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/daemon-run"
rm -rf "$WORK"; mkdir -p "$WORK"

# The converter: BENCH-VM / BENCH-SET lines (written by the host driver below
# and by bench/daemon-lab.sh in the lab, same format) -> samples. Times in the
# lines are seconds on one clock (the driver's CLOCK_MONOTONIC on the host,
# busybox's $EPOCHREALTIME in the lab), memory in kB, CPU in ms.
cat > "$WORK/convert.py" <<'EOF'
import math, statistics, sys
raw, out, part, tunit = sys.argv[1:5]
scale = 1000.0 if tunit == "ms" else 1.0
nd = 1 if tunit == "ms" else 2
sets, vms = {}, {}
for line in open(raw, encoding="utf-8", errors="replace"):
    line = line.strip().replace("\r", "")
    kind, _, rest = line.partition(" ")
    if kind not in ("BENCH-VM", "BENCH-SET"):
        continue
    f = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    if f.get("part") != part:
        continue
    key = (f["vmm"], int(f["n"]), int(f["run"]))
    if kind == "BENCH-SET":
        sets[key] = f
    else:
        vms.setdefault(key, []).append(f)

def num(f, k):
    try:
        v = float(f.get(k, "NA"))
        return v if math.isfinite(v) else None
    except ValueError:
        return None

def p95(v):
    # nearest rank: with 10 values this is the largest
    s = sorted(v)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]

label = "tiny guests" if part == "host" else "Debian guests, lab"
T, M = tunit, "MiB"
rows = []   # (metric index, N, row)
metrics = [
    ("all N guests up (first launch -> last marker)", T),
    ("all N VMs running (first launch -> last launch answered)", T),
    ("per VM: launch -> running, median", T),
    ("per VM: launch -> running, p95", T),
    ("per VM: launch -> guest marker, median", T),
    ("per VM: launch -> guest marker, p95", T),
    ("VMM RSS per VM (mean)", M),
    ("VMM PSS per VM (mean)", M),
    ("VMM peak RSS per VM (VmHWM, mean)", M),
    ("VMM RSS - guest RAM per VM (mean)", M),
    ("VMM CPU time per VM (mean)", "ms"),
    ("PSS of all processes (VMMs + daemon)", M),
    ("daemon RSS with N VMs", M),
    ("daemon peak RSS (VmHWM)", M),
    ("daemon CPU time (first launch -> sample)", "ms"),
    ("daemon start (exec -> API answers)", "ms"),
]
idx = {m: i for i, (m, _) in enumerate(metrics)}
failed = 0
guest_res = {}
for key, s in sorted(sets.items()):
    vmm, n, run = key
    wl = f"N={n} {label}"
    per = vms.get(key, [])
    ok = [v for v in per if v.get("ok") == "1"]
    complete = s.get("ok") == str(n) and len(ok) == n
    if not complete:
        failed += 1
        print(f"daemon.sh: WARNING: {vmm} N={n} run {run}: {s.get('ok', '?')} of {n} guests up; "
              f"set-wide figures are NA", file=sys.stderr)
    t0 = num(s, "t0")
    vals = {}
    def put(m, v, d=nd):
        vals[m] = "NA" if v is None else f"{v:.{d}f}"
    def tm(k):
        return [num(v, k) for v in ok if num(v, k) is not None]
    up, started = tm("t_up"), tm("t_started")
    put(metrics[0][0], (max(up) - t0) * scale if complete and len(up) == n else None)
    put(metrics[1][0], (max(started) - t0) * scale if complete and len(started) == n else None)
    lat_run = [(num(v, "t_started") - num(v, "t_launch")) * scale for v in ok
               if num(v, "t_started") is not None and num(v, "t_launch") is not None]
    lat_up = [(num(v, "t_up") - num(v, "t_launch")) * scale for v in ok
              if num(v, "t_up") is not None and num(v, "t_launch") is not None]
    put(metrics[2][0], statistics.median(lat_run) if lat_run else None)
    put(metrics[3][0], p95(lat_run) if lat_run else None)
    put(metrics[4][0], statistics.median(lat_up) if lat_up else None)
    put(metrics[5][0], p95(lat_up) if lat_up else None)
    def mean_kb(k):
        v = [num(x, k) for x in ok if num(x, k) is not None]
        return statistics.mean(v) / 1024 if v and len(v) == len(ok) else None
    put(metrics[6][0], mean_kb("rss_kb"), 2)
    put(metrics[7][0], mean_kb("pss_kb"), 2)
    put(metrics[8][0], mean_kb("hwm_kb"), 2)
    own = [num(x, "rss_kb") - num(x, "guest_kb") for x in ok
           if num(x, "rss_kb") is not None and num(x, "guest_kb") is not None]
    if part != "host":
        # The tiny guest touches none of its RAM: this row would repeat RSS.
        put(metrics[9][0], statistics.mean(own) / 1024 if own and len(own) == len(ok) else None, 2)
    g = [num(x, "guest_kb") for x in ok if num(x, "guest_kb") is not None]
    if g:
        guest_res.setdefault(vmm, []).append(statistics.mean(g))
    cpu = [num(x, "cpu_ms") for x in ok if num(x, "cpu_ms") is not None]
    put(metrics[10][0], statistics.mean(cpu) if cpu else None, 1)
    pss = [num(x, "pss_kb") for x in ok if num(x, "pss_kb") is not None]
    total = sum(pss) + (num(s, "daemon_pss_kb") or 0) if complete and len(pss) == n else None
    put(metrics[11][0], total / 1024 if total is not None else None, 1)
    if vmm == "ferrovisor":
        for m, k, d, div in ((metrics[12][0], "daemon_rss_kb", 2, 1024),
                             (metrics[13][0], "daemon_hwm_kb", 2, 1024),
                             (metrics[14][0], "daemon_cpu_ms", 0, 1),
                             (metrics[15][0], "daemon_start_ms", 1, 1)):
            v = num(s, k)
            put(m, v / div if v is not None else None, d)
    for m, v in vals.items():
        unit = dict(metrics)[m]
        rows.append((idx[m], n, (wl, m, unit, vmm, str(run), v)))
rows.sort(key=lambda r: (r[0], r[1]))
with open(out, "w", encoding="utf-8") as o:
    o.write("workload\tmetric\tunit\tvmm\trun\tvalue\n")
    for _, _, r in rows:
        o.write("\t".join(r) + "\n")
# Context lines for the table's footer.
for key, s in sorted(sets.items()):
    vmm, n, run = key
    extra = ""
    if vmm == "ferrovisor" and num(s, "daemon_rss0_kb") is not None:
        extra = f", daemon RSS before the first launch {num(s, 'daemon_rss0_kb') / 1024:.1f} MiB"
    print(f"set: {vmm} N={n} run {run}: {s.get('ok')} of {n} up, load before/after "
          f"{s.get('load0', '?')} / {s.get('load1', '?')}{extra}")
for vmm, v in sorted(guest_res.items()):
    print(f"guest RAM resident (Rss of the guest-RAM mapping), mean per VM over the sets, {vmm}: "
          f"{statistics.mean(v):.0f} KiB")
if not sets:
    sys.exit("daemon.sh: no BENCH-SET lines")
sys.exit(1 if failed else 0)
EOF

FAILS=0
LOADS=()

# ----------------------------------------------------------------- host part
if [ "$HOST" = 1 ]; then
  if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    die "/dev/kvm is missing or not accessible to $(id -un)"
  fi
  # The tiny guest: the tests' firmware (tests/common/firmware.rs) that prints
  # "up\n" on COM1 and halts (cli; hlt), a 4 KiB program whose last 16 bytes
  # are the reset vector (jmp near to the image's start), at the end of a
  # 64 KiB image: QEMU loads -bios images in multiples of 64 KiB only, and
  # Ferrovisor takes any 4 KiB multiple, so both run the same file, mapped
  # at the same addresses below 4 GiB.
  FW="$WORK/up-64k.bin"
  python3 - "$FW" <<'EOF'
import sys
code = bytes([0xba, 0xf8, 0x03])                 # mov dx, 0x3f8
for b in b"up\n":
    code += bytes([0xb0, b, 0xee])               # mov al, b; out dx, al
code += bytes([0xfa, 0xf4, 0xeb, 0xfd])          # cli; hlt; jmp $-3
img = bytearray(4096)
img[:len(code)] = code
img[0xff0:0xff3] = bytes([0xe9, 0x0d, 0xf0])     # reset vector: jmp near 0xf000
open(sys.argv[1], "wb").write(bytes(61440) + bytes(img))
EOF

  RAW="$WORK/daemon-raw.log"
  cat > "$WORK/driver.py" <<'EOF'
# The host driver: for each run and N, both VMMs (alternating which goes first).
import ctypes, http.client, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor

P = json.loads(sys.argv[1])
FV, QEMU, FW, MEM = P["fv"], P["qemu"], P["fw"], P["mem"]
PAR, IDLE, UP_TIMEOUT, POLL, WORK = P["parallel"], P["idle"], P["up_timeout"], P["poll"], P["work"]
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")
MEM_KB = int(MEM.rstrip("M")) * 1024
raw = open(P["raw"], "a", buffering=1)
mono = time.monotonic

# QEMU -daemonize and VMMs a stopped daemon leaves behind are re-parented to the
# nearest subreaper: be it, so that they are reaped here (PID 1 may not reap).
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER

def log(msg):
    print(f"daemon.sh: {msg}", file=sys.stderr, flush=True)

def loadavg():
    return "/".join(open("/proc/loadavg").read().split()[:3])

def status_kb(pid, key):
    try:
        for l in open(f"/proc/{pid}/status"):
            if l.startswith(key + ":"):
                return int(l.split()[1])
    except OSError:
        pass
    return None

def pss_kb(pid):
    try:
        for l in open(f"/proc/{pid}/smaps_rollup"):
            if l.startswith("Pss:"):
                return int(l.split()[1])
    except OSError:
        pass
    return None

def guest_kb(pid):
    """Rss of the anonymous mappings (no path) of at least half the guest RAM."""
    total, anon, size = 0, False, 0
    try:
        for l in open(f"/proc/{pid}/smaps"):
            f = l.split()
            if "-" in f[0] and not f[0].endswith(":"):
                anon, size = len(f) == 5, 0
            elif f[0] == "Size:":
                size = int(f[1])
            elif f[0] == "Rss:" and anon and size >= MEM_KB // 2:
                total += int(f[1])
    except OSError:
        return None
    return total

def cpu_ms(pid):
    """The process's CPU time: the larger of utime + stime (/proc/PID/stat: every
    thread it ever had, but in whole clock ticks) and the sum of its live threads'
    run times (/proc/PID/task/*/schedstat, ns): both are lower bounds."""
    try:
        rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        ticks = (int(rest[11]) + int(rest[12])) * TICK_MS
    except (OSError, IndexError, ValueError):
        return None
    ns = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                ns += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        pass
    return max(ticks, ns / 1e6)

def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def reap_until_gone(pids, timeout):
    deadline = mono() + timeout
    left = set(pids)
    while left and mono() < deadline:
        for p in list(left):
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
            if not alive(p):
                left.discard(p)
        time.sleep(0.02)
    for p in left:
        log(f"process {p} still there after {timeout}s: SIGKILL")
        try:
            os.kill(p, signal.SIGKILL)
            os.waitpid(p, 0)
        except OSError:
            pass

class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=180):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s

def api(sock, method, path, body=None):
    c = UnixHTTP(sock)
    try:
        c.request(method, path, body=body,
                  headers={"Content-Type": "application/json"} if body else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()

class Poller(threading.Thread):
    """Every POLL seconds, looks for the marker in each console file not yet
    seen and stamps the first time it is there (the same for both VMMs)."""
    def __init__(self, find, marker=b"up\n"):
        super().__init__(daemon=True)
        self.find, self.marker, self.seen, self.stop = find, marker, {}, threading.Event()
    def run(self):
        while not self.stop.is_set():
            for key, path in self.find().items():
                if key in self.seen:
                    continue
                try:
                    if os.stat(path).st_size < len(self.marker):
                        continue
                    with open(path, "rb") as f:
                        if self.marker in f.read():
                            self.seen[key] = mono()
                except OSError:
                    pass
            time.sleep(POLL)

def wait_up(poller, keys, t0):
    deadline = t0 + UP_TIMEOUT
    while mono() < deadline and any(k not in poller.seen for k in keys):
        time.sleep(0.01)
    poller.stop.set()
    poller.join()

def sample(pid):
    return {"rss_kb": status_kb(pid, "VmRSS"), "hwm_kb": status_kb(pid, "VmHWM"),
            "pss_kb": pss_kb(pid), "guest_kb": guest_kb(pid), "cpu_ms": cpu_ms(pid)}

def fmt(v):
    if v is None:
        return "NA"
    return f"{v:.6f}" if isinstance(v, float) else str(v)

def emit(kind, **kv):
    raw.write(kind + " part=host " + " ".join(f"{k}={fmt(v)}" for k, v in kv.items()) + "\n")

def report(vmm, n, run, res, seen, up_key):
    """res: per VM dicts with i, ts, te, ok, pid (+ id)."""
    time.sleep(IDLE)
    ok = bad = 0
    for r in res:
        up = seen.get(up_key(r)) if r["ok"] else None
        good = r["ok"] and up is not None and alive(r["pid"])
        s = sample(r["pid"]) if good else {}
        ok += good
        emit("BENCH-VM", vmm=vmm, n=n, run=run, i=r["i"], ok=int(good), t_launch=r["ts"],
             t_started=r["te"], t_up=up, **{k: s.get(k) for k in
                                            ("rss_kb", "pss_kb", "hwm_kb", "guest_kb", "cpu_ms")})
        if not good:
            bad += 1
            if bad <= 3:
                log(f"{vmm} N={n} run {run}: VM {r['i']} did not come up: {r.get('err', '')[-600:]}")
    if bad > 3:
        log(f"{vmm} N={n} run {run}: ... {bad} VMs in all did not come up")
    return ok

def run_ferrovisor(n, run):
    d = os.path.join(WORK, f"ferrovisor-n{n}-r{run}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    # The socket and state directory in a short temporary directory: a VM's
    # sockets are <state-dir>/vms/<32 hex>/console.sock, and a Unix socket's
    # path must fit in 108 bytes (SUN_LEN).
    short = tempfile.mkdtemp(prefix="fvbd-", dir="/tmp")
    sock, state = os.path.join(short, "api.sock"), os.path.join(short, "state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROVISOR_")}
    load0 = loadavg()
    t_exec = mono()
    dlog = open(os.path.join(d, "daemon.log"), "w")
    daemon = subprocess.Popen([FV, "daemon", "--socket", sock, "--state-dir", state,
                               "--ready-timeout", "120"],
                              stdin=subprocess.DEVNULL, stdout=dlog, stderr=subprocess.STDOUT,
                              env=env)
    t_ready = None
    while mono() - t_exec < 30 and daemon.poll() is None:
        try:
            if api(sock, "GET", "/v1/host")[0] == 200:
                t_ready = mono()
                break
        except OSError:
            pass
        time.sleep(0.005)
    if t_ready is None:
        daemon.kill()
        raise SystemExit(f"daemon.sh: the daemon did not answer: {open(dlog.name).read()[-2000:]}")
    time.sleep(0.5)
    dpid = daemon.pid
    rss0, cpu0 = status_kb(dpid, "VmRSS"), cpu_ms(dpid)
    vms_dir = os.path.join(state, "vms")
    def find():
        try:
            return {i: os.path.join(vms_dir, i, "console.log") for i in os.listdir(vms_dir)}
        except OSError:
            return {}
    poller = Poller(find)
    poller.start()
    def one(i):
        body = json.dumps({"name": f"vm{i}", "start": True,
                           "config": {"firmware": FW, "memory": MEM, "cpus": 1}})
        ts = mono()
        try:
            st, data = api(sock, "POST", "/v1/vms", body)
        except OSError as e:
            st, data = 0, str(e).encode()
        te = mono()
        r = {"i": i, "ts": ts, "te": te, "ok": False, "pid": 0, "id": None,
             "err": f"HTTP {st}: {data.decode(errors='replace')}"}
        try:
            v = json.loads(data)
            if st in (200, 201) and v.get("state") == "running":
                r.update(ok=True, pid=int(v["pid"]), id=v["id"])
        except (ValueError, KeyError, TypeError):
            pass
        return r
    t0 = mono()
    with ThreadPoolExecutor(PAR) as ex:
        res = list(ex.map(one, range(n)))
    wait_up(poller, [r["id"] for r in res if r["ok"]], t0)
    ok = report("ferrovisor", n, run, res, poller.seen, lambda r: r["id"])
    cpu1 = cpu_ms(dpid)
    emit("BENCH-SET", vmm="ferrovisor", n=n, run=run, t0=t0, ok=ok, load0=load0, load1=loadavg(),
         daemon_start_ms=(t_ready - t_exec) * 1000, daemon_rss0_kb=rss0,
         daemon_rss_kb=status_kb(dpid, "VmRSS"), daemon_hwm_kb=status_kb(dpid, "VmHWM"),
         daemon_pss_kb=pss_kb(dpid),
         daemon_cpu_ms=None if cpu0 is None or cpu1 is None else cpu1 - cpu0)
    # Tear down: delete every VM (force: stop its VMM), then stop the daemon.
    def delete(i):
        try:
            st, data = api(sock, "DELETE", f"/v1/vms/vm{i}?force=true")
            if st not in (200, 204):
                log(f"DELETE vm{i}: HTTP {st}: {data[:200]!r}")
        except OSError as e:
            log(f"DELETE vm{i}: {e}")
    with ThreadPoolExecutor(PAR) as ex:
        list(ex.map(delete, range(n)))
    reap_until_gone([r["pid"] for r in res if r["pid"]], 15)
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        log("the daemon ignored SIGTERM: SIGKILL")
        daemon.kill()
        daemon.wait()
    if ok == n:
        shutil.rmtree(short, ignore_errors=True)
    else:
        log(f"kept the daemon's state directory {state}")
    return ok

def qemu_cmd(d, i):
    # bench/vmms.sh's QEMU machine and flags, with the tiny guest's firmware,
    # the console in a file, and -daemonize: the launch returns once the VM
    # runs (QEMU's parent exits after vm_start), like the API's answer.
    return [QEMU, "-M", "microvm,isa-serial=on,rtc=on", "-accel", "kvm", "-cpu", "host",
            "-smp", "1", "-m", MEM, "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{d}/vm{i}.out", "-bios", FW,
            "-daemonize", "-pidfile", f"{d}/vm{i}.pid"]

def run_qemu(n, run):
    d = os.path.join(WORK, f"qemu-n{n}-r{run}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    load0 = loadavg()
    files = {i: f"{d}/vm{i}.out" for i in range(n)}
    poller = Poller(lambda: files)
    poller.start()
    def one(i):
        ts = mono()
        with open(f"{d}/vm{i}.err", "w") as err:
            rc = subprocess.call(qemu_cmd(d, i), stdin=subprocess.DEVNULL, stdout=err,
                                 stderr=subprocess.STDOUT)
        te = mono()
        r = {"i": i, "ts": ts, "te": te, "ok": False, "pid": 0,
             "err": f"exit {rc}: {open(f'{d}/vm{i}.err').read()}"}
        try:
            if rc == 0:
                r.update(ok=True, pid=int(open(f"{d}/vm{i}.pid").read().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
        return r
    t0 = mono()
    with ThreadPoolExecutor(PAR) as ex:
        res = list(ex.map(one, range(n)))
    wait_up(poller, [r["i"] for r in res if r["ok"]], t0)
    ok = report("qemu", n, run, res, poller.seen, lambda r: r["i"])
    emit("BENCH-SET", vmm="qemu", n=n, run=run, t0=t0, ok=ok, load0=load0, load1=loadavg())
    pids = [r["pid"] for r in res if r["pid"]]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    reap_until_gone(pids, 15)
    return ok

for run in range(1, P["runs"] + 1):
    for n in P["ns"]:
        order = ["ferrovisor", "qemu"] if run % 2 else ["qemu", "ferrovisor"]
        for vmm in order:
            t = mono()
            log(f"run {run}/{P['runs']} N={n} {vmm}: starting (load {loadavg()})")
            ok = (run_ferrovisor if vmm == "ferrovisor" else run_qemu)(n, run)
            log(f"run {run}/{P['runs']} N={n} {vmm}: {ok} of {n} up, set took {mono() - t:.1f}s")
EOF

  PARAMS=$(python3 -c 'import json, sys; a = sys.argv
print(json.dumps({"fv": a[1], "qemu": a[2], "fw": a[3], "mem": "32M", "parallel": int(a[4]),
                  "idle": int(a[5]), "up_timeout": int(a[6]), "poll": 0.002, "work": a[7],
                  "raw": a[8], "runs": int(a[9]), "ns": [int(x) for x in a[10].split()]}))' \
    "$FV" "$QEMU_BIN" "$FW" "$PARALLEL" "$IDLE" "${UP_TIMEOUT:-60}" "$WORK" "$RAW" "$RUNS" "$NS")
  FLAVOUR="$("$FV" host 2>/dev/null | sed -n 's/^KVM flavour: *//p')"
  echo "daemon.sh: host part: N in {$NS} x $RUNS run(s) x {ferrovisor, qemu}, $PARALLEL launches in flight, /dev/kvm: ${FLAVOUR:-?}; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  python3 "$WORK/driver.py" "$PARAMS" || { echo "daemon.sh: the host driver failed" >&2; FAILS=$((FAILS + 1)); }
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  cp "$RAW" "$OUT/daemon-raw.log"
  python3 "$WORK/convert.py" "$RAW" "$OUT/daemon-samples.tsv" host ms > "$WORK/sets.txt" ||
    FAILS=$((FAILS + 1))
  {
    echo
    python3 "$BENCH/plot.py" "$OUT/daemon-samples.tsv" \
      --title "N idle VMs started at once: daemon API vs QEMU processes (tiny guest, 1 vCPU, 32 MiB, /dev/kvm: ${FLAVOUR:-?}; $RUNS run(s))" \
      --svg "$OUT/daemon.svg"
    echo
    echo "ratio = QEMU median / Ferrovisor median (> 1: Ferrovisor faster or leaner); daemon rows: Ferrovisor only"
    echo "launch: Ferrovisor = POST /v1/vms {\"start\": true} (answered once the VM runs); QEMU = qemu-system-x86_64 ... -daemonize (returns once the VM runs); $PARALLEL in flight"
    echo "marker: \"up\" in the guest's console file (Ferrovisor: <state-dir>/vms/<id>/console.log, written by the daemon; QEMU: -serial file:), polled every 2 ms"
    echo "memory sampled after all guests are up and ${IDLE} s idle; PSS counts shared pages (binary, libraries) once over all processes"
    echo "command: ferrovisor daemon --socket S --state-dir D --ready-timeout 120; POST /v1/vms {\"name\": \"vmI\", \"config\": {\"firmware\": FW, \"memory\": \"32M\", \"cpus\": 1}, \"start\": true}"
    echo "command: qemu-system-x86_64 -M microvm,isa-serial=on,rtc=on -accel kvm -cpu host -smp 1 -m 32M -nodefaults -no-user-config -display none -serial file:OUT -bios FW -daemonize -pidfile PID"
    echo "guest: FW = 64 KiB image, a 4 KiB real-mode program at its end: prints \"up\" on COM1, then cli; hlt"
    cat "$WORK/sets.txt"
    echo "info: $("$FV" --version 2>/dev/null || echo ferrovisor) / $("$QEMU_BIN" --version | head -n1); host: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), load before/after ${LOADS[0]} / ${LOADS[1]}"
  } | tee "$OUT/daemon.txt"
  echo "daemon.sh: wrote $OUT/daemon.txt, $OUT/daemon.svg, $OUT/daemon-samples.tsv, $OUT/daemon-raw.log" >&2
fi

# ------------------------------------------------------------------ lab part
if [ "$LAB" = 1 ]; then
  GMIB=${LAB_MEMORY%M}
  NMAX=0 NSUM=0
  for n in $LAB_NS; do NSUM=$((NSUM + n)); [ "$n" -le "$NMAX" ] || NMAX=$n; done
  if [ -z "$LAB_MEM" ]; then
    LAB_MEM=$((1024 + NMAX * (GMIB + 24)))
    [ "$LAB_MEM" -ge 3072 ] || LAB_MEM=3072
  fi
  [ -n "$LAB_TIMEOUT" ] || LAB_TIMEOUT=$((180 + LAB_RUNS * NSUM * 2 * 20))
  cat > "$WORK/params" <<EOF
RUNS=$LAB_RUNS
NS="$LAB_NS"
PARALLEL=$PARALLEL
IDLE=$IDLE
UP_TIMEOUT=${UP_TIMEOUT:-600}
MEM=$LAB_MEMORY
CPUS=1
CMDLINE="quiet fv.action=hold fv.hold=86400"
MARKER=FERROVISOR-INIT-REACHED
POLL=0.1
EOF
  command -v curl >/dev/null || die "curl not found (the lab part sends the API requests with it)"
  LOG="$OUT/daemon-lab.log"
  echo "daemon.sh: lab part: N in {$LAB_NS} x $LAB_RUNS run(s) x {ferrovisor, qemu}, guests ${LAB_MEMORY}/1 vCPU, lab ${LAB_MEM} MiB (timeout ${LAB_TIMEOUT}s); console in $LOG" >&2
  LAB_LOAD0="$(cut -d' ' -f1-3 /proc/loadavg)"
  set +e
  "$REPO/tests/lab/lab.sh" --with-qemu --ferrovisor "$FV" --timeout "$LAB_TIMEOUT" --mem "$LAB_MEM" \
    --scenario "$BENCH/daemon-lab.sh" --add "$WORK/params:/bench/params" \
    --add "$(command -v curl):/usr/bin/curl" \
    > "$LOG" 2> "$WORK/lab.stderr" < /dev/null &
  LAB_PID=$!
  tail -n +1 --pid="$LAB_PID" -F "$LOG" 2>/dev/null | sed -u 's/\r$//' |
    grep --line-buffered -E '^(BENCH-(INFO|PROGRESS|WARN|DONE|ERROR)|LAB-(BOOTED|KVM|VERDICT))' >&2 &
  TAIL_PID=$!
  wait "$LAB_PID"; LAB_RC=$?
  wait "$TAIL_PID" 2>/dev/null
  python3 "$WORK/convert.py" "$LOG" "$OUT/daemon-lab-samples.tsv" lab s > "$WORK/lab-sets.txt"
  CONV_RC=$?
  set -e
  if [ "$LAB_RC" != 0 ]; then
    echo "daemon.sh: the lab session failed (lab.sh exit $LAB_RC): see $LOG and $WORK/lab.stderr" >&2
    tail -n 5 "$WORK/lab.stderr" >&2
    FAILS=$((FAILS + 1))
  fi
  [ "$CONV_RC" = 0 ] || FAILS=$((FAILS + 1))
  if [ -s "$OUT/daemon-lab-samples.tsv" ] && [ "$(wc -l < "$OUT/daemon-lab-samples.tsv")" -gt 1 ]; then
    {
      echo
      python3 "$BENCH/plot.py" "$OUT/daemon-lab-samples.tsv" \
        --title "N idle Debian guests started at once in the lab (nested KVM): daemon API vs QEMU processes (1 vCPU, $LAB_MEMORY; $LAB_RUNS run(s))" \
        --svg "$OUT/daemon-lab.svg"
      echo
      echo "ratio = QEMU median / Ferrovisor median (> 1: Ferrovisor faster or leaner); daemon rows: Ferrovisor only"
      echo "launch: Ferrovisor = curl POST /v1/vms {\"start\": true}; QEMU = qemu-system-x86_64 ... -daemonize; $PARALLEL in flight (busybox xargs -P)"
      echo "marker: FERROVISOR-INIT-REACHED (the guest's /init, after its modules) in the console file, polled every 0.1 s"
      echo "memory sampled after all guests are up and ${IDLE} s idle; 'RSS - guest RAM' subtracts the Rss of the guest-RAM mapping(s)"
      grep -a '^BENCH-CMD ' "$LOG" | tr -d '\r' | sed 's/^BENCH-CMD /command: /'
      cat "$WORK/lab-sets.txt"
      grep -a '^BENCH-INFO ' "$LOG" | tr -d '\r' | sed 's/^BENCH-INFO /info: /'
      echo "info: lab ${LAB_MEM} MiB, 2 vCPUs (QEMU-TCG); host: $(nproc) CPUs, load before/after $LAB_LOAD0 / $(cut -d' ' -f1-3 /proc/loadavg)"
    } | tee "$OUT/daemon-lab.txt"
    echo "daemon.sh: wrote $OUT/daemon-lab.txt, $OUT/daemon-lab.svg, $OUT/daemon-lab-samples.tsv, $LOG" >&2
  fi
fi
[ "$FAILS" = 0 ] || { echo "daemon.sh: $FAILS part(s) failed or had VMs that did not come up" >&2; exit 1; }
