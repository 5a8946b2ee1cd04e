"""What `hwr export` wrote, used by the tool itself: `hwr predict` and `hwr evaluate` take a checkpoint
or an exported file (TorchScript, ONNX, state dict, int8 or not) behind one face, `AnyModel`, a
classifier of 28x28 characters or a sequence model that reads a line (its `task`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwr_dist.data.loader import normalise
from hwr_dist.data.preprocess import LineLayout, line_layout
from hwr_dist.data.sequences import padded_unit
from hwr_dist.export.contract import layout_of
from hwr_dist.export.formats import detect_format, load_exported
from hwr_dist.export.quantize import quiet_exporters
from hwr_dist.tasks import task_name


@dataclass
class AnyModel:
    """A checkpoint or an exported file, with what predicting and evaluating need."""

    path: Path
    source: str  # "checkpoint", or the export's format
    classes: list[str]  # a sequence model's alphabet (CTC id k + 1)
    mean: float
    std: float
    model: nn.Module  # in eval mode; normalised float [N, 1, 28, 28] -> logits [N, classes], or a sequence
    # model's lines [N, 1, height, W] -> logits [N, frames, classes + 1]
    data_set: str
    cfg: Any | None  # the run's Config; TorchScript and ONNX exports carry only the contract, not the config
    report_dir: Path  # where `hwr evaluate` writes unless told
    architecture: str  # the model's registry name
    quantization: dict | None  # an export's int8 scheme
    run_dir: Path | None  # the training run's directory, when known
    task: str  # "classification" or "sequence"
    layout: LineLayout | None  # a sequence model's input lines; None for a classifier

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 28, 28] MNIST-style images -> class probabilities [N, classes]."""
        return self.model(normalise(images, self.mean, self.std)).float().softmax(1)

    @torch.no_grad()
    def line_logits(self, line: torch.Tensor) -> torch.Tensor:
        """uint8 [height, W] line (`preprocess.line_image`) -> a sequence model's logits [frames, classes + 1]."""
        from hwr_dist.models.crnn import CRNN

        logits = self.model(padded_unit(line.unsqueeze(0)).sub_(self.mean).div_(self.std))[0].float()
        return logits[: -(-line.shape[1] // CRNN.width_stride)]  # the line's own frames, as in evaluation


class _OnCpu(nn.Module):
    """An export's runtime as a module. ONNX Runtime and the int8 kernels run on the CPU: the input
    goes there, and the logits come back to the input's device (evaluation keeps its data on the GPU)."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x.cpu()).to(x.device)


def load_any(path: str | Path, threads: int | None = None) -> AnyModel:
    """A checkpoint (a .pt file or a run directory) or an exported file, told apart by content;
    `threads`: ONNX Runtime's intra-op threads."""
    from hwr_dist.checkpoint import load_trained
    from hwr_dist.config import config_from_dict

    path = Path(path)
    fmt = _export_format(path)
    if fmt is None:
        t = load_trained(path)
        task = task_name(t.cfg.data.name)
        return AnyModel(t.path, "checkpoint", t.classes, t.mean, t.std, t.model, t.cfg.data.name, t.cfg, t.run_dir,
                        t.cfg.model.name, None, t.run_dir, task, line_layout(t.cfg) if task == "sequence" else None)
    ex = load_exported(path, threads)
    cfg = config_from_dict(ex.config) if ex.config is not None else None
    source = Path(ex.meta["source_checkpoint"]) if ex.meta.get("source_checkpoint") else None
    run_dir = None if source is None else (source.parent.parent if source.parent.name == "checkpoints"
                                           else source.parent)
    task = ex.meta.get("task", "classification")  # exports from before sequence models are classifiers
    # beside the file, one folder per export: two exports in one folder must not share a report
    return AnyModel(path, ex.format, ex.classes, ex.mean, ex.std, _OnCpu(ex.run).eval(), ex.meta["data_set"],
                    cfg, path.with_name(f"{path.name}-report"), ex.meta.get("model", "unknown"),
                    ex.meta.get("quantization"), run_dir, task, layout_of(ex.meta) if task == "sequence" else None)


def _export_format(path: Path) -> str | None:
    """The format of the exported file `path`; None for a run directory, a checkpoint, or a file that
    is neither (which `load_trained` then rejects with its own message)."""
    if path.suffix.lower() == ".onnx":
        return "onnx"  # load_exported says so if it is missing or unreadable
    if not path.is_file():
        return None
    fmt = detect_format(path)
    if fmt == "onnx":  # not a zip archive: ONNX when it starts like a ModelProto (field 1, ir_version)
        with open(path, "rb") as f:
            return fmt if f.read(1) == b"\x08" else None
    if fmt == "state-dict":  # a torch.save archive: exports hold meta and state_dict, checkpoints do not
        try:
            with quiet_exporters():  # mmap: the keys, without reading the tensors
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not readable: load_trained reports why
            return None
        return fmt if isinstance(obj, dict) and "meta" in obj and "state_dict" in obj else None
    return fmt
