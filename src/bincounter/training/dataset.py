"""Datasets over the prepared uint8 arrays, and the transforms that turn them into model input.

Transforms work on uint8 CHW tensors; normalisation lives in the model (model.BinCounterNet).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from bincounter.data.prepare import load_prepared
from bincounter.model import eval_transform


def train_transform(image_size: int, strength: float):
    """Augmentation suited to bin photos: crops that keep most of the bin, flips (bins have no up/down
    for counting), mild colour and lighting changes. strength 0 means the eval transform."""
    if strength <= 0:
        return eval_transform(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(1 - 0.5 * strength, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(brightness=0.4 * strength, contrast=0.4 * strength, saturation=0.3 * strength),
    ])


class PreparedDataset(Dataset):
    """One prepared split. The array is memory-mapped, and re-opened in each loader worker rather than
    pickled to it (pickling a memmap copies the whole array)."""

    def __init__(self, split_dir, transform):
        self.split_dir = split_dir
        self._images, self.ids, counts = load_prepared(split_dir)
        self.counts = torch.from_numpy(counts)
        self.transform = transform

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = load_prepared(self.split_dir)[0]
        return self._images

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)  # copy out of the read-only mmap
        return self.transform(image), self.counts[index]
