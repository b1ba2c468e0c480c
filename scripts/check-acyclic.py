#!/usr/bin/env python3
"""Fails when the top-level modules of a crate import each other in a circle.

Usage: scripts/check-acyclic.py crates/server/src [more crate src dirs]

Each file under the source folder belongs to its top-level module (`hub.rs`, `lifecycle/…`).
Every `crate::<module>` it names (in `use` lines or paths) is an edge from its module to that
one. The graph must have no cycle; when it has one, the cycle is printed with the files that
make each edge.
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
GROUP = re.compile(r"\buse\s+crate::\{([^;]*)\}", re.S)


def top_module(src: Path, file: Path) -> str:
    rel = file.relative_to(src)
    return rel.parts[0].removesuffix(".rs")


def edges(src: Path):
    found = {}
    for file in sorted(src.rglob("*.rs")):
        module = top_module(src, file)
        if module in ("lib", "main"):
            continue
        text = file.read_text()
        # Tests may reach anywhere in their crate.
        text = text.split("#[cfg(test)]")[0]
        names = set(PATH.findall(text))
        for group in GROUP.findall(text):
            names.update(re.findall(r"(?:^|[,{\s])([a-z_][a-z0-9_]*)(?=::|\s*[,}]|\s*$)", group))
        for target in names:
            is_module = (src / f"{target}.rs").exists() or (src / target).is_dir()
            if target != module and is_module:
                found.setdefault((module, target), []).append(str(file))
    return found


def find_cycle(graph):
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def main():
    failed = False
    for arg in sys.argv[1:] or ["crates/server/src"]:
        src = Path(arg)
        found = edges(src)
        graph = {}
        for (a, b) in found:
            graph.setdefault(a, set()).add(b)
        cycle = find_cycle(graph)
        if cycle:
            failed = True
            print(f"{src}: modules import each other in a circle: {' -> '.join(cycle)}")
            for a, b in zip(cycle, cycle[1:]):
                print(f"  {a} -> {b}: {', '.join(sorted(set(found[(a, b)])))}")
        else:
            order = ", ".join(f"{a} -> {b}" for (a, b) in sorted(found))
            print(f"{src}: no import circle ({order})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
