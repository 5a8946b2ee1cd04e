"""A user's own line images with their texts, for sequence recognition (CTC).

Layout: `ROOT/labels.tsv` lists one image per line as `file<TAB>text`, the file relative to the
folder of the labels.tsv; it is split, seeded, into train, validation (`val_fraction`) and test
(TEST_FRACTION). Or `ROOT/train/labels.tsv` with optional `ROOT/val/labels.tsv` and
`ROOT/test/labels.tsv`: the given splits are used as they are, and a missing one is held out of
train the same way. Blank lines are skipped, and a text's surrounding spaces are dropped.

Every image is read like `hwr predict` reads one (`preprocess.open_image`: EXIF rotation,
transparency on white, clear errors for damaged files), made grey, turned ink-white-on-black when
its background (the median pixel) is light, scaled to `height` with its aspect ratio kept, and
levelled so that the background is 0, as the padding of a batch is, and the strongest ink 255.

The alphabet is the sorted set of the training texts' characters; a validation or test text with
any other character is refused, naming its file and line, since the model could never read it.
`load_textlines` returns plain `Lines` on the CPU; `Lines.to_device` makes the LineData a run
trains and evaluates on, normalised with the training lines' `pixel_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hwr_dist.data.loader import pixel_stats
from hwr_dist.data.preprocess import open_image
from hwr_dist.data.sequences import LineData
from hwr_dist.errors import HwrError

LABELS = "labels.tsv"
TEST_FRACTION = 0.1  # held out for testing when the folder has no test/ of its own
SPLITS = ("train", "val", "test")


@dataclass
class Lines:
    """One split of line images on the CPU."""

    images: list[torch.Tensor]  # uint8 [height, W_i], ink white on black
    texts: list[str]
    where: list[str]  # "ROOT/labels.tsv line 7", for messages

    def __len__(self) -> int:
        return len(self.texts)

    def pixel_stats(self) -> tuple[float, float]:
        """Mean and std of all pixels in [0, 1] units: the normalisation to train with."""
        return pixel_stats(torch.cat([im.flatten() for im in self.images]))

    def to_device(self, alphabet: list[str], mean: float, std: float, device) -> LineData:
        return LineData(self.images, self.texts, alphabet, mean, std, device, self.where)


@dataclass
class _Entry:
    file: Path
    text: str
    where: str


def load_textlines(root: Path, height: int, seed: int, val_fraction: float) -> tuple[Lines, Lines, Lines, list[str]]:
    """(train, val, test, alphabet) of the line images under `root`, each scaled to `height` pixels.
    The val split is empty when `val_fraction` is 0 and there is no val/ folder."""
    root = Path(root)
    if not root.is_dir():
        raise HwrError(f"line image folder {root} not found; set data.root to a folder with a {LABELS}")
    given = {name: root / name for name in SPLITS if (root / name).is_dir()}
    if given and "train" not in given:
        raise HwrError(f"{next(iter(given.values()))} exists but {root / 'train'} does not; add train/ with its own "
                       f"{LABELS}, or put one {LABELS} for all images in {root}")
    if given:
        splits = {name: _entries(folder / LABELS) for name, folder in given.items()}
        for name, fraction in (("test", TEST_FRACTION), ("val", val_fraction)):
            if name not in splits:
                splits["train"], splits[name] = _hold_out(splits["train"], fraction, seed, given["train"] / LABELS)
    else:
        tsv = root / LABELS
        train, test = _hold_out(_entries(tsv), TEST_FRACTION, seed, tsv)
        train, val = _hold_out(train, val_fraction, seed, tsv)
        splits = {"train": train, "val": val, "test": test}
    alphabet = sorted({c for e in splits["train"] for c in e.text})
    known = set(alphabet)
    for e in splits["val"] + splits["test"]:
        unknown = [c for c in e.text if c not in known]
        if unknown:
            raise HwrError(f"{e.where}: {unknown[0]!r} is not in the training labels' alphabet, so the model could "
                           "never read it; add training lines with it, or remove this line")
    train, val, test = (_read(splits[name], height) for name in SPLITS)
    return train, val, test, alphabet


def _entries(tsv: Path) -> list[_Entry]:
    """The labels.tsv's (file, text) lines, each checked; the files must exist and appear once."""
    if not tsv.is_file():
        raise HwrError(f"{tsv} not found; list the images there, one per line as file<TAB>text")
    try:
        text = tsv.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise HwrError(f"{tsv} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    entries, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{tsv} line {n}"
        if line.count("\t") != 1:
            raise HwrError(f"{where}: expected file<TAB>text (one tab), found {line.count(chr(9))} tabs in {line!r}")
        name, label = (part.strip() for part in line.split("\t"))
        if not name:
            raise HwrError(f"{where}: the file name is empty; write the image's path before the tab")
        if not label:
            raise HwrError(f"{where}: the text of {name!r} is empty; write what the image says, or remove the line")
        file = tsv.parent / name
        if not file.is_file():
            raise HwrError(f"{where}: image {file} not found; fix the file name or remove the line")
        key = file.resolve()
        if key in seen:
            raise HwrError(f"{where}: {name!r} is listed twice (also on line {seen[key]}); keep one of the lines")
        seen[key] = n
        entries.append(_Entry(file, label, where))
    if not entries:
        raise HwrError(f"{tsv} lists no images; add lines file<TAB>text")
    return entries


def _hold_out(entries: list[_Entry], fraction: float, seed: int, tsv: Path) -> tuple[list[_Entry], list[_Entry]]:
    """(kept, held out): a seeded `fraction` of the lines, at least one when the fraction is above 0."""
    if fraction == 0:
        return entries, []
    n_out = max(1, round(len(entries) * fraction))
    if n_out >= len(entries):
        raise HwrError(f"{tsv} lists {len(entries)} images, too few to hold out {fraction:.0%} and still train; "
                       f"add images, or give train/, val/ and test/ folders of their own")
    perm = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    out = set(perm[:n_out])
    return [e for i, e in enumerate(entries) if i not in out], [e for i, e in enumerate(entries) if i in out]


def _read(entries: list[_Entry], height: int) -> Lines:
    return Lines([_line_image(e, height) for e in entries], [e.text for e in entries], [e.where for e in entries])


def _line_image(entry: _Entry, height: int) -> torch.Tensor:
    """uint8 [height, W]: grey, ink white on a 0 background, the aspect ratio kept."""
    try:
        img = open_image(entry.file).convert("L")
    except HwrError as e:
        raise HwrError(f"{entry.where}: {e}") from None
    width = max(1, round(img.width * height / img.height))
    # BOX averages when shrinking (anti-aliased); bilinear avoids blocks when enlarging.
    img = img.resize((width, height), Image.Resampling.BOX if height < img.height else Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    background = float(np.median(a))
    ink = np.maximum(background - a, 0) if background > 127 else np.maximum(a - background, 0)
    top = ink.max()
    if top > 0:
        ink *= 255 / top
    return torch.from_numpy(ink.round().astype(np.uint8))
