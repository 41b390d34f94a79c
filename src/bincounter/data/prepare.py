"""Stage 4, prepare: decode and resize each photo once into compressed training shards, one folder per split.

data/prepared/<split>/<split>-NNNNN-<digest>.tar holds <id>.jpg, the photo squashed to prepare.image_size
square and re-encoded as JPEG (prepare.jpeg_quality): about 15 kB a bin at 256 px instead of 196 kB as raw
pixels, so the whole dataset fits a training instance's disk and streams from S3. labels.csv holds
image_id,count,shard,offset,size: the loader reads one photo with one pread and decodes it in its workers
(or on the GPU). The folders train/, val/, test/ are the SageMaker channels train/validation/test.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import signal
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from bincounter.config import Config, file_sha256
from bincounter.errors import BincounterError
from bincounter.data import shards
from bincounter.data.fetch import SHARDS, kept_bins, kept_shards
from bincounter.data.split import SPLITS, iter_split
from bincounter.images import BadImage, decode_and_resize
from bincounter.files import UnsafeName, atomic_path, remove_partials, safe_name, write_text
from bincounter.storage import open_folder

LABELS_FILE = "labels.csv"
LABEL_COLUMNS = ["image_id", "count", "shard", "offset", "size"]
META_FILE = "meta.json"
PREPARED_FILE = "prepared.json"  # written last in each split folder: which prepare run made it, from which CSV
PR_SET_PDEATHSIG = 1


def _resize_shard(job: tuple[str, list[str], list[int], int, int]) -> list[tuple[str, int, bytes | str]]:
    """Pool worker: the wanted photos of one raw shard, resized and re-encoded, with their counts; a
    one-line reason instead of the photo when it is bad."""
    path, wanted, counts, size, quality = job
    out = {}
    for name, data in shards.iter_members(Path(path), {f"{i}.jpg" for i in wanted}):
        image_id = name[: -len(".jpg")]
        try:
            buffer = io.BytesIO()
            Image.fromarray(decode_and_resize(data, size)).save(buffer, "JPEG", quality=quality)
            out[image_id] = buffer.getvalue()
        except (BadImage, OSError) as exc:
            out[image_id] = f"{image_id}: {exc}"
    return [(i, c, out.get(i, f"{i}: not in {Path(path).name}")) for i, c in zip(wanted, counts)]


def _in_order(pool: ProcessPoolExecutor, fn: Callable, jobs: Iterable, window: int) -> Iterator:
    """fn(job) of each job, in the jobs' order, with at most `window` submitted and not yet read:
    Executor.map submits every job at once and keeps every result until it is read."""
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # an error or Ctrl-C: the jobs not started never start
        for future in pending:
            future.cancel()


def _die_with_parent() -> None:
    """Pool worker initializer: on Linux, the kernel ends this worker when the stage process dies, even
    by SIGKILL, so an interrupted prepare leaves no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def plan_split(split_csv: Path, raw_dir: Path) -> tuple[int, Iterator[tuple[str, list[str], list[int]]]]:
    """(rows, the split's bins as (raw shard, ids, counts), a raw shard at a time in the order of fetch's
    index). Memory holds the split's {id: count} (~100 bytes a bin) and one shard's lists: fetch's index,
    every bin fetched, is read twice as a stream instead of being held (a dict of it cost ~250 bytes a
    bin). Refuses a split naming a bin fetch did not keep, before any work. An id the index lists twice
    (fetch never does; a hand edit might) is counted and prepared once: the dict's values carry the marks
    (~count once seen, count again once taken), so deduping costs no set of ids."""
    counts = dict(iter_split(split_csv))
    for image_id, _ in kept_bins(raw_dir):
        if counts.get(image_id, -1) >= 0:
            counts[image_id] = ~counts[image_id]  # seen; a repeat of it finds a mark and is not counted again
    missing = next((image_id for image_id, marked in counts.items() if marked >= 0), None)
    if missing is not None:
        raise BincounterError(f"cannot prepare {missing}: not in fetch's index (rerun `dvc repro fetch`)")

    def take(image_id: str) -> bool:
        if counts.get(image_id, 0) >= 0:  # not in the split, or taken already
            return False
        counts[image_id] = ~counts[image_id]
        return True

    def jobs() -> Iterator[tuple[str, list[str], list[int]]]:
        for shard, members in kept_shards(raw_dir):
            ids = [image_id for image_id in members if take(image_id)]
            if ids:
                yield shard, ids, [counts[i] for i in ids]

    return len(counts), jobs()


def prepare_split(split_csv: Path, raw_dir: Path, out_dir: Path, size: int, quality: int, shard_size: int,
                  workers: int) -> tuple[int, int]:
    """Write one split's shards and labels.csv; -> (bins, bytes of photos written). Raw shards are read in
    order, one per worker task, at most two tasks a worker ahead, and output shards are flushed as they
    fill: memory holds a few shards, whatever the split."""
    total, jobs = plan_split(split_csv, raw_dir)
    # labels.csv is written as the shards are, under a temp name renamed at the end: memory holds no label list
    with atomic_path(out_dir / LABELS_FILE) as labels_tmp, open(labels_tmp, "w", newline="") as handle, \
            ProcessPoolExecutor(workers, initializer=_die_with_parent) as pool, \
            tqdm(total=total, desc=f"prepare {out_dir.name}", unit="img") as bar:
        labels = csv.writer(handle)
        labels.writerow(LABEL_COLUMNS)
        writer = _ShardWriter(out_dir, shard_size, labels.writerows)
        tasks = ((str(raw_dir / SHARDS / shard), ids, counts, size, quality) for shard, ids, counts in jobs)
        for results in _in_order(pool, _resize_shard, tasks, window=2 * workers):
            for image_id, count, result in results:
                if isinstance(result, str):
                    raise BincounterError(f"cannot prepare {result} (rerun fetch to repair data/raw)")
                writer.add(image_id, count, result)
                bar.update()
        writer.close()
    return total, writer.bytes


class _ShardWriter:
    """Buffers at most one shard of prepared photos and writes it whole."""

    def __init__(self, out_dir: Path, shard_size: int, write_labels: Callable[[Iterable[tuple]], object]):
        self.out_dir, self.shard_size, self.write_labels = out_dir, shard_size, write_labels
        self.pending: list[tuple[str, int, bytes]] = []
        self.bytes = self.number = 0

    def add(self, image_id: str, count: int, data: bytes) -> None:
        self.pending.append((image_id, count, data))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = shards.shard_name(self.out_dir.name, self.number, (f"{i}:{len(d)}" for i, _, d in self.pending))
        where = shards.write_shard(self.out_dir / name, ((f"{i}.jpg", d) for i, _, d in self.pending),
                                   {"bins": {i: c for i, c, _ in self.pending}})
        self.write_labels((i, c, name, *where[f"{i}.jpg"]) for i, c, _ in self.pending)
        self.bytes += sum(len(d) for _, _, d in self.pending)
        self.number += 1
        self.pending = []

    def close(self) -> None:
        self.flush()


def prepare(config: Config) -> dict[str, float]:
    size, quality = config.prepare.image_size, config.prepare.jpeg_quality
    out_root, raw_dir = Path(config.prepare.out_dir), Path(config.data.raw_dir)
    workers = config.prepare.workers or os.cpu_count() or 1
    start, total, stored = time.perf_counter(), 0, 0
    generation = uuid.uuid4().hex  # one prepare run: training refuses splits from different runs
    shas = {}
    for name in SPLITS:
        split_csv = Path(config.split.out_dir) / f"{name}.csv"
        if not split_csv.exists():
            raise BincounterError(f"{split_csv} not found: run the split stage first (dvc repro split)")
        out_dir = out_root / name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / PREPARED_FILE).unlink(missing_ok=True)  # a split being rewritten is never complete
        remove_partials(out_dir)  # what a killed prepare left
        shards.remove_stale(out_dir, keep=set())
        rows, written = prepare_split(split_csv, raw_dir, out_dir, size, quality, config.data.shard_size, workers)
        stored += written
        shas[name] = file_sha256(split_csv)
        record = {"generation": generation, "split_csv_sha256": shas[name], "rows": rows, "image_size": size}
        write_text(out_dir / PREPARED_FILE, json.dumps(record, indent=2) + "\n")
        total += rows
    seconds = time.perf_counter() - start
    meta = {"image_size": size, "max_count": config.data.max_count, "format": f"tar shards of {size}px JPEG",
            "jpeg_quality": quality, "generation": generation, "split_csv_sha256": shas}
    write_text(out_root / META_FILE, json.dumps(meta, indent=2) + "\n")
    stats = {"images": total, "seconds": seconds, "images_per_s_per_core": total / max(seconds, 1e-9) / workers,
             "bytes_per_image": stored / max(total, 1)}
    print(f"prepare: {total} images at {size}x{size} in {seconds:.1f}s "
          f"({stats['images_per_s_per_core']:.0f} images/s/core, {stats['bytes_per_image'] / 1e3:.1f} kB a bin)")
    return stats


def read_labels(split_dir) -> list[tuple[str, int, str, int, int]]:
    """(image_id, count, shard, offset, size) rows of one prepared split/channel (a local folder or an
    s3:// prefix), checked against its shards (present, and long enough for every photo they should hold);
    a one-line error for anything else."""
    folder = open_folder(split_dir)
    where = f"{folder.uri}/{LABELS_FILE}"
    not_labels = f"{where} is not prepared labels ({','.join(LABEL_COLUMNS)}); rerun `dvc repro prepare`"
    try:
        text = folder.read_bytes(LABELS_FILE).decode("utf-8")
    except FileNotFoundError:
        raise BincounterError(f"{where} not found: run `dvc repro` (prepare stage) first") from None
    except UnicodeDecodeError:
        raise BincounterError(not_labels) from None
    rows = []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for r in reader:
            rows.append((safe_name(r["image_id"]), int(r["count"]), safe_name(r["shard"]), int(r["offset"]),
                         int(r["size"])))
    except UnsafeName as exc:
        raise BincounterError(f"{where} line {reader.line_num}: {exc}") from None
    except (KeyError, TypeError, ValueError, csv.Error):
        raise BincounterError(not_labels) from None
    _check_shards(folder, rows)
    return rows


def _check_shards(folder, rows: list[tuple[str, int, str, int, int]]) -> None:
    needed: dict[str, int] = {}
    for _, _, shard, offset, size in rows:
        needed[shard] = max(needed.get(shard, 0), offset + size)
    lengths = folder.sizes()
    for shard, end in sorted(needed.items()):
        if shard not in lengths:
            raise BincounterError(f"{folder.uri}: shard {shard} is missing; rerun `dvc repro prepare`")
        if lengths[shard] < end:
            raise BincounterError(f"{folder.uri}/{shard} is damaged (cut short at {lengths[shard]} of {end} bytes); "
                                  "rerun `dvc repro prepare`")


def read_prepared_record(split_dir) -> dict:
    """The split's prepared.json (written last by prepare): which run wrote it, from which CSV, at what size."""
    folder = open_folder(split_dir)
    try:
        return json.loads(folder.read_bytes(PREPARED_FILE))
    except FileNotFoundError:
        raise BincounterError(f"{folder.uri} is incomplete (no {PREPARED_FILE}: an interrupted prepare?); "
                              "rerun `dvc repro prepare`") from None
    except (ValueError, UnicodeDecodeError):
        raise BincounterError(f"{folder.uri}/{PREPARED_FILE} is unreadable; rerun `dvc repro prepare`") from None


def verify_prepared(split_dirs: dict, splits_dir: str | os.PathLike | None = None) -> None:
    """Refuse prepared splits that one prepare run did not write together (an interrupted prepare), or that
    were prepared from other split CSVs than those in splits_dir (when given and present)."""
    records = {name: read_prepared_record(folder) for name, folder in split_dirs.items()}
    if len({r.get("generation") for r in records.values()}) > 1:
        raise BincounterError(f"the prepared splits {', '.join(records)} come from different prepare runs "
                              "(an interrupted prepare?); rerun `dvc repro prepare`")
    for name, record in records.items():
        split_csv = Path(splits_dir) / f"{name}.csv" if splits_dir else None
        if split_csv is not None and split_csv.is_file() and file_sha256(split_csv) != record.get("split_csv_sha256"):
            raise BincounterError(f"{split_dirs[name]} was prepared from another {split_csv} than the current one; "
                                  "rerun `dvc repro prepare`")
