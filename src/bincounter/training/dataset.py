"""Datasets over the prepared uint8 arrays, and the transforms that turn them into model input.

Transforms work on uint8 CHW tensors; normalisation lives in the model (model.BinCounterNet).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from bincounter.data.prepare import load_prepared
from bincounter.model import eval_transform


MAX_ROTATION = 10.0  # degrees, at augment strength 1


def train_transform(image_size: int, strength: float):
    """Count-preserving augmentation: nothing may leave the frame, since a cropped-out item changes the
    label. So no random crop (nor mixup/cutmix): flips (a bin has no up or down for counting), a small
    rotation inside a zoom-out large enough that the rotated photo's corners stay in the frame, mild
    colour and lighting changes. strength 0 means the eval transform."""
    if strength <= 0:
        return eval_transform(image_size)
    degrees = MAX_ROTATION * strength
    theta = math.radians(degrees)
    # a square turned by theta fits its own frame once shrunk by 1 / (cos + sin)
    fits = 1.0 / (math.cos(theta) + math.sin(theta))
    return v2.Compose([
        v2.Resize((image_size, image_size), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomAffine(degrees=degrees, scale=(fits * (1 - 0.1 * strength), fits)),
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
