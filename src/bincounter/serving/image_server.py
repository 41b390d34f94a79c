"""The serving image's server: MLflow's own scoring server for the baked-in model, started the way
SageMaker starts a container (`docker run IMAGE serve`).

Copied into the image as /opt/bincounter/bincounter_server.py (bincounter itself is not installed there:
the model carries it as code), so it imports nothing but the standard library until it serves, then mlflow.

- Routes, JSON contract and 4xx errors are MLflow's (`mlflow.pyfunc.scoring_server`, what `mlflow models
  serve` runs): GET /ping, /health, /version, POST /invocations.
- One addition: a POST /invocations body that is a JPEG or PNG itself (Content-Type image/jpeg, image/png or
  application/x-image), as SageMaker batch transform sends each photo of an S3 prefix, is scored as one row.
- Environment: SAGEMAKER_BIND_TO_PORT (8080), MLFLOW_MODELS_WORKERS (uvicorn worker processes, 1),
  BINCOUNTER_THREADS (torch threads per worker; default cores / workers), MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
  (seconds, 60), BINCOUNTER_MODEL_DIR (the baked model).
- The image serves the model it was built for. SageMaker also mounts the endpoint's model.tar.gz at
  /opt/ml/model; when that is a different model, the container refuses to start (one line in CloudWatch)
  rather than serve something other than what was deployed.
"""

from __future__ import annotations

import base64
import json
import os
import sys

MODEL_DIR = "/opt/bincounter/model"
MOUNTED_MODEL = "/opt/ml/model"
RAW_IMAGE_TYPES = ("image/jpeg", "image/jpg", "image/png", "application/x-image")


def _model_uuid(model_dir: str) -> str | None:
    try:
        with open(os.path.join(model_dir, "MLmodel")) as handle:
            for line in handle:
                if line.startswith("model_uuid:"):
                    return line.split(":", 1)[1].strip().strip("'\"")
    except OSError:
        return None
    return ""


def check_mounted_model(model_dir: str, mounted: str = MOUNTED_MODEL) -> str:
    """"" when /opt/ml/model is absent or holds the baked model; else why the container must not serve."""
    there = _model_uuid(mounted)
    if there is None:
        return ""
    ours = _model_uuid(model_dir)
    if there and ours and there != ours:
        return (f"this image serves model {ours} but SageMaker mounted model {there} at {mounted}: build an image "
                "for that model (bincounter deploy build-image) or deploy the model this image was built for")
    return ""


def settings(environ=os.environ) -> dict:
    """Port, workers and threads from the environment, checked; -> {"port", "workers", "threads"}."""
    def number(name: str, default: int, low: int) -> int:
        raw = environ.get(name, "").strip() or str(default)
        try:
            value = int(raw)
        except ValueError:
            raise SystemExit(f"error: {name}={raw!r} is not a whole number") from None
        if value < low:
            raise SystemExit(f"error: {name} must be at least {low}, got {value}")
        return value

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = number("MLFLOW_MODELS_WORKERS", 1, 1)
    threads = number("BINCOUNTER_THREADS", max(1, cores // workers), 1)
    return {"port": number("SAGEMAKER_BIND_TO_PORT", 8080, 1), "workers": workers, "threads": threads}


def serve(argv: list[str]) -> None:
    """`serve`: check the mounted model, then exec uvicorn on this module's app."""
    model_dir = os.environ.get("BINCOUNTER_MODEL_DIR", MODEL_DIR)
    if not os.path.exists(os.path.join(model_dir, "MLmodel")):
        raise SystemExit(f"error: no MLflow model at {model_dir} (BINCOUNTER_MODEL_DIR)")
    problem = check_mounted_model(model_dir, os.environ.get("BINCOUNTER_MOUNTED_MODEL", MOUNTED_MODEL))
    if problem:
        raise SystemExit(f"error: {problem}")
    conf = settings()
    threads = str(conf["threads"])
    os.environ.update({"__pyfunc_model_path__": model_dir, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       "MLFLOW_DISABLE_ENV_CREATION": "true"})
    host = os.environ.get("BINCOUNTER_HOST", "0.0.0.0")  # noqa: S104 - a container listens on all interfaces
    print(f"bincounter: serving {model_dir} on {host}:{conf['port']} with {conf['workers']} worker(s) x "
          f"{threads} thread(s)", flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    module = os.path.splitext(os.path.basename(__file__))[0]
    os.execvp(sys.executable, [sys.executable, "-m", "uvicorn", "--host", host, "--port", str(conf["port"]),
                               "--workers", str(conf["workers"]), "--app-dir", here, "--no-access-log",
                               f"{module}:app"])


def _make_app():
    """MLflow's FastAPI app for the model, wrapped to accept raw image bodies."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
    inner = scoring_server.init(model)

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/invocations" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
            if content_type in RAW_IMAGE_TYPES:
                scope, receive = await _as_json_row(scope, receive)
        await inner(scope, receive, send)

    return app


async def _as_json_row(scope, receive):
    """A raw image request rewritten as MLflow's {"dataframe_split": ...} with one base64 row."""
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        more = message.get("more_body", False)
    payload = json.dumps({"dataframe_split": {"columns": ["image"],
                                              "data": [[base64.b64encode(body).decode("ascii")]]}}).encode()
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    delivered = False

    async def replay():
        nonlocal delivered
        if delivered:
            return await receive()  # waits for the client's disconnect, as the original would
        delivered = True
        return {"type": "http.request", "body": payload, "more_body": False}

    return {**scope, "headers": headers}, replay


def __getattr__(name: str):
    if name == "app":  # uvicorn imports "<module>:app": the model loads once per worker, here
        app = _make_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        raise SystemExit(f"usage: serve (SageMaker's contract); got {' '.join(sys.argv[1:]) or 'nothing'}")
    serve(sys.argv[2:])
