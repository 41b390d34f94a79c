"""`mlflow run . -e evaluate`: a logged model and a split -> metrics and plots in a new run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException

from bincounter import tracking
from bincounter.config import Config
from bincounter.data.split import SPLITS
from bincounter.errors import BincounterError, first_line
from bincounter.model import MODEL_CONFIG_FILE, load_model_dir
from bincounter.training import records
from bincounter.training.metrics import METRIC_NAMES
from bincounter.training.run import evaluate_split, split_location


def local_model_dir(model_uri: str) -> Path:
    """Download a logged bincounter pyfunc and return its weights folder."""
    try:
        root = Path(mlflow.artifacts.download_artifacts(model_uri))
    except (MlflowException, OSError) as exc:
        raise BincounterError(f"cannot load model {model_uri}: {first_line(exc)}") from None
    # MLflow keeps the logged folder under its own name (artifacts/model), so find it by its config file
    found = sorted((root / "artifacts").glob(f"*/{MODEL_CONFIG_FILE}"))
    if not found:
        raise BincounterError(f"{model_uri} is not a bincounter model (no artifacts/*/{MODEL_CONFIG_FILE})")
    return found[0].parent


def evaluate_model(config: Config, model_uri: str, split: str = "test") -> dict:
    split_dir = split_location(config.train.data_dir, split) if split in SPLITS else split
    tracking.setup(config)
    model, model_config = load_model_dir(local_model_dir(model_uri))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate_split(model, split_dir, model_config, device)
    name = split if split in SPLITS else "eval"
    with mlflow.start_run(run_name=f"evaluate-{name}"), tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags({"model_uri": model_uri, "split": str(split_dir)})
        records.log_test(result, model_config["max_count"] + 1, Path(tmp), prefix=name)
    metrics = result["metrics"]
    print(" ".join(f"{k}={metrics[k]:.4f}" for k in METRIC_NAMES))
    return metrics
