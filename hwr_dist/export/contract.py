"""The preprocessing contract an exported file carries: what its user must feed it, and where it came from.

A classifier's file, in every format, takes normalised float32 images ``[batch, 1, 28, 28]`` and
returns logits ``[batch, classes]``. A sequence model's (CRNN, ``task: sequence``) takes lines
``[batch, 1, height, width]`` of any width and returns per-frame logits ``[batch, frames,
1 + len(classes)]`` for CTC (frames = ceil(width / 4); column 0 is the blank, column k + 1 is
``classes[k]``, the alphabet). The contract (a flat JSON-able dict, `contract()`) names the task, the
classes, the input layout, the normalisation and the model, data set and checkpoint it came from;
exports written before the task was recorded are classifiers.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from hwr_dist.data.preprocess import LineLayout, line_layout
from hwr_dist.data.sequences import RIGHT_PAD
from hwr_dist.models.crnn import CRNN
from hwr_dist.tasks import task_name

FORMATS = ("torchscript", "onnx", "state-dict")
QUANTIZE = ("int8",)
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "state-dict": ".state_dict.pt"}
META_FILE = "hwr_meta.json"  # TorchScript _extra_files entry
CONTRACT_VERSION = 1
SIDE = 28
INPUT_NAME, OUTPUT_NAME = "image", "logits"
TRACE_WIDTH = 40  # a sequence model's example width for tracing; `CHECK_WIDTHS` differ from it
CHECK_WIDTHS = (37, 96)  # widths a sequence export is checked at against PyTorch


def is_sequence(trained) -> bool:
    """Whether a checkpoint's model reads sequences (CTC) rather than classifying one character."""
    return task_name(trained.cfg.data.name) == "sequence"


def contract(trained, fmt: str, quantization: dict[str, Any] | None, ema: bool) -> dict[str, Any]:
    """What a user of the exported file needs to feed it: the preprocessing the model was trained with."""
    from hwr_dist import __version__

    return {
        "hwr_export": CONTRACT_VERSION,
        "task": task_name(trained.cfg.data.name),
        "format": fmt,
        "model": trained.cfg.model.name,
        "classes": list(trained.classes),
        **(_line_input(line_layout(trained.cfg)) if is_sequence(trained) else _character_input()),
        "color": "grayscale",
        "ink": "white on black",
        "mean": trained.mean,
        "std": trained.std,
        "weights": "ema" if ema else "model",
        "quantization": quantization,
        "data_set": trained.cfg.data.name,
        "source_checkpoint": str(trained.path.resolve()),
        "source_sha256": _sha256(trained.path),
        "producer": f"hwr-dist {__version__}, torch {torch.__version__}",
    }


def _character_input() -> dict[str, Any]:
    return {
        "input_size": [SIDE, SIDE],
        "input_shape": ["batch", 1, SIDE, SIDE],
        "preprocess": "uint8 pixels p (MNIST-style: ink white on black, digit centred by mass in 28x28) "
                      "-> float32 (p / 255 - mean) / std, shape [batch, 1, 28, 28]",
        "output": "logits [batch, classes]; softmax gives probabilities, classes[i] names column i",
    }


def _line_input(layout: LineLayout) -> dict[str, Any]:
    return {
        "input_height": layout.height,
        "ink_height": layout.ink,
        "margin": layout.margin,
        "input_shape": ["batch", 1, layout.height, "width"],
        "preprocess": f"uint8 pixels p of one line, ink white on black: the ink cropped, scaled with its aspect "
                      f"kept to round(ink_height * {layout.height}) rows and centred in {layout.height} rows, with "
                      f"{layout.margin} blank columns either side -> float32 (p / 255 - mean) / std, shape "
                      f"[batch, 1, {layout.height}, width]; the lines of a batch are padded on the right with "
                      f"background (p = 0) to the widest, plus {RIGHT_PAD} more background columns, as in training",
        "output": f"logits [batch, frames, 1 + len(classes)], frames = ceil(width / {CRNN.width_stride}); CTC: "
                  "column 0 is the blank, column k + 1 is classes[k]; of each line keep its own "
                  f"ceil(line width / {CRNN.width_stride}) frames, read the best column of each, merge repeats and "
                  "drop blanks (or beam search)",
    }


def layout_of(meta: dict[str, Any]) -> LineLayout:
    """A sequence export's input layout back from its contract."""
    return LineLayout(int(meta["input_height"]), float(meta["ink_height"]), int(meta["margin"]))


def dynamic_axes(sequence: bool) -> dict[str, dict[int, str]]:
    """The axes of an ONNX graph that take any size: the batch, and a line's width and frames."""
    if sequence:
        return {INPUT_NAME: {0: "batch", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "frames"}}
    return {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}


def output_shape(trained, batch: int, width: int = TRACE_WIDTH) -> tuple[int, ...]:
    """The logits' shape for `example_input(trained, batch, width=width)`."""
    if is_sequence(trained):
        return batch, math.ceil(width / CRNN.width_stride), len(trained.classes) + 1
    return batch, len(trained.classes)


def dynamic_meta(fmt: str) -> dict[str, Any]:
    tool = ("onnxruntime.quantization.quantize_dynamic (MatMul, Gemm)" if fmt == "onnx"
            else "torch.ao.quantization.quantize_dynamic (nn.Linear)")
    return {"scheme": "int8 dynamic dense", "layers": "dense (Linear)", "weights": "int8, per tensor",
            "activations": "quantised per batch at run time", "tool": tool}


def static_conv_meta(calibration: str) -> dict[str, Any]:
    return {"scheme": "int8 static conv + int8 dynamic dense", "layers": "conv block (static), dense (dynamic)",
            "weights": "int8: conv per channel, dense per tensor",
            "activations": f"conv block: uint8, scales calibrated on {calibration}; dense: quantised per batch",
            "tool": "torch.ao.quantization FX graph mode (x86 backend)"}


def example_input(trained, batch: int, seed: int = 0, width: int = TRACE_WIDTH) -> torch.Tensor:
    """Random normalised input of the contract's shape, for tracing, checking and timing: a classifier's
    28x28, a sequence model's lines its input height tall and `width` wide."""
    g = torch.Generator().manual_seed(seed)
    shape = (line_layout(trained.cfg).height, width) if is_sequence(trained) else (SIDE, SIDE)
    pixels = torch.rand(batch, 1, *shape, generator=g)
    return (pixels - trained.mean) / trained.std


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
