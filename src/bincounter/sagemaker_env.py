"""Inside a SageMaker training container: SM_* variables choose data, model, output and checkpoint folders.

SageMaker passes hyperparameters both as SM_HPS (JSON) and as command-line arguments; the same
`bincounter train` entry point reads them, so the container runs exactly the local training code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bincounter.config import Config, with_overrides
from bincounter.errors import BincounterError

CHECKPOINT_DIR = "/opt/ml/checkpoints"  # SageMaker syncs it with CheckpointConfig.S3Uri; SM_CHECKPOINT_DIR overrides
# "false": the job's own MLflow run (when MLFLOW_TRACKING_URI is set) does not register the model, because
# the launching side registers it from model.tar.gz (bincounter.sagemaker_backend sets this).
REGISTER_ENV = "BINCOUNTER_REGISTER_MODEL"
# hyperparameter name (as SageMaker passes it) -> params key
HP_KEYS = {
    "arch": "train.arch", "pretrained": "train.pretrained", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "batch-size": "train.batch_size", "lr": "train.lr",
    "weight_decay": "train.weight_decay", "optimizer": "train.optimizer", "loss": "train.loss",
    "emd_weight": "train.emd_weight", "class_balance": "train.class_balance", "augment": "train.augment",
    "image_size": "train.image_size", "seed": "train.seed", "patience": "train.patience",
    "max_count": "data.max_count", "profile_steps": "train.profile_steps", "num_workers": "train.num_workers",
    "precision": "train.precision",
    "experiment": "mlflow.experiment", "model_name": "mlflow.model_name",
}


def in_container() -> bool:
    return "SM_MODEL_DIR" in os.environ and "SM_CHANNEL_TRAIN" in os.environ


def register_model() -> bool:
    return os.environ.get(REGISTER_ENV, "true").strip().lower() not in ("false", "0", "no")


def hyperparameters() -> dict[str, str]:
    raw = os.environ.get("SM_HPS", "{}")
    try:
        hps = json.loads(raw)
    except json.JSONDecodeError:
        raise BincounterError("SM_HPS is not valid JSON") from None
    unknown = set(hps) - set(HP_KEYS)
    if unknown:
        print(f"warning: ignoring unknown hyperparameters {sorted(unknown)}")
    return {HP_KEYS[k]: v for k, v in hps.items() if k in HP_KEYS}


def apply(config: Config) -> tuple[Config, dict[str, Path], Path, Path]:
    """-> (config with SM_HPS applied, data dirs, model dir, output dir)."""
    overrides = hyperparameters()
    overrides["train.checkpoint_dir"] = os.environ.get("SM_CHECKPOINT_DIR", CHECKPOINT_DIR)
    if os.environ.get("SM_NUM_GPUS", "0") == "0":
        overrides["train.device"] = "cpu"
    config = with_overrides(config, overrides)
    data_dirs = {
        "train": Path(os.environ["SM_CHANNEL_TRAIN"]),
        "val": Path(os.environ.get("SM_CHANNEL_VALIDATION", os.environ.get("SM_CHANNEL_VAL", ""))),
        "test": Path(os.environ.get("SM_CHANNEL_TEST", "")),
    }
    for name, path in data_dirs.items():
        if not (path / "images.npy").exists():
            raise BincounterError(f"channel {name} ({path}) has no images.npy: check the job's input channels")
    model_dir = Path(os.environ["SM_MODEL_DIR"])
    output_dir = Path(os.environ.get("SM_OUTPUT_DATA_DIR", model_dir / "output"))
    return config, data_dirs, model_dir, output_dir


def copy_outputs(profile_dir: Path, output_dir: Path) -> None:
    """The profile lands in SM_OUTPUT_DATA_DIR (output.tar.gz), where the backend picks it up."""
    target = output_dir / "profile"
    if profile_dir.exists() and profile_dir.resolve() != target.resolve():
        shutil.copytree(profile_dir, target, dirs_exist_ok=True)
