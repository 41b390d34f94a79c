"""Stage 2, fetch: download the catalog's query (the photos) into tar shards in data/raw/shards/.

The bins come from the catalog stage (`catalog.selection`: the manifest, `balanced` quotas, count and id
ranges), sorted by id and cut into shards of data.shard_size (see shards.py). Their counts come from the
catalog too, which read each bin's metadata once: fetch makes one GET a bin, the photo, and a count the
catalog changed renames the shard that holds it, so a rerun fetches it again. Concurrent (a thread pool with
many requests in flight); resumable by shard (a rerun downloads only the shards that are missing: a deleted shard
comes back alone, a killed run loses at most the shard it was writing); atomic (a shard is renamed into place
only once every bin in it is verified). Every outcome lands in data/raw/index.csv
(image_id,status,reason,count,shard) for the split stage.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tqdm import tqdm

from bincounter import files
from bincounter.config import DataConfig
from bincounter.data import shards
from bincounter.data.source import (IMAGES, MAX_WARNINGS, FailureStreak, Missing, Source, SourceUnreachable,
                                    Unreachable, limit_malloc_arenas, open_source)
from bincounter.errors import BincounterError
from bincounter.images import BadImage, verify_jpeg

if TYPE_CHECKING:  # the plan is an Arrow array made by the catalog; prepare imports this module without pyarrow
    import pyarrow as pa

SHARDS = "shards"
INDEX = "index.csv"
INDEX_COLUMNS = ["image_id", "status", "reason", "count", "shard"]


# ---------------------------------------------------------------- one bin, one shard


@dataclass
class Bin:
    """One fetched bin: its outcome and, when ok, its verified bytes."""

    status: str  # ok | rejected | failed
    reason: str = ""
    count: int | None = None
    size: tuple[int, int] | None = None
    image: bytes = b""


def fetch_bin(source: Source, image_id: str, count: int) -> Bin:
    """Download and verify one bin's photo (its count is the catalog's); a bad photo is rejected with a
    one-line reason."""
    try:
        files.safe_name(image_id)  # before any key or name is made of it
        image = source.get(f"{IMAGES}/{image_id}.jpg")
        size = verify_jpeg(image)
    except Unreachable as exc:
        return Bin("failed", str(exc))
    except (Missing, BadImage, ValueError) as exc:  # UnsafeName is a ValueError
        return Bin("rejected", str(exc))
    return Bin("ok", count=count, size=size, image=image)


def write_raw_shard(path: Path, bins: dict[str, Bin]) -> None:
    """The shard: each ok bin's <id>.jpg; its index records every planned bin's outcome and count."""
    index = {i: [b.status, b.reason, b.count, list(b.size) if b.size else None] for i, b in bins.items()}
    members = ((f"{i}.jpg", b.image) for i, b in bins.items() if b.status == "ok")
    shards.write_shard(path, members, {"bins": index})


# ---------------------------------------------------------------- the fetch itself


@dataclass
class FetchReport:
    """What one fetch did. Per-bin outcomes live in the shards' indexes and index.csv; the report keeps
    counts, and the id and reason of each bin that was not ok (a few, not one entry per bin)."""

    counts: Counter = field(default_factory=Counter)  # status -> bins this run
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (rejected | failed, reason)
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    seconds: float = 0.0


class _Fetcher:
    """Fetches planned shards one after another, the bins of each concurrently."""

    def __init__(self, source: Source, shard_dir: Path, workers: int, total: int):
        self.source, self.shard_dir = source, shard_dir
        self.pool = ThreadPoolExecutor(workers)
        self.bar = tqdm(total=total, desc=f"fetching {total} bins", unit="bin", mininterval=0.5)
        self.report = FetchReport()
        self.streak, self.warnings = FailureStreak(source), 0
        self.start = time.perf_counter()

    def shard(self, name: str, ids: list[str], counts: list[int]) -> None:
        bins: dict[str, Bin] = {}
        for image_id, outcome in zip(ids, self.pool.map(lambda i, c: fetch_bin(self.source, i, c), ids, counts)):
            bins[image_id] = outcome
            self._record(image_id, outcome)
        if any(b.status == "failed" for b in bins.values()):
            return  # not written: a rerun fetches this shard again
        write_raw_shard(self.shard_dir / name, bins)
        self.report.shards_written += 1

    def _record(self, image_id: str, outcome: Bin) -> None:
        self.report.counts[outcome.status] += 1
        if outcome.status != "ok":
            self.report.problems[image_id] = (outcome.status, outcome.reason)
        self.report.downloaded_files += outcome.status == "ok"
        self.report.downloaded_bytes += len(outcome.image)
        if outcome.status == "failed":
            self.streak.failed(outcome.reason)
        else:
            self.streak.ok()
        if outcome.status != "ok":
            self.warnings += 1
            if self.warnings <= MAX_WARNINGS:
                shown = image_id if files.SAFE_NAME.fullmatch(image_id) else repr(image_id)[:60]
                self.bar.write(f"{outcome.status}: {shown}: {outcome.reason}")
        self.bar.update()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.report.downloaded_bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.bar.close()


def complete(path: Path) -> bool:
    """A raw shard fetch can keep: its index readable and every ok bin's photo in it, whole."""
    if not path.exists():
        return False
    try:
        recorded = shards.read_index(path)["bins"]
    except (BincounterError, KeyError, TypeError):
        return False
    expected = {f"{i}.jpg" for i, entry in recorded.items() if entry[0] == "ok"}
    return shards.is_complete(path, expected)


def plan_shards(ids: pa.Array, counts: pa.Array, shard_size: int) -> dict[str, tuple[int, int]]:
    """{shard name: (start, stop) of its bins in ids and counts}; the name carries a digest of the ids and
    their counts, so a changed plan or a recount renames the shard. Slices of one Arrow array each, not a
    list per shard: a few bytes a bin."""
    return {shards.shard_name("raw", number, _planned(ids, counts, start, stop)): (start, stop)
            for number, (start, stop) in enumerate(shards.plan(len(ids), shard_size))}


def _planned(ids: pa.Array, counts: pa.Array, start: int, stop: int) -> Iterator[str]:
    return (f"{i}:{c}" for i, c in zip(_span(ids, start, stop), _span(counts, start, stop)))


def _span(values: pa.Array, start: int, stop: int) -> list:
    """One shard's values as Python objects: made a shard at a time, never for every bin at once."""
    return values.slice(start, stop - start).to_pylist()


def read_index(raw_dir: Path) -> Iterator[dict[str, str]]:
    """fetch's index.csv rows (image_id, status, reason, count, shard), read one at a time."""
    path = raw_dir / INDEX
    if not path.exists():
        raise BincounterError(f"{path} not found: run the fetch stage first (dvc repro fetch)")
    not_ours = BincounterError(f"{path} is not fetch's index ({','.join(INDEX_COLUMNS)}): rerun the fetch stage")
    handle = open(path, newline="", encoding="utf-8")
    try:
        rows = csv.DictReader(handle)
        if set(INDEX_COLUMNS) - set(rows.fieldnames or INDEX_COLUMNS):
            raise not_ours
    except (UnicodeDecodeError, csv.Error):
        handle.close()
        raise not_ours from None
    except BaseException:
        handle.close()
        raise
    return _rows(handle, rows, not_ours)


def _rows(handle, rows: csv.DictReader, not_ours: BincounterError) -> Iterator[dict[str, str]]:
    with handle:
        try:
            yield from rows
        except (UnicodeDecodeError, csv.Error):
            raise not_ours from None


def kept_bins(raw_dir: Path) -> Iterator[tuple[str, str]]:
    """(image id, the raw shard holding it) of every bin fetch kept, in the index's order (shard by shard),
    read as a stream: a dict of them would cost ~250 bytes a bin."""
    return ((row["image_id"], row["shard"]) for row in read_index(raw_dir) if row["status"] == "ok")


def kept_shards(raw_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(raw shard, the ids of the bins fetch kept in it) a shard at a time, in the index's order."""
    for shard, members in itertools.groupby(kept_bins(raw_dir), key=lambda pair: pair[1]):
        yield shard, [image_id for image_id, _ in members]


def write_index(raw_dir: Path, ids: pa.Array, planned: dict[str, tuple[int, int]], report: FetchReport) -> None:
    """index.csv from every complete shard's own index, plus the bins of shards not written (failed).
    Streamed a shard at a time."""
    files.write_csv(raw_dir / INDEX, INDEX_COLUMNS, _index_rows(raw_dir, ids, planned, report))


def _index_rows(raw_dir: Path, ids: pa.Array, planned: dict[str, tuple[int, int]],
                report: FetchReport) -> Iterator[tuple]:
    for name, (start, stop) in planned.items():
        path = raw_dir / SHARDS / name
        members = _span(ids, start, stop)
        if path.exists():
            recorded = shards.read_index(path)["bins"]
            yield from ((i, *recorded[i][:3], name) for i in members)
        else:  # its bins that arrived wait for the shard: not fetched until a rerun writes it
            unwritten = ("failed", "its shard is fetched again on the next run")
            yield from ((i, *report.problems.get(i, unwritten), "", "") for i in members)


def fetch(cfg: DataConfig) -> FetchReport:
    """Fetch the catalog's query into shards. Raises BincounterError when some downloads failed (rerun to resume)."""
    from bincounter.data.catalog import selection

    raw_dir, start = Path(cfg.raw_dir), time.perf_counter()
    # first: a thread takes its malloc arena at its first allocation, the query's Arrow threads included,
    # and with one arena per download thread RSS crept up shard after shard
    limit_malloc_arenas()
    shard_dir = raw_dir / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    files.remove_partials(shard_dir)  # what a killed fetch left, under names nothing reads
    chosen = selection(cfg)
    ids, counts = chosen["image_id"].combine_chunks(), chosen["count"].combine_chunks()
    del chosen  # the plan keeps these two columns only
    planned = plan_shards(ids, counts, cfg.shard_size)
    shards.remove_stale(shard_dir, set(planned))
    todo = {name: span for name, span in planned.items() if not complete(shard_dir / name)}
    source = open_source(cfg.source, cfg.workers)
    fetcher = _Fetcher(source, shard_dir, max(1, cfg.workers), sum(last - first for first, last in todo.values()))
    try:
        for name, (first, last) in todo.items():
            fetcher.shard(name, _span(ids, first, last), _span(counts, first, last))
    except SourceUnreachable:
        write_index(raw_dir, ids, planned, fetcher.report)  # what arrived is kept; a rerun resumes from it
        raise
    finally:
        fetcher.close()
    report = fetcher.report
    report.shards_kept, report.seconds = len(planned) - len(todo), time.perf_counter() - start
    write_index(raw_dir, ids, planned, report)
    _summarise(report, raw_dir, len(planned))
    return report


def _summarise(report: FetchReport, raw_dir: Path, planned: int) -> None:
    ok, rejected, failed = (report.counts[s] for s in ("ok", "rejected", "failed"))
    if rejected + failed > MAX_WARNINGS:
        print(f"... and {rejected + failed - MAX_WARNINGS} more (see {raw_dir / INDEX})")
    print(f"fetch: {planned} shards ({report.shards_kept} kept, {report.shards_written} written); this run: "
          f"{ok} ok, {rejected} rejected, {failed} failed, {report.downloaded_bytes / 1e6:.1f} MB in "
          f"{report.seconds:.1f}s")
    if failed:
        first = next(i for i, (status, _) in report.problems.items() if status == "failed")
        raise BincounterError(f"{failed} bins could not be downloaded (e.g. {first}: {report.problems[first][1]}); "
                              "rerun to resume")
