"""Counting metrics and the plots a reviewer looks at (confusion matrix, per-class accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRIC_NAMES = ("accuracy", "rmse", "mae", "macro_accuracy", "off_by_one_accuracy")
LOSS_NAMES = ("train_loss", "val_loss")
EPOCH_KEYS = LOSS_NAMES + METRIC_NAMES  # what each epoch's log line carries (SageMaker parses it)
EPOCH_METRICS = METRIC_NAMES + LOSS_NAMES + ("lr",)  # what each epoch logs to MLflow


def counting_metrics(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """accuracy, rmse, mae, macro_accuracy (mean per-class recall over counts present), off_by_one_accuracy,
    plus class_<k>_accuracy for every count present in y_true."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        return {name: float("nan") for name in METRIC_NAMES}
    diff = y_pred - y_true
    out = {
        "accuracy": float(np.mean(diff == 0)),
        "rmse": float(np.sqrt(np.mean(diff.astype(float) ** 2))),
        "mae": float(np.mean(np.abs(diff))),
        "off_by_one_accuracy": float(np.mean(np.abs(diff) <= 1)),
    }
    recalls = {}
    for k in range(num_classes):
        mask = y_true == k
        if mask.any():
            recalls[k] = float(np.mean(y_pred[mask] == k))
            out[f"class_{k}_accuracy"] = recalls[k]
    out["macro_accuracy"] = float(np.mean(list(recalls.values())))
    return out


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def plot_confusion(matrix: np.ndarray, path: str | Path, title: str = "Confusion matrix") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black", fontsize=8)
    ax.set(xlabel="predicted count", ylabel="true count", title=title,
           xticks=range(len(matrix)), yticks=range(len(matrix)))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_per_class(metrics: dict[str, float], num_classes: int, path: str | Path, title="Per-class accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(range(num_classes))
    values = [metrics.get(f"class_{k}_accuracy", 0.0) for k in classes]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(classes, values, color="tab:blue")
    ax.axhline(metrics.get("macro_accuracy", 0.0), color="tab:red", linestyle="--", label="macro accuracy")
    ax.set(xlabel="true count", ylabel="recall", ylim=(0, 1), title=title, xticks=classes)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
