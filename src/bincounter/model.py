"""The bin counter: a torchvision backbone with a head over counts 0..max_count.

`BinCounterNet` takes uint8 RGB batches (N, 3, H, W) and normalises them itself, so training,
evaluation and the served pyfunc cannot disagree about preprocessing (and uint8 moves to the GPU
four times cheaper than float).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bincounter.errors import BincounterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "weights.pt"
MODEL_CONFIG_FILE = "model_config.json"


class BinCounterNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        # NHWC: cuDNN and oneDNN (CPU) convolutions run faster on it, in training and in serving alike
        self.backbone.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


def eval_transform(image_size: int):
    """The whole (already squashed) photo resized to the model's input size: validation, test and serving
    all use this one transform, so the served model sees what evaluation saw."""
    from torchvision.transforms import v2

    return v2.Resize((image_size, image_size), antialias=True)


def count_logits(model: nn.Module, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """fp32 logits of a uint8 batch (N, 3, H, W) at the model's input size; with tta, the mean of the
    photo's and its mirror image's logits (a flip never changes how many items a bin holds)."""
    logits = model(batch).float()
    if tta:
        logits = (logits + model(torch.flip(batch, dims=[3])).float()) / 2
    return logits


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Count probabilities, calibrated by the temperature fitted on the validation split."""
    return torch.softmax(logits / temperature, dim=1)


def decode_counts(probs, how: str = "argmax", cuts=None):
    """(N, K) probabilities -> N counts: the most likely count (argmax), the expected count rounded
    (expected), the expected count cut at the K-1 thresholds fitted on validation (thresholds; without
    cuts they are k + 0.5, i.e. rounding), or the median count (median: the least k whose cumulative
    probability reaches 1/2, the count with the least expected absolute error)."""
    import numpy as np

    probs = np.asarray(probs)
    if how == "argmax":
        return probs.argmax(axis=1).astype(np.int64)
    if how == "median":
        below_half = (probs.cumsum(axis=1) < 0.5).sum(axis=1)
        return np.minimum(below_half, probs.shape[1] - 1).astype(np.int64)  # float rounding at the top
    expected = probs @ np.arange(probs.shape[1])
    if how == "thresholds" and cuts is not None:
        return np.searchsorted(np.asarray(cuts, dtype=np.float64), expected).astype(np.int64)
    return np.clip(np.rint(expected), 0, probs.shape[1] - 1).astype(np.int64)


def _drop_aux_heads(model: nn.Module) -> nn.Module:
    """googlenet and inception_v3 return (logits, aux logits) in training mode; bincounter trains the main
    head only, so their auxiliary classifiers are removed and every arch returns one logits tensor."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer (resnet .fc, efficientnet/mobilenet/convnext .classifier[-1], vit
    .heads.head) for ours; squeezenet classifies with a final 1x1 convolution, swapped the same way."""
    if type(model).__name__ == "SqueezeNet":
        final = model.classifier[1]
        model.classifier[1] = nn.Conv2d(final.in_channels, num_classes, kernel_size=1)
        return model
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise BincounterError("this architecture has no Linear head to replace")
    parent = model
    *path, leaf = last_name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, nn.Linear(last.in_features, num_classes))
    return model


def build_model(arch: str, num_classes: int, pretrained: bool = False, weights_path: str = "") -> BinCounterNet:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise BincounterError(f"unknown arch {arch!r} (try resnet18, resnet34, resnet50)")
    if weights_path:
        backbone = torchvision.models.get_model(arch, weights=None)
        _load_backbone_weights(backbone, weights_path)
    elif pretrained:
        backbone = _download_pretrained(arch)
    else:
        backbone = torchvision.models.get_model(arch, weights=None)
    return BinCounterNet(_replace_head(_drop_aux_heads(backbone), num_classes))


def _load_backbone_weights(backbone: nn.Module, weights_path: str) -> None:
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BincounterError(f"weights file {weights_path} not found") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file for the user
        raise BincounterError(f"cannot read weights file {weights_path}: {type(exc).__name__}") from None
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or len(missing) > 2:  # the classifier may differ; the body must match
        raise BincounterError(f"{weights_path} does not fit this arch ({len(missing)} missing, {len(unexpected)} unexpected keys)")


def _download_pretrained(arch: str) -> nn.Module:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=weights)  # cached under $TORCH_HOME after the first time
    except (OSError, RuntimeError) as exc:
        raise BincounterError(
            f"cannot download ImageNet weights for {arch} ({type(exc).__name__}); offline? fetch {weights.url} "
            "on a connected machine and pass --weights-path FILE (train.weights_path)"
        ) from None


def save_model_dir(model: BinCounterNet, out_dir: str | Path, model_config: dict) -> Path:
    """Weights + the config needed to rebuild them: the format of SM_MODEL_DIR and of the pyfunc artifact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / WEIGHTS_FILE)
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2) + "\n")
    return out_dir


def load_model_dir(model_dir: str | Path, device: str = "cpu") -> tuple[BinCounterNet, dict]:
    model_dir = Path(model_dir)
    model_config = json.loads((model_dir / MODEL_CONFIG_FILE).read_text())
    model = build_model(model_config["arch"], model_config["max_count"] + 1)
    state = torch.load(model_dir / WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), model_config
