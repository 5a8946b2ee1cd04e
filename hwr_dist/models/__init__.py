"""Model registry: name -> builder(model config, number of classes) -> nn.Module.

Every model takes normalised images [B, 1, 28, 28] and returns logits [B, classes].
Models that fine-tune (VGG; a small CNN whose config sets model.weights, model.freeze or
model.backbone_lr_scale) offer the loop a few optional hooks, typed by `FineTunable`;
the loop asks `isinstance(model, FineTunable)` and never looks for attributes by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from torch import nn

from hwr_dist.errors import HwrError
from hwr_dist.models.crnn import HEADS, build_crnn, init_from
from hwr_dist.models.cnn import build_cnn_bn, build_fast_cnn, build_lenet5, build_small_cnn
from hwr_dist.models.pretrained import build_vgg, check_cnn_weights, check_vgg_config, check_weights, load_cnn_weights
from hwr_dist.models.state import load_model_state, mismatch  # noqa: F401  (the package's face)


@runtime_checkable
class FineTunable(Protocol):
    weights_note: str
    """What loading the starting weights did, for the run's log ('' if nothing)."""

    def set_input_norm(self, mean: float, std: float) -> None:
        """The data's normalisation, folded into the first layer's weights."""

    def on_epoch_start(self, epoch: int) -> bool:
        """Gradual unfreezing; True when the trainable parameters changed (DDP is then rebuilt)."""

    def frozen_at(self, epoch: int) -> bool:
        """Whether the whole backbone is frozen during `epoch` (cached features then hold)."""

    def param_groups(self) -> list[tuple[str, float, list]]:
        """(name, learning-rate scale, named parameters) per group, frozen ones included."""


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": build_small_cnn,
    "lenet5": build_lenet5,
    "cnn_bn": build_cnn_bn,
    "fast_cnn": build_fast_cnn,
    "vgg": build_vgg,
    "crnn": build_crnn,
}


def build_model(cfg, num_classes: int, pretrained: bool = True) -> nn.Module:
    """pretrained=False skips loading model.weights (the caller loads a checkpoint over it); the
    network and its hooks are the same either way, so a resumed run gets the optimizer it saved."""
    if cfg.name == "vgg":
        return build_vgg(cfg, num_classes, pretrained)
    model = MODELS[cfg.name](cfg, num_classes)
    if pretrained and cfg.name == "crnn" and cfg.init_from:
        init_from(model, cfg.init_from)
    elif pretrained and cfg.weights != "none":
        load_cnn_weights(model, cfg.weights)
    return model


def check_config(cfg) -> None:
    """The model section: the registry's names and each value's range (config.py knows no registry)."""
    from hwr_dist.config import check, one_of

    m = cfg.model
    one_of("model.name", m.name, MODELS)
    check(0 <= m.dropout < 1, "model.dropout", "a number in [0, 1)", m.dropout)
    # Wider nets than this have more weights than memory holds (cnn_bn doubles the width per stage).
    check(0 < m.width <= 1024, "model.width", "an integer in 1..1024", m.width)
    one_of("model.freeze", m.freeze, {"none", "features"})
    check(m.unfreeze_after_epochs >= 0, "model.unfreeze_after_epochs", "an integer >= 0", m.unfreeze_after_epochs)
    check(m.backbone_lr_scale > 0, "model.backbone_lr_scale", "a number > 0", m.backbone_lr_scale)
    if m.name == "vgg":
        check_vgg_config(cfg)
        return
    if m.init_from and m.name != "crnn":
        raise HwrError(f"model.init_from starts a CRNN's conv layers; model.name={m.name} starts from "
                       "model.weights instead")
    if m.name == "crnn":
        one_of("model.encoder", m.encoder, {"lstm", "transformer"})
        check(0 < m.hidden <= 4096, "model.hidden", "an integer in 1..4096", m.hidden)
        check(0 < m.layers <= 16, "model.layers", "an integer in 1..16", m.layers)
        check(m.encoder != "transformer" or m.hidden % HEADS == 0, "model.hidden",
              f"a multiple of {HEADS} (the transformer's attention heads)", m.hidden)
        if m.weights != "none" or m.freeze != "none":
            raise HwrError("model.name=crnn starts from a digit classifier with model.init_from=CHECKPOINT, "
                           "not model.weights or model.freeze")
    check_cnn_weights(m)
    if m.trainable_blocks:
        raise HwrError(f"model.trainable_blocks counts VGG's conv blocks; model.name={m.name} freezes its whole "
                       "backbone with model.freeze=features")
    if m.freeze == "none" and m.unfreeze_after_epochs:
        raise HwrError("model.unfreeze_after_epochs needs model.freeze=features")
    if m.name == "fast_cnn":
        one_of("model.head", m.head, {"linear", "mlp"})
        one_of("model.stem", m.stem, {"pool", "stride2"})


def preflight(model_cfg) -> None:
    """Fail before any data is loaded when the model's starting weights cannot be had."""
    if model_cfg.init_from not in ("", "builtin") and not Path(model_cfg.init_from).exists():
        raise HwrError(f"model.init_from: {model_cfg.init_from} does not exist; give a digit classifier's "
                       "checkpoint (a .pt file or its run directory)")
    check_weights(model_cfg)
