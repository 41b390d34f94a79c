"""The training loop: `train_one_epoch`, `predict_loader` and `fit` (checkpoints, resume, early stopping,
DDP when launched by torchrun). The loop is handed its collaborators (model, loader, optimizer, loss
module, autocast dtype); `fit` is the one place that builds them from the config.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from bincounter.config import Config, TrainConfig
from bincounter.errors import BincounterError
from bincounter.model import BinCounterNet, build_model, eval_transform
from bincounter.training.checkpoints import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from bincounter.training.dataset import ShardDataset, ShardSampler, train_transform
from bincounter.training.loss import CountLoss, class_weights, make_loss
from bincounter.training.metrics import EPOCH_KEYS, counting_metrics
from bincounter.training.profiling import RunHistory, StepTimer, TraceRecorder, gpu_utilization_sample


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

    @property
    def best_val_metrics(self) -> dict:
        return self.epoch_metrics[self.best_epoch - 1] if self.best_epoch else {}


# ------------------------------------------------------------------ devices and numerics


def select_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise BincounterError("train.device=cuda but no CUDA GPU is visible")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """What torch.autocast computes in (None: plain fp32). `auto` picks bf16 only where the chip computes it
    natively (CUDA GPUs from Ampere on; CPUs with AMX or AVX512-BF16); elsewhere bf16 is emulated and
    slower. Weights, optimizer state and the loss stay fp32."""
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
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


GPU_DECODE_BELOW = 8  # loader workers: with fewer, train.jpeg_decoder auto decodes on the GPU


def auto_workers(requested: int, device: torch.device | None = None) -> int:
    """train.num_workers, -1 resolved. Training on a GPU leaves the CPU to the loader: every core but one,
    shared among this machine's ranks (4 workers fed a H100 a third of what resnet50 takes,
    benchmarks/gpu.md). Training on the CPU, workers compete with the model's own threads: at most 4."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device is not None and device.type == "cuda":
        return max(1, (cores - 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(4, cores - 1))


# ------------------------------------------------------------------ data


def make_loaders(cfg: TrainConfig, data_dirs: dict[str, Path], world: int, rank: int, device: torch.device):
    """-> (train loader, val loader, the train loader's generator: its state makes a resume reproducible)."""
    workers = auto_workers(cfg.num_workers, device)
    on_device = decode_on_device(cfg.jpeg_decoder, device, workers)
    train_ds = ShardDataset(data_dirs["train"], train_transform(cfg.image_size, cfg.augment), on_device)
    val_ds = ShardDataset(data_dirs["val"], eval_transform(cfg.image_size), on_device)
    if cfg.image_size > train_ds.stored_size:
        raise BincounterError(f"train.image_size={cfg.image_size} is larger than the prepared "
                              f"{train_ds.stored_size}px images; raise prepare.image_size and rerun `dvc repro`")
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available() and not on_device,
                  persistent_workers=workers > 0)
    generator = torch.Generator().manual_seed(cfg.seed)
    if world > 1:
        sampler = ShardSampler(train_ds.shards, world, rank, seed=cfg.seed)
    elif cfg.class_balance == "sampler":
        per_class = class_weights(train_ds.counts, int(train_ds.counts.max()) + 1)
        sampler = WeightedRandomSampler(per_class[train_ds.counts].double(), len(train_ds), generator=generator)
    else:
        sampler = None
    train_loader = DataLoader(train_ds, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_ds) > cfg.batch_size, generator=generator,
                              collate_fn=train_ds.collate, **common)
    val_loader = DataLoader(val_ds, cfg.batch_size * 2, shuffle=False, collate_fn=val_ds.collate, **common)
    return train_loader, val_loader, generator


def decode_on_device(choice: str, device: torch.device, workers: int) -> bool:
    """train.jpeg_decoder: auto decodes on the GPU (nvJPEG) when training on one with fewer than
    GPU_DECODE_BELOW loader workers, else in the workers: on a H100, nvJPEG and the batched augmentation
    kept up with about 6 to 10 workers' decoding (benchmarks/gpu.md)."""
    if choice == "gpu" and device.type != "cuda":
        raise BincounterError("train.jpeg_decoder=gpu needs a CUDA device (train.device)")
    if choice == "auto":
        return device.type == "cuda" and workers < GPU_DECODE_BELOW
    return choice == "gpu"


# ------------------------------------------------------------------ one epoch, one evaluation


def to_device(loader, images, device: torch.device) -> torch.Tensor:
    """A batch as model input on device: the dataset decides (a ShardDataset may decode JPEGs there)."""
    batch_to = getattr(loader.dataset, "batch_to", None)
    return batch_to(images, device) if batch_to else images.to(device, non_blocking=True)


def train_one_epoch(model, loader, optimizer, loss_fn: CountLoss, device: torch.device, history: RunHistory, *,
                    amp_dtype: torch.dtype | None = None, recorder=None, desc: str = "train",
                    show_progress: bool = True, ema: AveragedModel | None = None, scheduler=None) -> float:
    """One pass over loader; -> mean training loss. Raises TrainingDiverged on a non-finite loss.
    ema, when given, averages the weights after every optimizer step; scheduler, when given, steps after
    every optimizer step too (lr_schedule)."""
    model.train()
    timer = StepTimer(history, device)
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show_progress, mininterval=1.0)
    for step, (images, counts) in enumerate(bar):
        images, counts = to_device(loader, images, device), counts.to(device, non_blocking=True)
        timer.data_ready()
        with autocast(device, amp_dtype):
            logits = model(images)
        loss = loss_fn(logits, counts)
        if not torch.isfinite(loss):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(f"loss became {loss.item()} at {desc} step {step + 1} (lr={lr:g}); "
                                   "lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
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


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader, device: torch.device, *, amp_dtype: torch.dtype | None = None,
                   loss_fn: CountLoss | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """-> (probabilities (N, K), true counts (N,), mean loss, NaN without loss_fn)."""
    model.eval()
    probs, targets, total, n = [], [], 0.0, 0
    for images, counts in loader:
        images, counts = to_device(loader, images, device), counts.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        if loss_fn is not None:
            total += float(loss_fn(logits, counts)) * len(counts)
            n += len(counts)
        probs.append(F.softmax(logits.float(), dim=1).cpu().numpy())
        targets.append(counts.cpu().numpy())
    return np.concatenate(probs), np.concatenate(targets), (total / n if n else float("nan"))


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics (None when decay is 0).
    Its weights move less from one noisy step to the next than the trained ones do."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def build_optimizer(model, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of each optimizer step: train.lr times a linear warm-up over train.warmup_epochs
    (reaching 1 at its last step), times the cosine of the epoch (1 in the first epoch, near 0 in the last:
    what CosineAnnealingLR stepped once an epoch gives). Stepped after every optimizer step."""
    steps_per_epoch, epochs = max(steps_per_epoch, 1), max(cfg.epochs, 1)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def metric_line(epoch: int, metrics: dict, prefix: str = "") -> str:
    """The log line SageMaker's metric definitions parse: `epoch=3 accuracy=0.41 rmse=1.02 ...`."""
    parts = [f"{prefix}{k}={metrics[k]:.5f}" for k in EPOCH_KEYS if k in metrics]
    return f"epoch={epoch} " + " ".join(parts)


# ------------------------------------------------------------------ fit


@dataclass
class _Progress:
    """What a checkpoint carries besides the weights and the optimizer."""

    start_epoch: int = 0
    best_score: float = -math.inf
    bad_epochs: int = 0
    best_state: dict | None = None


def fit(config: Config, data_dirs: dict[str, Path], *, resume: bool = False, profile_dir: Path | None = None,
        on_epoch: Callable[[int, dict], None] | None = None, run_id: str | None = None) -> FitResult:
    """Train on data_dirs['train'], validate on data_dirs['val'] each epoch; returns the best model.
    run_id (the MLflow run logging this training) is kept in the checkpoint so a resume continues it."""
    cfg = config.train
    rank, world = distributed()
    seed_everything(cfg.seed + rank)
    device = select_device(cfg.device)
    num_classes = config.data.num_classes
    train_loader, val_loader, generator = make_loaders(cfg, data_dirs, world, rank, device)
    train_counts = train_loader.dataset.counts
    if int(train_counts.max()) >= num_classes:
        raise BincounterError(f"training data has count {int(train_counts.max())} > data.max_count")
    weights = class_weights(train_counts, num_classes) if cfg.class_balance == "weighted_loss" else None
    loss_fn = make_loss(cfg.loss, cfg.emd_weight, weights, cfg.label_smoothing).to(device)
    amp_dtype = autocast_dtype(cfg.precision, device)

    model = build_model(cfg.arch, num_classes, cfg.pretrained, cfg.weights_path).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = lr_schedule(optimizer, cfg, steps_per_epoch=len(train_loader))
    ema = weight_average(model, cfg.ema)
    scored = ema.module if ema is not None else model  # what is validated, kept as best and saved
    result = FitResult(model=model, history=RunHistory(device=device.type), device=device.type,
                       precision="bf16" if amp_dtype else "fp32")
    checkpoint_path = Path(cfg.checkpoint_dir) / CHECKPOINT_FILE
    progress = _Progress()
    if resume:
        progress = _restore(checkpoint_path, config, model, optimizer, scheduler, generator, result, ema)

    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    recorder = TraceRecorder(profile_dir, cfg.profile_steps, device) if profile_dir and rank == 0 else None
    for epoch in range(progress.start_epoch, cfg.epochs):
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        profiling = recorder is not None and not recorder.done
        with recorder if profiling else contextlib.nullcontext():
            train_loss = train_one_epoch(train_model, train_loader, optimizer, loss_fn, device, result.history,
                                         amp_dtype=amp_dtype, recorder=recorder if profiling else None,
                                         desc=f"epoch {epoch + 1}/{cfg.epochs}", show_progress=rank == 0,
                                         ema=ema, scheduler=scheduler)
        if profiling:
            result.trace_dir, result.top_operators = recorder.out_dir, recorder.table
        probs, targets, val_loss = predict_loader(scored, val_loader, device, amp_dtype=amp_dtype, loss_fn=loss_fn)
        metrics = counting_metrics(targets, probs.argmax(1), num_classes)
        metrics.update(train_loss=train_loss, val_loss=val_loss, lr=optimizer.param_groups[0]["lr"])
        result.history.train_loss.append(train_loss)
        result.history.val_loss.append(val_loss)
        result.epoch_metrics.append(metrics)
        if metrics["macro_accuracy"] > progress.best_score:
            progress.best_score, progress.bad_epochs, result.best_epoch = metrics["macro_accuracy"], 0, epoch + 1
            progress.best_state = copy.deepcopy(scored.state_dict())
        else:
            progress.bad_epochs += 1
        if on_epoch is not None:  # MLflow gets the epoch before the checkpoint: a resume never skips one
            on_epoch(epoch + 1, metrics)
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "epoch": epoch + 1, "config": config.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "best_score": progress.best_score, "bad_epochs": progress.bad_epochs,
                "best_state": progress.best_state, "best_epoch": result.best_epoch,
                "epoch_metrics": result.epoch_metrics, "history": result.history.to_dict(),
                "rng": {"torch": torch.get_rng_state(), "loader": generator.get_state()},
                "mlflow_run_id": run_id or "",
            })
            print(metric_line(epoch + 1, metrics), flush=True)  # after the checkpoint: the line means "saved"
        if progress.bad_epochs >= cfg.patience:
            print(f"early stopping: validation macro_accuracy has not improved for {cfg.patience} epochs")
            break
    if progress.best_state is not None:
        scored.load_state_dict(progress.best_state)
    result.model = scored.eval()
    result.model_config = {
        "arch": cfg.arch, "max_count": config.data.max_count, "image_size": cfg.image_size,
        "stored_size": train_loader.dataset.stored_size, "loss": cfg.loss,
    }
    return result


def _restore(path: Path, config: Config, model, optimizer, scheduler, generator, result: FitResult,
             ema: AveragedModel | None) -> _Progress:
    state = load_checkpoint(path, config.to_dict())
    if state is None:
        print(f"resume: no checkpoint at {path}; starting from epoch 1")
        return _Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema"):
        ema.load_state_dict(state["ema"])
    result.best_epoch, result.epoch_metrics = state["best_epoch"], state["epoch_metrics"]
    result.history = RunHistory.from_dict(state["history"])
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["loader"])
    print(f"resume: continuing after epoch {state['epoch']} from {path}")
    return _Progress(state["epoch"], state["best_score"], state["bad_epochs"], state["best_state"])

