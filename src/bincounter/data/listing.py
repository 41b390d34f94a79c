"""The source's listing of metadata objects as (id, ETag) pairs in id order, sorted on disk (an external sort),
so that the catalog stage can walk the whole bucket's listing against its stored catalog without holding it."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from bincounter.data.source import Source

RUN_ROWS = 50_000  # listed pairs sorted in memory at a time (~2.5 MB as Arrow); a longer listing is merged on disk
SPILL_BATCH = 1024  # pairs read back from each spilled run at a time


@contextlib.contextmanager
def sorted_listing(source: Source) -> Iterator[tuple[int, Iterator[tuple[str, str | None]]]]:
    """(how many bins are listed, their (id, ETag) pairs in id order), sorted externally: RUN_ROWS pairs at a
    time are sorted in memory and spilled to a temporary Arrow file, and the runs are merged as they are read
    back. The bucket's listing held as Python pairs would cost ~0.2 kB a bin; this costs a run and a batch
    of each run. S3 lists keys in order, but not in id order (`523-a.json` before `523.json`); a folder lists
    in no order at all."""
    with tempfile.TemporaryDirectory(prefix="bincounter-listing-") as tmp:
        runs, listed, pairs = [], 0, iter(source.list_metadata())
        while (run := _run(pairs)) is not None:
            runs.append(_spill(run, Path(tmp) / f"run-{len(runs)}.arrow"))
            listed += run.num_rows
        merged = heapq.merge(*map(_unspill, runs), key=_by_id)
        try:
            yield listed, merged
        finally:
            merged.close()  # and so the runs' files, before their folder goes


def _by_id(pair: tuple[str, str | None]) -> str:
    return pair[0]


def _run(pairs: Iterator[tuple[str, str | None]], page: int = 10_000) -> pa.Table | None:
    """The listing's next RUN_ROWS pairs as a table sorted by id, or None when none is left. Gathered a page of
    Python pairs at a time: a run held as Python pairs would cost ~0.2 kB a bin, as Arrow strings ~50 B."""
    pages, held = [], 0
    while held < RUN_ROWS and (chunk := list(itertools.islice(pairs, min(page, RUN_ROWS - held)))):
        held += len(chunk)
        pages.append(pa.table({"image_id": pa.array([i for i, _ in chunk], pa.string()),
                               "etag": pa.array([e for _, e in chunk], pa.string())}))
    return pa.concat_tables(pages).sort_by("image_id") if pages else None


def _spill(run: pa.Table, path: Path) -> Path:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, run.schema) as writer:
        writer.write_table(run, max_chunksize=SPILL_BATCH)
    return path


def _unspill(path: Path) -> Iterator[tuple[str, str | None]]:
    """A spilled run's pairs, read back a batch at a time."""
    with pa.OSFile(str(path)) as file:
        reader = pa.ipc.open_file(file)
        for n in range(reader.num_record_batches):
            batch = reader.get_batch(n)
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
