#!/usr/bin/env python3
"""The exit census of bench/boot.sh --census as tables: one per workload, exits by
reason, then the costliest kinds by reason and port / MMIO page / MSR, with each
VMM's count and time (ms) side by side. Reads the BENCH-CENSUS lines of the lab log
(see bench/boot-lab.sh). Python's standard library only.

    census-table.py LAB_LOG [--top N]
"""

import argparse
import re
import sys

LINE = re.compile(r"^BENCH-CENSUS vmm=(\S+) workload=(\S+) level=(\S) count=(\d+) us=(\d+) kind=(.*)$")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=25, help="rows of the detailed table (default 25)")
    a = ap.parse_args()
    data = {}  # workload -> level -> kind -> vmm -> (count, us)
    vmms = []
    with open(a.log, encoding="utf-8", errors="replace") as f:
        for raw in f:
            m = LINE.match(raw.strip().replace("\r", ""))
            if not m:
                continue
            vmm, wl, lvl, n, us, kind = m.groups()
            if vmm not in vmms:
                vmms.append(vmm)
            data.setdefault(wl, {}).setdefault(lvl, {}).setdefault(kind, {})[vmm] = (int(n), int(us))
    if not data:
        sys.exit(f"{a.log}: no BENCH-CENSUS lines")
    for wl, levels in data.items():
        print(f"\nExit census, {wl}: exits from exec to /init (count, ms from exit to next entry)")
        head = f"{'':44}" + "".join(f"{v:>22}" for v in vmms)
        # The total's kind is the VMM's thread count: one row for all of them.
        total = {v: c for per in levels.get("T", {}).values() for v, c in per.items()}
        startup = levels.get("S", {}).get("startup", {})
        if startup:
            print("exec to the first KVM_RUN (first kvm_entry), ms: " + ", ".join(
                f"{v} {startup[v][1] / 1000:.1f}" for v in vmms if v in startup))
        for title, lvl, top in (("by reason", "R", None), ("by reason and what", "D", a.top)):
            kinds = levels.get(lvl, {})
            order = sorted(kinds, key=lambda k: -max(us for _, us in kinds[k].values()))
            if top:
                order = order[:top]
            print(f"\n{title}:")
            print(head)
            if lvl == "R":
                print(cells("all exits", total, vmms))
            for kind in order:
                print(cells(kind, kinds[kind], vmms))


def cells(kind, per, vmms):
    out = f"{kind[:44]:44}"
    for v in vmms:
        if v in per:
            n, us = per[v]
            out += f"{n:>12} {us / 1000:>9.1f}"
        else:
            out += f"{'-':>22}"
    return out


if __name__ == "__main__":
    main()
