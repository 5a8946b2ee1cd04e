"""Number images composed from single-digit images, drawn afresh every epoch: data for CTC reading.

Each string is a few digits of one split (training strings from the training split, and so on),
each scaled, slanted and shifted off the baseline, cropped to its ink's columns and set left to
right with a drawn gap between neighbours' ink; a negative gap overlaps them (combined by max).

Every random choice of an epoch is one table drawn from a CPU generator seeded by (seed, salt,
epoch): a string's length, digits, sizes, slants, shifts and gaps. String i of epoch e is then
the same image and text in whatever batch it is drawn, after whatever was drawn before, on
resume too; `fixed` sets (validation, test) keep epoch 0's table for good, and the salt keeps
the train, validation and test tables apart. Rendering is batched: one `grid_sample` draws
every digit of the batch into a cell of the output height, and one scatter (max) sets the
cropped cells into the strings. Nothing in it mixes strings, so no string depends on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from hwr_dist.data.splits import Split
from hwr_dist.data.sequences import Targets, normalised_batch
from hwr_dist.errors import HwrError

FIELD = 28  # the digit images' side; gaps, shifts and the band are in its pixels
MARGIN = 2  # blank columns at both ends of a string, in output pixels
ALPHABET = [str(d) for d in range(10)]  # data.DIGITS; not imported, so the registry may import this module


@dataclass(frozen=True)
class Geometry:
    """Where a digit lands in the output: the output height spans `band` digit pixels, and each
    digit is drawn centred in a cell of `cell` output columns before it is cropped to its ink."""

    height: int
    band: float
    cell: int

    @classmethod
    def of(cls, settings) -> "Geometry":
        """The band holds the largest digit's whole 28-pixel field, shifted either way; the cell
        holds it slanted too, so no ink is ever cut."""
        big = FIELD * settings.scale[1]
        band = big + 2 * settings.jitter
        half_width = big / 2 * (1 + math.tan(math.radians(settings.slant)))
        return cls(settings.height, band, math.ceil(2 * half_width * settings.height / band) + 1)

    def to_output(self, digit_pixels: torch.Tensor) -> torch.Tensor:
        """Digit pixels -> whole output pixels."""
        return (digit_pixels * (self.height / self.band)).round().long()


def check_settings(s, key: str = "data.strings") -> None:
    """Each StringsConfig value's range; the error names the key."""
    from hwr_dist.config import check

    def pair(name: str, lo: float, hi: float) -> None:
        v = getattr(s, name)
        check(len(v) == 2 and lo <= v[0] <= v[1] <= hi, f"{key}.{name}",
              f"[low, high] with {lo} <= low <= high <= {hi}", v)

    check(type(s.min_length) is int and s.min_length >= 1, f"{key}.min_length", "a positive integer", s.min_length)
    check(type(s.max_length) is int and s.max_length >= s.min_length, f"{key}.max_length",
          f"an integer >= min_length ({s.min_length})", s.max_length)
    pair("gap", -FIELD / 2, FIELD)
    pair("scale", 0.25, 4)
    check(0 <= s.jitter <= FIELD / 2, f"{key}.jitter", f"a number in [0, {FIELD // 2}]", s.jitter)
    check(0 <= s.slant <= 45, f"{key}.slant", "a number in [0, 45]", s.slant)
    check(type(s.height) is int and 8 <= s.height <= 512, f"{key}.height", "an integer in [8, 512]", s.height)
    for name in ("train_size", "eval_size"):
        v = getattr(s, name)
        check(type(v) is int and v > 0, f"{key}.{name}", "a positive integer", v)


def compose(images: torch.Tensor, lengths: torch.Tensor, scales: torch.Tensor, shears: torch.Tensor,
            shifts: torch.Tensor, gaps: torch.Tensor, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings from their digits: (pixels [B, H, max width] as whole-number floats 0..255, padded with
    0, a transposed view; and each string's width [B]).

    images: uint8 [D, 28, 28], the digits of all strings in order, `lengths[b]` of them for string b;
    per digit: scales (size factor), shears (tan of the slant), shifts (digit pixels, down),
    gaps (whole output pixels between its ink and the next digit's; the last of a string unused).
    """
    d, dev = len(images), images.device
    h, c, b = geo.height, geo.cell, len(lengths)
    k = geo.band / h  # digit pixels per output pixel
    # Inverse map, output cell -> digit field, in grid units (half a field): y = (q_y - shift) / scale,
    # x = q_x / scale + shear * y, where q is the output pixel's offset from the cell's centre. The
    # cell is sampled column by column ([D, cell, H]), the layout the scatter below wants.
    qx = (torch.arange(c, device=dev) + 0.5 - c / 2) * (k / (FIELD / 2))
    qy = (torch.arange(h, device=dev) + 0.5 - h / 2) * (k / (FIELD / 2))
    inv = 1 / scales.view(d, 1)
    gy = (qy.view(1, h) - shifts.view(d, 1) / (FIELD / 2)) * inv  # [D, H]
    grid = torch.empty(d, c, h, 2, device=dev)
    torch.add((qx.view(1, c) * inv).view(d, c, 1), (shears.view(d, 1) * gy).view(d, 1, h), out=grid[..., 0])
    grid[..., 1] = gy.view(d, 1, h)
    cells = F.grid_sample(images.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False).view(d, c, h).round_()

    # Each digit's ink columns; a blank digit keeps its whole cell (and so its place).
    cols = torch.arange(c, device=dev)
    ink = cells.amax(2) > 0  # [D, cell]
    blank = ~ink.any(1)
    left = torch.where(blank, 0, torch.where(ink, cols, c).amin(1))
    right = torch.where(blank, c - 1, torch.where(ink, cols, -1).amax(1))
    width = right - left + 1

    # Left edges: each digit starts `gap` after the previous one's ink, but never at or before the
    # previous one's start, so the reading order stays left to right.
    string = torch.repeat_interleave(torch.arange(b, device=dev), lengths, output_size=d)
    step = torch.clamp(width + gaps, min=1)
    before = step.cumsum(0) - step  # steps of all earlier digits, of earlier strings too
    first = lengths.cumsum(0) - lengths
    x = MARGIN + before - before[first][string]
    widths = torch.zeros(b, dtype=torch.long, device=dev).scatter_reduce_(0, string, x + width, "amax") + MARGIN

    # One scatter (max) of every digit's ink columns into a [B * W + 1, H] column store; the extra
    # row takes the columns outside the ink.
    w = int(widths.max()) if b else 0
    inside = (cols >= left.unsqueeze(1)) & (cols <= right.unsqueeze(1))
    target = torch.where(inside, string.unsqueeze(1) * w + x.unsqueeze(1) + cols - left.unsqueeze(1), b * w)
    canvas = torch.zeros(b * w + 1, h, device=dev).scatter_reduce_(
        0, target.view(-1, 1).expand(-1, h), cells.view(d * c, h), "amax")
    return canvas[:-1].view(b, w, h).transpose(1, 2), widths


def render_string(digits: torch.Tensor, gaps: Sequence[float], settings, scales: Sequence[float] | None = None,
                  slants: Sequence[float] | None = None, jitters: Sequence[float] | None = None) -> torch.Tensor:
    """One string as uint8 [height, W] from its digit images uint8 [L, 28, 28] and the L - 1 gaps
    between them (digit pixels), drawn as DigitStrings with these settings draws them. Per-digit
    scales, slants (degrees) and jitters (digit pixels) default to none; keep them within the
    settings' ranges, or ink may be cut off."""
    n = len(digits)

    def per_digit(values: Sequence[float] | None, neutral: float) -> torch.Tensor:
        return torch.tensor([neutral] * n if values is None else list(values), dtype=torch.float32)

    geo = Geometry.of(settings)
    gap_px = geo.to_output(torch.tensor([*gaps, 0.0], dtype=torch.float32))
    pixels, _ = compose(digits, torch.tensor([n]), per_digit(scales, 1.0),
                        per_digit(slants, 0.0).deg2rad_().tan_(), per_digit(jitters, 0.0), gap_px, geo)
    return pixels[0].to(torch.uint8)


@dataclass
class _Table:
    """One epoch's random choices for every string, on the device: [size] or [size, max_length]."""

    lengths: torch.Tensor
    digits: torch.Tensor  # indices into the split
    scales: torch.Tensor
    shears: torch.Tensor
    shifts: torch.Tensor
    gaps: torch.Tensor  # output pixels after each digit
    touching: torch.Tensor


class DigitStrings:
    """Digit strings for CTC, the same face as LineData: `batch(idx, g, aug)` -> (x, Targets)."""

    def __init__(self, split: Split, settings, seed: int, mean: float, std: float, device: str | torch.device = "cpu",
                 fixed: bool = False, size: int = 1000, salt: int = 0):
        """`split`: the digits to draw from (uint8 [N, 28, 28], labels 0..9); `size` strings per epoch;
        `fixed`: one set for good (validation, test); `salt` tells the train, val and test sets apart."""
        check_settings(settings)
        if len(split) == 0:
            raise HwrError("digit strings need digits to draw from, but the split is empty; "
                           "use a larger data set or a smaller data.val_fraction")
        if tuple(split.images.shape[1:]) != (FIELD, FIELD):
            raise HwrError(f"digit strings need {FIELD}x{FIELD} digit images, got "
                           f"{'x'.join(map(str, split.images.shape[1:]))}; choose a digit data set")
        if split.labels.min() < 0 or split.labels.max() > 9:
            raise HwrError(f"digit strings need digit labels 0..9, got {int(split.labels.min())}.."
                           f"{int(split.labels.max())}; choose a digit data set (mnist, qmnist, usps, emnist-digits)")
        self.settings, self.seed, self.fixed, self.size, self.salt = settings, seed, fixed, size, salt
        self.mean, self.std, self.alphabet = mean, std, ALPHABET
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.geo = Geometry.of(settings)
        self.epoch = 0
        self.table = self._draw(0)

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Draw the epoch's strings (call at every epoch's start); a fixed set keeps its own."""
        if not self.fixed and epoch != self.epoch:
            self.epoch, self.table = epoch, self._draw(epoch)

    def _draw(self, epoch: int) -> _Table:
        s, n, most = self.settings, self.size, self.settings.max_length
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.salt) * 1_000_003 + epoch) % 2**63)

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, most, generator=g)

        lengths = torch.randint(s.min_length, s.max_length + 1, (n,), generator=g)
        digits = torch.randint(0, len(self.labels), (n, most), generator=g)
        scales = uniform(*s.scale)
        shears = uniform(-s.slant, s.slant).deg2rad_().tan_()
        shifts = uniform(-s.jitter, s.jitter)
        gaps = self.geo.to_output(uniform(*s.gap))
        between = torch.arange(most) < (lengths - 1).unsqueeze(1)  # gaps that lie between two digits
        touching = ((gaps <= 0) & between).any(1)
        dev = self.images.device
        return _Table(*(t.to(dev) for t in (lengths, digits, scales, shears, shifts, gaps, touching)))

    def pixels(self, idx: torch.Tensor) -> tuple[torch.Tensor, Targets]:
        """(pixels [B, H, max width] as whole-number floats 0..255, Targets) of strings `idx` this epoch."""
        t = self.table
        idx = idx.to(self.images.device, non_blocking=True)
        lengths = t.lengths[idx]
        keep = torch.arange(self.settings.max_length, device=idx.device) < lengths.unsqueeze(1)
        digits = t.digits[idx][keep]  # [D], string by string
        pixels, widths = compose(self.images[digits], lengths, t.scales[idx][keep], t.shears[idx][keep],
                                 t.shifts[idx][keep], t.gaps[idx][keep], self.geo)
        return pixels, Targets(self.labels[digits] + 1, lengths, widths, t.touching[idx])

    def batch(self, idx: torch.Tensor, g: torch.Generator | None = None, aug=None) -> tuple[torch.Tensor, Targets]:
        """(normalised float images [B, 1, H, max width], Targets) for the given indices."""
        pixels, targets = self.pixels(idx)
        return normalised_batch(pixels, targets, self.mean, self.std, g, aug)

    def pixel_stats(self, n: int = 512) -> tuple[float, float]:
        """Mean and std, in [0, 1] units, of the real (unpadded) pixels of the first n strings: the
        normalisation to train with."""
        pixels, targets = self.pixels(torch.arange(min(n, self.size)))
        inside = torch.arange(pixels.shape[2], device=pixels.device) < targets.widths.view(-1, 1, 1)
        values = pixels.masked_select(inside.expand_as(pixels)).div_(255)
        return values.mean().item(), max(values.std().item(), 1e-3)
