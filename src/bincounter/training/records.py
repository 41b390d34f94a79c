"""What a training run leaves in MLflow: per-epoch metrics, the test split's metrics and plots, the
profile and its rules, and the model as the served pyfunc."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np

from bincounter.config import Config
from bincounter.data.prepare import IMAGES_FILE, load_prepared
from bincounter.serving.pyfunc import example_image_b64, log_pyfunc
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
    rows = ["image_id,count,predicted,confidence"] + [
        f"{i},{t},{p},{prob[p]:.4f}"
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


def log_profile(profile_dir: Path) -> None:
    """Each rule as tags rule.<name> (pass/fail/skipped) and rule.<name>.evidence; the folder as artifacts."""
    with open(profile_dir / RULES_FILE, newline="") as handle:
        for row in csv.DictReader(handle):
            mlflow.set_tag(f"rule.{row['rule']}", row["status"])
            mlflow.set_tag(f"rule.{row['rule']}.evidence", row["evidence"][:500])
    mlflow.log_artifacts(str(profile_dir), PROFILE_DIR)


def log_model(model_dir: Path, config: Config, val_dir: Path | None = None, register: bool = True):
    """The served pyfunc, its input example a real photo from the validation split when there is one."""
    images = load_prepared(val_dir)[0] if val_dir is not None and (Path(val_dir) / IMAGES_FILE).exists() else []
    example = example_image_b64(images[0] if len(images) else np.zeros((64, 64, 3), np.uint8))
    return log_pyfunc(model_dir, example, config.mlflow.model_name if register else None)
