"""Wall time to a target test accuracy: the tutorial recipe vs `hwr train CONFIG`, in one invocation.

    python bench/time_to_accuracy.py --data fashion-mnist --config configs/fast_fashion.yaml --target 0.91
    python bench/time_to_accuracy.py --data mnist-sample --config configs/fast_sample.yaml --target 0.98
    python bench/time_to_accuracy.py --whole-run --repeats 3 --data fashion-mnist --config configs/fast_fashion.yaml --target 0.91
    python bench/time_to_accuracy.py --whole-run --data fashion-mnist --config configs/fast_fashion.yaml --target 0.93 --baseline-epochs 15 model.width=32 train.epochs=10 train.max_steps=0 optim.weight_decay=0.0005 optim.beta2=0.999 schedule.warmup_fraction=0.2

--whole-run is the comparison a user makes: ours is the whole `hwr train CONFIG` process, from
launch to exit (interpreter start, imports, data loading, validation, checkpoints, the final test
and its plots), with its final test accuracy; the baseline's figure is still the training time to
the target only. Run it on an idle machine: both sides back to back, the load printed with each.

The rule, the same for both: test accuracy is measured after every epoch, and the time to
target is the clock at the end of the first epoch whose test accuracy reaches the target.
The test split never steers training: ours trains its recipe to the end (keeping every
epoch's checkpoint, `checkpoint.keep_epochs=true`), and the epoch checkpoints are scored on
the test split afterwards; the baseline's per-epoch test evaluation happens with its clock
paused (it stops after reaching the target: later epochs could not change its number).

What is timed, for both: from just before the data is read from disk to the end of that
epoch. Ours runs in this process through `hwr_dist.train.run.run_training`, the function
`hwr train` calls (or, with --subprocess, as the real `hwr train` command, counted from the
process launch, i.e. with interpreter start and `import torch` too); its clock includes
reading and unpacking the IDX .gz files, building the model (and compiling it), every
training step, the per-epoch validation pass and checkpoint writes, and is read from the
epoch-end rows of its metrics.jsonl. The baseline's includes torchvision reading the
unpacked files, its DataLoader and training. Neither counts `import torch`.
images/s = training images processed up to that epoch / that clock (so set-up counts too).

Because the machine may be shared, each line also gives the process CPU time (all threads)
to the same point, which other people's load disturbs far less than the wall clock: for ours
it is read at the end of each epoch by the loop's epoch-end hook (in-process
only), for the baseline by its own clock, both without the test evaluations. --threads sets
torch's thread count for both (on a loaded 2-core machine 1 thread is much faster than 2:
two OpenMP threads wait on each other whenever one is descheduled).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_tutorial import prepare_root, train_baseline

ROOT = Path(__file__).resolve().parent.parent


def epoch_end_times(run_dir: Path) -> dict[int, float]:
    """epoch -> wall-clock time (time.time()) of its end row in metrics.jsonl (validation row or plain)."""
    ends = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "epoch" in row and "loss" not in row and "test_accuracy" not in row:
            ends[int(row["epoch"])] = float(row["time"])
    return ends


def score_epochs(run_dir: Path, data_name: str, data_root: str) -> dict[int, float]:
    """Test accuracy of every epoch-NNN.pt of a run, scored afterwards."""
    from hwr_dist.data import load_dataset
    from hwr_dist.data.loader import DeviceData
    from hwr_dist.evaluate import evaluate
    from hwr_dist.checkpoint import load_trained

    bundle = load_dataset(data_name, data_root)
    scores = {}
    for path in sorted((run_dir / "checkpoints").glob("epoch-*.pt")):
        trained = load_trained(path)
        test = DeviceData.from_split(bundle.test, "cpu", trained.mean, trained.std)
        scores[int(path.stem.split("-")[1])] = evaluate(trained.model, test, len(trained.classes), 1000).accuracy
    return scores


def run_ours(config: Path, overrides: list[str], out_dir: Path, name: str, subprocess_mode: bool,
             verbose: bool = False) -> dict:
    overrides = [*overrides, f"train.out_dir={out_dir}", f"train.name={name}", "checkpoint.keep_epochs=true"]
    cpu_at: dict[int, float] = {}
    started, cpu_started = time.time(), time.process_time()
    if subprocess_mode:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([str(Path(sys.executable).parent / "hwr"), "train", str(config), *overrides, "--quiet"],
                              cwd=ROOT, env=env, capture_output=not verbose, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"hwr train failed:\n{(proc.stderr or '')[-3000:]}")
    else:
        from hwr_dist.recipes import load
        from hwr_dist.train.run import run_training
        from hwr_dist.train.setup import Hooks

        def record_cpu(run, epoch):  # CPU clock at each epoch's end, validation and checkpoint included
            cpu_at[epoch + 1] = time.process_time() - cpu_started

        cfg = load(config, overrides)
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink, (contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())):
            run_training(cfg, quiet=True, hooks=Hooks(epoch_end=[record_cpu]))
    run_dir = out_dir / name
    from hwr_dist.config import config_from_dict

    cfg = config_from_dict(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    ends = epoch_end_times(run_dir)
    scores = score_epochs(run_dir, cfg.data.name, cfg.data.root)
    train_images = json.loads((run_dir / "tracking.json").read_text())["system"]["train_images"]
    rates = [json.loads(x)["images_per_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "images_per_s" in x]
    curve = [{"epoch": e, "clock_s": ends[e] - started, "test_accuracy": scores[e], "images": e * train_images,
              "cpu_s": cpu_at.get(e)} for e in sorted(scores) if e in ends]
    steady = sorted(rates[1:] or rates)[len(rates[1:] or rates) // 2] if rates else float("nan")
    return {"curve": curve, "steady_images_per_s": steady}


def run_baseline(data: str, root: Path, epochs: int, target: float) -> dict:
    results = train_baseline(data, root, epochs, target, log=lambda line: print("  " + line, flush=True))
    curve = [{"epoch": r.epoch, "clock_s": r.train_time_s, "test_accuracy": r.test_accuracy, "images": r.images,
              "cpu_s": r.cpu_s} for r in results]
    return {"curve": curve}


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["test_accuracy"] >= target), None)


def describe(name: str, res: dict, target: float) -> str:
    hit = first_reaching(res["curve"], target)
    best = max((c["test_accuracy"] for c in res["curve"]), default=float("nan"))
    if hit is None:
        return f"{name:9s} did not reach {target:.1%} (best {best:.2%} in {len(res['curve'])} epochs)"
    cpu = f", {hit['cpu_s']:.1f} CPU-s" if hit.get("cpu_s") is not None else ""
    return (f"{name:9s} {hit['clock_s']:7.1f} s to {target:.1%} (epoch {hit['epoch']}, test {hit['test_accuracy']:.2%}"
            f"{cpu}), {hit['images'] / hit['clock_s']:7.0f} images/s end to end")


def whole_run(config: Path, overrides: list[str], out_dir: Path, name: str, threads: int) -> dict:
    """`hwr train CONFIG` as a user runs it, timed from launch to exit; its final test accuracy."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "hwr"), "train", str(config), *overrides,
                           f"train.out_dir={out_dir}", f"train.name={name}", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"hwr train failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out_dir / name / "eval_test" / "metrics.json").read_text())
    return {"wall_s": wall, "test_accuracy": metrics["accuracy"]}


def main_whole_run(a, root: Path, overrides: list[str]) -> None:
    """Baseline: time to target, its training only. Ours: the whole process. Back to back, repeated."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            load = os.getloadavg()[0]
            sides = {
                "base": lambda: first_reaching(run_baseline(a.data, root, a.baseline_epochs, a.target)["curve"],
                                               a.target),
                "ours": lambda: whole_run(a.config, overrides, Path(tmp), f"ours{r}", a.threads)}
            # Alternate which goes first: a machine that slows down under sustained load (shared
            # or thermally limited cores) must not always penalise the same side.
            order = ["base", "ours"] if r % 2 == 0 else ["ours", "base"]
            got = {side: sides[side]() for side in order}
            base, ours = got["base"], got["ours"]
            row = {"repeat": r + 1, "load_before": load, "load_after": os.getloadavg()[0], "ours": ours,
                   "baseline": base, "ratio": base["clock_s"] / ours["wall_s"] if base else None}
            rows.append(row)
            b = f"{base['clock_s']:.1f} s (epoch {base['epoch']}, {base['test_accuracy']:.2%})" if base else \
                f"not reached in {a.baseline_epochs} epochs"
            ratio = f"{row['ratio']:.1f}x" if base else "n/a"
            ok = "" if ours["test_accuracy"] >= a.target else f" (below the {a.target:.1%} target)"
            print(f"repeat {r + 1}: baseline {b}; ours {ours['wall_s']:.1f} s whole run, test "
                  f"{ours['test_accuracy']:.2%}{ok}; ratio {ratio}; load {load:.2f} -> {row['load_after']:.2f}",
                  flush=True)
    ratios = sorted(r["ratio"] for r in rows if r["ratio"] is not None)
    if ratios:
        print(f"median ratio {ratios[len(ratios) // 2]:.1f}x over {len(ratios)} repeat(s)")
    if a.json:
        a.json.write_text(json.dumps({"data": a.data, "target": a.target, "config": str(a.config),
                                      "overrides": a.overrides, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist-sample or mnist")
    p.add_argument("--config", type=Path, required=True, help="our recipe, e.g. configs/fast_fashion.yaml")
    p.add_argument("--target", type=float, required=True, help="test accuracy, e.g. 0.91")
    p.add_argument("--baseline-epochs", type=int, default=15, help="give up on the baseline after this many")
    p.add_argument("--baseline-root", type=Path, default=Path(tempfile.gettempdir()) / "hwr-baseline-data")
    p.add_argument("--source", type=Path, default=None, help="folder of the IDX files for the baseline (mnist)")
    p.add_argument("--repeats", type=int, default=1, help="pairs to run, alternating which goes first")
    p.add_argument("--subprocess", action="store_true", help="run ours as the `hwr train` command, timed from launch")
    p.add_argument("--whole-run", action="store_true",
                   help="ours = the whole `hwr train` process from launch to exit, its final test accuracy; the "
                        "baseline's time to target counts its training only")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    p.add_argument("--verbose", action="store_true", help="show our run's own output")
    p.add_argument("--json", type=Path, default=None, help="write every curve here")
    p.add_argument("overrides", nargs="*", help="overrides for our config, section.key=value")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = prepare_root(a.data, a.baseline_root, a.source)  # untimed set-up
    overrides = [f"data.name={a.data}", *a.overrides]
    print(f"{a.data}: target {a.target:.1%}; ours = {a.config} {' '.join(a.overrides)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    if a.whole_run:
        main_whole_run(a, root, overrides)
        return
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = ["ours", "baseline"] if r % 2 == 0 else ["baseline", "ours"]
            pair = {}
            for who in order:
                if who == "baseline" and a.skip_baseline:
                    continue
                load = os.getloadavg()[0]
                if who == "ours":
                    pair[who] = run_ours(a.config, overrides, Path(tmp), f"ours{r}", a.subprocess, a.verbose)
                else:
                    pair[who] = run_baseline(a.data, root, a.baseline_epochs, a.target)
                pair[who]["load_before"] = load
                print(describe(who, pair[who], a.target) + f" [load {load:.2f} -> {os.getloadavg()[0]:.2f}]",
                      flush=True)
            if "ours" in pair:
                print("  ours, per epoch: " + ", ".join(f"{c['epoch']}: {c['test_accuracy']:.2%} @ {c['clock_s']:.1f} s"
                                                        for c in pair["ours"]["curve"])
                      + f"; steady {pair['ours']['steady_images_per_s']:.0f} images/s while training", flush=True)
            hits = {k: first_reaching(v["curve"], a.target) for k, v in pair.items()}
            if hits.get("ours") and hits.get("baseline"):
                ratio = hits["baseline"]["clock_s"] / hits["ours"]["clock_s"]
                pair["ratio"] = ratio
                cpu = ""
                if hits["ours"].get("cpu_s") and hits["baseline"].get("cpu_s"):
                    pair["cpu_ratio"] = hits["baseline"]["cpu_s"] / hits["ours"]["cpu_s"]
                    cpu = f" ({pair['cpu_ratio']:.1f}x less CPU time)"
                print(f"pair {r + 1}: ours reaches {a.target:.1%} {ratio:.1f}x sooner than the baseline{cpu}", flush=True)
            elif hits.get("ours") and "baseline" in pair:
                last = pair["baseline"]["curve"][-1]
                print(f"pair {r + 1}: the baseline had not reached {a.target:.1%} after {last['epoch']} epochs "
                      f"({last['clock_s']:.1f} s): ours is more than {last['clock_s'] / hits['ours']['clock_s']:.1f}x "
                      "sooner", flush=True)
            pairs.append(pair)
    print(f"load at the end {os.getloadavg()[0]:.2f} (1-minute average)")
    if a.json:
        a.json.write_text(json.dumps({"data": a.data, "target": a.target, "config": str(a.config),
                                      "overrides": a.overrides, "pairs": pairs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
