"""Stages split, prepare and sync, and the whole pipeline under a real `dvc repro` against the emulator."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, fixture_labels, make_config, seed_bucket, write_manifest
from PIL import Image

from bincounter.images import decode_and_resize
from bincounter.data import shards
from bincounter.data.catalog import read_catalog
from bincounter.data.fetch import read_index
from bincounter.data.prepare import _in_order, plan_split, read_labels
from bincounter.data.split import _cut_sizes, read_split, stratified_split
from bincounter.errors import BincounterError
from bincounter.storage import s3_client
from bincounter.data.sync import sync

ROOT = Path(__file__).resolve().parents[1]


def test_split_is_stratified_seeded_and_rejects_with_reasons(prepared):
    labels = fixture_labels()
    splits = {name: read_split(prepared / f"data/splits/{name}.csv") for name in ("train", "val", "test")}
    usable = {i: c for i, c in labels.items() if c <= 5}
    assert sorted(i for rows in splits.values() for i, _ in rows) == sorted(usable)
    for rows in splits.values():
        assert all(usable[i] == c for i, c in rows)
    # the default grouped split: each block of 100 neighbouring ids (one pod) lies on one side
    from bincounter.data.split import group_of

    side = {}
    for name, rows in splits.items():
        for image_id, _ in rows:
            assert side.setdefault(group_of(image_id, 100), name) == name, image_id
    assert json.loads((prepared / "data/eda/summary.json").read_text())["strategy"] == "grouped"
    # the random strategy cuts each count exactly by the fractions
    random_splits = stratified_split(usable, [0.6, 0.2, 0.2], seed=42)
    for count in set(usable.values()):
        n = sum(1 for c in usable.values() if c == count)
        sizes = [sum(1 for i in random_splits[s] if usable[i] == count) for s in ("train", "val", "test")]
        assert sizes == _cut_sizes(n, [0.6, 0.2, 0.2])
        assert all(abs(size - n * f) < 1 for size, f in zip(sizes, (0.6, 0.2, 0.2)))
    # bins above data.max_count are catalogued, but the catalog's query never selects them
    catalog = read_catalog(prepared / "data/catalog.parquet").to_pydict()
    over = {i for i, c in labels.items() if c > 5}
    assert over and over <= set(catalog["image_id"])
    assert (prepared / "data/splits/rejects.csv").read_text().splitlines() == ["image_id,reason"]


def test_split_seed_changes_assignment_not_sizes():
    labels = {f"{i:05d}": i % 3 for i in range(60)}
    a = stratified_split(labels, [0.6, 0.2, 0.2], seed=1)
    assert a == stratified_split(labels, [0.6, 0.2, 0.2], seed=1)
    b = stratified_split(labels, [0.6, 0.2, 0.2], seed=2)
    assert a != b and {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()} == \
        {"train": 36, "val": 12, "test": 12}


def test_eda_report_is_written(prepared):
    eda = prepared / "data/eda"
    summary = json.loads((eda / "summary.json").read_text())
    assert summary["images"] == sum(1 for c in fixture_labels().values() if c <= 5)
    assert summary["per_count"]["0"] == 5 and summary["median_width"] > 100
    for png in ("class_balance.png", "image_sizes.png", "samples.png"):
        with Image.open(eda / png) as image:
            assert image.size[0] > 300
    assert (eda / "class_counts.csv").read_text().startswith("count,train,val,test")


def test_eda_samples_a_dozen_counts_of_a_wide_count_range_not_one_row_each():
    from bincounter.data.eda import SAMPLE_ROWS, sample_rows

    labels = {f"{n:05d}": (n * 7) % 400 for n in range(4000)}  # counts 0..399 present, a range of 0..1000
    rows = sample_rows(labels, list(range(1001)))
    assert len(rows) == SAMPLE_ROWS and min(rows) == 0 and max(rows) == 399  # spread over what is present
    assert all(ids == sorted(i for i, c in labels.items() if c == count) for count, ids in rows.items())
    small = sample_rows({"a": 1, "b": 3, "c": 1}, list(range(6)))
    assert small == {0: [], 1: ["a", "c"], 2: [], 3: ["b"], 4: [], 5: []}  # 0..5: a row per count, empty or not


def test_prepare_stores_each_photo_once_resized_as_jpeg_in_shards(prepared):
    from torchvision.io import decode_jpeg

    from bincounter.training.dataset import ShardDataset

    val = prepared / "data/prepared/val"
    rows = read_labels(val)
    assert sorted((r[0], r[1]) for r in rows) == sorted(read_split(prepared / "data/splits/val.csv"))
    dataset = ShardDataset(val, transform=lambda image: image)
    for k in (0, len(rows) - 1):
        image, count = dataset[k]
        expected = decode_and_resize((FIXTURES / "bin-images" / f"{dataset.ids[k]}.jpg").read_bytes(), 72)
        assert image.shape == (3, 72, 72) and int(count) == rows[k][1]
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - expected).mean() < 4  # JPEG q90 of the same pixels
        assert torch.equal(decode_jpeg(dataset.jpeg(k)), image)
    on_disk = {p.name for p in val.iterdir()}
    assert on_disk == {r[2] for r in rows} | {"labels.csv", "prepared.json"}  # shards, not one file a bin
    assert len({r[2] for r in rows}) == -(-len(rows) // 16)  # data.shard_size 16 in the tests
    photo_bytes = sum(r[4] for r in rows)
    assert photo_bytes / len(rows) < 25_000
    assert json.loads((prepared / "data/prepared/meta.json").read_text())["image_size"] == 72


def test_prepare_plans_a_split_raw_shard_by_raw_shard_and_refuses_a_bin_not_fetched(prepared, tmp_path):
    raw_dir = prepared / "data/raw"
    fetched = [(r["image_id"], r["shard"]) for r in read_index(raw_dir) if r["status"] == "ok"]
    counts = dict(read_split(prepared / "data/splits/train.csv"))
    total, jobs = plan_split(prepared / "data/splits/train.csv", raw_dir)
    jobs = list(jobs)
    assert total == len(counts) and len(jobs) > 1  # the 48 fixtures fill three raw shards of 16
    assert [shard for shard, _, _ in jobs] == sorted({s for i, s in fetched if i in counts})  # each shard once
    for shard, ids, shard_counts in jobs:  # the split's bins of that shard, in the index's order
        assert ids == [i for i, s in fetched if s == shard and i in counts]
        assert shard_counts == [counts[i] for i in ids]
    stray = tmp_path / "train.csv"
    stray.write_text("image_id,count\n" + "".join(f"{i},{c}\n" for i, c in list(counts.items())[:3])
                     + "not-fetched,2\n")
    with pytest.raises(BincounterError, match="cannot prepare not-fetched: not in fetch's index"):
        plan_split(stray, raw_dir)
    stray.write_text(f"image_id,count\n{fetched[0][0]},{2**64}\n")  # a hand-edited count
    with pytest.raises(BincounterError, match="is not a split file"):
        plan_split(stray, raw_dir)


def test_prepare_counts_and_prepares_an_id_the_index_lists_twice_once(prepared, tmp_path):
    index = (prepared / "data/raw/index.csv").read_text().splitlines(keepends=True)
    counts = dict(read_split(prepared / "data/splits/train.csv"))
    rows = {line.split(",", 1)[0]: line for line in index[1:]}
    first, second = [i for i in rows if i in counts][:2]
    raw = tmp_path / "raw"
    raw.mkdir()
    # a hand-edited index: `first` listed twice, `second` dropped. Counting matches would miss the gap
    (raw / "index.csv").write_text("".join(line for line in index if not line.startswith(f"{second},"))
                                   + rows[first])
    with pytest.raises(BincounterError, match=f"cannot prepare {second}: not in fetch's index"):
        plan_split(prepared / "data/splits/train.csv", raw)
    (raw / "index.csv").write_text("".join(index) + rows[first])  # listed twice, nothing missing
    total, jobs = plan_split(prepared / "data/splits/train.csv", raw)
    planned = [(i, c) for _, ids, shard_counts in jobs for i, c in zip(ids, shard_counts)]
    assert total == len(counts) and sorted(planned) == sorted(counts.items())  # each bin once, its own count


def test_prepare_keeps_only_a_window_of_raw_shards_in_flight():
    from concurrent.futures import ThreadPoolExecutor

    pulled = []

    def jobs():
        for k in range(100):
            pulled.append(k)
            yield k

    with ThreadPoolExecutor(2) as pool:
        results = _in_order(pool, lambda k: k * k, jobs(), window=3)
        assert next(results) == 0 and len(pulled) == 3  # not all 100 submitted at once, as Executor.map does
        assert list(results) == [k * k for k in range(1, 100)]


def test_sync_uploads_channels_incrementally(aws, prepared, tmp_path, capsys):
    s3_client().create_bucket(Bucket="sm-data")
    config = make_config(tmp_path, **{"prepare.out_dir": str(prepared / "data/prepared"),
                                      "sync.s3_uri": "s3://sm-data/abid/v1"})
    record = sync(config)
    assert record["channels"] == {ch: f"s3://sm-data/abid/v1/{ch}/" for ch in ("train", "validation", "test")}
    keys = {o["Key"] for o in s3_client().list_objects_v2(Bucket="sm-data")["Contents"]}
    local = prepared / "data/prepared"
    val_shard = shards.shards_in(local / "val")[0].name
    assert f"abid/v1/validation/{val_shard}" in keys and "abid/v1/train/labels.csv" in keys
    files = sum(1 for p in local.rglob("*") if p.is_file())
    assert len(keys) == files
    assert f"uploaded {files}" in capsys.readouterr().out
    sync(config)
    assert f"uploaded 0, unchanged {files}" in capsys.readouterr().out
    assert json.loads(Path(config.sync.out).read_text()) == record


def test_sync_without_uri_records_local_only(prepared, tmp_path):
    config = make_config(tmp_path, **{"prepare.out_dir": str(prepared / "data/prepared")})
    assert sync(config)["mode"] == "local only"


def _project_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", "src"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, project / name)
    return project


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def _assert_up_to_date(project: Path) -> None:
    """Every stage up to date but `subset`, which runs on every repro to checksum the manifest."""
    assert json.loads(_run(["dvc", "status", "--json"], project).stdout) == {"subset": ["always changed"]}


def test_subprocesses_run_the_environment_under_test():
    """`mlflow run` runs `python ...` and dvc stages run `bincounter`: both must come from this environment."""
    import sys

    bindir = Path(sys.executable).parent
    for name in ("python", "bincounter", "dvc", "mlflow"):
        found = shutil.which(name)
        assert found and Path(found).parent == bindir, (name, found)


@pytest.mark.slow
def test_dvc_repro_status_refetch_push_pull(aws, tmp_path):
    """The acceptance path: dvc repro on emulator data, clean status, re-fetch deleted files, push/pull."""
    import yaml

    ids = seed_bucket()
    s3 = s3_client()
    s3.create_bucket(Bucket="sm-data")
    s3.create_bucket(Bucket="dvc-store")
    project = _project_copy(tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(subset=str(write_manifest(tmp_path / "manifest.json", ids)), workers=8, shard_size=16)
    params["prepare"].update(image_size=64, workers=1)
    params["sync"]["s3_uri"] = "s3://sm-data/abid"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        _run(cmd, project)
    counts = Counter()
    for name in ("train", "val", "test"):
        counts.update({name: len(read_split(project / f"data/splits/{name}.csv"))})
    assert sum(counts.values()) == sum(1 for c in fixture_labels().values() if c <= 5)
    assert read_labels(project / "data/prepared/train")
    assert json.loads((project / "data/sync.json").read_text())["mode"] == "s3"
    _assert_up_to_date(project)

    data_files = [p for p in (project / "data").rglob("*") if p.is_file()]
    assert len(data_files) < 30  # 45 bins: the files grow with shards (of 16), not bins
    raw_shards = {p.name: p.stat().st_mtime_ns for p in shards.shards_in(project / "data/raw/shards")}
    assert len(raw_shards) == 3
    victim = project / "data/raw/shards" / sorted(raw_shards)[1]
    whole = victim.read_bytes()
    victim.unlink()
    _run(["dvc", "repro"], project)
    assert victim.read_bytes() == whole  # fetched again, byte for byte
    now = {p.name: p.stat().st_mtime_ns for p in shards.shards_in(project / "data/raw/shards")}
    assert {n for n in now if now[n] != raw_shards[n]} == {victim.name}  # and only that shard
    _assert_up_to_date(project)

    _run(["dvc", "remote", "add", "-d", "store", "s3://dvc-store/cache"], project)
    _run(["dvc", "push"], project)
    shutil.rmtree(project / "data/prepared")
    shutil.rmtree(project / ".dvc/cache")
    _run(["dvc", "pull"], project)
    assert json.loads((project / "data/prepared/test/prepared.json").read_text())["image_size"] == 64
    assert read_labels(project / "data/prepared/test")

    # an edited manifest is noticed: fetch and the stages after it rerun, the splits follow the new manifest
    dropped = [i for i in ids if fixture_labels()[i] <= 5][:2]
    write_manifest(tmp_path / "manifest.json", [i for i in ids if i not in dropped])
    repro = _run(["dvc", "repro"], project).stdout
    assert "Running stage 'catalog'" in repro and "Running stage 'fetch'" in repro and "Running stage 'split'" in repro
    now = {i for name in ("train", "val", "test") for i, _ in read_split(project / f"data/splits/{name}.csv")}
    assert not now & set(dropped) and len(now) == sum(counts.values()) - 2
    _assert_up_to_date(project)
    assert "Running stage 'fetch'" not in _run(["dvc", "repro"], project).stdout  # unchanged manifest: no refetch


@pytest.mark.slow
def test_training_in_a_dvc_project_tags_the_data_hashes_and_the_effective_params(aws, tmp_path):
    """A run trained where `dvc repro` ran carries dvc.lock's hashes of the splits and prepared data it read,
    and params_sha256 of the configuration it really used (params file + --set + flags)."""
    import hashlib

    import mlflow
    import torch
    import yaml

    from bincounter.config import build_config
    from bincounter.training.checkpoints import CHECKPOINT_FILE

    ids = seed_bucket()
    project = _project_copy(tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(subset=str(write_manifest(tmp_path / "manifest.json", ids)), workers=8)
    params["prepare"].update(image_size=64, workers=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "prepare"]):
        _run(cmd, project)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = ["--epochs", "1", "--arch", "resnet18", "--image-size", "48", "--batch-size", "8", "--num-workers", "0",
             "--profile-steps", "0", "--checkpoint-dir", str(tmp_path / "ckpt")]
    sets = ["--set", f"mlflow.tracking_uri={uri}", "--set", "train.lr=0.005"]
    _run(["bincounter", "train", *flags, *sets], project)

    mlflow.set_tracking_uri(uri)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert run.data.tags["dvc.splits.md5"] == next(o["md5"] for o in lock["split"]["outs"] if o["path"] == "data/splits")
    assert run.data.tags["dvc.prepared.md5"] == lock["prepare"]["outs"][0]["md5"]
    assert run.data.params["train.lr"] == "0.005" and run.data.params["train.image_size"] == "48"
    # the hash is of the configuration the run used (as its checkpoint records it), not of params.yaml
    used = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)["config"]
    assert used["train"]["lr"] == 0.005 and used["mlflow"]["tracking_uri"] == uri
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()
    assert run.data.tags["params_sha256"] == digest
    plain = build_config(yaml.safe_load((project / "params.yaml").read_text()), {})
    assert hashlib.sha256(json.dumps(plain.to_dict(), sort_keys=True).encode()).hexdigest() != digest
