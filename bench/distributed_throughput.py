"""Training images/s on 1 vs 2 processes on the same cores, and the cost of accumulation.

    python bench/distributed_throughput.py [--steps 200] [--model small_cnn]

Every case runs the real `hwr_dist.train` (under accelerate launch for 2 processes, gloo
on the CPU) for a fixed number of optimizer steps with the same global batch, and reads
the images/s the run logged itself (first log interval dropped as warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hwr_dist.train.launcher import TRAIN_MODULE, accelerate_argv

ROOT = Path(__file__).resolve().parent.parent


def measure(name: str, nproc: int, batch: int, accum: int, steps: int, model: str, out: Path) -> float:
    args = ["configs/default.yaml", f"model.name={model}", f"data.batch_size={batch}",
            f"train.grad_accum_steps={accum}", f"train.max_steps={steps}", "train.epochs=100",
            "train.log_every=20", f"train.out_dir={out}", f"train.name={name}", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), "ACCELERATE_USE_CPU": "1"}
    if nproc == 1:
        cmd = [sys.executable, *TRAIN_MODULE, *args]
    else:
        cmd = accelerate_argv(nproc, [*TRAIN_MODULE, *args])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [x["images_per_s"] for x in lines if "images_per_s" in x][1:]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--global-batch", type=int, default=128)
    a = p.parse_args()
    g = a.global_batch
    cases = [  # name, processes, per-process batch, accumulation
        ("1 process, accumulation 1", 1, g, 1),
        ("2 processes, accumulation 1", 2, g // 2, 1),
        ("2 processes, accumulation 4", 2, g // 8, 4),
        ("1 process, accumulation 4", 1, g // 4, 4),
    ]
    print(f"model {a.model}, global batch {g}, {a.steps} optimizer steps, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for i, (name, nproc, batch, accum) in enumerate(cases):
            results[name] = measure(f"case{i}", nproc, batch, accum, a.steps, a.model, Path(tmp))
            print(f"{name:32s} {results[name]:9.0f} images/s", flush=True)
    base = results["1 process, accumulation 1"]
    print(f"2 processes vs 1: x{results['2 processes, accumulation 1'] / base:.2f}")
    print(f"accumulation 4 vs 1, same global batch: 2 processes x{results['2 processes, accumulation 4'] / results['2 processes, accumulation 1']:.2f}, "
          f"1 process x{results['1 process, accumulation 4'] / base:.2f}")


if __name__ == "__main__":
    main()
