"""Decoding, flip TTA and calibration: what evaluation measures is what the served model does."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import config_on, empty_params, prepared_photos
from PIL import Image

from bincounter.model import decode_counts, probabilities
from bincounter.training.calibration import (
    expected_calibration_error,
    fit_decode_cuts,
    fit_temperature,
    nll,
    reconcile_threshold,
)


def overconfident(n: int = 2000, classes: int = 6, right: float = 0.6, seed: int = 0):
    """Logits that always put ~all mass on one count, which is right only 60 % of the time."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    predicted = np.where(rng.random(n) < right, targets, (targets + rng.integers(1, classes, n)) % classes)
    logits = np.zeros((n, classes))
    logits[np.arange(n), predicted] = 8.0
    return logits, targets


def test_temperature_fitting_lowers_the_nll_and_the_ece_of_an_overconfident_model():
    logits, targets = overconfident()
    temperature = fit_temperature(logits, targets)
    before = probabilities(torch.from_numpy(logits)).numpy()
    after = probabilities(torch.from_numpy(logits), temperature).numpy()
    assert temperature > 1.5  # over-confident: the fitted temperature softens
    assert nll(after, targets) < nll(before, targets) - 0.5
    assert expected_calibration_error(after, targets) < 0.05 < expected_calibration_error(before, targets)
    assert (after.argmax(1) == before.argmax(1)).all()  # calibration never changes the most likely count


def test_too_few_validation_bins_keep_the_temperature_at_one():
    logits, targets = overconfident(n=40, right=1.0)  # all right: the NLL alone would drive T towards 0
    assert fit_temperature(logits, targets) == 1.0


def test_expected_decoding_rounds_the_mean_count_and_median_decoding_takes_the_middle_one():
    probs = np.array([[0.5, 0.0, 0.0, 0.5, 0.0, 0.0],     # argmax 0, mean 1.5 -> 2, median 0
                      [0.0, 0.1, 0.2, 0.3, 0.4, 0.0],     # argmax 4, mean 3.0 -> 3, median 3
                      [0.4, 0.0, 0.0, 0.0, 0.35, 0.25]])  # argmax 0, mean 2.65 -> 3, median 4
    assert decode_counts(probs, "argmax").tolist() == [0, 4, 0]
    assert decode_counts(probs, "expected").tolist() == [2, 3, 3]
    assert decode_counts(probs, "median").tolist() == [0, 3, 4]
    unnormalised = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.49]])  # never reaches 1/2: still a count in range
    assert decode_counts(unnormalised, "median").tolist() == [5]


def middle_hugging(n: int = 1200, classes: int = 6, seed: int = 0):
    """Probabilities whose expected count is squeezed toward the middle (2.5 + 0.4 (c - 2.5) + noise), as
    an unweighted model's are: rounding it almost never says 0 or 5."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    expected = np.clip(2.5 + 0.4 * (targets - 2.5) + rng.normal(0, 0.15, n), 0, classes - 1)
    low = np.minimum(np.floor(expected).astype(int), classes - 2)
    probs = np.zeros((n, classes))
    probs[np.arange(n), low] = 1 - (expected - low)
    probs[np.arange(n), low + 1] = expected - low
    return probs, targets


def macro(counts, targets):
    return np.mean([np.mean(counts[targets == c] == c) for c in np.unique(targets)])


def test_fitted_cuts_give_every_count_its_share_of_a_middle_hugging_model():
    probs, targets = middle_hugging()
    cuts = fit_decode_cuts(probs, targets)
    assert len(cuts) == 5 and np.all(np.diff(cuts) > 0)
    rounded, cut = decode_counts(probs, "expected"), decode_counts(probs, "thresholds", cuts)
    assert macro(rounded, targets) < 0.5 < 0.8 < macro(cut, targets)
    fresh, fresh_targets = middle_hugging(seed=1)  # fitted on one sample, they hold on another
    assert macro(decode_counts(fresh, "thresholds", cuts), fresh_targets) > 0.8


def test_too_few_validation_bins_keep_the_rounding_cuts():
    probs, targets = middle_hugging(n=40)
    cuts = fit_decode_cuts(probs, targets)
    assert cuts == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert decode_counts(probs, "thresholds", cuts).tolist() == decode_counts(probs, "expected").tolist()


def test_reconcile_threshold_reaches_the_stated_precision():
    rng = np.random.default_rng(1)
    confidence = rng.random(500)
    correct = rng.random(500) < confidence  # right about as often as it is sure
    targets = np.zeros(500, dtype=int)
    counts = np.where(correct, 0, 1)
    probs = np.zeros((500, 6))
    probs[np.arange(500), counts] = confidence
    threshold = reconcile_threshold(probs, targets, counts, precision=0.9)
    chosen = confidence >= threshold
    assert 0.7 < threshold < 1.0 and correct[chosen].mean() >= 0.9


@pytest.fixture(scope="module")
def tta_expected_model(prepared, tmp_path_factory):
    from bincounter.training.run import data_dirs_for, run_training

    root = tmp_path_factory.mktemp("tta")
    config = config_on(prepared, root, **{"train.tta": True, "train.decode": "expected", "train.epochs": 1,
                                          "train.profile_steps": 0, "mlflow.model_name": "bin-counter-tta"})
    outcome = run_training(config, data_dirs_for(config))
    return config, outcome


def test_the_served_model_decodes_and_augments_as_evaluation_does(tta_expected_model):
    from bincounter.model import load_model_dir
    from bincounter.training.run import evaluate_split

    config, outcome = tta_expected_model
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    net, model_config = load_model_dir(outcome.model_dir if outcome.model_dir and outcome.model_dir.exists() else
                                       next(Path(mlflow.artifacts.download_artifacts(outcome.model_uri))
                                            .glob("artifacts/*/weights.pt")).parent)
    assert model_config["tta"] is True and model_config["decode"] == "expected" and model_config["temperature"] > 0
    test_dir = Path(config.train.data_dir) / "test"
    evaluated = evaluate_split(net, test_dir, model_config, torch.device("cpu"))
    images, _ = prepared_photos(test_dir)

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")  # lossless: the served model decodes the same pixels
        return base64.b64encode(buffer.getvalue()).decode()

    served = mlflow.pyfunc.load_model(outcome.model_uri).predict(pd.DataFrame({"image": [png(a) for a in images]}))
    assert served["count"].tolist() == evaluated["predictions"].tolist()
    assert np.allclose(np.stack(served["probabilities"]), evaluated["probabilities"], atol=1e-5)
    assert np.allclose(served["expected_count"], evaluated["expected"], atol=1e-5)
    assert served["count"].tolist() == np.rint(served["expected_count"]).astype(int).tolist()  # decode: expected
    # decode: thresholds reads the cuts recorded with the model, in the pyfunc as in evaluation
    cuts = [0.2, 0.4, 0.6, 0.8, 1.0]
    pyfunc = mlflow.pyfunc.load_model(outcome.model_uri)
    pyfunc.unwrap_python_model().model_config.update(decode="thresholds", decode_cuts=cuts)
    served = pyfunc.predict(pd.DataFrame({"image": [png(a) for a in images]}))
    evaluated = evaluate_split(net, test_dir, {**model_config, "decode": "thresholds", "decode_cuts": cuts},
                               torch.device("cpu"))
    assert served["count"].tolist() == evaluated["predictions"].tolist()
    assert served["count"].tolist() == np.searchsorted(cuts, served["expected_count"]).tolist()
    run = mlflow.get_run(outcome.run_id)
    assert run.info.run_name == "resnet18-64px-emd-expected-tta"
    assert {"temperature", "val_ece_before", "val_ece_after", "test_ece", "test_argmax_macro_accuracy",
            "test_expected_macro_accuracy", "test_thresholds_macro_accuracy", "test_median_macro_accuracy"} <= set(run.data.metrics)


def test_reconcile_flags_at_the_threshold_recorded_with_the_model(tta_expected_model, tmp_path, capsys):
    from conftest import FIXTURES, fixture_labels

    from bincounter.cli import main

    config, outcome = tta_expected_model
    expected = tmp_path / "expected.csv"
    expected.write_text("image_id,expected\n" + "".join(f"{i},{c}\n" for i, c in list(fixture_labels().items())[:4]))
    args = ["reconcile", "--params", empty_params(tmp_path), "--model", outcome.model_uri, "--set",
            f"mlflow.tracking_uri={config.mlflow.tracking_uri}", "--expected", str(expected),
            "--images", str(FIXTURES / "bin-images"), "--report", str(tmp_path / "r.csv")]
    assert main(args) == 0
    out = capsys.readouterr().out
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    recorded = mlflow.pyfunc.load_model(outcome.model_uri).unwrap_python_model().model_config["reconcile_threshold"]
    assert f"flagging at confidence >= {recorded:.3f}" in out
    assert f"confidence < {recorded:g})" in out


def test_the_run_records_its_datasets_with_mlflow(tta_expected_model):
    """The run page's Datasets section: the three prepared splits, by context, with their prepare run."""
    import json

    config, outcome = tta_expected_model
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    inputs = mlflow.get_run(outcome.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(by_context) == {"training", "validation", "test"}
    for context, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        dataset = by_context[context].dataset
        folder = Path(config.train.data_dir) / split
        generation = json.loads((folder / "prepared.json").read_text())["generation"]
        assert dataset.name == f"abid-{split}" and dataset.digest == generation[:32]
        assert json.loads(dataset.source)["uri"] == str(folder.resolve())
        assert json.loads(dataset.profile)["num_rows"] == len((folder / "labels.csv").read_text().splitlines()) - 1
