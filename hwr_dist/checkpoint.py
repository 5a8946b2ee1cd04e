"""The checkpoint schema: the one module that knows a checkpoint's keys.

A checkpoint is a plain dict of tensors and primitives, so it loads with
`torch.load(weights_only=True)` and never unpickles code:

    format      CHECKPOINT_FORMAT, checked on load
    model       the bare model's state dict (no DDP or torch.compile prefixes)
    ema         the EMA weights' state dict, or None
    optimizer   the optimizer's state dict
    scaler      the grad scaler's state dict, or None
    state       TrainState as a dict: where the run is
    rng         one dict of RNG states per rank
    world_size  processes that wrote it
    config      the resolved Config as a dict
    classes     class names, in label order
    norm        [mean, std] of the training pixels in [0, 1]

Files are written through `files.atomic_write`: a kill at any moment leaves the old file or the
new one, never half of one.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from hwr_dist.errors import HwrError
from hwr_dist.files import atomic_write

CHECKPOINT_FORMAT = 1
_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


@dataclass
class TrainState:
    """Where the run is; with the RNG states, enough to continue bit-exactly."""

    epoch: int = 0  # current epoch, 0-based
    batch: int = 0  # micro-batches of this rank's shard done in the current epoch
    step: int = 0  # optimizer steps done
    best_accuracy: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best, for early stopping
    tracker_run_id: str = ""


# --- writing -----------------------------------------------------------------------------


def pack(*, model: dict, optimizer: dict, scaler: dict | None, ema: dict | None, state: TrainState,
         rng: list[dict], world_size: int, config: dict, classes: list[str], norm: tuple[float, float]) -> dict:
    return {"format": CHECKPOINT_FORMAT, "model": model, "optimizer": optimizer, "scaler": scaler, "ema": ema,
            "state": asdict(state), "rng": rng, "world_size": world_size, "config": config,
            "classes": list(classes), "norm": [float(norm[0]), float(norm[1])]}


def write(ckpt: dict, folder: Path, *, best: bool = False, step_file: bool = False, epoch_file: int = 0,
          keep_last: int = 3) -> None:
    """last.pt, and best/step/epoch files as hard links to it (the same bytes, no second write)."""
    last = folder / "last.pt"
    atomic_write(last, ckpt)
    step = ckpt["state"]["step"]
    for name, wanted in (("best.pt", best), (f"step-{step:08d}.pt", step_file),
                         (f"epoch-{epoch_file:03d}.pt", epoch_file > 0)):
        if wanted:
            tmp = folder / f".{name}.link"
            tmp.unlink(missing_ok=True)
            os.link(last, tmp)
            os.replace(tmp, folder / name)
    if step_file:
        steps = sorted((int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _STEP_FILE.search(p.name)))
        for _, p in steps[: max(0, len(steps) - keep_last)]:
            p.unlink(missing_ok=True)


# --- reading -----------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A .pt file, or a run directory (its best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"
    if not path.is_file():
        raise HwrError(f"checkpoint {path} not found; pass a .pt file or a run directory that has checkpoints/")
    return path


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _check(ckpt: Any, path: Path) -> str:
    """What is wrong with a loaded checkpoint dict, or ''."""
    fmt = ckpt.get("format")
    if not isinstance(fmt, int) or fmt < CHECKPOINT_FORMAT:
        return f"checkpoint format {fmt!r} is older than this version reads ({CHECKPOINT_FORMAT}); retrain it"
    if fmt > CHECKPOINT_FORMAT:
        return (f"checkpoint format {fmt} is newer than this version reads ({CHECKPOINT_FORMAT}); "
                "upgrade hwr-dist")
    if not isinstance(ckpt["config"], dict):
        return "its config is not a mapping"
    for key in ("model", "ema"):
        value = ckpt.get(key)
        if (key == "model" or value is not None) and not _is_state_dict(value):
            return f"'{key}' is not a state dict of tensors"
        bad = [k for k, t in (value or {}).items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            return f"'{key}' weights are not finite ({bad[0]}); use an earlier checkpoint"
    classes = ckpt.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of at least two class names"
    norm = ckpt.get("norm")
    if not (isinstance(norm, (list, tuple)) and len(norm) == 2 and all(isinstance(v, (int, float)) for v in norm)
            and all(math.isfinite(v) for v in norm) and norm[1] > 0):
        return f"'norm' must be [mean, std] with a finite std > 0, got {norm!r}"
    return ""


def _load_failure(e: Exception) -> str:
    """torch.load's reason in a few words: its own messages run to paragraphs of advice."""
    if isinstance(e, pickle.UnpicklingError):  # "Weights only load failed ...", with terminal escapes
        return "not a torch.save file of tensors and plain values"
    if isinstance(e, EOFError):
        return "the file ends early"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first.split(". ")[0][:160]  # e.g. "PytorchStreamReader failed reading zip archive: ..."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, checked completely: keys, types, format, finite weights, std > 0."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise HwrError(f"checkpoint {path} is corrupt or not a checkpoint ({_load_failure(e)}); "
                       "use another checkpoint, e.g. best.pt or a step checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise HwrError(f"{path} is not an hwr-dist checkpoint (no model and config inside); "
                       "pass a file written by `hwr train`")
    problem = _check(ckpt, path)
    if problem:
        raise HwrError(f"{path} is not a usable hwr-dist checkpoint: {problem}")
    return ckpt


def eval_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """The weights to evaluate and ship: the EMA copy when the run kept one, else the model."""
    return ckpt["ema"] or ckpt["model"]


def train_state(ckpt: dict, path: Path) -> TrainState:
    state = ckpt.get("state")
    names = {f.name for f in fields(TrainState)}
    if not isinstance(state, dict) or not set(state) <= names or not isinstance(ckpt.get("rng"), list) \
            or not isinstance(ckpt.get("world_size"), int) or not isinstance(ckpt.get("optimizer"), dict):
        raise HwrError(f"{path} cannot be resumed: its training state is incomplete; "
                       "start a new run from its weights instead")
    return TrainState(**state)


def find_resume(resume: str, run_dir: Path) -> tuple[dict | None, Path | None]:
    """The checkpoint that train.resume asks for ('' fresh, auto, or a path), checked."""
    last = run_dir / "checkpoints" / "last.pt"
    if resume == "":
        if last.exists():
            raise HwrError(f"{run_dir} already holds a run; continue it with train.resume=auto, "
                           "or start another with train.name=NEW_NAME")
        return None, None
    source = last if resume == "auto" else Path(resume)
    if resume == "auto" and not last.exists():
        return None, None
    return load_checkpoint(source), source


# --- a trained model back ------------------------------------------------------------------


@dataclass
class Trained:
    model: torch.nn.Module  # in eval mode, EMA weights when the run kept them
    cfg: Any  # hwr_dist.config.Config
    classes: list[str]
    mean: float
    std: float
    path: Path

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 28, 28] MNIST-style images -> class probabilities [N, classes]."""
        from hwr_dist.data.loader import normalise

        return self.model(normalise(images, self.mean, self.std)).float().softmax(1)


def load_trained(path: str | Path) -> Trained:
    from hwr_dist.config import config_from_dict
    from hwr_dist.models import MODELS, build_model, load_model_state

    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except HwrError as e:
        raise HwrError(f"{path} holds a config this version cannot read ({e}); retrain or use a matching version") from None
    if cfg.model.name not in MODELS:
        raise HwrError(f"{path} was trained with model '{cfg.model.name}', which this version does not know")
    classes = list(ckpt["classes"])
    model = build_model(cfg.model, len(classes), pretrained=False)  # the checkpoint holds every weight
    load_model_state(model, eval_weights(ckpt), str(path))
    mean, std = ckpt["norm"]
    return Trained(model.eval(), cfg, classes, float(mean), float(std), path)
