"""The serving image: its build context, its server run as a real process, and (marked `docker`, skipped
where no Docker daemon answers) the image itself built offline and run the way SageMaker runs it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import FIXTURES, free_port, stop_process, wait_for_http

from bincounter.serving import image
from bincounter.serving.image_server import check_mounted_model

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "src" / "bincounter" / "serving" / "image_server.py"


@pytest.fixture(scope="module")
def model_dir(_trained_once, tmp_path_factory):
    """The registered tiny model, downloaded as SageMaker would mount it."""
    import mlflow

    mlflow.set_tracking_uri(_trained_once["tracking_uri"])
    return image.download_model(_trained_once["config"], None, tmp_path_factory.mktemp("model") / "m")


def test_build_context_holds_the_model_its_requirements_and_the_server(trained, tmp_path):
    context = image.build_context(trained["config"], None, tmp_path / "ctx", "local/python:3.11-slim", None)
    dockerfile = (context / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in dockerfile and "MLFLOW_DISABLE_ENV_CREATION=true" in dockerfile
    assert 'CMD ["serve"]' in dockerfile and "--no-index" in dockerfile
    assert (context / "app" / "model" / "MLmodel").is_file()
    assert (context / "app" / "bincounter_server.py").read_text() == SERVER.read_text()
    assert os.access(context / "app" / "bin" / "serve", os.X_OK)
    requirements = (context / "requirements.txt").read_text().split()
    import mlflow

    assert f"mlflow=={mlflow.__version__}" in requirements and any(r.startswith("torch==") for r in requirements)
    constraints = (context / "constraints.txt").read_text().splitlines()
    assert not [c for c in constraints if c.startswith(("torch==", "mlflow=="))]  # the model's pins win
    assert any(c.startswith("fastapi==") for c in constraints)
    assert list((context / "wheels").iterdir()) == []


def test_wheel_platform_tags_cover_every_older_glibc():
    tags = image.platform_tags({"python": "3.11", "glibc": "2_36", "machine": "x86_64"})
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_28_x86_64" in tags and "manylinux2014_x86_64" in tags


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_image_server_contract_raw_images_and_settings(model_dir, tmp_path):
    """The image's `serve` as a real process on this machine: MLflow's JSON contract and 4xx, plus raw
    image/jpeg bodies (batch transform), workers and threads from the environment."""
    port = free_port()
    env = {**os.environ, "BINCOUNTER_MODEL_DIR": str(model_dir), "SAGEMAKER_BIND_TO_PORT": str(port),
           "BINCOUNTER_HOST": "127.0.0.1", "BINCOUNTER_MOUNTED_MODEL": str(tmp_path / "none"),
           "MLFLOW_MODELS_WORKERS": "1", "BINCOUNTER_THREADS": "1"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(SERVER), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", timeout=90, proc=proc)
        photo = (FIXTURES / "bin-images" / "00024.jpg").read_bytes()
        b64 = base64.b64encode(photo).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]}}).encode()
        status, answer = post(url + "/invocations", body)
        assert status == 200 and {"count", "confidence", "probabilities"} <= set(answer["predictions"][0])
        status, raw = post(url + "/invocations", photo, "image/jpeg")
        assert status == 200 and raw == answer
        assert post(url + "/invocations", b"not an image", "application/x-image")[0] == 400
        status, error = post(url + "/invocations", b"{not json")
        assert status == 400 and "valid JSON" in error["message"]
        missing = json.dumps({"dataframe_split": {"columns": ["photo"], "data": [[b64]]}}).encode()
        assert post(url + "/invocations", missing)[0] == 400
        assert post(url + "/invocations", body)[0] == 200  # still serving
    finally:
        stop_process(proc, group=True)
        log.close()
    assert "with 1 worker(s) x 1 thread(s)" in (tmp_path / "server.log").read_text()


def test_image_refuses_a_different_mounted_model_and_bad_settings(model_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "MLmodel").write_text("model_uuid: 0123456789abcdef\nflavors: {}\n")
    assert "but SageMaker mounted model 0123456789abcdef" in check_mounted_model(str(model_dir), str(other))
    assert check_mounted_model(str(model_dir), str(model_dir)) == ""
    assert check_mounted_model(str(model_dir), str(tmp_path / "absent")) == ""
    env = {**os.environ, "BINCOUNTER_MODEL_DIR": str(model_dir), "BINCOUNTER_MOUNTED_MODEL": str(other)}
    proc = subprocess.run([sys.executable, str(SERVER), "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: this image serves model")
    env["BINCOUNTER_MOUNTED_MODEL"] = str(tmp_path / "absent")
    env["MLFLOW_MODELS_WORKERS"] = "0"
    proc = subprocess.run([sys.executable, str(SERVER), "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: MLFLOW_MODELS_WORKERS must be at least 1, got 0"


# ------------------------------------------------------------------ the image itself (Docker)


def _docker_skip_reason() -> str:
    problem = image.docker_available()
    if problem:
        return f"no Docker daemon answers ({problem[:80]})"
    base = os.environ.get("BINCOUNTER_TEST_BASE", "local/python:3.11-slim")
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True, check=False).returncode != 0:
        return f"base image {base} missing (run docker-local-base.sh, see scripts/check-serving-image.sh)"
    return ""


@pytest.mark.docker
def test_image_built_offline_serves_like_sagemaker_runs_it(trained, tmp_path, request):
    if "docker" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("builds a ~7 GB image for minutes: select it with -m docker")
    reason = _docker_skip_reason()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_serving_image

    tag = "bincounter-serving:pytest"
    wheels = os.environ.get("BINCOUNTER_WHEELS", str(Path(os.environ.get("TMPDIR", "/tmp")) / "bincounter-wheels"))
    cmd = [sys.executable, "-m", "bincounter", "deploy", "build-image", "--model", "models:/bin-counter@champion",
           "--tag", tag, "--base", os.environ.get("BINCOUNTER_TEST_BASE", "local/python:3.11-slim"),
           "--wheels", wheels, "--set", f"mlflow.tracking_uri={trained['tracking_uri']}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["tracking_uri"]}
    env.pop("AWS_ENDPOINT_URL", None)
    build = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=False)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    figures = check_serving_image.check(tag, trained["tracking_uri"], "models:/bin-counter@champion",
                                        container="bincounter-pytest")
    assert figures["images"] == 48 and figures["cold_start_s"] < 60
