"""A training run: `fit`, then the test split, the profile, MLflow records and the registry.

`run_training` is the one training code path. It trains on the folders it is given and never asks
where it runs: the CLI hands it data/prepared locally, bincounter.aws.container hands it the SageMaker
channels, and HPO hands it one trial's config.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bincounter import tracking
from bincounter.config import Config
from bincounter.data.prepare import IMAGES_FILE
from bincounter.data.split import SPLITS
from bincounter.errors import BincounterError
from bincounter.model import BinCounterNet, eval_transform, save_model_dir
from bincounter.training import records
from bincounter.training.dataset import PreparedDataset
from bincounter.training.loop import distributed, fit, metric_line, predict_loader
from bincounter.training.metrics import counting_metrics

METRICS_FILE = "metrics.json"  # beside the weights: what SageMaker's model.tar.gz brings back


@dataclass
class TrainOutcome:
    run_id: str | None
    test_metrics: dict
    val_metrics: dict
    model_uri: str | None = None
    registered_version: str | None = None
    champion: bool = False
    model_dir: Path | None = None


def data_dirs_for(config: Config) -> dict[str, Path]:
    """train/val/test under train.data_dir (data/prepared), checked to be there."""
    root = Path(config.train.data_dir)
    dirs = {name: root / name for name in SPLITS}
    for path in dirs.values():
        if not (path / IMAGES_FILE).exists():
            raise BincounterError(f"{path}/{IMAGES_FILE} not found: run `dvc repro` first (or set --data-dir)")
    return dirs


def run_training(config: Config, data_dirs: dict[str, Path], *, resume: bool = False,
                 model_dir: Path | None = None, output_dir: Path | None = None, track: bool = True,
                 register: bool = True, nested: bool = False, on_epoch=None, run_name: str | None = None,
                 parent_run_id: str | None = None) -> TrainOutcome:
    """Train on data_dirs (train/val/test), evaluate on test, profile, log to MLflow and register.

    model_dir / output_dir: where the weights and the profile go (a temp folder when None); track=False
    trains without MLflow (a SageMaker job with no reachable tracking server).
    """
    rank, _ = distributed()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(model_dir or Path(scratch) / "model")
        output_dir = Path(output_dir or Path(scratch) / "output")
        profile_dir = output_dir / records.PROFILE_DIR
        with tracking.maybe_run(config, enabled=track and rank == 0, nested=nested, run_name=run_name,
                                parent_run_id=parent_run_id) as run:
            def log_epoch(epoch: int, metrics: dict) -> None:
                if run is not None:
                    records.log_epoch(epoch, metrics)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)

            result = fit(config, data_dirs, resume=resume, profile_dir=profile_dir, on_epoch=log_epoch)
            if rank != 0:
                return TrainOutcome(None, {}, {})
            if result.best_epoch == 0:
                raise BincounterError("no epoch was trained (train.epochs already reached by the checkpoint?); "
                                      "nothing to evaluate or register")
            test = evaluate_split(result.model, data_dirs["test"], config.train.image_size,
                                  config.data.num_classes, torch.device(result.device))
            print(metric_line(result.best_epoch, test["metrics"], prefix="test_"), flush=True)
            best_val = {k: v for k, v in result.best_val_metrics.items() if k not in ("train_loss", "val_loss")}
            print(metric_line(result.best_epoch, best_val, prefix="best_val_"), flush=True)  # SageMaker HPO's objective
            save_model_dir(result.model, model_dir, result.model_config)
            records.write_profile(result, profile_dir, config)
            (model_dir / METRICS_FILE).write_text(json.dumps({
                "test": test["metrics"], "val": result.best_val_metrics, "best_epoch": result.best_epoch}, indent=2))
            outcome = TrainOutcome(run_id=run.info.run_id if run else None, test_metrics=test["metrics"],
                                   val_metrics=result.best_val_metrics, model_dir=model_dir)
            if run is not None:
                _log_run(config, result, test, data_dirs, model_dir, output_dir, profile_dir, register, outcome)
    return outcome


def _log_run(config: Config, result, test: dict, data_dirs: dict[str, Path], model_dir: Path, output_dir: Path,
             profile_dir: Path, register: bool, outcome: TrainOutcome) -> None:
    records.set_hardware_tags(result.device, result.precision)
    records.log_test(test, config.data.num_classes, output_dir)
    records.log_profile(profile_dir)
    model_info = records.log_model(model_dir, config, data_dirs["val"], register=register)
    outcome.model_uri = model_info.model_uri
    if register:
        outcome.registered_version, outcome.champion = tracking.promote(config, model_info, test["metrics"])


def evaluate_split(model: BinCounterNet, split_dir: Path, image_size: int, num_classes: int,
                   device: torch.device, batch_size: int = 64) -> dict:
    """The served model's numerics (fp32, eval transform) on one prepared split."""
    dataset = PreparedDataset(split_dir, eval_transform(image_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    probs, targets, _ = predict_loader(model.to(device), loader, device)
    predictions = probs.argmax(1)
    return {"metrics": counting_metrics(targets, predictions, num_classes),
            "targets": targets, "predictions": predictions, "probabilities": probs, "ids": dataset.ids}
