"""MLflow plumbing every wing shares: the store, runs with their params and lineage tags, the champion rule.

What a training run logs (metrics, plots, profiles, the model) is in bincounter.training.records.

Local-first: the tracking URI is MLFLOW_TRACKING_URI when set (as `mlflow run` sets it), otherwise
mlflow.tracking_uri from params.yaml (a local sqlite file by default).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import hashlib
import json
import math

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bincounter.config import Config


def setup(config: Config) -> None:
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or config.mlflow.tracking_uri)
    if not os.environ.get("MLFLOW_RUN_ID") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        name, location = config.mlflow.experiment, config.mlflow.artifact_location
        if location and mlflow.get_experiment_by_name(name) is None:
            with contextlib.suppress(MlflowException):  # another process or thread created it first
                mlflow.create_experiment(name, artifact_location=location)
        mlflow.set_experiment(name)


@contextlib.contextmanager
def maybe_run(config: Config, enabled: bool = True, nested: bool = False, run_name: str | None = None,
              parent_run_id: str | None = None, resume_run_id: str | None = None):
    """An MLflow run around the block (None when tracking is off); FAILED on error, KILLED on Ctrl-C or
    when an HPO trial is pruned. parent_run_id makes a nested run from any thread (HPO with n_jobs > 1);
    resume_run_id continues a run an interrupted process left (when it is in this store)."""
    if not enabled:
        yield None
        return
    setup(config)
    run = _resume(resume_run_id) if resume_run_id else None
    if run is not None:
        print(f"mlflow: continuing run {resume_run_id}")
    elif parent_run_id:
        run = mlflow.start_run(run_name=run_name, nested=True, parent_run_id=parent_run_id,
                               experiment_id=mlflow.get_run(parent_run_id).info.experiment_id,
                               log_system_metrics=True)
    else:
        run = mlflow.start_run(nested=nested, run_name=run_name, log_system_metrics=True)
    try:
        log_params(config)
        mlflow.set_tags(lineage_tags(config))
        if run_name is None and not resume_run_id:  # the runs table reads like an ablation table
            mlflow.set_tag("mlflow.runName", recipe_name(config))
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except Exception as exc:
        if type(exc).__name__ == "TrialPruned":
            mlflow.set_tag("pruned", "true")
            mlflow.end_run("KILLED")
        else:
            mlflow.set_tag("error", str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
            mlflow.end_run("FAILED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def recipe_name(config: Config) -> str:
    """A run's name from its recipe: arch, input size, loss, decode (and tta, pretrained when on)."""
    train = config.train
    parts = [train.arch, f"{train.image_size}px", train.loss, train.decode]
    parts += ["tta"] * train.tta + ["pretrained"] * train.pretrained
    return "-".join(parts)


def _resume(run_id: str):
    try:
        if MlflowClient().get_run(run_id).info.lifecycle_stage != "active":
            return None
        return mlflow.start_run(run_id=run_id, log_system_metrics=True)
    except MlflowException:
        return None  # another store, or deleted: a new run it is


def log_params(config: Config) -> None:
    """The resolved configuration, namespaced (train.lr, data.max_count) so it never clashes with the
    plain parameter names `mlflow run` logs itself."""
    params = {f"train.{k}": v for k, v in config.to_dict()["train"].items()}
    params.update({"data.max_count": config.data.max_count, "prepare.image_size": config.prepare.image_size})
    existing = mlflow.active_run().data.params if mlflow.active_run() else {}
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def lineage_tags(config: Config, lock_path: str = "dvc.lock") -> dict[str, str]:
    """git commit, a hash of the effective parameters (params file + --set + flags + -P, as resolved) and
    the DVC hashes of the data the run read."""
    tags = {"params_sha256": params_sha256(config)}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    tags.update(dvc_hashes(config, lock_path))
    return tags


def params_sha256(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def dvc_hashes(config: Config, lock_path: str = "dvc.lock") -> dict[str, str]:
    """dvc.<out>.md5 for the split and prepared outputs recorded in dvc.lock (paths from params.yaml)."""
    path = Path(lock_path)
    if not path.is_file():
        return {}
    try:
        lock = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    wanted = {Path(config.split.out_dir).as_posix(): "splits", Path(config.prepare.out_dir).as_posix(): "prepared"}
    tags = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            name = wanted.get(Path(str(out.get("path", ""))).as_posix())
            if name and out.get("md5"):
                tags[f"dvc.{name}.md5"] = out["md5"]
    return tags


MIN_BINS_PER_COUNT = 5  # test bins per count below which "below chance" cannot be told from bad luck


def promote(config: Config, model_info, test_metrics: dict, *, test_bins: int | None = None,
            refusal: str = "") -> tuple[str | None, bool]:
    """Tag the new version with its test metric; move the champion alias to it when it beats the holder,
    unless `refusal` (or champion_refusal) says it may never be champion."""
    name, alias, metric = config.mlflow.model_name, config.mlflow.champion_alias, config.mlflow.champion_metric
    version = model_info.registered_model_version
    if version is None:
        return None, False
    version = str(version)
    client = MlflowClient()
    value = float(test_metrics[metric])
    client.set_model_version_tag(name, version, f"test_{metric}", f"{value:.6f}")
    refusal = refusal or champion_refusal(metric, test_metrics, test_bins)
    if refusal:
        client.set_model_version_tag(name, version, "champion_refused", refusal)
        print(f"registry: {name} v{version} registered, never @{alias}: {refusal}")
        return version, False
    try:
        holder = client.get_model_version_by_alias(name, alias)
        best = float(holder.tags.get(f"test_{metric}", "-inf"))
    except MlflowException:
        holder, best = None, float("-inf")
    if value > best:
        client.set_registered_model_alias(name, alias, version)
        print(f"registry: {name} v{version} is the new @{alias} (test {metric} {value:.4f} > {best:.4f})")
        if mlflow.active_run():
            mlflow.set_tag("champion", "true")
        return version, True
    print(f"registry: {name} v{version} registered; @{alias} stays on v{holder.version} "
          f"(test {metric} {value:.4f} <= {best:.4f})")
    return version, False


def champion_refusal(metric: str, test_metrics: dict, test_bins: int | None = None) -> str:
    """Why a model may not become champion whatever the holder scores ("" when it may): a test score that
    is not a number, or a macro accuracy below what guessing a constant count scores (1 / counts present),
    judged when the test split holds at least MIN_BINS_PER_COUNT bins per count (fewer cannot tell)."""
    value = float(test_metrics.get(metric, float("nan")))
    if not math.isfinite(value):
        return f"test {metric} is {value}"
    present = sum(1 for key in test_metrics if key.startswith("class_") and key.endswith("_accuracy"))
    if metric != "macro_accuracy" or present < 2 or value >= 1.0 / present - 1e-9:
        return ""
    if test_bins is not None and test_bins < MIN_BINS_PER_COUNT * present:
        print(f"registry: note: test macro_accuracy {value:.4f} is below chance (1/{present}), but {test_bins} test "
              f"bins are too few to tell a model from chance (fewer than {MIN_BINS_PER_COUNT} per count)")
        return ""
    return f"test macro_accuracy {value:.4f} is below chance (1/{present} = {1.0 / present:.4f})"
