"""Prepare throughput (images/s per core) and bytes on disk per bin, with bincounter's own stages.

    python benchmarks/bench_prepare.py [--sample ../shared/abid-sample] [--n 500] [--sizes 256 128] [--workers 1]

Builds a temp catalog.parquet + raw/shards + splits by calling bincounter's catalog and fetch stages
(data.source = the sample folder, a manifest of ids with counts <= 5) and split, then times
bincounter.prepare per size. Bytes per bin on disk are the prepared tar shards' sizes (every split, headers
and index members included) over the bins prepared; the raw JPEG size is the mean size of the .jpg members
of fetch's raw shards (the photos as the bucket serves them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = str(REPO / ".." / "shared" / "abid-sample")


def sample_ids(sample: Path, n: int, max_count: int = 5) -> list[str]:
    with open(sample / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["expected_quantity"]) <= max_count]
    return sorted(r["image_id"] for r in rows)[:n]


def make_config(root: Path, sample: Path, ids: list[str], **overrides):
    from bincounter.config import build_config

    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(ids))
    return build_config({}, {
        "data.source": str(sample), "data.subset": str(manifest), "data.raw_dir": str(root / "raw"),
        "data.catalog": str(root / "catalog.parquet"), "data.workers": 8, "split.out_dir": str(root / "splits"), "split.eda_dir": str(root / "eda"),
        "prepare.out_dir": str(root / "prepared"), **overrides})


def build_splits(root: Path, sample: Path, ids: list[str], **overrides):
    """catalog + fetch (local source) + split into root; returns the config. The catalog stage runs first:
    fetch reads its query (the manifest's bins) from data.catalog."""
    from bincounter.data.catalog import build_catalog
    from bincounter.data.fetch import fetch
    from bincounter.data.split import split

    config = make_config(root, sample, ids, **overrides)
    build_catalog(config.data)
    fetch(config.data)
    split(config)
    return config


def raw_jpeg_sizes(raw_dir: Path) -> list[int]:
    """Sizes of the photos (.jpg members) in fetch's raw shards, read from the tar headers."""
    from bincounter.data import shards
    from bincounter.data.fetch import SHARDS

    return [size for path in shards.shards_in(raw_dir / SHARDS)
            for name, (_, size) in shards.locate(path).items() if name.endswith(".jpg")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default=DEFAULT_SAMPLE)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--workers", type=int, default=1, help="prepare processes (1 = a clean per-core figure)")
    args = parser.parse_args()
    from bincounter.config import with_overrides
    from bincounter.data.prepare import prepare

    sample = Path(args.sample)
    ids = sample_ids(sample, args.n)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = build_splits(root, sample, ids)
        photos = raw_jpeg_sizes(Path(config.data.raw_dir))
        jpeg_bytes = sum(photos) / max(len(photos), 1)
        for size in args.sizes:
            out = root / f"prepared{size}"
            cfg = with_overrides(config, {"prepare.image_size": size, "prepare.out_dir": str(out),
                                          "prepare.workers": args.workers})
            t0 = time.perf_counter()
            stats = prepare(cfg)
            seconds = time.perf_counter() - t0
            on_disk = sum(p.stat().st_size for p in out.rglob("*.tar"))
            results.append((size, stats["images"], seconds, stats["images"] / seconds / args.workers,
                            on_disk / stats["images"]))
    print(f"\n{len(ids)} sample images (counts 0-5), {len(photos)} fetched, mean raw JPEG {jpeg_bytes / 1e3:.1f} kB "
          f"(raw shards); prepare.workers={args.workers}, prepare.jpeg_quality={config.prepare.jpeg_quality}, "
          f"cpu cores {os.cpu_count()}")
    print("size  images  seconds  images/s/core  bytes/bin on disk (prepared *.tar)")
    for size, n, seconds, rate, per_image in results:
        print(f"{size:4d}  {n:6d}  {seconds:7.1f}  {rate:13.1f}  {per_image:10.0f}")


if __name__ == "__main__":
    main()
