"""Tar shards: about data.shard_size (1,000) bins per file, so DVC and S3 see thousands of objects, not millions.

Why plain tar: the standard library reads and writes it (no new dependency); it is the format WebDataset and
SageMaker's own examples stream; any user can list or untar it; and every member's bytes lie contiguous at a
known offset, so a loader reads one image with one pread (random access, local disk or a FastFile mount) or a
whole shard with one GET. Headers are written deterministically (mtime 0, uid 0, sorted index first), so the
same bins give the same bytes and the same DVC hash.

A shard's name carries a digest of what it was planned to hold: a rerun keeps a shard whose planned content
is unchanged, replaces one whose content changed, and a shard deleted by hand is written again alone.
Shards are written under a hidden temporary name and renamed whole, so a cut shard is never taken as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from bincounter.errors import BincounterError, first_line
from bincounter.files import atomic_path

INDEX_MEMBER = "__index__.json"  # first member: what the shard was planned to hold and how each bin fared
SUFFIX = ".tar"


def plan(total: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive runs of shard_size positions among total sorted ids (sorted, so a
    shard's membership is stable between runs)."""
    return [(k, min(k + shard_size, total)) for k in range(0, total, shard_size)]


def shard_name(prefix: str, number: int, planned: Iterable[str]) -> str:
    """<prefix>-<number>-<digest of the planned content>.tar"""
    digest = hashlib.sha256("\n".join(planned).encode()).hexdigest()[:10]
    return f"{prefix}-{number:05d}-{digest}{SUFFIX}"


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def write_shard(path: Path, members: Iterable[tuple[str, bytes]], index: dict) -> dict[str, tuple[int, int]]:
    """A tar holding the index (first) and the members, under its final name only once complete;
    -> {member name: (byte offset, size)}, as `locate` would read them back."""
    with atomic_path(Path(path)) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        encoded = json.dumps(index, sort_keys=True).encode()
        tar.addfile(_info(INDEX_MEMBER, len(encoded)), io.BytesIO(encoded))
        where = {}
        for name, data in members:
            # USTAR writes exactly one 512-byte header block per member, so its data starts right after it
            where[name] = (tar.offset + tarfile.BLOCKSIZE, len(data))
            tar.addfile(_info(name, len(data)), io.BytesIO(data))
    return where


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tarfile.TarFile]:
    """The shard open for reading; any tar or I/O failure while it is read becomes one line."""
    try:
        with tarfile.open(path, "r:") as tar:
            yield tar
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BincounterError(f"shard {path} is damaged ({first_line(exc)}): delete it and rerun `dvc repro`") from None


def read_index(path: Path) -> dict:
    """The shard's index, read from its first member only."""
    with _open(path) as tar:
        first = tar.next()
        if first is None or first.name != INDEX_MEMBER:
            raise BincounterError(f"shard {path} has no index: delete it and rerun `dvc repro`")
        try:
            return json.loads(tar.extractfile(first).read())
        except ValueError:
            raise BincounterError(f"shard {path} has a damaged index: delete it and rerun `dvc repro`") from None


def locate(path: Path) -> dict[str, tuple[int, int]]:
    """{member name: (byte offset, size)} for every member but the index: one pread reads a member."""
    with _open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.name != INDEX_MEMBER}


def is_complete(path: Path, expected: set[str]) -> bool:
    """The shard is readable, holds every expected member, and none runs past the end of the file (a copy
    cut short, or a disk that filled up, is not a shard)."""
    try:
        where = locate(path)
    except BincounterError:
        return False
    end = Path(path).stat().st_size
    return expected <= set(where) and all(offset + size <= end for offset, size in where.values())


def iter_members(path: Path, wanted: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the members, in shard order; only the wanted names when given."""
    with _open(path) as tar:
        for member in tar:
            if member.name == INDEX_MEMBER or (wanted is not None and member.name not in wanted):
                continue
            yield member.name, tar.extractfile(member).read()


def read_member(path: Path, name: str) -> bytes:
    for _, data in iter_members(path, {name}):
        return data
    raise BincounterError(f"{name} is not in shard {path}: rerun `dvc repro`")


def shards_in(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob(f"*{SUFFIX}") if not p.name.startswith("."))


def remove_stale(folder: Path, keep: set[str]) -> int:
    """Delete the shards a new plan no longer names; -> how many."""
    stale = [p for p in shards_in(folder) if p.name not in keep]
    for path in stale:
        os.unlink(path)
    return len(stale)
