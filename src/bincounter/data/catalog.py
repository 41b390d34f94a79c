"""Stage catalog: one Parquet row per bin of the dataset's metadata (count, distinct items, keys, ETag), so
that choosing a subset is a query on a local file (`select`) rather than thousands of requests.

Resumable: a rerun keeps the rows whose object is unchanged (same ETag) and reads only the rest. Progress
is written every CHECKPOINT newly read bins, atomically, so a run killed midway keeps what it read. The
catalog itself is never held in memory: each write merges the new rows with the stored file, both sorted by
id, a row group at a time (_Catalog).
"""

from __future__ import annotations

import bisect
import contextlib
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
from bincounter.data.listing import sorted_listing
from bincounter.data.source import (IMAGES, MAX_WARNINGS, METADATA, FailureStreak, Missing, Source, Unreachable,
                                    listable, open_source, read_manifest, release_free_memory)
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
ROW_GROUP = 8192  # catalog rows per Parquet row group: what a read or a write decodes at a time
INT32_MAX = 2**31 - 1


def build_catalog(cfg: DataConfig) -> dict:
    """Write cfg.catalog; -> {"bins", "read", "kept", "rejected", "failed", "seconds"}. Raises BincounterError
    (after saving what was read) when some bins could not be read: a rerun retries just those."""
    start = time.perf_counter()
    source = open_source(cfg.source, cfg.workers)
    for leftover in Path(cfg.catalog).parent.glob(f".{Path(cfg.catalog).name}.*{files.PART_SUFFIX}"):
        leftover.unlink(missing_ok=True)  # a killed run's temp file (only ours: other stages may be writing)
    todo, keep = _plan(cfg, source)  # first: a damaged or foreign catalog is refused before any bin is read
    catalog = _Catalog(cfg.catalog, keep)
    try:
        failed = _read_all(cfg, source, todo, catalog)
    finally:  # Ctrl-C, an unreachable source or an error: what was read is kept all the same
        catalog.write()
    kept = int(keep.sum()) if keep is not None else 0
    summary = {"bins": catalog.bins, "read": catalog.bins - kept, "kept": kept, "rejected": catalog.rejected,
               "failed": len(failed), "seconds": time.perf_counter() - start}
    print(f"catalog: {summary['bins']} bins ({summary['read']} read, {kept} kept from the last run, "
          f"{catalog.rejected} rejected) in {summary['seconds']:.1f} s")
    if failed:
        image_id, reason = next(iter(failed.items()))
        raise BincounterError(f"{len(failed)} bins could not be read (e.g. {image_id}: {reason}); "
                              "rerun the catalog stage to retry them")
    return summary


# ---------------------------------------------------------------- what to read
# Memory: neither the listing nor the stored catalog is ever held. The listing is sorted on disk
# (listing.sorted_listing) and walked against the stored catalog, a row group at a time (_not_kept); what stays in
# memory is the ids still to read (~10 bytes a bin as Arrow strings) and a byte a stored row for `keep`. A
# manifest is read whole: the stage holds its ids (~0.1 kB each) as read_manifest returns them.


def _plan(cfg: DataConfig, source: Source) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """(ids to read, sorted; over the stored catalog's rows, which ones stay as they are, or None when there is
    no stored catalog). A listed bin stays when its ETag is unchanged; a manifest lists no ETags, so there a
    bin catalogued ok stays and a rejected one is retried."""
    if cfg.subset not in LISTING:
        return _walk(((image_id, None) for image_id in sorted(read_manifest(cfg.subset))), cfg.catalog, False)
    with sorted_listing(source) as (listed, pairs):
        if cfg.max_candidates and cfg.max_candidates < listed:
            pairs = _picked(pairs, _sample(listed, cfg.max_candidates, cfg.seed))
        return _walk(pairs, cfg.catalog, True)


def _sample(population: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of row numbers, sorted: a truncated catalog is a random sample, not the lowest ids.
    random.shuffle on a NumPy array is the same permutation as on a list, at 8 bytes a row, not ~36."""
    order = np.arange(population)
    random.Random(seed).shuffle(order)
    return np.sort(order[:size])


def _picked(items: Iterator, positions: np.ndarray) -> Iterator:
    """The items at the given positions (sorted, distinct)."""
    wanted = iter(positions.tolist())
    position = next(wanted, None)
    for at, item in enumerate(items):
        if position is None:
            return
        if at == position:
            yield item
            position = next(wanted, None)


def _walk(wanted: Iterator[tuple[str, str | None]], path: str,
          by_etag: bool) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """(the wanted ids to read, over the stored rows whether each stays), from the wanted (id, ETag) pairs,
    sorted by id; a stored row stays when it is wanted and unchanged (same ETag when by_etag, else ok)."""
    if not Path(path).exists():
        return _array(image_id for image_id, _ in wanted), None
    keep: list[np.ndarray] = []
    todo = _array(_not_kept(wanted, path, by_etag, keep))
    return todo, np.concatenate(keep) if keep else np.zeros(0, dtype=bool)


def _not_kept(wanted: Iterator[tuple[str, str | None]], path: str, by_etag: bool,
              keep: list[np.ndarray]) -> Iterator[str]:
    """The wanted ids without a stored row that stays, by one merge walk against the stored catalog (sorted by
    id too); appends to `keep`, a row group at a time, which stored rows stay."""
    want, want_etag = next(wanted, (None, None))
    last = ""
    for batch in stored_batches(path, ["image_id", "etag", "status"]):
        kept = np.zeros(batch.num_rows, dtype=bool)
        for row, (image_id, etag, status) in enumerate(zip(*(column.to_pylist() for column in batch.columns))):
            if image_id < last:
                raise BincounterError(f"catalog {path} is not sorted by image_id: {REBUILD}")
            last = image_id
            while want is not None and want < image_id:
                yield want
                want, want_etag = next(wanted, (None, None))
            if want == image_id:
                kept[row] = (etag is not None and etag == want_etag) if by_etag else status == "ok"
                if not kept[row]:
                    yield want
                want, want_etag = next(wanted, (None, None))
        keep.append(kept)
    if want is not None:
        yield want
        yield from (image_id for image_id, _ in wanted)


def _array(ids: Iterable[str], chunk: int = 10_000) -> pa.ChunkedArray:
    """ids as Arrow strings (~10 bytes an id), built a slice at a time: a list of them all would cost ~60."""
    ids, chunks = iter(ids), []
    while part := list(itertools.islice(ids, chunk)):
        chunks.append(pa.array(part, pa.string()))
    return pa.chunked_array(chunks, pa.string())


def _each(values: pa.Array | pa.ChunkedArray, batch: int = 10_000) -> Iterator:
    """The values as Python objects, a slice at a time (a list of every id would cost ~60 bytes a bin)."""
    for start in range(0, len(values), batch):
        yield from values.slice(start, batch).to_pylist()


def _read_all(cfg: DataConfig, source: Source, todo: pa.Array, catalog: _Catalog) -> dict[str, str]:
    """Read todo into catalog, writing it every CHECKPOINT new rows; -> {id: reason} of transient failures."""
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
                catalog.add(row)
                if row[STATUS] == "rejected" and (warnings := warnings + 1) <= MAX_WARNINGS:
                    bar.write(f"rejected: {row[0] if listable(row[0]) else repr(row[0])[:60]}: {row[-1]}")
                if len(catalog.pending) >= CHECKPOINT:
                    catalog.write()
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


# ---------------------------------------------------------------- the file


class _Catalog:
    """The catalog file, and the rows read since it was last written. A write merges the two, sorted by id,
    into a new file a row group at a time, atomic and fsync'd: a kill or a power cut leaves the previous
    catalog or this one, never half a Parquet file. The first write also drops the stored rows that do not
    stay (`keep`); from then on every stored row does."""

    def __init__(self, path: str, keep: np.ndarray | None):
        self.path, self.keep, self.pending = path, keep, []
        self.bins = self.rejected = 0

    def add(self, row: tuple) -> None:
        self.pending.append(row)

    def write(self) -> None:
        self.pending.sort(key=lambda row: row[0])  # Python's str order is UTF-8 byte order, Arrow's order
        new = pa.Table.from_pylist([dict(zip(SCHEMA.names, row)) for row in self.pending], schema=SCHEMA)
        ids = new["image_id"].to_pylist()
        self.pending, taken = [], 0
        # only the two low-cardinality columns are dictionary-encoded: a dictionary of unique ids, keys or
        # ETags is a hash table as large as the column, and saves nothing
        with files.atomic_path(self.path, fsync=True) as tmp, \
                pq.ParquetWriter(tmp, SCHEMA, use_dictionary=["status", "reason"]) as writer:
            groups = _RowGroups(writer)
            for stored in self._stored():
                until = bisect.bisect_right(ids, stored["image_id"][-1].as_py(), lo=taken)
                if until > taken:  # new rows fall among this group's: sort them in
                    stored = pa.concat_tables([stored, new.slice(taken, until - taken)])
                    stored = stored.take(pc.sort_indices(stored["image_id"]))
                groups.add(stored)
                taken = until
            groups.add(new.slice(taken))
            groups.close()
        self.keep, self.bins, self.rejected = None, groups.rows, groups.rejected
        release_free_memory()

    def _stored(self) -> Iterator[pa.Table]:
        """The stored rows that stay, a row group at a time (none when there is no file yet)."""
        if not Path(self.path).exists():
            return
        done = 0
        for batch in stored_batches(self.path):
            if self.keep is not None:
                batch, done = batch.filter(pa.array(self.keep[done:done + batch.num_rows])), done + batch.num_rows
            if batch.num_rows:
                yield batch


class _RowGroups:
    """Tables, each sorted and following the last, written in row groups of exactly ROW_GROUP rows (the last
    one shorter), so that the same rows give the same file, however many checkpoints made it."""

    def __init__(self, writer: pq.ParquetWriter):
        self.writer, self.buffer, self.rows, self.rejected = writer, SCHEMA.empty_table(), 0, 0

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.rejected += pc.sum(pc.equal(table["status"], "rejected")).as_py() or 0
        self.buffer = pa.concat_tables([self.buffer, table])
        while self.buffer.num_rows >= ROW_GROUP:
            self.writer.write_table(self.buffer.slice(0, ROW_GROUP), row_group_size=ROW_GROUP)
            self.buffer = self.buffer.slice(ROW_GROUP)

    def close(self) -> None:
        if self.buffer.num_rows:
            self.writer.write_table(self.buffer, row_group_size=ROW_GROUP)


REBUILD = "delete it and run `dvc repro catalog` to rebuild it"


@contextlib.contextmanager
def _read_errors(path: str) -> Iterator[None]:
    """Arrow's and the OS's errors while reading the catalog at path, as one line with the rebuild hint."""
    try:
        yield
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BincounterError(f"catalog {path} is damaged or not Parquet ({first_line(exc)}): {REBUILD}") from None


def _open(path: str) -> pq.ParquetFile:
    """The catalog at path, its columns checked; a one-line BincounterError when it is missing, damaged or not a
    catalog."""
    if not Path(path).exists():
        raise BincounterError(f"catalog {path} not found: run `dvc repro catalog` first")
    with _read_errors(path):
        parquet = pq.ParquetFile(path)
    if [(f.name, f.type) for f in parquet.schema_arrow] != [(f.name, f.type) for f in SCHEMA]:
        found = ", ".join(f"{f.name}:{f.type}" for f in parquet.schema_arrow)[:200]
        raise BincounterError(f"{path} is not a bincounter catalog (columns {found}): {REBUILD}")
    return parquet


def _checked(table: pa.Table, path: str) -> pa.Table:
    """table (rows of the catalog at path), refused in one line if some row has no id or an unknown status."""
    table = table.replace_schema_metadata(None)
    unknown = pc.invert(pc.is_in(table["status"], value_set=pa.array(["ok", "rejected"])).fill_null(False))
    if table["image_id"].null_count or pc.any(unknown).as_py():
        raise BincounterError(f"catalog {path} has rows without an id or with an unknown status: {REBUILD}")
    return table


def stored_batches(path: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The catalog at path (only `columns` of it, when given; image_id and status always), a row group's worth
    at a time and checked as read_catalog checks it."""
    parquet = _open(path)
    columns = None if columns is None else list(dict.fromkeys(["image_id", *columns, "status"]))
    with _read_errors(path):
        # a row group at a time, not iter_batches: that sets up every group's reader at its first batch, ~0.3 MB
        # a group (benchmarks/scale.md); a file written with larger groups is handed out in slices
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=columns)
            for start in range(0, table.num_rows, ROW_GROUP):
                yield _checked(table.slice(start, ROW_GROUP), path)


def read_catalog(path: str, columns: list[str] | None = None) -> pa.Table:
    """The catalog at path (only `columns` of it, when given); a one-line BincounterError when it is missing,
    damaged or not a catalog."""
    parquet = _open(path)
    with _read_errors(path):
        table = parquet.read(columns=columns)
    return _checked(table, path)


def select(cfg: DataConfig, table: pa.Table | None = None) -> list[tuple[str, int]]:
    """The configured subset as [(image_id, count)] sorted by id (see `selection`)."""
    table = selection(cfg, table)
    return list(zip(table["image_id"].to_pylist(), table["count"].to_pylist()))


def selection(cfg: DataConfig, table: pa.Table | None = None) -> pa.Table:
    """The catalog rows of the configured subset, sorted by id: a query on the catalog (streamed from
    cfg.catalog a row group at a time unless given). Raises BincounterError when nothing matches."""
    wanted = _manifest_ids(cfg)
    if table is None:
        found = [batch.filter(_query(cfg, batch, wanted)) for batch in stored_batches(cfg.catalog, QUERY_COLUMNS)]
        table = pa.concat_tables(found) if found else pa.schema([SCHEMA.field(n) for n in QUERY_COLUMNS]).empty_table()
    else:
        table = table.filter(_query(cfg, table, wanted))
    table = table.sort_by("image_id")  # one fixed order for the seeded steps
    if cfg.subset == "balanced":
        table = table.take(_balanced(cfg, table["count"].to_numpy()))
    if 0 < cfg.max_bins < table.num_rows:
        table = table.take(sorted(random.Random(cfg.seed).sample(range(table.num_rows), cfg.max_bins)))
    if not table.num_rows:
        raise BincounterError(f"no bin of catalog {cfg.catalog} matches data.subset={cfg.subset}, counts "
                              f"{cfg.min_count}..{cfg.max_count}, id_range={cfg.id_range or 'any'}")
    return table


def _manifest_ids(cfg: DataConfig) -> pa.Array | None:
    """The manifest's ids as a value set (unsafe ones are rejected rows anyway); None for a listing subset."""
    if cfg.subset in LISTING:
        return None
    return pa.array([i for i in read_manifest(cfg.subset) if listable(i)], pa.string())


def _query(cfg: DataConfig, table: pa.Table, wanted: pa.Array | None) -> pa.ChunkedArray:
    """The boolean mask of the rows the config asks for (nulls count as no); `wanted`: the manifest's ids."""
    ids, count = table["image_id"], table["count"]
    mask = pc.and_(pc.equal(table["status"], "ok"),
                   pc.and_(pc.greater_equal(count, cfg.min_count), pc.less_equal(count, cfg.max_count)))
    bounds = config.id_range(cfg.id_range)
    if bounds:  # numeric ids only; leading zeros allowed ('00523' is 523); a non-numeric id is outside
        numeric = pc.match_substring_regex(ids, r"^0*[0-9]{1,18}$")
        values = pc.cast(pc.if_else(numeric, ids, "0"), pa.int64())
        low, high = (min(b, 2**63 - 1) for b in bounds)
        mask = pc.and_(mask, pc.and_(numeric, pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high))))
    if wanted is not None:
        mask = pc.and_(mask, pc.is_in(ids, value_set=wanted))
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
