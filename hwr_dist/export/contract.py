"""The preprocessing contract an exported file carries: what its user must feed it, and where it came from.

Every format takes normalised float32 images ``[batch, 1, 28, 28]`` and returns logits
``[batch, classes]``; the contract (a flat JSON-able dict, `contract()`) names the classes, the
normalisation and the model, data set and checkpoint it came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

FORMATS = ("torchscript", "onnx", "state-dict")
QUANTIZE = ("int8",)
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "state-dict": ".state_dict.pt"}
META_FILE = "hwr_meta.json"  # TorchScript _extra_files entry
CONTRACT_VERSION = 1
SIDE = 28
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def contract(trained, fmt: str, quantization: dict[str, Any] | None, ema: bool) -> dict[str, Any]:
    """What a user of the exported file needs to feed it: the preprocessing the model was trained with."""
    from hwr_dist import __version__

    return {
        "hwr_export": CONTRACT_VERSION,
        "format": fmt,
        "model": trained.cfg.model.name,
        "classes": list(trained.classes),
        "input_size": [SIDE, SIDE],
        "input_shape": ["batch", 1, SIDE, SIDE],
        "color": "grayscale",
        "ink": "white on black",
        "mean": trained.mean,
        "std": trained.std,
        "preprocess": "uint8 pixels p (MNIST-style: ink white on black, digit centred by mass in 28x28) "
                      "-> float32 (p / 255 - mean) / std, shape [batch, 1, 28, 28]",
        "output": "logits [batch, classes]; softmax gives probabilities, classes[i] names column i",
        "weights": "ema" if ema else "model",
        "quantization": quantization,
        "data_set": trained.cfg.data.name,
        "source_checkpoint": str(trained.path.resolve()),
        "source_sha256": _sha256(trained.path),
        "producer": f"hwr-dist {__version__}, torch {torch.__version__}",
    }


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


def example_input(trained, batch: int, seed: int = 0) -> torch.Tensor:
    """Random normalised input of the contract's shape, for tracing, checking and timing."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 1, SIDE, SIDE, generator=g)
    return (pixels - trained.mean) / trained.std


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
