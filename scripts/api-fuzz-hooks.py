"""Schemathesis hooks of scripts/api-fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

- Two thirds of the generated VM definitions (POST /v1/vms) are made bootable, so that creates
  succeed and the lifecycle routes meet real VMs (a random string is never an existing kernel):
  one third boots a file that looks like a bzImage (it passes validation; its VMM then fails to
  load it, so a start leaves the VM crashed), one third boots a 4 KiB firmware that halts (its
  VMM really runs: pause, resume, stats, reboot, shutdown, kill), the first 40 of them started
  at once. Their name, cpus and memory are made valid too, and their resource limits dropped
  where the host has no cgroups v2 for them; the rest stays as generated. Which third is
  decided by the case's content, and the printed reproduction is the request that was sent.
- Every path a started VMM would write to (serial and console files and sockets, the vsock
  socket) is moved into a sandbox directory and TAP names get a prefix, so that fuzzing never
  writes outside the run's temporary directory.
- Shutdown timeouts are capped at 1 s, and a shutdown that would take the default gets 1 s too
  (the halting firmware ignores the power button: the default 30 s would be waited in full).
- Each answer is appended to a file (method, path, status, seconds, generation mode, the field
  a 4xx names), for the script's summary.
"""

import os
import re
import zlib

import schemathesis
from schemathesis.core import NotSet

KERNEL = os.environ["FUZZ_KERNEL"]
FIRMWARE = os.environ["FUZZ_FIRMWARE"]
SANDBOX = os.environ["FUZZ_SANDBOX"]
STATUSES = os.environ["FUZZ_STATUSES"]
# Whether the daemon can apply resource limits (cgroups v2); where it cannot, every VM with
# limits is refused, so bootable definitions leave them out.
CGROUPS = os.environ.get("FUZZ_CGROUPS") == "1"
# How many firmware VMs are started at once at most (each is a VMM process, ~12 MB): later ones
# keep the generated `start`.
MAX_FORCED_STARTS = 40
forced_starts = 0


def _inside(path, limit):
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path)[:40] or "_"
    return (SANDBOX + "/" + name)[:limit]


def _backend(value):
    if isinstance(value, str):
        for prefix in ("file=", "socket="):
            if value.startswith(prefix) and len(value) > len(prefix):
                return prefix + _inside(value[len(prefix):], 100)
    return value


def _name(name):
    name = re.sub(r"[^A-Za-z0-9._-]", "", name if isinstance(name, str) else "")
    return name.lstrip("-.") or "fz"


def _bootable(body, cfg, variant, digest):
    # A suffix from the case's content: other definitions get other names (the examples in the
    # document would all be "web-1"), the same one gets the same name (and 409 when repeated).
    body["name"] = _name(body.get("name"))[:54] + f"-{digest:08x}"
    cpus = cfg.get("cpus")
    cfg["cpus"] = 1 + cpus % 2 if isinstance(cpus, int) and not isinstance(cpus, bool) else 1
    cfg["memory"] = "32M"
    if not CGROUPS:
        body.pop("resources", None)
    if variant == 1:
        cfg.pop("firmware", None)
        cfg["kernel"] = KERNEL
    else:
        for key in ("kernel", "initrd", "cmdline"):
            cfg.pop(key, None)
        cfg["firmware"] = FIRMWARE
        global forced_starts
        if forced_starts < MAX_FORCED_STARTS:
            forced_starts += 1
            body["start"] = True


@schemathesis.hook
def before_call(context, case, kwargs):
    path, method = case.operation.path, case.method.upper()
    body = case.body
    if method == "POST" and path == "/v1/vms/{vm}/shutdown":
        if body is None or isinstance(body, NotSet):
            # The default (30 s) would be waited in full; crates/daemon/tests/api_vms.rs covers
            # shutdowns without a body.
            case.body = {"timeout_s": 1}
            case.media_type = "application/json"
        elif isinstance(body, dict):
            t = body.get("timeout_s")
            if t is None or (isinstance(t, int) and not isinstance(t, bool) and 1 < t <= 3600):
                body["timeout_s"] = 1
        return
    if method != "POST" or path != "/v1/vms":
        return
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
        return
    cfg = body["config"]
    digest = zlib.crc32(repr(body).encode())
    variant = digest % 3
    if variant:
        _bootable(body, cfg, variant, digest)
    for key in ("serial", "console"):
        if key in cfg:
            cfg[key] = _backend(cfg[key])
    vsock = cfg.get("vsock")
    if isinstance(vsock, dict) and isinstance(vsock.get("socket"), str):
        vsock["socket"] = _inside(vsock["socket"], 90)
    nets = cfg.get("nets")
    if isinstance(nets, list):
        for net in nets:
            if isinstance(net, dict) and isinstance(net.get("tap"), str) and net["tap"]:
                net["tap"] = ("fz" + net["tap"])[:15]


@schemathesis.hook
def after_call(context, case, response):
    with open(STATUSES, "a") as f:
        line = f"{case.method.upper()} {case.operation.path} {response.status_code} {response.elapsed:.3f}"
        try:
            line += " " + str(case._meta.generation.mode.value)
        except Exception:
            line += " ?"
        if response.status_code in (400, 409, 422):
            try:
                line += " " + re.sub(r"\s", "_", str(response.json().get("field")))
            except Exception:
                pass
        f.write(line + "\n")
