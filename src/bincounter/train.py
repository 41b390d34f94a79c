"""Training: one code path for `mlflow run .`, `bincounter train` and the SageMaker container.

`fit` trains and validates (checkpoint each epoch, --resume, early stopping, DDP when launched by
torchrun); `run_training` wraps it with MLflow tracking, the test evaluation, profiles and the model
registry. Inside a SageMaker container the SM_* variables pick the data, model and checkpoint folders.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from bincounter import sagemaker_env
from bincounter.config import Config, TrainConfig
from bincounter.data import PreparedDataset, eval_transform, train_transform
from bincounter.errors import BincounterError
from bincounter.metrics import counting_metrics
from bincounter.model import BinCounterNet, build_model, save_model_dir
from bincounter.prepare import META_FILE
from bincounter.profiling import RunHistory, StepTimer, TraceRecorder, gpu_utilization_sample

CHECKPOINT_FILE = "last.pt"


class TrainingDiverged(BincounterError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    model: BinCounterNet
    history: RunHistory
    epoch_metrics: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    model_config: dict = field(default_factory=dict)
    trace_dir: Path | None = None
    top_operators: str = ""
    rules: list = field(default_factory=list)


# ------------------------------------------------------------------ plumbing


def select_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise BincounterError("device=cuda but no CUDA GPU is visible")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """What torch.autocast computes in (None: plain fp32). `auto` picks bf16 only where the chip computes it
    natively (CUDA GPUs from Ampere on; CPUs with AMX or AVX512-BF16), where it is 2-3x faster than fp32;
    elsewhere bf16 is emulated and slower. Weights, optimizer state and the loss stay fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun/SageMaker."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def auto_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def class_weights(counts: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present; absent classes get 0."""
    freq = torch.bincount(counts, minlength=num_classes).float()
    weights = torch.where(freq > 0, 1.0 / freq.clamp(min=1), torch.zeros_like(freq))
    return weights * (freq > 0).sum() / weights.sum()


def count_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, weights: torch.Tensor | None):
    """Cross-entropy, plus (loss=emd) the squared earth mover's distance between the predicted and true
    count distributions: an ordinal-aware term that charges more for being further off."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, weight=weights)
    if cfg.loss == "emd":
        cdf_pred = torch.cumsum(F.softmax(logits, dim=1), dim=1)
        cdf_true = torch.cumsum(F.one_hot(targets, logits.shape[1]).float(), dim=1)
        per_sample = ((cdf_pred - cdf_true) ** 2).sum(dim=1)
        if weights is not None:
            w = weights[targets]
            emd = (per_sample * w).sum() / w.sum().clamp(min=1e-12)
        else:
            emd = per_sample.mean()
        loss = loss + cfg.emd_weight * emd
    return loss


def make_loaders(cfg: TrainConfig, data_dirs: dict[str, Path], world: int, rank: int):
    train_ds = PreparedDataset(data_dirs["train"], train_transform(cfg.image_size, cfg.augment))
    val_ds = PreparedDataset(data_dirs["val"], eval_transform(cfg.image_size))
    stored = train_ds.images.shape[1]
    if cfg.image_size > stored:
        raise BincounterError(f"train.image_size={cfg.image_size} is larger than the prepared {stored}px images; "
                              "raise prepare.image_size and rerun `dvc repro`")
    workers = auto_workers(cfg.num_workers)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    generator = torch.Generator().manual_seed(cfg.seed)
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, world, rank, seed=cfg.seed)
    elif cfg.class_balance == "sampler":
        per_class = class_weights(train_ds.counts, int(train_ds.counts.max()) + 1)
        sampler = WeightedRandomSampler(per_class[train_ds.counts].double(), len(train_ds), generator=generator)
    else:
        sampler = None
    train_loader = DataLoader(train_ds, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_ds) > cfg.batch_size, generator=generator, **common)
    val_loader = DataLoader(val_ds, cfg.batch_size * 2, shuffle=False, **common)
    return train_loader, val_loader


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader, device: torch.device, cfg: TrainConfig | None = None,
                   weights: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """-> (probabilities (N, K), true counts (N,), mean loss when cfg is given)."""
    model.eval()
    probs, targets, total, n = [], [], 0.0, 0
    # without cfg (the test split, `evaluate`): fp32, the numerics of the served model
    dtype = autocast_dtype(cfg.precision, device) if cfg is not None else None
    for images, counts in loader:
        images, counts = images.to(device, non_blocking=True), counts.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        if cfg is not None:
            total += float(count_loss(logits, counts, cfg, weights)) * len(counts)
            n += len(counts)
        probs.append(F.softmax(logits.float(), dim=1).cpu().numpy())
        targets.append(counts.cpu().numpy())
    return np.concatenate(probs), np.concatenate(targets), (total / n if n else float("nan"))


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-save leaves the previous checkpoint, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise BincounterError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start over") from None
    if state["arch"] != cfg.arch:
        raise BincounterError(f"checkpoint {path} is for {state['arch']}, not {cfg.arch}; "
                              "delete it or use another --checkpoint-dir")
    return state


# ------------------------------------------------------------------ the training loop


def train_one_epoch(model, loader, optimizer, device, cfg, weights, history: RunHistory, recorder=None,
                    epoch: int = 0, show_progress: bool = True) -> float:
    model.train()
    timer = StepTimer(history, device)
    dtype = autocast_dtype(cfg.precision, device)
    total, n = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               disable=not show_progress, mininterval=1.0)
    for step, (images, counts) in enumerate(bar):
        images, counts = images.to(device, non_blocking=True), counts.to(device, non_blocking=True)
        timer.data_ready()
        with autocast(device, dtype):
            logits = model(images)
        loss = count_loss(logits, counts, cfg, weights)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {float(loss)} at epoch {epoch + 1} step {step + 1} "
                                   f"(lr={cfg.lr}); lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
        optimizer.step()
        timer.step_done()
        value = loss.item()
        history.step_losses.append(value)
        history.grad_norms.append(float(grad_norm))
        if device.type == "cuda" and step % 20 == 0:
            sample = gpu_utilization_sample()
            if sample is not None:
                history.gpu_utilization.append(sample)
        total += value * len(counts)
        n += len(counts)
        bar.set_postfix_str(f"loss {value:.3f}", refresh=False)
        if recorder is not None:
            recorder.step()
        timer.restart()
    return total / max(n, 1)


def build_optimizer(model, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(config: Config, data_dirs: dict[str, Path], *, resume: bool = False, profile_dir: Path | None = None,
        on_epoch: Callable[[int, dict], None] | None = None) -> FitResult:
    """Train on data_dirs['train'], validate on data_dirs['val'] each epoch; returns the best model."""
    cfg = config.train
    rank, world = distributed()
    seed_everything(cfg.seed + rank)
    device = select_device(cfg.device)
    num_classes = config.data.num_classes
    train_loader, val_loader = make_loaders(cfg, data_dirs, world, rank)
    train_counts = train_loader.dataset.counts
    if int(train_counts.max()) >= num_classes:
        raise BincounterError(f"training data has count {int(train_counts.max())} > data.max_count")
    weights = class_weights(train_counts, num_classes).to(device) if cfg.class_balance == "weighted_loss" else None

    model = build_model(cfg.arch, num_classes, cfg.pretrained, cfg.weights_path).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    history = RunHistory(device=device.type)
    precision = "bf16" if autocast_dtype(cfg.precision, device) else "fp32"
    result = FitResult(model=model, history=history, device=device.type, precision=precision)
    start_epoch, best_score, bad_epochs, best_state = 0, -math.inf, 0, None

    checkpoint_path = Path(cfg.checkpoint_dir) / CHECKPOINT_FILE
    if resume:
        state = load_checkpoint(checkpoint_path, cfg)
        if state is None:
            print(f"resume: no checkpoint at {checkpoint_path}; starting from epoch 1")
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best_score, bad_epochs = state["epoch"], state["best_score"], state["bad_epochs"]
            best_state, result.best_epoch = state["best_state"], state["best_epoch"]
            result.epoch_metrics = state["epoch_metrics"]
            result.history = history = RunHistory.from_dict(state["history"])
            torch.set_rng_state(state["rng"])
            print(f"resume: continuing after epoch {start_epoch} from {checkpoint_path}")

    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    recorder = TraceRecorder(profile_dir, cfg.profile_steps, device) if profile_dir and rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        if recorder is not None and not recorder.done:
            with recorder:
                train_loss = train_one_epoch(train_model, train_loader, optimizer, device, cfg, weights, history,
                                             recorder, epoch, rank == 0)
            result.trace_dir, result.top_operators = recorder.out_dir, recorder.table
        else:
            train_loss = train_one_epoch(train_model, train_loader, optimizer, device, cfg, weights, history,
                                         None, epoch, rank == 0)
        scheduler.step()
        probs, targets, val_loss = predict_loader(model, val_loader, device, cfg, weights)
        metrics = counting_metrics(targets, probs.argmax(1), num_classes)
        metrics.update(train_loss=train_loss, val_loss=val_loss, lr=optimizer.param_groups[0]["lr"])
        history.train_loss.append(train_loss)
        history.val_loss.append(val_loss)
        result.epoch_metrics.append(metrics)
        if metrics["macro_accuracy"] > best_score:
            best_score, bad_epochs, result.best_epoch = metrics["macro_accuracy"], 0, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        if rank == 0:
            print(metric_line(epoch + 1, metrics), flush=True)
            save_checkpoint(checkpoint_path, {
                "epoch": epoch + 1, "arch": cfg.arch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "best_score": best_score, "bad_epochs": bad_epochs, "best_state": best_state,
                "best_epoch": result.best_epoch, "epoch_metrics": result.epoch_metrics,
                "history": history.to_dict(), "rng": torch.get_rng_state(),
            })
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
        if bad_epochs >= cfg.patience:
            print(f"early stopping: validation macro_accuracy has not improved for {cfg.patience} epochs")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.model = model.eval()
    result.model_config = {
        "arch": cfg.arch, "max_count": config.data.max_count, "image_size": cfg.image_size,
        "stored_size": int(train_loader.dataset.images.shape[1]), "loss": cfg.loss,
    }
    return result


def metric_line(epoch: int, metrics: dict, prefix: str = "") -> str:
    """The log line SageMaker's metric definitions parse: `epoch=3 accuracy=0.41 rmse=1.02 ...`."""
    keys = ("train_loss", "val_loss", "accuracy", "rmse", "mae", "macro_accuracy", "off_by_one_accuracy")
    parts = [f"{prefix}{k}={metrics[k]:.5f}" for k in keys if k in metrics]
    return f"epoch={epoch} " + " ".join(parts)


# ------------------------------------------------------------------ with MLflow around it


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
    root = Path(config.train.data_dir)
    dirs = {name: root / name for name in ("train", "val", "test")}
    for path in dirs.values():
        if not (path / "images.npy").exists():
            raise BincounterError(f"{path}/images.npy not found: run `dvc repro` first (or set --data-dir)")
    return dirs


def run_training(config: Config, resume: bool = False, *, nested: bool = False, on_epoch=None,
                 register: bool = True, run_name: str | None = None,
                 parent_run_id: str | None = None) -> TrainOutcome:
    """Train, evaluate on test, profile, log everything to MLflow and register the model."""
    if config.train.backend == "sagemaker" and not sagemaker_env.in_container():
        from bincounter.sagemaker_backend import launch_training

        return launch_training(config)
    container = sagemaker_env.in_container()
    if container:
        config, data_dirs, model_dir, output_dir = sagemaker_env.apply(config)
        resume = True  # spot interruptions restart the job: always continue from the checkpoint dir
        register = register and sagemaker_env.register_model()
    else:
        data_dirs = data_dirs_for(config)
        model_dir = output_dir = None
    track = not container or bool(os.environ.get("MLFLOW_TRACKING_URI"))
    rank, _ = distributed()
    from bincounter import tracking

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(model_dir or Path(scratch) / "model")
        output_dir = Path(output_dir or Path(scratch) / "output")
        profile_dir = output_dir / "profile"
        with tracking.maybe_run(config, enabled=track and rank == 0, nested=nested, run_name=run_name,
                                parent_run_id=parent_run_id) as run:
            def log_epoch(epoch: int, metrics: dict) -> None:
                if run is not None:
                    tracking.log_epoch(epoch, metrics)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)

            result = fit(config, data_dirs, resume=resume, profile_dir=profile_dir, on_epoch=log_epoch)
            if rank != 0:
                return TrainOutcome(None, {}, {})
            if run is not None:
                tracking.set_hardware_tags(result.device, result.precision)
            test = evaluate_split(result.model, data_dirs["test"], config, torch.device(
                "cuda" if result.device == "cuda" else "cpu"))
            print(metric_line(result.best_epoch, test["metrics"], prefix="test_"), flush=True)
            if result.best_epoch:  # the best epoch's validation metrics: SageMaker HPO's objective
                best_val = result.epoch_metrics[result.best_epoch - 1]
                print(metric_line(result.best_epoch, {k: v for k, v in best_val.items() if k not in (
                    "train_loss", "val_loss")}, prefix="best_val_"), flush=True)
            save_model_dir(result.model, model_dir, result.model_config)
            report = tracking.write_profile(result, profile_dir, config)
            (model_dir / "metrics.json").write_text(json.dumps({
                "test": test["metrics"], "val": result.epoch_metrics[result.best_epoch - 1]
                if result.best_epoch else {}, "best_epoch": result.best_epoch}, indent=2))
            outcome = TrainOutcome(
                run_id=run.info.run_id if run else None, test_metrics=test["metrics"],
                val_metrics=result.epoch_metrics[result.best_epoch - 1] if result.best_epoch else {},
                model_dir=model_dir,
            )
            if run is not None:
                tracking.log_test(test, config.data.num_classes, output_dir)
                tracking.log_profile(profile_dir, report)
                model_info = tracking.log_model(model_dir, config, data_dirs["val"], register=register)
                outcome.model_uri = model_info.model_uri
                if register:
                    outcome.registered_version, outcome.champion = tracking.promote(
                        config, model_info, test["metrics"])
            if container:
                sagemaker_env.copy_outputs(profile_dir, output_dir)
    return outcome


def evaluate_split(model: BinCounterNet, split_dir: Path, config: Config, device: torch.device) -> dict:
    dataset = PreparedDataset(split_dir, eval_transform(config.train.image_size))
    loader = DataLoader(dataset, batch_size=max(config.train.batch_size, 64), shuffle=False)
    probs, targets, _ = predict_loader(model.to(device), loader, device)
    predictions = probs.argmax(1)
    return {"metrics": counting_metrics(targets, predictions, config.data.num_classes),
            "targets": targets, "predictions": predictions, "probabilities": probs, "ids": dataset.ids}


def prepared_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}
