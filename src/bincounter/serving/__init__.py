"""The serving wing: the MLflow pyfunc (the served contract), predict, reconcile and SageMaker deployment.
Imports only the kernel."""

from bincounter._lazy import lazy_names

_PUBLIC = {"BinCounterPyfunc": "pyfunc", "log_pyfunc": "pyfunc", "predict_paths": "predict",
           "predict_command": "predict", "reconcile_command": "reconcile", "deploy_command": "deploy"}
__all__ = list(_PUBLIC)
__getattr__ = lazy_names(__name__, _PUBLIC)
