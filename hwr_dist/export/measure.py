"""Size, CPU latency and accuracy of exported files, and the table that compares them."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hwr_dist.errors import HwrError
from hwr_dist.export.contract import SIDE


@dataclass
class Measure:
    name: str
    bytes: int
    latency_1_ms: float
    latency_256_ms: float
    accuracy: float | None  # on the test split, None when the data set is not here
    count: int = 0


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of anything with `probabilities(uint8 images)`: a checkpoint or an exported file."""
    correct = 0
    for i in range(0, len(labels), batch):
        correct += int((model.probabilities(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
    return correct / max(1, len(labels))


def measure(exported, name: str, test=None, threads: int = 1, repeats_1: int = 50, repeats_256: int = 5) -> Measure:
    """Size of the file, median CPU latency at batch 1 and 256, and accuracy on `test` (a Split)."""
    x1 = torch.randn(1, 1, SIDE, SIDE)
    x256 = torch.randn(256, 1, SIDE, SIDE)
    with torch_threads(threads):
        ms1 = median_ms(lambda: exported.run(x1), repeats_1)
        ms256 = median_ms(lambda: exported.run(x256), repeats_256)
        acc = accuracy(exported, test.images, test.labels) if test is not None else None
    return Measure(name, exported.path.stat().st_size, ms1, ms256, acc, len(test) if test is not None else 0)


def load_split(trained, which: str = "test"):
    """The checkpoint's data set split ("train" or "test"), or None and the reason when it is not here."""
    from hwr_dist.data import load_dataset

    try:
        bundle = load_dataset(trained.cfg.data.name, trained.cfg.data.root, download=False)
    except HwrError as e:
        return None, str(e)
    if bundle.classes != trained.classes:
        return None, f"data set {trained.cfg.data.name} has other classes than the checkpoint"
    return getattr(bundle, which), ""


def print_report(rows: list[Measure], title: str, note: str = "") -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("model", "left"), ("file bytes", "right"), ("batch 1 ms", "right"),
                      ("batch 256 ms", "right"), ("test accuracy", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r.name, f"{r.bytes:,}", f"{r.latency_1_ms:.3f}", f"{r.latency_256_ms:.2f}",
                      "n/a" if r.accuracy is None else f"{100 * r.accuracy:.2f}%")
    if len(rows) == 2:
        a, b = rows
        acc = "" if a.accuracy is None or b.accuracy is None else f"{100 * (b.accuracy - a.accuracy):+.2f} points"
        table.add_row("change", f"x{b.bytes / a.bytes:.2f}", f"x{b.latency_1_ms / a.latency_1_ms:.2f}",
                      f"x{b.latency_256_ms / a.latency_256_ms:.2f}", acc)
    console = Console(file=sys.stdout, width=120)
    console.print(table)
    if note:
        console.print(note)
