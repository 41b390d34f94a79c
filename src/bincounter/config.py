"""params.yaml read into typed config objects, in one place.

Every other module takes a `Config` (or one of its sections). CLI flags and MLproject parameters
arrive as dotted overrides (``{"train.lr": "0.01"}``) and are coerced to the field's type here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bincounter.errors import BincounterError

DEFAULT_PARAMS = "params.yaml"
DECODES = ("argmax", "expected", "thresholds", "median")  # how a count is read from the probabilities


def knob(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, remote: bool = True, **kwargs) -> Any:
    """Declare one parameter: its default, what it means (CLI --help, MLproject), the values it may take
    (checked in `validate`, one line each) and whether a SageMaker job receives it as a hyperparameter."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "remote": remote}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class DataConfig:
    source: str = knob("s3://aft-vbi-pds", "s3://bucket[/prefix] or a local folder laid out like the bucket")
    subset: str = knob("data/file_list.json", "a manifest (Udacity file_list.json, JSON list, one id per line), "
                       "'balanced' (per_class bins of each count) or 'all' (every catalogued bin)")
    per_class: int = knob(200, "with subset=balanced: bins wanted of each count", min=1)
    max_count: int = knob(5, "largest count the model predicts (classes 0..max_count)", min=1, max=1000)
    max_candidates: int = knob(50000, "with subset=balanced or all: metadata files catalogued at most "
                               "(0 = the whole bucket)", min=0)
    seed: int = knob(0, "with subset=balanced: sampling order")
    min_count: int = knob(0, "smallest count selected from the catalog", min=0, max=1000)
    id_range: str = knob("", "only ids in this numeric range, e.g. 1-20000 (empty = any id)")
    max_bins: int = knob(0, "at most this many bins, a seeded sample of the query (0 = no limit)", min=0)
    workers: int = knob(32, "concurrent downloads", min=1, max=512)
    catalog: str = knob("data/catalog.parquet", "the metadata catalog (one row per catalogued bin)")
    shard_size: int = knob(1000, "bins per shard of fetched and of prepared data", min=1, max=1000000)
    raw_dir: str = knob("data/raw", "where fetched bins are stored (tar shards)")

    @property
    def num_classes(self) -> int:
        return self.max_count + 1


@dataclass
class SplitConfig:
    strategy: str = knob("grouped", "grouped: bins whose ids share a block of group_size ids stay on one side "
                         "(neighbouring ids are often the same pod); random: per bin", choices=("grouped", "random"))
    group_size: int = knob(100, "with strategy=grouped: ids per block ('523' and '00523' never share one)", min=1)
    seed: int = knob(42, "split seed")
    fractions: list[float] = knob([0.6, 0.2, 0.2], "train, val, test fractions; stratified by count")
    out_dir: str = knob("data/splits", "split CSVs")
    eda_dir: str = knob("data/eda", "EDA report")


@dataclass
class PrepareConfig:
    image_size: int = knob(126, "stored square size; training resizes train.image_size out of it",
                           min=16, max=2048)
    jpeg_quality: int = knob(90, "JPEG quality of the prepared images", min=50, max=100)
    out_dir: str = knob("data/prepared", "prepared shards, one folder per split")
    workers: int = knob(0, "decoding processes; 0 = one per core", min=0, max=256)


@dataclass
class SyncConfig:
    s3_uri: str = knob("", "s3://bucket/prefix for SageMaker channels; empty = local only")
    out: str = knob("data/sync.json", "record of where the channels are")


@dataclass
class TrainConfig:
    """The training knobs. CLI flags, MLproject parameters and SageMaker hyperparameters are derived from
    these fields (`train_knobs`, `hyperparameter_keys`); `remote=False` marks knobs a job does not receive."""

    backend: str = knob("local", "where to train: local | sagemaker", choices=("local", "sagemaker"),
                        remote=False)
    arch: str = knob("resnet34", "torchvision backbone (see README: supported architectures)")
    pretrained: bool = knob(False, "start from torchvision's ImageNet weights (downloaded once, cached)")
    weights_path: str = knob("", "a local .pth state dict to start from (offline pretrained)", remote=False)
    epochs: int = knob(15, "epochs", min=1, max=100000)
    batch_size: int = knob(32, "batch size", min=1, max=65536)
    lr: float = knob(0.001, "learning rate", min=0.0)
    weight_decay: float = knob(0.0001, "weight decay", min=0.0, max=1.0)
    warmup_epochs: float = knob(0.0, "linear learning-rate warm-up over this many epochs, step by step, "
                                "before the cosine schedule (0 = off)", min=0.0, max=100000.0)
    optimizer: str = knob("adamw", "adamw | sgd", choices=("adamw", "sgd"))
    loss: str = knob("emd", "ce | emd (cross-entropy + squared earth mover's distance, ordinal-aware) | sord "
                     "(cross-entropy against soft ordinal labels)", choices=("ce", "emd", "sord"))
    emd_weight: float = knob(1.0, "weight of the emd term", min=0.0, max=1000.0)
    label_smoothing: float = knob(0.0, "mix the one-hot count target with the uniform distribution (ce, emd)",
                                  min=0.0, max=0.5)
    class_balance: str = knob("none", "none | weighted_loss | sampler (none: the best RMSE at equal macro "
                              "accuracy in benchmarks/quality.md)",
                              choices=("weighted_loss", "sampler", "none"))
    augment: float = knob(0.5, "augmentation strength 0..1", min=0.0, max=1.0)
    ema: float = knob(0.0, "weight EMA decay per optimizer step (0 = off; e.g. 0.998): validation, early "
                      "stopping and the saved model use the averaged weights", min=0.0, max=0.99999)
    image_size: int = knob(112, "model input size (px)", min=16, max=2048)
    seed: int = knob(42, "random seed")
    patience: int = knob(4, "early stopping: epochs without a better validation macro_accuracy", min=1)
    num_workers: int = knob(-1, "data loader workers; -1 = auto (training on a GPU, every core but one; on "
                            "the CPU, at most 4)", min=-1, max=256)
    device: str = knob("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"), remote=False)
    jpeg_decoder: str = knob("auto", "where training decodes the prepared JPEGs: auto (the GPU when training "
                             "on one with fewer than 8 loader workers) | cpu (loader workers) | gpu (nvJPEG)",
                             choices=("auto", "cpu", "gpu"))
    precision: str = knob("auto", "auto | bf16 | fp32 (auto: bf16 where the chip computes it natively)",
                          choices=("auto", "bf16", "fp32"))
    decode: str = knob("argmax", "how a count is read from the probabilities: argmax (the most likely) | "
                       "expected (the rounded expected count) | thresholds (the expected count cut at "
                       "thresholds fitted on validation for macro accuracy) | median (the count where the "
                       "cumulative probability reaches one half)", choices=DECODES)
    tta: bool = knob(False, "flip test-time augmentation in evaluation and in the served model")
    calibrate: bool = knob(True, "fit a temperature on the validation split after training (served confidence)")
    profile_steps: int = knob(5, "torch.profiler steps recorded in the first epoch (0 = off)", min=0, max=1000)
    checkpoint_dir: str = knob("checkpoints", "checkpoint folder (resume reads it)", remote=False)
    data_dir: str = knob("data/prepared", "prepared data folder (train/ val/ test/)", remote=False)


@dataclass
class MlflowConfig:
    tracking_uri: str = knob("sqlite:///mlflow.db", "MLflow tracking URI (MLFLOW_TRACKING_URI wins)")
    experiment: str = knob("bincounter", "MLflow experiment")
    model_name: str = knob("bin-counter", "registered model name")
    champion_alias: str = knob("champion", "alias of the best registered version")
    champion_metric: str = knob("macro_accuracy", "test metric that decides the champion (higher is better)")
    artifact_location: str = knob("", "where a new experiment stores artifacts; empty = MLflow's default")


DEFAULT_SPACE = {
    "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128, 256, 512]},
    "arch": {"type": "categorical", "choices": ["resnet18", "resnet34", "resnet50"]},
    "weight_decay": {"type": "float", "low": 0.000001, "high": 0.01, "log": True},
    "augment": {"type": "float", "low": 0.0, "high": 1.0},
    "loss": {"type": "categorical", "choices": ["ce", "emd", "sord"]},
}


@dataclass
class HpoConfig:
    n_trials: int = knob(20, "trials (local)", min=1)
    n_jobs: int = knob(1, "parallel trials (local)", min=1, max=256)
    objective: str = knob("macro_accuracy", "macro_accuracy (maximise) | rmse (minimise)",
                          choices=("macro_accuracy", "rmse"))
    storage: str = knob("sqlite:///optuna.db", "Optuna storage (the study resumes from it)")
    study_name: str = knob("bincounter-hpo", "Optuna study name")
    space: dict[str, dict[str, Any]] = knob(DEFAULT_SPACE, "the search space: name -> {type, low, high, log | choices}")
    max_jobs: int = knob(20, "SageMaker tuning: training jobs in all", min=1)
    max_parallel_jobs: int = knob(2, "SageMaker tuning: jobs at a time", min=1)


@dataclass
class SagemakerConfig:
    region: str = knob("", "AWS region (empty: the configured default)")
    role_arn: str = knob("", "execution role of the training jobs")
    bucket: str = knob("", "bucket for sources, checkpoints and models")
    instance_type: str = knob("ml.g5.xlarge", "training instance type")
    input_mode: str = knob("FastFile", "how jobs read the channels: FastFile (streamed on first read) | File "
                           "(copied to each instance before training)", choices=("FastFile", "File"))
    instance_count: int = knob(1, "training instances", min=1, max=100)
    framework_version: str = knob("2.5", "PyTorch training image version")
    py_version: str = knob("py311", "Python of the training image")
    use_spot: bool = knob(False, "managed spot training")
    max_run: int = knob(86400, "seconds a job may run", min=1)
    max_wait: int = knob(172800, "seconds a spot job may wait and run", min=1)
    debugger: bool = knob(False, "SageMaker Debugger rules (closed to new customers)")
    job_prefix: str = knob("bincounter", "job name prefix")
    validate_role: str = knob("auto", "SDK v3's client-side role check (iam:SimulatePrincipalPolicy): auto (on "
                              "against AWS, off against an emulator) | true | false (least-privilege roles)",
                              choices=("auto", "true", "false"))


@dataclass
class DeployConfig:
    region: str = knob("", "endpoint region (empty: sagemaker.region, else the configured AWS region)")
    endpoint_name: str = knob("bin-counter", "endpoint name")
    execution_role_arn: str = knob("", "role the endpoint runs as")
    image_url: str = knob("", "serving image in ECR")
    instance_type: str = knob("ml.m5.large", "real-time instance type")
    instance_count: int = knob(1, "real-time instances", min=1)
    serverless: bool = knob(False, "serverless endpoint instead of instances")
    serverless_memory_mb: int = knob(4096, "serverless memory: 1024..6144 in steps of 1024")
    serverless_max_concurrency: int = knob(5, "serverless concurrency", min=1, max=200)
    workers: int = knob(1, "scoring-server worker processes per instance (MLFLOW_MODELS_WORKERS)", min=1, max=64)
    threads: int = knob(0, "torch threads per worker (BINCOUNTER_THREADS); 0 = cores / workers", min=0, max=256)
    async_output_path: str = knob("", "s3:// prefix: an asynchronous endpoint that writes its answers there")
    async_success_topic: str = knob("", "async: SNS topic ARN told of each answered request (optional)")
    async_error_topic: str = knob("", "async: SNS topic ARN told of each failed request (optional)")
    async_max_concurrency: int = knob(4, "async: requests one instance works on at a time", min=1, max=1000)
    traffic_shift: str = knob("all_at_once", "update: blue/green traffic shifting: all_at_once | canary | linear",
                              choices=("all_at_once", "canary", "linear"))
    traffic_step_percent: int = knob(10, "update: canary size, or linear step, in % of capacity", min=1, max=99)
    traffic_wait_seconds: int = knob(300, "update: seconds each shifted step is watched before the next",
                                     min=0, max=3600)
    termination_wait_seconds: int = knob(300, "update: seconds the old fleet stays after the shift", min=0,
                                         max=3600)
    rollback_alarms: list[str] = knob([], "update: CloudWatch alarm names; one in ALARM rolls the update back")
    transform_input: str = knob("", "batch transform: s3:// prefix of bin photos to count")
    transform_output: str = knob("", "batch transform: s3:// prefix for the counts (<photo>.out)")
    transform_instance_type: str = knob("ml.m5.large", "batch transform instance type")
    transform_instance_count: int = knob(1, "batch transform instances", min=1, max=100)


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


@dataclass(frozen=True)
class Knob:
    """One declared parameter, as the CLI, MLproject and SageMaker see it."""

    name: str  # flag / MLproject parameter / hyperparameter name
    key: str  # dotted params key
    type: Any
    help: str
    remote: bool


def section_types() -> dict[str, type]:
    """Section name -> its dataclass (data -> DataConfig, ...)."""
    return typing.get_type_hints(Config)


def knobs(section_name: str) -> list[Knob]:
    """The declared parameters of one params.yaml section."""
    section = section_types()[section_name]
    hints = typing.get_type_hints(section)
    return [Knob(f.name, f"{section_name}.{f.name}", hints[f.name], f.metadata.get("help", ""),
                 f.metadata.get("remote", True)) for f in dataclasses.fields(section)]


# Knobs outside `train` that a training command and a SageMaker job also take (flag name -> params key).
EXTRA_TRAIN_KNOBS = {"max_count": "data.max_count", "experiment": "mlflow.experiment",
                     "model_name": "mlflow.model_name"}


def train_knobs() -> list[Knob]:
    """Every training knob: TrainConfig's fields plus EXTRA_TRAIN_KNOBS, in declaration order."""
    extra = []
    for name, key in EXTRA_TRAIN_KNOBS.items():
        section, _, attr = key.partition(".")
        knob_ = next(k for k in knobs(section) if k.name == attr)
        extra.append(dataclasses.replace(knob_, name=name))
    return knobs("train") + extra


def hyperparameter_keys() -> dict[str, str]:
    """SageMaker hyperparameter name -> params key: the training knobs a job receives."""
    return {k.name: k.key for k in train_knobs() if k.remote}


@dataclass(frozen=True)
class Dimension:
    """One dimension of hpo.space: `{type: float|int, low, high, log}` or `{type: categorical, choices}`."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()


def search_space(space: dict[str, Any], pinned: set[str] | frozenset = frozenset()) -> list[Dimension]:
    """hpo.space parsed and checked once; Optuna (training.hpo) and SageMaker (aws.tuning) map these."""
    tunable = {f.name for f in dataclasses.fields(TrainConfig)}
    dims = []
    for name, spec in space.items():
        where = f"hpo.space.{name}"
        if name not in tunable:
            raise BincounterError(f"{where} is not a train knob (one of {', '.join(sorted(tunable))})")
        if name in pinned:
            continue
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind in ("float", "int"):
            try:
                low, high = float(spec["low"]), float(spec["high"])
            except (KeyError, TypeError, ValueError):
                raise BincounterError(f"{where}: {kind} needs numeric low and high") from None
            log = bool(spec.get("log", False))
            if not low < high:
                raise BincounterError(f"{where}: low must be below high")
            if log and low <= 0:
                raise BincounterError(f"{where}: log scale needs low > 0")
            dims.append(Dimension(name, kind, low, high, log))
        elif kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise BincounterError(f"{where}: categorical needs a non-empty list of choices")
            dims.append(Dimension(name, kind, choices=tuple(choices)))
        else:
            raise BincounterError(f"{where}: type must be float, int or categorical, got {kind!r}")
    return dims


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
        if isinstance(value, bool):
            raise BincounterError(f"{key}: expected a number, got {value!r}")
        try:
            number = type_hint(float(value)) if type_hint is int else float(value)
        except (TypeError, ValueError, OverflowError):
            raise BincounterError(f"{key}: expected a{' whole' if type_hint is int else ''} number, "
                                  f"got {value!r}") from None
        if not math.isfinite(number):
            raise BincounterError(f"{key}: expected a finite number, got {value!r}")
        if type_hint is int and float(value) != number:
            raise BincounterError(f"{key}: expected a whole number, got {value!r}")
        return number
    if type_hint is str:
        return "" if value is None else str(value)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise BincounterError(f"{key}: expected a list, got {value!r}")
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
    """Read params.yaml and apply dotted overrides such as ``{"train.lr": 0.01}``.

    A params file named explicitly (argument or $BINCOUNTER_PARAMS) must exist; without one, ./params.yaml
    is read when present and the declared defaults apply otherwise. Overrides whose value is None or ""
    are ignored, so argparse defaults of None (and MLproject's "") mean "keep params.yaml".
    """
    named = path or os.environ.get("BINCOUNTER_PARAMS")
    path = Path(named or DEFAULT_PARAMS)
    raw: dict[str, Any] = {}
    if named and not path.is_file():
        raise BincounterError(f"params file {path} not found")
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
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
    for name in sections:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise BincounterError(f"{source}: section '{name}' must be a mapping of keys")
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
    """Every knob within its declared choices and range, then the rules that tie knobs together."""
    for section in dataclasses.fields(Config):
        values = getattr(config, section.name)
        for spec in dataclasses.fields(values):
            _check_knob(f"{section.name}.{spec.name}", getattr(values, spec.name), spec.metadata)
    fractions = config.split.fractions
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise BincounterError(f"split.fractions must be three positive numbers (train, val, test) summing to 1, "
                              f"got {fractions}")
    if config.data.min_count > config.data.max_count:
        raise BincounterError(f"data.min_count ({config.data.min_count}) is above data.max_count "
                              f"({config.data.max_count})")
    id_range(config.data.id_range)
    search_space(config.hpo.space)


def id_range(text: str) -> tuple[int, int] | None:
    """data.id_range "LOW-HIGH" (inclusive, numeric ids) -> (low, high); "" -> None (any id)."""
    if not text:
        return None
    low, sep, high = text.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit() or int(low) > int(high):
        raise BincounterError(f"data.id_range must be LOW-HIGH with LOW <= HIGH (e.g. 1-20000), got {text!r}")
    return int(low), int(high)


def _check_knob(key: str, value: Any, spec: Any) -> None:
    choices, low, high = spec.get("choices"), spec.get("min"), spec.get("max")
    if choices and value not in choices:
        names = [str(c) for c in choices]
        raise BincounterError(f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")
    if low is not None and value < low:
        raise BincounterError(f"{key} must be at least {low:g}, got {value!r}")
    if high is not None and value > high:
        raise BincounterError(f"{key} must be at most {high:g}, got {value!r}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
