"""Local hyperparameter search: nested trial runs, failures and pruning recorded, best run registered."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from conftest import config_on
from mlflow import MlflowClient

from bincounter.training.hpo import make_study, run_hpo

SMALL_SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
               "loss": {"type": "categorical", "choices": ["ce", "emd"]}}


def hpo_config(prepared, root, **overrides):
    return config_on(prepared, root, **{"hpo.space": SMALL_SPACE, "train.profile_steps": 0, **overrides})


def child_runs(parent_id: str):
    return MlflowClient().search_runs(
        [mlflow.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def model_versions(name: str = "bin-counter") -> list:
    return MlflowClient().search_model_versions(f"name = '{name}'")


@pytest.mark.slow
def test_three_trial_study_gives_nested_runs_best_value_plots_and_champion(prepared, tmp_path):
    config = hpo_config(prepared, tmp_path, **{"hpo.n_trials": 2})
    first = run_hpo(config)
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    parents = mlflow.search_runs(experiment_names=["tests"], filter_string="tags.`hpo.study` = 'bincounter-hpo'")
    assert len(parents) == 1
    parent_id = parents["run_id"][0]
    assert len(child_runs(parent_id)) == 2
    assert make_study(config).user_attrs["mlflow_parent_run_id"] == parent_id

    # resume: one more trial continues the same parent run (a third child), nothing restarts
    config = hpo_config(prepared, tmp_path, **{"hpo.n_trials": 3})
    summary = run_hpo(config)
    assert summary["counts"]["COMPLETE"] == 3
    parents = mlflow.search_runs(experiment_names=["tests"], filter_string="tags.`hpo.study` = 'bincounter-hpo'")
    assert list(parents["run_id"]) == [parent_id]
    children = child_runs(parent_id)
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.info.run_name.split()[0] for r in children) == ["trial-0", "trial-1", "trial-2"]
    for child in children:  # named after the trial's recipe, so the runs table reads like an ablation table
        params = child.data.params
        assert child.info.run_name.split()[1].startswith(f"{params['train.arch']}-{params['train.image_size']}px-"
                                                          f"{params['train.loss']}-")
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_macro_accuracy"] == pytest.approx(summary["best_value"])
    assert parent.data.metrics["trials_complete"] == 3
    assert {"best_lr", "best_loss"} <= set(parent.data.params)
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent_id, "hpo")}
    assert "hpo/optimization_history.png" in artifacts
    champion = MlflowClient().get_model_version_by_alias("bin-counter", "champion")
    assert str(champion.version) == str(summary["version"]) and summary["champion"]
    # each registered version is a different trial's model: the best is never registered twice
    versions = model_versions()
    assert len({v.run_id for v in versions}) == len(versions)
    assert len(versions) == (1 if str(first["version"]) == str(summary["version"]) else 2)

    # the finished study run again: same parent, no new trial, no new version
    again = run_hpo(config)
    assert again["counts"]["COMPLETE"] == 3 and str(again["version"]) == str(summary["version"])
    parents = mlflow.search_runs(experiment_names=["tests"], filter_string="tags.`hpo.study` = 'bincounter-hpo'")
    assert list(parents["run_id"]) == [parent_id] and len(child_runs(parent_id)) == 3
    assert len(model_versions()) == len(versions)


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


def test_configured_median_pruner_prunes_a_trial_below_the_median(prepared, tmp_path):
    """The study run_hpo builds (MedianPruner, 2 startup trials) prunes a real trial after its first epoch.

    The two startup trials are recorded in the study as finished with the best possible score (macro
    accuracy 1.0 after every epoch), so the third, real trial is below their median at epoch 1 whatever
    it learns; the project's report -> should_prune path must stop it and mark its run."""
    config = hpo_config(prepared, tmp_path, **{"hpo.n_trials": 3, "train.epochs": 2})
    study = make_study(config)
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                     "loss": optuna.distributions.CategoricalDistribution(["ce", "emd"])}
    for lr in (1e-3, 2e-3):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "loss": "ce"}, distributions=distributions,
                                                  value=1.0, intermediate_values={1: 1.0, 2: 1.0}))
    summary = run_hpo(config)
    assert summary["counts"] == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 0}
    trial = make_study(config).trials[2]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [1]
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    parent_id = make_study(config).user_attrs["mlflow_parent_run_id"]
    (child,) = child_runs(parent_id)
    assert child.info.status == "KILLED" and child.data.tags["pruned"] == "true"
    assert [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val_loss")] == [1]
