"""What a training run leaves in MLflow: per-epoch metrics, the test split's metrics and plots, the
profile and its rules, and the model as the served pyfunc."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np

from bincounter.config import Config
from bincounter.errors import BincounterError
from bincounter.data.prepare import read_labels
from bincounter.serving.pyfunc import example_image_b64, log_pyfunc
from bincounter.storage import open_folder
from bincounter.training.metrics import EPOCH_METRICS, confusion, plot_confusion, plot_per_class
from bincounter.training.profiling import check_rules, write_report

PLOTS_DIR = "plots"
PROFILE_DIR = "profile"
RULES_FILE = "rules.csv"
REPORT_FILE = "report.md"


def log_epoch(epoch: int, metrics: dict) -> None:
    mlflow.log_metrics({k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics}, step=epoch)


def set_hardware_tags(device: str, precision: str) -> None:
    """What the run actually trained on (train.device/precision may say `auto`)."""
    mlflow.set_tags({"device": device, "precision": precision})


def log_test(test: dict, num_classes: int, out_dir: Path, prefix: str = "test") -> None:
    plots = Path(out_dir) / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    mlflow.log_metrics({f"{prefix}_{k}": float(v) for k, v in test["metrics"].items()})
    matrix = confusion(test["targets"], test["predictions"], num_classes)
    plot_confusion(matrix, plots / "confusion_matrix.png", f"{prefix} confusion matrix")
    plot_per_class(test["metrics"], num_classes, plots / "per_class_accuracy.png", f"{prefix} recall per count")
    rows = ["image_id,count,predicted,confidence,expected_count"] + [
        f"{i},{t},{p},{prob[p]:.4f},{float(prob @ np.arange(len(prob))):.4f}"
        for i, t, p, prob in zip(test["ids"], test["targets"], test["predictions"], test["probabilities"])
    ]
    (plots / f"{prefix}_predictions.csv").write_text("\n".join(rows) + "\n")
    mlflow.log_artifacts(str(plots), PLOTS_DIR)


def write_profile(result, profile_dir: Path, config: Config) -> Path:
    profile_dir.mkdir(parents=True, exist_ok=True)
    rules = check_rules(result.history)
    context = {"device": result.device, "precision": result.precision, "arch": config.train.arch,
               "batch size": config.train.batch_size, "epochs run": len(result.history.train_loss),
               "best epoch": result.best_epoch}
    report = write_report(profile_dir / REPORT_FILE, rules, result.history, result.top_operators, context)
    with open(profile_dir / RULES_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rule", "status", "evidence"])
        writer.writerows((r.name, r.status, r.evidence) for r in rules)
    result.rules = rules
    return report


def log_datasets(config: Config, data_dirs: dict[str, Path]) -> None:
    """The run's Datasets section: each prepared split as an MLflow dataset (its labels; the source is the
    split folder or channel; the digest is DVC's hash of data/prepared when dvc.lock records one, else the
    prepare run's id), with the context training / validation / test."""
    import pandas as pd

    from bincounter.data.prepare import read_prepared_record
    from bincounter.tracking import dvc_hashes

    dvc_md5 = dvc_hashes(config).get("dvc.prepared.md5", "")
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        folder = open_folder(data_dirs[split])
        rows = read_labels(folder)
        ids, counts = [r[0] for r in rows], [r[1] for r in rows]
        generation = read_prepared_record(folder).get("generation", "")
        digest = (dvc_md5 or generation)[:32] or None
        frame = pd.DataFrame({"image_id": ids, "count": counts})
        dataset = mlflow.data.from_pandas(frame, source=folder.resolved(), targets="count",
                                          name=f"abid-{split}", digest=digest)
        mlflow.log_input(dataset, context=context, tags={"prepare_generation": generation})


def log_calibration(calibration: dict, out_dir: Path) -> None:
    """The temperature, ECE and NLL before and after on validation, and the reliability diagram."""
    from bincounter.training.calibration import plot_reliability

    mlflow.log_metrics(calibration["metrics"])
    plots = Path(out_dir) / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    plot_reliability(calibration["before"], calibration["after"], calibration["targets"], plots / "reliability.png")
    mlflow.log_artifact(str(plots / "reliability.png"), PLOTS_DIR)


def log_profile(profile_dir: Path) -> None:
    """Each rule as tags rule.<name> (pass/fail/skipped) and rule.<name>.evidence; the folder as artifacts."""
    with open(profile_dir / RULES_FILE, newline="") as handle:
        for row in csv.DictReader(handle):
            mlflow.set_tag(f"rule.{row['rule']}", row["status"])
            mlflow.set_tag(f"rule.{row['rule']}.evidence", row["evidence"][:500])
    mlflow.log_artifacts(str(profile_dir), PROFILE_DIR)


def log_model(model_dir: Path, config: Config, val_dir=None, register: bool = True):
    """The served pyfunc, its input example a real photo from the validation split when there is one."""
    return log_pyfunc(model_dir, example_image_b64(_example_photo(val_dir)),
                      config.mlflow.model_name if register else None)


def _example_photo(split_dir) -> np.ndarray:
    """The split's first photo; a blank one when the split is not readable from here (after a SageMaker
    job whose data lives only in its channels)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from bincounter.training.dataset import ShardDataset

    try:
        jpeg = ShardDataset(split_dir, transform=None).jpeg(0) if split_dir is not None else None
    except (BincounterError, OSError, IndexError):
        jpeg = None
    if jpeg is None:
        return np.zeros((64, 64, 3), np.uint8)
    return decode_jpeg(jpeg, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
