"""How far a decode alone can move a trained model: macro accuracy against RMSE for a family of
cost-sensitive decodes, on the test split, for saved models and their average.

    python benchmarks/bench_decodes.py --prepared WORK/prepared --models MODEL_DIR [MODEL_DIR ...] \
        [--baseline 0.420 1.256]

WORK is a bench_quality.py work folder (its prepared val/ and test/ splits); each MODEL_DIR a model folder
it saved (WORK/model, copied aside between runs).

The decode answers the count j that minimises lam * E[(j - k)^2] + E[w_k * (k != j)] under the model's
calibrated probabilities, with w_k = prior_k ** -tau (the validation split's count shares). tau = lam = 0 is
argmax; tau = 1, lam = 0 is the logit-adjusted (balanced) argmax that macro accuracy rewards; a larger lam
moves toward the mean, which RMSE rewards. Every grid point is scored on the test split: the best point is
chosen there, so it is an upper bound on what any of these decodes could do for that model.
--baseline MACRO RMSE (the seed-style loop's test figures) marks the issue's target region.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bincounter.model import load_model_dir, probabilities
from bincounter.training.metrics import counting_metrics
from bincounter.training.run import split_logits

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
LAMS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)


def cost_decode(probs: np.ndarray, lam: float, weights: np.ndarray) -> np.ndarray:
    """argmin over j of lam * E[(j - k)^2] + E[w_k * 1(k != j)]."""
    counts = np.arange(probs.shape[1])
    squared = probs @ ((counts[None, :] - counts[:, None]) ** 2)  # (N, j): sum_k p_k (j - k)^2
    zero_one = (probs * weights).sum(1, keepdims=True) - probs * weights
    return (lam * squared + zero_one).argmin(1)


def split_probs(model_dir: Path, split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    model, model_config = load_model_dir(model_dir)
    logits, targets, _ = split_logits(model, split_dir, dict(model_config, tta=False), torch.device("cpu"))
    return probabilities(torch.from_numpy(logits), model_config.get("temperature", 1.0)).numpy(), targets


def front(val: tuple, test: tuple) -> list[tuple[float, float, float, float]]:
    """[(tau, lam, test macro accuracy, test RMSE)] over the grid."""
    (_, val_targets), (probs, targets) = val, test
    prior = np.bincount(val_targets, minlength=probs.shape[1]) / len(val_targets)
    points = []
    for tau in TAUS:
        weights = np.maximum(prior, 1e-6) ** -tau
        for lam in LAMS:
            scored = counting_metrics(targets, cost_decode(probs, lam, weights / weights.mean()), probs.shape[1])
            points.append((tau, lam, scored["macro_accuracy"], scored["rmse"]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="prepared folder with val/ and test/")
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="saved model folders")
    parser.add_argument("--baseline", type=float, nargs=2, metavar=("MACRO", "RMSE"),
                        help="the seed-style loop's test macro accuracy and RMSE")
    args = parser.parse_args()
    probs = {m.name: {s: split_probs(m, args.prepared / s) for s in ("val", "test")} for m in args.models}
    if len(args.models) > 1:
        models = list(probs.values())
        probs["average of all"] = {s: (np.mean([p[s][0] for p in models], axis=0), models[0][s][1])
                                   for s in ("val", "test")}
    print("| model | tau | lam | macro | RMSE |\n|---|---|---|---|---|")
    for name, splits in probs.items():
        points = front(splits["val"], splits["test"])
        for tau, lam, macro, rmse in points:
            print(f"| {name} | {tau} | {lam} | {macro:.3f} | {rmse:.3f} |")
        if args.baseline:
            macro_goal, rmse_goal = args.baseline[0] + 0.10, 0.85 * args.baseline[1]
            best = max((macro for *_, macro, rmse in points if rmse <= rmse_goal), default=float("nan"))
            print(f"| {name}: best macro at RMSE <= {rmse_goal:.3f} | | | {best:.3f} (target {macro_goal:.3f}) | |")


if __name__ == "__main__":
    main()
