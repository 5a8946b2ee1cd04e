"""Optimizer, learning-rate schedule and weight EMA.

The schedule is a pure function of the optimizer step (nanoGPT's `get_lr`): it steps
exactly once per optimizer step whatever the number of processes, and its whole state
is the step number the checkpoint already holds.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from hwr_dist.models import FineTunable


def get_lr(step: int, total_steps: int, steps_per_epoch: int, base_lr: float, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if cfg.name == "constant":
        return base_lr
    if cfg.name == "step":
        return base_lr * cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    warmup = int(cfg.warmup_fraction * total_steps)
    floor = base_lr * cfg.min_lr_ratio
    if step < warmup:
        # onecycle starts from the floor, cosine (with linear warmup) from zero
        start = floor if cfg.name == "onecycle" else 0.0
        return start + (base_lr - start) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """No weight decay on biases and norm weights; every group carries an `lr_scale`."""
    named = model.param_groups() if isinstance(model, FineTunable) else [("", 1.0, list(model.named_parameters()))]
    params = []
    for _, lr_scale, items in named:
        decay = [p for n, p in items if p.ndim > 1]
        no_decay = [p for n, p in items if p.ndim <= 1]
        params += [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": lr_scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale}]
    params = [g for g in params if g["params"]]
    cls = EAGER[cfg.name]
    if cfg.name == "sgd":
        return cls(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    # The fused kernel updates every parameter in one pass (same maths): on CUDA a few launches and no
    # host sync, on a CPU about a fifth of the per-tensor loop's time (a tenth of a small CNN's step).
    fused = all(p.device.type in ("cpu", "cuda") for g in params for p in g["params"])
    return cls(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), **({"fused": True} if fused else {}))


def eager(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` without the guards that keep torch.compile out of torch.optim's methods. Each guard
    imports torch._dynamo on its first call: 1.7 s of pure Python a process, the largest part of a
    short run's start-up, for a compiler that never traces this loop's optimizer calls. The subclass
    runs the same method bodies, the step without autograd as the guard does, and its state_dict is
    the same: checkpoints load either way."""
    base = torch.optim.Optimizer
    methods = {name: inspect.unwrap(getattr(base, name))
               for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")}
    step = inspect.unwrap(cls.step)

    def eager_step(self, closure=None):
        with torch.no_grad():
            return step(self, closure)

    return type(cls.__name__, (cls,), {**methods, "step": eager_step, "__module__": __name__})


EAGER = {"sgd": eager(torch.optim.SGD), "adam": eager(torch.optim.Adam), "adamw": eager(torch.optim.AdamW)}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class EMA:
    """Exponential moving average of a model's parameters and buffers, for evaluation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


def check_config(cfg) -> None:
    """The optim and schedule sections."""
    from hwr_dist.config import check, one_of

    one_of("optim.name", cfg.optim.name, {"sgd", "adam", "adamw"})
    check(cfg.optim.lr > 0, "optim.lr", "a number > 0", cfg.optim.lr)
    check(cfg.optim.weight_decay >= 0, "optim.weight_decay", "a number >= 0", cfg.optim.weight_decay)
    check(0 <= cfg.optim.momentum < 1, "optim.momentum", "a number in [0, 1)", cfg.optim.momentum)
    check(0 <= cfg.optim.beta2 < 1, "optim.beta2", "a number in [0, 1)", cfg.optim.beta2)
    check(cfg.optim.grad_clip >= 0, "optim.grad_clip", "a number >= 0", cfg.optim.grad_clip)
    check(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing", "a number in [0, 1)", cfg.optim.label_smoothing)
    one_of("schedule.name", cfg.schedule.name, {"onecycle", "cosine", "step", "constant"})
    check(0 <= cfg.schedule.warmup_fraction < 1, "schedule.warmup_fraction", "a number in [0, 1)", cfg.schedule.warmup_fraction)
    check(0 <= cfg.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "a number in [0, 1]", cfg.schedule.min_lr_ratio)
    check(cfg.schedule.step_epochs > 0, "schedule.step_epochs", "a positive integer", cfg.schedule.step_epochs)
    check(0 < cfg.schedule.gamma <= 1, "schedule.gamma", "a number in (0, 1]", cfg.schedule.gamma)
