"""Several bench_quality.py rows side by side on one machine, until a deadline (a GPU machine's spare capacity).

    python benchmarks/sweep_quality.py --prepared DIR --plan PLAN --parallel 4 --deadline 480 \
        --out results.md --logs logs/ -- [bench_quality.py arguments every row shares]

DIR is a --reuse folder that bench_quality.py filled before (manifest.json, splits/, prepared/). PLAN holds one
row a line, `name | bench_quality.py arguments` ('#' starts a comment). Each row runs bench_quality.py --reuse
in a folder of its own that links DIR's bins, so rows share the split and the prepared images but not their
models. Rows start in the plan's order while a slot is free and more than --min-left seconds are left; a row
still running at the deadline is stopped and listed as such. A row of 112 px resnet34 uses a small share of a
GPU, so a few at once use the machine instead of waiting on kernel launches one after another.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = ("manifest.json", "splits", "prepared")


def read_plan(path: Path) -> list[tuple[str, list[str]]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, arguments = line.partition("|")
            rows.append((name.strip(), shlex.split(arguments)))
    return rows


def row_folder(work: Path, prepared: Path, name: str) -> Path:
    folder = work / name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    for item in SHARED:
        link = folder / item
        if not link.exists():
            link.symlink_to((prepared / item).resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="a bench_quality.py --reuse folder already built")
    parser.add_argument("--plan", required=True, help="rows: `name | arguments` a line")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=480, help="seconds from start; running rows are stopped")
    parser.add_argument("--min-left", type=float, default=90, help="start no row with fewer seconds left")
    parser.add_argument("--out", required=True, help="markdown file the rows append to")
    parser.add_argument("--logs", required=True, help="folder for each row's log")
    parser.add_argument("--work", default="/tmp/sweep", help="one folder per row")
    parser.add_argument("shared", nargs=argparse.REMAINDER, help="-- then arguments every row gets first")
    args = parser.parse_args()
    shared = [a for a in args.shared if a != "--"]
    plan, logs, start = read_plan(Path(args.plan)), Path(args.logs), time.monotonic()
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    summary = []
    while plan or running:
        left = args.deadline - (time.monotonic() - start)
        while plan and len(running) < args.parallel and left > args.min_left:
            name, arguments = plan.pop(0)
            folder = row_folder(Path(args.work), Path(args.prepared), name)
            command = [sys.executable, str(HERE / "bench_quality.py"), "--reuse", str(folder), "--name", name,
                       "--out", args.out, *shared, *arguments]
            with open(logs / f"{name}.log", "w") as log:
                log.write(" ".join(shlex.quote(c) for c in command) + "\n")
                log.flush()
                running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.monotonic())
            print(f"[{time.monotonic() - start:5.0f}s] started {name}", flush=True)
        if left <= 0 or (not running and left <= args.min_left):
            for name, (process, began) in running.items():
                process.terminate()
                summary.append((name, "stopped at the deadline", time.monotonic() - began))
            summary += [(name, "not started", 0.0) for name, _ in plan]
            break
        for name, (process, began) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                summary.append((name, f"exit {process.returncode}", time.monotonic() - began))
                print(f"[{time.monotonic() - start:5.0f}s] {name}: exit {process.returncode}", flush=True)
        time.sleep(2)
    print("\n| row | outcome | seconds |\n|---|---|---|")
    for name, outcome, seconds in summary:
        print(f"| {name} | {outcome} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
