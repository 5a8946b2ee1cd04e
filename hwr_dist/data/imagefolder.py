"""A user's own handwriting: <root>/<class>/<image>, or <root>/train/<class>/ and <root>/test/<class>/."""

from __future__ import annotations

from pathlib import Path

import torch

from hwr_dist.data.splits import Bundle, Split, stratified_split
from hwr_dist.data.preprocess import mnist_style, open_image
from hwr_dist.errors import HwrError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
HELD_OUT = 0.2  # test fraction per class when the folder has no train/ and test/ of its own


_last: tuple[tuple, Bundle] | None = None  # (the folder's file list with sizes and times, its bundle)


def load_imagefolder(root: Path) -> Bundle:
    """Every image through `open_image` and `mnist_style`; classes are the sorted sub-folder names.

    The last folder read is kept in memory while its files are unchanged: preprocessing costs about
    10 ms an image, and a comparison (`hwr compare-finetuning`) trains many runs on one folder."""
    global _last
    key = _signature(Path(root))
    if _last is None or _last[0] != key:
        _last = key, _load(Path(root))
    return _last[1]


def _signature(root: Path) -> tuple:
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return str(root.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _load(root: Path) -> Bundle:
    if not root.is_dir():
        raise HwrError(f"image folder {root} not found; set data.root to a folder with one sub-folder of images per class")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        have, lack = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        raise HwrError(f"{have} exists but {lack} does not; add it with the same class folders, "
                       f"or put the class folders straight in {root}")
    if train_dir.is_dir():
        classes = _classes(train_dir)
        _check_same(classes, _classes(test_dir), train_dir, test_dir)
        return Bundle(classes, _read(train_dir, classes), _read(test_dir, classes))
    classes = _classes(root)
    train, test = stratified_split(_read(root, classes), HELD_OUT, seed=0)
    return Bundle(classes, train, test)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")  # .DS_Store, macOS "._x.png" companions, .ipynb_checkpoints


def _classes(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p))
    if not names:
        raise HwrError(f"no class folders in {folder}; put each class's images in its own sub-folder, "
                       f"e.g. {folder / '0'}/*.png")
    return names


def _check_same(train: list[str], test: list[str], train_dir: Path, test_dir: Path) -> None:
    if train != test:
        only_train = ", ".join(sorted(set(train) - set(test))) or "none"
        only_test = ", ".join(sorted(set(test) - set(train))) or "none"
        raise HwrError(f"class folders differ between {train_dir} and {test_dir} (only in train: {only_train}; "
                       f"only in test: {only_test}); give both the same class folders")


def _images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise HwrError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                       "add some or remove the folder")
    return files


def _read(folder: Path, classes: list[str]) -> Split:
    images, labels = [], []
    for label, name in enumerate(classes):
        files = _images(folder / name)
        images += [mnist_style(open_image(p), name=str(p)) for p in files]
        labels += [label] * len(files)
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long))
