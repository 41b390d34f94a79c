"""Where bytes come from and go to: S3 (real AWS or any endpoint in AWS_ENDPOINT_URL) or a local folder.

boto3 honours AWS_ENDPOINT_URL for every service, so the same code talks to AWS or to a local emulator.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse

from bincounter.errors import BincounterError


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
