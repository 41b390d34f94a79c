"""Stage 3, prepare: decode and resize each image once into one uint8 array per split.

data/prepared/<split>/images.npy is (N, S, S, 3) uint8, S = prepare.image_size, loaded with mmap so
training never decodes a JPEG; labels.csv holds image_id,count in the same row order. The folders
train/, val/, test/ are the SageMaker channels train/validation/test.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bincounter.config import Config, file_sha256
from bincounter.errors import BincounterError, first_line
from bincounter.data.fetch import IMAGES
from bincounter.images import BadImage, decode_and_resize
from bincounter.data.split import SPLITS, read_split
from bincounter.files import atomic_path, remove_partials, write_csv, write_text

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.csv"
META_FILE = "meta.json"
PREPARED_FILE = "prepared.json"  # written last in each split folder: which prepare run made it, from which CSV
PR_SET_PDEATHSIG = 1


def _load(args: tuple[str, int]) -> np.ndarray | str:
    path, size = args
    try:
        return decode_and_resize(Path(path).read_bytes(), size)
    except (BadImage, OSError) as exc:
        return f"{Path(path).stem}: {exc}"


def _die_with_parent() -> None:
    """Pool worker initializer: on Linux, the kernel ends this worker when the stage process dies, even
    by SIGKILL, so an interrupted prepare leaves no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def prepare_split(rows: list[tuple[str, int]], raw_images: Path, out_dir: Path, size: int, workers: int) -> None:
    jobs = [(str(raw_images / f"{image_id}.jpg"), size) for image_id, _ in rows]
    with atomic_path(out_dir / IMAGES_FILE) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), size, size, 3))
        with ProcessPoolExecutor(workers, initializer=_die_with_parent) as pool:
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
    generation = uuid.uuid4().hex  # one prepare run: training refuses splits from different runs
    shas = {}
    for name in SPLITS:
        split_csv = Path(config.split.out_dir) / f"{name}.csv"
        if not split_csv.exists():
            raise BincounterError(f"{split_csv} not found: run the split stage first (dvc repro split)")
        (out_root / name / PREPARED_FILE).unlink(missing_ok=True)  # a split being rewritten is never complete
        if (out_root / name).is_dir():
            remove_partials(out_root / name)  # what a killed prepare left
        rows = read_split(split_csv)
        prepare_split(rows, raw_images, out_root / name, size, workers)
        shas[name] = file_sha256(split_csv)
        record = {"generation": generation, "split_csv_sha256": shas[name], "rows": len(rows), "image_size": size}
        write_text(out_root / name / PREPARED_FILE, json.dumps(record, indent=2) + "\n")
        total += len(rows)
    seconds = time.perf_counter() - start
    meta = {"image_size": size, "max_count": config.data.max_count, "layout": "NHWC uint8 RGB",
            "generation": generation, "split_csv_sha256": shas}
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
    try:
        images = np.load(images_path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise BincounterError(f"{images_path} is damaged ({first_line(exc)}); rerun `dvc repro prepare`") from None
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise BincounterError(f"{images_path} is not prepared images (N, S, S, 3) uint8; rerun `dvc repro prepare`")
    rows = read_split(split_dir / LABELS_FILE)
    if len(rows) != len(images):
        raise BincounterError(f"{split_dir}: {len(images)} images but {len(rows)} labels; rerun prepare")
    return images, [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64)


def verify_prepared(split_dirs: dict[str, Path], splits_dir: str | os.PathLike | None = None) -> None:
    """Refuse prepared splits that one prepare run did not write together (an interrupted prepare), or that
    were prepared from other split CSVs than those in splits_dir (when given and present)."""
    records = {}
    for name, folder in split_dirs.items():
        path = Path(folder) / PREPARED_FILE
        try:
            records[name] = json.loads(path.read_text())
        except FileNotFoundError:
            raise BincounterError(f"{folder} is incomplete (no {PREPARED_FILE}: an interrupted prepare?); "
                                  "rerun `dvc repro prepare`") from None
        except (ValueError, UnicodeDecodeError):
            raise BincounterError(f"{path} is unreadable; rerun `dvc repro prepare`") from None
    if len({r.get("generation") for r in records.values()}) > 1:
        raise BincounterError(f"the prepared splits {', '.join(records)} come from different prepare runs "
                              "(an interrupted prepare?); rerun `dvc repro prepare`")
    for name, record in records.items():
        split_csv = Path(splits_dir) / f"{name}.csv" if splits_dir else None
        if split_csv is not None and split_csv.is_file() and file_sha256(split_csv) != record.get("split_csv_sha256"):
            raise BincounterError(f"{split_dirs[name]} was prepared from another {split_csv} than the current one; "
                                  "rerun `dvc repro prepare`")
