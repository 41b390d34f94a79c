"""Calibration: a temperature fitted on the validation split after training, so that `confidence` means
what it says (of the bins served with confidence 0.8, about 80 % are counted right), its expected
calibration error before and after, a reliability diagram, and reconcile's default threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bincounter.training.metrics import counting_metrics

ECE_BINS = 15
MIN_CALIBRATION_BINS = 50  # fewer validation bins cannot pin a temperature down (it would chase the few)
RECONCILE_PRECISION = 0.9  # reconcile flags a record when the model is at least this sure of another count


def fit_temperature(logits: np.ndarray, targets: np.ndarray, steps: int = 200) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (logits, targets); 1.0 (no change) when there
    are fewer than MIN_CALIBRATION_BINS bins to fit it on."""
    if len(targets) < MIN_CALIBRATION_BINS:
        print(f"calibration: {len(targets)} validation bins are too few to fit a temperature "
              f"(at least {MIN_CALIBRATION_BINS}); confidence stays uncalibrated (temperature 1.0)")
        return 1.0
    x, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(targets, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if np.isfinite(temperature) and 0.05 <= temperature <= 20 else 1.0


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0))))


def reliability(probs: np.ndarray, targets: np.ndarray, counts: np.ndarray | None = None):
    """(share of bins, mean confidence, accuracy) of each non-empty one of ECE_BINS confidence bins."""
    counts = probs.argmax(1) if counts is None else counts
    confidence = probs[np.arange(len(counts)), counts]
    correct = counts == targets
    edges = np.linspace(0, 1, ECE_BINS + 1)
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            rows.append((inside.mean(), confidence[inside].mean(), correct[inside].mean()))
    return rows


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, counts: np.ndarray | None = None) -> float:
    """Mean |accuracy - confidence| over ECE_BINS confidence bins, weighted by the bins' sizes."""
    if len(targets) == 0:
        return float("nan")
    return float(sum(share * abs(accuracy - confidence)
                     for share, confidence, accuracy in reliability(probs, targets, counts)))


def fit_decode_cuts(probs: np.ndarray, targets: np.ndarray, passes: int = 3, candidates: int = 64) -> list[float]:
    """The K-1 increasing cuts on the expected count that maximise macro accuracy on (probs, targets), for
    `train.decode: thresholds`. A model trained without class weights pulls its expected count toward the
    common middle counts, so rounding rarely reaches the extremes; moving the cuts (coordinate ascent from
    the rounding cuts k + 0.5, each cut tried at quantiles of the expected counts between its neighbours)
    gives each count its share without retraining. Rounding's cuts when there are too few bins to fit on."""
    num_classes = probs.shape[1]
    cuts = np.arange(num_classes - 1) + 0.5
    if len(targets) < MIN_CALIBRATION_BINS:
        return cuts.tolist()
    expected = probs @ np.arange(num_classes)

    def macro(trial: np.ndarray) -> float:
        return counting_metrics(targets, np.searchsorted(trial, expected), num_classes)["macro_accuracy"]

    best = macro(cuts)
    for _ in range(passes):
        for i in range(num_classes - 1):
            low = cuts[i - 1] if i > 0 else expected.min() - 1e-6
            high = cuts[i + 1] if i < num_classes - 2 else expected.max() + 1e-6
            inside = expected[(expected > low) & (expected < high)]
            for value in np.unique(np.quantile(inside, np.linspace(0, 1, candidates))) if len(inside) else []:
                trial = cuts.copy()
                trial[i] = value
                score = macro(trial)
                if score > best + 1e-12:
                    best, cuts = score, trial
    return cuts.tolist()


def reconcile_threshold(probs: np.ndarray, targets: np.ndarray, counts: np.ndarray,
                        precision: float = RECONCILE_PRECISION) -> float:
    """The lowest confidence above which the model's counts are right at least `precision` of the time on
    validation: a record the model contradicts that confidently is probably wrong. 1.0 when none reaches it."""
    confidence = probs[np.arange(len(counts)), counts]
    correct = counts == targets
    for threshold in np.unique(confidence):
        chosen = confidence >= threshold
        if chosen.sum() >= 5 and correct[chosen].mean() >= precision:
            return float(threshold)
    return 1.0


def plot_reliability(probs_before: np.ndarray, probs_after: np.ndarray, targets: np.ndarray, path: Path,
                     title: str = "Reliability (validation)") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for probs, label in ((probs_before, "before"), (probs_after, "after temperature")):
        rows = reliability(probs, targets)
        xs, ys = [confidence for _, confidence, _ in rows], [accuracy for _, _, accuracy in rows]
        ece = expected_calibration_error(probs, targets)
        ax.plot(xs, ys, marker="o", label=f"{label} (ECE {ece:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
