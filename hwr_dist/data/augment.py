"""Batched augmentation as pure tensor-to-tensor functions, on the training device.

Each takes a float batch [B, 1, H, W] (background 0) and a torch.Generator on the same
device, and draws all its random numbers from that generator, so a run is reproducible
and resumable from the generator's saved state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, limit: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device=device) * 2 - 1) * limit


def affine_grid(x: torch.Tensor, g: torch.Generator, rotation: float, scale: float, translate: float,
                shear: float) -> torch.Tensor:
    """Sampling grid [B, H, W, 2] of a random rotation, zoom, shear and shift per image."""
    b, dev = x.shape[0], x.device
    angle = _uniform(b, math.radians(rotation), g, dev)
    sh = _uniform(b, math.radians(shear), g, dev)
    zoom = 1 + _uniform(b, scale, g, dev)
    shift = _uniform(2 * b, 2 * translate, g, dev).view(b, 2)  # grid units span 2 per side
    cos, sin, tan = angle.cos() / zoom, angle.sin() / zoom, sh.tan()
    # What F.affine_grid(theta, align_corners=False) computes, written out by broadcasting: its
    # batched [H*W, 3] x [3, 2] matrix product is most of the data path's time on a CPU.
    _, _, h, w = x.shape
    xs = ((torch.arange(w, device=dev, dtype=x.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=dev, dtype=x.dtype) * 2 + 1) / h - 1).view(1, h, 1)

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).view(b, 1, 1)

    # [B, H, 1] terms first: one full-size [B, H, W] operation per coordinate.
    gx = torch.addcmul(col(-sin + cos * tan) * ys + col(shift[:, 0]), col(cos), xs)
    gy = torch.addcmul(col(cos + sin * tan) * ys + col(shift[:, 1]), col(sin), xs)
    return torch.stack([gx, gy], 3)


def elastic_offsets(x: torch.Tensor, g: torch.Generator, alpha: float, sigma: float) -> torch.Tensor:
    """Smooth random displacement [B, H, W, 2] in grid units (Simard et al. 2003)."""
    b, _, h, w = x.shape
    noise = torch.rand(b, 2, h, w, generator=g, device=x.device) * 2 - 1
    radius = max(1, int(2 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    noise = F.conv2d(noise.view(-1, 1, h, w), k.view(1, 1, 1, -1), padding=(0, radius))
    noise = F.conv2d(noise, k.view(1, 1, -1, 1), padding=(radius, 0)).view(b, 2, h, w)
    # Pixels to grid units per axis, by Python scalars: a torch.tensor([...], device=cuda) here
    # would be a blocking host-to-device copy on every step.
    noise[:, 0].mul_(alpha * 2 / w)
    noise[:, 1].mul_(alpha * 2 / h)
    return noise.permute(0, 2, 3, 1)


def random_erase(x: torch.Tensor, g: torch.Generator, p: float, max_area: float = 0.25) -> torch.Tensor:
    """Zero one random rectangle (up to `max_area` of the image) in a share `p` of the images."""
    b, _, h, w = x.shape
    dev = x.device
    apply = torch.rand(b, generator=g, device=dev) < p
    eh = (torch.rand(b, generator=g, device=dev) * h * math.sqrt(max_area)).long() + 1
    ew = (torch.rand(b, generator=g, device=dev) * w * math.sqrt(max_area)).long() + 1
    top = (torch.rand(b, generator=g, device=dev) * (h - eh + 1)).long()
    left = (torch.rand(b, generator=g, device=dev) * (w - ew + 1)).long()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) & apply.view(-1, 1, 1))
    return x.masked_fill(box.unsqueeze(1), 0.0)


def augment(x: torch.Tensor, g: torch.Generator, cfg) -> torch.Tensor:
    """All augmentations of an AugmentConfig, in one grid_sample for the geometric ones."""
    grid = affine_grid(x, g, cfg.rotation, cfg.scale, cfg.translate, cfg.shear)
    if cfg.elastic_alpha > 0:
        grid = grid + elastic_offsets(x, g, cfg.elastic_alpha, cfg.elastic_sigma)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.erasing > 0:
        x = random_erase(x, g, cfg.erasing)
    return x
