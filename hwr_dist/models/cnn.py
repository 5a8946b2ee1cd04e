"""Convolutional nets for 28x28 grayscale images, trained from scratch or fine-tuned.

Each builder returns a plain `nn.Sequential`; a config that fine-tunes (model.weights, model.freeze
or model.backbone_lr_scale set) gets the same layers as a `FineTuneCNN`, which adds the loop's
`FineTunable` hooks. The state dict is the same either way, so checkpoints move between the two.
"""

from __future__ import annotations

import torch
from torch import nn


class FineTuneCNN(nn.Sequential):
    """The layers before the Flatten are the backbone, the rest the head.

    `freeze=features` trains the head alone (the backbone's batch norms stay in eval mode, so
    their statistics keep the source data's), `unfreeze_after_epochs` lets everything train
    from that epoch on, and the backbone learns at `backbone_lr_scale` times the head's rate.
    """

    def __init__(self, layers: list[nn.Module], cfg):
        super().__init__(*layers)
        self.backbone_len = next(i for i, m in enumerate(self) if isinstance(m, nn.Flatten))
        self.unfreeze_after_epochs = cfg.unfreeze_after_epochs
        self.backbone_lr_scale = cfg.backbone_lr_scale
        self.frozen = False
        self.weights_note = ""
        self.source_norm: tuple[float, float] | None = None  # (mean, std) the starting weights expect
        self.set_frozen(cfg.freeze == "features")

    def set_input_norm(self, mean: float, std: float) -> None:
        """Fold the change from the weights' normalisation to the data's into the first convolution:
        it then sees what it saw in training, x_src = (x * std + mean - src_mean) / src_std. Exact
        but for the taps on a zero-padded border (the padding is the data's mean, not the source's)."""
        if self.source_norm is None:
            return
        src_mean, src_std = self.source_norm
        conv = self[0]
        with torch.no_grad():
            shift = conv.weight.sum((1, 2, 3)) * (mean - src_mean) / src_std
            if conv.bias is not None:
                conv.bias.add_(shift)
            else:  # a bias-free conv feeds a batch norm (after a max-pool, which keeps a per-channel shift),
                # whose running mean absorbs the shift
                next(m for m in self if isinstance(m, nn.BatchNorm2d)).running_mean.sub_(shift)
            conv.weight.mul_(std / src_std)
        self.source_norm = (mean, std)

    def backbone(self) -> list[nn.Module]:
        return list(self)[: self.backbone_len]

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = frozen
        for m in self.backbone():
            for p in m.parameters():
                p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FineTuneCNN":
        super().train(mode)
        if self.frozen:
            for m in self.backbone():
                m.eval()
        return self

    def on_epoch_start(self, epoch: int) -> bool:
        if self.frozen and self.unfreeze_after_epochs and epoch >= self.unfreeze_after_epochs:
            self.set_frozen(False)
            return True
        return False

    def frozen_at(self, epoch: int) -> bool:
        # The feature cache is VGG's: a small CNN's backbone costs little next to the step, and its
        # recipes augment every batch, so the cache would never hold.
        return False

    def param_groups(self) -> list[tuple[str, float, list]]:
        named = list(self.named_parameters())
        backbone = [(n, p) for n, p in named if int(n.split(".")[0]) < self.backbone_len]
        head = [(n, p) for n, p in named if int(n.split(".")[0]) >= self.backbone_len]
        return [("backbone", self.backbone_lr_scale, backbone), ("head", 1.0, head)]


def fine_tunes(cfg) -> bool:
    """Whether a model section starts from weights or trains its layers unevenly: then the hooks."""
    return cfg.weights != "none" or cfg.freeze != "none" or cfg.backbone_lr_scale != 1.0


def _net(layers: list[nn.Module], cfg) -> nn.Sequential:
    return FineTuneCNN(layers, cfg) if fine_tunes(cfg) else nn.Sequential(*layers)


def build_small_cnn(cfg, num_classes: int) -> nn.Module:
    """The classic tutorial net: conv 32, max-pool, dense 128, dropout, dense."""
    return _net([
        nn.Conv2d(1, cfg.width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(cfg.width * 13 * 13, 128), nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout),
        nn.Linear(128, num_classes),
    ], cfg)


def build_lenet5(cfg, num_classes: int) -> nn.Module:
    """LeCun et al. 1998, with ReLU and max-pooling as it is usually trained today."""
    return _net([
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout),
        nn.Linear(84, num_classes),
    ], cfg)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _conv_pool(cin: int, cout: int, pool_first: bool) -> list[nn.Module]:
    """A conv stage that halves the image. Pooling first normalises and activates a quarter of the pixels;
    ReLU commutes with the max, batch norm does not (its scale may be negative), so the two orders are
    different nets, not one net computed faster."""
    if not pool_first:
        return [*_conv_bn(cin, cout), nn.MaxPool2d(2)]
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def build_cnn_bn(cfg, num_classes: int) -> nn.Module:
    """Three conv-batchnorm stages (28 -> 14 -> 7 -> 1), width doubling per stage."""
    w = cfg.width
    return _net([
        *_conv_bn(1, w), *_conv_bn(w, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(4 * w, num_classes),
    ], cfg)


def build_fast_cnn(cfg, num_classes: int) -> nn.Module:
    """Two conv-batchnorm-ReLU-max-pool stages (width, 2 x width; 28 -> 14 -> 7) and one linear layer.

    About as many FLOPs per image as small_cnn at width 16, but batch norm and a second conv
    layer: it reaches a given accuracy in fewer epochs (the CPU recipes' model, see bench/RESULTS.md)."""
    w = cfg.width
    features = 2 * w * 7 * 7
    head = ([nn.Linear(features, 128), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(128, num_classes)]
            if cfg.head == "mlp" else [nn.Dropout(cfg.dropout), nn.Linear(features, num_classes)])
    # The stride-2 stem skips the full-resolution batch norm, ReLU and pooling, most of the first stage's cost.
    stem = ([nn.Conv2d(1, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if cfg.stem == "stride2" else _conv_pool(1, w, cfg.pool_first))
    return _net([
        *stem,
        *_conv_pool(w, 2 * w, cfg.pool_first),
        nn.Flatten(),
        *head,
    ], cfg)
