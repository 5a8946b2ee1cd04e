"""Runs the real training loop, then records what a test needs to check it from outside.

Launched like `python -m hwr_dist.train`, under accelerate launch or torchrun, with the
same arguments. Each rank writes `probe-rank<R>.pt` into $HWR_PROBE_OUT: its world size,
its unwrapped parameters, and (with HWR_PROBE_COMM_HOOK=1) how many times DDP's gradient
all-reduce ran and how many optimizer steps were taken.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hwr_dist.recipes import load
from hwr_dist.train.loop import train
from hwr_dist.train.run import close, finish
from hwr_dist.train.setup import describe, setup


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--quiet"]
    cfg = load(args[0], args[1:])
    run = setup(cfg)  # not quiet: the start-up line is checked
    calls = [0]
    if os.environ.get("HWR_PROBE_COMM_HOOK") == "1":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        run.model.register_comm_hook(state=None, hook=counting_hook)
    describe(run)
    outcome = train(run)
    summary = finish(run, outcome, 0.0)
    out = Path(os.environ["HWR_PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "accelerate_processes": run.acc.num_processes,
        "params": {k: v.detach().cpu().clone() for k, v in run.acc.unwrap_model(run.model).state_dict().items()},
        "allreduce_calls": calls[0],
        "steps": run.state.step,
        "test_accuracy": summary["test_accuracy"],
    }, out / f"probe-rank{run.acc.process_index}.pt")
    close(run, "completed")


if __name__ == "__main__":
    main()
