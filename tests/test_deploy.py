"""SageMaker deployment through MLflow's deployment client, against the moto emulator (IAM, S3, ECR, SageMaker)."""

from __future__ import annotations

import io
import json
import tarfile

import boto3
import pytest
from conftest import empty_params, FIXTURES
from test_predict import json_lines, queue_endpoint_results

from bincounter.cli import main
from bincounter.config import with_overrides
from bincounter.serving.deploy import deploy_command
from bincounter.errors import BincounterError

pytestmark = pytest.mark.slow
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mlflow-pyfunc:{version}"


@pytest.fixture
def role(aws) -> str:
    iam = boto3.client("iam", region_name="us-east-1")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                    "Principal": {"Service": "sagemaker.amazonaws.com"}}]}
    return iam.create_role(RoleName="bincounter-sagemaker", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


@pytest.fixture
def image_url() -> str:
    import mlflow

    return IMAGE.format(version=mlflow.__version__)


def config_for(trained, **overrides):
    return with_overrides(trained["config"], {"deploy.region": "us-east-1", **overrides})


def sagemaker():
    return boto3.client("sagemaker", region_name="us-east-1")


def deployed_model(endpoint: str) -> tuple[dict, dict]:
    """(describe_model, describe_endpoint_config) behind an endpoint."""
    client = sagemaker()
    config = client.describe_endpoint_config(
        EndpointConfigName=client.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"])
    model = client.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    return model, config


def nothing_created() -> bool:
    client = sagemaker()
    return (not client.list_models()["Models"] and not client.list_endpoints()["Endpoints"]
            and not boto3.client("s3", region_name="us-east-1").list_buckets()["Buckets"])


@pytest.mark.parametrize("overrides, message", [
    ({}, "deploy.execution_role_arn is empty"),
    ({"deploy.execution_role_arn": "my-role"}, "is not an IAM role ARN"),
    ({"deploy.execution_role_arn": "ROLE"}, "deploy.image_url is empty and ECR mlflow-pyfunc"),
    ({"deploy.execution_role_arn": "ROLE", "deploy.image_url": "IMAGE", "deploy.serverless": "true",
      "deploy.serverless_memory_mb": 1000}, "serverless_memory_mb must be one of"),
])
def test_missing_settings_fail_before_anything_is_created(trained, role, image_url, overrides, message):
    overrides = {k: {"ROLE": role, "IMAGE": image_url}.get(v, v) for k, v in overrides.items()}
    with pytest.raises(BincounterError, match=message):
        deploy_command(config_for(trained, **overrides), "create")
    assert nothing_created()


def test_create_list_get_predict_delete(aws, trained, role, image_url, tmp_path, capsys):
    config = config_for(trained, **{"deploy.execution_role_arn": role, "deploy.image_url": image_url,
                                    "deploy.instance_type": "ml.c5.xlarge", "deploy.instance_count": 2,
                                    "deploy.endpoint_name": "bins-test"})
    deploy_command(config, "create")
    assert "created endpoint bins-test in us-east-1 from models:/bin-counter@champion" in capsys.readouterr().out

    model, endpoint_config = deployed_model("bins-test")
    assert model["ExecutionRoleArn"] == role
    container = model["PrimaryContainer"]
    assert container["Image"] == image_url
    assert container["Environment"]["MLFLOW_DEPLOYMENT_FLAVOR_NAME"] == "python_function"
    variant = endpoint_config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.xlarge", 2)
    assert "ServerlessConfig" not in variant
    # the model data URL is the logged MLflow model, tarred into S3
    bucket, key = container["ModelDataUrl"].removeprefix("s3://").split("/", 1)
    body = boto3.client("s3", region_name="us-east-1").get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert {"MLmodel", "python_model.pkl", "requirements.txt"} <= set(tar.getnames())
        assert "python_function" in tar.extractfile("MLmodel").read().decode()

    endpoints = deploy_command(config, "list")
    assert [e["EndpointName"] for e in endpoints] == ["bins-test"]
    assert deploy_command(config, "get")["EndpointStatus"] == "InService"
    capsys.readouterr()

    with pytest.raises(BincounterError, match="already exists.*bincounter deploy update"):
        deploy_command(config, "create")

    # predict through the endpoint: the emulator returns the answer we queue in MLflow's scoring format
    answer = {"count": 3, "confidence": 0.61, "probabilities": [0.01, 0.05, 0.2, 0.61, 0.1, 0.03]}
    queue_endpoint_results(aws.url, [json.dumps({"predictions": [answer]})])
    image = str(FIXTURES / "bin-images" / "00024.jpg")
    assert main(["predict", "--params", empty_params(tmp_path), "--endpoint", "bins-test", image]) == 0
    assert json_lines(capsys.readouterr().out) == [{"image": image, **answer}]

    deploy_command(config, "delete")
    assert deploy_command(config, "list") == []
    assert not sagemaker().list_models()["Models"]
    with pytest.raises(BincounterError, match="deploy get bins-test: .*Could not find endpoint"):
        deploy_command(config, "get")


def push_serving_image(version: str) -> str:
    """What `mlflow sagemaker build-and-push-container` leaves in ECR: mlflow-pyfunc:<mlflow version>."""
    ecr = boto3.client("ecr", region_name="us-east-1")
    uri = ecr.create_repository(repositoryName="mlflow-pyfunc")["repository"]["repositoryUri"]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1,
                           "digest": "sha256:" + "0" * 64}, "layers": []}
    ecr.put_image(repositoryName="mlflow-pyfunc", imageManifest=json.dumps(manifest), imageTag=version)
    return f"{uri}:{version}"


def test_serverless_endpoint_through_the_cli_with_the_ecr_image(trained, role, tmp_path, capsys):
    import mlflow

    image = push_serving_image(mlflow.__version__)  # no deploy.image_url: found in ECR like MLflow does
    args = ["deploy", "create", "--params", empty_params(tmp_path), "--name", "bins-serverless",
            "--set", f"mlflow.tracking_uri={trained['tracking_uri']}", "--set", f"deploy.execution_role_arn={role}",
            "--set", "deploy.serverless=true",
            "--set", "deploy.serverless_memory_mb=2048", "--set", "deploy.serverless_max_concurrency=3"]
    assert main(args) == 0
    assert "serverless 2048 MB x3" in capsys.readouterr().out
    model, endpoint_config = deployed_model("bins-serverless")
    assert model["PrimaryContainer"]["Image"] == image
    variant = endpoint_config["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 3}
    assert "InstanceType" not in variant


def test_plain_mlflow_deployments_commands_work_on_their_own(aws, trained, role, image_url, monkeypatch):
    """`mlflow deployments create/predict/delete -t sagemaker:/us-east-1 -C ...` with nothing of ours in between."""
    import pandas as pd
    from click.testing import CliRunner
    from mlflow.cli import cli
    from mlflow.deployments import get_deploy_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["tracking_uri"])
    runner = CliRunner()
    result = runner.invoke(cli, [
        "deployments", "create", "-t", "sagemaker:/us-east-1", "--name", "plain", "-m", "models:/bin-counter@champion",
        "-C", f"execution_role_arn={role}", "-C", f"image_url={image_url}", "-C", "instance_type=ml.m5.xlarge",
        "-C", "instance_count=1"])
    assert result.exit_code == 0, result.output
    model, endpoint_config = deployed_model("plain")
    assert model["ExecutionRoleArn"] == role and model["PrimaryContainer"]["Image"] == image_url
    assert endpoint_config["ProductionVariants"][0]["InstanceType"] == "ml.m5.xlarge"

    answer = {"count": 1, "confidence": 0.9, "probabilities": [0.02, 0.9, 0.05, 0.01, 0.01, 0.01]}
    queue_endpoint_results(aws.url, [json.dumps({"predictions": [answer]})])
    client = get_deploy_client("sagemaker:/us-east-1")
    frame = pd.DataFrame({"image": ["aGVsbG8="]})
    assert client.predict("plain", frame).get_predictions(predictions_format="dataframe").to_dict("records") == [
        answer]

    result = runner.invoke(cli, ["deployments", "delete", "-t", "sagemaker:/us-east-1", "--name", "plain"])
    assert result.exit_code == 0, result.output
    assert not sagemaker().list_endpoints()["Endpoints"]


def test_update_creates_the_new_model_then_the_emulator_stops(trained, role, image_url, monkeypatch):
    """moto has no UpdateEndpoint (HTTP 500): MLflow has made the replacement model and config by then,
    and the failure reaches the user as one line."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    base = {"deploy.execution_role_arn": role, "deploy.image_url": image_url, "deploy.endpoint_name": "bins-upd"}
    deploy_command(config_for(trained, **base), "create")
    config = config_for(trained, **base, **{"deploy.instance_type": "ml.c5.2xlarge"})
    with pytest.raises(BincounterError, match="deploy update bins-upd: .*UpdateEndpoint") as failure:
        deploy_command(config, "update")
    assert "\n" not in str(failure.value) and "<" not in str(failure.value)
    types = {sagemaker().describe_endpoint_config(EndpointConfigName=c["EndpointConfigName"])
             ["ProductionVariants"][0]["InstanceType"] for c in sagemaker().list_endpoint_configs()["EndpointConfigs"]}
    assert types == {"ml.m5.large", "ml.c5.2xlarge"}
