"""Splits of a data set: uint8 images with labels, the seeded stratified hold-out, few-shot limits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwr_dist.errors import HwrError


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Bundle:
    classes: list[str]
    train: Split
    test: Split


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded, per-class hold-out: (kept, held_out). The same (seed, data) gives the same split."""
    if fraction == 0:
        return split, Split(split.images[:0], split.labels[:0])
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in split.labels.unique():
        idx = (split.labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[: round(len(idx) * fraction)])
    mask = torch.zeros(len(split), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return split.subset(~mask), split.subset(mask)


def limit_per_class(split: Split, k: int | None, seed: int, classes: list[str]) -> Split:
    """K images of every class, drawn seeded; None keeps all. For one seed, a smaller K takes the
    first images of a larger one's, so K = 5 is a subset of K = 10."""
    if k is None:
        return split
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(split.labels, minlength=len(classes))
    if counts.min() < k:
        c = int(counts.argmin())
        raise HwrError(f"data.limit_per_class={k} but class '{classes[c]}' has only {int(counts[c])} training "
                       f"images; use {int(counts[c])} or fewer, or null for all of them")
    keep = [(split.labels == c).nonzero().squeeze(1) for c in range(len(classes))]
    keep = [idx[torch.randperm(len(idx), generator=g)[:k]] for idx in keep]
    return split.subset(torch.cat(keep).sort().values)


def training_splits(bundle: Bundle, data_cfg, seed: int) -> tuple[Split, Split]:
    """(train, val) as a run uses them: data.limit_per_class images of each class (all if null), of
    which data.val_fraction are held out, per class, for validation."""
    train = limit_per_class(bundle.train, data_cfg.limit_per_class, seed, bundle.classes)
    return stratified_split(train, data_cfg.val_fraction, seed)
