"""Which region an endpoint lives in, and whether the training bucket may hold its model.

SageMaker reads a model's ModelDataUrl only from a bucket in the endpoint's own region. The endpoint
defaults to the region training used (deploy.region, else sagemaker.region, else the AWS configuration's
region), and sagemaker.bucket is handed to MLflow only when it is in that region; otherwise MLflow uses its
own per-region bucket (mlflow-sagemaker-<region>-<account>).
"""

from __future__ import annotations

from bincounter.config import Config
from bincounter.errors import BincounterError, first_line


def deploy_region(config: Config, explicit: str | None = None) -> str:
    """--region, deploy.region, sagemaker.region, then boto3's configured region."""
    region = explicit or config.deploy.region or config.sagemaker.region
    if region:
        return region
    import boto3

    region = boto3.session.Session().region_name
    if not region:
        raise BincounterError("no region for the endpoint: set deploy.region (or sagemaker.region) in params.yaml, "
                              "or AWS_REGION")
    return region


def bucket_region(bucket: str, region: str) -> str | None:
    """The bucket's region (GetBucketLocation), or None when it cannot be read."""
    import boto3

    try:
        location = boto3.client("s3", region_name=region).get_bucket_location(Bucket=bucket).get("LocationConstraint")
    except Exception as exc:  # noqa: BLE001 - NoSuchBucket, AccessDenied, no credentials...
        print(f"deploy: cannot read the region of bucket {bucket} ({first_line(exc)})")
        return None
    # None/"" is us-east-1, "EU" the old name of eu-west-1
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location, location)


def model_bucket(config: Config, region: str) -> str | None:
    """sagemaker.bucket when it is in the endpoint's region; else None (MLflow's default bucket there)."""
    bucket = config.sagemaker.bucket
    if not bucket:
        return None
    where = bucket_region(bucket, region)
    if where == region:
        return bucket
    print(f"deploy: sagemaker.bucket {bucket} is {'in ' + where if where else 'of unknown region'}, not in "
          f"{region} where the endpoint runs; the model goes to MLflow's bucket mlflow-sagemaker-{region}-<account>")
    return None
