"""The training wing: dataset and transforms, loss, the loop, checkpoints, metrics, profiling and rules,
the MLflow run around it, evaluate and HPO. Imports the data and serving wings, never aws."""

from bincounter._lazy import lazy_names

_PUBLIC = {"run_training": "run", "data_dirs_for": "run", "evaluate_split": "run", "TrainOutcome": "run",
           "fit": "loop", "train_one_epoch": "loop", "predict_loader": "loop", "CountLoss": "loss",
           "counting_metrics": "metrics", "evaluate_model": "evaluate", "run_hpo": "hpo"}
__all__ = list(_PUBLIC)
__getattr__ = lazy_names(__name__, _PUBLIC)
