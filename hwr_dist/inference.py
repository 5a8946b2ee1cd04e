"""A trained model back from its checkpoint, with the preprocessing contract it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hwr_dist.checkpoint import load_checkpoint, load_model_state, resolve_checkpoint
from hwr_dist.config import Config, config_from_dict
from hwr_dist.errors import HwrError


@dataclass
class Trained:
    model: torch.nn.Module  # in eval mode, EMA weights when the run kept them
    cfg: Config
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
        x = images.unsqueeze(1).float().div(255).sub(self.mean).div(self.std)
        return self.model(x).float().softmax(1)


def load_trained(path: str | Path) -> Trained:
    from hwr_dist.models import MODELS, build_model

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
    load_model_state(model, ckpt["ema"] or ckpt["model"], str(path))
    mean, std = ckpt["norm"]
    return Trained(model.eval(), cfg, classes, float(mean), float(std), path)
