"""The data pipeline at scale: every stage on N bins of real ABID photos served by a local S3 emulator.

    python benchmarks/bench_scale.py --bins 5000 [--bins 50000 ...] \
        [--sources ../shared/abid-sample /tmp/abid-more] [--latency-bins 2000 --latency-ms 30] [--out DIR]

Starts moto_server on a free 127.0.0.1 port (stopped by PID at the end, also on error or Ctrl-C) and fills a
public-read bucket aft-vbi-pds with real ABID photos + metadata under new ids: the real bins (the sources
merged, first source wins on a repeated id, sorted by numeric id) are cycled, and bin n of the bucket gets id
f"{n:06d}", so neighbouring new ids are neighbouring real ids (the same pod, as split's groups expect);
--full-size-only leaves out the photos that were shrunk to 224x224 before they reached /tmp/abid-more. The
upload (threads, boto3 put_object) is setup and timed on its own. With several --bins the bucket only grows:
each size tops it up, then runs the pipeline in a fresh project.

Each size runs in a throwaway git + DVC project (the repo's dvc.yaml, src/ copied for DVC's dependency hashes,
a params.yaml that is the repo's with data.subset=all, data.max_candidates=0 and sync.s3_uri on the emulator):

  catalog, fetch, split, prepare, sync   `python -m bincounter <stage> --params params.yaml`, one subprocess each
  dvc commit -f                          DVC hashes every stage's outputs and copies them into .dvc/cache
                                         (what `dvc repro` does after each stage; here timed on its own)
  dvc push                               to an emulated S3 remote (a second bucket on the same moto_server)
  dvc push -j J                          with --push-jobs: the push again into an empty remote folder, J jobs

Per stage: wall seconds of the subprocess (interpreter start and imports included), the seconds the stage
reports itself where it prints them (catalog, fetch, prepare), bins handled and bins/s (from the wall time),
CPU seconds of the stage (user+sys of the process and its children, from os.wait4), CPU seconds the emulator
spent meanwhile, bytes and files of its output, and peak RSS two ways, both sampled every 0.2 s with psutil
over the stage process and its children (the tree's RSS is also kept once a second in the JSON,
rss_series_mb, to tell a plateau from growth): `largest process` = the highest VmHWM (a process's own peak RSS
since its exec) of any one of them, `process tree` = the highest sum of their current RSS (forked pool workers
share pages, so the sum overstates what they use together). ru_maxrss is recorded too but is not the figure:
a child started by fork/vfork + exec inherits the launching process's peak as its ru_maxrss.

With --latency-bins L, a latency pass follows: catalog (data.max_candidates=L, a seeded random sample of the
bucket) and fetch run again in a fresh folder, through a local TCP proxy that holds every request
--latency-ms before passing it to moto (LatencyProxy from bench_fetch.py), and straight through the proxy
with no delay, to separate S3's first-byte latency from the proxy's own cost; once per --latency-workers
value (data.workers; default --workers).

Results: a markdown table per size on stdout, and with --out DIR, DIR/scale-<bins>.json (every figure) and
DIR/logs/ (each stage's output). Nothing reaches the network; only --workdir (a temp folder) is written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import psutil
import yaml
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_fetch import LatencyProxy, cpu_model, start_moto, stop  # noqa: E402

SOURCE_BUCKET = "aft-vbi-pds"
SYNC_BUCKET = "bincounter-sync"
DVC_BUCKET = "bincounter-dvc"
STAGES = ("catalog", "fetch", "split", "prepare", "sync")
FULL_ABID = 536_434


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


# ---------------------------------------------------------------- the source bucket


def real_bins(sources: list[Path], full_size_only: bool = False) -> list[tuple[Path, Path]]:
    """(photo, metadata) of every real bin in the sources, first source wins on a repeated id, in numeric id order.
    full_size_only: skip rows whose labels.csv says full_size=0 (abid-more holds photos a Kaggle uploader
    shrank to 224x224; the bucket's photos are full size)."""
    found: dict[str, tuple[Path, Path]] = {}
    for source in sources:
        with open(source / "labels.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                image_id = row["image_id"]
                if full_size_only and row.get("full_size", "1") == "0":
                    continue
                photo, meta = source / "bin-images" / f"{image_id}.jpg", source / "metadata" / f"{image_id}.json"
                if image_id not in found and photo.is_file() and meta.is_file():
                    found[image_id] = (photo, meta)
    return [found[i] for i in sorted(found, key=lambda i: (int(i), i) if i.isdigit() else (1 << 62, i))]


def public_read(client, bucket: str) -> None:
    """Like the real aft-vbi-pds: anyone may list and read (bincounter reads it unsigned)."""
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))


def top_up(client, real: list[tuple[Path, Path]], have: int, want: int, threads: int) -> dict:
    """Upload bins have..want-1 (ids f"{n:06d}", cycling through the real bins); -> timing of this setup step."""
    def put(n: int) -> int:
        photo, meta = real[n % len(real)]
        nbytes = 0
        for key, path in ((f"bin-images/{n:06d}.jpg", photo), (f"metadata/{n:06d}.json", meta)):
            data = path.read_bytes()
            client.put_object(Bucket=SOURCE_BUCKET, Key=key, Body=data)
            nbytes += len(data)
        return nbytes

    start, total = time.perf_counter(), 0
    todo = iter(range(have, want))
    with ThreadPoolExecutor(threads) as pool, tqdm(total=want - have, desc="uploading bins", unit="bin",
                                                   mininterval=2) as bar:
        pending = {pool.submit(put, n) for _, n in zip(range(4 * threads), todo)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                total += future.result()
                bar.update()
                following = next(todo, None)
                if following is not None:
                    pending.add(pool.submit(put, following))
    seconds = time.perf_counter() - start
    return {"bins": want - have, "objects": 2 * (want - have), "bytes": total, "seconds": seconds,
            "bins_per_s": (want - have) / max(seconds, 1e-9)}


# ---------------------------------------------------------------- measuring one stage


class Measured:
    """Runs a command to completion; wall time, CPU time and peak RSS of it and its children."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, log: Path, emulator: psutil.Process):
        self.cmd, self.cwd, self.env, self.log, self.emulator = cmd, cwd, env, log, emulator

    def run(self) -> dict:
        load = os.getloadavg()[0]
        emu_cpu = _cpu(self.emulator)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.log, "wb") as log:
            proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()
        peak = {"tree": 0, "processes": 0, "series": [], "start": start}
        sampler = threading.Thread(target=self._sample, args=(proc.pid, done, peak), daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        sampler.join()
        result = {"cmd": " ".join(self.cmd), "rc": proc.returncode, "seconds": seconds,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "emulator_cpu_s": _cpu(self.emulator) - emu_cpu,
                  "rss_max1_mb": peak.get("hwm", 0) / 2**20, "rss_tree_mb": peak["tree"] / 2**20,
                  "ru_maxrss_mb": usage.ru_maxrss / 1024, "in_stage_s": _own_seconds(self.log),
                  "processes": peak["processes"], "load_before": load,
                  "emulator_rss_mb": _rss(self.emulator) / 2**20, "log": str(self.log),
                  "rss_series_mb": peak["series"]}
        if proc.returncode:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{result['cmd']} exited {proc.returncode}; its log {self.log} ends:\n{tail}")
        return result

    @staticmethod
    def _sample(pid: int, done: threading.Event, peak: dict) -> None:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not done.is_set():
            rss, alive = 0, 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                procs = []
            for proc in procs:
                with contextlib.suppress(psutil.Error, OSError, ValueError):
                    rss += proc.memory_info().rss
                    alive += 1
                    peak["hwm"] = max(peak.get("hwm", 0), _hwm(proc.pid))
            peak["tree"] = max(peak["tree"], rss)
            peak["processes"] = max(peak["processes"], alive)
            now = time.perf_counter() - peak["start"]
            if not peak["series"] or now - peak["series"][-1][0] >= 1.0:  # RSS over time, once a second
                peak["series"].append((round(now, 1), round(rss / 2**20, 1)))
            done.wait(0.2)


def _hwm(pid: int) -> int:
    """VmHWM: the process's peak RSS since its exec, in bytes. (ru_maxrss is no use here: a child spawned by
    fork/vfork + exec starts with the launching process's peak RSS as its ru_maxrss.)"""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _own_seconds(log: Path) -> float | None:
    """The seconds the stage reports itself (catalog, fetch, prepare: without interpreter start and imports)."""
    import re

    for line in reversed(log.read_text(errors="replace").splitlines()):
        found = re.match(r"(catalog|fetch|prepare): .* in ([0-9.]+) ?s", line.split("\r")[-1])
        if found:
            return float(found.group(2))
    return None


def _cpu(proc: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = proc.cpu_times()
        return times.user + times.system
    return 0.0


def _rss(proc: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return proc.memory_info().rss
    return 0


def disk(path: Path) -> tuple[int, int]:
    """(bytes, regular files) under path (a file or a folder)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, 1
    nbytes = nfiles = 0
    for root, _, names in os.walk(path):
        for name in names:
            full = Path(root) / name
            if full.is_file() and not full.is_symlink():
                nbytes += full.stat().st_size
                nfiles += 1
    return nbytes, nfiles


def bucket_usage(client, bucket: str, prefix: str) -> tuple[int, int]:
    """(bytes, objects) under s3://bucket/prefix."""
    nbytes = nobjects = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            nbytes += obj["Size"]
            nobjects += 1
    return nbytes, nobjects


# ---------------------------------------------------------------- one project, one size


def make_project(root: Path, overrides: dict, remote_url: str | None, endpoint: str) -> Path:
    """A throwaway git + DVC project: the repo's dvc.yaml, its src/ (DVC hashes it as the stages' deps), and
    the repo's params.yaml with `overrides` applied."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "src" / "bincounter", root / "src" / "bincounter",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        params[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "data").mkdir()
    # the `subset` stage's output (dvc.yaml: "subset: <data.subset>", plus the manifest's cksum when a file)
    (root / "data" / "subset.stamp").write_text(f"subset: {params['data']['subset']}\n")
    if remote_url:
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                    ["dvc", "remote", "add", "-d", "emu", remote_url],
                    ["dvc", "remote", "modify", "emu", "endpointurl", endpoint]):
            subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def stage_outputs(project: Path, stage: str, cfg: dict, client) -> dict:
    """What a stage produced: bytes and files/objects, and the bins it handled."""
    if stage == "catalog":
        import pyarrow.parquet as pq

        nbytes, nfiles = disk(project / cfg["data"]["catalog"])
        table = pq.read_table(project / cfg["data"]["catalog"], columns=["status"])
        return {"bytes": nbytes, "files": nfiles, "bins": table.num_rows,
                "catalog_ok": sum(s == "ok" for s in table["status"].to_pylist())}
    if stage == "fetch":
        nbytes, nfiles = disk(project / cfg["data"]["raw_dir"])
        with open(project / cfg["data"]["raw_dir"] / "index.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        ok = sum(r["status"] == "ok" for r in rows)
        shards = len({r["shard"] for r in rows if r["shard"]})
        return {"bytes": nbytes, "files": nfiles, "bins": ok, "shards": shards, "index_rows": len(rows)}
    if stage == "split":
        b1, f1 = disk(project / cfg["split"]["out_dir"])
        b2, f2 = disk(project / cfg["split"]["eda_dir"])
        bins = sum(sum(1 for _ in open(project / cfg["split"]["out_dir"] / f"{s}.csv")) - 1
                   for s in ("train", "val", "test"))
        return {"bytes": b1 + b2, "files": f1 + f2, "bins": bins}
    if stage == "prepare":
        nbytes, nfiles = disk(project / cfg["prepare"]["out_dir"])
        bins = sum(sum(1 for _ in open(project / cfg["prepare"]["out_dir"] / s / "labels.csv")) - 1
                   for s in ("train", "val", "test"))
        shard_bytes = sum(p.stat().st_size for p in (project / cfg["prepare"]["out_dir"]).rglob("*.tar"))
        return {"bytes": nbytes, "files": nfiles, "bins": bins, "shard_bytes": shard_bytes,
                "shards": len(list((project / cfg["prepare"]["out_dir"]).rglob("*.tar")))}
    if stage == "sync":
        bucket, _, prefix = cfg["sync"]["s3_uri"][len("s3://"):].partition("/")
        nbytes, nobjects = bucket_usage(client, bucket, prefix)
        return {"bytes": nbytes, "files": nobjects}
    if stage == "dvc commit":
        nbytes, nfiles = disk(project / ".dvc" / "cache")
        return {"bytes": nbytes, "files": nfiles}
    if stage.startswith("dvc push"):  # "dvc push" -> remote prefix size-N/, "dvc push -j J" -> size-N-jJ/
        suffix = "-j" + stage.split("-j ")[1] if "-j " in stage else ""
        nbytes, nobjects = bucket_usage(client, DVC_BUCKET, f"{project.name}{suffix}/")
        return {"bytes": nbytes, "files": nobjects}
    raise ValueError(stage)


def run_size(bins: int, args, env: dict, work: Path, logs: Path, emulator: psutil.Process, client,
             endpoint: str) -> dict:
    project = make_project(work / f"size-{bins}", {
        "data.subset": "all", "data.max_candidates": 0, "data.workers": args.workers,
        "data.shard_size": args.shard_size, "prepare.image_size": args.image_size,
        "prepare.workers": args.prepare_workers, "sync.s3_uri": f"s3://{SYNC_BUCKET}/size-{bins}",
    }, f"s3://{DVC_BUCKET}/size-{bins}", endpoint)
    cfg = yaml.safe_load((project / "params.yaml").read_text())
    rows = {}
    steps = [(s, [sys.executable, "-m", "bincounter", s, "--params", "params.yaml"]) for s in STAGES]
    if not args.no_dvc:
        steps += [("dvc commit", ["dvc", "commit", "-f", "-q"]), ("dvc push", ["dvc", "push", "-q"])]
        # the same push again to empty remote folders with DVC's transfer jobs set (default: 4 x cores)
        steps += [(f"dvc push -j {j}", ["dvc", "push", "-q", "-j", str(j)]) for j in args.push_jobs]
    for stage, cmd in steps:
        if stage.startswith("dvc push -j"):
            url = f"s3://{DVC_BUCKET}/size-{bins}-j{stage.split('-j ')[1]}"
            subprocess.run(["dvc", "remote", "modify", "emu", "url", url], cwd=project, check=True, capture_output=True)
        print(f"[{bins} bins] {stage} ...", flush=True)
        measured = Measured(cmd, project, env, logs / f"{bins}-{stage.replace(' ', '-')}.log", emulator).run()
        out = stage_outputs(project, stage, cfg, client)
        if stage in ("sync", "dvc commit") or stage.startswith("dvc push"):  # sync moves the prepared bins, DVC all
            out["bins"] = rows["prepare"]["bins"] if stage == "sync" else rows["fetch"]["bins"]
        measured.update(out)
        measured["bins_per_s"] = measured["bins"] / max(measured["seconds"], 1e-9)
        rows[stage] = measured
        print(f"[{bins} bins] {stage}: {measured['seconds']:.1f} s, {measured['bins']} bins, "
              f"{measured['bytes'] / 1e6:.1f} MB in {measured['files']} files, "
              f"RSS max1 {measured['rss_max1_mb']:.0f} MB / tree {measured['rss_tree_mb']:.0f} MB, "
              f"load before {measured['load_before']:.1f}", flush=True)
    total_disk = disk(project)
    result = {"rows": rows, "project_bytes": total_disk[0], "project_files": total_disk[1]}
    if not args.keep:
        shutil.rmtree(project)
    return result


def latency_pass(args, env: dict, work: Path, logs: Path, emulator: psutil.Process, port: int) -> list[dict]:
    """catalog (max_candidates = latency_bins) + fetch through a proxy adding 0 and latency_ms per request,
    at each of --latency-workers."""
    out = []
    for workers, delay_ms in [(w, d) for w in args.latency_workers or [args.workers] for d in (0, args.latency_ms)]:
        proxy = LatencyProxy(port, delay_ms / 1000)
        try:
            project = make_project(work / f"latency-{workers}w-{delay_ms}ms", {
                "data.subset": "all", "data.max_candidates": args.latency_bins, "data.workers": workers,
                "data.shard_size": args.shard_size}, None, "")
            proxied = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
            for stage in ("catalog", "fetch"):
                print(f"[latency {delay_ms} ms, {workers} workers] {stage} ...", flush=True)
                cmd = [sys.executable, "-m", "bincounter", stage, "--params", "params.yaml"]
                log = logs / f"latency-{workers}w-{delay_ms}ms-{stage}.log"
                measured = Measured(cmd, project, proxied, log, emulator).run()
                cfg = yaml.safe_load((project / "params.yaml").read_text())
                measured.update(stage_outputs(project, stage, cfg, None))
                requests = measured["bins"]  # GETs: catalog reads each metadata file, fetch each photo
                own = measured["in_stage_s"] or measured["seconds"]
                measured.update({"stage": stage, "latency_ms": delay_ms, "workers": workers, "requests": requests,
                                 "requests_per_s": requests / own, "bins_per_s": measured["bins"] / own})
                out.append(measured)
                print(f"[latency {delay_ms} ms, {workers} workers] {stage}: {measured['seconds']:.1f} s, "
                      f"{measured['bins']} bins, "
                      f"{measured['requests_per_s']:.0f} GET/s", flush=True)
            if not args.keep:
                shutil.rmtree(project)
        finally:
            proxy.stop()
    return out


# ---------------------------------------------------------------- report


def table(bins: int, upload: dict, result: dict) -> str:
    lines = [f"### {bins:,} bins in the bucket",
             "",
             "| stage | wall s | in-stage s | bins | bins/s | stage CPU s | emulator CPU s | output MB "
             "| files / objects | peak RSS MB, largest process | peak RSS MB, process tree |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| upload (setup, {upload['bins']:,} new bins) | {upload['seconds']:.1f} | | {upload['bins']:,} | "
             f"{upload['bins_per_s']:.0f} | | | {upload['bytes'] / 1e6:,.1f} | {upload['objects']:,} | | |"]
    for stage, r in result["rows"].items():
        own = f"{r['in_stage_s']:.1f}" if r["in_stage_s"] is not None else ""
        lines.append(f"| {stage} | {r['seconds']:.1f} | {own} | {r['bins']:,} | {r['bins_per_s']:.0f} | "
                     f"{r['cpu_s']:.1f} | "
                     f"{r['emulator_cpu_s']:.1f} | {r['bytes'] / 1e6:,.1f} | {r['files']:,} | "
                     f"{r['rss_max1_mb']:.0f} | {r['rss_tree_mb']:.0f} |")
    lines.append(f"\nproject folder at the end: {result['project_bytes'] / 1e9:.2f} GB in "
                 f"{result['project_files']:,} files (workspace + .dvc/cache)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=int, action="append", help="bins in the bucket (repeatable; default 50000)")
    parser.add_argument("--sources", nargs="+", type=Path,
                        default=[REPO.parent / "shared" / "abid-sample", Path("/tmp/abid-more")])
    parser.add_argument("--full-size-only", action="store_true",
                        help="only real bins whose photo is full size (labels.csv full_size != 0)")
    parser.add_argument("--workers", type=int, default=32, help="data.workers (concurrent downloads)")
    parser.add_argument("--shard-size", type=int, default=1000, help="data.shard_size")
    parser.add_argument("--image-size", type=int, default=256, help="prepare.image_size")
    parser.add_argument("--prepare-workers", type=int, default=0, help="prepare.workers (0 = one per core)")
    parser.add_argument("--upload-threads", type=int, default=16)
    parser.add_argument("--latency-bins", type=int, default=0, help="bins of the latency pass (0 = none)")
    parser.add_argument("--latency-ms", type=int, default=30)
    parser.add_argument("--latency-workers", type=int, nargs="+", default=None,
                        help="data.workers values of the latency pass (default: --workers)")
    parser.add_argument("--no-dvc", action="store_true", help="skip dvc commit / dvc push")
    parser.add_argument("--push-jobs", type=int, nargs="+", default=[],
                        help="also time `dvc push -j J` into an empty remote folder for each J")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp folder, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the projects and the workdir")
    parser.add_argument("--out", type=Path, default=None, help="folder for scale-<bins>.json and the stage logs")
    args = parser.parse_args()
    sizes = sorted(set(args.bins or [50000]))

    real = real_bins(args.sources, args.full_size_only)
    if not real:
        raise SystemExit(f"no real bins found in {args.sources}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = (args.out or work) / "logs"
    print(f"machine: {machine()}; load average {os.getloadavg()}; real bins: {len(real)} from "
          f"{', '.join(map(str, args.sources))}; workdir {work}", flush=True)

    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "DVC_NO_ANALYTICS": "1"}
    os.environ.update(aws)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill PID`: the finally below still stops moto
    proc, url = start_moto()
    results: dict = {"machine": machine(), "command": " ".join([sys.executable] + sys.argv), "real_bins": len(real),
                     "real_bytes_per_bin": sum(p.stat().st_size + m.stat().st_size for p, m in real) / len(real),
                     "sizes": {}, "latency": []}
    try:
        os.environ["AWS_ENDPOINT_URL"] = url
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]), "PYTHONUNBUFFERED": "1"}
        emulator = psutil.Process(proc.pid)
        from bincounter.storage import s3_client

        client = s3_client(max_pool_connections=max(10, args.upload_threads))
        client.create_bucket(Bucket=SOURCE_BUCKET)
        public_read(client, SOURCE_BUCKET)
        client.create_bucket(Bucket=SYNC_BUCKET)
        client.create_bucket(Bucket=DVC_BUCKET)
        have = 0
        for bins in sizes:
            upload = top_up(client, real, have, bins, args.upload_threads)
            have = bins
            print(f"[{bins} bins] upload (setup): {upload['bins']} bins, {upload['bytes'] / 1e6:.1f} MB in "
                  f"{upload['seconds']:.1f} s; emulator RSS {_rss(emulator) / 2**20:.0f} MB", flush=True)
            result = run_size(bins, args, env, work, logs, emulator, client, url)
            result["upload"] = upload
            results["sizes"][bins] = result
            print("\n" + table(bins, upload, result) + "\n", flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"scale-{bins}.json").write_text(json.dumps(result, indent=2) + "\n")
        if args.latency_bins:
            results["latency"] = latency_pass(args, env, work, logs, emulator, int(url.rsplit(":", 1)[1]))
            print("\n| data.workers | added latency per request | stage | wall s | in-stage s | bins | GETs "
                  "| GET/s (in-stage) | bins/s (in-stage) | stage CPU s | emulator CPU s |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in results["latency"]:
                print(f"| {r['workers']} | {r['latency_ms']} ms | {r['stage']} | {r['seconds']:.1f} "
                      f"| {r['in_stage_s']} | {r['bins']:,} "
                      f"| {r['requests']:,} | {r['requests_per_s']:.0f} | {r['bins_per_s']:.0f} | {r['cpu_s']:.1f} "
                      f"| {r['emulator_cpu_s']:.1f} |")
            if args.out:
                (args.out / "scale-latency.json").write_text(json.dumps(results["latency"], indent=2) + "\n")
    finally:
        stop(proc)
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        (args.out / "scale-all.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
