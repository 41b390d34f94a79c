"""A real `mlflow models serve` process answering the pyfunc contract, and refusing bad requests with the
status docs/serving.md promises (400, or 415 for a content type it does not take)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import FIXTURES, fixture_b64, free_port, stop_process, wait_for_http

MAX_IMAGE_BYTES = 2**20  # the server under test refuses images above 1 MiB (BINCOUNTER_MAX_IMAGE_BYTES)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(_trained_once, tmp_path_factory):
    """`mlflow models serve -m models:/bin-counter@champion --env-manager local` on a free loopback port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": _trained_once["tracking_uri"],
           "BINCOUNTER_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/bin-counter@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", timeout=120, proc=proc)
    except RuntimeError:
        stop_process(proc, timeout=20, group=True)
        raise RuntimeError(f"mlflow models serve did not start:\n{log_path.read_text()[-3000:]}") from None
    # SIGTERM to the `mlflow models serve` PID stops its uvicorn child; the group we created is the fallback
    yield {"url": url, "proc": proc, "log": log_path}
    stop_process(proc, timeout=20, group=True)


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def split_body(rows, columns=("image",)) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": rows}}


def fixture_ids() -> list[str]:
    return sorted(p.stem for p in (FIXTURES / "bin-images").glob("*.jpg"))


def png_b64(width: int, height: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_counts_every_fixture_image_like_the_model_in_process(server, trained):
    import mlflow
    import pandas as pd

    ids = fixture_ids()
    images = [fixture_b64(i) for i in ids]
    status, answer = post(server["url"], split_body([[b] for b in images]))
    assert status == 200, answer
    served = answer["predictions"]
    assert len(served) == len(ids)

    mlflow.set_tracking_uri(trained["tracking_uri"])
    local = mlflow.pyfunc.load_model("models:/bin-counter@champion").predict(pd.DataFrame({"image": images}))
    for row, (_, expected) in zip(served, local.iterrows()):
        assert set(row) == {"count", "confidence", "probabilities", "expected_count"}
        assert row["count"] == expected["count"]
        assert row["expected_count"] == pytest.approx(expected["expected_count"], abs=1e-4)
        assert len(row["probabilities"]) == 6 and abs(sum(row["probabilities"]) - 1) < 1e-4
        assert row["confidence"] == pytest.approx(max(row["probabilities"]), abs=1e-6)
        np.testing.assert_allclose(row["probabilities"], expected["probabilities"], atol=1e-4)


@pytest.mark.parametrize("body", [
    pytest.param({"dataframe_records": [{"image": "IMG"}]}, id="dataframe_records"),
    pytest.param({"instances": [{"image": "IMG"}]}, id="instances"),  # what `mlflow deployments predict` sends
    pytest.param({"inputs": {"image": ["IMG"]}}, id="inputs"),
])
def test_other_mlflow_request_formats(server, body):
    body = json.loads(json.dumps(body).replace("IMG", fixture_b64("00024")))
    status, answer = post(server["url"], body)
    assert status == 200, answer
    status, reference = post(server["url"], split_body([[fixture_b64("00024")]]))
    assert status == 200, reference
    [row], [expected] = answer["predictions"], reference["predictions"]
    assert row["count"] == expected["count"]
    assert row["confidence"] == pytest.approx(expected["confidence"], abs=1e-6)
    np.testing.assert_allclose(row["probabilities"], expected["probabilities"], atol=1e-6)


BAD_REQUESTS = {
    # name: (body, content type, the status docs/serving.md promises, words the message must contain)
    "not_json": (b"this is not json {", "application/json", 400, "valid JSON"),
    "not_utf8": (b"\xff\xd8\xff\xe0 a JPEG sent raw", "application/json", 400, "valid JSON"),
    "json_list": (b"[1, 2, 3]", "application/json", 400, "dataframe_split"),
    "missing_image_column": (split_body([["abc"]], ["picture"]), "application/json", 400, "missing inputs ['image']"),
    "not_base64": (split_body([["%%% not base64 %%%"]]), "application/json", 400,
                   "row 0: 'image' is not valid base64"),
    "not_an_image": (split_body([[base64.b64encode(b"plain text, no pixels").decode()]]), "application/json", 400,
                     "row 0: not an image"),
    "truncated_jpeg": ("TRUNCATED", "application/json", 400, "row 0: corrupt image"),
    "number_not_string": (split_body([[12345]]), "application/json", 400, "must be a base64 string"),
    "empty_list": (split_body([]), "application/json", 400, "no images in the request"),
    "too_many_rows": (split_body([["x"]] * 1025), "application/json", 400, "send at most 1024"),
    "oversized_image": ("OVERSIZED", "application/json", 400, "at most 1 MiB per image"),
    "decompression_bomb": ("BOMB", "application/json", 400, "megapixels"),
    "wrong_content_type": (b"image=abc", "text/plain", 415, "content types"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_the_documented_status_with_a_message_and_server_keeps_serving(server, name):
    body, content_type, promised, words = BAD_REQUESTS[name]
    if body == "TRUNCATED":
        jpeg = (FIXTURES / "bin-images" / "00024.jpg").read_bytes()
        body = split_body([[base64.b64encode(jpeg[: len(jpeg) // 3]).decode()]])
    elif body == "OVERSIZED":
        body = split_body([[base64.b64encode(os.urandom(MAX_IMAGE_BYTES + 1024)).decode()]])
    elif body == "BOMB":
        body = split_body([[png_b64(8000, 7000)]])  # 56 MP canvas in a ~60 KB file
    status, answer = post(server["url"], body, content_type)
    assert status == promised, (status, answer)
    message = answer["message"] if isinstance(answer, dict) else answer
    assert words in message

    status, answer = post(server["url"], split_body([[fixture_b64("00013")]]))
    assert status == 200 and len(answer["predictions"]) == 1
    assert server["proc"].poll() is None


def test_bad_row_names_its_index_in_a_mixed_batch(server):
    rows = [[fixture_b64("00013")], [fixture_b64("00024")], ["bm90IGFuIGltYWdl"]]
    status, answer = post(server["url"], split_body(rows))
    assert status == 400
    assert "row 2: not an image" in answer["message"]
