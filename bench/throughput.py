"""Training images/s per model and batch size, and the data path alone against it.

    python bench/throughput.py [--models small_cnn,lenet5,cnn_bn] [--batches 64,256,1024] [--steps 30]
                               [--data mnist-sample] [section.key=value ...]

Both sides are the package's own code on a real run (`hwr_dist.train.setup.setup`): the step is
`train_step` (forward, loss, backward, optimizer step; no host sync), the data path is
`DeviceData.batch` (gather by index from the uint8 tensor, scale, batched augmentation,
normalise) for the same index tensors. On CUDA each timing ends with a synchronize.
The last columns: batches/s of the data path with augmentation on and off, and how many
times faster than the step consumes them it is (goal: >= 10x, so the data never waits).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, device) -> float:
    """Seconds per call of fn(i), over n calls after 3 warm-up calls."""
    for i in range(3):
        fn(i)
    sync(device)
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    sync(device)
    return (time.perf_counter() - t) / n


def measure(model: str, batch: int, steps: int, data: str, extra: list[str], out: Path) -> dict:
    from hwr_dist.recipes import load as load_config
    from hwr_dist.train.loop import train_step
    from hwr_dist.train.setup import setup

    cfg = load_config(ROOT / "configs" / "default.yaml",
                      [f"data.name={data}", f"model.name={model}", f"data.batch_size={batch}", "data.val_fraction=0",
                       f"train.out_dir={out}", f"train.name={model}-{batch}", *extra])
    run = setup(cfg, quiet=True)
    dev = run.acc.device
    n = len(run.data.train)
    g = torch.Generator(device=dev).manual_seed(0)
    idx = [torch.randint(0, n, (batch,), device=dev, generator=g) for _ in range(8)]
    step_s = timed(lambda i: train_step(run, [idx[i % 8]], want_norm=False), steps, dev)
    aug_on = cfg.data.augment
    aug_off = type(aug_on)(**{**vars(aug_on), "enabled": False})
    data_on = timed(lambda i: run.data.train.batch(idx[i % 8], run.gen, aug_on), steps * 4, dev)
    data_off = timed(lambda i: run.data.train.batch(idx[i % 8], run.gen, aug_off), steps * 4, dev)
    return {"model": model, "batch": batch, "images_per_s": batch / step_s, "steps_per_s": 1 / step_s,
            "data_aug_batches_per_s": 1 / data_on, "data_plain_batches_per_s": 1 / data_off,
            "ratio_aug": step_s / data_on, "ratio_plain": step_s / data_off}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,lenet5,cnn_bn")
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per case")
    p.add_argument("--data", default="mnist-sample")
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.width=16 train.device=cuda")
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}; overrides: {' '.join(a.overrides) or '-'}", flush=True)
    head = (f"{'model':10s} {'batch':>5s} {'train img/s':>11s} {'steps/s':>8s} | {'data aug b/s':>12s} "
            f"{'x step':>7s} | {'data plain b/s':>14s} {'x step':>7s}")
    print(head + "\n" + "-" * len(head), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            for batch in (int(b) for b in a.batches.split(",")):
                r = measure(model, batch, a.steps, a.data, a.overrides, Path(tmp))
                rows.append(r)
                print(f"{model:10s} {batch:5d} {r['images_per_s']:11.0f} {r['steps_per_s']:8.1f} | "
                      f"{r['data_aug_batches_per_s']:12.0f} {r['ratio_aug']:6.1f}x | "
                      f"{r['data_plain_batches_per_s']:14.0f} {r['ratio_plain']:6.1f}x", flush=True)
    worst = min(r["ratio_aug"] for r in rows)
    print(f"data path with augmentation is at least {worst:.1f}x faster than the training step consumes it "
          f"(goal >= 10x: {'met' if worst >= 10 else 'NOT met'}); load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
