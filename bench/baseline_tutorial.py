"""The usual PyTorch tutorial recipe, as a plain script: the yardstick for bench/time_to_accuracy.py.

    python bench/baseline_tutorial.py [--data fashion-mnist|mnist|mnist-sample] [--epochs 10]

What it is (deliberately nothing clever): a torchvision MNIST-family data set
(`download=False`) read through a DataLoader with per-sample `transforms.ToTensor()` and
`Normalize`, shuffled, batch 64, Adam at 1e-3, the classic small CNN (conv 32 3x3, ReLU,
max-pool, dense 128, ReLU, dropout 0.5, dense 10), trained epoch by epoch in fp32 with the
test accuracy measured after each epoch.

What is timed: the clock starts before the data sets are built (torchvision reads the
unpacked IDX files from disk then) and runs through training; the per-epoch test
evaluation is excluded (the clock is paused around it). `import torch` and interpreter
start are not timed. Unpacking the IDX .gz files into torchvision's layout
(`prepare_root`) happens once, before, untimed: it is set-up, not part of the recipe.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# data name -> (torchvision class, folder with the IDX .gz files)
SOURCES = {
    "fashion-mnist": ("FashionMNIST", Path("/usr/share/datasets/fashion-mnist")),
    "mnist": ("MNIST", None),
    "mnist-sample": ("MNIST", ROOT / "hwr_dist" / "data" / "sample"),
}
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
MEAN_STD = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081), "mnist-sample": (0.1307, 0.3081)}


def prepare_root(data: str, root: Path, source: Path | None = None) -> Path:
    """Unpack the IDX files into `root/<Class>/raw/` as torchvision expects (plain, no .gz); returns root.

    `source` is a folder with the four files, plain or .gz (default: where `data` is kept here)."""
    tv_name, default = SOURCES[data]
    source = Path(source) if source is not None else default
    if source is None:
        raise SystemExit(f"{data}: pass the folder with its IDX files (--source)")
    raw = Path(root) / tv_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        dest = raw / name
        if dest.exists():
            continue
        plain, gz = source / name, source / (name + ".gz")
        if plain.exists():
            shutil.copyfile(plain, dest)
        elif gz.exists():
            dest.write_bytes(gzip.decompress(gz.read_bytes()))
        else:
            raise SystemExit(f"{plain} (or .gz) not found")
    return Path(root)


class Net(nn.Module):
    """conv 32 3x3 -> ReLU -> max-pool 2 -> dense 128 -> ReLU -> dropout -> dense 10."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.fc1 = nn.Linear(32 * 13 * 13, 128)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.dropout(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


@dataclass
class EpochResult:
    epoch: int
    train_time_s: float  # cumulative clock at the end of this epoch, test evaluation excluded
    test_accuracy: float
    images: int  # training images seen so far
    cpu_s: float = 0.0  # process CPU time at the end of this epoch (all threads), test evaluation excluded


def test_accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return correct / total


def train_baseline(data: str, root: Path, epochs: int = 10, target: float | None = None, seed: int = 0,
                   batch_size: int = 64, lr: float = 1e-3, workers: int = 0, dropout: float = 0.5,
                   log=None) -> list[EpochResult]:
    """Train the tutorial recipe; one EpochResult per epoch. With `target`, stop after the first epoch
    whose test accuracy reaches it (the yardstick only: nothing is selected on the test split)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    log = log or (lambda line: print(line, flush=True))
    torch.manual_seed(seed)
    tv_name, _ = SOURCES[data]
    mean, std = MEAN_STD[data]
    started, cpu_started = time.perf_counter(), time.process_time()
    paused = cpu_paused = 0.0
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    cls = getattr(datasets, tv_name)
    train_set = cls(str(root), train=True, download=False, transform=tf)
    test_set = cls(str(root), train=False, download=False, transform=tf)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
    test_loader = DataLoader(test_set, batch_size=1000, shuffle=False, num_workers=workers)
    model = Net(dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    results: list[EpochResult] = []
    images = 0
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            images += len(y)
        clock = time.perf_counter() - started - paused
        cpu = time.process_time() - cpu_started - cpu_paused
        pause_from, cpu_pause_from = time.perf_counter(), time.process_time()
        acc = test_accuracy(model, test_loader)
        paused += time.perf_counter() - pause_from
        cpu_paused += time.process_time() - cpu_pause_from
        results.append(EpochResult(epoch, clock, acc, images, cpu))
        log(f"baseline epoch {epoch}: test accuracy {acc:.2%} at {clock:.1f} s ({images / clock:.0f} images/s), "
            f"loss {loss.item():.4f}")
        if target is not None and acc >= target:
            break
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(SOURCES), default="fashion-mnist")
    p.add_argument("--source", type=Path, default=None, help="folder with the IDX files (default: known places)")
    p.add_argument("--root", type=Path, default=Path("/tmp/hwr-baseline-data"),
                   help="torchvision root, filled from --source on first use")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--target", type=float, default=None, help="stop once the test accuracy reaches this")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the tutorials' default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the per-epoch results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = prepare_root(a.data, a.root, a.source)
    results = train_baseline(a.data, root, a.epochs, a.target, workers=a.workers)
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
