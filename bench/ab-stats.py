#!/usr/bin/env python3
"""Summarises bench/ab.sh's samples: per arm, boots, successes, failures by kind and the
success rate; Ferrovisor against each other arm, the two-sided Fisher exact p (standard
library only). Guests the lab took down with it (`lab`) count for no arm.

    bench/ab-stats.py SAMPLES.tsv
"""
import csv
import sys
from math import comb


def fisher_two_sided(a, b, c, d):
    """Two-sided Fisher exact test of the 2x2 table [[a, b], [c, d]]: the probability, with
    the margins fixed, of a table at most as likely as the one seen."""
    row1, col1, n = a + b, a + c, a + b + c + d
    denom = comb(n, col1)

    def p(x):
        return comb(row1, x) * comb(n - row1, col1 - x) / denom

    seen = p(a)
    lo, hi = max(0, col1 - (n - row1)), min(row1, col1)
    return min(1.0, sum(p(x) for x in range(lo, hi + 1) if p(x) <= seen * (1 + 1e-7)))


def main(path):
    arms = {}
    lab = 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["result"] == "lab":
                lab += 1
                continue
            a = arms.setdefault(row["arm"], {"n": 0, "ok": 0, "kinds": {}})
            a["n"] += 1
            if row["result"] == "ok":
                a["ok"] += 1
            else:
                a["kinds"][row["result"]] = a["kinds"].get(row["result"], 0) + 1
    print(f"{'arm':<12} {'boots':>6} {'ok':>6} {'rate':>7}  failures")
    for name in sorted(arms, key=lambda n: (n != "ferrovisor", n)):
        a = arms[name]
        rate = a["ok"] / a["n"] if a["n"] else float("nan")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(a["kinds"].items())) or "-"
        print(f"{name:<12} {a['n']:>6} {a['ok']:>6} {rate:>7.1%}  {kinds}")
    print(f"guests in rounds the lab itself ended (counted for no arm): {lab}")
    fv = arms.get("ferrovisor")
    if fv:
        for name, a in sorted(arms.items()):
            if name == "ferrovisor":
                continue
            p = fisher_two_sided(fv["ok"], fv["n"] - fv["ok"], a["ok"], a["n"] - a["ok"])
            print(
                f"ferrovisor {fv['ok']}/{fv['n']} vs {name} {a['ok']}/{a['n']}: "
                f"two-sided Fisher exact p = {p:.3g}"
            )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--self-test":
        # Known values: [[35, 5], [40, 0]] -> p ~= 0.055 (the numbers).
        assert abs(fisher_two_sided(35, 5, 40, 0) - 0.0552) < 0.001
        assert fisher_two_sided(10, 0, 10, 0) == 1.0
        assert abs(fisher_two_sided(3, 1, 1, 3) - 0.486) < 0.001
        print("ab-stats self-test ok")
    else:
        main(sys.argv[1])
