"""Batches drawn by index from one uint8 tensor per split, already on the training device.

The epoch's order is a permutation seeded by (seed, epoch), identical on every rank;
rank r takes every world-th element of it, so shards are disjoint, equal in length, and
the same order is rebuilt exactly on resume from (epoch, batch index) alone.

The permutation is drawn on the CPU (the same order on every device type) and copied to the
training device once per epoch: batches are then slices of a device tensor, and a step makes
no host-to-device copy for its indices (on CUDA a per-step copy from pageable memory would
block the host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwr_dist.data.splits import Split
from hwr_dist.data.augment import augment


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class ShardedBatches:
    n: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    device: str | torch.device = "cpu"
    """Where the index tensors live: the training device."""

    @property
    def shard_len(self) -> int:
        return self.n // self.world  # the last n % world items of an epoch are left out

    def __len__(self) -> int:
        return -(-self.shard_len // self.batch_size)

    def shard(self, epoch: int) -> torch.Tensor:
        perm = epoch_permutation(self.n, self.seed, epoch)
        return perm[self.rank : self.shard_len * self.world : self.world]

    def batches(self, epoch: int, start: int = 0):
        """Index tensors of this rank's batches in `epoch`, from batch number `start` on."""
        shard = self.shard(epoch).to(self.device)  # one copy per epoch, not one per step
        for i in range(start, len(self)):
            yield shard[i * self.batch_size : (i + 1) * self.batch_size]


@dataclass
class DeviceData:
    """One split on the device, with the normalisation the model was trained with."""

    images: torch.Tensor  # uint8 [N, H, W] on the device
    labels: torch.Tensor  # int64 [N] on the device
    mean: float
    std: float

    @classmethod
    def from_split(cls, split: Split, device, mean: float, std: float) -> "DeviceData":
        return cls(split.images.to(device), split.labels.to(device), mean, std)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Stored images are the same every epoch (composed data sets draw afresh here)."""

    def batch(self, idx: torch.Tensor, g: torch.Generator | None = None, aug=None):
        """(normalised float images [B, 1, H, W], labels) for the given indices."""
        idx = idx.to(self.images.device, non_blocking=True)
        x = to_unit(self.images[idx])
        if aug is not None and aug.enabled:
            x = augment(x, g, aug)
        return x.sub_(self.mean).div_(self.std), self.labels[idx]


@dataclass
class Data:
    """A run's three splits on its device. `classes`: the class names, or a sequence task's alphabet;
    the splits are DeviceData, or for sequences LineData / DigitStrings (the same `batch` face)."""

    classes: list[str]
    train: DeviceData
    val: DeviceData
    test: DeviceData


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, 1, H, W] in [0, 1]."""
    return images.unsqueeze(1).float().div_(255)


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The preprocessing contract's last step, the same in training, evaluation, export and serving:
    uint8 [N, H, W] -> float32 (p / 255 - mean) / std, [N, 1, H, W]."""
    return to_unit(images).sub_(mean).div_(std)


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of a uint8 image tensor in [0, 1] units (MNIST: 0.1307, 0.3081)."""
    x = images.float().div_(255)
    return x.mean().item(), max(x.std().item(), 1e-3)
