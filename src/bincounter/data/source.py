"""Read-only access to the Amazon Bin Image Dataset laid out like its bucket: ``metadata/<id>.json`` and
``bin-images/<id>.jpg`` under S3 (real AWS or AWS_ENDPOINT_URL) or a local folder; and the manifests
that name which bins to read.

Every stage that reads the dataset goes through a `Source`: `get` / `get_with_etag` for one object,
`list_metadata` for the ids (with the ETags the catalog stage compares to skip what it already has).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from bincounter import files
from bincounter.errors import BincounterError, first_line
from bincounter.storage import is_s3, local_root, parse_s3_uri, s3_client

IMAGES = "bin-images"
METADATA = "metadata"
SUFFIX = ".json"
UNREACHABLE_AFTER = 20  # connection failures in a row that mean "the source is down", not "a bad bin"
MAX_WARNINGS = 20  # bad bins named one by one on the terminal; the rest are counted
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
DOWNLOAD_ARENAS = 2


def limit_malloc_arenas(arenas: int = DOWNLOAD_ARENAS) -> bool:
    """Have glibc share `arenas` malloc arenas among the threads that first allocate from now on (a thread
    takes its arena at its first malloc), instead of up to 8 per core. Each download thread frees
    photo-sized buffers into its own arena, and with 16 arenas fetch's RSS kept creeping up shard after
    shard; with 2 it rose 16 MB over a 100,000-bin run instead of 26, no slower (benchmarks/scale.md).
    MALLOC_ARENA_MAX in the environment wins. -> whether the limit was set (False without glibc: macOS,
    musl)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Hand glibc's free heap pages back to the system (malloc_trim); nothing without glibc. A catalog write
    frees tens of MB of Arrow and Parquet buffers of sizes that grow with the file, and without this the
    catalog stage's RSS crept up with each write (benchmarks/scale.md)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def lean_memory() -> None:
    """For the stages that stream a whole dataset's rows through Arrow (catalog, fetch): few glibc malloc
    arenas (limit_malloc_arenas), and glibc's malloc for Arrow's buffers too. pyarrow's default allocator,
    mimalloc, keeps freed pages per thread: the catalog stage peaked ~55 MB higher with it
    (benchmarks/scale.md). Arrow reads ARROW_DEFAULT_MEMORY_POOL once, so this must run before pyarrow is
    imported (the CLI calls it first); a value already in the environment wins."""
    limit_malloc_arenas()
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


class Missing(Exception):
    """The object is not in the source."""


class Unreachable(Exception):
    """The source could not be read right now (network, endpoint down): worth a rerun."""


class SourceUnreachable(BincounterError):
    """Many reads in a row failed to connect: the source is down or unreachable from here."""


class FailureStreak:
    """Counts transient read failures in a row (catalog and fetch alike); the UNREACHABLE_AFTER-th stops
    the stage with one line naming the endpoint, instead of failing bin by bin."""

    def __init__(self, source: "Source"):
        self.source, self.count = source, 0

    def ok(self) -> None:
        self.count = 0

    def failed(self, reason: str) -> None:
        self.count += 1
        if self.count >= UNREACHABLE_AFTER:
            raise SourceUnreachable(
                f"cannot reach the data source {self.source.where()} ({reason}; {self.count} requests in a row "
                "failed): check the network, a proxy (HTTPS_PROXY), or AWS_ENDPOINT_URL, then rerun to resume")


def listable(image_id: str) -> bool:
    """Whether a listed id may be used at all: ids become file names downstream, so a stray object such as
    ``metadata/..json`` is skipped from listings rather than turned into a path."""
    try:
        files.safe_name(image_id)
    except files.UnsafeName:
        return False
    return True


class Source:
    """Read-only access to a bucket-shaped store."""

    def get(self, key: str) -> bytes:
        """The object's bytes; Missing, Unreachable, or BincounterError (no such bucket, access denied)."""
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """(bytes, ETag without quotes): the same ETag `list_metadata` reports for the object."""
        raise NotImplementedError

    def list_metadata(self) -> Iterator[tuple[str, str | None]]:
        """(image_id, ETag or None when unknown) for every metadata/<id>.json with a safe id, in no set order."""
        raise NotImplementedError

    def list_ids(self) -> list[str]:
        return [image_id for image_id, _ in self.list_metadata()]

    def where(self) -> str:
        raise NotImplementedError


class S3Source(Source):
    def __init__(self, uri: str, workers: int):
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self.client = s3_client(unsigned=True, max_pool_connections=max(10, workers))

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.client.meta.endpoint_url}"

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return response["Body"].read(), response.get("ETag", "").strip('"')  # read inside: it can be cut too
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise Missing(f"missing from source: {key}") from None
            if code in ("NoSuchBucket", "AccessDenied", "403"):
                raise BincounterError(f"cannot read s3://{self.bucket}/{self.prefix}: {code}") from None
            raise Unreachable(f"S3 error {code} for {key}") from None
        except (BotoCoreError, OSError) as exc:
            raise Unreachable(f"{type(exc).__name__} reading {key}") from None

    def list_metadata(self) -> Iterator[tuple[str, str | None]]:
        from botocore.exceptions import BotoCoreError, ClientError

        folder = f"{self.prefix}{METADATA}/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in tqdm(pages, desc="listing metadata", unit="page", leave=False):  # ABID: ~540 pages
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(folder):]
                    image_id = name[: -len(SUFFIX)]
                    if name.endswith(SUFFIX) and "/" not in name and listable(image_id):
                        yield image_id, obj.get("ETag", "").strip('"') or None
        except (BotoCoreError, ClientError) as exc:
            raise BincounterError(f"cannot list s3://{self.bucket}/{folder}: {first_line(exc)}") from None


class LocalSource(Source):
    def __init__(self, root: str):
        self.root = local_root(root)

    def where(self) -> str:
        return str(self.root)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            raise Missing(f"missing from source: {key}") from None
        except IsADirectoryError:
            raise Missing(f"not a file in the source: {key}") from None
        return data, md5(data)

    def list_metadata(self) -> Iterator[tuple[str, str | None]]:
        # The ETag of a local file is the md5 of its bytes, what S3 reports for a single-part upload; the
        # listing computes it (not mtime+size) so that a local copy resumes exactly like the bucket, and a
        # file rewritten with its old size and mtime (cp -p, rsync -t) is still seen as changed. Reading
        # a few kB per bin from a local disk costs far less than the catalog's parse of the same bytes.
        # os.scandir hands out one entry at a time; Path.glob lists the whole folder first (~0.2 kB a bin).
        folder = self.root / METADATA
        if not folder.is_dir():
            return
        with os.scandir(folder) as entries:
            for entry in tqdm(entries, desc="listing metadata", unit="file", leave=False, mininterval=1):
                image_id = entry.name[: -len(SUFFIX)]
                if entry.name.endswith(SUFFIX) and listable(image_id) and entry.is_file():
                    yield image_id, md5(Path(entry.path).read_bytes())


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def open_source(source: str, workers: int = 32) -> Source:
    return S3Source(source, workers) if is_s3(source) else LocalSource(source)


# ---------------------------------------------------------------- manifests
# Here rather than in fetch.py so that the catalog stage (which reads manifests) and the fetch stage
# (which reads the catalog) can both import it without an import cycle.


def read_manifest(path: str | os.PathLike) -> list[str]:
    """Image ids (strings, order kept, duplicates dropped) from a manifest.

    Accepted: the Udacity ``file_list.json`` format ({"1": ["data/metadata/<id>.json", ...], ...}),
    a JSON list of ids or paths, or a text/CSV file with one id per line (an ``image_id`` header is skipped).
    Ids are checked one by one later (an unsafe one becomes a rejected row); the file's shape is checked here.
    """
    path = Path(path)
    if not path.is_file():
        raise BincounterError(f"manifest {path} not found (set data.subset to a manifest path, 'balanced' or 'all')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BincounterError(f"manifest {path} is not UTF-8 text") from None
    entries = _json_entries(path, text) if path.suffix == ".json" else _text_entries(text)
    ids = [Path(e).stem if e.endswith((".json", ".jpg")) else e for e in entries]
    if not ids:
        raise BincounterError(f"manifest {path} lists no images")
    return list(dict.fromkeys(ids))


def _json_entries(path: Path, text: str) -> list[str]:
    shape = f"manifest {path} must map counts to lists of metadata paths, or list ids"
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BincounterError(f"manifest {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise BincounterError(f"manifest {path} is nested too deeply to be a manifest") from None
    if isinstance(manifest, dict):
        if not all(isinstance(values, list) for values in manifest.values()):
            raise BincounterError(shape)
        manifest = [e for values in manifest.values() for e in values]
    if not isinstance(manifest, list) or not all(isinstance(e, (str, int)) and not isinstance(e, bool)
                                                 for e in manifest):
        raise BincounterError(shape)
    return [str(e) for e in manifest]


def _text_entries(text: str) -> list[str]:
    entries = [line.split(",")[0].strip() for line in text.splitlines()]
    return [e for e in entries if e and e != "image_id"]
