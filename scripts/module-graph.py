#!/usr/bin/env python3
"""Prints the `crate::` import edges between the top-level modules of a crate and fails if they
form a cycle. Usage: scripts/module-graph.py crates/vmm/src [crates/daemon/src ...]

A module is a top-level file or folder of src/ (`vm`, `cpu`, `api`); an edge A -> B is any
`crate::B` path (in `use` lines or inline) in A's files, tests and comments excluded.
"""
import os, re, sys

def modules(src):
    out = {}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name in ("lib.rs", "main.rs"):
            continue
        if name.endswith(".rs"):
            out[name[:-3]] = [path]
        elif os.path.isdir(path):
            out[name] = [os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs if f.endswith(".rs")]
    return out

def strip(text):
    # Drop `#[cfg(test)] mod tests { ... }` tails and comments.
    text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))

def edges(src):
    mods = modules(src)
    g = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            if os.path.basename(f) == "tests.rs":
                continue
            text = strip(open(f).read())
            for dep in re.findall(r"crate::([a-z_0-9]+)", text):
                if dep in mods and dep != m:
                    g[m].add(dep)
            # `use crate::{a, b::c}` groups
            for grp in re.findall(r"use crate::\{([^}]*)\}", text, re.S):
                for dep in re.findall(r"(?:^|[,{\s])([a-z_0-9]+)(?:::|\s*[,}]|$)", grp):
                    if dep in mods and dep != m:
                        g[m].add(dep)
    return g

def cycle(g):
    state, stack = {}, []
    def visit(n):
        state[n] = 1; stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c: return c
        state[n] = 2; stack.pop()
        return None
    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c: return c
    return None

bad = False
for src in sys.argv[1:]:
    g = edges(src)
    print(f"{src}:")
    for m in sorted(g):
        print(f"  {m} -> {', '.join(sorted(g[m])) or '(nothing)'}")
    c = cycle(g)
    if c:
        print(f"  CYCLE: {' -> '.join(c)}")
        bad = True
    else:
        print("  no cycle")
sys.exit(1 if bad else 0)
