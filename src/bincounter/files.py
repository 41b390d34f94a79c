"""Atomic writes: every file bincounter produces appears whole or not at all.

A crash, a kill or a full disk mid-write leaves the previous file (or none), never a truncated one
that looks valid: bytes go to a hidden temp name in the same folder, then one rename puts them in place.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Iterator

PART_SUFFIX = ".part"
# An id (a bin, a file stem) that becomes part of a path must be one plain name: letters, digits, '_', '-'
# and inner dots. ABID ids are digits; '523' and '00523' stay different ids.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class UnsafeName(ValueError):
    """A name from input that would not be one plain file name inside its folder."""


def safe_name(value: object) -> str:
    """`value` as a plain name (an ABID id), or UnsafeName saying why not."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        shown = repr(value)[:60]
        raise UnsafeName(f"unsafe id {shown}: an id is one name of letters, digits, '_', '-' or '.', not a path")
    return value


def inside(folder: str | os.PathLike, name: str) -> Path:
    """folder/name, checked to stay inside folder (symbolic links included)."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise UnsafeName(f"{name!r} leaves {folder}")
    return Path(folder) / name


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
