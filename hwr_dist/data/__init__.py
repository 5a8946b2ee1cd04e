"""Data set registry: name -> loader returning whole splits as uint8 tensors.

Every split is one uint8 tensor [N, 28, 28] (ink white on black) plus int64 labels, which
the training loop moves to its device once and indexes per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hwr_dist.data.splits import Bundle, Split, stratified_split, training_splits  # noqa: F401 (the package's face)
from hwr_dist.errors import HwrError

SAMPLE_DIR = Path(__file__).parent / "sample"
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}

DIGITS = [str(d) for d in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
KMNIST = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
BALANCED = list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt")


@dataclass
class Source:
    load: Callable[[Path, bool], Bundle]
    """(root, download) -> Bundle."""
    describe: str
    files: Callable[[Path], list[Path]]
    """Files the source needs under the root, for `hwr data list` (empty: always present)."""


def _idx_pair(folder: Path, prefix: str, split: str) -> tuple[Path, Path]:
    def pick(stem: str) -> Path:
        plain = folder / stem
        gz = folder / (stem + ".gz")
        return gz if gz.exists() and not plain.exists() else plain

    return pick(f"{prefix}{split}-images-idx3-ubyte"), pick(f"{prefix}{split}-labels-idx1-ubyte")


def _read_pair(images_path: Path, labels_path: Path, transpose: bool = False, label_offset: int = 0) -> Split:
    from hwr_dist.data.idx import read_idx

    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1).long() - label_offset
    if len(images) != len(labels):
        raise HwrError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
                       "the two files do not belong together")
    if transpose:  # EMNIST stores images transposed relative to MNIST
        images = images.transpose(1, 2).contiguous()
    return Split(images, labels)


def _check_labels(split: Split, classes: list[str], where: Path) -> Split:
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(classes)):
        raise HwrError(f"labels in {where} fall outside 0..{len(classes) - 1}; the files are not this data set")
    return split


def idx_source(name: str, tv_name: str, classes: list[str], describe: str, prefix: str = "", test_name: str = "t10k",
               transpose: bool = False, label_offset: int = 0, tv_kwargs: dict | None = None) -> Source:
    """An MNIST-layout data set: torchvision's `<root>/<tv_name>/raw/` or files straight in root."""

    def folders(root: Path) -> list[Path]:
        return [root / tv_name / "raw", root, *SYSTEM_DIRS.get(name, [])]

    def find(root: Path) -> Path | None:
        for folder in folders(root):
            if all(p.exists() for s in ("train", test_name) for p in _idx_pair(folder, prefix, s)):
                return folder
        return None

    def load(root: Path, download: bool) -> Bundle:
        folder = find(root)
        if folder is None and download:
            _download(tv_name, root, tv_kwargs or {})
            folder = find(root)
        if folder is None:
            wanted = ", ".join(p.name for s in ("train", test_name) for p in _idx_pair(root, prefix, s))
            raise HwrError(f"{name} not found: put {wanted} (or .gz) in {root / tv_name / 'raw'}, "
                           f"or set data.download=true on a machine with internet")
        train = _read_pair(*_idx_pair(folder, prefix, "train"), transpose, label_offset)
        test = _read_pair(*_idx_pair(folder, prefix, test_name), transpose, label_offset)
        return Bundle(classes, _check_labels(train, classes, folder), _check_labels(test, classes, folder))

    def files(root: Path) -> list[Path]:
        folder = find(root) or root / tv_name / "raw"
        return [p for s in ("train", test_name) for p in _idx_pair(folder, prefix, s)]

    return Source(load, describe, files)


def _download(tv_name: str, root: Path, kwargs: dict) -> None:
    import torchvision.datasets as tvd

    try:
        for train in (True, False):
            getattr(tvd, tv_name)(str(root), train=train, download=True, **kwargs)
    except Exception as e:  # torchvision raises a mix of URLError, RuntimeError, OSError
        raise HwrError(f"could not download {tv_name} into {root} ({type(e).__name__}: {e}); "
                       "without internet, copy the raw files there by hand") from None


def _load_sample(root: Path, download: bool) -> Bundle:
    train = _read_pair(*_idx_pair(SAMPLE_DIR, "", "train"))
    test = _read_pair(*_idx_pair(SAMPLE_DIR, "", "t10k"))
    return Bundle(DIGITS, train, test)


def _load_qmnist(root: Path, download: bool) -> Bundle:
    from hwr_dist.data.idx import read_idx

    folder = root / "QMNIST" / "raw"
    need = {s: (folder / f"qmnist-{s}-images-idx3-ubyte", folder / f"qmnist-{s}-labels-idx2-int") for s in ("train", "test")}
    missing = [p for pair in need.values() for p in pair if not p.exists() and not p.with_name(p.name + ".gz").exists()]
    if missing and download:
        _download("QMNIST", root, {"compat": True})
        missing = [p for p in missing if not p.exists()]
    if missing:
        raise HwrError(f"qmnist not found: put {', '.join(p.name for p in missing)} in {folder}, "
                       "or set data.download=true on a machine with internet")

    def read(s: str) -> Split:
        img, lab = (p if p.exists() else p.with_name(p.name + ".gz") for p in need[s])
        images, labels = read_idx(img, 3), read_idx(lab, 2)[:, 0].long()
        if len(images) != len(labels):
            raise HwrError(f"{img} and {lab} hold different numbers of items; the files do not belong together")
        return _check_labels(Split(images, labels), DIGITS, folder)

    return Bundle(DIGITS, read("train"), read("test"))


def _load_usps(root: Path, download: bool) -> Bundle:
    import torch.nn.functional as F
    import torchvision.datasets as tvd

    def read(train: bool) -> Split:
        try:
            ds = tvd.USPS(str(root), train=train, download=download)
        except RuntimeError:
            raise HwrError(f"usps not found: put usps.bz2 and usps.t.bz2 in {root}, "
                           "or set data.download=true on a machine with internet") from None
        except Exception as e:
            raise HwrError(f"could not read or download usps in {root} ({type(e).__name__}: {e})") from None
        small = torch.as_tensor(ds.data).float().unsqueeze(1)
        # USPS digits fill their 16x16 box; MNIST's fill 20x20 of 28x28.
        images = F.pad(F.interpolate(small, size=20, mode="bilinear", align_corners=False), (4, 4, 4, 4))
        return Split(images.squeeze(1).round().clamp(0, 255).to(torch.uint8), torch.as_tensor(ds.targets).long())

    return Bundle(DIGITS, read(True), read(False))


def _load_imagefolder(root: Path, download: bool) -> Bundle:
    from hwr_dist.data.imagefolder import load_imagefolder

    return load_imagefolder(root)


def _no_files(root: Path) -> list[Path]:
    return []


_IDX = {
    "mnist": idx_source("mnist", "MNIST", DIGITS, "MNIST handwritten digits, 60k + 10k"),
    "fashion-mnist": idx_source("fashion-mnist", "FashionMNIST", FASHION, "Zalando clothing images, 60k + 10k"),
    "kmnist": idx_source("kmnist", "KMNIST", KMNIST, "Kuzushiji (cursive Japanese) characters, 60k + 10k"),
    "emnist-digits": idx_source("emnist-digits", "EMNIST", DIGITS, "EMNIST digits, 240k + 40k", prefix="emnist-digits-",
                                test_name="test", transpose=True, tv_kwargs={"split": "digits"}),
    "emnist-letters": idx_source("emnist-letters", "EMNIST", LETTERS, "EMNIST letters a-z, 124.8k + 20.8k", prefix="emnist-letters-",
                                 test_name="test", transpose=True, label_offset=1, tv_kwargs={"split": "letters"}),
    "emnist-balanced": idx_source("emnist-balanced", "EMNIST", BALANCED, "EMNIST balanced, 47 classes, 112.8k + 18.8k",
                                  prefix="emnist-balanced-", test_name="test", transpose=True,
                                  tv_kwargs={"split": "balanced"}),
}

DATASETS: dict[str, Source] = {
    "mnist-sample": Source(_load_sample, "5,000 real MNIST digits shipped with the package (4k + 1k)", _no_files),
    **_IDX,
    "qmnist": Source(_load_qmnist, "QMNIST digits, 60k + 60k",
                     lambda r: [r / "QMNIST" / "raw" / f"qmnist-{s}-{k}" for s in ("train", "test")
                                for k in ("images-idx3-ubyte", "labels-idx2-int")]),
    "usps": Source(_load_usps, "USPS digits (16x16, scaled to MNIST's 20x20 box), 7.3k + 2k",
                   lambda r: [r / "usps.bz2", r / "usps.t.bz2"]),
    "imagefolder": Source(_load_imagefolder, "your own images: data.root/<class>/*.png (or train/ and test/ inside)",
                          _no_files),
}


# Data sets of rows of characters (the sequence task): built by hwr_dist.tasks.sequence.load_data.
SEQUENCES: dict[str, str] = {
    "digit-strings": "numbers composed from a digit data set's digits, touching ones too (data.strings.*)",
    "textlines": "your own line images: data.root/labels.tsv (file<TAB>text), optional train/ val/ test/",
}


def check_config(cfg) -> None:
    """The data section: the registry's names and each value's range (config.py knows no registry)."""
    from hwr_dist.config import check, one_of

    d, a = cfg.data, cfg.data.augment
    one_of("data.name", d.name, {**DATASETS, **SEQUENCES})
    if d.name == "digit-strings":
        from hwr_dist.data.digit_strings import check_settings

        one_of("data.strings.source", d.strings.source, DATASETS)
        check_settings(d.strings)
    check(0 <= d.val_fraction < 1, "data.val_fraction", "a number in [0, 1)", d.val_fraction)
    check(d.limit_per_class is None or (type(d.limit_per_class) is int and d.limit_per_class > 0),
          "data.limit_per_class", "a positive integer (training images per class) or null (all of them)",
          d.limit_per_class)
    check(d.batch_size > 0, "data.batch_size", "a positive integer", d.batch_size)
    check(d.eval_batch_size > 0, "data.eval_batch_size", "a positive integer", d.eval_batch_size)
    for key, most in (("rotation", 180), ("scale", 1), ("translate", 1), ("shear", 60), ("elastic_alpha", 64)):
        check(0 <= getattr(a, key) <= most, f"data.augment.{key}", f"a number in [0, {most}]", getattr(a, key))
    check(0 < a.elastic_sigma <= 64, "data.augment.elastic_sigma", "a number in (0, 64]", a.elastic_sigma)
    check(0 <= a.erasing <= 1, "data.augment.erasing", "a probability in [0, 1]", a.erasing)
    check(a.scale < 1, "data.augment.scale", "a number below 1", a.scale)


def load_dataset(name: str, root: str | Path, download: bool = False) -> Bundle:
    if name not in DATASETS:
        raise HwrError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    return DATASETS[name].load(Path(root), download)

