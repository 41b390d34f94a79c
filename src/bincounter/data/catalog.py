"""Stage catalog: one Parquet row per bin of the dataset's metadata (count, distinct items, keys, ETag), so
that choosing a subset is a query on a local file (`select`) rather than thousands of requests.

Resumable: a rerun keeps the rows whose object is unchanged (same ETag) and reads only the rest. Progress
is written every CHECKPOINT newly read bins, atomically, so a run killed midway keeps what it read.
"""

from __future__ import annotations

import itertools
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from bincounter import config, files
from bincounter.config import DataConfig
from bincounter.data.source import (IMAGES, MAX_WARNINGS, METADATA, FailureStreak, Missing, Source, Unreachable,
                                    listable, open_source, read_manifest)
from bincounter.errors import BincounterError, first_line
from bincounter.images import count_from_metadata, parse_metadata

SCHEMA = pa.schema([
    ("image_id", pa.string()),  # as in the bucket: '523' and '00523' are different bins
    ("count", pa.int32()),  # EXPECTED_QUANTITY; null when rejected
    ("distinct", pa.int32()),  # distinct items (len of BIN_FCSKU_DATA); null when unknown
    ("width", pa.int32()), ("height", pa.int32()),  # null: known only once the image is fetched
    ("metadata_key", pa.string()), ("image_key", pa.string()),  # relative to the source root
    ("etag", pa.string()),  # of the metadata object: a rerun skips bins whose ETag is unchanged
    ("status", pa.string()),  # ok | rejected
    ("reason", pa.string()),  # why rejected, one line; empty when ok
])
STATUS = SCHEMA.names.index("status")
QUERY_COLUMNS = ["image_id", "count", "status"]  # all a query reads: a sixth of the catalog's bytes a bin
LISTING = ("balanced", "all")  # subsets drawn from the source's listing rather than from a manifest
CHECKPOINT = 5000  # newly read bins between two writes of the catalog
ROW_GROUP = 65_536  # catalog rows per Parquet row group: what one write copies at a time
INT32_MAX = 2**31 - 1


def build_catalog(cfg: DataConfig) -> dict:
    """Write cfg.catalog; -> {"bins", "read", "kept", "rejected", "failed", "seconds"}. Raises BincounterError
    (after saving what was read) when some bins could not be read: a rerun retries just those."""
    start = time.perf_counter()
    source = open_source(cfg.source, cfg.workers)
    previous = _previous(cfg.catalog)  # first: a damaged or foreign file is refused before any request
    for leftover in Path(cfg.catalog).parent.glob(f".{Path(cfg.catalog).name}.*{files.PART_SUFFIX}"):
        leftover.unlink(missing_ok=True)  # a killed run's temp file (only ours: other stages may be writing)
    todo, kept = _plan(cfg, source, previous)
    rows = _Rows(kept)
    try:
        failed = _read_all(cfg, source, todo, rows)
    finally:  # Ctrl-C, an unreachable source or an error: what was read is kept all the same
        table = rows.table()
        _write(cfg.catalog, table)
    rejected = pc.sum(pc.equal(table["status"], "rejected")).as_py() or 0
    summary = {"bins": table.num_rows, "read": table.num_rows - kept.num_rows, "kept": kept.num_rows,
               "rejected": rejected, "failed": len(failed), "seconds": time.perf_counter() - start}
    print(f"catalog: {summary['bins']} bins ({summary['read']} read, {summary['kept']} kept from the last run, "
          f"{rejected} rejected) in {summary['seconds']:.1f} s")
    if failed:
        image_id, reason = next(iter(failed.items()))
        raise BincounterError(f"{len(failed)} bins could not be read (e.g. {image_id}: {reason}); "
                              "rerun the catalog stage to retry them")
    return summary


def _previous(path: str) -> pa.Table:
    return read_catalog(path) if Path(path).exists() else SCHEMA.empty_table()


def _plan(cfg: DataConfig, source: Source, previous: pa.Table) -> tuple[pa.Array, pa.Table]:
    """(ids to read, in reading order; the rows of the last run that stay as they are). Arrow arrays, not
    Python dicts and sets: a listing of the whole bucket costs tens of bytes a bin, not hundreds."""
    old_ids = previous["image_id"]
    if cfg.subset in LISTING:
        ids, etags = _listing(source)
        order = list(range(len(ids)))  # sorted first: the seeded order must not depend on the listing's order
        random.Random(cfg.seed).shuffle(order)  # a truncated catalog is a random sample, not the lowest ids
        order = np.asarray(order[: cfg.max_candidates] if cfg.max_candidates else order, dtype=np.int64)
        ids, etags = ids.take(order), etags.take(order)
        where_before = pc.index_in(ids, value_set=old_ids)  # null: not catalogued before
        same = pc.equal(etags, previous["etag"].combine_chunks().take(where_before)).fill_null(False)
    else:  # a manifest lists no ETags: bins catalogued ok stay, rejected ones are retried
        ids = pa.array(read_manifest(cfg.subset), pa.string())
        same = pc.is_in(ids, value_set=old_ids.filter(pc.equal(previous["status"], "ok")))
    kept = previous.filter(pc.is_in(old_ids, value_set=ids.filter(same)))
    return ids.filter(pc.invert(same)), kept


def _listing(source: Source, page: int = 100_000) -> tuple[pa.Array, pa.Array]:
    """(ids sorted, their ETags) of every listed metadata object, gathered a page of Python pairs at a time."""
    id_chunks, etag_chunks = [], []
    pairs = iter(source.list_metadata())
    while chunk := list(itertools.islice(pairs, page)):
        id_chunks.append(pa.array([i for i, _ in chunk], pa.string()))
        etag_chunks.append(pa.array([e for _, e in chunk], pa.string()))
    ids = pa.chunked_array(id_chunks, pa.string()).combine_chunks()
    etags = pa.chunked_array(etag_chunks, pa.string()).combine_chunks()
    order = pc.sort_indices(ids)
    return ids.take(order), etags.take(order)


def _each(ids: pa.Array, batch: int = 10_000) -> Iterator[str]:
    """The ids as Python strings, a slice at a time (a list of every id would cost ~60 bytes a bin)."""
    for start in range(0, len(ids), batch):
        yield from ids.slice(start, batch).to_pylist()


def _read_all(cfg: DataConfig, source: Source, todo: pa.Array, rows: _Rows) -> dict[str, str]:
    """Read todo into rows, writing a checkpoint every CHECKPOINT; -> {id: reason} of transient failures."""
    failed: dict[str, str] = {}
    streak, warnings = FailureStreak(source), 0
    workers = max(1, cfg.workers)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), desc="cataloguing", unit="bin",
                                                   mininterval=0.5) as bar:
        try:
            for image_id, future in _completed(pool, partial(_read, source), _each(todo), window=4 * workers):
                bar.update()
                try:
                    row = future.result()
                except Unreachable as exc:  # not a row: a rerun retries it
                    failed[image_id] = str(exc)
                    streak.failed(str(exc))
                    continue
                streak.ok()
                rows.add(row)
                if row[STATUS] == "rejected" and (warnings := warnings + 1) <= MAX_WARNINGS:
                    bar.write(f"rejected: {row[0] if listable(row[0]) else repr(row[0])[:60]}: {row[-1]}")
                if len(rows.pending) >= CHECKPOINT:
                    _write(cfg.catalog, rows.table())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # reads in flight finish, queued ones never start
            raise
    if warnings > MAX_WARNINGS:
        print(f"... and {warnings - MAX_WARNINGS} more rejected (status 'rejected' in {cfg.catalog})")
    return failed


def _completed(pool: ThreadPoolExecutor, fn: Callable, items: Iterable[str],
               window: int) -> Iterator[tuple[str, Future]]:
    """(item, future of fn(item)) as each completes, with at most `window` submitted at a time: a Future per
    bin of the whole bucket would cost more memory than the catalog itself."""
    items = iter(items)
    pending = {pool.submit(fn, item): item for _, item in zip(range(window), items)}
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            item = pending.pop(future)
            following = next(items, None)  # refill the slot
            if following is not None:
                pending[pool.submit(fn, following)] = following
            yield item, future


def _read(source: Source, image_id: str) -> tuple:
    """One catalog row (a tuple in SCHEMA order) for a bin; Unreachable propagates (no row is written)."""
    try:
        files.safe_name(image_id)  # before any key or path is made of it
    except files.UnsafeName as exc:
        shown = image_id[:200].encode("utf-8", "backslashreplace").decode()  # lone surrogates cannot be stored
        return _row(shown, None, None, reason=str(exc))
    key = f"{METADATA}/{image_id}.json"
    try:
        data, etag = source.get_with_etag(key)
    except Missing as exc:
        return _row(image_id, key, None, reason=str(exc))
    try:
        meta = parse_metadata(data)
        count = count_from_metadata(meta)
    except ValueError as exc:
        return _row(image_id, key, etag, reason=str(exc))
    if count > INT32_MAX:
        return _row(image_id, key, etag, reason=f"EXPECTED_QUANTITY is implausibly large ({count})")
    return _row(image_id, key, etag, count=count, distinct=_distinct(meta, count))


def _row(image_id: str, key: str | None, etag: str | None, count: int | None = None,
         distinct: int | None = None, reason: str = "") -> tuple:
    image_key = f"{IMAGES}/{image_id}.jpg" if key else None
    return (image_id, count, distinct, None, None, key, image_key, etag, "rejected" if reason else "ok", reason)


def _distinct(meta: dict, count: int) -> int | None:
    """Distinct items in the bin, or None when unknown: no item list, or an empty one for a bin that is not
    empty (quantity-only metadata, as in the test fixtures) would otherwise read as 0 distinct items."""
    items = meta.get("BIN_FCSKU_DATA")
    if not isinstance(items, dict) or (not items and count > 0):
        return None
    return min(len(items), INT32_MAX)


class _Rows:
    """The catalog being built: Arrow tables (compact) plus newly read rows as tuples until the next write."""

    def __init__(self, kept: pa.Table):
        self.tables, self.pending = [kept], []

    def add(self, row: tuple) -> None:
        self.pending.append(row)

    def table(self) -> pa.Table:
        if self.pending:
            columns = zip(*self.pending)
            self.tables.append(pa.Table.from_arrays(
                [pa.array(column, f.type) for column, f in zip(columns, SCHEMA)], schema=SCHEMA))
            self.pending = []
        self.tables = [pa.concat_tables(self.tables)]  # chunks are kept: combining would copy the catalog
        return self.tables[0]


def _write(path: str, table: pa.Table) -> None:
    """Sorted by id (the same bins give the same file, whatever order they were read in); atomic and fsync'd,
    so a kill or a power cut leaves the previous catalog or this one, never half a Parquet file.

    Written a row group at a time through the sort's indices: a sorted copy of the whole table, as
    `sort_by` makes, cost ~155 B a bin at every checkpoint, and this costs ~45 B (the indices and the
    sort's own scratch). Only the two low-cardinality columns are dictionary-encoded: a dictionary of
    unique ids, keys or ETags is a hash table as large as the column, and saves nothing."""
    order = pc.sort_indices(table["image_id"])
    with files.atomic_path(path, fsync=True) as tmp, \
            pq.ParquetWriter(tmp, SCHEMA, use_dictionary=["status", "reason"]) as writer:
        for start in range(0, len(order), ROW_GROUP):
            writer.write_table(table.take(order.slice(start, ROW_GROUP)))


def read_catalog(path: str, columns: list[str] | None = None) -> pa.Table:
    """The catalog at path (only `columns` of it, when given); a one-line BincounterError when it is missing,
    damaged or not a catalog."""
    if not Path(path).exists():
        raise BincounterError(f"catalog {path} not found: run `dvc repro catalog` first")
    rebuild = "delete it and run `dvc repro catalog` to rebuild it"
    try:
        parquet = pq.ParquetFile(path)
        if [(f.name, f.type) for f in parquet.schema_arrow] != [(f.name, f.type) for f in SCHEMA]:
            found = ", ".join(f"{f.name}:{f.type}" for f in parquet.schema_arrow)[:200]
            raise BincounterError(f"{path} is not a bincounter catalog (columns {found}): {rebuild}")
        table = parquet.read(columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BincounterError(f"catalog {path} is damaged or not Parquet ({first_line(exc)}): {rebuild}") from None
    table = table.replace_schema_metadata(None)
    unknown = pc.invert(pc.is_in(table["status"], value_set=pa.array(["ok", "rejected"])).fill_null(False))
    if table["image_id"].null_count or pc.any(unknown).as_py():
        raise BincounterError(f"catalog {path} has rows without an id or with an unknown status: {rebuild}")
    return table


def select(cfg: DataConfig, table: pa.Table | None = None) -> list[tuple[str, int]]:
    """The configured subset as [(image_id, count)] sorted by id (see `selection`)."""
    table = selection(cfg, table)
    return list(zip(table["image_id"].to_pylist(), table["count"].to_pylist()))


def selection(cfg: DataConfig, table: pa.Table | None = None) -> pa.Table:
    """The catalog rows of the configured subset, sorted by id: a query on the catalog (read from
    cfg.catalog unless given). Raises BincounterError when nothing matches."""
    table = read_catalog(cfg.catalog, QUERY_COLUMNS) if table is None else table
    table = table.filter(_query(cfg, table)).sort_by("image_id")  # one fixed order for the seeded steps
    if cfg.subset == "balanced":
        table = table.take(_balanced(cfg, table["count"].to_numpy()))
    if 0 < cfg.max_bins < table.num_rows:
        table = table.take(sorted(random.Random(cfg.seed).sample(range(table.num_rows), cfg.max_bins)))
    if not table.num_rows:
        raise BincounterError(f"no bin of catalog {cfg.catalog} matches data.subset={cfg.subset}, counts "
                              f"{cfg.min_count}..{cfg.max_count}, id_range={cfg.id_range or 'any'}")
    return table


def _query(cfg: DataConfig, table: pa.Table) -> pa.ChunkedArray:
    """The boolean mask of the rows the config asks for (nulls count as no)."""
    ids, count = table["image_id"], table["count"]
    mask = pc.and_(pc.equal(table["status"], "ok"),
                   pc.and_(pc.greater_equal(count, cfg.min_count), pc.less_equal(count, cfg.max_count)))
    bounds = config.id_range(cfg.id_range)
    if bounds:  # numeric ids only; leading zeros allowed ('00523' is 523); a non-numeric id is outside
        numeric = pc.match_substring_regex(ids, r"^0*[0-9]{1,18}$")
        values = pc.cast(pc.if_else(numeric, ids, "0"), pa.int64())
        low, high = (min(b, 2**63 - 1) for b in bounds)
        mask = pc.and_(mask, pc.and_(numeric, pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high))))
    if cfg.subset not in LISTING:
        wanted = [i for i in read_manifest(cfg.subset) if listable(i)]  # unsafe ones are rejected rows anyway
        mask = pc.and_(mask, pc.is_in(ids, value_set=pa.array(wanted, pa.string())))
    return mask.fill_null(False)


def _balanced(cfg: DataConfig, counts: np.ndarray) -> np.ndarray:
    """Row numbers (ascending) of up to cfg.per_class bins of each count, the first ones in a seeded shuffle
    of the rows (sorted by id). Vectorised: a count range of 0..1000 over 536k bins stays fast."""
    order = list(range(len(counts)))
    random.Random(cfg.seed).shuffle(order)
    order = np.asarray(order, dtype=np.int64)
    grouped = order[np.argsort(counts[order], kind="stable")]  # by count, shuffled order within a count
    sorted_counts = counts[grouped]
    place = np.arange(len(grouped)) - np.searchsorted(sorted_counts, sorted_counts, side="left")
    found = np.bincount(sorted_counts - cfg.min_count, minlength=cfg.max_count - cfg.min_count + 1)
    short = {cfg.min_count + c: int(n) for c, n in enumerate(found) if n < cfg.per_class}
    if short:  # one line, even for a count range of 0..1000
        shown = ", ".join(f"{c}: {n}" for c, n in list(short.items())[:12])
        more = f" and {len(short) - 12} more counts" if len(short) > 12 else ""
        print(f"warning: the catalog has fewer than {cfg.per_class} bins of some counts (count: bins): {shown}{more}")
    return np.sort(grouped[place < cfg.per_class])
