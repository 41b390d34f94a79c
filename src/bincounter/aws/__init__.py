"""The aws wing: SageMaker session and emulator handling, the container side (SM_*), packaging the source,
training jobs, following and mirroring them into MLflow, tuning. Imports training, serving and data;
nothing imports it but the CLI."""

from bincounter._lazy import lazy_names

_PUBLIC = {"launch_training": "jobs", "build_training_request": "jobs", "follow_training_job": "follow",
           "record_job": "follow", "launch_tuning": "tuning", "mirror_tuning_job": "tuning",
           "package_source": "package", "make_session": "session", "in_container": "container"}
__all__ = list(_PUBLIC)
__getattr__ = lazy_names(__name__, _PUBLIC)
