"""Checkpoints: written atomically, read with weights_only=True, checked before use.

A checkpoint is a plain dict of tensors and primitives (see `train.TrainState.to_dict`),
so it loads without unpickling code. Saving goes through a temporary file, fsync and
rename: a kill at any moment leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from hwr_dist.errors import HwrError


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """A .pt file, or a run directory (its best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"
    if not path.is_file():
        raise HwrError(f"checkpoint {path} not found; pass a .pt file or a run directory that has checkpoints/")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HwrError(f"checkpoint {path} is corrupt or not a checkpoint ({first[:160]}); "
                       "use another checkpoint, e.g. best.pt or a step checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise HwrError(f"{path} is not an hwr-dist checkpoint (no model and config inside); "
                       "pass a file written by `hwr train`")
    return ckpt


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


_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


def prune_step_checkpoints(folder: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _STEP_FILE.search(p.name)))
    for _, p in steps[: max(0, len(steps) - keep)]:
        p.unlink(missing_ok=True)
