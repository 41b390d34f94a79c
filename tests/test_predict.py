"""`bincounter predict` and `bincounter reconcile` on the real fixture photos, locally, from S3 and via an endpoint."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import boto3
import pytest
from conftest import empty_params, FIXTURES, fixture_labels, seed_bucket

from bincounter.cli import main
from bincounter.errors import BincounterError
from bincounter.serving.predict import find_images, predict_paths
from bincounter.serving.reconcile import judge, read_expected, read_records, reconcile_command

pytestmark = pytest.mark.slow
IMAGES = FIXTURES / "bin-images"


@pytest.fixture
def params(trained, tmp_path):
    """CLI arguments pointing at the trained fixture's registry (no params.yaml in the checkout is read)."""
    return ["--params", empty_params(tmp_path), "--set", f"mlflow.tracking_uri={trained['tracking_uri']}"]


@pytest.fixture(scope="module")
def reference(_trained_once):
    """Predictions for every fixture image, computed once through the library."""
    rows = list(predict_paths(_trained_once["config"], [str(IMAGES)], batch_size=64))
    return {row["image"]: row for row in rows}


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_predict_files_and_folders_prints_one_json_line_per_image(params, reference, capsys):
    single = str(IMAGES / "00013.jpg")
    assert main(["predict", *params, "--batch-size", "7", single, str(IMAGES)]) == 0
    out, err = capsys.readouterr()
    rows = json_lines(out)
    assert len(rows) == 1 + len(list(IMAGES.glob("*.jpg")))
    assert rows[0]["image"] == single and rows[1]["image"] == str(IMAGES / "00013.jpg")
    for row in rows:
        assert set(row) == {"image", "count", "confidence", "probabilities", "expected_count"}
        assert len(row["probabilities"]) == 6 and row["expected_count"] == pytest.approx(
            sum(k * p for k, p in enumerate(row["probabilities"])))
        assert row["confidence"] == pytest.approx(max(row["probabilities"]))
        assert row["count"] == reference[row["image"]]["count"]  # batch size does not change answers
        assert row["probabilities"] == pytest.approx(reference[row["image"]]["probabilities"], abs=1e-5)
    assert "img" in err  # tqdm bar on stderr for many images, nothing of it on stdout


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], "/no/such/folder: no such file or folder"),
    (["--model", "models:/no-such-model@champion", str(IMAGES / "00013.jpg")], "cannot load model"),
    (["--batch-size", "0", str(IMAGES / "00013.jpg")], "--batch-size must be at least 1"),
])
def test_predict_errors_are_one_line(params, capsys, args, message):
    assert main(["predict", *params, *args]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().startswith("error:") and message in err and "Traceback" not in err


def test_unreadable_image_names_the_file(params, tmp_path, capsys):
    folder = tmp_path / "bins"
    folder.mkdir()
    shutil.copy(IMAGES / "00013.jpg", folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert main(["predict", *params, str(folder)]) == 1
    assert f"error: {folder / 'broken.jpg'}: not an image" in capsys.readouterr().err


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(BincounterError, match="no .jpg/.jpeg/.png images"):
        find_images([str(tmp_path)])


def test_predict_s3_prefix(aws, params, reference, capsys):
    ids = seed_bucket(ids=["00013", "00024", "00504", "09741"])
    assert main(["predict", *params, "--batch-size", "3", "s3://aft-vbi-pds/bin-images/"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [f"s3://aft-vbi-pds/bin-images/{i}.jpg" for i in sorted(ids)]
    for row, image_id in zip(rows, sorted(ids)):
        assert row["count"] == reference[str(IMAGES / f"{image_id}.jpg")]["count"]

    assert main(["predict", *params, "s3://aft-vbi-pds/nothing-here/"]) == 1
    assert "no .jpg/.jpeg/.png images found" in capsys.readouterr().err


def test_predict_public_bucket_without_aws_credentials(aws, params, reference, tmp_path):
    """Like s3://aft-vbi-pds for a user with no AWS account: reads go unsigned. A fresh process, because
    boto3's default session in this one has already resolved the test credentials."""
    seed_bucket(ids=["00013", "00024"])
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run([sys.executable, "-m", "bincounter", "predict", *params,
                             "s3://aft-vbi-pds/bin-images/00024.jpg"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    [row] = json_lines(result.stdout)
    assert row["image"] == "s3://aft-vbi-pds/bin-images/00024.jpg"
    assert row["count"] == reference[str(IMAGES / "00024.jpg")]["count"]


def queue_endpoint_results(moto_url: str, bodies: list[str]) -> None:
    payload = {"results": [{"Body": body, "ContentType": "application/json"} for body in bodies]}
    request = urllib.request.Request(f"{moto_url}/moto-api/static/sagemaker/endpoint-results",
                                     data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10)


@pytest.fixture
def sent_bodies():
    """Bodies of every InvokeEndpoint call boto3 makes in this test (the emulator cannot show them)."""
    bodies = []

    def record(params, **_):
        bodies.append(json.loads(params["Body"]))

    events = boto3._get_default_session().events
    events.register("provide-client-params.sagemaker-runtime.InvokeEndpoint", record)
    yield bodies
    events.unregister("provide-client-params.sagemaker-runtime.InvokeEndpoint", record)


def test_predict_through_endpoint_sends_mlflow_json_in_batches(aws, params, reference, sent_bodies, capsys):
    files = [IMAGES / f"{i}.jpg" for i in ("00013", "00024", "00504")]
    answers = [reference[str(f)] for f in files]
    strip = [{k: a[k] for k in ("count", "confidence", "probabilities")} for a in answers]
    queue_endpoint_results(aws.url, [json.dumps({"predictions": strip[:2]}), json.dumps({"predictions": strip[2:]})])

    args = ["predict", *params, "--endpoint", "bin-counter", "--region", "us-east-1", "--batch-size", "2"]
    assert main(args + [str(f) for f in files]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert rows == [{"image": str(f), **s} for f, s in zip(files, strip)]
    assert [len(b["dataframe_split"]["data"]) for b in sent_bodies] == [2, 1]
    first = sent_bodies[0]["dataframe_split"]
    assert first["columns"] == ["image"]
    assert base64.b64decode(first["data"][0][0]) == files[0].read_bytes()


def test_endpoint_answer_that_is_not_mlflow_json_is_a_clear_error(aws, params, capsys):
    queue_endpoint_results(aws.url, ["<html>gateway error</html>"])
    assert main(["predict", *params, "--endpoint", "bin-counter", str(IMAGES / "00013.jpg")]) == 1
    assert "error: endpoint bin-counter: answer is not MLflow's" in capsys.readouterr().err


# ------------------------------------------------------------------ reconcile


def test_expected_counts_from_csv_or_metadata_folder(tmp_path):
    labels = fixture_labels()
    assert read_expected(str(FIXTURES / "labels.csv")) == labels
    assert read_expected(str(FIXTURES / "metadata")) == labels
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,expected\n00013,two\n00024,3\n00040,1\n00040,2\n../../etc/x,1\n00024,3\n")
    records = read_records(str(bad))
    assert records.expected == {"00024": 3} and records.repeated == 1  # the rest goes on
    assert records.unusable["00013"] == "expected count 'two' is not a whole number (line 2)"
    assert records.unusable["00040"] == "listed more than once with different counts (1 and 2)"
    assert records.unusable["../../etc/x"].startswith("unsafe id '../../etc/x'")
    (tmp_path / "other.csv").write_text("id,count\n1,2\n")
    with pytest.raises(BincounterError, match="columns image_id,expected"):
        read_expected(str(tmp_path / "other.csv"))


def test_judge_statuses():
    prediction = {"count": 2, "confidence": 0.7, "probabilities": [0.0, 0.1, 0.7, 0.2, 0.0, 0.0]}
    assert judge("a", 2, prediction, 0.5)["status"] == "agree"
    row = judge("a", 3, prediction, 0.5)
    assert row["status"] == "flagged" and row["p_expected"] == 0.2
    assert judge("a", 3, prediction, 0.8)["status"] == "low_confidence"
    assert judge("a", 9, prediction, 0.5)["status"] == "out_of_range"


def test_reconcile_flags_disagreeing_bins_most_confident_first(trained, params, reference, tmp_path, capsys):
    predicted = {k.rsplit("/", 1)[-1][:-4]: v for k, v in reference.items()}
    ids = sorted(predicted)[:12]
    # the first six records are wrong on purpose (off by one or two), the others match the model
    recorded = {i: (predicted[i]["count"] + 1 + n % 2) % 6 if n < 6 else predicted[i]["count"]
                for n, i in enumerate(ids)}
    expected_csv = tmp_path / "expected.csv"
    expected_csv.write_text("image_id,expected\n" + "".join(f"{i},{c}\n" for i, c in recorded.items()))
    report = tmp_path / "out" / "reconcile.csv"

    args = ["reconcile", *params, "--expected", str(expected_csv), "--images", str(IMAGES),
            "--report", str(report), "--low-confidence", "0", "--batch-size", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reconciled 12 bins: 6 agree, 6 flagged, 0 low confidence" in out
    with open(report, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["flagged"] * 6 + ["agree"] * 6
    flagged = rows[:6]
    assert [float(r["confidence"]) for r in flagged] == sorted((float(r["confidence"]) for r in flagged),
                                                              reverse=True)
    assert {r["image_id"] for r in flagged} == set(ids[:6])
    for r in rows:
        assert int(r["expected"]) == recorded[r["image_id"]]
        assert int(r["predicted"]) == predicted[r["image_id"]]["count"]
    assert out.index(flagged[0]["image_id"]) < out.index(flagged[-1]["image_id"])

    rows = reconcile_command(trained["config"], None, str(expected_csv), str(IMAGES), str(report),
                             low_confidence=1.0, batch_size=32)
    assert sum(r["status"] == "low_confidence" for r in rows) == 6  # nothing is that sure


def test_reconcile_abid_metadata_folder_counts_bins_above_range(params, tmp_path, capsys):
    report = tmp_path / "r.csv"
    assert main(["reconcile", *params, "--expected", str(FIXTURES / "metadata"), "--images", str(IMAGES),
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    above = sum(count > 5 for count in fixture_labels().values())
    assert f"reconciled {len(fixture_labels())} bins" in out and f"{above} above the model's range" in out


def test_reconcile_missing_images_is_an_error(params, tmp_path, capsys):
    expected_csv = tmp_path / "expected.csv"
    expected_csv.write_text("image_id,expected\n00013,0\n523,1\n")
    assert main(["reconcile", *params, "--expected", str(expected_csv), "--images", str(IMAGES),
                 "--report", str(tmp_path / "r.csv")]) == 1
    err = capsys.readouterr().err
    assert "1 recorded bin(s) have no image in" in err and "523" in err
    assert not (tmp_path / "r.csv").exists()


def test_reconcile_images_under_s3_prefix(aws, params, tmp_path, capsys):
    seed_bucket(ids=["00013", "00024", "09741"])
    expected_csv = tmp_path / "expected.csv"
    expected_csv.write_text("image_id,expected\n00013,0\n00024,1\n09741,5\n")
    args = ["reconcile", *params, "--expected", str(expected_csv), "--images", "s3://aft-vbi-pds/bin-images",
            "--report", str(tmp_path / "r.csv")]
    assert main(args) == 0
    assert "reconciled 3 bins" in capsys.readouterr().out
    with open(tmp_path / "r.csv", newline="") as handle:
        images = {row["image_id"]: row["image"] for row in csv.DictReader(handle)}
    assert images["09741"] == "s3://aft-vbi-pds/bin-images/09741.jpg"

    expected_csv.write_text("image_id,expected\n00013,0\n523,1\n")
    assert main(args) == 1
    assert "error: s3://aft-vbi-pds/bin-images/523.jpg: cannot read" in capsys.readouterr().err
