"""The dataset over prepared shards, the DDP sampler that deals whole shards to ranks, and the transforms
that turn photos into model input.

Transforms work on uint8 CHW tensors; normalisation lives in the model (model.BinCounterNet).
"""

from __future__ import annotations

import math
import random
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from bincounter.data.prepare import PREPARED_FILE, read_labels, read_prepared_record
from bincounter.errors import BincounterError
from bincounter.model import eval_transform
from bincounter.storage import open_folder

# torchvision 0.29 marks its JPEG decoder deprecated in favour of TorchCodec, which has no batched nvJPEG
# decode of in-memory bytes yet; torchvision's stays the one that decodes on the GPU, so its notice is muted.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


MAX_ROTATION = 10.0  # degrees, at augment strength 1


def train_transform(image_size: int, strength: float):
    """Count-preserving augmentation: nothing may leave the frame, since a cropped-out item changes the
    label. So no random crop (nor mixup/cutmix): flips (a bin has no up or down for counting), a small
    rotation inside a zoom-out large enough that the rotated photo's corners stay in the frame, mild
    colour and lighting changes. strength 0 means the eval transform."""
    if strength <= 0:
        return eval_transform(image_size)
    return CountPreservingAugment(image_size, strength)


class CountPreservingAugment:
    """train_transform's augmentation, for one photo (`__call__`, in a loader worker) or for a whole batch
    on the GPU (`batch`: every photo its own flips, rotation, zoom and colour, in a few batched kernels;
    transforms v2 would draw one set of parameters for the whole batch)."""

    def __init__(self, image_size: int, strength: float):
        self.image_size = image_size
        self.degrees = MAX_ROTATION * strength
        theta = math.radians(self.degrees)
        # a square turned by theta fits its own frame once shrunk by 1 / (cos + sin)
        fits = 1.0 / (math.cos(theta) + math.sin(theta))
        self.scale = (fits * (1 - 0.1 * strength), fits)
        self.jitter = (0.4 * strength, 0.4 * strength, 0.3 * strength)  # brightness, contrast, saturation
        self.one_photo = v2.Compose([
            v2.Resize((image_size, image_size), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(degrees=self.degrees, scale=self.scale),
            v2.ColorJitter(*self.jitter),
        ])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.one_photo(image)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) on any device -> uint8 (N, 3, size, size), augmented photo by photo."""
        n, device = images.shape[0], images.device
        size = (self.image_size, self.image_size)
        x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        x = F.grid_sample(x, self._sampling_grid(n, device), mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        brightness, contrast, saturation = (self._uniform(n, device, 1 - j, 1 + j) for j in self.jitter)
        x = (x * brightness[:, None, None, None]).clamp(0, 255)
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean, contrast[:, None, None, None])
        x = _blend(x, _grey(x), saturation[:, None, None, None])
        return x.round().to(torch.uint8)

    def _sampling_grid(self, n: int, device: torch.device) -> torch.Tensor:
        """Where each output pixel samples its photo: flips, a rotation and a zoom-out of 1/scale (>= cos +
        sin, so the turned photo's corners stay inside the frame), one matrix a photo."""
        angle = torch.deg2rad(self._uniform(n, device, -self.degrees, self.degrees))
        zoom = 1.0 / self._uniform(n, device, *self.scale)
        flip_x, flip_y = (torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) for _ in range(2))
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        zero = torch.zeros_like(cos)
        matrix = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, zero], 1),
                              torch.stack([sin * flip_x, cos * flip_y, zero], 1)], 1)
        return F.affine_grid(matrix, [n, 3, self.image_size, self.image_size], align_corners=False)

    @staticmethod
    def _uniform(n: int, device: torch.device, low: float, high: float) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float RGB (N, 3, H, W), as (N, 1, H, W): what ColorJitter blends towards."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, towards: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * towards).clamp(0, 255)


class ShardDataset(Dataset):
    """One prepared split, in a local folder or under an s3:// prefix. labels.csv says where each photo's
    JPEG lies in its shard; an item is one pread (local) or one ranged GET (S3; a batch's GETs run
    concurrently, see __getitems__). The JPEG is decoded here, in the loader worker (CPU), or, with
    on_device, handed over as bytes for `batch_to` to decode the whole batch on the GPU (nvJPEG) and
    augment it there, when the CPU would otherwise starve the GPU."""

    def __init__(self, split_dir, transform, on_device: bool = False):
        self.folder = open_folder(split_dir)
        rows = read_labels(self.folder)
        self.ids = [r[0] for r in rows]
        self.counts = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        self.shards = [r[2] for r in rows]
        self.where = [(r[3], r[4]) for r in rows]
        self.transform, self.on_device = transform, on_device
        try:
            self.stored_size = int(read_prepared_record(self.folder)["image_size"])
        except (KeyError, TypeError, ValueError):
            raise BincounterError(f"{self.folder.uri}/{PREPARED_FILE} names no image size: "
                                  "rerun `dvc repro prepare`") from None

    def __len__(self) -> int:
        return len(self.counts)

    def jpeg(self, index: int) -> torch.Tensor:
        return self.jpegs([index])[0]

    def jpegs(self, indices: list[int]) -> list[torch.Tensor]:
        """The JPEG bytes of these photos, read together (concurrent GETs from S3, preads locally)."""
        reads = [(self.shards[i], *self.where[i]) for i in indices]
        return [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in self.folder.read_ranges(reads)]

    def __getitem__(self, index: int):
        return self._item(index, self.jpeg(index))

    def __getitems__(self, indices: list[int]) -> list:
        """A batch at once (the DataLoader asks so), so that from S3 its ranged GETs overlap."""
        return [self._item(i, data) for i, data in zip(indices, self.jpegs(indices))]

    def _item(self, index: int, data: torch.Tensor):
        if self.on_device:
            return data, self.counts[index]
        try:
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:  # the shard's length was checked up front; its bytes can still be damaged
            raise BincounterError(f"{self.folder.uri}/{self.shards[index]}: photo {self.ids[index]} is not a "
                                  "readable JPEG (a damaged shard?); rerun `dvc repro prepare`") from None
        return self.transform(image), self.counts[index]

    def batch_to(self, images, device: torch.device) -> torch.Tensor:
        """The loader's batch as model input on device: moved as it is, or decoded and augmented there."""
        if not self.on_device:
            return images.to(device, non_blocking=True)
        decoded = decode_jpeg(list(images), mode=ImageReadMode.RGB, device=device)
        if len({image.shape for image in decoded}) > 1:  # prepare stores one square size; anything else
            return torch.stack([self.transform(image) for image in decoded])  # goes photo by photo
        batch = getattr(self.transform, "batch", self.transform)  # v2.Resize takes a batch as it is
        return batch(torch.stack(decoded))

    def collate(self, batch):
        """Stacks decoded photos; keeps JPEG bytes (of different lengths) as a list for batch_to."""
        if not self.on_device:
            return torch.utils.data.default_collate(batch)
        return [b[0] for b in batch], torch.stack([b[1] for b in batch])


class ShardSampler(Sampler):
    """DDP: every rank reads whole shards no other rank reads (dealt round-robin in a seeded order that
    changes each epoch) and walks their bins shuffled. An epoch covers every training bin once; a rank
    dealt fewer bins repeats a few of its own, since DDP needs every rank to take the same number of steps."""

    def __init__(self, shard_of_item: list[str], world: int, rank: int, seed: int):
        self.world, self.rank, self.seed, self.epoch = world, rank, seed, 0
        self.groups: dict[str, list[int]] = {}
        for index, name in enumerate(shard_of_item):
            self.groups.setdefault(name, []).append(index)
        if len(self.groups) < world:
            raise BincounterError(f"{len(self.groups)} training shards cannot feed {world} ranks: lower "
                                  "data.shard_size and rerun `dvc repro prepare`")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _dealt(self) -> tuple[list[list[int]], random.Random]:
        rng = random.Random(self.seed + self.epoch)
        names = sorted(self.groups)
        rng.shuffle(names)
        return [[i for n in names[r :: self.world] for i in self.groups[n]] for r in range(self.world)], rng

    def __iter__(self):
        dealt, rng = self._dealt()
        mine = dealt[self.rank]
        rng.shuffle(mine)
        longest = max(map(len, dealt))
        return iter(mine + [mine[k % len(mine)] for k in range(longest - len(mine))] if mine else [])

    def __len__(self) -> int:
        return max(map(len, self._dealt()[0]))
