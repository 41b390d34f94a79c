"""`bincounter reconcile`: compare predicted counts with recorded ones and flag the bins that disagree.

Recorded counts come from a CSV (image_id,expected) or a folder of ABID metadata JSON; predictions come
from the served model (bincounter.serving.predict), so the report reflects what production would say.
"""

from __future__ import annotations

import csv
from pathlib import Path

from bincounter.config import Config
from bincounter.errors import BincounterError
from bincounter.images import read_count
from bincounter.serving.predict import IMAGE_SUFFIXES, ImageRef, local_predictor, predict_images
from bincounter.storage import is_s3, parse_s3_uri

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
