"""Where bytes come from and go to: S3 (real AWS or any endpoint in AWS_ENDPOINT_URL) or a local folder.

boto3 honours AWS_ENDPOINT_URL for every service, so the same code talks to AWS or to a local emulator.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse

from bincounter.errors import BincounterError, first_line


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise BincounterError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.lru_cache(maxsize=1)
def have_aws_credentials() -> bool:
    """Resolved once per process: without credentials boto3 may spend a second probing instance metadata."""
    import boto3

    return boto3.Session().get_credentials() is not None


def s3_reader(max_pool_connections: int = 10):
    """For reading images: signed when credentials are configured (private buckets), else unsigned, so public
    buckets such as aft-vbi-pds work without an AWS account."""
    return s3_client(unsigned=not have_aws_credentials(), max_pool_connections=max_pool_connections)


def s3_client(unsigned: bool = False, max_pool_connections: int = 10, region: str | None = None):
    """A boto3 S3 client. Unsigned clients read public buckets (like aft-vbi-pds) without credentials."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(
        max_pool_connections=max_pool_connections,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        **({"signature_version": UNSIGNED} if unsigned else {}),
    )
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", region_name=region, config=config)


def local_root(source: str) -> Path:
    root = Path(source[len("file://"):] if source.startswith("file://") else source)
    if not root.is_dir():
        raise BincounterError(f"data source {source!r} is neither s3://... nor an existing directory")
    return root


# ---------------------------------------------------------------- folders read by name and byte range
# A prepared split is a folder of tar shards plus labels.csv (where each photo lies in its shard). Training
# reads it from a local folder (or a SageMaker FastFile mount) with pread, or streams it from S3 with one
# ranged GET per photo, so a laptop or a plain EC2 box can train on a synced prefix without copying it.

CONCURRENT_GETS = 16  # ranged GETs in flight per process (each loader worker) when a batch is read from S3


class LocalFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.uri = str(self.path)
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __getstate__(self):  # loader workers open their own file descriptors
        return {**self.__dict__, "_fds": {}}

    def resolved(self) -> str:
        return str(self.path.resolve())

    def read_bytes(self, name: str) -> bytes:
        """The whole file; FileNotFoundError when it is not there."""
        return (self.path / name).read_bytes()

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if name not in self._fds:
            self._fds[name] = os.open(self.path / name, os.O_RDONLY)
        return os.pread(self._fds[name], size, offset)

    def read_ranges(self, reads: list[tuple[str, int, int]]) -> list[bytes]:
        """Many (name, offset, size) at once: one after the other, since a pread does not wait on a network."""
        return [self.read_range(*read) for read in reads]

    def sizes(self) -> dict[str, int]:
        """{file name: bytes} of the files directly inside."""
        if not self.path.is_dir():
            return {}
        return {entry.name: entry.stat().st_size for entry in os.scandir(self.path) if entry.is_file()}


class S3Folder:
    """An S3 prefix read like a folder: whole small files, and byte ranges of shards (ranged GETs)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.bucket, prefix = parse_s3_uri(self.uri)
        self.prefix = prefix + "/" if prefix else ""
        self._client, self._pid = None, None

    def __getstate__(self):  # a boto3 client is not shared across processes
        return {**self.__dict__, "_client": None, "_pid": None}

    def resolved(self) -> str:
        return self.uri

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():
            self._client, self._pid = s3_reader(max_pool_connections=32), os.getpid()
        return self._client

    def read_bytes(self, name: str) -> bytes:
        return self._get(name)

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        data = self._get(name, f"bytes={offset}-{offset + size - 1}")
        if len(data) != size:
            raise BincounterError(f"{self.uri}/{name}: {len(data)} of {size} bytes at {offset} (a shard cut short?)")
        return data

    def read_ranges(self, reads: list[tuple[str, int, int]]) -> list[bytes]:
        """Many (name, offset, size) at once, CONCURRENT_GETS in flight: each GET waits on the network, not
        the CPU, so a batch's photos arrive in about the time of one round trip per CONCURRENT_GETS."""
        from concurrent.futures import ThreadPoolExecutor

        if len(reads) <= 1:
            return [self.read_range(*read) for read in reads]
        with ThreadPoolExecutor(max_workers=min(CONCURRENT_GETS, len(reads))) as pool:
            return list(pool.map(lambda read: self.read_range(*read), reads))

    def sizes(self) -> dict[str, int]:
        from botocore.exceptions import BotoCoreError, ClientError

        found = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(self.prefix):]
                    if name and "/" not in name:
                        found[name] = obj["Size"]
        except (BotoCoreError, ClientError) as exc:
            raise BincounterError(f"cannot list {self.uri}: {first_line(exc)}") from None
        return found

    def _get(self, name: str, byte_range: str | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"Range": byte_range} if byte_range else {}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name, **extra)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.uri}/{name}") from None
            raise BincounterError(f"cannot read {self.uri}/{name}: {first_line(exc)}") from None
        except (BotoCoreError, OSError) as exc:
            raise BincounterError(f"cannot read {self.uri}/{name}: {type(exc).__name__}") from None


def open_folder(location) -> LocalFolder | S3Folder:
    """A local path or an s3:// prefix, as a folder read by name and byte range."""
    if isinstance(location, (LocalFolder, S3Folder)):
        return location
    return S3Folder(location) if is_s3(str(location)) else LocalFolder(location)
