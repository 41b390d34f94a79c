"""Stage 3, split: label each fetched bin with EXPECTED_QUANTITY and split it 60/20/20, stratified by count.

Writes data/splits/{train,val,test}.csv (image_id,count) and rejects.csv (image_id,reason), then the
EDA report (see eda.py). Ids stay strings: '523' and '00523' are different bins.
"""

from __future__ import annotations

import csv
import os
import random
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from bincounter.config import Config
from bincounter import files
from bincounter.files import write_csv
from bincounter.errors import BincounterError
from bincounter.data.fetch import INDEX, SHARDS, read_index

SPLITS = ("train", "val", "test")


def label(raw_dir: Path, max_count: int) -> tuple[dict[str, int], dict[str, str]]:
    """-> ({image_id: count} for usable bins, {image_id: reason} for rejected ones), from fetch's index
    (the count was read from each bin's metadata when it was fetched and verified)."""
    labels: dict[str, int] = {}
    rejects: dict[str, str] = {}
    for row in read_index(raw_dir):
        image_id = row["image_id"]
        if row["status"] != "ok":
            rejects[image_id] = row["reason"] or row["status"]
            continue
        try:
            files.safe_name(image_id)
        except files.UnsafeName as exc:
            rejects[image_id] = str(exc)
            continue
        count = int(row["count"]) if (row["count"] or "").isdigit() else None
        if count is None:
            rejects[image_id] = f"count {row['count']!r} in {INDEX} is not a number (rerun fetch)"
        elif not (raw_dir / SHARDS / row["shard"]).is_file():
            rejects[image_id] = f"shard {row['shard']} missing from data/raw (rerun fetch)"
        elif count > max_count:
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


def group_of(image_id: str, group_size: int) -> str:
    """The block of group_size neighbouring ids an id belongs to. Ids of another spelling width never share
    a block ('523' and '00523' are different bins); an id that is not a number is a group of its own."""
    return f"{len(image_id)}:{int(image_id) // group_size}" if image_id.isdigit() else f"id:{image_id}"


def grouped_split(labels: dict[str, int], fractions: list[float], seed: int, group_size: int) -> dict[str, list[str]]:
    """Stratified by count, and every block of neighbouring ids on one side (scikit-learn's
    StratifiedGroupKFold: test is one fold of round(1/test fraction), val one fold of the rest)."""
    ids = sorted(labels)
    counts = [labels[i] for i in ids]
    groups = [group_of(i, group_size) for i in ids]
    test = one_fold(list(range(len(ids))), counts, groups, fractions[2], seed, "test")
    rest = [k for k in range(len(ids)) if k not in test]
    val = one_fold(rest, counts, groups, fractions[1] / (fractions[0] + fractions[1]), seed, "val")
    return {"train": [ids[k] for k in rest if k not in val], "val": [ids[k] for k in sorted(val)],
            "test": [ids[k] for k in sorted(test)]}


def one_fold(indices: list[int], counts: list[int], groups: list[str], fraction: float, seed: int,
              name: str) -> set[int]:
    from sklearn.model_selection import StratifiedGroupKFold

    folds = max(2, round(1 / fraction))
    present = len({groups[k] for k in indices})
    if present < folds:
        raise BincounterError(f"split: {present} id blocks are too few to cut a {fraction:.0%} {name} split by "
                              "groups; lower split.group_size or use split.strategy: random")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only N members": expected for rare counts
        warnings.simplefilter("ignore", UserWarning)
        _, fold = next(splitter.split(indices, [counts[k] for k in indices], [groups[k] for k in indices]))
    return {indices[k] for k in fold}


def _cut_sizes(n: int, fractions: list[float]) -> list[int]:
    exact = [n * f for f in fractions]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def read_split(path: str | os.PathLike) -> list[tuple[str, int]]:
    """(image_id, count) rows of a split CSV (or a prepared labels.csv); see iter_split."""
    return list(iter_split(path))


def iter_split(path: str | os.PathLike) -> Iterator[tuple[str, int]]:
    """(image_id, count) rows of a split CSV, read one at a time; one-line error for a hand-edited file with
    an id that is not a plain name or a count that is not a number from 0 to 2**31 - 1."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                count = int(row["count"])
                if not 0 <= count < 2**31:
                    raise ValueError(count)
                yield files.safe_name(row["image_id"]), count
    except FileNotFoundError:
        raise BincounterError(f"{path} not found: run `dvc repro`") from None
    except files.UnsafeName as exc:
        raise BincounterError(f"{path} line {reader.line_num}: {exc}") from None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error):
        raise BincounterError(f"{path} is not a split file (image_id,count rows); rerun `dvc repro`") from None


def split(config: Config) -> dict[str, list[str]]:
    raw_dir, out_dir = Path(config.data.raw_dir), Path(config.split.out_dir)
    labels, rejects = label(raw_dir, config.data.max_count)
    if not labels:
        raise BincounterError(f"no usable images in {raw_dir} (see {raw_dir / INDEX})")
    cfg = config.split
    splits = (grouped_split(labels, cfg.fractions, cfg.seed, cfg.group_size) if cfg.strategy == "grouped"
              else stratified_split(labels, cfg.fractions, cfg.seed))
    empty = [name for name, ids in splits.items() if not ids]
    if empty:
        raise BincounterError(f"split: the {' and '.join(empty)} split would be empty ({len(labels)} usable bins); "
                              "fetch more bins or change split.fractions")
    for name, ids in splits.items():
        write_csv(out_dir / f"{name}.csv", ["image_id", "count"], [(i, labels[i]) for i in ids])
    write_csv(out_dir / "rejects.csv", ["image_id", "reason"], sorted(rejects.items()))
    print(f"split ({cfg.strategy}): " + ", ".join(f"{name} {len(ids)}" for name, ids in splits.items())
          + f", rejected {len(rejects)}")
    from bincounter.data.eda import write_report

    write_report(config, splits, labels, rejects)
    return splits
