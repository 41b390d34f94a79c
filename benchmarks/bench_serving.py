"""Serving cost: `mlflow models serve` (HTTP + JSON + the pyfunc) vs the same pyfunc called in-process.

    python benchmarks/bench_serving.py [--model models:/bin-counter@champion --tracking-uri sqlite:///mlflow.db]
                                       [--arch resnet34] [--rounds 2] [--requests 20] [--images-per-batch-size 64] [--threads N]

Without --model it logs a model of the real architecture (params.yaml defaults: resnet34, 224 px input,
256 px stored size, random weights - weights do not change the cost) into a temporary MLflow store.
Requests carry real ABID photos from tests/fixtures (base64 JPEG, ~50 KB each), cycled as needed.

Measures, for both paths: latency p50/p99 of one-image requests, and throughput (images/s) for
batches of 1, 8 and 64; plus the peak RSS of the serving process (the uvicorn worker's VmHWM).
Both paths are loaded side by side and measured in alternating rounds (see `measure`).
The server runs with --env-manager local --workers 1; client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_fetch import free_port, stop  # this folder is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "abid" / "bin-images"
BATCH_SIZES = (1, 8, 64)


def build_model(workdir: Path, arch: str, image_size: int, stored_size: int) -> tuple[str, str]:
    """Log (and register) a bincounter pyfunc with random weights; returns (model URI, tracking URI)."""
    import mlflow

    from bincounter.model import build_model as build_net
    from bincounter.model import save_model_dir
    from bincounter.serving.pyfunc import log_pyfunc

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("bench-serving")  # artifacts land under ./mlruns of the cwd: workdir
    model_dir = save_model_dir(build_net(arch, 6).eval(), workdir / "model", {
        "arch": arch, "max_count": 5, "image_size": image_size, "stored_size": stored_size, "loss": "emd"})
    with mlflow.start_run(run_name="bench-serving"):
        log_pyfunc(model_dir, images_b64(1)[0], registered_model_name="bench-bin-counter")
    return "models:/bench-bin-counter/1", tracking_uri


def images_b64(n: int) -> list[str]:
    files = sorted(IMAGES.glob("*.jpg"))
    return [base64.b64encode(files[i % len(files)].read_bytes()).decode("ascii") for i in range(n)]


def body(images: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}).encode()


# ------------------------------------------------------------------ the two paths


class InProcess:
    def __init__(self, model_uri: str):
        import mlflow
        import pandas as pd

        self.pd = pd
        self.model = mlflow.pyfunc.load_model(model_uri)

    def __call__(self, images: list[str]) -> int:
        return len(self.model.predict(self.pd.DataFrame({"image": images})))


class Server:
    def __init__(self, model_uri: str, tracking_uri: str, log: Path, threads: int | None = None):
        self.port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # torch's intra-op pool
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(self.port), "-w", "1"]
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = self._wait(log)

    def _wait(self, log: Path) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < 180:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/ping", timeout=1)
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.2)
        raise SystemExit("server did not start in 180 s")

    def __call__(self, images: list[str]) -> int:
        request = urllib.request.Request(self.url + "/invocations", data=body(images),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return len(json.loads(response.read())["predictions"])

    def peak_rss_mb(self) -> dict:
        """VmHWM (peak resident set) of the launcher and of the uvicorn worker that holds the model."""
        import psutil

        parent = psutil.Process(self.proc.pid)
        peaks = {}
        for proc in [parent, *parent.children(recursive=True)]:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
            peaks["worker" if "uvicorn" in " ".join(proc.cmdline()) else "launcher"] = int(hwm.split()[1]) / 1024
        return peaks

    def stop(self) -> None:
        stop(self.proc, timeout=20, group=True)


# ------------------------------------------------------------------ measurements


def latency_samples(call, image: list[str], requests: int) -> list[float]:
    call(image)  # warm
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        call(image)
        times.append((time.perf_counter() - start) * 1000)
    return times


def percentiles(times: list[float]) -> dict:
    times = sorted(times)

    def pick(q: float) -> float:  # nearest rank
        return round(times[min(len(times) - 1, round(q * (len(times) - 1)))], 1)

    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "requests": len(times)}


def throughput(call, images: list[str], batch: int, total: int) -> float:
    batches = max(1, total // batch)
    start = time.perf_counter()
    done = sum(call(images[:batch]) for _ in range(batches))
    return done / (time.perf_counter() - start)


def measure(paths: dict, args) -> dict:
    """Rounds alternate between the paths, so a burst of load from elsewhere hits both alike. Throughput is
    the best round (least disturbed); latency percentiles pool every round's requests."""
    images = images_b64(max(BATCH_SIZES))
    samples = {name: [] for name in paths}
    best = {name: {b: 0.0 for b in BATCH_SIZES} for name in paths}
    for round_ in range(args.rounds):
        for name, call in paths.items():
            samples[name] += latency_samples(call, images[:1], args.requests)
            for batch in BATCH_SIZES:
                rate = throughput(call, images, batch, args.images_per_batch_size)
                best[name][batch] = max(best[name][batch], rate)
                print(f"round {round_ + 1} {name:>10} batch {batch:>2}: {rate:7.2f} images/s", flush=True)
    return {name: {"latency_1_image": percentiles(samples[name]),
                   **{f"batch_{b}_images_per_s": round(best[name][b], 2) for b in BATCH_SIZES}}
            for name in paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model URI to serve (default: log a random-weight model of --arch)")
    parser.add_argument("--tracking-uri", help="tracking URI holding --model")
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--stored-size", type=int, default=256)
    parser.add_argument("--requests", type=int, default=20, help="one-image requests per round (latency)")
    parser.add_argument("--images-per-batch-size", type=int, default=64, help="images per batch size per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both paths")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both paths (default: torch's own, one per core)")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model:
            model_uri, tracking_uri = args.model, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        else:
            os.chdir(workdir)  # the new experiment's artifacts go to ./mlruns: keep them in the temp folder
            model_uri, tracking_uri = build_model(workdir, args.arch, args.image_size, args.stored_size)
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        report = {"model": model_uri, "arch": args.arch if not args.model else "given",
                  "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "mlflow": mlflow.__version__}
        server = Server(model_uri, tracking_uri, workdir / "serve.log", args.threads)
        try:
            report["server_start_s"] = round(server.started, 1)
            report.update(measure({"in_process": InProcess(model_uri), "server": server}, args))
            report["server_peak_rss_mb"] = {k: round(v) for k, v in server.peak_rss_mb().items()}
        finally:
            server.stop()
            os.chdir(ROOT)
    report["server_vs_in_process"] = {
        f"batch_{b}": round(report["server"][f"batch_{b}_images_per_s"]
                            / report["in_process"][f"batch_{b}_images_per_s"], 2) for b in BATCH_SIZES}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
