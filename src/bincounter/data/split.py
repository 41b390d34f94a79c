"""Stage 2, split: label each fetched bin with EXPECTED_QUANTITY and split it 60/20/20, stratified by count.

Writes data/splits/{train,val,test}.csv (image_id,count) and rejects.csv (image_id,reason), then the
EDA report (see eda.py). Ids stay strings: '523' and '00523' are different bins.
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from pathlib import Path

from bincounter.config import Config
from bincounter.files import write_csv
from bincounter.errors import BincounterError
from bincounter.data.fetch import IMAGES, INDEX, METADATA
from bincounter.images import read_count

SPLITS = ("train", "val", "test")


def read_index(raw_dir: Path) -> list[tuple[str, str, str]]:
    path = raw_dir / INDEX
    if not path.exists():
        raise BincounterError(f"{path} not found: run the fetch stage first (dvc repro fetch)")
    with open(path, newline="") as handle:
        return [(r["image_id"], r["status"], r["reason"]) for r in csv.DictReader(handle)]


def label(raw_dir: Path, max_count: int) -> tuple[dict[str, int], dict[str, str]]:
    """-> ({image_id: count} for usable bins, {image_id: reason} for rejected ones)."""
    labels: dict[str, int] = {}
    rejects: dict[str, str] = {}
    for image_id, status, reason in read_index(raw_dir):
        if status != "ok":
            rejects[image_id] = reason or status
            continue
        if not (raw_dir / IMAGES / f"{image_id}.jpg").exists():
            rejects[image_id] = "image missing from data/raw (rerun fetch)"
            continue
        try:
            count = read_count(raw_dir / METADATA / f"{image_id}.json")
        except ValueError as exc:
            rejects[image_id] = str(exc)
            continue
        if count > max_count:
            rejects[image_id] = f"count {count} above data.max_count={max_count}"
        else:
            labels[image_id] = count
    return labels, rejects


def stratified_split(labels: dict[str, int], fractions: list[float], seed: int) -> dict[str, list[str]]:
    """Shuffle each count's ids with the seed and cut them by the fractions (largest remainder rounding)."""
    by_count: dict[int, list[str]] = defaultdict(list)
    for image_id in sorted(labels):
        by_count[labels[image_id]].append(image_id)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for count in sorted(by_count):
        ids = by_count[count]
        rng.shuffle(ids)
        sizes = _cut_sizes(len(ids), fractions)
        start = 0
        for name, size in zip(SPLITS, sizes):
            out[name] += ids[start : start + size]
            start += size
    return out


def _cut_sizes(n: int, fractions: list[float]) -> list[int]:
    exact = [n * f for f in fractions]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def read_split(path: str | os.PathLike) -> list[tuple[str, int]]:
    with open(path, newline="") as handle:
        return [(row["image_id"], int(row["count"])) for row in csv.DictReader(handle)]


def split(config: Config) -> dict[str, list[str]]:
    raw_dir, out_dir = Path(config.data.raw_dir), Path(config.split.out_dir)
    labels, rejects = label(raw_dir, config.data.max_count)
    if not labels:
        raise BincounterError(f"no usable images in {raw_dir} (see {raw_dir / INDEX})")
    splits = stratified_split(labels, config.split.fractions, config.split.seed)
    for name, ids in splits.items():
        write_csv(out_dir / f"{name}.csv", ["image_id", "count"], [(i, labels[i]) for i in ids])
    write_csv(out_dir / "rejects.csv", ["image_id", "reason"], sorted(rejects.items()))
    print(
        "split: " + ", ".join(f"{name} {len(ids)}" for name, ids in splits.items()) + f", rejected {len(rejects)}"
    )
    from bincounter.data.eda import write_report

    write_report(config, splits, labels, rejects)
    return splits
