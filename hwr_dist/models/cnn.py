"""Convolutional nets trained from scratch on 28x28 grayscale images."""

from __future__ import annotations

from torch import nn


def build_small_cnn(cfg, num_classes: int) -> nn.Module:
    """The classic tutorial net: conv 32, max-pool, dense 128, dropout, dense."""
    return nn.Sequential(
        nn.Conv2d(1, cfg.width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(cfg.width * 13 * 13, 128), nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout),
        nn.Linear(128, num_classes),
    )


def build_lenet5(cfg, num_classes: int) -> nn.Module:
    """LeCun et al. 1998, with ReLU and max-pooling as it is usually trained today."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout),
        nn.Linear(84, num_classes),
    )


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def build_cnn_bn(cfg, num_classes: int) -> nn.Module:
    """Three conv-batchnorm stages (28 -> 14 -> 7 -> 1), width doubling per stage."""
    w = cfg.width
    return nn.Sequential(
        *_conv_bn(1, w), *_conv_bn(w, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(4 * w, num_classes),
    )


def build_fast_cnn(cfg, num_classes: int) -> nn.Module:
    """Two conv-batchnorm-ReLU-max-pool stages (width, 2 x width; 28 -> 14 -> 7) and one linear layer.

    About as many FLOPs per image as small_cnn at width 16, but batch norm and a second conv
    layer: it reaches a given accuracy in fewer epochs (the CPU recipes' model, see bench/RESULTS.md)."""
    w = cfg.width
    features = 2 * w * 7 * 7
    head = ([nn.Linear(features, 128), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(128, num_classes)]
            if cfg.head == "mlp" else [nn.Dropout(cfg.dropout), nn.Linear(features, num_classes)])
    return nn.Sequential(
        *_conv_bn(1, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), nn.MaxPool2d(2),
        nn.Flatten(),
        *head,
    )
