"""The AWS paths that only real AWS would show, checked against a real moto_server and real processes:
the user's SDK config kept, client-side role validation as a knob, torchrun on every GPU type, HPO with
pinned dimensions, credentials kept out of the job, and a job that survives its tracking server and
reports its own one-line failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import config_on, empty_params, free_port, SM_BUCKET, SM_REGION

from bincounter.aws import jobs, session, tuning
from bincounter.errors import BincounterError

pytestmark = pytest.mark.slow
BUCKET, REGION = SM_BUCKET, SM_REGION


def s3_text(sm, uri: str) -> str:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return sm.s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def code_uri(described: dict) -> str:
    return next(c["DataSource"]["S3DataSource"]["S3Uri"] for c in described["InputDataConfig"]
                if c["ChannelName"] == "code")


# ------------------------------------------------------------------ defect 4: the user's SDK config


def test_user_sdk_config_is_merged_not_replaced(sm, monkeypatch):
    user_config = sm.tmp / "sagemaker-config.yaml"
    user_config.write_text(json.dumps({"SchemaVersion": "1.0", "SageMaker": {"TrainingJob": {
        "VpcConfig": {"Subnets": ["subnet-0abc"], "SecurityGroupIds": ["sg-0abc"]},
        "OutputDataConfig": {"KmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/output-key"},
        "ResourceConfig": {"VolumeKmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/volume-key"},
        "Environment": {"HTTPS_PROXY": "http://proxy.internal:3128"},
        "Tags": [{"Key": "cost-center", "Value": "warehouse-42"}]}}}))
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(user_config))
    plan = jobs.build_training_request(sm.make())
    telemetry = plan.session.sagemaker_config["SageMaker"]["PythonSDK"]["Modules"]["TelemetryOptOut"]
    assert telemetry is True
    jobs.submit(plan)
    described = sm.client.describe_training_job(TrainingJobName=plan.job_name)
    assert described["VpcConfig"] == {"Subnets": ["subnet-0abc"], "SecurityGroupIds": ["sg-0abc"]}
    assert described["OutputDataConfig"]["KmsKeyId"].endswith("key/output-key")
    assert described["ResourceConfig"]["VolumeKmsKeyId"].endswith("key/volume-key")
    environment = plan.request["environment"]  # moto does not keep a training job's Environment
    assert environment["HTTPS_PROXY"] == "http://proxy.internal:3128"
    assert environment["BINCOUNTER_REGISTER_MODEL"] == "false"  # ours merged in
    tags = sm.client.list_tags(ResourceArn=described["TrainingJobArn"])["Tags"]
    assert {"Key": "cost-center", "Value": "warehouse-42"} in tags


def test_without_a_user_config_telemetry_is_still_off(sm):
    config = session.sdk_config()
    assert config["SageMaker"]["PythonSDK"]["Modules"]["TelemetryOptOut"] is True
    merged = session.merge({"SageMaker": {"PythonSDK": {"Modules": {"RemoteFunction": {"x": 1}}}}}, config)
    assert merged["SageMaker"]["PythonSDK"]["Modules"] == {"RemoteFunction": {"x": 1}, "TelemetryOptOut": True}


# ------------------------------------------------------------------ defect 3: role validation


def test_validate_role_knob(sm, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    # true: the SDK simulates the role's policies (iam:SimulatePrincipalPolicy), which moto answers with 500
    with pytest.raises(BincounterError, match="check of role .* iam:SimulatePrincipalPolicy .*validate_role=false"):
        jobs.build_training_request(sm.make(**{"sagemaker.validate_role": "true"}))
    assert os.environ.get("SAGEMAKER_VALIDATE_ROLE") == "false"  # the conftest value, restored
    monkeypatch.delenv("SAGEMAKER_VALIDATE_ROLE")
    for value in ("false", "auto"):  # auto is off against an emulator
        plan = jobs.build_training_request(sm.make(**{"sagemaker.validate_role": value}))
        assert plan.request["role_arn"] == sm.role
    assert "SAGEMAKER_VALIDATE_ROLE" not in os.environ
    with pytest.raises(BincounterError, match="sagemaker.validate_role must be auto, true or false"):
        sm.make(**{"sagemaker.validate_role": "yes please"})


# ------------------------------------------------------------------ defect 5: torchrun on every GPU type


@pytest.mark.parametrize("instance_type, count, expected", [
    ("ml.g6e.12xlarge", 1, True), ("ml.p5en.48xlarge", 1, True), ("ml.p6-b200.48xlarge", 1, True),
    ("ml.g6.xlarge", 1, True), ("ml.p4d.24xlarge", 1, True), ("ml.m5.xlarge", 1, False),
    ("ml.c5.2xlarge", 2, True), ("ml.trn1.32xlarge", 1, False)])
def test_torchrun_on_every_gpu_type(sm, instance_type, count, expected):
    config = sm.make(**{"sagemaker.instance_type": instance_type, "sagemaker.instance_count": count})
    assert jobs.uses_torchrun(config) is expected


def test_new_gpu_type_job_runs_the_torchrun_driver(sm):
    plan = jobs.build_training_request(sm.make(**{"sagemaker.instance_type": "ml.g6e.12xlarge"}))
    assert plan.distributed
    jobs.submit(plan)
    described = sm.client.describe_training_job(TrainingJobName=plan.job_name)
    drivers = next(c["DataSource"]["S3DataSource"]["S3Uri"] for c in described["InputDataConfig"]
                   if c["ChannelName"] == "sm_drivers")
    assert "torchrun_driver.py" in s3_text(sm, drivers + "/sm_train.sh")


# ------------------------------------------------------------------ defect 6: HPO


def test_sagemaker_hpo_honours_pinned_dimensions_from_the_command_line(sm, tmp_path, capsys):
    from bincounter.cli import main

    args = ["hpo", "--params", empty_params(tmp_path), "--arch", "resnet34", "--lr", "0.003"]
    for key, value in {**sm.overrides, "hpo.max_jobs": 2, "hpo.max_parallel_jobs": 1,
                       "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                       "mlflow.artifact_location": str(tmp_path / "mlartifacts"),
                       "train.data_dir": str(sm.prepared / "data/prepared"),
                       "sync.out": str(tmp_path / "data/sync.json")}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0, capsys.readouterr().err
    name = sm.client.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"][0][
        "HyperParameterTuningJobName"]
    described = sm.client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    ranges = described["HyperParameterTuningJobConfig"]["ParameterRanges"]
    searched = {r["Name"] for kind in ranges.values() for r in kind}
    assert "arch" not in searched and "lr" not in searched
    assert {"batch_size", "loss", "weight_decay", "augment"} <= searched
    static = described["TrainingJobDefinition"]["StaticHyperParameters"]
    assert static["arch"] == "resnet34" and float(static["lr"]) == 0.003


def test_sagemaker_hpo_refuses_several_instances(sm):
    config = sm.make(**{"sagemaker.instance_count": 2, "sagemaker.instance_type": "ml.g5.xlarge"})
    with pytest.raises(BincounterError, match="instance_count=2: SageMaker tuning runs each trial on one instance"):
        tuning.launch_tuning(config)
    assert not sm.client.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]


# ------------------------------------------------------------------ defects 2 and 7: what the job carries


SECRETS = ("s3cr3tpw", "hunter2", "AKIAIOSFODNN7EXAMPLE", "dapi0123456789abcdef0123456789abcdef", "sigvalue123")


def test_no_credentials_in_the_job_or_its_files(sm, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cr3tpw@mlflow.example.com")
    config = sm.make(**{"hpo.storage": "postgresql://optuna:hunter2@db.internal/optuna",
                        "data.source": "s3://aft-vbi-pds?X-Amz-Signature=sigvalue123",
                        "train.weights_path": "AKIAIOSFODNN7EXAMPLE",
                        "mlflow.artifact_location": "s3://artifacts/dapi0123456789abcdef0123456789abcdef"})
    parent = SimpleNamespace(info=SimpleNamespace(experiment_id="7", run_id="parent123"))
    plan = jobs.build_training_request(config, parent_run=parent)
    assert "carries credentials; it is not forwarded" in capsys.readouterr().out
    jobs.submit(plan)
    described = sm.client.describe_training_job(TrainingJobName=plan.job_name)
    code = code_uri(described)
    params = s3_text(sm, code + "/params.yaml")
    everything = json.dumps(described, default=str) + json.dumps(plan.request, default=str) + params
    for secret in SECRETS:
        assert secret not in everything, secret
    assert "postgresql://optuna:***@db.internal/optuna" in params
    assert "MLFLOW_TRACKING_URI" not in plan.request["environment"]
    assert plan.request["environment"]["TQDM_DISABLE"] == "1"
    requirements = s3_text(sm, code + "/requirements.txt").split()
    import mlflow

    assert f"mlflow-skinny=={mlflow.__version__}" in requirements
    assert not [r for r in requirements if re.match(r"mlflow(==|$)", r)]


def test_which_tracking_uris_the_job_receives(sm, monkeypatch, capsys):
    parent = SimpleNamespace(info=SimpleNamespace(experiment_id="7", run_id="p1"))
    for uri, forwarded in [("databricks", False), ("databricks://profile", False),
                           ("https://mlflow.example.com", True), ("http://127.0.0.1:5000", False),
                           ("arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/t", True)]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        env = jobs.job_environment(parent)
        assert (env.get("MLFLOW_TRACKING_URI") == uri) is forwarded, uri
        if forwarded:
            assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert "Databricks, which needs a token" in capsys.readouterr().out
    # a managed MLflow ARN: the job installs the auth plugin that signs requests with its role
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/t")
    plan = jobs.build_training_request(sm.make())
    assert "sagemaker-mlflow" in (plan.source_dir / "requirements.txt").read_text().split()


def test_redact():
    from bincounter.aws.redact import redact, redact_tree

    assert redact("https://u:p4ss@h/x?token=abc&y=1") == "https://u:***@h/x?token=***&y=1"
    assert redact("mysql://root@db/x") == "mysql://root@db/x"  # a user name is not a secret
    assert redact("key AKIAIOSFODNN7EXAMPLE here") == "key *** here"
    assert redact_tree({"a": {"api_key": "x1", "path": "data/prepared"}, "b": ["https://u:pw@h"]}) == {
        "a": {"api_key": "***", "path": "data/prepared"}, "b": ["https://u:***@h"]}


# ------------------------------------------------------------------ defects 2 and 7 in the container


@pytest.fixture
def job(prepared, tmp_path):
    """A packaged source folder and the SageMaker job environment around it (as tests/test_container.py)."""
    from bincounter.aws.package import package_source

    code = package_source(config_on(prepared, tmp_path), tmp_path / "code")
    data = prepared / "data/prepared"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "MLFLOW_", "BINCOUNTER_", "TQDM_"))}
    env.update({
        "SM_CHANNEL_TRAIN": str(data / "train"), "SM_CHANNEL_VALIDATION": str(data / "val"),
        "SM_CHANNEL_TEST": str(data / "test"), "SM_MODEL_DIR": str(tmp_path / "opt/ml/model"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "opt/ml/output/data"), "SM_OUTPUT_DIR": str(tmp_path / "opt/ml/output"),
        "SM_CHECKPOINT_DIR": str(tmp_path / "opt/ml/checkpoints"), "SM_NUM_GPUS": "0", "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1", "BINCOUNTER_REGISTER_MODEL": "false",
        "SM_HPS": json.dumps({"epochs": "1", "arch": "resnet18", "batch_size": "4", "image_size": "64",
                              "num_workers": "0", "profile_steps": "0"}),
    })
    return SimpleNamespace(code=code, env=env, root=tmp_path / "opt/ml")


def run_entry(job, env: dict | None = None, args=()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sm_entry.py", *args], cwd=job.code, env={**job.env, **(env or {})},
                          capture_output=True, text=True, timeout=240, check=False)


def test_unreachable_tracking_server_does_not_fail_the_job(job):
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_entry(job, {"MLFLOW_TRACKING_URI": dead, "MLFLOW_EXPERIMENT_ID": "1",
                           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"MLflow tracking server {dead} is not usable" in output
    for name in ("weights.pt", "model_config.json", "metrics.json"):
        assert (job.root / "model" / name).exists(), name
    assert not (job.root / "output" / "failure").exists()
    assert not re.search(r"\d+%\|", output), "a tqdm bar reached the job log"


def test_failure_reason_is_bincounters_one_line_error(job, tmp_path):
    empty = tmp_path / "empty-channel"
    empty.mkdir()
    proc = run_entry(job, {"SM_CHANNEL_TRAIN": str(empty)})
    assert proc.returncode == 1
    failure = (job.root / "output" / "failure").read_text()
    assert failure == f"error: channel train ({empty}) has no labels.csv: check the job's input channels\n"
    # `python -m bincounter train` without the entry script (as test_container runs it): the same line
    (job.root / "output" / "failure").unlink()
    proc = subprocess.run([sys.executable, "-m", "bincounter", "train"], cwd=job.code,
                          env={**job.env, "SM_CHANNEL_TRAIN": str(empty), "BINCOUNTER_PARAMS": str(job.code / "params.yaml")},
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 1
    assert (job.root / "output" / "failure").read_text().startswith(f"error: channel train ({empty}) has no")
    # a bad hyperparameter fails in the command line, before training: the same one line
    (job.root / "output" / "failure").unlink()
    proc = run_entry(job, {"SM_HPS": json.dumps({"epochs": "0"})}, ["--epochs", "0"])
    assert proc.returncode == 1
    assert (job.root / "output" / "failure").read_text() == "error: train.epochs must be at least 1, got 0\n"
