"""`bincounter deploy`: the SageMaker endpoint, through MLflow's own deployment client.

This is `mlflow deployments create|update|get|delete|list -t sagemaker:/<region>` with the `-C` options
filled in from params.yaml's `deploy:` section, checked before anything is created. The endpoint runs
MLflow's scoring server (the `mlflow-pyfunc` image), so it speaks the same JSON as `mlflow models serve`.
"""

from __future__ import annotations

import json
import os
import re
import sys

from bincounter import tracking
from bincounter.config import Config
from bincounter.errors import BincounterError, first_line
from bincounter.serving.predict import model_uri_for

ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+")
IMAGE_REPOSITORY = "mlflow-pyfunc"  # what `mlflow sagemaker build-and-push-container` pushes
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)


def target(config: Config) -> str:
    return f"sagemaker:/{config.deploy.region}"


def deployment_config(config: Config) -> dict:
    """The `-C key=value` options of `mlflow deployments create`, named as MLflow's sagemaker plugin names them."""
    deploy = config.deploy
    options = {
        "execution_role_arn": deploy.execution_role_arn,
        "image_url": deploy.image_url or default_image_url(config),
        "instance_type": deploy.instance_type,
        "instance_count": deploy.instance_count,
        "synchronous": True,
        "timeout_seconds": 1800,
    }
    if deploy.serverless:
        options["serverless_config"] = {"MemorySizeInMB": deploy.serverless_memory_mb,
                                        "MaxConcurrency": deploy.serverless_max_concurrency}
    if config.sagemaker.bucket:
        options["bucket"] = config.sagemaker.bucket  # model.tar.gz goes here (else mlflow's default bucket)
    return options


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
        if not 1 <= deploy.serverless_max_concurrency <= 200:
            raise BincounterError("deploy.serverless_max_concurrency must be between 1 and 200")
    elif deploy.instance_count < 1:
        raise BincounterError(f"deploy.instance_count must be at least 1, got {deploy.instance_count}")


def default_image_url(config: Config) -> str:
    """What MLflow itself falls back to: $MLFLOW_SAGEMAKER_DEPLOY_IMG_URL, else ECR mlflow-pyfunc:<mlflow version>."""
    import boto3
    import mlflow

    if os.environ.get("MLFLOW_SAGEMAKER_DEPLOY_IMG_URL"):
        return os.environ["MLFLOW_SAGEMAKER_DEPLOY_IMG_URL"]
    hint = ("set deploy.image_url, or push the serving image once with `mlflow sagemaker build-and-push-container` "
            "(needs Docker; see docs/serving.md)")
    try:
        ecr = boto3.client("ecr", region_name=config.deploy.region)
        repository = ecr.describe_repositories(repositoryNames=[IMAGE_REPOSITORY])["repositories"][0]
        ecr.describe_images(repositoryName=IMAGE_REPOSITORY, imageIds=[{"imageTag": mlflow.__version__}])
    except Exception as exc:  # noqa: BLE001 - RepositoryNotFound, ImageNotFound, no credentials...
        raise BincounterError(f"deploy.image_url is empty and ECR {IMAGE_REPOSITORY}:{mlflow.__version__} "
                              f"is not usable ({first_line(exc)}): {hint}") from None
    return f"{repository['repositoryUri']}:{mlflow.__version__}"


def _warn_version_mismatch(image_url: str) -> None:
    import mlflow

    tag = image_url.rsplit(":", 1)[-1] if ":" in image_url.rsplit("/", 1)[-1] else ""
    if re.fullmatch(r"\d+\.\d+\.\d+", tag) and tag != mlflow.__version__:
        print(f"warning: image {image_url} is MLflow {tag} but this client is {mlflow.__version__}; "
              "keep them identical", file=sys.stderr)


def _client(config: Config):
    from mlflow.deployments import get_deploy_client

    return get_deploy_client(target(config))


def deploy_command(config: Config, action: str, model: str | None = None, name: str | None = None):
    """create | update | get | delete | list; returns what MLflow's client returned."""
    name = name or config.deploy.endpoint_name
    try:
        if action in ("create", "update"):
            validate(config)
            options = deployment_config(config)
            _warn_version_mismatch(options["image_url"])
            tracking.setup(config)
            uri = model_uri_for(config, model)
            deploy = _client(config).create_deployment if action == "create" else _client(config).update_deployment
            result = deploy(name, uri, flavor="python_function", config=options)
            print(f"{action}d endpoint {name} in {config.deploy.region} from {uri} "
                  f"({_capacity(config)}, image {options['image_url']})")
            return result
        if action == "get":
            result = {k: v for k, v in _client(config).get_deployment(name).items() if k != "ResponseMetadata"}
            print(json.dumps(result, indent=2, default=str))
            return result
        if action == "delete":
            _client(config).delete_deployment(name)
            print(f"deleted endpoint {name} (and its SageMaker model and endpoint config)")
            return None
        if action == "list":
            endpoints = _client(config).list_deployments()
            for endpoint in endpoints:
                print(f"{endpoint['EndpointName']}\t{endpoint.get('EndpointStatus', '')}")
            return endpoints
    except BincounterError:
        raise
    except Exception as exc:  # noqa: BLE001 - MlflowException, botocore errors: one line for the user
        hint = " (it exists: use `bincounter deploy update`)" if "already exists" in str(exc) else ""
        raise BincounterError(f"deploy {action} {name}: {first_line(exc)}{hint}") from None
    raise BincounterError(f"unknown deploy action {action!r} (create, update, get, delete, list)")


def _capacity(config: Config) -> str:
    deploy = config.deploy
    if deploy.serverless:
        return f"serverless {deploy.serverless_memory_mb} MB x{deploy.serverless_max_concurrency}"
    return f"{deploy.instance_count} x {deploy.instance_type}"
