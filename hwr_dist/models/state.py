"""Loading a state dict into a model, with one clear line when it does not fit."""

from __future__ import annotations

import torch

from hwr_dist.errors import HwrError


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")


def mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], keys: list[str],
             extra: list[str]) -> str:
    """What keeps `state` from loading into a model whose state is `own`, over `keys`; '' if it fits."""
    missing = [k for k in keys if k not in state]
    shapes = [k for k in keys if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing {_listing(missing)}")
    if extra:
        parts.append(f"unexpected {_listing(extra)}")
    if shapes:
        k = shapes[0]
        parts.append(f"shape of {k} is {tuple(state[k].shape)}, the model has {tuple(own[k].shape)}"
                     + (f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    return "; ".join(parts)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with a one-line error for checkpoints of another model or class count."""
    own = model.state_dict()
    problem = mismatch(own, state, list(own), sorted(set(state) - set(own)))
    if problem:
        raise HwrError(f"{where} does not fit this model ({problem}): "
                       "it was trained with another model or number of classes")
    model.load_state_dict(state)
