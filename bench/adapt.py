"""The shipped digit model on handwriting that is not MNIST: as is, adapted with K images per class, from scratch.

    python bench/adapt.py                       # the few-shot tables of seeds 0, 1, 2 and their mean
    python bench/adapt.py --cli K [K ...]       # also: wall time of a fresh `hwr train` per K (0 = the whole folder)
    python bench/adapt.py --flat --root DIR     # class folders only: the tool holds out its own 20% test split

The folder is scikit-learn's copy of the UCI 8x8 handwritten digits (1,797 images, shipped inside
the scikit-learn wheel: nothing is downloaded), each image written as a 32x32 PNG (bicubic,
dark ink on white, as a scan would be) into ROOT/train/<digit>/ and ROOT/test/<digit>/: a seeded
third of every class is the test split. These digits were written by other people, on forms,
and scanned at a tenth of MNIST's resolution: thick, blocky strokes the shipped model has never
seen.

The comparison is `hwr compare-finetuning configs/adapt_own.yaml data.root=ROOT train.seed=S`
(a table, JSON and PNG curve per seed), run in this process: the model as is, then
configs/adapt_own.yaml with data.limit_per_class=K (adapted) and the same recipe from random
weights (scratch), for every K and for the whole training split. The seed draws the K images,
the validation split and the training randomness; a few images per class make one seed's
figures noisy, hence the mean over seeds at the end. Its times count training, validation and
the test scoring; the folder is read once (the image folder loader keeps it in memory). `--cli`
times what a user waits for: a fresh `hwr train` process, from launch to exit, reading the
folder too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_SHARE = 3  # one image in three of every class is a test image


def write_uci_folder(root: Path, flat: bool, side: int = 32) -> Path:
    """sklearn's UCI digits as ROOT/train|test/<digit>/<index>.png (flat: ROOT/<digit>/<index>.png);
    kept if already written."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "9").is_dir() or (root / "test" / "9").is_dir():
        return root
    digits = load_digits()
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_test = 0 if flat else len(idx) // TEST_SHARE
        for split, ids in (("test", idx[:n_test]), ("train", idx[n_test:])):
            folder = root / str(c) if flat else root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                ink = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # 0..16 ink -> dark on white
                Image.fromarray(ink).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    return root


def cli_time(root: Path, out: Path, k: int, seed: int) -> tuple[float, str]:
    """(seconds from launch to exit, the summary's test accuracy line) of `hwr train configs/adapt_own.yaml`."""
    args = [str(Path(sys.executable).parent / "hwr"), "train", "configs/adapt_own.yaml", f"data.root={root}",
            f"train.out_dir={out}", f"train.name=cli-{k or 'all'}-s{seed}", f"train.seed={seed}", "--quiet"]
    if k:
        args.append(f"data.limit_per_class={k}")
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    line = next((ln for ln in proc.stdout.splitlines() if "test accuracy" in ln), "")
    return wall, " ".join(line.replace("│", " ").split())


def print_mean(reports: list[dict], seeds: list[int]) -> None:
    """Test accuracy per K, adapted and from scratch: the mean over seeds, and each seed's."""
    def cell(values: list[float]) -> str:
        return f"{100 * statistics.mean(values):.2f}% ({', '.join(f'{100 * v:.1f}' for v in values)})"

    as_is = [r["as_is_test_accuracy"] for r in reports]
    print(f"\nmean over seeds {', '.join(map(str, seeds))}; as is: {cell(as_is)}")
    print(f"{'K per class':>11} | {'adapted':<28} | {'from scratch':<28} | gain")
    for i, row in enumerate(reports[0]["rows"]):
        a = [r["rows"][i]["adapted"]["test_accuracy"] for r in reports]
        s = [r["rows"][i]["scratch"]["test_accuracy"] for r in reports]
        print(f"{row['per_class']!s:>11} | {cell(a):<28} | {cell(s):<28} | "
              f"{100 * (statistics.mean(a) - statistics.mean(s)):+.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/hwr-uci-digits"), help="where the image folder is written")
    p.add_argument("--out", type=Path, default=None, help="train.out_dir of the runs (default: a new temporary folder)")
    p.add_argument("--flat", action="store_true", help="write class folders only (the tool's own 20%% test split)")
    p.add_argument("--shots", default="1,5,10,20,50")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cli", type=int, nargs="*", default=[], help="K values to time as fresh `hwr train` runs")
    args = p.parse_args()

    from hwr_dist.commands.compare_finetuning import compare_finetuning, parse_shots
    from hwr_dist.recipes import load

    root = write_uci_folder(args.root, args.flat)
    out = args.out or Path(tempfile.mkdtemp(prefix="hwr-bench-adapt-"))
    print(f"folder {root}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    reports = []
    for seed in seeds:
        cfg = load(ROOT / "configs" / "adapt_own.yaml", [f"data.root={root}", f"train.out_dir={out}",
                                                         f"train.name=uci-s{seed}", f"train.seed={seed}"])
        reports.append(compare_finetuning(cfg, shots=parse_shots(args.shots)))
    print_mean(reports, seeds)
    for k in args.cli:
        wall, summary = cli_time(root, out, k, seeds[0])
        print(f"hwr train, K={k or 'all'}: {wall:.1f} s from launch to exit; {summary} "
              f"[load {os.getloadavg()[0]:.2f}]", flush=True)


if __name__ == "__main__":
    main()
