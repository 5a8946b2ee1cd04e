"""The process group: Accelerate set-up, the checks that catch a launch gone wrong, DDP wrappers.

What a launcher started must be what training sees: a default Accelerator on CPU under a
multi-process launch silently runs every rank alone (no DDP), so the world sizes are compared.
"""

from __future__ import annotations

import os

import torch

from hwr_dist.errors import HwrError


def check_elastic_store() -> None:
    # torch 2.14's elastic agents share one store across rendezvous rounds and the default
    # group's keys there do not name the round: a restarted group reads the dead group's
    # gloo addresses and fails ("connection refused") or hangs.
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 \
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise HwrError("restarts (--max_restarts) with torchrun's shared store hang when the group restarts; "
                       "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun with the c10d rendezvous, "
                       "as launch/torchrun.sh and launch/torchrun_multinode.sh do")


def from_launcher(key: str, mine, env: str, unset: str, cast=str, environ=os.environ):
    """One setting by the precedence rule: the config's value (the YAML or an hwr override) >
    the launcher's (accelerate launch's flags, its config file, or the environment variable `env`)
    > the default `unset`. A launcher cannot tell its own default (`unset`) from an explicit one,
    so only another value counts as set there. Both set and different: refused, naming both."""
    raw = environ.get(env, "")
    theirs = cast(raw) if raw and raw.lower() != str(unset) else None
    if mine is not None and theirs is not None and mine != theirs:
        raise HwrError(f"{key}={mine} in the config but {theirs} from the launcher ({env}, set by accelerate "
                       f"launch's flag or config file, or your environment); set it in one place only")
    return mine if mine is not None else (theirs if theirs is not None else cast(unset))


# accelerate launch's sharded engines, and the variable each sets for the processes it starts.
SHARDED_ENGINES = {"--use_deepspeed": "ACCELERATE_USE_DEEPSPEED", "--use_fsdp": "ACCELERATE_USE_FSDP",
                   "--use_megatron_lm": "ACCELERATE_USE_MEGATRON_LM"}


def check_engine() -> None:
    """The loop, its checkpoints (one state_dict per model) and exact resume are written for DDP: a
    launch that asks Accelerate to shard the model or the optimizer is refused, not half run."""
    from accelerate.utils import parse_flag_from_env

    for flag, env in SHARDED_ENGINES.items():
        if parse_flag_from_env(env):
            raise HwrError(f"accelerate launch {flag} ({env}=true, from the flag, accelerate's config file or "
                           "your environment) is not supported: hwr-dist trains with DDP; launch with --multi_gpu "
                           "(on CPUs --num_processes N), or distributed_type MULTI_GPU or MULTI_CPU in the config")


def make_accelerator(cfg):
    """The Accelerator for this process; settles train.mixed_precision and train.grad_accum_steps
    (None in the config: the launcher decides) into `cfg`, so the run records what was in effect."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    t = cfg.train
    t.mixed_precision = from_launcher("train.mixed_precision", t.mixed_precision, "ACCELERATE_MIXED_PRECISION", "no")
    t.grad_accum_steps = from_launcher("train.grad_accum_steps", t.grad_accum_steps,
                                       "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1", int)
    use_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise HwrError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if t.mixed_precision == "fp16" and use_cpu:
        raise HwrError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 on CPU")
    check_elastic_store()
    check_engine()
    # cpu=True matters: without it a CPU multi-process launch silently runs without DDP.
    # Accumulation is the loop's own (it scales each micro-batch's loss): Accelerate's stays at 1,
    # whatever ACCELERATE_GRADIENT_ACCUMULATION_STEPS says, or the loss would be divided twice.
    acc = Accelerator(cpu=use_cpu, mixed_precision=t.mixed_precision,
                      gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise HwrError(f"the launcher started {launched} processes but training sees {acc.num_processes}: "
                       "DDP is not set up; launch with accelerate launch --multi_gpu, or with torchrun")
    return acc


def rewrap_ddp(acc, model: torch.nn.Module) -> torch.nn.Module:
    """A new DDP wrapper around the same module: DDP registers the parameters that require grad
    when it is built, so parameters unfrozen later would silently not be all-reduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model, DDP):
        return model
    return acc.prepare_model(model.module)
