"""The serving image (`bincounter deploy build-image`): size, cold start, latency and throughput inside the
container vs the same pyfunc in-process.

    python benchmarks/bench_serving_image.py --image bincounter-serving:check [--arch resnet34] [--requests 30]
                                             [--batches 6] [--starts 3]

- image size: `docker image inspect` (the sum of its layers).
- cold start: `docker run -d --network none IMAGE serve` until the first `GET /ping` 200, polled through
  `docker exec` (the container has no network, as on SageMaker with network isolation); median of --starts
  runs, for the model baked into the image, and for a model of the real architecture (--arch, 224 px input,
  256 px stored, random weights - weights do not change the cost) mounted into the same image and served
  with BINCOUNTER_MODEL_DIR, so the figures hold for a production-sized network.
- latency and throughput: a client inside the container (urllib, loopback) sends --requests one-image requests
  (p50/p99) and --batches requests of 64 images (images/s), real ABID photos from tests/fixtures; in-process,
  the same pyfunc is loaded on this machine and called with the same DataFrames. Same machine, same cores,
  default threads on both sides (torch: all cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fetch import cpu_model  # noqa: E402
from bench_serving import body, build_model, images_b64  # noqa: E402

CLIENT = r"""
import json, sys, time, urllib.request
spec = json.load(sys.stdin)
def post(data):
    req = urllib.request.Request("http://127.0.0.1:8080/invocations", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as resp:
        assert resp.status == 200
        return resp.read()
one, batch = spec["one"].encode(), spec["batch"].encode()
for _ in range(3):
    post(one)
post(batch)
lat = []
for _ in range(spec["requests"]):
    t = time.perf_counter(); post(one); lat.append(time.perf_counter() - t)
t = time.perf_counter()
for _ in range(spec["batches"]):
    post(batch)
print(json.dumps({"latency": lat, "batch_seconds": time.perf_counter() - t}))
"""


def docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, **kwargs)


def ping(container: str) -> bool:
    code = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=2)"
    return docker("exec", container, "python3", "-c", code, check=False).returncode == 0


def cold_start(image: str, name: str, extra: list[str]) -> tuple[float, float]:
    """-> (seconds `docker create` took, seconds from `docker start` to the first /ping 200)."""
    docker("rm", "-f", name, check=False)
    start = time.perf_counter()
    docker("create", "--name", name, "--network", "none", *extra, image, "serve")
    created = time.perf_counter() - start
    start = time.perf_counter()
    docker("start", name)
    while time.perf_counter() - start < 300:
        if ping(name):
            return created, time.perf_counter() - start
        if docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
            raise SystemExit(f"container stopped: {docker('logs', name, check=False).stderr[-800:]}")
        time.sleep(0.1)
    raise SystemExit("no /ping within 300 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_container(name: str, requests: int, batches: int) -> dict:
    spec = {"one": body(images_b64(1)).decode(), "batch": body(images_b64(64)).decode(),
            "requests": requests, "batches": batches}
    out = docker("exec", "-i", name, "python3", "-c", CLIENT, input=json.dumps(spec), timeout=3600).stdout
    result = json.loads(out)
    return {"p50_ms": 1000 * percentile(result["latency"], 0.5), "p99_ms": 1000 * percentile(result["latency"], 0.99),
            "batch64_images_per_s": 64 * batches / result["batch_seconds"]}


def in_process(model_uri: str, tracking_uri: str, requests: int, batches: int) -> dict:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    one, batch = pd.DataFrame({"image": images_b64(1)}), pd.DataFrame({"image": images_b64(64)})
    for _ in range(3):
        model.predict(one)
    model.predict(batch)
    latency = []
    for _ in range(requests):
        start = time.perf_counter()
        model.predict(one)
        latency.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(batches):
        model.predict(batch)
    seconds = time.perf_counter() - start
    return {"p50_ms": 1000 * percentile(latency, 0.5), "p99_ms": 1000 * percentile(latency, 0.99),
            "batch64_images_per_s": 64 * batches / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="bincounter-serving:check")
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    cpu = cpu_model()
    size = int(docker("image", "inspect", args.image, "--format", "{{.Size}}").stdout.strip())
    print(f"machine: {cpu}; image {args.image}: {size / 2**30:.2f} GiB", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    model_uri, tracking_uri = build_model(work, args.arch, 224, 256)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mounted = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(work / "served"))
    name = "bincounter-bench"
    runs = {"baked model": [], f"{args.arch} model": []}
    mount = ["-v", f"{mounted}:/opt/bench-model:ro", "-e", "BINCOUNTER_MODEL_DIR=/opt/bench-model"]
    for label, extra in zip(runs, ([], mount)):
        runs[label] = [cold_start(args.image, name, extra) for _ in range(args.starts)]
        starts = [s for _, s in runs[label]]
        print(f"cold start (docker start -> /ping 200), {label}: median {statistics.median(starts):.1f} s (runs: "
              f"{', '.join(f'{s:.1f}' for s in starts)}); docker create took "
              f"{', '.join(f'{c:.1f}' for c, _ in runs[label])} s", flush=True)
    baked = [s for _, s in runs["baked model"]]
    big = [s for _, s in runs[f"{args.arch} model"]]
    try:
        container = in_container(name, args.requests, args.batches)
    finally:
        docker("rm", "-f", name, check=False)
    local = in_process(model_uri, tracking_uri, args.requests, args.batches)
    print(f"{args.arch} 224 px, {args.requests} one-image requests, {args.batches} x 64-image batches:")
    print("| path | 1 image p50 ms | 1 image p99 ms | batch 64 images/s |")
    print("|---|---|---|---|")
    for label, figures in (("container (HTTP + JSON)", container), ("in-process pyfunc", local)):
        print(f"| {label} | {figures['p50_ms']:.0f} | {figures['p99_ms']:.0f} | "
              f"{figures['batch64_images_per_s']:.1f} |")
    ratio = container["batch64_images_per_s"] / local["batch64_images_per_s"]
    print(f"batch-64 throughput container / in-process: {ratio:.2f}x (target >= 0.7x); cold start target <= 30 s: "
          f"{'met' if statistics.median(big) <= 30 else 'missed'}")
    print(json.dumps({"image_bytes": size, "cold_start_baked_s": baked, "cold_start_arch_s": big,
                      "create_s": [c for r in runs.values() for c, _ in r],
                      "container": container, "in_process": local, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
