"""SageMaker backend: the same training code as a SageMaker training job, and its results back in MLflow.

`launch_training(config)` (train.backend=sagemaker) packages src/bincounter with the resolved params,
starts a training job on the PyTorch image (SageMaker Python SDK v3: ModelTrainer builds the request,
sagemaker.core's TrainingJob.create sends it, with the Debugger fields when sagemaker.debugger is on),
follows it from a local MLflow run (the parent) and, when it completes, logs its metrics, the model from
model.tar.gz as the usual pyfunc (registered with the champion rule) and the profile from output.tar.gz.
Inside the container `python -m bincounter train` runs unchanged: train.run_training sees the SM_* variables.

`launch_tuning(config)` (hpo with backend=sagemaker) starts a hyperparameter tuning job over hpo.space
and mirrors its training jobs into MLflow as child runs (`mirror_tuning_job`).

The same code runs against AWS and against a local emulator: boto3 honours AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bincounter import sagemaker_env
from bincounter.config import Config
from bincounter.errors import BincounterError, first_line

ENTRY_SCRIPT = "sm_entry.py"
REQUIREMENTS = "requirements.txt"
CHECKPOINT_LOCAL_PATH = sagemaker_env.CHECKPOINT_DIR
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")
TUNING_TERMINAL = ("Completed", "Failed", "Stopped")
POLL_SECONDS = float(os.environ.get("BINCOUNTER_SM_POLL_SECONDS", "30"))
# The SDK's defaults config: no telemetry calls to an outside host (they also fail offline and on emulators).
SDK_DEFAULTS = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
DEBUGGER_PROFILER_RULES = ("ProfilerReport", "LowGPUUtilization")
DEBUGGER_RULES = ("LossNotDecreasing", "Overfit")
# the metric keys train.metric_line prints (epoch lines: validation; `test_` and `best_val_` lines at the end)
_EPOCH_KEYS = ("train_loss", "val_loss", "accuracy", "rmse", "mae", "macro_accuracy", "off_by_one_accuracy")
_EVAL_KEYS = ("accuracy", "rmse", "mae", "macro_accuracy", "off_by_one_accuracy")
_NUMBER = r"([0-9.eE+-]+)"
OBJECTIVE_TYPES = {"macro_accuracy": "Maximize", "rmse": "Minimize"}
_STATUS_TO_MLFLOW = {"Completed": "FINISHED", "Failed": "FAILED", "Stopped": "KILLED"}


# ------------------------------------------------------------------ configuration checks and pieces


def resolve_region(config: Config) -> str:
    if config.sagemaker.region:
        return config.sagemaker.region
    import boto3

    region = boto3.session.Session().region_name
    if not region:
        raise BincounterError("sagemaker.region is empty and no AWS region is configured "
                              "(set sagemaker.region in params.yaml or AWS_REGION)")
    return region


def check_config(config: Config) -> str:
    """Everything a job needs that the user must provide; raises before anything is created. -> region."""
    sm = config.sagemaker
    missing = [name for name, value in (("sagemaker.role_arn", sm.role_arn), ("sagemaker.bucket", sm.bucket))
               if not value]
    if missing:
        raise BincounterError(f"{' and '.join(missing)} must be set in params.yaml (or with --set) "
                              "for train.backend=sagemaker")
    if not sm.role_arn.startswith("arn:"):
        raise BincounterError(f"sagemaker.role_arn must be an IAM role ARN (arn:aws:iam::<account>:role/<name>), "
                              f"got {sm.role_arn!r}")
    if sm.bucket.startswith("s3://"):
        raise BincounterError(f"sagemaker.bucket is a bucket name, not a URI: {sm.bucket!r}")
    if sm.instance_count < 1:
        raise BincounterError("sagemaker.instance_count must be at least 1")
    if sm.use_spot and sm.max_wait < sm.max_run:
        raise BincounterError(f"sagemaker.max_wait ({sm.max_wait}) must be at least sagemaker.max_run "
                              f"({sm.max_run}) with use_spot")
    return resolve_region(config)


def channel_uris(config: Config) -> dict[str, str]:
    """train/validation/test S3 prefixes from data/sync.json (written by `dvc repro`'s sync stage)."""
    from bincounter import sync

    record = sync.channel_uris(config.sync.out)
    channels = record.get("channels") or {}
    if record.get("mode") != "s3" or not all(str(channels.get(c, "")).startswith("s3://") for c in sync.CHANNELS.values()):
        raise BincounterError(f"{config.sync.out} records the prepared data as local only: set sync.s3_uri "
                              "(s3://bucket/prefix) in params.yaml and run `dvc repro` to upload the channels")
    return {name: channels[name] for name in sync.CHANNELS.values()}


def training_image(config: Config, region: str) -> str:
    """The AWS Deep Learning Container for PyTorch training (the SDK's bundled lookup table, no network)."""
    from sagemaker.core import image_uris

    sm = config.sagemaker
    try:
        return image_uris.retrieve(framework="pytorch", region=region, version=sm.framework_version,
                                   py_version=sm.py_version, instance_type=sm.instance_type,
                                   image_scope="training")
    except (ValueError, KeyError) as exc:
        raise BincounterError(
            f"no SageMaker PyTorch training image for framework_version={sm.framework_version} "
            f"py_version={sm.py_version} instance_type={sm.instance_type} in {region}: {exc}") from None


def hyperparameters(config: Config) -> dict[str, str]:
    """The job's hyperparameters, named as sagemaker_env.HP_KEYS reads them back in the container."""
    out = {}
    for name, key in sagemaker_env.HP_KEYS.items():
        if "-" in name:  # batch-size is an alias of batch_size
            continue
        section, _, attr = key.partition(".")
        value = getattr(getattr(config, section), attr)
        out[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    return out


def metric_definitions() -> list[dict[str, str]]:
    """Regexes over train.metric_line's lines: `epoch=N accuracy=.. macro_accuracy=..` each epoch (validation),
    then `epoch=N test_accuracy=..` and `epoch=N best_val_accuracy=..` once at the end."""
    defs = [{"Name": "train_loss", "Regex": rf"\btrain_loss={_NUMBER}"},
            {"Name": "val_loss", "Regex": rf"\bval_loss={_NUMBER}"}]
    defs += [{"Name": f"val_{k}", "Regex": rf"\b{k}={_NUMBER}"} for k in _EVAL_KEYS]
    defs += [{"Name": f"best_val_{k}", "Regex": rf"\bbest_val_{k}={_NUMBER}"} for k in _EVAL_KEYS]
    defs += [{"Name": f"test_{k}", "Regex": rf"\btest_{k}={_NUMBER}"} for k in _EVAL_KEYS]
    return defs


def uses_torchrun(config: Config, region: str) -> bool:
    """Several instances, or several GPUs on one: torchrun (DDP) launches one process per GPU."""
    if config.sagemaker.instance_count > 1:
        return True
    try:
        from sagemaker.core import instance_types_gpu_info

        gpus = instance_types_gpu_info.retrieve(region).get(config.sagemaker.instance_type, {}).get("Count", 1)
    except Exception:  # noqa: BLE001 - the table is a convenience
        gpus = 1
    return gpus > 1


def package_source(config: Config, dest: Path, extra_requirements: tuple[str, ...] = ()) -> Path:
    """dest/ = bincounter/ (this package) + params.yaml (the resolved config) + requirements.txt + sm_entry.py."""
    import mlflow

    import bincounter

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(bincounter.__file__).parent, dest / "bincounter", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = config.to_dict()
    params["train"]["backend"] = "local"  # inside the container the job trains itself
    if params["train"]["weights_path"]:
        print(f"sagemaker: train.weights_path={params['train']['weights_path']} is a local file the job cannot "
              "read; ignored (use train.pretrained=true to download torchvision weights in the job)")
        params["train"]["weights_path"] = ""
    (dest / "params.yaml").write_text("# written by bincounter for a SageMaker job: the launching config\n"
                                      + yaml.safe_dump(params, sort_keys=False))
    # what the PyTorch training image lacks; torch/torchvision/numpy come with the image, never reinstall them
    requirements = [f"mlflow=={mlflow.__version__}", "pyyaml", "tqdm", *extra_requirements]
    (dest / REQUIREMENTS).write_text("\n".join(requirements) + "\n")
    (dest / ENTRY_SCRIPT).write_text(ENTRY_SCRIPT_SOURCE)
    return dest


ENTRY_SCRIPT_SOURCE = '''"""SageMaker entry point: runs `python -m bincounter train` with the job's hyperparameters.

SageMaker (and torchrun) start a script file and pass the hyperparameters as `--name value` arguments;
this forwards them to the one training command. Written by bincounter.sagemaker_backend.package_source.
"""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("BINCOUNTER_PARAMS", os.path.join(HERE, "params.yaml"))
sys.argv = ["bincounter", "train", *sys.argv[1:]]
runpy.run_module("bincounter", run_name="__main__", alter_sys=True)
'''


def remote_tracking_uri() -> str | None:
    """The tracking URI the job can reach too (an HTTP server, Databricks, SageMaker managed MLflow), if any."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri and uri.startswith(("http://", "https://", "databricks", "arn:aws:sagemaker")):
        if uri.startswith(("http://127.", "http://localhost", "https://localhost")):
            print(f"sagemaker: MLFLOW_TRACKING_URI={uri} is local to this machine; the job will not log epochs "
                  "there (its results still come back into this run)")
            return None
        return uri
    return None


def job_environment(parent_run=None) -> dict[str, str]:
    """Environment of the job: with a reachable tracking server the container logs its epochs into a child
    run of `parent_run`; the parent registers the model, so the container never does."""
    env = {"PYTHONUNBUFFERED": "1", sagemaker_env.REGISTER_ENV: "false"}
    uri = remote_tracking_uri()
    if uri and parent_run is not None:
        env.update({
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_EXPERIMENT_ID": parent_run.info.experiment_id,
            "MLFLOW_RUN_CONTEXT": json.dumps({"mlflow.parentRunId": parent_run.info.run_id}),
        })
    return env


def emulated() -> bool:
    """AWS_ENDPOINT_URL (or a per-service override) points boto3 at an emulator such as moto_server."""
    return any(os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SAGEMAKER",
                                                 "AWS_ENDPOINT_URL_IAM"))


def make_session(region: str, bucket: str):
    """A SageMaker SDK session with an explicit bucket (no STS lookup) and telemetry off."""
    import boto3
    from sagemaker.core.helper.session_helper import Session

    if emulated():
        # SDK v3 validates the role with iam:SimulatePrincipalPolicy, which emulators do not implement;
        # against AWS the check stays on (it explains missing permissions, and only warns when it cannot tell)
        os.environ.setdefault("SAGEMAKER_VALIDATE_ROLE", "false")
    return Session(boto_session=boto3.Session(region_name=region), default_bucket=bucket,
                   sagemaker_config=SDK_DEFAULTS)


def _client(session, service: str, retries: int = 3):
    from botocore.config import Config as BotoConfig

    return session.boto_session.client(service, region_name=session.boto_region_name,
                                       config=BotoConfig(retries={"max_attempts": retries, "mode": "standard"}))


# ------------------------------------------------------------------ the training request


@dataclass
class TrainingPlan:
    """One CreateTrainingJob request (snake_case kwargs of sagemaker.core.resources.TrainingJob.create)."""

    request: dict[str, Any]
    trainer: Any
    session: Any
    region: str
    channels: dict[str, str]
    source_dir: Path
    distributed: bool = False
    _scratch: Any = field(default=None, repr=False)

    @property
    def job_name(self) -> str:
        return self.request["training_job_name"]


def make_trainer(config: Config, session, region: str, *, environment: dict[str, str] | None = None,
                 source_dir: Path, checkpoints: bool = True, distributed: bool | None = None):
    """The ModelTrainer (SDK v3) for one job of this config."""
    from sagemaker.core.training.configs import (
        CheckpointConfig,
        Compute,
        MetricDefinition,
        OutputDataConfig,
        SourceCode,
        StoppingCondition,
    )
    from sagemaker.train import ModelTrainer
    from sagemaker.train.distributed import Torchrun

    sm = config.sagemaker
    if distributed is None:
        distributed = uses_torchrun(config, region)
    image = training_image(config, region)
    try:
        trainer = ModelTrainer(
            sagemaker_session=session,
            role=sm.role_arn,
            base_job_name=sm.job_prefix,
            training_image=image,
            source_code=SourceCode(source_dir=str(source_dir), entry_script=ENTRY_SCRIPT,
                                   requirements=REQUIREMENTS),
            distributed=Torchrun() if distributed else None,
            compute=Compute(instance_type=sm.instance_type, instance_count=sm.instance_count,
                            enable_managed_spot_training=sm.use_spot),
            stopping_condition=StoppingCondition(max_runtime_in_seconds=sm.max_run,
                                                 max_wait_time_in_seconds=sm.max_wait if sm.use_spot else None),
            output_data_config=OutputDataConfig(s3_output_path=f"s3://{sm.bucket}/{sm.job_prefix}/output"),
            # s3_uri None: the SDK picks s3://<bucket>/<prefix>/<job name>/checkpoints, one folder per job
            checkpoint_config=(CheckpointConfig(local_path=CHECKPOINT_LOCAL_PATH)
                               if checkpoints and sm.use_spot else None),
            hyperparameters=hyperparameters(config),
            environment=dict(environment or {}),
        )
    except Exception as exc:  # noqa: BLE001 - role validation, pydantic and botocore errors from the SDK
        raise BincounterError(f"the SageMaker SDK rejected the job settings ({type(exc).__name__}): "
                              f"{first_line(exc)}") from None
    trainer.with_metric_definitions([MetricDefinition(name=d["Name"], regex=d["Regex"]) for d in metric_definitions()])
    return trainer


def debugger_settings(config: Config, region: str, job_prefix_uri: str) -> dict[str, Any]:
    """ProfilerConfig + built-in rules for CreateTrainingJob (ModelTrainer has no Debugger fields)."""
    from sagemaker.core import image_uris
    from sagemaker.core.shapes import (
        CollectionConfiguration,
        DebugHookConfig,
        DebugRuleConfiguration,
        ProfilerConfig,
        ProfilerRuleConfiguration,
    )

    rule_image = image_uris.retrieve("debugger", region)
    return {
        "profiler_config": ProfilerConfig(s3_output_path=f"{job_prefix_uri}/profiler",
                                          profiling_interval_in_milliseconds=500),
        "profiler_rule_configurations": [
            ProfilerRuleConfiguration(rule_configuration_name=name, rule_evaluator_image=rule_image,
                                      rule_parameters={"rule_to_invoke": name})
            for name in DEBUGGER_PROFILER_RULES],
        "debug_hook_config": DebugHookConfig(
            s3_output_path=f"{job_prefix_uri}/debug-output",
            collection_configurations=[CollectionConfiguration(collection_name="losses",
                                                               collection_parameters={"save_interval": "50"})]),
        "debug_rule_configurations": [
            DebugRuleConfiguration(rule_configuration_name=name, rule_evaluator_image=rule_image,
                                   rule_parameters={"rule_to_invoke": name})
            for name in DEBUGGER_RULES],
    }


def build_training_request(config: Config, *, session=None, parent_run=None) -> TrainingPlan:
    """Check the config, package the source and build the CreateTrainingJob request.

    Side effect: the SDK uploads the packaged source and its drivers to s3://<bucket>/<prefix>/<job>/input/
    (the request names them). Nothing else is created. Tests inspect `plan.request`.
    """
    from sagemaker.core.training.configs import InputData

    region = check_config(config)
    channels = channel_uris(config)
    session = session or make_session(region, config.sagemaker.bucket)
    scratch = tempfile.TemporaryDirectory(prefix="bincounter-sm-")
    extra = ("sagemaker-mlflow",) if (remote_tracking_uri() or "").startswith("arn:aws:sagemaker") else ()
    source_dir = package_source(config, Path(scratch.name) / "source", extra)
    distributed = uses_torchrun(config, region)
    trainer = make_trainer(config, session, region, environment=job_environment(parent_run),
                           source_dir=source_dir, distributed=distributed)
    inputs = [InputData(channel_name=name, data_source=uri) for name, uri in channels.items()]
    try:
        request = trainer._create_training_job_args(input_data_config=inputs)
    except Exception as exc:  # noqa: BLE001 - S3 upload errors arrive as botocore/boto3 exceptions
        raise BincounterError(f"could not stage the job's source code in s3://{config.sagemaker.bucket} "
                              f"({type(exc).__name__}): {str(exc).strip()[:300]}") from None
    if config.sagemaker.debugger:
        request.update(debugger_settings(config, region, f"s3://{config.sagemaker.bucket}/{config.sagemaker.job_prefix}"))
    return TrainingPlan(request=request, trainer=trainer, session=session, region=region, channels=channels,
                        source_dir=source_dir, distributed=distributed, _scratch=scratch)


def submit(plan: TrainingPlan) -> dict:
    """CreateTrainingJob; -> the first DescribeTrainingJob answer."""
    from botocore.exceptions import BotoCoreError, ClientError
    from sagemaker.core.resources import TrainingJob

    try:
        TrainingJob.create(session=plan.session.boto_session, region=plan.region, **plan.request)
    except (ClientError, BotoCoreError) as exc:
        raise BincounterError(f"SageMaker refused the training job {plan.job_name}: {exc}") from None
    return _client(plan.session, "sagemaker").describe_training_job(TrainingJobName=plan.job_name)


# ------------------------------------------------------------------ following a job


class LogTail:
    """Prints the job's CloudWatch log streams as they grow; quiet when there are none (yet, or an emulator)."""

    def __init__(self, logs_client, job_name: str):
        self.client, self.job_name = logs_client, job_name
        self.tokens: dict[str, str] = {}
        self.enabled = logs_client is not None

    def poll(self) -> int:
        if not self.enabled:
            return 0
        from botocore.exceptions import BotoCoreError, ClientError

        printed = 0
        try:
            streams = self.client.describe_log_streams(
                logGroupName=LOG_GROUP, logStreamNamePrefix=f"{self.job_name}/").get("logStreams", [])
            for stream in streams:
                name = stream["logStreamName"]
                while True:
                    kwargs = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
                    if name in self.tokens:
                        kwargs["nextToken"] = self.tokens[name]
                    page = self.client.get_log_events(**kwargs)
                    for event in page.get("events", []):
                        print(f"[{name.split('/', 1)[-1]}] {event['message'].rstrip()}", flush=True)
                        printed += 1
                    token = page.get("nextForwardToken")
                    if not page.get("events") or token == self.tokens.get(name):
                        self.tokens[name] = token or self.tokens.get(name, "")
                        break
                    self.tokens[name] = token
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                print(f"sagemaker: cannot read the job's CloudWatch logs ({exc.response['Error'].get('Code')}); "
                      "following its status only")
                self.enabled = False
        except (BotoCoreError, KeyError, TypeError):
            self.enabled = False
        return printed


def wait_for_job(client, job_name: str, *, logs_client=None, poll_seconds: float | None = None) -> dict:
    """Poll DescribeTrainingJob until the job ends, printing status changes and its log; -> the last answer."""
    poll = POLL_SECONDS if poll_seconds is None else poll_seconds
    from botocore.exceptions import BotoCoreError, ClientError

    tail = LogTail(logs_client, job_name)
    last, errors = None, 0
    while True:
        try:
            description = client.describe_training_job(TrainingJobName=job_name)
            errors = 0
        except (BotoCoreError, ClientError) as exc:  # throttling, a dropped connection: the job runs on
            errors += 1
            if errors >= 5:
                raise BincounterError(f"lost track of SageMaker job {job_name} ({exc}); it may still be running: "
                                      "see the console, or mirror it later with follow_training_job") from None
            print(f"sagemaker: describe {job_name} failed ({type(exc).__name__}); retrying")
            time.sleep(poll)
            continue
        status = (description["TrainingJobStatus"], description.get("SecondaryStatus", ""))
        if status != last:
            transitions = description.get("SecondaryStatusTransitions") or [{}]
            message = transitions[-1].get("StatusMessage", "")
            print(f"sagemaker: {job_name} {status[0]} / {status[1]}" + (f": {message}" if message else ""),
                  flush=True)
            last = status
        tail.poll()
        if status[0] in TERMINAL:
            return description
        time.sleep(poll)


def stop_job(client, job_name: str) -> None:
    """StopTrainingJob, tolerating services (or emulators) that refuse it."""
    try:
        client.stop_training_job(TrainingJobName=job_name)
        print(f"sagemaker: stop requested for {job_name}")
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        print(f"sagemaker: could not stop {job_name} ({type(exc).__name__}); stop it in the console")


def _metric_name(name: str) -> str:
    return re.sub(r"[^\w.\-/ ]", "_", name)


def _download(s3, uri: str, dest: Path) -> Path | None:
    from botocore.exceptions import ClientError

    from bincounter.storage import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        s3.download_file(bucket, key, str(dest))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "403"):
            return None
        raise
    return dest


def _extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.10.12: refuse members that escape dest
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not str(target).startswith(str(dest.resolve())) or member.issym() or member.islnk():
                    raise BincounterError(f"{archive.name}: unsafe member {member.name}")
            tar.extractall(dest)
    return dest


def _log_model(config: Config, model_dir: Path):
    """The same pyfunc as a local run logs (example image from the local val split when there is one)."""
    from bincounter import tracking
    from bincounter.pyfunc import example_image_b64, log_pyfunc

    val_dir = Path(config.train.data_dir) / "val"
    if (val_dir / "images.npy").exists():
        return tracking.log_model(model_dir, config, val_dir)
    import numpy as np

    size = json.loads((model_dir / "model_config.json").read_text()).get("stored_size", 64)
    return log_pyfunc(model_dir, example_image_b64(np.zeros((size, size, 3), np.uint8)), config.mlflow.model_name)


def record_job(config: Config, description: dict, *, s3=None, region: str | None = None, register: bool = True):
    """Into the active MLflow run: a finished job's metrics, model (registered, champion rule) and profile.

    A Failed or Stopped job sets its failure reason as a tag and raises BincounterError (maybe_run then
    marks the run FAILED). -> TrainOutcome.
    """
    import mlflow

    from bincounter import tracking
    from bincounter.storage import s3_client
    from bincounter.train import TrainOutcome

    name = description["TrainingJobName"]
    status = description["TrainingJobStatus"]
    mlflow.set_tag("sagemaker.status", status)
    if description.get("BillableTimeInSeconds") is not None:
        mlflow.log_metric("sagemaker_billable_seconds", float(description["BillableTimeInSeconds"]))
    if status != "Completed":
        reason = description.get("FailureReason") or description.get("SecondaryStatus") or "no reason given"
        mlflow.set_tag("sagemaker.failure_reason", str(reason)[:5000])
        raise BincounterError(f"SageMaker job {name} {status.lower()}: {reason}")

    final = {f"sagemaker/{_metric_name(m['MetricName'])}": float(m["Value"])
             for m in description.get("FinalMetricDataList") or [] if "Value" in m}
    if final:
        mlflow.log_metrics(final)
    artifact = (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not artifact:
        raise BincounterError(f"SageMaker job {name} completed without a model artifact")
    s3 = s3 or s3_client(region=region)
    with tempfile.TemporaryDirectory(prefix="bincounter-sm-") as scratch:
        scratch = Path(scratch)
        archive = _download(s3, artifact, scratch / "model.tar.gz")
        if archive is None:
            raise BincounterError(f"SageMaker job {name} completed but {artifact} is not there")
        model_dir = _extract(archive, scratch / "model")
        if not (model_dir / "weights.pt").exists():
            raise BincounterError(f"{artifact} holds no weights.pt: not a bincounter model")
        test, val, best_epoch = _read_metrics(model_dir, final)
        if val:
            mlflow.log_metrics({k: float(val[k]) for k in tracking.EPOCH_METRICS if k in val},
                               step=max(best_epoch, 1))
        if test:
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in test.items()})
        if (model_dir / "metrics.json").exists():
            mlflow.log_artifact(str(model_dir / "metrics.json"))
        _record_profile(s3, artifact, scratch)
        model_info = _log_model(config, model_dir)
        outcome = TrainOutcome(run_id=mlflow.active_run().info.run_id, test_metrics=test, val_metrics=val,
                               model_uri=model_info.model_uri)
        if register and config.mlflow.champion_metric in test:
            outcome.registered_version, outcome.champion = tracking.promote(config, model_info, test)
        elif register:
            print(f"registry: no test {config.mlflow.champion_metric} came back from {name}; not registered")
    print(f"sagemaker: {name} mirrored into MLflow run {outcome.run_id}")
    return outcome


def _read_metrics(model_dir: Path, final: dict[str, float]) -> tuple[dict, dict, int]:
    """metrics.json (written by train.run_training into the model dir), else the job's final log metrics."""
    path = model_dir / "metrics.json"
    if path.exists():
        data = json.loads(path.read_text())
        return data.get("test") or {}, data.get("val") or {}, int(data.get("best_epoch") or 0)
    test = {k.removeprefix("sagemaker/test_"): v for k, v in final.items() if k.startswith("sagemaker/test_")}
    val = {k.removeprefix("sagemaker/best_val_"): v for k, v in final.items() if k.startswith("sagemaker/best_val_")}
    return test, val, 0


def _record_profile(s3, model_artifact: str, scratch: Path) -> None:
    """output.tar.gz (SM_OUTPUT_DATA_DIR) holds profile/: the rules become tags, the files artifacts."""
    import mlflow

    from bincounter import tracking

    output_uri = model_artifact.rsplit("/", 1)[0] + "/output.tar.gz"
    try:
        archive = _download(s3, output_uri, scratch / "output.tar.gz")
    except Exception as exc:  # noqa: BLE001 - the profile is a bonus
        print(f"sagemaker: could not fetch {output_uri} ({type(exc).__name__}); no profile attached")
        return
    if archive is None:
        return
    profile = _extract(archive, scratch / "output") / "profile"
    if (profile / "rules.csv").exists():
        tracking.log_profile(profile, profile / "report.md")
    elif profile.is_dir():
        mlflow.log_artifacts(str(profile), "profile")


# ------------------------------------------------------------------ launch_training


def launch_training(config: Config):
    """Run one training job on SageMaker and bring its results back into MLflow. -> TrainOutcome."""
    import mlflow

    from bincounter import tracking

    check_config(config)
    channel_uris(config)
    with tracking.maybe_run(config) as run:
        mlflow.set_tags({"backend": "sagemaker", "sagemaker.instance_type": config.sagemaker.instance_type,
                         "sagemaker.instance_count": str(config.sagemaker.instance_count),
                         "sagemaker.spot": str(config.sagemaker.use_spot).lower(),
                         "sagemaker.debugger": str(config.sagemaker.debugger).lower()})
        plan = build_training_request(config, parent_run=run)
        client = _client(plan.session, "sagemaker")
        job_name = plan.job_name
        mlflow.set_tags({"sagemaker.region": plan.region, "sagemaker.image": plan.trainer.training_image,
                         "sagemaker.distribution": "torchrun" if plan.distributed else "none"})
        description = submit(plan)
        mlflow.set_tags({
            "mlflow.runName": job_name, "sagemaker.training_job_name": job_name,
            "sagemaker.training_job_arn": description.get("TrainingJobArn", ""),
            "sagemaker.console_url": f"https://{plan.region}.console.aws.amazon.com/sagemaker/home"
                                     f"?region={plan.region}#/jobs/{job_name}",
        })
        print(f"sagemaker: started {job_name} ({config.sagemaker.instance_count} x {config.sagemaker.instance_type}"
              f"{', spot' if config.sagemaker.use_spot else ''}); MLflow run {run.info.run_id}")
        try:
            description = wait_for_job(client, job_name, logs_client=_client(plan.session, "logs"))
        except KeyboardInterrupt:
            stop_job(_client(plan.session, "sagemaker", retries=1), job_name)
            mlflow.set_tag("sagemaker.status", "Stopping")
            raise
        return record_job(config, description, region=plan.region)


def follow_training_job(config: Config, job_name: str):
    """Mirror an existing training job (e.g. started by an earlier, interrupted session) into a new run."""
    import mlflow

    from bincounter import tracking

    region = check_config(config)
    session = make_session(region, config.sagemaker.bucket)
    client = _client(session, "sagemaker")
    with tracking.maybe_run(config, run_name=job_name):
        description = wait_for_job(client, job_name, logs_client=_client(session, "logs"))
        mlflow.set_tags({"backend": "sagemaker", "sagemaker.training_job_name": job_name,
                         "sagemaker.training_job_arn": description.get("TrainingJobArn", "")})
        return record_job(config, description, region=region)


# ------------------------------------------------------------------ hyperparameter tuning


def parameter_ranges(space: dict[str, dict], pinned: set[str] | None = None) -> dict[str, Any]:
    """hpo.space -> sagemaker.core.parameter ranges (names as the container reads them: sagemaker_env.HP_KEYS)."""
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    ranges = {}
    for name, spec in space.items():
        if pinned and name in pinned:
            continue
        if name not in sagemaker_env.HP_KEYS:
            raise BincounterError(f"hpo.space.{name} is not a hyperparameter the training job reads "
                                  f"(one of {', '.join(sorted(k for k in sagemaker_env.HP_KEYS if '-' not in k))})")
        kind = (spec or {}).get("type")
        if kind in ("float", "int"):
            try:
                low, high = float(spec["low"]), float(spec["high"])
            except (KeyError, TypeError, ValueError):
                raise BincounterError(f"hpo.space.{name}: {kind} needs numeric low and high") from None
            if low >= high:
                raise BincounterError(f"hpo.space.{name}: low must be below high")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                raise BincounterError(f"hpo.space.{name}: log scale needs low > 0")
            scaling = "Logarithmic" if log else "Linear"
            ranges[name] = (ContinuousParameter(low, high, scaling_type=scaling) if kind == "float"
                            else IntegerParameter(int(low), int(high), scaling_type=scaling))
        elif kind == "categorical":
            choices = spec.get("choices") or []
            if not choices:
                raise BincounterError(f"hpo.space.{name}: categorical needs choices")
            ranges[name] = CategoricalParameter([json.dumps(c) if isinstance(c, bool) else str(c) for c in choices])
        else:
            raise BincounterError(f"hpo.space.{name}: type must be float, int or categorical, got {kind!r}")
    if not ranges:
        raise BincounterError("hpo.space in params.yaml is empty: nothing to tune")
    return ranges


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
    channels = channel_uris(config)
    ranges = parameter_ranges(config.hpo.space if space is None else space, pinned)
    session = session or make_session(region, config.sagemaker.bucket)
    scratch = tempfile.TemporaryDirectory(prefix="bincounter-sm-")
    source_dir = package_source(config, Path(scratch.name) / "source")
    if uses_torchrun(config, region):
        print("sagemaker: tuning jobs start the entry script directly (no torchrun); each trial uses one "
              "process per instance — set sagemaker.instance_count=1 and a single-GPU instance for HPO")
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

    from bincounter import tracking

    check_config(config)
    channel_uris(config)
    plan = build_tuning_request(config, pinned=pinned)
    client = _client(plan.session, "sagemaker")
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
                _client(plan.session, "sagemaker", retries=1).stop_hyper_parameter_tuning_job(
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
            client = _client(make_session(region, config.sagemaker.bucket), "sagemaker")
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
                                  params=[Param(k, str(v)[:6000]) for k, v in params.items()],
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
                tracking_client.log_param(parent_run_id, f"best_{k}", str(v))
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
