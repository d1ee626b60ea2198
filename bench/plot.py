#!/usr/bin/env python3
"""Summarise benchmark samples: print a table and draw an SVG bar chart.

    bench/plot.py SAMPLES.tsv --title TITLE [--table OUT.txt] [--svg OUT.svg]

SAMPLES.tsv has a header line and one sample per line, tab-separated:

    workload  metric  unit  vmm  run  value

`vmm` is `ferrovisor` or `qemu` (or the keys given with --vmms); lines whose
value is not a number (a failed run, written as `NA`) are counted but not used.
For every (workload, metric) the table shows min / median / max of each VMM and
a ratio of the medians, oriented so that > 1 means Ferrovisor is better:

* lower is better (times, memory: any unit not below): QEMU / Ferrovisor;
* higher is better when the unit is a rate, i.e. ends in "/s" (MB/s, req/s,
  Mbit/s) or is "IOPS": Ferrovisor / QEMU.

The ratio column's header names the direction: "ratio (QEMU/FV)" when every row
is lower-is-better (the boot and start-up tables), "ratio (FV/QEMU)" when every
row is higher-is-better, else "ratio (> 1: FV better)" with each cell tagged.

--vmms KEY=LABEL[:SHORT],KEY=LABEL[:SHORT] compares two other columns (first:
the subject, second: the baseline), e.g. `model=Ferrovisor model:model,
host=host file:host`; the default is `ferrovisor=Ferrovisor:FV,qemu=QEMU:QEMU`.

The SVG has one panel per metric; in each, per workload, a bar per VMM at the
median with a whisker from min to max. Python's standard library only.
"""

import argparse
import math
import statistics
import sys
from collections import OrderedDict
from xml.sax.saxutils import escape

VMMS = [("ferrovisor", "Ferrovisor", "#c0392b"), ("qemu", "QEMU", "#2c6fbb")]
SHORT = {"ferrovisor": "FV", "qemu": "QEMU"}


def higher_is_better(unit):
    """Rates (a unit ending in "/s", or IOPS) are better higher; everything else lower."""
    u = unit.strip().lower()
    return u.endswith("/s") or u == "iops"


def parse_vmms(spec):
    """KEY=LABEL[:SHORT],KEY=LABEL[:SHORT] -> (VMMS, SHORT)."""
    parts = [p for p in spec.split(",") if p]
    if len(parts) != 2 or any("=" not in p for p in parts):
        sys.exit(f"--vmms: expected KEY=LABEL[:SHORT],KEY=LABEL[:SHORT], not {spec!r}")
    vmms, short = [], {}
    for p, (_, _, colour) in zip(parts, VMMS):
        key, label = p.split("=", 1)
        label, _, sh = label.partition(":")
        vmms.append((key, label, colour))
        short[key] = sh or label
    return vmms, short


def load(path):
    """Returns (groups, failures): groups[(workload, metric, unit)][vmm] = [values]."""
    groups = OrderedDict()
    failures = OrderedDict()
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        want = ["workload", "metric", "unit", "vmm", "run", "value"]
        if header != want:
            sys.exit(f"{path}: header must be {' '.join(want)}, not {' '.join(header)}")
        for n, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) != 6:
                sys.exit(f"{path}:{n}: expected 6 tab-separated columns, got {len(cols)}")
            workload, metric, unit, vmm, _run, value = cols
            key = (workload, metric, unit)
            per = groups.setdefault(key, OrderedDict((v, []) for v, _, _ in VMMS))
            try:
                per.setdefault(vmm, []).append(float(value))
            except ValueError:
                failures[(key, vmm)] = failures.get((key, vmm), 0) + 1
    return groups, failures


def fmt(v):
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def stats(values):
    if not values:
        return None
    return min(values), statistics.median(values), max(values)


def table(groups, failures, title):
    (a, alabel, _), (b, blabel, _) = VMMS
    sa, sb = SHORT[a], SHORT[b]
    dirs = {higher_is_better(unit) for (_, _, unit) in groups}
    mixed = len(dirs) > 1
    if mixed:
        rhead = f"ratio (> 1: {sa} better)"
    elif dirs == {True}:
        rhead = f"ratio ({sa}/{sb})"
    else:
        rhead = f"ratio ({sb}/{sa})"
    rows = [["workload", "metric", "unit",
             f"{alabel} min / median / max", f"{blabel} min / median / max",
             rhead, f"n ({sa}, {sb})"]]
    for (workload, metric, unit), per in groups.items():
        cells = [workload, metric, unit]
        meds = {}
        counts = []
        for vmm, _, _ in VMMS:
            s = stats(per.get(vmm, []))
            cells.append("-" if s is None else " / ".join(fmt(x) for x in s))
            meds[vmm] = None if s is None else s[1]
            n = len(per.get(vmm, []))
            bad = failures.get(((workload, metric, unit), vmm), 0)
            counts.append(f"{n}" + (f"+{bad} failed" if bad else ""))
        f, q = meds[a], meds[b]
        hi = higher_is_better(unit)
        if hi:
            r = f"{f / q:.2f}" if q and f is not None else "-"
        else:
            r = f"{q / f:.2f}" if f and q is not None else "-"
        if mixed and r != "-":
            r += f" ({sa}/{sb})" if hi else f" ({sb}/{sa})"
        cells.append(r)
        cells.append(", ".join(counts))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [title, ""]
    for i, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def nice_max(v):
    """A round axis maximum >= v (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten)."""
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v * 1.0001:
            return m * exp
    return 10 * exp


def svg(groups, title):
    metrics = OrderedDict()
    for (workload, metric, unit), per in groups.items():
        metrics.setdefault((metric, unit), OrderedDict())[workload] = per
    W, PH, TOP, LEFT, RIGHT, BOTTOM = 760, 230, 60, 70, 20, 50
    H = TOP + len(metrics) * (PH + BOTTOM) + 10
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" '
         f'font-weight="bold">{escape(title)}</text>']
    # legend
    lx = LEFT
    for _, label, colour in VMMS:
        o.append(f'<rect x="{lx}" y="34" width="12" height="12" fill="{colour}"/>')
        o.append(f'<text x="{lx + 16}" y="44">{label}</text>')
        lx += max(110, 8 * len(label) + 30)
    o.append(f'<text x="{W - RIGHT}" y="44" text-anchor="end" fill="#555">'
             'bar: median, whisker: min–max</text>')
    y0 = TOP
    for (metric, unit), workloads in metrics.items():
        top = y0 + 20
        plot_h = PH - 20
        base = top + plot_h
        vmax = max([v for per in workloads.values() for vals in per.values() for v in vals] or [1])
        ymax = nice_max(vmax)
        better = " — higher is better" if higher_is_better(unit) else ""
        o.append(f'<text x="{LEFT}" y="{y0 + 12}" font-weight="bold">'
                 f'{escape(metric)} ({escape(unit)}){better}</text>')
        for i in range(6):
            v = ymax * i / 5
            y = base - plot_h * i / 5
            o.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" '
                     f'stroke="#ddd"/>')
            o.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" '
                     f'fill="#555">{v:g}</text>')
        o.append(f'<line x1="{LEFT}" y1="{base}" x2="{W - RIGHT}" y2="{base}" stroke="#333"/>')
        gw = (W - LEFT - RIGHT) / max(1, len(workloads))
        bw = min(60, gw / (len(VMMS) + 1.5))
        for gi, (workload, per) in enumerate(workloads.items()):
            gx = LEFT + gi * gw
            o.append(f'<text x="{gx + gw / 2:.1f}" y="{base + 18}" text-anchor="middle">'
                     f'{escape(workload)}</text>')
            x = gx + (gw - bw * len(VMMS)) / 2
            for vmm, _, colour in VMMS:
                s = stats(per.get(vmm, []))
                if s is not None:
                    lo, med, hi = s
                    sy = lambda v: base - plot_h * v / ymax
                    o.append(f'<rect x="{x + 4:.1f}" y="{sy(med):.1f}" width="{bw - 8:.1f}" '
                             f'height="{base - sy(med):.1f}" fill="{colour}" opacity="0.85"/>')
                    cx = x + bw / 2
                    o.append(f'<line x1="{cx:.1f}" y1="{sy(lo):.1f}" x2="{cx:.1f}" '
                             f'y2="{sy(hi):.1f}" stroke="black" stroke-width="1.5"/>')
                    for v in (lo, hi):
                        o.append(f'<line x1="{cx - 8:.1f}" y1="{sy(v):.1f}" x2="{cx + 8:.1f}" '
                                 f'y2="{sy(v):.1f}" stroke="black" stroke-width="1.5"/>')
                    o.append(f'<text x="{cx:.1f}" y="{sy(hi) - 5:.1f}" text-anchor="middle" '
                             f'font-size="11">{fmt(med)}</text>')
                x += bw
        y0 += PH + BOTTOM
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples")
    ap.add_argument("--title", default="Ferrovisor vs QEMU")
    ap.add_argument("--table", help="also write the table to this file")
    ap.add_argument("--svg", help="write the plot to this file")
    ap.add_argument("--vmms", help="KEY=LABEL[:SHORT],KEY=LABEL[:SHORT]: the two columns "
                    "compared (subject, baseline); default ferrovisor=Ferrovisor:FV,qemu=QEMU")
    a = ap.parse_args()
    if a.vmms:
        global VMMS, SHORT
        VMMS, SHORT = parse_vmms(a.vmms)
    groups, failures = load(a.samples)
    if not groups:
        sys.exit(f"{a.samples}: no samples")
    t = table(groups, failures, a.title)
    sys.stdout.write(t)
    if a.table:
        with open(a.table, "w", encoding="utf-8") as f:
            f.write(t)
    if a.svg:
        with open(a.svg, "w", encoding="utf-8") as f:
            f.write(svg(groups, a.title))


if __name__ == "__main__":
    main()
