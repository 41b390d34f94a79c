"""params.yaml read into typed config objects, in one place.

Every other module takes a `Config` (or one of its sections). CLI flags and MLproject parameters
arrive as dotted overrides (``{"train.lr": "0.01"}``) and are coerced to the field's type here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bincounter.errors import BincounterError

DEFAULT_PARAMS = "params.yaml"


@dataclass
class DataConfig:
    source: str = "s3://aft-vbi-pds"
    subset: str = "data/file_list.json"
    per_class: int = 200
    max_count: int = 5
    max_candidates: int = 50000
    seed: int = 0
    workers: int = 32
    raw_dir: str = "data/raw"

    @property
    def num_classes(self) -> int:
        return self.max_count + 1


@dataclass
class SplitConfig:
    seed: int = 42
    fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    out_dir: str = "data/splits"
    eda_dir: str = "data/eda"


@dataclass
class PrepareConfig:
    image_size: int = 256
    out_dir: str = "data/prepared"
    workers: int = 0


@dataclass
class SyncConfig:
    s3_uri: str = ""
    out: str = "data/sync.json"


@dataclass
class TrainConfig:
    backend: str = "local"
    arch: str = "resnet34"
    pretrained: bool = False
    weights_path: str = ""
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.001
    weight_decay: float = 0.0001
    optimizer: str = "adamw"
    loss: str = "emd"
    emd_weight: float = 1.0
    class_balance: str = "weighted_loss"
    augment: float = 0.5
    image_size: int = 224
    seed: int = 42
    patience: int = 4
    num_workers: int = -1
    device: str = "auto"
    precision: str = "auto"
    profile_steps: int = 5
    checkpoint_dir: str = "checkpoints"
    data_dir: str = "data/prepared"


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "bincounter"
    model_name: str = "bin-counter"
    champion_alias: str = "champion"
    champion_metric: str = "macro_accuracy"
    artifact_location: str = ""


@dataclass
class HpoConfig:
    n_trials: int = 20
    n_jobs: int = 1
    objective: str = "macro_accuracy"
    storage: str = "sqlite:///optuna.db"
    study_name: str = "bincounter-hpo"
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_jobs: int = 20
    max_parallel_jobs: int = 2


@dataclass
class SagemakerConfig:
    region: str = ""
    role_arn: str = ""
    bucket: str = ""
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    framework_version: str = "2.5"
    py_version: str = "py311"
    use_spot: bool = False
    max_run: int = 86400
    max_wait: int = 172800
    debugger: bool = False
    job_prefix: str = "bincounter"


@dataclass
class DeployConfig:
    region: str = "us-east-1"
    endpoint_name: str = "bin-counter"
    execution_role_arn: str = ""
    image_url: str = ""
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    serverless: bool = False
    serverless_memory_mb: int = 4096
    serverless_max_concurrency: int = 5


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    hpo: HpoConfig = field(default_factory=HpoConfig)
    sagemaker: SagemakerConfig = field(default_factory=SagemakerConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, type_hint: Any, key: str) -> Any:
    """Turn a YAML value or a command-line string into the field's declared type."""
    origin = typing.get_origin(type_hint)
    if type_hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise BincounterError(f"{key}: expected true or false, got {value!r}")
    if type_hint in (int, float):
        try:
            number = type_hint(float(value)) if type_hint is int else float(value)
        except (TypeError, ValueError):
            raise BincounterError(f"{key}: expected a number, got {value!r}") from None
        if type_hint is int and float(value) != number:
            raise BincounterError(f"{key}: expected a whole number, got {value!r}")
        return number
    if type_hint is str:
        return "" if value is None else str(value)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        (item_type,) = typing.get_args(type_hint)
        return [_coerce(v, item_type, key) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise BincounterError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise BincounterError(f"params: unknown key(s) in '{section}': {', '.join(sorted(unknown))}")
    kwargs = {name: _coerce(v, hints[name], f"{section}.{name}") for name, v in values.items()}
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read params.yaml (if present) and apply dotted overrides such as ``{"train.lr": 0.01}``.

    Overrides whose value is None are ignored, so argparse defaults of None mean "keep params.yaml".
    """
    path = Path(path or os.environ.get("BINCOUNTER_PARAMS", DEFAULT_PARAMS))
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BincounterError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(raw, dict):
            raise BincounterError(f"{path}: expected a mapping of sections")
    return build_config(raw, overrides, source=str(path))


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of config with dotted overrides applied (validated like params.yaml)."""
    return build_config(config.to_dict(), overrides)


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "params") -> Config:
    sections = [f.name for f in dataclasses.fields(Config)]
    hints = typing.get_type_hints(Config)
    unknown = set(raw) - set(sections)
    if unknown:
        raise BincounterError(f"{source}: unknown section(s): {', '.join(sorted(unknown))}")
    raw = {name: dict(raw.get(name) or {}) for name in sections}
    for key, value in (overrides or {}).items():
        if value is None or value == "":
            continue  # "" is how MLproject says "keep params.yaml"
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise BincounterError(f"unknown parameter {key!r} (expected section.name, e.g. train.lr)")
        raw[section][name] = value
    built = {name: _build_section(hints[name], raw[name], name) for name in sections}
    config = Config(**built)
    validate(config)
    return config


def validate(config: Config) -> None:
    fractions = config.split.fractions
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise BincounterError(f"split.fractions must be three non-negative numbers summing to 1, got {fractions}")
    if config.data.max_count < 1:
        raise BincounterError("data.max_count must be at least 1")
    if config.train.loss not in ("ce", "emd"):
        raise BincounterError(f"train.loss must be 'ce' or 'emd', got {config.train.loss!r}")
    if config.train.class_balance not in ("weighted_loss", "sampler", "none"):
        raise BincounterError(
            f"train.class_balance must be weighted_loss, sampler or none, got {config.train.class_balance!r}"
        )
    if config.train.optimizer not in ("adamw", "sgd"):
        raise BincounterError(f"train.optimizer must be adamw or sgd, got {config.train.optimizer!r}")
    if config.train.precision not in ("auto", "bf16", "fp32"):
        raise BincounterError(f"train.precision must be auto, bf16 or fp32, got {config.train.precision!r}")
    if config.train.backend not in ("local", "sagemaker"):
        raise BincounterError(f"backend must be local or sagemaker, got {config.train.backend!r}")
    if config.hpo.objective not in ("macro_accuracy", "rmse"):
        raise BincounterError(f"hpo.objective must be macro_accuracy or rmse, got {config.hpo.objective!r}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
