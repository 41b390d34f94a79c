"""Hyperparameter search: Optuna locally, SageMaker's tuner remotely, over the one space in params.yaml.

Local: TPE sampler, median pruning on the per-epoch validation objective, each trial a nested MLflow
run under one parent, failed trials recorded and skipped, the study resumable from its sqlite storage.
The best trial's model (already evaluated on test with its profile) is registered and may become champion.

Resuming: the study keeps its MLflow parent run id in its user attrs (PARENT_ATTR). Running the same study
again reopens that parent run, adds the missing trials as more children of it, and registers the best
model only if no version of that model exists yet (a finished study run again registers nothing). Under
`mlflow run` the parent is the run `mlflow run` created; it is tagged hpo.resumed_from=<the earlier parent>.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna

from bincounter import tracking
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bincounter.config import Config, Dimension, search_space, with_overrides
from bincounter.errors import BincounterError
from bincounter.training.run import data_dirs_for, run_training

MAXIMISE = {"macro_accuracy": True, "rmse": False}
PARENT_ATTR = "mlflow_parent_run_id"


def suggest(trial: optuna.Trial, dims: list[Dimension]) -> dict:
    params = {}
    for dim in dims:
        if dim.kind == "float":
            params[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
        elif dim.kind == "int":
            params[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
        else:
            params[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
    return params


def make_study(config: Config) -> optuna.Study:
    direction = "maximize" if MAXIMISE[config.hpo.objective] else "minimize"
    return optuna.create_study(
        study_name=config.hpo.study_name, storage=config.hpo.storage, load_if_exists=True, direction=direction,
        sampler=optuna.samplers.TPESampler(seed=config.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )


def objective_fn(config: Config, parent_run_id: str, pinned: set[str], checkpoints: Path):
    name = config.hpo.objective
    dims = search_space(config.hpo.space, pinned)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, dims)
        overrides = {f"train.{k}": v for k, v in params.items()}
        overrides["train.checkpoint_dir"] = str(checkpoints / f"trial-{trial.number}")
        trial_config = with_overrides(config, overrides)

        def report(epoch: int, metrics: dict) -> None:
            trial.report(metrics[name], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({name}={metrics[name]:.4f})")

        outcome = run_training(trial_config, data_dirs_for(trial_config), nested=True, parent_run_id=parent_run_id, register=False,
                               on_epoch=report, run_name=f"trial-{trial.number} {tracking.recipe_name(trial_config)}")
        trial.set_user_attr("run_id", outcome.run_id)
        trial.set_user_attr("model_uri", outcome.model_uri)
        value = outcome.val_metrics.get(name, math.nan)
        if not math.isfinite(value):
            raise BincounterError(f"trial {trial.number}: objective {name} is {value}")
        return value

    return objective


def run_hpo(config: Config, pinned: set[str] | None = None) -> dict:
    """A local Optuna study over hpo.space (dimensions in `pinned` keep their configured value)."""
    if not config.hpo.space:
        raise BincounterError("hpo.space in params.yaml is empty: nothing to search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = make_study(config)
    done = [t for t in study.trials if t.state.is_finished()]
    remaining = max(config.hpo.n_trials - len(done), 0)
    if done:
        print(f"hpo: study {config.hpo.study_name} resumes with {len(done)} finished trials, {remaining} to go")
    previous = _previous_parent(config, study)
    # under `mlflow run` the run is MLflow's own (MLFLOW_RUN_ID); otherwise the study's parent continues
    reopen = previous if previous and not os.environ.get("MLFLOW_RUN_ID") else None
    with tracking.maybe_run(config, run_name="hpo", resume_run_id=reopen) as parent, \
            tempfile.TemporaryDirectory() as scratch:
        if previous and parent.info.run_id != previous:
            mlflow.set_tag("hpo.resumed_from", previous)
        study.set_user_attr(PARENT_ATTR, parent.info.run_id)
        mlflow.set_tags({"hpo.study": config.hpo.study_name, "hpo.objective": config.hpo.objective})
        objective = objective_fn(config, parent.info.run_id, pinned or set(), Path(scratch))
        study.optimize(objective, n_trials=remaining, n_jobs=max(1, config.hpo.n_jobs), catch=(Exception,),
                       show_progress_bar=True, gc_after_trial=True)
        return summarise(config, study, Path(scratch))


def _previous_parent(config: Config, study: optuna.Study) -> str | None:
    """The parent run of an earlier run_hpo on this study, if it is still in the tracking store."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if not run_id:
        return None
    tracking.setup(config)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        print(f"hpo: the study's parent run {run_id} is not in this tracking store; starting a new one")
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def summarise(config: Config, study: optuna.Study, out_dir: Path) -> dict:
    states = [t.state.name for t in study.trials]
    counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    mlflow.log_metrics({f"trials_{k.lower()}": v for k, v in counts.items()})
    print(f"hpo: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed")
    if counts["COMPLETE"] == 0:
        raise BincounterError("hpo: no trial completed (see the failed trial runs in MLflow)")
    best = study.best_trial
    _log_best_params(best.params)
    mlflow.log_metric(f"best_{config.hpo.objective}", best.value)
    mlflow.set_tag("best_trial_run_id", best.user_attrs.get("run_id", ""))
    log_plots(study, out_dir)
    version, champion = register_best(config, best)
    print(f"hpo: best trial {best.number} {config.hpo.objective}={best.value:.4f} params={best.params}")
    return {"best_value": best.value, "best_params": best.params, "version": version, "champion": champion,
            "counts": counts}


def _log_best_params(params: dict) -> None:
    """best_<name> params; a resumed study whose best trial changed records the new values as tags
    (MLflow params cannot change once logged)."""
    logged = mlflow.active_run().data.params if mlflow.active_run() else {}
    fresh, changed = {}, {}
    for key, value in params.items():
        name = f"best_{key}"
        if name not in logged:
            fresh[name] = value
        elif logged[name] != str(value):
            changed[name] = str(value)
    mlflow.log_params(fresh)
    if changed:
        mlflow.set_tags(changed)


def _registered_version(config: Config, run_id: str, model_uri: str) -> str | None:
    """The version of model_name already registered from this trial's model, if any."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{config.mlflow.model_name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    for version in versions:
        if version.source == model_uri or (model_id and getattr(version, "model_id", None) == model_id):
            return str(version.version)
    return None


def register_best(config: Config, best: optuna.trial.FrozenTrial) -> tuple[str | None, bool]:
    model_uri, run_id = best.user_attrs.get("model_uri"), best.user_attrs.get("run_id")
    if not model_uri:
        return None, False
    existing = _registered_version(config, run_id, model_uri)
    if existing is not None:
        alias = config.mlflow.champion_alias
        try:
            holder = str(MlflowClient().get_model_version_by_alias(config.mlflow.model_name, alias).version)
        except MlflowException:
            holder = None
        print(f"registry: the best trial's model is already {config.mlflow.model_name} v{existing}; not registered again")
        return existing, holder == existing
    version = mlflow.register_model(model_uri, config.mlflow.model_name).version
    test_metrics = mlflow.get_run(run_id).data.metrics
    metrics = {k.removeprefix("test_"): v for k, v in test_metrics.items() if k.startswith("test_")}
    return tracking.promote(config, SimpleNamespace(registered_model_version=version), metrics)


def log_plots(study: optuna.Study, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    plots = {"optimization_history.png": ov.plot_optimization_history}
    if len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2 and len(study.best_trial.params) > 1:
        plots["param_importances.png"] = ov.plot_param_importances
    for filename, plot in plots.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances undefined when every trial scored the same
            print(f"hpo: skipped {filename}: {exc}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else plt.gcf()
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(out_dir / filename, dpi=100)
        plt.close(figure)
        mlflow.log_artifact(str(out_dir / filename), "hpo")
