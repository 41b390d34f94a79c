"""Does a stage's memory grow with the number of bins? Peak RSS by bins, with the photos held constant.

    python benchmarks/bench_fetch_memory.py [--sources ../shared/abid-sample] [--bins 2000 20000 50000] \
        [--photos 1000] [--workers 32] [--stages catalog fetch split prepare] [--subset manifest|all] \
        [--max-candidates N]

bench_scale.py measures every stage against the S3 emulator, but its bins cycle through photos of unequal
sizes, and fetch holds one shard of photos at a time, so its peak also follows the largest shard. Here the
photos are held constant: a local source in the bucket's layout is made of symlinks, bin n (id f"{n:06d}")
pointing at photo n % P of the first P full-size photos of --sources (with its metadata). Every shard of
1,000 bins then holds the same photos, and only the number of bins changes.

For each size, in fresh subprocesses: `bincounter catalog`, then `bincounter fetch`, each with
data.workers W (the local source reads files, no emulator: what is measured is bincounter's own process),
then, when asked, `bincounter split` and `bincounter prepare` (its parent process: the resizing workers
are children, one per core, and hold one raw shard each whatever the number of bins). `recatalog` runs
the catalog stage a second time, which reads the first run's catalog and keeps every row of it.
Reported: each stage's VmHWM (its peak RSS, read from /proc at exit), its wall time and its RSS at each
tenth of its run (psutil, sampled every 0.1 s), to tell growth that levels off from growth with every bin.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
# runs one stage through the CLI, then prints the process's own peak RSS (VmHWM, kB) on stderr
RUNS = {"recatalog": "catalog"}  # a bench stage that runs another CLI stage (again)
STAGE = """
import sys
from bincounter.cli import main
code = main(sys.argv[1:])
print("VmHWM", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")), file=sys.stderr)
sys.exit(code)
"""


def cycled_source(sources: list[Path], root: Path, bins: int, photos: int) -> None:
    """root/bin-images and root/metadata: bins symlinks cycling over the first `photos` full-size bins."""
    from bench_scale import real_bins

    real = real_bins(sources, full_size_only=True)[:photos]
    if len(real) < photos:
        raise SystemExit(f"only {len(real)} full-size bins in {sources}")
    for folder in ("bin-images", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for n in range(bins):
        photo, meta = real[n % photos]
        for target, link in ((photo, root / "bin-images" / f"{n:06d}.jpg"), (meta, root / "metadata" / f"{n:06d}.json")):
            if not link.is_symlink():
                link.symlink_to(target.resolve())


def run_stage(stage: str, settings: dict[str, str]) -> dict:
    """One stage in a subprocess; -> its peak RSS (MB), wall seconds and RSS at each tenth of the run (MB)."""
    args = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", STAGE, stage, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watched, samples = psutil.Process(proc.pid), []
    while proc.poll() is None:
        try:
            samples.append(watched.memory_info().rss / 2**20)
        except psutil.Error:
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{stage} failed: {err.strip().splitlines()[-1:]}")
    hwm = next(int(line.split()[1]) for line in err.splitlines() if line.startswith("VmHWM"))
    tenths = [samples[min(len(samples) - 1, len(samples) * k // 10)] for k in range(1, 11)] if samples else []
    return {"peak_mb": hwm / 1024, "seconds": time.perf_counter() - start, "tenths_mb": tenths,
            "summary": out.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", type=Path, default=[REPO / ".." / "shared" / "abid-sample"])
    parser.add_argument("--bins", type=int, nargs="+", default=[2000, 20000, 50000])
    parser.add_argument("--photos", type=int, default=1000, help="distinct photos the bins cycle through")
    parser.add_argument("--workers", type=int, default=32, help="data.workers")
    parser.add_argument("--stages", nargs="+", choices=("catalog", "recatalog", "fetch", "split", "prepare"),
                        default=["catalog", "fetch"], help="each needs the ones before it, in this order; "
                        "recatalog: the catalog stage again, which keeps every row of the first")
    parser.add_argument("--subset", choices=("manifest", "all"), default="manifest",
                        help="a manifest of the bins' ids, or data.subset=all: the whole listing "
                             "(each size its own source)")
    parser.add_argument("--max-candidates", type=int, default=0,
                        help="data.max_candidates with --subset all: a seeded sample of the listing (0 = all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    from bench_fetch import cpu_model

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_fetch_memory-") as tmp:
        source = Path(tmp) / "source"
        if args.subset == "manifest":  # one source, each size a manifest of its first ids
            cycled_source(args.sources, source, max(args.bins), args.photos)
        for bins in sorted(args.bins):
            work = Path(tmp) / f"run-{bins}"
            work.mkdir()
            if args.subset == "all":  # the listing is the query: a source of exactly this many bins
                cycled_source(args.sources, source := work / "source", bins, args.photos)
                subset = "all"
            else:
                subset = str(work / "manifest.json")
                Path(subset).write_text(json.dumps([f"{n:06d}" for n in range(bins)]))
            settings = {"data.source": str(source), "data.subset": subset,
                        "data.max_candidates": str(args.max_candidates),
                        "data.catalog": str(work / "catalog.parquet"), "data.raw_dir": str(work / "raw"),
                        "data.workers": str(args.workers), "data.max_count": "1000",
                        "split.out_dir": str(work / "splits"), "split.eda_dir": str(work / "eda"),
                        "prepare.out_dir": str(work / "prepared")}
            row = {"bins": bins, **{stage: run_stage(RUNS.get(stage, stage), settings) for stage in args.stages}}
            results.append(row)
            print(f"{bins} bins: {row[args.stages[-1]]['summary']}", file=sys.stderr, flush=True)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; `python benchmarks/bench_fetch_memory.py --bins "
          f"{' '.join(map(str, args.bins))} --photos {args.photos} --workers {args.workers} --stages "
          f"{' '.join(args.stages)} --subset {args.subset} --max-candidates {args.max_candidates}`\n")
    columns = (f"{s} peak RSS MB | {s} s | {s} RSS MB at each tenth of its run" for s in args.stages)
    print("| bins | " + " | ".join(columns) + " |")
    print("|---|" + "---|---|---|" * len(args.stages))
    for row in results:
        cells = [f"{row[s]['peak_mb']:.0f} | {row[s]['seconds']:.1f} | "
                 + " ".join(f"{m:.0f}" for m in row[s]["tenths_mb"]) for s in args.stages]
        print(f"| {row['bins']:,} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
