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
from bincounter.data.prepare import LABELS_FILE, verify_prepared
from bincounter.errors import BincounterError, first_line

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
        if not (path / LABELS_FILE).exists():
            raise BincounterError(f"channel {name} ({path}) has no {LABELS_FILE}: check the job's input channels")
    verify_prepared(data_dirs)  # the channels come from one prepare run
    model_dir = Path(os.environ["SM_MODEL_DIR"])
    data_output = Path(os.environ.get("SM_OUTPUT_DATA_DIR", model_dir / "output"))
    return config, data_dirs, model_dir, data_output


def output_dir() -> Path:
    """/opt/ml/output (SM_OUTPUT_DIR): SageMaker reads `failure` there as the job's FailureReason."""
    return Path(os.environ.get("SM_OUTPUT_DIR", "/opt/ml/output"))


def write_failure(message: str) -> None:
    """bincounter's one-line error as the job's FailureReason (the first writer wins: the SDK's driver only
    writes its traceback when no failure file exists). Best-effort: outside a job the folder may not exist."""
    path = output_dir() / "failure"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(message.strip().splitlines()[0][:1000] + "\n" if message.strip() else "failed\n")
    except OSError:
        pass


def quiet_progress_bars() -> None:
    """No tqdm bars in CloudWatch (each redraw is a log line): every bar in this process is disabled."""
    os.environ["TQDM_DISABLE"] = "1"
    try:
        import tqdm.std
    except ImportError:
        return
    cls = tqdm.std.tqdm
    if getattr(cls.__init__, "_bincounter_quiet", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    __init__._bincounter_quiet = True
    cls.__init__ = __init__


def tracking_error(exc: BaseException) -> bool:
    """An error of the MLflow client or the network under it (not of training itself)."""
    from mlflow.exceptions import MlflowException

    root = type(exc).__module__.split(".")[0]
    return isinstance(exc, (MlflowException, ConnectionError, TimeoutError)) or root in (
        "mlflow", "requests", "urllib3", "http", "sagemaker_mlflow")


def _tracking_reachable() -> str:
    """"" when the forwarded tracking server answers, else why not."""
    from mlflow import MlflowClient

    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure means: train without it
        return f"{type(exc).__name__}: {first_line(exc)[:200]}"
    return ""


def _drop_tracking() -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_CONTEXT", "MLFLOW_RUN_ID"):
        os.environ.pop(name, None)


def train(config: Config):
    """`bincounter train` inside a job: the channels, model and output folders from SM_*, always resuming
    from the checkpoint folder (a spot interruption restarts the job), MLflow only when a tracking URI was
    forwarded to the job, and then best-effort: a server that does not answer, or fails during training,
    never fails the job (the model comes back in model.tar.gz and the launching side logs it). The profile
    lands in SM_OUTPUT_DATA_DIR/profile (output.tar.gz). An error becomes the job's one-line FailureReason.
    -> TrainOutcome"""
    quiet_progress_bars()
    try:
        return _train(config)
    except BincounterError as exc:
        write_failure(f"error: {exc}")
        raise
    except Exception as exc:
        write_failure(f"{type(exc).__name__}: {exc}")
        raise


def _train(config: Config):
    from bincounter.training.run import METRICS_FILE, run_training  # torch and mlflow load only in a job

    config, data_dirs, model_dir, out_dir = apply(config)
    track = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if track:
        problem = _tracking_reachable()
        if problem:
            print(f"warning: MLflow tracking server {os.environ['MLFLOW_TRACKING_URI']} is not usable ({problem}); "
                  "training without it (the model still comes back in model.tar.gz)", flush=True)
            _drop_tracking()
            track = False
    try:
        return run_training(config, data_dirs, resume=True, model_dir=model_dir, output_dir=out_dir,
                            track=track, register=register_model())
    except Exception as exc:
        if not (track and tracking_error(exc)):
            raise
        print(f"warning: MLflow tracking failed during the job ({type(exc).__name__}: {first_line(exc)[:200]}); "
              "going on without it", flush=True)
        _drop_tracking()
        if (model_dir / METRICS_FILE).exists():  # the model was written before logging failed
            from bincounter.training.run import TrainOutcome

            metrics = json.loads((model_dir / METRICS_FILE).read_text())
            return TrainOutcome(None, metrics.get("test", {}), metrics.get("val", {}), model_dir=model_dir)
        # resumes from the last checkpoint: the epochs already done are not repeated
        return run_training(config, data_dirs, resume=True, model_dir=model_dir, output_dir=out_dir,
                            track=False, register=False)
