"""Fetch throughput: seed-notebook sequential boto3 loop vs bincounter's catalog + fetch (thread pools), against moto.

    python benchmarks/bench_fetch.py [--sample ../shared/abid-sample] [--n 600] [--workers 32] [--latency-ms 30]

Starts moto_server on a free 127.0.0.1 port (stopped by PID), seeds a public-read bucket aft-vbi-pds
with N images + metadata from the sample, then times (a) a sequential get_object loop writing files and
(b) bincounter's two stages that bring bins in, each with data.workers=W, into temp dirs: the catalog stage
(build_catalog: one GET per bin's metadata into catalog.parquet), which fetch needs since it reads its query
from the catalog, then fetch (the photo per bin, each JPEG verified, into tar shards renamed into place
whole; the counts come from the catalog). Catalog and fetch are timed separately; (b)'s rate is on their
total, the fair comparison with (a), which also reads every metadata file. Nothing reaches the network.

moto answers from the same CPU cores in microseconds of network time, so the loop here pays none of the
round trip a real S3 GET pays (tens of ms), which is what the thread pool overlaps. With --latency-ms L
(default 30; 0 = skip) both are timed a second time through a local TCP proxy that holds every request
for L ms before passing it to moto: the emulator with S3's first-byte latency.
"""

from __future__ import annotations

import argparse
import contextlib
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


def cpu_model() -> str:
    """lscpu's model name (the machines differ in CPU kind; every benchmark table names it)."""
    import platform

    try:
        return next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


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


def stop(proc: subprocess.Popen, timeout: float = 10.0, group: bool = False) -> None:
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


class LatencyProxy:
    """127.0.0.1 TCP proxy to `port` that delays each chunk the client sends (an HTTP request) by `delay`
    seconds, on its own event loop thread; answers pass straight through."""

    def __init__(self, port: int, delay: float):
        import asyncio
        import threading

        self.target, self.delay, self.port = port, delay, free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=256))
            started.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        started.wait(10)

    async def _connection(self, client_reader, client_writer):
        import asyncio

        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(reader, writer, delay):
            try:
                while data := await reader.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, server_writer, self.delay), pipe(server_reader, client_writer, 0))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def sequential_loop(ids: list[str], out: Path) -> float:
    """The seed notebooks: one boto3 client, one object after another. -> seconds."""
    from bincounter.storage import s3_client

    (out / "bin-images").mkdir(parents=True)
    (out / "metadata").mkdir(parents=True)
    client = s3_client(unsigned=True)
    t0 = time.perf_counter()
    for i in ids:
        for key in (f"bin-images/{i}.jpg", f"metadata/{i}.json"):
            (out / key).write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    return time.perf_counter() - t0


def bincounter_fetch(ids: list[str], root: Path, workers: int) -> tuple[float, float, float, float]:
    """bincounter's catalog stage, then its fetch stage (which reads the catalog's query), each with its thread
    pool; fetch verifies each JPEG and writes tar shards atomically. -> (catalog seconds, fetch seconds,
    catalog CPU seconds, fetch CPU seconds). The CPU is this process's alone (moto is another process), so
    with no added latency it is the client's cost per bin, the limit on a machine next to the bucket."""
    from bincounter.config import build_config
    from bincounter.data.catalog import build_catalog
    from bincounter.data.fetch import fetch

    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(ids))
    # data.max_count at its ceiling: the catalog's query keeps every manifest bin whatever its count, so fetch
    # brings the same N bins the sequential loop reads (the default 5 would drop the sample's fuller bins)
    config = build_config({}, {"data.source": f"s3://{BUCKET}", "data.subset": str(manifest),
                               "data.catalog": str(root / "catalog.parquet"), "data.max_count": 1000,
                               "data.raw_dir": str(root / "raw"), "data.workers": workers})
    t0, c0 = time.perf_counter(), time.process_time()
    build_catalog(config.data)
    t1, c1 = time.perf_counter(), time.process_time()
    report = fetch(config.data)
    t2, c2 = time.perf_counter(), time.process_time()
    assert report.counts["ok"] == len(ids), "fetch did not get every image"
    return t1 - t0, t2 - t1, c1 - c0, c2 - c1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default=str(REPO / ".." / "shared" / "abid-sample"))
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--latency-ms", type=int, default=30, help="S3-like delay per request for the 2nd pass")
    args = parser.parse_args()
    sample = Path(args.sample)
    ids = sorted(p.stem for p in (sample / "metadata").glob("*.json"))[: args.n]

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    proc, url = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
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

        rows = []
        for latency in [0] + ([args.latency_ms] if args.latency_ms else []):
            proxy = LatencyProxy(int(url.rsplit(":", 1)[1]), latency / 1000) if latency else None
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}" if proxy else url
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    seq_s = sequential_loop(ids, Path(tmp) / "seq")
                    cat_s, fetch_s, cat_cpu, fetch_cpu = bincounter_fetch(ids, Path(tmp) / "par", args.workers)
            finally:
                if proxy:
                    proxy.stop()
            rows.append((latency, seq_s, cat_s, fetch_s))
            # with a proxy, its thread's CPU is in this process too: only the no-latency figure is the client's
            print(f"latency {latency} ms: sequential {seq_s:.1f}s, bincounter catalog {cat_s:.1f}s + fetch "
                  f"{fetch_s:.1f}s = {cat_s + fetch_s:.1f}s; client CPU per bin: catalog "
                  f"{1000 * cat_cpu / len(ids):.2f} ms, fetch {1000 * fetch_cpu / len(ids):.2f} ms"
                  f"{' (includes the proxy)' if latency else ''}", flush=True)
    finally:
        stop(proc)

    print(f"\nimages: {len(ids)} (each = 1 JPEG + 1 metadata JSON), cpu cores: {os.cpu_count()}, "
          f"bincounter data.workers (catalog and fetch): {args.workers}")
    print("added latency per request | (a) sequential s | images/s | (b) catalog s | fetch s | total s | "
          "images/s (total) | (b)/(a) total | fetch only / (a)")
    for latency, seq_s, cat_s, fetch_s in rows:
        seq_rate, par_rate, fetch_rate = len(ids) / seq_s, len(ids) / (cat_s + fetch_s), len(ids) / fetch_s
        print(f"{latency:22d} ms | {seq_s:16.2f} | {seq_rate:8.1f} | {cat_s:12.2f} | {fetch_s:7.2f} | "
              f"{cat_s + fetch_s:7.2f} | {par_rate:16.1f} | {par_rate / seq_rate:12.2f}x | "
              f"{fetch_rate / seq_rate:15.2f}x")


if __name__ == "__main__":
    main()
