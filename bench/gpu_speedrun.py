"""Training wall time to 99% / 99.5% test accuracy on full MNIST, on one CUDA GPU.

    python bench/gpu_speedrun.py --root data                        # configs/fast_mnist_gpu.yaml, 99%
    python bench/gpu_speedrun.py --root data --config configs/fast_mnist_gpu_995.yaml --target 0.995
    python bench/gpu_speedrun.py --runs 3 --sync-debug ...           # seeds 0..2; list host syncs
    python bench/gpu_speedrun.py --smoke                             # CPU, built-in sample, tiny: code path only

It drives the package's own loop (`hwr_dist.train.setup.setup` and `hwr_dist.train.loop.train`, timed
through the loop's hooks), so what is timed is
what `hwr train` does: every optimizer step, the log points (the loop's only host syncs),
and the per-epoch checkpoint write. Set-up is not timed: reading the data and putting it on
the GPU, building the model, and a warm-up of a few steps and one evaluation pass that
triggers torch.compile, cuDNN's algorithm search and the allocator (the model, optimizer
and RNG states are put back afterwards, so the timed run starts from the same weights).

The clock: torch.cuda.synchronize() and perf_counter() just before `train` starts, and at the
end of each epoch (in a wrapper of `end_of_epoch`); the test split is then scored with the
clock paused. Time to target = the clock at the end of the first epoch whose test accuracy
reaches it; the recipe always trains to its end (the test split never stops or selects).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def speedrun_overrides(device_type: str, smoke: bool, compile_on_cpu: bool = False) -> list[str]:
    """Overrides on top of the recipe for where it runs: the GPU path as configured on CUDA; on a
    CPU only as a smoke test (built-in sample, tiny model, bf16 kept so its code path runs)."""
    if device_type == "cuda" and not smoke:
        return []
    if not smoke:
        raise SystemExit("no CUDA GPU visible: this benchmark needs one (use --smoke for a CPU correctness run)")
    return ["data.name=mnist-sample", "train.device=cpu", "model.width=8", "train.epochs=2",
            "data.batch_size=120", "data.eval_batch_size=500", "train.log_every=10",
            f"model.compile={'true' if compile_on_cpu else 'false'}"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(run, steps: int = 3) -> float:
    """A few real steps and one evaluation pass (compiles both modes), then every state put back."""
    from hwr_dist.evaluate import evaluate
    from hwr_dist.train.loop import eval_model, train_step

    t = time.perf_counter()
    model_state = copy.deepcopy(run.bare.state_dict())
    optim_state = copy.deepcopy(run.optimizer.state_dict())
    ema_state = copy.deepcopy(run.ema.state_dict()) if run.ema is not None else None
    gen_state = run.gen.get_state()
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    windows = list(run.batches.batches(0))[:steps]
    for w in windows:
        train_step(run, [w], want_norm=True)
    evaluate(eval_model(run), run.data.test, len(run.data.classes), run.cfg.data.eval_batch_size, run.acc)
    run.bare.load_state_dict(model_state)
    run.optimizer.load_state_dict(optim_state)
    run.optimizer.zero_grad(set_to_none=True)
    if ema_state is not None:
        run.ema.load_state_dict(ema_state)
    run.gen.set_state(gen_state)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    sync(run.acc.device)
    return time.perf_counter() - t


def one_run(cfg, sync_debug: bool) -> dict:
    from hwr_dist.evaluate import evaluate
    from hwr_dist.train.loop import eval_model, train
    from hwr_dist.train.setup import Hooks, setup

    t0 = time.perf_counter()
    run = setup(cfg, quiet=True)
    dev = run.acc.device
    sync(dev)
    setup_s = time.perf_counter() - t0
    warm_s = warm_up(run)
    curve: list[dict] = []
    clock = {"total": 0.0, "resumed": 0.0, "ckpt": 0.0}

    def score_epoch(run_, epoch):  # after the epoch's validation and checkpoint; scoring is not timed
        sync(dev)
        clock["total"] += time.perf_counter() - clock["resumed"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if sync_debug:
                torch.cuda.set_sync_debug_mode(0)
            acc = evaluate(eval_model(run_), run_.data.test, len(run_.data.classes), cfg.data.eval_batch_size,
                           run_.acc).accuracy
            if sync_debug:
                torch.cuda.set_sync_debug_mode(1)
        curve.append({"epoch": epoch + 1, "train_s": clock["total"], "test_accuracy": acc})
        sync(dev)
        clock["resumed"] = time.perf_counter()

    def count_checkpoint(run_, seconds):  # timed as part of the loop, and reported on its own
        clock["ckpt"] += seconds

    run.hooks = Hooks(epoch_end=[score_epoch], checkpoint_saved=[count_checkpoint])
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if sync_debug:
                torch.cuda.set_sync_debug_mode(1)  # warn on every synchronising call
            sync(dev)
            clock["resumed"] = time.perf_counter()
            train(run)
            sync(dev)
            clock["total"] += time.perf_counter() - clock["resumed"]
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        run.tracker.finish("completed")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"seed": cfg.train.seed, "setup_s": setup_s, "warmup_s": warm_s, "train_s": clock["total"],
            "checkpoint_s": clock["ckpt"], "steps": run.state.step, "curve": curve,
            "images_per_s": run.state.step * cfg.data.batch_size / max(clock["total"], 1e-9),
            "host_syncs": len(syncs), "sync_examples": sorted(set(syncs))[:5]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "fast_mnist_gpu.yaml")
    p.add_argument("--root", default=None, help="data.root holding MNIST/raw/ (default: the config's)")
    p.add_argument("--target", type=float, nargs="+", default=[0.99, 0.995])
    p.add_argument("--runs", type=int, default=1, help="runs with seeds 0, 1, ...")
    p.add_argument("--smoke", action="store_true", help="CPU correctness run on the built-in sample, tiny settings")
    p.add_argument("--compile-on-cpu", action="store_true", help="with --smoke: keep torch.compile on")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: count synchronising calls in the timed region (torch.cuda.set_sync_debug_mode)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    a = p.parse_args(argv)
    from hwr_dist.recipes import load as load_config

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    extra = speedrun_overrides(device_type, a.smoke, a.compile_on_cpu)
    if a.root:
        extra.insert(0, f"data.root={a.root}")
    name = torch.cuda.get_device_name() if device_type == "cuda" and not a.smoke else "cpu (smoke test)"
    print(f"{a.config.name} on {name}; torch {torch.__version__}; load {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(a.runs):
            cfg = load_config(a.config, [*extra, *a.overrides, f"train.seed={seed}", f"train.out_dir={tmp}",
                                         f"train.name=seed{seed}", "train.resume="])
            r = one_run(cfg, a.sync_debug and device_type == "cuda")
            results.append(r)
            hits = {t: next((c for c in r["curve"] if c["test_accuracy"] >= t), None) for t in a.target}
            final = r["curve"][-1]
            print(f"seed {seed}: {r['steps']} steps, {r['train_s']:.3f} s training ({r['images_per_s']:.0f} images/s; "
                  f"checkpoint writes {r['checkpoint_s']:.3f} s of it), final test {final['test_accuracy']:.2%}; "
                  f"set-up {r['setup_s']:.1f} s, warm-up/compile {r['warmup_s']:.1f} s (untimed)", flush=True)
            print("  per epoch: " + ", ".join(f"{c['epoch']}: {c['test_accuracy']:.2%} @ {c['train_s']:.3f} s"
                                              for c in r["curve"]), flush=True)
            for t, hit in hits.items():
                print(f"  {t:.1%}: " + (f"{hit['train_s']:.3f} s (epoch {hit['epoch']})" if hit else "not reached"),
                      flush=True)
            if a.sync_debug and device_type == "cuda":
                print(f"  host syncs in the timed region: {r['host_syncs']} for {r['steps']} steps; "
                      f"e.g. {r['sync_examples']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"config": str(a.config), "device": name, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
