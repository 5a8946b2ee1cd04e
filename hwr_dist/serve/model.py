"""The model behind `hwr serve`: a training checkpoint, a run directory or an export, as one callable.

Model files are the operator's own, named on the command line; nothing a client sends is ever
loaded here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hwr_dist.errors import HwrError

SIDE = 28


@dataclass
class ServedModel:
    probabilities: Callable[[torch.Tensor], torch.Tensor]  # uint8 [N, 28, 28] -> probabilities [N, classes]
    classes: list[str]
    format: str  # checkpoint, torchscript, onnx or state-dict
    id: str  # architecture and the first 12 hex digits of the file's SHA-256
    architecture: str
    file: str  # the file's name only: the server does not publish the operator's paths
    input: dict[str, Any]
    training: dict[str, Any]
    quantization: dict[str, Any] | None = field(default=None)
    read_line: Callable[[torch.Tensor], dict] | None = None
    """A sequence model's reader: uint8 line [height, W] -> {"text", "probability"}; None for a classifier."""
    layout: Any = None  # a sequence model's preprocess.LineLayout


def load_model(path: str | Path, threads: int | None = None) -> ServedModel:
    """A checkpoint (.pt), a run directory or an export, through the loader `hwr predict` uses
    (ONNX Runtime for .onnx, with `threads` intra-op threads; PyTorch's are set process-wide by the caller)."""
    from hwr_dist.export.use import load_any

    path = Path(path)
    if not path.exists():
        raise HwrError(f"model {path} not found; pass a checkpoint (.pt), a run directory, "
                       "or an export (.onnx, .torchscript.pt)")
    m = load_any(path, threads)
    read_line, contract = None, input_contract(m.mean, m.std)
    if m.task == "sequence":
        from hwr_dist.commands.predict import reading

        def read_line(line: torch.Tensor) -> dict:
            return reading(m.line_logits(line), m.classes, None, None)

        contract = line_contract(m.layout, m.mean, m.std)
    return ServedModel(m.probabilities, list(m.classes), m.source, model_id(m.architecture, m.path), m.architecture,
                       m.path.name, contract, training_summary(m.run_dir, m.data_set), m.quantization, read_line,
                       m.layout)


def model_id(architecture: str, path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{architecture}-{h.hexdigest()[:12]}"


def input_contract(mean: float, std: float) -> dict[str, Any]:
    return {"size": [SIDE, SIDE], "shape": ["batch", 1, SIDE, SIDE], "color": "grayscale", "ink": "white on black",
            "mean": float(mean), "std": float(std),
            "preprocess": "the ink found (grey levels kept, measured from the paper), cropped and scaled so "
                          "its longer side is 20 pixels, centred by mass in 28x28 (MNIST-style, as `hwr predict`), then "
                          "float32 (p / 255 - mean) / std"}


def line_contract(layout, mean: float, std: float) -> dict[str, Any]:
    return {"task": "sequence", "shape": ["batch", 1, layout.height, "width"], "color": "grayscale",
            "ink": "white on black", "mean": float(mean), "std": float(std),
            "preprocess": f"the whole image is read as one line: its ink cropped, scaled to fill {layout.ink:.0%} "
                          f"of {layout.height} rows keeping its aspect, {layout.margin} blank columns either side, "
                          "then float32 (p / 255 - mean) / std; the answer is the text read (CTC)"}


def training_summary(run_dir: Path | None, data_set: str | None) -> dict[str, Any]:
    """From the run directory's summary.json and tracking.json, when the run directory is still there."""
    summary = _json(run_dir / "summary.json") if run_dir else {}
    tracking = _json(run_dir / "tracking.json") if run_dir else {}
    return {"data_set": data_set, "test_accuracy": summary.get("test_accuracy"),
            "best_val_accuracy": summary.get("best_val_accuracy"), "steps": summary.get("steps"),
            "run_id": summary.get("run_id") or tracking.get("run_id"), "outcome": summary.get("outcome")}


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
