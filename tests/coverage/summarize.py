#!/usr/bin/env python3
"""Line coverage of include/reactor/**/*.hpp from the .gcda files of a --coverage build.

Usage: summarize.py BUILD_DIR SOURCE_DIR [--annotate OUT_DIR]

Runs gcov (JSON output, GCC 12) on every .gcda under BUILD_DIR, merges the header lines of all
translation units (a line counts as executed if any unit ran it), and prints per header: lines
executed / executable lines. Then it prints the hit count of each "named branch" listed in
tests/coverage/branches.txt, so docs/reliability.md can show that the fault-injection paths are
reached; for a line holding a condition it also prints how many of its branch outcomes were
taken. Exits 1 if a named line was never executed or cannot be found. With --annotate, writes
OUT_DIR/<header>.txt: each source line prefixed by its count ('-' not executable, '#####' never
executed).
"""
import json
import os
import subprocess
import sys
from collections import defaultdict


def gcov_json(gcda):
    # --stdout keeps gcov from littering the working directory.
    out = subprocess.run(
        ["gcov", "--json-format", "--stdout", "--branch-probabilities", "--object-directory", os.path.dirname(gcda), gcda],
        check=True, capture_output=True).stdout
    for chunk in out.splitlines():
        chunk = chunk.strip()
        if chunk:
            yield json.loads(chunk)


def main():
    args = sys.argv[1:]
    annotate = None
    if "--annotate" in args:
        i = args.index("--annotate")
        annotate = args[i + 1]
        del args[i:i + 2]
    build, source = (os.path.abspath(a) for a in args[:2])
    include = os.path.join(source, "include", "reactor") + os.sep

    counts = defaultdict(dict)  # header -> line -> count
    # header -> line -> {number of branch outcomes: counts summed outcome by outcome}; lists of
    # different lengths come from different instantiations and are kept apart.
    branch_counts = defaultdict(lambda: defaultdict(dict))
    for root, _, files in os.walk(build):
        for name in files:
            if not name.endswith(".gcda"):
                continue
            for report in gcov_json(os.path.join(root, name)):
                for entry in report.get("files", []):
                    path = os.path.normpath(os.path.join(report.get("current_working_directory", ""),
                                                         entry["file"]))
                    if not path.startswith(include):
                        continue
                    lines = counts[path[len(include):]]
                    for line in entry["lines"]:
                        number = line["line_number"]
                        lines[number] = lines.get(number, 0) + line["count"]
                        outcomes = [b["count"] for b in line.get("branches", [])
                                    if not b.get("throw")]
                        if outcomes:
                            merged = branch_counts[path[len(include):]][number]
                            old = merged.get(len(outcomes), [0] * len(outcomes))
                            merged[len(outcomes)] = [a + b for a, b in zip(old, outcomes)]

    total_hit = total = 0
    print(f"{'header':40} {'lines':>13} {'%':>6}")
    for header in sorted(counts):
        lines = counts[header]
        hit = sum(1 for c in lines.values() if c > 0)
        total_hit += hit
        total += len(lines)
        print(f"{header:40} {hit:5} / {len(lines):5} {100.0 * hit / max(len(lines), 1):6.1f}")
    print(f"{'total':40} {total_hit:5} / {total:5} {100.0 * total_hit / max(total, 1):6.1f}")

    branches = os.path.join(source, "tests", "coverage", "branches.txt")
    missed = 0
    if os.path.exists(branches):
        print("\nnamed branches (line hits, outcomes taken, header:line, what)")
        for raw in open(branches):
            raw = raw.rstrip("\n")
            if not raw or raw.startswith("#"):
                continue
            header, needle, offset, what = (part.strip() for part in raw.split("|", 3))
            text = open(os.path.join(include, header)).read().splitlines()
            found = [i + 1 for i, line in enumerate(text) if needle in line]
            if len(found) != 1:
                print(f"  {'?':>6} {'':>5} {header}: '{needle}' matches {len(found)} lines ({what})")
                missed += 1
                continue
            number = found[0] + int(offset or 0)
            hits = counts.get(header, {}).get(number)
            shown = "-" if hits is None else str(hits)
            outcomes = branch_counts.get(header, {}).get(number)
            taken = ""
            if outcomes:
                best = max(outcomes.values(), key=lambda o: (sum(1 for c in o if c), -len(o)))
                taken = f"{sum(1 for c in best if c)}/{len(best)}"
            if not hits:
                missed += 1
            print(f"  {shown:>6} {taken:>5} {header}:{number}  {what}")

    if annotate:
        os.makedirs(annotate, exist_ok=True)
        for header, lines in counts.items():
            text = open(os.path.join(include, header)).read().splitlines()
            target = os.path.join(annotate, header.replace(os.sep, "_") + ".txt")
            with open(target, "w") as out:
                for i, line in enumerate(text, 1):
                    c = lines.get(i)
                    mark = "-" if c is None else ("#####" if c == 0 else str(c))
                    out.write(f"{mark:>9}:{i:5}: {line}\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
