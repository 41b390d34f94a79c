"""The container side of a SageMaker training job: SM_* variables choose data, model, output and
checkpoint folders, and `train` hands them to the one training function (bincounter.training.run).

SageMaker passes hyperparameters both as SM_HPS (JSON) and as `--name value` arguments; their names are
the training knobs (config.hyperparameter_keys), so the container runs exactly the local training code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bincounter.config import Config, hyperparameter_keys, with_overrides
from bincounter.data.prepare import IMAGES_FILE
from bincounter.errors import BincounterError

CHECKPOINT_DIR = "/opt/ml/checkpoints"  # SageMaker syncs it with CheckpointConfig.S3Uri; SM_CHECKPOINT_DIR overrides
# "false": the job's own MLflow run (when MLFLOW_TRACKING_URI is set) does not register the model, because
# the launching side registers it from model.tar.gz (bincounter.aws.jobs sets this).
REGISTER_ENV = "BINCOUNTER_REGISTER_MODEL"


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
    keys = hyperparameter_keys()
    unknown = set(hps) - set(keys)
    if unknown:
        print(f"warning: ignoring unknown hyperparameters {sorted(unknown)}")
    return {keys[k]: v for k, v in hps.items() if k in keys}


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
        if not (path / IMAGES_FILE).exists():
            raise BincounterError(f"channel {name} ({path}) has no {IMAGES_FILE}: check the job's input channels")
    model_dir = Path(os.environ["SM_MODEL_DIR"])
    output_dir = Path(os.environ.get("SM_OUTPUT_DATA_DIR", model_dir / "output"))
    return config, data_dirs, model_dir, output_dir



def train(config: Config):
    """`bincounter train` inside a job: the channels, model and output folders from SM_*, always resuming
    from the checkpoint folder (a spot interruption restarts the job), MLflow only when a tracking URI was
    forwarded to the job. The profile lands in SM_OUTPUT_DATA_DIR/profile (output.tar.gz). -> TrainOutcome"""
    from bincounter.training.run import run_training  # torch and mlflow load only when a job trains

    config, data_dirs, model_dir, output_dir = apply(config)
    track = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    outcome = run_training(config, data_dirs, resume=True, model_dir=model_dir, output_dir=output_dir,
                           track=track, register=register_model())
    return outcome
