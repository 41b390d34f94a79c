"""Stage 1, fetch: download a subset of ABID (images + metadata JSON) into data/raw/.

Concurrent (a thread pool with many requests in flight), resumable (a rerun downloads only what is
missing or broken), atomic (bytes go to a hidden temp name and are renamed only once verified).
Every outcome lands in data/raw/index.csv (image_id,status,reason) for the split stage.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bincounter import files
from bincounter.config import DataConfig
from bincounter.errors import BincounterError
from bincounter.images import BadImage, count_from_metadata, parse_metadata, verify_jpeg
from bincounter.storage import is_s3, local_root, parse_s3_uri, s3_client

IMAGES = "bin-images"
METADATA = "metadata"
INDEX = "index.csv"
MANIFEST = "manifest.json"
MAX_WARNINGS = 20
UNREACHABLE_AFTER = 20  # connection failures in a row that mean "the source is unreachable", not "a bad bin"


class Missing(Exception):
    """The object is not in the source."""


class Unreachable(Exception):
    """The source could not be read right now (network, endpoint down): worth a rerun."""


class SourceUnreachable(Exception):
    """Many reads in a row failed to connect: the source is down or unreachable from here."""

    def __init__(self, results: dict[str, tuple[str, str]], reason: str):
        super().__init__(reason)
        self.results, self.reason = results, reason


# ---------------------------------------------------------------- sources


class Source:
    """Read-only access to a bucket-shaped store: ``get(key)`` and ``list_ids()``."""

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def list_ids(self) -> list[str]:
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError


class S3Source(Source):
    def __init__(self, uri: str, workers: int):
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self.client = s3_client(unsigned=True, max_pool_connections=max(10, workers))

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.client.meta.endpoint_url}"

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise Missing(f"missing from source: {key}") from None
            if code in ("NoSuchBucket", "AccessDenied", "403"):
                raise BincounterError(f"cannot read s3://{self.bucket}/{self.prefix}: {code}") from None
            raise Unreachable(f"S3 error {code} for {key}") from None
        except (BotoCoreError, OSError) as exc:
            raise Unreachable(f"{type(exc).__name__} reading {key}") from None

    def list_ids(self) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        ids = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}{METADATA}/"
            )
            for page in tqdm(pages, desc="listing metadata", unit="page", leave=False):
                ids += [Path(o["Key"]).stem for o in page.get("Contents", []) if o["Key"].endswith(".json")]
        except (BotoCoreError, ClientError) as exc:
            raise BincounterError(f"cannot list s3://{self.bucket}/{self.prefix}{METADATA}/: {exc}") from None
        return ids


class LocalSource(Source):
    def __init__(self, root: str):
        self.root = local_root(root)

    def where(self) -> str:
        return str(self.root)

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise Missing(f"missing from source: {key}") from None

    def list_ids(self) -> list[str]:
        return [p.stem for p in (self.root / METADATA).glob("*.json")]


def open_source(source: str, workers: int = 32) -> Source:
    return S3Source(source, workers) if is_s3(source) else LocalSource(source)


# ---------------------------------------------------------------- manifests


def read_manifest(path: str | os.PathLike) -> list[str]:
    """Image ids (strings, order kept, duplicates dropped) from a manifest.

    Accepted: the Udacity ``file_list.json`` format ({"1": ["data/metadata/<id>.json", ...], ...}),
    a JSON list of ids or paths, or a text/CSV file with one id per line (an ``image_id`` header is skipped).
    Ids are checked one by one later (an unsafe one becomes a rejected row); the file's shape is checked here.
    """
    path = Path(path)
    if not path.is_file():
        raise BincounterError(f"manifest {path} not found (set data.subset to a manifest path or 'balanced')")
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


# ---------------------------------------------------------------- atomic, verified files


def write_atomic(path: Path, data: bytes) -> None:
    """Verified bytes land under their final name only whole (fsync'd: a power cut keeps them or nothing)."""
    files.write_bytes(path, data, fsync=True)


def check_metadata(data: bytes) -> int:
    return count_from_metadata(parse_metadata(data))


def check_image(data: bytes) -> None:
    verify_jpeg(data)


def _valid_local(path: Path, check) -> bool:
    try:
        check(path.read_bytes())
        return True
    except FileNotFoundError:
        return False
    except (BadImage, ValueError):
        path.unlink(missing_ok=True)  # broken: remove so nothing downstream mistakes it for data
        return False


# ---------------------------------------------------------------- the fetch itself


@dataclass
class FetchReport:
    statuses: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (status, reason)
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    seconds: float = 0.0

    def ids_with(self, status: str) -> list[str]:
        return [i for i, (s, _) in self.statuses.items() if s == status]


class _Fetcher:
    def __init__(self, source: Source, raw_dir: Path, workers: int):
        self.source, self.raw_dir, self.workers = source, raw_dir, workers
        (raw_dir / IMAGES).mkdir(parents=True, exist_ok=True)
        (raw_dir / METADATA).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.files = 0
        self.bytes = 0

    def _download(self, key: str, path: Path, check) -> None:
        """Download key to path unless a valid copy is there. Raises Missing, Unreachable, BadImage, ValueError."""
        if _valid_local(path, check):
            return
        data = self.source.get(key)
        check(data)
        write_atomic(path, data)
        with self._lock:
            self.files += 1
            self.bytes += len(data)

    def metadata(self, image_id: str) -> int:
        path = files.inside(self.raw_dir / METADATA, f"{files.safe_name(image_id)}.json")
        self._download(f"{METADATA}/{image_id}.json", path, check_metadata)
        return check_metadata(path.read_bytes())

    def one(self, image_id: str, with_image: bool = True) -> tuple[str, str]:
        """Fetch one bin; returns (status, reason) with status ok | rejected | failed."""
        try:
            self.metadata(image_id)  # checks the id is a plain name before any path is made of it
            if with_image:
                image = files.inside(self.raw_dir / IMAGES, f"{image_id}.jpg")
                self._download(f"{IMAGES}/{image_id}.jpg", image, check_image)
        except Missing as exc:
            return "rejected", str(exc)
        except Unreachable as exc:
            return "failed", str(exc)
        except BadImage as exc:
            return "rejected", str(exc)
        except ValueError as exc:
            return "rejected", str(exc)
        return "ok", ""

    def many(self, ids: list[str], desc: str, with_image: bool = True) -> dict[str, tuple[str, str]]:
        """Fetch ids concurrently; -> {id: (status, reason)} in the order of ids. Raises SourceUnreachable
        (with the results so far) after UNREACHABLE_AFTER connection failures in a row."""
        results: dict[str, tuple[str, str]] = {}
        warnings = failures_in_a_row = 0
        start = time.perf_counter()
        with ThreadPoolExecutor(self.workers) as pool, tqdm(total=len(ids), desc=desc, unit="img", mininterval=0.5) as bar:
            futures = {pool.submit(self.one, i, with_image): i for i in ids}
            for future in as_completed(futures):
                image_id = futures[future]
                results[image_id] = status, reason = future.result()
                failures_in_a_row = failures_in_a_row + 1 if status == "failed" else 0
                if failures_in_a_row >= UNREACHABLE_AFTER:
                    pool.shutdown(wait=True, cancel_futures=True)  # the ones in flight finish; no new ones start
                    raise SourceUnreachable(results, reason)
                if status != "ok":
                    warnings += 1
                    if warnings <= MAX_WARNINGS:
                        shown = image_id if files.SAFE_NAME.fullmatch(image_id) else repr(image_id)[:60]
                        bar.write(f"{status}: {shown}: {reason}")
                bar.update()
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{self.files / elapsed:.0f} files/s {self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
        if warnings > MAX_WARNINGS:
            print(f"... and {warnings - MAX_WARNINGS} more (see {self.raw_dir / INDEX})")
        return {i: results[i] for i in ids}


def _clean_partials(raw_dir: Path) -> None:
    for folder in (raw_dir, raw_dir / IMAGES, raw_dir / METADATA):
        files.remove_partials(folder)


def sample_balanced(fetcher: _Fetcher, cfg: DataConfig) -> list[str]:
    """Read metadata of random bins until cfg.per_class of each count 0..max_count are found."""
    candidates = sorted(fetcher.source.list_ids())
    random.Random(cfg.seed).shuffle(candidates)
    candidates = candidates[: cfg.max_candidates]
    chosen: dict[int, list[str]] = {c: [] for c in range(cfg.max_count + 1)}
    chunk = max(64, cfg.workers * 4)
    bar = tqdm(total=cfg.per_class * len(chosen), desc="sampling balanced subset", unit="img")
    for start in range(0, len(candidates), chunk):
        batch = candidates[start : start + chunk]
        with ThreadPoolExecutor(fetcher.workers) as pool:
            counts = list(pool.map(_count_or_none(fetcher), batch))
        for image_id, count in zip(batch, counts):  # in shuffled order, so the result is reproducible
            if count is not None and count in chosen and len(chosen[count]) < cfg.per_class:
                chosen[count].append(image_id)
                bar.update()
        if all(len(v) >= cfg.per_class for v in chosen.values()):
            break
    bar.close()
    short = {c: len(v) for c, v in chosen.items() if len(v) < cfg.per_class}
    if short:
        print(f"warning: only found {short} images for some counts after {len(candidates)} candidates")
    return [i for c in sorted(chosen) for i in chosen[c]]


def _count_or_none(fetcher: _Fetcher):
    def count(image_id: str):
        try:
            return fetcher.metadata(image_id)
        except (Missing, Unreachable, ValueError):
            return None

    return count


def write_index(raw_dir: Path, statuses: dict[str, tuple[str, str]]) -> None:
    rows = ((image_id, status, reason) for image_id, (status, reason) in statuses.items())
    files.write_csv(raw_dir / INDEX, ["image_id", "status", "reason"], rows)


def fetch(cfg: DataConfig) -> FetchReport:
    """Fetch the configured subset. Raises BincounterError when some downloads failed (rerun to resume)."""
    raw_dir = Path(cfg.raw_dir)
    start = time.perf_counter()
    source = open_source(cfg.source, cfg.workers)
    fetcher = _Fetcher(source, raw_dir, max(1, cfg.workers))
    _clean_partials(raw_dir)
    if cfg.subset == "balanced":
        ids = sample_balanced(fetcher, cfg)
        write_atomic(raw_dir / MANIFEST, json.dumps({"subset": "balanced", "ids": ids}).encode())
    else:
        ids = read_manifest(cfg.subset)
    report = FetchReport()
    try:
        report.statuses = fetcher.many(ids, desc=f"fetching {len(ids)} bins")
    except SourceUnreachable as exc:
        write_index(raw_dir, exc.results)  # what arrived is kept; a rerun resumes from it
        raise BincounterError(
            f"cannot reach the data source {source.where()} ({exc.reason}; {UNREACHABLE_AFTER} requests in a row "
            "failed): check the network, a proxy (HTTPS_PROXY), or AWS_ENDPOINT_URL, then rerun to resume") from None
    report.downloaded_files, report.downloaded_bytes = fetcher.files, fetcher.bytes
    report.seconds = time.perf_counter() - start
    write_index(raw_dir, report.statuses)
    ok, rejected, failed = (len(report.ids_with(s)) for s in ("ok", "rejected", "failed"))
    print(
        f"fetch: {ok} ok, {rejected} rejected, {failed} failed; downloaded {report.downloaded_files} files "
        f"({report.downloaded_bytes / 1e6:.1f} MB) in {report.seconds:.1f}s"
    )
    if failed:
        raise BincounterError(
            f"{failed} bins could not be downloaded (e.g. {report.ids_with('failed')[0]}: "
            f"{report.statuses[report.ids_with('failed')[0]][1]}); rerun to resume"
        )
    return report
