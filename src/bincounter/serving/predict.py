"""`bincounter predict`: count the items in bin photos (files, folders, s3:// prefixes).

It sends base64 images in batches through the served contract (bincounter.pyfunc): either to the
MLflow model in this process or to a SageMaker endpoint running MLflow's scoring server, so local
and remote answers have the same shape. Images come from files, folders or s3:// prefixes.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bincounter import tracking
from bincounter.config import Config
from bincounter.errors import BincounterError, first_line
from bincounter.storage import is_s3, parse_s3_uri, s3_reader

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ENDPOINT_MAX_BYTES = 5 * 2**20  # SageMaker real-time payloads are capped at 6 MB (serverless: 4 MB)
READ_THREADS = 8
PROGRESS_MIN_IMAGES = 32  # a progress bar (stderr) only when there are many images and several batches

Predictor = Callable[[list[str]], list[dict]]  # base64 images -> [{"count", "confidence", "probabilities"}]


@dataclass(frozen=True)
class ImageRef:
    """One image: its display name (path or s3:// URI), the id reconcile matches on, and where to read it."""

    name: str
    image_id: str
    bucket: str = ""
    key: str = ""

    def read(self, client=None) -> bytes:
        try:
            if self.bucket:
                return client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
            return Path(self.name).read_bytes()
        except Exception as exc:  # noqa: BLE001 - OSError or botocore's errors, one line either way
            raise BincounterError(f"{self.name}: cannot read ({first_line(exc)})") from None


# ------------------------------------------------------------------ finding images


def find_images(paths: Iterable[str]) -> list[ImageRef]:
    """Files, folders (searched recursively for .jpg/.jpeg/.png) and s3:// prefixes, in a stable order."""
    refs: list[ImageRef] = []
    for path in paths:
        found = _s3_images(path) if is_s3(path) else _local_images(Path(path))
        if not found:
            raise BincounterError(f"{path}: no .jpg/.jpeg/.png images found")
        refs.extend(found)
    return refs


def _local_images(path: Path) -> list[ImageRef]:
    if path.is_file():
        return [ImageRef(str(path), path.stem)]
    if not path.is_dir():
        raise BincounterError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [ImageRef(str(p), p.stem) for p in files]


def _s3_images(uri: str) -> list[ImageRef]:
    bucket, prefix = parse_s3_uri(uri)
    client = s3_reader()
    refs = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.lower().endswith(IMAGE_SUFFIXES):
                    refs.append(ImageRef(f"s3://{bucket}/{key}", Path(key).stem, bucket, key))
    except Exception as exc:  # noqa: BLE001
        raise BincounterError(f"{uri}: cannot list ({first_line(exc)})") from None
    return sorted(refs, key=lambda ref: ref.name)


# ------------------------------------------------------------------ predictors


def model_uri_for(config: Config, model: str | None) -> str:
    return model or f"models:/{config.mlflow.model_name}@{config.mlflow.champion_alias}"


def local_predictor(config: Config, model: str | None = None) -> Predictor:
    """The logged pyfunc, loaded once in this process."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException


    uri = model_uri_for(config, model)
    tracking.setup(config)
    try:
        pyfunc = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 - MlflowException, OSError, a broken pickle...
        raise BincounterError(f"cannot load model {uri}: {first_line(exc)}") from None

    def predict(images: list[str]) -> list[dict]:
        try:
            return pyfunc.predict(pd.DataFrame({"image": images})).to_dict("records")
        except MlflowException as exc:
            raise _RowError(exc.message) from None

    return predict


def endpoint_predictor(name: str, region: str) -> Predictor:
    """A SageMaker endpoint serving the MLflow model: the scoring server's JSON in and out."""
    import boto3

    client = boto3.client("sagemaker-runtime", region_name=region)

    def predict(images: list[str]) -> list[dict]:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}})
        try:
            response = client.invoke_endpoint(EndpointName=name, ContentType="application/json",
                                              Accept="application/json", Body=body)
            payload = response["Body"].read()
        except Exception as exc:  # noqa: BLE001 - ClientError (ModelError carries the server's 4xx text)
            message = getattr(exc, "response", {}).get("OriginalMessage") or str(exc)
            if _ROW.search(message):
                raise _RowError(message) from None
            raise BincounterError(f"endpoint {name} ({region}): {first_line(exc)}") from None
        return _parse_predictions(payload, len(images), name)

    return predict


def _parse_predictions(payload: bytes, expected: int, name: str) -> list[dict]:
    try:
        predictions = json.loads(payload)["predictions"]
    except (ValueError, KeyError, TypeError):
        raise BincounterError(f"endpoint {name}: answer is not MLflow's {{\"predictions\": [...]}} "
                              f"({payload[:80]!r})") from None
    if not isinstance(predictions, list) or len(predictions) != expected:
        raise BincounterError(f"endpoint {name}: sent {expected} images, got {len(predictions)} predictions")
    return predictions


def make_predictor(config: Config, model: str | None, endpoint: str | None, region: str | None) -> Predictor:
    if endpoint:
        if model:
            raise BincounterError("give either --model or --endpoint, not both")
        return endpoint_predictor(endpoint, region or config.deploy.region)
    return local_predictor(config, model)


# ------------------------------------------------------------------ batching


class _RowError(Exception):
    """The model refused one row of a batch ("row 3: not an image"); mapped back to the file name."""


_ROW = re.compile(r"row (\d+): ([^\"\\\n]+)")


def predict_images(predictor: Predictor, refs: list[ImageRef], batch_size: int = 32,
                   max_bytes: int | None = None) -> Iterator[tuple[ImageRef, dict]]:
    """(ref, prediction) in the order of refs. The next batch is read (on threads) while this one is
    predicted; a tqdm bar on stderr when there are many images."""
    from tqdm import tqdm

    if batch_size < 1:
        raise BincounterError(f"--batch-size must be at least 1, got {batch_size}")
    client = s3_reader(max_pool_connections=READ_THREADS) if any(r.bucket for r in refs) else None
    chunks = [refs[start : start + batch_size] for start in range(0, len(refs), batch_size)]
    bar = tqdm(total=len(refs), unit="img", file=sys.stderr, leave=False,
               disable=len(refs) < PROGRESS_MIN_IMAGES or len(chunks) < 2)
    with ThreadPoolExecutor(READ_THREADS) as readers, ThreadPoolExecutor(1) as prefetch, bar:
        def read(chunk: list[ImageRef]) -> list[str]:
            return list(readers.map(lambda ref: base64.b64encode(ref.read(client)).decode("ascii"), chunk))

        pending = prefetch.submit(read, chunks[0]) if chunks else None
        for index, chunk in enumerate(chunks):
            encoded = pending.result()
            if index + 1 < len(chunks):
                pending = prefetch.submit(read, chunks[index + 1])
            for sub_refs, sub_images in _split_by_size(chunk, encoded, max_bytes):
                yield from zip(sub_refs, _predict_batch(predictor, sub_refs, sub_images))
            bar.update(len(chunk))


def _split_by_size(refs: list[ImageRef], images: list[str], max_bytes: int | None):
    if not max_bytes:
        yield refs, images
        return
    start, size = 0, 0
    for i, image in enumerate(images):
        if size and size + len(image) > max_bytes:
            yield refs[start:i], images[start:i]
            start, size = i, 0
        size += len(image) + 8
    yield refs[start:], images[start:]


def _predict_batch(predictor: Predictor, refs: list[ImageRef], images: list[str]) -> list[dict]:
    try:
        return predictor(images)
    except _RowError as exc:
        match = _ROW.search(str(exc))
        if match and int(match.group(1)) < len(refs):
            raise BincounterError(f"{refs[int(match.group(1))].name}: {match.group(2).strip()}") from None
        raise BincounterError(f"prediction failed: {first_line(exc)}") from None


# ------------------------------------------------------------------ predict


def predict_paths(config: Config, paths: list[str], model: str | None = None, endpoint: str | None = None,
                  batch_size: int = 32, region: str | None = None) -> Iterator[dict]:
    """{"image", "count", "confidence", "probabilities"} for every image under paths, in order."""
    refs = find_images(paths)
    predictor = make_predictor(config, model, endpoint, region)
    max_bytes = ENDPOINT_MAX_BYTES if endpoint else None
    for ref, prediction in predict_images(predictor, refs, batch_size, max_bytes):
        yield {"image": ref.name, "count": int(prediction["count"]),
               "confidence": float(prediction["confidence"]),
               "probabilities": [float(p) for p in prediction["probabilities"]]}


def predict_command(config: Config, paths: list[str], model: str | None = None, endpoint: str | None = None,
                    batch_size: int = 32, region: str | None = None) -> int:
    """Print one JSON line per image as soon as its batch is done; returns how many."""
    done = 0
    for row in predict_paths(config, paths, model, endpoint, batch_size, region):
        print(json.dumps(row), flush=True)
        done += 1
    return done
