"""Atomic writes: every file bincounter produces appears whole or not at all.

A crash, a kill or a full disk mid-write leaves the previous file (or none), never a truncated one
that looks valid: bytes go to a hidden temp name in the same folder, then one rename puts them in place.
"""

from __future__ import annotations

import contextlib
import csv
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator

PART_SUFFIX = ".part"


def temp_name(path: Path) -> Path:
    """A hidden, unique temp name beside path (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_csv(path: str | os.PathLike, header: list[str], rows: Iterable) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def remove_partials(folder: str | os.PathLike) -> int:
    """Delete temp files a killed writer left in folder; -> how many."""
    removed = 0
    for leftover in Path(folder).glob(f".*{PART_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
