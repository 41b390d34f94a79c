"""Training, tracking, the pyfunc contract, resume, profiles and rules."""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import empty_params, FIXTURES, config_on, fixture_b64, fixture_labels
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch.utils.data import DataLoader, Dataset

from bincounter import tracking
from bincounter.cli import main
from bincounter.errors import BincounterError
from bincounter.model import build_model
from bincounter.training.profiling import RunHistory, check_rules
from bincounter.training.checkpoints import CHECKPOINT_FILE
from bincounter.training.loop import autocast_dtype, fit, lr_schedule, train_one_epoch
from bincounter.training.loss import make_loss
from bincounter.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
HEAD = "backbone.fc.weight"


def rule(results, name):
    return next(r for r in results if r.name == name)


def cpu_has_native_bf16() -> bool:
    """An oracle independent of the code under test: the kernel's CPU flags (AMX-BF16 or AVX512-BF16)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def test_run_logs_metrics_params_lineage_plots_and_profile(trained):
    run = mlflow.get_run(trained["outcome"].run_id)
    metrics = run.data.metrics
    for name in ("accuracy", "rmse", "mae", "macro_accuracy", "off_by_one_accuracy", "train_loss", "val_loss",
                 "test_accuracy", "test_rmse", "test_macro_accuracy", "test_class_1_accuracy"):
        assert name in metrics, name
    history = MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert any(k.startswith("system/") for k in metrics), "system metrics are logged"
    assert run.data.params["train.arch"] == "resnet18"
    assert len(run.data.tags["git_commit"]) == 40
    rules_csv = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="profile/rules.csv"))
    import csv

    with open(rules_csv, newline="") as handle:
        written = {row["rule"]: row["status"] for row in csv.DictReader(handle)}
    tagged = {k.removeprefix("rule."): v for k, v in run.data.tags.items()
              if k.startswith("rule.") and not k.endswith(".evidence")}
    assert tagged == written and "loss_not_decreasing" in tagged  # every rule the profile wrote, as a tag
    assert run.data.tags["device"] == "cpu"  # train.precision auto: bf16 exactly where this CPU computes it natively
    assert run.data.tags["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/per_class_accuracy.png"} <= artifacts
    profile = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "profile")}
    assert {"profile/report.md", "profile/trace.json", "profile/top_operators.txt"} <= profile
    report = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="profile/report.md"))
    assert "| data_bottleneck |" in report.read_text()


def test_registered_champion_counts_real_images_through_the_contract(trained):
    model = mlflow.pyfunc.load_model("models:/bin-counter@champion")
    ids = list(fixture_labels())[:5]
    out = model.predict(pd.DataFrame({"image": [fixture_b64(i) for i in ids]}))
    assert list(out.columns) == ["count", "confidence", "probabilities", "expected_count"] and len(out) == 5
    for _, row in out.iterrows():
        probs = np.array(row["probabilities"])
        assert probs.shape == (6,) and abs(probs.sum() - 1) < 1e-4
        assert row["count"] == probs.argmax() and abs(row["confidence"] - probs.max()) < 1e-6  # decode: argmax
        assert row["expected_count"] == pytest.approx(float(probs @ np.arange(6)))
    # any size, PNG too: the model resizes itself
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.open(FIXTURES / "bin-images" / f"{ids[0]}.jpg").resize((123, 321)).save(buffer, "PNG")
    png = model.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]}))
    # the model squashes it to its stored size the way prepare does: sending those pixels already squashed
    # (lossless PNG, so no resize is left to do) must give the same answer
    from bincounter.images import decode_and_resize

    stored = decode_and_resize(buffer.getvalue(), model.unwrap_python_model().model_config["stored_size"])
    assert stored.shape[0] == stored.shape[1] != 123
    squashed = BytesIO()
    Image.fromarray(stored).save(squashed, "PNG")
    same = model.predict(pd.DataFrame({"image": [base64.b64encode(squashed.getvalue()).decode()]}))
    assert png["count"][0] == same["count"][0]
    np.testing.assert_allclose(png["probabilities"][0], same["probabilities"][0], atol=1e-6)


def test_logged_model_stores_the_weights_once(trained):
    root = Path(mlflow.artifacts.download_artifacts("models:/bin-counter@champion"))
    weights = next(root.glob("artifacts/*/weights.pt")).stat().st_size
    assert weights > 10 * 2**20  # resnet18
    assert (root / "python_model.pkl").stat().st_size < 2**20  # the wrapper only, not a second copy


def test_a_model_logged_under_the_old_import_path_still_loads(trained, tmp_path):
    """Models registered before the split into wings pickled `bincounter.pyfunc.BinCounterPyfunc`."""
    import shutil

    import cloudpickle

    import bincounter.pyfunc  # noqa: F401 - the deprecated path must be importable for the pickle below
    from bincounter.serving import pyfunc

    model_dir = tmp_path / "old-model"
    shutil.copytree(mlflow.artifacts.download_artifacts("models:/bin-counter@champion"), model_dir)
    cls = pyfunc.BinCounterPyfunc
    cls.__module__ = "bincounter.pyfunc"
    try:
        (model_dir / "python_model.pkl").write_bytes(cloudpickle.dumps(cls()))
    finally:
        cls.__module__ = "bincounter.serving.pyfunc"
    pickled = (model_dir / "python_model.pkl").read_bytes()
    assert b"bincounter.pyfunc" in pickled and b"bincounter.serving" not in pickled
    image_id = list(fixture_labels())[0]
    old = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": [fixture_b64(image_id)]}))
    new = mlflow.pyfunc.load_model("models:/bin-counter@champion").predict(
        pd.DataFrame({"image": [fixture_b64(image_id)]}))
    assert old["count"][0] == new["count"][0] and old["probabilities"][0] == new["probabilities"][0]


@pytest.mark.parametrize("rows, message", [
    (["not base64 at all!"], "row 0: 'image' is not valid base64"),
    (["__VALID__", base64.b64encode(b"just some text").decode()], "row 1: not an image"),
])
def test_bad_rows_raise_an_error_naming_the_row(trained, rows, message):
    model = mlflow.pyfunc.load_model("models:/bin-counter@champion")
    rows = [fixture_b64(list(fixture_labels())[0]) if r == "__VALID__" else r for r in rows]
    with pytest.raises(MlflowException, match=message):
        model.predict(pd.DataFrame({"image": rows}))


def test_champion_alias_moves_only_when_beaten(trained):
    config, client = trained["config"], MlflowClient()
    uri = trained["outcome"].model_uri
    current = client.get_model_version_by_alias("bin-counter", "champion")
    best = float(current.tags["test_macro_accuracy"])
    worse = mlflow.register_model(uri, "bin-counter").version
    _, promoted = tracking.promote(config, SimpleNamespace(registered_model_version=worse),
                                   {"macro_accuracy": best - 0.1})
    assert not promoted and client.get_model_version_by_alias("bin-counter", "champion").version == current.version
    better = mlflow.register_model(uri, "bin-counter").version
    _, promoted = tracking.promote(config, SimpleNamespace(registered_model_version=better),
                                   {"macro_accuracy": best + 0.1})
    assert promoted and str(client.get_model_version_by_alias("bin-counter", "champion").version) == str(better)


def test_resume_continues_from_the_saved_epoch(prepared, tmp_path, capsys):
    config = config_on(prepared, tmp_path, **{"train.epochs": 1, "train.profile_steps": 0})
    dirs = {n: prepared / "data/prepared" / n for n in ("train", "val", "test")}
    first = fit(config, dirs)
    assert len(first.epoch_metrics) == 1
    assert torch.load(tmp_path / "checkpoints" / CHECKPOINT_FILE, weights_only=False)["epoch"] == 1
    config.train.epochs = 2
    second = fit(config, dirs, resume=True)
    assert "continuing after epoch 1" in capsys.readouterr().out
    assert len(second.epoch_metrics) == 2 and second.epoch_metrics[0] == first.epoch_metrics[0]
    assert torch.load(tmp_path / "checkpoints" / CHECKPOINT_FILE, weights_only=False)["epoch"] == 2


def test_weight_average_is_what_is_validated_saved_and_resumed(prepared, tmp_path):
    dirs = {n: prepared / "data/prepared" / n for n in ("train", "val", "test")}
    for name in ("plain", "ema", "resumed"):
        (tmp_path / name).mkdir()
    knobs = {"train.epochs": 2, "train.profile_steps": 0, "train.num_workers": 0, "train.patience": 5}
    plain = fit(config_on(prepared, tmp_path / "plain", **knobs), dirs)
    averaged = fit(config_on(prepared, tmp_path / "ema", **knobs, **{"train.ema": 0.9}), dirs)
    state = torch.load(tmp_path / "ema" / "checkpoints" / CHECKPOINT_FILE, weights_only=True)
    trained = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    # the raw weights carry on; the averaged ones lag behind them, and the result is the average
    assert int(state["ema"]["n_averaged"]) > 1
    assert not torch.equal(state["model"][HEAD], trained[HEAD])
    if averaged.best_epoch == 2:
        assert torch.equal(averaged.model.state_dict()[HEAD], trained[HEAD])
    assert not torch.equal(plain.model.state_dict()[HEAD], averaged.model.state_dict()[HEAD])
    # one epoch, then a resume: the average carries on over both epochs' steps instead of starting again
    first = config_on(prepared, tmp_path / "resumed", **{**knobs, "train.epochs": 1, "train.ema": 0.9})
    fit(first, dirs)
    first.train.epochs = 2
    fit(first, dirs, resume=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / CHECKPOINT_FILE, weights_only=True)
    assert int(resumed["ema"]["n_averaged"]) == int(state["ema"]["n_averaged"])


def test_checkpoint_holds_the_resolved_config_and_refuses_a_different_shape(prepared, tmp_path):
    config = config_on(prepared, tmp_path, **{"train.epochs": 1, "train.profile_steps": 0})
    dirs = {n: prepared / "data/prepared" / n for n in ("train", "val", "test")}
    fit(config, dirs)
    state = torch.load(tmp_path / "checkpoints" / CHECKPOINT_FILE, weights_only=True)
    assert state["config"] == config.to_dict()
    for key, value, said in [("train.arch", "resnet34", "train.arch=resnet18, this run resnet34"),
                             ("data.max_count", 7, "data.max_count=5, this run 7"),
                             ("train.image_size", 48, "train.image_size=64, this run 48")]:
        other = config_on(prepared, tmp_path, **{"train.epochs": 2, "train.profile_steps": 0, key: value})
        with pytest.raises(BincounterError, match=said):
            fit(other, dirs, resume=True)


def test_zero_learning_rate_fires_loss_not_decreasing(prepared, tmp_path):
    config = config_on(prepared, tmp_path, **{"train.epochs": 3, "train.lr": 0, "train.profile_steps": 0,
                                               "train.augment": 0})
    result = fit(config, {n: prepared / "data/prepared" / n for n in ("train", "val", "test")})
    assert rule(check_rules(result.history), "loss_not_decreasing").status == "fail"


def test_rules_on_crafted_histories():
    falling = RunHistory(step_losses=[2.0 - 0.1 * i for i in range(12)], grad_norms=[1.0] * 12,
                         data_seconds=1, compute_seconds=9, train_loss=[2, 1.5, 1.0, 0.5], val_loss=[2, 1.2, 1.5, 1.9])
    results = check_rules(falling)
    assert rule(results, "loss_not_decreasing").status == "pass"
    assert rule(results, "overfit").status == "fail"
    assert rule(results, "data_bottleneck").status == "pass"
    assert rule(results, "low_gpu_utilization").status == "skipped"
    broken = RunHistory(step_losses=[1.0] * 5, grad_norms=[1e-9, float("inf"), 1e-9, 1e-9])
    assert rule(check_rules(broken), "exploding_gradient").status == "fail"
    assert rule(check_rules(broken), "vanishing_gradient").status == "fail"


class SleepyDataset(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        time.sleep(0.6)  # 2.4 s a batch of 4: far above a tiny resnet18 step even on a loaded 2-core machine
        return torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), torch.tensor(index % 3)


def test_sleeping_data_loader_fires_data_bottleneck(tmp_path):
    model = build_model("resnet18", 6)
    history = RunHistory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train_one_epoch(model, DataLoader(SleepyDataset(), batch_size=4), optimizer, make_loss("emd", 1.0),
                    torch.device("cpu"), history, show_progress=False)
    result = rule(check_rules(history), "data_bottleneck")
    assert result.status == "fail" and "waiting for data" in result.evidence


def test_emd_loss_charges_more_for_being_further_off():
    emd, ce = make_loss("emd", 1.0), make_loss("ce", 1.0)
    target = torch.tensor([0])
    near = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    assert emd(far, target) > emd(near, target)
    assert torch.isclose(ce(far, target), ce(near, target))


def _schedule(warmup_epochs: float, epochs: int = 4, steps: int = 10) -> list[float]:
    """The learning rate of each optimizer step of `epochs` epochs of `steps` steps."""
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=0.01)
    scheduler = lr_schedule(optimizer, TrainConfig(epochs=epochs, lr=0.01, warmup_epochs=warmup_epochs), steps)
    rates = []
    for _ in range(epochs * steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warm_up_rises_step_by_step_then_the_cosine_falls_epoch_by_epoch():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=0.01)
    per_epoch = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    cosine = []
    for _ in range(4):
        cosine.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        per_epoch.step()
    plain = _schedule(warmup_epochs=0)
    assert plain == pytest.approx([rate for rate in cosine for _ in range(10)])  # off: the epoch cosine as before
    warm = _schedule(warmup_epochs=0.5)
    assert warm[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])  # 5 steps to the full rate
    assert warm[5:] == pytest.approx(plain[5:])
    assert _schedule(warmup_epochs=2)[15] == pytest.approx(16 / 20 * cosine[1])  # a warm-up across epochs


def test_label_smoothing_is_least_at_the_smoothed_target_not_at_certainty():
    target, eps, k = torch.tensor([2]), 0.3, 6
    smoothed = torch.full((1, k), eps / k)
    smoothed[0, 2] += 1 - eps
    sure = torch.full((1, k), -20.0)
    sure[0, 2] = 20.0
    plain, soft = make_loss("ce", 0.0), make_loss("ce", 0.0, label_smoothing=eps)
    assert plain(sure, target) < plain(smoothed.log(), target)  # without it, certainty is best
    assert soft(smoothed.log(), target) < soft(sure, target)  # with it, the smoothed distribution is
    # and the minimum sits there: nudging the logits any way costs more
    for nudge in torch.eye(k):
        assert soft(smoothed.log() + 0.1 * nudge, target) > soft(smoothed.log(), target)
    # emd's cross-entropy term is smoothed too; sord's target is soft already and stays as it is
    assert make_loss("emd", 1.0, label_smoothing=eps)(sure, target) > make_loss("emd", 1.0)(sure, target)
    assert make_loss("sord", 0.0, label_smoothing=eps)(sure, target) == make_loss("sord", 0.0)(sure, target)


def test_sord_loss_charges_more_for_being_further_off_and_is_least_at_its_soft_labels():
    from bincounter.training.loss import soft_ordinal_labels

    sord = make_loss("sord", 1.0)
    target = torch.tensor([2])
    near = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0]])
    far = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert sord(far, target) > sord(near, target) + 0.5  # plain cross-entropy charges both alike
    soft = soft_ordinal_labels(target, 6)
    assert soft.argmax().item() == 2 and torch.isclose(soft[0, 1], soft[0, 3])  # symmetric, peaked at the count
    logits = soft.log().requires_grad_()  # the predicted distribution equal to the soft labels: a minimum
    sord(logits, target).backward()
    assert logits.grad.abs().max() < 1e-6
    weights = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    targets, both = torch.tensor([2, 0]), torch.cat([near, near])
    each = torch.stack([sord(both[i : i + 1], targets[i : i + 1]) for i in range(2)])
    expected = (each * weights[targets]).sum() / weights[targets].sum()  # class weights as cross_entropy's
    assert torch.isclose(make_loss("sord", 1.0, weights)(both, targets), expected)


def test_pretrained_offline_says_how_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # fail fast and stay offline
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(BincounterError, match="--weights-path"):
        build_model("resnet18", 6, pretrained=True)


def test_weights_path_loads_a_local_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 6, weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert model.backbone.fc.out_features == 6


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["train", "--params", empty_params(tmp_path), "--optimizer", "rmsprop"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "error: train.optimizer must be adamw or sgd, got 'rmsprop'"
    code = main(["train", "--params", empty_params(tmp_path), "--data-dir", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "run `dvc repro` first" in err and "\n" not in err


@pytest.mark.slow
def test_mlflow_run_trains_and_registers(prepared, tmp_path):
    """The documented command: mlflow run . --env-manager local -P epochs=1 -P arch=resnet18 ..."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no experiment id leaks in
    env["MLFLOW_TRACKING_URI"] = uri
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
           "-P", "epochs=1", "-P", "arch=resnet18", "-P", "image_size=64", "-P", "pretrained=false",
           "-P", "batch_size=8", "-P", f"data_dir={prepared / 'data/prepared'}", "-P", "lr=0.005",
           "-P", "profile_steps=0", "-P", f"checkpoint_dir={tmp_path / 'ckpt'}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"
    assert {"metrics.accuracy", "metrics.rmse"} <= set(runs.columns)
    assert str(MlflowClient().get_model_version_by_alias("bin-counter", "champion").version) == "1"
    # the -P values reached the training itself (train.* is the configuration the code resolved and used;
    # the plain names are what `mlflow run` logs on its own)
    run = mlflow.get_run(runs["run_id"][0])
    used = {"train.epochs": "1", "train.arch": "resnet18", "train.image_size": "64", "train.batch_size": "8",
            "train.lr": "0.005", "train.pretrained": "False", "train.profile_steps": "0"}
    assert {k: run.data.params[k] for k in used} == used
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1]
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert state["config"]["train"]["lr"] == 0.005 and state["config"]["train"]["data_dir"] == str(prepared / "data/prepared")
    # params_sha256 is the hash of that effective configuration, not of ./params.yaml
    import hashlib
    import json

    assert run.data.tags["params_sha256"] == hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode()).hexdigest()


@pytest.mark.slow
def test_evaluate_reproduces_the_champions_test_metrics_in_a_new_run(trained, tmp_path, capsys):
    """`bincounter evaluate` (the MLproject's evaluate entry point) on the registered champion."""
    config, outcome = trained["config"], trained["outcome"]
    args = ["evaluate", "--params", empty_params(tmp_path), "--model", "models:/bin-counter@champion",
            "--split", "test", "--set", f"mlflow.tracking_uri={trained['tracking_uri']}",
            "--set", f"train.data_dir={config.train.data_dir}", "--set", f"mlflow.experiment={config.mlflow.experiment}"]
    assert main(args) == 0
    printed = dict(pair.split("=") for pair in capsys.readouterr().out.split())
    assert float(printed["accuracy"]) == pytest.approx(outcome.test_metrics["accuracy"], abs=1e-4)

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.split LIKE '%test'")
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"
    assert runs["tags.model_uri"][0] == "models:/bin-counter@champion"
    for name in ("accuracy", "rmse", "macro_accuracy"):
        assert runs[f"metrics.test_{name}"][0] == pytest.approx(outcome.test_metrics[name], abs=1e-4)
    artifacts = {f.path for f in MlflowClient().list_artifacts(runs["run_id"][0], "plots")}
    assert {"plots/confusion_matrix.png", "plots/per_class_accuracy.png", "plots/test_predictions.csv"} <= artifacts


def test_evaluate_an_unknown_model_is_a_one_line_error(trained, tmp_path, capsys):
    args = ["evaluate", "--params", empty_params(tmp_path), "--model", "models:/no-such-model/1",
            "--set", f"mlflow.tracking_uri={trained['tracking_uri']}"]
    assert main(args) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "Traceback" in line or "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot load model models:/no-such-model/1: ")


class RandomBins(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), torch.tensor(index % 6)


@pytest.mark.parametrize("precision, compute_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_sets_the_compute_dtype_and_keeps_weights_fp32(tmp_path, precision, compute_dtype):
    model = build_model("resnet18", 6)
    seen = []
    model.backbone.fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = model.backbone.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = train_one_epoch(model, DataLoader(RandomBins(), batch_size=4), optimizer, make_loss("emd", 1.0),
                           torch.device("cpu"), RunHistory(), show_progress=False,
                           amp_dtype=autocast_dtype(precision, torch.device("cpu")))
    assert seen == [compute_dtype, compute_dtype] and math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.backbone.fc.weight)  # the bf16 step still updated the fp32 weights


def test_auto_precision_follows_the_cpu_and_bad_values_are_refused(tmp_path):
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(BincounterError, match="train.precision must be auto, bf16 or fp32"):
        config_on(tmp_path, tmp_path, **{"train.precision": "fp16"})


def test_served_pyfunc_preprocesses_exactly_as_training_time_evaluation(trained):
    """The registered pyfunc and evaluate_split (what training reports as test metrics) give the same
    probabilities for the same prepared test images, sent losslessly as PNG so decoding is exact."""
    import io

    from PIL import Image

    from conftest import prepared_photos

    from bincounter.model import load_model_dir
    from bincounter.training.run import evaluate_split

    config = trained["config"]
    test_dir = Path(config.train.data_dir) / "test"
    images, ids = prepared_photos(test_dir)
    weights = next(Path(mlflow.artifacts.download_artifacts("models:/bin-counter@champion")).glob("artifacts/*/weights.pt"))
    net, model_config = load_model_dir(weights.parent)
    assert model_config["stored_size"] == images.shape[1] != model_config["image_size"]  # the resize is exercised
    expected = evaluate_split(net, test_dir, model_config, torch.device("cpu"))
    assert expected["ids"] == ids

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    served = mlflow.pyfunc.load_model("models:/bin-counter@champion").predict(
        pd.DataFrame({"image": [png(a) for a in images]}))
    np.testing.assert_allclose(np.stack(served["probabilities"]), np.asarray(expected["probabilities"]), atol=1e-5)
    assert served["count"].tolist() == np.asarray(expected["predictions"]).tolist()


# The architectures README.md lists as supported ("Supported architectures"): one per family, each built with
# weights=None, trained one step and evaluated at a small size. inception_v3 needs at least 75 px.
SUPPORTED_ARCHS = {"resnet18": 64, "squeezenet1_1": 64, "googlenet": 64, "inception_v3": 80,
                   "mobilenet_v3_small": 64, "efficientnet_b0": 64, "shufflenet_v2_x0_5": 64, "regnet_y_400mf": 64,
                   "mnasnet0_5": 64, "densenet121": 64}


@pytest.mark.parametrize("arch", list(SUPPORTED_ARCHS))
def test_supported_architecture_trains_and_evaluates(arch):
    size = SUPPORTED_ARCHS[arch]
    model = build_model(arch, 6)
    images = torch.randint(0, 255, (2, 3, size, size), dtype=torch.uint8)
    model.train()
    logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 6)  # one tensor, not (logits, aux)
    loss = make_loss("emd", 1.0)(logits, torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # every weight trains
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 6)


@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("where", ["photo", "batch"])
def test_augmentation_never_cuts_an_item_out_of_the_bin(strength, where):
    """Four items in the photo's very corners: every augmented view still shows four (a random crop or a
    rotation without zoom-out would cut some away and make the label wrong), photo by photo in a loader
    worker or as a batch (the GPU path)."""
    from scipy import ndimage

    from bincounter.training.dataset import train_transform

    image = torch.zeros(3, 256, 256, dtype=torch.uint8)
    for top, left in [(2, 2), (2, 238), (238, 2), (238, 238)]:
        image[:, top : top + 16, left : left + 16] = 255
    transform = train_transform(128, strength)
    torch.manual_seed(0)
    if where == "batch":
        views = transform.batch(image.expand(40, -1, -1, -1).contiguous())
        assert views.dtype == torch.uint8 and views.shape == (40, 3, 128, 128)
    else:
        views = [transform(image) for _ in range(40)]
    for view in views:
        _, items = ndimage.label(view[0].numpy() > 100)
        assert items == 4


def test_batch_augmentation_draws_every_photos_own_flips_turn_and_colour():
    """The GPU path augments a batch in one go, but each photo gets its own parameters: one item in the
    top-left corner of 64 copies lands in every quadrant (the flips), and copies that land in the same
    quadrant still differ (rotation, zoom, colour)."""
    from bincounter.training.dataset import train_transform

    image = torch.full((3, 256, 256), 40, dtype=torch.uint8)
    image[:, 20:80, 20:80] = 230
    torch.manual_seed(0)
    views = train_transform(128, 0.5).batch(image.expand(64, -1, -1, -1).contiguous()).float()
    bright = views[:, 0] > 150
    rows, cols = torch.arange(128.0)[None, :, None], torch.arange(128.0)[None, None, :]
    area = bright.sum(dim=(1, 2))
    centre_row = (bright * rows).sum(dim=(1, 2)) / area
    centre_col = (bright * cols).sum(dim=(1, 2)) / area
    quadrant = (centre_row > 64).long() * 2 + (centre_col > 64).long()
    per_quadrant = torch.bincount(quadrant, minlength=4)
    assert per_quadrant.min() >= 6, per_quadrant  # a fair coin per flip: about 16 each
    top_left = views[quadrant == 0]
    assert len(torch.unique(top_left.flatten(1), dim=0)) == len(top_left)


def test_loader_workers_take_the_cpu_a_gpu_leaves_free(monkeypatch):
    """train.num_workers -1: training on a GPU, every core but one decodes (shared among this machine's
    ranks); on the CPU at most 4, since the model's own threads need the cores."""
    from bincounter.training.loop import auto_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert (auto_workers(-1, gpu), auto_workers(-1, cpu), auto_workers(-1)) == (15, 4, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_workers(-1, gpu) == 3
    assert auto_workers(2, gpu) == 2  # a number asked for is kept
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert (auto_workers(-1, gpu), auto_workers(-1, cpu)) == (1, 1)


def test_auto_decodes_on_the_gpu_only_where_the_workers_would_be_slower():
    """train.jpeg_decoder auto: nvJPEG on the GPU kept pace with 6-10 loader workers (benchmarks/gpu.md), so a
    GPU with few workers decodes itself and one with many leaves it to them; the CPU always uses workers."""
    from bincounter.training.loop import GPU_DECODE_BELOW, decode_on_device

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode_on_device("auto", gpu, 3) and not decode_on_device("auto", gpu, 15)
    assert decode_on_device("auto", gpu, GPU_DECODE_BELOW - 1) and not decode_on_device("auto", gpu, GPU_DECODE_BELOW)
    assert not decode_on_device("auto", cpu, 1) and not decode_on_device("cpu", gpu, 1)
    assert decode_on_device("gpu", gpu, 15)
    with pytest.raises(BincounterError, match="jpeg_decoder=gpu needs a CUDA device"):
        decode_on_device("gpu", cpu, 1)
