"""The counting loss: cross-entropy, plus an ordinal term that charges more for being further off (emd), or
cross-entropy against soft ordinal labels (sord)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def class_weights(counts: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present; absent classes get 0."""
    freq = torch.bincount(counts, minlength=num_classes).float()
    weights = torch.where(freq > 0, 1.0 / freq.clamp(min=1), torch.zeros_like(freq))
    return weights * (freq > 0).sum() / weights.sum()


def soft_ordinal_labels(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """SORD (Diaz & Marathe, CVPR 2019): the target count as a distribution softmax(-(k - y)^2) over the
    counts k, so a neighbouring count is a lesser error than a distant one; y=2 puts 0.56 on 2, 0.21 on 1
    and 3, 0.01 on 0 and 4."""
    k = torch.arange(num_classes, device=targets.device, dtype=torch.float32)
    return F.softmax(-((k[None, :] - targets[:, None].float()) ** 2), dim=1)


class CountLoss(nn.Module):
    """Cross-entropy (optionally class-weighted) + emd_weight x the squared earth mover's distance between
    the predicted and the true count distributions. emd_weight=0 is plain cross-entropy; soft_ordinal takes
    the cross-entropy against soft ordinal labels instead of the one-hot count; label_smoothing mixes the
    one-hot count with the uniform distribution (torch's cross_entropy does it)."""

    def __init__(self, emd_weight: float = 0.0, weights: torch.Tensor | None = None, soft_ordinal: bool = False,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.emd_weight, self.soft_ordinal, self.label_smoothing = float(emd_weight), soft_ordinal, label_smoothing
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # under autocast the logits may be bf16; the loss is always fp32
        if self.soft_ordinal:
            per_sample = -(soft_ordinal_labels(targets, logits.shape[1]) * F.log_softmax(logits, dim=1)).sum(dim=1)
            loss = self._mean(per_sample, targets)
        else:
            loss = F.cross_entropy(logits, targets, weight=self.weights, label_smoothing=self.label_smoothing)
        if self.emd_weight:
            loss = loss + self.emd_weight * self._emd(logits, targets)
        return loss

    def _emd(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cdf_pred = torch.cumsum(F.softmax(logits, dim=1), dim=1)
        cdf_true = torch.cumsum(F.one_hot(targets, logits.shape[1]).float(), dim=1)
        return self._mean(((cdf_pred - cdf_true) ** 2).sum(dim=1), targets)

    def _mean(self, per_sample: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean over the batch, class-weighted as cross_entropy weighs it when there are weights."""
        if self.weights is None:
            return per_sample.mean()
        w = self.weights[targets]
        return (per_sample * w).sum() / w.sum().clamp(min=1e-12)


def make_loss(kind: str, emd_weight: float, weights: torch.Tensor | None = None,
              label_smoothing: float = 0.0) -> CountLoss:
    """train.loss / train.emd_weight / class weights / train.label_smoothing -> the loss module the loop is
    handed. Label smoothing softens the one-hot target of ce and emd's cross-entropy term; sord's target
    is soft already."""
    return CountLoss(emd_weight if kind == "emd" else 0.0, weights, soft_ordinal=kind == "sord",
                     label_smoothing=0.0 if kind == "sord" else label_smoothing)
