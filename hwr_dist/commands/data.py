"""`hwr data list` and `hwr data verify`."""

from __future__ import annotations

from pathlib import Path


def list_datasets(root: Path) -> None:
    """Data sets the tool knows, their sizes, and whether their files are here."""
    from rich.console import Console
    from rich.table import Table

    from hwr_dist.data import DATASETS

    table = Table(title=f"data sets (root: {root})", title_justify="left")
    for col in ("name", "what", "here"):
        table.add_column(col)
    for name, src in DATASETS.items():
        files = src.files(root)
        here = "built in" if name == "mnist-sample" else (
            "yes" if files and all(p.exists() for p in files) else ("-" if not files else "no"))
        table.add_row(name, src.describe, here)
    Console().print(table)


def verify(name: str, root: Path) -> None:
    """Read every file of a data set and check its format, counts and labels."""
    from hwr_dist.data import load_dataset

    b = load_dataset(name, root)
    for split_name, split in (("train", b.train), ("test", b.test)):
        counts = split.labels.bincount(minlength=len(b.classes)).tolist()
        print(f"{name} {split_name}: {len(split)} images {tuple(split.images.shape[1:])}, "
              f"{len(b.classes)} classes, per class min {min(counts)} max {max(counts)}")
    print(f"{name}: ok")
