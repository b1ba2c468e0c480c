#!/usr/bin/env bash
# Runs every benchmark of issue 16 and writes their figures as one table into
# docs/benchmarks.md (between the `figures` markers), with each figure's goal, its anchor
# (what it is measured against, in the same run) and the date and commit of the run.
#
#   bench/report.sh                    # all of them: coldstart, router, deploy
#   bench/report.sh coldstart router   # some; the table keeps the other rows as they were
#
# Each benchmark prints, besides its own report, one line per figure:
#   figure|<name>|<value>|<goal>|<met or NOT met>
# Their whole output is kept in target/bench/<name>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(coldstart router deploy)
mkdir -p target/bench
for name in "${benches[@]}"; do
  [ -x "bench/$name.sh" ] || { echo "report.sh: no benchmark bench/$name.sh" >&2; exit 2; }
done
for name in "${benches[@]}"; do
  echo "report.sh: running bench/$name.sh (output in target/bench/$name.txt)"
  "bench/$name.sh" 2>&1 | tee "target/bench/$name.txt"
done

commit=$(git rev-parse --short HEAD)
dirty=""
git diff --quiet HEAD -- crates bench || dirty=" (with uncommitted changes)"
python3 - "$commit$dirty" "$(date -u +%Y-%m-%d)" "${benches[@]}" <<'PY'
import re, sys

commit, date, ran = sys.argv[1], sys.argv[2], sys.argv[3:]
anchors = {
    "coldstart": "none: absolute",
    "router": "nginx, same load, same run",
    "deploy": "clone, build and start by hand, same run",
}
doc_path = "docs/benchmarks.md"
doc = open(doc_path).read()
start, end = "<!-- figures:start -->", "<!-- figures:end -->"
if start not in doc:
    sys.exit(f"{doc_path} has no {start} marker")
before, rest = doc.split(start, 1)
table, after = rest.split(end, 1)

# Rows of the benchmarks not run this time are kept as they were.
kept = []
for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 7 and cells[0] in anchors and cells[0] not in ran:
        kept.append(cells)

rows = []
for name in ran:
    for line in open(f"target/bench/{name}.txt"):
        if line.startswith("figure|"):
            parts = line.rstrip("\n").split("|")
            if len(parts) != 5:
                sys.exit(f"bench/{name}.sh printed a malformed figure line: {line!r}")
            _, figure, value, goal, status = parts
            rows.append([name, figure, value, goal, status, anchors[name], f"{date}, {commit}"])
    if not any(r[0] == name for r in rows):
        sys.exit(f"bench/{name}.sh printed no figure line")

order = {name: i for i, name in enumerate(anchors)}
all_rows = sorted(kept + rows, key=lambda r: order[r[0]])
out = ["", "| bench | figure | value | goal | status | anchor | run |",
       "|---|---|---|---|---|---|---|"]
out += ["| " + " | ".join(r) + " |" for r in all_rows]
out.append("")
open(doc_path, "w").write(before + start + "\n".join(out) + "\n" + end + after)
print(f"report.sh: {len(rows)} figures written to {doc_path}")
PY
