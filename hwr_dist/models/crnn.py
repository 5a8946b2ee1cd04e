"""CRNN for reading a line of handwriting: a conv stack turns the image into a sequence of
columns, an encoder (bidirectional LSTM or transformer) reads the sequence, and a linear layer
scores blank (id 0) and every character (alphabet[k] is id k + 1) per column, for CTC.

Inputs are normalised float images [B, 1, H, W] of any height and width, right-padded to the
batch's widest. The width is pooled by 4 (`width_stride`); both pools round up, so an image of
width w has ceil(w / 4) frames of its own in any batch (`output_lengths`).

The first two conv stages are layer for layer those of `build_fast_cnn` (only the pools round up,
which has no weights), so `init_from` starts them from a trained digit classifier: the digits in
a line look like the ones it learnt, and the conv stack's batch norms come with their statistics.
"""

from __future__ import annotations

import dataclasses

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from hwr_dist.errors import HwrError
from hwr_dist.models.cnn import _conv_bn
from hwr_dist.models.state import mismatch

COPIED_LAYERS = 8  # fast_cnn's backbone: conv, bn, relu, pool, conv, bn, relu, pool
ENCODERS = ("lstm", "transformer")
HEADS = 4  # attention heads of the transformer encoder


def sinusoid_positions(frames: int, dim: int, like: Tensor) -> Tensor:
    """[frames, dim] sine/cosine position codes, made for the sequence at hand (any width, and the
    ONNX graph computes them from the input's width). Computed in float32: half precision cannot
    tell positions apart past 2048."""
    pos = torch.arange(frames, device=like.device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=like.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angle = pos * freq
    return torch.stack((angle.sin(), angle.cos()), -1).flatten(1).to(like.dtype)


class EncoderBlock(nn.Module):
    """A pre-norm transformer layer. Not nn.TransformerEncoderLayer: the TorchScript-based ONNX exporter
    bakes the traced sequence length into nn.MultiheadAttention's reshapes; this one reshapes by -1."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """x [B, T, dim]; keep: bool [B, 1, 1, T], the frames that may be attended to (None: all)."""
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).flatten(2)))
        return x + self.drop(self.ff(self.norm2(x)))


class ColumnTransformer(nn.Module):
    """A small transformer encoder over the columns, with sinusoidal positions."""

    def __init__(self, features: int, dim: int, layers: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(features, dim)
        # The encoder's own dropout stays at the usual 0.1: model.dropout (0.5 by default) is the classifier's.
        self.blocks = nn.ModuleList(EncoderBlock(dim, 0.1) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        x = self.proj(x)
        x = x + sinusoid_positions(x.shape[1], self.dim, x)
        keep = None if lengths is None else (
            torch.arange(x.shape[1], device=x.device) < lengths.to(x.device)[:, None])[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)


class CRNN(nn.Module):
    """Conv stack (three conv-batchnorm stages, width w, 2w, 4w; height collapsed by max), encoder, linear."""

    width_stride = 4
    """Input columns per output frame."""

    def __init__(self, width: int, num_classes: int, encoder: str = "lstm", hidden: int = 128, layers: int = 2,
                 dropout: float = 0.5):
        super().__init__()
        w = self.width = width
        self.features = nn.Sequential(
            *_conv_bn(1, w), nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn(w, 2 * w), nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn(2 * w, 4 * w),
        )
        self.encoder_kind = encoder
        if encoder == "lstm":
            self.encoder = nn.LSTM(4 * w, hidden, layers, batch_first=True, bidirectional=True,
                                   dropout=dropout if layers > 1 else 0.0)
            out = 2 * hidden
        else:
            self.encoder = ColumnTransformer(4 * w, hidden, layers)
            out = hidden
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(out, num_classes + 1)
        self.weights_note = ""  # what init_from copied, for the run's log
        self.backbone_lr_scale = 1.0  # the conv stack's learning rate relative to the rest
        self.source_norm: tuple[float, float] | None = None  # (mean, std) the copied conv weights expect

    def output_lengths(self, widths: Tensor) -> Tensor:
        """Frames of their own for images of these widths: ceil(width / 4), at least 1."""
        return torch.div(widths + self.width_stride - 1, self.width_stride, rounding_mode="floor").clamp(min=1)

    def forward(self, x: Tensor, widths: Tensor | None = None) -> Tensor:
        """[B, 1, H, W] -> logits [B, T, classes + 1], T = ceil(W / 4), blank at 0.

        `widths` (int64 [B], each <= W): each image's real width. The LSTM then reads each sequence
        packed to its own length and the transformer masks the padding frames, so an image's frames
        do not depend on how wide its batch is (with batch norm in eval mode; training-mode batch
        statistics include the padding). Frames past an image's own length are meaningless.
        None (the export path) reads every column as real: feed one image, or images of one width.
        """
        f = self.features(x).amax(2).transpose(1, 2)  # the height collapsed: [B, T, 4w]
        lengths = None if widths is None else self.output_lengths(widths)
        if self.encoder_kind == "transformer":
            f = self.encoder(f, lengths)
        elif lengths is None:
            f, _ = self.encoder(f)
        else:
            packed = pack_padded_sequence(f, lengths.cpu(), batch_first=True, enforce_sorted=False)
            f, _ = pad_packed_sequence(self.encoder(packed)[0], batch_first=True, total_length=f.shape[1])
        return self.head(self.dropout(f))

    def set_input_norm(self, mean: float, std: float) -> None:
        """Fold the change from the copied weights' normalisation to the data's into the first stage
        (as `FineTuneCNN.set_input_norm` does); nothing to do unless `init_from` copied weights."""
        if self.source_norm is not None:
            fold_input_norm(self.features[0], self.features[1], self.source_norm, (mean, std))
            self.source_norm = (mean, std)

    # The rest of the loop's FineTunable face: every layer trains from the first step; the conv stack
    # (the part `init_from` starts) at `backbone_lr_scale` times the encoder's and head's rate.
    def on_epoch_start(self, epoch: int) -> bool:
        return False

    def frozen_at(self, epoch: int) -> bool:
        return False

    def param_groups(self) -> list[tuple[str, float, list]]:
        named = list(self.named_parameters())
        return [("backbone", self.backbone_lr_scale, [(n, p) for n, p in named if n.startswith("features.")]),
                ("head", 1.0, [(n, p) for n, p in named if not n.startswith("features.")])]


def build_crnn(cfg, num_classes: int) -> CRNN:
    """cfg: a ModelConfig (width, encoder, hidden, layers, dropout); num_classes: the alphabet's size."""
    if cfg.encoder not in ENCODERS:
        raise HwrError(f"model.encoder: expected one of {', '.join(ENCODERS)}, got {cfg.encoder!r}")
    if cfg.encoder == "transformer" and cfg.hidden % HEADS:
        raise HwrError(f"model.hidden: the transformer's {HEADS} heads need a multiple of {HEADS}, got {cfg.hidden}")
    model = CRNN(cfg.width, num_classes, cfg.encoder, cfg.hidden, cfg.layers, cfg.dropout)
    model.backbone_lr_scale = cfg.backbone_lr_scale
    return model


def fold_input_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d, source: tuple[float, float],
                    target: tuple[float, float]) -> None:
    """Make a bias-free conv fed `target`-normalised images see what it saw with `source`'s:
    x_src = (x * std + mean - src_mean) / src_std. The weights scale by std / src_std and the
    constant shift goes into the batch norm's running mean (in training the batch statistics absorb
    it anyway). Exact but for the taps on the zero-padded border."""
    (src_mean, src_std), (mean, std) = source, target
    with torch.no_grad():
        bn.running_mean.sub_(conv.weight.sum((1, 2, 3)) * (mean - src_mean) / src_std)
        conv.weight.mul_(std / src_std)


def load_conv_stages(model: CRNN, state: dict[str, Tensor], where: str) -> int:
    """Copy a fast_cnn state dict's two conv stages (weights and batch-norm statistics) into the
    CRNN's first two; returns how many tensors were copied."""
    own = {k: v for k, v in model.features.state_dict().items() if int(k.split(".")[0]) < COPIED_LAYERS}
    problem = mismatch(own, state, list(own), [])
    if problem:
        raise HwrError(f"model.init_from: {where} does not fit this CRNN's conv stack ({problem})")
    model.features.load_state_dict({k: state[k] for k in own}, strict=False)
    return len(own)


def init_from(model: CRNN, source: str | Path) -> str:
    """Start the conv stack from a trained fast_cnn: `builtin` (the shipped digit model), a checkpoint
    or its run directory. Its (mean, std) is kept in `model.source_norm`: call `model.set_input_norm`
    with the data's. Returns a one-line note of what was copied (also in `model.weights_note`)."""
    from hwr_dist.models.pretrained import BUILTIN, BUILTIN_NAME, builtin_model_config, load_weight_file

    if str(source) == BUILTIN_NAME:
        state, _, norm = load_weight_file(BUILTIN)
        m, where = builtin_model_config(), "the shipped digit model (builtin)"
    else:
        from hwr_dist.checkpoint import load_trained  # the checkpoint module sits above the models

        try:
            trained = load_trained(source)
        except HwrError as e:
            raise HwrError(f"model.init_from: {e}") from None
        state, norm = trained.model.state_dict(), (trained.mean, trained.std)
        m, where = dataclasses.asdict(trained.cfg.model), str(trained.path)
    if m["name"] != "fast_cnn":
        raise HwrError(f"model.init_from: {where} holds a {m['name']} model; the CRNN's conv stack starts "
                       "from a fast_cnn digit classifier (or builtin)")
    if m.get("stem", "pool") != "pool" or m.get("pool_first"):
        pool_first = str(m.get("pool_first", False)).lower()
        raise HwrError(f"model.init_from: {where} is a fast_cnn with model.stem={m['stem']} model.pool_first="
                       f"{pool_first}, whose stages differ from the CRNN's; start from one trained with "
                       "model.stem=pool model.pool_first=false")
    if m["width"] != model.width:
        raise HwrError(f"model.init_from: {where} is a fast_cnn of width {m['width']} and this CRNN has "
                       f"width {model.width}; set model.width={m['width']}")
    n = load_conv_stages(model, state, where)
    model.source_norm = norm
    model.weights_note = (f"conv stages 1-2 from fast_cnn {where} ({n} tensors, batch-norm statistics included; "
                          f"its inputs were normalised with mean {norm[0]:.4f}, std {norm[1]:.4f})")
    return model.weights_note
