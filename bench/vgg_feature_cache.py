"""Head-only VGG fine-tuning: one training epoch with the feature cache vs without.

On the built-in mnist-sample (3,600 training images after the validation hold-out), frozen
backbone, no augmentation. Without the cache every step runs the frozen backbone forward; with
it the backbone runs once (the cache build, timed separately) and each epoch trains the head
on the stored features. Prints the times and the speed-up ratio.

    OMP_NUM_THREADS=1 python bench/vgg_feature_cache.py [--variant vgg11] [--input-size 32] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def epoch_seconds(run, steps: int | None = None) -> float:
    from hwr_dist.train.loop import train_step

    windows = list(run.batches.batches(0))[:steps]
    started = time.perf_counter()
    for w in windows:
        train_step(run, [w], want_norm=False)
    if run.acc.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="vgg11")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()

    from hwr_dist.recipes import load as load_config
    from hwr_dist.train.feature_cache import build_feature_cache
    from hwr_dist.train.setup import setup

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            "data.name=mnist-sample", "data.augment.enabled=false", f"data.batch_size={args.batch_size}",
            "model.name=vgg", f"model.variant={args.variant}", f"model.input_size={args.input_size}",
            "model.freeze=features", "model.cache_features=off", f"train.device={args.device}",
            f"train.out_dir={out}", "train.name=bench"])
        run = setup(cfg, quiet=True)
        epoch_seconds(run, steps=2)  # warm-up
        live = epoch_seconds(run)
        run.cfg.model.cache_features = "on"
        started = time.perf_counter()
        run.features = build_feature_cache(run)
        build = time.perf_counter() - started
        epoch_seconds(run, steps=2)
        cached = epoch_seconds(run)
    result = {"variant": args.variant, "input_size": args.input_size, "device": str(run.acc.device),
              "threads": torch.get_num_threads(), "train_images": len(run.data.train),
              "steps_per_epoch": len(run.batches), "epoch_s_without_cache": live, "cache_build_s": build,
              "epoch_s_with_cache": cached, "ratio": live / cached}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.variant} @ {args.input_size}px, {result['train_images']} images, {result['steps_per_epoch']} steps "
          f"per epoch, {result['device']} x {result['threads']} threads")
    print(f"  epoch without cache : {live:8.2f} s")
    print(f"  cache build (once)  : {build:8.2f} s")
    print(f"  epoch with cache    : {cached:8.3f} s")
    print(f"  ratio               : {live / cached:8.1f}x faster per epoch")


if __name__ == "__main__":
    main()
