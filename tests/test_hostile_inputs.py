"""The project's own battery of hostile and careless input, one section per class of the issue:
ids that are paths, parsers that recurse, checkpoints that execute, serving limits, nonsense
configuration, crash consistency across stages, an unreachable source, and the smaller defects.

Each case asserts the refusal message and that nothing outside the working folders changed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import FIXTURES, catalog_and_fetch, fetched_ok, config_on, empty_params, fixture_b64, fixture_labels, make_config, write_manifest
from mlflow.exceptions import MlflowException
from PIL import Image

from bincounter.cli import main
from bincounter.data.catalog import build_catalog, read_catalog
from bincounter.data.fetch import SHARDS
from bincounter.data.prepare import PREPARED_FILE, prepare, read_labels
from bincounter.data.split import split
from bincounter.errors import BincounterError
from bincounter.images import decode_and_resize

IDS = list(fixture_labels())[:6]


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file under root (outside `skip`) with its size and mtime: what must not change."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            stat = path.stat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def local_source(tmp_path: Path, ids=IDS) -> Path:
    """A folder laid out like the bucket, holding real fixture bins."""
    source = tmp_path / "source"
    for sub in ("bin-images", "metadata"):
        (source / sub).mkdir(parents=True)
    for image_id in ids:
        shutil.copy(FIXTURES / "bin-images" / f"{image_id}.jpg", source / "bin-images")
        shutil.copy(FIXTURES / "metadata" / f"{image_id}.json", source / "metadata")
    return source


def source_config(tmp_path: Path, source: Path, ids: list[str]):
    """A config fetching ids from the local source, everything it writes under tmp_path/work."""
    (tmp_path / "work").mkdir(exist_ok=True)
    return make_config(tmp_path / "work", **{"data.source": str(source), "split.strategy": "random",
                                             "data.subset": str(write_manifest(tmp_path / "m.json", ids))})


# ------------------------------------------------------------------ 1. ids are used as paths

HOSTILE_IDS = ["../../planted", "../outside", "/tmp/absolute", "..", "a/b", ".hidden", "x\nok", "", "a" * 300]


def test_fetch_rejects_ids_that_are_paths_and_writes_nothing_outside_raw(tmp_path):
    source = local_source(tmp_path)
    # traps: valid bins placed where the traversing ids point, so an unchecked fetch would copy them out
    (tmp_path / "planted.json").write_text('{"EXPECTED_QUANTITY": 1}')
    (tmp_path / "planted.jpg").write_bytes((FIXTURES / "bin-images" / f"{IDS[0]}.jpg").read_bytes())
    (source / "outside.json").write_text('{"EXPECTED_QUANTITY": 1}')
    config = source_config(tmp_path, source, IDS + HOSTILE_IDS)
    before = snapshot(tmp_path, skip=(tmp_path / "work",))
    report = catalog_and_fetch(config)
    assert fetched_ok(config) == sorted(IDS) and report.counts["ok"] == len(IDS)
    catalog = read_catalog(config.data.catalog).to_pylist()
    rejected = {row["image_id"]: row["reason"] for row in catalog if row["status"] == "rejected"}
    assert len(rejected) == len(HOSTILE_IDS) and all(r.startswith("unsafe id") for r in rejected.values())
    assert snapshot(tmp_path, skip=(tmp_path / "work",)) == before
    from bincounter.data import shards

    raw = Path(config.data.raw_dir) / SHARDS
    members = {name for shard in shards.shards_in(raw) for name, _ in shards.iter_members(shard)}
    assert members == {f"{i}.jpg" for i in IDS}


def test_split_refuses_an_index_row_whose_id_is_a_path(tmp_path):
    source = local_source(tmp_path)
    config = source_config(tmp_path, source, IDS)
    catalog_and_fetch(config)
    index = Path(config.data.raw_dir) / "index.csv"
    index.write_text(index.read_text() + "../../etc/passwd,ok,,1,raw-00000.tar\n")  # a hand-edited index
    split(config)
    rejects = (Path(config.split.out_dir) / "rejects.csv").read_text()
    assert "../../etc/passwd,\"unsafe id '../../etc/passwd'" in rejects


def test_reconcile_turns_hostile_ids_into_unusable_rows(trained, tmp_path, capsys):
    expected = tmp_path / "expected.csv"
    expected.write_text("image_id,expected\n" + f"{IDS[0]},{fixture_labels()[IDS[0]]}\n"
                        + "../../etc/passwd,1\n/abs/path,2\n")
    report = tmp_path / "r.csv"
    args = ["reconcile", "--params", empty_params(tmp_path), "--set",
            f"mlflow.tracking_uri={trained['tracking_uri']}", "--expected", str(expected),
            "--images", str(FIXTURES / "bin-images"), "--report", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reconciled 3 bins" in out and "2 unusable records" in out and "unsafe id '../../etc/passwd'" in out
    statuses = {row.split(",")[0]: row.split(",")[5] for row in report.read_text().splitlines()[1:]}
    assert statuses["../../etc/passwd"] == "unusable" and statuses[IDS[0]] in ("agree", "flagged", "low_confidence")


# ------------------------------------------------------------------ 2. parsers that crash the whole run

DEEP = ("[" * 5000 + "]" * 5000).encode()


@pytest.mark.parametrize("content, reason", [
    (DEEP, "metadata JSON nested too deeply"),
    (b'{"EXPECTED_QUANTITY": ' + b"[" * 900 + b"]" * 900 + b"}", "EXPECTED_QUANTITY is not a non-negative integer (a list)"),
    (b"\xff\xfe\x00garbage", "metadata is not UTF-8"),
    (b'[{"EXPECTED_QUANTITY": 1}]', "metadata has no EXPECTED_QUANTITY"),
    (b'{"EXPECTED_QUANTITY": "3"}', "EXPECTED_QUANTITY is not a non-negative integer ('3')"),
    (b'{"EXPECTED_QUANTITY": true}', "EXPECTED_QUANTITY is not a non-negative integer (True)"),
])
def test_metadata_a_parser_chokes_on_is_one_rejected_bin(tmp_path, content, reason):
    source = local_source(tmp_path)
    (source / "metadata" / f"{IDS[1]}.json").write_bytes(content)
    config = source_config(tmp_path, source, IDS)
    catalog_and_fetch(config)
    row = next(r for r in read_catalog(config.data.catalog).to_pylist() if r["image_id"] == IDS[1])
    assert (row["status"], row["reason"]) == ("rejected", reason)
    assert fetched_ok(config) == sorted(IDS[:1] + IDS[2:])


def test_split_and_reconcile_go_on_past_a_damaged_record(trained, tmp_path, capsys):
    source = local_source(tmp_path)
    config = source_config(tmp_path, source, IDS)
    catalog_and_fetch(config)
    index = Path(config.data.raw_dir) / "index.csv"
    lines = index.read_text().splitlines()
    damaged = next(k for k, line in enumerate(lines) if line.startswith(f"{IDS[2]},"))
    cells = lines[damaged].split(",")
    lines[damaged] = ",".join(cells[:3] + ["[[[["] + cells[4:])  # the count hand-edited into garbage
    index.write_text("\n".join(lines) + "\n")
    split(config)
    assert f"{IDS[2]},count '[[[[' in index.csv is not a number (rerun fetch)" in \
        (Path(config.split.out_dir) / "rejects.csv").read_text()

    (source / "metadata" / f"{IDS[3]}.json").write_bytes(DEEP)
    args = ["reconcile", "--params", empty_params(tmp_path), "--set",
            f"mlflow.tracking_uri={trained['tracking_uri']}", "--expected", str(source / "metadata"),
            "--images", str(source / "bin-images"), "--report", str(tmp_path / "r.csv")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"reconciled {len(IDS)} bins" in out and "1 unusable records" in out


@pytest.mark.parametrize("content, message", [
    ("[" * 5000 + "]" * 5000, "is nested too deeply to be a manifest"),
    ('{"1": "data/metadata/00013.json"}', "must map counts to lists of metadata paths, or list ids"),
    ('[["00013"], {"id": 1}]', "must map counts to lists of metadata paths, or list ids"),
    ("[true, false]", "must map counts to lists of metadata paths, or list ids"),
    ("[]", "lists no images"),
    (b"\xff\xfe[1]", "is not UTF-8 text"),
])
def test_a_manifest_a_parser_chokes_on_is_one_line(tmp_path, capsys, content, message):
    manifest = tmp_path / "m.json"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = main(["catalog", "--params", empty_params(tmp_path), "--set", f"data.subset={manifest}",
                 "--set", f"data.catalog={tmp_path / 'c.parquet'}", "--set", f"data.source={local_source(tmp_path)}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err and "Traceback" not in err


# ------------------------------------------------------------------ 3. loading runs code


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(prepared, tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint_dir = tmp_path / "checkpoints"
    checkpoint_dir.mkdir()
    torch.save({"epoch": 1, "config": {}, "model": Payload(marker)}, checkpoint_dir / "last.pt")
    config = config_on(prepared, tmp_path, **{"train.epochs": 2})
    args = ["train", "--params", empty_params(tmp_path), "--resume", "--checkpoint-dir", str(checkpoint_dir),
            *[f"--set={k}={v}" for k, v in {"train.data_dir": config.train.data_dir,
                                              "split.out_dir": config.split.out_dir,
                                              "mlflow.tracking_uri": config.mlflow.tracking_uri,
                                              "train.arch": "resnet18", "train.image_size": 64,
                                              "train.num_workers": 0}.items()]]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "holds objects other than tensors and plain values; delete it to start over" in err
    assert not marker.exists()


# ------------------------------------------------------------------ 4. serving resources bounded per request


def png_bytes(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def served(trained):
    return mlflow.pyfunc.load_model("models:/bin-counter@champion")


def other_format(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(FIXTURES / "bin-images" / f"{IDS[0]}.jpg").save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("rows, message", [
    ([png_bytes(5000, 5000)], "row 0: image is 5000x5000 pixels; at most 16 megapixels per image"),
    (["GIF"], "row 0: not an image (JPEG or PNG)"),
    (["BMP"], "row 0: not an image (JPEG or PNG)"),
    (["TIFF"], "row 0: not an image (JPEG or PNG)"),
    ([b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"], "row 0: not an image (JPEG or PNG)"),
])
def test_the_served_model_refuses_formats_and_sizes_before_decoding(served, rows, message):
    encoded = [b64(other_format(r)) if isinstance(r, str) else b64(r) for r in rows]
    with pytest.raises(MlflowException, match=message.replace("(", r"\(").replace(")", r"\)")):
        served.predict(pd.DataFrame({"image": [fixture_b64(IDS[0])] * 0 + encoded}))


def test_a_request_is_bounded_in_total_pixels_before_any_row_is_decoded(served, monkeypatch):
    from bincounter.serving import pyfunc

    monkeypatch.setattr(pyfunc, "MAX_REQUEST_PIXELS", 30_000_000)  # the server's setting, lowered for speed
    rows = [b64(png_bytes(3000, 3000))] * 4  # 9 MP each: each allowed, 36 MP together not
    started = time.perf_counter()
    with pytest.raises(MlflowException, match="the request holds more than 30 megapixels of images .at row 3."):
        served.predict(pd.DataFrame({"image": rows}))
    assert time.perf_counter() - started < 2.0  # headers only: nothing was decoded


# ------------------------------------------------------------------ 5. nonsense configuration


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "train.epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "train.batch_size must be at least 1, got 0"),
    (["--lr", "nan"], "train.lr: expected a finite number, got 'nan'"),
    (["--lr", "-1"], "train.lr must be at least 0, got -1.0"),
    (["--image-size", "0"], "train.image_size must be at least 16, got 0"),
    (["--device", "gpu"], "train.device must be auto, cpu or cuda, got 'gpu'"),
    (["--set", "split.fractions=[0.9, 0.1, 0.0]"], "split.fractions must be three positive numbers"),
])
def test_nonsense_configuration_is_one_line_before_anything_runs(tmp_path, capsys, flags, message):
    assert main(["train", "--params", empty_params(tmp_path), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_below_chance_or_diverged_model_never_becomes_champion(trained, prepared, tmp_path):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from bincounter import tracking
    from bincounter.training.run import data_dirs_for, run_training

    config, client = trained["config"], MlflowClient()
    holder = client.get_model_version_by_alias("bin-counter", "champion").version
    version = mlflow.register_model(trained["outcome"].model_uri, "bin-counter").version
    below = {"macro_accuracy": 0.1, **{f"class_{k}_accuracy": 0.1 for k in range(5)}}  # chance is 1/5
    info = SimpleNamespace(registered_model_version=version)
    assert tracking.promote(config, info, below, test_bins=25) == (str(version), False)
    assert "below chance" in client.get_model_version("bin-counter", version).tags["champion_refused"]
    assert client.get_model_version_by_alias("bin-counter", "champion").version == holder
    assert tracking.champion_refusal("macro_accuracy", below, test_bins=24) == ""  # 24 bins: cannot tell
    assert tracking.champion_refusal("macro_accuracy", {"macro_accuracy": float("nan")}) == "test macro_accuracy is nan"

    untrained = config_on(prepared, tmp_path, **{"train.lr": 0, "mlflow.tracking_uri": trained["tracking_uri"]})
    outcome = run_training(untrained, data_dirs_for(untrained))
    assert outcome.registered_version and not outcome.champion
    assert client.get_model_version("bin-counter", outcome.registered_version).tags["champion_refused"] == \
        "trained nothing (train.lr is 0)"

    diverging = config_on(prepared, tmp_path, **{"train.lr": 1e12, "train.optimizer": "sgd",
                                                 "mlflow.tracking_uri": trained["tracking_uri"]})
    versions = len(client.search_model_versions("name='bin-counter'"))
    with pytest.raises(BincounterError, match="loss became"):
        run_training(diverging, data_dirs_for(diverging))
    assert len(client.search_model_versions("name='bin-counter'")) == versions
    assert client.get_model_version_by_alias("bin-counter", "champion").version == holder


# ------------------------------------------------------------------ 6. crash consistency across stages


@pytest.fixture
def prepared_copy(prepared, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(prepared / "data", root / "data")
    return root


def test_training_refuses_prepared_splits_from_different_runs_or_other_csvs(prepared_copy, tmp_path):
    from bincounter.training.run import data_dirs_for

    config = config_on(prepared_copy, tmp_path)
    data_dirs_for(config)  # consistent as prepared
    marker = prepared_copy / "data/prepared/train" / PREPARED_FILE
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "generation": "another-run"}))
    with pytest.raises(BincounterError, match="come from different prepare runs"):
        data_dirs_for(config)
    marker.write_text(json.dumps(record))
    (prepared_copy / "data/prepared/val" / PREPARED_FILE).unlink()  # killed while rewriting val
    with pytest.raises(BincounterError, match=r"prepared/val is incomplete \(no prepared.json"):
        data_dirs_for(config)
    prepare(config)
    data_dirs_for(config)
    split(make_config(prepared_copy, **{"data.raw_dir": str(prepared_copy / "data/raw"),
                                        "split.out_dir": str(prepared_copy / "data/splits"), "split.seed": 7}))
    with pytest.raises(BincounterError, match="was prepared from another .* than the current one"):
        data_dirs_for(config)


def test_a_killed_prepare_leaves_no_orphan_workers_and_no_half_file(prepared, tmp_path):
    import psutil

    from bincounter.data import shards
    from bincounter.data.fetch import INDEX_COLUMNS
    from bincounter.files import write_csv

    root = tmp_path / "big"
    raw = root / "data/raw"
    (raw / SHARDS).mkdir(parents=True)
    rows, index = [], []
    photos = [(FIXTURES / "bin-images" / f"{i}.jpg").read_bytes() for i in list(fixture_labels())]
    for number in range(3):  # many bins over the real photos, so the stage runs long enough to be killed
        ids = [f"c{number * 500 + k}" for k in range(500)]
        name = f"raw-{number:05d}.tar"
        shards.write_shard(raw / SHARDS / name, ((f"{i}.jpg", photos[k % 48]) for k, i in enumerate(ids)),
                           {"bins": {i: ["ok", "", 1, None] for i in ids}})
        index += [(i, "ok", "", 1, name) for i in ids]
        rows += [f"{i},1" for i in ids]
    write_csv(raw / "index.csv", INDEX_COLUMNS, index)
    (root / "data/splits").mkdir(parents=True)
    for name in ("train", "val", "test"):
        (root / "data/splits" / f"{name}.csv").write_text("image_id,count\n" + "\n".join(rows) + "\n")
    params = root / "params.yaml"
    params.write_text(json.dumps({"data": {"raw_dir": str(raw), "shard_size": 200},
                                  "split": {"out_dir": str(root / "data/splits")},
                                  "prepare": {"out_dir": str(root / "data/prepared"), "image_size": 256, "workers": 2}}))
    stage = subprocess.Popen([sys.executable, "-m", "bincounter", "prepare", "--params", str(params)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(stage.pid)
    deadline = time.time() + 60
    while len(parent.children()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    workers = parent.children(recursive=True)
    assert workers, "the stage started no workers"
    time.sleep(1.0)
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
    train = root / "data/prepared/train"
    assert not (train / PREPARED_FILE).exists() and not (train / "labels.csv").exists()  # nothing says "complete"
    from bincounter.training.run import data_dirs_for

    with pytest.raises(BincounterError, match="labels.csv not found"):
        data_dirs_for(make_config(root, **{"train.data_dir": str(root / "data/prepared")}))
    (root / "data/splits/train.csv").write_text("image_id,count\nc0,1\n")  # a quick rerun
    (root / "data/splits/val.csv").write_text("image_id,count\nc1,1\n")
    (root / "data/splits/test.csv").write_text("image_id,count\nc2,1\n")
    assert main(["prepare", "--params", str(params)]) == 0
    assert not list(train.glob(".*.part")) and (train / PREPARED_FILE).exists()
    assert [p.name for p in shards.shards_in(train)] == [r[2] for r in read_labels(train)]  # old shards gone


# ------------------------------------------------------------------ 7. an unreachable source


def test_an_unreachable_source_stops_fetch_after_a_run_of_failures_and_the_rerun_resumes(tmp_path, monkeypatch,
                                                                                         capsys):
    ids = [f"{n:05d}" for n in range(600)]
    source = tmp_path / "catalogued" / "metadata"  # the catalog was read while the source was up
    source.mkdir(parents=True)
    for n, image_id in enumerate(ids):
        (source / f"{image_id}.json").symlink_to(FIXTURES / "metadata" / f"{IDS[n % len(IDS)]}.json")
    config = make_config(tmp_path, **{"data.source": str(source.parent), "data.subset": "all",
                                      "data.max_candidates": 0})
    build_catalog(config.data)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # then it went down: connection refused
    started = time.perf_counter()
    code = main(["fetch", "--params", empty_params(tmp_path), *[f"--set=data.{k}={v}" for k, v in {
        "source": "s3://aft-vbi-pds", "workers": 8, "subset": "all", "catalog": config.data.catalog,
        "raw_dir": config.data.raw_dir}.items()]])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: cannot reach the data source s3://aft-vbi-pds/ at http://127.0.0.1:9" in err
    assert "check the network, a proxy (HTTPS_PROXY), or AWS_ENDPOINT_URL, then rerun to resume" in err
    assert time.perf_counter() - started < 60  # it stopped early instead of trying all 600
    index = (Path(config.data.raw_dir) / "index.csv").read_text().splitlines()[1:]
    assert len(index) == len(ids) and all(",failed," in row for row in index)  # recorded, nothing kept
    assert not list((Path(config.data.raw_dir) / SHARDS).iterdir())


# ------------------------------------------------------------------ 8. smaller defects


def test_exif_orientation_is_applied_so_a_tagged_photo_counts_like_the_rotated_one():
    photo = Image.open(FIXTURES / "bin-images" / f"{IDS[0]}.jpg").convert("RGB")
    upright, tagged = io.BytesIO(), io.BytesIO()
    photo.save(upright, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.transpose(Image.Transpose.ROTATE_90).save(tagged, "PNG", exif=exif)
    assert (decode_and_resize(tagged.getvalue(), 64) == decode_and_resize(upright.getvalue(), 64)).all()


def test_a_resumed_training_reproduces_an_uninterrupted_one(prepared, tmp_path):
    from bincounter.training.loop import fit

    dirs = {n: prepared / "data/prepared" / n for n in ("train", "val", "test")}
    settings = {"train.profile_steps": 0, "train.num_workers": 0, "train.augment": 0.5, "train.epochs": 3,
                "train.warmup_epochs": 1.5}  # interrupted halfway through the warm-up
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = fit(config_on(prepared, tmp_path / "a", **settings), dirs)

    def interrupt_in_epoch_2(epoch, metrics):  # after epoch 1's checkpoint, before epoch 2's
        if epoch == 2:
            raise KeyboardInterrupt

    interrupted = config_on(prepared, tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, dirs, on_epoch=interrupt_in_epoch_2)
    resumed = fit(interrupted, dirs, resume=True)
    assert torch.load(Path(interrupted.train.checkpoint_dir) / "last.pt", weights_only=True)["epoch"] == 3
    assert resumed.epoch_metrics == straight.epoch_metrics
    steps, lr = len(straight.history.step_losses) // 3, interrupted.train.lr
    assert straight.epoch_metrics[0]["lr"] == pytest.approx(lr * (steps + 1) / (1.5 * steps) * 0.75)  # warming
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def train_command(config, tmp_path: Path) -> list[str]:
    """`python -m bincounter train` in a subprocess with config's folders, store and epochs."""
    settings = {"train.data_dir": config.train.data_dir, "split.out_dir": config.split.out_dir,
                "mlflow.tracking_uri": config.mlflow.tracking_uri, "mlflow.experiment": "tests",
                "mlflow.artifact_location": config.mlflow.artifact_location,
                "train.checkpoint_dir": config.train.checkpoint_dir, "train.arch": "resnet18",
                "train.image_size": 64, "train.batch_size": 8, "train.num_workers": 0, "train.profile_steps": 0,
                "train.epochs": config.train.epochs}
    return [sys.executable, "-m", "bincounter", "train", "--params", empty_params(tmp_path),
            *[f"--set={k}={v}" for k, v in settings.items()]]


def test_a_killed_training_run_is_continued_by_resume_not_left_running(prepared, tmp_path):
    from mlflow import MlflowClient

    config = config_on(prepared, tmp_path, **{"train.epochs": 2})
    args = train_command(config, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in first.stdout:  # kill -9 right after the first epoch's checkpoint
        if line.startswith("epoch=1 "):
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    client = MlflowClient(config.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["RUNNING"]  # what kill -9 leaves
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"mlflow: continuing run {runs[0].info.run_id}" in resumed.stdout
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "macro_accuracy")] == [1, 2]


def test_kill_ends_the_training_run_killed_with_one_line(prepared, tmp_path):
    from mlflow import MlflowClient

    config = config_on(prepared, tmp_path, **{"train.epochs": 5})
    args = train_command(config, tmp_path)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("epoch=1 "):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted: partial results were not kept; rerun to resume"
    client = MlflowClient(config.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "test/labels.csv").write_text("image_id,count,shard,offset,size\n../../etc/passwd,1,a.tar,0,9\n"),
     r"labels.csv line 2: unsafe id '../../etc/passwd'"),
    (lambda d: (d / "test/labels.csv").write_text("image_id,count,shard,offset,size\n00013,many,a.tar,0,9\n"),
     "is not prepared labels"),
    (lambda d: [p.write_bytes(p.read_bytes()[:2000]) for p in d.glob("test/*.tar")], r"\.tar is damaged \(cut short"),
    (lambda d: [p.unlink() for p in d.glob("test/*.tar")], r"shard test-\d+-\w+\.tar is missing"),
])
def test_hand_edited_or_damaged_prepared_data_is_one_line(prepared_copy, tmp_path, capsys, damage, message):
    import re

    config = config_on(prepared_copy, tmp_path)
    damage(prepared_copy / "data/prepared")
    code = main(["train", "--params", empty_params(tmp_path), "--data-dir", str(prepared_copy / "data/prepared"),
                 "--arch", "resnet18", "--image-size", "64", "--num-workers", "0", "--epochs", "1",
                 "--set", f"split.out_dir={prepared_copy / 'data/splits'}",
                 "--set", f"mlflow.tracking_uri={config.mlflow.tracking_uri}",
                 "--set", f"mlflow.artifact_location={config.mlflow.artifact_location}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: ") and re.search(message, last), last


def test_a_photo_damaged_inside_its_shard_stops_training_in_one_line(prepared_copy, tmp_path, capsys):
    """Same length, so the up-front checks pass: the JPEG fails to decode in a loader worker, and the error
    that torch re-raises in the main process (with the worker's traceback) still reaches the user as one line."""
    import csv

    config = config_on(prepared_copy, tmp_path)
    train = prepared_copy / "data/prepared/train"
    with open(train / "labels.csv", newline="") as handle:
        first = next(csv.DictReader(handle))
    shard = bytearray((train / first["shard"]).read_bytes())
    offset, size = int(first["offset"]), int(first["size"])
    shard[offset : offset + size] = bytes(size)
    (train / first["shard"]).write_bytes(bytes(shard))
    code = main(["train", "--params", empty_params(tmp_path), "--data-dir", str(prepared_copy / "data/prepared"),
                 "--arch", "resnet18", "--image-size", "64", "--num-workers", "1", "--epochs", "1",
                 "--set", f"split.out_dir={prepared_copy / 'data/splits'}",
                 "--set", f"mlflow.tracking_uri={config.mlflow.tracking_uri}",
                 "--set", f"mlflow.artifact_location={config.mlflow.artifact_location}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"error: {train}/{first['shard']}: photo {first['image_id']} is not a "
                                            "readable JPEG (a damaged shard?); rerun `dvc repro prepare`")


def test_a_params_file_nested_too_deeply_is_one_line(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data: " + "[" * 3000 + "]" * 3000 + "\n")
    assert main(["split", "--params", str(params)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {params}: not valid YAML (RecursionError)"


@pytest.mark.parametrize("content, where", [
    (b"id,label\n1,2\n", "header"),  # someone else's CSV
    (b"image_id,status,reason,count,shard\n" + b"".join(b"%d,ok,,1,raw-00000.tar\n" % i for i in range(5000))
     + b"x,ok,\xff\xfe\xfd,1,raw-00000.tar\n", "far past the first block the reader decodes"),
], ids=["foreign", "not-utf8"])
def test_a_foreign_or_damaged_fetch_index_is_one_line(tmp_path, content, where):
    from bincounter.data.split import label

    (tmp_path / "index.csv").write_bytes(content)
    with pytest.raises(BincounterError, match=r"index.csv is not fetch's index \(image_id,status,reason,count,"
                                              r"shard\): rerun the fetch stage"):
        label(tmp_path, 5)  # the split stage reads it a row at a time: damage past the header is caught too
