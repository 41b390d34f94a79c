"""Stage fetch against a real moto_server bucket laid out like s3://aft-vbi-pds: the catalog's query lands in
tar shards under data/raw/shards/."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import catalog_and_fetch, fetched_ok, empty_params, FIXTURES, SOURCE_BUCKET, fixture_labels, make_config, public_read, seed_bucket, write_manifest

from bincounter.cli import main
from bincounter.data import shards
from bincounter.data.catalog import build_catalog
from bincounter.data.fetch import SHARDS, fetch
from bincounter.data.source import read_manifest
from bincounter.errors import BincounterError
from bincounter.storage import s3_client


def s3_config(tmp_path, ids, **overrides):
    return make_config(tmp_path, **{"data.source": f"s3://{SOURCE_BUCKET}",
                                    "data.subset": str(write_manifest(tmp_path / "m.json", ids)), **overrides})


def shard_files(config) -> dict[str, int]:
    """{shard name: mtime} of the raw shards."""
    return {p.name: p.stat().st_mtime_ns for p in shards.shards_in(Path(config.data.raw_dir) / SHARDS)}


def fetched(config) -> dict[str, bytes]:
    """Every member of every raw shard: {<id>.jpg: bytes}."""
    raw = Path(config.data.raw_dir) / SHARDS
    return {name: data for shard in shards.shards_in(raw) for name, data in shards.iter_members(shard)}


def test_fetch_writes_every_bin_into_shards_not_files(aws, tmp_path):
    labels = fixture_labels()
    config = s3_config(tmp_path, seed_bucket())
    ids = sorted(i for i, count in labels.items() if count <= config.data.max_count)  # the catalog's query
    started = time.perf_counter()
    report = catalog_and_fetch(config)
    assert 0 < report.seconds <= time.perf_counter() - started  # the summary line's "in N s"
    assert fetched_ok(config) == ids and report.counts == {"ok": len(ids)}
    members = fetched(config)
    assert set(members) == {f"{i}.jpg" for i in ids}  # the metadata stays in the catalog, read once
    for image_id in ids:
        assert members[f"{image_id}.jpg"] == (FIXTURES / "bin-images" / f"{image_id}.jpg").read_bytes()
    raw = Path(config.data.raw_dir)
    files = sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file())
    assert len(files) == math.ceil(len(ids) / config.data.shard_size) + 1  # the shards and index.csv, no bin files
    index = (raw / "index.csv").read_text().splitlines()
    assert index[0] == "image_id,status,reason,count,shard" and len(index) == len(ids) + 1
    for line in index[1:]:
        image_id, status, _, count, shard = line.split(",")
        assert status == "ok" and int(count) == labels[image_id] and f"{image_id}.jpg" in dict(
            shards.iter_members(raw / SHARDS / shard))


def test_deleting_one_shard_refetches_just_that_shard(aws, tmp_path):
    ids = seed_bucket()
    config = s3_config(tmp_path, ids)
    catalog_and_fetch(config)
    before = shard_files(config)
    victim = sorted(before)[1]
    bins_in_victim = len(shards.read_index(Path(config.data.raw_dir) / SHARDS / victim)["bins"])
    (Path(config.data.raw_dir) / SHARDS / victim).unlink()
    report = fetch(config.data)
    assert report.shards_written == 1 and report.shards_kept == len(before) - 1
    assert report.downloaded_files == bins_in_victim
    after = shard_files(config)
    assert set(after) == set(before)
    assert {n for n in after if after[n] != before[n]} == {victim}


def test_fetch_takes_counts_from_the_catalog_and_a_recount_refetches_its_shard(aws, tmp_path):
    ids = seed_bucket()
    config = s3_config(tmp_path, ids, **{"data.subset": "all"})  # a listing: the catalog compares ETags
    build_catalog(config.data)
    client = s3_client()
    for image_id in ids:  # fetch GETs photos only: the catalog already read every bin's metadata
        client.delete_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{image_id}.json")
    report = fetch(config.data)
    assert report.counts["ok"] == len(fetched_ok(config)) > 0 and report.downloaded_files == report.counts["ok"]
    before = shard_files(config)
    recounted = fetched_ok(config)[-1]
    old = fixture_labels()[recounted]
    new = (old + 1) % (config.data.max_count + 1)
    for image_id in ids:
        client.put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{image_id}.json",
                          Body=(FIXTURES / "metadata" / f"{image_id}.json").read_bytes())
    client.put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{recounted}.json",
                      Body=json.dumps({"EXPECTED_QUANTITY": new, "BIN_FCSKU_DATA": {}}).encode())
    build_catalog(config.data)  # the recount changes that bin's ETag, so the catalog reads it again
    again = fetch(config.data)
    assert again.shards_written == 1 and again.shards_kept == len(before) - 1
    index = {row.split(",")[0]: row.split(",")[3] for row in
             (Path(config.data.raw_dir) / "index.csv").read_text().splitlines()[1:]}
    assert index[recounted] == str(new)


def test_a_shard_cut_short_is_fetched_again_never_trusted(aws, tmp_path):
    ids = seed_bucket()
    config = s3_config(tmp_path, ids)
    catalog_and_fetch(config)
    shard = Path(config.data.raw_dir) / SHARDS / sorted(shard_files(config))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # a copy cut in the middle, under the final name
    report = fetch(config.data)
    assert report.shards_written == 1
    assert shard.read_bytes() == whole  # deterministic: the same bins give the same bytes


def test_string_ids_keep_leading_zeros(aws, tmp_path):
    client = s3_client()
    client.create_bucket(Bucket=SOURCE_BUCKET)
    public_read(client, SOURCE_BUCKET)
    a, b = list(fixture_labels())[:2]
    for image_id, source in (("523", a), ("00523", b)):
        client.put_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{image_id}.jpg",
                          Body=(FIXTURES / "bin-images" / f"{source}.jpg").read_bytes())
        client.put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{image_id}.json",
                          Body=(FIXTURES / "metadata" / f"{source}.json").read_bytes())
    config = s3_config(tmp_path, ["523", "00523"])
    catalog_and_fetch(config)
    members = fetched(config)
    assert members["523.jpg"] == (FIXTURES / "bin-images" / f"{a}.jpg").read_bytes()
    assert members["00523.jpg"] == (FIXTURES / "bin-images" / f"{b}.jpg").read_bytes()


def test_bad_photos_are_rejected_with_the_reason_and_kept_out_of_the_shard(aws, tmp_path):
    ids = seed_bucket()
    client = s3_client()
    good = (FIXTURES / "bin-images" / f"{ids[0]}.jpg").read_bytes()
    client.put_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{ids[0]}.jpg", Body=good[: len(good) // 2])
    client.put_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{ids[1]}.jpg", Body=b"\xff\xd8garbage" * 50)
    client.delete_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{ids[2]}.jpg")
    config = s3_config(tmp_path, ids)
    report = catalog_and_fetch(config)
    reasons = {i: r for i, (s, r) in report.problems.items() if s == "rejected"}
    assert set(reasons) == {ids[0], ids[1], ids[2]}  # seed_bucket's first ids hold counts the query selects
    assert "corrupt JPEG" in reasons[ids[0]] and reasons[ids[1]] == "not an image"
    assert reasons[ids[2]] == f"missing from source: bin-images/{ids[2]}.jpg"
    members = fetched(config)
    assert not {f"{i}.jpg" for i in ids[:3]} & set(members)  # nothing broken kept
    assert len(members) == report.counts["ok"] and report.counts["rejected"] == 3
    assert not list(Path(config.data.raw_dir).rglob("*.part"))
    index = (Path(config.data.raw_dir) / "index.csv").read_text()
    assert f"{ids[1]},rejected,not an image" in index
    again = fetch(config.data)  # the rejections are recorded in the shards: a rerun downloads nothing
    assert again.downloaded_files == 0 and index == (Path(config.data.raw_dir) / "index.csv").read_text()


def test_manifest_formats_and_errors(tmp_path):
    udacity = tmp_path / "file_list.json"
    udacity.write_text(json.dumps({"1": ["data/metadata/00523.json", "data/metadata/523.json"], "2": []}))
    assert read_manifest(udacity) == ["00523", "523"]
    text = tmp_path / "ids.csv"
    text.write_text("image_id\n007\n7\n")
    assert read_manifest(text) == ["007", "7"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"1": [')
    with pytest.raises(BincounterError, match="not valid JSON"):
        read_manifest(broken)


def test_cli_reports_a_bad_manifest_in_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("not json")
    code = main(["catalog", "--params", empty_params(tmp_path), "--set", f"data.subset={broken}",
                 "--set", f"data.catalog={tmp_path / 'catalog.parquet'}", "--set", f"data.source={FIXTURES}"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: manifest") and "not valid JSON" in err and "\n" not in err


def test_fetch_without_a_catalog_says_which_stage_to_run(tmp_path, capsys):
    code = main(["fetch", "--params", empty_params(tmp_path), "--set", f"data.catalog={tmp_path / 'none.parquet'}",
                 "--set", f"data.raw_dir={tmp_path / 'raw'}", "--set", f"data.source={FIXTURES}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "catalog" in err and "\n" not in err


def test_balanced_query_fetches_per_class(aws, tmp_path):
    seed_bucket()
    config = make_config(tmp_path, **{"data.source": f"s3://{SOURCE_BUCKET}", "data.subset": "balanced",
                                      "data.per_class": 3, "data.max_count": 5})
    catalog_and_fetch(config)
    labels = fixture_labels()
    chosen = fetched_ok(config)
    assert sorted(labels[i] for i in chosen) == sorted(list(range(6)) * 3)


class CuttingProxy:
    """A TCP proxy to the emulator that dies for good after passing `limit` bytes back: the endpoint
    going away in the middle of a download."""

    def __init__(self, upstream_port: int, limit: int):
        self.limit, self.sent, self.dead = limit, 0, False
        self.upstream_port = upstream_port
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.dead:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, counted):
        try:
            while not self.dead:
                data = src.recv(65536)
                if not data:
                    break
                if counted:
                    with self.lock:
                        self.sent += len(data)
                        if self.sent > self.limit:
                            self.kill()
                            dst.sendall(data[: len(data) // 2])  # half a response, then nothing
                            return
                dst.sendall(data)
        except OSError:
            pass

    def kill(self):
        self.dead = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_endpoint_going_away_mid_fetch_then_resume(aws, tmp_path, monkeypatch):
    ids = seed_bucket()
    config = s3_config(tmp_path, ids, **{"data.workers": 4, "data.shard_size": 6})
    build_catalog(config.data)  # the metadata is catalogued; the endpoint dies while the photos download
    total = sum((FIXTURES / "bin-images" / f"{i}.jpg").stat().st_size for i in ids)
    proxy = CuttingProxy(aws.port, limit=total // 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    with pytest.raises(BincounterError, match="rerun to resume"):
        fetch(config.data)
    raw = Path(config.data.raw_dir)
    assert not list(raw.rglob("*.part"))
    kept = shard_files(config)
    assert 0 < len(kept) < math.ceil(len(ids) / 6)
    members = fetched(config)
    for name, data in members.items():  # whatever survived is whole
        assert data == (FIXTURES / "bin-images" / name).read_bytes()
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    report = fetch(config.data)
    wanted = sorted(i for i, c in fixture_labels().items() if c <= 5)
    assert fetched_ok(config) == wanted  # the kept shards' bins and the ones this rerun fetched
    assert report.counts == {"ok": len(wanted) - len(members)}
    assert report.shards_kept == len(kept)
    assert {n: t for n, t in shard_files(config).items() if n in kept} == kept


def test_failed_bins_are_named_in_the_one_line_error(tmp_path):
    from collections import Counter

    from bincounter.data.fetch import FetchReport, _summarise

    report = FetchReport(counts=Counter(ok=5, rejected=1, failed=2),
                         problems={"7": ("rejected", "not an image"), "9": ("failed", "read timed out"),
                                   "11": ("failed", "connection reset")})
    with pytest.raises(BincounterError, match=r"^2 bins could not be downloaded \(e\.g\. 9: read timed out\); "
                                              r"rerun to resume$"):
        _summarise(report, tmp_path, planned=1)


COUNT_ARENAS = """
import ctypes, sys

def arenas(path):  # malloc_info, written to path, lists one <heap> per arena
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    handle = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
    libc.malloc_info(0, handle)
    libc.fclose(handle)
    with open(path) as report:
        return report.read().count("<heap nr=")
"""

ARENA_PROBE = COUNT_ARENAS + """
import threading
from bincounter.data.source import limit_malloc_arenas
if sys.argv[1] == "limit":
    assert limit_malloc_arenas(2)
start = threading.Barrier(16)
def download():  # what a download thread does to malloc: photo-sized buffers (too big for pymalloc)
    start.wait()
    photos = [bytes(70_000) for _ in range(20)]
threads = [threading.Thread(target=download) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(arenas(sys.argv[2]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_download_threads_share_two_malloc_arenas(tmp_path, monkeypatch):
    """fetch's RSS crept up with every shard while each of its threads had a glibc arena of its own; the
    limit it sets keeps 16 threads to 2 arenas (malloc_info lists one <heap> per arena)."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    arenas = {}
    for mode in ("limit", "default"):
        out = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode, str(tmp_path / f"{mode}.xml")],
                             check=True, capture_output=True, text=True).stdout
        arenas[mode] = int(out.splitlines()[-1])
    assert arenas["limit"] <= 2 < arenas["default"]


POOL_PROBE = """
import sys
from bincounter.cli import main
assert main(sys.argv[1:]) == 0
import pyarrow as pa
print(pa.default_memory_pool().backend_name)
"""


def test_the_catalog_stage_gives_arrow_the_system_allocator_unless_the_environment_names_one(tmp_path, monkeypatch):
    """mimalloc, pyarrow's default, keeps freed pages per thread: the catalog stage peaked higher with it."""
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    stage = ["catalog", "--params", str(empty_params(tmp_path)), "--set", f"data.source={FIXTURES}",
             "--set", "data.subset=all", "--set", f"data.catalog={tmp_path / 'catalog.parquet'}"]

    def backend(**env) -> str:
        return subprocess.run([sys.executable, "-c", POOL_PROBE, *stage], env={**os.environ, **env}, check=True,
                              capture_output=True, text=True).stdout.splitlines()[-1]

    assert backend() == "system"
    assert backend(ARROW_DEFAULT_MEMORY_POOL="mimalloc") == "mimalloc"


FETCH_PROBE = COUNT_ARENAS + """
import json
from bincounter.config import build_config
from bincounter.data.fetch import fetch

before = arenas(sys.argv[2])
fetch(build_config({}, json.loads(sys.argv[1])).data)
print(json.dumps([before, arenas(sys.argv[2])]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_fetch_starts_its_download_threads_under_the_arena_limit(tmp_path, monkeypatch):
    """fetch itself sets the limit before its 16 download threads start: they add no arena beyond the two
    allowed (the imports may already hold more); a MALLOC_ARENA_MAX in the environment wins over it."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    config = make_config(tmp_path, **{"data.workers": 16})
    build_catalog(config.data)
    settings = {f"data.{key}": getattr(config.data, key)
                for key in ("source", "subset", "catalog", "raw_dir", "shard_size", "workers")}
    counted = {}
    for mode, env in (("fetch's limit", {}), ("environment wins", {"MALLOC_ARENA_MAX": "64"})):
        shutil.rmtree(config.data.raw_dir, ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", FETCH_PROBE, json.dumps(settings), str(tmp_path / "info.xml")],
                             check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
        counted[mode] = json.loads(out.splitlines()[-1])
    before, after = counted["fetch's limit"]
    assert after <= max(before, 2)
    before, after = counted["environment wins"]
    assert after > max(before, 2)
