"""Model registry: name -> builder(model config, number of classes) -> nn.Module.

Every model takes normalised images [B, 1, 28, 28] and returns logits [B, classes].
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from hwr_dist.models.cnn import build_cnn_bn, build_lenet5, build_small_cnn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": build_small_cnn,
    "lenet5": build_lenet5,
    "cnn_bn": build_cnn_bn,
}


def build_model(cfg, num_classes: int) -> nn.Module:
    return MODELS[cfg.name](cfg, num_classes)
