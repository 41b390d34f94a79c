"""Build the serving image from a tiny model and check it the way SageMaker runs it (scripts/check-serving-image.sh).

1. trains a tiny model on the fixture photos (resnet18, weights=None, 64 px) into a temp MLflow store, unless
   --model/--tracking-uri name one;
2. `bincounter deploy build-image --model URI --tag TAG --base BASE --wheels DIR`;
3. `docker run --network none IMAGE serve` and, through `docker exec` (the container has no network):
   /ping answers, every fixture JPEG gets the count the in-process model gives, a body that is not JSON, a
   non-image and a missing column get 4xx, and the server still answers afterwards.
Prints one line per check and exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "abid"

# runs inside the container: reads [{"method", "path", "type", "body"(base64)}] on stdin, prints the answers
CLIENT = r"""
import base64, json, sys, urllib.request, urllib.error
out = []
for r in json.load(sys.stdin):
    req = urllib.request.Request("http://127.0.0.1:8080" + r["path"], method=r["method"],
                                 data=base64.b64decode(r["body"]) if r.get("body") is not None else None,
                                 headers={"Content-Type": r.get("type", "application/json")})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            out.append({"status": resp.status, "body": resp.read().decode()})
    except urllib.error.HTTPError as e:
        out.append({"status": e.code, "body": e.read().decode()})
    except Exception as e:
        out.append({"status": 0, "body": repr(e)})
print(json.dumps(out))
"""


def train_tiny_model(root: Path) -> tuple[str, str]:
    """The conftest `trained` model: fixtures fetched, split, prepared at 72 px, resnet18 64 px, 2 epochs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import config_on, make_config

    from bincounter.data.fetch import fetch
    from bincounter.data.prepare import prepare
    from bincounter.data.split import split
    from bincounter.training.run import data_dirs_for, run_training

    prepared = root / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    (root / "trained").mkdir(exist_ok=True)
    config = make_config(prepared)
    fetch(config.data)
    split(config)
    prepare(config)
    config = config_on(prepared, root / "trained", **{"train.epochs": 2, "train.profile_steps": 0})
    run_training(config, data_dirs_for(config))
    return config.mlflow.tracking_uri, "models:/bin-counter@champion"


def requests_in_container(container: str, requests: list[dict]) -> list[dict]:
    proc = subprocess.run(["docker", "exec", "-i", container, "python3", "-c", CLIENT], input=json.dumps(requests),
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"docker exec failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def invocation(images: list[str]) -> dict:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}).encode()
    return {"method": "POST", "path": "/invocations", "body": base64.b64encode(body).decode()}


def wait_for_ping(container: str, timeout: float = 120.0) -> float:
    """Seconds from now until GET /ping answers 200 inside the container."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            answer = requests_in_container(container, [{"method": "GET", "path": "/ping"}])[0]
        except RuntimeError:
            answer = {"status": 0}
        if answer["status"] == 200:
            return time.perf_counter() - start
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", container], capture_output=True,
                               text=True, check=False).stdout.strip()
        if state != "true":
            logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, check=False)
            raise RuntimeError(f"the container stopped: {(logs.stdout + logs.stderr).strip()[-1500:]}")
        time.sleep(0.2)
    raise RuntimeError(f"/ping did not answer 200 within {timeout:.0f}s")


def start_container(image: str, name: str, extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """`docker run --network none IMAGE serve`, as `docker create` + `docker start`;
    -> (seconds to create the container, seconds from start to the first /ping 200 = the cold start).
    Creating is a copy of the whole image with the vfs storage driver, instant with overlayfs (SageMaker)."""
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    start = time.perf_counter()
    subprocess.run(["docker", "create", "--name", name, "--network", "none", *extra, image, "serve"], check=True,
                   capture_output=True)
    created = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["docker", "start", name], check=True, capture_output=True)
    return created, (time.perf_counter() - start) + wait_for_ping(name)


def in_process_counts(tracking_uri: str, model_uri: str, images: list[str]) -> list[int]:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    return [int(c) for c in model.predict(pd.DataFrame({"image": images}))["count"]]


def check(image: str, tracking_uri: str, model_uri: str, container: str = "bincounter-check") -> dict:
    """Run the image and check the SageMaker contract; -> figures. Raises AssertionError on a failed check."""
    paths = sorted((FIXTURES / "bin-images").glob("*.jpg"))
    images = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    try:
        created, cold = start_container(image, container)
        print(f"ok   /ping 200 {cold:.1f} s after docker start (docker run --network none {image} serve; "
              f"creating the container took {created:.1f} s)")
        bad_json = {"method": "POST", "path": "/invocations", "body": base64.b64encode(b"{not json").decode()}
        not_image = invocation([base64.b64encode(b"these bytes are not a photo").decode()])
        no_column = {"method": "POST", "path": "/invocations", "body": base64.b64encode(json.dumps(
            {"dataframe_split": {"columns": ["photo"], "data": [[images[0]]]}}).encode()).decode()}
        raw = {"method": "POST", "path": "/invocations", "type": "image/jpeg", "body": images[0]}
        answers = requests_in_container(container, [invocation(images), bad_json, not_image, no_column, raw,
                                                    {"method": "GET", "path": "/ping"}, invocation(images[:1])])
        served, bad, non_image, missing, raw_answer, ping, again = answers
        assert served["status"] == 200, served
        counts = [int(p["count"]) for p in json.loads(served["body"])["predictions"]]
        expected = in_process_counts(tracking_uri, model_uri, images)
        assert counts == expected, f"container counts {counts} != in-process {expected}"
        print(f"ok   {len(images)} fixture photos: the container's counts equal the in-process model's "
              f"(distribution {dict(sorted({c: counts.count(c) for c in set(counts)}.items()))})")
        for label, answer in (("not JSON", bad), ("not an image", non_image), ("no 'image' column", missing)):
            assert 400 <= answer["status"] < 500, (label, answer)
            message = json.loads(answer["body"]).get("message", "")
            print(f"ok   {label}: HTTP {answer['status']} {message[:90]!r}")
        assert raw_answer["status"] == 200 and json.loads(raw_answer["body"])["predictions"][0]["count"] == counts[0]
        print("ok   a raw image/jpeg body (batch transform) is counted as one row")
        assert ping["status"] == 200 and again["status"] == 200, (ping, again)
        print("ok   still serving after the bad requests (/ping 200, a new prediction 200)")
        return {"cold_start_s": cold, "create_s": created, "images": len(images)}
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="bincounter-serving:check")
    parser.add_argument("--base", default="local/python:3.11-slim")
    parser.add_argument("--wheels", default=str(Path(tempfile.gettempdir()) / "bincounter-wheels"))
    parser.add_argument("--model", default=None, help="model URI (default: train a tiny one)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--skip-build", action="store_true", help="check an image built before")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bincounter-check-"))
    if args.model:
        tracking_uri, model_uri = args.tracking_uri, args.model
    else:
        tracking_uri, model_uri = train_tiny_model(work)
        print(f"ok   trained a tiny model: {model_uri} in {tracking_uri}")
    if not args.skip_build:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "bincounter", "deploy", "build-image", "--model", model_uri, "--tag", args.tag,
               "--base", args.base, "--wheels", args.wheels, "--set", f"mlflow.tracking_uri={tracking_uri}"]
        env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": tracking_uri}
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            print("FAIL build-image")
            return 1
        print(f"ok   built {args.tag} in {time.perf_counter() - start:.0f} s")
    try:
        figures = check(args.tag, tracking_uri, model_uri)
    except (AssertionError, RuntimeError) as exc:
        print(f"FAIL {exc}")
        return 1
    print(f"all checks passed ({json.dumps(figures)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
