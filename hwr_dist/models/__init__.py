"""Model registry: name -> builder(model config, number of classes) -> nn.Module.

Every model takes normalised images [B, 1, 28, 28] and returns logits [B, classes].
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from hwr_dist.models.cnn import build_cnn_bn, build_fast_cnn, build_lenet5, build_small_cnn
from hwr_dist.models.vgg import build_vgg

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": build_small_cnn,
    "lenet5": build_lenet5,
    "cnn_bn": build_cnn_bn,
    "fast_cnn": build_fast_cnn,
    "vgg": build_vgg,
}


def build_model(cfg, num_classes: int, pretrained: bool = True) -> nn.Module:
    """pretrained=False skips loading model.weights (the caller loads a checkpoint over it)."""
    if not pretrained and getattr(cfg, "weights", "none") != "none":
        import dataclasses

        cfg = dataclasses.replace(cfg, weights="none")
    return MODELS[cfg.name](cfg, num_classes)
