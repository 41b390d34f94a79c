"""Memory of fetch's query on the catalog, by catalog size: the whole catalog read vs only the query's columns.

    python benchmarks/bench_selection.py [--bins 50000 200000 536434] [--repeats 2]

fetch starts with `catalog.selection(cfg)`: read data/catalog.parquet, keep the query's rows (status ok, counts
data.min_count..data.max_count), sort them by id, then cut them into shards (`fetch.plan_shards`). This is the
part of fetch whose memory grows with the bins catalogued; the downloads hold one shard of photos at a time.

For each size a synthetic catalog is written once, with the real schema and realistic values (6-digit ids,
keys, quoted 32-hex ETags; counts 0..11 drawn from COUNT_SHARES, a mix like ABID's, where about 70% of bins
hold 0-5 items: only that share reaches the query's result). No photo is involved. Then
each way runs in a fresh subprocess, alternating, --repeats times:

  whole     selection(cfg, read_catalog(path)): every column read, as before this benchmark
  columns   selection(cfg): read_catalog(path, QUERY_COLUMNS), what fetch does now

and records the rise of the process's peak RSS (VmHWM after the query and the shard plan, minus VmRSS once
the imports are done), and the Arrow bytes of the table read. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
WAYS = ("whole", "columns")
# share of bins holding 0, 1, ..., 11 items: a mix like ABID's, not its exact histogram
COUNT_SHARES = [0.02, 0.09, 0.15, 0.17, 0.15, 0.12, 0.09, 0.06, 0.04, 0.03, 0.02, 0.06]


def status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def write_catalog(path: Path, bins: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bincounter.data.catalog import SCHEMA

    rng = np.random.default_rng(0)
    ids = [f"{n:06d}" for n in range(1, bins + 1)]
    counts = rng.choice(len(COUNT_SHARES), size=bins, p=COUNT_SHARES)
    etags = [f'"{h:032x}"' for h in rng.integers(0, 2**63, bins).tolist()]
    none = pa.nulls(bins, pa.int32())
    table = pa.Table.from_arrays([
        pa.array(ids), pa.array(counts, pa.int32()), pa.array(np.minimum(counts, 7), pa.int32()), none, none,
        pa.array([f"metadata/{i}.json" for i in ids]), pa.array([f"bin-images/{i}.jpg" for i in ids]),
        pa.array(etags), pa.array(["ok"] * bins), pa.array([""] * bins)], schema=SCHEMA)
    pq.write_table(table, path)


def child(way: str, path: str) -> dict:
    from bincounter.config import load_config
    from bincounter.data.catalog import QUERY_COLUMNS, read_catalog, selection
    from bincounter.data.fetch import plan_shards

    cfg = load_config(None, {"data.catalog": path, "data.subset": "all"}).data
    base = status_kb("VmRSS")
    start = time.perf_counter()
    table = read_catalog(path) if way == "whole" else read_catalog(path, QUERY_COLUMNS)
    read_bytes = table.nbytes
    chosen = selection(cfg, table)
    del table
    planned = plan_shards(chosen["image_id"].combine_chunks(), chosen["count"].combine_chunks(), cfg.shard_size)
    return {"rise_mb": (status_kb("VmHWM") - base) / 1024, "read_mb": read_bytes / 2**20,
            "seconds": time.perf_counter() - start, "bins": chosen.num_rows, "shards": len(planned)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=int, nargs="+", default=[50_000, 200_000, 536_434])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("WAY", "CATALOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from bench_fetch import cpu_model

    print(f"machine: {cpu_model()}; `python benchmarks/bench_selection.py --bins "
          f"{' '.join(map(str, args.bins))} --repeats {args.repeats}`\n")
    results: list[tuple[int, str, list[dict]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for bins in sorted(args.bins):
            path = Path(tmp) / f"catalog-{bins}.parquet"
            write_catalog(path, bins)
            runs: dict[str, list[dict]] = {way: [] for way in WAYS}
            for _ in range(args.repeats):
                for way in WAYS:
                    out = subprocess.run([sys.executable, __file__, "--child", way, str(path)], check=True,
                                         capture_output=True, text=True).stdout
                    runs[way].append(json.loads(out.strip().splitlines()[-1]))
            results += [(bins, way, runs[way]) for way in WAYS]
            print(f"{bins} bins done", file=sys.stderr, flush=True)
    print_table(results)


def print_table(results: list[tuple[int, str, list[dict]]]) -> None:
    """One row per size and way; the growth per bin is the slope of the lowest rise from the smallest size."""
    print("| catalogued bins | query bins | shards | way | Arrow MB read | peak RSS rise MB (each repeat) | "
          "growth per catalogued bin since the smallest size | seconds (best) |")
    print("|---|---|---|---|---|---|---|---|")
    smallest = {way: (bins, min(r["rise_mb"] for r in runs)) for bins, way, runs in reversed(results)}
    for bins, way, runs in results:
        rise, last = min(r["rise_mb"] for r in runs), runs[-1]
        each = " / ".join(f"{r['rise_mb']:.1f}" for r in runs)
        first_bins, first_rise = smallest[way]
        slope = f"{(rise - first_rise) * 2**20 / (bins - first_bins):.0f} B" if bins > first_bins else "-"
        print(f"| {bins:,} | {last['bins']:,} | {last['shards']} | {way} | {last['read_mb']:.1f} | "
              f"{each} | {slope} | {min(r['seconds'] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
