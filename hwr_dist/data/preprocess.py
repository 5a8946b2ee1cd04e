"""Turn photos and scans of handwriting into MNIST-style 28x28 characters.

MNIST was made from bilevel NIST scans: each character was scaled (anti-aliased, aspect kept)
so that its longer side is 20 pixels, then put in a 28x28 field with its centre of mass at the
centre. `mnist_style` finds the ink of the photo and repeats those steps, so a user's own images
look like the training data (ink white on black). The ink keeps its grey levels, measured from
the paper (the darkest tenth of the ink is 255), rather than a bilevel mask: a small or blurred
scan holds much of a stroke's shape in them (bench/RESULTS.md, "Grey levels of the ink").

Sequence models (CRNN) read a whole number or line of text instead: `line_image` finds the ink
the same way, crops it and scales it, aspect kept, to sit in the model's input height as the
training lines' ink sat (`LineLayout`, from the run's config by `line_layout`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hwr_dist.errors import HwrError

MAX_MEGAPIXELS = 40
WORK_SIDE = 2048  # larger images are shrunk first: 20 output pixels need far less, and memory stays flat
MIN_CONTRAST = 24  # ink must differ from the paper by at least this many grey levels
NOISE_SIGMAS = 4  # ...and by this many standard deviations of the paper's own texture
SOLID = 0.9  # ink at least as strong as this share of the ink's pixels is solid (255): outliers set no scale
SPECK = 0.02  # in one character, parts smaller than this fraction of the largest part are noise
ROW_SPECK = 0.005  # in a row, parts this small next to the largest cannot even be the dot of an i
ROW_SMALL = 0.1  # in a row, characters below this fraction of the median one are specks
MERGE_OVERLAP = 0.5  # parts overlapping in x by this fraction of the narrower one are one character
BOX, FIELD = 20, 28
LINE_MARGIN = 2  # blank columns either side of a line's ink (and rows, for text lines): as digit strings'
MAX_LINE_WIDTH = 8192  # wider, a line is a stroke across the page rather than text: crop the photo
HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageTooLarge(HwrError):
    """Over MAX_MEGAPIXELS: a decompression bomb, or just a photo far larger than 20 pixels need."""


def open_image(path: str | Path) -> Image.Image:
    """A readable, upright, opaque "L" or "RGB" image, or an HwrError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise HwrError(f"{path} not found; check the path")
    if path.stat().st_size == 0:
        raise HwrError(f"{path} is empty (0 bytes); re-save the image or remove the file")
    return _decode(path, str(path))


def decode_image(data: bytes, name: str = "the image") -> Image.Image:
    """`open_image` for bytes already in memory (an upload): nothing touches the file system."""
    if not data:
        raise HwrError(f"{name} is empty (0 bytes); send the image file's contents")
    return _decode(io.BytesIO(data), name)


def characters(image: bytes | Image.Image, segment: bool = False, name: str = "the image") -> torch.Tensor:
    """uint8 [K, 28, 28] from image bytes or a decoded image: the image as one character, or each
    character of a row when `segment`. `hwr predict` and `hwr serve` both read images through here."""
    img = decode_image(bytes(image), name) if isinstance(image, (bytes, bytearray, memoryview)) else image
    crops = segment_row(img, name) if segment else [img]
    if not crops:
        raise HwrError(f"{name}: no characters found")
    if len(crops) == 1:
        return mnist_style(crops[0], name).unsqueeze(0)
    return torch.stack([mnist_style(c, f"character {i + 1} of {name}") for i, c in enumerate(crops)])


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns (above ~89 MP) or raises (above ~179 MP) while opening a decompression bomb;
            # both only mean "huge" here, and must not print a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                _check_size(name, im.size)  # from the header, before decoding anything
                im.load()
                img = _flatten(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLarge(_huge(name, f"over {MAX_MEGAPIXELS} megapixels")) from None
    except UnidentifiedImageError:
        raise HwrError(f"{name} is not an image file PIL can read; re-save it as PNG or JPEG, or remove it") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data: PIL's decoders raise all three
        raise HwrError(f"{name} is damaged or truncated ({e}); re-save it or remove it") from None
    if all(lo == hi for lo, hi in _band_extrema(img)):
        raise HwrError(f"{name} is all one colour, so there is nothing to read; check it is the right file or remove it")
    return img


def mnist_style(img: Image.Image, name: str = "the image") -> torch.Tensor:
    """uint8 [28, 28], ink white on black, made the way MNIST was made; `name` is for the error."""
    return torch.from_numpy(_centre(_fit_box(_ink_crop(img, SPECK, name))))


@dataclass(frozen=True)
class LineLayout:
    """Where the ink of a line sits in a sequence model's input: `height` rows, of which the ink's
    bounding box fills the middle `ink` share, and `margin` blank columns at both ends."""

    height: int
    ink: float
    margin: int = LINE_MARGIN


def line_layout(cfg) -> LineLayout:
    """The layout of a sequence run's training lines (cfg: its Config).

    Digit strings: the output height spans the band of the largest digit's field shifted either
    way (`digit_strings.Geometry`), and a string's ink spans about its tallest digit (MNIST's BOX
    pixels at the largest scale) plus the spread of the shifts. Text lines are the user's own
    scans, scaled whole: taken as cropped to the text, with LINE_MARGIN blank rows above and below.
    """
    s = cfg.data.strings
    if cfg.data.name == "textlines":
        return LineLayout(s.height, 1 - 2 * LINE_MARGIN / s.height)
    from hwr_dist.data.digit_strings import MARGIN, Geometry

    return LineLayout(s.height, min(1.0, (BOX * s.scale[1] + s.jitter) / Geometry.of(s).band), MARGIN)


def line_image(img: Image.Image, layout: LineLayout, name: str = "the image") -> torch.Tensor:
    """uint8 [layout.height, W], ink white on black: a photo or scan of a number or a line of text as
    a sequence model saw lines in training. The ink (specks dropped, as in a row of `segment_row`)
    is cropped, scaled with its aspect kept so that it fills `layout.ink` of the height, centred
    in it, with `layout.margin` blank columns either side."""
    crop = _ink_crop(img, ROW_SPECK, name)
    rows = max(1, round(layout.ink * layout.height))
    scale = rows / crop.shape[0]
    width = round(crop.shape[1] * scale) + 2 * layout.margin
    if width > MAX_LINE_WIDTH:
        raise HwrError(f"{name}: its ink is {crop.shape[1] / crop.shape[0]:.0f} times as wide as it is tall, a "
                       f"line {width} pixels wide at height {layout.height}; crop the image to the text")
    ink = _scale(crop, scale)
    line = np.zeros((layout.height, ink.shape[1] + 2 * layout.margin), np.uint8)
    top = (layout.height - ink.shape[0]) // 2
    line[top:top + ink.shape[0], layout.margin:layout.margin + ink.shape[1]] = ink
    return torch.from_numpy(line)


def _ink_crop(img: Image.Image, speck: float, name: str) -> np.ndarray:
    """The ink's levels (uint8) cropped to its bounding box, without parts smaller than `speck` times the largest."""
    gray = _gray(img)
    mask, levels = _find_ink(gray)
    if not mask.any():
        raise HwrError(_no_ink(name))
    comps = _components(mask)
    keep = np.flatnonzero(comps.area >= speck * comps.area.max())
    top, bottom = comps.top[keep].min(), comps.bottom[keep].max() + 1
    left, right = comps.left[keep].min(), comps.right[keep].max() + 1
    crop = levels[gray[top:bottom, left:right]]
    if len(keep) == len(comps.area):  # no specks (the usual case)
        return crop
    return crop * _wanted(comps, keep)[comps.labels[top:bottom, left:right]]


def segment_row(img: Image.Image, name: str = "the image") -> list[Image.Image]:
    """The characters of a row, left to right, each an "L" image (white on black) for `mnist_style`."""
    gray = _gray(img)
    mask, levels = _find_ink(gray)
    if not mask.any():
        raise HwrError(_no_ink(name))
    comps = _components(mask)
    parts = np.flatnonzero(comps.area >= ROW_SPECK * comps.area.max())
    groups = _group_columns(comps, parts[np.argsort(-comps.area[parts], kind="stable")])
    areas = np.array([comps.area[g].sum() for g in groups])
    chars = [g for g, a in zip(groups, areas) if a >= ROW_SMALL * np.median(areas)]
    chars.sort(key=lambda g: comps.left[g].min())
    return [_crop(comps, g, gray, levels) for g in chars]


def _check_size(name: str, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_MEGAPIXELS * 1_000_000:
        raise ImageTooLarge(_huge(name, f"{w}x{h}, {w * h / 1e6:.0f} megapixels, over the limit of {MAX_MEGAPIXELS}"))


def _huge(name: str, detail: str) -> str:
    return f"{name} is a huge image ({detail}); downscale it, e.g. to 2000 pixels on the longer side"


def _no_ink(name: str) -> str:
    return (f"no ink found in {name}: nothing differs enough from the paper; "
            "use a darker pen or a sharper, evenly lit photo, or remove it")


def _band_extrema(img: Image.Image) -> tuple[tuple[float, float], ...]:
    ext = img.getextrema()
    return ext if isinstance(ext[0], tuple) else (ext,)


def _flatten(img: Image.Image) -> Image.Image:
    """"L" or "RGB": transparency composited on white (ink drawn on a transparent sheet stays visible)."""
    if img.mode in HIGH_DEPTH:
        return _stretch(img)
    if img.mode in ALPHA or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    if img.mode in ("L", "RGB"):
        return img
    return img.convert("L" if img.mode == "1" else "RGB")


def _stretch(img: Image.Image) -> Image.Image:
    """16-bit and float scans to 8 bits: PIL's own conversion clips them instead of scaling."""
    a = np.asarray(img, dtype=np.float64)
    lo, hi = a.min(), a.max()
    scaled = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(scaled.round().astype(np.uint8))


def _gray(img: Image.Image) -> np.ndarray:
    """Grey levels (uint8), shrunk to WORK_SIDE at most."""
    gray = _flatten(img).convert("L")
    scale = WORK_SIDE / max(gray.size)
    if scale < 1:
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                           Image.Resampling.BOX)
    return np.asarray(gray)


def _find_ink(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ink mask, and the ink level (uint8, 0 for paper) of each of the 256 grey levels.

    The paper level comes from the border; the ink is what lies far from it on either side, and
    its level is its distance from the paper, 255 for the strongest tenth of the ink. Everything
    is worked out once per grey level, weighted by the level's pixel count, and the
    image is read only twice (its histogram, then the mask): a photo has millions of pixels."""
    band = max(1, min(gray.shape) // 50)
    border = np.concatenate([gray[:band].ravel(), gray[-band:].ravel(), gray[:, :band].ravel(),
                             gray[:, -band:].ravel()]).astype(np.float32)
    paper = np.median(border)
    noise = 1.4826 * np.median(np.abs(border - paper))  # robust standard deviation of the paper texture
    floor = max(MIN_CONTRAST, NOISE_SIGMAS * noise)
    count = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    level = np.arange(256, dtype=np.float32)
    darker, lighter = np.maximum(paper - level, 0), np.maximum(level - paper, 0)  # ink strength per level
    # Polarity: whichever side holds more clearly-off-paper mass is the ink (noise is symmetric).
    dark_ink = count @ np.maximum(darker - floor, 0) >= count @ np.maximum(lighter - floor, 0)
    ink = darker if dark_ink else lighter
    strengths = np.bincount(np.rint(ink).astype(np.int64), weights=count, minlength=256)  # Otsu's histogram
    is_ink = ink > max(_otsu(strengths), floor)
    # Ink strength only grows away from the paper, so the ink levels are the darkest (or lightest) few.
    few = int(np.count_nonzero(is_ink))
    mask = gray < few if dark_ink else gray >= 256 - few
    # Levels scale from the paper, not from the noise floor: on a noisy or shaded page the floor is
    # high, and measuring from it would dim every stroke. Within the floor is paper.
    strongest = _quantile(ink[is_ink], count[is_ink], SOLID) if is_ink.any() else 1.0
    levels = np.where(ink > floor, np.minimum(ink * (255 / strongest), 255), 0)
    return mask, np.rint(levels).astype(np.uint8)


def _quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The `q` quantile of `values`, each counted `weights` times."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


def _otsu(hist: np.ndarray) -> int:
    """Otsu's threshold from a histogram of 0..255 values (256 counts): those above it are foreground."""
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return int(np.argmax(np.nan_to_num(between)))


@dataclass
class _Components:
    """8-connected components of a mask; per-component arrays are indexed by component id."""

    labels: np.ndarray  # int32 [H, W]: 0 background, id + 1 inside component `id`
    area: np.ndarray
    left: np.ndarray  # inclusive bounds
    right: np.ndarray
    top: np.ndarray
    bottom: np.ndarray


def _components(mask: np.ndarray) -> _Components:
    """Connected components by union-find over horizontal runs: few runs, so the Python loop stays short."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), bool)
    padded[:, 1:-1] = mask
    # Where a padded row changes: in scan order each row's changes alternate run start, run end (exclusive).
    edges = np.flatnonzero(padded[:, 1:] != padded[:, :-1])
    row, start = np.divmod(edges[0::2], w + 1)
    end = edges[1::2] % (w + 1)
    parent = list(range(len(row)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(*_touching_runs(row, start, end, w)):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ids = np.unique([find(i) for i in range(len(row))], return_inverse=True)[1].astype(np.int32)
    n = int(ids.max()) + 1 if len(ids) else 0

    # Paint labels: +id at each run's start, -id at its end, and a running sum fills the run.
    flat = np.zeros(h * (w + 1), np.int32)  # a spare column keeps a run's end inside its own row
    base = row * (w + 1)
    flat[base + start] = ids + 1
    flat[base + end] = -(ids + 1)
    labels = np.cumsum(flat, dtype=np.int32).reshape(h, w + 1)[:, :w]

    def reduce(op: np.ufunc, values: np.ndarray, initial: int) -> np.ndarray:
        out = np.full(n, initial, np.int64)
        op.at(out, ids, values)
        return out

    return _Components(labels, np.bincount(ids, weights=end - start, minlength=n).astype(np.int64),
                       reduce(np.minimum, start, w), reduce(np.maximum, end - 1, -1),
                       reduce(np.minimum, row, h), reduce(np.maximum, row, -1))


def _touching_runs(row: np.ndarray, start: np.ndarray, end: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (run above, run) that touch, diagonals included.

    Keys row * (w + 2) + column sort runs in scan order, so the runs of the row above that touch
    [start, end) form one contiguous range: from the first ending at or after `start` to the last
    beginning at or before `end`.
    """
    stride = w + 2
    above = (row - 1) * stride
    lo = np.searchsorted(row * stride + end, above + start, "left")
    hi = np.searchsorted(row * stride + start, above + end, "right") - 1
    count = np.maximum(hi - lo + 1, 0)
    below = np.repeat(np.arange(len(row)), count)
    offset = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return np.repeat(lo, count) + offset, below


def _wanted(comps: _Components, ids: np.ndarray) -> np.ndarray:
    """Lookup table from label value to "in one of `ids` or in none" (faster than np.isin on a whole
    image): pixels outside every component are the faint ink at the strokes' edges, or paper (0)."""
    table = np.zeros(len(comps.area) + 1, bool)
    table[ids + 1] = True
    table[0] = True
    return table


def _fit_box(crop: np.ndarray) -> np.ndarray:
    """Scale the ink so that its longer side is BOX pixels, anti-aliased, aspect kept."""
    return _scale(crop, BOX / max(crop.shape))


def _scale(crop: np.ndarray, scale: float) -> np.ndarray:
    """Ink levels (uint8) scaled by `scale` on both axes, anti-aliased."""
    h, w = crop.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # BOX averages pixel areas when shrinking (MNIST's anti-aliasing); bilinear avoids blocks when enlarging.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(crop).resize(size, resample))


def _centre(char: np.ndarray) -> np.ndarray:
    """Paste into a FIELD x FIELD black image with the centre of mass at (14, 14), never cutting ink."""
    h, w = char.shape
    weight = char.astype(np.float64)
    total = weight.sum()
    cy = weight.sum(1) @ np.arange(h) / total
    cx = weight.sum(0) @ np.arange(w) / total
    top = int(np.clip(np.floor(FIELD / 2 - cy + 0.5), 0, FIELD - h))
    left = int(np.clip(np.floor(FIELD / 2 - cx + 0.5), 0, FIELD - w))
    field = np.zeros((FIELD, FIELD), np.uint8)
    field[top:top + h, left:left + w] = char
    return field


def _group_columns(comps: _Components, order: np.ndarray) -> list[np.ndarray]:
    """Components (largest first) that overlap heavily in x join one character: broken strokes, dots."""
    groups: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for k in order.tolist():
        lk, rk = int(comps.left[k]), int(comps.right[k])
        overlaps = [min(r, rk) - max(l, lk) + 1 for l, r in spans]
        best = int(np.argmax(overlaps)) if overlaps else -1
        if best >= 0 and overlaps[best] >= MERGE_OVERLAP * min(rk - lk + 1, spans[best][1] - spans[best][0] + 1):
            groups[best].append(k)
            spans[best] = (min(spans[best][0], lk), max(spans[best][1], rk))
        else:
            groups.append([k])
            spans.append((lk, rk))
    return [np.array(g) for g in groups]


def _crop(comps: _Components, ids: np.ndarray, gray: np.ndarray, levels: np.ndarray) -> Image.Image:
    """The character's ink levels alone (neighbours reaching into its box are left out), with a black margin;
    `levels` is `_find_ink`'s table from grey level to ink level."""
    box = (slice(comps.top[ids].min(), comps.bottom[ids].max() + 1),
           slice(comps.left[ids].min(), comps.right[ids].max() + 1))
    char = levels[gray[box]] * _wanted(comps, ids)[comps.labels[box]]
    margin = max(2, max(char.shape) // 8)  # enough plain border for mnist_style to read the paper level
    return Image.fromarray(np.pad(char, margin))
