#!/usr/bin/env bash
# The API's cost over mutual TLS vs the Unix socket, on the same route, in one run: a daemon with
# `--listen-tls` on the loopback (certificates made here with openssl), and a client (Python's
# standard library) sending GET /v1/host (and GET /v1/vms) for a fixed time each way, on one
# kept-alive connection and with a new connection per request (a full TLS 1.3 handshake with a
# client certificate each time). See bench/README.md.
#
#   bench/api.sh [--secs S] [--out DIR] [--ferrovisor PATH]
#
#   --secs S          seconds per measurement (default 5)
#   --out DIR         where the table goes (default target/bench)
#   --ferrovisor PATH the binary to measure (default target/release/ferrovisor; not built here)
#
# Writes DIR/api.txt and DIR/api-samples.tsv. Needs root (the daemon does) and openssl.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
BENCH="$(dirname "$SELF")"
REPO="$(dirname "$BENCH")"

usage() { sed -n '2,14s/^# \{0,1\}//p' "$SELF"; exit "${1:-2}"; }

SECS=5 OUT="$REPO/target/bench" FV="$REPO/target/release/ferrovisor"
while [ $# -gt 0 ]; do
  case "$1" in
    --secs)       SECS="$2"; shift 2 ;;
    --out)        OUT="$2"; shift 2 ;;
    --ferrovisor) FV="$2"; shift 2 ;;
    -h|--help)    usage 0 ;;
    *) echo "api.sh: unknown argument: $1" >&2; usage ;;
  esac
done
die() { echo "api.sh: $*" >&2; exit 1; }
[[ "$SECS" =~ ^[1-9][0-9]*$ ]] || die "--secs must be a positive integer"
[ -x "$FV" ] || die "$FV: no such executable; build it first (cargo build --release)"
[ "$(id -u)" = 0 ] || die "needs root (the daemon does)"
command -v openssl >/dev/null || die "needs openssl"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/fv-bench-api.XXXXXX")"
DPID=""
cleanup() { [ -z "$DPID" ] || { kill "$DPID" 2>/dev/null; wait "$DPID" 2>/dev/null || true; }; rm -rf "$WORK"; }
trap cleanup EXIT

cd "$WORK"
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
# shellcheck disable=SC2086  # $ec: options, split on purpose
{
  openssl req -x509 $ec -days 2 -subj "/CN=bench CA" -keyout ca.key -out ca.pem
  openssl req $ec -subj "/CN=localhost" -keyout server.key -out server.csr
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth") -out server.pem
  openssl req $ec -subj "/O=reader/CN=bench" -keyout client.key -out client.csr
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile <(printf "extendedKeyUsage=clientAuth") -out client.pem
} >/dev/null 2>&1 || die "openssl could not make the certificates"
chmod 600 server.key client.key
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$FV" daemon --socket "$WORK/api.sock" --state-dir "$WORK/state" --listen-tls "127.0.0.1:$PORT" \
  --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem > daemon.log 2>&1 &
DPID=$!
for _ in $(seq 100); do
  [ -S "$WORK/api.sock" ] && python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT)).close()" 2>/dev/null && break
  sleep 0.1
done

python3 - "$WORK" "$PORT" "$SECS" "$OUT/api-samples.tsv" <<'PY'
import http.client, socket, ssl, sys, time
work, port, secs, samples = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=f"{work}/ca.pem")
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(f"{work}/client.pem", f"{work}/client.key")

class UnixConn(http.client.HTTPConnection):
    def __init__(self): super().__init__("localhost")
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(f"{work}/api.sock")

def tls_conn(): return http.client.HTTPSConnection("127.0.0.1", port, context=ctx)

def measure(make, route, keep_alive):
    n, lat, conn = 0, [], None
    end = time.monotonic() + secs
    while time.monotonic() < end:
        t = time.perf_counter()
        if conn is None or not keep_alive:
            if conn: conn.close()
            conn = make()
        conn.request("GET", route)
        r = conn.getresponse(); r.read()
        assert r.status == 200, r.status
        lat.append((time.perf_counter() - t) * 1000); n += 1
    if conn: conn.close()
    lat.sort()
    return n / secs, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]

with open(samples, "w") as out:
    out.write("route\tconnection\ttransport\treq_per_s\tmedian_ms\tp99_ms\n")
    for route in ("/v1/host", "/v1/vms"):
        for keep in (True, False):
            for name, make in (("unix", UnixConn), ("tls", tls_conn)):
                rps, med, p99 = measure(make, route, keep)
                out.write(f"{route}\t{'kept' if keep else 'new'}\t{name}\t{rps:.0f}\t{med:.3f}\t{p99:.3f}\n")
PY
python3 - "$OUT/api-samples.tsv" "$OUT/api.txt" "$SECS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
by = {(r[0], r[1], r[2]): r for r in rows}
lines = [f"The API over mutual TLS 1.3 vs its Unix socket ({sys.argv[3]} s per cell, one client, loopback)", "",
         f"{'route':<10} {'connection':<22} {'Unix req/s':>10} {'TLS req/s':>10} {'TLS/Unix':>9} {'Unix median/p99 ms':>19} {'TLS median/p99 ms':>18}",
         "-" * 104]
for (route, conn) in dict.fromkeys((r[0], r[1]) for r in rows):
    u, t = by[(route, conn, "unix")], by[(route, conn, "tls")]
    label = "kept alive" if conn == "kept" else "new per request"
    lines.append(f"{route:<10} {label:<22} {u[3]:>10} {t[3]:>10} {float(t[3])/float(u[3]):>9.2f} "
                 f"{u[4] + ' / ' + u[5]:>19} {t[4] + ' / ' + t[5]:>18}")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
