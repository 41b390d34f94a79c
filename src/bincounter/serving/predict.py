"""`bincounter predict`: count the items in bin photos (files, folders, s3:// prefixes).

It sends base64 images in batches through the served contract (bincounter.pyfunc): either to the
MLflow model in this process or to a SageMaker endpoint running MLflow's scoring server, so local
and remote answers have the same shape. Images come from files, folders or s3:// prefixes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bincounter import tracking
from bincounter.config import Config
from bincounter.errors import BincounterError, first_line
from bincounter.storage import is_s3, parse_s3_uri, s3_reader

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# One request to an endpoint, JSON included: SageMaker caps real-time payloads at 6 MB and serverless ones at
# 4 MB, so batches are split under the smaller (endpoint_predictor checks each body against its endpoint's cap)
ENDPOINT_MAX_BYTES = 3_900_000
ENDPOINT_BODY_LIMITS = {"real-time": 6_000_000, "serverless": 4_000_000, "async": 1_000_000_000}
ASYNC_TIMEOUT_SECONDS = float(os.environ.get("BINCOUNTER_ASYNC_TIMEOUT", "900"))
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

    predict.model_config = getattr(_unwrap(pyfunc), "model_config", {})  # reconcile reads its threshold
    return predict


def _unwrap(pyfunc):
    try:
        return pyfunc.unwrap_python_model()
    except Exception:  # noqa: BLE001 - not a python_function model of ours
        return None


def endpoint_kind(client, name: str) -> tuple[str, str]:
    """("real-time" | "serverless" | "async", async S3 output path or ""), from the endpoint's config;
    real-time when it cannot be described (e.g. a caller allowed only sagemaker:InvokeEndpoint)."""
    try:
        described = client.describe_endpoint(EndpointName=name)
        config = client.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
    except Exception:  # noqa: BLE001 - AccessDenied, or an endpoint that is not there (invoke will say so)
        return "real-time", ""
    output = ((config.get("AsyncInferenceConfig") or {}).get("OutputConfig") or {}).get("S3OutputPath", "")
    if output:
        return "async", output
    if any(v.get("ServerlessConfig") for v in config.get("ProductionVariants", [])):
        return "serverless", ""
    return "real-time", ""


def _request_body(images: list[str]) -> str:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}})


def endpoint_predictor(name: str, region: str) -> Predictor:
    """A SageMaker endpoint serving the MLflow model: the scoring server's JSON in and out. A real-time or
    serverless endpoint is invoked directly, each body under its payload cap (a batch over it is halved);
    an asynchronous one gets the body through S3 and answers there."""
    import boto3

    client = boto3.client("sagemaker-runtime", region_name=region)
    kind, async_output = endpoint_kind(boto3.client("sagemaker", region_name=region), name)
    limit = ENDPOINT_BODY_LIMITS[kind]

    def invoke(body: str) -> bytes:
        try:
            if kind == "async":
                return _invoke_async(client, name, region, async_output, body)
            response = client.invoke_endpoint(EndpointName=name, ContentType="application/json",
                                              Accept="application/json", Body=body)
            return response["Body"].read()
        except (BincounterError, _RowError):
            raise
        except Exception as exc:  # noqa: BLE001 - ClientError (ModelError carries the server's 4xx text)
            message = getattr(exc, "response", {}).get("OriginalMessage") or str(exc)
            if _ROW.search(message):
                raise _RowError(message) from None
            raise BincounterError(f"endpoint {name} ({region}): {first_line(exc)}") from None

    def predict(images: list[str]) -> list[dict]:
        body = _request_body(images)
        if len(body) > limit:
            if len(images) == 1:
                raise _RowError(f"row 0: the request is {len(body) / 1e6:.1f} MB; a {kind} endpoint takes at most "
                                f"{limit / 1e6:g} MB")
            half = len(images) // 2
            return predict(images[:half]) + predict(images[half:])
        return _parse_predictions(invoke(body), len(images), name)

    return predict


def _invoke_async(client, name: str, region: str, output_path: str, body: str) -> bytes:
    """Upload the request next to the endpoint's answers, InvokeEndpointAsync, and wait for the answer (or the
    failure) to appear in S3; the request object is deleted afterwards."""
    import boto3

    from bincounter.storage import parse_s3_uri

    bucket, prefix = parse_s3_uri(output_path)
    parent = prefix.rstrip("/").rsplit("/", 1)[0] if "/" in prefix.rstrip("/") else ""
    key = f"{parent}/requests/{uuid.uuid4().hex}.json".lstrip("/")
    s3 = boto3.client("s3", region_name=region)
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/json")
    try:
        answer = client.invoke_endpoint_async(EndpointName=name, InputLocation=f"s3://{bucket}/{key}",
                                              ContentType="application/json", Accept="application/json")
        deadline, pause = time.monotonic() + ASYNC_TIMEOUT_SECONDS, 0.5
        while time.monotonic() < deadline:
            for location, failed in ((answer.get("OutputLocation"), False), (answer.get("FailureLocation"), True)):
                if not location:
                    continue
                out_bucket, out_key = parse_s3_uri(location)
                try:
                    payload = s3.get_object(Bucket=out_bucket, Key=out_key)["Body"].read()
                except s3.exceptions.NoSuchKey:
                    continue
                if failed:
                    text = payload.decode(errors="replace").strip()
                    if _ROW.search(text):
                        raise _RowError(text)
                    raise BincounterError(f"endpoint {name}: the request failed: "
                                          f"{text.splitlines()[0][:300] if text else 'no reason given'}")
                return payload
            time.sleep(pause)
            pause = min(pause * 1.5, 5.0)
        raise BincounterError(f"endpoint {name}: no answer in {output_path} after {ASYNC_TIMEOUT_SECONDS:.0f} s "
                              "(BINCOUNTER_ASYNC_TIMEOUT)")
    finally:
        s3.delete_object(Bucket=bucket, Key=key)


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
        from bincounter.serving.regions import deploy_region

        return endpoint_predictor(endpoint, deploy_region(config, region))
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
    """{"image", "count", "confidence", "probabilities", "expected_count"} for every image under paths, in order."""
    refs = find_images(paths)
    predictor = make_predictor(config, model, endpoint, region)
    max_bytes = ENDPOINT_MAX_BYTES if endpoint else None
    for ref, prediction in predict_images(predictor, refs, batch_size, max_bytes):
        row = {"image": ref.name, "count": int(prediction["count"]),
               "confidence": float(prediction["confidence"]),
               "probabilities": [float(p) for p in prediction["probabilities"]]}
        if prediction.get("expected_count") is not None:  # models logged before it was served lack it
            row["expected_count"] = float(prediction["expected_count"])
        yield row


def predict_command(config: Config, paths: list[str], model: str | None = None, endpoint: str | None = None,
                    batch_size: int = 32, region: str | None = None) -> int:
    """Print one JSON line per image as soon as its batch is done; returns how many."""
    done = 0
    for row in predict_paths(config, paths, model, endpoint, batch_size, region):
        print(json.dumps(row), flush=True)
        done += 1
    return done
