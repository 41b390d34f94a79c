"""The SageMaker container contract: `python -m bincounter train` run the way a training job runs it.

The source is packaged exactly as the SageMaker backend uploads it (bincounter/ + params.yaml +
requirements.txt + sm_entry.py), the job's SM_* variables point at the prepared fixture splits, and the
hyperparameters arrive both as SM_HPS and as `--name value` arguments. No MLflow tracking URI is set, so
the job trains and writes its outputs without any tracking server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import config_on

HPS = {"epochs": "1", "arch": "resnet18", "batch_size": "4", "image_size": "64", "num_workers": "0",
       "profile_steps": "2", "pretrained": "false", "max_count": "5", "emd_weight": "1.0"}


def _args(hps: dict) -> list[str]:
    out = []
    for key, value in hps.items():  # as SageMaker's drivers pass them: --name value, names unchanged
        out += [f"--{key}", value]
    return out


@pytest.fixture
def job(prepared, tmp_path):
    """A packaged source folder and the SageMaker job environment around it."""
    from bincounter.aws.package import package_source

    config = config_on(prepared, tmp_path)
    code = package_source(config, tmp_path / "code")
    data = prepared / "data/prepared"
    dirs = {"model": tmp_path / "opt/ml/model", "output": tmp_path / "opt/ml/output/data",
            "checkpoints": tmp_path / "opt/ml/checkpoints"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "MLFLOW_", "BINCOUNTER_"))}
    env.update({
        "SM_CHANNEL_TRAIN": str(data / "train"), "SM_CHANNEL_VALIDATION": str(data / "val"),
        "SM_CHANNEL_TEST": str(data / "test"), "SM_MODEL_DIR": str(dirs["model"]),
        "SM_OUTPUT_DATA_DIR": str(dirs["output"]), "SM_CHECKPOINT_DIR": str(dirs["checkpoints"]),
        "SM_NUM_GPUS": "0", "SM_HPS": json.dumps(HPS), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
        "BINCOUNTER_REGISTER_MODEL": "false",
    })
    return {"code": code, "env": env, **dirs}


def run(cmd: list[str], job: dict, hps: dict | None = None, timeout: int = 240) -> str:
    env = dict(job["env"])
    if hps is not None:
        env["SM_HPS"] = json.dumps(hps)
    proc = subprocess.run(cmd, cwd=job["code"], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def epoch_metrics(output: str, prefix: str = "") -> list[dict[str, float]]:
    lines = [line for line in output.splitlines() if re.match(rf"epoch=\d+ {prefix}train_loss=|epoch=\d+ {prefix}accuracy=", line)]
    return [{k: float(v) for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", line)} for line in lines]


def test_package_layout(job):
    code = job["code"]
    assert (code / "bincounter" / "training" / "run.py").exists() and (code / "sm_entry.py").exists()
    assert not list(code.rglob("__pycache__"))
    requirements = (code / "requirements.txt").read_text()
    import mlflow

    assert f"mlflow-skinny=={mlflow.__version__}" in requirements and "torch" not in requirements
    import yaml

    params = yaml.safe_load((code / "params.yaml").read_text())
    assert params["train"]["backend"] == "local" and params["train"]["arch"] == "resnet18"


def test_container_trains_then_resumes_from_checkpoint(job):
    cmd = [sys.executable, "-m", "bincounter", "train", *_args(HPS)]
    output = run(cmd, job)
    assert "resume: no checkpoint" in output
    epochs = epoch_metrics(output)
    assert len(epochs) == 1 and {"macro_accuracy", "rmse", "accuracy", "val_loss"} <= set(epochs[0])
    first_epoch = epochs[0]
    assert re.search(r"^epoch=1 test_accuracy=[0-9.]+ .*test_macro_accuracy=", output, re.MULTILINE)
    assert re.search(r"^epoch=1 best_val_accuracy=[0-9.]+ .*best_val_macro_accuracy=", output, re.MULTILINE)
    model = job["model"]
    for name in ("weights.pt", "model_config.json", "metrics.json"):
        assert (model / name).exists(), name
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and "macro_accuracy" in metrics["test"]
    assert json.loads((model / "model_config.json").read_text())["arch"] == "resnet18"
    profile = job["output"] / "profile"
    assert (profile / "report.md").exists() and (profile / "rules.csv").exists()
    assert (job["checkpoints"] / "last.pt").exists()
    assert not (job["code"] / "mlruns").exists() and not list(job["code"].glob("*.db"))

    # a spot interruption restarts the job with the checkpoint folder restored: it continues
    more = {**HPS, "epochs": "2"}
    output = run([sys.executable, "-m", "bincounter", "train", *_args(more)], job, more)
    assert "resume: continuing after epoch 1" in output
    [second_epoch] = epoch_metrics(output)
    assert second_epoch["epoch"] == 2.0
    # the model kept is the epoch with the best validation macro accuracy (the earlier one on a tie), as
    # the job's own log printed them, across the interruption
    best = 2 if second_epoch["macro_accuracy"] > first_epoch["macro_accuracy"] else 1
    kept = json.loads((job["model"] / "metrics.json").read_text())
    assert kept["best_epoch"] == best
    assert kept["val"]["macro_accuracy"] == pytest.approx((first_epoch, second_epoch)[best - 1]["macro_accuracy"], abs=1e-3)


def test_entry_script_under_torchrun_two_processes(job):
    """What the torchrun driver runs on a multi-instance job: torchrun <entry script> --name value ..."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "sm_entry.py", *_args(HPS)]
    output = run(cmd, job, timeout=300)
    assert output.count("resume: no checkpoint") == 2  # both ranks started
    epochs = epoch_metrics(output)
    assert len(epochs) == 1, output[-3000:]  # rank 0 prints, rank 1 does not
    assert {"train_loss", "val_loss", "accuracy", "rmse", "mae", "macro_accuracy", "off_by_one_accuracy"} <= set(epochs[0])
    assert len(re.findall(r"^epoch=1 test_macro_accuracy=|^epoch=1 test_accuracy=", output, re.MULTILINE)) == 1
    assert (job["model"] / "weights.pt").exists() and (job["model"] / "metrics.json").exists()
    assert (job["output"] / "profile" / "report.md").exists()
