"""SageMaker sessions: region, bucket and role checks, and the SDK session, against AWS or an emulator.

boto3 (and so the SageMaker SDK) honours AWS_ENDPOINT_URL, so the same code runs against AWS and against
a local moto_server.
"""

from __future__ import annotations

import contextlib
import copy
import os

from bincounter.config import Config
from bincounter.errors import BincounterError, first_line

# The SDK's defaults config: no telemetry calls to an outside host (they also fail offline and on emulators).
SDK_DEFAULTS = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


def resolve_region(config: Config) -> str:
    if config.sagemaker.region:
        return config.sagemaker.region
    import boto3

    region = boto3.session.Session().region_name
    if not region:
        raise BincounterError("sagemaker.region is empty and no AWS region is configured "
                              "(set sagemaker.region in params.yaml or AWS_REGION)")
    return region


def check_config(config: Config) -> str:
    """Everything a job needs that the user must provide; raises before anything is created. -> region."""
    sm = config.sagemaker
    missing = [name for name, value in (("sagemaker.role_arn", sm.role_arn), ("sagemaker.bucket", sm.bucket))
               if not value]
    if missing:
        raise BincounterError(f"{' and '.join(missing)} must be set in params.yaml (or with --set) "
                              "for train.backend=sagemaker")
    if not sm.role_arn.startswith("arn:"):
        raise BincounterError(f"sagemaker.role_arn must be an IAM role ARN (arn:aws:iam::<account>:role/<name>), "
                              f"got {sm.role_arn!r}")
    if sm.bucket.startswith("s3://"):
        raise BincounterError(f"sagemaker.bucket is a bucket name, not a URI: {sm.bucket!r}")
    if sm.instance_count < 1:
        raise BincounterError("sagemaker.instance_count must be at least 1")
    if sm.use_spot and sm.max_wait < sm.max_run:
        raise BincounterError(f"sagemaker.max_wait ({sm.max_wait}) must be at least sagemaker.max_run "
                              f"({sm.max_run}) with use_spot")
    return resolve_region(config)


def emulated() -> bool:
    """AWS_ENDPOINT_URL (or a per-service override) points boto3 at an emulator such as moto_server."""
    return any(os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SAGEMAKER",
                                                 "AWS_ENDPOINT_URL_IAM"))


def sdk_config(s3_resource=None) -> dict:
    """The user's SageMaker SDK config (admin + user files: VPC, KMS keys, tags, environment...), as the SDK
    itself loads it, with bincounter's telemetry opt-out merged in rather than replacing it."""
    from sagemaker.core.config.config import load_sagemaker_config

    try:
        user = load_sagemaker_config(s3_resource=s3_resource) or {}
    except Exception as exc:  # noqa: BLE001 - a bad path in SAGEMAKER_USER_CONFIG_OVERRIDE, invalid schema...
        raise BincounterError(f"the SageMaker SDK config could not be read: {first_line(exc)}") from None
    return merge(user, SDK_DEFAULTS)


def merge(base: dict, extra: dict) -> dict:
    """A deep copy of base with extra's keys set (nested mappings merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def make_session(region: str, bucket: str):
    """A SageMaker SDK session with an explicit bucket (no STS lookup), the user's SDK config and telemetry off."""
    import boto3
    from sagemaker.core.helper.session_helper import Session

    boto_session = boto3.Session(region_name=region)
    config = sdk_config(boto_session.resource("s3"))
    return Session(boto_session=boto_session, default_bucket=bucket, sagemaker_config=config)


def validate_role(config: Config) -> bool:
    """sagemaker.validate_role: auto = on against AWS, off against an emulator (moto has no
    iam:SimulatePrincipalPolicy)."""
    setting = config.sagemaker.validate_role
    return not emulated() if setting == "auto" else setting == "true"


@contextlib.contextmanager
def role_validation(config: Config):
    """SDK v3 validates the role when a ModelTrainer is made (iam:SimulatePrincipalPolicy from the caller's
    credentials) and reads only $SAGEMAKER_VALIDATE_ROLE: set it from the knob around that, then restore it."""
    saved = os.environ.get("SAGEMAKER_VALIDATE_ROLE")
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "true" if validate_role(config) else "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SAGEMAKER_VALIDATE_ROLE", None)
        else:
            os.environ["SAGEMAKER_VALIDATE_ROLE"] = saved


def service_client(session, service: str, retries: int = 3):
    from botocore.config import Config as BotoConfig

    return session.boto_session.client(service, region_name=session.boto_region_name,
                                       config=BotoConfig(retries={"max_attempts": retries, "mode": "standard"}))


