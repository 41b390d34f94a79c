"""Checkpoints: written atomically each epoch, read back without running any code.

A checkpoint holds tensors and plain Python values only (the resolved config as a dict included), so it
is loaded with `torch.load(weights_only=True)`: a crafted file cannot execute anything, which matters
because SageMaker jobs resume from a folder synced from S3.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bincounter import files
from bincounter.errors import BincounterError

CHECKPOINT_FILE = "last.pt"
# Keys that fix the shapes of the weights or the data: a checkpoint taken under other values cannot continue.
SHAPE_KEYS = (("train", "arch"), ("data", "max_count"), ("train", "image_size"))


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-save leaves the previous checkpoint, never a truncated one."""
    with files.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, config: dict) -> dict | None:
    """The checkpoint at path (None when there is none), refused in one line when it does not fit config."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refusals, truncation, not a torch file at all
        reason = "holds objects other than tensors and plain values" if "weights_only" in str(exc) \
            else f"is unreadable ({type(exc).__name__})"
        raise BincounterError(f"checkpoint {path} {reason}; delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise BincounterError(f"checkpoint {path} was not written by this version of bincounter; "
                              "delete it or use another checkpoint folder")
    for section, key in SHAPE_KEYS:
        saved, wanted = state["config"].get(section, {}).get(key), config[section][key]
        if saved != wanted:
            raise BincounterError(f"checkpoint {path} has {section}.{key}={saved}, this run {wanted}; "
                                  "delete it or use another checkpoint folder")
    return state


def checkpoint_run_id(path: Path) -> str | None:
    """The MLflow run an interrupted training was logging to, if its checkpoint says (else None)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing or unreadable: fit says so in its own words when resuming
        return None
    return (state.get("mlflow_run_id") or None) if isinstance(state, dict) else None
