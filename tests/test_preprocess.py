"""Photos of handwriting to MNIST-style digits, row segmentation and the image-folder data set."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from hwr_dist.data.imagefolder import load_imagefolder
from hwr_dist.data import preprocess
from hwr_dist.data.preprocess import mnist_style, open_image, segment_row
from hwr_dist.errors import HwrError


def draw_glyph(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill, width: int) -> None:
    """Strokes of a few characters inside box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if kind == "0":
        draw.ellipse(box, outline=fill, width=width)
    elif kind == "1":
        draw.line([(x0 + w * 0.2, y0 + h * 0.25), (x0 + w * 0.6, y0), (x0 + w * 0.6, y1)], fill=fill, width=width)
    elif kind == "7":
        draw.line([(x0, y0), (x1, y0), (x0 + w * 0.35, y1)], fill=fill, width=width)
    elif kind == "broken7":  # the bar and the stem do not touch
        draw.line([(x0, y0), (x1, y0)], fill=fill, width=width)
        draw.line([(x1 - w * 0.05, y0 + 2 * width), (x0 + w * 0.35, y1)], fill=fill, width=width)
    elif kind == "i":  # a stem and a separate dot above it
        cx = (x0 + x1) / 2
        draw.line([(cx, y0 + h * 0.3), (cx, y1)], fill=fill, width=width)
        r = width * 0.7
        draw.ellipse([cx - r, y0 + h * 0.05 - r, cx + r, y0 + h * 0.05 + r], fill=fill)
    elif kind == "L":
        draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=fill, width=width)


def page(size: tuple[int, int], kind: str = "7", box: tuple[float, float, float, float] = (0.3, 0.2, 0.7, 0.8),
         ink: int = 25, paper: int = 235, noise: float = 0.0, seed: int = 0) -> Image.Image:
    """A grey page with one character in `box` (fractions of the page), plus Gaussian paper noise."""
    w, h = size
    img = Image.new("L", size, paper)
    px = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    draw_glyph(ImageDraw.Draw(img), kind, px, ink, max(2, round(min(px[2] - px[0], px[3] - px[1]) / 9)))
    if noise:
        a = np.asarray(img, np.float64) + np.random.default_rng(seed).normal(0, noise, (h, w))
        img = Image.fromarray(a.clip(0, 255).round().astype(np.uint8))
    return img


def check_mnist_like(t: torch.Tensor) -> None:
    assert t.shape == (28, 28) and t.dtype == torch.uint8
    a = t.numpy().astype(np.float64)
    assert a.max() >= 180 and np.median(a) == 0  # white ink on black (a thin stroke shrunk to 28x28 is greyer)
    ys, xs = np.nonzero(a)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert 19 <= max(height, width) <= 21 and min(height, width) <= 21
    cy, cx = a.sum(1) @ np.arange(28) / a.sum(), a.sum(0) @ np.arange(28) / a.sum()
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def mean_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("size, kind, box, noise", [
    ((60, 45), "7", (0.3, 0.2, 0.7, 0.8), 0),
    ((400, 300), "0", (0.1, 0.1, 0.4, 0.5), 6),  # off-centre
    ((300, 400), "1", (0.4, 0.3, 0.6, 0.7), 10),
    ((1600, 1200), "L", (0.6, 0.55, 0.8, 0.95), 4),  # small in a wide margin
    ((2600, 1800), "i", (0.45, 0.3, 0.55, 0.6), 5),  # larger than the working size
])
def test_dark_on_light_and_light_on_dark(size, kind, box, noise):
    dark = page(size, kind, box, noise=noise)
    t = mnist_style(dark)
    check_mnist_like(t)
    light = mnist_style(ImageOps.invert(dark))
    check_mnist_like(light)
    assert mean_diff(t, light) < 2


def test_specks_on_the_paper_are_ignored():
    img = page((400, 300), "7")
    ImageDraw.Draw(img).rectangle([5, 280, 7, 282], fill=0)  # a speck far from the character
    assert mean_diff(mnist_style(img), mnist_style(page((400, 300), "7"))) < 2


@pytest.mark.parametrize("dark", [True, False])
def test_the_ink_worked_out_per_grey_level_is_the_per_pixel_rule(dark):
    """`_find_ink` reads a photo's histogram instead of its pixels; the rules it applies are per pixel:
    the mask is ink strength |grey - paper| beyond both the noise floor and Otsu's threshold of those
    strengths; the level is that strength scaled so that the ink's 90th percentile is 255 (stronger
    ink too), and 0 within the floor."""
    rng = np.random.default_rng(1 if dark else 2)
    for _ in range(10):
        paper = int(rng.integers(60, 200))
        gray = np.clip(paper + rng.normal(0, rng.uniform(1, 8), (60, 90)), 0, 255)
        ys, xs = rng.integers(8, 52, 40), rng.integers(8, 82, 40)
        gray[ys[:, None] + np.arange(-2, 3), xs[:, None] + np.arange(-2, 3)] += (-1 if dark else 1) * rng.uniform(40, 60)
        gray = np.clip(gray, 0, 255).astype(np.uint8)
        g = gray.astype(np.float32)
        border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
        level = np.median(border)
        floor = max(preprocess.MIN_CONTRAST, preprocess.NOISE_SIGMAS * 1.4826 * np.median(np.abs(border - level)))
        strength = np.maximum(level - g, 0) if dark else np.maximum(g - level, 0)
        otsu = preprocess._otsu(np.bincount(np.rint(strength).astype(np.int64).ravel(), minlength=256))
        want = strength > max(otsu, floor)
        mask, levels = preprocess._find_ink(gray)
        assert want.sum() > 100 and np.array_equal(mask, want)
        solid = np.quantile(strength[want], preprocess.SOLID, method="inverted_cdf")
        want_levels = np.where(strength > floor, np.minimum(np.rint(strength * 255 / solid), 255), 0)
        assert np.abs(levels[gray].astype(int) - want_levels).max() <= 1  # rounding


def test_faint_ink_stays_faint():
    """A grey stroke beside a black one keeps its lower level (a bilevel mask would make both 255)."""
    img = Image.new("L", (200, 200), 240)
    draw = ImageDraw.Draw(img)
    draw.line([(40, 40), (160, 40)], fill=20, width=12)  # the bar of a 7, black
    draw.line([(160, 40), (80, 170)], fill=130, width=12)  # its stem, in pencil grey
    t = mnist_style(img).numpy().astype(np.float64)
    bar, stem = t[:14].max(), t[16:].max()
    assert bar >= 250 and 0.35 * 255 < stem < 0.65 * 255, (bar, stem)


def test_colour_and_transparent_images_match_grey():
    grey = mnist_style(page((200, 200), "0"))
    rgb = Image.new("RGB", (200, 200), (245, 235, 200))  # blue pen on cream paper
    draw_glyph(ImageDraw.Draw(rgb), "0", (60, 40, 140, 160), (30, 40, 200), 9)
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # black ink on a transparent sheet
    draw_glyph(ImageDraw.Draw(rgba), "0", (60, 40, 140, 160), (0, 0, 0, 255), 9)
    palette = page((200, 200), "0").convert("P")
    for img in (rgb, rgba, palette):
        t = mnist_style(img)
        check_mnist_like(t)
        assert mean_diff(t, grey) < 4


def test_open_image_flattens_alpha_and_applies_exif(tmp_path):
    rgba = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
    draw_glyph(ImageDraw.Draw(rgba), "7", (20, 10, 60, 50), (0, 0, 0, 255), 5)
    rgba.save(tmp_path / "a.png")
    img = open_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    check_mnist_like(mnist_style(img))

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    page((100, 50), "1").save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (50, 100)


def blank_png(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit PNG written by hand: a few kilobytes however many pixels it has."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = zlib.compress(bytes((1 + (w + 7) // 8) * h), 1)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [8000, 10000, 14000])  # ours, PIL's warning, PIL's error
def test_huge_image(tmp_path, recwarn, side):
    with pytest.raises(HwrError, match=r"huge\.png is a huge image .*downscale"):
        open_image(blank_png(tmp_path / "huge.png", side, side))
    assert not recwarn.list


def test_bad_files(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture\n")
    (tmp_path / "empty.png").touch()
    Image.new("RGB", (50, 50), "white").save(tmp_path / "white.png")
    page((200, 200), noise=20).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name, pattern in [("notes.png", "not an image"), ("empty.png", "empty"), ("white.png", "all one colour"),
                          ("cut.png", "damaged or truncated"), ("missing.png", "not found")]:
        with pytest.raises(HwrError, match=pattern) as e:
            open_image(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_no_ink():
    with pytest.raises(HwrError, match="no ink found in blank.jpg"):
        mnist_style(page((200, 200), kind="blank", noise=3), name="blank.jpg")  # an unknown kind draws nothing


def test_segment_row():
    kinds = ["1", "0", "i", "broken7", "L"]
    row = Image.new("L", (2000, 500), 230)
    draw = ImageDraw.Draw(row)
    for n, kind in enumerate(kinds):  # each taller than the one before, so the order shows in the crops
        x = 80 + n * 380
        draw_glyph(draw, kind, (x, 380 - 200 - 40 * n, x + 160, 380), 30, 16)
    for x, y in [(10, 10), (430, 450), (1210, 60), (1990, 490)]:
        draw.rectangle([x, y, x + 2, y + 2], fill=30)  # specks
    noisy = np.asarray(row, np.float64) + np.random.default_rng(0).normal(0, 5, (500, 2000))
    row = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))

    start = time.perf_counter()
    crops = segment_row(row)
    assert time.perf_counter() - start < 1.0
    assert len(crops) == len(kinds)
    heights = [c.height for c in crops]
    assert heights == sorted(heights) and len(set(heights)) == len(heights)
    for c in crops:
        check_mnist_like(mnist_style(c))


def make_folder(folder: Path, counts: dict[str, int]) -> None:
    kinds = ["0", "1", "7", "L", "i"]
    suffixes = [".png", ".PNG", ".jpg", ".bmp", ".gif"]
    for c, (name, count) in enumerate(counts.items()):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            page((48, 48), kinds[c % len(kinds)], noise=2, seed=i).save(folder / name / f"{i}{suffixes[i % 5]}")


def test_imagefolder_flat(tmp_path):
    make_folder(tmp_path, {"b": 5, "a": 5, "c": 5})
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    (tmp_path / "a" / "._0.png").write_bytes(b"macOS metadata, ignored")
    bundle = load_imagefolder(tmp_path)
    assert bundle.classes == ["a", "b", "c"]
    assert bundle.train.images.shape == (12, 28, 28) and bundle.test.images.shape == (3, 28, 28)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.labels.dtype == torch.int64
    assert bundle.train.labels.bincount().tolist() == [4, 4, 4] and sorted(bundle.test.labels.tolist()) == [0, 1, 2]
    assert torch.equal(load_imagefolder(tmp_path).test.images, bundle.test.images)  # seeded split


def test_imagefolder_train_test(tmp_path):
    make_folder(tmp_path / "train", {"x": 3, "y": 3})
    make_folder(tmp_path / "test", {"x": 2, "y": 1})
    bundle = load_imagefolder(tmp_path)
    assert bundle.classes == ["x", "y"]
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and bundle.test.labels.tolist() == [0, 0, 1]
    assert bundle.test.images.shape == (3, 28, 28)


def test_imagefolder_errors(tmp_path):
    def fails(root: Path, pattern: str) -> None:
        with pytest.raises(HwrError, match=pattern) as e:
            load_imagefolder(root)
        assert "\n" not in str(e.value)

    fails(tmp_path / "nope", "not found")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "0.png").touch()
    fails(tmp_path / "files", "no class folders")
    make_folder(tmp_path / "empty", {"a": 2})
    (tmp_path / "empty" / "b").mkdir()
    fails(tmp_path / "empty", r"class folder .*b has no images")
    make_folder(tmp_path / "bad", {"a": 2})
    (tmp_path / "bad" / "a" / "broken.png").write_text("oops")
    fails(tmp_path / "bad", r"broken\.png is not an image.*remove it")
    make_folder(tmp_path / "split" / "train", {"a": 1, "b": 1, "c": 1})
    make_folder(tmp_path / "split" / "test", {"a": 1, "b": 1, "d": 1})
    fails(tmp_path / "split", "only in train: c; only in test: d")
    make_folder(tmp_path / "half" / "train", {"a": 1})
    fails(tmp_path / "half", "test does not")
