"""SageMaker deployment through MLflow's deployment client, against the moto emulator (IAM, S3, ECR, SageMaker)."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import urllib.request
from pathlib import Path

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


# ------------------------------------------------------------------ regions, environment, modes (issue 12)


def model_data_bucket(endpoint: str) -> str:
    model, _ = deployed_model(endpoint)
    return model["PrimaryContainer"]["ModelDataUrl"].removeprefix("s3://").split("/", 1)[0]


def test_endpoint_region_follows_training_and_the_bucket_only_where_it_lives(trained, role, image_url, capsys):
    from bincounter.serving.regions import deploy_region
    from bincounter.serving.deploy import target

    assert deploy_region(with_overrides(trained["config"], {"sagemaker.region": "eu-west-2"})) == "eu-west-2"
    assert target(with_overrides(trained["config"], {"sagemaker.region": "eu-west-2"})) == "sagemaker:/eu-west-2"
    assert deploy_region(trained["config"]) == "us-east-1"  # neither set: AWS_REGION
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="models-eu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.create_bucket(Bucket="models-us")
    base = {"deploy.region": "", "sagemaker.region": "us-east-1", "deploy.execution_role_arn": role,
            "deploy.image_url": image_url}
    deploy_command(with_overrides(trained["config"], {**base, "sagemaker.bucket": "models-eu"}), "create",
                   name="bins-eu-bucket")
    assert "sagemaker.bucket models-eu is in eu-west-1, not in us-east-1" in capsys.readouterr().out
    assert model_data_bucket("bins-eu-bucket") == "mlflow-sagemaker-us-east-1-123456789012"
    deploy_command(with_overrides(trained["config"], {**base, "sagemaker.bucket": "models-us"}), "create",
                   name="bins-us-bucket")
    assert model_data_bucket("bins-us-bucket") == "models-us"
    model, _ = deployed_model("bins-us-bucket")
    environment = model["PrimaryContainer"]["Environment"]
    assert environment["MLFLOW_DISABLE_ENV_CREATION"] == "true" and environment["MLFLOW_MODELS_WORKERS"] == "1"


def test_asynchronous_endpoint_and_predict_through_it(aws, trained, role, image_url, tmp_path, capsys):
    config = config_for(trained, **{"deploy.execution_role_arn": role, "deploy.image_url": image_url,
                                    "deploy.async_output_path": "s3://bins-async/counts",
                                    "deploy.async_success_topic": "arn:aws:sns:us-east-1:123456789012:counted",
                                    "deploy.async_max_concurrency": 2, "deploy.workers": 2, "deploy.threads": 3,
                                    "deploy.endpoint_name": "bins-async"})
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bins-async")
    deploy_command(config, "create")
    assert "async to s3://bins-async/counts" in capsys.readouterr().out
    model, endpoint_config = deployed_model("bins-async")
    assert endpoint_config["AsyncInferenceConfig"] == {
        "OutputConfig": {"S3OutputPath": "s3://bins-async/counts/answers",
                         "S3FailurePath": "s3://bins-async/counts/failures",
                         "NotificationConfig": {"SuccessTopic": "arn:aws:sns:us-east-1:123456789012:counted"}},
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 2}}
    environment = model["PrimaryContainer"]["Environment"]
    assert (environment["MLFLOW_MODELS_WORKERS"], environment["BINCOUNTER_THREADS"]) == ("2", "3")

    answer = {"count": 4, "confidence": 0.5, "probabilities": [0.1, 0.1, 0.1, 0.1, 0.5, 0.1]}
    payload = {"results": [{"data": json.dumps({"predictions": [answer]})}]}
    request = urllib.request.Request(f"{aws.url}/moto-api/static/sagemaker/async-endpoint-results",
                                     data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10)
    image = str(FIXTURES / "bin-images" / "00024.jpg")
    assert main(["predict", "--params", empty_params(tmp_path), "--endpoint", "bins-async", image]) == 0
    assert json_lines(capsys.readouterr().out) == [{"image": image, **answer}]
    left = boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket="bins-async").get("Contents", [])
    assert not left  # the request object is deleted once answered


def test_serverless_requests_stay_under_4_mb(aws, trained, role, image_url, tmp_path, capsys):
    from bincounter.serving import predict

    config = config_for(trained, **{"deploy.execution_role_arn": role, "deploy.image_url": image_url,
                                    "deploy.serverless": "true", "deploy.endpoint_name": "bins-sls"})
    deploy_command(config, "create")
    photos = sorted((FIXTURES / "bin-images").glob("*.jpg"))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(120):  # several MB of base64 in one --batch-size
        (folder / f"{i:03d}.jpg").write_bytes(photos[i % len(photos)].read_bytes())
    refs = predict.find_images([str(folder)])
    encoded = [base64.b64encode(Path(r.name).read_bytes()).decode() for r in refs]
    chunks = [len(r) for r, _ in predict._split_by_size(refs, encoded, predict.ENDPOINT_MAX_BYTES)]
    answer = {"count": 2, "confidence": 0.5, "probabilities": [0.1, 0.1, 0.5, 0.1, 0.1, 0.1]}
    queue_endpoint_results(aws.url, [json.dumps({"predictions": [answer] * n}) for n in chunks])
    sizes = []

    def record(params, **_):
        sizes.append(len(params["Body"]))

    events = boto3._get_default_session().events
    events.register("provide-client-params.sagemaker-runtime.InvokeEndpoint", record)
    try:
        code = main(["predict", "--params", empty_params(tmp_path), "--endpoint", "bins-sls", "--batch-size", "200",
                     str(folder)])
        assert code == 0, (chunks, sizes)
    finally:
        events.unregister("provide-client-params.sagemaker-runtime.InvokeEndpoint", record)
    assert len(json_lines(capsys.readouterr().out)) == 120
    assert len(sizes) == len(chunks) >= 2 and max(sizes) < 4_000_000, sizes


def test_blue_green_update_sends_canary_shifting_and_alarm_rollback(trained, role, image_url, monkeypatch):
    """moto has no UpdateEndpoint (HTTP 500): the new model and config exist, and the request that reached
    the emulator carries the DeploymentConfig."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    base = {"deploy.execution_role_arn": role, "deploy.image_url": image_url, "deploy.endpoint_name": "bins-bg"}
    deploy_command(config_for(trained, **base), "create")
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
    update = {**base, "deploy.traffic_shift": "canary", "deploy.traffic_step_percent": 20,
              "deploy.traffic_wait_seconds": 600, "deploy.rollback_alarms": "bins-5xx,bins-latency",
              "deploy.instance_count": 2}
    with pytest.raises(BincounterError, match="no CloudWatch alarm bins-5xx, bins-latency in us-east-1"):
        deploy_command(config_for(trained, **update), "update")
    for name in ("bins-5xx", "bins-latency"):
        if name == "bins-latency":
            with pytest.raises(BincounterError, match="rollback_alarms: no CloudWatch alarm bins-latency in"):
                deploy_command(config_for(trained, **update), "update")
        cloudwatch.put_metric_alarm(AlarmName=name, MetricName="Invocation5XXErrors", Namespace="AWS/SageMaker",
                                    Statistic="Sum", Period=60, EvaluationPeriods=1, Threshold=1,
                                    ComparisonOperator="GreaterThanOrEqualToThreshold")
    assert len(sagemaker().list_endpoint_configs()["EndpointConfigs"]) == 1  # nothing made before the check
    sent = []

    def record(params, **_):
        sent.append(params)

    events = boto3._get_default_session().events
    events.register("provide-client-params.sagemaker.UpdateEndpoint", record)
    try:
        with pytest.raises(BincounterError, match="deploy update bins-bg: .*UpdateEndpoint"):
            deploy_command(config_for(trained, **update), "update")
    finally:
        events.unregister("provide-client-params.sagemaker.UpdateEndpoint", record)
    (request,) = sent
    assert request["DeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {
            "Type": "CANARY", "WaitIntervalInSeconds": 600, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20}},
            "TerminationWaitInSeconds": 300},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "bins-5xx"}, {"AlarmName": "bins-latency"}]}}
    new_config = sagemaker().describe_endpoint_config(EndpointConfigName=request["EndpointConfigName"])
    variant = new_config["ProductionVariants"][0]
    assert variant["InitialInstanceCount"] == 2
    new_model = sagemaker().describe_model(ModelName=variant["ModelName"])
    assert new_model["PrimaryContainer"]["Environment"]["MLFLOW_DISABLE_ENV_CREATION"] == "true"
    assert new_model["PrimaryContainer"]["ModelDataUrl"].endswith("/model.tar.gz")


def test_linear_shift_settings_and_their_limits(trained):
    from bincounter.serving.rollout import deployment_policy

    linear = deployment_policy(config_for(trained, **{"deploy.traffic_shift": "linear",
                                                      "deploy.traffic_step_percent": 25}))
    assert linear["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["LinearStepSize"] == {
        "Type": "CAPACITY_PERCENT", "Value": 25}
    assert "AutoRollbackConfiguration" not in linear
    for shift, percent, message in (("linear", 5, "a linear step is 10% to 50%"), ("canary", 60, "at most 50%")):
        with pytest.raises(BincounterError, match=message):
            deployment_policy(config_for(trained, **{"deploy.traffic_shift": shift,
                                                     "deploy.traffic_step_percent": percent}))


def test_batch_transform_over_an_s3_prefix_of_photos(trained, role, image_url, capsys):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="warehouse")
    for photo in sorted((FIXTURES / "bin-images").glob("*.jpg"))[:3]:
        s3.upload_file(str(photo), "warehouse", f"photos/2026-11-21/{photo.name}")
    config = config_for(trained, **{"deploy.execution_role_arn": role, "deploy.image_url": image_url,
                                    "deploy.transform_input": "s3://warehouse/photos/2026-11-21/",
                                    "deploy.transform_output": "s3://warehouse/counts/2026-11-21/",
                                    "deploy.transform_instance_type": "ml.c5.xlarge"})
    job = deploy_command(config, "transform", name="nightly-recount")
    assert job.startswith("nightly-recount-") and "done; one <photo>.out per photo" in capsys.readouterr().out
    described = sagemaker().describe_transform_job(TransformJobName=job)
    source = described["TransformInput"]
    assert source["DataSource"]["S3DataSource"] == {"S3DataType": "S3Prefix",
                                                     "S3Uri": "s3://warehouse/photos/2026-11-21/"}
    assert source["ContentType"] == "application/x-image" and source["SplitType"] == "None"
    assert described["TransformOutput"]["S3OutputPath"] == "s3://warehouse/counts/2026-11-21/"
    assert described["TransformOutput"]["Accept"] == "application/json"
    assert described["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 1}
    with pytest.raises(BincounterError, match="deploy.transform_input must be an s3:// prefix"):
        deploy_command(with_overrides(config, {"deploy.transform_input": "photos/"}), "transform")


# ------------------------------------------------------------------ build-image without Docker; ECR


def test_build_image_without_a_docker_daemon_is_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    args = ["deploy", "build-image", "--params", empty_params(tmp_path), "--tag", "bins:1",
            "--set", f"mlflow.tracking_uri={trained['tracking_uri']}"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: build-image needs a Docker daemon") and "\n" not in err
    assert main(["deploy", "build-image", "--params", empty_params(tmp_path)]) == 1
    assert "needs --tag" in capsys.readouterr().err


def test_push_target_repository_and_login_on_ecr(aws, trained):
    from bincounter.serving.image import ecr_login, ecr_target

    config = config_for(trained)
    login = ecr_login(config, "bin-counter-serving")
    ecr = boto3.client("ecr", region_name="us-east-1")
    (repository,) = ecr.describe_repositories(repositoryNames=["bin-counter-serving"])["repositories"]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    assert login["repository_uri"] == repository["repositoryUri"]
    assert login["username"] == "AWS" and login["password"]
    assert login["registry"] == "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    assert ecr_login(config, "bin-counter-serving")["repository_uri"] == repository["repositoryUri"]  # reused
    assert ecr_target("bin-counter-serving:3", login["registry"]) == (
        "bin-counter-serving", "123456789012.dkr.ecr.us-east-1.amazonaws.com/bin-counter-serving:3")
    assert ecr_target("bins", login["registry"])[1].endswith("/bins:latest")
    uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/bins:7"
    assert ecr_target(uri, login["registry"]) == ("team/bins", uri)
