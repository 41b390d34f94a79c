"""SageMaker sessions: region, bucket and role checks, and the SDK session, against AWS or an emulator.

boto3 (and so the SageMaker SDK) honours AWS_ENDPOINT_URL, so the same code runs against AWS and against
a local moto_server.
"""

from __future__ import annotations

import os

from bincounter.config import Config
from bincounter.errors import BincounterError

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


def make_session(region: str, bucket: str):
    """A SageMaker SDK session with an explicit bucket (no STS lookup) and telemetry off."""
    import boto3
    from sagemaker.core.helper.session_helper import Session

    if emulated():
        # SDK v3 validates the role with iam:SimulatePrincipalPolicy, which emulators do not implement;
        # against AWS the check stays on (it explains missing permissions, and only warns when it cannot tell)
        os.environ.setdefault("SAGEMAKER_VALIDATE_ROLE", "false")
    return Session(boto_session=boto3.Session(region_name=region), default_bucket=bucket,
                   sagemaker_config=SDK_DEFAULTS)


def service_client(session, service: str, retries: int = 3):
    from botocore.config import Config as BotoConfig

    return session.boto_session.client(service, region_name=session.boto_region_name,
                                       config=BotoConfig(retries={"max_attempts": retries, "mode": "standard"}))


