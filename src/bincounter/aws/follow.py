"""Following a SageMaker training job (status, CloudWatch log) and mirroring a finished one into MLflow:
its metrics, its model from model.tar.gz (the same pyfunc a local run logs, registered with the champion
rule) and its profile from output.tar.gz."""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import time
from pathlib import Path

from bincounter import tracking
from bincounter.aws.session import check_config, make_session, service_client
from bincounter.config import Config
from bincounter.errors import BincounterError
from bincounter.model import WEIGHTS_FILE
from bincounter.storage import parse_s3_uri, s3_client
from bincounter.training import records
from bincounter.training.metrics import EPOCH_METRICS
from bincounter.training.run import METRICS_FILE, TrainOutcome, split_location

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")
POLL_SECONDS = float(os.environ.get("BINCOUNTER_SM_POLL_SECONDS", "30"))


class LogTail:
    """Prints the job's CloudWatch log streams as they grow; quiet when there are none (yet, or an emulator)."""

    def __init__(self, logs_client, job_name: str):
        self.client, self.job_name = logs_client, job_name
        self.tokens: dict[str, str] = {}
        self.enabled = logs_client is not None

    def poll(self) -> int:
        if not self.enabled:
            return 0
        from botocore.exceptions import BotoCoreError, ClientError

        printed = 0
        try:
            streams = self.client.describe_log_streams(
                logGroupName=LOG_GROUP, logStreamNamePrefix=f"{self.job_name}/").get("logStreams", [])
            for stream in streams:
                name = stream["logStreamName"]
                while True:
                    kwargs = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
                    if name in self.tokens:
                        kwargs["nextToken"] = self.tokens[name]
                    page = self.client.get_log_events(**kwargs)
                    for event in page.get("events", []):
                        print(f"[{name.split('/', 1)[-1]}] {event['message'].rstrip()}", flush=True)
                        printed += 1
                    token = page.get("nextForwardToken")
                    if not page.get("events") or token == self.tokens.get(name):
                        self.tokens[name] = token or self.tokens.get(name, "")
                        break
                    self.tokens[name] = token
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                print(f"sagemaker: cannot read the job's CloudWatch logs ({exc.response['Error'].get('Code')}); "
                      "following its status only")
                self.enabled = False
        except (BotoCoreError, KeyError, TypeError):
            self.enabled = False
        return printed


def wait_for_job(client, job_name: str, *, logs_client=None, poll_seconds: float | None = None) -> dict:
    """Poll DescribeTrainingJob until the job ends, printing status changes and its log; -> the last answer."""
    poll = POLL_SECONDS if poll_seconds is None else poll_seconds
    from botocore.exceptions import BotoCoreError, ClientError

    tail = LogTail(logs_client, job_name)
    last, errors = None, 0
    while True:
        try:
            description = client.describe_training_job(TrainingJobName=job_name)
            errors = 0
        except (BotoCoreError, ClientError) as exc:  # throttling, a dropped connection: the job runs on
            errors += 1
            if errors >= 5:
                raise BincounterError(f"lost track of SageMaker job {job_name} ({exc}); it may still be running: "
                                      "see the console, or mirror it later with follow_training_job") from None
            print(f"sagemaker: describe {job_name} failed ({type(exc).__name__}); retrying")
            time.sleep(poll)
            continue
        status = (description["TrainingJobStatus"], description.get("SecondaryStatus", ""))
        if status != last:
            transitions = description.get("SecondaryStatusTransitions") or [{}]
            message = transitions[-1].get("StatusMessage", "")
            print(f"sagemaker: {job_name} {status[0]} / {status[1]}" + (f": {message}" if message else ""),
                  flush=True)
            last = status
        tail.poll()
        if status[0] in TERMINAL:
            return description
        time.sleep(poll)


def stop_job(client, job_name: str) -> None:
    """StopTrainingJob, tolerating services (or emulators) that refuse it."""
    try:
        client.stop_training_job(TrainingJobName=job_name)
        print(f"sagemaker: stop requested for {job_name}")
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        print(f"sagemaker: could not stop {job_name} ({type(exc).__name__}); stop it in the console")


def _metric_name(name: str) -> str:
    return re.sub(r"[^\w.\-/ ]", "_", name)


def _download(s3, uri: str, dest: Path) -> Path | None:
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        s3.download_file(bucket, key, str(dest))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "403"):
            return None
        raise
    return dest


def _extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.10.12: refuse members that escape dest
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not str(target).startswith(str(dest.resolve())) or member.issym() or member.islnk():
                    raise BincounterError(f"{archive.name}: unsafe member {member.name}")
            tar.extractall(dest)
    return dest


def _log_model(config: Config, model_dir: Path):
    """The same pyfunc a local run logs (its input example from the local val split when there is one)."""
    return records.log_model(model_dir, config, split_location(config.train.data_dir, "val"))


def record_job(config: Config, description: dict, *, s3=None, region: str | None = None, register: bool = True):
    """Into the active MLflow run: a finished job's metrics, model (registered, champion rule) and profile.

    A Failed or Stopped job sets its failure reason as a tag and raises BincounterError (maybe_run then
    marks the run FAILED). -> TrainOutcome.
    """
    import mlflow

    name = description["TrainingJobName"]
    status = description["TrainingJobStatus"]
    mlflow.set_tag("sagemaker.status", status)
    if description.get("BillableTimeInSeconds") is not None:
        mlflow.log_metric("sagemaker_billable_seconds", float(description["BillableTimeInSeconds"]))
    if status != "Completed":
        reason = description.get("FailureReason") or description.get("SecondaryStatus") or "no reason given"
        mlflow.set_tag("sagemaker.failure_reason", str(reason)[:5000])
        raise BincounterError(f"SageMaker job {name} {status.lower()}: {reason}")

    final = {f"sagemaker/{_metric_name(m['MetricName'])}": float(m["Value"])
             for m in description.get("FinalMetricDataList") or [] if "Value" in m}
    if final:
        mlflow.log_metrics(final)
    artifact = (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not artifact:
        raise BincounterError(f"SageMaker job {name} completed without a model artifact")
    s3 = s3 or s3_client(region=region)
    with tempfile.TemporaryDirectory(prefix="bincounter-sm-") as scratch:
        scratch = Path(scratch)
        archive = _download(s3, artifact, scratch / "model.tar.gz")
        if archive is None:
            raise BincounterError(f"SageMaker job {name} completed but {artifact} is not there")
        model_dir = _extract(archive, scratch / "model")
        if not (model_dir / WEIGHTS_FILE).exists():
            raise BincounterError(f"{artifact} holds no {WEIGHTS_FILE}: not a bincounter model")
        test, val, best_epoch = _read_metrics(model_dir, final)
        if val:
            mlflow.log_metrics({k: float(val[k]) for k in EPOCH_METRICS if k in val},
                               step=max(best_epoch, 1))
        if test:
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in test.items()})
        if (model_dir / METRICS_FILE).exists():
            mlflow.log_artifact(str(model_dir / METRICS_FILE))
        _record_profile(s3, artifact, scratch)
        model_info = _log_model(config, model_dir)
        outcome = TrainOutcome(run_id=mlflow.active_run().info.run_id, test_metrics=test, val_metrics=val,
                               model_uri=model_info.model_uri)
        if register and config.mlflow.champion_metric in test:
            outcome.registered_version, outcome.champion = tracking.promote(config, model_info, test)
        elif register:
            print(f"registry: no test {config.mlflow.champion_metric} came back from {name}; not registered")
    print(f"sagemaker: {name} mirrored into MLflow run {outcome.run_id}")
    return outcome


def _read_metrics(model_dir: Path, final: dict[str, float]) -> tuple[dict, dict, int]:
    """metrics.json (written by train.run_training into the model dir), else the job's final log metrics."""
    path = model_dir / METRICS_FILE
    if path.exists():
        data = json.loads(path.read_text())
        return data.get("test") or {}, data.get("val") or {}, int(data.get("best_epoch") or 0)
    test = {k.removeprefix("sagemaker/test_"): v for k, v in final.items() if k.startswith("sagemaker/test_")}
    val = {k.removeprefix("sagemaker/best_val_"): v for k, v in final.items() if k.startswith("sagemaker/best_val_")}
    return test, val, 0


def _record_profile(s3, model_artifact: str, scratch: Path) -> None:
    """output.tar.gz (SM_OUTPUT_DATA_DIR) holds profile/: the rules become tags, the files artifacts."""
    import mlflow

    output_uri = model_artifact.rsplit("/", 1)[0] + "/output.tar.gz"
    try:
        archive = _download(s3, output_uri, scratch / "output.tar.gz")
    except Exception as exc:  # noqa: BLE001 - the profile is a bonus
        print(f"sagemaker: could not fetch {output_uri} ({type(exc).__name__}); no profile attached")
        return
    if archive is None:
        return
    profile = _extract(archive, scratch / "output") / "profile"
    if (profile / "rules.csv").exists():
        records.log_profile(profile)
    elif profile.is_dir():
        mlflow.log_artifacts(str(profile), "profile")


def follow_training_job(config: Config, job_name: str):
    """Mirror an existing training job (e.g. started by an earlier, interrupted session) into a new run."""
    import mlflow

    region = check_config(config)
    session = make_session(region, config.sagemaker.bucket)
    client = service_client(session, "sagemaker")
    with tracking.maybe_run(config, run_name=job_name):
        description = wait_for_job(client, job_name, logs_client=service_client(session, "logs"))
        mlflow.set_tags({"backend": "sagemaker", "sagemaker.training_job_name": job_name,
                         "sagemaker.training_job_arn": description.get("TrainingJobArn", "")})
        return record_job(config, description, region=region)


