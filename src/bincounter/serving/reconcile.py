"""`bincounter reconcile`: compare predicted counts with recorded ones and flag the bins that disagree.

Recorded counts come from a CSV (image_id,expected) or a folder of ABID metadata JSON; predictions come
from the served model (bincounter.serving.predict), so the report reflects what production would say.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from bincounter import files
from bincounter.config import Config
from bincounter.errors import BincounterError
from bincounter.images import read_count
from bincounter.serving.predict import IMAGE_SUFFIXES, ImageRef, local_predictor, predict_images
from bincounter.storage import is_s3, parse_s3_uri

DEFAULT_THRESHOLD = 0.5  # for models logged before the threshold was recorded with them
REPORT_FIELDS = ["image_id", "expected", "predicted", "confidence", "p_expected", "status", "image", "reason"]
STATUS_ORDER = {"flagged": 0, "low_confidence": 1, "out_of_range": 2, "agree": 3, "unusable": 4}


@dataclass
class Records:
    """Recorded counts by id, and the records that cannot be used with the reason for each."""

    expected: dict[str, int] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)
    repeated: int = 0  # rows that repeat an id with the same count (counted once)

    def add(self, image_id: str, count: int | None, reason: str = "") -> None:
        try:
            files.safe_name(image_id)
        except files.UnsafeName as exc:
            reason = str(exc)
        if reason:
            self.unusable.setdefault(image_id, reason)
        elif image_id in self.unusable:
            pass
        elif image_id in self.expected and self.expected[image_id] != count:
            self.unusable[image_id] = f"listed more than once with different counts ({self.expected.pop(image_id)} " \
                                      f"and {count})"
        else:
            self.repeated += image_id in self.expected
            self.expected[image_id] = count


def read_expected(source: str) -> dict[str, int]:
    """image_id -> recorded count, from a CSV (image_id,expected) or a folder of ABID metadata JSON."""
    return read_records(source).expected


def read_records(source: str) -> Records:
    """The recorded counts of `source`; a record that cannot be used (unsafe id, not a count, conflicting
    duplicate, metadata a parser chokes on) becomes a reason, and the rest goes on."""
    path = Path(source)
    if path.is_dir():
        return _records_from_metadata(path)
    if not path.is_file():
        raise BincounterError(f"{source}: no such CSV file or metadata folder")
    records = Records()
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            column = next((c for c in ("expected", "expected_quantity") if c in fields), None)
            if "image_id" not in fields or column is None:
                raise BincounterError(f"{source}: expected a CSV with columns image_id,expected (got {fields})")
            for row in reader:
                count, reason = _count(row.get(column), f"line {reader.line_num}")
                records.add(str(row.get("image_id") or "").strip(), count, reason)
    except UnicodeDecodeError:
        raise BincounterError(f"{source}: not a UTF-8 CSV file") from None
    except csv.Error as exc:
        raise BincounterError(f"{source}: not a CSV file ({exc})") from None
    return records


def _records_from_metadata(folder: Path) -> Records:
    records = Records()
    for path in sorted(folder.glob("*.json")):
        try:
            records.add(path.stem, read_count(path))
        except ValueError as exc:
            records.add(path.stem, None, str(exc))
    if not records.expected and not records.unusable:
        raise BincounterError(f"{folder}: no metadata .json files")
    return records


def _count(value: str | None, where: str) -> tuple[int | None, str]:
    try:
        count = int(str(value).strip())
    except ValueError:
        return None, f"expected count {str(value)[:20]!r} is not a whole number ({where})"
    if count < 0:
        return None, f"expected count {count} is negative ({where})"
    return count, ""


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
            "status": status, "image": image, "reason": ""}


def reconcile_command(config: Config, model: str | None, expected: str, images: str, report: str = "reconcile.csv",
                      low_confidence: float | None = None, batch_size: int = 32) -> list[dict]:
    """Predict every recorded bin, write the report (disagreements first, most confident first)."""
    if low_confidence is not None and not 0.0 <= low_confidence <= 1.0:
        raise BincounterError(f"--low-confidence must be between 0 and 1, got {low_confidence}")
    records = read_records(expected)
    if records.repeated:
        print(f"note: {records.repeated} row(s) of {expected} repeat an id with the same count; each bin counted once")
    recorded = records.expected
    refs = images_for_ids(images, list(recorded)) if recorded else []
    predictor = local_predictor(config, model)
    if low_confidence is None:
        low_confidence = model_threshold(predictor)
    rows = [judge(ref.image_id, recorded[ref.image_id], prediction, low_confidence, ref.name)
            for ref, prediction in predict_images(predictor, refs, batch_size)]
    rows += [{"image_id": i, "expected": "", "predicted": "", "confidence": 0.0, "p_expected": "",
              "status": "unusable", "image": "", "reason": reason} for i, reason in records.unusable.items()]
    rows.sort(key=lambda r: (STATUS_ORDER[r["status"]], -r["confidence"]))
    write_report(rows, Path(report))
    print_summary(rows, report, low_confidence)
    return rows


def model_threshold(predictor) -> float:
    """The flagging threshold recorded with the model (the calibrated confidence at which its counts were right
    RECONCILE_PRECISION of the time on validation), or 0.5 for models logged without one."""
    model_config = getattr(predictor, "model_config", {}) or {}
    threshold = float(model_config.get("reconcile_threshold", DEFAULT_THRESHOLD))
    if "reconcile_threshold" in model_config:
        print(f"reconcile: flagging at confidence >= {threshold:.3f}, the model's threshold for "
              f"{model_config.get('reconcile_precision', 0.9):.0%} precision on validation")
    return threshold


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
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def print_summary(rows: list[dict], report: str, low_confidence: float, show: int = 20) -> None:
    counts = {status: sum(r["status"] == status for r in rows) for status in STATUS_ORDER}
    print(f"reconciled {len(rows)} bins: {counts['agree']} agree, {counts['flagged']} flagged, "
          f"{counts['low_confidence']} low confidence (disagree, confidence < {low_confidence:g})"
          + (f", {counts['out_of_range']} above the model's range" if counts["out_of_range"] else "")
          + (f", {counts['unusable']} unusable records" if counts["unusable"] else ""))
    for r in [r for r in rows if r["status"] == "unusable"][:5]:
        print(f"  unusable: {r['reason']}")
    flagged = [r for r in rows if r["status"] == "flagged"]
    if flagged:
        print("flagged bins, most confident first:")
        print(f"  {'image_id':<12} {'expected':>8} {'predicted':>9} {'confidence':>10}")
        for r in flagged[:show]:
            print(f"  {r['image_id']:<12} {r['expected']:>8} {r['predicted']:>9} {r['confidence']:>10.4f}")
        if len(flagged) > show:
            print(f"  ... and {len(flagged) - show} more")
    print(f"report: {report}")
