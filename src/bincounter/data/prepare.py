"""Stage 3, prepare: decode and resize each image once into one uint8 array per split.

data/prepared/<split>/images.npy is (N, S, S, 3) uint8, S = prepare.image_size, loaded with mmap so
training never decodes a JPEG; labels.csv holds image_id,count in the same row order. The folders
train/, val/, test/ are the SageMaker channels train/validation/test.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bincounter.config import Config
from bincounter.errors import BincounterError
from bincounter.data.fetch import IMAGES
from bincounter.images import BadImage, decode_and_resize
from bincounter.data.split import SPLITS, read_split
from bincounter.files import atomic_path, write_csv, write_text

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.csv"
META_FILE = "meta.json"


def _load(args: tuple[str, int]) -> np.ndarray | str:
    path, size = args
    try:
        return decode_and_resize(Path(path).read_bytes(), size)
    except (BadImage, OSError) as exc:
        return f"{Path(path).stem}: {exc}"


def prepare_split(rows: list[tuple[str, int]], raw_images: Path, out_dir: Path, size: int, workers: int) -> None:
    jobs = [(str(raw_images / f"{image_id}.jpg"), size) for image_id, _ in rows]
    with atomic_path(out_dir / IMAGES_FILE) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), size, size, 3))
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_load, jobs, chunksize=16)
            for k, result in enumerate(tqdm(results, total=len(jobs), desc=f"prepare {out_dir.name}", unit="img")):
                if isinstance(result, str):
                    raise BincounterError(f"cannot prepare {result} (rerun fetch to repair data/raw)")
                array[k] = result
        array.flush()
        del array
    write_csv(out_dir / LABELS_FILE, ["image_id", "count"], rows)


def prepare(config: Config) -> dict[str, float]:
    size = config.prepare.image_size
    out_root = Path(config.prepare.out_dir)
    raw_images = Path(config.data.raw_dir) / IMAGES
    workers = config.prepare.workers or os.cpu_count() or 1
    start, total = time.perf_counter(), 0
    for name in SPLITS:
        split_csv = Path(config.split.out_dir) / f"{name}.csv"
        if not split_csv.exists():
            raise BincounterError(f"{split_csv} not found: run the split stage first (dvc repro split)")
        rows = read_split(split_csv)
        prepare_split(rows, raw_images, out_root / name, size, workers)
        total += len(rows)
    seconds = time.perf_counter() - start
    meta = {"image_size": size, "max_count": config.data.max_count, "layout": "NHWC uint8 RGB"}
    write_text(out_root / META_FILE, json.dumps(meta, indent=2) + "\n")
    stats = {"images": total, "seconds": seconds, "images_per_s_per_core": total / seconds / workers,
             "bytes_per_image": size * size * 3}
    print(f"prepare: {total} images at {size}x{size} in {seconds:.1f}s "
          f"({stats['images_per_s_per_core']:.0f} images/s/core, {stats['bytes_per_image']} bytes/image)")
    return stats


def load_prepared(split_dir: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray]:
    """-> (images mmap (N,S,S,3) uint8, image ids, counts int64) of one prepared split/channel."""
    split_dir = Path(split_dir)
    images_path = split_dir / IMAGES_FILE
    if not images_path.exists():
        raise BincounterError(f"{images_path} not found: run `dvc repro` (prepare stage) first")
    images = np.load(images_path, mmap_mode="r")
    rows = read_split(split_dir / LABELS_FILE)
    if len(rows) != len(images):
        raise BincounterError(f"{split_dir}: {len(images)} images but {len(rows)} labels; rerun prepare")
    return images, [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64)
