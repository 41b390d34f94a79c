"""The endpoint's settings from params.yaml's deploy: section, checked, as SageMaker and MLflow name them.
Shared by `bincounter deploy create` (bincounter.serving.deploy) and `update`/`transform`
(bincounter.serving.rollout)."""

from __future__ import annotations

import os
import re

from bincounter.config import Config
from bincounter.errors import BincounterError, first_line
from bincounter.serving.regions import deploy_region

ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+")
SNS_ARN = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:.+")
IMAGE_REPOSITORY = "mlflow-pyfunc"  # what `mlflow sagemaker build-and-push-container` pushes
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)


def model_environment(config: Config) -> dict[str, str]:
    """The container's environment: nothing installed at start, workers and threads from deploy:."""
    env = {"MLFLOW_DISABLE_ENV_CREATION": "true", "MLFLOW_MODELS_WORKERS": str(config.deploy.workers)}
    if config.deploy.threads:
        env["BINCOUNTER_THREADS"] = str(config.deploy.threads)
    return env


def serverless_config(config: Config) -> dict:
    """ServerlessConfig of a serverless endpoint variant."""
    return {"MemorySizeInMB": config.deploy.serverless_memory_mb,
            "MaxConcurrency": config.deploy.serverless_max_concurrency}


def async_inference_config(config: Config) -> dict | None:
    """AsyncInferenceConfig of an asynchronous endpoint (deploy.async_output_path set), else None."""
    deploy = config.deploy
    if not deploy.async_output_path:
        return None
    output = deploy.async_output_path.rstrip("/")
    out: dict = {"S3OutputPath": f"{output}/answers", "S3FailurePath": f"{output}/failures"}
    topics = {k: v for k, v in (("SuccessTopic", deploy.async_success_topic),
                                ("ErrorTopic", deploy.async_error_topic)) if v}
    if topics:
        out["NotificationConfig"] = topics
    return {"OutputConfig": out, "ClientConfig": {"MaxConcurrentInvocationsPerInstance": deploy.async_max_concurrency}}


def validate(config: Config) -> None:
    """Everything that can be checked locally, before MLflow uploads or creates anything."""
    deploy = config.deploy
    if not deploy.execution_role_arn:
        raise BincounterError("deploy.execution_role_arn is empty: set it in params.yaml or pass "
                              "--set deploy.execution_role_arn=arn:aws:iam::<account>:role/<name> "
                              "(a role SageMaker can assume, with read access to the model bucket)")
    if not ROLE_ARN.match(deploy.execution_role_arn):
        raise BincounterError(f"deploy.execution_role_arn {deploy.execution_role_arn!r} is not an IAM role ARN "
                              "(arn:aws:iam::<account>:role/<name>)")
    if deploy.serverless:
        if deploy.serverless_memory_mb not in SERVERLESS_MEMORY_MB:
            raise BincounterError(f"deploy.serverless_memory_mb must be one of {SERVERLESS_MEMORY_MB}, "
                                  f"got {deploy.serverless_memory_mb}")
        if deploy.async_output_path:
            raise BincounterError("deploy.serverless and deploy.async_output_path exclude each other: an "
                                  "asynchronous endpoint runs on instances")
    if deploy.async_output_path and not deploy.async_output_path.startswith("s3://"):
        raise BincounterError(f"deploy.async_output_path must be an s3:// prefix, got {deploy.async_output_path!r}")
    for key in ("async_success_topic", "async_error_topic"):
        value = getattr(deploy, key)
        if value and not SNS_ARN.match(value):
            raise BincounterError(f"deploy.{key} {value!r} is not an SNS topic ARN (arn:aws:sns:<region>:<account>:<name>)")


def default_image_url(config: Config) -> str:
    """What MLflow itself falls back to: $MLFLOW_SAGEMAKER_DEPLOY_IMG_URL, else ECR mlflow-pyfunc:<mlflow version>."""
    import boto3
    import mlflow

    if os.environ.get("MLFLOW_SAGEMAKER_DEPLOY_IMG_URL"):
        return os.environ["MLFLOW_SAGEMAKER_DEPLOY_IMG_URL"]
    hint = ("set deploy.image_url to the image `bincounter deploy build-image --push` printed (see docs/serving.md)")
    try:
        ecr = boto3.client("ecr", region_name=deploy_region(config))
        repository = ecr.describe_repositories(repositoryNames=[IMAGE_REPOSITORY])["repositories"][0]
        ecr.describe_images(repositoryName=IMAGE_REPOSITORY, imageIds=[{"imageTag": mlflow.__version__}])
    except Exception as exc:  # noqa: BLE001 - RepositoryNotFound, ImageNotFound, no credentials...
        raise BincounterError(f"deploy.image_url is empty and ECR {IMAGE_REPOSITORY}:{mlflow.__version__} "
                              f"is not usable ({first_line(exc)}): {hint}") from None
    return f"{repository['repositoryUri']}:{mlflow.__version__}"


def capacity(config: Config) -> str:
    deploy = config.deploy
    if deploy.serverless:
        return f"serverless {deploy.serverless_memory_mb} MB x{deploy.serverless_max_concurrency}"
    kind = f"async to {deploy.async_output_path}, " if deploy.async_output_path else ""
    return f"{kind}{deploy.instance_count} x {deploy.instance_type}"
