"""SageMaker training jobs: the same training code as a job, and its results back in MLflow.

`launch_training(config)` (train.backend=sagemaker) packages the source with the resolved params, builds
the CreateTrainingJob request with SDK v3's ModelTrainer (sagemaker.core's TrainingJob.create sends it,
with the Debugger fields when sagemaker.debugger is on), follows the job from a local MLflow run and,
when it completes, mirrors its metrics, model and profile into that run (bincounter.aws.follow).
Inside the container `python -m bincounter train` runs the one training function (bincounter.aws.container).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bincounter import tracking
from bincounter.aws import container, redact
from bincounter.aws.follow import record_job, stop_job, wait_for_job
from bincounter.aws.package import ENTRY_SCRIPT, REQUIREMENTS, package_source
from bincounter.aws.session import check_config, make_session, role_validation, service_client
from bincounter.config import Config, hyperparameter_keys
from bincounter.data.sync import CHANNELS, channel_uris as read_sync_record
from bincounter.errors import BincounterError, first_line
from bincounter.training.metrics import LOSS_NAMES, METRIC_NAMES

CHECKPOINT_LOCAL_PATH = container.CHECKPOINT_DIR
DEBUGGER_PROFILER_RULES = ("ProfilerReport", "LowGPUUtilization")
DEBUGGER_RULES = ("LossNotDecreasing", "Overfit")
_NUMBER = r"([0-9.eE+-]+)"


def channel_inputs(channels: dict[str, str]) -> list:
    """The channels as S3 prefixes. Given as S3DataSource shapes (not bare URIs, which the SDK pins to File
    mode), each channel follows the job's training_input_mode, sagemaker.input_mode: FastFile mounts the
    shards and streams each on its first read, so a multi-instance job does not copy the whole set to every
    instance, and each DDP rank reads only the shards dealt to it (training.dataset.ShardSampler)."""
    from sagemaker.core.training.configs import InputData, S3DataSource

    return [InputData(channel_name=name, data_source=S3DataSource(
        s3_data_type="S3Prefix", s3_uri=uri, s3_data_distribution_type="FullyReplicated"))
        for name, uri in channels.items()]


def channel_uris(config: Config) -> dict[str, str]:
    """train/validation/test S3 prefixes from data/sync.json (written by `dvc repro`'s sync stage)."""
    record = read_sync_record(config.sync.out)
    channels = record.get("channels") or {}
    if record.get("mode") != "s3" or not all(str(channels.get(c, "")).startswith("s3://") for c in CHANNELS.values()):
        raise BincounterError(f"{config.sync.out} records the prepared data as local only: set sync.s3_uri "
                              "(s3://bucket/prefix) in params.yaml and run `dvc repro` to upload the channels")
    return {name: channels[name] for name in CHANNELS.values()}


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
    """The job's hyperparameters: every training knob a job receives (config.hyperparameter_keys), by the
    names the container's `bincounter train` reads back."""
    out = {}
    for name, key in hyperparameter_keys().items():
        section, _, attr = key.partition(".")
        value = getattr(getattr(config, section), attr)
        out[name] = redact.redact(json.dumps(value) if isinstance(value, bool) else str(value))
    return out


def metric_definitions() -> list[dict[str, str]]:
    """Regexes over training.loop.metric_line's lines: `epoch=N accuracy=.. macro_accuracy=..` each epoch (validation),
    then `epoch=N test_accuracy=..` and `epoch=N best_val_accuracy=..` once at the end."""
    defs = [{"Name": k, "Regex": rf"\b{k}={_NUMBER}"} for k in LOSS_NAMES]
    defs += [{"Name": f"val_{k}", "Regex": rf"\b{k}={_NUMBER}"} for k in METRIC_NAMES]
    defs += [{"Name": f"best_val_{k}", "Regex": rf"\bbest_val_{k}={_NUMBER}"} for k in METRIC_NAMES]
    defs += [{"Name": f"test_{k}", "Regex": rf"\btest_{k}={_NUMBER}"} for k in METRIC_NAMES]
    return defs


GPU_INSTANCE = re.compile(r"^ml\.(p|g)\d")  # every NVIDIA family: g4dn g5 g6 g6e gr6 p3 p4d p5 p5e p5en p6-b200...


def uses_torchrun(config: Config, region: str | None = None) -> bool:
    """Several instances, or any GPU instance: torchrun (DDP) starts one process per GPU, counting the GPUs
    at run time (SM_NUM_GPUS), so a type missing from any table still uses all of its GPUs."""
    sm = config.sagemaker
    return sm.instance_count > 1 or bool(GPU_INSTANCE.match(sm.instance_type))


def remote_tracking_uri() -> str | None:
    """The tracking URI the job can reach and use without credentials of ours (an HTTP server, SageMaker
    managed MLflow through the job's role), if any. Credentials are never put into a job's environment."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if not uri:
        return None
    if uri.startswith("databricks"):
        print("sagemaker: MLFLOW_TRACKING_URI is Databricks, which needs a token the job must not carry; the job "
              "trains without tracking (its results still come back into this run)")
        return None
    if uri.startswith(("http://", "https://")) and redact.has_userinfo(uri):
        print("sagemaker: MLFLOW_TRACKING_URI carries credentials; it is not forwarded to the job (they would "
              "show in the job description); the results still come back into this run")
        return None
    if uri.startswith(("http://", "https://", "arn:aws:sagemaker")):
        if uri.startswith(("http://127.", "http://localhost", "https://localhost")):
            print(f"sagemaker: MLFLOW_TRACKING_URI={uri} is local to this machine; the job will not log epochs "
                  "there (its results still come back into this run)")
            return None
        return uri
    return None


def job_environment(parent_run=None) -> dict[str, str]:
    """Environment of the job: with a reachable tracking server the container logs its epochs into a child
    run of `parent_run` (best-effort: container.train goes on without it); the parent registers the model,
    so the container never does. No progress bars in CloudWatch."""
    env = {"PYTHONUNBUFFERED": "1", container.REGISTER_ENV: "false", "TQDM_DISABLE": "1"}
    uri = remote_tracking_uri()
    if uri and parent_run is not None:
        env.update({
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_EXPERIMENT_ID": parent_run.info.experiment_id,
            "MLFLOW_RUN_CONTEXT": json.dumps({"mlflow.parentRunId": parent_run.info.run_id}),
            # an unreachable server costs seconds, not MLflow's default minutes of retries
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        })
    return env


def _training_job_defaults(session) -> dict[str, Any]:
    """SageMaker.TrainingJob from the user's SDK config (the fields ModelTrainer only reads when we pass none)."""
    return dict(((getattr(session, "sagemaker_config", None) or {}).get("SageMaker") or {}).get("TrainingJob") or {})


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
        Networking,
        OutputDataConfig,
        SourceCode,
        StoppingCondition,
    )
    from sagemaker.core.shapes import Tag
    from sagemaker.train import ModelTrainer
    from sagemaker.train.distributed import Torchrun

    sm = config.sagemaker
    if distributed is None:
        distributed = uses_torchrun(config, region)
    image = training_image(config, region)
    # the user's SDK config (SageMaker.TrainingJob: VPC, KMS keys, tags, environment): SDK 3.27 looks VPC subnets
    # and tags up without the session (so never finds them) and skips the fields we fill in: apply it here
    defaults = _training_job_defaults(session)
    output_kms = (defaults.get("OutputDataConfig") or {}).get("KmsKeyId")
    volume_kms = (defaults.get("ResourceConfig") or {}).get("VolumeKmsKeyId")
    environment = {**(defaults.get("Environment") or {}), **(environment or {})}
    vpc = defaults.get("VpcConfig") or {}
    networking = None
    if vpc or defaults.get("EnableNetworkIsolation") is not None or \
            defaults.get("EnableInterContainerTrafficEncryption") is not None:
        networking = Networking(subnets=vpc.get("Subnets"), security_group_ids=vpc.get("SecurityGroupIds"),
                                enable_network_isolation=defaults.get("EnableNetworkIsolation"),
                                enable_inter_container_traffic_encryption=defaults.get(
                                    "EnableInterContainerTrafficEncryption"))
    tags = [Tag(key=t["Key"], value=t["Value"]) for t in defaults.get("Tags") or []] or None
    try:
        with role_validation(config):
            trainer = ModelTrainer(
                sagemaker_session=session,
                role=sm.role_arn,
                base_job_name=sm.job_prefix,
                training_image=image,
                training_input_mode=sm.input_mode,
                source_code=SourceCode(source_dir=str(source_dir), entry_script=ENTRY_SCRIPT,
                                       requirements=REQUIREMENTS),
                distributed=Torchrun() if distributed else None,
                compute=Compute(instance_type=sm.instance_type, instance_count=sm.instance_count,
                                enable_managed_spot_training=sm.use_spot, volume_kms_key_id=volume_kms),
                stopping_condition=StoppingCondition(max_runtime_in_seconds=sm.max_run,
                                                     max_wait_time_in_seconds=sm.max_wait if sm.use_spot else None),
                output_data_config=OutputDataConfig(s3_output_path=f"s3://{sm.bucket}/{sm.job_prefix}/output",
                                                    kms_key_id=output_kms),
                # s3_uri None: the SDK picks s3://<bucket>/<prefix>/<job name>/checkpoints, one folder per job
                checkpoint_config=(CheckpointConfig(local_path=CHECKPOINT_LOCAL_PATH)
                                   if checkpoints and sm.use_spot else None),
                hyperparameters=hyperparameters(config),
                environment=environment,
                networking=networking,
                tags=tags,
            )
    except Exception as exc:  # noqa: BLE001 - role validation, pydantic and botocore errors from the SDK
        if any("iam_role_resolver" in frame.filename for frame in traceback.extract_tb(exc.__traceback__)):
            raise BincounterError(
                f"the SageMaker SDK's check of role {sm.role_arn} failed ({type(exc).__name__}: {first_line(exc)}); "
                "it simulates the role's policies with iam:SimulatePrincipalPolicy from your credentials: grant "
                "that, or set sagemaker.validate_role=false (see docs/sagemaker.md for the role's policy)") from None
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
    region = check_config(config)
    channels = channel_uris(config)
    session = session or make_session(region, config.sagemaker.bucket)
    scratch = tempfile.TemporaryDirectory(prefix="bincounter-sm-")
    extra = ("sagemaker-mlflow",) if (remote_tracking_uri() or "").startswith("arn:aws:sagemaker") else ()
    source_dir = package_source(config, Path(scratch.name) / "source", extra)
    distributed = uses_torchrun(config, region)
    trainer = make_trainer(config, session, region, environment=job_environment(parent_run),
                           source_dir=source_dir, distributed=distributed)
    inputs = channel_inputs(channels)
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
    return service_client(plan.session, "sagemaker").describe_training_job(TrainingJobName=plan.job_name)


def launch_training(config: Config):
    """Run one training job on SageMaker and bring its results back into MLflow. -> TrainOutcome."""
    import mlflow

    check_config(config)
    channel_uris(config)
    with tracking.maybe_run(config) as run:
        mlflow.set_tags({"backend": "sagemaker", "sagemaker.instance_type": config.sagemaker.instance_type,
                         "sagemaker.instance_count": str(config.sagemaker.instance_count),
                         "sagemaker.spot": str(config.sagemaker.use_spot).lower(),
                         "sagemaker.debugger": str(config.sagemaker.debugger).lower()})
        plan = build_training_request(config, parent_run=run)
        client = service_client(plan.session, "sagemaker")
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
            description = wait_for_job(client, job_name, logs_client=service_client(plan.session, "logs"))
        except KeyboardInterrupt:
            stop_job(service_client(plan.session, "sagemaker", retries=1), job_name)
            mlflow.set_tag("sagemaker.status", "Stopping")
            raise
        return record_job(config, description, region=plan.region)


