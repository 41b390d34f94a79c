"""`bincounter deploy`: the serving image and the SageMaker endpoint, through MLflow's own deployment client.

`create|get|delete|list` are `mlflow deployments ... -t sagemaker:/<region>` with the `-C` options filled in
from params.yaml's `deploy:` section, checked before anything is created: real-time, serverless or
asynchronous (deploy.async_output_path). `update` is a blue/green update with traffic shifting and alarm
rollback (bincounter.serving.rollout), `transform` a batch transform over an S3 prefix of photos, and
`build-image` the model-specific serving image (bincounter.serving.image) the endpoint should run.
"""

from __future__ import annotations

import json
import re
import sys

from bincounter import tracking
from bincounter.config import Config
from bincounter.errors import BincounterError, first_line
from bincounter.serving.predict import model_uri_for
from bincounter.serving.regions import deploy_region, model_bucket
from bincounter.serving.settings import (
    async_inference_config,
    capacity,
    default_image_url,
    model_environment,
    serverless_config,
    validate,
)

ACTIONS = ("build-image", "create", "update", "get", "delete", "list", "transform")


def target(config: Config) -> str:
    return f"sagemaker:/{deploy_region(config)}"


def mode(config: Config) -> str:
    return "serverless" if config.deploy.serverless else ("async" if config.deploy.async_output_path else "real-time")


def deployment_config(config: Config) -> dict:
    """The `-C key=value` options of `mlflow deployments create`, named as MLflow's sagemaker plugin names them."""
    deploy = config.deploy
    region = deploy_region(config)
    options = {
        "execution_role_arn": deploy.execution_role_arn,
        "image_url": deploy.image_url or default_image_url(config),
        "instance_type": deploy.instance_type,
        "instance_count": deploy.instance_count,
        "region_name": region,
        "env": model_environment(config),
        "synchronous": True,
        "timeout_seconds": 1800,
    }
    if deploy.serverless:
        options["serverless_config"] = serverless_config(config)
    asynchronous = async_inference_config(config)
    if asynchronous:
        options["async_inference_config"] = asynchronous
    bucket = model_bucket(config, region)
    if bucket:
        options["bucket"] = bucket  # model.tar.gz goes here (else MLflow's default bucket in the region)
    return options


def _warn_version_mismatch(image_url: str) -> None:
    import mlflow

    tag = image_url.rsplit(":", 1)[-1] if ":" in image_url.rsplit("/", 1)[-1] else ""
    if re.fullmatch(r"\d+\.\d+\.\d+", tag) and tag != mlflow.__version__:
        print(f"warning: image {image_url} is MLflow {tag} but this client is {mlflow.__version__}; "
              "keep them identical", file=sys.stderr)


def _client(config: Config):
    from mlflow.deployments import get_deploy_client

    return get_deploy_client(target(config))


def deploy_command(config: Config, action: str, model: str | None = None, name: str | None = None, *,
                   tag: str | None = None, base: str | None = None, wheels: str | None = None,
                   push: bool = False):
    """build-image | create | update | get | delete | list | transform; returns what the step returned."""
    if action not in ACTIONS:
        raise BincounterError(f"unknown deploy action {action!r} ({', '.join(ACTIONS)})")
    if action == "build-image":
        from bincounter.serving.image import build_image

        if not tag:
            raise BincounterError("deploy build-image needs --tag NAME[:VERSION], e.g. --tag bin-counter-serving:3")
        return build_image(config, model, tag, base=base, wheels=wheels, push=push)
    name = name or config.deploy.endpoint_name
    try:
        if action == "create":
            validate(config)
            options = deployment_config(config)
            _warn_version_mismatch(options["image_url"])
            tracking.setup(config)
            uri = model_uri_for(config, model)
            result = _client(config).create_deployment(name, uri, flavor="python_function", config=options)
            print(f"created endpoint {name} in {options['region_name']} from {uri} "
                  f"({capacity(config)}, image {options['image_url']})")
            return result
        if action == "update":
            from bincounter.serving.rollout import update_endpoint

            validate(config)
            return update_endpoint(config, name, model)
        if action == "transform":
            from bincounter.serving.rollout import run_transform

            return run_transform(config, name, model)
        if action == "get":
            result = {k: v for k, v in _client(config).get_deployment(name).items() if k != "ResponseMetadata"}
            print(json.dumps(result, indent=2, default=str))
            return result
        if action == "delete":
            _client(config).delete_deployment(name)
            print(f"deleted endpoint {name} (and its SageMaker model and endpoint config)")
            return None
        endpoints = _client(config).list_deployments()
        for endpoint in endpoints:
            print(f"{endpoint['EndpointName']}\t{endpoint.get('EndpointStatus', '')}")
        return endpoints
    except BincounterError:
        raise
    except Exception as exc:  # noqa: BLE001 - MlflowException, botocore errors: one line for the user
        hint = " (it exists: use `bincounter deploy update`)" if "already exists" in str(exc) else ""
        raise BincounterError(f"deploy {action} {name}: {first_line(exc)}{hint}") from None
