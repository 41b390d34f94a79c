"""`bincounter predict` and `bincounter reconcile`: count the items in bin photos.

Both send base64 images in batches through the served contract (bincounter.pyfunc): either to the
MLflow model in this process or to a SageMaker endpoint running MLflow's scoring server, so local
and remote answers have the same shape. Images come from files, folders or s3:// prefixes.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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

    from bincounter import tracking

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


# ------------------------------------------------------------------ reconcile

REPORT_FIELDS = ["image_id", "expected", "predicted", "confidence", "p_expected", "status", "image"]
STATUS_ORDER = {"flagged": 0, "low_confidence": 1, "out_of_range": 2, "agree": 3}


def read_expected(source: str) -> dict[str, int]:
    """image_id -> recorded count, from a CSV (image_id,expected) or a folder of ABID metadata JSON."""
    path = Path(source)
    if path.is_dir():
        return _expected_from_metadata(path)
    if not path.is_file():
        raise BincounterError(f"{source}: no such CSV file or metadata folder")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        column = next((c for c in ("expected", "expected_quantity") if c in fields), None)
        if "image_id" not in fields or column is None:
            raise BincounterError(f"{source}: expected a CSV with columns image_id,expected (got {fields})")
        return {row["image_id"].strip(): _count(row[column], f"{source} line {reader.line_num}")
                for row in reader}


def _expected_from_metadata(folder: Path) -> dict[str, int]:
    from bincounter.images import read_count

    expected = {}
    for path in sorted(folder.glob("*.json")):
        try:
            expected[path.stem] = read_count(path)
        except ValueError as exc:
            raise BincounterError(f"{path}: {exc}") from None
    if not expected:
        raise BincounterError(f"{folder}: no metadata .json files")
    return expected


def _count(value: str | None, where: str) -> int:
    try:
        count = int(str(value).strip())
    except ValueError:
        raise BincounterError(f"{where}: expected count {value!r} is not a whole number") from None
    if count < 0:
        raise BincounterError(f"{where}: expected count {count} is negative")
    return count


def judge(image_id: str, expected: int, prediction: dict, low_confidence: float, image: str = "") -> dict:
    """One report row: agree, flagged (confident disagreement), low_confidence, or out_of_range."""
    probabilities = prediction["probabilities"]
    predicted, confidence = int(prediction["count"]), float(prediction["confidence"])
    in_range = expected < len(probabilities)
    if not in_range:
        status = "out_of_range"  # the model counts 0..max_count only; it cannot confirm a larger record
    elif predicted == expected:
        status = "agree"
    else:
        status = "flagged" if confidence >= low_confidence else "low_confidence"
    return {"image_id": image_id, "expected": expected, "predicted": predicted,
            "confidence": round(confidence, 4),
            "p_expected": round(float(probabilities[expected]), 4) if in_range else "",
            "status": status, "image": image}


def reconcile_command(config: Config, model: str | None, expected: str, images: str, report: str = "reconcile.csv",
                      low_confidence: float = 0.5, batch_size: int = 32) -> list[dict]:
    """Predict every recorded bin, write the report (disagreements first, most confident first)."""
    if not 0.0 <= low_confidence <= 1.0:
        raise BincounterError(f"--low-confidence must be between 0 and 1, got {low_confidence}")
    recorded = read_expected(expected)
    refs = images_for_ids(images, list(recorded))
    predictor = local_predictor(config, model)
    rows = [judge(ref.image_id, recorded[ref.image_id], prediction, low_confidence, ref.name)
            for ref, prediction in predict_images(predictor, refs, batch_size)]
    rows.sort(key=lambda r: (STATUS_ORDER[r["status"]], -r["confidence"]))
    write_report(rows, Path(report))
    print_summary(rows, report, low_confidence)
    return rows


def images_for_ids(images: str, ids: list[str]) -> list[ImageRef]:
    """<images>/<id>.jpg (or .jpeg/.png) for every id; under s3:// the keys are built, not listed (ABID has
    half a million), so a missing object is reported when it is read."""
    if is_s3(images):
        bucket, prefix = parse_s3_uri(images.rstrip("/") + "/")
        return [ImageRef(f"s3://{bucket}/{prefix}{i}.jpg", i, bucket, f"{prefix}{i}.jpg") for i in ids]
    folder = Path(images)
    if not folder.is_dir():
        raise BincounterError(f"{images}: no such folder")
    refs, missing = [], []
    for image_id in ids:
        path = next((folder / f"{image_id}{s}" for s in IMAGE_SUFFIXES if (folder / f"{image_id}{s}").is_file()), None)
        if path is None:
            missing.append(image_id)
        else:
            refs.append(ImageRef(str(path), image_id))
    if missing:
        raise BincounterError(f"{len(missing)} recorded bin(s) have no image in {images}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return refs


def write_report(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def print_summary(rows: list[dict], report: str, low_confidence: float, show: int = 20) -> None:
    counts = {status: sum(r["status"] == status for r in rows) for status in STATUS_ORDER}
    print(f"reconciled {len(rows)} bins: {counts['agree']} agree, {counts['flagged']} flagged, "
          f"{counts['low_confidence']} low confidence (disagree, confidence < {low_confidence:g})"
          + (f", {counts['out_of_range']} above the model's range" if counts["out_of_range"] else ""))
    flagged = [r for r in rows if r["status"] == "flagged"]
    if flagged:
        print("flagged bins, most confident first:")
        print(f"  {'image_id':<12} {'expected':>8} {'predicted':>9} {'confidence':>10}")
        for r in flagged[:show]:
            print(f"  {r['image_id']:<12} {r['expected']:>8} {r['predicted']:>9} {r['confidence']:>10.4f}")
        if len(flagged) > show:
            print(f"  ... and {len(flagged) - show} more")
    print(f"report: {report}")
