"""SageMaker hyperparameter tuning over hpo.space, and its training jobs mirrored into MLflow as child runs."""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bincounter import tracking
from bincounter.aws.follow import POLL_SECONDS, _metric_name, record_job
from bincounter.aws.jobs import channel_uris, job_environment, make_trainer, metric_definitions, uses_torchrun
from bincounter.aws.package import package_source
from bincounter.aws.redact import redact
from bincounter.aws.session import check_config, make_session, service_client, resolve_region
from bincounter.config import Config, hyperparameter_keys, search_space
from bincounter.errors import BincounterError, first_line

TUNING_TERMINAL = ("Completed", "Failed", "Stopped")
OBJECTIVE_TYPES = {"macro_accuracy": "Maximize", "rmse": "Minimize"}
_STATUS_TO_MLFLOW = {"Completed": "FINISHED", "Failed": "FAILED", "Stopped": "KILLED"}




def parameter_ranges(space: dict[str, dict], pinned: set[str] | None = None) -> dict[str, Any]:
    """hpo.space -> sagemaker.core.parameter ranges, named as the container reads them (hyperparameter_keys)."""
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    ranges = {}
    for dim in search_space(space, pinned or set()):
        if dim.name not in hyperparameter_keys():
            raise BincounterError(f"hpo.space.{dim.name} is not a hyperparameter the training job receives")
        if dim.kind == "categorical":
            ranges[dim.name] = CategoricalParameter([json.dumps(c) if isinstance(c, bool) else str(c)
                                                     for c in dim.choices])
            continue
        scaling = "Logarithmic" if dim.log else "Linear"
        ranges[dim.name] = (ContinuousParameter(dim.low, dim.high, scaling_type=scaling) if dim.kind == "float"
                            else IntegerParameter(int(dim.low), int(dim.high), scaling_type=scaling))
    if not ranges:
        raise BincounterError("hpo.space in params.yaml is empty (or every dimension is pinned): nothing to tune")
    return ranges


def check_tuning(config: Config) -> None:
    """What a tuning job cannot do: its trials start the entry script once per instance, without torchrun, so
    several instances would train the same trial independently and race to write one model."""
    if config.sagemaker.instance_count > 1:
        raise BincounterError(f"sagemaker.instance_count={config.sagemaker.instance_count}: SageMaker tuning runs "
                              "each trial on one instance (no torchrun); set --set sagemaker.instance_count=1 "
                              "(train the winner on several instances afterwards)")


def objective(config: Config) -> tuple[str, str]:
    """(SageMaker objective metric name, Maximize|Minimize): the best epoch's validation value, as local HPO."""
    return f"best_val_{config.hpo.objective}", OBJECTIVE_TYPES[config.hpo.objective]


@dataclass
class TuningPlan:
    tuner: Any
    inputs: list
    job_name: str
    session: Any
    region: str
    request: dict[str, Any]
    _scratch: Any = field(default=None, repr=False)


def tuning_job_name(config: Config) -> str:
    stamp = time.strftime("%y%m%d-%H%M%S", time.gmtime())
    prefix = re.sub(r"[^a-zA-Z0-9-]", "-", config.sagemaker.job_prefix)[: 32 - len(stamp) - 5].strip("-")
    return f"{prefix or 'bc'}-hpo-{stamp}"


def build_tuning_request(config: Config, space: dict[str, dict] | None = None, *, session=None,
                         pinned: set[str] | None = None) -> TuningPlan:
    """The HyperparameterTuner (SDK v3) over `space` (default hpo.space) and the request it will send.

    `plan.request` holds the HyperParameterTuningJobConfig (objective, ranges, limits) and the training job
    definition (static hyperparameters, metric definitions, image, channels) as sagemaker.core shapes.
    """
    from sagemaker.core.training.configs import InputData
    from sagemaker.train.tuner import HyperparameterTuner

    region = check_config(config)
    check_tuning(config)
    channels = channel_uris(config)
    ranges = parameter_ranges(config.hpo.space if space is None else space, pinned)
    session = session or make_session(region, config.sagemaker.bucket)
    scratch = tempfile.TemporaryDirectory(prefix="bincounter-sm-")
    source_dir = package_source(config, Path(scratch.name) / "source")
    if uses_torchrun(config, region):
        print(f"sagemaker: tuning trials start the entry script directly (no torchrun): one process, so one GPU "
              f"of each {config.sagemaker.instance_type}; a single-GPU type costs less for HPO")
    # no checkpoint config: trials sharing one checkpoint folder would resume from each other
    trainer = make_trainer(config, session, region, environment=job_environment(None), source_dir=source_dir,
                           checkpoints=False, distributed=False)
    metric, direction = objective(config)
    tuner = HyperparameterTuner(
        model_trainer=trainer, objective_metric_name=metric, objective_type=direction,
        hyperparameter_ranges=ranges, metric_definitions=metric_definitions(),
        max_jobs=config.hpo.max_jobs, max_parallel_jobs=config.hpo.max_parallel_jobs,
        strategy="Bayesian", random_seed=config.train.seed or None, base_tuning_job_name=config.sagemaker.job_prefix,
    )
    # the tuner wraps each InputData's URI in its own S3DataSource (no per-channel mode), so the channels
    # follow the trainer's training_input_mode (sagemaker.input_mode) here too
    inputs = [InputData(channel_name=name, data_source=uri) for name, uri in channels.items()]
    tuner._prepare_static_hyperparameters_for_tuning()
    request = {"hyper_parameter_tuning_job_config": tuner._build_tuning_job_config(),
               "training_job_definition": tuner._build_training_job_definition(inputs)}
    return TuningPlan(tuner=tuner, inputs=inputs, job_name=tuning_job_name(config), session=session,
                      region=region, request=request, _scratch=scratch)


def wait_for_tuning(client, name: str, *, poll_seconds: float | None = None) -> dict:
    poll = POLL_SECONDS if poll_seconds is None else poll_seconds
    last = None
    while True:
        description = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
        status = description["HyperParameterTuningJobStatus"]
        counters = description.get("TrainingJobStatusCounters") or {}
        line = (status, tuple(sorted(counters.items())))
        if line != last:
            print(f"sagemaker: tuning {name} {status} " + " ".join(f"{k}={v}" for k, v in counters.items()),
                  flush=True)
            last = line
        if status in TUNING_TERMINAL:
            return description
        time.sleep(poll)


def launch_tuning(config: Config, pinned: set[str] | None = None) -> dict:
    """Start a SageMaker tuning job over hpo.space, wait, and mirror it into MLflow.

    -> {"tuning_job_name", "status", "best_job", "best_params", "best_value", "objective", "parent_run_id"}
    """
    import mlflow

    check_config(config)
    check_tuning(config)
    channel_uris(config)
    plan = build_tuning_request(config, pinned=pinned)
    client = service_client(plan.session, "sagemaker")
    metric, _ = objective(config)
    active = mlflow.active_run()
    context = tracking.maybe_run(config, run_name=plan.job_name, nested=active is not None)
    with context as parent:
        mlflow.set_tags({"backend": "sagemaker", "hpo.objective": config.hpo.objective,
                         "sagemaker.tuning_job_name": plan.job_name})
        try:
            plan.tuner.tune(inputs=plan.inputs, job_name=plan.job_name, wait=False)
        except Exception as exc:  # noqa: BLE001 - botocore/pydantic errors from the SDK
            raise BincounterError(f"SageMaker refused the tuning job {plan.job_name}: {exc}") from None
        description = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=plan.job_name)
        mlflow.set_tag("sagemaker.tuning_job_arn", description.get("HyperParameterTuningJobArn", ""))
        print(f"sagemaker: started tuning job {plan.job_name} (max {config.hpo.max_jobs} jobs, "
              f"{config.hpo.max_parallel_jobs} at a time, objective {metric}); MLflow run {parent.info.run_id}")
        try:
            description = wait_for_tuning(client, plan.job_name)
        except KeyboardInterrupt:
            try:
                service_client(plan.session, "sagemaker", retries=1).stop_hyper_parameter_tuning_job(
                    HyperParameterTuningJobName=plan.job_name)
                print(f"sagemaker: stop requested for {plan.job_name}")
            except Exception as exc:  # noqa: BLE001
                print(f"sagemaker: could not stop {plan.job_name} ({type(exc).__name__}); stop it in the console")
            raise
        result = mirror_tuning_job(config, plan.job_name, parent.info.run_id, description=description,
                                   client=client)
        if description["HyperParameterTuningJobStatus"] != "Completed":
            reason = description.get("FailureReason") or description["HyperParameterTuningJobStatus"]
            mlflow.set_tag("sagemaker.failure_reason", str(reason)[:5000])
            raise BincounterError(f"SageMaker tuning job {plan.job_name} "
                                  f"{description['HyperParameterTuningJobStatus'].lower()}: {reason}")
    return result


def _register_best_job(config: Config, client, job_name: str, parent) -> None:
    """The best job's model, metrics and profile into its child run (once), registered with the champion rule.
    A job whose model cannot be read is reported and left unregistered: the search results stand."""
    import mlflow
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
        f"tags.`sagemaker.training_job_name` = '{job_name}'", max_results=1)
    if not runs or runs[0].data.tags.get("hpo.model") == "logged":
        return
    problem = None
    try:
        details = client.describe_training_job(TrainingJobName=job_name)
    except Exception as exc:  # noqa: BLE001 - botocore: the search itself succeeded
        problem = exc
    else:
        with mlflow.start_run(run_id=runs[0].info.run_id, nested=True):  # ends FINISHED, as the job did
            try:
                record_job(config, details, region=resolve_region(config))
                mlflow.set_tag("hpo.model", "logged")
            except Exception as exc:  # noqa: BLE001 - no model.tar.gz, not a bincounter model...
                problem = exc
    if problem is not None:
        print(f"hpo: the best job's model was not registered ({first_line(problem)}); retrain it with its "
              "parameters to register it")


def _tuning_summaries(client, name: str, description: dict) -> list[dict]:
    """Every training job of the tuning job; where listing is unavailable (moto answers 500), the best jobs
    from the describe answer."""
    summaries: list[dict] = []
    if client is not None:
        try:
            token = None
            while True:
                kwargs = {"HyperParameterTuningJobName": name, "MaxResults": 100}
                if token:
                    kwargs["NextToken"] = token
                page = client.list_training_jobs_for_hyper_parameter_tuning_job(**kwargs)
                summaries += page.get("TrainingJobSummaries", [])
                token = page.get("NextToken")
                if not token:
                    break
        except Exception as exc:  # noqa: BLE001 - fall back to the describe answer
            print(f"sagemaker: cannot list the tuning job's training jobs ({type(exc).__name__}); "
                  "mirroring the best job from its description")
    seen = {s.get("TrainingJobName") for s in summaries}
    for key in ("BestTrainingJob", "OverallBestTrainingJob"):
        best = description.get(key)
        if best and best.get("TrainingJobName") and best["TrainingJobName"] not in seen:
            summaries.append(best)
            seen.add(best["TrainingJobName"])
    return summaries


def mirror_tuning_job(config: Config, tuning_job_name: str, parent_run_id: str, *, description: dict | None = None,
                      client=None, register: bool = True) -> dict:
    """Each training job of a tuning job becomes a child run of `parent_run_id` (hyperparameters, final
    metrics, status); the parent records the best job, its parameters and objective value. With a client,
    the best job's model.tar.gz is logged into its child run and registered with the champion rule.

    Idempotent: jobs already mirrored under the parent are skipped. `description` (a
    DescribeHyperParameterTuningJob answer) may be given instead of a client.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    if description is None:
        if client is None:
            region = check_config(config)
            client = service_client(make_session(region, config.sagemaker.bucket), "sagemaker")
        description = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_job_name)
    tracking_client = MlflowClient()
    parent = tracking_client.get_run(parent_run_id)
    static = {k: v for k, v in ((description.get("TrainingJobDefinition") or {}).get("StaticHyperParameters")
                                or {}).items() if not k.startswith("sagemaker_")}
    done = {r.data.tags.get("sagemaker.training_job_name") for r in tracking_client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)}
    best = description.get("BestTrainingJob") or {}
    metric, _ = objective(config)
    children = 0
    for summary in _tuning_summaries(client, tuning_job_name, description):
        job = summary["TrainingJobName"]
        if job in done:
            continue
        details = {}
        if client is not None:
            try:
                details = client.describe_training_job(TrainingJobName=job)
            except Exception:  # noqa: BLE001 - e.g. a job the service no longer describes
                details = {}
        params = {**static, **(summary.get("TunedHyperParameters") or {})}
        params.update({k: v for k, v in (details.get("HyperParameters") or {}).items() if not k.startswith("sagemaker_")})
        now = int(time.time() * 1000)
        metrics = [Metric(f"sagemaker/{_metric_name(m['MetricName'])}", float(m["Value"]), now, 0)
                   for m in details.get("FinalMetricDataList") or [] if "Value" in m]
        final_objective = summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        if "Value" in final_objective:
            metrics.append(Metric(metric, float(final_objective["Value"]), now, 0))
        status = summary.get("TrainingJobStatus") or details.get("TrainingJobStatus") or "Completed"
        tags = {"mlflow.parentRunId": parent_run_id, "backend": "sagemaker",
                "sagemaker.tuning_job_name": tuning_job_name, "sagemaker.training_job_name": job,
                "sagemaker.training_job_arn": summary.get("TrainingJobArn") or details.get("TrainingJobArn", ""),
                "sagemaker.status": status}
        reason = summary.get("FailureReason") or details.get("FailureReason")
        if reason and status != "Completed":
            tags["sagemaker.failure_reason"] = str(reason)[:5000]
        if job == best.get("TrainingJobName"):
            tags["hpo.best"] = "true"
        child = tracking_client.create_run(parent.info.experiment_id, run_name=job, tags=tags)
        tracking_client.log_batch(child.info.run_id, metrics=metrics,
                                  params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()],
                                  tags=[RunTag(k, v) for k, v in tags.items()])
        tracking_client.set_terminated(child.info.run_id, _STATUS_TO_MLFLOW.get(status, "FAILED"))
        children += 1
    best_params = {k: v for k, v in (best.get("TunedHyperParameters") or {}).items()}
    best_value = (best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
    if best.get("TrainingJobName"):
        tracking_client.set_tag(parent_run_id, "best_training_job", best["TrainingJobName"])
        existing = parent.data.params
        for k, v in best_params.items():
            if f"best_{k}" not in existing:
                tracking_client.log_param(parent_run_id, f"best_{k}", redact(str(v)))
        if best_value is not None:
            tracking_client.log_metric(parent_run_id, f"best_{config.hpo.objective}", float(best_value))
        print(f"hpo: best SageMaker job {best['TrainingJobName']} {config.hpo.objective}={best_value} "
              f"params={best_params}")
        if client is not None and register:
            _register_best_job(config, client, best["TrainingJobName"], parent)
    counters = description.get("TrainingJobStatusCounters") or {}
    if counters and mlflow.active_run() is not None and mlflow.active_run().info.run_id == parent_run_id:
        mlflow.log_metrics({f"trials_{k.lower()}": float(v) for k, v in counters.items()})
    return {"tuning_job_name": tuning_job_name, "status": description.get("HyperParameterTuningJobStatus"),
            "best_job": best.get("TrainingJobName"), "best_params": best_params,
            "best_value": None if best_value is None else float(best_value), "objective": config.hpo.objective,
            "parent_run_id": parent_run_id, "children": children}
