"""Shared fixtures: a real moto_server on 127.0.0.1, a prepared copy of the real fixture images,
and one small trained + registered model for the tests that need a model.

Nothing here reaches the network: AWS is the emulator, MLflow is a sqlite file in a temp folder,
and models are built with weights=None.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "abid"
SOURCE_BUCKET = "aft-vbi-pds"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None):  # any HTTP answer means it is up
                return
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM by PID, SIGKILL after `timeout`. group=True for a process started with start_new_session:
    the kill reaches its whole group, and a child that outlived it is stopped too."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            proc.wait()
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)


class MotoServer:
    """A moto_server process on a free loopback port, stopped by its PID."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_http(self.url + "/moto-api/", proc=self.proc)

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(self.url + "/moto-api/reset", method="POST"), timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(autouse=True, scope="session")
def _offline_environment(tmp_path_factory):
    """No test may reach a real AWS account, a model hub or a user's MLflow server."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("AWS_", "MLFLOW_", "SM_")):
            del os.environ[key]
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # refused at once unless a test points it at moto
        "TORCH_HOME": str(tmp_path_factory.mktemp("torch_home")),
        "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
        "SAGEMAKER_VALIDATE_ROLE": "false",
    })
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def aws(moto_server, monkeypatch):
    """AWS_ENDPOINT_URL pointed at the emulator, reset before the test."""
    moto_server.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    return moto_server


def fixture_labels() -> dict[str, int]:
    with open(FIXTURES / "labels.csv", newline="") as handle:
        return {row["image_id"]: int(row["expected_quantity"]) for row in csv.DictReader(handle)}


def fixture_b64(image_id: str) -> str:
    """A fixture photo as the served contract takes it: base64 of the JPEG bytes."""
    from bincounter.serving.pyfunc import encode_image_file

    return encode_image_file(FIXTURES / "bin-images" / f"{image_id}.jpg")


def seed_bucket(bucket: str = SOURCE_BUCKET, ids=None) -> list[str]:
    """Upload fixture images + metadata into an emulator bucket in the ABID layout."""
    from bincounter.storage import s3_client

    client = s3_client()
    client.create_bucket(Bucket=bucket)
    public_read(client, bucket)
    ids = list(ids or fixture_labels())
    for image_id in ids:
        client.upload_file(str(FIXTURES / "bin-images" / f"{image_id}.jpg"), bucket, f"bin-images/{image_id}.jpg")
        client.upload_file(str(FIXTURES / "metadata" / f"{image_id}.json"), bucket, f"metadata/{image_id}.json")
    return ids


def public_read(client, bucket: str) -> None:
    """Like the real aft-vbi-pds: anyone may list and read, so unsigned clients work."""
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))


def write_manifest(path: Path, ids) -> Path:
    path.write_text(json.dumps(list(ids)))
    return path


def make_config(root: Path, **overrides):
    """A Config whose every path lives under root (tests never write into the checkout)."""
    from bincounter.config import build_config

    base = {
        "data.source": str(FIXTURES), "data.subset": str(write_manifest(root / "manifest.json", fixture_labels())),
        "data.raw_dir": str(root / "data/raw"), "data.workers": 8,
        "data.catalog": str(root / "data/catalog.parquet"), "data.shard_size": 16,  # several shards of the 48 bins
        "split.out_dir": str(root / "data/splits"), "split.eda_dir": str(root / "data/eda"),
        "prepare.image_size": 72, "prepare.out_dir": str(root / "data/prepared"), "prepare.workers": 1,
        "sync.out": str(root / "data/sync.json"),
        "train.arch": "resnet18", "train.pretrained": False, "train.image_size": 64, "train.epochs": 1,
        "train.batch_size": 8, "train.num_workers": 0, "train.profile_steps": 2,
        "train.data_dir": str(root / "data/prepared"), "train.checkpoint_dir": str(root / "checkpoints"),
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "mlflow.experiment": "tests",
        "mlflow.artifact_location": str(root / "mlartifacts"),
        "hpo.storage": f"sqlite:///{root / 'optuna.db'}",
    }
    base.update(overrides)
    return build_config({}, base)  # the declared defaults, then base: no params file is read


def prepared_photos(split_dir: Path):
    """A prepared split's photos as training decodes them, (N, S, S, 3) uint8, in labels.csv order."""
    import numpy as np

    from bincounter.training.dataset import ShardDataset

    dataset = ShardDataset(split_dir, transform=lambda image: image)
    return np.stack([dataset[k][0].permute(1, 2, 0).numpy() for k in range(len(dataset))]), dataset.ids


def catalog_and_fetch(config):
    """The two stages that bring a query's bins in: catalog (metadata), then fetch (shards)."""
    from bincounter.data.catalog import build_catalog
    from bincounter.data.fetch import fetch

    build_catalog(config.data)
    return fetch(config.data)


def fetched_ok(config) -> list[str]:
    """The ids fetch's index.csv records as ok, sorted: what the split stage will label."""
    from bincounter.data.fetch import read_index

    return sorted(row["image_id"] for row in read_index(Path(config.data.raw_dir)) if row["status"] == "ok")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The fixture images catalogued, fetched, split and prepared once (72 px) for every test that trains."""
    from bincounter.data.prepare import prepare
    from bincounter.data.split import split

    root = tmp_path_factory.mktemp("prepared")
    config = make_config(root)
    catalog_and_fetch(config)
    split(config)
    prepare(config)
    return root


def config_on(prepared: Path, root: Path, **overrides):
    """A Config reading the shared prepared data, writing MLflow/checkpoints under root."""
    return make_config(root, **{
        "data.raw_dir": str(prepared / "data/raw"), "data.catalog": str(prepared / "data/catalog.parquet"),
        "split.out_dir": str(prepared / "data/splits"),
        "prepare.out_dir": str(prepared / "data/prepared"), "train.data_dir": str(prepared / "data/prepared"),
        **overrides,
    })


MLFLOW_PROCESS_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _fresh_mlflow_state():
    """mlflow.set_tracking_uri/set_experiment export MLFLOW_* variables; each test starts without them."""
    for key in MLFLOW_PROCESS_VARS:
        os.environ.pop(key, None)
    yield
    for key in MLFLOW_PROCESS_VARS:
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def _trained_once(prepared, tmp_path_factory):
    from bincounter.training.run import data_dirs_for, run_training

    root = tmp_path_factory.mktemp("trained")
    config = config_on(prepared, root, **{"train.epochs": 2})
    outcome = run_training(config, data_dirs_for(config))
    for key in MLFLOW_PROCESS_VARS:
        os.environ.pop(key, None)
    return {"config": config, "outcome": outcome, "root": root, "tracking_uri": config.mlflow.tracking_uri}


@pytest.fixture
def trained(_trained_once):
    """One tiny model trained on the fixtures (once per session) and registered as bin-counter@champion in
    its own sqlite store, which is the current tracking URI for the test."""
    import mlflow

    mlflow.set_tracking_uri(_trained_once["tracking_uri"])
    return _trained_once


def empty_params(folder: Path) -> str:
    """An empty params file: the declared defaults apply (a named params file must exist)."""
    path = Path(folder) / "empty-params.yaml"
    path.write_text("{}\n")
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def _environment_under_test_first_on_path():
    """Subprocesses (`mlflow run` runs `bash -c "python ..."`, dvc stages run `bincounter`) must run the
    interpreter and console scripts of the environment under test, not whatever comes first on PATH."""
    bindir = str(Path(sys.executable).parent)
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([bindir] + [p for p in saved.split(os.pathsep) if p and p != bindir])
    yield bindir
    os.environ["PATH"] = saved


SM_BUCKET = "bincounter-jobs"
SM_REGION = "us-east-1"


@pytest.fixture
def sm(aws, prepared, tmp_path):
    """A bucket, an execution role and the prepared splits synced to S3 as channels, all on the emulator."""
    from types import SimpleNamespace

    import boto3

    from bincounter.data.sync import sync

    boto = boto3.Session(region_name=SM_REGION)
    boto.client("s3").create_bucket(Bucket=SM_BUCKET)
    role = boto.client("iam").create_role(RoleName="bincounter-sagemaker", AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                 "Principal": {"Service": "sagemaker.amazonaws.com"}}]}))["Role"]["Arn"]
    overrides = {"train.backend": "sagemaker", "sagemaker.role_arn": role, "sagemaker.bucket": SM_BUCKET,
                 "sagemaker.region": SM_REGION, "sync.s3_uri": f"s3://{SM_BUCKET}/data"}

    def make(**extra):
        return config_on(prepared, tmp_path, **{**overrides, **extra})

    sync(make())
    return SimpleNamespace(make=make, role=role, boto=boto, client=boto.client("sagemaker"), s3=boto.client("s3"),
                           tmp=tmp_path, prepared=prepared, overrides=overrides)
