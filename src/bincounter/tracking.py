"""Everything MLflow: runs, params, lineage tags, metrics, plots, profiles, the model and its registry.

Local-first: the tracking URI is MLFLOW_TRACKING_URI when set (as `mlflow run` sets it), otherwise
mlflow.tracking_uri from params.yaml (a local sqlite file by default).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bincounter.config import Config, file_sha256
from bincounter.metrics import METRIC_NAMES, confusion, plot_confusion, plot_per_class
from bincounter.profiling import check_rules, write_report

EPOCH_METRICS = METRIC_NAMES + ("train_loss", "val_loss", "lr")


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
              parent_run_id: str | None = None):
    """An MLflow run around the block (None when tracking is off); FAILED on error, KILLED on Ctrl-C or
    when an HPO trial is pruned. parent_run_id makes a nested run from any thread (HPO with n_jobs > 1)."""
    if not enabled:
        yield None
        return
    setup(config)
    if parent_run_id:
        run = mlflow.start_run(run_name=run_name, nested=True, parent_run_id=parent_run_id,
                               experiment_id=mlflow.get_run(parent_run_id).info.experiment_id,
                               log_system_metrics=True)
    else:
        run = mlflow.start_run(nested=nested, run_name=run_name, log_system_metrics=True)
    try:
        log_params(config)
        mlflow.set_tags(lineage_tags())
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


def log_params(config: Config) -> None:
    """The resolved configuration, namespaced (train.lr, data.max_count) so it never clashes with the
    plain parameter names `mlflow run` logs itself."""
    params = {f"train.{k}": v for k, v in config.to_dict()["train"].items()}
    params.update({"data.max_count": config.data.max_count, "prepare.image_size": config.prepare.image_size})
    existing = mlflow.active_run().data.params if mlflow.active_run() else {}
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def lineage_tags(params_path: str = "params.yaml", lock_path: str = "dvc.lock") -> dict[str, str]:
    tags = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    if Path(params_path).exists():
        tags["params_sha256"] = file_sha256(params_path)
    if Path(lock_path).exists():
        lock = yaml.safe_load(Path(lock_path).read_text()) or {}
        for stage in lock.get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") in ("data/splits", "data/prepared") and out.get("md5"):
                    tags[f"dvc.{out['path'].split('/')[-1]}.md5"] = out["md5"]
    return tags


def log_epoch(epoch: int, metrics: dict) -> None:
    mlflow.log_metrics({k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics}, step=epoch)


def set_hardware_tags(device: str, precision: str) -> None:
    """What the run actually trained on (train.device/precision may say `auto`)."""
    mlflow.set_tags({"device": device, "precision": precision})


def log_test(test: dict, num_classes: int, out_dir: Path, prefix: str = "test") -> None:
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    mlflow.log_metrics({f"{prefix}_{k}": float(v) for k, v in test["metrics"].items()})
    matrix = confusion(test["targets"], test["predictions"], num_classes)
    plot_confusion(matrix, plots / "confusion_matrix.png", f"{prefix} confusion matrix")
    plot_per_class(test["metrics"], num_classes, plots / "per_class_accuracy.png", f"{prefix} recall per count")
    rows = ["image_id,count,predicted,confidence"] + [
        f"{i},{t},{p},{prob[p]:.4f}"
        for i, t, p, prob in zip(test["ids"], test["targets"], test["predictions"], test["probabilities"])
    ]
    (plots / f"{prefix}_predictions.csv").write_text("\n".join(rows) + "\n")
    mlflow.log_artifacts(str(plots), "plots")


def write_profile(result, profile_dir: Path, config: Config) -> Path:
    profile_dir.mkdir(parents=True, exist_ok=True)
    rules = check_rules(result.history)
    context = {"device": result.device, "precision": result.precision, "arch": config.train.arch,
               "batch size": config.train.batch_size, "epochs run": len(result.history.train_loss), "best epoch": result.best_epoch}
    report = write_report(profile_dir / "report.md", rules, result.history, result.top_operators, context)
    lines = ["rule,status,evidence"] + [f'{r.name},{r.status},"{r.evidence}"' for r in rules]
    (profile_dir / "rules.csv").write_text("\n".join(lines) + "\n")
    result.rules = rules
    return report


def log_profile(profile_dir: Path, report: Path) -> None:
    import csv

    with open(profile_dir / "rules.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            mlflow.set_tag(f"rule.{row['rule']}", row["status"])
            mlflow.set_tag(f"rule.{row['rule']}.evidence", row["evidence"][:500])
    mlflow.log_artifacts(str(profile_dir), "profile")


def log_model(model_dir: Path, config: Config, val_dir: Path, register: bool = True):
    from bincounter.pyfunc import example_image_b64, log_pyfunc
    from bincounter.prepare import load_prepared

    images, _, _ = load_prepared(val_dir)
    example = example_image_b64(images[0]) if len(images) else example_image_b64(np.zeros((64, 64, 3), np.uint8))
    return log_pyfunc(model_dir, example, config.mlflow.model_name if register else None)


def promote(config: Config, model_info, test_metrics: dict) -> tuple[str | None, bool]:
    """Tag the new version with its test metric; move the champion alias to it when it beats the holder."""
    name, alias, metric = config.mlflow.model_name, config.mlflow.champion_alias, config.mlflow.champion_metric
    version = model_info.registered_model_version
    if version is None:
        return None, False
    version = str(version)
    client = MlflowClient()
    value = float(test_metrics[metric])
    client.set_model_version_tag(name, version, f"test_{metric}", f"{value:.6f}")
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
