"""Batches for sequence recognition (CTC): variable-width line images and their label strings.

A line is uint8 [H, W_i], ink white on black like the digit splits, and its text is a string over
an alphabet. CTC reserves id 0 for the blank, so character `alphabet[k]` has id k + 1. A batch is
padded on the right to its widest line with background (0) and normalised exactly as
`loader.normalise` does; `Targets` carries what the CTC loss and the metrics need besides the
images: the concatenated label ids, each string's length and each image's real width.

`LineData` is the sequence counterpart of `loader.DeviceData`: every line of a split lives on the
training device as one [total width, H] tensor of columns, so a batch is one gather, with no
per-line Python loop and no host-to-device copy of pixels. A batch's shapes depend on its lines,
so it reads two numbers back from the device (its widest width and its number of labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from hwr_dist.data.augment import elastic_offsets
from hwr_dist.errors import HwrError


@dataclass
class Targets:
    """The labels of a batch of lines, on the data's device."""

    labels: torch.Tensor  # int64 [sum(lengths)]: every string's ids (1..len(alphabet)), concatenated
    lengths: torch.Tensor  # int64 [B]: characters per string
    widths: torch.Tensor  # int64 [B]: each image's real width in pixels, before padding
    touching: torch.Tensor  # bool [B]: whether any two neighbouring characters touch or overlap

    def texts(self, alphabet: Sequence[str]) -> list[str]:
        """The strings back from their ids."""
        ids = self.labels.tolist()
        out, start = [], 0
        for n in self.lengths.tolist():
            out.append("".join(alphabet[i - 1] for i in ids[start:start + n]))
            start += n
        return out

    def __len__(self) -> int:
        return len(self.lengths)


def encode(text: str, alphabet: Sequence[str], where: str) -> list[int]:
    """CTC ids of `text` (alphabet[k] -> k + 1); `where` names the text in the error, e.g. "labels.tsv line 7"."""
    ids = {c: k + 1 for k, c in enumerate(alphabet)}
    for c in text:
        if c not in ids:
            raise HwrError(f"{where}: {c!r} is not in the alphabet ({''.join(alphabet)!r}); "
                           "remove the character or the line, or train with it")
    return [ids[c] for c in text]


def pad_columns(columns: torch.Tensor, starts: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Images [B, H, max width] gathered from a column store [total, H]: image b is `widths[b]`
    columns from `starts[b]`, padded on the right with 0."""
    width = int(widths.max()) if len(widths) else 0  # a host sync: the padding's size
    offsets = torch.arange(width, device=columns.device)
    inside = offsets < widths.unsqueeze(1)  # [B, W]
    cols = columns[torch.where(inside, starts.unsqueeze(1) + offsets, 0)]  # [B, W, H]
    return cols.masked_fill_(~inside.unsqueeze(2), 0).transpose(1, 2)


def unit_lines(images: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 [B, H, W] (uint8, or whole-number floats in any layout) -> a new contiguous
    float [B, 1, H, W] in [0, 1]: `loader.normalise`'s first steps, with the same result."""
    return images.unsqueeze(1).to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255)


def _uniform(n: int, limit: float, g: torch.Generator | None, device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device=device) * 2 - 1) * limit


def augment_lines(x: torch.Tensor, widths: torch.Tensor, g: torch.Generator, cfg) -> torch.Tensor:
    """An AugmentConfig's random affine (and elastic distortion) for a padded batch of lines.

    `augment.augment` works in grid units, which on a wide image turns a rotation into a strong
    shear and a translation into a jump of a tenth of the line. Here the geometry is in pixels,
    about each image's own centre (not the padded canvas's), and translation is a fraction of the
    height on both axes. A line is long, so keep rotation and scale small (a degree or two, a few
    per cent): the ends of a long line move by half its width times the angle. Random erasing is
    not applied: a blot that hides a character leaves its label wrong.
    """
    b, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    angle = _uniform(b, math.radians(cfg.rotation), g, dev)
    sh = _uniform(b, math.radians(cfg.shear), g, dev)
    zoom = 1 + _uniform(b, cfg.scale, g, dev)
    shift = _uniform(2 * b, cfg.translate * h, g, dev).view(b, 2)
    cos, sin, tan = angle.cos() / zoom, angle.sin() / zoom, sh.tan()
    cx = (widths.to(dt) / 2).view(b, 1, 1)
    xs = (torch.arange(w, device=dev, dtype=dt) + 0.5).view(1, 1, w) - cx  # pixels from each image's centre
    ys = (torch.arange(h, device=dev, dtype=dt) + 0.5 - h / 2).view(1, h, 1)

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.to(dt).view(b, 1, 1)

    # The inverse map of augment.affine_grid, in pixels, then to grid units of the padded canvas.
    sx = torch.addcmul(col(-sin + cos * tan) * ys + col(shift[:, 0]), col(cos), xs)
    sy = torch.addcmul(col(cos + sin * tan) * ys + col(shift[:, 1]), col(sin), xs)
    grid = torch.stack([(sx + cx) * (2 / w) - 1, sy * (2 / h)], 3)
    if cfg.elastic_alpha > 0:
        grid = grid + elastic_offsets(x, g, cfg.elastic_alpha, cfg.elastic_sigma)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# Background columns after the widest line of every batch: the conv stack sees 10 columns past a
# line's last frame, and without them the widest line would meet the convolutions' zero padding
# (the mean after normalisation, not background) where narrower ones meet background, so a line's
# reading would depend on its batch. `hwr predict` and `hwr serve` pad a single line the same way.
RIGHT_PAD = 12


def padded_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] lines -> float [B, 1, H, W + RIGHT_PAD] in [0, 1] (0 is background, as the padding is)."""
    return F.pad(unit_lines(images), (0, RIGHT_PAD))


def normalised_batch(images: torch.Tensor, targets: Targets, mean: float, std: float,
                     g: torch.Generator | None, aug) -> tuple[torch.Tensor, Targets]:
    """(normalised float [B, 1, H, W + RIGHT_PAD], targets) from padded pixels [B, H, W], augmented when
    `aug` is on."""
    x = padded_unit(images)
    if aug is not None and aug.enabled:
        x = augment_lines(x, targets.widths, g, aug)
    return x.sub_(mean).div_(std), targets


class LineData:
    """A fixed list of line images with their texts, on the device: the sequence DeviceData."""

    def __init__(self, images: list[torch.Tensor], texts: list[str], alphabet: Sequence[str], mean: float,
                 std: float, device: str | torch.device = "cpu", where: list[str] | None = None):
        """`images`: uint8 [H, W_i] each, one height; `where[i]` names line i in errors (default "line i")."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if len({im.shape[0] for im in images}) > 1:
            raise ValueError("line images differ in height; resize them to one height first")
        where = where or [f"line {i + 1}" for i in range(len(texts))]
        ids = [encode(t, alphabet, w) for t, w in zip(texts, where)]
        self.alphabet, self.mean, self.std = list(alphabet), mean, std
        empty = [torch.zeros(0, 1, dtype=torch.uint8)]
        self.columns = torch.cat([im.t() for im in images] or empty).to(device)  # [total width, H]
        self.widths = torch.tensor([im.shape[1] for im in images], dtype=torch.long)
        self.starts = (self.widths.cumsum(0) - self.widths).to(device)
        self.widths = self.widths.to(device)
        self.lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        self.label_starts = (self.lengths.cumsum(0) - self.lengths).to(device)
        self.lengths = self.lengths.to(device)
        self.labels = torch.tensor([i for line in ids for i in line], dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        """The lines are the same every epoch."""

    def batch(self, idx: torch.Tensor, g: torch.Generator | None = None, aug=None) -> tuple[torch.Tensor, Targets]:
        """(normalised float images [B, 1, H, max width], Targets) for the given indices."""
        idx = idx.to(self.labels.device, non_blocking=True)
        widths, lengths = self.widths[idx], self.lengths[idx]
        total = int(lengths.sum())
        # Position k of the batch's labels: its string's start in self.labels, plus k minus the
        # number of labels of the strings before it in the batch.
        before = lengths.cumsum(0) - lengths
        pos = torch.repeat_interleave(self.label_starts[idx] - before, lengths, output_size=total)
        pos += torch.arange(total, device=pos.device)
        targets = Targets(self.labels[pos], lengths, widths, torch.zeros_like(widths, dtype=torch.bool))
        return normalised_batch(pad_columns(self.columns, self.starts[idx], widths), targets, self.mean, self.std, g, aug)
