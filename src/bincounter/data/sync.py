"""Stage 4, sync: upload the prepared splits to S3 as SageMaker's train/validation/test channels.

Incremental: an object already there with the same size and sha256 (kept in its metadata) is skipped.
Writes data/sync.json with the channel URIs, or records "local only" when sync.s3_uri is empty.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from bincounter.config import Config, file_sha256
from bincounter.errors import BincounterError
from bincounter.files import write_text
from bincounter.storage import parse_s3_uri, s3_client

# prepared folder -> SageMaker channel name
CHANNELS = {"train": "train", "val": "validation", "test": "test"}


def _remote_sha(client, bucket: str, key: str, size: int) -> str | None:
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return None
    return head.get("Metadata", {}).get("sha256") if head["ContentLength"] == size else None


def sync(config: Config) -> dict:
    prepared = Path(config.prepare.out_dir)
    out = Path(config.sync.out)
    for folder in CHANNELS:
        if not (prepared / folder).is_dir():
            raise BincounterError(f"{prepared / folder} not found: run the prepare stage first (dvc repro prepare)")
    if not config.sync.s3_uri:
        record = {"mode": "local only", "channels": {ch: str(prepared / f) for f, ch in CHANNELS.items()}}
        print("sync: sync.s3_uri is empty; recorded local only")
    else:
        record = {"mode": "s3", "channels": _upload(prepared, config.sync.s3_uri)}
    write_text(out, json.dumps(record, indent=2) + "\n")
    return record


def _upload(prepared: Path, s3_uri: str) -> dict[str, str]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(s3_uri)
    prefix = prefix.rstrip("/")
    client = s3_client()
    files = [p for folder in CHANNELS for p in sorted((prepared / folder).iterdir()) if p.is_file()]
    files.append(prepared / "meta.json")
    uploaded = skipped = 0
    try:
        for path in tqdm(files, desc="sync", unit="file"):
            rel = path.relative_to(prepared)
            channel_path = Path(CHANNELS.get(rel.parts[0], rel.parts[0]), *rel.parts[1:])
            key = f"{prefix}/{channel_path.as_posix()}".lstrip("/")
            sha = file_sha256(path)
            if _remote_sha(client, bucket, key, path.stat().st_size) == sha:
                skipped += 1
                continue
            client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha}})
            uploaded += 1
    except (BotoCoreError, ClientError) as exc:
        raise BincounterError(f"sync to {s3_uri} failed: {exc}") from None
    print(f"sync: uploaded {uploaded}, unchanged {skipped} -> {s3_uri}")
    base = f"s3://{bucket}/{prefix}".rstrip("/")
    return {ch: f"{base}/{ch}/" for ch in CHANNELS.values()}


def channel_uris(sync_json: str | Path = "data/sync.json") -> dict:
    path = Path(sync_json)
    if not path.exists():
        raise BincounterError(f"{path} not found: run `dvc repro` with sync.s3_uri set (s3://bucket/prefix)")
    return json.loads(path.read_text())
