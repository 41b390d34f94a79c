"""The SageMaker backend against a real moto_server: the requests it sends, and what comes back into MLflow.

moto completes every training job at once without running it (and writes no artifact). The job's outputs
are therefore made by the project's own container contract, once per session: `python -m bincounter train`
with SM_* variables on the prepared fixture splits, its real SM_MODEL_DIR packed as model.tar.gz and its
SM_OUTPUT_DATA_DIR as output.tar.gz. A recording HTTP proxy in front of moto_server (AWS_ENDPOINT_URL_SAGEMAKER)
sees every SageMaker request the backend sends, and plays the service's part where moto cannot: it writes
the job's outputs where the job says its model is, reports a job as still running or failed, and records
StopTrainingJob (which moto answers with HTTP 500).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import config_on, SM_BUCKET, SM_REGION

from bincounter.aws import follow, jobs, tuning

BUCKET, REGION = SM_BUCKET, SM_REGION
SPACE = {
    "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
    "augment": {"type": "float", "low": 0.0, "high": 1.0},
    "epochs": {"type": "int", "low": 1, "high": 3},
    "batch_size": {"type": "categorical", "choices": [4, 8]},
    "loss": {"type": "categorical", "choices": ["ce", "emd"]},
}


def s3_text(sm, uri: str) -> str:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return sm.s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def channels(request_or_description) -> dict[str, str]:
    items = request_or_description["InputDataConfig"]
    return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in items}


# ------------------------------------------------------------------ the CreateTrainingJob request


def test_metric_definitions_parse_the_training_log():
    from bincounter.aws.jobs import metric_definitions
    from bincounter.training.loop import metric_line

    val = {"train_loss": 1.5, "val_loss": 1.25, "accuracy": 0.5, "rmse": 0.9, "mae": 0.6, "macro_accuracy": 0.4375,
           "off_by_one_accuracy": 0.875, "lr": 0.001}
    test = {"accuracy": 0.25, "rmse": 1.5, "mae": 1.0, "macro_accuracy": 0.125, "off_by_one_accuracy": 0.75}
    log = "\n".join([metric_line(3, val), metric_line(3, test, prefix="test_"),
                     metric_line(3, {k: v for k, v in val.items() if "loss" not in k}, prefix="best_val_")])
    found = {}
    for definition in metric_definitions():
        matches = re.findall(definition["Regex"], log)
        assert len(matches) == 1, (definition, matches)  # each regex picks exactly its own number
        found[definition["Name"]] = float(matches[0])
    assert found["val_macro_accuracy"] == 0.4375 and found["test_macro_accuracy"] == 0.125
    assert found["best_val_macro_accuracy"] == 0.4375 and found["val_accuracy"] == 0.5
    assert found["test_rmse"] == 1.5 and found["train_loss"] == 1.5 and found["val_loss"] == 1.25
    assert len(found) <= 40  # SageMaker's limit


def test_training_request_single_instance(sm):
    from bincounter.config import hyperparameter_keys

    config = sm.make()
    plan = jobs.build_training_request(config)
    request = plan.request
    spec = request["algorithm_specification"]
    assert spec.training_image == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-gpu-py311"
    assert {d.name for d in spec.metric_definitions} >= {"val_macro_accuracy", "test_macro_accuracy",
                                                         "best_val_macro_accuracy", "val_rmse"}
    hps = request["hyper_parameters"]
    assert hps["arch"] == "resnet18" and hps["epochs"] == "1" and hps["pretrained"] == "false"
    assert set(hps) == set(hyperparameter_keys())
    assert request["role_arn"] == sm.role and request["resource_config"].instance_count == 1
    assert not request["enable_managed_spot_training"] and request["checkpoint_config"] is None
    assert "profiler_config" not in request and "debug_rule_configurations" not in request
    assert request["environment"]["BINCOUNTER_REGISTER_MODEL"] == "false"
    assert "MLFLOW_TRACKING_URI" not in request["environment"]
    assert plan.distributed  # a GPU instance type: torchrun, one process per GPU the job finds (SM_NUM_GPUS)

    jobs.submit(plan)
    described = sm.client.describe_training_job(TrainingJobName=plan.job_name)
    assert described["TrainingJobName"].startswith("bincounter-")
    assert described["AlgorithmSpecification"]["TrainingImage"].endswith("pytorch-training:2.5-gpu-py311")
    got = channels(described)
    assert got["train"] == f"s3://{BUCKET}/data/train/" and got["validation"] == f"s3://{BUCKET}/data/validation/"
    assert got["test"] == f"s3://{BUCKET}/data/test/" and {"code", "sm_drivers"} <= set(got)
    # the data channels stream (FastFile: no copy of the whole set to each instance); the SDK's own code
    # channels stay File, which is what the SDK sets for them
    assert described["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    modes = {c["ChannelName"]: c.get("InputMode", "FastFile") for c in described["InputDataConfig"]}
    assert all(modes[name] == "FastFile" for name in ("train", "validation", "test")), modes
    assert described["HyperParameters"]["batch_size"] == "8"
    assert described["RoleArn"] == sm.role and described["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert described["StoppingCondition"]["MaxRuntimeInSeconds"] == 86400
    # what the container will run: the packaged source and the SDK's driver files
    source = json.loads(s3_text(sm, got["sm_drivers"] + "/sourcecode.json"))
    assert source["entry_script"] == "sm_entry.py" and source["requirements"] == "requirements.txt"
    assert "torchrun_driver.py" in s3_text(sm, got["sm_drivers"] + "/sm_train.sh")
    assert f"mlflow-skinny=={__import__('mlflow').__version__}" in s3_text(sm, got["code"] + "/requirements.txt")
    assert "runpy.run_module(\"bincounter\"" in s3_text(sm, got["code"] + "/sm_entry.py")
    assert "backend: local" in s3_text(sm, got["code"] + "/params.yaml")  # the job trains itself
    assert "def run_training" in s3_text(sm, got["code"] + "/bincounter/training/run.py")


def test_training_request_spot_torchrun_debugger_and_tracking_server(sm, monkeypatch):

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    config = sm.make(**{"sagemaker.use_spot": True, "sagemaker.instance_count": 2, "sagemaker.debugger": True,
                        "sagemaker.max_run": 3600, "sagemaker.max_wait": 7200,
                        "sagemaker.instance_type": "ml.m5.xlarge"})
    parent = SimpleNamespace(info=SimpleNamespace(experiment_id="7", run_id="parent123"))
    plan = jobs.build_training_request(config, parent_run=parent)
    request = plan.request
    assert request["algorithm_specification"].training_image.endswith("pytorch-training:2.5-cpu-py311")
    assert request["enable_managed_spot_training"] is True
    assert request["stopping_condition"].max_wait_time_in_seconds == 7200
    assert request["checkpoint_config"].local_path == "/opt/ml/checkpoints"
    assert request["checkpoint_config"].s3_uri.startswith(f"s3://{BUCKET}/bincounter/{plan.job_name}/checkpoints")
    env = request["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com" and env["MLFLOW_EXPERIMENT_ID"] == "7"
    assert json.loads(env["MLFLOW_RUN_CONTEXT"]) == {"mlflow.parentRunId": "parent123"}
    assert plan.distributed
    # Debugger: profiler + built-in rules, evaluated by the regional rule image
    assert request["profiler_config"].s3_output_path == f"s3://{BUCKET}/bincounter/profiler"
    assert [r.rule_configuration_name for r in request["profiler_rule_configurations"]] == [
        "ProfilerReport", "LowGPUUtilization"]
    rules = request["debug_rule_configurations"]
    assert [r.rule_configuration_name for r in rules] == ["LossNotDecreasing", "Overfit"]
    assert rules[0].rule_evaluator_image.endswith("sagemaker-debugger-rules:latest")
    assert rules[0].rule_parameters == {"rule_to_invoke": "LossNotDecreasing"}

    jobs.submit(plan)
    described = sm.client.describe_training_job(TrainingJobName=plan.job_name)
    assert described["EnableManagedSpotTraining"] is True
    assert described["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert described["ResourceConfig"]["InstanceCount"] == 2
    assert [r["RuleConfigurationName"] for r in described["DebugRuleConfigurations"]] == ["LossNotDecreasing", "Overfit"]
    drivers = channels(described)["sm_drivers"]
    assert "torchrun_driver.py" in s3_text(sm, drivers + "/sm_train.sh")
    assert "process_count_per_node" in json.loads(s3_text(sm, drivers + "/distributed.json"))


def test_missing_role_or_bucket_is_one_line_error(prepared, tmp_path, capsys, aws):
    import yaml

    from bincounter.cli import main

    config = config_on(prepared, tmp_path, **{"train.backend": "sagemaker"})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", "--params", str(params), "--backend", "sagemaker"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "sagemaker.role_arn and sagemaker.bucket must be set" in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing was created, not even a run

    assert main(["train", "--params", str(params), "--set", "sagemaker.role_arn=arn:aws:iam::1:role/r"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sagemaker.bucket must be set") and "\n" not in err


def test_missing_region_and_local_only_channels(sm, monkeypatch, tmp_path):
    from bincounter.errors import BincounterError

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(BincounterError, match="sagemaker.region is empty"):
        jobs.launch_training(sm.make(**{"sagemaker.region": ""}))
    monkeypatch.setenv("AWS_REGION", REGION)

    config = sm.make()
    Path(config.sync.out).write_text(json.dumps({"mode": "local only", "channels": {}}))
    with pytest.raises(BincounterError, match=r"local only: set sync.s3_uri .* run `dvc repro`"):
        jobs.launch_training(config)
    Path(config.sync.out).unlink()
    with pytest.raises(BincounterError, match="dvc repro"):
        jobs.launch_training(config)
    assert not sm.client.list_training_jobs()["TrainingJobSummaries"]


# ------------------------------------------------------------------ results back into MLflow


def _pack(folder: Path, archive: Path) -> Path:
    """What SageMaker uploads: the folder's contents at the root of a gzipped tar."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    return archive


@pytest.fixture(scope="session")
def real_job(prepared, tmp_path_factory):
    """One training job run through the container contract (as test_container.py runs it), once per session:
    its model.tar.gz and output.tar.gz are what a bincounter job really leaves."""
    from bincounter.aws.package import package_source

    root = tmp_path_factory.mktemp("sm_job")
    code = package_source(config_on(prepared, root), root / "code")
    data = prepared / "data/prepared"
    model_dir, output_dir = root / "opt/ml/model", root / "opt/ml/output/data"
    hps = {"epochs": "2", "arch": "resnet18", "batch_size": "8", "image_size": "64", "num_workers": "0",
           "profile_steps": "2", "pretrained": "false"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "MLFLOW_", "BINCOUNTER_"))}
    env.update({"SM_CHANNEL_TRAIN": str(data / "train"), "SM_CHANNEL_VALIDATION": str(data / "val"),
                "SM_CHANNEL_TEST": str(data / "test"), "SM_MODEL_DIR": str(model_dir),
                "SM_OUTPUT_DATA_DIR": str(output_dir), "SM_CHECKPOINT_DIR": str(root / "opt/ml/checkpoints"),
                "SM_NUM_GPUS": "0", "SM_HPS": json.dumps(hps), "OMP_NUM_THREADS": "1",
                "BINCOUNTER_REGISTER_MODEL": "false"})
    args = [a for k, v in hps.items() for a in (f"--{k}", v)]
    proc = subprocess.run([sys.executable, "-m", "bincounter", "train", *args], cwd=code, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(output_dir / "profile" / "rules.csv", newline="") as handle:
        import csv

        rules = {row["rule"]: row["status"] for row in csv.DictReader(handle)}
    return SimpleNamespace(model_dir=model_dir, metrics=json.loads((model_dir / "metrics.json").read_text()),
                           rules=rules, model_tar=_pack(model_dir, root / "model.tar.gz"),
                           output_tar=_pack(output_dir, root / "output.tar.gz"))


def place_outputs(sm, real_job, model_artifact: str, output: bool = True) -> None:
    """What a finished job leaves on S3: model.tar.gz where the job says, output.tar.gz beside it."""
    from bincounter.storage import parse_s3_uri

    bucket, key = parse_s3_uri(model_artifact)
    sm.s3.upload_file(str(real_job.model_tar), bucket, key)
    if output:
        sm.s3.upload_file(str(real_job.output_tar), bucket, key.rsplit("/", 1)[0] + "/output.tar.gz")


class SageMakerProxy:
    """A recording HTTP proxy on 127.0.0.1 in front of moto_server for the SageMaker API only.

    Every request's X-Amz-Target and JSON body are recorded. on_create(job_name) runs after moto accepted a
    CreateTrainingJob (the job "runs"); describe_patch is merged into DescribeTrainingJob answers (moto knows
    no other state than Completed); on_describe(n) runs on the n-th DescribeTrainingJob."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.requests: list[tuple[str, dict]] = []
        self.on_create = None
        self.describe_patch: dict = {}
        self.on_describe = None
        self.describes = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = self.headers.get("X-Amz-Target", "")
                try:
                    payload = json.loads(body or b"{}")
                except ValueError:
                    payload = {}
                proxy.requests.append((target, payload))
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                connection.request("POST", self.path, body=body, headers=headers)
                response = connection.getresponse()
                status, data = response.status, response.read()
                out_headers = [(k, v) for k, v in response.getheaders()
                               if k.lower() not in ("content-length", "transfer-encoding", "connection")]
                connection.close()
                if status == 200 and target.endswith(".CreateTrainingJob") and proxy.on_create:
                    proxy.on_create(payload["TrainingJobName"])
                if status == 200 and target.endswith(".DescribeTrainingJob"):
                    proxy.describes += 1
                    if proxy.describe_patch:
                        data = json.dumps({**json.loads(data), **proxy.describe_patch}).encode()
                    if proxy.on_describe:
                        proxy.on_describe(proxy.describes)
                self.send_response(status)
                for key, value in out_headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def targets(self) -> list[str]:
        return [t.rsplit(".", 1)[-1] for t, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sm_proxy(sm, monkeypatch):
    proxy = SageMakerProxy(os.environ["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", proxy.url)
    yield proxy
    proxy.close()


def test_proxy_sees_the_backends_sagemaker_requests(sm, sm_proxy):
    """The recording proxy is really on the path (otherwise the tests below would assert nothing)."""
    plan = jobs.build_training_request(sm.make())
    jobs.submit(plan)
    created = [body for target, body in sm_proxy.requests if target == "SageMaker.CreateTrainingJob"]
    assert [b["TrainingJobName"] for b in created] == [plan.job_name]
    assert "DescribeTrainingJob" in sm_proxy.targets()


def test_launch_training_mirrors_completed_job(sm, sm_proxy, real_job):
    import mlflow
    import numpy as np
    import pandas as pd
    from conftest import FIXTURES
    from mlflow import MlflowClient

    from bincounter.serving.pyfunc import encode_image_file

    def job_ran(job_name):  # the service side: the finished job's outputs appear where it says its model is
        place_outputs(sm, real_job, sm.client.describe_training_job(TrainingJobName=job_name)
                      ["ModelArtifacts"]["S3ModelArtifacts"])

    sm_proxy.on_create = job_ran
    config = sm.make()
    outcome = jobs.launch_training(config)
    assert "CreateTrainingJob" in sm_proxy.targets() and "StopTrainingJob" not in sm_proxy.targets()
    # what the project derives from the job's own files
    assert outcome.test_metrics == real_job.metrics["test"] and outcome.val_metrics == real_job.metrics["val"]
    assert outcome.registered_version == "1"

    client = MlflowClient(config.mlflow.tracking_uri)
    run = client.get_run(outcome.run_id)
    job_name = run.data.tags["sagemaker.training_job_name"]
    assert run.info.status == "FINISHED" and run.info.run_name == job_name
    assert run.data.tags["sagemaker.training_job_arn"].endswith(f":training-job/{job_name}")
    assert run.data.tags["sagemaker.status"] == "Completed" and run.data.tags["backend"] == "sagemaker"
    assert run.data.params["train.arch"] == "resnet18"
    metrics = run.data.metrics
    for name, value in real_job.metrics["test"].items():
        assert metrics[f"test_{name}"] == pytest.approx(value), name
    assert metrics["macro_accuracy"] == pytest.approx(real_job.metrics["val"]["macro_accuracy"])
    assert "sagemaker/train_progress" in metrics  # moto's FinalMetricDataList
    rules = {k.removeprefix("rule."): v for k, v in run.data.tags.items()
             if k.startswith("rule.") and not k.endswith(".evidence")}
    assert rules == real_job.rules and "loss_not_decreasing" in rules  # the rules.csv the job wrote
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "profile")}
    assert {"profile/report.md", "profile/rules.csv"} <= artifacts
    version = client.get_model_version(config.mlflow.model_name, "1")
    assert version.run_id == outcome.run_id
    assert float(version.tags["test_macro_accuracy"]) == pytest.approx(real_job.metrics["test"]["macro_accuracy"], abs=1e-6)
    if outcome.champion:  # the champion rule decided on the job's test score
        assert str(client.get_model_version_by_alias(config.mlflow.model_name, "champion").version) == "1"
    else:
        assert "champion_refused" in version.tags

    # the registered model is the job's model: its weights and model config are the job's SM_MODEL_DIR files
    import torch

    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    registered = Path(mlflow.artifacts.download_artifacts(f"models:/{config.mlflow.model_name}/1"))
    weights = next(registered.glob("artifacts/*/weights.pt"))
    mine, theirs = (torch.load(p, weights_only=True) for p in (weights, real_job.model_dir / "weights.pt"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((weights.parent / "model_config.json").read_text()) == \
        json.loads((real_job.model_dir / "model_config.json").read_text())
    # and it serves: the pyfunc answers every row of a batch of real photos with a distribution over 0..5
    images = sorted((FIXTURES / "bin-images").glob("*.jpg"))[:4]
    prediction = mlflow.pyfunc.load_model(f"models:/{config.mlflow.model_name}/1").predict(
        pd.DataFrame({"image": [encode_image_file(i) for i in images]}))
    assert np.allclose(np.stack(prediction["probabilities"]).sum(1), 1, atol=1e-4) and len(prediction) == 4


def test_follow_existing_job_mirrors_it(sm, real_job):
    """A job started earlier (say, by a session that lost its connection) mirrored into a new run."""
    from mlflow import MlflowClient

    config = sm.make()
    plan = jobs.build_training_request(config)
    description = jobs.submit(plan)
    place_outputs(sm, real_job, description["ModelArtifacts"]["S3ModelArtifacts"], output=False)  # no profile
    outcome = follow.follow_training_job(config, plan.job_name)
    assert outcome.registered_version == "1" and outcome.test_metrics == real_job.metrics["test"]
    run = MlflowClient(config.mlflow.tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sagemaker.training_job_name"] == plan.job_name
    assert not [k for k in run.data.tags if k.startswith("rule.")]  # the profile is optional


def test_failed_job_marks_run_failed(sm, sm_proxy):
    from mlflow import MlflowClient

    from bincounter.errors import BincounterError

    sm_proxy.describe_patch = {"TrainingJobStatus": "Failed", "SecondaryStatus": "Failed",
                               "FailureReason": "AlgorithmError: CUDA out of memory"}
    config = sm.make()
    with pytest.raises(BincounterError, match="failed: AlgorithmError: CUDA out of memory"):
        jobs.launch_training(config)
    client = MlflowClient(config.mlflow.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["sagemaker.failure_reason"] == "AlgorithmError: CUDA out of memory"
    assert run.data.tags["sagemaker.status"] == "Failed"
    assert not client.search_registered_models()


def test_ctrl_c_stops_job_and_kills_run(sm, sm_proxy, capsys):
    """Ctrl-C while the job runs: StopTrainingJob goes out for that job (moto answers it with 500, which the
    backend tolerates), and the MLflow run is KILLED."""
    from mlflow import MlflowClient

    sm_proxy.describe_patch = {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"}
    main = threading.main_thread().ident
    sent = []

    def interrupt_while_waiting(count):  # the user presses Ctrl-C once the backend is following the job
        if count == 2 and not sent:
            sent.append(True)
            threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT)).start()

    sm_proxy.on_describe = interrupt_while_waiting
    config = sm.make()
    # Python's Ctrl-C handler, even where pytest was started with SIGINT ignored (a shell's background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            jobs.launch_training(config)
    finally:
        signal.signal(signal.SIGINT, previous)
    stops = [body for target, body in sm_proxy.requests if target.endswith(".StopTrainingJob")]
    client = MlflowClient(config.mlflow.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    job_name = run.data.tags["sagemaker.training_job_name"]
    assert stops and {b["TrainingJobName"] for b in stops} == {job_name}
    assert f"could not stop {job_name}" in capsys.readouterr().out  # moto: HTTP 500 on StopTrainingJob
    assert run.info.status == "KILLED" and run.data.tags["sagemaker.status"] == "Stopping"


def test_wait_for_job_follows_status_and_tolerates_missing_logs(sm, capsys):

    plan = jobs.build_training_request(sm.make())
    jobs.submit(plan)
    description = follow.wait_for_job(sm.client, plan.job_name, logs_client=sm.boto.client("logs"), poll_seconds=0)
    assert description["TrainingJobStatus"] == "Completed"
    assert f"{plan.job_name} Completed" in capsys.readouterr().out


# ------------------------------------------------------------------ hyperparameter tuning


def test_tuning_request_ranges_objective_and_static_hyperparameters(sm):

    config = sm.make(**{"hpo.max_jobs": 6, "hpo.max_parallel_jobs": 3})
    plan = tuning.build_tuning_request(config, SPACE)
    job_config = plan.request["hyper_parameter_tuning_job_config"]
    objective = job_config.hyper_parameter_tuning_job_objective
    assert (objective.metric_name, objective.type) == ("best_val_macro_accuracy", "Maximize")
    assert job_config.resource_limits.max_number_of_training_jobs == 6
    assert job_config.resource_limits.max_parallel_training_jobs == 3
    ranges = job_config.parameter_ranges
    continuous = {r.name: r for r in ranges.continuous_parameter_ranges}
    assert continuous["lr"].scaling_type == "Logarithmic" and float(continuous["lr"].min_value) == 0.0001
    assert continuous["augment"].scaling_type == "Linear" and float(continuous["augment"].max_value) == 1.0
    assert [(r.name, r.min_value, r.max_value) for r in ranges.integer_parameter_ranges] == [("epochs", "1", "3")]
    categorical = {r.name: r.values for r in ranges.categorical_parameter_ranges}
    assert categorical == {"batch_size": ["4", "8"], "loss": ["ce", "emd"]}

    definition = plan.request["training_job_definition"]
    static = definition.static_hyper_parameters
    assert not set(static) & set(SPACE) and static["arch"] == "resnet18" and static["image_size"] == "64"
    names = {d.name for d in definition.algorithm_specification.metric_definitions}
    assert "best_val_macro_accuracy" in names and "test_macro_accuracy" in names
    assert definition.checkpoint_config is None or not getattr(definition.checkpoint_config, "s3_uri", None)

    rmse = tuning.build_tuning_request(sm.make(**{"hpo.objective": "rmse"}), {"lr": SPACE["lr"]})
    objective = rmse.request["hyper_parameter_tuning_job_config"].hyper_parameter_tuning_job_objective
    assert (objective.metric_name, objective.type) == ("best_val_rmse", "Minimize")


def test_tuning_space_errors(sm):
    from bincounter.errors import BincounterError

    for space, message in [({"dropout": {"type": "float", "low": 0, "high": 1}}, "not a train knob"),
                           ({"lr": {"type": "float", "low": 0.0, "high": 1, "log": True}}, "log scale needs low > 0"),
                           ({"lr": {"type": "normal"}}, "type must be float, int or categorical"),
                           ({}, "empty")]:
        with pytest.raises(BincounterError, match=message):
            tuning.parameter_ranges(space)
    assert set(tuning.parameter_ranges(SPACE, pinned={"lr"})) == set(SPACE) - {"lr"}
    with pytest.raises(BincounterError, match="role_arn"):
        tuning.build_tuning_request(sm.make(**{"sagemaker.role_arn": ""}), SPACE)


def test_launch_tuning_on_moto_mirrors_best_job(sm):
    from mlflow import MlflowClient


    config = sm.make(**{"hpo.space": SPACE, "hpo.max_jobs": 4, "hpo.max_parallel_jobs": 2})
    result = tuning.launch_tuning(config)
    name = result["tuning_job_name"]
    assert len(name) <= 32 and result["status"] == "Completed"
    described = sm.client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    definition = described["TrainingJobDefinition"]
    assert definition["StaticHyperParameters"]["sagemaker_program"] == "sm_entry.py"
    assert definition["StaticHyperParameters"]["arch"] == "resnet18"
    assert {m["Name"] for m in definition["AlgorithmSpecification"]["MetricDefinitions"]} >= {"best_val_macro_accuracy"}
    assert {"train", "validation", "test"} <= set(channels(definition))
    assert definition["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    ranges = described["HyperParameterTuningJobConfig"]["ParameterRanges"]
    assert {r["Name"] for r in ranges["CategoricalParameterRanges"]} == {"batch_size", "loss"}
    objective = described["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
    assert objective == {"Type": "Maximize", "MetricName": "best_val_macro_accuracy"}
    # moto's canned best job, mirrored as a child run of the tuning run
    assert result["best_job"] == described["BestTrainingJob"]["TrainingJobName"]
    client = MlflowClient(config.mlflow.tracking_uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sagemaker.tuning_job_name"] == name
    assert parent.data.tags["best_training_job"] == result["best_job"]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [c.data.tags["sagemaker.training_job_name"] for c in children] == [result["best_job"]]


class StubSageMaker:
    """The two read calls mirroring uses, answering like the service does for a finished tuning job."""

    def __init__(self, jobs: dict[str, dict]):
        self.jobs = jobs

    def list_training_jobs_for_hyper_parameter_tuning_job(self, **kwargs):
        return {"TrainingJobSummaries": [
            {k: v for k, v in job.items() if k in ("TrainingJobName", "TrainingJobArn", "TrainingJobStatus",
                                                   "TunedHyperParameters", "FailureReason",
                                                   "FinalHyperParameterTuningJobObjectiveMetric")}
            for job in self.jobs.values()]}

    def describe_training_job(self, TrainingJobName):
        job = self.jobs[TrainingJobName]
        return {"TrainingJobName": TrainingJobName, "TrainingJobStatus": job["TrainingJobStatus"],
                "HyperParameters": {**job["TunedHyperParameters"], "arch": "resnet18", "sagemaker_program": "sm_entry.py"},
                "FinalMetricDataList": job.get("final", [])}


def tuning_description(best: dict) -> dict:
    return {"HyperParameterTuningJobName": "bc-hpo-1", "HyperParameterTuningJobStatus": "Completed",
            "TrainingJobDefinition": {"StaticHyperParameters": {"arch": "resnet18", "sagemaker_program": "sm_entry.py",
                                                                "sagemaker_submit_directory": "s3://b/x.tar.gz"}},
            "TrainingJobStatusCounters": {"Completed": 2, "NonRetryableError": 1}, "BestTrainingJob": best}


def _job(name, status, lr, value=None, reason=None):
    job = {"TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:1:training-job/{name}",
           "TrainingJobStatus": status, "TunedHyperParameters": {"lr": lr, "batch_size": "8"}}
    if value is not None:
        job["FinalHyperParameterTuningJobObjectiveMetric"] = {"MetricName": "best_val_macro_accuracy", "Value": value}
        job["final"] = [{"MetricName": "best_val_macro_accuracy", "Value": value},
                        {"MetricName": "test_macro_accuracy", "Value": value - 0.1}]
    if reason:
        job["FailureReason"] = reason
    return job


def test_mirror_tuning_job_from_describe_results(sm):
    import mlflow
    from mlflow import MlflowClient

    from bincounter import tracking

    config = sm.make()
    tracking.setup(config)
    experiment = mlflow.get_experiment_by_name(config.mlflow.experiment).experiment_id
    client = MlflowClient(config.mlflow.tracking_uri)
    parent = client.create_run(experiment, run_name="hpo")

    # 1. only the describe answer (what moto can give): the best job becomes the one child run
    best = _job("bc-hpo-1-002", "Completed", "0.01", 0.6)
    result = tuning.mirror_tuning_job(config, "bc-hpo-1", parent.info.run_id, description=tuning_description(best))
    assert result["best_job"] == "bc-hpo-1-002" and result["best_value"] == 0.6
    assert result["best_params"] == {"lr": "0.01", "batch_size": "8"} and result["children"] == 1
    query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    [child] = client.search_runs([experiment], query)
    assert child.data.params == {"arch": "resnet18", "lr": "0.01", "batch_size": "8"}
    assert child.data.metrics["best_val_macro_accuracy"] == 0.6 and child.info.status == "FINISHED"
    assert child.data.tags["hpo.best"] == "true" and child.info.run_name == "bc-hpo-1-002"
    run = client.get_run(parent.info.run_id)
    assert run.data.params["best_lr"] == "0.01" and run.data.metrics["best_macro_accuracy"] == 0.6
    assert run.data.tags["best_training_job"] == "bc-hpo-1-002"

    # 2. with the listing: every job, failed ones FAILED with their reason; already mirrored ones skipped
    described = {j["TrainingJobName"]: j for j in (
        _job("bc-hpo-1-001", "Completed", "0.001", 0.5), best,
        _job("bc-hpo-1-003", "Failed", "0.1", reason="AlgorithmError: loss became nan"))}
    result = tuning.mirror_tuning_job(config, "bc-hpo-1", parent.info.run_id,
                                       description=tuning_description(best), client=StubSageMaker(described))
    assert result["children"] == 2
    children = {c.info.run_name: c for c in client.search_runs([experiment], query)}
    assert set(children) == set(described)
    assert children["bc-hpo-1-003"].info.status == "FAILED"
    assert children["bc-hpo-1-003"].data.tags["sagemaker.failure_reason"] == "AlgorithmError: loss became nan"
    first = children["bc-hpo-1-001"]
    assert first.data.params["lr"] == "0.001" and "sagemaker_program" not in first.data.params
    assert first.data.metrics["sagemaker/test_macro_accuracy"] == pytest.approx(0.4)
    assert tuning.mirror_tuning_job(config, "bc-hpo-1", parent.info.run_id, description=tuning_description(best),
                                     client=StubSageMaker(described))["children"] == 0


def test_best_tuning_job_model_is_registered_from_its_artifact(sm, real_job, capsys):
    """The best job is a real (emulated) training job whose model.tar.gz is on S3: mirroring the tuning job
    logs that model into the best child run and registers it with the champion rule, once."""
    import mlflow
    from mlflow import MlflowClient

    from bincounter import tracking

    job_name = "bc-hpo-1-002"
    sm.client.create_training_job(
        TrainingJobName=job_name, RoleArn=sm.role,
        AlgorithmSpecification={"TrainingImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5",
                                "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/hpo/output"},
        ResourceConfig={"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})
    artifact = sm.client.describe_training_job(TrainingJobName=job_name)["ModelArtifacts"]["S3ModelArtifacts"]
    place_outputs(sm, real_job, artifact)

    config = sm.make()
    tracking.setup(config)
    experiment = mlflow.get_experiment_by_name(config.mlflow.experiment).experiment_id
    client = MlflowClient(config.mlflow.tracking_uri)
    parent = client.create_run(experiment, run_name="hpo")
    description = tuning_description(_job(job_name, "Completed", "0.01", 0.6))
    tuning.mirror_tuning_job(config, "bc-hpo-1", parent.info.run_id, description=description, client=sm.client)

    [child] = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.info.status == "FINISHED" and child.data.tags["hpo.model"] == "logged"
    assert child.data.metrics["test_macro_accuracy"] == pytest.approx(real_job.metrics["test"]["macro_accuracy"])
    [version] = client.search_model_versions(f"name = '{config.mlflow.model_name}'")
    assert str(version.version) == "1" and version.run_id == child.info.run_id
    assert "profile/report.md" in {a.path for a in client.list_artifacts(child.info.run_id, "profile")}

    # mirroring again registers nothing new
    tuning.mirror_tuning_job(config, "bc-hpo-1", parent.info.run_id, description=description, client=sm.client)
    assert len(client.search_model_versions(f"name = '{config.mlflow.model_name}'")) == 1


def test_best_tuning_job_without_a_model_is_reported_and_stays_finished(sm, capsys):
    from mlflow import MlflowClient

    from bincounter import tracking

    config = sm.make()
    tracking.setup(config)
    client = MlflowClient(config.mlflow.tracking_uri)
    parent = client.create_run(client.get_experiment_by_name(config.mlflow.experiment).experiment_id, run_name="hpo")
    description = tuning_description(_job("bc-hpo-9-001", "Completed", "0.01", 0.6))  # no such training job
    tuning.mirror_tuning_job(config, "bc-hpo-9", parent.info.run_id, description=description, client=sm.client)
    assert "hpo: the best job's model was not registered" in capsys.readouterr().out
    [child] = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.info.status == "FINISHED" and "hpo.model" not in child.data.tags
    assert not client.search_model_versions(f"name = '{config.mlflow.model_name}'")
