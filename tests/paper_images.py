"""Real-looking test images made from MNIST digits: dark ink on light paper, like a photo or a scan.

A digit (uint8 28x28, white on black) is scaled up, inked onto a page with margins, uneven light,
slight blur and sensor noise, and sometimes turned into a slightly tinted RGB image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def _finish(page: np.ndarray, rng: np.random.Generator, blur: float) -> Image.Image:
    img = Image.fromarray(page.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(img, np.float64) + rng.normal(0, rng.uniform(2, 8), page.shape)
    img = Image.fromarray(a.clip(0, 255).round().astype(np.uint8))
    if rng.random() < 0.5:  # a colour photo of white paper under warm light
        img = Image.merge("RGB", [img.point(lambda v, k=k: min(255, int(v * k))) for k in (1.0, 0.97, 0.9)])
    return img


def paper_digit(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One digit on a page 60 to 300 pixels wide, anywhere on it, with margins."""
    width = int(rng.integers(60, 301))
    height = int(width * rng.uniform(1.0, 1.3))
    paper, ink = float(rng.integers(190, 246)), float(rng.integers(10, 80))
    glyph = max(20, int(width * rng.uniform(0.5, 0.85)))
    d = np.asarray(Image.fromarray(digit).resize((glyph, glyph), Image.Resampling.BICUBIC), np.float64) / 255
    page = np.full((height, width), paper)
    y, x = int(rng.integers(0, height - glyph + 1)), int(rng.integers(0, width - glyph + 1))
    page[y:y + glyph, x:x + glyph] -= (paper - ink) * d.clip(0, 1)
    page += np.linspace(0, rng.uniform(-25, 25), width)[None, :]  # uneven light across the page
    return _finish(page, rng, rng.uniform(0.3, 1.0) * width / 100)


def paper_row(digits: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """Several digits side by side, the same height, on one light page."""
    h = int(rng.integers(50, 120))
    parts = []
    for d in digits:
        ys, xs = np.nonzero(d > 30)
        crop = d[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        w = max(2, round(crop.shape[1] * h / crop.shape[0]))
        parts.append(np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BICUBIC), np.float64) / 255)
    gap, margin = int(h * rng.uniform(0.2, 0.5)), int(h * rng.uniform(0.3, 0.8))
    page_w = sum(p.shape[1] for p in parts) + gap * (len(parts) - 1) + 2 * margin
    paper, ink = float(rng.integers(200, 245)), float(rng.integers(10, 70))
    page = np.full((h + 2 * margin, page_w), paper)
    x = margin
    for p in parts:
        y = margin + int(rng.integers(-(h // 10), h // 10 + 1))  # a hand-written baseline wobbles
        page[y:y + h, x:x + p.shape[1]] -= (paper - ink) * p.clip(0, 1)
        x += p.shape[1] + gap
    return _finish(page, rng, rng.uniform(0.3, 0.8))


def write_paper_digits(images, labels, folder: Path, seed: int = 0) -> list[tuple[Path, str]]:
    """Each digit as a page, PNG and JPEG alternately; returns (file, label) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for n, (img, label) in enumerate(zip(images, labels)):
        path = folder / f"{n:03d}.{'jpg' if n % 2 else 'png'}"
        paper_digit(np.asarray(img, np.uint8), rng).save(path, quality=85)
        out.append((path, str(int(label))))
    return out
