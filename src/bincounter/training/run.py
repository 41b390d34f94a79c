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

import numpy as np
import torch
from torch.utils.data import DataLoader

from bincounter import tracking
from bincounter.config import DECODES, Config
from bincounter.data.prepare import LABELS_FILE, verify_prepared
from bincounter.data.split import SPLITS
from bincounter.data.sync import CHANNELS
from bincounter.errors import BincounterError
from bincounter.model import BinCounterNet, count_logits, decode_counts, eval_transform, probabilities, save_model_dir
from bincounter.storage import is_s3, open_folder
from bincounter.training import records
from bincounter.training.checkpoints import CHECKPOINT_FILE, checkpoint_run_id
from bincounter.training.dataset import ShardDataset
from bincounter.training.calibration import (
    RECONCILE_PRECISION,
    expected_calibration_error,
    fit_decode_cuts,
    fit_temperature,
    nll,
    reconcile_threshold,
)
from bincounter.training.loop import distributed, fit, metric_line
from bincounter.training.metrics import METRIC_NAMES, counting_metrics

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


def data_dirs_for(config: Config) -> dict:
    """train/val/test under train.data_dir, checked to be there: local folders (data/prepared), or the
    channels train/validation/test of an s3:// prefix written by the sync stage, streamed from S3."""
    dirs = {name: split_location(config.train.data_dir, name) for name in SPLITS}
    for location in dirs.values():
        if LABELS_FILE not in open_folder(location).sizes():
            raise BincounterError(f"{location}/{LABELS_FILE} not found: run `dvc repro` first (or set --data-dir)")
    verify_prepared(dirs, config.split.out_dir)
    return dirs


def split_location(root: str, split: str):
    """One split under a prepared root: root/<split> locally, root/<channel> under an s3:// sync prefix."""
    return f"{root.rstrip('/')}/{CHANNELS[split]}" if is_s3(root) else Path(root) / split


def run_training(config: Config, data_dirs: dict[str, Path], *, resume: bool = False,
                 model_dir: Path | None = None, output_dir: Path | None = None, track: bool = True,
                 register: bool = True, nested: bool = False, on_epoch=None, run_name: str | None = None,
                 parent_run_id: str | None = None) -> TrainOutcome:
    """Train on data_dirs (train/val/test), evaluate on test, profile, log to MLflow and register.

    model_dir / output_dir: where the weights and the profile go (a temp folder when None); track=False
    trains without MLflow (a SageMaker job with no reachable tracking server).
    """
    rank, _ = distributed()
    resume_run_id = checkpoint_run_id(Path(config.train.checkpoint_dir) / CHECKPOINT_FILE) if resume else None
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(model_dir or Path(scratch) / "model")
        output_dir = Path(output_dir or Path(scratch) / "output")
        profile_dir = output_dir / records.PROFILE_DIR
        with tracking.maybe_run(config, enabled=track and rank == 0, nested=nested, run_name=run_name,
                                parent_run_id=parent_run_id, resume_run_id=resume_run_id) as run:
            def log_epoch(epoch: int, metrics: dict) -> None:
                if run is not None:
                    records.log_epoch(epoch, metrics)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)

            result = fit(config, data_dirs, resume=resume, profile_dir=profile_dir, on_epoch=log_epoch,
                         run_id=run.info.run_id if run else None)
            if rank != 0:
                return TrainOutcome(None, {}, {})
            if result.best_epoch == 0 or not result.history.step_losses:
                raise BincounterError("no training step was taken (is the training split smaller than one batch, "
                                      "or train.epochs already reached by the checkpoint?); nothing to register")
            device = torch.device(result.device)
            calibration = calibrate(result, data_dirs["val"], config, device)
            test = evaluate_split(result.model, data_dirs["test"], result.model_config, device)
            print(metric_line(result.best_epoch, test["metrics"], prefix="test_"), flush=True)
            best_val = {k: v for k, v in result.best_val_metrics.items() if k not in ("train_loss", "val_loss")}
            print(metric_line(result.best_epoch, best_val, prefix="best_val_"), flush=True)  # SageMaker HPO's objective
            save_model_dir(result.model, model_dir, result.model_config)
            records.write_profile(result, profile_dir, config)
            (model_dir / METRICS_FILE).write_text(json.dumps({
                "test": test["metrics"], "val": result.best_val_metrics, "best_epoch": result.best_epoch,
                "calibration": calibration["metrics"]}, indent=2))
            outcome = TrainOutcome(run_id=run.info.run_id if run else None, test_metrics=test["metrics"],
                                   val_metrics=result.best_val_metrics, model_dir=model_dir)
            if run is not None:
                records.log_calibration(calibration, output_dir)
                _log_run(config, result, test, data_dirs, model_dir, output_dir, profile_dir, register, outcome)
    return outcome


def _log_run(config: Config, result, test: dict, data_dirs: dict[str, Path], model_dir: Path, output_dir: Path,
             profile_dir: Path, register: bool, outcome: TrainOutcome) -> None:
    records.set_hardware_tags(result.device, result.precision)
    records.log_datasets(config, data_dirs)
    records.log_test(test, config.data.num_classes, output_dir)
    records.log_profile(profile_dir)
    model_info = records.log_model(model_dir, config, data_dirs["val"], register=register)
    outcome.model_uri = model_info.model_uri
    if register:
        refusal = "trained nothing (train.lr is 0)" if config.train.lr == 0 else ""
        outcome.registered_version, outcome.champion = tracking.promote(
            config, model_info, test["metrics"], test_bins=len(test["targets"]), refusal=refusal)


def split_logits(model: BinCounterNet, split_dir: Path, model_config: dict, device: torch.device,
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(fp32 logits, true counts, ids) of one prepared split through the served model's preprocessing and
    test-time augmentation (model_config's image_size and tta)."""
    dataset = ShardDataset(split_dir, eval_transform(model_config["image_size"]))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model = model.to(device).eval()
    logits, targets = [], []
    with torch.no_grad():
        for images, counts in loader:
            logits.append(count_logits(model, images.to(device), tta=model_config.get("tta", False)).cpu().numpy())
            targets.append(counts.numpy())
    return np.concatenate(logits), np.concatenate(targets), dataset.ids


def calibrate(result, val_dir: Path, config: Config, device: torch.device) -> dict:
    """Fit the temperature on validation (train.calibrate), record it with the decode rule, TTA and
    reconcile's threshold in the model config; -> the calibration metrics and curves."""
    cfg = config.train
    result.model_config.update(decode=cfg.decode, tta=cfg.tta, temperature=1.0)
    logits, targets, _ = split_logits(result.model, val_dir, result.model_config, device)
    temperature = fit_temperature(logits, targets) if cfg.calibrate else 1.0
    before = probabilities(torch.from_numpy(logits)).numpy()
    after = probabilities(torch.from_numpy(logits), temperature).numpy()
    cuts = fit_decode_cuts(after, targets)  # always recorded: evaluation reports every decode side by side
    counts = decode_counts(after, cfg.decode, cuts)
    threshold = reconcile_threshold(after, targets, counts)
    result.model_config.update(temperature=temperature, decode_cuts=cuts, reconcile_threshold=threshold,
                               reconcile_precision=RECONCILE_PRECISION)
    metrics = {"temperature": temperature, "val_ece_before": expected_calibration_error(before, targets),
               "val_ece_after": expected_calibration_error(after, targets), "val_nll_before": nll(before, targets),
               "val_nll_after": nll(after, targets), "reconcile_threshold": threshold}
    print("calibration: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    return {"metrics": metrics, "before": before, "after": after, "targets": targets}


def evaluate_split(model: BinCounterNet, split_dir: Path, model_config: dict, device: torch.device,
                   batch_size: int = 64) -> dict:
    """The served model's numerics on one prepared split: fp32, eval transform, TTA, temperature and the
    decode rule of model_config. Metrics for the configured decode, and for every decode by name."""
    logits, targets, ids = split_logits(model, split_dir, model_config, device, batch_size)
    probs = probabilities(torch.from_numpy(logits), model_config.get("temperature", 1.0)).numpy().astype(np.float64)
    num_classes = model_config["max_count"] + 1
    cuts = model_config.get("decode_cuts")
    predictions = decode_counts(probs, model_config.get("decode", "argmax"), cuts)
    metrics = counting_metrics(targets, predictions, num_classes)
    metrics["ece"] = expected_calibration_error(probs, targets, predictions)
    for how in DECODES:
        metrics.update({f"{how}_{k}": v for k, v in counting_metrics(
            targets, decode_counts(probs, how, cuts), num_classes).items() if k in METRIC_NAMES})
    return {"metrics": metrics, "targets": targets, "predictions": predictions, "probabilities": probs,
            "expected": probs @ np.arange(num_classes), "ids": ids}
