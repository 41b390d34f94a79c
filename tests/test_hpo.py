"""Local hyperparameter search: nested trial runs, failures and pruning recorded, best run registered."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from conftest import config_on
from mlflow import MlflowClient

from bincounter.training.hpo import make_study, objective_fn, run_hpo

SMALL_SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
               "loss": {"type": "categorical", "choices": ["ce", "emd"]}}


def hpo_config(prepared, root, **overrides):
    return config_on(prepared, root, **{"hpo.space": SMALL_SPACE, "train.profile_steps": 0, **overrides})


def child_runs(parent_id: str):
    return MlflowClient().search_runs(
        [mlflow.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_three_trial_study_gives_nested_runs_best_value_plots_and_champion(prepared, tmp_path):
    config = hpo_config(prepared, tmp_path, **{"hpo.n_trials": 3})
    summary = run_hpo(config)
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    parents = mlflow.search_runs(experiment_names=["tests"], filter_string="tags.`hpo.study` = 'bincounter-hpo'")
    assert len(parents) == 1
    parent_id = parents["run_id"][0]
    children = child_runs(parent_id)
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    parent = mlflow.get_run(parent_id)
    assert parent.data.metrics["best_macro_accuracy"] == pytest.approx(summary["best_value"])
    assert {"best_lr", "best_loss"} <= set(parent.data.params)
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent_id, "hpo")}
    assert "hpo/optimization_history.png" in artifacts
    champion = MlflowClient().get_model_version_by_alias("bin-counter", "champion")
    assert str(champion.version) == str(summary["version"]) and summary["champion"]
    # resumable: the same study picks up where it stopped instead of starting over
    again = run_hpo(config)
    assert again["counts"]["COMPLETE"] == 3


def test_failed_trial_is_recorded_and_the_study_finishes(prepared, tmp_path):
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e12, "log": True}}
    config = hpo_config(prepared, tmp_path, **{"hpo.n_trials": 2, "hpo.space": space})
    study = make_study(config)
    study.enqueue_trial({"lr": 1e12})  # diverges: NaN loss
    study.enqueue_trial({"lr": 1e-3})
    summary = run_hpo(config)
    assert summary["counts"] == {"COMPLETE": 1, "PRUNED": 0, "FAIL": 1}
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    failed = mlflow.search_runs(experiment_names=["tests"], filter_string="attributes.status = 'FAILED'")
    assert len(failed) == 1 and "loss became" in failed["tags.error"][0]


def test_pruned_trial_is_marked_pruned(prepared, tmp_path):
    config = hpo_config(prepared, tmp_path)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    from bincounter import tracking

    with tracking.maybe_run(config, run_name="parent") as parent:
        study.optimize(objective_fn(config, parent.info.run_id, set(), tmp_path), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    (child,) = child_runs(parent.info.run_id)
    assert child.info.status == "KILLED" and child.data.tags["pruned"] == "true"
