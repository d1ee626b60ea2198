#!/usr/bin/env bash
# The cost of confinement: the same tiny guest on this host's /dev/kvm, launched unconfined
# (`ferrovisor run`) and confined (`ferrovisor run --jail`: every wall up), alternating, in one
# run. See bench/README.md.
#
#   bench/jail.sh [--runs N] [--out DIR] [--ferrovisor PATH]
#
#   --runs N          launches per arm (default 20)
#   --out DIR         where the table, plot and raw data go (default target/bench)
#   --ferrovisor PATH the binary to measure (default target/release/ferrovisor; not built here)
#
# Metrics per launch:
#   launch->guest output  from just before the exec to the first byte the guest writes to its
#                         serial port (its first instructions), read on the VMM's stdout
#   VMM RSS               the VMM's resident memory with the guest idle (control socket stats)
#   walls up              (confined only) how long `jail::enter` took, from the VMM's report
# Writes DIR/jail.txt (the table), DIR/jail.svg, DIR/jail-samples.tsv. Needs root.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { sed -n '2,17s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

RUNS=20 OUT="$REPO/target/bench" FV="$REPO/target/release/ferrovisor"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs)       RUNS="$2"; shift 2 ;;
    --out)        OUT="$2"; shift 2 ;;
    --ferrovisor) FV="$2"; shift 2 ;;
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
cat "$OUT/jail.txt"
echo "plot: $OUT/jail.svg"
