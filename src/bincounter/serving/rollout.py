"""Changing a live endpoint, and counting a whole S3 prefix: `bincounter deploy update` and `... transform`.

`update` is a blue/green deployment: the new model and endpoint config are created beside the serving ones
and UpdateEndpoint is called with a DeploymentConfig (all at once, canary or linear traffic shifting, each
step watched for deploy.traffic_wait_seconds, and automatic rollback when one of deploy.rollback_alarms
goes to ALARM). MLflow's own `update_deployment` sends no DeploymentConfig, so this builds the request.

`transform` runs a SageMaker batch transform over deploy.transform_input (every photo of the prefix is one
request with Content-Type application/x-image, which the serving image scores as one row) and writes one
`<photo>.out` JSON answer per photo under deploy.transform_output, through MLflow's deploy_transform_job.
"""

from __future__ import annotations

import tarfile
import tempfile
import time
import uuid
from pathlib import Path

from bincounter import tracking
from bincounter.config import Config
from bincounter.errors import BincounterError, first_line
from bincounter.serving.predict import model_uri_for
from bincounter.serving.regions import deploy_region, model_bucket
from bincounter.serving.settings import (
    ROLE_ARN,
    async_inference_config,
    capacity,
    default_image_url,
    model_environment,
    serverless_config,
)

SHIFT_TYPES = {"all_at_once": "ALL_AT_ONCE", "canary": "CANARY", "linear": "LINEAR"}
POLL_SECONDS = 15.0


def deployment_policy(config: Config) -> dict:
    """UpdateEndpoint's DeploymentConfig: a blue/green update with the chosen traffic shifting and rollback."""
    deploy = config.deploy
    routing: dict = {"Type": SHIFT_TYPES[deploy.traffic_shift], "WaitIntervalInSeconds": deploy.traffic_wait_seconds}
    step = {"Type": "CAPACITY_PERCENT", "Value": deploy.traffic_step_percent}
    if deploy.traffic_shift == "canary":
        if deploy.traffic_step_percent > 50:
            raise BincounterError(f"deploy.traffic_step_percent={deploy.traffic_step_percent}: a canary is at most "
                                  "50% of the capacity")
        routing["CanarySize"] = step
    elif deploy.traffic_shift == "linear":
        if not 10 <= deploy.traffic_step_percent <= 50:
            raise BincounterError(f"deploy.traffic_step_percent={deploy.traffic_step_percent}: a linear step is "
                                  "10% to 50% of the capacity")
        routing["LinearStepSize"] = step
    policy: dict = {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing,
                                              "TerminationWaitInSeconds": deploy.termination_wait_seconds}}
    if deploy.rollback_alarms:
        policy["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in deploy.rollback_alarms]}
    return policy


def check_alarms(config: Config, region: str) -> None:
    """Every rollback alarm exists in the endpoint's region (a misspelt one would never roll back)."""
    import boto3

    names = list(config.deploy.rollback_alarms)
    if not names:
        return
    try:
        found = {a["AlarmName"] for a in boto3.client("cloudwatch", region_name=region).describe_alarms(
            AlarmNames=names)["MetricAlarms"]}
    except Exception as exc:  # noqa: BLE001
        raise BincounterError(f"cannot read the rollback alarms in {region}: {first_line(exc)}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise BincounterError(f"deploy.rollback_alarms: no CloudWatch alarm {', '.join(missing)} in {region}")


def _model_bucket(config: Config, region: str) -> str:
    """sagemaker.bucket in the endpoint's region, else MLflow's mlflow-sagemaker-<region>-<account> (created)."""
    import boto3

    bucket = model_bucket(config, region)
    if bucket:
        return bucket
    account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]
    bucket = f"mlflow-sagemaker-{region}-{account}"
    s3 = boto3.client("s3", region_name=region)
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - 404: create it, as MLflow does
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **extra)
    return bucket


def upload_model(config: Config, model: str | None, region: str, prefix: str) -> tuple[str, str]:
    """The MLflow model as model.tar.gz in S3 (what SageMaker mounts at /opt/ml/model). -> (model URI, s3 URL)"""
    import boto3

    from bincounter.serving.image import download_model

    uri = model_uri_for(config, model)
    with tempfile.TemporaryDirectory(prefix="bincounter-model-") as scratch:
        local = download_model(config, model, Path(scratch))
        archive = Path(scratch) / "model.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(local.iterdir()):
                tar.add(path, arcname=path.name)
        bucket = _model_bucket(config, region)
        key = f"{prefix}/model.tar.gz"
        boto3.client("s3", region_name=region).upload_file(str(archive), bucket, key)
    return uri, f"s3://{bucket}/{key}"


def update_endpoint(config: Config, name: str, model: str | None = None, *, poll_seconds: float | None = None):
    """Blue/green: new model + endpoint config beside the live ones, UpdateEndpoint with DeploymentConfig,
    then wait; on success the old config and model are deleted, on a rollback they stay and it says so."""
    import boto3

    deploy = config.deploy
    region = deploy_region(config)
    policy = None if deploy.serverless else deployment_policy(config)
    check_alarms(config, region)
    sagemaker = boto3.client("sagemaker", region_name=region)
    live = sagemaker.describe_endpoint(EndpointName=name)
    old_config = sagemaker.describe_endpoint_config(EndpointConfigName=live["EndpointConfigName"])
    image = deploy.image_url or default_image_url(config)
    suffix = uuid.uuid4().hex[:12]
    model_name = f"{name}-model-{suffix}"[:63]
    uri, data_url = upload_model(config, model, region, model_name)
    environment = {"MLFLOW_DEPLOYMENT_FLAVOR_NAME": "python_function", "SERVING_ENVIRONMENT": "SageMaker",
                   **model_environment(config)}
    sagemaker.create_model(ModelName=model_name, ExecutionRoleArn=deploy.execution_role_arn,
                           PrimaryContainer={"Image": image, "ModelDataUrl": data_url, "Environment": environment})
    variant = {"VariantName": old_config["ProductionVariants"][0]["VariantName"], "ModelName": model_name,
               "InitialVariantWeight": 1.0}
    if deploy.serverless:
        variant["ServerlessConfig"] = serverless_config(config)
    else:
        variant.update({"InstanceType": deploy.instance_type, "InitialInstanceCount": deploy.instance_count})
    config_name = f"{name}-config-{suffix}"[:63]
    request = {"EndpointConfigName": config_name, "ProductionVariants": [variant]}
    asynchronous = async_inference_config(config)
    if asynchronous:
        request["AsyncInferenceConfig"] = asynchronous
    sagemaker.create_endpoint_config(**request)
    update = {"EndpointName": name, "EndpointConfigName": config_name}
    if policy:
        update["DeploymentConfig"] = policy
    sagemaker.update_endpoint(**update)
    print(f"updating endpoint {name} in {region} to {uri} ({capacity(config)}, image {image}; blue/green, "
          f"{_shift_words(config, policy)})", flush=True)
    status = _wait_for_update(sagemaker, name, config_name, POLL_SECONDS if poll_seconds is None else poll_seconds)
    if status != "updated":
        raise BincounterError(f"deploy update {name}: {status}; the endpoint keeps serving "
                              f"{live['EndpointConfigName']} (the new config {config_name} is kept for inspection)")
    for variant in old_config["ProductionVariants"]:
        sagemaker.delete_model(ModelName=variant["ModelName"])
    sagemaker.delete_endpoint_config(EndpointConfigName=live["EndpointConfigName"])
    print(f"updated endpoint {name}: now {config_name}; deleted {live['EndpointConfigName']} and its model")
    return sagemaker.describe_endpoint(EndpointName=name)


def _shift_words(config: Config, policy: dict | None) -> str:
    deploy = config.deploy
    if policy is None:
        return "serverless: all at once"
    words = "all at once" if deploy.traffic_shift == "all_at_once" else \
        f"{deploy.traffic_shift} {deploy.traffic_step_percent}%"
    return words + (f", rollback on {', '.join(deploy.rollback_alarms)}" if deploy.rollback_alarms else "")


def _wait_for_update(sagemaker, name: str, config_name: str, poll_seconds: float) -> str:
    while True:
        time.sleep(poll_seconds)
        info = sagemaker.describe_endpoint(EndpointName=name)
        status = info["EndpointStatus"]
        if status == "InService":
            if info["EndpointConfigName"] == config_name:
                return "updated"
            return f"rolled back ({info.get('FailureReason') or 'an alarm fired or the new fleet failed'})"
        if status == "Failed":
            return f"failed ({info.get('FailureReason', 'see the SageMaker console')})"
        print(f"endpoint {name}: {status}", flush=True)


def run_transform(config: Config, name: str, model: str | None = None):
    """A batch transform over deploy.transform_input: one `<photo>.out` answer per photo under transform_output."""
    from mlflow.sagemaker import deploy_transform_job

    deploy = config.deploy
    for key in ("transform_input", "transform_output"):
        if not getattr(deploy, key).startswith("s3://"):
            raise BincounterError(f"deploy.{key} must be an s3:// prefix, got {getattr(deploy, key)!r}")
    if not ROLE_ARN.match(deploy.execution_role_arn or ""):
        raise BincounterError("deploy.execution_role_arn must be an IAM role ARN for a batch transform")
    region = deploy_region(config)
    uri = model_uri_for(config, model)
    tracking.setup(config)
    image = deploy.image_url or default_image_url(config)
    job = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"[:63]
    print(f"transform {job}: counting {deploy.transform_input} -> {deploy.transform_output} "
          f"({deploy.transform_instance_count} x {deploy.transform_instance_type}, image {image})", flush=True)
    deploy_transform_job(
        job_name=job, model_uri=uri, s3_input_data_type="S3Prefix", s3_input_uri=deploy.transform_input,
        content_type="application/x-image", s3_output_path=deploy.transform_output, split_type="None",
        accept="application/json", assemble_with="None", execution_role_arn=deploy.execution_role_arn,
        bucket=model_bucket(config, region), image_url=image, region_name=region,
        instance_type=deploy.transform_instance_type, instance_count=deploy.transform_instance_count,
        flavor="python_function", synchronous=True, timeout_seconds=86400)
    print(f"transform {job}: done; one <photo>.out per photo under {deploy.transform_output}")
    return job
