#!/usr/bin/env bash
# Fuzzes the host daemon's HTTP API with schemathesis (PyPI), driven by the OpenAPI document the
# daemon serves: every documented operation gets generated requests (valid and invalid), and
# every answer must be no 5xx, a documented status, and match the documented schema.
#
#   scripts/api-fuzz.sh                     a bounded run, fixed seed (CI: about a minute)
#   scripts/api-fuzz.sh --examples 500      more cases per operation
#   scripts/api-fuzz.sh --seed random       another seed than the fixed default
#   scripts/api-fuzz.sh -- --report vcr     more arguments for `schemathesis run`
#   API_FUZZ_STATUSES=FILE scripts/api-fuzz.sh   keep each answer (method, path, status, seconds,
#                                           generation mode, refused field) in FILE
#
# The daemon is $FERROVISOR_BIN (default $CARGO_TARGET_DIR/debug/ferrovisor) on a temporary socket and
# state directory, bridged to TCP on 127.0.0.1 with socat (schemathesis speaks TCP only).
# Not fuzzed: GET /v1/vms/{vm}/console (an HTTP upgrade) and GET /v1/events/stream (an
# endless SSE stream); the daemon's own tests cover both.
#
# Schemathesis is pinned and installed once into a venv in the cache; later runs need no
# network. Exits non-zero on any failure, after printing schemathesis's reproduction (curl)
# and the end of the daemon's log.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
examples=100
seed=1
max_secs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --examples) examples="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --max-secs) max_secs="$2"; shift 2 ;;  # a time budget instead: phases repeat until spent
    --) shift; break ;;  # the rest goes to `schemathesis run`
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "api-fuzz: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

bin="${FERROVISOR_BIN:-${CARGO_TARGET_DIR:-target}/debug/ferrovisor}"
[ -x "$bin" ] || { echo "api-fuzz: $bin not found: build it (cargo build --bin ferrovisor) or set FERROVISOR_BIN" >&2; exit 1; }
bin="$(realpath "$bin")"
for tool in python3 socat curl; do
  command -v "$tool" >/dev/null || { echo "api-fuzz: $tool missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

# --- schemathesis, pinned, in a venv of its own -------------------------------------------
cache="${FERROVISOR_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/ferrovisor}"
venv="$cache/venv"
st="$venv/bin/schemathesis"
if ! "$st" --version 2>/dev/null | grep -qx "schemathesis, version $SCHEMATHESIS_VERSION"; then
  echo "api-fuzz: installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
  mkdir -p "$cache"
  python3 -m venv --clear "$venv" ||
    { echo "api-fuzz: python3 -m venv failed (scripts/install-deps.sh installs python3-venv)" >&2; exit 1; }
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >&2
fi

# --- the daemon and its TCP bridge ----------------------------------------------------------
tmp="$(mktemp -d "${TMPDIR:-/tmp}/ferrovisor-api-fuzz.XXXXXX")"
sock="$tmp/api.sock"
daemon_pid=""
socat_pid=""

api() { # METHOD PATH: a request on the Unix socket; prints the body
  curl -s --max-time 60 --unix-socket "$sock" -X "$1" "http://localhost$2"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    # VMMs outlive their daemon by design: delete (killing) every VM the run left first.
    local ids left
    ids="$(api GET /v1/vms | python3 -c 'import json,sys; [print(v["id"]) for v in json.load(sys.stdin)]' 2>/dev/null)"
    for id in $ids; do
      api DELETE "/v1/vms/$id?force=true" >/dev/null
    done
    left="$(api GET /v1/vms)"
    [ "$left" = "[]" ] || echo "api-fuzz: VMs left after cleanup: $left" >&2
  fi
  [ -n "$socat_pid" ] && kill "$socat_pid" 2>/dev/null
  if [ -n "$daemon_pid" ]; then
    kill "$daemon_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$daemon_pid" 2>/dev/null
  fi
  [ -n "$socat_pid" ] && wait "$socat_pid" 2>/dev/null
  # Any VMM still alive (the daemon died first): its command line names this run's directory.
  local stray
  mapfile -t stray < <(pgrep -f -- "$tmp/" 2>/dev/null)
  if [ ${#stray[@]} -gt 0 ]; then
    echo "api-fuzz: killing VMMs left behind: ${stray[*]}" >&2
    kill -9 "${stray[@]}" 2>/dev/null
  fi
  if [ "$rc" -ne 0 ] && [ -s "$tmp/daemon.log" ]; then
    echo "api-fuzz: the daemon's log (end):" >&2
    tail -n 40 "$tmp/daemon.log" >&2
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A file that passes as a bzImage (boot sector signature, "HdrS"), for creates to succeed.
kernel="$tmp/bzImage"
python3 - "$kernel" <<'EOF'
import sys
b = bytearray(0x400)
b[0x1fe:0x200] = b"\x55\xaa"
b[0x202:0x206] = b"HdrS"
open(sys.argv[1], "wb").write(b)
EOF
# A firmware image that halts: 4 KiB of HLT, `hlt; jmp $-1` at the reset vector.
firmware="$tmp/halt.fw"
python3 - "$firmware" <<'EOF'
import sys
b = bytearray(b"\xf4" * 4096)
b[4096 - 16:4096 - 13] = b"\xf4\xeb\xfd"
open(sys.argv[1], "wb").write(b)
EOF
# Where started VMMs may write (serial/console files, sockets): see scripts/api-fuzz-hooks.py.
mkdir -p "$tmp/sandbox" "$tmp/cwd" "$tmp/st"

# The daemon runs in an empty directory (relative paths in fuzzed configs resolve there), in a
# session of its own: a Ctrl-C meant for this script must leave it up for the cleanup, which
# deletes the VMs through it. (setsid may fork: the daemon's pid comes from a file.)
# shellcheck disable=SC2016
setsid sh -c 'echo $$ >"$1" && cd "$2" && exec "$3" daemon --socket "$4" --state-dir "$5"' \
  sh "$tmp/daemon.pid" "$tmp/cwd" "$bin" "$sock" "$tmp/state" >"$tmp/daemon.log" 2>&1 &
for _ in $(seq 100); do
  [ -n "$daemon_pid" ] || daemon_pid="$(cat "$tmp/daemon.pid" 2>/dev/null)"
  [ -S "$sock" ] && api GET /v1/host >/dev/null && break
  if [ -n "$daemon_pid" ] && ! kill -0 "$daemon_pid" 2>/dev/null; then
    echo "api-fuzz: the daemon exited" >&2
    exit 1
  fi
  sleep 0.1
done
[ -S "$sock" ] || { echo "api-fuzz: the daemon did not open $sock" >&2; exit 1; }

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$sock" 2>"$tmp/socat.log" &
socat_pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 50); do
  curl -sf -o /dev/null "$base/openapi.json" && break
  sleep 0.1
done

echo "api-fuzz: schemathesis $SCHEMATHESIS_VERSION against $base/openapi.json (daemon $bin), seed $seed, $examples examples per operation" >&2
extra=()
[ "$seed" = random ] || extra+=(--seed "$seed")
[ -z "$max_secs" ] || extra+=(--max-time "$max_secs")
set +e
hooks="$(realpath scripts/api-fuzz-hooks.py)"
cgroups="$(api GET /v1/host | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["cgroups"]["available"]))')"
# schemathesis keeps state in ./.schemathesis: run it in the temporary directory.
cd "$tmp/st"
FUZZ_KERNEL="$kernel" FUZZ_FIRMWARE="$firmware" FUZZ_SANDBOX="$tmp/sandbox" \
FUZZ_STATUSES="$tmp/statuses" FUZZ_CGROUPS="$cgroups" SCHEMATHESIS_HOOKS="$hooks" \
  timeout --kill-after=10 "$((${max_secs:-540} + 60))" \
  "$st" run "$base/openapi.json" \
    --checks not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance \
    --exclude-path '/v1/vms/{vm}/console' \
    --exclude-path '/v1/events/stream' \
    --max-examples "$examples" \
    "${extra[@]}" "$@" \
    --generation-database none \
    --request-timeout 60 \
    --workers 1 \
    --no-color
rc=$?
set -e
cd - >/dev/null
if [ -s "$tmp/statuses" ]; then
  [ -z "${API_FUZZ_STATUSES:-}" ] || cp "$tmp/statuses" "$API_FUZZ_STATUSES"
  echo "api-fuzz: answers (status x count) by operation:" >&2
  python3 - "$tmp/statuses" >&2 <<'EOF' || echo "api-fuzz: (no summary)" >&2
import collections, sys
ops = collections.defaultdict(collections.Counter)
undocumented = 0
for line in open(sys.argv[1]):
    if len(line.split()) < 3:
        continue
    method, path, status = line.split()[:3]
    if status == "405":
        undocumented += 1
    else:
        ops[f"{method} {path}"][status] += 1
for op in sorted(ops, key=lambda o: (o.split()[1], o)):
    print(f"  {op:34} " + "  ".join(f"{s}x{n}" for s, n in sorted(ops[op].items())))
print(f"  {'(methods not served)':34} 405x{undocumented}")
EOF
fi
if [ "$rc" -ne 0 ]; then
  echo "api-fuzz: schemathesis failed (exit $rc); reproduce with the curl lines above against the daemon's socket (curl --unix-socket SOCK http://localhost/...)" >&2
  exit "$rc"
fi
echo "api-fuzz: no failures" >&2
