"""Fetch throughput: seed-notebook sequential boto3 loop vs bincounter.fetch (thread pool), against moto.

    python benchmarks/bench_fetch.py [--sample ../shared/abid-sample] [--n 600] [--workers 32]

Starts moto_server on a free 127.0.0.1 port (stopped by PID), seeds a public-read bucket aft-vbi-pds
with N images + metadata from the sample, then times (a) a sequential get_object loop writing files and
(b) bincounter.fetch.fetch(data.workers=W) into temp raw dirs. Nothing reaches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "aft-vbi-pds"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = shutil.which("moto_server")
    cmd = ([exe] if exe else [sys.executable, "-m", "moto.server"]) + ["-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("moto_server exited")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None):
                return proc, url
            time.sleep(0.2)
    raise RuntimeError("moto_server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default=str(REPO / ".." / "shared" / "abid-sample"))
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args()
    sample = Path(args.sample)
    ids = sorted(p.stem for p in (sample / "metadata").glob("*.json"))[: args.n]

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    proc, url = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        from bincounter.config import load_config
        from bincounter.fetch import fetch
        from bincounter.storage import s3_client

        client = s3_client()
        client.create_bucket(Bucket=BUCKET)
        client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
        t0 = time.perf_counter()
        nbytes = 0
        for i in ids:
            for key, path in ((f"bin-images/{i}.jpg", sample / "bin-images" / f"{i}.jpg"),
                              (f"metadata/{i}.json", sample / "metadata" / f"{i}.json")):
                data = path.read_bytes()
                nbytes += len(data)
                client.put_object(Bucket=BUCKET, Key=key, Body=data)
        print(f"seeded {len(ids)} images + metadata ({nbytes / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            # (a) the seed notebooks: one boto3 client, one object after another
            out = tmp / "seq"
            (out / "bin-images").mkdir(parents=True)
            (out / "metadata").mkdir(parents=True)
            seq_client = s3_client(unsigned=True)
            t0 = time.perf_counter()
            for i in ids:
                for key in (f"bin-images/{i}.jpg", f"metadata/{i}.json"):
                    body = seq_client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                    (out / key).write_bytes(body)
            seq_s = time.perf_counter() - t0

            # (b) bincounter.fetch with a thread pool (verifies each JPEG, writes atomically + fsync)
            manifest = tmp / "manifest.json"
            manifest.write_text(json.dumps(ids))
            config = load_config(tmp / "none.yaml", {
                "data.source": f"s3://{BUCKET}", "data.subset": str(manifest),
                "data.raw_dir": str(tmp / "raw"), "data.workers": args.workers})
            t0 = time.perf_counter()
            report = fetch(config.data)
            par_s = time.perf_counter() - t0
            assert len(report.ids_with("ok")) == len(ids), "fetch did not get every image"
    finally:
        stop(proc)

    seq_rate, par_rate = len(ids) / seq_s, len(ids) / par_s
    print(f"\nimages: {len(ids)} (each = 1 JPEG + 1 metadata JSON), cpu cores: {os.cpu_count()}")
    print(f"(a) sequential boto3 loop        : {seq_s:6.1f}s  {seq_rate:7.1f} images/s")
    print(f"(b) bincounter.fetch workers={args.workers:<3}: {par_s:6.1f}s  {par_rate:7.1f} images/s")
    print(f"ratio (b)/(a): {par_rate / seq_rate:.2f}x")


if __name__ == "__main__":
    main()
